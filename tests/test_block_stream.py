"""The block-by-block streaming engine (``converters.block_stream``) against whole-model forwards.

Sources: the training-time model of an adapter directory and every torch-loadable export kind, all written by the
real commands (``flow`` fixture, tests/flow_folders.py), plus a Gemma-3-style tiny model (sliding + global layers,
RoPE base per layer type, tied head, final soft-capping) through ``init`` and ``fuse``. Streamed ``verify_export``
must give the numbers of the whole-model computation (kept here as the reference, :func:`whole_model_verify`), the
spill path the numbers of the in-memory path, and its peak RSS must not grow with depth.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from flow_folders import run_cli
from test_architectures import write_base

from qwha_export.converters.block_stream import BlockStream, CheckpointSource
from qwha_export.formats import ExportFormat
from qwha_export.metrics import compare_logits, logits_for, perplexity
from qwha_export.verify import (
    detect_format,
    export_stream,
    load_export,
    load_reference,
    reference_stream,
    verify_export,
)

EXPORT_KINDS = ("dense", "gptq", "gptq_v2", "compressed-tensors", "fused", "merge-fused")
KEYS = ("max_abs_logit_diff", "mean_abs_logit_diff", "kl_per_token", "top1_agreement", "ppl_export", "ppl_reference")


def ids_for(vocab: int, n: int = 6, seq: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def streamed_logits(stream: BlockStream, ids: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    with stream:
        hidden = stream.run(ids, batch_size)
        out = torch.cat([logits for _, logits in stream.logits(hidden, batch_size)])
        hidden.close()
    return out


def whole_model_verify(export_dir: Path, adapter_dir: Path, chunks: torch.Tensor, batch_size: int = 4) -> dict:
    """Today's whole-model parity (both models whole in memory, all logits at once): the reference numbers."""
    reference, _ = load_reference(adapter_dir)
    ref_logits = logits_for(reference, chunks, batch_size)
    ppl_ref = perplexity(reference, chunks, batch_size)
    del reference
    export, _ = load_export(export_dir)
    exp_logits = logits_for(export, chunks, batch_size)
    out = dict(compare_logits(ref_logits, exp_logits))
    out.update(ppl_export=perplexity(export, chunks, batch_size), ppl_reference=ppl_ref)
    return out


def assert_same_numbers(streamed: dict, whole: dict, rel: float = 1e-6) -> None:
    assert streamed["tokens"] == whole["tokens"]
    for key in KEYS:
        a, b = streamed[key], whole[key]
        assert abs(a - b) <= rel * max(abs(b), 1e-6) + 1e-12, (key, a, b)


def _vocab(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["vocab_size"]


def test_training_time_stream_equals_whole_model(flow):
    ids = ids_for(257)
    stream, _ = reference_stream(flow["trained"])
    whole = logits_for(load_reference(flow["trained"])[0], ids, 4)
    torch.testing.assert_close(streamed_logits(stream, ids), whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())


@pytest.mark.parametrize("name", EXPORT_KINDS)
def test_export_stream_equals_whole_model(flow, name):
    ids = ids_for(257, seed=1)
    fmt = detect_format(flow[name])
    whole = logits_for(load_export(flow[name])[0], ids, 4)
    got = streamed_logits(export_stream(flow[name], fmt), ids)
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())


def test_dense_base_stream_equals_from_pretrained(flow):
    from transformers import AutoModelForCausalLM

    ids = ids_for(257, seed=2)
    model = AutoModelForCausalLM.from_pretrained(str(flow["base"]), dtype=torch.float32)
    whole = logits_for(model, ids, 4)
    got = streamed_logits(BlockStream(flow["base"], CheckpointSource(flow["base"])), ids)
    assert torch.equal(got, whole)  # same ops on the same batches: bit-identical


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])  # untied head; tied head with final soft-capping
def test_narrow_head_and_small_logit_batches(tmp_path, model_type):
    """A bf16 checkpoint's head stays bf16 and is cast a block of vocabulary rows at a time, and ``max_bytes``
    cuts the logits into smaller batches: the logits still equal the whole float32 model's (loaded from the same
    bf16 checkpoint), every row once, in order."""
    from transformers import AutoModelForCausalLM

    from qwha_export.converters import block_stream

    base = tmp_path / "bf16"
    write_base(base, model_type, torch_dtype=torch.float32)
    AutoModelForCausalLM.from_pretrained(str(base)).to(torch.bfloat16).save_pretrained(str(base))
    ids = ids_for(257, n=5, seq=24, seed=4)
    whole = logits_for(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), ids, 4)
    with BlockStream(base, CheckpointSource(base)) as stream:
        assert stream._stored_head(stream._prefix(stream.model.get_output_embeddings())) is not None or (
            model_type == "gemma3_text"  # tied: the head is the embedding's tensor, read under its prefix
        )
        hidden = stream.run(ids, 4)
        one_row = 24 * 257 * 4  # the logits of one sequence
        parts = list(stream.logits(hidden, batch_size=4, max_bytes=2 * one_row))
        hidden.close()
    assert [start for start, _ in parts] == [0, 2, 4] and [t.shape[0] for _, t in parts] == [2, 2, 1]
    got = torch.cat([t for _, t in parts])
    torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-6 * whole.abs().max().item())
    block_stream._HEAD_ROWS_BYTES, saved = 64 * 4 * 7, block_stream._HEAD_ROWS_BYTES  # 7 rows a block: ragged end
    try:
        x = torch.randn(3, 5, 64)
        w = torch.randn(257, 64).to(torch.bfloat16)
        got, ref = block_stream._head_logits(x, w), x.double() @ w.double().T  # ragged last block included
        err, ref_err = (got - ref).abs().max().item(), (x @ w.float().T - ref).abs().max().item()
        bound = 2 * ref_err + 1e-6
        assert err <= bound, f"blocked head: error {err:.2e}, whole float32 matmul {ref_err:.2e}, bound {bound:.2e}"
    finally:
        block_stream._HEAD_ROWS_BYTES = saved


@pytest.mark.parametrize("name", ("gptq_v2", "fused", "merge-onnx", "dense"))
def test_streamed_verify_equals_whole_model_numbers(flow, name):
    chunks = ids_for(257, n=5, seq=40, seed=3)  # 5 sequences: the last batch is short
    if detect_format(flow[name]) == ExportFormat.ONNX:
        from qwha_export.onnx_runtime import OnnxLogits

        reference, _ = load_reference(flow["trained"])
        export = OnnxLogits(flow[name])
        whole = dict(compare_logits(logits_for(reference, chunks, 4), logits_for(export, chunks, 4)))
        whole.update(ppl_export=perplexity(export, chunks, 4), ppl_reference=perplexity(reference, chunks, 4))
    else:
        whole = whole_model_verify(flow[name], flow["trained"], chunks)
    streamed = verify_export(flow[name], flow["trained"], chunks=chunks)
    assert_same_numbers(streamed, whole)
    assert streamed["format"] == detect_format(flow[name]).value and streamed["reference"] == "training-time"


def test_spill_path_equals_in_memory(flow, tmp_path):
    chunks = ids_for(257, n=5, seq=40, seed=4)
    in_memory = verify_export(flow["gptq"], flow["trained"], chunks=chunks)
    seen: list[list[str]] = []
    stream, _ = reference_stream(flow["trained"], spill_bytes=0, spill_dir=tmp_path)
    with stream:
        hidden = stream.run(chunks, 4, on_block=lambda i, b, g: seen.append(sorted(os.listdir(stream._tmp.name))))
        assert hidden.spilled and hidden.path.is_file()
        hidden.close()
    assert all(len(files) == 1 for files in seen), seen  # the block's output store on disk (its input freed)
    assert not any(tmp_path.iterdir())  # the spill directory is gone
    spilled = verify_export(flow["gptq"], flow["trained"], chunks=chunks, spill_bytes=0)
    for key in KEYS:
        assert spilled[key] == in_memory[key], key


def test_stream_grams_equal_whole_model_grams(flow):
    from transformers import AutoModelForCausalLM

    from qwha_export.converters.calibration import iter_block_grams

    ids = ids_for(257, n=3, seq=32, seed=5)
    model = AutoModelForCausalLM.from_pretrained(str(flow["base"]), dtype=torch.float32).eval()
    whole = {}
    for _, _, grams in iter_block_grams(model, ids, batch_size=2, sequential=False):
        whole.update(grams)
    got = {}
    with BlockStream(flow["base"], CheckpointSource(flow["base"])) as stream:
        stream.run(ids, 2, targets=("q_proj", "down_proj"), on_block=lambda i, b, g: got.update(g)).close()
    assert sorted(got) == sorted(k for k in whole if k.endswith(("q_proj", "down_proj")))
    for name, gram in got.items():
        assert gram.dtype == torch.float64 and torch.equal(gram, whole[name]), name


def test_gemma3_stream_equals_whole_model(tmp_path):
    base = write_base(tmp_path / "base", "gemma3_text", final_logit_softcapping=30.0)
    adapter, fused = tmp_path / "adapter", tmp_path / "fused"
    run_cli("init", base, "--out", adapter, "--bits", 4, "--group-size", 32, "--rank", 2, "--calib-tokens", 128,
            "--heldout-tokens", 64, "--seq-len", 64, "--quiet")  # fmt: skip
    run_cli("fuse", adapter, "--out", fused, "--verify-tokens", 0)
    ids = ids_for(257, n=3, seq=40, seed=6)  # longer than the 8-key window: local layers differ from global ones
    whole = logits_for(load_reference(adapter)[0], ids, 2)
    got = streamed_logits(reference_stream(adapter)[0], ids, 2)
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())
    assert whole.abs().max() <= 30.0  # the soft-capping ran
    whole_fused = logits_for(load_export(fused)[0], ids, 2)
    got_fused = streamed_logits(export_stream(fused, ExportFormat.FUSED), ids, 2)
    torch.testing.assert_close(got_fused, whole_fused, rtol=1e-5, atol=1e-5 * whole_fused.abs().max().item())
    assert_same_numbers(
        verify_export(fused, adapter, chunks=ids, batch_size=2), whole_model_verify(fused, adapter, ids, 2)
    )


# ----------------------------------------------------------------------------------------------------------------------
# memory: peak RSS of streamed verify does not grow with depth
# ----------------------------------------------------------------------------------------------------------------------

MEASURE = textwrap.dedent(
    """
    import sys, torch
    from qwha_export.verify import verify_export
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    out = verify_export(sys.argv[1], sys.argv[2], chunks=ids)
    assert out["top1_agreement"] == 1.0, out
    print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
    """
)


def _big_adapter(root: Path, layers: int) -> tuple[Path, Path]:
    """An adapter directory (RTN 4-bit g64, random spectra) on a random Llama with 67 MB float32 blocks, and its
    fused export (written by the streaming writer)."""
    from peft import get_peft_model
    from tiny_adapter import write_adapter_dir
    from transformers import LlamaConfig, LlamaForCausalLM

    from qwha_export.converters.quantize import quantize_rtn
    from qwha_export.fused import write_fused
    from qwha_export.quant_linear import QuantLinear, replace_linear
    from qwha_export.tuner import QWHAConfig, set_spectrum

    config = LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(root / "base"))
    targets = ("q_proj", "v_proj", "down_proj")
    quantized = {n: quantize_rtn(m.weight.detach(), 4, 64) for n, m in model.named_modules() if n.endswith(targets)}
    for name, qw in quantized.items():
        replace_linear(model, name, QuantLinear.from_linear(model.get_submodule(name), qw))
    peft_model = get_peft_model(model, QWHAConfig(target_modules=list(targets), rank=4, init="random"))
    gen = torch.Generator().manual_seed(1)
    for name, qw in sorted(quantized.items()):
        d_out, d_in = qw.shape
        flat = torch.randperm(d_out * d_in, generator=gen)[: 2 * d_out]
        set_spectrum(peft_model, name, 0.01 * torch.randn(flat.numel(), generator=gen), flat // d_in, flat % d_in)
    write_adapter_dir(peft_model, quantized, root / "adapter", root / "base")
    write_fused(root / "adapter", root / "fused")
    return root / "adapter", root / "fused"


@pytest.mark.slow
def test_streamed_verify_peak_rss_flat_in_depth(tmp_path):
    peaks = {}
    for layers in (2, 8):
        adapter, fused = _big_adapter(tmp_path / str(layers), layers)
        run = subprocess.run([sys.executable, "-c", MEASURE, str(fused), str(adapter)], capture_output=True,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[layers] = int(run.stdout.split()[-1]) / 1024  # MiB
    print(f"streamed verify peak RSS: {peaks[2]:.0f} MiB at 2 blocks, {peaks[8]:.0f} MiB at 8 blocks (67 MB blocks)")
    assert peaks[8] <= 1.15 * peaks[2], peaks


# ----------------------------------------------------------------------------------------------------------------------
# SmolLM2: streamed numbers equal the whole-model numbers
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_streamed_verify_equals_whole_model(smollm2_dir, tmp_path):
    adapter, fused = tmp_path / "adapter", tmp_path / "fused"
    sizes = ["--calib-tokens", 256, "--heldout-tokens", 128, "--seq-len", 128]
    run_cli("init", smollm2_dir, "--out", adapter, "--bits", 4, "--group-size", 64, "--rank", 4, *sizes,
            "--target-modules", "q_proj,down_proj", "--quiet")  # fmt: skip
    run_cli("fuse", adapter, "--out", fused, "--verify-tokens", 0)
    from qwha_export.data import lee_corpus_text, token_chunks
    from qwha_export.models import load_causal_lm

    _, tok = load_causal_lm(smollm2_dir)
    chunks = token_chunks(tok, lee_corpus_text(), 128, max_tokens=512, from_end=True)
    streamed = verify_export(fused, adapter, chunks=chunks)
    whole = whole_model_verify(fused, adapter, chunks)
    print(json.dumps({"streamed": streamed, "whole": whole}))
    assert_same_numbers(streamed, whole)
    assert math.isfinite(streamed["ppl_reference"]) and streamed["top1_agreement"] == 1.0


# ----------------------------------------------------------------------------------------------------------------------
# calibration Grams of merge / refit, streamed block by block
# ----------------------------------------------------------------------------------------------------------------------


def _whole_model_grams(base: Path, n_tokens: int, seq_len: int) -> dict[str, torch.Tensor]:
    """The Grams as merge computed them before streaming: the whole base model loaded, all blocks' Grams kept."""
    from qwha_export.converters.calibration import iter_block_grams
    from qwha_export.data import lee_corpus_text, token_chunks
    from qwha_export.models import load_causal_lm

    model, tokenizer = load_causal_lm(base)
    chunks = token_chunks(tokenizer, lee_corpus_text(), seq_len, max_tokens=n_tokens)
    grams: dict[str, torch.Tensor] = {}
    for _, _, block_grams in iter_block_grams(model, chunks, batch_size=4, sequential=False):
        grams.update(block_grams)
    return grams


def test_streamed_calibration_grams_equal_whole_model_and_refuse_going_back(flow):
    from qwha_export.pipeline import calibration_grams

    whole = _whole_model_grams(flow["base"], 256, 64)
    with calibration_grams(flow["trained"], 256, 64) as grams:
        names = list(grams)
        assert len(grams) == len(names) and names == sorted(names, key=lambda n: int(n.split(".")[2]))
        assert "model.layers.1.mlp.down_proj" in grams and grams._index == -1  # `in` runs nothing
        assert grams.get("lm_head") is None
        for name in names:
            assert torch.equal(grams[name], whole[name]), name
        with pytest.raises(RuntimeError, match="block 0 were dropped when block 1 ran"):
            grams["model.layers.0.self_attn.q_proj"]


def test_merge_report_from_streamed_grams_equals_whole_model_grams(flow, tmp_path):
    """The merge's calibration report (written by the `merge` command in the flow) has the numbers the whole-model
    Grams give, to the last bit."""
    from qwha_export.converters.merge import stream_merge

    written = json.loads((flow["gptq"] / "qwha_export.json").read_text())
    whole = _whole_model_grams(flow["base"], 256, 256)
    ref = stream_merge(flow["trained"], tmp_path / "ref", bits=4, group_size=None, requant="rtn", fmt="gptq",
                       grams=whole)  # fmt: skip
    keys = ("rel_err_requant_vs_merged", "rel_err_base_vs_merged", "kept_fraction")
    got = [{k: r.get(k) for k in ("name", *keys)} for r in written["layers"]]
    want = [{k: r.get(k) for k in ("name", *keys)} for r in ref["layers"]]
    assert sorted(got, key=lambda r: r["name"]) == sorted(want, key=lambda r: r["name"])
    assert any(r["rel_err_requant_vs_merged"] is not None for r in got)
    assert written["total"] == ref["total"]


def test_merge_report_from_input_rows_equals_grams(flow, tmp_path):
    """With fewer calibration tokens than a layer has inputs, `merge` (rtn) keeps each layer's input rows instead of
    its Gram (``||X A^T||^2`` instead of ``tr(A G A^T)``): the report's numbers are the Grams' to 1e-10, and the
    written weights are the same."""
    from qwha_export.converters.calibration import InputRows
    from qwha_export.converters.merge import stream_merge
    from qwha_export.pipeline import calibration_grams

    whole = _whole_model_grams(flow["base"], 48, 16)
    with calibration_grams(flow["trained"], 48, 16, rows_when_smaller=True) as rows:
        assert all(isinstance(rows[name], InputRows) for name in rows)  # 48 tokens < every layer's d_in
        n_layers = len(rows)
    with calibration_grams(flow["trained"], 48, 16, rows_when_smaller=True) as rows:
        got = stream_merge(flow["trained"], tmp_path / "rows", bits=4, group_size=None, requant="rtn",
                           fmt="gptq_v2", grams=rows)  # fmt: skip
    want = stream_merge(flow["trained"], tmp_path / "grams", bits=4, group_size=None, requant="rtn", fmt="gptq_v2",
                        grams=whole)  # fmt: skip
    keys = ("rel_err_requant_vs_merged", "rel_err_base_vs_merged", "kept_fraction")
    by_name = {r["name"]: r for r in want["layers"]}
    checked = 0
    for r in got["layers"]:
        for k in keys:
            if r.get(k) is not None:
                assert r[k] == pytest.approx(by_name[r["name"]][k], rel=1e-10, abs=1e-12), (r["name"], k)
                checked += 1
    assert checked >= 2 * n_layers
    for shard in sorted((tmp_path / "grams").glob("*.safetensors")):
        assert (tmp_path / "rows" / shard.name).read_bytes() == shard.read_bytes()


INIT_MEASURE = textwrap.dedent(
    """
    import sys
    from qwha_export.cli import main
    sys.argv = ["qwha-export", "init", sys.argv[1], "--out", sys.argv[2], "--bits", "4", "--rank", "2",
                "--target-modules", "q_proj,down_proj", "--calib-tokens", "256", "--heldout-tokens", "128",
                "--seq-len", "64", "--quiet"]
    try:
        main()
    except SystemExit as e:
        assert not e.code, e.code
    print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
    """
)


@pytest.mark.slow
def test_streamed_init_peak_rss_flat_in_depth(tmp_path):
    """`init` on random Llamas with 67 MB float32 blocks: 8 blocks peak within 15% of 2 blocks (the whole-model
    init held every block: +400 MB)."""
    from tiny_adapter import save_byte_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    peaks = {}
    for layers in (2, 8):
        base = tmp_path / f"base{layers}"
        config = LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=128)  # fmt: skip
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(str(base))
        save_byte_tokenizer(base)
        run = subprocess.run([sys.executable, "-c", INIT_MEASURE, str(base), str(tmp_path / f"adapter{layers}")],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        peaks[layers] = int(run.stdout.split()[-1]) / 1024  # MiB
    print(f"streamed init peak RSS: {peaks[2]:.0f} MiB at 2 blocks, {peaks[8]:.0f} MiB at 8 blocks (67 MB blocks)")
    assert peaks[8] <= 1.15 * peaks[2], peaks


def test_in_step_lets_go_of_each_step_and_is_strict():
    """``in_step`` advances walks together without holding the previous step's items while the next are made (what
    ``zip`` does), and walks of different lengths are an error, as with ``zip(strict=True)``."""
    import gc
    import weakref

    from qwha_export.converters.block_stream import in_step

    class Item:
        pass

    refs: list[tuple[int, weakref.ref]] = []  # (step, item) of every walk
    old_alive: list[bool] = []  # when an item is made: is an item of an earlier step still alive?

    def make(step: int) -> Item:
        gc.collect()
        old_alive.append(any(s < step and r() is not None for s, r in refs))
        item = Item()
        refs.append((step, weakref.ref(item)))
        return item

    def walk(n: int):  # holds no reference to what it yielded
        for step in range(n):
            yield make(step)

    steps = 0
    for a, b in in_step(walk(3), walk(3)):
        steps += 1
        del a, b
    assert steps == 3 and len(old_alive) == 6 and not any(old_alive)
    for lengths in ((3, 2), (2, 3)):
        with pytest.raises(ValueError, match="different lengths"):
            for _ in in_step(walk(lengths[0]), walk(lengths[1])):
                pass
