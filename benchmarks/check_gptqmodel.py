"""Load a GPTQ export in transformers through GPTQModel and compare its logits with our own loader's.

GPTQModel's current release needs torch >= 2.14.1 while the project pins torch 2.13.0, so this runs in two
environments, the reference step in ours and the compare step in a separate one:

    python benchmarks/check_gptqmodel.py reference EXPORT_DIR --save ref.pt        # this project's environment
    python -m venv gq && gq/bin/pip install torch==2.14.1 transformers gptqmodel optimum
    gq/bin/python benchmarks/check_gptqmodel.py compare EXPORT_DIR --load ref.pt [--backend torch]

``reference`` takes 512 held-out tokens from the end of gensim's Lee corpus (two 256-token rows) and saves them
with the float32 logits of ``qwha_export.verify.load_export``. ``compare`` loads EXPORT_DIR with
``AutoModelForCausalLM.from_pretrained`` (float32, CPU; ``--backend`` is passed to ``GPTQConfig``) and prints the
kernel class GPTQModel chose, the largest logit difference, KL per token and top-1 agreement. Only ``compare``
imports nothing from this project, so it runs where qwha-export is not installed.
"""

from __future__ import annotations

import argparse

import torch


def reference(export_dir: str, save: str, tokens: int = 512, seq_len: int = 256) -> None:
    from transformers import AutoTokenizer

    from qwha_export.data import lee_corpus_text, tokenize_text
    from qwha_export.verify import load_export

    ids = tokenize_text(AutoTokenizer.from_pretrained(export_dir), lee_corpus_text())
    x = torch.tensor(ids[-tokens:]).view(-1, seq_len)
    model, _ = load_export(export_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(x).logits.float()
    torch.save({"input_ids": x, "logits": logits}, save)
    print(f"saved {x.numel()} tokens and our loader's logits to {save}")


def compare(export_dir: str, load: str, backend: str | None) -> None:
    from transformers import AutoModelForCausalLM, GPTQConfig

    ref = torch.load(load, weights_only=True)
    kwargs = {"quantization_config": GPTQConfig(bits=4, backend=backend)} if backend else {}
    model = AutoModelForCausalLM.from_pretrained(export_dir, device_map="cpu", dtype=torch.float32, **kwargs)
    kernels = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
    with torch.no_grad():
        got = model(ref["input_ids"]).logits.float()
    lp, lq = torch.log_softmax(ref["logits"], -1), torch.log_softmax(got, -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    top1 = float((ref["logits"].argmax(-1) == got.argmax(-1)).float().mean())
    diff = float((ref["logits"] - got).abs().max())
    n = got.shape[:2].numel()
    print(f"modules {kernels}: max|dlogit| {diff:.4f}, KL/token {kl:.2e}, top-1 {top1:.4f} on {n} tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    r = sub.add_parser("reference")
    r.add_argument("export_dir")
    r.add_argument("--save", required=True)
    c = sub.add_parser("compare")
    c.add_argument("export_dir")
    c.add_argument("--load", required=True)
    c.add_argument("--backend", default=None, help="GPTQConfig backend, e.g. torch (accepts a ragged last group)")
    args = ap.parse_args()
    if args.step == "reference":
        reference(args.export_dir, args.save)
    else:
        compare(args.export_dir, args.load, args.backend)


if __name__ == "__main__":
    main()
