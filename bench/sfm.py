"""Benchmark (issue 3): the sfm stage against plain pycolmap on the default scene, kitti06 and fox.

Each scene's inputs are made here, in a temporary folder, with the project's params.yaml: the default scene
(`street`) by `synth` then `ingest`, the real scenes by `ingest` of ../shared/data/real/<scene> (a scene
whose folder is absent is skipped with the reason). Then, in this one process and on the same mapping
frames:
(a) ours: `stages.sfm.run` with params.yaml's `sfm` section, timed end to end;
(b) baseline: what a user writes first with plain pycolmap and default options (extract_features, which gives
    each image its own SIMPLE_RADIAL camera with a focal guess, no known intrinsics; match_exhaustive;
    incremental_mapping), keeping the model with the most registered images.
Both are evaluated by the same code: registered mapping frames / mapping frames, mean reprojection error,
and pose errors against the manifest's ground truth after a Sim3 alignment (stages.common.align). Ours is
reported from the stage's metrics and re-evaluated here from its written model as a cross-check.

Writes bench/results/sfm.json and prints a table.
Usage: `python bench/sfm.py [--scenes street kitti06 fox] [--skip-baseline]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pycolmap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.common.align import pose_errors  # noqa: E402
from stages.common.cli import setup_logging  # noqa: E402
from stages.common.geometry import R_from_quat_wxyz  # noqa: E402
from stages.common.params import load_section  # noqa: E402
from stages.ingest import IngestParams  # noqa: E402
from stages.ingest import run as ingest_run  # noqa: E402
from stages.sfm import SfmParams  # noqa: E402
from stages.sfm import run as sfm_run  # noqa: E402
from stages.synth import SynthParams  # noqa: E402
from stages.synth import run as synth_run  # noqa: E402

PARAMS = ROOT / "params.yaml"
REAL_DIR = ROOT.parent / "shared/data/real"
RESULT = ROOT / "bench/results/sfm.json"
SCENES = ("street", "kitti06", "fox")
SYNTH_SCENES = ("street",)
# Numbers the stage reports and the benchmark recomputes from the stage's model.
CROSSCHECKED = ("registered_ratio", "reprojection_error_px", "rotation_error_deg_median",
                "rotation_error_deg_max", "position_error_median", "position_error_pct_median", "ate_rmse")
CROSSCHECK_TOL = 1e-6
# Issue 3's targets for ours, by scene kind.
STREET_ROT_DEG, STREET_POS_PCT, STREET_TIME_RATIO = 0.1, 0.3, 1 / 3
REAL_REGISTERED, REAL_ROT_DEG = 0.95, 0.2


# ------------------------------------------------------------------------------------------- inputs


def make_inputs(scene: str, tmp: Path) -> Path | str:
    """Ingest `scene` into tmp/ingest/<scene> (rendering it first if synthetic); a reason string if absent."""
    ingest_params = load_section(PARAMS, "ingest", IngestParams)
    if scene in SYNTH_SCENES:
        scene_dir = tmp / "raw" / scene
        synth_run(load_section(PARAMS, "synth", SynthParams), out_dir=scene_dir)
    else:
        scene_dir = REAL_DIR / scene
        if not scene_dir.is_dir():
            return f"scene folder {scene_dir} is absent"
    return ingest_run(ingest_params, scene_dir=scene_dir, out_dir=tmp / "ingest" / scene).out_dir


def mapping_frames(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest's mapping rows."""
    return manifest[manifest["split"] == "mapping"]


def ground_truth(manifest: pd.DataFrame) -> dict[str, np.ndarray]:
    """Ground-truth cam_from_world (3x4) of each mapping frame that has one, by manifest name."""
    rows = mapping_frames(manifest)
    q_N4 = rows[["gt_qw", "gt_qx", "gt_qy", "gt_qz"]].to_numpy(float)
    t_N3 = rows[["gt_tx", "gt_ty", "gt_tz"]].to_numpy(float)
    return {name: np.concatenate([R_from_quat_wxyz(q), t[:, None]], axis=1)
            for name, q, t in zip(rows["name"], q_N4, t_N3) if np.isfinite(q).all() and np.isfinite(t).all()}


# --------------------------------------------------------------------------------------- evaluation


def manifest_name(image_name: str, names: set[str]) -> str | None:
    """The manifest name of a model image named relative to the ingest folder or to its images/."""
    for candidate in (image_name, f"images/{image_name}"):
        if candidate in names:
            return candidate
    return None


def evaluate(rec: pycolmap.Reconstruction, manifest: pd.DataFrame) -> dict:
    """Registered ratio, reprojection error and Sim3-aligned pose errors of a model's mapping frames."""
    order = {name: i for i, name in enumerate(mapping_frames(manifest)["name"])}
    names = set(order)
    gt = ground_truth(manifest)
    est_by_name = {}
    for image_id in rec.reg_image_ids():
        image = rec.image(image_id)
        name = manifest_name(image.name, names)
        if name is not None:  # else a query frame or a file the manifest does not know: not a mapping frame
            est_by_name[name] = image.cam_from_world().matrix()
    registered = len(est_by_name)
    # Frame order, not the model's image order: pose_errors measures the trajectory length along the list.
    evaluated = sorted((name for name in est_by_name if name in gt), key=order.__getitem__)
    est = [est_by_name[name] for name in evaluated]
    ref = [gt[name] for name in evaluated]
    out = {
        "registered": registered,
        "registered_ratio": registered / len(names) if names else math.nan,
        "reprojection_error_px": float(rec.compute_mean_reprojection_error()),
        "points3D": rec.num_points3D(),
        "cameras": rec.num_cameras(),
        "evaluated_images": len(est),
    }
    if len(est) >= 2:
        errors = pose_errors(est, ref)
        out.update({k: v for k, v in errors.items() if not k.startswith("per_image")})
    else:
        out["pose_errors_skipped"] = f"{len(est)} registered mapping frame(s) with ground truth; a Sim3 needs 2"
    return out


def no_model(n_frames: int, reason: str) -> dict:
    """The evaluation of a run that produced no model."""
    return {"registered": 0, "registered_ratio": 0.0 if n_frames else math.nan, "no_model": reason}


# ------------------------------------------------------------------------------------------- the runs


def run_ours(ingest_dir: Path, out_dir: Path, manifest: pd.DataFrame) -> dict:
    """Run the sfm stage, time it, report its metrics and cross-check them against this benchmark's."""
    params = load_section(PARAMS, "sfm", SfmParams)
    t0 = time.perf_counter()
    result = sfm_run(params, frames=ingest_dir, out_dir=out_dir)
    seconds = time.perf_counter() - t0
    metrics = dict(result.metrics)
    ours = {"seconds": seconds, "stage_seconds": metrics.get("seconds"),
            **{k: metrics.get(k) for k in CROSSCHECKED},
            **{k: metrics[k] for k in ("position_error_max", "ate_rmse_pct", "trajectory_length") if k in metrics},
            "models": metrics.get("models", 1), "attempts": metrics.get("attempts")}
    mine = evaluate(pycolmap.Reconstruction(out_dir / "model"), manifest)
    disagree = {k: {"stage": metrics.get(k), "bench": mine.get(k)} for k in CROSSCHECKED
                if not _close(metrics.get(k), mine.get(k))}
    ours["crosscheck"] = {"agrees": not disagree, "tolerance": CROSSCHECK_TOL, "disagreements": disagree,
                          "bench": mine}
    return ours


def _close(a: float | None, b: float | None) -> bool:
    """Whether two reported numbers agree within CROSSCHECK_TOL (both missing or both NaN counts as agreeing)."""
    if a is None or b is None:
        return a is None and b is None
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= CROSSCHECK_TOL


def run_baseline(ingest_dir: Path, work: Path, manifest: pd.DataFrame) -> dict:
    """Plain pycolmap with default options on the mapping frames; the largest model, evaluated."""
    image_dir = ingest_dir / "images"
    image_names = [n.removeprefix("images/") for n in mapping_frames(manifest)["name"]]
    work.mkdir(parents=True)
    database, sparse = work / "database.db", work / "sparse"
    sparse.mkdir()
    t0 = time.perf_counter()
    pycolmap.extract_features(database, image_dir, image_names=image_names)
    t1 = time.perf_counter()
    pycolmap.match_exhaustive(database)
    t2 = time.perf_counter()
    models = pycolmap.incremental_mapping(database, image_dir, sparse)
    t3 = time.perf_counter()
    timing = {"seconds": t3 - t0, "seconds_extract": t1 - t0, "seconds_match": t2 - t1, "seconds_map": t3 - t2,
              "models": len(models)}
    if not models:
        return {**timing, **no_model(len(image_names), "incremental_mapping returned no model")}
    largest = max(models.values(), key=lambda rec: rec.num_reg_images())
    return {**timing, **evaluate(largest, manifest)}


# ------------------------------------------------------------------------------------------- targets


def _target(target: str, measured: float | None, met: bool | None) -> dict:
    """One target: what it asks, what was measured, and whether it was met (None: not measured)."""
    if measured is None or (isinstance(measured, float) and math.isnan(measured)):
        met = None if met is None else False
    return {"target": target, "measured": measured, "met": met}


def _at_most(value: float | None, limit: float) -> bool:
    """value <= limit, False when missing or NaN."""
    return value is not None and not math.isnan(value) and value <= limit


def targets(scene: str, ours: dict, time_ratio: float | None) -> dict:
    """Issue 3's targets for ours on `scene`, each with its measured figure."""
    rot = ours.get("rotation_error_deg_median")
    reg = ours.get("registered_ratio")
    if scene in SYNTH_SCENES:
        pos = ours.get("position_error_pct_median")
        return {
            "every_frame_registered": _target("registered_ratio == 1", reg, reg is not None and reg >= 1.0),
            "rotation_error_deg_median": _target(f"<= {STREET_ROT_DEG}", rot, _at_most(rot, STREET_ROT_DEG)),
            "position_error_pct_median": _target(f"<= {STREET_POS_PCT} (% of trajectory length)", pos,
                                                 _at_most(pos, STREET_POS_PCT)),
            "time_ratio": _target("<= 1/3 (our seconds / plain pycolmap's)", time_ratio,
                                  None if time_ratio is None else _at_most(time_ratio, STREET_TIME_RATIO)),
        }
    return {
        "registered_ratio": _target(f">= {REAL_REGISTERED}", reg, reg is not None and reg >= REAL_REGISTERED),
        "rotation_error_deg_median": _target(f"<= {REAL_ROT_DEG}", rot, _at_most(rot, REAL_ROT_DEG)),
    }


# --------------------------------------------------------------------------------------------- bench


def bench_scene(scene: str, tmp: Path, skip_baseline: bool) -> dict:
    """Make the scene's inputs, run ours and (unless skipped) the baseline, compare them."""
    t0 = time.perf_counter()
    ingest_dir = make_inputs(scene, tmp)
    if isinstance(ingest_dir, str):
        print(f"[{scene}] skipped: {ingest_dir}", flush=True)
        return {"skipped": ingest_dir}
    manifest = pd.read_csv(ingest_dir / "manifest.csv")
    n_frames = len(mapping_frames(manifest))
    print(f"[{scene}] inputs ready in {time.perf_counter() - t0:.1f} s: {n_frames} mapping frames, "
          f"{len(ground_truth(manifest))} with ground truth", flush=True)
    out: dict = {"frames": n_frames}
    print(f"[{scene}] ours: stages.sfm.run", flush=True)
    out["ours"] = run_ours(ingest_dir, tmp / "sfm" / scene, manifest)
    print(f"[{scene}] ours took {out['ours']['seconds']:.1f} s", flush=True)
    time_ratio = None
    if not skip_baseline:
        print(f"[{scene}] baseline: plain pycolmap (extract_features, match_exhaustive, incremental_mapping)",
              flush=True)
        out["baseline"] = run_baseline(ingest_dir, tmp / "baseline" / scene, manifest)
        print(f"[{scene}] baseline took {out['baseline']['seconds']:.1f} s", flush=True)
        time_ratio = out["ours"]["seconds"] / out["baseline"]["seconds"]
    out["time_ratio"] = time_ratio
    out["targets"] = targets(scene, out["ours"], time_ratio)
    return out


def _plain(value):
    """JSON-safe copy: numpy scalars to Python, NaN and infinities to null, floats rounded to 6 significant digits."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value


def _fmt(value, spec: str) -> str:
    """A number for the table, '-' when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return format("-", ">" + spec.split(".")[0])
    return format(value, spec)


# Table columns: header, key in a run's results, format.
COLUMNS = (("s", "seconds", "7.1f"), ("reg", "registered_ratio", "6.3f"),
           ("rot med", "rotation_error_deg_median", "8.4f"), ("rot max", "rotation_error_deg_max", "8.4f"),
           ("pos med", "position_error_median", "9.4f"), ("pos %", "position_error_pct_median", "7.3f"),
           ("ATE", "ate_rmse", "9.4f"), ("reproj", "reprojection_error_px", "7.3f"))


def print_table(results: dict) -> None:
    """A compact table of both runs per scene, then the targets."""
    head = f"{'scene':8} {'run':8} " + " ".join(format(h, ">" + spec.split(".")[0]) for h, _, spec in COLUMNS)
    print(head)
    print("-" * len(head))
    for scene, res in results["scenes"].items():
        if "skipped" in res:
            print(f"{scene:8} skipped: {res['skipped']}")
            continue
        for run in ("ours", "baseline"):
            if run in res:
                print(f"{scene:8} {run:8} " + " ".join(_fmt(res[run].get(key), spec) for _, key, spec in COLUMNS))
        crosscheck = res["ours"]["crosscheck"]
        if not crosscheck["agrees"]:
            print(f"{scene:8} crosscheck: stage and bench disagree on {', '.join(crosscheck['disagreements'])}")
    print()
    for scene, res in results["scenes"].items():
        for name, t in res.get("targets", {}).items():
            state = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
            print(f"{scene:8} {name:28} {t['target']:42} measured {_fmt(t['measured'], '.4g'):>8}  {state}")


def write_results(results: dict) -> None:
    """Write the results as JSON to bench/results/sfm.json."""
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(_plain(results), indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Benchmark the chosen scenes in a temporary folder, write bench/results/sfm.json, print a table."""
    parser = argparse.ArgumentParser(prog="python bench/sfm.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", nargs="+", default=list(SCENES), choices=SCENES, help="scenes to benchmark")
    parser.add_argument("--skip-baseline", action="store_true", help="run only ours (no time ratio)")
    args = parser.parse_args(argv)
    setup_logging()
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "pycolmap": pycolmap.__version__,
        "pycolmap_has_cuda": bool(pycolmap.has_cuda),
        "scenes": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_sfm_") as tmp:
        for scene in args.scenes:
            results["scenes"][scene] = bench_scene(scene, Path(tmp), args.skip_baseline)
            # Written after every scene, so a run that fails later still leaves what it measured.
            write_results({**results, "complete": scene == args.scenes[-1]})
    print_table(_plain(results))
    print(f"wrote {RESULT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
