"""What merging costs, measured: format x re-quantization method x bits -> perplexity, KL, top-1, size, time.

Every variant is produced by the library functions the CLI calls (``merge_qwha`` / ``write_fused``) from one QWHA
adapter directory on the real SmolLM2-135M-Instruct, then verified with ``verify_export`` against the training-time
model (quantized base + adapter) on held-out Lee-corpus tokens taken from the END of the corpus (calibration uses the
start). Also printed: perplexity of the full-precision model and of the plain quantized base on the same tokens, and
the bf16 floor (the full-precision model with its weights rounded to bf16, against itself in fp32), which bounds
what any bf16 checkpoint can reach.

    python benchmarks/merge_quality.py [--adapter DIR] [--tokens 2048] [--variants fused,rtn-gptq_v2,...]

Without ``--adapter`` it initialises one (RTN 4-bit g64, rank 16, 4096 calibration tokens; ~70 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from qwha_export.data import lee_corpus_text, tokenize_text
from qwha_export.fused import write_fused
from qwha_export.metrics import compare_logits, logits_for
from qwha_export.models import load_causal_lm, smollm2_path
from qwha_export.pipeline import MergeJob, load_quantized_base, merge_qwha
from qwha_export.verify import verify_export

# name -> (bits, requant, format, dtype)
VARIANTS: dict[str, tuple[int, str, str, str]] = {
    "fused": (0, "-", "fused", "-"),
    "dense-fp32": (16, "-", "dense", "float32"),
    "dense-fp16": (16, "-", "dense", "float16"),
    "dense-bf16": (16, "-", "dense", "bfloat16"),
    "rtn4-gptq_v2": (4, "rtn", "gptq_v2", "float16"),
    "rtn4-gptq": (4, "rtn", "gptq", "float16"),
    "rtn4-compressed": (4, "rtn", "compressed-tensors", "float16"),
    "gptq4-gptq_v2": (4, "gptq", "gptq_v2", "float16"),
    "grid4-gptq_v2": (4, "grid", "gptq_v2", "float16"),
    "refit4-fused": (4, "refit", "fused", "float16"),
    "rtn8-gptq_v2": (8, "rtn", "gptq_v2", "float16"),
    "rtn3-gptq_v2": (3, "rtn", "gptq_v2", "float16"),
    "refit3-fused": (3, "refit", "fused", "float16"),
}


def _heldout_chunks(tokenizer, n_tokens: int, seq_len: int) -> torch.Tensor:
    ids = tokenize_text(tokenizer, lee_corpus_text())
    n = (n_tokens // seq_len) * seq_len
    return torch.tensor(ids[len(ids) - n :], dtype=torch.long).view(-1, seq_len)


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 2**20


def _bf16_floor(chunks: torch.Tensor) -> dict[str, float]:
    model, _ = load_causal_lm(str(smollm2_path()))
    ref = logits_for(model, chunks)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return compare_logits(ref, logits_for(model, chunks))


def _make_adapter(root: Path) -> Path:
    from qwha_export.converters.quantize import QuantConfig
    from qwha_export.converters.qwha_init import InitConfig
    from qwha_export.initialise import InitJob, init_qwha

    out = root / "adapter"
    init_qwha(
        InitJob(
            model="smollm2",
            out=str(out),
            quant=QuantConfig(bits=4, group_size=64),
            init=InitConfig(rank=16),
            calib_tokens=4096,
            heldout_tokens=2048,
            quiet=True,
        )
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=str, default=None)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens of gptq and refit")
    ap.add_argument("--variants", type=str, default=",".join(VARIANTS))
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    work = Path(tempfile.mkdtemp(prefix="merge-quality-"))
    try:
        adapter = Path(args.adapter) if args.adapter else _make_adapter(work)
        _, tok = load_causal_lm(str(smollm2_path()))
        chunks = _heldout_chunks(tok, args.tokens, args.seq_len)
        base, _, _ = load_quantized_base(adapter)
        rows: dict[str, dict] = {}
        fp, _ = load_causal_lm(str(smollm2_path()))
        from qwha_export.metrics import perplexity

        rows["full precision"] = {"ppl_export": perplexity(fp, chunks)}
        rows["quantized base, no adapter"] = {"ppl_export": perplexity(base, chunks)}
        del fp, base
        rows["bf16 floor (fp model in bf16)"] = _bf16_floor(chunks)
        for name in names:
            bits, requant, fmt, dtype = VARIANTS[name]
            out = work / name
            t0 = time.time()
            try:
                _write_variant(adapter, out, bits, requant, fmt, dtype, args.calib_tokens)
            except ValueError as exc:  # e.g. gptq v1 cannot store a zero point of 0
                rows[name] = {"error": str(exc)}
                print(name, "refused:", exc, flush=True)
                continue
            seconds = time.time() - t0
            res = verify_export(out, adapter, chunks=chunks)
            rows[name] = {**res, "seconds": seconds, "size_mb": _size_mb(out), "bits": bits, "requant": requant}
            shutil.rmtree(out, ignore_errors=True)
            print(name, json.dumps(rows[name]), flush=True)
        _print_table(rows, adapter, chunks)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_variant(adapter: Path, out: Path, bits: int, requant: str, fmt: str, dtype: str, calib_tokens: int) -> None:
    if fmt == "fused" and requant == "-":
        write_fused(adapter, out)
    else:
        fields = {f.name for f in dataclasses.fields(MergeJob)}
        extra = {"verify_tokens": 0} if "verify_tokens" in fields else {}
        merge_qwha(
            MergeJob(
                adapter_dir=str(adapter),
                out=str(out),
                bits=bits,
                requant=requant if requant != "-" else "rtn",  # unused at 16 bits
                format=fmt,
                dtype=dtype,
                calib_tokens=calib_tokens if requant in ("gptq", "refit") else 0,  # 0: no report
                quiet=True,
                **extra,
            )
        )


def _print_table(rows: dict, adapter: Path, chunks: torch.Tensor) -> None:
    print(f"\nSmolLM2-135M, adapter {adapter}, {chunks.numel()} held-out tokens (end of the Lee corpus)")
    hdr = f"{'variant':32} {'ppl':>8} {'KL/token':>10} {'top-1':>7} {'max|dlogit|':>11} {'MB':>7} {'s':>6}"
    print(hdr)
    for name, r in rows.items():

        def f(key, fmt_, r=r):
            return format(r[key], fmt_) if key in r else "-"

        print(
            f"{name:32} {f('ppl_export', '8.2f'):>8} {f('kl_per_token', '10.2e'):>10} "
            f"{f('top1_agreement', '7.4f'):>7} {f('max_abs_logit_diff', '11.3f'):>11} "
            f"{f('size_mb', '7.1f'):>7} {f('seconds', '6.1f'):>6}"
        )


if __name__ == "__main__":
    main()
