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
import torch

from stages import synth
from stages.common.device import pick_device
from stages.common.errors import StageError
from stages.common.geometry import camera_center
from stages.common.params import build
from stages.common.scene import read_transforms
from tests.conftest import LAYOUT_SYNTH, SMALL_SYNTH, TINY_SYNTH

SMALL, TINY, LAYOUT = SMALL_SYNTH, TINY_SYNTH, LAYOUT_SYNTH


@pytest.fixture(scope="module")
def small_video(tmp_path_factory) -> tuple[synth.SynthParams, Path]:
    """A 6-frame video scene at 320x180, rendered once for the geometry tests."""
    params = synth.SynthParams(**SMALL)
    out = tmp_path_factory.mktemp("synth") / "street"
    res = synth.run(params, out_dir=out)
    # the device auto picks, recorded beside the scene (cuda on a GPU machine, cpu elsewhere)
    assert res.n_frames == 6 and res.n_queries == 2 and res.device == pick_device("auto") and res.out_dir == out
    record = json.loads((out / synth.SYNTH_RECORD).read_text())
    assert record["device"] == res.device and record["frames"] == 6
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


# ---- Road layouts with turns (road: curve | junction) ----

# 8 m between frames: 8 frames cover the whole bend or turn, with straight road before and after.
# Checksums of the default straight street at TINY size: pixel sums of the colour and depth images, and
# count / sum / absolute sum of the numbers in transforms.json, hdmap.geojson and points.ply. They were an md5
# of the exact bytes, rendered before road layouts existed; the same code renders the last float digits
# differently on another CPU (torch and numpy take other SIMD paths), so the checksums are compared with
# tolerances far below any change of the scene (one object moved or recoloured shifts them by percent) and far
# above those digits. Re-recorded on an AMD EPYC from the unchanged synth code.
STRAIGHT_TINY_CHECKSUMS = {
    "rgb": (4, 19753640.0, 2668262064.0),
    "depth": (3, 547018564.0, 12644381100756.0),
    "transforms.json": (74, 611.0110874566434, 636.7028529381713),
    "hdmap.geojson": (144, 778.424, 1101.252),
    "points": (2000, 38985.805126697494, 51067.57729623123),
    "colors": (2000, 2570.850980392157, 2570.850980392157),
    "normals": (2000, 963.3473391452035, 2011.1447168658892),
}
# Relative tolerance of each checksum: a few pixels one level apart, float digits beyond the 7th.
CHECKSUM_RTOL = {"rgb": 1e-5, "depth": 1e-6}
FLOAT_RTOL = 1e-7


def _numbers(value) -> list[float]:
    if isinstance(value, dict):
        return [v for k in sorted(value) for v in _numbers(value[k])]
    if isinstance(value, list):
        return [v for e in value for v in _numbers(e)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def _checksums(scene: Path) -> dict[str, tuple[int, float, float]]:
    out = {}
    for kind, pattern in (("rgb", "[iq]*/*.png"), ("depth", "depth/*.png")):
        images = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED).astype(np.float64) for p in sorted(scene.glob(pattern))]
        out[kind] = (len(images), sum(float(a.sum()) for a in images), sum(float((a**2).sum()) for a in images))
    for name in ("transforms.json", "hdmap.geojson"):
        a = np.array(_numbers(json.loads((scene / name).read_text())))
        out[name] = (len(a), float(a.sum()), float(np.abs(a).sum()))
    pcd = o3d.io.read_point_cloud(str(scene / "points.ply"))
    for key in ("points", "colors", "normals"):
        a = np.asarray(getattr(pcd, key))
        out[key] = (len(a), float(a.sum()), float(np.abs(a).sum()))
    return out


def test_default_straight_street_renders_exactly_as_before(tmp_path):
    params = synth.SynthParams(**{**TINY, "output": "images", "device": "cpu"})
    assert params.road == "straight"
    scene = synth.run(params, out_dir=tmp_path / "street").out_dir
    got = _checksums(scene)
    for key, (count, total, second) in STRAIGHT_TINY_CHECKSUMS.items():
        rtol = CHECKSUM_RTOL.get(key, FLOAT_RTOL)
        assert got[key][0] == count, f"{key}: {got[key][0]} values, {count} before"
        assert got[key][1:] == pytest.approx((total, second), rel=rtol), f"{key} no longer renders as before"


def _heading(cam_from_world: np.ndarray) -> float:
    forward = cam_from_world[2, :3]
    return math.atan2(forward[1], forward[0])


def _xy64(pts) -> tuple[torch.Tensor, torch.Tensor]:
    pts = np.asarray(pts, float).reshape(-1, 2)
    return torch.from_numpy(pts[:, 0].copy()), torch.from_numpy(pts[:, 1].copy())


@pytest.mark.parametrize("road, extra, turn_deg", [
    ("curve", {}, 60.0),
    ("curve", {"curve_angle_deg": -45.0, "curve_radius_m": 30.0}, -45.0),
    ("junction", {}, -90.0),
    ("junction", {"turn_angle_deg": 60.0, "turn_radius_m": 15.0}, -60.0),
    ("junction", {"turn_angle_deg": 120.0}, -120.0),
])
def test_layout_trajectories_turn_by_the_layout_angle_and_keep_their_lanes(road, extra, turn_deg):
    params = synth.SynthParams(**{**LAYOUT, "road": road, **extra})
    layout = synth.build_street(params).layout
    mapping, queries = synth.trajectories(params, layout)
    # Without yaw the heading follows the road exactly; with it, it stays within the yaw amplitude.
    still = synth.SynthParams(**{**LAYOUT, "road": road, **extra, "yaw_amplitude_deg": 0.0})
    m0 = synth.trajectories(still, layout)[0]
    turned = math.degrees(synth._wrap(_heading(m0[-1]) - _heading(m0[0])))
    assert turned == pytest.approx(turn_deg, abs=0.01)
    turned = math.degrees(synth._wrap(_heading(mapping[-1]) - _heading(mapping[0])))
    assert abs(turned - turn_deg) <= 2 * params.yaw_amplitude_deg + 1e-6
    drive = layout.drive
    for poses, lane, height in ((mapping, params.lane_y_m, params.camera_height_m),
                                (queries, params.query_lane_y_m, params.query_height_m)):
        centres = np.array([camera_center(p) for p in poses])
        pr = drive.project(*_xy64(centres[:, :2]))
        # in its lane: the offset from the centre line is the lane's, give or take the sway
        assert np.all(np.abs(pr["d"].numpy() - lane) <= params.lateral_amplitude_m + 1e-9)
        assert np.allclose(centres[:, 2], height)
        # heading along the road's tangent, give or take the yaw
        yaw = [synth._wrap(_heading(p) - h) for p, h in zip(poses, pr["heading"].numpy())]
        assert np.max(np.abs(np.degrees(yaw))) <= params.yaw_amplitude_deg + 1e-6
    # mapping frames are speed / fps apart along the lane (here 8 m)
    lane_curve = drive.offset(params.lane_y_m)
    s_lane = [drive.s_of(lane_curve, float(s)) for s in drive.project(*_xy64(
        np.array([camera_center(p)[:2] for p in m0])))["s"]]
    assert np.diff(s_lane) == pytest.approx(params.speed_mps / params.fps, abs=1e-6)


@pytest.fixture(scope="module", params=["curve", "junction"])
def layout_scene(request, tmp_path_factory) -> tuple[synth.SynthParams, synth.Street, Path]:
    """A curve and a junction, 8 frames at 320x180 as images, rendered once for the geometry tests."""
    params = synth.SynthParams(**{**LAYOUT, "road": request.param})
    out = tmp_path_factory.mktemp(request.param) / "street"
    res = synth.run(params, out_dir=out)
    assert res.n_frames == 8 and res.n_queries == 2 and res.n_points == params.n_points
    return params, synth.build_street(params), out


def _surface_distance(street: synth.Street, X: np.ndarray) -> np.ndarray:
    """Distance of world points to the nearest surface of a layout: ground, a block's facade, a pole."""
    dist = np.abs(X[:, 2])
    for blk in street.layout.blocks:
        pr = blk.facade.project(*_xy64(X[:, :2]))
        s = pr["s"].numpy()
        on = (s >= blk.facade.s_start) & (s <= blk.facade.s_end)
        dist = np.minimum(dist, np.where(on, np.abs(pr["d"].numpy()), np.inf))
    for px, py, r, _ in street.poles_P4:
        dist = np.minimum(dist, np.abs(np.hypot(X[:, 0] - px, X[:, 1] - py) - r))
    return dist


def test_layout_poses_and_depth_lie_on_the_layout_surfaces(layout_scene):
    params, street, scene = layout_scene
    tr = read_transforms(scene)
    mapping, queries = synth.trajectories(params, street.layout)
    by_path = tr.by_path()
    for i, pose in enumerate(mapping):
        assert np.allclose(by_path[f"images/{i:06d}.png"].cam_from_world_34, pose, atol=1e-9)
    for k, pose in enumerate(queries):
        assert np.allclose(by_path[f"queries/{k:06d}.png"].cam_from_world_34, pose, atol=1e-9)
    K_33, w, h = tr.intrinsics.K_33(), tr.intrinsics.w, tr.intrinsics.h
    cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    rays_cam = np.stack([cols, rows, np.ones_like(cols)], -1) @ np.linalg.inv(K_33).T
    on = {"ground": 0, "facade": 0}
    for i, pose in enumerate(mapping):
        depth = _depth_m(scene, i)
        valid = depth > 0
        assert valid.mean() > 0.5
        X = camera_center(pose) + depth[valid][:, None] * (rays_cam[valid] @ pose[:, :3])
        dist = _surface_distance(street, X)
        # mm quantisation of depth along rays up to ~60 m long
        assert np.percentile(dist, 99.9) < 0.005 and dist.max() < 0.05, i
        on["ground"] += int((np.abs(X[:, 2]) < 0.005).sum())
        on["facade"] += int((X[:, 2] > 0.5).sum())
        # the bottom-centre pixel sees the road: its depth puts it on z = 0
        ray = pose[:, :3].T @ rays_cam[h - 1, w // 2]
        assert depth[h - 1, w // 2] == pytest.approx(-camera_center(pose)[2] / ray[2], abs=0.002)
    assert on["ground"] > 1000 and on["facade"] > 1000


def _marking_samples(hd: dict, step: float = 0.25, end_margin: float = 0.3):
    """Points every `step` metres along each lane marking of an HD map (not within end_margin of its ends),
    with the unit tangent of the line there and whether it bends there (the vertices either side turn by more
    than 0.1 degrees)."""
    out = []
    for f in hd["features"]:
        if f["properties"].get("kind") != "lane_marking":
            continue
        P = np.array(f["geometry"]["coordinates"])[:, :2]
        seg = np.diff(P, axis=0)
        length = np.hypot(seg[:, 0], seg[:, 1])
        start = np.concatenate([[0.0], np.cumsum(length)[:-1]])
        turn = np.abs(synth._wrap(np.diff(np.arctan2(seg[:, 1], seg[:, 0])))) > math.radians(0.1)
        for u in np.arange(end_margin, length.sum() - end_margin, step):
            j = min(int(np.searchsorted(start, u, side="right")) - 1, len(seg) - 1)
            bends = bool((j > 0 and turn[j - 1]) or (j < len(turn) and turn[j]))
            out.append((P[j] + seg[j] * (u - start[j]) / length[j], seg[j] / length[j], bends,
                        f["properties"]["type"]))
    return out


def test_layout_lane_markings_are_painted_where_the_hdmap_says(layout_scene):
    params, street, scene = layout_scene
    tr = read_transforms(scene)
    hd = json.loads((scene / "hdmap.geojson").read_text())
    types = [f["properties"].get("type") for f in hd["features"] if f["properties"]["kind"] == "lane_marking"]
    assert types.count("solid") == len(street.layout.blocks) and types.count("dashed") >= 10
    K_33 = tr.intrinsics.K_33()
    samples = _marking_samples(hd)
    checked, bright, on_bends = 0, 0, 0
    for i in range(params.n_frames):
        f = tr.by_path()[f"images/{i:06d}.png"]
        P = f.cam_from_world_34
        gray = cv2.imread(str(scene / f.file_path), cv2.IMREAD_GRAYSCALE).astype(float)
        depth = _depth_m(scene, i)

        def pix(X):
            uv, z = _project(K_33, P, [X[0], X[1], 0.0])
            return uv, z

        for X, tangent, bends, _ in samples:
            uv, z = pix(X)
            if not (3.0 < z < 25.0 and 2 <= uv[0] < params.width - 2 and 2 <= uv[1] < params.height - 2):
                continue
            # the line must be at least 2.5 px thick in the image here, and the ground there visible
            nrm = np.array([-tangent[1], tangent[0]])
            across = pix(X + nrm * synth.LINE_WIDTH_M / 2)[0] - pix(X - nrm * synth.LINE_WIDTH_M / 2)[0]
            along = pix(X + 0.01 * tangent)[0] - uv
            thick = abs(across[0] * along[1] - across[1] * along[0]) / np.hypot(*along)
            if thick < 2.5 or abs(depth[int(uv[1]), int(uv[0])] - z) > 0.02 * z:
                continue
            sides = []
            for sgn in (-1, 1):
                uv_s, z_s = pix(X + sgn * 0.45 * nrm)
                if 0 <= uv_s[0] < params.width and 0 <= uv_s[1] < params.height:
                    sides.append(gray[int(uv_s[1]), int(uv_s[0])])
            if not sides:
                continue
            paint = gray[int(uv[1]), int(uv[0])]
            checked += 1
            on_bends += bends
            bright += paint > 160 and paint > min(sides) + 60
    assert checked > 150 and on_bends > 50
    assert bright / checked > 0.95


def test_layout_points_ply_lies_on_the_surfaces_along_the_drive(layout_scene):
    params, street, scene = layout_scene
    pcd = o3d.io.read_point_cloud(str(scene / "points.ply"))
    xyz, rgb, nrm = np.asarray(pcd.points), np.asarray(pcd.colors), np.asarray(pcd.normals)
    assert len(xyz) == params.n_points
    assert _surface_distance(street, xyz).max() < 1e-6
    on_ground = np.abs(xyz[:, 2]) < 1e-9
    assert 0.2 < on_ground.mean() < 0.8 and rgb[on_ground].std() > 0.05
    assert np.allclose(nrm[on_ground], [0.0, 0.0, 1.0])
    drive = street.layout.drive
    s = drive.project(*_xy64(xyz[:, :2]))["s"].numpy()
    s_last = drive.s_on(drive.offset(params.lane_y_m), params.speed_mps * (params.n_frames - 1) / params.fps)
    assert s.min() >= -1e-6 and s.max() <= s_last + params.points_ahead_m + 1e-6
    # ground points are on the road or sidewalk: in front of the facades, never inside a building
    fr = street.layout.ground_frame(*[torch.as_tensor(a, dtype=torch.float32) for a in _xy64(xyz[on_ground, :2])])
    f = np.array([b.facade_m for b in street.layout.blocks])[fr["block"].numpy()]
    assert np.all(np.abs(fr["across"].numpy()) <= f + 1e-3) and fr["valid"].all()


def test_junction_is_open_along_its_arms_and_closed_at_its_corners():
    params = synth.SynthParams(**{**LAYOUT, "road": "junction"})
    street = synth.build_street(params)
    j = street.layout.junction
    renderer = synth.Renderer(street, params.seed, "cpu")
    K = synth.intrinsics(params)
    w, h = params.width, params.height

    def centre_depth(heading: float) -> float:
        pose = synth._pose(j.cx, j.cy, 1.6, heading, 0.0)
        _, depth = renderer.render(pose, w, h, K, 1)
        return float(depth[h // 2, w // 2])  # the horizon straight ahead

    for angle in j.arm_angle:  # straight on, left, back, right: no facade across any arm
        assert centre_depth(float(angle)) > 50.0
    between = j.arm_angle + np.remainder(np.roll(j.arm_angle, -1) - j.arm_angle, 2 * np.pi) / 2
    for angle in between:  # a corner building between each two arms
        assert centre_depth(float(angle)) < 30.0


@pytest.mark.parametrize("key, value, match", [
    ("road", "roundabout", "road: 'roundabout' is not allowed"),
    ("curve_radius_m", 10.0, "curve_radius_m: 10.0 must lie in \\[20, 1000\\]"),
    ("curve_angle_deg", 200.0, "curve_angle_deg: 200.0 must lie in \\[-180, 180\\]"),
    ("turn_angle_deg", 30.0, "turn_angle_deg: 30.0 must lie in \\[45, 135\\]"),
    ("turn_radius_m", 8.0, "turn_radius_m: 8.0 must lie in \\[11, 40\\]"),
])
def test_bad_layout_params_name_the_key(key, value, match):
    with pytest.raises(StageError, match=match):
        build(synth.SynthParams, {key: value}, "params.yaml:synth")
