"""AdaAlloc budgets, top-k selection and the batched least-squares refinement."""

import pytest
import torch

from qwha_export.converters.calibration import InputRows
from qwha_export.converters.quantize import quantize_rtn
from qwha_export.converters.qwha_init import (
    InitConfig,
    TransformedGram,
    allocate_budget,
    init_layer,
    output_error,
    refine_values,
    refine_values_loop,
    transformed_gram,
)
from qwha_export.kernels import dense_delta, hadamard_matrix, hadamard_transform


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
    g_hat = transformed_gram(gram, 1e-4)
    e_hat = hadamard_transform(e @ g)
    coef = 1.0 / (192 * 96**0.5)
    vec = refine_values(res.rows, res.cols, e_hat, g_hat, coef)
    loop = refine_values_loop(res.rows, res.cols, e_hat, g_hat, coef)
    torch.testing.assert_close(vec, loop, rtol=1e-8, atol=1e-8)
    # optimality: perturbing the refined values increases the calibration output error
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


def _whole_layer_reference(w, w_deq, gram, held, config):
    """The init written with explicit dense matrices (``M`` = hadamard_matrix), every float64 matrix at once."""
    e = w.double() - w_deq.double()
    d_out, d_in = e.shape
    m = hadamard_matrix(d_in).double()
    g = 0.5 * (gram + gram.T) + config.damp_ratio * gram.diagonal().mean() * torch.eye(d_in, dtype=torch.float64)
    c = config.scale / (d_in * d_out**0.5)
    g_hat, e_hat = m @ g @ m.T, e @ g @ m.T
    if config.method == "adaalloc":
        budgets = allocate_budget(((e @ g) * e).sum(1).sqrt(), config.budget(d_out, d_in), d_in)
        importance = (e @ m.T / (d_in * c)).abs() * g_hat.diagonal().sqrt()
    else:
        budgets = allocate_budget(torch.ones(d_out, dtype=torch.float64), config.budget(d_out, d_in), d_in)
        importance = torch.rand(d_out, d_in, generator=torch.Generator().manual_seed(config.seed), dtype=torch.float64)
    order = torch.argsort(importance, dim=1, descending=True, stable=True)
    f = torch.zeros(d_out, d_in, dtype=torch.float64)
    for i in range(d_out):
        s = order[i, : budgets[i]].sort().values
        if config.method != "zeros":
            a = g_hat[s][:, s] + config.ridge * g_hat.diagonal().mean() * torch.eye(s.numel(), dtype=torch.float64)
            f[i, s] = torch.linalg.solve(a, e_hat[i, s]) / c
        else:
            f[i, s] = 1.0  # marks the support
    delta = c * f @ m if config.method != "zeros" else torch.zeros_like(e)

    def rel(x, gm):
        return float(((x @ gm) * x).sum().sqrt() / ((w.double() @ gm) * w.double()).sum().sqrt())

    report = {f"rel_err_{k}_{t}": rel(x, gm) for t, gm in (("calib", gram), ("heldout", held))
              for k, x in (("before", e), ("after", e - delta))}
    return f, budgets, report


@pytest.mark.parametrize("method", ["adaalloc", "random", "zeros"])
@pytest.mark.parametrize("d_out,d_in,bits", [(96, 192, 3), (50, 40, 4), (130, 576, 2), (33, 20, 4)])
@pytest.mark.parametrize("block_rows", [None, 7])
def test_streamed_init_equals_whole_layer_formulation(method, d_out, d_in, bits, block_rows):
    """Blocks of output channels in the transformed basis give the support, values and report of the one-shot
    dense formulation, for any block size (7 rows: a ragged last block) and Hadamard size (192 = 12·16, 40, 20)."""
    w, gram, held = _problem(d_out, d_in)
    w_deq = quantize_rtn(w, bits, -1).dequantize()
    config = InitConfig(rank=3, method=method, block_bytes=8 * d_in * block_rows if block_rows else 64 * 2**20)
    res = init_layer(w, w_deq, gram, config, eval_gram=held)
    f, budgets, report = _whole_layer_reference(w, w_deq, gram, held, config)
    assert torch.equal(res.budgets, budgets)
    got = torch.zeros(d_out, d_in, dtype=torch.float64)
    got[res.rows, res.cols] = res.values.double() if method != "zeros" else 1.0
    assert torch.equal(got != 0, f != 0), "support differs from the whole-layer selection"
    err = float((got - f).abs().max() / f.abs().max())
    assert err < 1e-5, f"values: max rel err {err:.2e}"
    for key, want in report.items():
        assert res.report[key] == pytest.approx(want, rel=1e-9, abs=1e-12), key


def _vm_kib(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def test_init_layer_memory_is_one_transformed_gram_plus_blocks():
    """Besides its inputs, init_layer holds G_hat and E G M^T in float64 plus a few blocks: for a 128 x 4096 layer
    (G_hat 128 MiB) the peak increment stays under 1.6 x G_hat; the one-shot formulation (G, its symmetrised and
    damped copies, G_hat and its transposed temporaries) took over 4x."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pytest.skip("needs /proc/self/clear_refs (Linux) to reset the peak-RSS mark")
    d_out, d_in = 128, 4096
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(d_out, d_in, generator=gen) * 0.02
    w_deq = quantize_rtn(w, 4, 64).dequantize()
    x = torch.randn(1024, d_in, generator=gen, dtype=torch.float64)
    gram, held = x.T @ x, x[:512].T @ x[:512]
    del x
    config = InitConfig(rank=8, block_bytes=4 * 2**20, max_solve_bytes=8 * 2**20)
    init_layer(w, w_deq, gram, config, eval_gram=held)  # warm-up: allocator pools, lazy imports
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    start = _vm_kib("VmRSS")
    init_layer(w, w_deq, gram, config, eval_gram=held)
    extra = (_vm_kib("VmHWM") - start) * 1024
    g_hat = 8 * d_in * d_in
    assert extra < 1.6 * g_hat, f"peak above the inputs {extra / 2**20:.0f} MiB, bound {1.6 * g_hat / 2**20:.0f} MiB"


def test_default_scale_is_an_exact_rescale_of_s1():
    """The default s (256, so that QWHA trains on LoRA's learning rates) divides the s = 1 values by a power of two:
    the same support, the same ``Delta W`` and the same init errors bit for bit."""
    from qwha_export.kernels import DEFAULT_SCALE

    assert DEFAULT_SCALE == 256.0 and InitConfig().scale == DEFAULT_SCALE
    w, gram, held = _problem()
    w_deq = quantize_rtn(w, 3, 64).dequantize()
    one = init_layer(w, w_deq, gram, InitConfig(rank=4, scale=1.0), eval_gram=held)
    default = init_layer(w, w_deq, gram, InitConfig(rank=4), eval_gram=held)
    assert torch.equal(one.rows, default.rows) and torch.equal(one.cols, default.cols)
    rescaled = default.values * DEFAULT_SCALE
    assert torch.equal(one.values, rescaled), (one.values - rescaled).abs().max()
    assert one.report == default.report
    assert one.values.abs().mean() > 100 * default.values.abs().mean()  # what the optimizer's step is measured against


@pytest.mark.parametrize("d_in", [192, 160])  # 12 * 2^4 and 20 * 2^3: two Hadamard orders
def test_transformed_gram_in_place_and_held_out_rows_give_the_same_init(d_in):
    """The memory-saving forms ``init`` uses give the same layer: a Gram transformed in place once
    (:class:`TransformedGram`, shared by q/k/v) instead of per layer, and held-out activations kept as rows
    (:class:`InputRows`) instead of their Gram: same support and values, reports equal to 1e-9."""
    w, gram, _ = _problem(d_in=d_in)
    g = torch.Generator().manual_seed(5)
    x_held = torch.randn(100, d_in, generator=g)  # fewer rows than 2 d_in: rows are smaller than the Gram
    held_gram = x_held.double().T @ x_held.double()
    rows = InputRows(100, d_in)
    rows.append(x_held[:60])
    rows.append(x_held[60:])
    qw = quantize_rtn(w, 3, 32)
    cfg = InitConfig(rank=8)
    ref = init_layer(w, qw.dequantize(), gram, cfg, eval_gram=held_gram)
    owned = gram.clone()
    tg = TransformedGram.of(owned, cfg, inplace=True)
    assert tg.g_hat.data_ptr() == owned.data_ptr()  # no second n x n buffer
    torch.testing.assert_close(tg.g_hat, transformed_gram(gram, cfg.damp_ratio), rtol=0, atol=0)
    got = init_layer(w, qw.dequantize(), tg, cfg, eval_gram=rows)
    assert torch.equal(got.rows, ref.rows) and torch.equal(got.cols, ref.cols)
    torch.testing.assert_close(got.values, ref.values, rtol=1e-6, atol=1e-7)
    for key, value in ref.report.items():
        assert abs(got.report[key] - value) <= 1e-9 * max(abs(value), 1e-12), (key, got.report[key], value)
    with pytest.raises(ValueError, match="contiguous float64"):
        transformed_gram(gram.float(), 1e-4, inplace=True)
