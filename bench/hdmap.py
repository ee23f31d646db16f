"""Benchmark: the hdmap stage on the default street, the turning street and kitti06 (issue 8's targets).

Each scene's inputs are made as bench/sfm.py makes them (synth, then ingest; or ingest of
../shared/data/real/<scene>), then the sfm and hdmap stages run with params.yaml. Per scene: the stage's own
metrics (marking precision / recall / F1 against the scene's map, solid/dashed accuracy, pole precision /
recall / RMSE / height error, lanes), the hdmap stage's seconds on this machine, and the targets: marking F1
and solid/dashed accuracy >= 0.9, pole precision and recall >= 0.9 with RMSE <= 0.3 m, <= 120 s. kitti06 has no
map ground truth: its overlay is written to bench/results/hdmap_kitti06_overlay.jpg to be looked at.

Writes bench/results/hdmap.json; a run of some scenes keeps the other scenes' earlier rows (each row has its
own date). `--seeds 1 2` also scores the synthetic scenes rendered with those synth seeds (other streets of
the same kind), as `street@seed1` and so on: a check that a change helps streets other than the visible ones.
`--keep DIR --reuse` runs only the hdmap stage where DIR holds an earlier --keep run's ingest and sfm outputs.
Usage: `python bench/hdmap.py [--scenes street synth_turn kitti06] [--seeds N ...] [--keep DIR [--reuse]]`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import sfm as bench_sfm  # noqa: E402  (bench/sfm.py: the scenes' inputs)

from stages.common.cli import setup_logging  # noqa: E402
from stages.common.params import load_section  # noqa: E402
from stages.hdmap import HdmapParams  # noqa: E402
from stages.hdmap import run as hdmap_run  # noqa: E402
from stages.sfm import SfmParams  # noqa: E402
from stages.sfm import run as sfm_run  # noqa: E402

PARAMS = ROOT / "params.yaml"
RESULT = ROOT / "bench/results/hdmap.json"
SCENES = ("street", "synth_turn", "kitti06")
KEYS = ("marking_f1", "marking_precision", "marking_recall", "marking_mean_distance_m", "dash_type_accuracy",
        "pole_precision", "pole_recall", "pole_rmse_m", "pole_height_error_m", "truth_marking_m", "truth_poles",
        "markings", "solid", "dashed", "poles_found", "lanes", "metric", "notes", "seconds", "seconds_per_phase")
TARGETS = {"marking_f1": (">=", 0.9), "dash_type_accuracy": (">=", 0.9), "pole_precision": (">=", 0.9),
           "pole_recall": (">=", 0.9), "pole_rmse_m": ("<=", 0.3), "seconds": ("<=", 120.0)}


def bench_scene(scene: str, tmp: Path, seed: int | None = None, reuse: bool = False) -> dict:
    kept_ingest, kept_sfm = tmp / "ingest" / scene, tmp / "sfm" / scene
    if reuse and (kept_ingest / "manifest.csv").is_file() and (kept_sfm / "metrics.json").is_file():
        ingest_dir, sfm_seconds = kept_ingest, None
        sfm_metrics = json.loads((kept_sfm / "metrics.json").read_text())
    else:
        made = bench_sfm.make_inputs(scene, tmp, seed)
        if isinstance(made, str):
            return {"skipped": made}
        ingest_dir, _ = made
        t0 = time.perf_counter()
        sfm_metrics = sfm_run(load_section(PARAMS, "sfm", SfmParams), frames=ingest_dir, out_dir=kept_sfm).metrics
        sfm_seconds = round(time.perf_counter() - t0, 1)
    res = hdmap_run(load_section(PARAMS, "hdmap", HdmapParams), frames=ingest_dir, sfm=tmp / "sfm" / scene,
                    out_dir=tmp / "hdmap" / scene)
    out = {"sfm_gate_passed": sfm_metrics["gate_passed"], "sfm_seconds": sfm_seconds,
           "sfm_reused": sfm_seconds is None,
           **{k: res.metrics.get(k) for k in KEYS}}
    out["targets"] = {}
    for key, (op, limit) in TARGETS.items():
        v = out.get(key)
        met = None if v is None else (v >= limit if op == ">=" else v <= limit)
        out["targets"][key] = {"target": f"{op} {limit}", "measured": v, "met": met}
    if scene == "kitti06" and seed is None:
        img = cv2.imread(str(res.out_dir / "overlay.png"))
        cv2.imwrite(str(ROOT / "bench/results/hdmap_kitti06_overlay.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/hdmap.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", nargs="+", default=list(SCENES), choices=SCENES)
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="write each scene's ingest, sfm and hdmap outputs under DIR (kept) instead of a temporary folder")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="N",
                        help="also render the synthetic scenes with these synth seeds (other streets of the same kind: "
                             "other buildings, poles, textures), scored as `<scene>@seedN`; real scenes are not repeated")
    parser.add_argument("--reuse", action="store_true",
                        help="with --keep: where DIR already holds a scene's ingest and sfm outputs (an earlier --keep "
                             "run), run only the hdmap stage on them (sfm_seconds is then null)")
    args = parser.parse_args(argv)
    if args.reuse and not args.keep:
        parser.error("--reuse needs --keep DIR")
    setup_logging()
    earlier = json.loads(RESULT.read_text()).get("scenes", {}) if RESULT.is_file() else {}
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "cpu_count": os.cpu_count(), "scenes": earlier}
    with tempfile.TemporaryDirectory(prefix="bench_hdmap_") as tmp_dir:
        tmp = args.keep or tmp_dir
        runs = [(scene, None) for scene in args.scenes] + [
            (scene, seed) for seed in args.seeds or [] for scene in args.scenes if scene in bench_sfm.SYNTH_SCENES]
        for scene, seed in runs:
            key = scene if seed is None else f"{scene}@seed{seed}"
            print(f"[{key}] ...", flush=True)
            work = Path(tmp) if seed is None else Path(tmp) / f"seed{seed}"
            results["scenes"][key] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                      **bench_scene(scene, work, seed, args.reuse)}
            RESULT.write_text(json.dumps(bench_sfm._plain(results), indent=2) + "\n")
            r = results["scenes"][key]
            print(f"[{key}] " + ", ".join(f"{k} {v['measured']!s:.6} ({'met' if v['met'] else 'NOT met' if v['met'] is False else '-'})"
                                            for k, v in r.get("targets", {}).items()), flush=True)
    print(f"wrote {RESULT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
