"""CI side of the GPU suite (no GPU needed): the script's dry run, the test grid it runs, init's device option."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_parity import wht_sizes

from qwha_export.kernels import SUPPORTED_ORDERS, hadamard_order

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run_without_cuda(tmp_path):
    """Without a CUDA device the suite parses every benchmark's arguments (their --dry-run), says so, exits 0."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": str(tmp_path), "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("bench_wht", "bench_layer", "bench_train_step", "_gpu_suite plan", "_gpu_suite report"):
        assert f"{name} --dry-run: arguments OK" in out.stdout, (name, out.stdout)
    assert "no CUDA device" in out.stdout
    assert (tmp_path / "gpu_suite.log").read_text() == out.stdout  # the log is written where $OUT says


def test_benchmark_dry_run_rejects_bad_arguments():
    """The dry run does check: an unsupported transform size is refused with a one-line usage error (exit 2)."""
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_wht.py"), "--device", "cuda", "--sizes",
                          "100", "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--sizes: 100 is not a supported transform size" in out.stderr, out.stderr


def test_gpu_grid_covers_every_supported_order():
    """The kernels' GPU grid (tests/test_gpu_kernels.py) has every supported K up to its largest size <= 32768."""
    sizes = wht_sizes(32768)
    assert len(sizes) == len(set(sizes)) == 247
    assert {hadamard_order(n)[0] for n in sizes} == set(SUPPORTED_ORDERS)
    for k in SUPPORTED_ORDERS:
        largest = max(n for n in sizes if hadamard_order(n)[0] == k)
        assert 2 * largest > 32768 or hadamard_order(2 * largest)[0] != k, k
    assert {576, 1536, 4096, 11008, 14336, 18944} <= set(sizes)


def test_init_device_option_is_checked():
    from qwha_export.initialise import InitJob

    with pytest.raises(ValueError, match="device must be a torch device"):
        InitJob(model="m", out="o", device="nope")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            InitJob(model="m", out="o", device="cuda")
    assert InitJob(model="m", out="o").device == "cpu"
