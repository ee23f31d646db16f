"""Shared test fixtures: the repository root, the tiny synthetic scenes (defined once, here) and the real
scenes in ../shared/data/real."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return ROOT


def real_scene(name: str) -> Path:
    """Path of a real scene, or skip the test with the reason when it is absent."""
    path = REAL / name
    if not path.is_dir():
        pytest.skip(f"real scene {name!r} not found at {path} (../shared/data/real is absent on this machine)")
    return path


# Tiny synthetic scenes, as synth params: each test module picks the smallest that shows what it checks.
TINY_SYNTH = dict(n_frames=3, width=160, height=90, n_queries=1, n_points=2_000)
"""Three frames: synth's file set, determinism and atomic output."""
SMALL_SYNTH = dict(n_frames=6, width=320, height=180, n_queries=2, n_points=20_000)
"""Six frames at 320x180: synth's geometry against its own ground truth."""
LAYOUT_SYNTH = dict(n_frames=8, width=320, height=180, n_queries=2, n_points=20_000, output="images",
                    speed_mps=80.0, device="cpu")
"""Eight frames far apart: the road layouts (curve, junction) end to end."""
DRIVE_SYNTH = dict(n_frames=16, width=320, height=180, n_queries=2, output="images", speed_mps=8.0,
                   n_points=2000, supersample=1)
"""A 16-frame drive, enough for SfM."""
PIPELINE_SYNTH = dict(n_frames=10, width=240, height=136, n_queries=3)
"""Ten frames: the whole DAG under `dvc repro` and Prefect."""


@pytest.fixture(scope="session")
def drive_frames(tmp_path_factory) -> Path:
    """DRIVE_SYNTH rendered and ingested (known intrinsics and ground-truth poses), once per test session."""
    from stages.ingest import IngestParams
    from stages.ingest import run as ingest_run
    from stages.synth import SynthParams
    from stages.synth import run as synth_run

    root = tmp_path_factory.mktemp("drive")
    synth_run(SynthParams(**DRIVE_SYNTH), out_dir=root / "raw")
    ingest_run(IngestParams(query_every=0), scene_dir=root / "raw", out_dir=root / "frames")
    return root / "frames"
