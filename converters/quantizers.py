"""The quantizer registry: one :class:`LayerQuantizer` entry per :class:`~.quant_methods.Quantizer`, one signature.

``QUANTIZERS[kind].quantize(weight, config, base=None, hessian=None) -> QuantizedWeight`` puts a float weight
``(d_out, d_in)`` on the grid that ``config`` (:class:`~.quantize.QuantConfig`: bits, group size, GPTQ options)
describes; ``base`` is the quantized base layer (read by ``grid`` and ``auto``), ``hessian`` its input Gram matrix
``X^T X`` (read by ``gptq``). ``resolve(config, base)`` names the quantizer that actually runs for that layer (``auto``
resolves per layer). Every command dispatches here: ``init`` quantizes the full-precision base
(:func:`quantize_weight`), ``merge`` and ``refit`` re-quantize merged weights (:func:`requantize`). A new quantizer
is one registered class (:func:`register_quantizer`) plus its enum member.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from .quant_methods import Quantizer
from .quantize import SUPPORTED_GROUP_SIZES, QuantConfig, QuantizedWeight, quantize_gptq, quantize_rtn

__all__ = [
    "LayerQuantizer",
    "QUANTIZERS",
    "register_quantizer",
    "get_quantizer",
    "quantize_weight",
    "requantize",
    "resolve_quantizer",
    "grid_requantize",
]


class LayerQuantizer(ABC):
    """One registry entry. Subclasses set ``kind`` and implement :meth:`quantize`."""

    kind: ClassVar[Quantizer]

    def resolve(self, config: QuantConfig, base: QuantizedWeight | None) -> Quantizer:
        """The quantizer that runs for this layer (itself, except for ``auto``)."""
        return self.kind

    @abstractmethod
    def quantize(
        self,
        weight: torch.Tensor,
        config: QuantConfig,
        base: QuantizedWeight | None = None,
        hessian: torch.Tensor | None = None,
    ) -> QuantizedWeight:
        """``weight`` (``(d_out, d_in)``, any float dtype; float64 math) on ``config``'s grid."""


QUANTIZERS: dict[Quantizer, LayerQuantizer] = {}


def register_quantizer(cls: type[LayerQuantizer]) -> type[LayerQuantizer]:
    """Class decorator: add one instance of ``cls`` to :data:`QUANTIZERS` under ``cls.kind``."""
    if cls.kind in QUANTIZERS:
        raise ValueError(f"quantizer {cls.kind.value!r} is registered twice")
    QUANTIZERS[cls.kind] = cls()
    return cls


def get_quantizer(kind: str | Quantizer) -> LayerQuantizer:
    """The registry entry of ``kind`` (``ValueError`` naming an unknown one)."""
    return QUANTIZERS[Quantizer.parse(kind)]


@register_quantizer
class RTNQuantizer(LayerQuantizer):
    kind = Quantizer.RTN

    def quantize(self, weight, config, base=None, hessian=None):
        return quantize_rtn(weight, config.bits, config.group_size)


@register_quantizer
class GPTQQuantizer(LayerQuantizer):
    kind = Quantizer.GPTQ

    def quantize(self, weight, config, base=None, hessian=None):
        if hessian is None:
            raise ValueError("gptq needs a Hessian (the Gram matrix X^T X of the layer inputs); got None")
        return quantize_gptq(weight, hessian, config)


def grid_requantize(w_merged: torch.Tensor, qw: QuantizedWeight) -> QuantizedWeight:
    """Re-quantize onto ``qw``'s own grid: scales, zeros, ``g_idx`` kept; codes = ``clamp(round(w / s) + z, 0,
    maxq)`` in float64 (round half to even)."""
    if tuple(w_merged.shape) != qw.shape:
        raise ValueError(f"merged weight {tuple(w_merged.shape)} does not match quantized base {qw.shape}")
    w = w_merged.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("merged weight contains non-finite values")
    g = qw.group_index().to(w.device)
    s = qw.scales.to(w.device).double().index_select(1, g)
    z = qw.zeros.to(w.device).double().index_select(1, g)
    codes = (torch.round(w / s) + z).clamp_(0, qw.maxq).to(torch.uint8)
    return QuantizedWeight(
        codes=codes.to(qw.codes.device),
        scales=qw.scales.clone(),
        zeros=qw.zeros.clone(),
        bits=qw.bits,
        group_size=qw.group_size,
        g_idx=None if qw.g_idx is None else qw.g_idx.clone(),
    )


def _keeps_grid(config: QuantConfig, base: QuantizedWeight) -> bool:
    """True when ``config`` asks for ``base``'s own bits and (real) group size."""
    d_in = base.shape[1]
    gs = d_in if config.group_size == -1 else config.group_size
    return config.bits == base.bits and gs == base.group_size


@register_quantizer
class GridQuantizer(LayerQuantizer):
    kind = Quantizer.GRID

    def quantize(self, weight, config, base=None, hessian=None):
        if base is None:
            raise ValueError("grid re-quantization needs the quantized base layer")
        if config.bits != base.bits:
            raise ValueError(f"grid re-quantization keeps the base grid: bits={config.bits} != base bits={base.bits}")
        if not _keeps_grid(config, base):
            raise ValueError(
                f"grid re-quantization keeps the base grid: group_size={config.group_size} != base {base.group_size}"
            )
        return grid_requantize(weight, base)


@register_quantizer
class AutoQuantizer(LayerQuantizer):
    """``grid`` where the layer keeps its base's bits and group size and has no act-order permutation, else ``rtn``.

    Measured on SmolLM2-135M (rank 16, RTN g64 base, 4096 calibration tokens, held-out perplexity): a refit keeps
    91% of the fused model's gain over the plain base at 3 bits with the grid and 80% with RTN; GPTQ underneath kept
    only 32% at 4 bits (its error is already minimised on the calibration activations, leaving the new adapter
    little to fit), so ``auto`` never picks GPTQ.
    """

    kind = Quantizer.AUTO

    def resolve(self, config, base):
        keep = base is not None and base.g_idx is None and _keeps_grid(config, base)
        return Quantizer.GRID if keep else Quantizer.RTN

    def quantize(self, weight, config, base=None, hessian=None):
        return QUANTIZERS[self.resolve(config, base)].quantize(weight, config, base, hessian)


def quantize_weight(
    weight: torch.Tensor,
    config: QuantConfig,
    hessian: torch.Tensor | None = None,
    base: QuantizedWeight | None = None,
) -> QuantizedWeight:
    """Quantize ``weight`` with ``config.method`` through the registry (GPTQ needs ``hessian``, grid/auto ``base``)."""
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig, got {type(config).__name__}")
    return QUANTIZERS[config.method].quantize(weight, config, base, hessian)


def _layer_config(method: str | Quantizer, bits: int | None, group_size: int | None, base, d_in: int) -> QuantConfig:
    """The :class:`QuantConfig` of one re-quantized layer: ``bits``/``group_size`` explicit, else the base's
    (a per-channel base group -> -1)."""
    if bits is None or group_size is None:
        if base is None:
            raise ValueError("bits and group_size are required for a layer without a quantized base")
        gs = base.group_size
        base_gs = -1 if gs == d_in and gs not in SUPPORTED_GROUP_SIZES else gs
        bits = base.bits if bits is None else bits
        group_size = base_gs if group_size is None else group_size
    return QuantConfig(bits=int(bits), group_size=int(group_size), method=method)


def resolve_quantizer(
    method: str | Quantizer, base: QuantizedWeight | None, bits: int | None, group_size: int | None, d_in: int
) -> Quantizer:
    """The quantizer that :func:`requantize` runs for one layer (``auto`` -> ``grid`` or ``rtn``)."""
    config = _layer_config(method, bits, group_size, base, d_in)
    return QUANTIZERS[config.method].resolve(config, base)


def requantize(
    w_merged: torch.Tensor,
    method: str | Quantizer,
    bits: int | None,
    group_size: int | None,
    base_qw: QuantizedWeight | None,
    hessian: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Re-quantize a merged float64 weight with any registered quantizer; ``bits``/``group_size`` None keep the
    base layer's."""
    config = _layer_config(method, bits, group_size, base_qw, int(w_merged.shape[1]))
    return QUANTIZERS[config.method].quantize(w_merged, config, base_qw, hessian)
