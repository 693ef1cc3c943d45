"""QWHA initialisation quality on the real SmolLM2-135M: per-layer held-out output error and perplexity.

Compares, on the same calibration/held-out split of gensim's Lee corpus: full precision, the quantized model with no
adapter, random-selection init (uniform budgets, random Walsh indices, least-squares values), and QWHA init
(AdaAlloc budgets, top-k selection, refinement), for 4-bit and 2-bit group-64 RTN.

    python benchmarks/init_quality.py [--rank 64] [--bits 4 2] [--calib-tokens 2048]
"""

from __future__ import annotations

import argparse
import json
import time

from qwha_export.init_study import StudyConfig, compare_initialisations
from qwha_export.models import load_causal_lm, smollm2_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--quantizer", default="rtn", choices=["rtn", "gptq"])
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--heldout-tokens", type=int, default=2048)
    ap.add_argument("--json", type=str, default=None, help="also write the full result here")
    args = ap.parse_args()
    model, tok = load_causal_lm(smollm2_path())
    t0 = time.time()
    cfg = StudyConfig(
        bits=tuple(args.bits),
        group_size=args.group_size,
        quantizer=args.quantizer,
        rank=args.rank,
        calib_tokens=args.calib_tokens,
        heldout_tokens=args.heldout_tokens,
        quiet=False,
    )
    res = compare_initialisations(model, tok, cfg)
    print(
        f"SmolLM2-135M, {args.quantizer} g{args.group_size}, rank {args.rank}, "
        f"{args.calib_tokens} calib / {args.heldout_tokens} held-out tokens, {time.time() - t0:.0f} s"
    )
    print(f"{'variant':18} {'ppl':>8} | {'layers improved':>15} | {'mean rel err before':>19} {'after':>8}")
    for variant, ppl in res["ppl"].items():
        s = res["summary"].get(variant)
        extra = (
            f"{s['layers_improved']:>7}/{s['layers']:<7} | "
            f"{s['mean_rel_err_before']:>19.4f} {s['mean_rel_err_after']:>8.4f}"
            if s
            else f"{'':>15} |"
        )
        print(f"{variant:18} {ppl:>8.2f} | {extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
