"""Prefect flow that runs the DVC pipeline: dvc.yaml stays the one description of the DAG.

The flow reads the resolved stages of dvc.yaml (every `foreach` item is its own stage, e.g.
`ingest@street`), asks DVC which are out of date, and runs each stale stage's command as a Prefect task
as soon as the stages it depends on have finished, so independent scenes run in parallel. GPU stages are
tagged `gpu`, so a Prefect concurrency limit on that tag (`prefect concurrency-limit create gpu N`) gates
them to the GPUs a worker has. Afterwards `dvc commit` records the results in dvc.lock, so `dvc repro` sees
them as up to date. Prefect's own result caching stays off: DVC's content hashes decide what reruns.

Run: `python -m flows.pipeline [--root .] [--workers 4] [stage ...]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

# Without a Prefect server (PREFECT_API_URL unset) the flow starts a temporary one on SQLite, which lives only as
# long as the run. On a loaded 2-core machine it took more than Prefect's 20 s to start, and its background
# writers (event persister, triggers, logs shipped to the API) held SQLite's lock long enough to crash the run
# with "database is locked"; the run's states do not need them. Settings the user gave win; with a real server
# nothing changes.
if not os.environ.get("PREFECT_API_URL"):
    for _key, _value in {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
                         "PREFECT_LOGGING_TO_API_ENABLED": "false",
                         "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
                         "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
                         "PREFECT_SERVER_DATABASE_TIMEOUT": "60"}.items():
        os.environ.setdefault(_key, _value)

from prefect import flow, task  # noqa: E402
from prefect.futures import wait  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402



def uses_gpu(family: str) -> bool:
    """A stage's own declaration (`USES_GPU` beside its params) of whether it uses a GPU when one is present;
    its tasks then carry the `gpu` tag."""
    return bool(getattr(importlib.import_module(f"stages.{family}"), "USES_GPU", False))


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One resolved dvc.yaml stage."""

    name: str
    """Addressing name, e.g. `ingest@street`."""
    cmd: str
    """Shell command from dvc.yaml."""
    upstream: tuple[str, ...]
    """Names of the stages whose outputs this one depends on."""

    @property
    def family(self) -> str:
        """Stage name without the foreach item (`ingest@street` -> `ingest`)."""
        return self.name.split("@", 1)[0]


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the dvc command line of this interpreter's environment in `root`."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)


def load_stages(root: Path) -> list[StageSpec]:
    """Resolved stages of `root/dvc.yaml` in a topological order, each with its upstream stages."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        order = list(reversed(list(nx.topological_sort(graph))))
        specs = []
        for stage in order:
            if not stage.cmd:  # .dvc files of `dvc add` have no command
                continue
            ups = tuple(_address(s, root) for s in graph.successors(stage) if s.cmd)
            specs.append(StageSpec(_address(stage, root), stage.cmd, ups))
    return specs


def _address(stage, root: Path) -> str:
    """Stage name as `dvc` run in `root` spells it (DVC's own `addressing` is relative to the cwd)."""
    dvcfile = Path(stage.dvcfile.path).resolve()
    if dvcfile == root.resolve() / "dvc.yaml":
        return stage.name
    return f"{os.path.relpath(dvcfile, root)}:{stage.name}"


def stale_stages(root: Path, specs: list[StageSpec]) -> set[str]:
    """Stages DVC reports as changed, plus everything downstream of them."""
    res = _dvc(root, "status", "--json")
    if res.returncode != 0:
        raise RuntimeError(f"dvc status failed in {root}: {res.stderr.strip().splitlines()[-1:]}")
    changed = set(json.loads(res.stdout or "{}"))
    stale = set()
    for spec in specs:  # topological order: upstream first
        if spec.name in changed or any(u in stale for u in spec.upstream):
            stale.add(spec.name)
    return stale


@task(retries=0, cache_policy=None)
def run_stage(name: str, cmd: str, root: str) -> str:
    """Run one stage's command in the repository root; a failure raises with the stage's last error line."""
    env = dict(os.environ)
    # The command says `python`: make it this environment's interpreter.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    res = subprocess.run(cmd, shell=True, cwd=root, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
        raise RuntimeError(f"stage {name} failed: {last}")
    return name


@flow(name="scenepipe", task_runner=ThreadPoolTaskRunner(max_workers=2))
def pipeline(root: str = ".", targets: list[str] | None = None) -> dict:
    """Run the stale stages of dvc.yaml (optionally only `targets` and what they need), then `dvc commit`."""
    root_p = Path(root).resolve()
    specs = load_stages(root_p)
    if targets:
        wanted = _with_upstream(specs, targets)
        specs = [s for s in specs if s.name in wanted]
    stale = stale_stages(root_p, specs)
    futures = {}
    for spec in specs:
        if spec.name not in stale:
            continue
        tags = ["gpu"] if uses_gpu(spec.family) else []
        futures[spec.name] = run_stage.with_options(task_run_name=spec.name, tags=tags).submit(
            spec.name, spec.cmd, str(root_p), wait_for=[futures[u] for u in spec.upstream if u in futures]
        )
    wait(list(futures.values()))
    failed = [n for n, f in futures.items() if f.state.is_failed() or f.state.is_crashed()]
    ran = [n for n, f in futures.items() if f.state.is_completed()]
    not_run = [n for n in futures if n not in failed and n not in ran]
    if ran:
        res = _dvc(root_p, "commit", "--force", *ran)
        if res.returncode != 0:
            raise RuntimeError(f"dvc commit failed: {res.stderr.strip()}")
    if failed:
        reasons = "; ".join(str(futures[n].state.message or n) for n in failed)
        skipped = f"; not run: {' '.join(not_run)}" if not_run else ""
        raise RuntimeError(f"{len(failed)} stage(s) failed: {reasons}{skipped}")
    return {"ran": ran, "up_to_date": [s.name for s in specs if s.name not in stale]}


def _with_upstream(specs: list[StageSpec], targets: list[str]) -> set[str]:
    """Targets (a stage family like `ingest` or a name like `ingest@street`) and all they depend on."""
    by_name = {s.name: s for s in specs}
    todo = [s.name for s in specs if s.name in targets or s.family in targets]
    if not todo:
        raise SystemExit(f"error: flow: no stage matches {', '.join(targets)}; see `dvc stage list`")
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(by_name[name].upstream)
    return seen


def main(argv: list[str] | None = None) -> int:
    """Command line: run the flow on a repository root."""
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="*", help="stages to run (with what they need); default all")
    parser.add_argument("--root", default=".", help="repository root holding dvc.yaml")
    parser.add_argument("--workers", type=int, default=2, help="stages run at once")
    args = parser.parse_args(argv)
    try:
        runner = ThreadPoolTaskRunner(max_workers=args.workers)
        out = pipeline.with_options(task_runner=runner)(root=args.root, targets=args.targets or None)
    except RuntimeError as exc:
        print(f"error: flow: {exc}", file=sys.stderr)
        return 1
    print(f"ran: {' '.join(out['ran']) or '-'}; up to date: {' '.join(out['up_to_date']) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
