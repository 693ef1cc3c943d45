"""Shared by the benchmarks that benchmarks/gpu_suite.sh runs: ``--json`` / ``--dry-run`` options, the dry run's
exit, the JSON result file and the goal lines."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch


def add_report_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--json", type=Path, default=None, help="also write the results (and goals) to this JSON file")
    ap.add_argument("--dry-run", action="store_true",
                    help="parse and check the arguments, print what would run, touch no device, exit 0")


def finish_dry_run(name: str, plan: list[str]) -> None:
    """Print the plan of a ``--dry-run`` and exit 0."""
    print(f"{name} --dry-run: arguments OK")
    for line in plan:
        print(f"  {line}")
    sys.exit(0)


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def goal(name: str, value: float | None, target: float, higher_is_better: bool, detail: str = "") -> dict[str, Any]:
    """A goal record; ``met`` is None when the value could not be measured."""
    met = None if value is None else (value >= target if higher_is_better else value <= target)
    return {"goal": name, "value": value, "target": target, "higher_is_better": higher_is_better, "met": met,
            "detail": detail}


def print_goals(goals: list[dict[str, Any]]) -> None:
    for g in goals:
        op = ">=" if g["higher_is_better"] else "<="
        value = "not measured" if g["value"] is None else f"{g['value']:.3f}"
        verdict = {True: "MET", False: "MISSED", None: "n/a"}[g["met"]]
        print(f"GOAL {g['goal']}: {value} (target {op} {g['target']}) {verdict}  {g['detail']}".rstrip())


def write_json(path: Path | None, payload: dict[str, Any], complete: bool = True) -> None:
    """Write the results; benchmarks also call it after every measurement with ``complete=False``, so a run stopped
    by the suite's time cap leaves what it measured."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"environment": environment(), "complete": complete, **payload}, indent=2))
    tmp.replace(path)
    if complete:
        print(f"wrote {path}")
