"""ONNX serving on SmolLM2-135M, side by side in one run (onnxruntime, CPU): speed and perplexity.

Variants: fp32 ONNX (our exporter on the plain HF folder); merged int4 ONNX and fused int4 ONNX (from a QWHA
adapter: RTN 4-bit at each group size, rank 16, merged with RTN re-quantization into gptq_v2 / kept beside the base
with `fuse`, then exported); the PyTorch eager fp32 model (transformers, KV cache); and the anchor users would pick
instead, the onnxruntime-genai model builder's int4 CPU export of the same base (`-p int4 -e cpu`), run through our
session class (same IO names).

For each: prefill latency of 512 tokens (one forward from an empty cache, logits for all positions), decode
tokens/s (64 greedy tokens after a short prompt; steps after the first / decode seconds), and perplexity on the
first 2,048 tokens of gensim's Lee corpus (one 2,048-token sequence, full-sequence logits). Speed is measured in
interleaved rounds (every variant once per round, median over rounds) so a change in machine load hits all
variants alike. Then the WHT op alone (the exporter's qwha::WalshHadamard function in a one-node model) against a
dense MatMul by M, at n = 576, 1536, 4096.

    python benchmarks/bench_onnx.py [--group-sizes 32 64 128] [--quick] [--work runs/bench_onnx] [--threads N]

--work keeps the exported folders, so a second run only measures.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import median_time  # noqa: E402

from qwha_export.serving import GenerationConfig, OnnxCausalLM  # noqa: E402

SHORT_PROMPT = "Explain in a few sentences why the sky is blue."


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
    prefill_s: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)
    ppl: float = float("nan")
    size_mb: float = float("nan")
    threads: int | None = None

    def open(self) -> Any:
        """The runner: an OnnxCausalLM session (CPU) or the PyTorch model; kept in ``runner``."""
        if self.runner is None:
            if self.kind == "onnx":
                self.runner = OnnxCausalLM.from_folder(self.path, provider="cpu", threads=self.threads)
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


def build_all(work: Path, group_sizes: list[int], levels: list[int], with_builder: bool) -> dict[str, Path]:
    from qwha_export.converters.quantize import QuantConfig
    from qwha_export.converters.qwha_init import InitConfig
    from qwha_export.fused import write_fused
    from qwha_export.models import smollm2_path
    from qwha_export.pipeline import InitJob, MergeJob, init_qwha, merge_qwha

    hf = smollm2_path()
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
                    model="smollm2",
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
                    lambda src=src, out=out, lvl=lvl: export_onnx(src, out, accuracy_level=lvl, quiet=True),
                )
    if with_builder:
        out = work / "builder_int4"

        def run_builder() -> None:
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out)]
            r = subprocess.run([*cmd, "-p", "int4", "-e", "cpu"], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"the onnxruntime-genai builder failed:\n{r.stderr[-3000:]}")

        paths["builder"] = step("onnxruntime-genai builder int4", out, run_builder)
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


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("model.onnx*")) / 2**20


def measure(variants: list[Variant], prefill_ids: np.ndarray, prompt: list[int], args) -> None:
    n_new = 64
    for v in variants:  # warm-up: one of each
        if v.kind == "onnx":
            _onnx_prefill(v.runner, prefill_ids)
            _onnx_decode_rate(v.runner, prompt, 8)
        else:
            v.runner.prefill(prefill_ids)
            v.runner.decode_rate(prompt, 8)
    for r in range(args.rounds):
        for v in variants:
            if v.kind == "onnx":
                v.prefill_s.append(
                    median_time(lambda v=v: _onnx_prefill(v.runner, prefill_ids), min_runs=1, budget_s=0)
                )
                v.decode_tps.append(_onnx_decode_rate(v.runner, prompt, n_new))
            else:
                v.prefill_s.append(median_time(lambda v=v: v.runner.prefill(prefill_ids), min_runs=1, budget_s=0))
                v.decode_tps.append(v.runner.decode_rate(prompt, n_new))
        print(f"  round {r + 1}/{args.rounds} done", flush=True)


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
# the WHT op alone


def standalone_wht_model(n: int):
    """A one-node model ``y = qwha::WalshHadamard(x)`` (x float32 [rows, n]) carrying the exporter's function body
    (the same factors and function the exporter puts in model.onnx)."""
    from onnx import TensorProto, helper

    from qwha_export.converters.onnx_export import wht_factors
    from qwha_export.formats.onnx_graph import OPSET
    from qwha_export.formats.onnx_ops import WHT_DOMAIN, wht_function, wht_node

    k, factors = wht_factors(n)
    graph = helper.make_graph(
        [wht_node("x", "y", n, k, "wht")],
        "wht",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
    )
    return helper.make_model(
        graph,
        functions=[wht_function(n, k, factors, OPSET)],
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(WHT_DOMAIN, 1)],
        ir_version=10,
    )


def bench_wht_op(sizes: list[int], rows_list: list[int], threads: int | None, budget: float) -> list[dict[str, Any]]:
    """ms per call in onnxruntime: the exporter's qwha::WalshHadamard (function body) vs MatMul by M (n x n)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from qwha_export.kernels import hadamard_matrix

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    results = []
    for n in sizes:
        m = hadamard_matrix(n, dtype=torch.float64).numpy().astype(np.float32)
        x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", n])
        y_out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])
        dense = helper.make_model(
            helper.make_graph(
                [helper.make_node("MatMul", ["x", "mt"], ["y"])],
                "dense_wht",
                [x_in],
                [y_out],
                [numpy_helper.from_array(np.ascontiguousarray(m.T), "mt")],
            ),
            opset_imports=[helper.make_opsetid("", 17)],
        )
        s_wht = ort.InferenceSession(
            standalone_wht_model(n).SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
        s_dense = ort.InferenceSession(dense.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        wname, dname = s_wht.get_inputs()[0].name, s_dense.get_inputs()[0].name
        for rows in rows_list:
            x = np.random.default_rng(0).standard_normal((rows, n)).astype(np.float32)
            y_w = s_wht.run(None, {wname: x})[0]
            y_d = s_dense.run(None, {dname: x})[0]
            err = float(np.abs(y_w - y_d).max() / np.abs(y_d).max())
            t_w = median_time(lambda x=x, s=s_wht, k=wname: s.run(None, {k: x}), budget_s=budget)
            t_d = median_time(lambda x=x, s=s_dense, k=dname: s.run(None, {k: x}), budget_s=budget)
            results.append({"n": n, "rows": rows, "wht_ms": t_w * 1e3, "dense_ms": t_d * 1e3, "rel_err": err})
            print(
                f"  n={n:>5} rows={rows:>4}: WHT op {t_w * 1e3:8.3f} ms, dense MatMul {t_d * 1e3:8.3f} ms, "
                f"dense/WHT {t_d / t_w:6.1f}x, rel. max diff {err:.1e}",
                flush=True,
            )
    return results


# --------------------------------------------------------------------------------------------------------------
# report


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(variants: list[Variant], group_sizes: list[int], levels: list[int]) -> dict[str, Any]:
    header = (
        f"{'variant':30} {'group':>5} {'acc':>3} | {'prefill 512 ms':>14} | {'decode tok/s':>12} | {'ppl':>7} "
        f"| {'MB':>6}"
    )
    print()
    print(header)
    print("-" * len(header))
    rows = []
    for v in variants:
        p, d = _med(v.prefill_s) * 1e3, _med(v.decode_tps)
        print(f"{v.name:30} {v.group:>5} {v.level:>3} | {p:>14.1f} | {d:>12.1f} | {v.ppl:>7.2f} | {v.size_mb:>6.1f}")
        rows.append(
            {"variant": v.name, "group": v.group, "level": v.level, "prefill_ms": p, "decode_tps": d, "ppl": v.ppl}
        )
    by = {v.key: v for v in variants}
    fp32, builder = by.get("fp32"), by.get("builder")
    ratios = []
    print()
    for g in group_sizes:
        for lvl in levels:
            merged, fused = by.get(f"merged-a{lvl}-g{g}"), by.get(f"fused-a{lvl}-g{g}")
            if merged is None or fused is None:
                continue
            r = {
                "group": g,
                "level": lvl,
                "fused_decode_overhead": _med(merged.decode_tps) / _med(fused.decode_tps) - 1,
                "fused_prefill_overhead": _med(fused.prefill_s) / _med(merged.prefill_s) - 1,
            }
            line = (
                f"g{g} acc{lvl}: fused over merged: decode {r['fused_decode_overhead']:+.0%}, prefill "
                f"{r['fused_prefill_overhead']:+.0%} (goal <= +10%)"
            )
            if fp32 is not None:
                r["int4_decode_speedup"] = _med(merged.decode_tps) / _med(fp32.decode_tps)
                r["int4_prefill_speedup"] = _med(fp32.prefill_s) / _med(merged.prefill_s)
                line += f"; merged over fp32: decode {r['int4_decode_speedup']:.2f}x, prefill "
                line += f"{r['int4_prefill_speedup']:.2f}x"
            if builder is not None:
                r["merged_vs_builder_decode"] = _med(merged.decode_tps) / _med(builder.decode_tps)
                r["merged_vs_builder_prefill"] = _med(builder.prefill_s) / _med(merged.prefill_s)
                line += f"; merged / builder: decode {r['merged_vs_builder_decode']:.2f}x (goal >= 0.9x), prefill "
                line += f"{r['merged_vs_builder_prefill']:.2f}x"
            print(line)
            ratios.append(r)
    return {"rows": rows, "ratios": ratios}


def _chat_ids(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--quick", action="store_true", help="2 rounds instead of 5; shorter WHT timing")
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
    ap.add_argument("--skip-wht", action="store_true")
    ap.add_argument("--skip-parity", action="store_true", help="no greedy-generation check against PyTorch")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 5)
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
        f"group sizes {args.group_sizes}, rounds {args.rounds}, our int4 accuracy levels {args.accuracy_levels}"
    )
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_onnx_")
        args.work = Path(tmp.name)
    args.work.mkdir(parents=True, exist_ok=True)
    print("building the exports (cached in --work):", flush=True)
    paths = build_all(args.work, args.group_sizes, args.accuracy_levels, with_builder)

    variants = [Variant("fp32", "fp32 ONNX", "", "onnx", paths["fp32"])] if "fp32" in paths else []
    for g in args.group_sizes:
        for lvl in args.accuracy_levels:
            for label, name in (("merged", "merged int4 ONNX"), ("fused", "fused int4 ONNX (QWHA)")):
                key = f"{label}-a{lvl}-g{g}"
                if key in paths:
                    src = paths[f"src-{label}-g{g}"]
                    variants.append(Variant(key, name, f"g{g}", "onnx", paths[key], level=str(lvl), source=src))
    if with_builder:
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
    measure(variants, prefill_ids, prompt, args)
    for v in variants:
        v.close()
    if not args.skip_ppl:
        print("perplexity on the first 2,048 tokens of the Lee corpus (one sequence):", flush=True)
        perplexities(variants, token_chunks(tokenizer, text, seq_len=2048, max_tokens=2048))
    results = report(variants, args.group_sizes, args.accuracy_levels)
    if not args.skip_parity:
        print("\ngreedy generation against the exported PyTorch models:", flush=True)
        prompts = [
            _chat_ids(tokenizer, q)
            for q in (SHORT_PROMPT, "Write a short poem about the ocean.", "What are the three primary colors?")
        ]
        results["greedy_parity"] = greedy_parity(variants, prompts)
    if not args.skip_wht and "fp32" in paths:
        print("\nWHT op alone (onnxruntime CPU, float32): qwha::WalshHadamard function body vs MatMul by M", flush=True)
        results["wht"] = bench_wht_op([576, 1536, 4096], [1, 512], args.threads, 0.5 if args.quick else 2.0)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if tmp is not None:
        for v in variants:
            v.runner = None
        tmp.cleanup()


if __name__ == "__main__":
    main()
