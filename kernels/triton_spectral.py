"""Triton kernels for the spectral-adapter product (training-time path), forward and backward.

Contract: for ``x`` (..., d_in) float32/float16/bfloat16, float32 ``values`` (nnz,) and a
:class:`~qwha_export.kernels.spectral.SpectralLayout`,
``spectral_adapter_triton(x, values, layout, scale) == (scale * wht(x.float()) @ F.T).to(x.dtype)`` with
``F = dense(values at (rows, cols))``, accumulated in float32. Gradients flow to ``x`` and ``values``.

Kernels:

* ``_gather_spmm_kernel``: ``out[b, l] = scale * sum_e vals[vidx[e]] * src[b, idx[e]]`` over the entries ``e`` of
  line ``l``. With the CSR lists it is the forward (``src = wht(x)``, lines = output channels); with the CSC
  lists it is the input gradient ``dz = scale * dy @ F`` (``src = dy``, lines = Walsh indices). Lines are visited in
  decreasing-length order so a block of ``BLOCK_L`` lines loops only to its own longest line.
* ``_sddmm_kernel``: the value gradient ``dvals[e] = scale * sum_b dy[b, rows[e]] * z[b, cols[e]]``.

Backward of the transform itself reuses the Triton WHT (``dx = dz @ M``).
"""

from __future__ import annotations

import torch

from .layout import SpectralLayout
from .triton_wht import _wht_launch, available, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _gather_spmm_kernel(
        src_ptr, out_ptr, ptr_ptr, idx_ptr, vidx_ptr, vals_ptr, order_ptr,
        n_batch, n_lines, stride_src, stride_out, scale,
        BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        pid_l = tl.program_id(0)
        pid_b = tl.program_id(1)
        offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        lmask = offs_l < n_lines
        lines = tl.load(order_ptr + offs_l, mask=lmask, other=0)
        start = tl.load(ptr_ptr + lines, mask=lmask, other=0)
        length = tl.load(ptr_ptr + lines + 1, mask=lmask, other=0) - start
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        bmask = offs_b < n_batch
        src_rows = src_ptr + offs_b.to(tl.int64)[:, None] * stride_src
        acc = tl.zeros((BLOCK_B, BLOCK_L), dtype=tl.float32)
        for k in range(0, tl.max(length, axis=0)):
            emask = lmask & (k < length)
            e = start + k
            col = tl.load(idx_ptr + e, mask=emask, other=0)
            v = tl.load(vals_ptr + tl.load(vidx_ptr + e, mask=emask, other=0), mask=emask, other=0.0)
            s = tl.load(src_rows + col[None, :], mask=bmask[:, None] & emask[None, :], other=0.0)
            acc += s.to(tl.float32) * v.to(tl.float32)[None, :]
        out = out_ptr + offs_b.to(tl.int64)[:, None] * stride_out + lines[None, :]
        tl.store(out, (acc * scale).to(out_ptr.dtype.element_ty), mask=bmask[:, None] & lmask[None, :])

    @triton.jit
    def _sddmm_kernel(
        dy_ptr, z_ptr, rows_ptr, cols_ptr, dv_ptr,
        n_batch, nnz, stride_dy, stride_z, scale,
        BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_e = pid * BLOCK_E + tl.arange(0, BLOCK_E)
        emask = offs_e < nnz
        r = tl.load(rows_ptr + offs_e, mask=emask, other=0)
        c = tl.load(cols_ptr + offs_e, mask=emask, other=0)
        acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for b0 in range(0, n_batch, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            m = (offs_b < n_batch)[:, None] & emask[None, :]
            b64 = offs_b.to(tl.int64)[:, None]
            dy = tl.load(dy_ptr + b64 * stride_dy + r[None, :], mask=m, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + b64 * stride_z + c[None, :], mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(dy * z, axis=0)
        tl.store(dv_ptr + offs_e, acc * scale, mask=emask)


_BLOCK_B = 32
_BLOCK_L = 32


def _gather_spmm(src: torch.Tensor, lines, n_lines: int, values: torch.Tensor, scale: float, out_dtype) -> torch.Tensor:
    """Launcher for ``_gather_spmm_kernel`` over a (batch, width) row-major ``src``."""
    out = torch.empty(src.shape[0], n_lines, dtype=out_dtype, device=src.device)
    if src.shape[0] == 0:
        return out
    grid = (triton.cdiv(n_lines, _BLOCK_L), triton.cdiv(src.shape[0], _BLOCK_B))
    _gather_spmm_kernel[grid](
        src, out, lines.ptr, lines.idx, lines.vidx, values, lines.order,
        src.shape[0], n_lines, src.stride(0), out.stride(0), float(scale),
        BLOCK_B=_BLOCK_B, BLOCK_L=_BLOCK_L, num_warps=4,
    )
    return out


def _sddmm(dy: torch.Tensor, z: torch.Tensor, layout: SpectralLayout, scale: float) -> torch.Tensor:
    """Launcher for ``_sddmm_kernel``: float32 gradient of the values, in value order."""
    dv = torch.empty(layout.nnz, dtype=torch.float32, device=dy.device)
    if layout.nnz == 0:
        return dv
    block_e = 128
    _sddmm_kernel[(triton.cdiv(layout.nnz, block_e),)](
        dy, z, layout.rows, layout.cols, dv, dy.shape[0], layout.nnz, dy.stride(0), z.stride(0), float(scale),
        BLOCK_B=32, BLOCK_E=block_e, num_warps=4,
    )
    return dv


class _SpectralFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, layout: SpectralLayout, scale: float) -> torch.Tensor:
        x2 = x.reshape(-1, layout.d_in).contiguous()
        z = _wht_launch(x2, transpose=False, out_dtype=torch.float32)
        vals = values.detach().to(torch.float32).contiguous()
        y = _gather_spmm(z, layout.csr, layout.d_out, vals, scale, x.dtype)
        ctx.save_for_backward(z, vals)
        ctx.layout, ctx.scale, ctx.x_shape, ctx.x_dtype, ctx.v_dtype = layout, scale, x.shape, x.dtype, values.dtype
        return y.reshape(*x.shape[:-1], layout.d_out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, vals = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        dy = grad.reshape(-1, layout.d_out).contiguous()
        dx = dv = None
        if ctx.needs_input_grad[0]:
            dz = _gather_spmm(dy, layout.csc, layout.d_in, vals, scale, torch.float32)
            dx = _wht_launch(dz, transpose=True, out_dtype=ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dv = _sddmm(dy, z, layout, scale).to(ctx.v_dtype)
        return dx, dv, None, None


def spectral_adapter_triton(
    x: torch.Tensor, values: torch.Tensor, layout: SpectralLayout, scale: float = 1.0
) -> torch.Tensor:
    """Triton ``scale * wht(x) @ F.T`` (see module docstring); ``layout`` must live on ``x.device``."""
    if triton is None:
        raise RuntimeError("triton is not installed; use qwha_export.kernels.spectral_adapter (torch path) instead")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"spectral_adapter_triton takes float32/float16/bfloat16 inputs, got {x.dtype}")
    if layout.rows.device != x.device:
        layout = layout.to(x.device)
    return _SpectralFunction.apply(x, values, layout, scale)


__all__ = ["available", "spectral_adapter_triton"]
