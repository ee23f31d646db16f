"""HD map: sfm's gravity-aligned model and ingest's frames -> road surface, orthomosaic, lane markings, poles,
lanes, as files that map tools load.

- Road surface (surface.py): a smooth height field along the driven corridor, fitted to the camera footprints
  and the sparse points on the ground (slope and camber, not one global plane).
- Orthomosaic (ortho.py): every map pixel lifted onto the surface and coloured from the view that samples it
  finest (nearest camera, sharpest frame), at `resolution_m` (5 cm); its pixel-to-world transform beside it.
- Lane markings (markings.py): paint by local contrast (a top-hat against the local noise: no colour is
  assumed), vectorised into world polylines, linked along their direction, typed solid or dashed from the gap
  pattern; only where the ground itself was seen (near sparse ground points), not walls projected on it, and
  only on the road: the surface that looks like the ground under the camera path and is connected to it (a
  kerb's top, a verge, a pavement are thin bright strips too, but not on the road).
- Poles (poles.py): thin vertical bars voted for over all frames at candidate feet on the surface, away from
  walls and cars (clusters of sparse points); position, height, radius.
- Lanes (lanes.py): neighbouring boundaries a lane width apart, as Lanelet2 lanelets whose bounds' subtypes
  (solid, dashed) decide whether a lane change is allowed.

Outputs in --out: hdmap.geojson (sfm's world: LineStrings `kind: lane_marking` with `type`, Points `kind: pole`
with `height` and `radius`, Polygons `kind: lane`), map.osm (Lanelet2; origin scene.yaml `geo_origin` or
`hdmap.geo_origin`), rasters.npz (channels surface (the ground seen), road (the surface
driven on), markings, poles and their world_from_pixel), surface.npz
(the height field), ortho.png + ortho.json (transform), overlay.png (the map drawn on the orthomosaic),
metrics.json (counts, timings and, where the scene has data/raw/<scene>/hdmap.geojson, the scores of
stages.hdmap.evaluate in the ground truth's frame through sfm's alignment).

A capture without a ground plane under the cameras (an object) gives empty layers and says so; a model without
metric scale gives a map in model units (metrics `metric: false`), its metre-valued params taken in units of
the camera height over `camera_height_m`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from stages.common.artifacts import METRICS, MapRasters, model_unit, read_ingest, read_sfm, write_map_rasters
from stages.common.cli import guarded, make_parser
from stages.common.errors import StageError
from stages.common.outputs import atomic_dir, write_json
from stages.common.params import load_section, require
from stages.hdmap import markings as mk
from stages.hdmap.evaluate import evaluate_map
from stages.hdmap.lanes import find_lanes, lane_polygon, lanelet_map, write_osm
from stages.hdmap.ortho import View, orthomosaic
from stages.hdmap.poles import Pole, find_poles, wall_mask
from stages.hdmap.surface import (MAX_RASTER_PIXELS, Raster, corridor_path, distance_to_path, fit_surface,
                                  ground_support, make_raster)

log = logging.getLogger("scenepipe.hdmap")

INPUTS = {"frames": "ingest output folder (frames, truth/)", "sfm": "sfm output folder (model/, alignment.json)"}
OUTPUTS = {"out": "output folder: hdmap.geojson, map.osm, rasters.npz, surface.npz, ortho.png, ortho.json, "
                  "overlay.png, metrics.json"}
# Projection and voting are numpy/OpenCV work on the CPU.
USES_GPU = False
# Pole feet are looked for outside the lanes found, by this margin (m): a pole's own width and paint wear.
LANE_MARGIN_M = 0.3


@dataclasses.dataclass(frozen=True)
class HdmapParams:
    """Params of the hdmap stage (params.yaml section `hdmap`). Lengths in metres."""

    resolution_m: float = 0.05
    """Orthomosaic and raster pixel size."""
    corridor_m: float = 12.0
    """Half-width of the mapped corridor around the camera path."""
    ahead_m: float = 25.0
    """The corridor runs on this far ahead of the last camera (forward cameras see the road there)."""
    max_view_distance_m: float = 25.0
    """A map pixel takes its colour only from cameras within this distance."""
    surface_cell_m: float = 1.0
    """Grid spacing of the road-surface height field."""
    surface_smoothness: float = 10.0
    """Weight of the height field's second differences (higher: smoother)."""
    ground_band_m: float = 0.25
    """Sparse points within this height of the surface count as ground."""
    ground_support_m: float = 1.0
    """Markings only within this distance of a ground point or camera footprint (the ground itself seen)."""
    camera_height_m: float = 1.6
    """Nominal camera height: the unit of an unscaled model's lengths (camera heights, not metres)."""
    marking_contrast: float = 4.0
    """Paint: top-hat above its local median by this many local spreads."""
    marking_width_m: tuple[float, float] = (0.05, 0.4)
    """Plausible painted line widths."""
    marking_min_length_m: float = 0.4
    """Shorter painted pieces are noise."""
    marking_max_angle_deg: float = 30.0
    """Lane markings run along the road: a marking more than this off the path's direction is dropped."""
    lone_min_length_m: float = 1.0
    """A marking of one painted piece must be at least this long (shorter blobs are texture)."""
    link_max_gap_m: float = 15.0
    """Pieces continuing one another across at most this gap form one marking (a missing dash included)."""
    solid_min_fill: float = 0.7
    """A marking painted over at least this share of its extent is solid; less, with gaps, dashed."""
    dash_max_length_m: float = 6.0
    """A lone painted piece up to this long is a dash."""
    dash_min_gap_m: float = 1.0
    """Gaps in a marking shorter than this count as painted when typing it (a dashed line's gaps are longer;
    wear and missed stretches of a solid line are short)."""
    pole_cell_m: float = 0.1
    """Spacing of the candidate pole feet."""
    pole_radius_m: float = 0.1
    """Nominal pole radius for the width of the bar looked for."""
    pole_range_m: tuple[float, float] = (2.0, 30.0)
    """A frame votes for candidates between these distances."""
    pole_min_views: int = 5
    """A pole must be seen whole by at least this many frames."""
    pole_min_score: float = 0.25
    """Share of a pole's projected samples (over its views and heights) that must land on a centred bar."""
    pole_nms_m: float = 2.0
    """Poles closer than this are one (the strongest)."""
    wall_min_length_m: float = 2.0
    """Clusters of sparse points above the ground at least this long are walls, cars, hedges: no poles there."""
    wall_margin_m: float = 1.0
    """... nor this close to them."""
    lane_width_m: tuple[float, float] = (2.5, 4.5)
    """Neighbouring boundaries this far apart bound a lane."""
    geo_origin: tuple[float, float] = (0.0, 0.0)
    """Latitude, longitude of the map's origin for the Lanelet2 export (0, 0: not geo-referenced); a scene's
    scene.yaml `geo_origin` overrides it."""

    def __post_init__(self) -> None:
        require(self, [
            (0 < self.resolution_m <= 1, "resolution_m", "must lie in (0, 1]"),
            (self.corridor_m > 0, "corridor_m", "must be positive"),
            (self.marking_width_m[0] < self.marking_width_m[1], "marking_width_m", "must be (low, high)"),
            (self.lane_width_m[0] < self.lane_width_m[1], "lane_width_m", "must be (low, high)"),
            (self.pole_min_views >= 2, "pole_min_views", "must be at least 2"),
        ])


@dataclasses.dataclass(frozen=True)
class HdmapResult:
    out_dir: Path
    metrics: dict


def _views(model, frames) -> tuple[list[View], object]:
    """The registered mapping frames in capture order, and the COLMAP model."""
    rec = model.reconstruction()
    order = {n: i for i, n in enumerate(frames.names)}
    ims = sorted((im for im in rec.images.values() if im.has_pose and im.name in order), key=lambda im: order[im.name])
    return [View(im.name, im.cam_from_world().matrix(), rec.cameras[im.camera_id]) for im in ims], rec


def geojson(markings: list[mk.Marking], poles: list[Pole], lane_polys: list[np.ndarray], to_z, frame: str) -> dict:
    feats = []
    for i, m in enumerate(markings):
        for piece in m.pieces:  # one LineString per painted piece; `marking` groups the pieces of one line
            coords = [[round(float(x), 3), round(float(y), 3), round(float(to_z(x, y)), 3)] for x, y in piece]
            feats.append({"type": "Feature", "geometry": {"type": "LineString", "coordinates": coords},
                          "properties": {"kind": "lane_marking", "type": m.type, "marking": i}})
    for p in poles:
        feats.append({"type": "Feature", "geometry": {"type": "Point", "coordinates": [p.x, p.y, p.z]},
                      "properties": {"kind": "pole", "height": round(p.height, 2), "radius": round(p.radius, 3),
                                     "score": round(p.score, 3), "views": p.views}})
    for i, poly in enumerate(lane_polys):
        ring = [[round(float(x), 3), round(float(y), 3)] for x, y in poly] + [[round(float(poly[0][0]), 3),
                                                                                 round(float(poly[0][1]), 3)]]
        feats.append({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                      "properties": {"kind": "lane", "lanelet": i}})
    return {"type": "FeatureCollection", "frame": frame, "features": feats}


def transform_geojson(gj: dict, sim3) -> dict:
    """The same features with every coordinate mapped through a Sim3 (heights and radii scaled)."""
    out = json.loads(json.dumps(gj))
    for f in out["features"]:
        g = f["geometry"]
        if g["type"] == "Point":
            g["coordinates"] = sim3.apply(np.array([g["coordinates"]]))[0].tolist()
        elif g["type"] == "LineString":
            g["coordinates"] = sim3.apply(np.array(g["coordinates"])).tolist()
        else:
            ring = np.array(g["coordinates"][0], float)
            ring = np.c_[ring, np.zeros(len(ring))] if ring.shape[1] == 2 else ring
            g["coordinates"] = [sim3.apply(ring).tolist()]
        for k in ("height", "radius"):
            if f["properties"].get(k) is not None:
                f["properties"][k] = f["properties"][k] * sim3.scale
    return out


def overlay(rgb: np.ndarray, raster: Raster, markings: list[mk.Marking], poles: list[Pole],
            lane_polys: list[np.ndarray]) -> np.ndarray:
    img = rgb[:, :, ::-1].copy()
    for poly in lane_polys:
        layer = img.copy()
        cv2.fillPoly(layer, [np.round(raster.to_pixel(poly)).astype(np.int32)], (80, 160, 80))
        img = cv2.addWeighted(layer, 0.25, img, 0.75, 0)
    for m in markings:
        colour = (0, 0, 255) if m.type == "solid" else (0, 200, 255)
        for piece in m.pieces:
            cv2.polylines(img, [np.round(raster.to_pixel(piece)).astype(np.int32)], False, colour, 2)
    for p in poles:
        c = tuple(int(v) for v in np.round(raster.to_pixel([[p.x, p.y]])[0]))
        cv2.circle(img, c, max(4, int(round(0.3 / raster.res))), (255, 0, 255), 2)
    return img


def run(params: HdmapParams, *, frames: Path, sfm: Path, out_dir: Path) -> HdmapResult:
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    fr = read_ingest(frames)
    model = read_sfm(sfm)
    views, rec = _views(model, fr)
    if len(views) < 2:
        raise StageError(f"only {len(views)} registered frame(s) in {sfm}; the map needs the sfm stage's poses "
                         "for at least 2 frames")
    settings_origin = fr.settings.geo_origin
    origin = tuple(settings_origin) if settings_origin else tuple(params.geo_origin)
    notes: list[str] = []
    metric = model.alignment.metric
    centers = np.stack([v.center for v in views])
    cam_h = float(np.median(centers[:, 2]))
    pts = np.array([p.xyz for p in rec.points3D.values()]) if rec.num_points3D() else np.zeros((0, 3))
    unit, reference = model_unit(model.alignment, centers, pts, params.camera_height_m)
    if not metric:
        notes.append(f"the map is unscaled: sfm's model is not in metres; lengths are in model units "
                     f"(1 m of params = {unit:.3g} units, from {reference})")
    forward = np.stack([v.cam_from_world[2, :3] for v in views])
    path = corridor_path(centers, forward, params.ahead_m * unit)
    raster = make_raster(path, params.corridor_m * unit, params.resolution_m * unit)
    if raster.res > params.resolution_m * unit * (1 + 1e-9):
        notes.append(f"the raster is coarsened to {raster.res / unit:.3g} m per pixel (asked "
                     f"{params.resolution_m} m) to stay within {MAX_RASTER_PIXELS:.0e} pixels")
    area = distance_to_path(raster, path) < params.corridor_m * unit
    footprints = centers - np.array([0.0, 0.0, cam_h])
    xs, ys = raster.xy()
    bounds = (raster.x0, ys[-1] - raster.res, xs[-1] + raster.res, raster.y1)
    surface, used = fit_surface(pts, footprints, bounds, params.surface_cell_m * unit, params.surface_smoothness,
                                params.ground_band_m * unit)
    seconds["surface"] = time.perf_counter() - t0
    t = time.perf_counter()
    rgb, view_idx = orthomosaic(views, fr.image_dir, raster, surface, area, params.max_view_distance_m * unit)
    seen = view_idx >= 0
    seconds["ortho"] = time.perf_counter() - t
    markings: list[mk.Marking] = []
    poles: list[Pole] = []
    lanes = []
    lane_polys: list[np.ndarray] = []
    support = np.zeros_like(seen)
    paint = np.zeros_like(seen)
    road = np.zeros_like(seen)
    if not model.alignment.ground:
        notes.append("no road: sfm found no ground plane below the cameras (an object or facade capture); the "
                     "marking, pole and lane layers are empty")
    else:
        t = time.perf_counter()
        support = ground_support(raster, np.vstack([pts[used][:, :2], footprints[:, :2]]),
                                 params.ground_support_m * unit, area) & seen
        # Walls, cars, hedges (clusters of sparse points above the ground) are neither paint nor pole feet.
        walls = wall_mask(raster, surface, pts, 0.25 * unit, params.wall_min_length_m * unit,
                          params.wall_margin_m * unit, unit)
        support &= ~walls
        paint = mk.paint_mask(rgb, support, raster, params.marking_width_m[1] * unit, params.marking_contrast)
        # Paint lies on the road: pieces on a kerb's top, a verge, a pavement or a car are not markings.
        road, fine, road_ref, road_scale = mk.road_mask(rgb, seen, paint, raster, centers[:, :2], unit)
        pieces = mk.on_road(mk.pieces_from_mask(paint, raster, tuple(w * unit for w in params.marking_width_m),
                                                params.marking_min_length_m * unit),
                            road, paint, fine, road_ref, road_scale, raster, params.marking_width_m[1] * unit, unit)
        chains = mk.along_path(mk.link(mk.orient(pieces, path), params.link_max_gap_m * unit), path,
                               params.marking_max_angle_deg, params.lone_min_length_m * unit)
        markings = [mk.Marking(c, mk.classify(c, params.solid_min_fill, params.dash_max_length_m * unit,
                                                params.dash_min_gap_m * unit))
                    for c in chains]
        seconds["markings"] = time.perf_counter() - t
        lanes = find_lanes(markings, path, tuple(w * unit for w in params.lane_width_m), unit)
        lane_polys = [lane_polygon(markings, ln, path) for ln in lanes]
        t = time.perf_counter()
        # No pole stands in a lane: the lanes found (with a small margin) are no candidate feet.
        in_lanes = np.zeros(seen.shape, np.uint8)
        for poly in lane_polys:
            cv2.fillPoly(in_lanes, [np.round(raster.to_pixel(poly)).astype(np.int32)], 1)
        r_px = max(1, int(round(LANE_MARGIN_M * unit / raster.res)))
        in_lanes = cv2.dilate(in_lanes, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r_px + 1,) * 2)) > 0
        poles = find_poles(views, fr.image_dir, raster, surface, support & ~in_lanes, params.pole_cell_m * unit,
                           params.pole_radius_m * unit, tuple(r * unit for r in params.pole_range_m),
                           params.pole_min_views, params.pole_min_score, params.pole_nms_m * unit, pts, unit)
        seconds["poles"] = time.perf_counter() - t
        for what, n in (("lane markings", len(markings)), ("poles", len(poles)), ("lanes", len(lanes))):
            if not n:
                notes.append(f"no {what} found")
    frame = "sfm's world (alignment.json): z up, ground at z = 0, " + ("metres" if metric else "model units")
    gj = geojson(markings, poles, lane_polys, surface, frame)
    metrics: dict = {"metric": metric, "markings": len(markings), "marking_pieces": sum(len(m.pieces) for m in markings),
                     "solid": sum(m.type == "solid" for m in markings),
                     "dashed": sum(m.type == "dashed" for m in markings), "poles_found": len(poles),
                     "lanes": len(lanes), "raster": {"width": raster.width, "height": raster.height,
                                                       "resolution": raster.res},
                     "seen_area_m2": float(seen.sum() * raster.res ** 2 / unit ** 2),
                     "ground_points": int(used.sum()), "geo_origin": list(origin), "notes": notes,
                     "device": "cpu"}
    truth = fr.truth("hdmap.geojson")
    gt_from_world = model.alignment.gt_from_world
    if truth is not None and gt_from_world is not None:
        observed_mask = support if support.any() else seen
        inverse = np.linalg.inv(np.vstack([np.c_[gt_from_world.scale * gt_from_world.R_33, gt_from_world.t_3],
                                           [0, 0, 0, 1]]))

        def observed(p_gt: np.ndarray) -> np.ndarray:
            p = np.asarray(p_gt, float) @ inverse[:3, :3].T + inverse[:3, 3]
            px = np.round(raster.to_pixel(p[:, :2])).astype(int)
            ok = (px[:, 0] >= 0) & (px[:, 0] < raster.width) & (px[:, 1] >= 0) & (px[:, 1] < raster.height)
            out = np.zeros(len(p), bool)
            out[ok] = observed_mask[px[ok, 1], px[ok, 0]]
            return out

        metrics["evaluation"] = "against the scene's hdmap.geojson, in its frame (sfm's ground-truth alignment), " \
                                "within the ground the cameras saw"
        metrics.update(evaluate_map(transform_geojson(gj, gt_from_world), json.loads(truth.read_text()), observed))
    t = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "hdmap.geojson", gj)
        lmap, projector = lanelet_map(markings, lanes, path, surface, origin)
        write_osm(tmp / "map.osm", lmap, projector)
        pole_layer = np.zeros(seen.shape, np.uint8)
        for p in poles:
            c = tuple(int(v) for v in np.round(raster.to_pixel([[p.x, p.y]])[0]))
            cv2.circle(pole_layer, c, max(1, int(round(max(p.radius, 0.1) / raster.res))), 1, -1)
        layers = np.stack([support, road, paint, pole_layer > 0]).astype(np.uint8)
        write_map_rasters(tmp / "rasters.npz", MapRasters(layers, ["surface", "road", "markings", "poles"],
                                                          raster.world_from_pixel()))
        np.savez_compressed(tmp / "surface.npz", z=surface.z, x0=surface.x0, y0=surface.y0, cell=surface.cell)
        cv2.imwrite(str(tmp / "ortho.png"), rgb[:, :, ::-1])
        write_json(tmp / "ortho.json", {**raster.to_json(), "frame": frame})
        cv2.imwrite(str(tmp / "overlay.png"), overlay(rgb, raster, markings, poles, lane_polys))
        seconds["write"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t0
        metrics["seconds"] = round(seconds["total"], 2)
        metrics["seconds_per_phase"] = {k: round(v, 2) for k, v in seconds.items()}
        write_json(tmp / METRICS, metrics)
    log.info("%d markings (%d solid), %d poles, %d lanes in %.1f s%s", len(markings), metrics["solid"], len(poles),
             len(lanes), seconds["total"], "".join(f"; {n}" for n in notes))
    return HdmapResult(Path(out_dir), metrics)


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m stages.hdmap --params params.yaml --frames data/ingest/S --sfm data/sfm/S --out data/hdmap/S."""
    args = make_parser("hdmap", __doc__, INPUTS, OUTPUTS).parse_args(argv)
    return guarded("hdmap", lambda: run(load_section(args.params, "hdmap", HdmapParams), frames=Path(args.frames),
                                        sfm=Path(args.sfm), out_dir=Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())
