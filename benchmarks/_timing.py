"""Shared timing helper for the benchmark scripts: median wall time of repeated calls, synchronising CUDA."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_time(fn: Callable[[], object], device: str = "cpu", min_runs: int = 3, budget_s: float = 2.0) -> float:
    """Median seconds per call: one warm-up, then at least ``min_runs`` runs or until ``budget_s`` is spent."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
