"""The index structure of a sparse spectrum ``F`` (``d_out x d_in``, ``nnz`` entries): :class:`SpectralLayout`, its
entries in value order plus CSR (by output row) and CSC (by Walsh column) line tables, built once per spectrum and
shared by the torch and Triton spectral products."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SpectralLayout"]


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
