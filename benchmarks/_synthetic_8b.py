"""A synthetic Llama-3-8B-shaped checkpoint for the merge benchmark (``bench_merge.py``): a bf16 random base
written tensor by tensor (never whole in memory), its RTN 4-bit g64 quantized base and a random QWHA adapter at a
given rank, at any number of decoder blocks; and the file sizes of the full 32-block model from its shapes."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from qwha_export.converters.quantize import QuantizedWeight
from qwha_export.formats.shards import DEFAULT_MAX_SHARD_BYTES

LLAMA3_8B = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=128256, full_layers=32)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.uint8: "U8",
              torch.int32: "I32", torch.int64: "I64"}  # fmt: skip


def write_safetensors_stream(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors) -> None:
    """Write a safetensors file from ``specs`` (name, dtype, shape) with the header first, then each tensor of the
    iterator ``tensors`` (``(name, tensor)`` in spec order) as it is generated: one tensor in memory at a time."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in specs:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, dtype, shape), (got, t) in zip(specs, tensors, strict=True):
            if got != name or t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"generator gave {got} {t.dtype} {tuple(t.shape)}, expected {name} {dtype} {shape}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del t


def llama_shapes(layers: int, dims: dict = LLAMA3_8B) -> list[tuple[str, tuple[int, int] | tuple[int]]]:
    """Tensor names and shapes of a Llama checkpoint of ``dims`` (Llama-3-8B by default) with ``layers`` blocks, in
    checkpoint order."""
    h, i, v = dims["hidden"], dims["intermediate"], dims["vocab"]
    kv = h // dims["heads"] * dims["kv_heads"]
    proj = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }
    out: list = [("model.embed_tokens.weight", (v, h))]
    for b in range(layers):
        out += [
            (f"model.layers.{b}.input_layernorm.weight", (h,)),
            (f"model.layers.{b}.post_attention_layernorm.weight", (h,)),
        ]
        out += [(f"model.layers.{b}.{k}.weight", s) for k, s in proj.items()]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def spectrum_size(d_out: int, d_in: int, rank: int) -> int:
    return min(rank * (d_in + d_out), d_out * d_in)


def random_spectrum(d_out: int, d_in: int, rank: int, gen: torch.Generator):
    """``(values, indices)``: ``p = rank (d_in + d_out)`` entries spread evenly over the output channels, distinct
    strided Walsh indices per channel with a random offset (cheap to draw for 58M-entry layers)."""
    nnz = spectrum_size(d_out, d_in, rank)
    k = -(-nnz // d_out)
    per_row = torch.full((d_out,), nnz // d_out)
    per_row[: nnz % d_out] += 1
    step = torch.arange(k) * (d_in // k)
    cols = (torch.randint(0, d_in, (d_out, 1), generator=gen) + step[None, :]) % d_in
    keep = torch.arange(k)[None, :] < per_row[:, None]
    rows = torch.arange(d_out)[:, None].expand(d_out, k)[keep]
    return torch.randn(nnz, generator=gen), torch.stack([rows, cols[keep]])


def random_quantized(d_out: int, d_in: int, gen: torch.Generator, device: str = "cpu") -> QuantizedWeight:
    g = d_in // 64
    if device == "meta":
        e = lambda *s, dt=torch.uint8: torch.empty(*s, dtype=dt, device="meta")  # noqa: E731
        return QuantizedWeight(e(d_out, d_in), e(d_out, g, dt=torch.float16), e(d_out, g), 4, 64)
    return QuantizedWeight(
        codes=torch.randint(0, 16, (d_out, d_in), dtype=torch.uint8, generator=gen),
        scales=(torch.rand(d_out, g, generator=gen) * 0.002 + 0.0005).half(),
        zeros=torch.randint(0, 16, (d_out, g), dtype=torch.uint8, generator=gen),
        bits=4,
        group_size=64,
    )


def write_synthetic_base(
    base: Path, layers: int, dims: dict = LLAMA3_8B, tokenizer_from: Path | None = None, seed: int = 0
) -> None:
    """A bf16 random Llama HF folder of ``dims`` at ``layers`` blocks in ``base`` (created), in <= 2 GB shards
    written tensor by tensor; ``tokenizer_from``: a folder whose tokenizer files are copied in."""
    import shutil

    from transformers import LlamaConfig

    base.mkdir(parents=True)
    LlamaConfig(
        vocab_size=dims["vocab"],
        hidden_size=dims["hidden"],
        intermediate_size=dims["intermediate"],
        num_hidden_layers=layers,
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        dtype="bfloat16",
    ).save_pretrained(str(base))
    if tokenizer_from is not None:
        for f in Path(tokenizer_from).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens_map", "vocab", "merges")):
                shutil.copy(f, base / f.name)
    shapes = llama_shapes(layers, dims)
    gen = torch.Generator().manual_seed(seed)

    def weights(items):
        for name, shape in items:
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen).mul_(0.02)
            yield name, t.to(torch.bfloat16)

    shards, cur, size = [], [], 0  # greedy <= 2 GB shards, as save_pretrained
    for name, shape in shapes:
        n = math.prod(shape) * 2
        if cur and size + n > DEFAULT_MAX_SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    weight_map = {}
    for j, items in enumerate(shards):
        fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_stream(base / fname, [(k, torch.bfloat16, s) for k, s in items], weights(items))
        weight_map.update({k: fname for k, _ in items})
    total = sum(math.prod(s) * 2 for _, s in shapes)
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )


def write_synthetic_8b(
    root: Path, layers: int, rank: int, seed: int = 0, dims: dict = LLAMA3_8B, tokenizer_from: Path | None = None
) -> Path:
    """Base HF folder ``root/base`` and adapter directory ``root/adapter`` (see the module docstring)."""
    from qwha_export.pipeline import base_fingerprint

    base, adir = root / "base", root / "adapter"
    write_synthetic_base(base, layers, dims, tokenizer_from, seed)
    adir.mkdir()
    shapes = llama_shapes(layers, dims)
    gen = torch.Generator().manual_seed(seed + 1)

    linears = [(k[: -len(".weight")], s) for k, s in shapes if k.rsplit(".", 2)[-2] in PROJ]
    qspecs = [
        (k, v.dtype, tuple(v.shape))
        for name, (d_out, d_in) in linears
        for k, v in random_quantized(d_out, d_in, gen, "meta").to_dict(prefix=f"{name}.").items()
    ]

    def qtensors():
        for name, (d_out, d_in) in linears:
            yield from random_quantized(d_out, d_in, gen).to_dict(prefix=f"{name}.").items()

    write_safetensors_stream(adir / "quantized_base.safetensors", qspecs, qtensors())

    aspecs = []
    for name, (d_out, d_in) in linears:
        p, key = spectrum_size(d_out, d_in, rank), f"base_model.model.{name}"
        aspecs += [
            (f"{key}.qwha_indices", torch.int64, (2, p)),
            (f"{key}.qwha_shape", torch.int64, (2,)),
            (f"{key}.qwha_spectrum", torch.float32, (p,)),
        ]

    def atensors():
        for name, (d_out, d_in) in linears:
            values, indices = random_spectrum(d_out, d_in, rank, gen)
            key = f"base_model.model.{name}"
            yield f"{key}.qwha_indices", indices
            yield f"{key}.qwha_shape", torch.tensor([d_out, d_in])
            yield f"{key}.qwha_spectrum", values

    write_safetensors_stream(adir / "adapter_model.safetensors", aspecs, atensors())
    (adir / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "QWHA",
                "rank": rank,
                "scale": 1.0,
                "init": "random",
                "scale_pattern": {},
                "target_modules": list(PROJ),
                "base_model_name_or_path": str(base),
                "inference_mode": True,
            },
            indent=2,
        )
    )
    (adir / "qwha_base.json").write_text(
        json.dumps(
            {
                "base_model": str(base),
                "base_hash": base_fingerprint(base),
                "quantized_layers": [n for n, _ in linears],
                "quant": "4-bit g64 random codes (benchmark)",
            },
            indent=2,
        )
    )
    return adir


def full_8b_bytes(rank: int, layers: int) -> dict[str, int]:
    """File bytes of the synthetic model at ``layers`` blocks (base bf16, quantized base, adapter), from shapes."""
    shapes = llama_shapes(layers)
    lin = [s for k, s in shapes if k.rsplit(".", 2)[-2] in PROJ]
    return {
        "base": sum(math.prod(s) * 2 for _, s in shapes),
        "quantized": sum(o * i + 3 * o * (i // 64) for o, i in lin),
        "adapter": sum(20 * spectrum_size(o, i, rank) for o, i in lin),
    }
