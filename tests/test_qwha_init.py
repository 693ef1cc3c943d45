"""AdaAlloc budgets, top-k selection and the batched least-squares refinement."""

import pytest
import torch

from qwha_export.converters.quantize import quantize_rtn
from qwha_export.converters.qwha_init import (
    InitConfig,
    _transformed_gram,
    allocate_budget,
    init_layer,
    output_error,
    refine_values,
    refine_values_loop,
)
from qwha_export.kernels import hadamard_transform


def _problem(d_out=96, d_in=192, n=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * 0.05
    w[: d_out // 4] *= 4  # some channels with larger error
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) / d_in**0.5 + torch.eye(d_in, dtype=torch.float64)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mix
    xh = torch.randn(n // 2, d_in, generator=g, dtype=torch.float64) @ mix
    return w.float(), x.T @ x, xh.T @ xh


@pytest.mark.parametrize("total,d_in", [(1000, 64), (96 * 64, 64), (150, 64), (97, 5)])
def test_allocate_budget_properties(total, d_in):
    norms = torch.rand(96, generator=torch.Generator().manual_seed(1)) ** 3
    p = allocate_budget(norms, total, d_in)
    assert int(p.sum()) == min(total, 96 * d_in)
    assert int(p.min()) >= 1 and int(p.max()) <= d_in
    if total < 96 * d_in:
        # proportionality up to the floor/leftover rounding: larger norm never gets 2+ fewer than a smaller norm
        order = torch.argsort(norms)
        assert torch.all(p[order][1:] >= p[order][:-1] - 1)


def test_allocate_budget_rejects_too_small():
    with pytest.raises(ValueError, match="smaller than the number of output channels"):
        allocate_budget(torch.ones(10), 5, 4)


def test_refinement_vectorised_equals_loop_and_is_optimal():
    w, gram, _ = _problem()
    qw = quantize_rtn(w, 3, 64)
    e = w.double() - qw.dequantize(torch.float64)
    g = gram + 1e-4 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    res = init_layer(w, qw.dequantize(), gram, InitConfig(rank=4))
    g_hat = _transformed_gram(g)
    e_hat = hadamard_transform(e @ g)
    coef = 1.0 / (192 * 96**0.5)
    vec = refine_values(res.rows, res.cols, e_hat, g_hat, coef)
    loop = refine_values_loop(res.rows, res.cols, e_hat, g_hat, coef)
    torch.testing.assert_close(vec, loop, rtol=1e-8, atol=1e-8)
    # optimality: perturbing the refined values increases the calibration output error
    from qwha_export.kernels import dense_delta

    base = output_error(e - dense_delta(vec, res.rows, res.cols, 96, 192, coef), g)
    pert = vec + 1e-2 * vec.abs().mean() * torch.randn_like(vec)
    assert output_error(e - dense_delta(pert, res.rows, res.cols, 96, 192, coef), g) > base


@pytest.mark.parametrize("bits", [2, 4])
def test_qwha_init_beats_random_beats_nothing(bits):
    w, gram, held = _problem()
    qw = quantize_rtn(w, bits, 64)
    reports = {
        m: init_layer(w, qw.dequantize(), gram, InitConfig(rank=8, method=m), eval_gram=held).report
        for m in ("adaalloc", "random", "zeros")
    }
    q, r, z = reports["adaalloc"], reports["random"], reports["zeros"]
    assert z["rel_err_after_heldout"] == pytest.approx(z["rel_err_before_heldout"])
    assert q["rel_err_after_heldout"] < r["rel_err_after_heldout"] < r["rel_err_before_heldout"]
    assert q["budget"] == r["budget"] == 8 * (96 + 192)


def test_full_budget_recovers_weight_exactly():
    """With p = d_out * d_in every coefficient is selected and the refinement reproduces E exactly."""
    w, gram, held = _problem(d_out=8, d_in=24)
    qw = quantize_rtn(w, 2, -1)
    res = init_layer(w, qw.dequantize(), gram, InitConfig(rank=100, ridge=0.0), eval_gram=held)
    assert res.report["budget"] == 8 * 24
    assert res.report["rel_err_after_calib"] < 1e-9


def test_init_config_validation():
    with pytest.raises(ValueError, match="rank"):
        InitConfig(rank=0)
    with pytest.raises(ValueError, match="'bogus'"):
        InitConfig(method="bogus")
