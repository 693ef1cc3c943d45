"""The parity rule shared by the kernel tests (Triton interpreter in CI, compiled Triton under the ``gpu`` marker).

A kernel's error against a float64 reference must stay under twice the error of a same-dtype torch reference plus a
small ``atol`` (relative to the output's scale); on failure the measured error, the reference error and the bound
are printed. Errors are ``max |a - ref64| / max |ref64|``.
"""

from __future__ import annotations

import torch

from qwha_export.kernels import SUPPORTED_ORDERS, hadamard_matrix, hadamard_order, spectral_dense
from qwha_export.kernels.transform import wht_torch

ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rel_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    """``max |a - ref64| / max |ref64|`` in float64, on ``ref64``'s device."""
    ref64 = ref64.detach().double()
    a = a.detach().to(device=ref64.device, dtype=torch.float64)
    return float((a - ref64).abs().max() / ref64.abs().max().clamp_min(1e-30))


def check_parity(name: str, got: torch.Tensor, same_dtype_ref: torch.Tensor, ref64: torch.Tensor, dtype) -> None:
    """Assert ``err(got) <= 2 * err(same_dtype_ref) + ATOL[dtype]``; the message names all three numbers."""
    err, ref_err = rel_err(got, ref64), rel_err(same_dtype_ref, ref64)
    bound = 2 * ref_err + ATOL[dtype]
    assert err <= bound, (
        f"{name}: kernel error {err:.3e}, same-dtype torch reference error {ref_err:.3e}, bound {bound:.3e}"
    )


def dense_same_dtype(x: torch.Tensor, transpose: bool) -> torch.Tensor:
    """Same-dtype torch reference of the WHT: a dense product in x.dtype (CPU half matmuls run in float32 inside)."""
    m = hadamard_matrix(x.shape[-1], dtype=x.dtype, device=x.device)
    return x @ (m if transpose else m.T)


def spectral_fast_reference(
    x: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, d_out: int, scale: float
) -> torch.Tensor:
    """``scale * wht(x) @ F.T`` with the O(n log n) torch WHT and a dense ``F``, all in ``x.dtype``; differentiable
    in ``x`` and ``values``. Same math as ``spectral_adapter_reference`` without its dense ``n x n`` matrix, so it
    stays cheap at n = 32768 (float64 inputs give the float64 reference)."""
    f = spectral_dense(values.to(x.dtype), rows.to(x.device), cols.to(x.device), d_out, x.shape[-1])
    return scale * (wht_torch(x) @ f.T)


def random_spectrum(d_out: int, d_in: int, nnz: int, seed: int):
    """``(rows, cols, values)`` on CPU: uneven rows (AdaAlloc-like budgets, channel o gets ~(1 + o % 7) shares),
    random Walsh indices (duplicates possible), standard normal values."""
    g = torch.Generator().manual_seed(seed)
    weights = 1.0 + (torch.arange(d_out) % 7).double()
    rows = torch.multinomial(weights, nnz, replacement=True, generator=g)
    cols = torch.randint(0, d_in, (nnz,), generator=g)
    return rows, cols, torch.randn(nnz, generator=g)


def wht_sizes(max_n: int) -> list[int]:
    """Every transform size ``n = K * 2^m <= max_n`` whose ``hadamard_order`` is ``K``, over all supported ``K``
    (each size once, under the ``K`` it is computed with), ascending."""
    sizes = set()
    for k in SUPPORTED_ORDERS:
        n = k
        while n <= max_n:
            if hadamard_order(n)[0] == k:
                sizes.add(n)
            n *= 2
    return sorted(sizes)
