"""Weight quantization algorithms: group-wise asymmetric round-to-nearest (RTN) and GPTQ, and their config.

The registry that dispatches on :class:`~qwha_export.converters.quant_methods.Quantizer` (rtn, gptq, grid, auto) is
:mod:`~qwha_export.converters.quantizers`.

Every quantizer returns a :class:`~qwha_export.formats.quantized.QuantizedWeight` (its layout and exact
dequantization formula are documented there).

Grid parameters (identical for RTN and GPTQ), per (row, group), in float64::

    xmin  = min(min(w), 0);  xmax = max(max(w), 0)          # 0 is always on the grid, as in GPTQ
    scale = (xmax - xmin) / (2**bits - 1);  scale = 1 if scale == 0 (all-zero group: codes == zero, W_deq == 0)
    s16   = fp16 value of scale, clamped into the fp16 normal range [2**-14, 65504] and rounded UPWARD
            (the smallest float16 >= scale), so the grid always spans [xmin, xmax]
    zero  = clamp(round(-xmin / s16), 0, maxq)
    code  = clamp(round(w / s16) + zero, 0, maxq)           # round = round-half-to-even

Rounding the scale to float16 *before* choosing codes and zeros makes the stored scale exactly the one the codes
were chosen for. Rounding it upward (rather than to nearest) guarantees ``|w - W_deq| <= s16 / 2`` for every weight
of the group that the grid was computed from, for every bit width (to-nearest could shrink the grid by up to
``maxq * 2**-11`` steps, which at 8 bits is an eighth of a step); the cost is a relative scale increase < 2**-10.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..formats.quantized import (
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    QuantizedWeight,
    _check_bits,
    _is_int,
    config_group_size,
    has_ragged_group,
    n_groups_of,
)
from .quant_methods import Quantizer

__all__ = [
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "QuantConfig",
    "QuantizedWeight",
    "n_groups_of",
    "config_group_size",
    "has_ragged_group",
    "quantize_rtn",
    "quantize_gptq",
    "quantization_error",
]

_FP16_MIN_NORMAL = 2.0**-14  # 6.103515625e-05
_FP16_MAX = 65504.0


def _check_group_size(group_size: Any) -> int:
    if not _is_int(group_size) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"group_size={group_size!r} is not supported; choose one of {SUPPORTED_GROUP_SIZES} "
            "(-1 means one group per output channel)"
        )
    return group_size


def _resolve_group_size(group_size: int, d_in: int) -> int:
    """The real group size for a layer with ``d_in`` input columns (``d_in`` for per-channel, -1)."""
    return d_in if group_size == -1 else group_size


def _grouped(w: torch.Tensor, gs: int) -> torch.Tensor:
    """``(d_out, n_groups, gs)`` view of ``w`` (``(d_out, d_in)``), a ragged last group zero-padded.

    Zero padding leaves every group's grid unchanged: the grid's ``xmin``/``xmax`` always include 0.
    """
    d_out, d_in = w.shape
    n = n_groups_of(d_in, gs)
    if n * gs != d_in:
        w = torch.nn.functional.pad(w, (0, n * gs - d_in))
    return w.reshape(d_out, n, gs)


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a weight.

    ``bits`` in {2, 3, 4, 8}; ``group_size`` in {32, 64, 128} or -1 (per output channel); ``method`` one of
    :class:`~qwha_export.converters.quant_methods.Quantizer` (normalised to it; ``grid``/``auto`` need a quantized
    base, ``gptq`` a Hessian: :func:`~qwha_export.converters.quantizers.quantize_weight`).
    The remaining fields only matter for GPTQ: ``damp`` is the
    fraction of ``mean(diag(H))`` added to the Hessian diagonal, ``act_order`` processes columns by descending
    ``diag(H)``, ``static_groups`` computes every group's grid up front from the unquantized weight (in the
    original column order), ``block_size`` is the lazy-batch width.
    """

    bits: int = 4
    group_size: int = 64
    method: Quantizer | str = "rtn"
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    block_size: int = 128

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        _check_group_size(self.group_size)
        method = Quantizer.parse(self.method, option="method=")
        object.__setattr__(self, "method", method)
        if isinstance(self.damp, bool) or not isinstance(self.damp, int | float) or not math.isfinite(self.damp):
            raise ValueError(f"damp={self.damp!r} must be a finite number >= 0")
        if self.damp < 0:
            raise ValueError(f"damp={self.damp!r} must be >= 0")
        if not _is_int(self.block_size) or self.block_size < 1:
            raise ValueError(f"block_size={self.block_size!r} must be a positive integer")
        for name in ("act_order", "static_groups"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be a bool")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


# ----------------------------------------------------------------------------------------------------------------------
# shared grid math (float64)
# ----------------------------------------------------------------------------------------------------------------------


def _fp16_scale_ceil(scale: torch.Tensor) -> torch.Tensor:
    """Smallest float16 value >= ``scale`` (clamped into ``[2**-14, 65504]``), returned as float64."""
    scale = scale.clamp(_FP16_MIN_NORMAL, _FP16_MAX)
    s16 = scale.to(torch.float16)
    below = s16.double() < scale
    if bool(below.any()):
        # positive finite float16: the next representable value up is the bit pattern + 1
        bumped = (s16.view(torch.int16) + 1).view(torch.float16)
        s16 = torch.where(below, bumped, s16)
    return s16.double()


def _grid_params(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(scale, zero)`` in float64 (scale holds exact float16 values, zero exact integers)."""
    xmin = xmin.clamp(max=0.0)
    xmax = xmax.clamp(min=0.0)
    scale = (xmax - xmin) / maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    scale = _fp16_scale_ceil(scale)
    zero = torch.round(-xmin / scale).clamp_(0, maxq)
    return scale, zero


def _quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, inplace: bool = False
) -> torch.Tensor:
    """Float64 codes ``clamp(round(w / scale) + zero, 0, maxq)`` (broadcasting); ``inplace`` overwrites ``w`` (a
    private copy) instead of allocating one more weight-sized buffer per step."""
    q = w.div_(scale) if inplace else w / scale
    return q.round_().add_(zero).clamp_(0, maxq)


def _as_float64_copy(weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{name} must be a 2-D tensor, got {shape}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating point tensor, got {weight.dtype}")
    w = weight.detach().to(dtype=torch.float64, copy=True)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} contains non-finite values")
    return w


# ----------------------------------------------------------------------------------------------------------------------
# RTN
# ----------------------------------------------------------------------------------------------------------------------


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int) -> QuantizedWeight:
    """Group-wise asymmetric min/max round-to-nearest quantization of a ``(d_out, d_in)`` weight.

    ``group_size`` in {32, 64, 128} groups consecutive input columns; -1 uses one group per output row. The math
    is done in float64 on ``weight.device``; ``weight`` (any float dtype) is never modified. Guarantee:
    ``|W - W_deq| <= scales[o, g] / 2`` elementwise. See the module docstring for the exact grid formulas.
    """
    _check_bits(bits)
    _check_group_size(group_size)
    w = _as_float64_copy(weight)
    d_out, d_in = w.shape
    gs = _resolve_group_size(group_size, d_in)
    maxq = 2**bits - 1
    wg = _grouped(w, gs)
    scale, zero = _grid_params(wg.amin(dim=-1), wg.amax(dim=-1), maxq)
    codes = _quantize_codes(wg, scale.unsqueeze(-1), zero.unsqueeze(-1), maxq, inplace=True)  # w is our copy
    return QuantizedWeight(
        codes=codes.reshape(d_out, -1)[:, :d_in].to(torch.uint8),
        scales=scale.to(torch.float16),
        zeros=zero.to(torch.uint8),
        bits=bits,
        group_size=gs,
    )


# ----------------------------------------------------------------------------------------------------------------------
# GPTQ
# ----------------------------------------------------------------------------------------------------------------------


def _inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag(H)) * I)^-1``; damping is raised (x10, with a warning) if
    the damped matrix is still not positive definite."""
    mean_diag = float(h.diagonal().mean())
    d = float(damp)
    for _attempt in range(12):
        hd = h.clone()
        hd.diagonal().add_(d * mean_diag)
        low, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(low)
            up, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return up
        new_d = max(d * 10.0, 1e-4)
        warnings.warn(
            f"GPTQ: Hessian not positive definite with damp={d:g}; retrying with damp={new_d:g}",
            RuntimeWarning,
            stacklevel=3,
        )
        d = new_d
    raise ValueError(f"GPTQ: Hessian is not positive definite even with damp={d:g}")


def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig) -> QuantizedWeight:
    """GPTQ (Frantar et al., 2022) with the grid of :func:`quantize_rtn`.

    ``hessian`` is ``X^T X`` (``d_in x d_in``; any positive scaling, float64 preferred) of the layer inputs ``X``
    (``n x d_in``). The algorithm follows AutoGPTQ / GPTQModel ``gptq.py``:

    * dead columns (``diag(H) == 0``) get ``H[i, i] = 1`` and a zero weight column;
    * with ``act_order`` the columns are processed by descending ``diag(H)`` (stable sort);
    * ``damp * mean(diag(H))`` is added to the diagonal, then the upper Cholesky factor of ``H^-1`` is used;
    * columns are quantized one at a time in lazy-batch blocks of ``block_size``, the error of each column being
      propagated to the not yet quantized ones;
    * the grid of each group is computed when its first column is reached, from the weight as updated so far
      (all pending in-block updates included -- AutoGPTQ reads the stale block-start copy here), in processing
      order; with ``static_groups`` all grids are computed up front from the unquantized weight (dead columns
      zeroed) in the ORIGINAL column order; per-channel (``group_size=-1``) uses one grid per row computed up front.

    Everything runs in float64 on ``weight.device``, vectorised over rows, deterministic; neither input is
    modified. ``codes``/``scales``/``zeros`` are returned in the original column order; ``g_idx`` is set only when
    the group mapping is not ``column // group_size`` (``act_order`` without ``static_groups``).
    """
    if not isinstance(config, QuantConfig):
        raise ValueError(f"config must be a QuantConfig, got {type(config).__name__}")
    bits, maxq = config.bits, config.maxq
    w = _as_float64_copy(weight)
    d_out, d_in = w.shape
    gs = _resolve_group_size(config.group_size, d_in)
    n_groups = n_groups_of(d_in, gs)
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (d_in, d_in):
        shape = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(f"hessian must have shape {(d_in, d_in)} for a weight with d_in={d_in}, got {shape}")
    h = hessian.detach().to(device=w.device, dtype=torch.float64, copy=True)
    if not bool(torch.isfinite(h).all()):
        raise ValueError("hessian contains non-finite values")

    dead = h.diagonal() == 0
    if bool(dead.any()):
        h[dead, dead] = 1.0
        w[:, dead] = 0.0

    # grids computed up front (static groups / per-channel), indexed by the ORIGINAL group number
    static = config.static_groups or n_groups == 1
    scales = torch.empty(d_out, n_groups, dtype=torch.float64, device=w.device)
    zeros = torch.empty_like(scales)
    if static:
        wg = _grouped(w, gs)
        scales[:], zeros[:] = _grid_params(wg.amin(dim=-1), wg.amax(dim=-1), maxq)

    if config.act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        w = w[:, perm]
        h = h[perm][:, perm]
        invperm = torch.argsort(perm)
        perm_list = perm.tolist()
    else:
        perm = invperm = None
        perm_list = list(range(d_in))

    # group of each processed (permuted) column: original group for static grids, else processing-order group
    col_group = [c // gs for c in perm_list] if static else [j // gs for j in range(d_in)]

    hinv = _inverse_hessian_cholesky(h, config.damp)
    del h

    q_codes = torch.empty(d_out, d_in, dtype=torch.uint8, device=w.device)
    bs = config.block_size
    for i1 in range(0, d_in, bs):
        i2 = min(i1 + bs, d_in)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty(d_out, count, dtype=torch.float64, device=w.device)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            g = col_group[col]
            if not static and col % gs == 0:
                # current values of the group's columns: in-block ones live in w1 (fully updated); later ones are
                # in w, still missing this block's pending updates from columns i1 .. col-1
                end = min(col + gs, d_in)  # a ragged last group ends at d_in
                cur = w1[:, i : min(count, end - i1)]
                if end > i2:
                    rest = w[:, i2:end]
                    if i > 0:
                        rest = rest - err1[:, :i] @ hinv[i1:col, i2:end]
                    cur = torch.cat([cur, rest], dim=1)
                s_g, z_g = _grid_params(cur.amin(dim=1), cur.amax(dim=1), maxq)
                scales[:, g] = s_g
                zeros[:, g] = z_g
            s = scales[:, g]
            z = zeros[:, g]
            wc = w1[:, i]
            q = _quantize_codes(wc, s, z, maxq)
            q_codes[:, col] = q.to(torch.uint8)
            e = (wc - (q - z) * s) / hinv1[i, i]
            err1[:, i] = e
            if i + 1 < count:
                w1[:, i + 1 :].addr_(e, hinv1[i, i + 1 :], alpha=-1.0)
        if i2 < d_in:
            w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)

    g_idx = None
    if invperm is not None:
        q_codes = q_codes[:, invperm].contiguous()
        if not static:
            gi = (invperm // gs).to(torch.int32)
            if not torch.equal(gi.long(), torch.arange(d_in, device=w.device) // gs):
                g_idx = gi
    return QuantizedWeight(
        codes=q_codes,
        scales=scales.to(torch.float16),
        zeros=zeros.to(torch.uint8),
        bits=bits,
        group_size=gs,
        g_idx=g_idx,
    )


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def quantization_error(weight: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """``W - W_deq`` in float64."""
    if tuple(weight.shape) != qw.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match quantized shape {qw.shape}")
    return weight.detach().to(torch.float64) - qw.dequantize(torch.float64).to(weight.device)
