"""``export-onnx`` block by block: the graph written from the streamed source, its initializers going to
``model.onnx.data`` as they are made, equals the graph built in memory from the whole PyTorch model (every node,
initializer value and function), its external data is laid out as documented, and its peak RSS does not grow with
depth (issue: memory flat in model depth)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_architectures import write_base
from test_block_stream import _big_adapter
from test_onnx_architectures import _adapter_sources

from qwha_export.converters.onnx_export import decoder_from_model
from qwha_export.formats import ExportFormat
from qwha_export.formats.onnx_external import PAGE_ALIGN_FROM
from qwha_export.formats.onnx_folder import DATA_FILE, MODEL_FILE
from qwha_export.formats.onnx_graph import build_decoder_model
from qwha_export.formats.onnx_stages import decoder_stages
from qwha_export.onnx_export import export_onnx
from qwha_export.onnx_runtime import OnnxBlocks, OnnxLogits
from qwha_export.verify import load_export

# name -> (model_type, source variant, export_onnx options): between them a tied RTN-quantized head and embedding
# with sliding windows, four norms and q/k norms (Gemma 3), a fused qkv split and the If branches of adapters
# (Phi-3), an untied 8-bit head with the quantized blocks of a merge (Qwen2 biases), a dense float32 model
CASES = {
    "gemma3_text-fused-head4": ("gemma3_text", "fused", {"head_bits": 4}),
    "phi3-fused": ("phi3", "fused", {"accuracy_level": 4}),
    "qwen2-merged-head8": ("qwen2", "merged", {"head_bits": 8}),
    "llama-dense": ("llama", "dense", {}),
}


def _parts(model: onnx.ModelProto) -> tuple[bytes, dict[str, np.ndarray]]:
    """``(the model without initializers, metadata and doc string, serialized; {initializer: array})``."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    del model.graph.initializer[:]
    del model.metadata_props[:]
    model.doc_string = ""
    return model.SerializeToString(), inits


@pytest.mark.filterwarnings("ignore:accuracy_level=4")
@pytest.mark.parametrize("case", list(CASES))
def test_streamed_export_equals_in_memory_build(case, tmp_path):
    model_type, variant, options = CASES[case]
    base = write_base(tmp_path / "base", model_type)
    src = base if variant == "dense" else _adapter_sources(base, tmp_path)[variant]
    out = tmp_path / "onnx"
    export_onnx(src, out, quiet=True, parity_tokens=0, **options)

    model, fmt = load_export(src)
    level = options.get("accuracy_level", 0)
    exact = fmt != ExportFormat.DENSE and level == 4
    spec, weights, _ = decoder_from_model(model, level, exact_lm_head=exact, head_bits=options.get("head_bits"))
    graph, inits = _parts(build_decoder_model(spec, weights))
    got_graph, got_inits = _parts(onnx.load(str(out / MODEL_FILE)))
    assert got_graph == graph
    assert sorted(got_inits) == sorted(inits)
    for name, want in inits.items():
        have = got_inits[name]
        assert have.dtype == want.dtype and have.shape == want.shape and have.tobytes() == want.tobytes(), name

    # the layout of model.onnx.data: tensors of 991 bytes and more outside (onnx's size_threshold=1024 test of
    # sys.getsizeof(raw_data)), each at an aligned offset, back to back up to the padding
    saved = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    end = 0
    for t in saved.graph.initializer:
        nbytes = inits[t.name].nbytes
        if t.data_location != onnx.TensorProto.EXTERNAL:
            assert nbytes + sys.getsizeof(b"") < 1024, t.name
            continue
        info = {e.key: e.value for e in t.external_data}
        offset, length = int(info["offset"]), int(info["length"])
        assert info["location"] == DATA_FILE and length == nbytes >= 1024 - sys.getsizeof(b""), t.name
        align = 4096 if nbytes >= PAGE_ALIGN_FROM else 64
        assert offset % align == 0 and end <= offset < end + align, (t.name, offset, end)
        end = offset + length
    assert (out / DATA_FILE).stat().st_size == end


@pytest.mark.filterwarnings("ignore:accuracy_level=4")
@pytest.mark.parametrize("case", list(CASES))
def test_block_by_block_logits_equal_whole_session(case, tmp_path):
    """:class:`OnnxBlocks` (one onnxruntime session per stage: embedding, each block, head) gives the logits of the
    whole graph's session, bit for bit, in batches of any size; and the graph is cut into L + 2 stages, each
    holding only its own block's weights."""
    import torch

    model_type, variant, options = CASES[case]
    base = write_base(tmp_path / "base", model_type)
    src = base if variant == "dense" else _adapter_sources(base, tmp_path)[variant]
    out = tmp_path / "onnx"
    export_onnx(src, out, quiet=True, parity_tokens=0, **options)
    proto = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    layers = sum(1 for i in proto.graph.input if i.name.endswith(".key"))
    stages = decoder_stages(proto)
    assert len(stages) == layers + 2
    for k, stage in enumerate(stages[1:-1]):
        owners = {t.name.split(".")[2] for t in stage.initializers if t.name.startswith("model.layers.")}
        assert owners <= {str(k), str(k + 1)}, (k, owners)  # its block (+ the next block's input norm)
    assert not any(t.name.startswith("model.layers.") for t in stages[-1].initializers)

    ids = torch.randint(0, 100, (5, 7), generator=torch.Generator().manual_seed(0))
    whole = OnnxLogits(out)
    want = whole(ids)
    blocks = OnnxBlocks(out)
    got = list(blocks.logits(ids, rows=2))
    assert [s for s, _ in got] == [0, 2, 4]
    assert torch.equal(torch.cat([lg for _, lg in got]), want)
    assert blocks.qwha_ops == whole.qwha_ops


def test_block_by_block_logits_on_a_runtime_without_the_folder_option(tmp_path, monkeypatch):
    """onnxruntime < 1.21 cannot find a stage's external data when the stage is read from memory: there
    :class:`OnnxBlocks` runs the whole graph, with the same batches and logits."""
    import torch

    import qwha_export.onnx_runtime as onnx_runtime

    base = write_base(tmp_path / "base", "llama")
    src = _adapter_sources(base, tmp_path)["fused"]
    export_onnx(src, tmp_path / "onnx", quiet=True, parity_tokens=0)
    ids = torch.randint(0, 100, (3, 6), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(onnx_runtime, "_has_external_folder_option", lambda: False)
    blocks = OnnxBlocks(tmp_path / "onnx")
    assert blocks.stages is None
    got = list(blocks.logits(ids, rows=2))
    assert [s for s, _ in got] == [0, 2]
    assert torch.equal(torch.cat([lg for _, lg in got]), OnnxLogits(tmp_path / "onnx")(ids))
    assert blocks.qwha_ops in ("native", "function")


MEASURE = textwrap.dedent(
    """
    import sys
    from qwha_export.onnx_export import export_onnx
    export_onnx(sys.argv[1], sys.argv[2], quiet=True, parity_tokens=int(sys.argv[3]))
    print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
    """
)


def _export_peak_mib(src, out, parity_tokens: int) -> float:
    """Peak RSS (MiB) of a process that exports ``src`` to ``out`` (with its parity run on ``parity_tokens``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", MEASURE, str(src), str(out), str(parity_tokens)]
    run = subprocess.run(args, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return int(run.stdout.split()[-1]) / 1024


@pytest.mark.slow
@pytest.mark.parametrize("parity_tokens", [0, 64])
def test_streamed_export_peak_rss_flat_in_depth(parity_tokens, tmp_path):
    """``export_onnx`` of fused folders on random Llamas with 67 MB float32 blocks (q, v and down 4-bit, with
    adapters), without and with its parity run (both sides block by block; one onnxruntime session of the whole
    graph held every block): 8 blocks peak within 15% of 2 blocks (the whole-model export held every block, its
    arrays and its initializers)."""
    peaks = {
        n: _export_peak_mib(_big_adapter(tmp_path / str(n), n)[1], tmp_path / f"onnx{n}", parity_tokens) for n in (2, 8)
    }
    print(
        f"export-onnx (parity on {parity_tokens} tokens) peak RSS: {peaks[2]:.0f} MiB at 2 blocks, "
        f"{peaks[8]:.0f} MiB at 8 blocks"
    )
    assert peaks[8] <= 1.15 * peaks[2], peaks
