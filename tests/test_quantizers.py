"""The quantizer registry (qwha_export.converters.quantizers): one entry per enum member, ``auto``'s per-layer choice,
the grid checks, merge with ``--requant auto``, and the CLI choices derived from the enum."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny_adapter import BITS, GS, build_adapter_dir

from qwha_export.cli import main
from qwha_export.converters.merge import stream_merge
from qwha_export.converters.quant_methods import BASE_QUANTIZERS, MERGE_REQUANT, Quantizer
from qwha_export.converters.quantize import QuantConfig, quantize_gptq, quantize_rtn
from qwha_export.converters.quantizers import QUANTIZERS, get_quantizer, grid_requantize, requantize, resolve_quantizer
from qwha_export.formats import FUSED_BASE_FORMATS, WRITERS, ExportFormat


def _weights(seed: int = 0, shape=(24, 128)):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return w0, w0 + 0.05 * torch.randn(*shape, generator=gen, dtype=torch.float64)


def test_every_quantizer_is_registered_under_its_own_kind():
    assert set(QUANTIZERS) == set(Quantizer)
    for kind, entry in QUANTIZERS.items():
        assert entry.kind is kind and get_quantizer(kind.value.upper()) is entry
    with pytest.raises(ValueError, match=r"quantizer 'awq' is not supported; choose one of rtn, gptq, grid, auto"):
        get_quantizer("awq")
    assert BASE_QUANTIZERS == ("rtn", "gptq")  # the ones that need no quantized base
    assert MERGE_REQUANT == ("rtn", "gptq", "grid", "auto", "refit")


def test_auto_takes_the_base_grid_at_its_bits_and_groups_else_rtn():
    w0, w = _weights()
    base = quantize_rtn(w0, 4, 64)
    same = requantize(w, "auto", 4, None, base)
    assert torch.equal(same.codes, grid_requantize(w, base).codes) and torch.equal(same.scales, base.scales)
    assert resolve_quantizer("auto", base, 4, 64, 128) is Quantizer.GRID
    for bits, gs in ((3, None), (4, 32)):
        assert resolve_quantizer("auto", base, bits, gs, 128) is Quantizer.RTN
        got, want = requantize(w, "auto", bits, gs, base), quantize_rtn(w, bits, gs or 64)
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scales, want.scales)
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    act_order = quantize_gptq(w0, x.T @ x, QuantConfig(method="gptq", act_order=True))
    assert act_order.g_idx is not None
    assert resolve_quantizer("auto", act_order, 4, None, 128) is Quantizer.RTN  # a permuted grid is not kept


def test_grid_refuses_other_bits_or_groups_and_gptq_needs_a_hessian():
    w0, w = _weights()
    base = quantize_rtn(w0, 4, 64)
    with pytest.raises(ValueError, match=r"bits=3 != base bits=4"):
        requantize(w, "grid", 3, None, base)
    with pytest.raises(ValueError, match=r"group_size=32 != base 64"):
        requantize(w, "grid", 4, 32, base)
    with pytest.raises(ValueError, match="needs the quantized base"):
        requantize(w, "grid", 4, 64, None)
    with pytest.raises(ValueError, match="Hessian"):
        requantize(w, "gptq", 4, 64, base)


def test_merge_requant_auto_writes_the_base_grid_at_base_bits_and_rtn_at_others(tmp_path):
    adir, _, quantized = build_adapter_dir(tmp_path)
    for bits, expected in ((BITS, "grid"), (3, "rtn")):
        out = tmp_path / f"auto{bits}"
        report = stream_merge(adir, out, bits=bits, group_size=None, requant="auto", fmt="gptq_v2")
        assert report["settings"]["requant"] == "auto"
        adapted = [r for r in report["layers"] if r["adapted"]]
        assert adapted and {r["action"] for r in adapted} == {f"requantized-{expected}"}
        got = load_file(str(out / "model.safetensors"))
        for r in adapted:
            new = WRITERS[ExportFormat.GPTQ_V2].read_layer(got, r["name"], bits, GS)
            base = quantized[r["name"]]
            assert torch.equal(new.scales, base.scales) == (expected == "grid"), r["name"]


def _choices(command: str, option: str) -> list[str]:
    out = CliRunner().invoke(main, [command, "--help"], terminal_width=200).output
    return re.search(rf"{option} \[([^\]]+)\]", out).group(1).split("|")


def test_cli_choices_come_from_the_enums_and_the_cli_starts_without_torch():
    assert _choices("init", "--quantizer") == list(BASE_QUANTIZERS)
    assert _choices("merge", "--requant") == list(MERGE_REQUANT)
    assert _choices("merge", "--format") == [f.value for f in ExportFormat]
    assert _choices("fuse", "--base-format") == list(FUSED_BASE_FORMATS)
    probe = "import sys, qwha_export.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]", run.stdout  # the vocabularies are torch-free modules
    res = CliRunner().invoke(main, ["init", "smollm2", "--out", "x", "--quantizer", "grid"])
    assert res.exit_code == 2 and "'grid' is not one of 'rtn', 'gptq'" in res.output


def test_init_job_refuses_a_quantizer_that_needs_a_base():
    from qwha_export.initialise import InitJob

    with pytest.raises(ValueError, match=r"--quantizer auto re-quantizes onto a quantized base's grid.*rtn or gptq"):
        InitJob(model="m", out="o", quant=QuantConfig(method="auto"))
