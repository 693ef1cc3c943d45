"""compressed-tensors ``pack-quantized`` layers (asymmetric int group / channel weight quantization, "W4A16"/"W8A16").

Per quantized linear ``<module>`` (weight ``(d_out, d_in)``, ``n_groups`` groups):

==============================  =======  =====================================  =====================================
tensor                          dtype    shape                                  content
==============================  =======  =====================================  =====================================
``<module>.weight_packed``      int32    ``[d_out, ceil(d_in * bits / 32)]``    codes packed along d_in (last dim)
``<module>.weight_scale``       float16  ``[d_out, n_groups]``                  ``QuantizedWeight.scales``
``<module>.weight_zero_point``  int32    ``[ceil(d_out * bits / 32), n_groups]``  zero points packed along d_out
``<module>.weight_shape``       int64    ``[2]``                                ``[d_out, d_in]``
==============================  =======  =====================================  =====================================

Conventions (checked against compressed-tensors 0.20.1 ``PackedQuantizationCompressor`` and its
``pack_to_int32`` / ``unpack_from_int32`` / ``dequantize``):

* compressed-tensors represents ``num_bits``-bit ints SIGNED: ``q_ct = code - 2**(bits-1)`` and
  ``zp_ct = zero - 2**(bits-1)`` (range ``[-2**(bits-1), 2**(bits-1) - 1]``, held as int8 in memory);
  ``pack_to_int32`` adds ``2**(bits-1)`` back before packing, so the packed words carry our UNSIGNED codes and zero
  points (dense little-endian int32 stream, see :mod:`.packing`). For asymmetric ``group``/``channel`` strategies
  the zero point is packed too, along dim 0 (``packed_dim=0``); symmetric checkpoints have no zero point
  (read back here as ``zero = 2**(bits-1)``).
* Dequantization (``compressed_tensors...forward_helpers._dequantize``)::

      W = (q_ct.to(scale.dtype) - zp_ct.to(scale.dtype)) * scale

  With a float16 scale: ``q_ct - zp_ct = code - zero`` is an exact integer in float16 and the product is one
  float16 rounding of the exact value -- bit-identical to ``QuantizedWeight.dequantize(torch.float16)``
  (float32 scale: identical to ``dequantize(torch.float32)``, which is exact).
* ``weight_shape`` is written as ``torch.tensor(weight.shape)`` (int64), as the compressor does.
* No ``g_idx``: compressed-tensors 0.20 has no activation-order group index, so a layer whose groups are not
  ``column // group_size`` (GPTQ ``act_order`` without ``static_groups``) is refused, and so is a group size that
  does not divide ``d_in`` (the library's group dequantization requires it).
* Bits: 4 and 8 are what vLLM's ``CompressedTensorsWNA16`` serves; 2 is accepted (same layout in every
  compressed-tensors version); 3 is refused because its packing changed between compressed-tensors releases
  (10 values per int32 before the dense packing).

Serving note: vLLM allocates ``weight_scale`` in the model dtype; serve with ``dtype=float16`` to keep the float16
scales exact (bfloat16 would round them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .packing import (
    from_ct_signed,
    pack_ct_weight,
    pack_ct_zero_point,
    packed_words,
    unpack_ct_weight,
    unpack_ct_zero_point,
)
from .quantized import QuantizedWeight
from .shards import join_key

__all__ = [
    "CT_BITS",
    "CT_LAYER_KEYS",
    "write_ct_layer",
    "read_ct_layer",
    "ct_quantization_config",
]

CT_BITS: tuple[int, ...] = (2, 4, 8)
CT_LAYER_KEYS: tuple[str, ...] = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in CT_BITS:
        extra = " (3-bit packing differs between compressed-tensors versions)" if bits == 3 else ""
        raise ValueError(
            f"bits={bits!r} is not supported for compressed-tensors pack-quantized; choose one of {CT_BITS}{extra}"
        )
    return bits


def write_ct_layer(
    qw: QuantizedWeight, prefix: str = "", scale_dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors of one layer: ``weight_packed``, ``weight_scale``, ``weight_zero_point``,
    ``weight_shape`` (each under ``prefix``). ``scale_dtype`` float16 (default) or float32 (both exact)."""
    if not isinstance(qw, QuantizedWeight):
        raise ValueError(f"expected a QuantizedWeight, got {type(qw).__name__}")
    bits = _check_bits(qw.bits)
    if scale_dtype not in (torch.float16, torch.float32):
        raise ValueError(f"scale_dtype must be torch.float16 or torch.float32 (exact), got {scale_dtype}")
    if qw.g_idx is not None:
        ref = torch.arange(qw.shape[1], device=qw.g_idx.device) // qw.group_size
        if not torch.equal(qw.g_idx.long(), ref):
            raise ValueError(
                f"layer {prefix or '<unnamed>'}: non-sequential g_idx (act_order) cannot be stored in "
                "compressed-tensors pack-quantized; quantize with static_groups or export as GPTQ"
            )
    d_out, d_in = qw.shape
    if d_in % qw.group_size:
        raise ValueError(
            f"layer {prefix or '<unnamed>'}: group_size={qw.group_size} does not divide d_in={d_in}; "
            "compressed-tensors cannot dequantize a ragged last group: pick a group size dividing it or export as "
            "gptq_v2"
        )
    return {
        join_key(prefix, "weight_packed"): pack_ct_weight(qw.codes, bits),
        join_key(prefix, "weight_scale"): qw.scales.to(scale_dtype).contiguous(),
        join_key(prefix, "weight_zero_point"): pack_ct_zero_point(qw.zeros, bits),
        join_key(prefix, "weight_shape"): torch.tensor([d_out, d_in], dtype=torch.int64),
    }


def _get(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    try:
        return tensors[key]
    except KeyError:
        raise ValueError(f"compressed-tensors tensor {key!r} is missing") from None


def read_ct_layer(
    tensors: Mapping[str, torch.Tensor],
    prefix: str,
    bits: int,
    group_size: int | None = None,
) -> QuantizedWeight:
    """Inverse of :func:`write_ct_layer` for ``pack-quantized`` int weights.

    ``group_size`` (optional check) is the config's value; ``None``/-1 accept whatever ``weight_scale`` implies
    (``d_in // n_groups``; channel strategy = one group). The zero point may be packed int32
    (``[ceil(d_out*bits/32), n_groups]``), unpacked signed int8 ``[d_out, n_groups]``, or absent (symmetric:
    ``zero = 2**(bits-1)``). Scales are converted to float16 only if exact.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} must be an int in [1, 8]")
    packed = _get(tensors, join_key(prefix, "weight_packed"))
    scale = _get(tensors, join_key(prefix, "weight_scale"))
    shape = _get(tensors, join_key(prefix, "weight_shape"))
    zp_key = join_key(prefix, "weight_zero_point")
    zp = tensors.get(zp_key)
    if shape.numel() != 2:
        raise ValueError(f"{prefix}: weight_shape must hold 2 values, got {shape.tolist()}")
    d_out, d_in = (int(v) for v in shape.tolist())
    if packed.dim() != 2 or tuple(packed.shape) != (d_out, packed_words(d_in, bits)):
        raise ValueError(
            f"{prefix}: weight_packed shape {tuple(packed.shape)} != expected {(d_out, packed_words(d_in, bits))}"
        )
    if scale.dim() == 1:
        scale = scale.unsqueeze(1)
    if scale.dim() != 2 or scale.shape[0] != d_out or scale.shape[1] < 1 or d_in % scale.shape[1]:
        raise ValueError(f"{prefix}: weight_scale shape {tuple(scale.shape)} does not fit weight {(d_out, d_in)}")
    n_groups = int(scale.shape[1])
    gs = d_in // n_groups
    if group_size is not None and group_size != -1 and group_size != gs:
        raise ValueError(f"{prefix}: group_size={group_size} but weight_scale implies {gs}")
    codes = unpack_ct_weight(packed, bits, d_in)
    if zp is None:
        zeros = torch.full((d_out, n_groups), 1 << (bits - 1), dtype=torch.uint8, device=codes.device)
    elif zp.dtype == torch.int32:
        if tuple(zp.shape) != (packed_words(d_out, bits), n_groups):
            raise ValueError(
                f"{prefix}: packed weight_zero_point shape {tuple(zp.shape)} does not fit {(d_out, n_groups)}"
            )
        zeros = unpack_ct_zero_point(zp, bits, d_out)
    else:
        zp2 = zp.reshape(d_out, n_groups) if zp.numel() == d_out * n_groups else None
        if zp2 is None or zp2.dtype.is_floating_point:
            raise ValueError(f"{prefix}: unsupported weight_zero_point {zp.dtype} {tuple(zp.shape)}")
        zeros = from_ct_signed(zp2, bits)
    scale16 = scale.to(torch.float16)
    if scale.dtype != torch.float16 and not torch.equal(scale16.to(scale.dtype), scale):
        raise ValueError(f"{prefix}: weight_scale of dtype {scale.dtype} is not exactly representable in float16")
    return QuantizedWeight(
        codes=codes,
        scales=scale16.contiguous(),
        zeros=zeros.contiguous(),
        bits=bits,
        group_size=gs,
        g_idx=None,
    )


def ct_quantization_config(
    bits: int,
    group_size: int,
    targets: Sequence[str] = ("Linear",),
    ignore: Sequence[str] = ("lm_head",),
) -> dict[str, Any]:
    """``quantization_config`` for ``config.json`` as compressed-tensors 0.20 writes it (``ModelCompressor.
    update_config``) and vLLM / transformers' ``CompressedTensorsConfig`` read it.

    One config group ``group_0`` with weights ``{num_bits, type: "int", symmetric: false, strategy: "group",
    group_size}`` (``group_size`` -1 -> ``strategy: "channel"``, ``group_size: null``), no activation
    quantization, ``format``/``quantization_status`` ``"pack-quantized"``/``"compressed"``. ``targets`` are
    module class names or ``re:`` patterns; ``ignore`` lists modules left dense (default the LM head).
    """
    bits = _check_bits(bits)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"group_size must be a positive int or -1, got {group_size!r}")
    if isinstance(targets, str) or isinstance(ignore, str):
        raise ValueError("targets and ignore must be sequences of str, not a single str")
    targets = list(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets must be a non-empty list of non-empty str, got {targets!r}")
    ignore = list(ignore)
    if not all(isinstance(t, str) and t for t in ignore):
        raise ValueError(f"ignore must be a list of non-empty str, got {ignore!r}")
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": False,
        "group_size": None if group_size == -1 else group_size,
        "strategy": "channel" if group_size == -1 else "group",
        "dynamic": False,
        "actorder": None,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": targets,
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }
