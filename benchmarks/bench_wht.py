"""WHT speed, side by side in one run: our `wht` vs a dense `x @ M.T` matmul vs the torch
implementation (`wht_torch`, which `wht` dispatches to on CPU).

CPU always; CUDA too when present (there `wht` runs the Triton kernel). Prints a table with milliseconds per call,
effective GB/s (bytes read + written by the transform) and speed-up of `wht` over the dense matmul.

    python benchmarks/bench_wht.py [--sizes 4096 11008 14336] [--rows 1 64 1024 8192] [--dtype float32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_time  # noqa: E402

from qwha_export.kernels import hadamard_matrix, wht  # noqa: E402
from qwha_export.kernels.transform import wht_torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 11008, 14336])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 1024, 8192])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per measurement")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {args.dtype}")
    header = (
        f"{'device':6} {'n':>6} {'rows':>5} | {'wht ms':>9} {'GB/s':>7} | {'torch ms':>9} | {'dense ms':>9}"
        f" | {'dense/wht':>9}"
    )
    print(header)
    print("-" * len(header))
    for device in devices:
        if device == "cpu" and dtype != torch.float32:
            continue
        for n in args.sizes:
            m = hadamard_matrix(n, dtype=dtype, device=device)
            for rows in args.rows:
                x = torch.randn(rows, n, device=device, dtype=dtype)
                t_wht = median_time(lambda x=x: wht(x), device, budget_s=args.budget)
                t_bfly = median_time(lambda x=x: wht_torch(x), device, budget_s=args.budget)
                t_dense = median_time(lambda x=x, m=m: x @ m.T, device, min_runs=1, budget_s=args.budget)
                gbs = 2 * x.numel() * x.element_size() / t_wht / 1e9
                print(
                    f"{device:6} {n:>6} {rows:>5} | {t_wht * 1e3:>9.3f} {gbs:>7.2f} | {t_bfly * 1e3:>9.3f} |"
                    f" {t_dense * 1e3:>9.3f} | {t_dense / t_wht:>8.1f}x"
                )
            del m


if __name__ == "__main__":
    main()
