"""GPTQ checkpoint layers (AutoGPTQ / GPTQModel / transformers / vLLM ``quant_method: "gptq"``).

Per quantized linear ``<module>`` (weight ``(d_out, d_in)``, ``n_groups`` groups, ``bits`` in {2, 3, 4, 8}):

============================  =========  =================================  ==========================================
tensor                        dtype      shape                              content
============================  =========  =================================  ==========================================
``<module>.qweight``          int32      ``[d_in * bits / 32, d_out]``      codes packed along the input dim
``<module>.qzeros``           int32      ``[n_groups, d_out * bits / 32]``  stored zero points packed along d_out
``<module>.scales``           float16    ``[n_groups, d_out]``              ``QuantizedWeight.scales.T``
``<module>.g_idx``            int32      ``[d_in]``                         group of each input column
============================  =========  =================================  ==========================================

Bit layout: the dense little-endian int32 stream of :mod:`.packing` (identical to AutoGPTQ's ``QuantLinear.pack``
and GPTQModel's ``pack_block``, including the 3-bit 10|1|10|1|10 scheme). ``bias`` (if any) is written by the
caller as ``<module>.bias`` (float16 in AutoGPTQ checkpoints).

Zero points, by ``checkpoint_format``:

* ``"gptq"`` (v1, the legacy AutoGPTQ format every loader reads): the stored field is ``zero - 1``; loaders add
  the 1 back (``zeros = unpack(qzeros) + 1``). A zero point of 0 would be stored as -1, which does not fit the
  field (AutoGPTQ's packer then corrupts the neighbouring fields), so :func:`write_gptq_layer` refuses it.
* ``"gptq_v2"`` (GPTQModel; transformers with gptqmodel; vLLM since its gptq_v2 support): stored as is.

Dequantization by loaders (GPTQModel ``dequantize_weight``)::

    W.T[i, o] = scales[g_idx[i], o] * (codes[o, i] - zero[o, g_idx[i]])

-- the same value as :meth:`QuantizedWeight.dequantize` (a single float16 multiply of an exact integer difference).
``n_groups = ceil(d_in / group_size)``: when the group size does not divide ``d_in`` the last group is shorter, as
AutoGPTQ's and GPTQModel's ``QuantLinear`` allocate it (``math.ceil(infeatures / group_size)`` rows of ``scales``).

Shape rule: loaders allocate ``qweight`` as ``[d_in // 32 * bits, d_out]`` and ``qzeros`` as
``[n_groups, d_out // 32 * bits]`` (AutoGPTQ ``QuantLinear.__init__``, GPTQModel ``_register_gptq_buffers``), and
GPTQModel's packer requires ``d_in % 32 == 0`` and ``d_out % 32 == 0``; the writer enforces both.

``g_idx`` is always written. Loaders only honour a non-sequential ``g_idx`` when the config says
``desc_act: true`` (vLLM drops ``g_idx`` otherwise), so use :func:`needs_desc_act` over all layers to set it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .packing import (
    GPTQ_PACK_BITS,
    pack_gptq_qweight,
    pack_gptq_qzeros,
    unpack_gptq_qweight,
    unpack_gptq_qzeros,
)
from .quantized import QuantizedWeight, n_groups_of
from .shards import join_key

__all__ = [
    "GPTQ_CHECKPOINT_FORMATS",
    "GPTQ_LAYER_KEYS",
    "write_gptq_layer",
    "read_gptq_layer",
    "gptq_quantization_config",
    "needs_desc_act",
]

GPTQ_CHECKPOINT_FORMATS: tuple[str, ...] = ("gptq", "gptq_v2")
GPTQ_LAYER_KEYS: tuple[str, ...] = ("qweight", "qzeros", "scales", "g_idx")


def _check_format(checkpoint_format: Any) -> str:
    fmt = str(getattr(checkpoint_format, "value", checkpoint_format))
    if fmt not in GPTQ_CHECKPOINT_FORMATS:
        raise ValueError(
            f"checkpoint_format={checkpoint_format!r} is not supported; choose one of {GPTQ_CHECKPOINT_FORMATS}"
        )
    return fmt


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in GPTQ_PACK_BITS:
        raise ValueError(f"bits={bits!r} is not supported by GPTQ; choose one of {GPTQ_PACK_BITS}")
    return bits


def _sequential(qw: QuantizedWeight) -> bool:
    if qw.g_idx is None:
        return True
    ref = torch.arange(qw.shape[1], device=qw.g_idx.device) // qw.group_size
    return torch.equal(qw.g_idx.long(), ref)


def needs_desc_act(qw: QuantizedWeight) -> bool:
    """True when the layer's group mapping is not ``column // group_size`` (config must say ``desc_act: true``)."""
    return not _sequential(qw)


def write_gptq_layer(qw: QuantizedWeight, checkpoint_format: str = "gptq", prefix: str = "") -> dict[str, torch.Tensor]:
    """GPTQ tensors of one layer: ``{prefix.qweight, prefix.qzeros, prefix.scales, prefix.g_idx}``.

    ``checkpoint_format`` is ``"gptq"`` (v1: zero points stored minus one; ValueError if any zero point is 0) or
    ``"gptq_v2"`` (stored as is). Tensors stay on ``qw``'s device. ValueError unless ``d_in`` and ``d_out`` are
    multiples of 32 (see the module docstring).
    """
    if not isinstance(qw, QuantizedWeight):
        raise ValueError(f"expected a QuantizedWeight, got {type(qw).__name__}")
    fmt = _check_format(checkpoint_format)
    bits = _check_bits(qw.bits)
    d_out, d_in = qw.shape
    if d_in % 32 or d_out % 32:
        raise ValueError(
            f"GPTQ loaders need d_in and d_out divisible by 32; layer {prefix or '<unnamed>'} is "
            f"(d_out={d_out}, d_in={d_in})"
        )
    zeros = qw.zeros
    if fmt == "gptq":
        n_zero = int((zeros == 0).sum())
        if n_zero:
            raise ValueError(
                f"layer {prefix or '<unnamed>'}: {n_zero} zero point(s) equal 0, which GPTQ v1 (stored as zero-1) "
                "cannot represent; export with checkpoint_format='gptq_v2'"
            )
        zeros = zeros - 1
    return {
        join_key(prefix, "qweight"): pack_gptq_qweight(qw.codes, bits),
        join_key(prefix, "qzeros"): pack_gptq_qzeros(zeros, bits),
        join_key(prefix, "scales"): qw.scales.t().contiguous(),
        join_key(prefix, "g_idx"): qw.group_index().to(torch.int32).contiguous(),
    }


def _get(tensors: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    try:
        return tensors[key]
    except KeyError:
        raise ValueError(f"GPTQ tensor {key!r} is missing") from None


def read_gptq_layer(
    tensors: Mapping[str, torch.Tensor],
    prefix: str,
    bits: int,
    group_size: int,
    checkpoint_format: str = "gptq",
) -> QuantizedWeight:
    """Inverse of :func:`write_gptq_layer`: rebuild the :class:`QuantizedWeight` of ``prefix`` from ``tensors``.

    ``group_size`` is the config value (-1 = per output channel). A missing ``g_idx`` means sequential groups;
    a sequential ``g_idx`` is returned as ``None``. v1 zero points are unpacked and incremented (ValueError if a
    stored field is ``2**bits - 1``, whose successor does not fit). Float scales are converted to float16 only if
    that is exact.
    """
    fmt = _check_format(checkpoint_format)
    bits = _check_bits(bits)
    qweight = _get(tensors, join_key(prefix, "qweight"))
    qzeros = _get(tensors, join_key(prefix, "qzeros"))
    scales = _get(tensors, join_key(prefix, "scales"))
    g_key = join_key(prefix, "g_idx")
    g_idx = tensors.get(g_key)
    if qweight.dim() != 2 or scales.dim() != 2 or qzeros.dim() != 2:
        raise ValueError(f"{prefix}: qweight, qzeros and scales must be 2-D")
    d_out = int(qweight.shape[1])
    codes = unpack_gptq_qweight(qweight, bits)
    d_in = int(codes.shape[1])
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"group_size must be a positive int or -1, got {group_size!r}")
    gs = d_in if group_size == -1 else group_size
    n_groups = n_groups_of(d_in, gs)  # a ragged last group when gs does not divide d_in (AutoGPTQ: ceil)
    if tuple(scales.shape) != (n_groups, d_out):
        raise ValueError(f"{prefix}: scales shape {tuple(scales.shape)} != expected {(n_groups, d_out)}")
    if qzeros.shape[0] != n_groups:
        raise ValueError(f"{prefix}: qzeros has {qzeros.shape[0]} rows, expected n_groups={n_groups}")
    zeros = unpack_gptq_qzeros(qzeros, bits, d_out)
    if fmt == "gptq":
        maxq = (1 << bits) - 1
        if bool((zeros == maxq).any()):
            raise ValueError(f"{prefix}: GPTQ v1 qzeros field {maxq} has no valid zero point (zero-1 overflow)")
        zeros = zeros + 1
    scales16 = scales.to(torch.float16)
    if scales.dtype != torch.float16 and not torch.equal(scales16.to(scales.dtype), scales):
        raise ValueError(f"{prefix}: scales of dtype {scales.dtype} are not exactly representable in float16")
    gi = None
    if g_idx is not None:
        if tuple(g_idx.shape) != (d_in,):
            raise ValueError(f"{prefix}: g_idx shape {tuple(g_idx.shape)} != ({d_in},)")
        ref = torch.arange(d_in, device=g_idx.device) // gs
        if not torch.equal(g_idx.long(), ref):
            gi = g_idx.to(torch.int32)
    return QuantizedWeight(
        codes=codes,
        scales=scales16.t().contiguous(),
        zeros=zeros,
        bits=bits,
        group_size=gs,
        g_idx=gi,
    )


def gptq_quantization_config(
    bits: int,
    group_size: int,
    checkpoint_format: str = "gptq",
    desc_act: bool = False,
    sym: bool = False,
    *,
    damp_percent: float = 0.01,
    true_sequential: bool = True,
    static_groups: bool = False,
    lm_head: bool = False,
    meta: dict[str, Any] | None = None,
    backend: str | None = None,
) -> dict[str, Any]:
    """The ``quantization_config`` dict for ``config.json`` (also valid as GPTQModel's ``quantize_config.json``).

    Keys read by transformers' ``GPTQConfig`` (``bits``, ``group_size``, ``desc_act``, ``sym``, ``damp_percent``,
    ``true_sequential``, legacy ``checkpoint_format`` -> ``format``), by GPTQModel's ``QuantizeConfig``
    (``checkpoint_format`` is its synonym of ``format``; ``pack_dtype``, ``lm_head``, ``static_groups``, ``meta``)
    and by vLLM's ``GPTQConfig`` (``bits``, ``group_size``, ``desc_act``, ``lm_head``, ``sym``,
    ``checkpoint_format``). ``group_size`` -1 means per output channel. ``backend`` (e.g. ``"torch"``) is stored
    for transformers' ``GPTQConfig`` to pass to GPTQModel's kernel selection: a layer with a ragged last group needs
    ``"torch"`` there, since GPTQModel's auto-selected kernels refuse ``in_features % group_size != 0`` while its
    torch kernel pads.
    """
    bits = _check_bits(bits)
    fmt = _check_format(checkpoint_format)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"group_size must be a positive int or -1, got {group_size!r}")
    if not 0 < damp_percent < 1:
        raise ValueError(f"damp_percent must be in (0, 1), got {damp_percent!r}")
    for name, v in (
        ("desc_act", desc_act),
        ("sym", sym),
        ("true_sequential", true_sequential),
        ("static_groups", static_groups),
        ("lm_head", lm_head),
    ):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be a bool, got {v!r}")
    cfg: dict[str, Any] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "checkpoint_format": fmt,
        "true_sequential": true_sequential,
        "static_groups": static_groups,
        "damp_percent": damp_percent,
        "lm_head": lm_head,
        "pack_dtype": "int32",
    }
    cfg["meta"] = dict(meta) if meta is not None else {"quantizer": ["qwha-export"]}
    if backend is not None:
        if not isinstance(backend, str) or not backend:
            raise ValueError(f"backend must be a non-empty str or None, got {backend!r}")
        cfg["backend"] = backend
    return cfg
