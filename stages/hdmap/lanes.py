"""Lanes between adjacent lane boundaries, and the Lanelet2 map.

Markings that run along the camera path are lane boundaries. At each station along the path they are ordered
by their signed lateral offset; two parallel neighbours between `lane_width_m` apart bound a lane, over the
stretch where both run (its extent). A lane is a Lanelet2 lanelet: left and right bounds (linestrings of type
`line_thin`, subtype `solid` or `dashed`, as painted), oriented the way the cameras travelled (the map cannot
see which way traffic flows). Lanelet2's traffic rules then allow a lane change across a dashed bound and not
across a solid one; the routing graph says so.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from stages.hdmap.markings import Marking, polyline_length

# Boundaries are compared at stations this far apart along the path (m).
STATION_STEP_M = 2.0
# Two boundaries bound a lane only where they run side by side over at least this many stations.
MIN_SHARED_STATIONS = 3
# A lane's bounds run parallel: over the stations they share, the lane's width varies by at most this (m).
# Paint found across a pavement or a side road (a stray piece at an angle) changes it by metres.
MAX_WIDTH_CHANGE_M = 1.0


@dataclasses.dataclass
class Lane:
    left: int
    """Index of the left boundary (looking along the path) in the markings list."""
    right: int
    width_m: float
    stations_m: tuple[float, float] = (-np.inf, np.inf)
    """The stretch along the path (arc length, model units) over which both bounds run: the lane's extent."""


def _resample(line: np.ndarray, step: float) -> np.ndarray:
    d = np.r_[0, np.cumsum(np.linalg.norm(np.diff(line, axis=0), axis=1))]
    s = np.arange(0, d[-1] + 1e-9, step) if d[-1] > 0 else np.zeros(1)
    return np.stack([np.interp(s, d, line[:, 0]), np.interp(s, d, line[:, 1])], 1)


def offsets_along(path_N2: np.ndarray, line: np.ndarray, step: float | None = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Station (arc length along the path) and signed lateral offset (+ left) of a polyline's samples, every
    `step` along it (None: of its vertices)."""
    pts = _resample(line, step) if step else np.asarray(line, float)
    seg = np.diff(path_N2, axis=0)
    seg_len = np.maximum(np.linalg.norm(seg, axis=1), 1e-9)
    cum = np.r_[0, np.cumsum(seg_len)]
    rel = pts[:, None, :] - path_N2[None, :-1, :]
    t = np.clip((rel * seg[None]).sum(-1) / seg_len[None] ** 2, 0, 1)
    foot = path_N2[None, :-1, :] + t[..., None] * seg[None]
    dist = np.linalg.norm(pts[:, None, :] - foot, axis=-1)
    k = np.argmin(dist, axis=1)
    i = np.arange(len(pts))
    station = cum[k] + t[i, k] * seg_len[k]
    cross = seg[k, 0] * rel[i, k, 1] - seg[k, 1] * rel[i, k, 0]
    return station, np.sign(cross) * dist[i, k]


def find_lanes(markings: list[Marking], path_N2: np.ndarray, width_m: tuple[float, float],
               unit: float = 1.0) -> list[Lane]:
    """Pairs of neighbouring, parallel boundaries `width_m` apart over their shared stretch, left before right
    (`unit`: model units per metre, for the module's constants)."""
    profiles = []
    for m in markings:
        st, off = offsets_along(path_N2, m.line)
        bins = np.round(st / (STATION_STEP_M * unit)).astype(int)
        prof = {}
        for b in np.unique(bins):
            prof[int(b)] = float(np.median(off[bins == b]))
        profiles.append(prof)
    lanes = []
    for i, pi in enumerate(profiles):
        for j, pj in enumerate(profiles):
            if i == j:
                continue
            shared = sorted(set(pi) & set(pj))
            if len(shared) < MIN_SHARED_STATIONS:
                continue
            gaps = np.array([pi[b] - pj[b] for b in shared])  # i left of j: positive
            gap = float(np.median(gaps))
            if not (width_m[0] <= gap <= width_m[1]) or np.ptp(gaps) > MAX_WIDTH_CHANGE_M * unit:
                continue
            # No other boundary between them.
            between = any(
                len(set(pk) & set(shared)) >= MIN_SHARED_STATIONS
                and pj[shared[0]] < np.median([pk[b] for b in set(pk) & set(shared)]) < pi[shared[0]]
                for k, pk in enumerate(profiles) if k not in (i, j))
            if not between:
                step = STATION_STEP_M * unit
                lanes.append(Lane(i, j, gap, ((shared[0] - 0.5) * step, (shared[-1] + 0.5) * step)))
    return lanes


def _bound(markings: list[Marking], k: int, lane: Lane, path_N2: np.ndarray) -> tuple[np.ndarray, bool]:
    """Marking k cut to the lane's stretch, and whether the cut kept all of it (then neighbouring lanes can share
    it as one linestring, which is how Lanelet2 knows they are adjacent)."""
    line = _resample(markings[k].line, 0.1 * STATION_STEP_M)
    st, _ = offsets_along(path_N2, line, None)
    inside = (st >= lane.stations_m[0]) & (st <= lane.stations_m[1])
    if inside.all() or inside.sum() < 2:
        return markings[k].line, True
    return line[inside], False


def lane_polygon(markings: list[Marking], lane: Lane, path_N2: np.ndarray) -> np.ndarray:
    """The lane's outline: its left bound and its right bound reversed, each cut to the lane's stretch."""
    left, right = (_bound(markings, k, lane, path_N2)[0] for k in (lane.left, lane.right))
    return np.vstack([left, right[::-1]])


def lanelet_map(markings: list[Marking], lanes: list[Lane], path_N2: np.ndarray, to_z,
                origin_latlon: tuple[float, float]):
    """The lanes as a lanelet2 LaneletMap and the projector for its local metric frame. A bound is the whole
    marking where the lane runs along all of it (shared with the lane beside), else the lane's stretch of it."""
    import lanelet2
    from lanelet2.core import AttributeMap, Lanelet, LineString3d, Point3d, getId
    from lanelet2.io import Origin
    from lanelet2.projection import UtmProjector

    projector = UtmProjector(Origin(*origin_latlon))
    lmap = lanelet2.core.LaneletMap()
    strings = {}

    def linestring(k: int, lane: Lane) -> LineString3d:
        line, whole = _bound(markings, k, lane, path_N2)
        key = (k,) if whole else (k, lane.stations_m)
        if key not in strings:
            line = _resample(line, 1.0) if polyline_length(line) > 1 else line
            pts = [Point3d(getId(), float(x), float(y), float(to_z(x, y))) for x, y in line]
            strings[key] = LineString3d(getId(), pts, AttributeMap({"type": "line_thin",
                                                                    "subtype": markings[k].type}))
        return strings[key]

    for lane in lanes:
        ll = Lanelet(getId(), linestring(lane.left, lane), linestring(lane.right, lane),
                     AttributeMap({"type": "lanelet", "subtype": "road", "location": "urban",
                                   "one_way": "yes"}))
        lmap.add(ll)
    return lmap, projector


def write_osm(path: Path, lmap, projector) -> None:
    import lanelet2

    lanelet2.io.write(str(path), lmap, projector)


def routing_graph(osm: Path, origin_latlon: tuple[float, float]):
    """Load an OSM map as lanelet2 does, with its projector, and build the vehicle routing graph."""
    import lanelet2
    from lanelet2.io import Origin
    from lanelet2.projection import UtmProjector

    lmap = lanelet2.io.load(str(osm), UtmProjector(Origin(*origin_latlon)))
    rules = lanelet2.traffic_rules.create(lanelet2.traffic_rules.Locations.Germany,
                                          lanelet2.traffic_rules.Participants.Vehicle)
    return lmap, lanelet2.routing.RoutingGraph(lmap, rules)
