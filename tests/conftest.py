"""Shared test fixtures: the repository root and the real scenes in ../shared/data/real."""

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
