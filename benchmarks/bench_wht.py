"""WHT speed, side by side in one run.

``--device cpu`` (default): our ``wht`` vs a dense ``x @ M.T`` matmul vs the torch implementation (``wht_torch``,
which ``wht`` dispatches to on CPU); milliseconds per call, effective GB/s and the speed-up over the dense matmul.

``--device cuda``: the Triton WHT (``wht_triton``, what ``wht`` runs on CUDA) against a device-to-device copy of the
same bytes (``y.copy_(x)``: the bandwidth ceiling of a transform that reads its input once and writes its output
once) and against Dao-AILab's ``fast_hadamard_transform`` where it is importable and has the size (power-of-two
sizes and its 12/20/28/40 x 2^m variants). GB/s counts the bytes read plus written (``2 * rows * n * itemsize``);
times are medians of ``triton.testing.do_bench`` (L2 flushed before every call), all measured in the same run.
Before timing, each size's Triton output is checked against the float64 torch transform (and against
``fast_hadamard_transform`` for power-of-two sizes, where both use the Sylvester order). Goals (printed, and in
``--json``): Triton >= 85% of copy bandwidth at >= 4096 rows for n = 4096 and 14336; >= 1.0x the speed of
``fast_hadamard_transform`` where both run. A size whose kernel fails (e.g. does not compile or launch) is recorded
with its error and the run goes on.

``fast_hadamard_transform`` on PyPI is source-only (versions 1.0.0.post1 to 1.1.0, 6-8 kB sdists without the CUDA
sources; its setup.py downloads a prebuilt wheel from GitHub releases or builds with nvcc), so it can only be
compared where it is already installed.

    python benchmarks/bench_wht.py [--device cpu|cuda] [--sizes 4096 11008 14336] [--rows 1 64 1024 8192]
        [--dtypes float32] [--json results.json] [--dry-run]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import add_report_args, finish_dry_run, goal, print_goals, write_json  # noqa: E402
from _timing import median_time  # noqa: E402

from qwha_export.kernels import hadamard_matrix, hadamard_order, is_supported_size, wht  # noqa: E402
from qwha_export.kernels.transform import wht_torch  # noqa: E402

CUDA_ROWS = [1, 16, 256, 1024, 4096, 16384, 65536]  # 1 and multiples of 16: two kernel specialisations
GOAL_SIZES = (4096, 14336)
GOAL_MIN_ROWS = 4096
FHT_VARIANTS = {1: "hadamard_transform", 12: "hadamard_transform_12N", 20: "hadamard_transform_20N",
                28: "hadamard_transform_28N", 40: "hadamard_transform_40N"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 11008, 14336])
    ap.add_argument("--rows", type=int, nargs="+", default=None,
                    help=f"row counts (default: 1 64 1024 8192 on CPU; {' '.join(map(str, CUDA_ROWS))} on CUDA)")
    ap.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "float16", "bfloat16"],
                    help="default: float32 on CPU; bfloat16 float16 on CUDA")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds of repeats per CPU measurement (default 1.0); ms per CUDA measurement (default 100)")
    add_report_args(ap)
    args = ap.parse_args(argv)
    for n in args.sizes:
        if not is_supported_size(n) or n > 32768:
            ap.error(f"--sizes: {n} is not a supported transform size K*2^m <= 32768")
    args.rows = args.rows or (CUDA_ROWS if args.device == "cuda" else [1, 64, 1024, 8192])
    if min(args.rows) < 1:
        ap.error(f"--rows must be positive, got {min(args.rows)}")
    args.dtypes = args.dtypes or (["bfloat16", "float16"] if args.device == "cuda" else ["float32"])
    if args.device == "cpu" and args.dtypes != ["float32"]:
        ap.error("--dtypes: the CPU comparison runs float32 only")
    return args


def cpu_table(args: argparse.Namespace) -> None:
    budget = 1.0 if args.budget is None else args.budget
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype float32")
    header = (
        f"{'device':6} {'n':>6} {'rows':>5} | {'wht ms':>9} {'GB/s':>7} | {'torch ms':>9} | {'dense ms':>9}"
        f" | {'dense/wht':>9}"
    )
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        m = hadamard_matrix(n, dtype=torch.float32)
        for rows in args.rows:
            x = torch.randn(rows, n)
            t_wht = median_time(lambda x=x: wht(x), "cpu", budget_s=budget)
            t_bfly = median_time(lambda x=x: wht_torch(x), "cpu", budget_s=budget)
            t_dense = median_time(lambda x=x, m=m: x @ m.T, "cpu", min_runs=1, budget_s=budget)
            gbs = 2 * x.numel() * x.element_size() / t_wht / 1e9
            print(
                f"{'cpu':6} {n:>6} {rows:>5} | {t_wht * 1e3:>9.3f} {gbs:>7.2f} | {t_bfly * 1e3:>9.3f} |"
                f" {t_dense * 1e3:>9.3f} | {t_dense / t_wht:>8.1f}x"
            )
        del m


def fast_hadamard() -> tuple[dict[int, object], str]:
    """``({K: function}, status)`` of Dao-AILab's fast_hadamard_transform, empty when it cannot be imported."""
    if importlib.util.find_spec("fast_hadamard_transform") is None:
        return {}, "not installed (PyPI has only source distributions that need nvcc or GitHub release wheels)"
    try:
        import fast_hadamard_transform as fht
        from fast_hadamard_transform import fast_hadamard_transform_interface as iface
    except Exception as e:  # installed but broken (e.g. built for another torch)
        return {}, f"not importable: {type(e).__name__}: {e}"
    fns = {k: getattr(fht, name, None) or getattr(iface, name, None) for k, name in FHT_VARIANTS.items()}
    fns = {k: f for k, f in fns.items() if f is not None}
    return fns, f"version {getattr(fht, '__version__', '?')}, variants K in {sorted(fns)}"


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((a.double() - ref).abs().max() / ref.abs().max())


def cuda_records(args: argparse.Namespace, device: str = "cuda", on_record=None) -> tuple[list[dict], str]:
    """Every measurement; ``on_record(records, status)`` after each one."""
    from triton.testing import do_bench

    from qwha_export.kernels.triton_wht import wht_triton

    rep = 100 if args.budget is None else args.budget
    fht, fht_status = fast_hadamard()
    print(f"fast_hadamard_transform: {fht_status}")

    def bench(fn) -> float:
        return do_bench(fn, warmup=max(5, rep // 4), rep=rep, return_mode="median") * 1e-3

    records = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for n in args.sizes:
            k, _ = hadamard_order(n)
            fht_fn = fht.get(k)
            base = {"n": n, "K": k, "dtype": dtype_name}
            try:
                x = torch.randn(64, n, device=device).to(dtype)
                check = {"err_vs_float64": _rel_err(wht_triton(x), wht_torch(x.double()))}
                if fht_fn is not None and k == 1:
                    check["err_vs_fast_hadamard_transform"] = _rel_err(wht_triton(x), fht_fn(x))
                if x.is_cuda:
                    torch.cuda.synchronize()
            except Exception as e:
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                print(f"  n={n} {dtype_name}: Triton WHT failed: {msg}")
                records.append({**base, "error": msg})
                if on_record is not None:
                    on_record(records, fht_status)
                continue
            for rows in args.rows:
                x = torch.randn(rows, n, device=device).to(dtype)
                y = torch.empty_like(x)
                nbytes = 2 * x.numel() * x.element_size()
                rec = {**base, "rows": rows, "bytes": nbytes, **check}
                rec["triton_s"] = bench(lambda x=x: wht_triton(x))
                rec["copy_s"] = bench(lambda x=x, y=y: y.copy_(x))
                rec["triton_gbs"], rec["copy_gbs"] = nbytes / rec["triton_s"] / 1e9, nbytes / rec["copy_s"] / 1e9
                rec["triton_over_copy_bw"] = rec["copy_s"] / rec["triton_s"]
                if fht_fn is not None:
                    rec["fht_s"] = bench(lambda x=x, f=fht_fn: f(x))
                    rec["fht_gbs"] = nbytes / rec["fht_s"] / 1e9
                    rec["triton_speedup_over_fht"] = rec["fht_s"] / rec["triton_s"]
                fht_txt = (f" | fht {rec['fht_s'] * 1e3:9.3f} ms {rec['fht_gbs']:7.1f} GB/s "
                           f"x{rec['triton_speedup_over_fht']:.2f}" if fht_fn is not None else "")
                print(f"  n={n:>5} {dtype_name:>8} rows={rows:>6} | triton {rec['triton_s'] * 1e3:9.3f} ms "
                      f"{rec['triton_gbs']:7.1f} GB/s | copy {rec['copy_gbs']:7.1f} GB/s | "
                      f"{100 * rec['triton_over_copy_bw']:5.1f}% of copy{fht_txt}", flush=True)
                records.append(rec)
                if on_record is not None:
                    on_record(records, fht_status)
                del x, y
            torch.cuda.empty_cache()
    return records, fht_status


def cuda_goals(records: list[dict]) -> list[dict]:
    goals = []
    for n in GOAL_SIZES:
        big = [r for r in records if r["n"] == n and r.get("rows", 0) >= GOAL_MIN_ROWS and "triton_s" in r]
        failed = [r for r in records if r["n"] == n and "error" in r]
        value = min((r["triton_over_copy_bw"] for r in big), default=None)
        detail = (f"min over {len(big)} configs (rows >= {GOAL_MIN_ROWS}, dtypes "
                  f"{sorted({r['dtype'] for r in big})})" if big else "")
        if failed:
            detail += f"; kernel failed for {[r['dtype'] for r in failed]}: {failed[0]['error']}"
        goals.append(goal(f"Triton WHT bandwidth / copy bandwidth, n={n}", value, 0.85, True, detail))
    both = [r for r in records if "triton_speedup_over_fht" in r]
    value = min((r["triton_speedup_over_fht"] for r in both), default=None)
    detail = "fast_hadamard_transform not available"
    if both:
        med = statistics.median(r["triton_speedup_over_fht"] for r in both)
        detail = f"min over {len(both)} configs (median {med:.2f})"
    goals.append(goal("Triton WHT speed / fast_hadamard_transform speed", value, 1.0, True, detail))
    return goals


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        finish_dry_run("bench_wht", [
            f"device {args.device}, sizes {args.sizes}, rows {args.rows}, dtypes {args.dtypes}",
            f"{len(args.sizes) * len(args.rows) * len(args.dtypes)} configurations",
        ])
    if args.device == "cpu":
        cpu_table(args)
        return
    if not torch.cuda.is_available():
        sys.exit("bench_wht: --device cuda but no CUDA device is available")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    def save(records: list[dict], fht_status: str, complete: bool = False) -> None:
        write_json(args.json, {"benchmark": "bench_wht", "args": {k: v for k, v in vars(args).items() if k != "json"},
                               "fast_hadamard_transform": fht_status, "records": records,
                               "goals": cuda_goals(records)}, complete)

    records, fht_status = cuda_records(args, on_record=save)
    print_goals(cuda_goals(records))
    save(records, fht_status, complete=True)


if __name__ == "__main__":
    main()
