"""The Triton training-time kernels compiled for a CUDA GPU, against float64 references (``gpu`` marker).

Skipped without CUDA (CI runs the same kernels in Triton's interpreter in tests/test_triton_kernels.py). The grid:

* every transform size ``n = K * 2^m <= 32768`` (``MAX_N``) that ``hadamard_order`` maps to ``K``, for every
  supported ``K`` (1, the published orders 12 ... 172 and the generated Paley orders): 247 sizes. The Triton WHT
  forward (``x @ M.T`` and ``x @ M``) and its backward run there in float32, float16 and bfloat16;
* the spectral product ``scale * wht(x) @ F.T`` forward and backward (``x`` and the values) on the same sizes as
  ``d_in`` in float32 (it reuses the float32 WHT kernels, so the grid costs no extra compilations), and on real
  layer shapes (``d_in`` 576, 1536, 4096, 11008 = 172*64, 14336 = 28*512, 18944 = 148*128, each with its model's
  ``d_out``) at the rank-64 budget in all three dtypes.

Row counts are odd and not multiples of the kernels' row blocks (37 rows below n = 4096, 5 above, 333 tokens for the
real shapes), so masked tails are exercised. One row count per size keeps the number of compiled kernel variants at
one per (size, dtype): compilation, not running, is what these tests cost on a GPU (``benchmarks/gpu_suite.sh`` runs
them in parallel shards). Rule: :func:`kernel_parity.check_parity` (kernel error <= 2x the error of the same-dtype
torch reference + small atol). The references use the O(n log n) torch WHT, never a dense ``n x n`` matrix.
"""

from __future__ import annotations

import pytest
import torch
from kernel_parity import check_parity, random_spectrum, spectral_fast_reference, wht_sizes

from qwha_export.kernels import hadamard_order
from qwha_export.kernels.spectral import SpectralLayout
from qwha_export.kernels.transform import wht_torch

triton_wht = pytest.importorskip("qwha_export.kernels.triton_wht")
from qwha_export.kernels.triton_spectral import spectral_adapter_triton  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICE = "cuda"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (d_in, d_out) of real projections: SmolLM2 up/down, LLaMA-2-7B up/down, LLaMA-3-8B down, Qwen2.5-7B down
REAL_SHAPES = [(576, 1536), (1536, 576), (4096, 11008), (11008, 4096), (14336, 4096), (18944, 3584)]
REAL_RANK = 64
REAL_TOKENS = 333


SIZES = wht_sizes(triton_wht.MAX_N)


def _size_id(n: int) -> str:
    k, p = hadamard_order(n)
    return f"n{n}=K{k}x{p}"


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rows(n: int) -> int:
    return 37 if n < 4096 else 5


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("n", SIZES, ids=_size_id)
def test_wht_forward_backward(n, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(n)
    x = torch.randn(_rows(n), n, device=DEVICE, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(_rows(n), n, device=DEVICE, generator=gen).to(dtype)
    for transpose in (False, True):
        y = triton_wht.wht_triton(x, transpose=transpose)
        assert y.dtype == dtype and y.shape == x.shape
        xd = x.detach()
        same, ref64 = wht_torch(xd, transpose), wht_torch(xd.double(), transpose)
        check_parity(f"wht n={n} {dtype} transpose={transpose}", y, same, ref64, dtype)
        (dx,) = torch.autograd.grad(y, x, dy)
        same, ref64 = wht_torch(dy, not transpose), wht_torch(dy.double(), not transpose)
        check_parity(f"wht backward n={n} {dtype} transpose={transpose}", dx, same, ref64, dtype)


def _spectral_case(d_in: int, d_out: int, nnz: int, tokens: int, dtype: torch.dtype, seed: int) -> None:
    rows, cols, vals = random_spectrum(d_out, d_in, nnz, seed=seed)
    layout = SpectralLayout.build(rows, cols, d_out, d_in).to(DEVICE)
    scale = 0.37
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(tokens, d_in, device=DEVICE, generator=gen).to(dtype).requires_grad_()
    v = vals.to(DEVICE).requires_grad_()
    y = spectral_adapter_triton(x, v, layout, scale)
    assert y.dtype == dtype and y.shape == (tokens, d_out)
    dy = torch.randn(tokens, d_out, device=DEVICE, generator=gen).to(dtype)
    y.backward(dy)

    r, c = rows.to(DEVICE), cols.to(DEVICE)
    x64 = x.detach().double().requires_grad_()
    v64 = vals.to(DEVICE).double().requires_grad_()
    ref = spectral_fast_reference(x64, v64, r, c, d_out, scale)
    ref.backward(dy.double())
    xs = x.detach().requires_grad_()
    vs = vals.to(DEVICE).to(dtype).requires_grad_()
    same = spectral_fast_reference(xs, vs, r, c, d_out, scale)
    same.backward(dy)
    name = f"spectral {d_in}->{d_out} nnz={nnz} tokens={tokens} {dtype}"
    check_parity(f"{name} forward", y, same, ref, dtype)
    check_parity(f"{name} dx", x.grad, xs.grad, x64.grad, dtype)
    check_parity(f"{name} dvalues", v.grad, vs.grad, v64.grad, dtype)


@pytest.mark.parametrize("n", SIZES, ids=_size_id)
def test_spectral_grid_float32(n):
    d_out = 33
    _spectral_case(n, d_out, nnz=4 * (n + d_out), tokens=_rows(n), dtype=torch.float32, seed=n)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("d_in,d_out", REAL_SHAPES, ids=[f"{i}->{o}" for i, o in REAL_SHAPES])
def test_spectral_real_shapes(d_in, d_out, dtype):
    _spectral_case(d_in, d_out, REAL_RANK * (d_in + d_out), REAL_TOKENS, dtype, seed=d_in + d_out)
