"""The QWHA layer equals the dense formula (and the published QWHA layer) to float64 precision."""

import math

import pytest
import torch

from qwha_export.converters.quantize import quantize_rtn
from qwha_export.kernels import hadamard_matrix
from qwha_export.layer import QWHALinear, adapter_coefficient
from qwha_export.quant_linear import QuantLinear


def _layer(d_in, d_out, nnz, seed=0, scale=1.7):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(d_out, generator=g))
    qw = quantize_rtn(lin.weight, 4, 32 if d_in % 64 else 64)
    base = QuantLinear.from_linear(lin, qw).double()
    rows = torch.randint(0, d_out, (nnz,), generator=g)
    cols = torch.randint(0, d_in, (nnz,), generator=g)
    vals = torch.randn(nnz, generator=g)
    return QWHALinear(base, vals, rows, cols, scale=scale), qw, lin


@pytest.mark.parametrize("d_in,d_out", [(576, 96), (96, 40), (1536, 64), (64, 33)])
def test_qwha_layer_equals_dense_and_published_formula(d_in, d_out):
    layer, qw, lin = _layer(d_in, d_out, nnz=4 * (d_in + d_out))
    layer.spectrum.data = layer.spectrum.data.double()
    x = torch.randn(3, 5, d_in, dtype=torch.float64)
    y = layer(x)
    rows, cols = layer.indices
    f = torch.zeros(d_out, d_in, dtype=torch.float64).index_put((rows, cols), layer.spectrum.detach(), accumulate=True)
    m = hadamard_matrix(d_in, dtype=torch.float64)
    # the published QWHA layer: Delta W = iwht(dense(F)) * s / sqrt(d_out), iwht(F) = F @ M / d_in
    published = (f @ m / d_in) * layer.scale / math.sqrt(d_out)
    w = qw.dequantize(torch.float64)
    expected = x @ (w + published).T + lin.bias.detach().double()
    for got, ref in ((y, expected), (layer.delta_weight(), published)):
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err < 1e-12, f"relative error {err:.3e}"
    assert layer.coefficient == pytest.approx(adapter_coefficient(layer.scale, d_in, d_out))


def test_only_spectrum_trains():
    layer, _, _ = _layer(96, 40, nnz=300)
    layer = layer.float()
    x = torch.randn(4, 96)
    layer(x).pow(2).sum().backward()
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["spectrum"]
    assert layer.spectrum.grad is not None and layer.spectrum.grad.abs().sum() > 0


def test_quant_linear_state_dict_and_cache():
    lin = torch.nn.Linear(64, 8)
    qw = quantize_rtn(lin.weight, 3, 32)
    ql = QuantLinear.from_linear(lin, qw)
    assert set(ql.state_dict()) == {"codes", "scales", "zeros", "bias"}
    assert torch.equal(ql.weight, qw.dequantize())
    x = torch.randn(2, 64)
    torch.testing.assert_close(ql(x), x @ qw.dequantize().T + lin.bias.detach())
    assert ql.double().weight.dtype == torch.float64


@pytest.mark.parametrize(
    "bad,match", [("nan", "NaN"), ("row", "out of range for d_out"), ("col", "out of range for d_in")]
)
def test_bad_spectrum_rejected(bad, match):
    lin = torch.nn.Linear(64, 8)
    base = QuantLinear.from_linear(lin, quantize_rtn(lin.weight, 4, 32))
    rows, cols, vals = torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([1.0, 2.0])
    if bad == "nan":
        vals[1] = float("nan")
    elif bad == "row":
        rows[1] = 8
    else:
        cols[1] = 64
    with pytest.raises(ValueError, match=match):
        QWHALinear(base, vals, rows, cols)


def test_unsupported_d_in_rejected():
    lin = torch.nn.Linear(22, 4)
    with pytest.raises(ValueError, match="d_in=22"):
        QWHALinear(lin, torch.zeros(1), torch.tensor([0]), torch.tensor([0]))
