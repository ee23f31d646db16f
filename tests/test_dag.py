"""dvc.yaml against the stages' command lines, dvc.lock against the code, and the pipeline end to end."""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.common.cli import make_parser
from stages.common.outputs import atomic_dir
from tests.conftest import ROOT
from tests.pipeline_copy import dvc, env_with_venv, make_copy, read_params, run_git, write_params


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
        code = f"stages/{family}" if (ROOT / "stages" / family).is_dir() else f"stages/{family}.py"
        assert code in deps and "stages/common" in deps, (name, deps)
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


def test_outs_persist_and_git_versions_exactly_the_uncached_ones():
    """Every out survives a failed `dvc repro`; git ignores the cached outs and sees the `cache: false` ones."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        outs = [o for s in repo.index.stages for o in s.outs]
    assert outs and all(o.persist for o in outs), [o.def_path for o in outs if not o.persist]
    metrics = [o.def_path for o in outs if o.metric]
    assert metrics and all(not o.use_cache for o in outs if o.metric), "metrics must be `cache: false`"
    paths = [o.def_path for o in outs]
    res = subprocess.run(["git", "check-ignore", "--no-index", "-v", "-n", *paths], cwd=ROOT, capture_output=True,
                         text=True)
    # `source:line:pattern<TAB>path`; `::<TAB>path` when no pattern matches; a `!pattern` re-includes the path
    matched = [line.split("\t", 1) for line in res.stdout.splitlines()]
    ignored = {path for where, path in matched if where != "::" and not where.split(":", 2)[2].startswith("!")}
    assert ignored == {o.def_path for o in outs if o.use_cache}, (
        "git must ignore exactly the cached outs: "
        f"ignored but `cache: false`: {sorted(ignored - {o.def_path for o in outs if o.use_cache})}, "
        f"cached but not ignored: {sorted({o.def_path for o in outs if o.use_cache} - ignored)}")


def _top_level_plots(root: Path) -> dict[str, dict]:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {k: v for defs in repo.index._plots.values() for d in defs for k, v in d.items()}


def test_plots_are_declared_for_ingest_and_sfm_series():
    plots = _top_level_plots(ROOT)
    params = read_params(ROOT)
    scene = params["scenes"][0]
    manifest = f"{params['paths']['ingest']}/{scene}/manifest.csv"
    per_image = f"{params['paths']['sfm']}/{scene}/per_image.csv"
    series = {(file, col, p["x"]) for p in plots.values() for file, cols in p["y"].items()
              for col in ([cols] if isinstance(cols, str) else cols)}
    for col in ("sharpness", "sharpness_rel", "motion_px"):
        assert (manifest, col, "frame_index") in series, col
    for col in ("reprojection_error_px", "rotation_error_deg", "position_error"):
        assert (per_image, col, "frame") in series, col


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077], ids=lambda m: f"umask{m:03o}")
def test_atomic_dir_output_gets_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
        mode = stat.S_IMODE((tmp_path / "out").stat().st_mode)
    finally:
        os.umask(old)
    assert mode == 0o777 & ~umask, oct(mode)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def lock_mismatches(root: Path) -> list[str]:
    """Where `root/dvc.lock` disagrees with dvc.yaml, the code, params.yaml and the git-versioned outs.

    What only the data can tell is left out (deps under params.yaml `paths`, cached outs): a fresh clone
    has no data/ until `dvc pull` or `dvc repro`. The `cache: false` outs (metrics.json) are in git, so
    they are checked: the committed ones must be those dvc.lock records.
    """
    from dvc.repo import Repo

    lock_file = root / "dvc.lock"
    lock = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {}) if lock_file.exists() else {}
    data_dirs = list(read_params(root)["paths"].values())
    problems = []
    with Repo(str(root)) as repo:
        stages = {s.name: s for s in repo.index.stages}
    for name in sorted(lock.keys() - stages.keys()):
        problems.append(f"{name}: in dvc.lock, no longer in dvc.yaml")
    uncached = {}
    for name, stage in sorted(stages.items()):
        if name not in lock:
            problems.append(f"{name}: not in dvc.lock")
            continue
        declared = {o.def_path for o in stage.outs}
        recorded = {o["path"] for o in lock[name].get("outs", [])}
        for path in sorted(declared - recorded):
            problems.append(f"{name}: out {path} declared, not in dvc.lock")
        for path in sorted(recorded - declared):
            problems.append(f"{name}: out {path} in dvc.lock, no longer declared")
        uncached[name] = {o.def_path for o in stage.outs if not o.use_cache}
    res = dvc(root, "status", "--json")
    for name, changes in sorted(json.loads(res.stdout or "{}").items()):
        if name not in lock or name not in stages:
            continue
        for change in changes:
            if isinstance(change, str):  # "changed command", "always changed"
                problems.append(f"{name}: {change}")
                continue
            for path, what in change.get("changed deps", {}).items():
                if not any(_inside(path, d) for d in data_dirs):
                    problems.append(f"{name}: dep {path} {what}")
            for path, what in change.get("changed outs", {}).items():
                if path in uncached[name]:
                    problems.append(f"{name}: out {path} {what}")
    return problems


def test_dvc_lock_matches_the_code():
    problems = lock_mismatches(ROOT)
    assert not problems, (
        "dvc.lock does not match dvc.yaml / the code / params.yaml / metrics:\n  " + "\n  ".join(problems)
        + "\nRun `dvc repro` (or `dvc commit` when the outputs are already right) and commit dvc.lock "
        "with the metrics files.")


def test_lock_check_passes_without_data_and_sees_code_params_command_and_metrics_changes(tmp_path):
    """lock_mismatches on a small project: consistent after `dvc repro` even with the data gone (a fresh
    clone); a stage's code, params, command or git-versioned metrics edited without `dvc repro` are named."""
    root = tmp_path / "repo"
    (root / "stages" / "common").mkdir(parents=True)
    (root / "stages" / "make.py").write_text("import sys, pathlib, json\n"
                                             "out = pathlib.Path(sys.argv[2]); out.mkdir(parents=True, exist_ok=True)\n"
                                             "(out / 'big.txt').write_text(pathlib.Path(sys.argv[1]).read_text() * 2)\n"
                                             "(out / 'metrics.json').write_text(json.dumps({'n': 1}))\n")
    (root / "stages" / "common" / "util.py").write_text("X = 1\n")
    (root / "data" / "raw" / "a").mkdir(parents=True)
    (root / "data" / "raw" / "a" / "in.txt").write_text("hello")
    (root / "params.yaml").write_text("scenes: [a]\npaths: {raw: data/raw, make: data/make}\nmake: {k: 1}\n")
    (root / "dvc.yaml").write_text(
        "stages:\n  make:\n    foreach: ${scenes}\n    do:\n"
        "      cmd: python stages/make.py ${paths.raw}/${item}/in.txt ${paths.make}/${item}\n"
        "      deps: [stages/make.py, stages/common, '${paths.raw}/${item}']\n"
        "      params: [make]\n"
        "      outs:\n        - ${paths.make}/${item}/big.txt: {persist: true}\n"
        "      metrics:\n        - ${paths.make}/${item}/metrics.json: {cache: false, persist: true}\n")
    dvc(root, "init", "--no-scm", "-q")
    dvc(root, "repro", "-q")
    assert lock_mismatches(root) == []
    # A fresh clone: neither the data deps nor the cached outs, only the git-versioned metrics.
    shutil.rmtree(root / "data" / "raw")
    (root / "data" / "make" / "a" / "big.txt").unlink()
    shutil.rmtree(root / ".dvc" / "cache")
    assert lock_mismatches(root) == []

    def mismatches_after(path: str, edit) -> list[str]:
        f = root / path
        before = f.read_text()
        f.write_text(edit(before))
        try:
            return lock_mismatches(root)
        finally:
            f.write_text(before)

    assert mismatches_after("stages/make.py", lambda t: t + "# edited\n") == ["make@a: dep stages/make.py modified"]
    assert mismatches_after("stages/common/util.py", lambda t: "X = 2\n") == ["make@a: dep stages/common modified"]
    assert mismatches_after("params.yaml", lambda t: t.replace("k: 1", "k: 2")) == [
        "make@a: dep params.yaml {'make': 'modified'}"]
    assert mismatches_after("dvc.yaml", lambda t: t.replace("cmd: python", "cmd: python3")) == [
        "make@a: changed command"]
    assert mismatches_after("data/make/a/metrics.json", lambda t: '{"n": 2}') == [
        "make@a: out data/make/a/metrics.json modified"]
    assert mismatches_after("params.yaml", lambda t: t.replace("[a]", "[a, b]")) == ["make@b: not in dvc.lock"]
    assert lock_mismatches(root) == []


def _file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.slow
def test_dvc_repro_end_to_end_experiments_kept_outputs_and_new_scene(tmp_path):
    """In a git copy: `dvc repro`, then what users do next: commit, `dvc exp run -S`, `dvc metrics diff`,
    `dvc params diff`, `dvc exp show`, `dvc plots show`; a typo in params.yaml keeps the earlier outputs;
    a param change reruns only its stage; a new scene builds."""
    root = make_copy(tmp_path / "repo", git=True)
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
    assert lock_mismatches(root) == []
    # Output folders get the umask like any new folder (not mkdtemp's 0700).
    umask = os.umask(0)
    os.umask(umask)
    for folder in ("data/raw/street", "data/ingest/street", "data/sfm/street"):
        assert stat.S_IMODE((root / folder).stat().st_mode) == 0o777 & ~umask, folder
    # git sees dvc.lock and the `cache: false` outs (metrics), nothing DVC caches, and no per-folder .gitignore.
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        uncached = {o.def_path for s in repo.index.stages for o in s.outs if not o.use_cache}
    untracked = set(run_git(root, "ls-files", "--others", "--exclude-standard").split())
    assert untracked == {"dvc.lock"} | uncached, untracked

    again = dvc(root, "repro")
    assert "Running stage" not in again.stdout, again.stdout

    # Commit, then an experiment with another sfm param: metrics and params of both are compared.
    run_git(root, "add", "-A")
    run_git(root, "commit", "-q", "-m", "pipeline built")
    exp = dvc(root, "exp", "run", "-S", "sfm.sequential_overlap=3")
    assert "Running stage 'sfm@street'" in exp.stdout and "Running stage 'ingest@street'" not in exp.stdout
    params_diff = json.loads(dvc(root, "params", "diff", "--json").stdout)
    assert params_diff["params.yaml"]["sfm.sequential_overlap"] == {"old": 5, "new": 3, "diff": -2}
    metrics_diff = json.loads(dvc(root, "metrics", "diff", "--all", "--json").stdout)
    for key in ("registered_ratio", "rotation_error_deg_median", "reprojection_error_px"):
        old_new = metrics_diff["data/sfm/street/metrics.json"][key]
        assert _number(old_new["old"]) and _number(old_new["new"]), (key, old_new)
    assert metrics_diff["data/ingest/street/metrics.json"]["frames_in"]["old"] == 10
    shown = json.loads(dvc(root, "exp", "show", "--json").stdout)
    baseline = next(r for r in shown if r["rev"] != "workspace")
    experiments = [r for e in baseline["experiments"] or [] for r in e["revs"]]
    assert len(experiments) == 1, baseline
    for row, overlap in ((baseline, 5), (experiments[0], 3)):
        assert row["data"]["params"]["params.yaml"]["data"]["sfm"]["sequential_overlap"] == overlap
        numbers = row["data"]["metrics"]["data/sfm/street/metrics.json"]["data"]
        assert _number(numbers["rotation_error_deg_median"]) and numbers["registered_ratio"] == 1.0, row["name"]
    # Every top-level plot of dvc.yaml renders with data.
    plots = json.loads(dvc(root, "plots", "show", "--json").stdout)
    assert not plots.get("errors"), plots.get("errors")
    for plot_id in _top_level_plots(root):
        (shown_plot,) = plots["data"][plot_id]
        assert shown_plot["content"]["data"]["values"], plot_id

    # A typo in params.yaml: the stage rejects it in one line and the earlier outputs stay as they were.
    kept = _file_hashes(root / "data/sfm/street")
    assert "poses.csv" in kept and "metrics.json" in kept
    good = read_params(root)
    write_params(root, {**good, "sfm": {**good["sfm"], "sequential_overlapp": 3}})
    typo = dvc(root, "repro", check=False)
    assert typo.returncode != 0
    assert "error: sfm: " in typo.stderr and "sequential_overlapp" in typo.stderr, typo.stderr
    assert _file_hashes(root / "data/sfm/street") == kept, "a rejected param cost the earlier sfm outputs"
    write_params(root, good)
    assert "Running stage" not in dvc(root, "repro").stdout

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

    assert flow() == "ran: synth@street ingest@street sfm@street recon@street hdmap@street; up to date: -"
    assert json.loads((root / "data/ingest/street/metrics.json").read_text())["query_frames"] == 3
    # dvc commit recorded the results: `dvc repro` has nothing to do, nor has the flow.
    assert "Running stage" not in dvc(root, "repro").stdout
    assert flow() == "ran: -; up to date: synth@street ingest@street sfm@street recon@street hdmap@street"


@pytest.mark.slow
def test_prefect_flow_reports_a_failing_stage_in_one_line(tmp_path):
    root = make_copy(tmp_path / "repo", ingest={"min_frames": 50})
    env = {**env_with_venv(), "PREFECT_HOME": str(tmp_path / "prefect")}
    res = subprocess.run([sys.executable, "-m", "flows.pipeline", "--root", str(root)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 1
    assert "error: flow: 1 stage(s) failed" in res.stderr and "min_frames" in res.stderr
    assert "not run: sfm@street" in res.stderr


def test_flows_tag_gpu_stages_from_the_stages_own_declaration():
    from flows.pipeline import uses_gpu

    assert uses_gpu("synth") and uses_gpu("sfm") and uses_gpu("recon") and not uses_gpu("ingest")
    assert not uses_gpu("hdmap")
