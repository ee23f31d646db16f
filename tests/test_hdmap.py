"""The hdmap stage: maps of synthetic streets against their exact ground truth, the evaluation on hand-made
cases, the Lanelet2 export and its routing graph, a capture with no road, kitti06."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from stages import hdmap
from stages.common.artifacts import read_map_rasters
from stages.hdmap import lanes as ln
from stages.hdmap.evaluate import evaluate_map
from stages.hdmap import markings as mk
from stages.hdmap.markings import Marking
from stages.hdmap.ortho import View
from stages.hdmap.poles import BAR_HALF_WIDTHS, POLE_SAMPLE_HEIGHTS, _vote, bar_responses
from stages.hdmap.surface import Raster
from stages.ingest import IngestParams
from stages.ingest import run as ingest_run
from stages.sfm import SfmParams
from stages.sfm import run as sfm_run
from stages.synth import SynthParams
from stages.synth import run as synth_run
from tests.conftest import real_scene

# A street seen at the default scene's resolution (paint is 3 px wide at 5 cm), short enough for the suite.
STREET = dict(n_frames=30, n_queries=0, output="images", n_points=20_000)


def _pipeline(root: Path, **synth) -> tuple[Path, Path]:
    synth_run(SynthParams(**{**STREET, **synth}), out_dir=root / "raw")
    ingest_run(IngestParams(query_every=0), scene_dir=root / "raw", out_dir=root / "frames")
    sfm_run(SfmParams(), frames=root / "frames", out_dir=root / "sfm")
    return root / "frames", root / "sfm"


@pytest.fixture(scope="module")
def straight_map(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    frames, sfm = _pipeline(root)
    return hdmap.run(hdmap.HdmapParams(), frames=frames, sfm=sfm, out_dir=root / "hdmap")


def test_straight_street_markings_types_poles_and_lanes_against_ground_truth(straight_map):
    m = straight_map.metrics
    assert m["metric"] is True and m["truth_marking_m"] > 50
    assert m["marking_f1"] >= 0.85 and m["marking_mean_distance_m"] < 0.1
    assert m["dash_type_accuracy"] >= 0.9
    assert m["pole_recall"] >= 0.5 and m["pole_precision"] >= 0.6 and m["pole_rmse_m"] < 0.3
    assert m["lanes"] == 2 and m["solid"] >= 2 and m["dashed"] >= 1


def test_paint_on_the_road_is_kept_and_a_kerb_a_verge_or_a_strip_between_shadows_is_not():
    """A road (rows 0-140) driven along row 25, a granite kerb (141-146) and a grass verge beyond; thin bright strips
    on each: a centre line and an edge line 0.2 m from the kerb are paint; the kerb's top, a bright strip on the
    verge and a sunlit strip of asphalt between two shadows (thin and bright against them) are not."""
    rng = np.random.default_rng(0)
    h, w = 200, 400
    grey = np.full((h, w), 90.0) + rng.normal(0, 5, (h, w))
    grey[141:147] = 150 + rng.normal(0, 5, (6, w))  # kerb stone
    grey[147:] = 110 + rng.normal(0, 25, (h - 147, w))  # grass: brighter, strongly textured
    grey[85:115, 100:300] = 40 + rng.normal(0, 3, (30, 200))  # a shadow across part of the road ...
    grey[99:102, 100:300] = 90 + rng.normal(0, 5, (3, 200))  # ... with a sunlit gap through it
    strips = {"centre line": 50, "edge line": 135, "kerb top": 143, "verge strip": 175, "sunlit gap": 100}
    for name, row in strips.items():
        if name not in ("kerb top", "sunlit gap"):
            grey[row - 1:row + 2, 60:340] = 200
    grey[142:145, 60:340] = 185  # the kerb's top catches the light
    rgb = np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    raster = Raster(x0=0.0, y1=10.0, res=0.05, width=w, height=h)
    paint = np.zeros((h, w), bool)
    for row in strips.values():
        paint[row - 1:row + 2, 60:340] = True
    seen = np.ones((h, w), bool)
    M = raster.world_from_pixel()
    to_world = lambda cr: np.asarray(cr, float) @ M[:2, :2].T + M[:2, 2]  # noqa: E731
    track = to_world([[0, 25], [w - 1, 25]])
    road, fine, ref, scale = mk.road_mask(rgb, seen, paint, raster, track)
    assert road[:135].mean() > 0.95 and road[150:].mean() < 0.05
    pieces = {name: to_world([[80, row], [320, row]]) for name, row in strips.items()}
    kept = mk.on_road(list(pieces.values()), road, paint, fine, ref, scale, raster, max_width=0.4)
    kept_names = {name for name, p in pieces.items() if any(p is k for k in kept)}
    assert kept_names == {"centre line", "edge line"}


def test_a_solid_line_broken_by_short_gaps_is_solid_and_dashes_are_dashed():
    def chain(spans):
        return [np.array([[a, 0.0], [b, 0.0]]) for a, b in spans]

    broken = chain([(0, 1.5), (2, 3.5), (4, 5.5), (6, 7.5), (10, 12)])  # painted 8 of 12 m, three 0.5 m gaps
    dashes = chain([(0, 3), (8, 11), (16, 19)])
    assert mk.classify(broken, 0.7, 6.0, dash_min_gap_m=1.0) == "solid"
    assert mk.classify(broken, 0.7, 6.0, dash_min_gap_m=0.0) == "dashed"  # the fill alone says dashed
    assert mk.classify(dashes, 0.7, 6.0, dash_min_gap_m=1.0) == "dashed"


def test_a_bar_of_another_colour_but_the_same_brightness_is_a_bar_and_an_edge_is_not():
    rng = np.random.default_rng(0)
    img = np.zeros((120, 200, 3), np.float32)
    img[:] = (60, 160, 90)  # green wall (BGR)
    grey = float(cv2.cvtColor(img[:1, :1], cv2.COLOR_BGR2GRAY)[0, 0])
    img[:, 97:104] = grey  # a grey pole 7 px wide (half-width 3) of the wall's own brightness
    img[:, 150:] = (160, 60, 90)  # an edge to a purple wall
    img += rng.normal(0, 2, img.shape).astype(np.float32)
    bars = bar_responses(np.clip(img, 0, 255).astype(np.uint8))
    level = BAR_HALF_WIDTHS.index(3)
    assert bars[level, 20:100, 100].mean() > 0.95  # the pole's centre, all the way up
    assert bars[level, 20:100, 145:156].max() == 0  # nothing at the edge
    # the same image in grey: the pole is invisible (why the response is computed in colour)
    gray = cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_BGR2GRAY)
    assert bar_responses(gray)[level, 20:100, 100].mean() < 0.5


def test_a_ghost_behind_a_pole_on_the_same_ray_fails_the_foot_test():
    """One view of a pole: a cell 3 m behind it on the same viewing ray projects its whole sampled segment onto
    the pole's bar too, so the bar alone cannot tell them apart; the pole standing in front of the ghost's foot
    can."""
    import pycolmap

    cam = pycolmap.Camera(model="PINHOLE", width=480, height=320, params=[300.0, 300.0, 240.0, 160.0])
    R = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, -1.0], [1.0, 0.0, 0.0]])  # looks along +x, z up
    C = np.array([0.0, 0.0, 1.6])
    view = View("v", np.c_[R, -R @ C], cam)
    pole, radius = np.array([12.0, 4.0, 0.0]), 0.12
    ray = (pole[:2] - C[:2]) / np.linalg.norm(pole[:2] - C[:2])
    ghost = np.r_[pole[:2] + 3.0 * ray, 0.0]
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(120, 6, (320, 480, 3)), 0, 255).astype(np.uint8)
    (u0, v0), (u1, v1) = view.project(np.array([pole, pole + [0, 0, 6.0]]))[0]
    half = radius * 300.0 / np.linalg.norm(pole[:2] - C[:2])
    img[int(v1):int(round(v0)) + 1, int(round(u0 - half)):int(round(u0 + half)) + 1] = (200, 200, 200)
    bars = bar_responses(img)
    total, count, _ = _vote([view], [bars], np.stack([pole, ghost]), POLE_SAMPLE_HEIGHTS, (radius,), (2.0, 30.0))
    assert count.tolist() == [1, 1]
    assert total[0, 0] > 0.8 and total[0, 1] < 0.3


def test_outputs_load_and_agree(straight_map):
    out = straight_map.out_dir
    gj = json.loads((out / "hdmap.geojson").read_text())
    kinds = {f["properties"]["kind"] for f in gj["features"]}
    assert kinds == {"lane_marking", "pole", "lane"}
    rasters = read_map_rasters(out)
    assert rasters.names == ["surface", "road", "markings", "poles"] and rasters.channels.dtype == np.uint8
    ortho = cv2.imread(str(out / "ortho.png"))
    assert ortho.shape[:2] == rasters.channels.shape[1:]
    info = json.loads((out / "ortho.json").read_text())
    assert np.allclose(info["world_from_pixel"], rasters.world_from_pixel)
    # every marking vertex lies on painted pixels of the markings channel (within a pixel or two)
    inv = np.linalg.inv(rasters.world_from_pixel)
    paint = cv2.dilate(rasters.channel("markings"), np.ones((5, 5), np.uint8))
    for f in gj["features"]:
        if f["properties"]["kind"] == "lane_marking":
            for x, y, _ in f["geometry"]["coordinates"]:
                col, row, _ = inv @ [x, y, 1]
                assert paint[int(round(row)), int(round(col))]
    # the road surface of this flat street (kerbs 0.15 m up, extrapolated at the corners): near z = 0
    surface = np.load(out / "surface.npz")
    assert np.median(np.abs(surface["z"])) < 0.05 and np.abs(surface["z"]).max() < 0.5


def test_lanelet2_loads_the_map_and_routes_a_lane_change_across_the_dashed_line(straight_map):
    lmap, graph = ln.routing_graph(straight_map.out_dir / "map.osm", (0.0, 0.0))
    lanelets = list(lmap.laneletLayer)
    assert len(lanelets) == 2
    a, b = lanelets
    # the two lanes share the dashed centre line: a lane change either way
    assert graph.right(a) == b or graph.left(a) == b
    assert {a.leftBound.attributes["subtype"], a.rightBound.attributes["subtype"]} == {"solid", "dashed"}


def _boundary(y: float, kind: str) -> Marking:
    xs = np.arange(0.0, 60.0, 8.0) if kind == "dashed" else np.array([0.0])
    length = 3.0 if kind == "dashed" else 60.0
    return Marking([np.array([[x, y], [x + length, y]]) for x in xs], kind)


@pytest.mark.parametrize("middle, change", [("dashed", True), ("solid", False)])
def test_routing_graph_allows_a_lane_change_across_dashed_and_not_across_solid(tmp_path, middle, change):
    markings = [_boundary(3.5, "solid"), _boundary(0.0, middle), _boundary(-3.5, "solid")]
    path = np.array([[0.0, -1.75], [60.0, -1.75]])
    lanes = ln.find_lanes(markings, path, (2.5, 4.5))
    assert sorted((x.left, x.right) for x in lanes) == [(0, 1), (1, 2)]
    lmap, projector = ln.lanelet_map(markings, lanes, path, lambda x, y: 0.0, (49.0, 8.4))
    ln.write_osm(tmp_path / "map.osm", lmap, projector)
    loaded, graph = ln.routing_graph(tmp_path / "map.osm", (49.0, 8.4))
    left_lane, right_lane = sorted(loaded.laneletLayer, key=lambda ll: -ll.centerline[0].y)
    assert (graph.right(left_lane) is not None) == change
    assert (graph.left(right_lane) is not None) == change


def test_lanes_need_parallel_bounds_and_end_where_a_bound_ends():
    path = np.array([[0.0, -1.75], [60.0, -1.75]])
    edge, centre = _boundary(-3.5, "solid"), _boundary(0.0, "dashed")
    # stray paint beyond the edge line, 5 m long and at an angle (3.3 to 4.8 m from it): no lane
    stray = Marking([np.array([[50.0, -6.8], [55.0, -8.3]])], "dashed")
    # a short parallel marking 3.5 m beyond the edge over x 40..52: a lane there, and only there
    short = Marking([np.array([[40.0, -7.0], [52.0, -7.0]])], "solid")
    lanes = ln.find_lanes([centre, edge, stray], path, (2.5, 4.5))
    assert [(x.left, x.right) for x in lanes] == [(0, 1)]
    lanes = ln.find_lanes([centre, edge, short], path, (2.5, 4.5))
    assert sorted((x.left, x.right) for x in lanes) == [(0, 1), (1, 2)]
    outer = next(x for x in lanes if x.right == 2)
    poly = ln.lane_polygon([centre, edge, short], outer, path)
    assert 38.0 <= poly[:, 0].min() and poly[:, 0].max() <= 54.0  # not the edge line's whole 60 m


def _fc(features: list) -> dict:
    return {"type": "FeatureCollection", "features": features}


def _line(coords, kind="solid") -> dict:
    return {"type": "Feature", "geometry": {"type": "LineString", "coordinates": coords},
            "properties": {"kind": "lane_marking", "type": kind}}


def _pole(x, y, h=5.0, r=0.1) -> dict:
    return {"type": "Feature", "geometry": {"type": "Point", "coordinates": [x, y, 0.0]},
            "properties": {"kind": "pole", "height": h, "radius": r}}


TRUTH = _fc([_line([[0, 3, 0], [40, 3, 0]])] + [_line([[x, 0, 0], [x + 3, 0, 0]], "dashed") for x in range(0, 40, 8)]
            + [_pole(5, 5), _pole(25, 5, 7.0)])


def test_evaluation_of_a_perfect_map_and_of_hand_made_errors():
    perfect = evaluate_map(copy.deepcopy(TRUTH), TRUTH)
    assert perfect["marking_f1"] == 1.0 and perfect["dash_type_accuracy"] == 1.0
    assert perfect["pole_precision"] == perfect["pole_recall"] == 1.0 and perfect["pole_rmse_m"] == 0.0

    shifted = copy.deepcopy(TRUTH)  # the solid line 0.3 m off: beyond the 0.2 m match radius
    shifted["features"][0]["geometry"]["coordinates"] = [[0, 3.3, 0], [40, 3.3, 0]]
    s = evaluate_map(shifted, TRUTH)
    solid_share = 40 / (40 + 5 * 3)
    assert s["marking_precision"] == pytest.approx(1 - solid_share, abs=0.01)
    assert s["marking_recall"] == pytest.approx(1 - solid_share, abs=0.01)
    near = copy.deepcopy(TRUTH)  # 0.1 m off: matched, at that mean distance
    near["features"][0]["geometry"]["coordinates"] = [[0, 3.1, 0], [40, 3.1, 0]]
    assert evaluate_map(near, TRUTH)["marking_f1"] == 1.0
    assert evaluate_map(near, TRUTH)["marking_mean_distance_m"] == pytest.approx(0.1 * solid_share, abs=0.005)

    missing = copy.deepcopy(TRUTH)  # one dash left out: recall loses its 3 m, precision nothing
    del missing["features"][3]
    mi = evaluate_map(missing, TRUTH)
    assert mi["marking_precision"] == 1.0
    assert mi["marking_recall"] == pytest.approx(1 - 3.0 / 55.0, abs=0.01)

    retyped = copy.deepcopy(TRUTH)  # dashes called solid
    for f in retyped["features"][1:6]:
        f["properties"]["type"] = "solid"
    assert evaluate_map(retyped, TRUTH)["dash_type_accuracy"] == pytest.approx(solid_share, abs=0.01)

    spurious = _fc(TRUTH["features"] + [_pole(15, -4)])  # a pole where there is none
    sp = evaluate_map(spurious, TRUTH)
    assert sp["pole_precision"] == pytest.approx(2 / 3) and sp["pole_recall"] == 1.0
    moved = copy.deepcopy(TRUTH)  # one pole 0.3 m off (matched), one 0.8 m off (not)
    moved["features"][-2]["geometry"]["coordinates"] = [5.3, 5, 0]
    moved["features"][-1]["geometry"]["coordinates"] = [25.8, 5, 0]
    mv = evaluate_map(moved, TRUTH)
    assert mv["pole_recall"] == 0.5 and mv["pole_rmse_m"] == pytest.approx(0.3)

    seen_half = evaluate_map(copy.deepcopy(TRUTH), TRUTH, observed=lambda p: np.asarray(p)[:, 0] < 20)
    assert seen_half["truth_poles"] == 1 and seen_half["truth_marking_m"] < 0.6 * perfect["truth_marking_m"]


def test_a_capture_without_a_road_gives_empty_layers_and_says_why(straight_map, tmp_path):
    # The same frames and model, but sfm found no ground under the cameras (as for an object capture).
    import shutil

    sfm = tmp_path / "sfm"
    shutil.copytree(straight_map.out_dir.parent / "sfm", sfm)
    align = json.loads((sfm / "alignment.json").read_text())
    (sfm / "alignment.json").write_text(json.dumps({**align, "ground": False}))
    res = hdmap.run(hdmap.HdmapParams(), frames=straight_map.out_dir.parent / "frames", sfm=sfm,
                    out_dir=tmp_path / "out")
    assert res.metrics["markings"] == res.metrics["poles_found"] == res.metrics["lanes"] == 0
    assert any("no road" in n for n in res.metrics["notes"])
    assert (tmp_path / "out/overlay.png").is_file() and (tmp_path / "out/map.osm").is_file()


def test_missing_sfm_output_is_one_clear_line(tmp_path, capsys, drive_frames):
    from tests.conftest import ROOT

    assert hdmap.main(["--frames", str(drive_frames), "--sfm", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                       "--params", str(ROOT / "params.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run the sfm stage" in err[0] and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_turning_street_map(tmp_path):
    frames, sfm = _pipeline(tmp_path, road="junction", n_frames=40)
    m = hdmap.run(hdmap.HdmapParams(), frames=frames, sfm=sfm, out_dir=tmp_path / "hdmap").metrics
    assert m["marking_f1"] >= 0.8 and m["dash_type_accuracy"] >= 0.85
    assert m["lanes"] >= 1


@pytest.mark.slow
def test_kitti06_runs_and_draws_its_overlay(tmp_path):
    ingest_run(IngestParams(), scene_dir=real_scene("kitti06"), out_dir=tmp_path / "frames")
    sfm_run(SfmParams(), frames=tmp_path / "frames", out_dir=tmp_path / "sfm")
    res = hdmap.run(hdmap.HdmapParams(), frames=tmp_path / "frames", sfm=tmp_path / "sfm", out_dir=tmp_path / "map")
    assert cv2.imread(str(res.out_dir / "overlay.png")) is not None
    assert res.metrics["poles_found"] >= 1


def test_raster_is_coarsened_rather_than_allocated_beyond_its_pixel_bound():
    from stages.hdmap.surface import MAX_RASTER_PIXELS, make_raster

    path = np.array([[0.0, 0.0], [100.0, 0.0]])
    assert make_raster(path, 10.0, 0.05).res == 0.05  # 2400 x 400 px: as asked
    huge = make_raster(path, 10.0, 1e-7)  # an unscaled model whose unit came out tiny
    assert huge.width * huge.height <= 1.01 * MAX_RASTER_PIXELS and huge.res > 1e-7
