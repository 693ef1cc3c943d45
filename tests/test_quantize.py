"""Tests for qwha_export.converters.quantize (RTN and GPTQ weight quantizers)."""

from __future__ import annotations

import pytest
import torch

from qwha_export.converters.quant_methods import Quantizer
from qwha_export.converters.quantize import (
    QuantConfig,
    QuantizedWeight,
    quantization_error,
    quantize_gptq,
    quantize_rtn,
)
from qwha_export.converters.quantizers import quantize_weight

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, -1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(d_out: int, d_in: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = _gen(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * 0.02
    # a few outliers and a shifted row, so groups are not all symmetric around 0
    w[0, 3] = 0.3
    w[1] += 0.05
    return w.to(dtype)


def _activations(n: int, d_in: int, seed: int = 1) -> torch.Tensor:
    """Correlated activations X = Z @ A (float64) with a random mixing matrix and uneven channel scales."""
    g = _gen(seed)
    z = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    a = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    a += 0.5 * torch.eye(d_in, dtype=torch.float64)
    chan = torch.exp(torch.randn(d_in, generator=g, dtype=torch.float64))
    return (z @ a) * chan


def _manual_dequant(qw: QuantizedWeight, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    d_in = qw.shape[1]
    g = g_idx.long() if g_idx is not None else torch.arange(d_in) // qw.group_size
    return (qw.codes.float() - qw.zeros.float()[:, g]) * qw.scales.float()[:, g]


def _output_error(w: torch.Tensor, qw: QuantizedWeight, x: torch.Tensor) -> float:
    return float((quantization_error(w, qw) @ x.T).norm())


# ----------------------------------------------------------------------------------------------------------------------
# config validation
# ----------------------------------------------------------------------------------------------------------------------


def test_config_defaults_and_method_normalised():
    cfg = QuantConfig()
    assert (cfg.bits, cfg.group_size, cfg.method) == (4, 64, Quantizer.RTN)
    assert QuantConfig(method="GPTQ").method is Quantizer.GPTQ
    assert QuantConfig(method=Quantizer.GPTQ).method is Quantizer.GPTQ
    assert cfg.damp == 0.01 and cfg.act_order is False and cfg.static_groups is False and cfg.block_size == 128


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"bits": 5}, "5"),
        ({"bits": 1}, "1"),
        ({"bits": 4.0}, "4.0"),
        ({"group_size": 48}, "48"),
        ({"group_size": 0}, "0"),
        ({"method": "awq"}, "awq"),
        ({"damp": -0.5}, "-0.5"),
        ({"block_size": 0}, "0"),
    ],
)
def test_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(ValueError) as exc:
        QuantConfig(**kwargs)
    assert f"={needle}" in str(exc.value).replace("'", "")


def test_rtn_rejects_bad_args():
    w = _weight(4, 96)
    with pytest.raises(ValueError, match="bits=5"):
        quantize_rtn(w, 5, 32)
    with pytest.raises(ValueError, match="group_size=48"):
        quantize_rtn(w, 4, 48)
    with pytest.raises(ValueError, match="2-D"):
        quantize_rtn(torch.zeros(4, 4, 32), 4, 32)
    bad = w.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rtn(bad, 4, 32)


def test_gptq_needs_hessian():
    w = _weight(4, 64)
    with pytest.raises(ValueError, match="gptq"):
        quantize_weight(w, QuantConfig(method="gptq"))
    with pytest.raises(ValueError, match=r"\(64, 64\)"):
        quantize_gptq(w, torch.eye(32), QuantConfig(method="gptq"))


# ----------------------------------------------------------------------------------------------------------------------
# RTN
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_rtn_properties(bits, group_size):
    d_out, d_in = 24, 256
    w = _weight(d_out, d_in, seed=bits * 1000 + group_size)
    qw = quantize_rtn(w, bits, group_size)
    maxq = 2**bits - 1
    gs = d_in if group_size == -1 else group_size
    n_groups = d_in // gs

    assert qw.shape == (d_out, d_in) and qw.bits == bits and qw.group_size == gs and qw.g_idx is None
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == (d_out, d_in)
    assert qw.scales.dtype == torch.float16 and qw.scales.shape == (d_out, n_groups)
    assert qw.zeros.dtype == torch.uint8 and qw.zeros.shape == (d_out, n_groups)
    assert int(qw.codes.max()) <= maxq and int(qw.zeros.max()) <= maxq
    assert bool((qw.scales.float() > 0).all()) and bool(torch.isfinite(qw.scales).all())
    assert torch.equal(qw.group_index(), torch.arange(d_in) // gs)

    # elementwise error bound: |W - W_deq| <= scale / 2
    err = quantization_error(w, qw).abs()
    bound = qw.scales.double()[:, qw.group_index()] / 2
    assert bool((err <= bound * (1 + 1e-12) + 1e-12).all()), float((err - bound).max())

    # dequantize is bit-equal to the documented formula, and the float64 result is the same numbers
    deq = qw.dequantize()
    assert deq.dtype == torch.float32
    assert torch.equal(deq, _manual_dequant(qw))
    assert torch.equal(qw.dequantize(torch.float64), deq.double())

    # deterministic
    qw2 = quantize_rtn(w, bits, group_size)
    for a, b in ((qw.codes, qw2.codes), (qw.scales, qw2.scales), (qw.zeros, qw2.zeros)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", (32, 128, -1))
def test_rtn_exact_on_grid(bits, group_size):
    d_out, d_in = 8, 128
    gs = d_in if group_size == -1 else group_size
    n_groups = d_in // gs
    maxq = 2**bits - 1
    g = _gen(bits + gs)
    scales = (torch.rand(d_out, n_groups, generator=g, dtype=torch.float64) * 0.01 + 1e-3).half()
    zeros = torch.randint(0, maxq + 1, (d_out, n_groups), generator=g).to(torch.uint8)
    codes = torch.randint(0, maxq + 1, (d_out, d_in), generator=g).to(torch.uint8)
    codes[:, ::gs] = 0  # every group spans the full grid, so min/max recover exactly this grid
    codes[:, 1::gs] = maxq
    ref = QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=gs)
    w = ref.dequantize(torch.float64)

    qw = quantize_rtn(w, bits, group_size)
    assert torch.equal(qw.dequantize(torch.float64), w)
    assert torch.equal(qw.codes, codes) and torch.equal(qw.zeros, zeros) and torch.equal(qw.scales, scales)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_rtn_input_dtypes_and_no_inplace(dtype):
    w = _weight(16, 128, dtype=dtype)
    before = w.clone()
    qw = quantize_rtn(w, 4, 64)
    assert torch.equal(w, before)
    ref = quantize_rtn(w.double(), 4, 64)
    assert torch.equal(qw.codes, ref.codes) and torch.equal(qw.scales, ref.scales)
    assert quantization_error(w, qw).dtype == torch.float64


def test_rtn_edge_groups():
    w = torch.zeros(3, 64, dtype=torch.float64)
    w[1] = 1e-7 * torch.arange(64)  # tiny range: scale clamps to the fp16 min normal
    w[2] = -torch.linspace(1, 2, 64)  # all negative: 0 still on the grid
    for bits in BITS:
        qw = quantize_rtn(w, bits, 32)
        deq = qw.dequantize(torch.float64)
        assert torch.equal(deq[0], torch.zeros(64, dtype=torch.float64))  # all-zero group is exact
        assert float(qw.scales[0].min()) == 1.0
        assert float(qw.scales[1].min()) >= 2.0**-14
        bound = qw.scales.double()[:, qw.group_index()] / 2
        assert bool(((w - deq).abs() <= bound).all())
        assert bool((qw.zeros[2] == 2**bits - 1).all())


def test_dequantize_dtypes_single_rounding():
    """fp16 result == exact float32 value rounded once, == computing (q - z) * s directly in float16."""
    qw = quantize_rtn(_weight(32, 128, seed=7), 8, 32)
    deq32 = qw.dequantize()
    assert torch.equal(qw.dequantize(torch.float16), deq32.half())
    assert torch.equal(qw.dequantize(torch.bfloat16), deq32.bfloat16())
    g = qw.group_index()
    direct16 = (qw.codes.half() - qw.zeros.half()[:, g]) * qw.scales[:, g]
    assert torch.equal(direct16, deq32.half())


def test_dict_roundtrip_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    w = _weight(16, 128)
    x = _activations(256, 128)
    qw = quantize_gptq(w, x.T @ x, QuantConfig(method="gptq", act_order=True))
    assert qw.g_idx is not None
    for prefix in ("", "model.layers.0.q_proj."):
        path = tmp_path / f"q{len(prefix)}.safetensors"
        d = qw.to_dict(prefix)
        assert set(d) == {prefix + k for k in ("codes", "scales", "zeros", "g_idx", "bits", "group_size")}
        save_file(d, str(path))
        back = QuantizedWeight.from_dict(load_file(str(path)), prefix)
        assert (back.bits, back.group_size) == (qw.bits, qw.group_size)
        assert torch.equal(back.g_idx, qw.g_idx) and back.g_idx.dtype == torch.int32
        assert torch.equal(back.dequantize(), qw.dequantize())
    rtn = quantize_rtn(w, 3, -1)
    d = rtn.to_dict()
    assert "g_idx" not in d
    d.pop("bits")
    back = QuantizedWeight.from_dict(d, bits=3)
    assert back.group_size == 128 and torch.equal(back.dequantize(), rtn.dequantize())


def test_quantized_weight_validates():
    qw = quantize_rtn(_weight(4, 64), 4, 32)
    with pytest.raises(ValueError, match="scales"):
        QuantizedWeight(qw.codes, qw.scales.float(), qw.zeros, 4, 32)
    with pytest.raises(ValueError, match=r"scales must be float16 of shape \(4, 4\)"):
        QuantizedWeight(qw.codes, qw.scales, qw.zeros, 4, 16)  # 4 groups of 16, but 2 scales per row
    with pytest.raises(ValueError, match="group_size=0"):
        QuantizedWeight(qw.codes, qw.scales, qw.zeros, 4, 0)
    with pytest.raises(ValueError, match="g_idx"):
        QuantizedWeight(qw.codes, qw.scales, qw.zeros, 4, 32, g_idx=torch.full((64,), 2))


# ----------------------------------------------------------------------------------------------------------------------
# GPTQ
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_rtn_ragged_last_group(bits):
    """576 columns at group size 128: four groups of 128 and one of 64, each quantized as if on its own."""
    w = _weight(24, 576, seed=7)
    qw = quantize_rtn(w, bits, 128)
    assert qw.n_groups == 5 and qw.group_size == 128
    assert torch.equal(qw.group_index(), torch.arange(576) // 128)
    last = quantize_rtn(w[:, 512:], bits, 64)  # the ragged group alone
    assert torch.equal(qw.codes[:, 512:], last.codes)
    assert torch.equal(qw.scales[:, 4:], last.scales) and torch.equal(qw.zeros[:, 4:], last.zeros)
    head = quantize_rtn(w[:, :512], bits, 128)
    assert torch.equal(qw.codes[:, :512], head.codes) and torch.equal(qw.scales[:, :4], head.scales)
    err = (w.double() - qw.dequantize().double()).abs()
    assert bool((err <= qw.scales.double()[:, qw.group_index()] / 2 + 1e-12).all())


@pytest.mark.parametrize("variant", [{}, {"act_order": True}, {"static_groups": True}])
def test_gptq_ragged_last_group(variant):
    """GPTQ with a group size that does not divide d_in: valid grids, a lower output error than RTN."""
    w, x = _weight(32, 320, seed=8, dtype=torch.float64), _activations(1024, 320, seed=9)
    qw = quantize_gptq(w, x.T @ x, QuantConfig(bits=4, group_size=128, method="gptq", **variant))
    assert qw.n_groups == 3
    counts = torch.bincount(qw.group_index(), minlength=3)
    assert counts.tolist() == [128, 128, 64]
    rtn = quantize_rtn(w, 4, 128)
    e_gptq = (x @ (w - qw.dequantize(torch.float64)).T).norm()
    e_rtn = (x @ (w - rtn.dequantize(torch.float64)).T).norm()
    assert e_gptq < 0.8 * e_rtn, (float(e_gptq), float(e_rtn))


@pytest.fixture(scope="module")
def problem():
    d_out, d_in = 48, 256
    w = _weight(d_out, d_in, seed=3)
    x = _activations(1024, d_in, seed=4)
    return w, x, x.T @ x


@pytest.mark.parametrize("bits", (4, 3))
@pytest.mark.parametrize(
    "variant",
    [{}, {"act_order": True}, {"static_groups": True}, {"act_order": True, "static_groups": True}, {"block_size": 48}],
)
def test_gptq_beats_rtn(problem, bits, variant):
    w, x, h = problem
    gs = 64
    cfg = QuantConfig(bits=bits, group_size=gs, method="gptq", **variant)
    before_w, before_h = w.clone(), h.clone()
    qw = quantize_weight(w, cfg, h)
    assert torch.equal(w, before_w) and torch.equal(h, before_h)
    maxq = 2**bits - 1
    assert int(qw.codes.max()) <= maxq and int(qw.zeros.max()) <= maxq
    assert qw.scales.dtype == torch.float16 and qw.codes.dtype == torch.uint8

    e_gptq = _output_error(w, qw, x)
    e_rtn = _output_error(w, quantize_rtn(w, bits, gs), x)
    assert e_gptq < 0.85 * e_rtn, (e_gptq, e_rtn)

    # g_idx: present exactly for act_order without static groups; dequantize follows it
    if cfg.act_order and not cfg.static_groups:
        assert qw.g_idx is not None and qw.g_idx.dtype == torch.int32
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        invperm = torch.argsort(perm)
        assert torch.equal(qw.g_idx.long(), invperm // gs)
        assert torch.equal(torch.bincount(qw.g_idx.long()), torch.full((w.shape[1] // gs,), gs))
    else:
        assert qw.g_idx is None
    assert torch.equal(qw.dequantize(), _manual_dequant(qw, qw.g_idx))

    # static groups: every grid comes from the unquantized weight, i.e. equals RTN's grid
    if cfg.static_groups:
        rtn = quantize_rtn(w, bits, gs)
        assert torch.equal(qw.scales, rtn.scales) and torch.equal(qw.zeros, rtn.zeros)

    qw2 = quantize_weight(w, cfg, h)
    assert torch.equal(qw.codes, qw2.codes) and torch.equal(qw.scales, qw2.scales) and torch.equal(qw.zeros, qw2.zeros)


@pytest.mark.parametrize("bits", (4, 3))
def test_gptq_per_channel_beats_rtn(problem, bits):
    w, x, h = problem
    qw = quantize_gptq(w, h, QuantConfig(bits=bits, group_size=-1, method="gptq", act_order=True))
    rtn = quantize_rtn(w, bits, -1)
    assert qw.group_size == w.shape[1] and qw.g_idx is None
    assert torch.equal(qw.scales, rtn.scales) and torch.equal(qw.zeros, rtn.zeros)
    assert _output_error(w, qw, x) < 0.85 * _output_error(w, rtn, x)


def test_gptq_act_order_equals_permuted_problem(problem):
    """act_order == plain GPTQ on the column-permuted problem, mapped back to the original column order."""
    w, _, h = problem
    gs = 64
    qa = quantize_gptq(w, h, QuantConfig(method="gptq", group_size=gs, act_order=True))
    perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    invperm = torch.argsort(perm)
    qp = quantize_gptq(w[:, perm], h[perm][:, perm], QuantConfig(method="gptq", group_size=gs))
    assert torch.equal(qa.codes, qp.codes[:, invperm])
    assert torch.equal(qa.scales, qp.scales) and torch.equal(qa.zeros, qp.zeros)
    assert torch.equal(qa.dequantize(), qp.dequantize()[:, invperm])


@pytest.mark.parametrize("group_size", (32, -1))
def test_gptq_diagonal_hessian_is_rtn(group_size):
    w = _weight(16, 128, seed=5)
    h = torch.diag(torch.rand(128, generator=_gen(6), dtype=torch.float64) + 0.5)
    qg = quantize_gptq(w, h, QuantConfig(method="gptq", group_size=group_size, bits=3))
    qr = quantize_rtn(w, 3, group_size)
    assert torch.equal(qg.codes, qr.codes) and torch.equal(qg.scales, qr.scales) and torch.equal(qg.zeros, qr.zeros)


def test_gptq_dead_columns_and_input_dtypes(problem):
    w, x, h = problem
    h = h.clone()
    dead = torch.tensor([0, 5, 77, 200])
    h[dead, :] = 0
    h[:, dead] = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        wd = w.to(dtype)
        for act_order in (False, True):
            qw = quantize_gptq(wd, h.float(), QuantConfig(method="gptq", act_order=act_order))
            deq = qw.dequantize()
            assert torch.equal(deq[:, dead], torch.zeros(w.shape[0], len(dead)))
            assert bool(torch.isfinite(deq).all())


def test_gptq_singular_hessian_without_damping_retries():
    w = _weight(8, 64)
    h = torch.ones(64, 64, dtype=torch.float64)  # rank 1: Cholesky hits an exactly zero pivot
    with pytest.warns(RuntimeWarning, match="damp"):
        qw = quantize_gptq(w, h, QuantConfig(method="gptq", damp=0.0))
    assert bool(torch.isfinite(qw.dequantize()).all())


@pytest.mark.parametrize("act_order", (False, True))
def test_gptq_block_size_invariant(problem, act_order):
    """Lazy batching is only a reordering of the same updates, and group grids see all pending updates, so the
    result does not depend on block_size (up to float64 rounding: allow a handful of flipped codes)."""
    w, _, h = problem
    ref = quantize_gptq(w, h, QuantConfig(method="gptq", block_size=1, act_order=act_order))
    for bs in (7, 48, 128):
        q = quantize_gptq(w, h, QuantConfig(method="gptq", block_size=bs, act_order=act_order))
        assert int((q.codes != ref.codes).sum()) <= q.codes.numel() // 1000
        assert int((q.scales != ref.scales).sum()) <= q.scales.numel() // 100


@pytest.mark.parametrize(
    "layers,want",
    [
        ([(128, 576), (128, 1536)], 128),  # ragged 576 and whole 1536: one config value
        ([(128, 576), (128, 128)], 128),  # a layer exactly one group wide stays 128, not per-channel
        ([(576, 576), (1536, 1536)], -1),  # per channel everywhere
        ([(576, 576), (128, 128)], -1),  # per channel, one layer happening to be 128 wide
        ([(128, 64), (128, 256)], 128),  # a layer narrower than its group: one short group
        ([(64, 576), (128, 576)], None),  # mixed group sizes
        ([], None),
    ],
)
def test_config_group_size(layers, want):
    from qwha_export.converters.quantize import config_group_size

    assert config_group_size(layers) == want


def test_has_ragged_group():
    from qwha_export.converters.quantize import has_ragged_group

    assert has_ragged_group([(128, 576), (128, 1536)])
    assert not has_ragged_group([(64, 576), (64, 1536), (576, 576)])
    assert not has_ragged_group([])
