"""Sim3 alignment from orientations and the pose error measures."""

from __future__ import annotations

import numpy as np
import pytest

from stages.common.align import align_sim3, pose_errors, rotation_angle_deg
from stages.common.geometry import R_from_quat_wxyz, camera_center, look_at_cam_from_world


def _straight_drive(n=20):
    return [look_at_cam_from_world([i * 1.0, 0, 1.6], [i * 1.0 + 10, 0.3 * np.sin(i), 1.5]) for i in range(n)]


def _transform(poses, s, R, t):
    """Express poses in a world where x_new = s R x + t."""
    out = []
    for p in poses:
        Rn = p[:3, :3] @ R.T
        c = s * R @ camera_center(p) + t
        out.append(np.concatenate([Rn, (-Rn @ c)[:, None]], axis=1))
    return out


def test_align_recovers_sim3_exactly_on_a_straight_drive():
    gt = _straight_drive()
    R = R_from_quat_wxyz(np.array([0.9, 0.1, -0.3, 0.2]) / np.linalg.norm([0.9, 0.1, -0.3, 0.2]))
    est = _transform(gt, 0.37, R, np.array([4.0, -2.0, 7.0]))
    sim3 = align_sim3(est, gt)
    assert sim3.scale == pytest.approx(1 / 0.37)
    np.testing.assert_allclose(sim3.R_33, R.T, atol=1e-9)
    err = pose_errors(est, gt)
    assert err["rotation_error_deg_max"] < 1e-6 and err["position_error_max"] < 1e-9
    assert err["trajectory_length"] == pytest.approx(19.0)


def test_errors_report_a_known_perturbation():
    gt = _straight_drive()
    est = [p.copy() for p in gt]
    # rotate camera 5 by 2 degrees about its optical axis
    a = np.radians(2.0)
    Rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    est[5] = np.concatenate([Rz @ gt[5][:3, :3], (Rz @ gt[5][:3, 3:])], axis=1)
    err = pose_errors(est, gt)
    assert err["rotation_error_deg_max"] == pytest.approx(2.0, abs=0.15)
    assert err["rotation_error_deg_median"] < 0.15


def test_rotation_angle():
    a = np.radians(30)
    R = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    assert rotation_angle_deg(R) == pytest.approx(30)
