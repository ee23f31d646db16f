"""Pose conventions and converters.

Inside the code there is one convention, COLMAP's `cam_from_world` (x right, y down, z forward; a 3x4
[R|t] mapping world points into the camera). The nerfstudio `transform_matrix` (camera-to-world, OpenGL
axes: x right, y up, z backward) is converted at the edges, and each converter has a round-trip test.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

# Flips y and z: OpenGL camera axes <-> OpenCV/COLMAP camera axes.
GL_FROM_CV_44 = np.diag([1.0, -1.0, -1.0, 1.0])


def world_from_cam_gl_to_cam_from_world(world_from_cam_gl_44: np.ndarray) -> np.ndarray:
    """nerfstudio transform_matrix (4x4, OpenGL) -> COLMAP cam_from_world (3x4)."""
    world_from_cam_cv_44 = np.asarray(world_from_cam_gl_44, float) @ GL_FROM_CV_44
    return invert_pose(world_from_cam_cv_44[:3])


def cam_from_world_to_world_from_cam_gl(cam_from_world_34: np.ndarray) -> np.ndarray:
    """COLMAP cam_from_world (3x4) -> nerfstudio transform_matrix (4x4, OpenGL)."""
    world_from_cam_cv_44 = to_44(invert_pose(cam_from_world_34))
    return world_from_cam_cv_44 @ GL_FROM_CV_44


def to_44(pose_34: np.ndarray) -> np.ndarray:
    """3x4 [R|t] -> 4x4 homogeneous."""
    out = np.eye(4)
    out[:3] = np.asarray(pose_34, float)[:3]
    return out


def invert_pose(pose_34: np.ndarray) -> np.ndarray:
    """Invert a rigid 3x4 [R|t]."""
    pose_34 = np.asarray(pose_34, float)
    R_33, t_3 = pose_34[:3, :3], pose_34[:3, 3]
    return np.concatenate([R_33.T, (-R_33.T @ t_3)[:, None]], axis=1)


def camera_center(cam_from_world_34: np.ndarray) -> np.ndarray:
    """Camera centre in world coordinates."""
    R_33, t_3 = cam_from_world_34[:3, :3], cam_from_world_34[:3, 3]
    return -R_33.T @ t_3


def quat_wxyz_from_R(R_33: np.ndarray) -> np.ndarray:
    """Rotation matrix -> unit quaternion (w, x, y, z), w >= 0, as COLMAP writes it."""
    x, y, z, w = Rotation.from_matrix(np.asarray(R_33, float)).as_quat()
    q = np.array([w, x, y, z])
    return q if q[0] >= 0 else -q


def R_from_quat_wxyz(q_wxyz: np.ndarray) -> np.ndarray:
    """Unit quaternion (w, x, y, z) -> rotation matrix."""
    w, x, y, z = q_wxyz
    return Rotation.from_quat([x, y, z, w]).as_matrix()


def look_at_cam_from_world(center_3: np.ndarray, target_3: np.ndarray, up_3=(0.0, 0.0, 1.0)) -> np.ndarray:
    """cam_from_world (3x4, OpenCV axes) of a camera at `center_3` looking at `target_3`, world `up_3` up."""
    center_3 = np.asarray(center_3, float)
    z = np.asarray(target_3, float) - center_3
    z /= np.linalg.norm(z)
    x = np.cross(z, np.asarray(up_3, float))
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R_33 = np.stack([x, y, z])  # rows: camera axes in world coordinates
    return np.concatenate([R_33, (-R_33 @ center_3)[:, None]], axis=1)
