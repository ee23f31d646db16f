"""Helpers for tests that run the whole pipeline in a temporary copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import PIPELINE_SYNTH, ROOT

# A tiny default scene: a few frames, small images, so a full `dvc repro` takes seconds.
TINY_FIELD = {"steps": 20, "plane_levels": [16, 32], "samples_per_batch": 2048, "env_height": 8}


def env_with_venv() -> dict:
    """Environment whose `python` is this interpreter (dvc.yaml commands say `python -m ...`)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = ""  # the copy's own stages/ must be imported, not this checkout's
    return env


def make_copy(dst: Path, synth: dict | None = None, ingest: dict | None = None, git: bool = False) -> Path:
    """Copy code, dvc.yaml and params.yaml into `dst`, `dvc init` there, set small params.

    With `git`, the copy is a git repository with this checkout's .gitignore and everything committed, as
    a user's clone is (`dvc exp`, `dvc metrics diff` and `dvc params diff` need one); otherwise
    `dvc init --no-scm`.
    """
    for name in ("stages", "flows"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, dst / name)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["synth"] = {**(params.get("synth") or {}), **PIPELINE_SYNTH, **(synth or {})}
    params["ingest"] = {**(params.get("ingest") or {}), **(ingest or {})}
    if not synth:  # tiny frames need SIFT's upsampled octave for enough features
        params["sfm"] = {**params["sfm"], "extraction": {"sift": {"first_octave": -1}}}
    # a radiance field of a few steps and a small sweep: the DAG's plumbing, not the stage's quality
    params["recon"] = {**params["recon"], "field": TINY_FIELD,
                       "mvs": {**params["recon"]["mvs"], "max_edge": 240, "sweep_max_edge": 120, "n_depths": 24}}
    write_params(dst, params)
    if git:
        run_git(dst, "init", "-q")
        # A fixed author in the copy's own config: `dvc exp run` commits through DVC's git library too.
        run_git(dst, "config", "user.name", "scenepipe test")
        run_git(dst, "config", "user.email", "test@scenepipe.invalid")
        run_git(dst, "config", "commit.gpgsign", "false")
        dvc(dst, "init", "-q")
    else:
        dvc(dst, "init", "--no-scm", "-q")
    dvc(dst, "config", "core.analytics", "false")
    if git:
        run_git(dst, "add", "-A")
        run_git(dst, "commit", "-q", "-m", "copy of the repository")
    return dst


def run_git(cwd: Path, *args: str) -> str:
    """Run `git ARGS` in `cwd`; a failure shows its output. Returns stdout."""
    res = subprocess.run(["git", *args], cwd=cwd, env=env_with_venv(), capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res.stdout


def write_params(dst: Path, params: dict) -> None:
    """Rewrite the copy's params.yaml."""
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def read_params(dst: Path) -> dict:
    """The copy's params.yaml."""
    return yaml.safe_load((dst / "params.yaml").read_text())


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run `dvc ARGS` in `cwd` with this interpreter; with `check`, a failure shows its output."""
    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env_with_venv(),
                         capture_output=True, text=True, timeout=900)
    if check and res.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res
