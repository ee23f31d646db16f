"""The radiance field on a tiny analytic scene: it fits the views with the right depth, stops on a non-finite loss
and survives a save/load round trip."""

from __future__ import annotations

import dataclasses
import re

import cv2
import numpy as np
import pytest
import torch

from stages.recon.field import (FieldConfig, NonFiniteLoss, PRESETS, TrainView, load_field, render_view,
                                save_field, train_field)

W, H = 64, 48
K = np.array([[50.0, 0, W / 2], [0, 50.0, H / 2], [0, 0, 1]])
SMALL = FieldConfig(plane_levels=(16, 32, 64), plane_channels=4, hidden=16, env_height=8, steps=200,
                    samples_per_batch=6144, rays_per_batch=1024, candidates=48, samples_per_ray=12,
                    occ_resolution=32, lr=0.03)


def _texture(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth colour pattern on the plane z = 0 (features a few pixels wide at the cameras' distance)."""
    return np.stack([0.5 + 0.4 * np.sin(3 * x) * np.cos(2 * y), 0.5 + 0.4 * np.cos(4 * x + 1),
                     0.5 + 0.4 * np.sin(5 * y)], -1)


def _look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """cam_from_world 3x4 (x right, y down, z forward) for a camera at eye looking at target."""
    z = (target - eye) / np.linalg.norm(target - eye)
    x = np.cross(z, [0.0, 1.0, 0.0])
    x /= np.linalg.norm(x)
    R = np.stack([x, np.cross(z, x), z])
    return np.concatenate([R, (-R @ eye)[:, None]], 1)


def _render_truth(P: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image and z-depth of the textured plane z = 0 seen by camera P."""
    v, u = np.mgrid[0:H, 0:W] + 0.5
    R, t = P[:, :3], P[:, 3]
    dirs = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1) @ R
    eye = -R.T @ t
    depth = -eye[2] / dirs[..., 2]  # t along a direction with unit camera z is the z-depth
    hit = eye + depth[..., None] * dirs
    return _texture(hit[..., 0], hit[..., 1]), depth


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """Ten views of the plane from 2.5-3 units away, written as PNGs, with their true depths."""
    root = tmp_path_factory.mktemp("field")
    views, depths = [], []
    for i in range(10):
        a = 2 * np.pi * i / 10
        eye = np.array([0.6 * np.cos(a), 0.6 * np.sin(a), 2.5 + 0.05 * i])
        P = _look_at(eye, np.array([0.1 * np.sin(a), 0.0, 0.0]))
        img, depth = _render_truth(P)
        path = root / f"{i:02d}.png"
        cv2.imwrite(str(path), (img[:, :, ::-1] * 255).round().astype(np.uint8))
        views.append(TrainView(f"{i:02d}", path, K, P))
        depths.append(depth)
    xy = np.random.default_rng(0).uniform(-1.5, 1.5, (500, 2))
    points = np.concatenate([xy, np.zeros((500, 1))], 1)
    return root, views, depths, points


@pytest.fixture(scope="module")
def trained(scene):
    root, views, _, points = scene
    torch.manual_seed(0)
    return train_field(views, points, SMALL, device="cpu", seed=0, work_dir=root / "work")


def test_field_fits_views_with_true_depth(scene, trained):
    _, views, depths, _ = scene
    model, stats = trained
    assert stats["steps"] == SMALL.steps and not stats["stopped_early"]
    for view, true_depth in list(zip(views, depths))[::3]:
        rgb, depth, opacity = render_view(model, view.K, view.cam_from_world, W, H)
        target = cv2.imread(str(view.image))[:, :, ::-1].astype(np.float32) / 255
        psnr = -10 * np.log10(np.mean((rgb - target) ** 2))
        assert psnr >= 25.0, f"view {view.name}: PSNR {psnr:.1f} dB"
        assert np.median(np.abs(depth - true_depth) / true_depth) < 0.10
        assert np.median(opacity) > 0.9


def test_non_finite_loss_names_the_step(scene):
    root, views, _, points = scene
    cfg = dataclasses.replace(SMALL, lr=float("inf"), steps=5)
    with pytest.raises(NonFiniteLoss, match=r"training stopped at step \d+: the loss is nan"):
        train_field(views, points, cfg, device="cpu", seed=0, work_dir=root / "work_nan")


def test_save_load_renders_the_same(scene, trained, tmp_path):
    _, views, _, _ = scene
    model, _ = trained
    save_field(tmp_path / "field.pt", model)
    loaded = load_field(tmp_path / "field.pt", "cpu")
    assert loaded.cfg == SMALL
    view = views[1]
    a = render_view(model, view.K, view.cam_from_world, W, H)
    b = render_view(loaded, view.K, view.cam_from_world, W, H)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_config_round_trip_and_presets():
    for cfg in PRESETS.values():
        assert FieldConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(Exception, match=re.escape("unknown setting(s) ['bogus']")):
        FieldConfig.from_dict({"bogus": 1})
