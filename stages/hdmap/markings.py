"""Lane markings from the orthomosaic: paint segmented by local contrast, vectorised, linked, typed.

Paint is a thin structure brighter than the road on both sides: a white top-hat (grey minus its opening by a
square wider than any marking) keeps exactly those, whatever the road's and the paint's colours, while a kerb
(a step, bright on one side only) and a shadow's edge give no response. A pixel is paint where its top-hat
exceeds the local median of the top-hat (over a few metres, robust to the paint itself) plus `contrast` times its local spread (median absolute deviation). Connected pieces that are line-shaped (width and length within bounds) are thinned to centre lines,
ordered and simplified into polylines in world coordinates, then linked end to end into markings when they
continue each other's direction; a marking whose painted length covers most of its extent is solid, one made
of regular pieces with gaps is dashed.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from stages.hdmap.evaluate import sample_line
from stages.hdmap.surface import Raster

# Blur before the top-hat (metres, Gaussian sigma): below a marking's width, above the road's grain.
PRE_BLUR_M = 0.04
# Local statistics of the top-hat: median and spread over this window (metres), at a quarter of the resolution.
NOISE_WINDOW_M = 4.0
NOISE_DOWNSAMPLE = 4
# Skeleton polylines are simplified to within this many pixels.
SIMPLIFY_PX = 1.5
# The road: pixels whose local colour (Lab, averaged over ROAD_SIGMA_M) and texture (grey spread over ROAD_TEXTURE_M)
# lie within ROAD_MADS robust spreads of those under the camera path (within ROAD_BAND_M of it), connected to it.
ROAD_BAND_M = 0.5
ROAD_SIGMA_M = 0.1
ROAD_TEXTURE_M = 0.15
ROAD_MADS = 4.0
# Spread floors (Lab units, grey-level spread): a flat rendered road has almost none.
ROAD_MIN_SPREAD = (2.0, 2.0, 2.0, 1.0)
# A painted piece is kept when at least this share of its centre line lies on the road; or, within ROAD_NEAR_M of
# it, when for this share of its samples the pixels FLANK_PX past the paint's edge on its two sides have one colour.
ROAD_MIN_SHARE = 0.5
ROAD_NEAR_M = 0.3
FLANK_PX = (1, 2)
# Paint's colour lies at least this many robust spreads from the road's median in some channel.
PAINT_MIN_MADS = 2.0
# Linking: the next piece's start must lie within this angle of the previous piece's direction, and its own
# direction must agree within it too (degrees); lateral offset at most LINK_MAX_OFFSET_M.
LINK_MAX_ANGLE_DEG = 12.0
LINK_MAX_OFFSET_M = 0.35


@dataclasses.dataclass
class Marking:
    """One lane marking: its painted pieces (world xy polylines, in order along it) and its type."""

    pieces: list[np.ndarray]
    type: str = "solid"

    @property
    def line(self) -> np.ndarray:
        """The whole marking as one polyline (pieces joined across their gaps)."""
        return np.vstack(self.pieces)

    def painted_length(self) -> float:
        return float(sum(polyline_length(p) for p in self.pieces))

    def extent(self) -> float:
        return polyline_length(self.line)


def polyline_length(p: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(p, axis=0), axis=1).sum()) if len(p) > 1 else 0.0


def paint_mask(rgb: np.ndarray, valid: np.ndarray, raster: Raster, max_width_m: float, contrast: float) -> np.ndarray:
    """Pixels of thin bright structures standing out from their surroundings by `contrast` x the local noise."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    # Fill unseen pixels with their surroundings so the map's border is no edge.
    if (~valid).any() and valid.any():
        idx = ndimage.distance_transform_edt(~valid, return_distances=False, return_indices=True)
        grey = grey[tuple(idx)]
    # A light blur first: paint is coherent over several pixels, the road's grain is not.
    grey = cv2.GaussianBlur(grey, (0, 0), PRE_BLUR_M / raster.res)
    size = max(3, int(round(2 * max_width_m / raster.res)) | 1)
    tophat = cv2.morphologyEx(grey, cv2.MORPH_TOPHAT, cv2.getStructuringElement(cv2.MORPH_RECT, (size, size)))
    med = _local_median(tophat, raster)
    spread = 1.4826 * _local_median(np.abs(tophat - med), raster)
    return (tophat > med + contrast * np.maximum(spread, 1.0)) & valid


def _masked_blur(img: np.ndarray, weight: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian average of `img` over the pixels where `weight` is 1 (normalised convolution)."""
    num = cv2.GaussianBlur(img * weight, (0, 0), sigma_px)
    return num / np.maximum(cv2.GaussianBlur(weight, (0, 0), sigma_px), 1e-6)


def road_mask(rgb: np.ndarray, seen: np.ndarray, paint: np.ndarray, raster: Raster, track_N2: np.ndarray,
              unit: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The surface the capture travelled on: pixels that look like the ground under the camera path, connected to
    it, with the holes inside filled. Also the per-pixel colour (Lab at PRE_BLUR_M) and its reference median and
    spread under the path, for `on_road`'s flank test.

    Each pixel's features are its local Lab colour and grey-level spread, averaged without the paint pixels (so
    a painted line takes the colour of the surface it is painted on); the reference is the median and the robust
    spread of the features within ROAD_BAND_M of `track_N2` (the cameras' ground track: a vehicle drives on the
    road). A capture that did not travel on the road (a pedestrian on the pavement) gets the surface it
    travelled on.
    """
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    fine = cv2.GaussianBlur(lab, (0, 0), PRE_BLUR_M * unit / raster.res)
    track = np.zeros(seen.shape, np.uint8)
    cv2.polylines(track, [np.round(raster.to_pixel(track_N2)).astype(np.int32).reshape(-1, 1, 2)], False, 1,
                  max(1, int(round(2 * ROAD_BAND_M * unit / raster.res))))
    band = (track > 0) & seen & ~paint
    if band.sum() < 10:
        return np.zeros_like(seen), fine, np.zeros(3), np.full(3, np.inf)
    weight = (seen & ~paint).astype(np.float32)
    sigma, tex = ROAD_SIGMA_M * unit / raster.res, ROAD_TEXTURE_M * unit / raster.res
    grey_mean = _masked_blur(lab[..., 0], weight, tex)
    spread = np.sqrt(np.maximum(_masked_blur(lab[..., 0] ** 2, weight, tex) - grey_mean ** 2, 0.0))
    feats = np.stack([_masked_blur(lab[..., c], weight, sigma) for c in range(3)] + [spread], -1)
    ref, scale = _robust(feats[band], ROAD_MIN_SPREAD)
    like = (np.abs(feats - ref) <= ROAD_MADS * scale).all(-1) & seen
    _, labels = cv2.connectedComponents(like.astype(np.uint8), connectivity=8)
    ids = np.unique(labels[band & like])
    road = ndimage.binary_fill_holes(np.isin(labels, ids[ids > 0]))
    fine_ref, fine_scale = _robust(fine[band], ROAD_MIN_SPREAD[:3])
    return road, fine, fine_ref, fine_scale


def _robust(x: np.ndarray, floor) -> tuple[np.ndarray, np.ndarray]:
    """Median and robust spread (1.4826 MAD, at least `floor`) of the rows of x."""
    med = np.median(x, 0)
    return med, np.maximum(1.4826 * np.median(np.abs(x - med), 0), floor)


def _densify(px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points about 1 px apart along a pixel polyline, and the unit normal there."""
    q = sample_line(px, 1.0)
    d = np.gradient(q, axis=0)
    d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-9)
    return q, np.c_[-d[:, 1], d[:, 0]]


def on_road(pieces: list[np.ndarray], road: np.ndarray, paint: np.ndarray, fine: np.ndarray, ref: np.ndarray,
            scale: np.ndarray, raster: Raster, max_width: float, unit: float = 1.0) -> list[np.ndarray]:
    """The pieces painted on the road.

    - Paint is not road-coloured: a piece whose median colour lies within PAINT_MIN_MADS spreads of the road's
      (in the middle 95 % of a normal spread) is a sunlit strip of asphalt between two shadows, not paint.
    - A piece whose centre line lies on the road mask for ROAD_MIN_SHARE of its length is on the road.
    - A piece beside the road (within ROAD_NEAR_M) is on it when its two flanks, just outside its painted width,
      are one surface (their colours within ROAD_MADS road spreads of each other): an edge line close to the
      kerb, where the road mask (averaged over the kerb too) stops at the line. A kerb's top has road on one side
      and a verge or a pavement on the other. The paint's edge is looked for up to twice `max_width` (the widest
      marking, model units) out.
    """
    h, w = road.shape
    near = cv2.dilate(road.astype(np.uint8), cv2.getStructuringElement(
        cv2.MORPH_ELLIPSE, (2 * max(1, int(round(ROAD_NEAR_M * unit / raster.res))) + 1,) * 2)) > 0
    reach = max(2, int(round(2 * max_width / raster.res)))
    steps = np.arange(1, reach + 1)
    keep = []
    for p in pieces:
        q, nrm = _densify(raster.to_pixel(p))
        qi = np.round(q).astype(int)
        inside = (qi[:, 0] >= 0) & (qi[:, 0] < w) & (qi[:, 1] >= 0) & (qi[:, 1] < h)
        if not inside.any():
            continue
        q, nrm, qi = q[inside], nrm[inside], qi[inside]
        if (np.abs(np.median(fine[qi[:, 1], qi[:, 0]], 0) - ref) <= PAINT_MIN_MADS * scale).all():
            continue
        if road[qi[:, 1], qi[:, 0]].mean() >= ROAD_MIN_SHARE:
            keep.append(p)
            continue
        if near[qi[:, 1], qi[:, 0]].mean() < ROAD_MIN_SHARE:
            continue
        flanks = []
        for sign in (-1.0, 1.0):
            # Walk out of the paint along the normal; the flank is FLANK_PX pixels beyond its edge.
            pts = np.round(q[:, None, :] + sign * steps[None, :, None] * nrm[:, None, :]).astype(int)
            pts[..., 0] = pts[..., 0].clip(0, w - 1)
            pts[..., 1] = pts[..., 1].clip(0, h - 1)
            out_of_paint = ~paint[pts[..., 1], pts[..., 0]]
            edge = np.where(out_of_paint.any(1), out_of_paint.argmax(1), reach - 1)
            at = [pts[np.arange(len(q)), np.minimum(edge + k, reach - 1)] for k in FLANK_PX]
            flanks.append(np.mean([fine[f[:, 1], f[:, 0]] for f in at], 0))
        same = (np.abs(flanks[0] - flanks[1]) <= ROAD_MADS * scale).all(-1)
        if same.mean() >= ROAD_MIN_SHARE:
            keep.append(p)
    return keep


def _local_median(img: np.ndarray, raster: Raster) -> np.ndarray:
    """Median over NOISE_WINDOW_M (computed at 1/NOISE_DOWNSAMPLE resolution, 8-bit), at full size."""
    small = cv2.resize(img, None, fx=1 / NOISE_DOWNSAMPLE, fy=1 / NOISE_DOWNSAMPLE, interpolation=cv2.INTER_AREA)
    k = max(3, int(round(NOISE_WINDOW_M / (raster.res * NOISE_DOWNSAMPLE))) | 1)
    med = cv2.medianBlur(np.clip(small, 0, 255).astype(np.uint8), min(k, 255)).astype(np.float32)
    return cv2.resize(med, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)


def _ordered_skeleton(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Skeleton pixels (row, col) ordered along the longest path between two of its ends."""
    pts = np.stack([ys, xs], 1)
    index = {(int(y), int(x)): i for i, (y, x) in enumerate(pts)}
    nbrs = [[index[(y + dy, x + dx)] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
             if (dy or dx) and (y + dy, x + dx) in index] for y, x in map(tuple, pts)]

    def farthest(start: int) -> tuple[int, list[int]]:
        prev = {start: -1}
        frontier, last = [start], start
        while frontier:
            nxt = []
            for i in frontier:
                for j in nbrs[i]:
                    if j not in prev:
                        prev[j] = i
                        nxt.append(j)
                        last = j
            frontier = nxt
        path = [last]
        while prev[path[-1]] != -1:
            path.append(prev[path[-1]])
        return last, path

    a, _ = farthest(0)
    _, path = farthest(a)
    return pts[path]


def pieces_from_mask(mask: np.ndarray, raster: Raster, width_m: tuple[float, float],
                     min_length_m: float) -> list[np.ndarray]:
    """Line-shaped connected pieces of the paint mask as world polylines (N, 2)."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    skel = skeletonize(mask)
    out = []
    for i in range(1, n):
        x, y, w, h, area = stats[i]
        if max(w, h) * raster.res < min_length_m:
            continue
        sub = labels[y:y + h, x:x + w] == i
        sk = skel[y:y + h, x:x + w] & sub
        length_px = max(int(sk.sum()), 1)
        width = area / length_px * raster.res
        if not (width_m[0] <= width <= width_m[1]) or length_px * raster.res < min_length_m:
            continue
        ys, xs = np.nonzero(sk)
        ordered = _ordered_skeleton(ys + y, xs + x)
        if len(ordered) * raster.res < min_length_m:
            continue
        simple = cv2.approxPolyDP(ordered[:, ::-1].astype(np.float32).reshape(-1, 1, 2), SIMPLIFY_PX, False)
        cr = simple.reshape(-1, 2).astype(float)
        M = raster.world_from_pixel()
        out.append(cr @ M[:2, :2].T + M[:2, 2])
    return out


def _direction(p: np.ndarray, at_end: bool, span_m: float = 2.0) -> np.ndarray:
    """Unit direction of a polyline near one end (over about `span_m`)."""
    q = p if at_end else p[::-1]
    d = np.cumsum(np.r_[0, np.linalg.norm(np.diff(q[::-1], axis=0), axis=1)])
    j = int(np.searchsorted(d, span_m))
    j = min(max(j, 1), len(q) - 1)
    v = q[-1] - q[-1 - j]
    v = v if at_end else -v
    return v / max(np.linalg.norm(v), 1e-9)


def _path_direction(path_N2: np.ndarray, line: np.ndarray) -> np.ndarray:
    """The path's direction of travel (not normalised) at its vertex nearest the middle of `line`."""
    mid = line[len(line) // 2]
    k = int(np.argmin(np.linalg.norm(path_N2 - mid, axis=1)))
    return np.gradient(path_N2, axis=0)[k]


def orient(pieces: list[np.ndarray], path_N2: np.ndarray) -> list[np.ndarray]:
    """Each piece pointing the way the cameras travelled (at the nearest point of the path)."""
    return [p if (p[-1] - p[0]) @ _path_direction(path_N2, p) >= 0 else p[::-1] for p in pieces]


def link(pieces: list[np.ndarray], max_gap_m: float) -> list[list[np.ndarray]]:
    """Chains of pieces that continue one another (greedy, shortest gaps first)."""
    ends = [(p[-1], _direction(p, True)) for p in pieces]
    starts = [(p[0], _direction(p, False)) for p in pieces]
    cos_max = np.cos(np.radians(LINK_MAX_ANGLE_DEG))
    cands = []
    for i, (e, de) in enumerate(ends):
        for j, (s, ds) in enumerate(starts):
            if i == j:
                continue
            gap = s - e
            dist = float(np.linalg.norm(gap))
            if dist > max_gap_m or de @ ds < cos_max:
                continue
            along = gap @ de
            if along <= -0.1 or abs(gap[0] * de[1] - gap[1] * de[0]) > LINK_MAX_OFFSET_M + 0.02 * dist:
                continue
            cands.append((dist, i, j))
    nxt, prv = {}, {}
    for _, i, j in sorted(cands):
        if i in nxt or j in prv:
            continue
        k = j  # no cycles
        while k in nxt:
            k = nxt[k]
        if k == i:
            continue
        nxt[i], prv[j] = j, i
    chains = []
    for i in range(len(pieces)):
        if i in prv:
            continue
        chain = [i]
        while chain[-1] in nxt:
            chain.append(nxt[chain[-1]])
        chains.append([pieces[k] for k in chain])
    return chains


def along_path(chains: list[list[np.ndarray]], path_N2: np.ndarray, max_angle_deg: float,
               lone_min_length_m: float) -> list[list[np.ndarray]]:
    """Lane markings run along the road: keep chains within `max_angle_deg` of the path's direction where they
    are, and lone pieces only from `lone_min_length_m` (shorter lone blobs are texture, not paint)."""
    keep = []
    for chain in chains:
        line = np.vstack(chain)
        if len(chain) == 1 and polyline_length(line) < lone_min_length_m:
            continue
        d, t = line[-1] - line[0], _path_direction(path_N2, line)
        cos = abs(d @ t) / max(np.linalg.norm(d) * np.linalg.norm(t), 1e-9)
        if cos >= np.cos(np.radians(max_angle_deg)):
            keep.append(chain)
    return keep


def classify(chain: list[np.ndarray], solid_min_fill: float, dash_max_length_m: float,
             dash_min_gap_m: float = 0.0) -> str:
    """solid or dashed from the gap pattern: mostly painted along its extent = solid; pieces with gaps = dashed;
    a lone piece shorter than a dash can be = dashed. Gaps shorter than `dash_min_gap_m` count as painted: a
    dashed line's gaps are longer than that, while wear, a shadow or a missed stretch breaks a solid line into
    pieces with short gaps."""
    marking = Marking(chain)
    if len(chain) == 1:
        return "dashed" if marking.painted_length() <= dash_max_length_m else "solid"
    gaps = [float(np.linalg.norm(b[0] - a[-1])) for a, b in zip(chain[:-1], chain[1:])]
    painted = marking.painted_length() + sum(g for g in gaps if g < dash_min_gap_m)
    return "solid" if painted >= solid_min_fill * marking.extent() else "dashed"
