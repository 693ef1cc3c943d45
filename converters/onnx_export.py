"""The numbers of an ONNX export, taken from the PyTorch model that is exported (no graph wiring here).

:func:`decoder_from_model` walks a Llama/Mistral/Qwen2-style model as the project's loaders build it
(``QuantLinear`` for quantized layers, ``QWHALinear`` for adapted ones, ``nn.Linear`` otherwise) and returns the
:class:`~qwha_export.formats.onnx_graph.DecoderSpec` / ``DecoderWeights`` that
:func:`~qwha_export.formats.onnx_graph.build_decoder_model` turns into a graph:

* quantized layers keep their exact codes, zero points and scales (float16 -> float32 is exact); 3-bit codes are
  stored as 4-bit codes; per-channel scales are repeated over power-of-two blocks; act-order layers (``g_idx``)
  read their input columns in group order (``perm``), which is exact as every group holds ``group_size`` columns;
* adapters: ``values * s / (d_in * sqrt(d_out))`` computed in float64 and cast once to float32;
* rotary tables: the model's own rotary module evaluated at positions ``0 .. max_position_embeddings - 1``
  (``cos``/``sin`` are duplicated halves, the first half is kept), so every RoPE variant transformers implements
  statically (default, linear, llama3, yarn) is reproduced as PyTorch computes it;
* an unquantized ``lm_head`` whose float32 weight lies exactly on a symmetric 8-bit grid with block 32..128 (e.g. a
  GGUF ``Q8_0`` embedding, as in SmolLM2) is written as an 8-bit MatMulNBits whose dequantized weight is
  bit-identical; otherwise it stays a float32 MatMul.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..formats.onnx_graph import (
    DecoderSpec,
    DecoderWeights,
    DenseLinear,
    LayerWeights,
    NBitsLinear,
    Projection,
    SpectralAdapter,
)
from ..kernels import hadamard_k, hadamard_matrix, hadamard_order
from .quantize import n_groups_of

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "check_config",
    "decoder_from_model",
    "exact_grid_linear",
    "nbits_linear",
    "wht_factor_sizes",
    "wht_factors",
]

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2")
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
_MAX_FACTOR = 128  # widest Sylvester factor of the WalshHadamard function body (measured: README "ONNX export")


def check_config(cfg: dict[str, Any]) -> None:
    """One-line ``ValueError`` unless ``cfg`` (a config.json dict) describes a model this exporter writes."""
    mt = cfg.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {mt!r} cannot be exported to ONNX; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act {act!r} is not supported by the ONNX export (silu only)")
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported by the ONNX export")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rtype = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rtype not in _STATIC_ROPE:
        raise ValueError(f"rope_type {rtype!r} is not supported by the ONNX export; supported: {_STATIC_ROPE}")


def _block_size(group: int) -> int:
    for b in (128, 64, 32, 16):
        if group % b == 0:
            return b
    raise ValueError(f"group size {group} is not a multiple of 16; MatMulNBits cannot represent it")


def nbits_linear(module: nn.Module) -> NBitsLinear:
    """The MatMulNBits weight of a ``QuantLinear`` (exact codes, zero points and scales)."""
    qw = module.qweight
    d_out, d_in = qw.shape
    codes = qw.codes.cpu().numpy()
    zeros = qw.zeros.cpu().numpy()
    scales = qw.scales.cpu().float().numpy()  # float16 -> float32 is exact
    perm = None
    if qw.g_idx is not None:
        g = qw.g_idx.long().cpu()
        sizes = torch.full((qw.n_groups,), qw.group_size, dtype=torch.long)
        sizes[-1] = d_in - (qw.n_groups - 1) * qw.group_size  # a ragged last group
        if not torch.equal(torch.bincount(g, minlength=qw.n_groups), sizes):
            raise ValueError("act-order g_idx with unequal group sizes cannot be written as MatMulNBits")
        perm_t = torch.argsort(g, stable=True)
        perm = perm_t.numpy().astype(np.int64)
        codes = codes[:, perm]
    block = _block_size(qw.group_size)
    reps = qw.group_size // block
    if reps > 1:  # e.g. per-channel: the same scale and zero point for every block of the group
        n_blocks = n_groups_of(d_in, block)  # a ragged last group spans fewer blocks
        zeros = np.repeat(zeros, reps, axis=1)[:, :n_blocks]
        scales = np.repeat(scales, reps, axis=1)[:, :n_blocks]
    bits = 4 if qw.bits == 3 else qw.bits
    return NBitsLinear(np.ascontiguousarray(codes), np.ascontiguousarray(zeros), scales, bits, block, perm)


def exact_grid_linear(weight: torch.Tensor, bits: int = 8) -> NBitsLinear | None:
    """An ``NBitsLinear`` that dequantizes to exactly ``weight`` (float32) on a symmetric ``bits`` grid, or None.

    Per block of ``b`` in (128, 64, 32) columns the scale is ``max|w| / (2**(bits-1) - 1)`` and the zero point
    ``2**(bits-1)``; accepted only if ``(code - zero) * scale`` reproduces every weight bit for bit.
    """
    w = weight.detach().cpu().float()
    n, k = w.shape
    qmax, zero = 2 ** (bits - 1) - 1, 2 ** (bits - 1)
    for block in (128, 64, 32):
        if k % block:
            continue
        wb = w.reshape(n, k // block, block)
        scale = wb.abs().amax(dim=2) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round(wb / scale[..., None])
        if float(q.abs().max()) > qmax or not torch.equal(q * scale[..., None], wb):
            continue
        codes = (q + zero).to(torch.uint8).reshape(n, k).numpy()
        zeros = np.full((n, k // block), zero, np.uint8)
        return NBitsLinear(codes, zeros, scale.numpy().astype(np.float32), bits, block)
    return None


def _linear(module: nn.Module) -> NBitsLinear | DenseLinear:
    if hasattr(module, "qweight") and hasattr(module, "codes"):
        return nbits_linear(module)
    if isinstance(module, nn.Linear):
        return DenseLinear(module.weight.detach().cpu().float().numpy())
    raise ValueError(f"cannot export a {type(module).__name__} as an ONNX linear layer")


def _bias(module: nn.Module) -> np.ndarray | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach().cpu().float().numpy()


def _projection(module: nn.Module) -> Projection:
    if all(hasattr(module, a) for a in ("base", "spectrum", "indices", "coefficient")):  # a QWHA layer
        d_in = module.in_features
        coef = module.coefficient
        values = (module.spectrum.detach().cpu().double() * coef).float().numpy()
        rows, cols = (t.cpu().numpy().astype(np.int64) for t in module.indices)
        adapter = SpectralAdapter(rows, cols, values, hadamard_order(d_in)[0])
        return Projection(_linear(module.base), _bias(module.base), adapter)
    return Projection(_linear(module), _bias(module), None)


def wht_factor_sizes(n: int) -> tuple[int, list[int]]:
    """``(K, sizes)`` of the WalshHadamard function body: ``H_K`` (if ``K > 1``), then Sylvester factors of ``2^m``
    with the widest (<= 128) on the last axis, so every MatMul multiplies long rows (see onnx_ops.wht_function)."""
    k, p = hadamard_order(n)
    last = min(p, _MAX_FACTOR)
    sizes, rest = [], p // last
    while rest > 1:
        sizes.append(min(rest, _MAX_FACTOR))
        rest //= sizes[-1]
    return k, ([k] if k > 1 else []) + sizes + ([last] if p > 1 else [])


def wht_factors(n: int) -> tuple[int, list[np.ndarray]]:
    k, sizes = wht_factor_sizes(n)
    mats = [hadamard_k(k) if (i == 0 and k > 1) else hadamard_matrix(f) for i, f in enumerate(sizes)]
    return k, [m.numpy().astype(np.float32) for m in mats]


def _rope_tables(model: nn.Module, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    rotary = model.model.rotary_emb
    max_pos = int(model.config.max_position_embeddings)
    pos = torch.arange(max_pos)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), pos)
    half = head_dim // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def decoder_from_model(
    model: nn.Module, accuracy_level: int = 0, exact_lm_head: bool = True
) -> tuple[DecoderSpec, DecoderWeights, dict[str, Any]]:
    """``(spec, weights, info)`` of ``model`` (see the module docstring); ``info`` summarises what was written."""
    cfg = model.config
    check_config(cfg.to_dict())
    heads, kv_heads = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    window = getattr(cfg, "sliding_window", None) if cfg.model_type == "mistral" else None
    if cfg.model_type == "qwen2" and getattr(cfg, "use_sliding_window", False):
        raise ValueError("qwen2 with use_sliding_window=true is not supported by the ONNX export")
    cos, sin = _rope_tables(model, head_dim)
    layers, sizes, bits = [], set(), set()
    for block in model.model.layers:
        att, mlp = block.self_attn, block.mlp
        projs = {n: _projection(getattr(att, f"{n}_proj")) for n in "qkvo"}
        projs |= {n: _projection(getattr(mlp, f"{n}_proj")) for n in ("gate", "up", "down")}
        for p in projs.values():
            if p.adapter is not None:
                sizes.add(p.linear.shape[1])
            if isinstance(p.linear, NBitsLinear):
                bits.add((p.linear.bits, p.linear.block_size))
        layers.append(
            LayerWeights(
                block.input_layernorm.weight.detach().float().numpy(),
                block.post_attention_layernorm.weight.detach().float().numpy(),
                **projs,
            )
        )
    embed = model.get_input_embeddings().weight.detach().cpu().float()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    lm_head: NBitsLinear | DenseLinear | None
    if exact_lm_head and hasattr(head, "weight") and not hasattr(head, "codes"):
        lm_head = exact_grid_linear(head.weight) or (None if tied else _linear(head))
    else:
        lm_head = None if tied else _linear(head)
    spec = DecoderSpec(
        num_layers=len(layers),
        hidden_size=int(cfg.hidden_size),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(cfg.vocab_size),
        rms_eps=float(cfg.rms_norm_eps),
        cos_cache=cos,
        sin_cache=sin,
        attention_scale=float(getattr(model.model.layers[0].self_attn, "scaling", head_dim**-0.5)),
        window=int(window) - 1 if window else -1,  # HF keeps `window` keys, GQA local_window_size + 1
        accuracy_level=accuracy_level,
        wht_factors={n: wht_factors(n) for n in sorted(sizes)},
    )
    weights = DecoderWeights(embed.numpy(), layers, model.model.norm.weight.detach().float().numpy(), lm_head)
    info = {
        "model_type": cfg.model_type,
        "quantized": sorted({f"{b}-bit/block {s}" for b, s in bits}),
        "adapted_sizes": sorted(sizes),
        "lm_head": "tied float32"
        if lm_head is None
        else ("exact 8-bit MatMulNBits" if isinstance(lm_head, NBitsLinear) else "float32"),
        "rope_type": (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default"),
        "window": spec.window,
    }
    return spec, weights, info
