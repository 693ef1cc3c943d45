"""The README's refit table: what ``merge --requant refit`` keeps of the fused model's gain, per bit width and
re-quantizer, on the real SmolLM2-135M-Instruct.

Per bit width (4 and 3 by default): ``init`` (RTN at that width, g64, rank 16, 4,096 calibration tokens), then the
held-out perplexity (the last ``--tokens`` tokens of the Lee corpus in ``--seq-len`` (512) token chunks;
calibration takes its start) of the full-precision model, the plain quantized base, the fused model (quantized
base + adapter, what ``fuse`` writes), and the refits: ``merge --requant refit`` (the base's grid, ``auto``: what
the CLI runs) and the same refit with RTN and GPTQ re-quantization (:func:`qwha_export.pipeline.refit_and_fuse`;
GPTQ at 4 bits only).
``kept`` = (plain - refit) / (plain - fused).

    python benchmarks/refit_quality.py [--bits 4 3] [--tokens 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from qwha_export.converters.quant_methods import Quantizer
from qwha_export.converters.quantize import QuantConfig
from qwha_export.converters.qwha_init import InitConfig
from qwha_export.data import lee_corpus_text, tokenize_text
from qwha_export.initialise import InitJob, init_qwha
from qwha_export.metrics import perplexity
from qwha_export.models import load_causal_lm, smollm2_path
from qwha_export.pipeline import MergeJob, load_quantized_base, load_qwha_model, merge_qwha, refit_and_fuse
from qwha_export.verify import load_export

REFITS = {"grid": Quantizer.AUTO, "rtn": Quantizer.RTN, "gptq": Quantizer.GPTQ}


def _heldout(tokenizer, n_tokens: int, seq_len: int) -> torch.Tensor:
    ids = tokenize_text(tokenizer, lee_corpus_text())
    n = (n_tokens // seq_len) * seq_len
    return torch.tensor(ids[len(ids) - n :], dtype=torch.long).view(-1, seq_len)


def _row(bits: int, work: Path, chunks: torch.Tensor, calib_tokens: int) -> dict[str, float]:
    adapter = work / f"adapter{bits}"
    t0 = time.time()
    init_qwha(
        InitJob(
            model="smollm2",
            out=str(adapter),
            quant=QuantConfig(bits=bits, group_size=64),
            init=InitConfig(rank=16),
            calib_tokens=calib_tokens,
            quiet=True,
        )
    )
    print(f"[{bits}-bit] init {time.time() - t0:.0f} s", flush=True)
    row: dict[str, float] = {}
    row["plain"] = perplexity(load_quantized_base(adapter)[0], chunks)
    row["fused"] = perplexity(load_qwha_model(adapter)[0], chunks)
    for name, quantizer in REFITS.items():
        if name == "gptq" and bits != 4:
            continue
        out = work / f"refit{bits}-{name}"
        job = MergeJob(
            adapter_dir=str(adapter), out=str(out), bits=bits, requant="refit", format="fused", quiet=True,
            calib_tokens=calib_tokens, verify_tokens=0,
        )  # fmt: skip
        t0 = time.time()
        if quantizer == Quantizer.AUTO:
            merge_qwha(job)  # the CLI's route
        else:
            refit_and_fuse(job, quantizer)
        row[f"refit-{name}"] = perplexity(load_export(out)[0], chunks)
        print(f"[{bits}-bit] refit ({name}) {time.time() - t0:.0f} s: {row[f'refit-{name}']:.4f}", flush=True)
        shutil.rmtree(out)
    shutil.rmtree(adapter)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens (the end of the Lee corpus)")
    ap.add_argument("--seq-len", type=int, default=512, help="held-out chunk length")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    fp, tok = load_causal_lm(str(smollm2_path()))
    chunks = _heldout(tok, args.tokens, args.seq_len)
    full = perplexity(fp, chunks)
    del fp
    work = Path(tempfile.mkdtemp(prefix="refit-quality-"))
    try:
        rows = {bits: _row(bits, work, chunks, args.calib_tokens) for bits in args.bits}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nSmolLM2-135M, {chunks.numel()} held-out tokens in {args.seq_len}-token chunks; full precision {full:.2f}")
    print("| bits | plain base | fused QWHA | refit, base grid (default) | refit, RTN | refit, GPTQ |")
    print("|---|---|---|---|---|---|")
    for bits, r in rows.items():

        def cell(key: str, r=r) -> str:
            if key not in r:
                return "–"
            kept = (r["plain"] - r[key]) / (r["plain"] - r["fused"])
            return f"{r[key]:.2f} (kept {kept:.0%})"

        cells = [cell(f"refit-{name}") for name in REFITS]
        print(f"| {bits} | {r['plain']:.2f} | {r['fused']:.2f} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"full_precision": full, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
