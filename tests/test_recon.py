"""The recon stage: plane-sweep depth against synth's exact depth, the consistency filter and TSDF fusion on
hand-made cases, and the stage end to end on a small synthetic drive (renders, clouds, meshes, scores)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from stages import recon
from stages.common.errors import StageError
from stages.common.geometry import R_from_quat_wxyz
from stages.recon import mvs
from stages.recon.fusion import DepthView, backproject, read_ply_points, tsdf_fuse
from stages.ingest import IngestParams
from stages.ingest import run as ingest_run
from stages.sfm import SfmParams
from stages.sfm import run as sfm_run
from stages.synth import SynthParams
from stages.synth import run as synth_run
from tests.conftest import DRIVE_SYNTH

# Six frames 1 m apart at 320 x 180, with synth's exact depth of each.
PAIR_SYNTH = dict(n_frames=6, width=320, height=180, n_queries=0, output="images", n_points=1000, supersample=2)


def _gl_to_cam_from_world(c2w_gl) -> np.ndarray:
    c2w = np.array(c2w_gl, float)
    c2w[:3, 1:3] *= -1  # OpenGL -> OpenCV axes
    R = c2w[:3, :3].T
    return np.c_[R, -R @ c2w[:3, 3]]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pair")
    synth_run(SynthParams(**PAIR_SYNTH), out_dir=root)
    return root


def test_plane_sweep_depth_against_synths_exact_depth(rendered):
    """A reference frame swept against its neighbours at their true poses: the depth kept by the photometric
    filter (before the consistency filter) is within 2 % of the rendered scene's exact depth at the median pixel
    and within 5 % for three in four, and most of the ground and facades keep a depth."""
    meta = json.loads((rendered / "transforms.json").read_text())
    K = np.array([[meta["fl_x"], 0, meta["cx"]], [0, meta["fl_y"], meta["cy"]], [0, 0, 1.0]])
    frames = sorted(meta["frames"], key=lambda f: f["file_path"])
    views = [mvs.StereoView(f["file_path"], rendered / f["file_path"], K, _gl_to_cam_from_world(f["transform_matrix"]),
                            meta["w"], meta["h"]) for f in frames]
    p = mvs.SweepParams(max_edge=320, sweep_max_edge=160)
    ref, srcs = 3, [1, 2, 4, 5]
    sets = []
    for edge in (p.sweep_max_edge, p.max_edge):
        Kr, w, h = mvs.scaled(views[ref], edge)
        sets.append((mvs.load_gray(views[ref], w, h), mvs.index_K(Kr), views[ref].cam_from_world,
                     [(mvs.load_gray(views[j], w, h), mvs.index_K(mvs.scaled(views[j], edge)[0]),
                       views[j].cam_from_world) for j in srcs]))
    depth, ncc = mvs.sweep(sets[0], sets[1], 2.0, 80.0, p, "cpu", np.array([0.0, 0.0, 1.0]))
    truth = cv2.imread(str(rendered / frames[ref]["depth_file_path"]), cv2.IMREAD_UNCHANGED).astype(float) / 1000
    assert depth.shape == truth.shape
    scene = truth > 0  # sky has no depth
    kept = (depth > 0) & scene
    rel = np.abs(depth[kept] - truth[kept]) / truth[kept]
    assert kept.sum() / scene.sum() > 0.5
    assert np.median(rel) < 0.02
    assert np.mean(rel < 0.05) > 0.75
    # without truth: the sky, and facades beyond 65 m (16-bit millimetres); a flat sky keeps no depth
    assert ((depth > 0) & ~scene).mean() < 0.05


def _plane_views(z: float = 5.0, w: int = 160, h: int = 120):
    K = np.array([[100.0, 0, 80], [0, 100.0, 60], [0, 0, 1]])
    rgb = np.full((h, w, 3), 128, np.uint8)
    poses = [np.c_[np.eye(3), [x, 0.0, 0.0]] for x in (0.0, -0.5, 0.5)]
    return K, rgb, [np.full((h, w), z, np.float32) for _ in poses], poses


def test_consistency_filter_drops_depths_no_source_confirms():
    """A fronto-parallel plane at 5 m seen by three cameras: a patch of wrong depth in the reference (6 m) is
    dropped, the right depths stay (both sources confirm them)."""
    K, _, depths, poses = _plane_views()
    ref = depths[0].copy()
    ref[40:60, 60:90] = 6.0
    p = mvs.SweepParams(min_consistent=2, min_triangulation_deg=1.0)
    others = [(d, mvs.index_K(K), P) for d, P in zip(depths[1:], poses[1:])]
    out = mvs.consistent_depth(ref, mvs.index_K(K), poses[0], others, p)
    assert (out[40:60, 60:90] == 0).all()
    centre = np.zeros_like(ref, bool)
    centre[30:90, 45:115] = True  # seen by both sources
    centre[40:60, 60:90] = False
    assert (out[centre] == 5.0).all()


def test_tsdf_mesh_lies_on_the_plane_and_back_projection_is_exact():
    K, rgb, depths, poses = _plane_views()
    views = [DepthView(d, rgb, K, P) for d, P in zip(depths, poses)]
    X, colours = backproject(views[1])
    assert np.allclose(X[:, 2], 5.0) and (colours == 128).all()
    # pixel (0, 0)'s centre (0.5, 0.5) seen from the camera at x = +0.5 (cam_from_world t = -0.5)
    assert np.allclose(X[0, :2], [(0.5 - 80) / 100 * 5 + 0.5, (0.5 - 60) / 100 * 5], atol=1e-9)
    mesh, vertices, vcolours, used = tsdf_fuse(views, 0.05, 0.2, 30.0, min_views=2)
    assert used == 3 and len(vertices) > 1000
    assert np.abs(vertices[:, 2] - 5.0).max() < 0.05
    # colours average the views (vertices at the mesh border blend with empty voxels)
    assert np.mean(np.abs(vcolours.astype(int) - 128).max(1) <= 1) > 0.9


def test_an_empty_depth_set_is_a_clear_error_not_an_open3d_crash():
    K, rgb, depths, poses = _plane_views()
    with pytest.raises(StageError, match="no depth to fuse"):
        tsdf_fuse([DepthView(np.zeros_like(depths[0]), rgb, K, poses[0])], 0.05, 0.2, 30.0, what="test maps")
    with pytest.raises(StageError, match="no depth to fuse"):
        tsdf_fuse([], 0.05, 0.2, 30.0)
    with pytest.raises(StageError, match="positive voxel"):
        tsdf_fuse([DepthView(depths[0], rgb, K, poses[0])], 0.0, 0.2, 30.0)
    # every depth beyond max_depth: nothing to integrate (open3d would abort: no voxel block touched)
    with pytest.raises(StageError, match="no depth to fuse"):
        tsdf_fuse([DepthView(depths[0] + 100.0, rgb, K, poses[0])], 0.05, 0.2, 30.0, what="test maps")


# ------------------------------------------------------------------------------------------- end to end

SMALL_FIELD = {"steps": 300, "plane_levels": [32, 64, 128, 256], "samples_per_batch": 8192}


@pytest.fixture(scope="module")
def small_recon(tmp_path_factory):
    """The conftest drive with dense ground-truth surface samples (about 10 cm apart, for 5-20 cm scores)."""
    root = tmp_path_factory.mktemp("recon")
    synth_run(SynthParams(**{**DRIVE_SYNTH, "n_points": 150_000}), out_dir=root / "raw")
    ingest_run(IngestParams(query_every=0), scene_dir=root / "raw", out_dir=root / "frames")
    sfm_run(SfmParams(), frames=root / "frames", out_dir=root / "sfm")
    params = recon.ReconParams(field=SMALL_FIELD, mvs=mvs.SweepParams(max_edge=320, sweep_max_edge=160),
                               render_max_edge=240)
    return recon.run(params, frames=root / "frames", sfm=root / "sfm", out_dir=root / "recon"), root / "frames"


def test_stage_end_to_end_on_a_small_drive(small_recon):
    result, frames = small_recon
    m, out = result.metrics, result.out_dir
    # every 8th registered frame held out: 16 frames -> 2 held out, 14 trained on
    assert m["frames"] == 16 and m["held_out_frames"] == 2 and m["train_frames"] == 14
    assert m["device"] == "cpu" and m["mvs_backend"] == "sweep"
    for key in ("psnr", "ssim", "chamfer", "fscore_5cm", "fscore_10cm", "fscore_20cm", "emd", "seconds"):
        assert m[key] is not None, key
    for source in ("mvs", "nerf"):
        for key in ("chamfer", "fscore_5cm", "fscore_10cm", "fscore_20cm", "emd", "accuracy", "completeness"):
            assert key in m[source], (source, key)
    # the plane sweep's fused cloud lies on the true surfaces: most points within 20 cm
    print(json.dumps({k: m[k] for k in ("psnr", "ssim", "mvs", "nerf", "seconds_per_phase")}, indent=1))
    assert m["mvs"]["precision_20cm"] > 0.6
    assert m["mvs"]["fscore_20cm"] > m["mvs"]["fscore_5cm"]
    # a short training still learns the held-out views far beyond a grey image
    assert m["psnr"] > 15.0 and 0 < m["ssim"] <= 1
    # files that standard tools open
    for ply in ("mvs/fused.ply", "mvs/points.ply", "nerf/fused.ply"):
        assert len(read_ply_points(out / ply)) > 100, ply
    import open3d as o3d

    assert len(o3d.io.read_triangle_mesh(str(out / "mvs" / "mesh.ply")).triangles) > 100
    ns = json.loads((out / "undistorted" / "transforms.json").read_text())
    assert len(ns["frames"]) == 16 and len(ns["val_filenames"]) == 2
    for f in ns["frames"]:
        assert (out / "undistorted" / f["file_path"]).is_file()
    assert (out / "nerf" / "field.pt").is_file()
    assert len(list((out / "nerf" / "renders" / "held_out").glob("*.depth.png"))) == 2
    # one depth map per frame, with its confidence (the winning NCC, at least min_ncc where a depth is kept)
    maps = sorted((out / "mvs" / "depth").glob("*.npz"))
    assert len(maps) == 16 and maps[0].name == "images__000000.npz"
    with np.load(maps[3]) as z:
        kept = z["depth"] > 0
        assert kept.mean() > 0.05 and (z["confidence"][kept] >= 0.5).all() and (z["confidence"][~kept] == 0).all()
    # renders and their scores at render_max_edge (320 x 180 frames -> 240 x 135)
    render = cv2.imread(str(next((out / "nerf" / "renders" / "held_out").glob("*[0-9].png"))))
    assert render.shape == (135, 240, 3)


def test_nerfstudio_transforms_hold_the_sfm_poses(small_recon):
    """transform_matrix is camera-to-world in OpenGL axes: back to cam_from_world it is sfm's pose."""
    result, frames = small_recon
    import pandas as pd

    ns = json.loads((result.out_dir / "undistorted" / "transforms.json").read_text())
    poses = pd.read_csv(result.out_dir.parent / "sfm" / "poses.csv").set_index("image")
    for f in ns["frames"][:3]:
        name = f["file_path"][len("images/"):]
        row = poses.loc[name]
        R = R_from_quat_wxyz([row[f"cam_from_world_{k}"] for k in ("qw", "qx", "qy", "qz")])
        t = np.array([row[f"cam_from_world_{k}"] for k in ("tx", "ty", "tz")])
        assert np.allclose(_gl_to_cam_from_world(f["transform_matrix"]), np.c_[R, t], atol=1e-6)


def test_missing_sfm_is_one_clear_line(tmp_path, capsys, drive_frames):
    code = recon.main(["--frames", str(drive_frames), "--sfm", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and "run the sfm stage" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_unknown_field_setting_is_named():
    with pytest.raises(StageError, match="stepz"):
        from stages.common.params import build

        build(recon.ReconParams, {"field": {"stepz": 3}}, "params.yaml:recon")
