"""ONNX serving on SmolLM2-135M (or ``--model gemma3-270m``), side by side in one run (onnxruntime, CPU): speed and
perplexity.

Variants: fp32 ONNX (our exporter on the plain HF folder); merged int4 ONNX and fused int4 ONNX (from a QWHA
adapter: RTN 4-bit at each group size, rank 16, merged with RTN re-quantization into gptq_v2 / kept beside the base
with `fuse`, then exported), the fused one run twice: with the native qwha kernels (qwha_export.ortops, the default)
and with its ONNX function bodies (QWHA_ORT_OPS=0); the PyTorch eager fp32 model (transformers, KV cache); and the
anchor users would pick instead, the onnxruntime-genai model builder's int4 CPU export of the same base (`-p int4 -e
cpu`), run through our session class (same IO names).

For each: prefill latency of 512 tokens (one forward from an empty cache, logits for all positions), decode
tokens/s (64 greedy tokens after a short prompt; steps after the first / decode seconds), the decode step of a
batch of 4 prompts (ms per step, 16 steps), and perplexity on the first 2,048 tokens of gensim's Lee corpus (one
2,048-token sequence, full-sequence logits). Speed is measured in interleaved rounds: in each round one metric at a
time, every variant in turn, so the two sides of a ratio are measured within seconds of each other and a change in
machine load hits both alike. The table shows each variant's median over rounds; a ratio is the median over rounds
of that round's ratio, printed with its range (min-max over rounds). Each compared pair's decode is then measured
again with the pair alone (the two decode in turn, nothing else in between, as many rounds), since in the rounds
every other variant runs between them and a deployment runs one model. Then the ratios the fused export is held to,
and the bytes of weights and adapter tables a decoded token reads (the memory-traffic floor of the fused export at
accuracy level 4, where MatMulNBits is fast enough for decoding to be bound by memory).

    python benchmarks/bench_onnx.py [--group-sizes 64 128] [--quick] [--work runs/bench_onnx] [--threads 1]
    python benchmarks/bench_onnx.py --model gemma3-270m --group-sizes 64 --accuracy-levels 4 --head-bits 4

``--model`` names an embedded model (smollm2, gemma3-270m) or a HF folder; ``--head-bits 8|4`` exports our int4
variants with a quantized embedding and head (``export-onnx --head-bits``), as the builder quantizes its head.
A model without a chat template gets its prompts tokenized as plain text.

--work keeps the exported folders, so a second run only measures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_time  # noqa: E402

from qwha_export import ortops  # noqa: E402
from qwha_export.serving import GenerationConfig, OnnxCausalLM  # noqa: E402

SHORT_PROMPT = "Explain in a few sentences why the sky is blue."
N_DECODE = 64  # greedy tokens a decode measurement generates
BATCH_PROMPTS = (SHORT_PROMPT, "Write a short poem about the ocean.", "What are the three primary colors?", "Hi!")


@dataclass
class Variant:
    key: str  # "fp32", "merged-a0-g32", "fused-a4-g32", "builder", "torch"
    name: str
    group: str  # "g32" ... or "" for group-free variants
    kind: str  # "onnx" or "torch"
    path: Path | None = None
    level: str = ""  # MatMulNBits accuracy_level of int4 variants
    source: Path | None = None  # the checkpoint our ONNX variant was exported from
    runner: Any = None
    ops: str | None = None  # fused exports: "native" (the qwha kernels) or "function" (QWHA_ORT_OPS=0)
    qwha_ops: str = ""  # the path the session ran
    layout_bytes: int = 0  # bytes of the native layouts this session built
    prefill_s: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)
    batch4_s: list[float] = field(default_factory=list)
    ppl: float = float("nan")
    size_mb: float = float("nan")
    threads: int | None = None

    def open(self) -> Any:
        """The runner: an OnnxCausalLM session (CPU) or the PyTorch model; kept in ``runner``."""
        if self.runner is None:
            if self.kind == "onnx":
                with _ops_env(self.ops):
                    before = _layout_bytes()
                    self.runner = OnnxCausalLM.from_folder(self.path, provider="cpu", threads=self.threads)
                    self.layout_bytes = _layout_bytes() - before
                self.qwha_ops = self.runner.qwha_ops
                self.size_mb = _folder_mb(self.path)
            else:
                self.runner = TorchRunner(self.path)
        return self.runner

    def close(self) -> None:
        """Drop an onnxruntime session (its memory arena grows with the largest call it saw)."""
        if self.kind == "onnx":
            self.runner = None
            gc.collect()


# --------------------------------------------------------------------------------------------------------------
# building the folders (skipped when --work already holds them)


def _done(folder: Path, marker: str = "model.onnx") -> bool:
    return (folder / marker).is_file()


def build_all(
    work: Path,
    group_sizes: list[int],
    levels: list[int],
    with_builder: bool,
    model: str = "smollm2",
    head_bits: int | None = None,
) -> dict[str, Path]:
    from qwha_export.converters.quantize import QuantConfig
    from qwha_export.converters.qwha_init import InitConfig
    from qwha_export.fused import write_fused
    from qwha_export.initialise import InitJob, init_qwha, resolve_model
    from qwha_export.pipeline import MergeJob, merge_qwha

    hf = Path(resolve_model(model))
    paths: dict[str, Path] = {"hf": hf}
    try:
        from qwha_export.onnx_export import export_onnx
    except ImportError:
        print("  qwha_export.onnx_export is not available: only the PyTorch and builder rows", flush=True)
        group_sizes, export_onnx = [], None

    def step(label: str, out: Path, fn, marker: str = "model.onnx") -> Path:
        if not _done(out, marker):
            t0 = time.perf_counter()
            print(f"  building {label} -> {out}", flush=True)
            fn()
            print(f"    {time.perf_counter() - t0:.0f} s", flush=True)
        return out

    if export_onnx is not None:
        paths["fp32"] = step("fp32 ONNX", work / "fp32_onnx", lambda: export_onnx(hf, work / "fp32_onnx", quiet=True))
    for g in group_sizes:
        root = work / f"g{g}"
        try:
            QuantConfig(bits=4, group_size=g)  # a group size not dividing 576 leaves a ragged last group
        except ValueError as exc:
            print(f"  g{g} skipped: {exc}", flush=True)
            continue
        adapter = step(
            f"QWHA adapter g{g}",
            root / "adapter",
            lambda g=g, root=root: init_qwha(
                InitJob(
                    model=str(hf),
                    out=str(root / "adapter"),
                    quant=QuantConfig(bits=4, group_size=g),
                    init=InitConfig(rank=16),
                    quiet=True,
                )
            ),
            marker="adapter_model.safetensors",
        )
        merged = step(
            f"merged int4 g{g}",
            root / "merged",
            lambda adapter=adapter, root=root: merge_qwha(
                MergeJob(
                    adapter_dir=str(adapter),
                    out=str(root / "merged"),
                    format="gptq_v2",
                    requant="rtn",
                    calib_tokens=0,  # RTN needs no calibration; no per-layer report
                    verify_tokens=0,  # parity is measured here (perplexity, greedy generation)
                    quiet=True,
                )
            ),
            marker="qwha_export.json",
        )
        fused = step(
            f"fused g{g}",
            root / "fused",
            lambda adapter=adapter, root=root: write_fused(adapter, root / "fused"),
            marker="qwha_export.json",
        )
        for label, src in (("merged", merged), ("fused", fused)):
            paths[f"src-{label}-g{g}"] = src
            for lvl in levels:
                out = root / f"{label}_a{lvl}_onnx"
                paths[f"{label}-a{lvl}-g{g}"] = step(
                    f"{label} int4 ONNX g{g} accuracy_level {lvl}",
                    out,
                    lambda src=src, out=out, lvl=lvl: export_onnx(
                        src, out, accuracy_level=lvl, quiet=True, head_bits=head_bits
                    ),
                )
    if with_builder:
        out = work / "builder_int4"

        def run_builder() -> None:
            cmd = [sys.executable, "-P", "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out)]
            r = subprocess.run([*cmd, "-p", "int4", "-e", "cpu"], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"the onnxruntime-genai builder failed:\n{r.stderr[-3000:]}")

        try:
            paths["builder"] = step("onnxruntime-genai builder int4", out, run_builder)
        except RuntimeError as exc:  # e.g. a config layout the builder does not read: no anchor row, say why
            last = [line for line in str(exc).splitlines() if line.strip()][-1]
            print(f"  no builder row: the onnxruntime-genai builder failed on {hf.name} ({last})", flush=True)
    return paths


# --------------------------------------------------------------------------------------------------------------
# measuring


class TorchRunner:
    """The HF fp32 model with its KV cache, mirroring OnnxCausalLM's prefill / greedy decode / logits."""

    def __init__(self, folder: Path):
        from qwha_export.models import load_causal_lm

        self.model, self.tokenizer = load_causal_lm(folder)

    @torch.no_grad()
    def prefill(self, ids: np.ndarray) -> None:
        self.model(input_ids=torch.from_numpy(ids), use_cache=True)

    @torch.no_grad()
    def decode_rate(self, prompt: list[int], n_new: int) -> float:
        out = self.model(input_ids=torch.tensor([prompt]), use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(n_new - 1):
            out = self.model(input_ids=nxt, cache=cache, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        return (n_new - 1) / (time.perf_counter() - t0)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


def _onnx_prefill(lm: OnnxCausalLM, ids: np.ndarray) -> None:
    lm.forward(ids, np.ones_like(ids), lm.empty_past(ids.shape[0]))


def _onnx_decode_rate(lm: OnnxCausalLM, prompt: list[int], n_new: int) -> float:
    out = lm.generate_ids([prompt], GenerationConfig(max_new_tokens=n_new, ignore_eos=True))
    return out.decode_tokens_per_second


@contextmanager
def _ops_env(ops: str | None):
    """Sessions opened inside run the function bodies when ``ops == "function"`` (QWHA_ORT_OPS=0)."""
    saved = os.environ.get(ortops.ENV_VAR)
    if ops == "function":
        os.environ[ortops.ENV_VAR] = "0"
    ortops.reset()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ortops.ENV_VAR, None)
        else:
            os.environ[ortops.ENV_VAR] = saved
        ortops.reset()


def _layout_bytes() -> int:
    lib = ortops.library_path()
    return ortops.library_info(lib)["layout_bytes"] if lib else 0


def _onnx_batch_step(lm: OnnxCausalLM, prompts: list[list[int]], n_new: int = 16) -> float:
    """Seconds per decode step of a batch (one row per prompt, left-padded)."""
    out = lm.generate_ids(prompts, GenerationConfig(max_new_tokens=n_new, ignore_eos=True))
    return out.decode_seconds / out.decode_steps


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("model.onnx*")) / 2**20


def measure(variants: list[Variant], prefill_ids: np.ndarray, prompt: list[int], batch: list[list[int]], args) -> None:
    n_new = N_DECODE
    for v in variants:  # warm-up: one of each
        if v.kind == "onnx":
            _onnx_prefill(v.runner, prefill_ids)
            _onnx_decode_rate(v.runner, prompt, 8)
            _onnx_batch_step(v.runner, batch, 4)
        else:
            v.runner.prefill(prefill_ids)
            v.runner.decode_rate(prompt, 8)
    for r in range(args.rounds):  # one metric at a time, every variant in turn: a pair is measured seconds apart
        for v in variants:
            onnx = v.kind == "onnx"
            v.decode_tps.append(
                _onnx_decode_rate(v.runner, prompt, n_new) if onnx else v.runner.decode_rate(prompt, n_new)
            )
        for v in variants:
            if v.kind == "onnx":
                v.prefill_s.append(
                    median_time(lambda v=v: _onnx_prefill(v.runner, prefill_ids), min_runs=1, budget_s=0)
                )
            else:
                v.prefill_s.append(median_time(lambda v=v: v.runner.prefill(prefill_ids), min_runs=1, budget_s=0))
        for v in (v for v in variants if v.kind == "onnx"):
            v.batch4_s.append(_onnx_batch_step(v.runner, batch))
        print(f"  round {r + 1}/{args.rounds} done", flush=True)


def measure_pairs(pairs: list[tuple[Variant, Variant]], prompt: list[int], rounds: int) -> dict[str, list[float]]:
    """Decode speed of ``a`` over ``b`` for each pair, measured as a pair alone: ``a`` and ``b`` decode ``N_DECODE``
    tokens in turn, nothing else in between, ``rounds`` times; the round's ratios, keyed ``"a.key/b.key"``. (In the
    rounds of :func:`measure` every other variant runs between the two; a deployment runs one model.)"""
    out: dict[str, list[float]] = {}
    for a, b in pairs:
        for v in (a, b):  # warm-up
            _onnx_decode_rate(v.runner, prompt, 8)
        ratios = []
        for _ in range(rounds):
            ra = _onnx_decode_rate(a.runner, prompt, N_DECODE)
            ratios.append(ra / _onnx_decode_rate(b.runner, prompt, N_DECODE))
        out[f"{a.key}/{b.key}"] = ratios
    return out


def perplexities(variants: list[Variant], chunks: torch.Tensor) -> None:
    """One session at a time (a 2,048-token call grows each session's arena by ~1 GB)."""
    from qwha_export.metrics import perplexity

    for v in variants:
        v.open()
        if v.kind == "onnx":
            lm = v.runner
            v.ppl = perplexity(lambda ids, lm=lm: torch.from_numpy(lm.logits(ids.numpy())), chunks, batch_size=1)
        else:
            v.ppl = perplexity(v.runner.logits, chunks, batch_size=1)
        v.close()
        print(f"  perplexity {v.name} {v.group}: {v.ppl:.2f}", flush=True)


def greedy_parity(variants: list[Variant], prompts: list[list[int]], n: int = 32) -> dict:
    """Greedy ``n`` tokens of each of our ONNX exports against transformers' ``generate`` on the PyTorch model
    that was exported (the HF fp32 model; the merged / fused checkpoints as loaded by ``verify``)."""
    from transformers import GenerationConfig as HFGenerationConfig

    from qwha_export.verify import load_export

    torch_runner = next(v.open() for v in variants if v.kind == "torch")
    gen = HFGenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=[], pad_token_id=0)
    refs: dict[Path | None, list[list[int]]] = {}
    out = {}
    for v in variants:
        if v.kind != "onnx" or v.key == "builder":
            continue
        if v.source not in refs:
            model = torch_runner.model if v.source is None else load_export(v.source)[0]
            refs[v.source] = []
            for p in prompts:
                ids = torch.tensor([p])
                with torch.no_grad():
                    ref = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
                refs[v.source].append(ref[0, len(p) :].tolist())
            del model
        same = []
        for p, ref in zip(prompts, refs[v.source], strict=True):
            ours = v.open().generate_ids([p], GenerationConfig(max_new_tokens=n, ignore_eos=True)).token_ids[0]
            same.append(next((i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b), n))
        v.close()
        out[v.key] = same
        print(f"  {v.key:16} tokens equal before the first difference: {same} (of {n})", flush=True)
    return out


# --------------------------------------------------------------------------------------------------------------
# report


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


_WEIGHT_OPS = {"MatMulNBits", "MatMul", "Gemm", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}


def weight_bytes_per_token(folder: Path) -> int:
    """Bytes of initializers a decoded token reads in the graph's decode path (the If's then-branch when there is
    one): MatMulNBits codes, scales and zero points, float weights of MatMul/Gemm (the tied lm_head reads the whole
    embedding), norm weights. The one embedding row, the KV cache and the adapter tables are not counted here."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    sizes = {}
    for t in model.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        sizes[t.name] = int(info["length"]) if "length" in info else len(t.raw_data)
    nodes = list(model.graph.node)
    for node in model.graph.node:
        if node.op_type == "If":
            nodes += next(a.g.node for a in node.attribute if a.name == "then_branch")
    return sum(sizes.get(i, 0) for n in nodes if n.op_type in _WEIGHT_OPS for i in n.input[1:])


def _table(variants: list[Variant]) -> list[dict[str, Any]]:
    header = (
        f"{'variant':36} {'group':>5} {'acc':>3} | {'prefill 512 ms':>14} | {'decode tok/s':>12} | "
        f"{'batch-4 step ms':>15} | {'ppl':>7} | {'MB':>6}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    rows = []
    for v in variants:
        p, d, b4 = _med(v.prefill_s) * 1e3, _med(v.decode_tps), _med(v.batch4_s) * 1e3
        name = v.name + (f" [{v.qwha_ops}]" if v.qwha_ops not in ("", "none") else "")
        print(
            f"{name:36} {v.group:>5} {v.level:>3} | {p:>14.1f} | {d:>12.1f} | {b4:>15.1f} | {v.ppl:>7.2f} | "
            f"{v.size_mb:>6.1f}"
        )
        rows.append({"variant": name, "group": v.group, "level": v.level, "prefill_ms": p, "decode_tps": d,
                     "batch4_step_ms": b4, "ppl": v.ppl, "qwha_ops": v.qwha_ops})  # fmt: skip
    return rows


def _summary(ratios: list[float]) -> tuple[float, list[float]]:
    """Median of per-round ratios and their ``[min, max]``."""
    return statistics.median(ratios), [min(ratios), max(ratios)]


def _speed(a: Variant, b: Variant) -> dict[str, float]:
    """Speed of ``a`` over ``b`` (> 1: ``a`` faster): decode tokens/s, prefill and batch-4 step time; each the
    median over rounds of the round's ratio (``<metric>_range``: its min and max over rounds)."""
    out: dict[str, Any] = {}
    for key, (x, y) in {
        "decode": (a.decode_tps, b.decode_tps),
        "prefill": (b.prefill_s, a.prefill_s),
        "batch4": (b.batch4_s, a.batch4_s),
    }.items():
        # a[r] / b[r]: the two measured in the same round, seconds apart
        out[key], out[f"{key}_range"] = _summary([p / q for p, q in zip(x, y, strict=True)])
    return out


def _fmt(r: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.2f}x ({r[k + '_range'][0]:.2f}-{r[k + '_range'][1]:.2f})" for k, v in r.items()
                     if not k.endswith("_range"))  # fmt: skip


def _pair(pair_ratios: dict[str, list[float]], a: Variant, b: Variant) -> dict[str, Any] | None:
    r = pair_ratios.get(f"{a.key}/{b.key}")
    if not r:
        return None
    med, span = _summary(r)
    return {"decode": med, "decode_range": span}


def report(
    variants: list[Variant], group_sizes: list[int], levels: list[int], pair_ratios: dict[str, list[float]]
) -> dict[str, Any]:
    rows = _table(variants)
    by = {v.key: v for v in variants}
    builder, out = by.get("builder"), []
    print()
    for g in group_sizes:
        for lvl in levels:
            merged, fused, fn = (by.get(f"{k}-a{lvl}-g{g}") for k in ("merged", "fused", "fused-fn"))
            if merged is None or fused is None:
                continue
            r: dict[str, Any] = {"group": g, "level": lvl, "fused_native_over_merged": _speed(fused, merged)}
            print(f"g{g} acc{lvl}: fused [{fused.qwha_ops}] / merged: {_fmt(r['fused_native_over_merged'])}"
                  + (" (goal >= 0.85x each)" if lvl == 0 else ""))  # fmt: skip
            alone = _pair(pair_ratios, fused, merged)
            if alone is not None:
                r["fused_native_over_merged_alone"] = alone
                print(f"         the pair alone: {_fmt(alone)}")
            if fn is not None:
                r["fused_function_over_merged"] = _speed(fn, merged)
                print(f"         fused [{fn.qwha_ops}] / merged: {_fmt(r['fused_function_over_merged'])}")
            if lvl == 4:
                bm = weight_bytes_per_token(merged.path)
                bf = weight_bytes_per_token(fused.path) + fused.layout_bytes
                floor = bm / bf
                got = r["fused_native_over_merged"]["decode"]
                r.update(bytes_merged=bm, bytes_fused=bf, floor=floor, decode_over_floor=got / floor)
                print(f"         bytes per decoded token: merged {bm / 1e6:.1f} MB, fused {bf / 1e6:.1f} MB (native "
                      f"tables {fused.layout_bytes / 1e6:.1f} MB); floor {floor:.3f}, fused decode {got:.3f} = "
                      f"{got / floor:.1%} of the floor (goal >= 90%)")  # fmt: skip
                if alone is not None:
                    got = alone["decode"]
                    r["decode_over_floor_alone"] = got / floor
                    print(f"         the pair alone: fused decode {got:.3f} = {got / floor:.1%} of the floor")
            if builder is not None and lvl == 4:
                r["merged_over_builder"] = _speed(merged, builder)
                r["fused_native_over_builder"] = _speed(fused, builder)
                print(f"         merged / builder: {_fmt(r['merged_over_builder'])} (goal decode >= 1.0x)")
                alone_b = _pair(pair_ratios, merged, builder)
                if alone_b is not None:
                    r["merged_over_builder_alone"] = alone_b
                    print(f"         the pair alone: {_fmt(alone_b)}")
                print(f"         fused [{fused.qwha_ops}] / builder: {_fmt(r['fused_native_over_builder'])}; "
                      f"perplexity {fused.ppl:.2f} vs {builder.ppl:.2f}")  # fmt: skip
            out.append(r)
    return {"rows": rows, "ratios": out}


def _chat_ids(tokenizer, text: str) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):  # a base model (Gemma 3 270M): the text as is
        return list(tokenizer(text)["input_ids"])
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="embedded model name (smollm2, gemma3-270m) or a HF folder")
    ap.add_argument("--head-bits", type=int, choices=[8, 4], default=None, help="quantized embedding + head")
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--quick", action="store_true", help="2 rounds instead of 7; shorter WHT timing")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved speed rounds (median over them)")
    ap.add_argument("--work", type=Path, default=None, help="keep the built folders here (default: a temp folder)")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op / torch threads")
    ap.add_argument(
        "--accuracy-levels",
        type=int,
        nargs="+",
        default=[0, 4],
        help="MatMulNBits accuracy_level(s) of our int4 exports (0: exact float; 4: int8 activations, the builder's)",
    )
    ap.add_argument("--no-builder", action="store_true", help="skip the onnxruntime-genai builder export")
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--skip-parity", action="store_true", help="no greedy-generation check against PyTorch")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 7)
    import onnxruntime as ort

    if args.threads:
        torch.set_num_threads(args.threads)
    with_builder = not args.no_builder
    if with_builder:
        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError:
            print("onnxruntime-genai is not installed: no builder row (pip install onnxruntime-genai onnx-ir)")
            with_builder = False
    print(
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, threads {args.threads or 'default'}, "
        f"group sizes {args.group_sizes}, rounds {args.rounds}, our int4 accuracy levels {args.accuracy_levels}, "
        f"model {args.model}, head {f'{args.head_bits}-bit' if args.head_bits else 'float32'}"
    )
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_onnx_")
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    print("building the exports (cached in --work):", flush=True)
    paths = build_all(args.work, args.group_sizes, args.accuracy_levels, with_builder, args.model, args.head_bits)

    variants = [Variant("fp32", "fp32 ONNX", "", "onnx", paths["fp32"])] if "fp32" in paths else []
    for g in args.group_sizes:
        for lvl in args.accuracy_levels:
            for label, name, ops in (
                ("merged", "merged int4 ONNX", None),
                ("fused", "fused int4 ONNX (QWHA)", "native"),
                ("fused-fn", "fused int4 ONNX (QWHA)", "function"),
            ):
                folder = paths.get(f"{label.split('-')[0]}-a{lvl}-g{g}")
                if folder is not None:
                    src = paths[f"src-{label.split('-')[0]}-g{g}"]
                    key = f"{label}-a{lvl}-g{g}"
                    variants.append(Variant(key, name, f"g{g}", "onnx", folder, level=str(lvl), source=src, ops=ops))
    if "builder" in paths:
        variants.append(Variant("builder", "builder int4 ONNX (ort-genai)", "g32", "onnx", paths["builder"], "4"))
    variants.append(Variant("torch", "PyTorch eager fp32", "", "torch", paths["hf"]))
    for v in variants:
        v.threads = args.threads
        v.open()
    tokenizer = variants[-1].runner.tokenizer

    from qwha_export.data import lee_corpus_text, token_chunks

    text = lee_corpus_text()
    prefill_ids = token_chunks(tokenizer, text, seq_len=512, max_tokens=512).numpy()
    prompt = _chat_ids(tokenizer, SHORT_PROMPT)
    print(f"speed: prefill 512 tokens; decode 64 greedy tokens after a {len(prompt)}-token prompt", flush=True)
    batch = [_chat_ids(tokenizer, q) for q in BATCH_PROMPTS]
    measure(variants, prefill_ids, prompt, batch, args)
    by = {v.key: v for v in variants}
    pairs = [
        (by[f"fused-a{lvl}-g{g}"], by[f"merged-a{lvl}-g{g}"])
        for g in args.group_sizes
        for lvl in args.accuracy_levels
        if f"fused-a{lvl}-g{g}" in by and f"merged-a{lvl}-g{g}" in by
    ]
    if "builder" in by:
        pairs += [(by[f"merged-a4-g{g}"], by["builder"]) for g in args.group_sizes if f"merged-a4-g{g}" in by]
    print(f"decode of each compared pair alone ({len(pairs)} pairs, {args.rounds} rounds each)", flush=True)
    pair_ratios = measure_pairs(pairs, prompt, args.rounds)
    for v in variants:
        v.close()
    if not args.skip_ppl:
        print("perplexity on the first 2,048 tokens of the Lee corpus (one sequence):", flush=True)
        perplexities(variants, token_chunks(tokenizer, text, seq_len=2048, max_tokens=2048))
    results = report(variants, args.group_sizes, args.accuracy_levels, pair_ratios)
    if not args.skip_parity:
        print("\ngreedy generation against the exported PyTorch models:", flush=True)
        prompts = [
            _chat_ids(tokenizer, q)
            for q in (SHORT_PROMPT, "Write a short poem about the ocean.", "What are the three primary colors?")
        ]
        results["greedy_parity"] = greedy_parity(variants, prompts)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if tmp is not None:
        for v in variants:
            v.runner = None
        tmp.cleanup()


if __name__ == "__main__":
    main()
