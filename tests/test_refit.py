"""``merge --requant refit``: re-quantize merged weights and fit a fresh adapter, as a layer function of the fused
writer (one pass of the checkpoint engine); the result is a loadable fused checkpoint."""

import json

import pytest
import torch
from flow_folders import run_cli
from tiny_adapter import ADAPTED, BITS, build_adapter_dir

from qwha_export.converters.refit import RefitLayers
from qwha_export.formats.fused import read_fused_adapter, read_fused_config
from qwha_export.fused import load_fused, write_fused


def _grams(quantized, kind: str = "random") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    grams = {}
    for name, qw in quantized.items():
        if kind == "eye":
            grams[name] = torch.eye(qw.shape[1], dtype=torch.float64)
        else:
            x = torch.randn(512, qw.shape[1], generator=gen, dtype=torch.float64)
            grams[name] = x.T @ x
    return grams


@pytest.mark.parametrize(("bits", "quantizer"), [(3, "gptq"), (3, "rtn"), (BITS, "grid")])
def test_refit_lowers_error_against_merged_weights_and_fuses(tmp_path, bits, quantizer):
    adir, _, quantized = build_adapter_dir(tmp_path)
    grams = _grams(quantized)
    refit = RefitLayers(adir, bits=bits, group_size=None, quantizer=quantizer, grams=grams)
    fused = tmp_path / "fused"
    write_fused(adir, fused, refit=refit)
    report = refit.report()
    adapted = [n for n in quantized if n.rsplit(".", 1)[-1] in ADAPTED]
    assert report["total"]["n_layers"] == len(adapted)
    for layer in report["layers"]:
        assert layer["rel_err_after_calib"] < layer["rel_err_before_calib"], layer["name"]
    cfg = read_fused_config(fused)
    assert sorted(cfg["layers"]) == sorted(adapted)
    assert {rec["bits"] for rec in cfg["quantized_layers"].values()} == {bits}
    # the written spectra are the refit's own: in the fused config and file, one per adapted layer
    model, _ = load_fused(fused)
    spectra = read_fused_adapter(fused)
    for layer in adapted:
        assert spectra[layer][0].numel() == cfg["layers"][layer]["nnz"] > 0
        assert cfg["layers"][layer]["scale"] == refit.scale
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))).logits
    assert torch.isfinite(logits).all()


def test_refit_auto_uses_the_base_grid_at_the_base_bits_else_rtn(tmp_path):
    adir, _, quantized = build_adapter_dir(tmp_path)
    for bits, expected in ((BITS, "grid"), (3, "rtn")):
        refit = RefitLayers(adir, bits=bits, group_size=None, quantizer="auto", grams=_grams(quantized, "eye"))
        write_fused(adir, tmp_path / f"auto{bits}", refit=refit)
        assert {layer["quantizer"] for layer in refit.report()["layers"]} == {expected}


def test_refit_runs_layer_by_layer_in_the_engines_one_pass(tmp_path, monkeypatch):
    """Memory flat in depth: each adapted layer's fresh spectrum is written while the engine writes that layer
    (not collected to the end), and the source spectra are read one layer at a time."""
    import qwha_export.formats.fused as F

    adir, _, quantized = build_adapter_dir(tmp_path)
    events: list[tuple[str, str]] = []
    real_add = F.FusedAdapterWriter.add

    def add(self, layer, *a, **k):
        events.append(("spectrum", layer))
        return real_add(self, layer, *a, **k)

    monkeypatch.setattr(F.FusedAdapterWriter, "add", add)
    refit = RefitLayers(adir, bits=3, group_size=None, quantizer="rtn", grams=_grams(quantized, "eye"))
    real_call = RefitLayers.__call__

    def call(self, layer, qw):
        events.append(("layer", layer))
        return real_call(self, layer, qw)

    monkeypatch.setattr(RefitLayers, "__call__", call)
    write_fused(adir, tmp_path / "fused", refit=refit)
    layers = [name for kind, name in events if kind == "layer"]
    assert sorted(layers) == sorted(quantized)
    for i, (kind, name) in enumerate(events):  # every spectrum right after its own layer
        if kind == "spectrum":
            assert events[i - 1] == ("layer", name), events
    assert not list((tmp_path / "fused").glob(".*"))  # no part left behind


def test_merge_requant_refit_cli_retargets_to_3_bits(flow, tmp_path):
    """The real flow: ``merge --requant refit --bits 3`` on the trained adapter writes a fused 3-bit checkpoint
    whose fresh adapter cancels much of the 3-bit error against the merged weights, measured on the same
    calibration text as the plain 3-bit RTN merge's own report; its parity check is in the manifest."""
    refit, plain = tmp_path / "refit3", tmp_path / "rtn3"
    printed = run_cli("merge", flow["trained"], "--requant", "refit", "--bits", "3", "--calib-tokens", "256",
                      "--verify-tokens", "64", "--out", refit)  # fmt: skip
    run_cli("merge", flow["trained"], "--requant", "rtn", "--bits", "3", "--calib-tokens", "256",
            "--verify-tokens", "0", "--out", plain, "--quiet")  # fmt: skip
    cfg = read_fused_config(refit)
    assert {rec["bits"] for rec in cfg["quantized_layers"].values()} == {3}
    manifest = json.loads((refit / "qwha_export.json").read_text())
    assert manifest["settings"]["requant"] == "refit" and manifest["parity"]["tokens"] == 64
    assert manifest["source"]["adapter_dir"] == str(flow["trained"].resolve())  # the original, no temporary
    assert manifest["parity"]["top1_agreement"] >= 0.95
    total = json.loads(printed[printed.index("{") : printed.rindex("}") + 1])
    rtn = json.loads((plain / "qwha_export.json").read_text())["total"]["rms_rel_err_requant_vs_merged_adapted"]
    print("refit", total["rms_rel_err_vs_merged"], "rtn", rtn)
    assert total["n_layers"] == len(cfg["layers"]) and total["rms_rel_err_vs_merged"] < 0.6 * rtn
    assert not list(refit.parent.glob(".refit-*"))  # no temporary adapter directory any more
