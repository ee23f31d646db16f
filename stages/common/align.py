"""Aligning estimated camera poses to ground truth and measuring their errors.

The Sim3 takes its rotation from the camera orientations (the chordal L2 mean of the per-camera rotation
offsets), not from the camera centres: on a straight drive the centres lie on a line, which leaves the roll
about that line free and would inflate rotation errors by degrees. Scale and translation then follow from
the centres by least squares with that rotation fixed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.spatial.transform import Rotation

from stages.common.geometry import camera_center


@dataclasses.dataclass(frozen=True)
class Sim3:
    """x_gt = scale * R_33 @ x_est + t_3 (maps the estimate's world into ground truth's world)."""

    scale: float
    R_33: np.ndarray
    t_3: np.ndarray

    def apply(self, pts_N3: np.ndarray) -> np.ndarray:
        """Transform points of the estimate's world into ground truth's world."""
        return self.scale * np.asarray(pts_N3) @ self.R_33.T + self.t_3

    def apply_pose(self, cam_from_world_34: np.ndarray) -> np.ndarray:
        """Express an estimated cam_from_world in ground truth's world."""
        R_33 = cam_from_world_34[:3, :3] @ self.R_33.T
        c_3 = self.apply(camera_center(cam_from_world_34)[None])[0]
        return np.concatenate([R_33, (-R_33 @ c_3)[:, None]], axis=1)


def project_to_so3(M_33: np.ndarray) -> np.ndarray:
    """Closest rotation to a 3x3 matrix (Frobenius norm)."""
    U, _, Vt = np.linalg.svd(M_33)
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    return U @ D @ Vt


def align_sim3(est_cam_from_world: list[np.ndarray], gt_cam_from_world: list[np.ndarray]) -> Sim3:
    """Sim3 mapping the estimate onto ground truth, rotation from orientations, scale/translation from centres."""
    if len(est_cam_from_world) < 2:
        raise ValueError("a Sim3 alignment needs at least two cameras")
    # R_est_i = R_gt_i @ R  for x_gt = s R x_est + t, so R = mean over i of R_gt_i^T R_est_i.
    M_33 = sum(g[:3, :3].T @ e[:3, :3] for e, g in zip(est_cam_from_world, gt_cam_from_world))
    R_33 = project_to_so3(M_33)
    c_est_N3 = np.stack([camera_center(p) for p in est_cam_from_world])
    c_gt_N3 = np.stack([camera_center(p) for p in gt_cam_from_world])
    rot_N3 = (c_est_N3 - c_est_N3.mean(0)) @ R_33.T
    dst_N3 = c_gt_N3 - c_gt_N3.mean(0)
    denom = float((rot_N3**2).sum())
    scale = float((rot_N3 * dst_N3).sum() / denom) if denom > 1e-12 else 1.0
    t_3 = c_gt_N3.mean(0) - scale * c_est_N3.mean(0) @ R_33.T
    return Sim3(scale, R_33, t_3)


def rotation_angle_deg(R_33: np.ndarray) -> float:
    """Angle of a rotation matrix in degrees."""
    # The rotation vector's norm stays precise near zero, where arccos of the trace does not.
    return float(np.degrees(Rotation.from_matrix(project_to_so3(R_33)).magnitude()))


def pose_errors(est_cam_from_world: list[np.ndarray], gt_cam_from_world: list[np.ndarray]) -> dict:
    """Sim3-align the estimate, then rotation (deg), position and ATE errors in ground-truth units.

    Both lists must be in capture order: the trajectory length (for the percentages) sums consecutive steps.
    """
    sim3 = align_sim3(est_cam_from_world, gt_cam_from_world)
    rot_deg, pos = [], []
    for e, g in zip(est_cam_from_world, gt_cam_from_world):
        aligned = sim3.apply_pose(e)
        rot_deg.append(rotation_angle_deg(aligned[:3, :3] @ g[:3, :3].T))
        pos.append(float(np.linalg.norm(camera_center(aligned) - camera_center(g))))
    c_gt_N3 = np.stack([camera_center(g) for g in gt_cam_from_world])
    length = float(np.linalg.norm(np.diff(c_gt_N3, axis=0), axis=1).sum())
    pos_a = np.asarray(pos)
    ate = float(np.sqrt(np.mean(pos_a**2)))
    pct = 100.0 / length if length > 0 else float("nan")
    return {
        "rotation_error_deg_median": float(np.median(rot_deg)),
        "rotation_error_deg_max": float(np.max(rot_deg)),
        "position_error_median": float(np.median(pos_a)),
        "position_error_max": float(np.max(pos_a)),
        "position_error_pct_median": float(np.median(pos_a) * pct),
        "ate_rmse": ate,
        "ate_rmse_pct": ate * pct,
        "trajectory_length": length,
        "sim3_scale": sim3.scale,
        "sim3": sim3,
        "per_image_rotation_error_deg": rot_deg,
        "per_image_position_error": pos,
    }
