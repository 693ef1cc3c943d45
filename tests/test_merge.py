"""Streaming merge (``qwha_export.converters.merge``) on a tiny random Llama adapter directory built by hand."""

from __future__ import annotations

import json

import pytest
import torch
from dense_reference import check_logits, logits, reference_weights, rtn_reference
from kernel_parity import check_parity
from safetensors.torch import load_file, save_file
from tiny_adapter import ADAPTED, BITS, GS, build_adapter_dir
from tiny_adapter import quantized_model as _quantized_model

from qwha_export.converters import merge as M
from qwha_export.converters.quantize import QuantizedWeight
from qwha_export.formats import WRITERS, ExportFormat


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    return build_adapter_dir(tmp_path_factory.mktemp("merge"))


def _merge(adapter, out, **kw):
    args = dict(bits=16, group_size=None, requant="rtn", fmt="dense", dtype=torch.float32)
    args.update(kw)
    return M.stream_merge(adapter, out, **args)


def test_read_adapter_spectra_and_validation(adapter_dir, tmp_path):
    adir, _, quantized = adapter_dir
    sp = M.read_adapter_spectra(adir)
    assert sorted(sp) == sorted(n for n in quantized if n.rsplit(".", 1)[-1] in ADAPTED)
    scales = sorted({s for *_, s in sp.values()})
    assert scales == [2.0, 3.0]
    import shutil

    name = "model.layers.1.mlp.up_proj"
    key = f"base_model.model.{name}.qwha_"
    for how, needle in (("nan", "NaN"), ("index", "out of range")):
        bad = tmp_path / how
        shutil.copytree(adir, bad)
        t = load_file(str(bad / "adapter_model.safetensors"))
        if how == "nan":
            t[key + "spectrum"][3] = float("nan")
        else:
            t[key + "indices"][1, 0] = 10_000
        save_file(t, str(bad / "adapter_model.safetensors"))
        with pytest.raises(ValueError, match=needle) as ei:
            M.read_adapter_spectra(bad)
        assert name in str(ei.value) and "\n" not in str(ei.value)


def test_dense_merge_matches_training_model(adapter_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from qwha_export.tuner import load_qwha_adapter

    adir, base_dir, quantized = adapter_dir
    out = tmp_path / "dense"
    report = _merge(adir, out)
    assert (out / "qwha_export.json").is_file() and (out / "config.json").is_file()
    manifest = json.loads((out / "qwha_export.json").read_text())
    assert set(manifest["source"]["adapter_sha256"]) >= {"adapter_model.safetensors", "adapter_config.json"}
    assert len(report["layers"]) == len(quantized) and "quantization_config" not in json.loads(
        (out / "config.json").read_text()
    )
    assert all("rel_err_requant_vs_merged" not in r for r in report["layers"])

    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ref = load_qwha_adapter(_quantized_model(base_dir, quantized), str(adir)).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = merged(input_ids=ids).logits.double()
        b = ref(input_ids=ids).logits.double()
        q = _quantized_model(base_dir, quantized)(input_ids=ids).logits.double()
    rel = float((a - b).norm() / b.norm())
    assert rel < 1e-5, rel
    assert float((q - b).norm() / b.norm()) > 1e-3  # the adapter really changes the model

    base = load_file(str(base_dir / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(base)
    for k, v in base.items():
        layer = k.removesuffix(".weight")
        if layer not in quantized:  # embeddings, norms, lm_head
            assert torch.equal(got[k], v), k
    o = "model.layers.0.self_attn.o_proj"
    assert torch.equal(got[f"{o}.weight"], quantized[o].dequantize(torch.float32))


@pytest.mark.parametrize("source", ["hand-built", "flow"])
def test_dense_merge_matches_independent_float64_reference(source, adapter_dir, request, tmp_path):
    """Merged float32 weights and logits against ``W_deq + ΔW`` rebuilt in float64 from the adapter files by
    tests/dense_reference.py (no qwha_export reader or kernel): error <= 2x that of the same reference rounded to
    float32 + 1e-6. Sources: ``stream_merge`` of the hand-built adapter (a per-layer scale override, one layer not
    adapted) and the folder ``qwha-export merge --bits 16 --format dense --dtype float32`` wrote from a trained one."""
    from transformers import AutoModelForCausalLM

    if source == "flow":
        flow = request.getfixturevalue("flow")
        adir, out = flow["trained"], flow["dense"]
    else:
        adir, out = adapter_dir[0], tmp_path / "dense"
        _merge(adir, out)
    ref = reference_weights(adir)
    got = {k: v for shard in sorted(out.glob("*.safetensors")) for k, v in load_file(str(shard)).items()}
    for name, w in ref.items():
        check_parity(name, got[f"{name}.weight"], w.float(), w, torch.float32)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    check_logits("merged logits", logits(merged, ids), adir, ids)


def test_grid_requant_changes_codes_only_across_grid_steps(adapter_dir, tmp_path):
    adir, _, quantized = adapter_dir
    grams = {}
    gen = torch.Generator().manual_seed(2)
    for name, qw in quantized.items():
        x = torch.randn(64, qw.shape[1], generator=gen, dtype=torch.float64)
        grams[name] = x.T @ x
    out = tmp_path / "grid"
    report = _merge(adir, out, bits=BITS, requant="grid", fmt="gptq_v2", grams=grams)
    got = load_file(str(out / "model.safetensors"))
    sp, ref = M.read_adapter_spectra(adir), reference_weights(adir)
    recs = {r["name"]: r for r in report["layers"]}
    any_change = False
    for name, qw in quantized.items():
        new = WRITERS[ExportFormat.GPTQ_V2].read_layer(got, name, BITS, GS)
        assert torch.equal(new.scales, qw.scales) and torch.equal(new.zeros, qw.zeros), name
        assert "rel_err_requant_vs_merged" in recs[name]
        if name not in sp:
            assert torch.equal(new.codes, qw.codes) and recs[name]["action"] == "base-quantized"
            continue
        w = ref[name]  # W_deq + ΔW from the files (tests/dense_reference.py)
        delta_steps = (w - qw.dequantize(torch.float64)) / qw.scales.double().repeat_interleave(GS, dim=1)
        expected = (qw.codes.double() + torch.round(delta_steps)).clamp(0, qw.maxq)
        mismatch = new.codes.double() != expected
        near_tie = ((delta_steps.abs() % 1) - 0.5).abs() < 1e-9
        assert not bool((mismatch & ~near_tie).any()), name
        changed = new.codes != qw.codes
        assert not bool((changed & (delta_steps.abs() < 0.5)).any()), name
        assert recs[name]["max_abs_code_change"] == int((new.codes.int() - qw.codes.int()).abs().max())
        any_change |= bool(changed.any())
        assert float(changed.double().mean()) < 0.5, name  # most codes stay: the delta is a fraction of a step
    assert any_change
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["checkpoint_format"] == "gptq_v2" and cfg["bits"] == BITS and cfg["group_size"] == GS


@pytest.mark.parametrize("fmt,gs", [("gptq_v2", GS), ("compressed-tensors", GS), ("gptq_v2", 128)])
def test_rtn_requant_roundtrips_through_format_readers(adapter_dir, tmp_path, fmt, gs):
    """gs=128 on 64-wide inputs: one group shorter than the group size (the ragged case; AutoGPTQ's ceil), whose
    grid is the one of its 64 columns. Expected: RTN of ``W_deq + ΔW`` by tests/dense_reference.py."""
    adir, _, quantized = adapter_dir
    out = tmp_path / fmt
    _merge(adir, out, bits=4, group_size=gs, requant="rtn", fmt=fmt, max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").is_file()  # several shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got = {}
    for shard in sorted(set(index["weight_map"].values())):
        got.update(load_file(str(out / shard)))
    sp, ref = M.read_adapter_spectra(adir), reference_weights(adir)
    reader = WRITERS[ExportFormat.parse(fmt)].read_layer
    for name, qw in quantized.items():
        back = reader(got, name, 4, gs)
        if name in sp or gs != GS:  # merged, or a layer re-quantized at new settings from its dequantized weight
            want = rtn_reference(ref[name], 4, min(gs, qw.shape[1]))
        else:  # untouched at the base's settings
            want = (qw.codes, qw.scales, qw.zeros)
        for attr, w in zip(("codes", "scales", "zeros"), want, strict=True):
            assert torch.equal(getattr(back, attr).double(), w.double()), (name, attr)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == ("gptq" if fmt == "gptq_v2" else "compressed-tensors")
    # a ragged group (64 columns at group size 128) asks GPTQModel for its padding torch kernel
    assert cfg.get("backend") == ("torch" if gs == 128 else None)


def test_ragged_groups_refused_early_for_compressed_tensors(adapter_dir, tmp_path):
    adir, _, _ = adapter_dir
    with pytest.raises(ValueError, match=r"group_size=128 does not divide d_in=64.*gptq_v2") as exc:
        _merge(adir, tmp_path / "ct", bits=4, group_size=128, requant="rtn", fmt="compressed-tensors")
    assert "\n" not in str(exc.value) and not (tmp_path / "ct").exists()


def test_never_instantiates_the_model(adapter_dir, tmp_path, monkeypatch):
    import transformers

    def boom(*a, **k):
        raise AssertionError("stream_merge must not load the full model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(boom))
    report = _merge(adir := adapter_dir[0], tmp_path / "o", dtype=torch.float16)
    assert report["total"]["n_adapted"] == len(M.read_adapter_spectra(adir))


def test_existing_out_refused_and_failure_leaves_nothing(adapter_dir, tmp_path, monkeypatch):
    adir = adapter_dir[0]
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(ValueError, match="already exists"):
        _merge(adir, out)
    _merge(adir, out, overwrite=True)
    assert (out / "model.safetensors").is_file()

    calls = {"n": 0}
    real = M.merged_weight

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(M, "merged_weight", flaky)
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="disk on fire"):
        _merge(adir, fresh)
    assert not fresh.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fresh")]


def test_requant_argument_errors(adapter_dir, tmp_path):
    adir, _, quantized = adapter_dir
    qw = next(iter(quantized.values()))
    w = qw.dequantize(torch.float64)
    with pytest.raises(ValueError, match="Hessian"):
        M.requantize(w, "gptq", 4, GS, qw)
    with pytest.raises(ValueError, match="gptq"):
        _merge(adir, tmp_path / "g", bits=4, requant="gptq", fmt="gptq_v2")
    with pytest.raises(ValueError, match="dense"):
        _merge(adir, tmp_path / "x", bits=16, fmt="gptq_v2")
    assert not (tmp_path / "g").exists() and not (tmp_path / "x").exists()
    h = torch.eye(qw.shape[1], dtype=torch.float64)
    assert isinstance(M.requantize(w, "gptq", 4, GS, qw, hessian=h), QuantizedWeight)
    assert M.relative_output_error(w, w, h) == 0.0
    assert M.relative_output_error(w, 1.1 * w, h) == pytest.approx(0.1)
