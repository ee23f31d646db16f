"""Command-line plumbing shared by every stage's `main()`.

Each stage declares the paths it reads (`INPUTS`) and writes (`OUTPUTS`) as flag -> help dicts. The
same declaration builds the argparse parser and lets a test check that dvc.yaml's `deps` and `outs`
agree with each stage's command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Callable

from stages.common.errors import StageError

log = logging.getLogger("scenepipe")


def make_parser(stage: str, doc: str, inputs: dict[str, str], outputs: dict[str, str]) -> argparse.ArgumentParser:
    """An argparse parser with `--params` plus one required path flag per declared input and output."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=doc)
    parser.add_argument("--params", default="params.yaml", help="params.yaml holding this stage's section")
    for flag, help_ in {**inputs, **outputs}.items():
        parser.add_argument(f"--{flag}", required=True, help=help_)
    return parser


def setup_logging() -> None:
    """Plain `stage: message` log lines on stderr."""
    logging.basicConfig(level=os.environ.get("SCENEPIPE_LOG", "INFO"), format="%(name)s: %(message)s")


def guarded(stage: str, body: Callable[[], object]) -> int:
    """Run `body`; turn any failure into one readable line on stderr and exit code 1.

    Set SCENEPIPE_DEBUG=1 to see the full traceback of an unexpected error.
    """
    setup_logging()
    try:
        body()
    except StageError as exc:
        print(f"error: {stage}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"error: {stage}: interrupted; no output was written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns crashes into one line
        if os.environ.get("SCENEPIPE_DEBUG"):
            traceback.print_exc()
        where = traceback.extract_tb(exc.__traceback__)[-1]
        print(
            f"error: {stage}: unexpected {type(exc).__name__}: {exc} (at {os.path.basename(where.filename)}:"
            f"{where.lineno}); no output was written; rerun with SCENEPIPE_DEBUG=1 for the traceback and "
            "report it",
            file=sys.stderr,
        )
        return 1
    return 0
