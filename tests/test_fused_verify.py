"""Fused-adapter export (``qwha_export.fused``) and ``verify_export`` on a tiny hand-built adapter directory."""

from __future__ import annotations

import json

import pytest
import torch
from dense_reference import check_logits, logits, reference_model, reference_weights, rtn_reference
from safetensors.torch import load_file
from tiny_adapter import ADAPTED, BITS, GS, build_adapter_dir

from qwha_export.converters import merge as M
from qwha_export.converters.quantize import QuantizedWeight
from qwha_export.formats import WRITERS, ExportFormat
from qwha_export.formats.fused import FUSED_ADAPTER_NAME, FUSED_CONFIG_NAME, read_fused_config
from qwha_export.fused import load_fused, load_quantized_checkpoint, write_fused
from qwha_export.verify import detect_format, load_reference, verify_export


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """RTN base, random spectra, one per-layer scale override (see tests/tiny_adapter.py)."""
    return build_adapter_dir(tmp_path_factory.mktemp("fused"))


@pytest.fixture(scope="module")
def chunks():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fused_dir(adapter_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused_out") / "fused"
    report = write_fused(adapter_dir[0], out)
    return out, report


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fused_layout_and_base_bit_identical(adapter_dir, fused_dir):
    adir, _, quantized = adapter_dir
    out, report = fused_dir
    assert report["settings"]["format"] == "fused" and report["settings"]["base_format"] == "gptq_v2"
    cfg = read_fused_config(out)
    assert cfg["format_version"] == 1 and cfg["base_format"] == "gptq_v2"
    sp = M.read_adapter_spectra(adir)
    assert sorted(cfg["layers"]) == sorted(sp)
    first = sorted(sp)[0]
    assert cfg["layers"][first]["scale"] == 3.0 and cfg["layers"][first]["nnz"] == sp[first][0].numel()
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["checkpoint_format"] == "gptq_v2" and qcfg["bits"] == BITS and qcfg["group_size"] == GS

    adapter = load_file(str(out / FUSED_ADAPTER_NAME))
    for layer, (values, rows, cols, _) in sp.items():
        assert adapter[f"{layer}.qwha_values"].dtype == torch.float32
        idx = adapter[f"{layer}.qwha_indices"]
        assert idx.dtype == torch.int32 and idx.shape == (2, values.numel())
        assert torch.equal(adapter[f"{layer}.qwha_values"], values)
        assert torch.equal(idx[0].long(), rows) and torch.equal(idx[1].long(), cols)

    base_q = load_file(str(adir / "quantized_base.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    for name in quantized:
        want = QuantizedWeight.from_dict(base_q, prefix=f"{name}.")
        back = WRITERS[ExportFormat.GPTQ_V2].read_layer(got, name, BITS, GS)
        for attr in ("codes", "scales", "zeros"):
            assert torch.equal(getattr(back, attr), getattr(want, attr)), (name, attr)
    base = load_file(str(adapter_dir[1] / "model.safetensors"))
    for k, v in base.items():
        if k.removesuffix(".weight") not in quantized:
            assert torch.equal(got[k], v), k


def test_load_fused_matches_training_model(adapter_dir, fused_dir, chunks):
    from qwha_export.layer import QWHALinear

    out, _ = fused_dir
    model, tok = load_fused(out)
    assert tok is None  # the tiny base has no tokenizer
    assert sum(isinstance(m, QWHALinear) for m in model.modules()) == len(M.read_adapter_spectra(adapter_dir[0]))
    ref, _ = load_reference(adapter_dir[0])
    a, b = _logits(model, chunks), _logits(ref, chunks)
    rel = float((a - b).double().norm() / b.double().norm())
    assert torch.equal(a, b) or rel <= 1e-6, rel


@pytest.mark.parametrize("source", ["hand-built", "flow"])
def test_fused_matches_independent_float64_reference(source, adapter_dir, fused_dir, chunks, request):
    """``load_fused`` logits against a model whose linear weights are ``W_deq + ΔW`` rebuilt in float64 from the
    adapter files by tests/dense_reference.py (no qwha_export reader or kernel): error <= 2x that of the same
    reference model run in float32 + 1e-6. Sources: ``write_fused`` of the hand-built adapter (a per-layer scale
    override) and the folder ``qwha-export fuse`` wrote from a trained adapter."""
    if source == "flow":
        flow = request.getfixturevalue("flow")
        adir, out = flow["trained"], flow["fused"]
    else:
        adir, out = adapter_dir[0], fused_dir[0]
    check_logits("fused logits", logits(load_fused(out)[0], chunks), adir, chunks)


def test_fused_dense_base_and_errors(adapter_dir, tmp_path, chunks):
    out = tmp_path / "fd"
    write_fused(adapter_dir[0], out, base_format="dense")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model, _ = load_fused(out)
    ref, _ = load_reference(adapter_dir[0])
    a, b = _logits(model, chunks).double(), _logits(ref, chunks).double()
    assert float((a - b).norm() / b.norm()) < 1e-5
    with pytest.raises(ValueError, match="already exists"):
        write_fused(adapter_dir[0], out)
    with pytest.raises(ValueError, match="not supported"):
        write_fused(adapter_dir[0], tmp_path / "x", base_format="gptq")
    assert not (tmp_path / "x").exists()
    cfg = json.loads((out / FUSED_CONFIG_NAME).read_text())
    cfg["format_version"] = 99
    (out / FUSED_CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version"):
        load_fused(out)


def test_verify_dense_merge(adapter_dir, tmp_path, chunks):
    out = tmp_path / "dense"
    M.stream_merge(adapter_dir[0], out, bits=16, group_size=None, requant="rtn", fmt="dense", dtype=torch.float32)
    assert detect_format(out) == ExportFormat.DENSE
    r = verify_export(out, adapter_dir[0], chunks=chunks, batch_size=2)
    assert r["format"] == "dense" and r["tokens"] == chunks.numel()
    assert r["top1_agreement"] >= 0.999 and r["kl_per_token"] < 1e-8
    assert r["ppl_export"] == pytest.approx(r["ppl_reference"], rel=1e-5)


def test_verify_fused(adapter_dir, fused_dir, chunks):
    r = verify_export(fused_dir[0], adapter_dir[0], chunks=chunks)
    assert r["format"] == "fused" and r["max_abs_logit_diff"] <= 1e-4 and r["top1_agreement"] == 1.0


def _kl_top1(ref: torch.Tensor, test: torch.Tensor) -> tuple[float, float]:
    """Mean KL(softmax(ref) || softmax(test)) per token and top-1 agreement, float64."""
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(test.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    return float(kl), float((ref.argmax(-1) == test.argmax(-1)).double().mean())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("fmt", ["gptq_v2", "compressed-tensors"])
def test_verify_requantized_merge(adapter_dir, tmp_path, chunks, fmt, bits):
    """The loaded checkpoint holds the RTN re-quantization of ``W_deq + ΔW`` as tests/dense_reference.py rebuilds
    both from the adapter files (scales, zeros and codes equal; every weight within half its step of the merged
    one); verify's KL / top-1 / max |Δlogit| are those of that reference model against the float64 training-time
    reference; at 8 bits the export is >= 20x closer (KL) to the training-time model than the quantized base
    without the adapter."""
    from qwha_export.quant_linear import QuantLinear

    adir, _, quantized = adapter_dir
    out = tmp_path / fmt
    M.stream_merge(adir, out, bits=bits, group_size=GS, requant="rtn", fmt=fmt, dtype=torch.float32)
    assert detect_format(out) == ExportFormat.parse(fmt)
    model = load_quantized_checkpoint(out, fmt)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert sorted(layers) == sorted(quantized)
    ref = reference_weights(adir)
    requantized = {}
    for name, w in ref.items():
        if name.rsplit(".", 1)[-1] in ADAPTED or bits != BITS:
            codes, scales, zeros = rtn_reference(w, bits, GS)
        else:  # a layer without adapter at the base's own grid is written as it is
            base = quantized[name]
            codes, scales, zeros = base.codes.double(), base.scales.double(), base.zeros.double()
        got = layers[name].qweight
        for attr, want in (("scales", scales), ("zeros", zeros), ("codes", codes)):
            assert torch.equal(getattr(got, attr).double(), want), (name, attr)
        step = scales.repeat_interleave(GS, 1)
        requantized[name] = (codes - zeros.repeat_interleave(GS, 1)) * step
        assert bool(((requantized[name] - w).abs() <= step / 2 + 1e-12).all()), name

    r = verify_export(out, adir, chunks=chunks)
    assert r["format"] == fmt and r["tokens"] == chunks.numel()
    train = logits(reference_model(adir, ref, torch.float64), chunks)
    want = logits(reference_model(adir, requantized, torch.float64), chunks)
    kl, top1 = _kl_top1(train, want)
    max_diff = float((train - want).abs().max())
    print(f"{fmt} {bits}-bit: verify KL {r['kl_per_token']:.6e} top-1 {r['top1_agreement']:.4f} "
          f"max {r['max_abs_logit_diff']:.5f}; reference KL {kl:.6e} top-1 {top1:.4f} max {max_diff:.5f}")  # fmt: skip
    assert r["kl_per_token"] == pytest.approx(kl, rel=1e-3, abs=1e-9)
    assert r["max_abs_logit_diff"] == pytest.approx(max_diff, rel=1e-3, abs=1e-5)
    assert abs(r["top1_agreement"] - top1) <= 1.0 / chunks.numel() + 1e-12  # one near-tie may flip
    if bits == 8:
        plain = logits(reference_model(adir, reference_weights(adir, drop="adapter"), torch.float64), chunks)
        kl_plain, top1_plain = _kl_top1(train, plain)
        print(f"quantized base without the adapter: KL {kl_plain:.6e} top-1 {top1_plain:.4f}")
        assert r["kl_per_token"] <= kl_plain / 20 and r["top1_agreement"] >= top1_plain


def test_verify_unknown_folder(adapter_dir, tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="not an exported model folder") as ei:
        verify_export(tmp_path / "junk", adapter_dir[0], chunks=torch.zeros(1, 4, dtype=torch.long))
    assert "\n" not in str(ei.value)
    with pytest.raises(ValueError, match="does not exist"):
        detect_format(tmp_path / "nope")
