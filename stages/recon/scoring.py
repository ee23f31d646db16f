"""Scores for the dense-reconstruction stage: render quality and geometry against ground truth.

Images: PSNR and SSIM as nerfstudio reports them (float images in [0, 1], SSIM of Wang et al. with a gaussian
window of sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1, averaged over channels).

Geometry, following the Tanks and Temples / DTU evaluations, with d(p, S) the distance from p to the nearest
point of S (Euclidean, not squared):

- accuracy      = mean over reconstructed points r of d(r, GT)
- completeness  = mean over ground-truth points g of d(g, REC)
- chamfer       = (accuracy + completeness) / 2, the mean of the two directed mean distances
- precision(t)  = share of reconstructed points with d(r, GT) < t
- recall(t)     = share of ground-truth points with d(g, REC) < t
- fscore(t)     = 2 P R / (P + R)  (0 when both are 0)
- emd           = mean matched distance of the optimal one-to-one assignment between equal-size random
                  subsamples of the two clouds.

Chamfer is a nearest-neighbour measure, so piling more points onto part of the surface leaves it unchanged;
EMD pairs points one to one, so a reconstruction whose density differs from the ground truth's pays for it.
Both are reported, EMD on equal-size samples because it is only defined for equal counts.

Ground truth is restricted beforehand to what the cameras saw (`observed_mask`); the reconstruction is cropped
here to the ground truth's bounding box, grown by a margin, so sky and far-away points do not count.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist
from skimage.metrics import structural_similarity

from stages.common.errors import StageError

# ---------------------------------------------------------------------------------------------------------------
# Images


def _as_float_image(img: np.ndarray, name: str) -> np.ndarray:
    """Float64 copy of an image in [0, 1]; uint8 images are scaled by 1/255."""
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if not np.issubdtype(arr.dtype, np.floating):
        raise StageError(f"{name} image has dtype {arr.dtype}; pass float images in [0, 1] or uint8")
    return arr.astype(np.float64)


def _image_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both images as float in [0, 1], checked to have the same shape."""
    p, g = _as_float_image(pred, "predicted"), _as_float_image(gt, "ground-truth")
    if p.shape != g.shape:
        raise StageError(f"predicted image {p.shape} and ground-truth image {g.shape} differ in shape; "
                         "render at the ground-truth resolution")
    if p.ndim not in (2, 3):
        raise StageError(f"images must be (H, W) or (H, W, C), got shape {p.shape}")
    return p, g


def psnr(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB for a data range of 1: -10 log10(MSE).

    `mask` (H, W) or (H, W, 1) bool selects the pixels that count; the MSE is the mean over those pixels and
    all channels. Identical images give +inf.
    """
    p, g = _image_pair(pred, gt)
    sq_err = (p - g) ** 2
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.ndim == 3 and m.shape[-1] == 1:
            m = m[..., 0]
        if m.shape != p.shape[:2]:
            raise StageError(f"mask shape {m.shape} does not match the image's {p.shape[:2]}")
        if not m.any():
            raise StageError("the PSNR mask selects no pixel; pass mask=None or a mask with some True pixels")
        sq_err = sq_err[m]
    mse = float(sq_err.mean())
    return float("inf") if mse == 0.0 else float(-10.0 * np.log10(mse))


def ssim(pred: np.ndarray, gt: np.ndarray) -> float:
    """Standard SSIM (Wang et al. 2004), mean over pixels and channels.

    Gaussian window sigma 1.5 (11 x 11 after skimage's 3.5-sigma truncation), K1 0.01, K2 0.03, data range 1,
    population covariances: the settings of the original paper and of nerfstudio.
    """
    p, g = _image_pair(pred, gt)
    if min(p.shape[:2]) < 11:
        raise StageError(f"SSIM needs images of at least 11 x 11 pixels (its gaussian window), got {p.shape[:2]}")
    return float(structural_similarity(
        p, g, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        K1=0.01, K2=0.03, channel_axis=-1 if p.ndim == 3 else None))


# ---------------------------------------------------------------------------------------------------------------
# Which ground-truth points the cameras saw


@dataclasses.dataclass(frozen=True)
class Camera:
    """A pinhole camera: pixel ~ K @ (R x + t) with cam_from_world = [R | t] (3 x 4), image width x height."""

    K: np.ndarray
    cam_from_world: np.ndarray
    width: int
    height: int


def _median_spacing(points_N3: np.ndarray) -> float:
    """Median distance from a point to its nearest neighbour (0 for fewer than two points)."""
    if len(points_N3) < 2:
        return 0.0
    d_N2, _ = cKDTree(points_N3).query(points_N3, k=2, workers=-1)
    return float(np.median(d_N2[:, 1]))


def estimate_normals(points_N3: np.ndarray, k: int = 12, planarity: float = 0.1) -> np.ndarray:
    """Unit normals (sign arbitrary) from PCA of each point's k nearest neighbours.

    Zero where the neighbourhood is not flat (smallest covariance eigenvalue above `planarity` times the middle
    one: an isolated point, a pole, a corner) and below three points: such a point gets a disc facing the camera.
    """
    n = len(points_N3)
    if n < 3:
        return np.zeros((n, 3))
    _, idx_NK = cKDTree(points_N3).query(points_N3, k=min(k, n), workers=-1)
    nbrs_NK3 = points_N3[idx_NK] - points_N3[idx_NK].mean(1, keepdims=True)
    cov_N33 = np.einsum("nki,nkj->nij", nbrs_NK3, nbrs_NK3)
    vals_N3, vecs_N33 = np.linalg.eigh(cov_N33)
    normals_N3 = np.ascontiguousarray(vecs_N33[:, :, 0])  # eigenvector of the smallest eigenvalue
    normals_N3[vals_N3[:, 0] > planarity * vals_N3[:, 1]] = 0.0
    return normals_N3


@dataclasses.dataclass(frozen=True)
class _Surfels:
    """The points in front of one camera whose discs can reach its image grid, farthest-reaching first."""

    p_N3: np.ndarray      # position, camera frame
    n_N3: np.ndarray      # unit normal, camera frame
    cell_N2: np.ndarray   # (column, row) of the grid cell holding the projection
    reach_N: np.ndarray   # how many cells either side the disc can cover, non-increasing


def _mat_apply(M_33: np.ndarray, p_N3: np.ndarray) -> np.ndarray:
    """p @ M.T by columns: BLAS on a tall (N, 3) x (3, 3) product is no faster and stalls on a loaded machine."""
    return p_N3[:, 0:1] * M_33[:, 0] + p_N3[:, 1:2] * M_33[:, 1] + p_N3[:, 2:3] * M_33[:, 2]


def _to_camera(points_N3: np.ndarray, cam: Camera) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame points (N, 3) and their pixel coordinates (N, 2) (meaningless where depth <= 0)."""
    pose_34 = np.asarray(cam.cam_from_world, dtype=np.float64)
    p_N3 = _mat_apply(pose_34[:, :3], points_N3) + pose_34[:, 3]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv_N2 = _mat_apply(np.asarray(cam.K, dtype=np.float64), p_N3)[:, :2] / p_N3[:, 2:3]
    return p_N3, uv_N2


def _surfels(p_N3: np.ndarray, uv_N2: np.ndarray, normals_N3: np.ndarray, cam: Camera, cell_px: int,
             radius: float, max_cells: int, grid: tuple[int, int]) -> _Surfels:
    """The camera's surfels (see `_Surfels`) from the camera-frame points and their pixel coordinates."""
    front = np.flatnonzero(p_N3[:, 2] > 1e-6)
    z_N = p_N3[front, 2]
    cell_N2 = np.floor(uv_N2[front] / cell_px)
    focal = float(np.mean(np.diag(np.asarray(cam.K))[:2]))
    # A cell k away has its centre at least (k - 1/2) cells from the projection: farther ones cannot be hit.
    reach_N = np.minimum(np.floor(focal * radius / (z_N * cell_px) + 0.5), max_cells)
    near_grid = (cell_N2 >= -reach_N[:, None]).all(1) & (cell_N2[:, 0] < grid[1] + reach_N) \
        & (cell_N2[:, 1] < grid[0] + reach_N)
    keep = np.flatnonzero(near_grid)[np.argsort(-reach_N[near_grid], kind="stable")]
    idx = front[keep]
    pc_M3 = p_N3[idx]
    n_M3 = _mat_apply(np.asarray(cam.cam_from_world, dtype=np.float64)[:, :3], normals_N3[idx])
    # A point without a normal gets a disc facing the camera.
    no_normal = np.linalg.norm(n_M3, axis=1) < 0.5
    n_M3[no_normal] = pc_M3[no_normal] / np.linalg.norm(pc_M3[no_normal], axis=1, keepdims=True)
    return _Surfels(pc_M3, n_M3, cell_N2[keep].astype(np.int64), reach_N[keep].astype(np.int64))


def _cell_rays(cam: Camera, cell_px: int, grid: tuple[int, int]) -> np.ndarray:
    """(rows * cols, 3) directions through the cell centres, scaled to unit depth (K's last row is [0, 0, 1])."""
    rows, cols = np.mgrid[: grid[0], : grid[1]]
    pix_M3 = np.stack([(cols.ravel() + 0.5) * cell_px, (rows.ravel() + 0.5) * cell_px, np.ones(rows.size)], 1)
    d_M3 = _mat_apply(np.linalg.inv(np.asarray(cam.K, dtype=np.float64)), pix_M3)
    return d_M3 / d_M3[:, 2:3]


def _nearest_surfel(s: _Surfels, rays_M3: np.ndarray, radius: float, grid: tuple[int, int]) -> np.ndarray:
    """Per grid cell, the index of the nearest surfel covering it (-1 for none): a z-buffer of surfel ids.

    A surfel covers its own cell, at its depth, and the neighbouring cells whose centre ray hits its disc, at the
    depth where the ray meets it.
    """
    h, w = grid
    cells: list[np.ndarray] = []
    depths: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    plane_N = (s.n_N3 * s.p_N3).sum(1)
    max_reach = int(s.reach_N.max(initial=0))
    # reach is sorted non-increasing, so the surfels reaching ring k are a prefix.
    count_by_ring = [int(np.searchsorted(-s.reach_N, -k, side="right")) for k in range(max_reach + 1)]
    for dy in range(-max_reach, max_reach + 1):
        for dx in range(-max_reach, max_reach + 1):
            m = count_by_ring[max(abs(dx), abs(dy))]
            x, y = s.cell_N2[:m, 0] + dx, s.cell_N2[:m, 1] + dy
            i = np.flatnonzero((x >= 0) & (x < w) & (y >= 0) & (y < h))
            cell = y[i] * w + x[i]
            if dx == 0 and dy == 0:
                depth_M, hit = s.p_N3[i, 2], np.ones(len(i), dtype=bool)
            else:
                d_M3 = rays_M3[cell]
                with np.errstate(divide="ignore", invalid="ignore"):
                    depth_M = plane_N[i] / (s.n_N3[i] * d_M3).sum(1)
                    hit = (depth_M > 0) & (((depth_M[:, None] * d_M3 - s.p_N3[i]) ** 2).sum(1) <= radius**2)
            cells.append(cell[hit])
            depths.append(depth_M[hit])
            ids.append(i[hit])
    cell_W, depth_W, id_W = np.concatenate(cells), np.concatenate(depths), np.concatenate(ids)
    order = np.lexsort((depth_W, cell_W))
    first = np.ones(len(order), dtype=bool)
    first[1:] = cell_W[order[1:]] != cell_W[order[:-1]]
    owner = np.full(h * w, -1, dtype=np.int64)
    owner[cell_W[order[first]]] = id_W[order[first]]
    return owner


def _visible_in(points_N3: np.ndarray, normals_N3: np.ndarray, cam: Camera, max_depth: float, cell_px: int,
                depth_tol: float, radius: float, max_cells: int) -> np.ndarray:
    """Bool (N,): the points one camera sees (see `observed_mask` for the rule)."""
    grid = (int(np.ceil(cam.height / cell_px)), int(np.ceil(cam.width / cell_px)))
    p_N3, uv_N2 = _to_camera(points_N3, cam)
    s = _surfels(p_N3, uv_N2, normals_N3, cam, cell_px, radius, max_cells, grid)
    owner = _nearest_surfel(s, _cell_rays(cam, cell_px, grid), radius, grid)
    z_N = p_N3[:, 2]
    inside = (z_N > 1e-6) & (z_N <= max_depth) & (uv_N2[:, 0] >= 0) & (uv_N2[:, 0] < cam.width) \
        & (uv_N2[:, 1] >= 0) & (uv_N2[:, 1] < cam.height)
    idx = np.flatnonzero(inside)
    cells_M2 = np.floor(uv_N2[idx] / cell_px).astype(np.int64)
    visible = np.zeros(len(z_N), dtype=bool)
    visible[idx] = ~_hidden(p_N3[idx], owner[cells_M2[:, 1] * grid[1] + cells_M2[:, 0]], s, depth_tol)
    return visible


def _hidden(q_M3: np.ndarray, owner_M: np.ndarray, s: _Surfels, depth_tol: float) -> np.ndarray:
    """Bool (M,): camera-frame points lying more than depth_tol * t behind their cell's nearest surface.

    t is where the point's own ray meets the plane of that surfel, not the surfel's depth: within one coarse
    cell an oblique surface spans a range of depths, and its farther samples must not hide behind its nearest.
    An edge-on plane (the ray parallel to it) hides nothing.
    """
    hidden = np.zeros(len(q_M3), dtype=bool)
    covered = np.flatnonzero(owner_M >= 0)
    j, q = owner_M[covered], q_M3[covered]
    with np.errstate(divide="ignore", invalid="ignore"):
        t_M = (s.n_N3[j] * s.p_N3[j]).sum(1) / (s.n_N3[j] * q).sum(1) * q[:, 2]
    hidden[covered] = np.isfinite(t_M) & (t_M > 0) & (q[:, 2] > t_M * (1.0 + depth_tol))
    return hidden


def observed_mask(points: np.ndarray, cameras: list[Camera], max_depth: float, *, min_views: int = 1,
                  cell_px: int = 8, depth_tol: float = 0.1, point_radius: float | None = None,
                  normals: np.ndarray | None = None, max_splat_cells: int = 8) -> np.ndarray:
    """Bool (N,): the ground-truth surface samples seen by at least `min_views` of the cameras.

    A camera sees a point when all of these hold:
    - it is in front of the camera, at depth 0 < z <= max_depth along the optical axis;
    - it projects inside the image (0 <= u < width, 0 <= v < height);
    - no other surface lies in front of it. The points themselves are rendered into a z-buffer on a coarse grid
      of cell_px x cell_px pixels as discs (surfels) of radius `point_radius` across their normal: a disc
      covers its own cell, at its depth, and every cell up to `max_splat_cells` either side whose centre ray
      hits it, at the depth where that ray meets it; each cell keeps its nearest disc. The point is hidden when
      its depth z exceeds (1 + depth_tol) * t, t being where the point's own ray meets the plane of its cell's
      nearest disc.

    Why this shape: the discs close a facade of random samples into a wall, so what is behind it is hidden even
    where the samples are cells apart on the image. Orienting the discs along the surface, and measuring t
    along the point's own ray, keeps an oblique surface (the road ahead, a facade along the street), whose
    depth spans tens of percent within one cell, from hiding its own farther samples. `point_radius` defaults
    to four times the median nearest-neighbour spacing: randomly placed samples leave gaps much wider than
    their median spacing, and a hole in one camera of many already leaks what is behind (on a synthetic 80 m
    street, 70 cameras: 47 % of a building behind a facade leaks at twice the spacing, 0.2 % at four times).
    `normals` default to a PCA of the 12 nearest neighbours (pass the mesh's normals when there are any); a
    zero normal, as for a point whose neighbourhood is not flat, gives a disc facing each camera. The relative
    tolerance absorbs normal noise and curvature. Cost: about a second per 100k points and 10 cameras on 2 cores.
    """
    pts_N3 = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(cameras) == 0:
        raise StageError("observed_mask needs at least one camera; check that the scene's cameras were loaded")
    radius = 4.0 * _median_spacing(pts_N3) if point_radius is None else float(point_radius)
    nrm_N3 = estimate_normals(pts_N3) if normals is None else np.asarray(normals, dtype=np.float64).reshape(-1, 3)
    if nrm_N3.shape != pts_N3.shape:
        raise StageError(f"normals {nrm_N3.shape} do not match points {pts_N3.shape}; pass one normal per point")
    counts_N = np.zeros(len(pts_N3), dtype=np.int64)
    for cam in cameras:
        counts_N += _visible_in(pts_N3, nrm_N3, cam, max_depth, cell_px, depth_tol, radius, max_splat_cells)
    return counts_N >= min_views


# ---------------------------------------------------------------------------------------------------------------
# Geometry


def _as_cloud(points: np.ndarray, name: str) -> np.ndarray:
    """(N, 3) float64 finite points, or a StageError saying what is wrong."""
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise StageError(f"{name} points must have shape (N, 3), got {arr.shape}")
    if len(arr) == 0:
        raise StageError(f"{name} point cloud is empty; nothing to score: check that the {name} cloud was "
                         "written and, for ground truth, that the cameras observe part of it")
    if not np.isfinite(arr).all():
        raise StageError(f"{name} point cloud has non-finite coordinates; drop NaN/inf points before scoring")
    return arr


def crop_to_box(points_N3: np.ndarray, ref_N3: np.ndarray, margin: float) -> np.ndarray:
    """The points inside ref's axis-aligned bounding box grown by margin on every side."""
    lo, hi = ref_N3.min(0) - margin, ref_N3.max(0) + margin
    return points_N3[np.all((points_N3 >= lo) & (points_N3 <= hi), axis=1)]


def emd(a_N3: np.ndarray, b_N3: np.ndarray, n: int, seed: int = 0) -> float:
    """Mean matched distance of the optimal one-to-one assignment between n random points of each cloud.

    Exact (Hungarian algorithm on the n x n Euclidean cost matrix); n is at most the smaller cloud's size. The
    two samples are drawn independently, so even a perfect reconstruction scores about the spacing of n random
    points on the surface (about 1 m for 2000 points on an 80 m street): compare EMDs at the same n and ground
    truth only.
    """
    rng = np.random.default_rng(seed)
    a = a_N3 if n == len(a_N3) else a_N3[rng.choice(len(a_N3), n, replace=False)]
    b = b_N3 if n == len(b_N3) else b_N3[rng.choice(len(b_N3), n, replace=False)]
    cost_NN = cdist(a, b)
    rows, cols = linear_sum_assignment(cost_NN)
    return float(cost_NN[rows, cols].mean())


def _fscore(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2.0 * p * r / (p + r)


def surface_distance(rec: np.ndarray, gt: np.ndarray, gt_normals: np.ndarray | None) -> np.ndarray:
    """Distance of each rec point to the surface the gt samples stand for.

    Without normals: to the nearest gt sample. With them: to that sample's tangent plane, as long as the point lies
    within half the local sample spacing of it along the plane (beyond that, the part of the offset along the
    plane that exceeds the half spacing counts too). Surface samples a spacing s apart leave a point lying exactly
    on the surface up to ~s/2 from the nearest sample: with the default scene's ~20 cm spacing, point-to-point
    distances put a perfect reconstruction at ~7 cm, and precision at 5 and 10 cm measured the sampling, not the
    reconstruction."""
    tree = cKDTree(gt)
    d, idx = tree.query(rec, workers=-1)
    if gt_normals is None:
        return d
    spacing, _ = tree.query(gt, k=2, workers=-1)
    half = 0.5 * np.median(spacing[:, 1])
    off = rec - gt[idx]
    n = gt_normals[idx]
    normal = np.abs(np.sum(off * n, 1))
    along = np.sqrt(np.maximum(d ** 2 - normal ** 2, 0.0))
    return np.hypot(normal, np.maximum(along - half, 0.0))


def geometry_scores(rec: np.ndarray, gt: np.ndarray, thresholds: dict[str, float], *, emd_points: int = 2000,
                    seed: int = 0, crop_margin: float | None = None, gt_normals: np.ndarray | None = None) -> dict:
    """Accuracy, completeness, Chamfer, precision / recall / F-score per threshold and EMD of rec against gt.

    rec, gt: (N, 3) in the same frame, gt already aligned and cropped to the observed region. rec is cropped to
    gt's axis-aligned bounding box grown by crop_margin (default: the largest threshold); rec_points counts rec
    before the crop, rec_points_cropped the points kept and scored, rec_points_dropped those cropped away.
    Chamfer = (accuracy + completeness) / 2, the mean of the two directed mean nearest-neighbour distances (not
    squared). A point is within threshold t when its distance is < t.
    EMD is computed on n = min(emd_points, len(cropped rec), len(gt)) points of each, drawn with `seed`.
    With gt_normals, accuracy and precision use the distance to the sampled surface (`surface_distance`);
    completeness and recall stay point to point (from each gt sample to the nearest rec point).
    """
    rec_all, gt = _as_cloud(rec, "reconstructed"), _as_cloud(gt, "ground-truth")
    if crop_margin is None:
        crop_margin = max(thresholds.values(), default=0.0)
    rec_c = crop_to_box(rec_all, gt, crop_margin)
    if len(rec_c) == 0:
        raise StageError(f"none of the {len(rec_all)} reconstructed points lies within {crop_margin} of the "
                         "ground truth's bounding box; check the alignment to ground truth and the scene units")
    if gt_normals is not None and np.shape(gt_normals) != gt.shape:
        raise StageError(f"ground-truth normals {np.shape(gt_normals)} do not match its points {gt.shape}")
    d_rec = surface_distance(rec_c, gt, gt_normals)
    d_gt, _ = cKDTree(rec_c).query(gt, workers=-1)
    acc, comp = float(d_rec.mean()), float(d_gt.mean())
    out: dict = {"accuracy": acc, "completeness": comp, "chamfer": (acc + comp) / 2.0,
                 "accuracy_median": float(np.median(d_rec)), "completeness_median": float(np.median(d_gt))}
    for name, t in thresholds.items():
        p, r = float((d_rec < t).mean()), float((d_gt < t).mean())
        out |= {f"precision_{name}": p, f"recall_{name}": r, f"fscore_{name}": _fscore(p, r)}
    n = int(min(emd_points, len(rec_c), len(gt)))
    out |= {"emd": emd(rec_c, gt, n, seed), "emd_points": n,
            "rec_points": len(rec_all), "gt_points": len(gt), "rec_points_cropped": len(rec_c),
            "rec_points_dropped": len(rec_all) - len(rec_c)}
    return out
