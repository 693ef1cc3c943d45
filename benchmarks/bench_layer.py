"""QWHA layer training step (forward + backward), side by side in one run, against two alternatives on the SAME
frozen quantized base (4-bit, group 64 RTN of a random ``N(0, 0.02)`` weight, held by one shared ``QuantLinear``):

* **QWHA**: :class:`qwha_export.layer.QWHALinear`, budget ``p = r * (d_in + d_out)`` (``--rank``, default 64) with
  a random support (the same number of entries in every output channel up to one, random Walsh indices). The
  adapter runs on activations, ``y += c * wht(x) @ F.T``, never building ``Delta W``: Triton kernels on CUDA,
  torch sparse ops on CPU.
* **LoRA**: a peft LoRA layer with the same number of trainable parameters, ``r_lora = p / (d_in + d_out)``
  (``= --rank``): :class:`qwha_export.lora_baseline.QuantLoraLinear`, the layer peft's ``get_peft_model`` injects
  for a ``QuantLinear`` target through the custom module mapping (``quant_lora_config``).
* QWHA's form (activation side or dense Delta W, :func:`qwha_export.kernels.choose_form`) is chosen per call from
  the token count; the "form" column says which one ran.
* **dense-Delta W**: the formulation that materialises the delta every step, with autograd: ``F`` dense by
  ``index_put`` of the trainable values, ``Delta W = c * hadamard_transform(F, transpose=True)`` (i.e. ``c * F @ M``),
  then ``F.linear(x, W_deq + Delta W)``; all in the compute dtype.

One "step" is ``y = layer(x); y.backward(dy)`` with ``x`` requiring grad (as inside a network; ``--no-input-grad``
drops the input gradient), gradients reset to ``None`` before each step. Timing is interleaved: after one warm-up
call each, every round runs QWHA, LoRA, dense-Delta W once in turn; the table reports the median over rounds, so
load from other processes hits the three alike. Before timing, QWHA and dense-Delta W outputs are compared (they
compute the same function) and the relative max difference is printed.

Shapes are ``d_in x d_out`` (e.g. ``4096x14336`` is an up_proj: 4096 inputs, 14336 outputs). Tokens = batch x seq.
CPU default: tokens 512 only (about a minute on 2 cores); 16 x 512 = 8192 tokens costs about 100 s per QWHA step
for 4096x4096 on 2 CPU cores (pass ``--tokens 512 8192``; ``--rounds 1 --budget 0`` to keep it short). CUDA (when
present): tokens 1x512, 4x2048 and 16x2048, compute dtype ``--cuda-dtype`` (default bfloat16); goal (printed, and in
``--json``): QWHA step <= 1.1x the LoRA step at 4x2048 tokens. ``--dry-run`` only checks the arguments. On a loaded
machine ``--threads 1`` gives steadier numbers (oversubscribed OpenMP threads make the many small ops erratic).

    python benchmarks/bench_layer.py [--shapes 4096x4096 4096x14336] [--tokens 512 4x2048] [--devices cpu cuda]
        [--json results.json] [--dry-run]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from qwha_export.converters.quantize import quantize_rtn
from qwha_export.converters.qwha_init import allocate_budget
from qwha_export.kernels import choose_form, hadamard_transform
from qwha_export.layer import QWHALinear, adapter_coefficient
from qwha_export.quant_linear import QuantLinear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import add_report_args, finish_dry_run, goal, print_goals, write_json  # noqa: E402

CUDA_TOKENS = [(1, 512), (4, 2048), (16, 2048)]
# QWHA step / LoRA step goals: {device: [(tokens, at most)]}; CUDA <= 1.1x at 4 x 2048 tokens, CPU <= 1.3x at 512
# and <= 1.5x at 8,192 tokens (the paper-table issue's faster CPU step)
LAYER_GOALS = {"cuda": [(4 * 2048, 1.1)], "cpu": [(512, 1.3), (4 * 2048, 1.5)]}


class DenseDeltaLinear(nn.Module):
    """``F.linear(x, W_deq + c * dense(F) @ M)``: the delta rebuilt from the trainable values every call."""

    def __init__(self, base: QuantLinear, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, scale: float):
        super().__init__()
        self.base = base
        self.out_features, self.in_features = base.out_features, base.in_features
        self.spectrum = nn.Parameter(values.detach().to(torch.float32).clone())
        self.register_buffer("rows", rows.long())
        self.register_buffer("cols", cols.long())
        self.coefficient = adapter_coefficient(scale, self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base.weight  # cached dequantized weight, compute dtype, frozen
        f = torch.zeros(self.out_features, self.in_features, dtype=w.dtype, device=w.device)
        f = f.index_put((self.rows, self.cols), self.spectrum.to(w.dtype))
        delta = self.coefficient * hadamard_transform(f, transpose=True)
        return F.linear(x.to(w.dtype), w + delta.to(w.dtype), self.base.bias).to(x.dtype)


def random_support(d_out: int, d_in: int, total: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform budgets (``allocate_budget`` with equal norms) and random Walsh indices per channel, sorted."""
    budgets = allocate_budget(torch.ones(d_out, dtype=torch.float64), total, d_in)
    order = torch.rand(d_out, d_in, generator=gen).argsort(dim=1)
    width = int(budgets.max())
    order = order[:, :width].sort(dim=1).values
    keep = torch.arange(width)[None, :] < budgets[:, None]
    rows = torch.arange(d_out)[:, None].expand(d_out, width)[keep]
    return rows, order[keep]


def build_lora(base: QuantLinear, r: int) -> nn.Module:
    """peft LoRA on the QuantLinear base: the layer ``get_peft_model(model, quant_lora_config(...))`` injects."""
    from qwha_export.lora_baseline import QuantLoraLinear, quant_lora_config

    config = quant_lora_config(r=r, lora_alpha=2 * r, lora_dropout=0.0)
    return QuantLoraLinear(base, "default", config=config, r=r, lora_alpha=2 * r)


def trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def interleaved_medians(fns: list, device: str, rounds: int, budget_s: float) -> list[float]:
    """One warm-up call each, then rounds of one timed call per function in turn; median seconds per function."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for fn in fns:
        fn()
        sync()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    n = 0
    while n < rounds or (time.perf_counter() - start < budget_s and n < 50):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            sync()
            times[i].append(time.perf_counter() - t0)
        n += 1
    return [statistics.median(t) for t in times]


def parse_shape(text: str) -> tuple[int, int]:
    try:
        d_in, d_out = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 4096x14336 (d_in x d_out), got {text!r}") from None
    return d_in, d_out


def parse_tokens(text: str) -> tuple[int, int]:
    """``"4x2048"`` -> (4, 2048) (batch x sequence); a plain count ``"512"`` -> (1, 512)."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = [1, *parts]
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"tokens must look like 4x2048 (batch x seq) or 512, got {text!r}") from None
    return parts[0], parts[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=parse_shape, nargs="+", default=[(4096, 4096), (4096, 14336)],
                    help="d_in x d_out, e.g. 4096x14336 (default: 4096x4096 4096x14336)")
    ap.add_argument("--tokens", type=parse_tokens, nargs="+", default=None,
                    help="batch x seq, e.g. 4x2048, or a token count (default: 512 on CPU; 1x512 4x2048 16x2048 on "
                         "CUDA)")
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    ap.add_argument("--rank", type=int, default=64, help="QWHA budget p = rank * (d_in + d_out); LoRA rank = rank")
    ap.add_argument("--cuda-dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=3, help="minimum timed rounds (after one warm-up) per config")
    ap.add_argument("--budget", type=float, default=2.0, help="keep adding rounds until this many seconds are spent")
    ap.add_argument("--no-input-grad", action="store_true", help="x does not require grad (no dL/dx)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    add_report_args(ap)
    args = ap.parse_args()
    bad = [d for d in args.devices or () if d not in ("cpu", "cuda")]
    if bad:
        ap.error(f"--devices: choose cpu and/or cuda, got {bad[0]!r}")
    if args.dry_run:
        finish_dry_run("bench_layer", [
            f"devices {args.devices or 'cpu (+ cuda when available)'}, shapes {args.shapes}, rank {args.rank}",
            f"tokens {args.tokens or f'CPU [(1, 512)], CUDA {CUDA_TOKENS}'}, CUDA dtype {args.cuda_dtype}",
        ])
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    if "cuda" in devices and not torch.cuda.is_available():
        sys.exit("bench_layer: --devices cuda but no CUDA device is available")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, rank {args.rank}, "
          f"input grad {not args.no_input_grad}, rounds >= {args.rounds} (interleaved, median)")
    print("LoRA = qwha_export.lora_baseline.QuantLoraLinear (peft lora.Linear on the QuantLinear base)")
    header = (
        f"{'d_in->d_out':>12} {'tokens':>6} {'device':>6} {'dtype':>8} | {'QWHA ms':>9} {'LoRA ms':>9} "
        f"{'dense-dW ms':>11} | {'QWHA/LoRA':>9} {'QWHA/dense':>10} | {'QWHA params':>11} {'LoRA params':>11} "
        f"{'dense params':>12} {'form':>10}"
    )
    rows_out: list[str] = []
    checks: list[str] = []
    records: list[dict] = []
    t_total = time.perf_counter()
    for device in devices:
        dtype = torch.float32 if device == "cpu" else getattr(torch, args.cuda_dtype)
        token_list = args.tokens or ([(1, 512)] if device == "cpu" else CUDA_TOKENS)
        for d_in, d_out in args.shapes:
            gen = torch.Generator().manual_seed(args.seed)
            w = torch.randn(d_out, d_in, generator=gen) * 0.02
            base = QuantLinear(quantize_rtn(w, 4, 64), dtype=dtype).to(device)
            del w
            total = args.rank * (d_in + d_out)
            rows, cols = random_support(d_out, d_in, total, gen)
            values = torch.randn(rows.numel(), generator=gen) * 0.01
            qwha = QWHALinear(base, values, rows, cols, scale=1.0).to(device)
            r_lora = total // (d_in + d_out)
            lora = build_lora(base, r_lora).to(device)
            dense = DenseDeltaLinear(base, values, rows, cols, scale=1.0).to(device)
            layers = {"QWHA": qwha, "LoRA": lora, "dense": dense}
            counts = {k: sum(p.numel() for p in trainable(m)) for k, m in layers.items()}
            for batch, seq in token_list:
                tokens = batch * seq
                x = torch.randn(tokens, d_in, generator=gen).to(device=device, dtype=dtype)
                x.requires_grad_(not args.no_input_grad)
                dy = torch.randn(tokens, d_out, generator=gen).to(device=device, dtype=dtype)
                with torch.no_grad():
                    yq, yd = qwha(x).float(), dense(x).float()
                    rel = float((yq - yd).abs().max() / yd.abs().max())
                    del yq, yd
                checks.append(f"{d_in}->{d_out} {tokens} {device}: max|y_QWHA - y_dense| / max|y| = {rel:.2e}")

                def step(module: nn.Module, x=x, dy=dy) -> None:
                    for p in trainable(module):
                        p.grad = None
                    x.grad = None
                    module(x).backward(dy)

                fns = [lambda m=m: step(m) for m in layers.values()]
                t_q, t_l, t_d = interleaved_medians(fns, device, args.rounds, args.budget)
                line = (
                    f"{f'{d_in}->{d_out}':>12} {tokens:>6} {device:>6} {str(dtype).removeprefix('torch.'):>8} | "
                    f"{t_q * 1e3:>9.1f} {t_l * 1e3:>9.1f} {t_d * 1e3:>11.1f} | {t_q / t_l:>8.2f}x {t_q / t_d:>9.2f}x | "
                    f"{counts['QWHA']:>11,} {counts['LoRA']:>11,} {counts['dense']:>12,} "
                    f"{choose_form(tokens, d_in, d_out, rows.numel(), device):>10}"
                )
                rows_out.append(line)
                records.append({
                    "d_in": d_in, "d_out": d_out, "batch": batch, "seq": seq, "tokens": tokens, "device": device,
                    "dtype": str(dtype).removeprefix("torch."), "qwha_s": t_q, "lora_s": t_l, "dense_s": t_d,
                    "qwha_over_lora": t_q / t_l, "qwha_over_dense": t_q / t_d, "rel_diff_qwha_dense": rel,
                    "params": counts, "form": choose_form(tokens, d_in, d_out, rows.numel(), device),
                })
                save(args, records)
                so_far = time.perf_counter() - t_total
                print(f"  {line}   ({so_far:.0f} s so far)", flush=True)
                del x, dy
            del qwha, lora, dense, base, layers
            if device == "cuda":
                torch.cuda.empty_cache()
    print()
    print(header)
    print("-" * len(header))
    for line in rows_out:
        print(line)
    print()
    for c in checks:
        print(c)
    print_goals(layer_goals(records))
    print(f"total {time.perf_counter() - t_total:.0f} s")
    save(args, records, complete=True)


def layer_goals(records: list[dict]) -> list[dict]:
    goals = []
    for device in sorted({r["device"] for r in records}):
        for tokens, most in LAYER_GOALS.get(device.split(":")[0], []):
            at = [r for r in records if r["device"] == device and r["tokens"] == tokens]
            value = max((r["qwha_over_lora"] for r in at), default=None)
            detail = "max of " + ", ".join(f"{r['d_in']}->{r['d_out']}: {r['qwha_over_lora']:.2f}x" for r in at)
            goals.append(goal(f"QWHA / LoRA layer step at {tokens} tokens, {device}", value, most, False,
                              detail if at else f"{tokens} tokens not run"))
    return goals


def save(args: argparse.Namespace, records: list[dict], complete: bool = False) -> None:
    write_json(args.json, {"benchmark": "bench_layer", "args": {k: v for k, v in vars(args).items() if k != "json"},
                           "records": records, "goals": layer_goals(records)}, complete)


if __name__ == "__main__":
    main()
