"""pytest plugin of benchmarks/gpu_suite.sh: one JSON line per test outcome, appended as soon as it is known, to
``$QWHA_TEST_JSONL`` -- so a shard stopped by the suite's time cap still leaves every finished result behind.

Load with ``-p _pytest_jsonl`` (``benchmarks/`` on ``PYTHONPATH``)."""

from __future__ import annotations

import json
import os


def _message(report) -> str:
    text = report.longreprtext or ""
    errors = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    return "\n".join(errors[:6]) if errors else text[-1500:]


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("QWHA_TEST_JSONL")
    if not path:
        return
    if report.when != "call" and report.passed:
        return  # setup/teardown that passed: the call's record says it all
    rec = {"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
           "seconds": round(report.duration, 3)}
    if not report.passed:
        rec["message"] = _message(report)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")
