"""QWHA initialisation time and peak memory, side by side in one run: our vectorised refinement against the
per-channel Python-loop formulation of the published code.

Both variants run the SAME selection (the ``adaalloc`` path of ``init_layer``, step for step: damped gram,
``E G``, AdaAlloc budgets, ``G_hat = M G M^T``, full error spectrum, top-k per channel, ``E G M^T``) and then refine
the values: **vectorised** = :func:`refine_values` (channels with equal budgets solved together, batched Cholesky),
**loop** = :func:`refine_values_loop` (one ``torch.linalg.solve`` per output channel). Only this init math is timed
(per layer, summed); the dense delta and the error report that ``init_layer`` adds afterwards are not (the parent
checks that the timed steps give exactly ``init_layer``'s values on the real model).

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
'peak RSS' is the worker's peak (loaded layers included), 'init +' the largest peak above the RSS at the start of
a layer, 'select +' / 'refine +' the same per phase. glibc keeps freed blocks below its dynamic mmap threshold
(at most 32 MiB) for reuse, so for small layers (SmolLM2) these increments can be understated by up to a few tens
of MiB; for the 4096 x 14336 layer every big buffer is mmapped and the numbers are exact to the page.

Timing is interleaved: the parent hands the layers to the two workers alternately (variant order swapped every
layer), so load from other processes hits both alike. Values: the parent prints the max abs difference between
the variants' values on what both computed. ``--threads 1`` gives steadier numbers on a loaded 2-core machine
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
    _damped,
    _select_topk,
    _transformed_gram,
    allocate_budget,
    init_layer,
    refine_values,
    refine_values_loop,
)
from qwha_export.kernels import hadamard_transform

VARIANTS = ("vectorised", "loop")


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


def select(weight: torch.Tensor, w_deq: torch.Tensor, gram: torch.Tensor, config: InitConfig):
    w = weight.detach().to(torch.float64)
    e = w - w_deq.detach().to(torch.float64)
    d_out, d_in = e.shape
    g = _damped(gram, config.damp_ratio)
    coefficient = config.scale / (d_in * math.sqrt(d_out))
    total = config.budget(d_out, d_in)
    eg = e @ g
    norms = ((eg * e).sum(1)).clamp_min(0).sqrt()
    budgets = allocate_budget(norms, total, d_in, config.temperature)
    g_hat = _transformed_gram(g)
    spectrum = hadamard_transform(e) / (d_in * coefficient)
    importance = spectrum.abs() * g_hat.diagonal().clamp_min(0).sqrt()[None, :]
    rows, cols = _select_topk(importance, budgets)
    del spectrum, importance, e, w, g
    e_hat = hadamard_transform(eg)
    return rows, cols, e_hat, g_hat, coefficient


def run_unit(
    variant: str, unit: dict, grams: dict, config: InitConfig, channels: int | None, mem: MemProbe | None = None
) -> tuple[torch.Tensor, float, float, dict]:
    """Selection then refinement of one layer: ``(values, select_s, refine_s, memory)`` (memory in MiB when
    ``mem`` is given: ``select``/``refine`` = peak above the RSS at the start of that phase, ``unit`` = peak above the
    RSS at the start of the layer, ``peak`` = absolute peak RSS of the process during the layer)."""
    r0 = mem.start() if mem else math.nan
    t0 = time.perf_counter()
    rows, cols, e_hat, g_hat, coefficient = select(unit["weight"], unit["w_deq"], grams[unit["gram"]], config)
    t1 = time.perf_counter()
    h_sel = mem.peak() if mem else math.nan
    r1 = mem.start() if mem else math.nan
    t1b = time.perf_counter()
    if variant == "vectorised":
        values = refine_values(rows, cols, e_hat, g_hat, coefficient, config.ridge, config.max_solve_bytes)
    else:
        if channels is not None and channels < e_hat.shape[0]:
            keep = rows < channels  # rows are sorted: these are the first entries
            rows, cols, e_hat = rows[keep], cols[keep], e_hat[:channels]
        values = refine_values_loop(rows, cols, e_hat, g_hat, coefficient, config.ridge)
    t2 = time.perf_counter()
    h_ref = mem.peak() if mem else math.nan
    memory = {"select": h_sel - r0, "refine": h_ref - r1, "unit": max(h_sel, h_ref) - r0, "peak": max(h_sel, h_ref)}
    return values, t1 - t0, t2 - t1b, memory


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
        values, t_sel, t_ref, memory = run_unit(args.variant, units[i], grams, config, args.loop_channels, mem)
        torch.save(values, out / f"{args.variant}_{i}.pt")
        reply = {"unit": i, "select_s": t_sel, "refine_s": t_ref, "entries": values.numel(), "mem": memory}
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
        diffs, t_full = [], 0.0
        block0 = [u for u in units if u["block"] == 0]
        for u in block0:
            t = time.perf_counter()
            ref = init_layer(u["weight"], u["w_deq"], data["grams"][u["gram"]], config)
            t_full += time.perf_counter() - t
            values, _, _, _ = run_unit("vectorised", u, data["grams"], config, None)
            diffs.append(float((values.float() - ref.values).abs().max()))
        full_check = (
            f"timed steps vs init_layer on block 0: max abs value diff {max(diffs):.1e}; the full init_layer calls "
            f"(incl. dense delta + error report) took {t_full:.2f} s for {len(block0)} layers"
        )
    shapes = [(u["block"], tuple(u["weight"].shape)) for u in units]
    del data, units

    out = tmp / case
    out.mkdir()
    workers = {
        "vectorised": Worker("vectorised", path, out, list(range(n_units)), args),
        "loop": Worker("loop", path, out, loop_units, args),
    }
    res: dict[str, dict[int, dict]] = {v: {} for v in VARIANTS}
    for i in range(n_units):
        order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]
        for v in order:
            if v == "loop" and i not in loop_units:
                continue
            res[v][i] = workers[v].ask(str(i))
    for w in workers.values():
        w.finish()
    path.unlink()

    # values on what both computed (the loop may cover only the first --loop-channels channels)
    max_diff, max_val = 0.0, 0.0
    for i in loop_units:
        a = torch.load(out / f"vectorised_{i}.pt", weights_only=True)
        b = torch.load(out / f"loop_{i}.pt", weights_only=True)
        a = a[: b.numel()]
        max_diff = max(max_diff, float((a - b).abs().max()))
        max_val = max(max_val, float(a.abs().max()))

    def tot(v: str, key: str, idx: list[int]) -> float:
        return sum(res[v][i][key] for i in idx)

    all_units = list(range(n_units))
    sel_v, ref_v = tot("vectorised", "select_s", all_units), tot("vectorised", "refine_s", all_units)
    sel_l, ref_l = tot("loop", "select_s", loop_units), tot("loop", "refine_s", loop_units)
    ref_v_common = tot("vectorised", "refine_s", loop_units)
    sel_v_common = tot("vectorised", "select_s", loop_units)
    # extrapolation: layers (blocks) for smollm2, channels for the synthetic layer
    if case == "smollm2":
        factor = n_blocks / loop_blocks
        scope = f"{len(loop_units)} layers (blocks 0..{loop_blocks - 1})"
        extrap = f"x{factor:g} (blocks)" if factor != 1 else "none (all layers timed)"
    else:
        d_out = shapes[0][1][0]
        ch = min(args.loop_channels or d_out, d_out)
        factor = d_out / ch
        scope = f"1 layer, {ch} of {d_out} channels"
        extrap = f"refine time x{factor:g} (channels)" if factor != 1 else "none (all channels timed)"
    if case == "smollm2":
        sel_l_full, ref_l_full = sel_l * factor, ref_l * factor
    else:
        sel_l_full, ref_l_full = sel_l, ref_l * factor

    def mem_cols(v: str) -> str:
        m = [r["mem"] for r in res[v].values()]
        cols = [max(x["peak"] for x in m), max(x["unit"] for x in m), max(x["select"] for x in m),
                max(x["refine"] for x in m)]
        return " ".join(f"{c:>9.0f}" for c in cols)

    lines = [f"=== {case}: {n_units} layer(s) {sorted({s for _, s in shapes})}, rank {config.rank}, 4-bit g64 RTN, "
             f"{data_tokens_desc(case, args)} ==="]
    header = (f"{'variant':10} {'timed on':>30} | {'select s':>9} {'refine s':>9} {'total s':>9} | "
              f"{'all layers s':>12} | {'peak RSS':>9} {'init +':>9} {'select +':>9} {'refine +':>9}")
    lines += [header, "-" * len(header)]
    lines.append(
        f"{'vectorised':10} {f'{n_units} layers':>30} | {sel_v:>9.2f} {ref_v:>9.2f} {sel_v + ref_v:>9.2f} | "
        f"{sel_v + ref_v:>12.2f} | {mem_cols('vectorised')}"
    )
    lines.append(
        f"{'loop':10} {scope:>30} | {sel_l:>9.2f} {ref_l:>9.2f} {sel_l + ref_l:>9.2f} | "
        f"{sel_l_full + ref_l_full:>12.2f} | {mem_cols('loop')}"
    )
    lines.append(
        "memory in MiB: peak RSS = of the worker, loaded layers included; 'init +' = largest peak above the RSS at\n"
        "  the start of a layer; 'select +' / 'refine +' = the same per phase (refine: above the selection's outputs)"
    )
    lines.append(f"extrapolation of the loop to all layers: {extrap}")
    ref_common_l = ref_l * (factor if case == "synthetic" else 1.0)
    lines.append(
        f"loop/vectorised on the same layers: refine {ref_common_l / ref_v_common:.1f}x, "
        f"select+refine {(sel_l + ref_common_l) / (sel_v_common + ref_v_common):.2f}x; "
        f"extrapolated totals {(sel_l_full + ref_l_full) / (sel_v + ref_v):.2f}x"
    )
    lines.append(f"values (loop vs vectorised, on what both computed): max abs diff {max_diff:.2e} "
                 f"(max |value| {max_val:.2e})")
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
