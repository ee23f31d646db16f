"""Render and geometry scores of the dense-reconstruction stage against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from stages.common.errors import StageError
from stages.common.geometry import look_at_cam_from_world
from stages.recon.scoring import Camera, geometry_scores, observed_mask, psnr, ssim

THRESHOLDS = {"5cm": 0.05, "10cm": 0.10, "20cm": 0.20}


def _grid(n: int = 5, spacing: float = 1.0) -> np.ndarray:
    """n^3 points on a cubic grid: every nearest-neighbour distance is `spacing`."""
    ax = np.arange(n) * spacing
    return np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)


# --- images -----------------------------------------------------------------------------------------------------


def test_psnr_of_a_known_mse():
    gt = np.full((16, 16, 3), 0.5)
    assert psnr(gt + 0.1, gt) == pytest.approx(20.0)  # MSE 0.01
    assert psnr(gt + 0.01, gt) == pytest.approx(40.0)  # MSE 1e-4
    assert psnr(gt, gt) == float("inf")


def test_psnr_counts_only_masked_pixels():
    gt = np.full((8, 8, 3), 0.5)
    pred = gt + 0.1
    pred[:, 4:] = 1.0  # large error outside the mask
    mask = np.zeros((8, 8), dtype=bool)
    mask[:, :4] = True
    assert psnr(pred, gt, mask) == pytest.approx(20.0)
    assert psnr(pred, gt) < 10.0
    with pytest.raises(StageError, match="no pixel"):
        psnr(pred, gt, np.zeros((8, 8), dtype=bool))


def test_psnr_scales_uint8():
    gt = np.full((4, 4, 3), 100, dtype=np.uint8)
    pred = gt + np.uint8(51)  # 51 / 255 = 0.2 -> MSE 0.04 -> 13.98 dB
    assert psnr(pred, gt) == pytest.approx(-10 * np.log10(0.04))
    assert psnr(pred, gt.astype(np.float64) / 255) == pytest.approx(-10 * np.log10(0.04))


def test_ssim_identical_is_one_and_noise_lowers_it():
    rng = np.random.default_rng(0)
    img = rng.uniform(0.2, 0.8, size=(32, 32, 3))
    assert ssim(img, img) == pytest.approx(1.0)
    noisy = np.clip(img + rng.normal(0, 0.1, img.shape), 0, 1)
    assert ssim(noisy, img) < 0.9
    assert ssim(np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1), img) > ssim(noisy, img)


def test_image_shape_mismatch_raises():
    with pytest.raises(StageError, match="differ in shape"):
        psnr(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)))


# --- geometry ---------------------------------------------------------------------------------------------------


def test_shifted_copy_scores_the_shift():
    gt = _grid()
    rec = gt + [0.07, 0.0, 0.0]
    s = geometry_scores(rec, gt, THRESHOLDS)
    for key in ("accuracy", "completeness", "chamfer", "accuracy_median", "completeness_median", "emd"):
        assert s[key] == pytest.approx(0.07), key
    assert s["precision_5cm"] == s["recall_5cm"] == s["fscore_5cm"] == 0.0
    assert s["precision_10cm"] == s["recall_10cm"] == s["fscore_10cm"] == 1.0
    assert s["fscore_20cm"] == 1.0
    assert s["rec_points"] == s["gt_points"] == s["rec_points_cropped"] == s["emd_points"] == 125


def test_missing_half_lowers_recall_only():
    gt = np.stack([np.arange(10.0), np.zeros(10), np.zeros(10)], 1)  # x = 0..9 on a line
    rec = gt[:5]  # x = 0..4
    s = geometry_scores(rec, gt, THRESHOLDS)
    assert s["accuracy"] == 0.0 and s["precision_10cm"] == 1.0
    assert s["recall_5cm"] == s["recall_20cm"] == 0.5
    assert s["fscore_10cm"] == pytest.approx(2 * 0.5 / 1.5)
    # GT x = 5..9 lie 1..5 from x = 4: completeness (0*5 + 1+2+3+4+5) / 10.
    assert s["completeness"] == pytest.approx(1.5)
    assert s["completeness_median"] == pytest.approx(0.5)
    assert s["chamfer"] == pytest.approx(0.75)


def test_spurious_point_lowers_precision_by_one_over_n():
    gt = _grid()
    rec = np.vstack([gt, [[1.5, 1.5, 1.5]]])  # inside the box, sqrt(0.75) from every nearest GT point
    s = geometry_scores(rec, gt, THRESHOLDS)
    n = len(rec)
    assert s["precision_20cm"] == pytest.approx(1 - 1 / n)
    assert s["recall_20cm"] == 1.0
    assert s["accuracy"] == pytest.approx(np.sqrt(0.75) / n)
    assert s["completeness"] == 0.0


def test_points_far_outside_the_ground_truth_are_cropped():
    gt = _grid()
    rec = np.vstack([gt, [[2.0, 2.0, 100.0]], [[4.15, 0.0, 0.0]]])  # a sky point, and one within the margin
    s = geometry_scores(rec, gt, THRESHOLDS)
    assert s["rec_points"] == 127 and s["rec_points_cropped"] == 126 and s["rec_points_dropped"] == 1
    assert s["precision_10cm"] == pytest.approx(125 / 126)
    assert s["precision_20cm"] == 1.0
    # A margin of 0 also drops the point 0.15 past the box.
    assert geometry_scores(rec, gt, THRESHOLDS, crop_margin=0.0)["rec_points_cropped"] == 125


def test_emd_of_a_permutation_is_zero():
    gt = _grid()
    rec = gt[np.random.default_rng(1).permutation(len(gt))]
    s = geometry_scores(rec, gt, THRESHOLDS)
    assert s["emd"] == pytest.approx(0.0, abs=1e-12) and s["chamfer"] == 0.0


def test_chamfer_ignores_density_and_emd_does_not():
    # Two clusters 10 apart; rec is gt plus three more copies of cluster A.
    a = _grid(4, 0.01)
    gt = np.vstack([a, a + [10.0, 0, 0]])
    rec = np.vstack([gt, a, a, a])
    s = geometry_scores(rec, gt, THRESHOLDS, emd_points=len(gt))
    assert s["chamfer"] == 0.0 and s["fscore_5cm"] == 1.0
    # A sample of len(gt) points from rec holds ~7/8 cluster A: ~3/8 of the matches must cross the 10 gap.
    assert s["emd_points"] == len(gt)
    assert 2.0 < s["emd"] < 6.0
    # The equal-density cloud scores EMD 0.
    assert geometry_scores(gt.copy(), gt, THRESHOLDS)["emd"] == pytest.approx(0.0, abs=1e-12)


def test_emd_subsample_is_deterministic_and_capped():
    rng = np.random.default_rng(2)
    gt = rng.uniform(0, 1, (500, 3))
    rec = gt + rng.normal(0, 0.01, gt.shape)
    s1 = geometry_scores(rec, gt, THRESHOLDS, emd_points=100, seed=3)
    s2 = geometry_scores(rec, gt, THRESHOLDS, emd_points=100, seed=3)
    assert s1["emd_points"] == 100 and s1["emd"] == s2["emd"]


def test_empty_inputs_raise():
    gt = _grid()
    with pytest.raises(StageError, match="reconstructed point cloud is empty"):
        geometry_scores(np.zeros((0, 3)), gt, THRESHOLDS)
    with pytest.raises(StageError, match="ground-truth point cloud is empty"):
        geometry_scores(gt, np.zeros((0, 3)), THRESHOLDS)
    with pytest.raises(StageError, match="check the alignment"):
        geometry_scores(gt + 1000.0, gt, THRESHOLDS)


# --- observed region --------------------------------------------------------------------------------------------


def _camera_at_origin(width: int = 64, height: int = 48, f: float = 100.0) -> Camera:
    """Looks down +z from the origin."""
    K = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1.0]])
    return Camera(K=K, cam_from_world=np.hstack([np.eye(3), np.zeros((3, 1))]), width=width, height=height)


def _wall(z: float, spacing: float, half: float = 3.0) -> np.ndarray:
    """A square of samples at depth z, offset by half a spacing so none projects onto a cell or image border."""
    ax = np.arange(-half, half, spacing) + spacing / 2
    xx, yy = np.meshgrid(ax, ax)
    return np.stack([xx.ravel(), yy.ravel(), np.full(xx.size, z)], 1)


def test_observed_mask_occlusion_and_frustum():
    cam = _camera_at_origin()
    wall = _wall(5.0, 0.05)  # 1 px apart at f=100, z=5: covers the whole 64x48 image
    probes = np.array([
        [0.0, 0.0, 10.0],   # behind the wall: hidden
        [0.0, 0.0, 2.0],    # in front of the wall: seen
        [0.0, 0.0, -2.0],   # behind the camera
        [50.0, 0.0, 4.0],   # outside the image
        [1.0, 0.5, 5.2],    # just behind the wall, within the 10 % depth tolerance: seen
    ])
    # Discs of radius 0.05 cover less than one 8 px cell at these depths: each point hides only its own cell.
    seen = observed_mask(np.vstack([wall, probes]), [cam], max_depth=20.0, point_radius=0.05)
    assert seen[len(wall):].tolist() == [False, True, False, False, True]
    # The wall alone: every point projecting into the image is seen, however near its neighbours' depths.
    wall_seen = observed_mask(wall, [cam], max_depth=20.0)  # default disc radius
    in_image = (np.abs(wall[:, 0]) * 100 / 5 < 32) & (np.abs(wall[:, 1]) * 100 / 5 < 24)
    assert wall_seen[in_image].all() and not wall_seen[~in_image].any()
    # The probe at z = 2 (pixel 32, 24) hides the 8 x 8 wall points of its cell, pixels [32, 40) x [24, 32).
    hidden = in_image & ~seen[: len(wall)]
    assert hidden.sum() == 64 and (wall[hidden, :2] > 0).all() and (wall[hidden, :2] < 0.4).all()


def test_observed_mask_sparse_wall_still_occludes():
    # Samples 0.5 apart are 10 px apart on the image, farther than a 4 px cell: the splat closes the gaps.
    cam = _camera_at_origin()
    pts = np.vstack([_wall(5.0, 0.5), [[0.0, 0.0, 10.0]]])  # the probe looks through the gap between samples
    assert not observed_mask(pts, [cam], max_depth=20.0, cell_px=4)[-1]
    assert observed_mask(pts, [cam], max_depth=20.0, cell_px=4, point_radius=0.0)[-1]


def test_observed_mask_max_depth_and_min_views():
    cam = _camera_at_origin()
    side = Camera(K=cam.K, cam_from_world=np.hstack([np.eye(3), [[-100.0], [0], [0]]]), width=64, height=48)
    pts = np.array([[0.0, 0.0, 4.0], [6.0, 0.0, 30.0]])  # different cells: neither hides the other

    def seen(cams, max_depth, min_views=1):
        return observed_mask(pts, cams, max_depth, min_views=min_views, point_radius=0.0).tolist()

    assert seen([cam], 20.0) == [True, False]
    assert seen([cam], 50.0) == [True, True]
    assert seen([cam, side], 50.0, min_views=2) == [False, False]
    assert seen([cam, cam], 50.0, min_views=2) == [True, True]


def test_observed_mask_oblique_ground_does_not_hide_itself():
    # Camera 1.6 m above random ground samples, looking along it: one 8 px cell spans up to 50 % of depth.
    K = np.array([[100.0, 0, 32], [0, 100, 24], [0, 0, 1]])
    cam = Camera(K=K, cam_from_world=look_at_cam_from_world(np.array([0, 0, 1.6]), np.array([10, 0, 1.6])),
                 width=64, height=48)
    rng = np.random.default_rng(0)
    ground = np.c_[rng.uniform(0, 30, 20_000), rng.uniform(-5, 5, 20_000), np.zeros(20_000)]
    below = np.array([[8.0, 0, -1.0], [15.0, 1, -2.0], [8.0, 0, -0.3]])  # under the road: hidden
    pts = np.vstack([ground, below])
    cam_z = ground[:, 0]  # the camera looks down +x, so depth is x
    u, v = 32 - 100 * ground[:, 1] / cam_z, 24 + 100 * 1.6 / cam_z
    in_view = (cam_z <= 25.0) & (u >= 0) & (u < 64) & (v < 48)
    seen = observed_mask(pts, [cam], max_depth=25.0)
    assert in_view.sum() > 5000 and seen[:-3][in_view].all() and not seen[:-3][~in_view].any()
    assert not seen[-3:].any()
    # Discs facing the camera (no normals) would hide most of the road behind its nearer samples.
    assert observed_mask(pts, [cam], max_depth=25.0, normals=np.zeros_like(pts))[:-3][in_view].mean() < 0.5
