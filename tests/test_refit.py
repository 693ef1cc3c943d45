"""``refit``: re-quantize merged weights and fit a fresh adapter; the result is a loadable fused checkpoint."""

import pytest
import torch
from tiny_adapter import ADAPTED, BITS, build_adapter_dir

from qwha_export.converters.merge import read_adapter_spectra
from qwha_export.converters.refit import refit_adapter
from qwha_export.fused import load_fused, write_fused


@pytest.mark.parametrize(("bits", "quantizer"), [(3, "gptq"), (3, "rtn"), (BITS, "grid")])
def test_refit_lowers_error_against_merged_weights_and_fuses(tmp_path, bits, quantizer):
    adir, _, quantized = build_adapter_dir(tmp_path)
    gen = torch.Generator().manual_seed(0)
    grams = {}
    for name, qw in quantized.items():
        x = torch.randn(512, qw.shape[1], generator=gen, dtype=torch.float64)
        grams[name] = x.T @ x
    out = tmp_path / "refit"
    out.mkdir()
    report = refit_adapter(adir, out, bits=bits, group_size=None, quantizer=quantizer, grams=grams)
    adapted = [n for n in quantized if n.rsplit(".", 1)[-1] in ADAPTED]
    assert report["total"]["n_layers"] == len(adapted)
    for layer in report["layers"]:
        assert layer["rel_err_after_calib"] < layer["rel_err_before_calib"], layer["name"]
    spectra = read_adapter_spectra(out)
    assert sorted(spectra) == sorted(adapted)
    fused = tmp_path / "fused"
    write_fused(out, fused)
    model, _ = load_fused(fused)
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, 256, (2, 16), generator=gen)).logits
    assert torch.isfinite(logits).all()


def test_refit_auto_uses_the_base_grid_at_the_base_bits_else_rtn(tmp_path):
    adir, _, quantized = build_adapter_dir(tmp_path)
    grams = {name: torch.eye(qw.shape[1], dtype=torch.float64) for name, qw in quantized.items()}
    for bits, expected in ((BITS, "grid"), (3, "rtn")):
        out = tmp_path / f"auto{bits}"
        out.mkdir()
        report = refit_adapter(adir, out, bits=bits, group_size=None, quantizer="auto", grams=grams)
        assert {layer["quantizer"] for layer in report["layers"]} == {expected}


def test_refit_writes_one_layer_at_a_time_and_joins_the_layout(tmp_path, monkeypatch):
    """Memory flat in depth: every file refit writes before the final join holds one layer's tensors (the old refit
    kept the whole re-quantized base and adapter in memory); the joined files hold every layer, no part is left."""
    from safetensors import safe_open

    import qwha_export.converters.refit as R
    from qwha_export.formats.adapter_dir import ADAPTER_WEIGHTS, BASE_FILE

    adir, _, quantized = build_adapter_dir(tmp_path)
    grams = {name: torch.eye(qw.shape[1], dtype=torch.float64) for name, qw in quantized.items()}
    written = []
    real = R.save_file

    def spy(tensors, path, *a, **k):
        written.append({name.removeprefix("base_model.model.").rsplit(".", 1)[0] for name in tensors})
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(R, "save_file", spy)
    out = tmp_path / "refit"
    out.mkdir()
    refit_adapter(adir, out, bits=BITS, group_size=None, quantizer="auto", grams=grams)
    assert len(written) > len(quantized) and all(len(layers) == 1 for layers in written), written
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["adapter_config.json", ADAPTER_WEIGHTS, BASE_FILE, "qwha_base.json", "refit_report.json"]
    )
    with safe_open(str(out / BASE_FILE), framework="pt") as f:
        assert {k.rsplit(".", 1)[0] for k in f.keys()} == set(quantized)  # noqa: SIM118 - safe_open is no dict
