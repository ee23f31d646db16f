"""Units of stages/common: params checking, atomic outputs, pose converters, scene reading."""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import numpy as np
import pytest

from stages.common import geometry as geo
from stages.common.errors import StageError
from stages.common.outputs import atomic_dir
from stages.common.params import build, load_section
from stages.common.scene import Intrinsics, find_scene_inputs, read_transforms


@dataclasses.dataclass(frozen=True)
class _P:
    n: int = 3
    """a count"""
    mode: Literal["a", "b"] = "a"
    """a mode"""
    scale: float = 1.0
    """a scale"""


def test_params_unknown_key_names_it_and_allowed():
    with pytest.raises(StageError, match=r"unknown key 'nn'.*allowed keys are mode, n, scale"):
        build(_P, {"nn": 1}, "params.yaml:x")


def test_params_bad_literal_and_type():
    with pytest.raises(StageError, match=r"x.mode: 'c' is not allowed; use one of 'a', 'b'"):
        build(_P, {"mode": "c"}, "x")
    with pytest.raises(StageError, match=r"x.n: expected an integer"):
        build(_P, {"n": "3"}, "x")
    assert build(_P, {"scale": 2}, "x").scale == 2.0


def test_load_section_defaults_when_missing(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("other: {a: 1}\n")
    assert load_section(p, "x", _P) == _P()
    with pytest.raises(StageError, match="params file not found"):
        load_section(tmp_path / "nope.yaml", "x", _P)


def test_atomic_dir_replaces_on_success_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (out / "new.txt").exists()
    assert (out / "new.txt").exists() and not (out / "old.txt").exists()
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "new.txt").exists()


def test_pose_converters_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(20):
        R = geo.R_from_quat_wxyz(rng.normal(size=4) / 1.0)
        cfw = np.concatenate([R, rng.normal(size=(3, 1))], axis=1)
        back = geo.world_from_cam_gl_to_cam_from_world(geo.cam_from_world_to_world_from_cam_gl(cfw))
        np.testing.assert_allclose(back, cfw, atol=1e-12)
        q = geo.quat_wxyz_from_R(R)
        assert q[0] >= 0
        np.testing.assert_allclose(geo.R_from_quat_wxyz(q), R, atol=1e-12)


def test_gl_convention_camera_looks_down_minus_z():
    # An OpenGL camera at (0,0,5) with identity rotation looks along world -z: the origin is in front.
    T = np.eye(4)
    T[2, 3] = 5.0
    cfw = geo.world_from_cam_gl_to_cam_from_world(T)
    p_cam = cfw[:3, :3] @ np.zeros(3) + cfw[:3, 3]
    assert p_cam[2] == pytest.approx(5.0)  # positive depth in OpenCV axes
    np.testing.assert_allclose(geo.camera_center(cfw), [0, 0, 5])


def test_look_at_puts_target_on_optical_axis():
    cfw = geo.look_at_cam_from_world([1, 2, 1.5], [10, 2, 1.5])
    p = cfw[:3, :3] @ np.array([10, 2, 1.5]) + cfw[:3, 3]
    np.testing.assert_allclose(p[:2], 0, atol=1e-12)
    assert p[2] == pytest.approx(9)
    # world up (z) maps to image up (-y in OpenCV axes)
    assert (cfw[:3, :3] @ np.array([0, 0, 1.0]))[1] == pytest.approx(-1)


def test_intrinsics_scaled_keeps_pixel_centres():
    K = Intrinsics(w=200, h=100, fx=100, fy=100, cx=100, cy=50)
    half = K.scaled(100, 50)
    assert (half.fx, half.cx, half.cy) == (50, 50, 25)


def test_read_transforms_missing_file_is_named(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "transforms.json").write_text(json.dumps({
        "fl_x": 100, "fl_y": 100, "cx": 50, "cy": 50, "w": 100, "h": 100,
        "frames": [{"file_path": "images/gone.png", "transform_matrix": np.eye(4).tolist()}],
    }))
    with pytest.raises(StageError, match=r"names a missing file 'images/gone.png'"):
        read_transforms(tmp_path)


def test_find_scene_inputs_errors(tmp_path):
    with pytest.raises(StageError, match="scene folder not found"):
        find_scene_inputs(tmp_path / "nope")
    (tmp_path / "images").mkdir()
    with pytest.raises(StageError, match="has no input"):
        find_scene_inputs(tmp_path)
