"""The QWHA spectral-adapter product ``y = scale * wht(x) @ F.T`` with a sparse ``F`` (``d_out x n``).

``F`` is given in COO form: ``values[e]`` at ``(rows[e], cols[e])`` (row = output channel, col = Walsh index).
:class:`SpectralLayout` precomputes, once per index set, the row-wise (CSR) and column-wise (CSC) gather lists
used by the kernels; only the values change during training.

Public: :func:`spectral_adapter` (dispatches the Triton kernels on CUDA, torch sparse ops elsewhere).
Reference: :func:`qwha_export.kernels.reference.spectral_adapter_reference` (dense ``F``).
"""

from __future__ import annotations

import math
import warnings

import torch

from .layout import SpectralLayout, _Lines
from .reference import spectral_dense
from .transform import hadamard_transform, wht_torch

__all__ = [
    "DEFAULT_SCALE",
    "SpectralLayout",
    "adapter_coefficient",
    "dense_delta",
    "spectral_adapter",
    "spectral_adapter_torch",
    "validate_spectrum",
]


DEFAULT_SCALE = 256.0
"""Default ``s`` of new adapters (init, the peft tuner). At ``s = 1`` the initialised spectrum values are O(10-100)
on SmolLM2's widths, so an Adam step at the usual LoRA learning rates (1e-4..1e-3) moves ``Delta W`` some 800x less
than the same step moves a LoRA product and training does next to nothing (validation answer loss 3.557 -> 3.546
at lr 2e-3, LoRA 3.807 -> 3.352; benchmarks/paper_table.py). ``s = 256`` divides the values by a power of two, so
``Delta W`` and every init error are unchanged bit for bit, and puts QWHA on LoRA's learning-rate grid. The step's
effect still shrinks as ``1 / (d_in sqrt(d_out))`` on wider models: tune ``s`` or the learning rate there."""


def adapter_coefficient(scale: float, d_in: int, d_out: int) -> float:
    """The factor in front of ``wht(x) @ F.T``: ``s / (d_in * sqrt(d_out))``."""
    return float(scale) / (d_in * math.sqrt(d_out))


def validate_spectrum(
    values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, d_out: int, d_in: int, name: str = "layer"
) -> None:
    """Raise ``ValueError`` (one line, naming the layer) for NaN/inf values or out-of-range indices."""
    if values.numel() != rows.numel() or rows.numel() != cols.numel():
        raise ValueError(f"{name}: spectrum has {values.numel()} values but {rows.numel()}/{cols.numel()} indices")
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"{name}: spectrum has {bad} NaN/inf value(s); the adapter file is corrupt")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= d_out):
        raise ValueError(f"{name}: output-channel index {int(rows.max())} out of range for d_out={d_out}")
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= d_in):
        raise ValueError(f"{name}: Walsh index {int(cols.max())} out of range for d_in={d_in}")


def _csr(lines: _Lines, values: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """A torch CSR matrix of the gather lists with ``values`` (value order) placed in list order."""
    with warnings.catch_warnings():  # torch flags sparse CSR as beta
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            lines.ptr.long(), lines.idx.long(), values[lines.vidx.long()], (n_rows, n_cols), check_invariants=False
        )


_DENSE_SDDMM_RATIO = 4  # value gradient via a dense dy^T z when nnz >= d_out * d_in / 4


def _sampled_value_grad(grad: torch.Tensor, z: torch.Tensor, layout: SpectralLayout) -> torch.Tensor:
    """``(grad.T @ z)[rows, cols]`` in value order, computed only at the ``nnz`` entries (``sampled_addmm``)."""
    lines = layout.csr
    pattern = _csr(lines, torch.zeros(layout.nnz, dtype=z.dtype, device=z.device), layout.d_out, layout.d_in)
    sampled = torch.sparse.sampled_addmm(pattern, grad.T.contiguous(), z, beta=0.0).values()  # CSR order
    dv = torch.empty(layout.nnz, dtype=z.dtype, device=z.device)
    dv[lines.vidx.long()] = sampled
    return dv


class _SparseProduct(torch.autograd.Function):
    """``scale * z @ F.T`` for dense ``z`` (rows, d_in) and sparse ``F``; CSR products both ways, chunked SDDMM."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, values: torch.Tensor, layout: SpectralLayout, scale: float) -> torch.Tensor:
        v = values.detach().to(z.dtype)
        ctx.save_for_backward(z, v)
        ctx.layout, ctx.scale = layout, scale
        f = _csr(layout.csr, v, layout.d_out, layout.d_in)
        return torch.sparse.mm(f, z.T.contiguous()).T * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, v = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        grad = grad.contiguous()
        dz = dv = None
        if ctx.needs_input_grad[0]:
            ft = _csr(layout.csc, v, layout.d_in, layout.d_out)  # F^T
            dz = torch.sparse.mm(ft, grad.T.contiguous()).T * scale
        if ctx.needs_input_grad[1]:
            rows, cols = layout.rows.to(z.device), layout.cols.to(z.device)
            if layout.nnz * _DENSE_SDDMM_RATIO >= layout.d_out * layout.d_in:
                # nearly dense: one BLAS product dy^T z, then gather
                dv = (grad.T @ z)[rows, cols] * scale
            elif not z.is_cuda:
                # sampled dense-dense product on the CSR pattern (~10x faster than dy^T z at 1/64 density on CPU)
                dv = _sampled_value_grad(grad, z, layout) * scale
            else:
                dv = torch.empty(layout.nnz, dtype=z.dtype, device=z.device)
                g_t, z_t = grad.T.contiguous(), z.T.contiguous()  # row gathers below read contiguous memory
                chunk = max(1, (1 << 24) // max(1, z.shape[0]))
                for s in range(0, layout.nnz, chunk):
                    r, c = rows[s : s + chunk], cols[s : s + chunk]
                    dv[s : s + chunk] = (g_t.index_select(0, r) * z_t.index_select(0, c)).sum(1) * scale
        return dz, dv, None, None


def spectral_adapter_torch(x: torch.Tensor, values: torch.Tensor, layout: SpectralLayout, scale: float) -> torch.Tensor:
    """Torch path (CPU): fast WHT, then CSR sparse products; differentiable in ``x`` and ``values``.

    The value gradient is a sampled dense-dense product computed in chunks of entries (bounded memory).
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = wht_torch(x.to(compute)).reshape(-1, layout.d_in)
    y = _SparseProduct.apply(z, values, layout, scale)
    return y.reshape(*x.shape[:-1], layout.d_out).to(x.dtype)


def spectral_adapter(x: torch.Tensor, values: torch.Tensor, layout: SpectralLayout, scale: float = 1.0) -> torch.Tensor:
    """``scale * wht(x) @ F.T`` for ``x`` of shape ``(..., d_in)``; returns ``(..., d_out)`` in ``x.dtype``.

    Equals ``spectral_adapter_reference(x, values, layout.rows, layout.cols, layout.d_out, scale)``. Never builds a
    dense ``F`` or ``Delta W``. Triton kernels on CUDA (float32 accumulation), torch sparse ops elsewhere.
    """
    if x.shape[-1] != layout.d_in:
        raise ValueError(f"input has {x.shape[-1]} features but the spectrum expects d_in={layout.d_in}")
    if values.numel() != layout.nnz:
        raise ValueError(f"{values.numel()} values for {layout.nnz} spectrum indices")
    if x.is_cuda and x.dtype != torch.float64:
        from . import triton_spectral

        if triton_spectral.available():
            return triton_spectral.spectral_adapter_triton(x, values, layout, scale)
    return spectral_adapter_torch(x, values, layout, scale)


def dense_delta(
    values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, d_out: int, d_in: int, coefficient: float
) -> torch.Tensor:
    """Dense ``coefficient * F @ M`` in float64 (the merged weight delta), O(d_out d_in log d_in) via the fast WHT."""
    f = spectral_dense(values.detach().to(torch.float64), rows, cols, d_out, d_in)
    return coefficient * hadamard_transform(f, transpose=True)
