"""Every folder a user's commands write, made by the real ``qwha-export`` commands on a tiny model.

A tiny random Llama (hidden 64, intermediate 128, 2 layers) with a real byte-level tokenizer is saved as a Hugging
Face folder (with a README that gives its license, as a real base model has); then, through the CLI exactly as a
user types it: ``init`` (RTN 4-bit g32, rank 4, Lee-corpus calibration) -> ``train`` (a few steps on MMLU CoT +
Lee text) -> ``merge`` in every format (dense 16-bit, gptq, gptq_v2 in 60 kB shards, compressed-tensors, fused,
onnx) -> ``fuse`` -> ``export-onnx`` of the merged and the fused folder. Each command's own parity check runs on
held-out text. Nothing here writes a manifest or an export file by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from tiny_adapter import save_byte_tokenizer, tiny_config

from qwha_export.cli import main
from qwha_export.data import lee_corpus_text, mmlu_cot_records

# name -> (command line after the source folder, source: "trained" or another folder name)
PARITY = ["--verify-tokens", "64"]
MERGES = {
    "dense": ["merge", "--bits", "16", "--format", "dense", "--dtype", "float32", *PARITY],
    "gptq": ["merge", "--bits", "4", "--format", "gptq", "--calib-tokens", "256", *PARITY],
    "gptq_v2": ["merge", "--bits", "4", "--format", "gptq_v2", "--max-shard-size", "60KB", *PARITY],
    "compressed-tensors": ["merge", "--bits", "4", "--format", "compressed-tensors", *PARITY],
    "merge-fused": ["merge", "--bits", "4", "--format", "fused", *PARITY],
    "merge-onnx": ["merge", "--bits", "4", "--format", "onnx", *PARITY],
    "fused": ["fuse", *PARITY],
}
ONNX_EXPORTS = {"onnx-merged": "gptq_v2", "onnx-fused": "fused"}
# what each folder is: (settings.format, base_model_relation, library_name or None, expected tags)
KINDS = {
    "dense": ("dense", "finetune", "transformers", {"qwha", "safetensors"}),
    "gptq": ("gptq", "quantized", "transformers", {"qwha", "gptq", "int4", "safetensors"}),
    "gptq_v2": ("gptq_v2", "quantized", "transformers", {"qwha", "gptq", "int4", "safetensors"}),
    "compressed-tensors": (
        "compressed-tensors",
        "quantized",
        "transformers",
        {"qwha", "compressed-tensors", "int4", "safetensors"},
    ),
    "merge-fused": ("fused", "adapter", None, {"qwha", "qwha-fused", "gptq", "int4", "safetensors"}),
    "fused": ("fused", "adapter", None, {"qwha", "qwha-fused", "gptq", "int4", "safetensors"}),
    "merge-onnx": ("onnx", "quantized", "onnxruntime", {"qwha", "onnx", "int4"}),
    "onnx-merged": ("onnx", "quantized", "onnxruntime", {"qwha", "onnx", "int4"}),
    "onnx-fused": ("onnx", "adapter", "onnxruntime", {"qwha", "qwha-fused", "onnx", "int4"}),
}
EXPORTS = tuple(KINDS)


def run_cli(*args: object) -> str:
    """Run ``qwha-export ARGS`` in process; assert exit code 0; return its output."""
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, f"qwha-export {' '.join(map(str, args))}\n{result.output}"
    return result.output


def write_tiny_base(path: Path) -> Path:
    """A seeded tiny Llama with the byte-level tokenizer and a model card giving its license, as a model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    save_byte_tokenizer(path)
    config = LlamaConfig(**tiny_config(vocab=257, max_positions=128, bos_token_id=256, eos_token_id=256))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # random N(0, 0.02) logits are ~uniform; give the head range so the loss can move
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(str(path))
    (path / "README.md").write_text("---\nlicense: mit\n---\n# tiny base\n")
    return path


def write_training_data(path: Path) -> Path:
    """Real text: 4 MMLU chain-of-thought records (prompt/response) and 4 Lee corpus articles."""
    mmlu = sorted(mmlu_cot_records(), key=lambda r: len(r["prompt"]))[:4]
    lee = [line for line in lee_corpus_text().splitlines() if line.strip()][:4]
    recs = [{"prompt": r["prompt"], "response": r["response"]} for r in mmlu] + [{"text": t} for t in lee]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def build_flow(root: Path) -> dict[str, Path]:
    """``{"base", "adapter", "trained", <every name of KINDS>}``: folders written by the commands under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    base = write_tiny_base(root / "base")
    data = write_training_data(root / "data.jsonl")
    out = {"base": base, "adapter": root / "adapter", "trained": root / "trained"}
    run_cli("init", base, "--out", out["adapter"], "--bits", 4, "--group-size", 32, "--rank", 4,
            "--calib-tokens", 256, "--heldout-tokens", 128, "--seq-len", 64, "--quiet")  # fmt: skip
    run_cli("train", out["adapter"], "--data", data, "--out", out["trained"], "--max-steps", 3, "--batch-size", 2,
            "--max-len", 96, "--lr", 0.05, "--logging-steps", 1)  # fmt: skip
    for name, (command, *args) in MERGES.items():
        out[name] = root / name
        run_cli(command, out["trained"], "--out", out[name], *args)
    for name, src in ONNX_EXPORTS.items():
        out[name] = root / name
        run_cli("export-onnx", out[src], "--out", out[name], "--parity-tokens", 32, "--quiet")
    return out
