"""The QWHA spectral-adapter product ``y = scale * wht(x) @ F.T`` with a sparse ``F`` (``d_out x n``).

``F`` is given in COO form: ``values[e]`` at ``(rows[e], cols[e])`` (row = output channel, col = Walsh index).
:class:`SpectralLayout` precomputes, once per index set, the row-wise (CSR) and column-wise (CSC) gather lists
used by the kernels; only the values change during training.

Public: :func:`spectral_adapter` (dispatches the Triton kernels on CUDA, torch sparse ops elsewhere).
Reference: :func:`qwha_export.kernels.reference.spectral_adapter_reference` (dense ``F``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .reference import spectral_dense
from .transform import hadamard_transform, wht_torch

__all__ = ["SpectralLayout", "dense_delta", "spectral_adapter", "spectral_adapter_torch"]


@dataclass(frozen=True)
class _Lines:
    """Gather lists for one orientation (CSR over rows or CSC over columns).

    Memory layout: ``ptr`` (n_lines + 1) int32 offsets into ``idx``/``vidx`` (int32, length nnz); line ``l`` owns
    entries ``ptr[l]:ptr[l+1]``, ``idx`` holds the other coordinate and ``vidx`` the position in ``values``.
    ``order`` (n_lines, int32) lists lines by decreasing length so that a block of lines has similar lengths.
    """

    ptr: torch.Tensor
    idx: torch.Tensor
    vidx: torch.Tensor
    order: torch.Tensor

    @staticmethod
    def build(major: torch.Tensor, minor: torch.Tensor, n_lines: int) -> _Lines:
        perm = torch.argsort(major * (int(minor.max()) + 1 if minor.numel() else 1) + minor, stable=True)
        counts = torch.bincount(major, minlength=n_lines)
        ptr = torch.zeros(n_lines + 1, dtype=torch.int64)
        ptr[1:] = torch.cumsum(counts, 0)
        order = torch.argsort(counts, descending=True, stable=True)
        i32 = torch.int32
        return _Lines(ptr.to(i32), minor[perm].to(i32), perm.to(i32), order.to(i32))

    def to(self, device: torch.device | str) -> _Lines:
        return _Lines(*(t.to(device) for t in (self.ptr, self.idx, self.vidx, self.order)))


@dataclass(frozen=True)
class SpectralLayout:
    """Index structure of a sparse spectrum ``F`` of shape ``(d_out, d_in)`` with ``nnz`` entries."""

    d_out: int
    d_in: int
    rows: torch.Tensor  # (nnz,) int64, in value order
    cols: torch.Tensor  # (nnz,) int64, in value order
    csr: _Lines
    csc: _Lines

    @staticmethod
    def build(rows: torch.Tensor, cols: torch.Tensor, d_out: int, d_in: int) -> SpectralLayout:
        rows = rows.detach().to("cpu", torch.int64).reshape(-1)
        cols = cols.detach().to("cpu", torch.int64).reshape(-1)
        if rows.shape != cols.shape:
            raise ValueError(f"rows and cols must have the same length, got {rows.numel()} and {cols.numel()}")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= d_out):
            raise ValueError(f"row index out of range [0, {d_out}): min {int(rows.min())}, max {int(rows.max())}")
        if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= d_in):
            raise ValueError(f"column index out of range [0, {d_in}): min {int(cols.min())}, max {int(cols.max())}")
        return SpectralLayout(d_out, d_in, rows, cols, _Lines.build(rows, cols, d_out), _Lines.build(cols, rows, d_in))

    @property
    def nnz(self) -> int:
        return self.rows.numel()

    def to(self, device: torch.device | str) -> SpectralLayout:
        return SpectralLayout(
            self.d_out, self.d_in, self.rows.to(device), self.cols.to(device), self.csr.to(device), self.csc.to(device)
        )


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
