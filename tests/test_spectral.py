import pytest
import torch

from qwha_export.kernels import spectral_adapter, spectral_adapter_reference
from qwha_export.kernels.spectral import SpectralLayout


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-12) -> None:
    """float64 agreement relative to the largest reference entry (rounding of long sums scales with it)."""
    err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
    assert err < tol, f"relative error {err:.3e} >= {tol:.0e}"


def _spectrum(d_out, d_in, nnz, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, d_out, (nnz,), generator=g), torch.randint(0, d_in, (nnz,), generator=g)


@pytest.mark.parametrize("d_in,d_out", [(576, 100), (96, 7), (1536, 576), (40, 3)])
def test_torch_path_matches_dense_reference_float64(d_in, d_out):
    rows, cols = _spectrum(d_out, d_in, 3 * (d_in + d_out))
    layout = SpectralLayout.build(rows, cols, d_out, d_in)
    x = torch.randn(2, 3, d_in, dtype=torch.float64, requires_grad=True)
    v = torch.randn(rows.numel(), dtype=torch.float64, requires_grad=True)
    y = spectral_adapter(x, v, layout, 0.25)
    ref = spectral_adapter_reference(x, v, rows, cols, d_out, 0.25)
    assert y.shape == (2, 3, d_out)
    _close(y, ref)
    gx, gv = torch.autograd.grad(y.sum(), (x, v))
    rx, rv = torch.autograd.grad(ref.sum(), (x, v))
    _close(gx, rx)
    _close(gv, rv)


def test_gradcheck_torch_path():
    rows, cols = _spectrum(5, 12, 20)
    layout = SpectralLayout.build(rows, cols, 5, 12)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    v = torch.randn(20, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: spectral_adapter(a, b, layout, 0.5), (x, v))


def test_float32_path_error_is_float32_level():
    rows, cols = _spectrum(64, 576, 2000)
    layout = SpectralLayout.build(rows, cols, 64, 576)
    x, v = torch.randn(9, 576), torch.randn(2000)
    ref = spectral_adapter_reference(x.double(), v.double(), rows, cols, 64, 1.0)
    err = float((spectral_adapter(x, v, layout).double() - ref).abs().max() / ref.abs().max())
    assert err < 1e-6


def test_layout_lists_are_consistent():
    rows, cols = _spectrum(13, 40, 300, seed=3)
    lay = SpectralLayout.build(rows, cols, 13, 40)
    counts = torch.bincount(rows, minlength=13)
    assert torch.equal((lay.csr.ptr[1:] - lay.csr.ptr[:-1]).long(), counts)
    assert torch.all(counts[lay.csr.order.long()][:-1] >= counts[lay.csr.order.long()][1:])
    for line in range(13):
        s, e = int(lay.csr.ptr[line]), int(lay.csr.ptr[line + 1])
        assert torch.all(rows[lay.csr.vidx[s:e].long()] == line)
        assert torch.equal(cols[lay.csr.vidx[s:e].long()], lay.csr.idx[s:e].long())
    assert sorted(lay.csc.vidx.tolist()) == list(range(300))


@pytest.mark.parametrize(
    "rows,cols,match",
    [
        ([0, 5], [0, 1], r"row index out of range \[0, 5\)"),
        ([0, 1], [0, 12], r"column index out of range \[0, 12\)"),
        ([0], [0, 1], "same length"),
    ],
)
def test_layout_rejects_bad_indices(rows, cols, match):
    with pytest.raises(ValueError, match=match):
        SpectralLayout.build(torch.tensor(rows), torch.tensor(cols), 5, 12)


def test_shape_mismatch_errors():
    lay = SpectralLayout.build(torch.tensor([0]), torch.tensor([0]), 2, 12)
    with pytest.raises(ValueError, match="d_in=12"):
        spectral_adapter(torch.randn(1, 24), torch.randn(1), lay)
    with pytest.raises(ValueError, match="2 values for 1"):
        spectral_adapter(torch.randn(1, 12), torch.randn(2), lay)


@pytest.mark.parametrize("nnz", [50, 5000])  # sparse (chunked gathers) and dense (dy^T z) value-gradient paths
def test_value_gradient_paths_agree_with_reference(nnz):
    rows, cols = _spectrum(100, 1536, nnz, seed=nnz)
    layout = SpectralLayout.build(rows, cols, 100, 1536)
    g = torch.Generator().manual_seed(nnz)
    x = torch.randn(7, 1536, dtype=torch.float64, generator=g).requires_grad_()
    v = torch.randn(nnz, dtype=torch.float64, generator=g).requires_grad_()
    gx, gv = torch.autograd.grad(spectral_adapter(x, v, layout, 0.3).pow(2).sum(), (x, v))
    rx, rv = torch.autograd.grad(spectral_adapter_reference(x, v, rows, cols, 100, 0.3).pow(2).sum(), (x, v))
    # float64 rounding of sums over thousands of terms: compare relative to each gradient's largest entry
    _close(gx, rx)
    _close(gv, rv)
