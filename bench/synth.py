"""Benchmark: rendering the default scene (default params) must take at most 60 s on the machine at hand, and
the road layouts with turns (road: curve, road: junction, otherwise default params) at most twice as long as
the default straight street rendered in the same run.

Runs `stages.synth.run` for each layout into a temporary folder, times it end to end (textures, frames,
queries, video encoding, depth, HD map, points), counts SIFT keypoints on every decoded video frame, and
writes bench/results/synth.json: the default scene's numbers at the top level, each layout's under
`layouts`. Usage: `python bench/synth.py`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.synth import SynthParams, run  # noqa: E402

TARGET_S = 60.0
TARGET_RATIO = 2.0  # a layout with turns against the straight street
LAYOUTS = ("curve", "junction")


def measure(params: SynthParams) -> dict:
    """Render `params` into a temp folder: time, speed per frame, SIFT keypoints per frame, video size."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = run(params, out_dir=Path(tmp) / "street")
        seconds = time.perf_counter() - t0
        sift = cv2.SIFT_create()
        with av.open(str(res.out_dir / "video.mp4")) as container:
            keypoints = [len(sift.detect(frame.to_ndarray(format="gray"), None))
                         for frame in container.decode(video=0)]
        video_mb = (res.out_dir / "video.mp4").stat().st_size / 2**20
    rendered = params.n_frames + params.n_queries
    return {
        "seconds": round(seconds, 2),
        "frames": params.n_frames,
        "queries": params.n_queries,
        "size": f"{params.width}x{params.height}",
        "supersample": params.supersample,
        "seconds_per_frame": round(seconds / rendered, 3),
        "device": res.device,
        "cpu_count": os.cpu_count(),
        "sift_keypoints_per_frame": {"min": int(np.min(keypoints)), "median": int(np.median(keypoints)),
                                     "max": int(np.max(keypoints))},
        "video_mb": round(video_mb, 2),
    }


def main() -> int:
    """Render the default scene and each layout in a temp folder, time them, write the JSON."""
    out = measure(SynthParams())
    out.update(target_seconds=TARGET_S, met=out["seconds"] <= TARGET_S)
    out["layouts"] = {}
    for road in LAYOUTS:
        params = SynthParams(road=road)
        lay = {"road": road, **measure(params)}
        ratio = lay["seconds"] / out["seconds"]
        lay.update(ratio_to_straight=round(ratio, 2), target_ratio=TARGET_RATIO, met=ratio <= TARGET_RATIO)
        out["layouts"][road] = lay
    path = ROOT / "bench/results/synth.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
