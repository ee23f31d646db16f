"""Pole-like objects: vertical thin structures found by voting over the frames.

A pole standing at (x, y) on the road surface projects, in every frame that sees it, onto a near-vertical thin
bar from its foot upwards. Each frame gets, at a few widths, a map of where a thin vertical bar is centred (the
centre of a window differs in colour from both flanks, as a thin bar does and an edge or a wide surface does
not, and more than anywhere within two widths). Every ground cell of the map then collects, from each frame
that sees it within range, the share of the projected vertical segment between POLE_SAMPLE_HEIGHTS that lands
on a centred bar of the width a pole of a given radius has at that depth (the best of a few radii around the
nominal one), times the share of the ground just in front of the foot that shows no bar (a pole ends where it
stands; a cell behind a pole along the viewing ray has that pole in front of it). A pole scores high in most
views; a cell of road, wall or sky hits a bar only by chance. Peaks whose mean share reaches `min_score` over
at least `min_views` frames are poles if their foot has open ground around it and the sparse model has points
along them (a pole's own texture gives features; the bars of a window frame on a far wall are seen too, but
nothing stands at the candidate foot in front of it); ghosts along the viewing rays are dropped; the height is
where the vote along the pole drops, the radius comes from the width that responds best.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
from scipy import ndimage

from stages.hdmap.ortho import View, sample_bilinear
from stages.hdmap.surface import HeightField, Raster

# Heights above the surface (m) sampled along a candidate pole: above kerbs and car bumpers' clutter, below
# where most poles end.
POLE_SAMPLE_HEIGHTS = (0.8, 1.2, 1.6, 2.0, 2.4)
# Bar half-widths (px) of the response pyramid; a pole of radius r at depth d is 2 r f / d px wide.
BAR_HALF_WIDTHS = (1, 2, 3, 5, 8, 12)
# A bar counts only above this percentile of its frame's responses (flat, textureless areas do not vote).
BAR_FLOOR_PERCENTILE = 90.0
# Vertical smoothing of the bar response (px): a pole is a long vertical structure.
VERTICAL_SMOOTH_PX = 9
# Sparse points between these heights above the surface (m) make walls, cars and hedges.
WALL_HEIGHTS = (0.3, 8.0)
# A pole's foot has candidate ground on at least this share of the disk of FREE_RADIUS_M (m) around it.
FREE_RADIUS_M = 1.0
FREE_MIN_SHARE = 0.75
# A weaker peak seen within this bearing (degrees, median over the frames seeing both) of a stronger one is
# its ghost along the viewing rays.
GHOST_BEARING_DEG = 2.0
# A pole is also in the sparse model: at least this many points within FREE_RADIUS_M of its axis, between
# WALL_HEIGHTS above the surface (features on the pole; the bars of a window frame on a wall far ahead of the
# cameras are seen too, but nothing stands at the candidate foot in front of that wall). Two, not one: a single
# point can be a stray match.
MIN_POLE_POINTS = 2
# Heights (m) probed for a pole's top, and the share of the pole's lower response at which it counts as ended.
TOP_PROBE = np.arange(0.5, 12.01, 0.25)
TOP_DROP = 0.5
# A pole's width is not known in advance: a cell scores the best of these multiples of the nominal radius (about
# one step of BAR_HALF_WIDTHS apart), each held over all the views.
RADIUS_FACTORS = (2 / 3, 1.0, 1.5)
# The foot test: ground points this far (m) in front of a candidate's foot, towards the camera, are looked at in
# the image column of the pole, where they project at least FOOT_MIN_GAP_PX below the foot (clear of the
# vertical smoothing of the bar response); a bar there means something stands in front of the candidate.
FOOT_FRONT_M = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
FOOT_MIN_GAP_PX = 6.0


@dataclasses.dataclass
class Pole:
    x: float
    y: float
    z: float
    """Foot on the road surface."""
    height: float
    radius: float
    score: float
    views: int


def bar_responses(image: np.ndarray) -> np.ndarray:
    """(len(BAR_HALF_WIDTHS), H, W) float 0/1: where a thin vertical bar of each width is centred.

    `image` is colour (H, W, 3) or grey. The bar response of a window is its colour distance to the nearer of
    its two flanks, less half the flanks' distance to each other: a bar in front of any background responds, an
    edge or a ramp between two colours does not (a grey pole in front of a green wall of the same brightness is
    as clear as a dark one). The response must be the largest within two bar widths left and right and above
    the image's own BAR_FLOOR_PERCENTILE; the indicator is widened by a pixel each side so a projection a pixel
    off still lands on it. Being centred on a bar, not being strong, is what a pole gives in every view, so
    strong edges elsewhere in a frame do not drown weak poles.
    """
    g = image.astype(np.float32)
    g = g if g.ndim == 3 else g[:, :, None]
    out = []
    for hw in BAR_HALF_WIDTHS:
        w = 2 * hw + 1
        c = cv2.blur(g, (w, VERTICAL_SMOOTH_PX)).reshape(g.shape)
        left = np.roll(c, w, axis=1)
        right = np.roll(c, -w, axis=1)
        dl, dr, dlr = (np.linalg.norm(a - b, axis=2) for a, b in ((c, left), (c, right), (left, right)))
        r = np.maximum(np.minimum(dl, dr) - 0.5 * dlr, 0)
        r[:, : 2 * BAR_HALF_WIDTHS[-1] + 1] = 0
        r[:, -2 * BAR_HALF_WIDTHS[-1] - 1:] = 0
        floor = float(np.percentile(r, BAR_FLOOR_PERCENTILE))
        peak = (r >= ndimage.maximum_filter1d(r, size=4 * w + 1, axis=1)) & (r > floor)
        out.append(ndimage.maximum_filter1d(peak, size=3, axis=1).astype(np.float32))
    return np.stack(out)


def _at_widths(resp: np.ndarray, level: np.ndarray, ok: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """The bar indicator sampled at `uv` (N, 2), each point at its own width `level`; 0 where not `ok`."""
    out = np.zeros(len(uv))
    for lv in np.unique(level[ok]):
        sel = np.nonzero(ok & (level == lv))[0]
        out[sel] = sample_bilinear(resp[lv], uv[sel])[:, 0]
    return out


def _vote(views: list[View], images: list[np.ndarray], X_N3: np.ndarray, heights: tuple[float, ...],
          radii_m: tuple[float, ...], range_m: tuple[float, float],
          unit: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each pole radius in `radii_m` and each candidate: the sum over the views that see the whole segment of
    the mean response along it, times the share of the ground just in front of its foot that shows no bar (the
    foot test: a pole ends where it stands; a ghost behind a pole along the viewing ray has that pole in front
    of its foot), (R, N); the number of those views (N,); and the mean response at each height over the views
    that see that height (R, N, len(heights)). The projections are shared by the radii, which change only the
    bar width sampled. Lengths in model units, `unit` per metre for FOOT_FRONT_M."""
    radii = np.asarray(radii_m, float)
    total = np.zeros((len(radii), len(X_N3)))
    count = np.zeros(len(X_N3), int)
    per_h = np.zeros((len(radii), len(X_N3), len(heights)))
    seen_h = np.zeros((len(X_N3), len(heights)), int)
    hw = np.asarray(BAR_HALF_WIDTHS, float)

    def levels(depth: np.ndarray, f: float) -> np.ndarray:
        """(R, n) width level of a pole of each radius at these depths (focal length f px)."""
        half = radii[:, None] * f / np.maximum(depth, 1e-3)[None, :]
        return np.argmin(np.abs(hw[None, None, :] - half[:, :, None]), axis=2)

    for v, resp in zip(views, images):
        d = np.linalg.norm(X_N3[:, :2] - v.center[:2], axis=1)
        near = np.nonzero((d > range_m[0]) & (d < range_m[1]))[0]
        if not len(near):
            continue
        f = float(v.camera.mean_focal_length())
        acc = np.zeros((len(radii), len(near), len(heights)))
        seen = np.zeros((len(near), len(heights)), bool)
        for k, h in enumerate(heights):
            uv, depth = v.project(X_N3[near] + np.array([0.0, 0.0, h]))
            ok = np.isfinite(uv[:, 0]) & (uv[:, 0] >= 0) & (uv[:, 0] < v.camera.width - 1) & (uv[:, 1] >= 0) \
                & (uv[:, 1] < v.camera.height - 1)
            seen[:, k] = ok
            for i, level in enumerate(levels(depth, f)):
                acc[i, :, k] = _at_widths(resp, level, ok, uv)
        whole = seen.all(1)  # the score counts views that see the whole sampled segment
        # A pole ends at its foot: the ground just in front of it (towards the camera) shows no bar in the image.
        # A ghost behind a pole along the viewing ray has that pole there.
        uv0, depth0 = v.project(X_N3[near])
        level0 = levels(depth0, f)
        toward = v.center[:2] - X_N3[near, :2]
        toward /= np.maximum(np.linalg.norm(toward, axis=1, keepdims=True), 1e-9)
        hits = np.zeros((len(radii), len(near)))
        tried = np.zeros(len(near))
        for step in FOOT_FRONT_M:
            G = X_N3[near].copy()
            G[:, :2] += step * unit * toward
            q, _ = v.project(G)
            okq = np.isfinite(q[:, 0]) & (q[:, 1] < v.camera.height - 1) & (q[:, 1] - uv0[:, 1] >= FOOT_MIN_GAP_PX)
            for i, level in enumerate(level0):
                hits[i] += _at_widths(resp, level, okq, np.c_[uv0[:, 0], q[:, 1]])
            tried += okq
        below = hits / np.maximum(tried, 1)
        idx = near[whole]
        total[:, idx] += acc[:, whole].mean(2) * (1.0 - below[:, whole])
        count[idx] += 1
        per_h[:, near] += acc
        seen_h[near] += seen
    return total, count, per_h / np.maximum(seen_h, 1)[None]


def standing(points_N3: np.ndarray, surface: HeightField, unit: float) -> np.ndarray:
    """The sparse points between WALL_HEIGHTS above the surface (`unit`: model units per metre)."""
    h = points_N3[:, 2] - surface(points_N3[:, 0], points_N3[:, 1])
    return points_N3[(h > WALL_HEIGHTS[0] * unit) & (h < WALL_HEIGHTS[1] * unit)]


def wall_mask(raster: Raster, surface: HeightField, points_N3: np.ndarray, cell_m: float, min_length_m: float,
              margin_m: float, unit: float = 1.0) -> np.ndarray:
    """Raster pixels on or near extended vertical structures (walls, parked cars, hedges): sparse points
    between WALL_HEIGHTS above the surface, binned in `cell_m` cells, in connected clusters at least
    `min_length_m` long. A pole's own points make a cluster of its diameter, far below that. (`unit`: model
    units per metre, for WALL_HEIGHTS.)"""
    if not len(points_N3):
        return np.zeros((raster.height, raster.width), bool)
    pts = standing(points_N3, surface, unit)
    step = max(1, int(round(cell_m / raster.res)))
    shape = (-(-raster.height // step), -(-raster.width // step))
    px = np.floor(raster.to_pixel(pts[:, :2]) / step + 0.5 / step).astype(int)
    ok = (px[:, 0] >= 0) & (px[:, 0] < shape[1]) & (px[:, 1] >= 0) & (px[:, 1] < shape[0])
    occ = np.zeros(shape, np.uint8)
    np.add.at(occ, (px[ok, 1], px[ok, 0]), 1)
    labels, n = ndimage.label(occ >= 1, structure=np.ones((3, 3)))
    walls = np.zeros(shape, bool)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        extent = max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) * step * raster.res
        if extent >= min_length_m:
            walls[sl] |= labels[sl] == i
    walls = np.kron(walls, np.ones((step, step), bool))[: raster.height, : raster.width]
    r = max(1, int(round(margin_m / raster.res)))
    return cv2.dilate(walls.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2)) > 0


def find_poles(views: list[View], image_dir, raster: Raster, surface: HeightField, candidates: np.ndarray,
               cell_m: float, nominal_radius_m: float, range_m: tuple[float, float], min_views: int,
               min_score: float, nms_m: float, points_N3: np.ndarray, unit: float = 1.0) -> list[Pole]:
    """Poles standing on the surface within the `candidates` mask of the raster (see the module's doc), each
    with at least MIN_POLE_POINTS of the sparse `points_N3` along it. Lengths are in model units (`unit` per
    metre, for the module's constants)."""
    step = max(1, int(round(cell_m / raster.res)))
    rows, cols = np.nonzero(candidates[::step, ::step])
    if not len(rows):
        return []
    xs, ys = raster.xy()
    x, y = xs[cols * step], ys[rows * step]
    X = np.stack([x, y, surface(x, y)], 1)
    images = []
    for v in views:
        img = cv2.imread(str(image_dir / v.name), cv2.IMREAD_COLOR)
        images.append(bar_responses(img) if img is not None else np.zeros((len(BAR_HALF_WIDTHS), 1, 1), np.float32))
    # A pole's width is not known in advance: each cell scores its best of a few radii around the nominal one,
    # each radius held for all the views (a pole has one width).
    total, count, _ = _vote(views, images, X, POLE_SAMPLE_HEIGHTS,
                            tuple(nominal_radius_m * k for k in RADIUS_FACTORS), range_m, unit)
    score = np.where(count >= min_views, total.max(0) / np.maximum(count, 1), 0.0)
    grid = np.zeros(candidates[::step, ::step].shape)
    grid[rows, cols] = score
    r = max(1, int(round(nms_m / cell_m)))
    peaks = (grid == ndimage.maximum_filter(grid, size=2 * r + 1)) & (grid >= min_score)
    pr, pc = np.nonzero(peaks)
    if not len(pr):
        return []
    by_cell = {(a, b): i for i, (a, b) in enumerate(zip(rows, cols))}
    chosen = [by_cell[(a, b)] for a, b in zip(pr, pc)]
    # A pole stands on open ground: the candidate area surrounds its foot. At a wall's foot, at the edge of what
    # the cameras saw of the ground, or beside a car, half of that disk is missing.
    r_px = max(1, int(round(FREE_RADIUS_M * unit / raster.res)))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r_px + 1, 2 * r_px + 1)).astype(np.float32)
    around = cv2.filter2D(candidates.astype(np.float32), -1, disk / disk.sum(), borderType=cv2.BORDER_CONSTANT)
    chosen = [c for c in chosen if around[rows[c] * step, cols[c] * step] >= FREE_MIN_SHARE]
    # A pole's own texture gives sparse points along it; the bars of a window frame on a far wall do not.
    upright = standing(points_N3, surface, unit)
    chosen = [c for c in chosen
              if (np.linalg.norm(upright[:, :2] - X[c, :2], axis=1) < FREE_RADIUS_M * unit).sum() >= MIN_POLE_POINTS]
    chosen = _without_ghosts(chosen, X, score, views, range_m)
    foot = X[chosen]
    # Height: the vote along the pole, probed upwards; radius: the width that responds best at the foot.
    per_h = _vote(views, images, foot, tuple(TOP_PROBE), (nominal_radius_m,), range_m, unit)[2][0]
    poles = []
    for i, j in enumerate(chosen):
        prof = per_h[i]
        low = np.median(prof[(TOP_PROBE >= POLE_SAMPLE_HEIGHTS[0]) & (TOP_PROBE <= POLE_SAMPLE_HEIGHTS[-1])])
        above = np.nonzero(prof < TOP_DROP * low)[0]
        above = above[TOP_PROBE[above] > POLE_SAMPLE_HEIGHTS[-1]]
        height = float(TOP_PROBE[above[0]] if len(above) else TOP_PROBE[-1])
        radius = _best_radius(views, images, foot[i], range_m, unit)
        poles.append(Pole(float(foot[i, 0]), float(foot[i, 1]), float(foot[i, 2]), height, radius,
                          float(score[j]), int(count[j])))
    return poles


def _without_ghosts(chosen: list[int], X_N3: np.ndarray, score: np.ndarray, views: list[View],
                    range_m: tuple[float, float]) -> list[int]:
    """Drop a peak that most frames see in the same direction as a stronger one: cameras moving along a street
    see a pole from nearly one bearing, so cells on those rays (in front of or behind it) collect its bars too."""
    order = sorted(chosen, key=lambda i: -score[i])
    kept: list[int] = []
    centers = np.stack([v.center[:2] for v in views])
    for i in order:
        ghost = False
        for j in kept:
            di = np.linalg.norm(centers - X_N3[i, :2], axis=1)
            dj = np.linalg.norm(centers - X_N3[j, :2], axis=1)
            both = (di > range_m[0]) & (di < range_m[1]) & (dj > range_m[0]) & (dj < range_m[1])
            if not both.any():
                continue
            ai = np.arctan2(*(X_N3[i, :2] - centers[both]).T[::-1])
            aj = np.arctan2(*(X_N3[j, :2] - centers[both]).T[::-1])
            diff = np.degrees(np.abs(np.angle(np.exp(1j * (ai - aj)))))
            if np.median(diff) < GHOST_BEARING_DEG:
                ghost = True
                break
        if not ghost:
            kept.append(i)
    return kept


def _best_radius(views: list[View], images: list[np.ndarray], foot: np.ndarray, range_m: tuple[float, float],
                 unit: float = 1.0) -> float:
    """Radius (model units; `unit` per metre) whose projected width responds best, over the views that see the
    pole's lower part."""
    radii = tuple(r * unit for r in (0.04, 0.06, 0.09, 0.13, 0.19, 0.28))
    total, _, _ = _vote(views, images, foot[None], POLE_SAMPLE_HEIGHTS, radii, range_m, unit)
    return radii[int(np.argmax(total[:, 0]))]
