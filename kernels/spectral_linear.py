"""The whole QWHA layer ``y = x @ W.T + bias + scale * wht(x) @ F.T`` in the faster of two equivalent forms.

* **activation side** (``form="activation"``): ``F.linear(x, W, bias) + spectral_adapter(x, values, layout, scale)``
  -- fast WHT of the activations and sparse products; the extra work grows with ``tokens * nnz``.
* **dense Delta W** (``form="dense"``): ``F.linear(x, W + scale * dense(F) @ M, bias)`` -- the delta is rebuilt
  from the values (one transform of a ``d_out x d_in`` matrix) and fused into the base product; the extra work is
  the value gradient ``dy^T x`` (one ``tokens * d_in * d_out`` product) plus two ``d_out x d_in`` transforms.

``form="auto"`` picks by a cost model in units of one dense (GEMM) multiply-add (:func:`choose_form`), fitted to
CPU float32 measurements of both forms (1 thread; SmolLM2's 576/1536-wide layers at 256-4096 tokens and 4096x4096
at 512-8192 tokens: all 14 cases classified right): a sparse multiply-add (``torch.sparse.mm``, ``sampled_addmm``)
costs ``7 + 5 log2(tokens / 512)`` (they run at memory speed and lose the cache as the activations grow), a
transform multiply-add 1.5, and rebuilding the delta ``0.33 d_in + 100`` per weight element. On CUDA the
activation side runs the Triton kernels and is always chosen.

Reference: :func:`qwha_export.kernels.reference.spectral_linear_reference` (dense ``F``, any dtype).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from .hadamard import hadamard_order
from .spectral import SpectralLayout, spectral_adapter
from .transform import _pow2_factors, wht_torch

__all__ = ["FORMS", "choose_form", "spectral_linear"]

FORMS = ("auto", "activation", "dense")
WHT_COST = 1.5  # one multiply-add of the factored transform (small batched matmuls), in GEMM multiply-adds


def _sparse_cost(tokens: int) -> float:
    """One sparse multiply-add in GEMM multiply-adds at this token count (fitted, CPU float32)."""
    return 7.0 + 5.0 * max(0.0, math.log2(max(tokens, 1) / 512))


def _transform_macs(n: int) -> int:
    """Multiply-adds per row of the torch transform of length ``n`` (Sylvester factors plus ``H_K``)."""
    k, p = hadamard_order(n)
    return n * (sum(_pow2_factors(p, 64)) + (k if k > 1 else 0))


def choose_form(tokens: int, d_in: int, d_out: int, nnz: int, device: torch.device | str = "cpu") -> str:
    """``"activation"`` or ``"dense"``: the cheaper form of one training step (forward + backward).

    Activation side: three sparse products of ``tokens * nnz`` (forward, input and value gradients) and two
    transforms of the ``tokens x d_in`` activations. Dense Delta W: one ``tokens * d_in * d_out`` product (the
    value gradient ``dy^T x``) and rebuilding the delta (scatter, two transforms, add, gather) per weight element.
    """
    if torch.device(device).type == "cuda":
        return "activation"
    activation = tokens * (3 * _sparse_cost(tokens) * nnz + 2 * WHT_COST * _transform_macs(d_in))
    dense = tokens * d_in * d_out + d_out * d_in * (0.33 * d_in + 100)
    return "activation" if activation <= dense else "dense"


def _dense_form(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, values: torch.Tensor, layout: SpectralLayout,
    scale: float,
) -> torch.Tensor:
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows, cols = layout.rows.to(x.device), layout.cols.to(x.device)
    f = torch.zeros(layout.d_out, layout.d_in, dtype=dtype, device=x.device)
    f = f.index_put((rows, cols), values.to(dtype), accumulate=True)  # repeated (row, col) entries add up
    w = weight.to(dtype) + scale * wht_torch(f, transpose=True)  # W + scale * F @ M
    b = None if bias is None else bias.to(dtype)
    return F.linear(x.to(dtype), w, b).to(x.dtype)


def spectral_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    values: torch.Tensor,
    layout: SpectralLayout,
    scale: float = 1.0,
    form: str = "auto",
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + scale * wht(x) @ F.T`` for ``x`` ``(..., d_in)``, ``weight`` ``(d_out, d_in)``.

    Equals ``spectral_linear_reference(x, weight, bias, values, layout.rows, layout.cols, scale)``; differentiable
    in ``x`` and ``values`` (``weight``/``bias`` are frozen bases but get gradients too if they require them).
    ``form`` is ``"auto"`` (:func:`choose_form` for this call's token count), ``"activation"`` or ``"dense"``.
    Returns ``x.dtype``.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if tuple(weight.shape) != (layout.d_out, layout.d_in):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, the spectrum expects {(layout.d_out, layout.d_in)}")
    if x.shape[-1] != layout.d_in:
        raise ValueError(f"input has {x.shape[-1]} features but the spectrum expects d_in={layout.d_in}")
    if values.numel() != layout.nnz:
        raise ValueError(f"{values.numel()} values for {layout.nnz} spectrum indices")
    if form == "auto":
        tokens = math.prod(x.shape[:-1])
        form = choose_form(tokens, layout.d_in, layout.d_out, layout.nnz, x.device)
    if form == "dense":
        return _dense_form(x, weight, bias, values, layout, scale)
    y = F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
    return y + spectral_adapter(x, values, layout, scale).to(y.dtype)
