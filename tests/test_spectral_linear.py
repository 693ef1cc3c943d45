"""The fused QWHA layer product in both forms (activation side, dense Delta W) against the float64 reference."""

import pytest
import torch

from qwha_export.converters.quantize import quantize_rtn
from qwha_export.kernels import SpectralLayout, choose_form, spectral_linear, spectral_linear_reference
from qwha_export.layer import QWHALinear
from qwha_export.quant_linear import QuantLinear


def _problem(d_in, d_out, nnz, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randperm(d_out * d_in, generator=g)[:nnz]
    rows, cols = pos // d_in, pos % d_in
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * 0.05
    b = torch.randn(d_out, generator=g, dtype=torch.float64)
    x = torch.randn(2, 5, d_in, generator=g, dtype=torch.float64)
    v = torch.randn(nnz, generator=g, dtype=torch.float64)
    return rows, cols, w.to(dtype), b.to(dtype), x.to(dtype), v.to(dtype)


def _rel(got, ref):
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("form", ["activation", "dense"])
@pytest.mark.parametrize("d_in,d_out,nnz", [(576, 100, 900), (96, 7, 200), (40, 3, 60), (1536, 64, 3000)])
def test_both_forms_match_the_reference(form, d_in, d_out, nnz):
    rows, cols, w, b, x, v = _problem(d_in, d_out, nnz, torch.float64)
    layout = SpectralLayout.build(rows, cols, d_out, d_in)
    x.requires_grad_(True)
    v.requires_grad_(True)
    y = spectral_linear(x, w, b, v, layout, 0.3, form=form)
    ref = spectral_linear_reference(x, w, b, v, rows, cols, 0.3)
    dy = torch.randn_like(ref)
    gx, gv = torch.autograd.grad(y, (x, v), dy)
    rx, rv = torch.autograd.grad(ref, (x, v), dy)
    for what, got, want in (("y", y, ref), ("dx", gx, rx), ("dvalues", gv, rv)):
        err = _rel(got, want)
        assert err < 1e-12, f"{form} {what}: float64 relative error {err:.2e} (bound 1e-12)"

    # float32: within 2x the same-dtype dense torch reference's own error, plus a small floor
    rows, cols, w32, b32, x32, v32 = _problem(d_in, d_out, nnz, torch.float32)
    ref64 = spectral_linear_reference(x32.double(), w32.double(), b32.double(), v32.double(), rows, cols, 0.3)
    got = spectral_linear(x32, w32, b32, v32, layout, 0.3, form=form)
    ref32 = spectral_linear_reference(x32, w32, b32, v32, rows, cols, 0.3)
    err, ref_err = _rel(got, ref64), _rel(ref32, ref64)
    assert got.dtype == torch.float32
    bound = 2 * ref_err + 1e-6
    assert err <= bound, f"{form}: error {err:.2e}, reference error {ref_err:.2e}, bound {bound:.2e}"


def test_choose_form_follows_the_cost_model():
    # sparse spectrum, few tokens: activation side; dense-ish spectrum (rank-64 budget on a 576-wide layer): dense
    assert choose_form(512, 4096, 4096, 64 * 8192) == "activation"
    assert choose_form(8192, 576, 576, 64 * 1152) == "dense"
    assert choose_form(8192, 576, 576, 64 * 1152, device="cuda") == "activation"  # Triton kernels on CUDA
    with pytest.raises(ValueError, match="form must be one of"):
        rows, cols, w, b, x, v = _problem(40, 3, 10, torch.float64)
        spectral_linear(x, w, b, v, SpectralLayout.build(rows, cols, 3, 40), form="fast")


def test_qwha_layer_auto_form_equals_forced_forms():
    g = torch.Generator().manual_seed(4)
    base = QuantLinear(quantize_rtn(torch.randn(96, 576, generator=g) * 0.05, 4, 64))
    pos = torch.randperm(96 * 576, generator=g)[:20000]  # dense enough that big batches take the dense form
    v = torch.randn(pos.numel(), generator=g) * 0.1
    layers = {f: QWHALinear(base, v, pos // 576, pos % 576, scale=2.0, form=f) for f in ("auto", "activation", "dense")}
    for tokens in (3, 4096):
        assert choose_form(tokens, 576, 96, pos.numel()) == ("activation" if tokens == 3 else "dense")
        x = torch.randn(tokens, 576, generator=g)
        ys = {f: m(x) for f, m in layers.items()}
        assert _rel(ys["activation"], ys["dense"]) < 1e-5
        assert torch.equal(ys["auto"], ys["activation" if tokens == 3 else "dense"])
