"""verify's numbers on the 2,048 held-out tokens ``verify`` uses, one 256-token chunk at a time.

Usage: ``python benchmarks/gemma3_stream_verify.py ADAPTER_DIR FUSED_DIR MERGED_DIR FP_MODEL_DIR``

With a 262k vocabulary, ``qwha-export verify --tokens 2048`` holds two (tokens x vocab) float32 logits tensors
(2.1 GB each) and was OOM-killed on the shared 24 GiB machine; this computes the same KL/token (KL(reference ||
model)), top-1 agreement and perplexity against the training-time model of ADAPTER_DIR chunk by chunk, for the
fused folder, the merged folder, the full-precision base and the plain quantized base (no adapter), one at a time.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time

import torch

from qwha_export.data import lee_corpus_text, token_chunks
from qwha_export.metrics import compare_logits
from qwha_export.pipeline import load_quantized_base
from qwha_export.verify import load_export, load_reference


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])
    return float(torch.nn.functional.cross_entropy(pred, ids[:, 1:].reshape(-1), reduction="sum"))


def main(adapter: str, fused: str, merged: str, fp: str) -> dict:
    torch.set_num_threads(2)
    t0 = time.time()
    ref, tok = load_reference(adapter)
    chunks = token_chunks(tok, lee_corpus_text(), 256, max_tokens=2048, from_end=True)
    loaders = {
        "fused": lambda: load_export(fused)[0],
        "merged": lambda: load_export(merged)[0],
        "fp": lambda: load_export(fp)[0],
        "plain": lambda: load_quantized_base(adapter)[0],
    }
    acc = {k: {"nll": 0.0, "kl": 0.0, "top1": 0.0, "max": 0.0, "rows": 0} for k in ["ref", *loaders]}
    with torch.no_grad():
        for name, load in loaders.items():
            model = load()
            for s in range(chunks.shape[0]):
                ids = chunks[s : s + 1]
                r = ref(input_ids=ids).logits.float()
                if name == "fused":
                    acc["ref"]["nll"] += _nll(r, ids)
                x = model(input_ids=ids).logits.float()
                c = compare_logits(r, x)
                a, n = acc[name], ids.numel()
                a["nll"] += _nll(x, ids)
                a["kl"] += c["kl_per_token"] * n
                a["top1"] += c["top1_agreement"] * n
                a["max"] = max(a["max"], c["max_abs_logit_diff"])
                a["rows"] += n
            print(name, json.dumps(acc[name]), f"{time.time() - t0:.0f} s", flush=True)
            del model
            gc.collect()
    targets = chunks.shape[0] * (chunks.shape[1] - 1)
    out: dict = {"tokens": int(chunks.numel()), "seconds": time.time() - t0}
    for name, a in acc.items():
        out[name] = {"ppl": math.exp(a["nll"] / targets)}
        if a["rows"]:
            out[name].update(
                kl_per_token=a["kl"] / a["rows"], top1_agreement=a["top1"] / a["rows"], max_abs_logit_diff=a["max"]
            )
    return out


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:5])))
