"""Scoring a map against a ground-truth map (GeoJSON, DESIGN.md's schema), both in the ground truth's frame.

Only the geometry and `kind`, `type`, `height`, `radius` are read. Markings are compared as points sampled
every SAMPLE_M along each LineString: precision is the share of ours within MATCH_M of a ground-truth sample,
recall the share of ground truth's within MATCH_M of ours, and the solid/dashed accuracy is over our matched
samples. Poles are matched one to one within POLE_MATCH_M (Hungarian on distance). Ground truth outside the
observed region (when one is given) is left out: a map cannot be blamed for what its cameras never saw.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

SAMPLE_M = 0.1
MATCH_M = 0.2
POLE_MATCH_M = 0.5


def sample_line(coords: np.ndarray, step: float = SAMPLE_M) -> np.ndarray:
    """Points every `step` along a polyline (its vertices' dimension kept), both ends included."""
    coords = np.asarray(coords, float)
    if len(coords) < 2:
        return coords
    d = np.r_[0, np.cumsum(np.linalg.norm(np.diff(coords, axis=0), axis=1))]
    s = np.linspace(0, d[-1], max(2, int(np.ceil(d[-1] / step)) + 1))
    return np.stack([np.interp(s, d, coords[:, k]) for k in range(coords.shape[1])], 1)


def _xyz(c) -> np.ndarray:
    a = np.asarray(c, float)
    return np.concatenate([a, np.zeros(a.shape[:-1] + (3 - a.shape[-1],))], -1) if a.shape[-1] < 3 else a


def markings_of(geojson: dict) -> list[tuple[np.ndarray, str]]:
    return [(_xyz(f["geometry"]["coordinates"]), str(f["properties"].get("type", "solid")))
            for f in geojson.get("features", []) if f.get("properties", {}).get("kind") == "lane_marking"
            and f["geometry"]["type"] == "LineString"]


def poles_of(geojson: dict) -> list[tuple[np.ndarray, float | None, float | None]]:
    return [(_xyz(f["geometry"]["coordinates"]), f["properties"].get("height"), f["properties"].get("radius"))
            for f in geojson.get("features", []) if f.get("properties", {}).get("kind") == "pole"
            and f["geometry"]["type"] == "Point"]


def _samples(lines: list[tuple[np.ndarray, str]]) -> tuple[np.ndarray, np.ndarray]:
    pts, types = [], []
    for coords, tp in lines:
        s = sample_line(coords)
        pts.append(s)
        types += [tp] * len(s)
    return (np.vstack(pts) if pts else np.zeros((0, 3))), np.asarray(types)


def evaluate_map(ours: dict, truth: dict, observed: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Marking and pole scores of `ours` against `truth`, both GeoJSON dicts in the same (ground truth) frame.

    `observed(points_N3) -> bool mask` limits ground truth (and ours) to the region the map covers.
    """
    keep = observed or (lambda p: np.ones(len(p), bool))
    out: dict = {}
    o_pts, o_type = _samples(markings_of(ours))
    t_pts, t_type = _samples(markings_of(truth))
    if len(t_pts):
        m = keep(t_pts)
        t_pts, t_type = t_pts[m], t_type[m]
    if len(o_pts):
        m = keep(o_pts)
        o_pts, o_type = o_pts[m], o_type[m]
    out["truth_marking_m"] = len(t_pts) * SAMPLE_M
    out["marking_m"] = len(o_pts) * SAMPLE_M
    if len(t_pts) and len(o_pts):
        d_o, i_o = cKDTree(t_pts).query(o_pts)
        d_t, _ = cKDTree(o_pts).query(t_pts)
        matched = d_o <= MATCH_M
        p, r = float(matched.mean()), float((d_t <= MATCH_M).mean())
        out.update(marking_precision=p, marking_recall=r, marking_f1=2 * p * r / (p + r) if p + r else 0.0,
                   marking_mean_distance_m=float(d_o[matched].mean()) if matched.any() else None,
                   dash_type_accuracy=float((o_type[matched] == t_type[i_o[matched]]).mean())
                   if matched.any() else None)
    else:
        out.update(marking_precision=None if not len(o_pts) else 0.0, marking_recall=None if not len(t_pts) else 0.0,
                   marking_f1=None if not (len(o_pts) or len(t_pts)) else 0.0, marking_mean_distance_m=None,
                   dash_type_accuracy=None)
    op, tp = poles_of(ours), poles_of(truth)
    if tp:
        tp = [t for t, k in zip(tp, keep(np.array([t[0] for t in tp]))) if k]
    if op:
        op = [o for o, k in zip(op, keep(np.array([o[0] for o in op]))) if k]
    out["truth_poles"], out["poles"] = len(tp), len(op)
    if tp and op:
        a, b = np.array([o[0] for o in op]), np.array([t[0] for t in tp])
        cost = np.linalg.norm(a[:, None, :2] - b[None, :, :2], axis=-1)
        rows, cols = linear_sum_assignment(np.where(cost <= POLE_MATCH_M, cost, 1e6))
        ok = cost[rows, cols] <= POLE_MATCH_M
        rows, cols = rows[ok], cols[ok]
        out.update(pole_precision=len(rows) / len(op), pole_recall=len(rows) / len(tp),
                   pole_rmse_m=float(np.sqrt(np.mean(cost[rows, cols] ** 2))) if len(rows) else None)
        dh = [abs(op[i][1] - tp[j][1]) for i, j in zip(rows, cols) if op[i][1] is not None and tp[j][1] is not None]
        out["pole_height_error_m"] = float(np.median(dh)) if dh else None
    else:
        out.update(pole_precision=None if not op else 0.0, pole_recall=None if not tp else 0.0, pole_rmse_m=None,
                   pole_height_error_m=None)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}
