"""Intrinsics model selection (stages.common.intrinsics) on exact synthetic models with pixel noise.

Each model is a street of points seen by a camera driven along a path (a 90 deg turn, or straight ahead), with
0.5 px noise on every observation. Selection starts from the true structure with the mapper's assumptions
(principal point at the centre, focal 1 % off, distortion as given) and must recover what the images say.
"""

from __future__ import annotations

import math

import numpy as np
import pycolmap
import pytest

from stages.common.intrinsics import PP_MAX_STD_REL, select_intrinsics

W, H, F = 640, 360, 450.0


def _cam_from_world(center: np.ndarray, heading: float) -> pycolmap.Rigid3d:
    """A level camera at `center` looking along `heading` (world z up; camera x right, y down, z forward)."""
    forward = np.array([math.cos(heading), math.sin(heading), 0.0])
    right = np.array([math.sin(heading), -math.cos(heading), 0.0])
    R_wc = np.stack([right, [0.0, 0.0, -1.0], forward], axis=1)
    return pycolmap.Rigid3d(pycolmap.Rotation3d(R_wc.T), -R_wc.T @ center)


def _path(kind: str, n: int = 30) -> list[tuple[np.ndarray, float]]:
    if kind == "turn":  # a quarter circle of radius 15 m, heading turning with it
        angles = np.linspace(0, math.pi / 2, n)
        return [(np.array([15 * math.sin(a), 15 * (1 - math.cos(a)), 1.6]), float(a)) for a in angles]
    return [(np.array([1.0 * i, 0.0, 1.6]), 0.0) for i in range(n)]


def synthetic_model(kind: str, true_params: list[float], start_params: list[float], seed: int = 0):
    """(reconstruction with start_params, true camera) for a drive of `kind` through a street of points."""
    rng = np.random.default_rng(seed)
    true_cam = pycolmap.Camera.create_from_model_id(1, pycolmap.CameraModelId.SIMPLE_RADIAL, F, W, H)
    true_cam.params = true_params
    path = _path(kind)
    centers = np.stack([c for c, _ in path])
    # points on both sides of the path (facades 4-12 m away, 0-8 m high) and on the road
    base = centers[rng.integers(0, len(centers), 2500)] + rng.uniform(-20, 20, (2500, 3)) * [1, 1, 0]
    pts = base + np.column_stack([np.zeros(2500), np.zeros(2500), rng.uniform(-1.6, 6.4, 2500)])
    rec = pycolmap.Reconstruction()
    cam = pycolmap.Camera.create_from_model_id(1, pycolmap.CameraModelId.SIMPLE_RADIAL, F, W, H)
    cam.params = start_params
    rec.add_camera_with_trivial_rig(cam)
    tracks: dict[int, list[tuple[int, np.ndarray]]] = {}
    poses = []
    for i, (c, heading) in enumerate(path):
        pose = _cam_from_world(c, heading)
        poses.append(pose)
        P = pose.matrix()
        xc = pts @ P[:, :3].T + P[:, 3]
        front = (xc[:, 2] > 2) & (xc[:, 2] < 40)
        idx = np.flatnonzero(front)
        uv = np.asarray(true_cam.img_from_cam(xc[idx])) + rng.normal(0, 0.5, (len(idx), 2))
        inside = (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H)
        for j, p in zip(idx[inside], uv[inside]):
            tracks.setdefault(int(j), []).append((i + 1, p))
    points2D: dict[int, list] = {i + 1: [] for i in range(len(path))}
    obs = []
    for j, track in tracks.items():
        if len(track) < 3:
            continue
        for image_id, p in track:
            obs.append((j, image_id, len(points2D[image_id])))
            points2D[image_id].append(pycolmap.Point2D(np.asarray(p, float)))
    for image_id, pose in enumerate(poses, start=1):
        im = pycolmap.Image(name=f"{image_id:03d}.png", camera_id=1, image_id=image_id)
        im.points2D = pycolmap.Point2DList(points2D[image_id])
        rec.add_image_with_trivial_frame(im, pose)
    point_ids = {}
    for j, image_id, k in obs:
        if j not in point_ids:
            point_ids[j] = rec.add_point3D(pts[j], pycolmap.Track())
        rec.add_observation(point_ids[j], pycolmap.TrackElement(image_id, k))
    return rec, true_cam


def test_a_turn_determines_an_off_centre_principal_point_and_no_distortion():
    truth = [F, 335.0, 170.0, 0.0]  # rectified-KITTI-like: principal point 15 px / 10 px off the centre
    rec, _ = synthetic_model("turn", truth, [F * 1.01, W / 2, H / 2, 0.0])
    out, info = select_intrinsics(rec, {1})
    f, cx, cy, k1 = out.cameras[1].params
    assert info["distortion"] is False and k1 == 0.0  # the pinhole truth: no distortion term
    assert info["principal_point"] is True, info
    assert abs(cx - 335.0) < 1.5 and abs(cy - 170.0) < 1.5
    assert f == pytest.approx(F, rel=0.003)
    assert info["principal_point_std_px"]["1"] < PP_MAX_STD_REL * math.hypot(W, H)


def test_a_straight_drive_keeps_the_principal_point_at_the_centre():
    # Driving straight ahead, the principal point is not determined: freeing it would let it wander.
    rec, _ = synthetic_model("straight", [F, 335.0, 170.0, 0.0], [F * 1.01, W / 2, H / 2, 0.0])
    out, info = select_intrinsics(rec, {1})
    assert info["principal_point"] is False
    assert "not determined" in info["principal_point_reason"]
    assert info["principal_point_std_px"]["1"] > PP_MAX_STD_REL * math.hypot(W, H)
    assert tuple(out.cameras[1].params[1:3]) == (W / 2, H / 2)


def test_a_real_distortion_is_kept_and_recovered():
    truth = [F, W / 2, H / 2, -0.08]
    rec, _ = synthetic_model("turn", truth, [F * 1.01, W / 2, H / 2, 0.0])
    out, info = select_intrinsics(rec, {1})
    f, _, _, k1 = out.cameras[1].params
    assert info["distortion"] is True and info["distortion_bic_gain"] > 0
    assert k1 == pytest.approx(-0.08, abs=0.005) and f == pytest.approx(F, rel=0.003)


def test_known_cameras_stay_constant():
    rec, _ = synthetic_model("turn", [F, W / 2, H / 2, 0.0], [F * 1.01, W / 2, H / 2, 0.01])
    out, info = select_intrinsics(rec, set())
    assert "skipped" in info and list(out.cameras[1].params) == [F * 1.01, W / 2, H / 2, 0.01]
