"""The Walsh-Hadamard transform: O(n log n) torch implementation and the public, dispatching ``wht``/``iwht``.

Convention: ``M_n = H_K (x) H_{2^m}`` with ``H_{2^m}`` in Sylvester natural order and ``K`` the outer index. A
vector of length ``n`` is viewed as ``(K, n/K)``; the last axis gets the Sylvester transform, then the result is
left-multiplied by ``H_K``.

* ``wht(x)  = x @ M_n.T`` along the last dim, unnormalised.
* ``iwht(x) = x @ M_n / n``, its exact inverse.

Public functions run the Triton kernels on CUDA tensors and the torch butterfly elsewhere. Both accept float32,
float16 and bfloat16 (accumulating in float32) and float64 (torch path, exact to float64 rounding).
"""

from __future__ import annotations

import torch

from .hadamard import hadamard_k, hadamard_matrix, hadamard_order

__all__ = ["wht", "iwht", "wht_torch", "hadamard_transform"]

_FACTOR = 64  # widest Sylvester factor applied as one matmul by the torch path


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pow2_factors(p: int, fmax: int) -> list[int]:
    factors = []
    while p > 1:
        factors.append(min(p, fmax))
        p //= factors[-1]
    return factors


def _wht_butterfly(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """The torch kernel: ``x @ M_n.T`` (or ``x @ M_n`` when ``transpose``) along the last dim, any leading shape.

    ``H_{2^m}`` is applied as a Kronecker product of small Sylvester factors (at most ``_FACTOR`` wide), one
    batched matmul per factor: ``O(n * _FACTOR * log_FACTOR(n))`` = O(n log n) work that runs in BLAS, several
    times faster on CPU than a radix-2 butterfly of elementwise passes. Then ``H_K`` multiplies the outer axis.
    Low-precision inputs are computed in float32 and cast back once; float64 stays float64.
    """
    n = x.shape[-1]
    k, p = hadamard_order(n)
    factors = _pow2_factors(p, _FACTOR)
    y = x.to(_compute_dtype(x.dtype)).reshape(-1, k, *factors)
    for axis, f in enumerate(factors, start=2):
        h = hadamard_matrix(f, dtype=y.dtype, device=y.device)  # symmetric
        y = torch.movedim(torch.matmul(torch.movedim(y, axis, -1), h), -1, axis)
    y = y.reshape(-1, k, p)
    if k > 1:
        hk = hadamard_k(k).to(dtype=y.dtype, device=y.device)
        y = torch.matmul(hk.T if transpose else hk, y)
    return y.reshape(x.shape).to(x.dtype)


class _WHT(torch.autograd.Function):
    """Autograd of the torch kernel: the gradient of ``x @ M.T`` is ``grad @ M``, i.e. the transposed transform.

    One transform each way instead of autograd through every factor's matmul/movedim and the broadcast ``H_K``
    product (whose ``BmmBackward`` dominated the CPU training step).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        ctx.transpose = transpose
        return _wht_butterfly(x, transpose)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _wht_butterfly(grad, not ctx.transpose), None


def wht_torch(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """O(n log n) torch transform: ``x @ M_n.T`` (``transpose=False``) or ``x @ M_n`` (``transpose=True``) along the
    last dim, any leading shape, float16/bfloat16/float32 (computed in float32) or float64.

    Differentiable: the backward is the transposed transform (:class:`_WHT`), exactly
    ``torch.autograd.grad(x @ hadamard_matrix(n).T, x, g) == g @ hadamard_matrix(n)``. Reference:
    :func:`qwha_export.kernels.reference.wht_reference`.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _WHT.apply(x, transpose)
    return _wht_butterfly(x, transpose)


def _use_triton(x: torch.Tensor) -> bool:
    if not x.is_cuda or x.dtype == torch.float64:
        return False
    from . import triton_wht

    return triton_wht.available()


def hadamard_transform(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x @ M_n.T`` (``transpose=False``) or ``x @ M_n`` (``transpose=True``), dispatching Triton / torch."""
    if _use_triton(x):
        from .triton_wht import wht_triton

        return wht_triton(x, transpose=transpose)
    return wht_torch(x, transpose=transpose)


def wht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform along the last dim: ``x @ hadamard_matrix(n).T``."""
    return hadamard_transform(x, transpose=False)


def iwht(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`wht`: ``x @ hadamard_matrix(n) / n``."""
    return hadamard_transform(x, transpose=True) / x.shape[-1]
