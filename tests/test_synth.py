"""The synth stage: geometry of poses, depth and HD map against the renders, formats, determinism, failures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import av
import cv2
import numpy as np
import open3d as o3d
import pytest

from stages import synth
from stages.common.errors import StageError
from stages.common.geometry import camera_center
from stages.common.params import build
from stages.common.scene import read_transforms

SMALL = dict(n_frames=6, width=320, height=180, n_queries=2, n_points=20_000)
TINY = dict(n_frames=3, width=160, height=90, n_queries=1, n_points=2_000)


@pytest.fixture(scope="module")
def small_video(tmp_path_factory) -> tuple[synth.SynthParams, Path]:
    """A 6-frame video scene at 320x180, rendered once for the geometry tests."""
    params = synth.SynthParams(**SMALL)
    out = tmp_path_factory.mktemp("synth") / "street"
    res = synth.run(params, out_dir=out)
    assert res.n_frames == 6 and res.n_queries == 2 and res.device == "cpu" and res.out_dir == out
    return params, out


def _depth_m(scene: Path, i: int) -> np.ndarray:
    mm = cv2.imread(str(scene / "depth" / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
    assert mm.dtype == np.uint16
    return mm.astype(float) / 1000.0


def _project(K_33: np.ndarray, cam_from_world: np.ndarray, X_3) -> tuple[np.ndarray, float]:
    """Continuous pixel coordinates (COLMAP convention) and z-depth of a world point."""
    Xc = cam_from_world[:, :3] @ np.asarray(X_3, float) + cam_from_world[:, 3]
    uv = (K_33 @ Xc)[:2] / Xc[2]
    return uv, float(Xc[2])


def _decode(video: Path) -> list[tuple[float, np.ndarray]]:
    with av.open(str(video)) as container:
        return [(frame.time, frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]


def test_transforms_intrinsics_and_poses_follow_the_trajectory(small_video):
    params, scene = small_video
    tr = read_transforms(scene)
    assert tr.metric is True
    K = tr.intrinsics
    assert (K.w, K.h, K.model) == (320, 180, "OPENCV") and not K.has_distortion
    assert K.fx == pytest.approx(160 / math.tan(math.radians(params.fov_x_deg) / 2)) and K.fy == K.fx
    assert (K.cx, K.cy) == (160.0, 90.0)
    video = tr.video_frames()
    assert [f.file_path for f in video] == ["video.mp4"] * 6
    assert [f.timestamp for f in video] == pytest.approx([i / params.fps for i in range(6)])
    for i, f in enumerate(video):
        c = camera_center(f.cam_from_world_34)
        assert c[0] == pytest.approx(params.speed_mps * i / params.fps, abs=1e-6)
        assert abs(c[1] - params.lane_y_m) <= params.lateral_amplitude_m + 1e-9  # right lane
        assert c[2] == pytest.approx(params.camera_height_m, abs=1e-9)
        forward = f.cam_from_world_34[2, :3]  # optical axis in world coordinates
        assert forward[0] > 0.99 and forward[2] == pytest.approx(-math.sin(math.radians(params.pitch_deg)))
    queries = tr.by_path()
    assert sorted(queries) == ["queries/000000.png", "queries/000001.png"]
    stretch = params.speed_mps * (params.n_frames - 1) / params.fps
    for f in queries.values():
        c = camera_center(f.cam_from_world_34)
        assert 0 < c[0] < stretch
        assert abs(c[1] - params.query_lane_y_m) <= params.lateral_amplitude_m + 1e-9  # the other lane
        assert c[2] == pytest.approx(params.query_height_m, abs=1e-9)


def test_depth_of_the_road_at_the_bottom_centre_pixel(small_video):
    params, scene = small_video
    tr = read_transforms(scene)
    K_33 = tr.intrinsics.K_33()
    for i, f in enumerate(tr.video_frames()):
        row, col = params.height - 1, params.width // 2
        ray_cam = np.linalg.inv(K_33) @ np.array([col + 0.5, row + 0.5, 1.0])  # z = 1: t is the z-depth
        ray_world = f.cam_from_world_34[:, :3].T @ ray_cam
        assert ray_world[2] < 0
        expected = camera_center(f.cam_from_world_34)[2] / -ray_world[2]
        assert _depth_m(scene, i)[row, col] == pytest.approx(expected, abs=0.002)


def test_every_depth_pixel_lies_on_a_surface_and_poles_are_where_the_hdmap_says(small_video):
    params, scene = small_video
    tr = read_transforms(scene)
    street = synth.build_street(params)
    hd = json.loads((scene / "hdmap.geojson").read_text())
    poles = [(*f["geometry"]["coordinates"][:2], f["properties"]["radius"], f["properties"]["height"])
             for f in hd["features"] if f["properties"]["kind"] == "pole"]
    assert np.allclose(poles, street.poles_P4)
    K_33, w, h = tr.intrinsics.K_33(), tr.intrinsics.w, tr.intrinsics.h
    cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    rays_cam = np.stack([cols, rows, np.ones_like(cols)], -1) @ np.linalg.inv(K_33).T
    checked_poles = 0
    for i, f in enumerate(tr.video_frames()):
        P, depth = f.cam_from_world_34, _depth_m(scene, i)
        valid = depth > 0
        assert valid.mean() > 0.5
        X = camera_center(P) + depth[valid][:, None] * (rays_cam[valid] @ P[:, :3])
        dist = np.abs(X[:, 2])  # ground
        for row in street.rows:
            dist = np.minimum(dist, np.abs(X[:, 1] - row.facade_y))
        for px, py, r, _ in poles:
            dist = np.minimum(dist, np.abs(np.hypot(X[:, 0] - px, X[:, 1] - py) - r))
        # mm quantisation of depth along rays up to ~60 m long
        assert np.percentile(dist, 99.9) < 0.005 and dist.max() < 0.05
        # The point of each near pole facing the camera at 1 m height is where the depth map says.
        C = camera_center(P)
        for px, py, r, ph in poles:
            toward = np.array([C[0] - px, C[1] - py]) / math.hypot(C[0] - px, C[1] - py)
            X_pole = [px + r * toward[0], py + r * toward[1], 1.0]
            uv, z = _project(K_33, P, X_pole)
            if not (2 < z < 20 and r * K_33[0, 0] / z > 2 and 0 <= uv[0] < w and 0 <= uv[1] < h):
                continue
            assert depth[int(uv[1]), int(uv[0])] == pytest.approx(z, abs=0.01 + r * 0.2)
            checked_poles += 1
    assert checked_poles >= 3


def test_lane_markings_appear_where_the_hdmap_says(small_video):
    params, scene = small_video
    tr = read_transforms(scene)
    frames = _decode(scene / "video.mp4")
    hd = json.loads((scene / "hdmap.geojson").read_text())
    solid = [f["geometry"]["coordinates"] for f in hd["features"] if f["properties"].get("type") == "solid"]
    dashes = [f["geometry"]["coordinates"] for f in hd["features"] if f["properties"].get("type") == "dashed"]
    assert len(solid) == 2 and len(dashes) >= 10
    y_right = min(line[0][1] for line in solid)  # the edge line on the mapping camera's side
    K_33 = tr.intrinsics.K_33()

    for i, f in enumerate(tr.video_frames()):
        P, gray = f.cam_from_world_34, cv2.cvtColor(frames[i][1], cv2.COLOR_RGB2GRAY)

        def luma(x: float, y: float) -> float:
            uv, _ = _project(K_33, P, [x, y, 0.0])
            assert 0 <= uv[0] < params.width and 0 <= uv[1] < params.height, (x, y)
            return float(gray[int(uv[1]), int(uv[0])])

        x_cam = camera_center(P)[0]
        assert luma(x_cam + 8.0, y_right) > luma(x_cam + 8.0, y_right + 0.6) + 60  # line vs asphalt beside it
        # the middle of a dash 6-14 m ahead is bright; the middle of the gap after it is asphalt
        x0, x1 = next((d[0][0], d[1][0]) for d in dashes if 6 < (d[0][0] + d[1][0]) / 2 - x_cam < 14)
        assert luma((x0 + x1) / 2, 0.0) > luma(x1 + synth.GAP_M / 2, 0.0) + 60


def test_video_decodes_with_n_frames_at_i_over_fps(small_video):
    params, scene = small_video
    frames = _decode(scene / "video.mp4")
    assert len(frames) == params.n_frames
    assert [t for t, _ in frames] == pytest.approx([i / params.fps for i in range(params.n_frames)], abs=1e-6)
    assert frames[0][1].shape == (params.height, params.width, 3)
    assert not (scene / "images").exists()
    assert len(list((scene / "depth").glob("*.png"))) == params.n_frames


def test_points_ply_samples_the_surfaces(small_video):
    params, scene = small_video
    pcd = o3d.io.read_point_cloud(str(scene / "points.ply"))
    xyz, rgb = np.asarray(pcd.points), np.asarray(pcd.colors)
    assert len(xyz) == params.n_points and pcd.has_normals()
    street = synth.build_street(params)
    on_ground = np.abs(xyz[:, 2]) < 1e-6
    on_facade = np.isin(xyz[:, 1], [r.facade_y for r in street.rows])
    assert on_ground.mean() > 0.3 and on_facade.mean() > 0.3 and (on_ground | on_facade).mean() < 1
    stretch = params.speed_mps * (params.n_frames - 1) / params.fps
    assert xyz[:, 0].min() >= 0 and xyz[:, 0].max() <= stretch + params.points_ahead_m + 1e-9
    assert rgb[on_ground].std() > 0.05  # textured, not flat


def test_images_mode_at_default_size_has_thousands_of_sift_features(tmp_path):
    params = synth.SynthParams(n_frames=2, n_queries=0, n_points=1000, output="images")
    res = synth.run(params, out_dir=tmp_path / "street")
    assert (res.width, res.height) == (640, 360)
    scene = tmp_path / "street"
    assert not (scene / "video.mp4").exists() and not (scene / "queries").exists()
    tr = read_transforms(scene)
    assert sorted(tr.by_path()) == ["images/000000.png", "images/000001.png"] and not tr.video_frames()
    sift = cv2.SIFT_create()
    for name in sorted(tr.by_path()):
        img = cv2.imread(str(scene / name), cv2.IMREAD_GRAYSCALE)
        assert img.shape == (360, 640)
        assert len(sift.detect(img, None)) >= 2000


def _poles(scene: Path) -> np.ndarray:
    hd = json.loads((scene / "hdmap.geojson").read_text())
    return np.array([f["geometry"]["coordinates"] for f in hd["features"] if f["properties"]["kind"] == "pole"])


def test_same_seed_same_files_other_seed_other_poles(tmp_path):
    a = synth.run(synth.SynthParams(**TINY), out_dir=tmp_path / "a").out_dir
    b = synth.run(synth.SynthParams(**TINY), out_dir=tmp_path / "b").out_dir
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert {"video.mp4", "transforms.json", "hdmap.geojson", "points.ply"} <= {str(p) for p in files}
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for (_, fa), (_, fb) in zip(_decode(a / "video.mp4"), _decode(b / "video.mp4")):
        assert np.array_equal(fa, fb)

    c = synth.run(synth.SynthParams(**TINY, seed=1), out_dir=tmp_path / "c").out_dir
    poles_a, poles_c = _poles(a), _poles(c)
    assert poles_a.shape[1] == 3 and len(poles_c)
    assert len(poles_a) != len(poles_c) or not np.allclose(poles_a, poles_c)
    assert (a / "transforms.json").read_bytes() != (c / "transforms.json").read_bytes()  # sway phases
    assert not np.array_equal(_decode(a / "video.mp4")[0][1], _decode(c / "video.mp4")[0][1])


def test_failure_inside_run_leaves_no_output_and_keeps_the_previous_one(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(synth, "write_points", broken)
    with pytest.raises(OSError, match="disk full"):
        synth.run(synth.SynthParams(**TINY), out_dir=tmp_path / "street")
    assert list(tmp_path.iterdir()) == []
    previous = tmp_path / "street"
    previous.mkdir()
    (previous / "marker").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        synth.run(synth.SynthParams(**TINY), out_dir=previous)
    assert [p.name for p in tmp_path.iterdir()] == ["street"]
    assert [p.name for p in previous.iterdir()] == ["marker"]


def test_bad_params_name_the_key(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("synth:\n  n_frame: 3\n")
    assert synth.main(["--params", str(params), "--out", str(tmp_path / "street")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'n_frame'" in err[0] and "n_frames" in err[0]
    assert not (tmp_path / "street").exists()
    with pytest.raises(StageError, match=r"synth: width: 161 must be even for output: video"):
        build(synth.SynthParams, {"width": 161}, "params.yaml:synth")
    with pytest.raises(StageError, match="output: 'gif' is not allowed"):
        build(synth.SynthParams, {"output": "gif"}, "params.yaml:synth")
