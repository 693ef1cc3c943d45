"""Why a bf16 merge cannot reach 99.9% top-1 agreement on SmolLM2: where bf16 rounding flips the argmax.

Merges a QWHA adapter into a dense float32 checkpoint (exact: top-1 1.000 against the training-time model), then
rounds parts of it to bfloat16 in place and compares logits with the float32 merge on held-out Lee-corpus tokens
(the end of the corpus, as ``verify``):

* every tensor, the linear layers only (what ``merge --bits 16 --dtype bf16`` changes: untouched tensors keep the
  base's dtype), the tied embedding / lm_head only, the norms only (round to nearest);
* the linear layers with error feedback (GPTQ's column order and inverse-Hessian updates on calibration activations,
  onto the bf16 grid instead of an integer one): a lower KL, to show whether a smarter rounding helps top-1.

    python benchmarks/bf16_floor.py [--adapter DIR] [--tokens 2048] [--calib-tokens 4096]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_quality import _heldout_chunks, _make_adapter  # noqa: E402

from qwha_export.converters.quantize import _inverse_hessian_cholesky  # noqa: E402
from qwha_export.formats.shards import natural_key  # noqa: E402
from qwha_export.metrics import compare_logits, logits_for  # noqa: E402
from qwha_export.models import load_causal_lm  # noqa: E402
from qwha_export.pipeline import MergeJob, calibration_grams, merge_qwha  # noqa: E402


def bf16_error_feedback(w: torch.Tensor, gram: torch.Tensor, damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """Round ``w`` (``d_out x d_in``) to bfloat16 column by column, pushing each column's rounding error onto the
    columns not yet rounded through the inverse Hessian (GPTQ's update with a bf16 quantizer); float64 math."""
    w = w.double().clone()
    d_in = w.shape[1]
    h = gram.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    hinv = _inverse_hessian_cholesky(h, damp)
    out = torch.empty_like(w)
    for i1 in range(0, d_in, block):
        i2 = min(i1 + block, d_in)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err = torch.empty_like(w1)
        for i in range(i2 - i1):
            q = w1[:, i].to(torch.bfloat16).double()
            out[:, i1 + i] = q
            err[:, i] = (w1[:, i] - q) / h1[i, i]
            w1[:, i + 1 :].addr_(err[:, i], h1[i, i + 1 :], alpha=-1.0)
        w[:, i2:].addmm_(err, hinv[i1:i2, i2:], alpha=-1.0)
    return out.float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=str, default=None)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        adapter = Path(args.adapter) if args.adapter else _make_adapter(Path(td))
        dense = Path(td) / "dense32"
        merge_qwha(
            MergeJob(
                adapter_dir=str(adapter), out=str(dense), bits=16, format="dense", dtype="float32",
                calib_tokens=0, verify_tokens=0, quiet=True,
            )
        )  # fmt: skip
        model, tok = load_causal_lm(str(dense))
    chunks = _heldout_chunks(tok, args.tokens, 256)
    ref = logits_for(model, chunks)
    exact = {k: v.clone() for k, v in model.state_dict().items()}

    def row(name: str, new: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(new.get(k, exact[k]))
        r = compare_logits(ref, logits_for(model, chunks))
        print(f"{name:58s} top-1 {r['top1_agreement']:.4f}   KL/token {r['kl_per_token']:.2e}", flush=True)

    def nearest(pred) -> dict[str, torch.Tensor]:
        return {k: v.to(torch.bfloat16).float() for k, v in exact.items() if pred(k)}

    print(f"{args.tokens} held-out tokens, against the float32 merge")
    row("every tensor to bf16 (nearest)", nearest(lambda k: True))
    row("linear layers to bf16 (nearest) = merge --dtype bf16", nearest(lambda k: k.endswith("proj.weight")))
    row("tied embedding / lm_head to bf16 (nearest)", nearest(lambda k: "embed" in k or "lm_head" in k))
    row("norms to bf16 (nearest)", nearest(lambda k: "norm" in k))
    with calibration_grams(adapter, args.calib_tokens, 256) as grams:  # streamed: ask in block order
        linears = sorted((k for k in exact if k.endswith("proj.weight")), key=natural_key)
        fb = {k: bf16_error_feedback(exact[k], grams[k[: -len(".weight")]]) for k in linears}
    row("linear layers to bf16 (error feedback, calibration Grams)", fb)
    row("linear layers to fp16 (nearest)", {k: v.half().float() for k, v in exact.items() if k.endswith("proj.weight")})


if __name__ == "__main__":
    main()
