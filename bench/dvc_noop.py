"""Benchmark: a second `dvc repro` with nothing changed must run nothing and take under 3 s.

Runs the default pipeline (default params) in a temporary copy of the repository, then times a second
`dvc repro` and writes bench/results/dvc_noop.json. Usage: `python bench/dvc_noop.py`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.pipeline_copy import dvc, make_copy  # noqa: E402

TARGET_S = 3.0


def main() -> int:
    """Build the default scene in a temp copy, time a no-op `dvc repro`, write the JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        root = make_copy(Path(tmp) / "repo", synth={"n_frames": 80, "width": 640, "height": 360, "n_queries": 20})
        t0 = time.perf_counter()
        dvc(root, "repro")
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = dvc(root, "repro")
        noop_s = time.perf_counter() - t0
    out = {
        "first_repro_seconds": round(first_s, 2),
        "noop_repro_seconds": round(noop_s, 2),
        "noop_ran_nothing": "Running stage" not in res.stdout,
        "target_seconds": TARGET_S,
        "met": noop_s < TARGET_S and "Running stage" not in res.stdout,
        "cpu_count": os.cpu_count(),
    }
    path = ROOT / "bench/results/dvc_noop.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
