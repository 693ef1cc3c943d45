"""A quantized embedding and head (``export-onnx --head-bits 8|4``, issue 14): GatherBlockQuantized + MatMulNBits.

The ONNX logits must equal transformers' model with the embedding and head replaced by their RTN dequantized
weights (the project's ``quantize_rtn``, groups of 32 along hidden) within 1e-4 relative, on the full sequence, the
decode steps and the left-padded batch of ``test_onnx_architectures.parity_errors``; the export's own parity check
against the float model then measures the head's cost (KL grows as bits shrink). Tied (Gemma 3, embedding scale)
and untied (Llama) heads.
"""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner
from test_architectures import write_base
from test_onnx_architectures import TOL, _Runner, parity_errors

from qwha_export.cli import main
from qwha_export.converters.onnx_export import HEAD_BLOCK
from qwha_export.converters.quantize import quantize_rtn
from qwha_export.formats.onnx_folder import MODEL_FILE
from qwha_export.onnx_export import export_onnx
from qwha_export.verify import load_export

CASES = {"gemma3_text-tied": ("gemma3_text", {}), "llama-untied": ("llama", {"tie_word_embeddings": False})}


def _dequantized_reference(src, bits: int):
    model, _ = load_export(src)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight.data_ptr() == emb.weight.data_ptr()
    with torch.no_grad():
        emb.weight.copy_(quantize_rtn(emb.weight, bits, HEAD_BLOCK).dequantize())
        if not tied:
            head.weight.copy_(quantize_rtn(head.weight, bits, HEAD_BLOCK).dequantize())
    return model, tied


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_quantized_head_matches_dequantized_reference(case, bits, tmp_path):
    model_type, more = CASES[case]
    base = write_base(tmp_path / "base", model_type, **more)
    report = export_onnx(base, tmp_path / "onnx", quiet=True, parity_tokens=32, head_bits=bits)
    reference, tied = _dequantized_reference(base, bits)
    err = parity_errors(_Runner(tmp_path / "onnx"), reference)
    parity = report["parity"]
    print(f"{case} {bits}-bit head: {json.dumps({k: float(f'{v:.3g}') for k, v in err.items()})}; against the "
          f"float model: KL {parity['kl_per_token']:.3g}, top-1 {parity['top1_agreement']:.4f}")  # fmt: skip
    assert max(err.values()) <= TOL, (case, bits, err)
    graph = onnx.load(str(tmp_path / "onnx" / MODEL_FILE), load_external_data=False).graph
    nodes = list(graph.node) + [n for node in graph.node for a in node.attribute if a.g for n in a.g.node]
    ops = {n.op_type for n in nodes if n.name.startswith(("embed_", "lm_head"))}
    assert ops == {"GatherBlockQuantized", "MatMulNBits"} | ({"Mul"} if model_type == "gemma3_text" else set()), ops
    names = {i.name for i in graph.initializer}
    assert "model.embed_tokens.weight" not in names and "lm_head.weight_t" not in names  # no float copy left
    info = report["graph"]
    assert info["embedding"] == f"{bits}-bit RTN/block 32 GatherBlockQuantized"
    assert info["lm_head"] == f"{'tied ' if tied else ''}{bits}-bit RTN/block 32 MatMulNBits"
    assert parity["kl_per_token"] > 0  # the head's cost against the float model is measured, not hidden


def test_head_cost_shrinks_with_bits_and_cli_refuses_other_bits(tmp_path):
    base = write_base(tmp_path / "base", "gemma3_text")
    kl = {b: export_onnx(base, tmp_path / f"o{b}", quiet=True, parity_tokens=64, head_bits=b)["parity"]["kl_per_token"]
          for b in (8, 4)}  # fmt: skip
    print("KL against the float head:", kl)
    assert 0 < kl[8] < kl[4], kl
    result = CliRunner().invoke(main, ["export-onnx", str(base), "--out", str(tmp_path / "x"), "--head-bits", "3"])
    assert result.exit_code == 2 and "--head-bits" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match=r"head_bits=2 must be 8 or 4"):
        export_onnx(base, tmp_path / "y", quiet=True, head_bits=2)
