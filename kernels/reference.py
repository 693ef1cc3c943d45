"""Pure-torch references: dense, any float dtype (float64 included), batched, differentiable.

These define the math that every fast path (the torch butterfly, the Triton kernels, the ONNX graph) must equal.
"""

from __future__ import annotations

import torch

from .hadamard import hadamard_matrix

__all__ = [
    "wht_reference",
    "iwht_reference",
    "spectral_dense",
    "spectral_adapter_reference",
    "spectral_linear_reference",
]


def wht_reference(x: torch.Tensor) -> torch.Tensor:
    """``x @ M_n.T`` along the last dim, computed densely in ``x.dtype``."""
    m = hadamard_matrix(x.shape[-1], dtype=x.dtype, device=x.device)
    return x @ m.T


def iwht_reference(x: torch.Tensor) -> torch.Tensor:
    """``x @ M_n / n`` along the last dim (the exact inverse of :func:`wht_reference`)."""
    n = x.shape[-1]
    m = hadamard_matrix(n, dtype=x.dtype, device=x.device)
    return (x @ m) / n


def spectral_dense(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """Dense ``F`` (``d_out x d_in``) from COO entries; duplicate entries add up."""
    f = torch.zeros(d_out, d_in, dtype=values.dtype, device=values.device)
    return f.index_put((rows.long(), cols.long()), values, accumulate=True)


def spectral_adapter_reference(
    x: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, d_out: int, scale: float = 1.0
) -> torch.Tensor:
    """``scale * wht(x) @ F.T`` with a dense ``F``: the contract of :func:`qwha_export.kernels.spectral_adapter`."""
    f = spectral_dense(values.to(x.dtype), rows, cols, d_out, x.shape[-1])
    return scale * (wht_reference(x) @ f.T)


def spectral_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    values: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: float = 1.0,
) -> torch.Tensor:
    """``x @ weight.T + bias + scale * wht(x) @ F.T`` in ``x.dtype``: the contract of
    :func:`qwha_export.kernels.spectral_linear`."""
    y = x @ weight.to(x.dtype).T + (0 if bias is None else bias.to(x.dtype))
    return y + spectral_adapter_reference(x, values, rows, cols, weight.shape[0], scale)
