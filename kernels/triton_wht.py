"""Triton Walsh-Hadamard transform (training-time kernel), forward and backward.

Contract: for ``x`` of shape ``(..., n)``, ``n = K * 2^m <= 32768``, dtype float32/float16/bfloat16,
``wht_triton(x) == (x.float() @ hadamard_matrix(n).T).to(x.dtype)`` and
``wht_triton(x, transpose=True) == (x.float() @ hadamard_matrix(n)).to(x.dtype)``, accumulated in float32.

Design (tensor-core friendly, as in HadaCore): one program transforms ``BLOCK_R`` rows held in registers. The
``2^m`` axis is split as ``P1 * P2`` and each factor is applied as a small +/-1 matrix product with ``tl.dot``
(Sylvester entries ``(-1)^popcount(i & j)`` are generated in registers), then ``H_K`` (loaded, zero-padded to a
power of two) is applied to the outer axis. Products with +/-1 matrices are exact; sums run in float32 with
``input_precision="ieee"`` so the result matches a float32 reference to rounding.
"""

from __future__ import annotations

import functools
import os

import torch

from .hadamard import hadamard_k, hadamard_order

try:  # triton is a Linux-only dependency
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["available", "interpreting", "wht_triton", "MAX_N"]

MAX_N = 32768


def available() -> bool:
    """True when Triton can run here (a CUDA device, or the interpreter with ``TRITON_INTERPRET=1``)."""
    return triton is not None and (torch.cuda.is_available() or interpreting())


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:

    @triton.jit
    def _sylvester_tile(N: tl.constexpr, N_VALID: tl.constexpr):
        """(N, N) float32 tile of H_{N_VALID} in Sylvester order, zero outside the leading N_VALID block."""
        i = tl.arange(0, N)[:, None]
        j = tl.arange(0, N)[None, :]
        v = i & j
        v = v ^ (v >> 16)
        v = v ^ (v >> 8)
        v = v ^ (v >> 4)
        v = v ^ (v >> 2)
        v = v ^ (v >> 1)
        h = tl.where((v & 1) == 0, 1.0, -1.0)
        return tl.where((i < N_VALID) & (j < N_VALID), h, 0.0)

    @triton.jit
    def _wht_kernel(
        x_ptr,
        y_ptr,
        hk_ptr,
        n_rows,
        stride_x,
        stride_y,
        K: tl.constexpr,
        K_PAD: tl.constexpr,
        P1: tl.constexpr,
        P2: tl.constexpr,
        P2_PAD: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        pid = tl.program_id(0)
        P: tl.constexpr = P1 * P2
        R2: tl.constexpr = BLOCK_R * K_PAD * P1
        # row-major tile (BLOCK_R, K_PAD, P1, P2_PAD) flattened to (R2, P2_PAD)
        r = tl.arange(0, R2)[:, None]
        c = tl.arange(0, P2_PAD)[None, :]
        row = pid * BLOCK_R + r // (K_PAD * P1)
        k = (r // P1) % K_PAD
        p1 = r % P1
        mask = (row < n_rows) & (k < K) & (c < P2)
        col = k * P + p1 * P2 + c
        x = tl.load(x_ptr + row.to(tl.int64) * stride_x + col, mask=mask, other=0.0).to(tl.float32)

        # 1) Sylvester transform along P2 (H is symmetric)
        x = tl.dot(x, _sylvester_tile(P2_PAD, P2), input_precision="ieee")
        # 2) along P1, batched over (row, k)
        if P1 > 1:
            x3 = tl.reshape(x, (BLOCK_R * K_PAD, P1, P2_PAD))
            h1 = tl.broadcast_to(_sylvester_tile(P1, P1)[None, :, :], (BLOCK_R * K_PAD, P1, P1))
            x = tl.reshape(tl.dot(h1, x3, input_precision="ieee"), (R2, P2_PAD))
        # 3) left-multiply by H_K (zero-padded to K_PAD), batched over rows
        if K > 1:
            kk = tl.arange(0, K_PAD)
            hk = tl.load(hk_ptr + kk[:, None] * K_PAD + kk[None, :])
            hk3 = tl.broadcast_to(hk[None, :, :], (BLOCK_R, K_PAD, K_PAD))
            xk = tl.reshape(x, (BLOCK_R, K_PAD, P1 * P2_PAD))
            x = tl.reshape(tl.dot(hk3, xk, input_precision="ieee"), (R2, P2_PAD))
        tl.store(y_ptr + row.to(tl.int64) * stride_y + col, x.to(y_ptr.dtype.element_ty), mask=mask)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


@functools.lru_cache(maxsize=64)
def _plan(n: int) -> dict[str, int]:
    """Tile shape for size n: P = P1 * P2, every tl.dot dimension >= 16."""
    k, p = hadamard_order(n)
    if n > MAX_N:
        raise ValueError(f"Triton WHT supports n <= {MAX_N}, got n={n}")
    if p <= 128:
        p1, p2 = 1, p
    else:
        p2 = min(128, p // 16)
        p1 = p // p2
    k_pad = 1 if k == 1 else max(16, _next_pow2(k))
    p2_pad = max(16, p2)
    tile = k_pad * p1 * p2_pad
    block_r = max(_next_pow2(-(-16 // (k_pad * p1))), min(16, max(1, 4096 // tile)))
    total = block_r * tile
    num_warps = 4 if total <= 2048 else 8 if total <= 8192 else 16
    return {"K": k, "K_PAD": k_pad, "P1": p1, "P2": p2, "P2_PAD": p2_pad, "BLOCK_R": block_r, "num_warps": num_warps}


@functools.lru_cache(maxsize=64)
def _hk_padded(k: int, k_pad: int, transpose: bool, device: str) -> torch.Tensor:
    h = torch.zeros(k_pad, k_pad, dtype=torch.float32)
    hk = hadamard_k(k).float()
    h[:k, :k] = hk.T if transpose else hk
    return h.to(device)


def _wht_launch(x: torch.Tensor, transpose: bool, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Launcher: ``x @ M_n.T`` (``x @ M_n`` if transpose) for a contiguous view of shape (rows, n)."""
    n = x.shape[-1]
    plan = _plan(n)
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=out_dtype or x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows == 0:
        return y.reshape(x.shape)
    hk = _hk_padded(plan["K"], plan["K_PAD"], transpose, str(x.device))
    grid = (triton.cdiv(rows, plan["BLOCK_R"]),)
    _wht_kernel[grid](
        x2, y, hk, rows, x2.stride(0), y.stride(0),
        K=plan["K"], K_PAD=plan["K_PAD"], P1=plan["P1"], P2=plan["P2"], P2_PAD=plan["P2_PAD"],
        BLOCK_R=plan["BLOCK_R"], num_warps=plan["num_warps"],
    )
    return y.reshape(x.shape)


class _WHTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        ctx.transpose = transpose
        return _wht_launch(x, transpose)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # y = x M^T  =>  dx = dy M  (and the transposed transform for y = x M)
        return _wht_launch(grad, not ctx.transpose), None


def wht_triton(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """Triton WHT along the last dim, differentiable. See the module docstring for the exact contract."""
    if triton is None:
        raise RuntimeError("triton is not installed; use qwha_export.kernels.wht (torch path) instead")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"wht_triton takes float32/float16/bfloat16, got {x.dtype}")
    return _WHTFunction.apply(x, transpose)
