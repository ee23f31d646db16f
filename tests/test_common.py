"""Units of stages/common: params checking, atomic outputs, pose converters, scene reading and settings."""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

import numpy as np
import pytest
import yaml

from stages.common import geometry as geo
from stages.common.errors import StageError
from stages.common.outputs import atomic_dir
from stages.common.params import build, load_section
from stages.common.scene import (
    Intrinsics,
    SceneSettings,
    find_scene_inputs,
    norm_rel,
    read_scene_settings,
    read_transforms,
    sequence_order,
    write_scene_settings,
)


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


# ------------------------------------------------------------------------------ transforms.json file_path


def _transforms(folder, file_path: str) -> None:
    (folder / "transforms.json").write_text(json.dumps({
        "frames": [{"file_path": "images/a.png", "transform_matrix": np.eye(4).tolist()},
                   {"file_path": file_path, "transform_matrix": np.eye(4).tolist()}],
    }))


def test_norm_rel_resolves_dots_inside_and_refuses_leaving():
    assert norm_rel("./images//a.png") == "images/a.png"
    assert norm_rel("images/../images/./a.png") == "images/a.png"
    assert norm_rel("images/sub/../../video.mp4") == "video.mp4"
    for bad in ("/etc/passwd", "../x.png", "../../../etc/passwd", "images/../../x.png", "C:/x.png"):
        with pytest.raises(ValueError):
            norm_rel(bad)


@pytest.mark.parametrize("file_path, why", [
    ("../secret.png", "climbs out of the scene folder"),
    ("../../../etc/passwd", "climbs out of the scene folder"),
    ("images/../../secret.png", "climbs out of the scene folder"),
    ("ABSOLUTE", "is absolute"),
])
def test_read_transforms_refuses_paths_that_leave_the_scene(tmp_path, file_path, why):
    scene = tmp_path / "scene"
    (scene / "images").mkdir(parents=True)
    (scene / "images/a.png").write_bytes(b"x")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"x")  # it exists: refusing must not depend on the file being missing
    file_path = str(secret) if file_path == "ABSOLUTE" else file_path
    _transforms(scene, file_path)
    for check_files in (True, False):
        with pytest.raises(StageError) as exc:
            read_transforms(scene, check_files=check_files)
        msg = str(exc.value)
        assert "\n" not in msg
        assert msg.startswith(f"{scene / 'transforms.json'}: frame 1 has file_path {file_path!r}, which {why}")
        assert msg.endswith("; file paths must be relative to the scene folder and stay inside it")


def test_read_transforms_accepts_dots_that_stay_inside_and_refuses_the_folder_itself(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images/a.png").write_bytes(b"x")
    _transforms(tmp_path, "images/../images/./a.png")
    tr = read_transforms(tmp_path)
    assert [f.file_path for f in tr.frames] == ["images/a.png", "images/a.png"]
    _transforms(tmp_path, "images/..")
    with pytest.raises(StageError, match=r"frame 1 has file_path 'images/\.\.', which names the scene folder itself"):
        read_transforms(tmp_path, check_files=False)


# ------------------------------------------------------------------------------------- image sequences


def test_sequence_order_recognises_counting_names_in_numeric_order():
    assert sequence_order([f"{i:06d}.png" for i in range(49)]) == list(range(49))
    assert sequence_order(["frame_0003.jpg", "frame_0001.jpg", "frame_0002.jpg"]) == [1, 2, 0]
    assert sequence_order(["IMG_1236.JPG", "IMG_1234.JPG", "IMG_1240.JPG"]) == [1, 0, 2]  # gaps are fine
    assert sequence_order(["img10.png", "img9.png", "img100.png", "img11.png"]) == [1, 0, 3, 2]
    # A constant number in the prefix (camera 0) is text like any other.
    assert sequence_order(["cam0_12.png", "cam0_3.png", "cam0_7.png"]) == [1, 2, 0]


@pytest.mark.parametrize("names", [
    ["02928139_3448003521.jpg", "03903474_1471484089.jpg", "10265353_3838484249.jpg"],  # Flickr ids
    ["a.png", "b.png", "c.png"],  # no number
    ["img1.png", "img2.png"],  # too few to tell
    ["img1.png", "img2.png", "pic3.png"],  # mixed prefixes
    ["img1.png", "img2.png", "img3.jpg"],  # mixed extensions
    ["img1.png", "img2.png", "img_3.png"],  # mixed patterns
    ["cam0_1.png", "cam1_1.png", "cam0_2.png"],  # two fields vary: two cameras
    ["img1.png", "img01.png", "img2.png"],  # two files claim frame 1
])
def test_sequence_order_refuses_names_that_do_not_count(names):
    assert sequence_order(names) is None


def test_find_scene_inputs_orders_sequences_naturally_and_obeys_a_forced_value(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("img10.png", "img9.png", "img8.png", "img100.png"):
        (tmp_path / "images" / name).write_bytes(b"x")
    inputs = find_scene_inputs(tmp_path)
    assert [p.name for p in inputs.images] == ["img8.png", "img9.png", "img10.png", "img100.png"]
    assert inputs.sequence is True and inputs.sequence_from == "file names"
    forced = find_scene_inputs(tmp_path, sequence=False)
    assert [p.name for p in forced.images] == ["img10.png", "img100.png", "img8.png", "img9.png"]  # by name
    assert forced.sequence is False and forced.sequence_from == "scene.yaml"
    (tmp_path / "images/zz9.png").write_bytes(b"x")
    assert find_scene_inputs(tmp_path).sequence is False
    forced = find_scene_inputs(tmp_path, sequence=True)  # no single pattern: still img9 before img10
    assert [p.name for p in forced.images] == ["img8.png", "img9.png", "img10.png", "img100.png", "zz9.png"]
    assert forced.sequence is True


# ----------------------------------------------------------------------------------------- scene.yaml


def test_scene_settings_default_when_absent_and_round_trip(tmp_path):
    assert read_scene_settings(tmp_path) == SceneSettings()
    (tmp_path / "scene.yaml").write_text("")
    assert read_scene_settings(tmp_path) == SceneSettings()
    (tmp_path / "scene.yaml").write_text("camera_height_m: 2\nmetric_scale: camera_height\nsequence: false\n"
                                         "geo_origin: [49.01, 8.43]\n")
    s = read_scene_settings(tmp_path)
    assert s == SceneSettings(camera_height_m=2.0, metric_scale="camera_height", sequence=False,
                              geo_origin=(49.01, 8.43))
    assert isinstance(s.camera_height_m, float)
    out = tmp_path / "out"
    out.mkdir()
    for settings in (s, SceneSettings()):
        write_scene_settings(out, settings)
        data = yaml.safe_load((out / "scene.yaml").read_text())
        assert list(data) == ["camera_height_m", "metric_scale", "sequence", "geo_origin"]  # every key, nulls too
        assert read_scene_settings(out) == settings
    assert data == {"camera_height_m": None, "metric_scale": "auto", "sequence": None, "geo_origin": None}


@pytest.mark.parametrize("text, match", [
    ("camera_hieght_m: 1.6\n", r"scene.yaml: unknown key 'camera_hieght_m'; allowed keys are camera_height_m, "
                                r"geo_origin, metric_scale, sequence$"),
    ("camera_height_m: -1.6\n", r"scene.yaml: camera_height_m: -1.6 is not allowed; it must be a height > 0"),
    ("camera_height_m: 0\n", r"scene.yaml: camera_height_m: 0.0 is not allowed"),
    ("camera_height_m: high\n", r"scene.yaml: camera_height_m: expected a number, got 'high'$"),
    ("metric_scale: metres\n", r"scene.yaml: metric_scale: 'metres' is not allowed; use one of 'auto', "
                                r"'camera_height', 'none'$"),
    ("sequence: maybe\n", r"scene.yaml: sequence: expected true or false, got 'maybe'$"),
    ("geo_origin: [120, 8]\n", r"scene.yaml: geo_origin: \(120.0, 8.0\) is not allowed; it must be \[latitude, "),
    ("- 1\n- 2\n", r"scene.yaml must hold a mapping of settings .*found list; fix or remove it$"),
    ("camera_height_m: [1\n", r"scene.yaml is not valid YAML .*; fix or remove it$"),
])
def test_malformed_scene_yaml_is_one_line_naming_file_and_key(tmp_path, text, match):
    (tmp_path / "scene.yaml").write_text(text)
    with pytest.raises(StageError, match=match) as exc:
        read_scene_settings(tmp_path)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(str(tmp_path / "scene.yaml"))


def test_sequence_numbers_keep_the_gaps():
    from stages.common.scene import sequence_numbers

    assert sequence_numbers(["0054.png", "0072.png", "0073.png"]) == [54, 72, 73]
    assert sequence_numbers(["img10.png", "img9.png", "img11.png"]) == [10, 9, 11]
    assert sequence_numbers(["02928139_3448003521.jpg", "03903474_1471484089.jpg", "10265353_3838484249.jpg"]) is None
