"""dvc.yaml against the stages' command lines, and the pipeline end to end with `dvc repro`."""

from __future__ import annotations

import importlib
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stages.common.cli import make_parser
from tests.conftest import ROOT
from tests.pipeline_copy import dvc, env_with_venv, make_copy, read_params, write_params


def _resolved_stages(root: Path):
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return [(s.addressing, s.cmd, [d.def_path for d in s.deps], [o.def_path for o in s.outs])
                for s in repo.index.stages]


def _inside(path: str, folder: str) -> bool:
    return Path(path) == Path(folder) or Path(folder) in Path(path).parents


def test_dvc_yaml_agrees_with_stage_command_lines():
    stages = _resolved_stages(ROOT)
    assert {name.split("@")[0] for name, *_ in stages} >= {"synth", "ingest"}
    for name, cmd, deps, outs in stages:
        family = name.split("@")[0]
        argv = shlex.split(cmd)
        assert argv[:3] == ["python", "-m", f"stages.{family}"], cmd
        module = importlib.import_module(f"stages.{family}")
        args = vars(make_parser(family, "", module.INPUTS, module.OUTPUTS).parse_args(argv[3:]))
        assert f"stages/{family}.py" in deps and "stages/common" in deps, (name, deps)
        assert args["params"] == "params.yaml" and "params.yaml" in deps
        for flag in module.INPUTS:
            assert args[flag] in deps, f"{name}: input --{flag} {args[flag]} is not a dvc dep"
        out_dirs = [args[flag] for flag in module.OUTPUTS]
        for out in outs:
            assert any(_inside(out, d) for d in out_dirs), f"{name}: out {out} is outside {out_dirs}"
        for d in out_dirs:
            assert any(_inside(out, d) for out in outs), f"{name}: --out {d} declares no dvc out"


def test_paths_come_from_params():
    text = (ROOT / "dvc.yaml").read_text()
    assert "data/" not in text, "paths belong in params.yaml `paths`, templated into dvc.yaml"


@pytest.mark.slow
def test_dvc_repro_end_to_end_noop_param_change_and_new_scene(tmp_path):
    root = make_copy(tmp_path / "repo")
    first = dvc(root, "repro")
    for stage in ("synth@street", "ingest@street", "sfm@street"):
        assert f"Running stage '{stage}'" in first.stdout
    sfm_metrics = json.loads((root / "data/sfm/street/metrics.json").read_text())
    assert sfm_metrics["registered_ratio"] == 1.0 and sfm_metrics["rotation_error_deg_median"] < 0.2
    metrics = json.loads((root / "data/ingest/street/metrics.json").read_text())
    assert metrics["frames_in"] == 10 and metrics["query_frames"] == 3
    assert metrics["mapping_frames"] + metrics["frames_quarantined"] <= metrics["frames_in"]
    assert metrics["mapping_frames"] >= 8
    assert (root / "dvc.lock").exists()

    again = dvc(root, "repro")
    assert "Running stage" not in again.stdout, again.stdout

    # An ingest param change reruns ingest and nothing upstream.
    params = read_params(root)
    params["ingest"]["max_edge"] = 200
    write_params(root, params)
    changed = dvc(root, "repro", "ingest")
    assert "Running stage 'ingest@street'" in changed.stdout
    assert "Running stage 'synth@street'" not in changed.stdout
    manifest = (root / "data/ingest/street/manifest.csv").read_text()
    assert manifest.count("\n") > 10

    # Dropping a scene folder into data/raw and naming it in `scenes:` builds it.
    extra = root / "data/raw/extra/images"
    extra.mkdir(parents=True)
    for i, png in enumerate(sorted((root / "data/ingest/street/images").glob("*.png"))[:5]):
        shutil.copy(png, extra / f"{i:03d}.png")
    params = read_params(root)
    params["scenes"] = ["street", "extra"]
    write_params(root, params)
    added = dvc(root, "repro", "ingest")
    assert "Running stage 'ingest@extra'" in added.stdout
    assert "Running stage 'ingest@street'" not in added.stdout
    assert json.loads((root / "data/ingest/extra/metrics.json").read_text())["mapping_frames"] == 5


@pytest.mark.slow
def test_prefect_flow_runs_stale_stages_and_commits(tmp_path):
    from flows.pipeline import load_stages

    root = make_copy(tmp_path / "repo")
    specs = {s.name: s for s in load_stages(root)}
    assert specs["ingest@street"].upstream == ("synth@street",)

    def flow(*args):
        # A subprocess, as a user runs it: Prefect's temporary server and logging stay out of pytest.
        env = {**env_with_venv(), "PREFECT_HOME": str(tmp_path / "prefect")}
        res = subprocess.run([sys.executable, "-m", "flows.pipeline", "--root", str(root), *args], cwd=root,
                             env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout.strip().splitlines()[-1]

    assert flow() == "ran: synth@street ingest@street sfm@street; up to date: -"
    assert json.loads((root / "data/ingest/street/metrics.json").read_text())["query_frames"] == 3
    # dvc commit recorded the results: `dvc repro` has nothing to do, nor has the flow.
    assert "Running stage" not in dvc(root, "repro").stdout
    assert flow() == "ran: -; up to date: synth@street ingest@street sfm@street"


@pytest.mark.slow
def test_prefect_flow_reports_a_failing_stage_in_one_line(tmp_path):
    root = make_copy(tmp_path / "repo", ingest={"min_frames": 50})
    env = {**env_with_venv(), "PREFECT_HOME": str(tmp_path / "prefect")}
    res = subprocess.run([sys.executable, "-m", "flows.pipeline", "--root", str(root)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 1
    assert "error: flow: 1 stage(s) failed" in res.stderr and "min_frames" in res.stderr
    assert "not run: sfm@street" in res.stderr
