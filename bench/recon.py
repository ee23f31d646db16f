"""Benchmark: the recon stage on the default street and the fox (issue 9's targets).

Each scene's inputs are made as bench/sfm.py makes them (synth, then ingest; or ingest of
../shared/data/real/<scene>), then the sfm and recon stages run with params.yaml. Per scene: held-out PSNR / SSIM
of the radiance field (every 8th registered frame), PSNR / SSIM of the scene's queries at their ground-truth
poses (not optimised), the fused MVS cloud's and the field's geometry against the scene's points.ply
(accuracy, completeness, Chamfer, F-score at 5/10/20 cm, EMD), seconds per phase, peak memory, the device.

Targets (CPU preset, default scene, 2 cores): held-out PSNR >= 25 dB with training <= 300 s, fused MVS F-score at
10 cm >= 0.8, the whole stage <= 600 s. On a CUDA machine (`--gpu`), the GPU preset too (PSNR >= 30 dB with
training <= 120 s) and COLMAP PatchMatch beside the plane sweep on the same undistorted images (time, F-score).

Writes bench/results/recon.json (recon_gpu.json with --gpu). Usage: `python bench/recon.py [--scenes street fox]
[--gpu] [--keep DIR]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import sfm as bench_sfm  # noqa: E402  (bench/sfm.py: the scenes' inputs)

from stages.common.cli import setup_logging  # noqa: E402
from stages.common.params import load_section  # noqa: E402
from stages.recon import ReconParams  # noqa: E402
from stages.recon import run as recon_run  # noqa: E402
from stages.sfm import SfmParams  # noqa: E402
from stages.sfm import run as sfm_run  # noqa: E402

PARAMS = ROOT / "params.yaml"
SCENES = ("street", "fox")
GEOMETRY_KEYS = ("accuracy", "completeness", "chamfer", "fscore_5cm", "fscore_10cm", "fscore_20cm",
                 "precision_10cm", "recall_10cm", "emd")


def _summary(m: dict) -> dict:
    def geometry(source: str) -> dict:
        g = m.get(source) or {}
        out = {k: g.get(k) for k in GEOMETRY_KEYS if k in g}
        if "mesh" in g:
            out["mesh"] = {k: g["mesh"].get(k) for k in GEOMETRY_KEYS if k in g["mesh"]}
        return out

    return {"device": m["device"], "mvs_backend": m["mvs_backend"], "field_preset": m["field_preset"],
            "frames": m["frames"], "train_frames": m["train_frames"], "held_out_frames": m["held_out_frames"],
            "psnr": m["psnr"], "ssim": m["ssim"], "queries": m["queries"], "field": m["field"],
            "mvs_stats": m["mvs_stats"], "mvs": geometry("mvs"), "nerf": geometry("nerf"), "geometry": m["geometry"],
            "seconds": m["seconds"], "seconds_per_phase": m["seconds_per_phase"], "peak_rss_mb": m["peak_rss_mb"],
            "peak_cuda_mb": m.get("peak_cuda_mb"), "notes": m["notes"]}


def _targets(s: dict, gpu: bool) -> dict:
    train_s = s["seconds_per_phase"].get("field_training")
    checks = {"psnr": (">=", 30.0 if gpu else 25.0, s["psnr"]),
              "field_training_seconds": ("<=", 120.0 if gpu else 300.0, train_s)}
    if not gpu:
        checks["mvs_fscore_10cm"] = (">=", 0.8, s["mvs"].get("fscore_10cm"))
        checks["seconds"] = ("<=", 600.0, s["seconds"])
    out = {}
    for key, (op, limit, v) in checks.items():
        met = None if v is None else (v >= limit if op == ">=" else v <= limit)
        out[key] = {"target": f"{op} {limit}", "measured": v, "met": met}
    return out


def bench_scene(scene: str, tmp: Path, gpu: bool) -> dict:
    made = bench_sfm.make_inputs(scene, tmp)
    if isinstance(made, str):
        return {"skipped": made}
    ingest_dir, _ = made
    t0 = time.perf_counter()
    sfm = sfm_run(load_section(PARAMS, "sfm", SfmParams), frames=ingest_dir, out_dir=tmp / "sfm" / scene)
    out: dict = {"sfm_gate_passed": sfm.metrics["gate_passed"], "sfm_seconds": round(time.perf_counter() - t0, 1)}
    base = load_section(PARAMS, "recon", ReconParams)
    runs = {"cpu": dataclasses.replace(base, device="cpu", field_preset="cpu", mvs_backend="sweep")}
    if gpu:
        runs = {"gpu": dataclasses.replace(base, device="cuda", field_preset="gpu", mvs_backend="sweep"),
                "gpu_colmap_patch_match": dataclasses.replace(base, device="cuda", field_preset="gpu",
                                                              mvs_backend="colmap")}
    for name, params in runs.items():
        res = recon_run(params, frames=ingest_dir, sfm=tmp / "sfm" / scene, out_dir=tmp / "recon" / f"{scene}_{name}")
        summary = _summary(res.metrics)
        summary["targets"] = _targets(summary, name != "cpu") if scene == "street" else {}
        out[name] = summary
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/recon.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", nargs="+", default=list(SCENES), choices=SCENES)
    parser.add_argument("--gpu", action="store_true", help="the GPU preset and COLMAP PatchMatch (needs CUDA)")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep every scene's outputs under DIR")
    args = parser.parse_args(argv)
    setup_logging()
    result_path = ROOT / "bench/results" / ("recon_gpu.json" if args.gpu else "recon.json")
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "cpu_count": os.cpu_count(), "scenes": {}}
    with tempfile.TemporaryDirectory(prefix="bench_recon_") as tmp_dir:
        tmp = Path(args.keep or tmp_dir)
        for scene in args.scenes:
            print(f"[{scene}] ...", flush=True)
            results["scenes"][scene] = bench_scene(scene, tmp, args.gpu)
            result_path.write_text(json.dumps(bench_sfm._plain(results), indent=2) + "\n")
            for name, r in results["scenes"][scene].items():
                if isinstance(r, dict) and "psnr" in r:
                    print(f"[{scene}/{name}] PSNR {r['psnr']}, queries {r['queries'].get('psnr')}, MVS F@10cm "
                          f"{r['mvs'].get('fscore_10cm')}, {r['seconds']} s; " + ", ".join(
                              f"{k} {v['measured']!s:.6} ({'met' if v['met'] else 'NOT met'})"
                              for k, v in r.get("targets", {}).items()), flush=True)
    print(f"wrote {result_path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
