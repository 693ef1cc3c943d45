"""Parity of the Triton kernels against float64 references.

Without a GPU these run in Triton's interpreter on CPU tensors (the root conftest sets TRITON_INTERPRET=1 before the
kernels are defined), so every kernel is checked in CI. On a GPU they run compiled on CUDA tensors.

Bar: the kernel's error against the float64 reference stays under 2x the error of the same-dtype torch reference,
plus a small atol (relative to the output's scale); the rule lives in tests/kernel_parity.py, shared with the GPU tests.
"""

import pytest
import torch
from kernel_parity import check_parity, dense_same_dtype, random_spectrum, rel_err

from qwha_export.kernels import spectral_adapter_reference, wht_reference
from qwha_export.kernels.spectral import SpectralLayout
from qwha_export.kernels.transform import wht_torch

triton_wht = pytest.importorskip("qwha_export.kernels.triton_wht")
from qwha_export.kernels.triton_spectral import spectral_adapter_triton  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_wht.available(), reason="needs triton (CUDA, or TRITON_INTERPRET=1)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [12, 96, 576, 1536, 3072, 4096, 11008, 14336]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("transpose", [False, True])
def test_wht_forward_parity(n, dtype, transpose):
    torch.manual_seed(n)
    shape = (3, n) if n > 4096 else (2, 5, n)  # odd batch shapes, leading dims flattened by the launcher
    x = torch.randn(shape, device=DEVICE).to(dtype)
    got = triton_wht.wht_triton(x, transpose=transpose)
    assert got.dtype == dtype and got.shape == x.shape
    ref64 = wht_torch(x.double(), transpose=transpose)
    check_parity(f"wht n={n} {dtype} transpose={transpose}", got, dense_same_dtype(x, transpose), ref64, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [576, 1536, 4096, 11008, 14336])
def test_wht_backward_parity(n, dtype):
    torch.manual_seed(1)
    x = torch.randn(3, n, device=DEVICE).to(dtype).requires_grad_()
    dy = torch.randn(3, n, device=DEVICE).to(dtype)
    triton_wht.wht_triton(x).backward(dy)
    x64 = x.detach().double().requires_grad_()
    wht_reference(x64).backward(dy.double())
    check_parity(f"wht backward n={n} {dtype}", x.grad, dense_same_dtype(dy, transpose=True), x64.grad, dtype)


def test_wht_large_n_32768():
    x = torch.randn(2, 32768, device=DEVICE)
    got = triton_wht.wht_triton(x)
    assert rel_err(got, wht_torch(x.double())) < 1e-6


def test_wht_rejects_float64_and_huge_n():
    with pytest.raises(ValueError, match="float64"):
        triton_wht.wht_triton(torch.randn(2, 16, dtype=torch.float64, device=DEVICE))
    with pytest.raises(ValueError, match="65536"):
        triton_wht.wht_triton(torch.randn(1, 65536, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "d_in,d_out,nnz,batch",
    [
        (576, 97, 1500, (3, 7)),
        (1536, 576, 4000, (5,)),
        (96, 33, 400, (70,)),
        (11008, 40, 3000, (3,)),
        (14336, 17, 2000, (2,)),
    ],
)
def test_spectral_forward_backward_parity(d_in, d_out, nnz, batch, dtype):
    rows, cols, vals = random_spectrum(d_out, d_in, nnz, seed=d_in + d_out)
    layout = SpectralLayout.build(rows, cols, d_out, d_in)
    scale = 0.37
    x = torch.randn(*batch, d_in, device=DEVICE).to(dtype).requires_grad_()
    v = vals.clone().to(DEVICE).requires_grad_()
    y = spectral_adapter_triton(x, v, layout, scale)
    assert y.dtype == dtype and y.shape == (*batch, d_out)
    dy = torch.randn_like(y)
    y.backward(dy)

    x64 = x.detach().double().requires_grad_()
    v64 = vals.clone().double().requires_grad_()
    ref = spectral_adapter_reference(x64, v64, rows, cols, d_out, scale)
    ref.backward(dy.double())
    # same-dtype torch reference: the dense formula evaluated in dtype
    xs = x.detach().requires_grad_()
    vs = vals.clone().to(DEVICE).to(dtype).requires_grad_()
    same = spectral_adapter_reference(xs, vs, rows, cols, d_out, scale)
    same.backward(dy)
    check_parity(f"spectral fwd {d_out}x{d_in} {dtype}", y, same, ref, dtype)
    check_parity(f"spectral dx {d_out}x{d_in} {dtype}", x.grad, xs.grad, x64.grad, dtype)
    check_parity(f"spectral dvalues {d_out}x{d_in} {dtype}", v.grad, vs.grad, v64.grad, dtype)


def test_spectral_empty_rows_and_duplicates():
    """Channels with no entries give zero; duplicate (row, col) entries add up, as in the dense F."""
    rows = torch.tensor([0, 0, 2, 2, 2])
    cols = torch.tensor([3, 3, 1, 5, 1])
    vals = torch.tensor([1.0, 2.0, -1.0, 0.5, 4.0])
    layout = SpectralLayout.build(rows, cols, 4, 12)
    x = torch.randn(6, 12, device=DEVICE)
    got = spectral_adapter_triton(x, vals.to(DEVICE), layout, 1.0)
    ref = spectral_adapter_reference(x.double(), vals.double(), rows, cols, 4, 1.0)
    assert rel_err(got, ref) < 1e-6
    assert torch.all(got[:, [1, 3]] == 0)
