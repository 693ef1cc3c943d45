"""QWHA initialisation time and peak memory, side by side in one run: the shipped streamed ``init_layer`` against
the one-shot whole-layer formulation it replaced and the per-channel Python loop of the published code.

Variants (same budgets, supports and values; the parent prints their differences):

* **streamed** = what ``init_layer`` runs: :func:`select_support` (everything over output-channel blocks in the
  transformed basis: one ``G_hat = M G_d M^T`` buffer, ``E G_d M^T = Ê G_hat / n``), :func:`refine_values`
  (channels with equal budgets solved together, batched Cholesky) and :func:`report_errors` (block by block);
* **whole** = the former one-shot formulation, kept here as the baseline: damped ``G``, ``E G``, AdaAlloc budgets,
  ``G_hat``, the full error spectrum and its sort order, ``E G M^T``, then the same :func:`refine_values` and an
  error report on dense ``W``, ``E`` and ``Delta W``;
* **loop** = the whole selection, then :func:`refine_values_loop` (one ``torch.linalg.solve`` per output channel),
  no report.

Cases:

* ``smollm2``: SmolLM2-135M-Instruct, rank 64, 4-bit group-64 RTN, all 7 target linears of all 30 blocks (210
  layers); grams ``X^T X`` from ``--calib-tokens`` (1024) Lee-corpus tokens via ``iter_block_grams(...,
  sequential=False)``. The loop variant runs on the blocks given by ``--loop-blocks`` (default: all; pass e.g.
  ``--loop-blocks 1`` for block 0 only, then its total is extrapolated linearly in the number of blocks).
* ``synthetic``: one ``d_out=4096, d_in=14336`` layer (a down_proj shape; ``--synthetic-shape``), weight
  ``N(0, 0.02)``, 4-bit g64 RTN, gram from ``--synthetic-rows`` (2048) random correlated activation rows (low-rank
  factor plus heteroscedastic noise), computed in float64. ``--loop-channels N`` restricts the loop to the first N
  output channels and extrapolates its refinement time linearly in channels (default: all channels).

Memory: each variant runs in its own worker subprocess (this script with ``--worker``) that first loads the
prepared layers, so the variants cannot contaminate each other. Around each phase of each layer the worker resets
the kernel's peak-RSS mark (``/proc/self/clear_refs``; it also resets ``ru_maxrss``) and reads ``VmHWM`` after:
'peak RSS' is the worker's peak (loaded layers and their grams included), 'init +' the largest peak above the RSS
at the start of a layer (what one layer's initialisation adds to its inputs), 'select +' / 'refine +' / 'report +'
the same per phase. glibc keeps freed blocks below its dynamic mmap threshold (at most 32 MiB) for reuse, so for
small layers (SmolLM2) these increments can be understated by up to a few tens of MiB; for the 4096 x 14336 layer
every big buffer is mmapped and the numbers are exact to the page.

Timing is interleaved: the parent hands the layers to the workers in turn (variant order rotated every layer), so
load from other processes hits all alike. ``--threads 1`` gives steadier numbers on a loaded 2-core machine
(oversubscribed OpenMP threads make small ops erratic).

    python benchmarks/bench_init.py [--cases smollm2 synthetic] [--loop-blocks 1] [--loop-channels 512]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qwha_export.converters.quantize import quantize_rtn
from qwha_export.converters.qwha_init import (
    InitConfig,
    Support,
    allocate_budget,
    init_layer,
    output_error,
    refine_values,
    refine_values_loop,
    report_errors,
    select_support,
    spectral_delta_rows,
)
from qwha_export.kernels import dense_delta, hadamard_transform

VARIANTS = ("streamed", "whole", "loop")


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    raise KeyError(field)


class MemProbe:
    """Peak RSS of a code section: reset the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``, which also
    resets ``ru_maxrss``), run the section, read ``VmHWM``. Without that file (not Linux, no permission) the peaks
    fall back to the process-wide ``ru_maxrss`` and the per-phase splits are reported as nan."""

    def __init__(self) -> None:
        try:
            self.reset()
            _proc_status_mib("VmHWM")
            self.ok = True
        except OSError:
            self.ok = False

    @staticmethod
    def reset() -> None:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")

    def start(self) -> float:
        """Reset the high-water mark; return the current RSS in MiB."""
        if not self.ok:
            return math.nan
        self.reset()
        return _proc_status_mib("VmRSS")

    def peak(self) -> float:
        if not self.ok:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB
        return _proc_status_mib("VmHWM")


# ------------------------------------------------------------------------------------------------------------------
# the timed math (identical to init_layer's adaalloc path up to the refinement)


def whole_select(weight: torch.Tensor, w_deq: torch.Tensor, gram: torch.Tensor, config: InitConfig) -> Support:
    """The one-shot formulation (the baseline ``select_support`` replaced): every float64 matrix at once."""
    w = weight.detach().to(torch.float64)
    e = w - w_deq.detach().to(torch.float64)
    d_out, d_in = e.shape
    g = gram.to(torch.float64)
    g = 0.5 * (g + g.T)
    g = g + config.damp_ratio * float(g.diagonal().mean()) * torch.eye(d_in, dtype=torch.float64)
    coefficient = config.scale / (d_in * math.sqrt(d_out))
    eg = e @ g
    norms = ((eg * e).sum(1)).clamp_min(0).sqrt()
    budgets = allocate_budget(norms, config.budget(d_out, d_in), d_in, config.temperature)
    g_hat = hadamard_transform(hadamard_transform(g).T.contiguous())
    spectrum = hadamard_transform(e) / (d_in * coefficient)
    importance = spectrum.abs() * g_hat.diagonal().clamp_min(0).sqrt()[None, :]
    order = torch.argsort(importance, dim=1, descending=True, stable=True)
    keep = torch.arange(d_in)[None, :] < budgets[:, None]
    rows = torch.arange(d_out)[:, None].expand_as(order)[keep]
    cols = order[keep]
    key = torch.argsort(rows * d_in + cols)
    del spectrum, importance, order, keep, e, w, g
    return Support(rows[key], cols[key], budgets, hadamard_transform(eg), g_hat, coefficient)


def whole_report(weight: torch.Tensor, w_deq: torch.Tensor, support: Support, values: torch.Tensor,
                 gram: torch.Tensor) -> dict[str, float]:
    """The former report: dense float64 ``W``, ``E`` and ``Delta W``, three whole output errors."""
    w = weight.detach().to(torch.float64)
    e = w - w_deq.detach().to(torch.float64)
    delta = dense_delta(values, support.rows, support.cols, *e.shape, support.coefficient)
    ref = output_error(w, gram)
    before, after = output_error(e, gram), output_error(e - delta, gram)
    return {"rel_err_before_calib": before / ref, "rel_err_after_calib": after / ref}


def run_unit(
    variant: str, unit: dict, grams: dict, config: InitConfig, channels: int | None, mem: MemProbe | None = None
) -> tuple[torch.Tensor, dict, dict]:
    """Selection, refinement and (streamed, whole) report of one layer: ``(values, seconds, memory)``, seconds per
    phase ``select``/``refine``/``report``; memory in MiB when ``mem`` is given: per phase the peak above the RSS
    at its start, ``unit`` = peak above the RSS at the start of the layer, ``peak`` = absolute peak RSS."""
    gram = grams[unit["gram"]]
    times: dict[str, float] = {}
    memory: dict[str, float] = {}
    r_unit = mem.start() if mem else math.nan
    peaks: list[float] = []

    def phase(name: str, fn):
        r0 = mem.start() if mem else math.nan
        t0 = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t0
        h = mem.peak() if mem else math.nan
        peaks.append(h)
        memory[name] = h - r0
        return out

    select = select_support if variant == "streamed" else whole_select
    support = phase("select", lambda: select(unit["weight"], unit["w_deq"], gram, config))
    if variant == "loop":
        rows, cols, e_hat = support.rows, support.cols, support.e_hat
        if channels is not None and channels < e_hat.shape[0]:
            keep = rows < channels  # rows are sorted: these are the first entries
            rows, cols, e_hat = rows[keep], cols[keep], e_hat[:channels]
        values = phase("refine", lambda: refine_values_loop(rows, cols, e_hat, support.g_hat, support.coefficient,
                                                            config.ridge))
        times["report"] = memory["report"] = 0.0
    else:
        values = phase("refine", lambda: refine_values(support.rows, support.cols, support.e_hat, support.g_hat,
                                                       support.coefficient, config.ridge, config.max_solve_bytes))
        support.e_hat = support.g_hat = None
        if variant == "streamed":
            delta_rows = spectral_delta_rows(support, values)
            phase("report", lambda: report_errors(unit["weight"], unit["w_deq"], delta_rows, {"calib": gram},
                                                  config.block_bytes))
        else:
            phase("report", lambda: whole_report(unit["weight"], unit["w_deq"], support, values, gram))
    memory["unit"] = max(peaks) - r_unit
    memory["peak"] = max(peaks)
    return values, times, memory


def worker(args: argparse.Namespace) -> None:
    """Load the prepared layers this variant needs, then answer one JSON line per unit index read from stdin."""
    if args.threads:
        torch.set_num_threads(args.threads)
    data = torch.load(args.data, weights_only=True, mmap=False)
    config = InitConfig(**data["config"])
    wanted = {int(i) for i in args.units.split(",")} if args.units else set(range(len(data["units"])))
    units = {i: u for i, u in enumerate(data["units"]) if i in wanted}
    keys = {u["gram"] for u in units.values()}
    grams = {k: v for k, v in data["grams"].items() if k in keys}
    del data
    for t in [*grams.values(), *(x for u in units.values() for x in (u["weight"], u["w_deq"]))]:
        float(t.sum())  # touch every page
    mem = MemProbe()
    base = mem.start()
    out = Path(args.out)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line == "quit":
            break
        i = int(line)
        values, times, memory = run_unit(args.variant, units[i], grams, config, args.loop_channels, mem)
        torch.save(values, out / f"{args.variant}_{i}.pt")
        reply = {"unit": i, "times": times, "entries": values.numel(), "mem": memory}
        print(json.dumps(reply), flush=True)
    print(json.dumps({"base_mib": base, "probe": mem.ok}), flush=True)


# ------------------------------------------------------------------------------------------------------------------
# data preparation (parent)


def prepare_smollm2(calib_tokens: int, config: InitConfig) -> dict:
    from qwha_export.converters.calibration import iter_block_grams
    from qwha_export.data import calibration_and_heldout
    from qwha_export.models import load_causal_lm, smollm2_path

    model, tokenizer = load_causal_lm(smollm2_path())
    seq = 256
    calib, _ = calibration_and_heldout(tokenizer, seq_len=seq, n_calib_tokens=calib_tokens, n_eval_tokens=seq)
    units: list[dict] = []
    grams: dict[str, torch.Tensor] = {}
    for index, _, block_grams in iter_block_grams(model, calib, batch_size=4, sequential=False):
        local: list[tuple[str, torch.Tensor]] = []
        for name, gram in block_grams.items():
            key = next((k for k, g in local if torch.equal(g, gram)), None)  # q/k/v and gate/up share inputs
            if key is None:
                key = name
                local.append((key, gram))
                grams[key] = gram
            weight = model.get_submodule(name).weight.detach().float().clone()
            w_deq = quantize_rtn(weight, 4, 64).dequantize(torch.float32)
            units.append({"name": name, "block": index, "weight": weight, "w_deq": w_deq, "gram": key})
    return {"units": units, "grams": grams, "config": config.__dict__, "tokens": int(calib.numel())}


def prepare_synthetic(rows: int, d_out: int, d_in: int, config: InitConfig, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=gen) * 0.02
    w_deq = quantize_rtn(weight, 4, 64).dequantize(torch.float32)
    latent = torch.randn(rows, 64, generator=gen, dtype=torch.float64)
    mix = torch.randn(64, d_in, generator=gen, dtype=torch.float64)
    col_scale = torch.exp(0.5 * torch.randn(d_in, generator=gen, dtype=torch.float64))
    x = latent @ mix + torch.randn(rows, d_in, generator=gen, dtype=torch.float64) * 2.0 * col_scale
    gram = x.T @ x
    del x
    units = [{"name": f"synthetic {d_out}x{d_in}", "block": 0, "weight": weight, "w_deq": w_deq, "gram": "g"}]
    return {"units": units, "grams": {"g": gram}, "config": config.__dict__, "tokens": rows}


# ------------------------------------------------------------------------------------------------------------------
# parent: drive the two workers interleaved


class Worker:
    def __init__(self, variant: str, data: Path, out: Path, units: list[int], args: argparse.Namespace):
        cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--data", str(data), "--out", str(out),
               "--units", ",".join(map(str, units))]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if variant == "loop" and args.loop_channels:
            cmd += ["--loop-channels", str(args.loop_channels)]
        self.variant = variant
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, line: str) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"{self.variant} worker died (exit code {self.proc.wait()})")
        return json.loads(reply)

    def finish(self) -> dict:
        result = self.ask("quit")
        self.proc.wait()
        return result


def run_case(case: str, args: argparse.Namespace, config: InitConfig, tmp: Path) -> list[str]:
    t0 = time.perf_counter()
    if case == "smollm2":
        data = prepare_smollm2(args.calib_tokens, config)
    else:
        data = prepare_synthetic(args.synthetic_rows, *args.synthetic_shape, config)
    units = data["units"]
    n_blocks = max(u["block"] for u in units) + 1
    n_units = len(units)
    loop_blocks = n_blocks if args.loop_blocks is None else min(args.loop_blocks, n_blocks)
    loop_units = [i for i, u in enumerate(units) if u["block"] < loop_blocks]
    path = tmp / f"{case}.pt"
    torch.save(data, path)
    print(f"[{case}] prepared {len(units)} layer(s) from {data['tokens']} calibration rows in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    full_check = ""
    if case == "smollm2":  # the timed steps must give exactly init_layer's values (checked on block 0)
        diffs = []
        for u in (u for u in units if u["block"] == 0):
            ref = init_layer(u["weight"], u["w_deq"], data["grams"][u["gram"]], config)
            values, _, _ = run_unit("streamed", u, data["grams"], config, None)
            diffs.append(float((values.float() - ref.values).abs().max()))
        full_check = f"timed streamed steps vs init_layer on block 0: max abs value diff {max(diffs):.1e}"
    shapes = [(u["block"], tuple(u["weight"].shape)) for u in units]
    del data, units

    out = tmp / case
    out.mkdir()
    scope_units = {"streamed": list(range(n_units)), "whole": list(range(n_units)), "loop": loop_units}
    workers = {v: Worker(v, path, out, scope_units[v], args) for v in VARIANTS}
    res: dict[str, dict[int, dict]] = {v: {} for v in VARIANTS}
    for i in range(n_units):
        shift = i % len(VARIANTS)
        for v in VARIANTS[shift:] + VARIANTS[:shift]:
            if i in scope_units[v]:
                res[v][i] = workers[v].ask(str(i))
    for w in workers.values():
        w.finish()
    path.unlink()

    def values_diff(a: str, b: str, idx: list[int]) -> tuple[float, float]:
        """max |a - b| and max |a| on what both computed (the loop may cover only the first channels)."""
        diff, top = 0.0, 0.0
        for i in idx:
            x = torch.load(out / f"{a}_{i}.pt", weights_only=True)
            y = torch.load(out / f"{b}_{i}.pt", weights_only=True)
            x = x[: y.numel()]
            diff, top = max(diff, float((x - y).abs().max())), max(top, float(x.abs().max()))
        return diff, top

    def tot(v: str, key: str, idx: list[int]) -> float:
        return sum(res[v][i]["times"][key] for i in idx)

    all_units = list(range(n_units))
    if case == "smollm2":  # extrapolate the loop in layers (blocks)
        factor = n_blocks / loop_blocks
        scope = f"{len(loop_units)} layers"
        extrap = f"x{factor:g} (blocks)" if factor != 1 else "none (all layers timed)"
        loop_total = (tot("loop", "select", loop_units) + tot("loop", "refine", loop_units)) * factor
    else:  # extrapolate the loop's refinement in channels
        d_out = shapes[0][1][0]
        ch = min(args.loop_channels or d_out, d_out)
        factor = d_out / ch
        scope = f"{ch} of {d_out} channels"
        extrap = f"refine time x{factor:g} (channels)" if factor != 1 else "none (all channels timed)"
        loop_total = tot("loop", "select", loop_units) + tot("loop", "refine", loop_units) * factor

    def mem_cols(v: str) -> str:
        m = [r["mem"] for r in res[v].values()]
        return " ".join(f"{max(x[k] for x in m):>9.0f}" for k in ("peak", "unit", "select", "refine", "report"))

    lines = [f"=== {case}: {n_units} layer(s) {sorted({s for _, s in shapes})}, rank {config.rank}, 4-bit g64 RTN, "
             f"{data_tokens_desc(case, args)} ==="]
    header = (f"{'variant':9} {'timed on':>22} | {'select s':>9} {'refine s':>9} {'report s':>9} | "
              f"{'all layers s':>12} | {'peak RSS':>9} {'init +':>9} {'select +':>9} {'refine +':>9} {'report +':>9}")
    lines += [header, "-" * len(header)]
    totals = {}
    for v in VARIANTS:
        idx = all_units if v != "loop" else loop_units
        sel, ref, rep = tot(v, "select", idx), tot(v, "refine", idx), tot(v, "report", idx)
        totals[v] = loop_total if v == "loop" else sel + ref + rep
        where = f"{n_units} layers" if v != "loop" else scope
        lines.append(f"{v:9} {where:>22} | {sel:>9.2f} {ref:>9.2f} {rep:>9.2f} | {totals[v]:>12.2f} | {mem_cols(v)}")
    peak_of = {v: max(r["mem"]["unit"] for r in res[v].values()) for v in VARIANTS}
    lines.append(
        "memory in MiB: peak RSS = of the worker, loaded layers and grams included; 'init +' = largest peak above\n"
        "  the RSS at the start of a layer; 'select +' / 'refine +' / 'report +' = the same per phase"
    )
    lines.append(f"extrapolation of the loop to all layers: {extrap} (the loop has no report)")
    lines.append(
        f"whole/streamed: time {totals['whole'] / totals['streamed']:.2f}x, 'init +' "
        f"{peak_of['whole'] / peak_of['streamed']:.2f}x; loop/streamed select+refine (extrapolated) "
        f"{totals['loop'] / (tot('streamed', 'select', all_units) + tot('streamed', 'refine', all_units)):.2f}x"
    )
    for a, b, idx in (("streamed", "whole", all_units), ("streamed", "loop", loop_units)):
        diff, top = values_diff(a, b, idx)
        lines.append(f"values {a} vs {b}: max abs diff {diff:.2e} (max |value| {top:.2e})")
    if full_check:
        lines.append(full_check)
    lines.append(f"case wall time {time.perf_counter() - t0:.0f} s")
    return lines


def data_tokens_desc(case: str, args: argparse.Namespace) -> str:
    if case == "smollm2":
        return f"grams from {args.calib_tokens} Lee-corpus tokens"
    return f"gram from {args.synthetic_rows} random correlated rows (float64)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["smollm2", "synthetic"], choices=["smollm2", "synthetic"])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--calib-tokens", type=int, default=1024, help="smollm2: Lee-corpus calibration tokens")
    ap.add_argument("--loop-blocks", type=int, default=None,
                    help="smollm2: run the loop variant on blocks 0..N-1 only and extrapolate (default: all)")
    ap.add_argument("--synthetic-shape", type=int, nargs=2, default=[4096, 14336], metavar=("D_OUT", "D_IN"),
                    help="synthetic: layer shape (default: 4096 14336)")
    ap.add_argument("--synthetic-rows", type=int, default=2048, help="synthetic: activation rows of the gram")
    ap.add_argument("--loop-channels", type=int, default=None,
                    help="synthetic: loop over the first N channels only and extrapolate (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--units", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    config = InitConfig(rank=args.rank)
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}, pid {os.getpid()}")
    report: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_init_") as tmp:
        for case in args.cases:
            report += run_case(case, args, config, Path(tmp))
            report.append("")
    print()
    print("\n".join(report))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
