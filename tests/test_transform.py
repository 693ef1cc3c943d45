import pytest
import torch

from qwha_export.kernels import hadamard_k, hadamard_matrix, hadamard_order, iwht, iwht_reference, wht, wht_reference
from qwha_export.kernels.transform import wht_torch

SIZES = [1, 2, 12, 20, 40, 96, 576, 1536, 3072, 4096, 11008, 14336]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("n", SIZES)
def test_wht_equals_dense_reference_float64(n):
    torch.manual_seed(n)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert _rel(wht(x), wht_reference(x)) < 1e-13


@pytest.mark.parametrize("n", [576, 1536, 4096])
def test_convention_view_as_k_by_p(n):
    """wht(x): view as (K, n/K), Sylvester-transform the last axis, then left-multiply by H_K."""
    k, p = hadamard_order(n)
    x = torch.randn(4, n, dtype=torch.float64)
    hp = hadamard_matrix(p, dtype=torch.float64)
    expected = hadamard_k(k).double() @ (x.reshape(4, k, p) @ hp.T)
    assert _rel(wht(x), expected.reshape(4, n)) < 1e-13


@pytest.mark.parametrize("n", SIZES)
def test_iwht_inverts_wht(n):
    x = torch.randn(7, n, dtype=torch.float64)
    assert _rel(iwht(wht(x)), x) < 1e-13
    assert _rel(wht(iwht(x)), x) < 1e-13
    assert _rel(iwht(x), iwht_reference(x)) < 1e-13


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("n", [576, 1536, 4096])
def test_low_precision_accumulates_in_float32(dtype, tol, n):
    x = torch.randn(5, n).to(dtype)
    y = wht(x)
    assert y.dtype == dtype
    assert _rel(y, wht_reference(x.double())) < tol


@pytest.mark.parametrize("n", [12, 96, 40 * 2])
@pytest.mark.parametrize("transpose", [False, True])
def test_gradcheck(n, transpose):
    x = torch.randn(3, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: wht_torch(t, transpose=transpose), (x,))


def test_unsupported_size_error():
    with pytest.raises(ValueError, match="n=22"):
        wht(torch.randn(2, 22))
