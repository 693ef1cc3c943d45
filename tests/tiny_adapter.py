"""A tiny adapter directory built by hand (no tokenizer needed), shared by the merge and fused/verify tests.

Tiny random Llama (hidden 64, intermediate 128, 2 layers), RTN 4-bit g32 base for all seven projections, random QWHA
spectra on every projection but ``o_proj`` (quantized, not adapted), one per-layer scale override.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwha_export.converters.quantize import QuantizedWeight, quantize_rtn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")  # o_proj: quantized, not adapted
BITS, GS = 4, 32


def tiny_config(
    vocab: int = 256, hidden: int = 64, intermediate: int = 128, max_positions: int = 64, layers: int = 2, **extra
) -> dict:
    """Keyword arguments of a tiny decoder config (4 heads / 2 KV heads; untied unless ``extra`` says otherwise)."""
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        **{"tie_word_embeddings": False, **extra},
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of a byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def save_byte_tokenizer(path: Path) -> None:
    """A real byte-level ``PreTrainedTokenizerFast`` (one token per UTF-8 byte, ids 0-255, plus ``</s>`` = 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: b for b, c in _bytes_to_unicode().items()}
    vocab["</s>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["</s>"])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(str(path))


def write_adapter_dir(peft_model, quantized: dict[str, QuantizedWeight], adir: Path, base_model: Path) -> Path:
    """Save ``peft_model``'s adapter, the quantized base and ``qwha_base.json`` into ``adir`` (as ``init`` does)."""
    adir.mkdir()
    peft_model.save_pretrained(str(adir))
    flat = {}
    for name, qw in quantized.items():
        flat.update(qw.to_dict(prefix=f"{name}."))
    save_file(flat, str(adir / "quantized_base.safetensors"))
    meta = {"base_model": str(base_model), "quantized_layers": sorted(quantized)}
    (adir / "qwha_base.json").write_text(json.dumps(meta))
    return adir


def tiny_llama(hidden: int = 64, intermediate: int = 128, max_positions: int = 64):
    """A seeded random LlamaForCausalLM (2 layers, 4 heads / 2 KV heads, vocab 256), weights scaled up x5 so that
    activations are far from zero and differences are visible."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**tiny_config(hidden=hidden, intermediate=intermediate, max_positions=max_positions))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return model


def quantized_model(base_dir: Path, quantized: dict[str, QuantizedWeight]):
    from transformers import LlamaForCausalLM

    from qwha_export.quant_linear import QuantLinear, replace_linear

    model = LlamaForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    for name, qw in quantized.items():
        replace_linear(model, name, QuantLinear.from_linear(model.get_submodule(name), qw))
    return model


def build_adapter_dir(root: Path) -> tuple[Path, Path, dict[str, QuantizedWeight]]:
    """Write ``root/base`` (HF folder) and ``root/adapter`` (adapter dir); return both and the quantized weights."""
    from peft import get_peft_model

    from qwha_export.tuner import QWHAConfig, set_spectrum

    base_dir, adir = root / "base", root / "adapter"
    model = tiny_llama()
    model.save_pretrained(str(base_dir), safe_serialization=True)
    quantized = {
        name: quantize_rtn(mod.weight.detach(), BITS, GS)
        for name, mod in model.named_modules()
        if name.rsplit(".", 1)[-1] in TARGETS
    }
    qmodel = quantized_model(base_dir, quantized)
    peft_model = get_peft_model(qmodel, QWHAConfig(target_modules=list(ADAPTED), rank=4, scale=2.0, init="random"))
    gen = torch.Generator().manual_seed(1)
    for i, name in enumerate(sorted(n for n in quantized if n.rsplit(".", 1)[-1] in ADAPTED)):
        d_out, d_in = quantized[name].shape
        nnz = 5 * d_out
        flat = torch.randperm(d_out * d_in, generator=gen)[:nnz]
        values = torch.randn(nnz, generator=gen)
        scale = 3.0 if i == 0 else None  # one per-layer override (scale_pattern)
        set_spectrum(peft_model, name, values, flat // d_in, flat % d_in, scale=scale)
    write_adapter_dir(peft_model, quantized, adir, base_dir)
    return adir, base_dir, quantized
