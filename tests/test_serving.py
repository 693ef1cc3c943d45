"""Serving exported ONNX folders with onnxruntime (qwha_export.serving and `qwha-export generate`).

A tiny random Llama with a byte-level tokenizer and a chat template is exported with our exporter (and, when
onnxruntime-genai is installed, with its model builder, whose GroupQueryAttention graph has no position_ids and
needs right padding); generation is checked against transformers' own ``generate`` on the same weights.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from native_ops import use_ops

from qwha_export.cli import main as cli
from qwha_export.serving import GenerationConfig, IncrementalDecoder, OnnxCausalLM, select_next_tokens

SPECIALS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
EOS = [2, 7]
CONTEXT = 96


def byte_level_tokenizer():
    """A real fast tokenizer: one token per UTF-8 byte (so characters span tokens), 3 specials, a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(SPECIALS)} | {c: i + len(SPECIALS) for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|pad|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory, tokenizer):
    """``(folder, model)``: a seeded tiny Llama (GQA 4/2 heads, context 96) saved with tokenizer + EOS list."""
    from transformers import GenerationConfig as HFGenerationConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init is ~N(0, 0.02): scale up so logits are far from ties
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    model.generation_config = HFGenerationConfig(bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    folder = tmp_path_factory.mktemp("serving") / "hf"
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder, model


@pytest.fixture(scope="module")
def ours(tiny_hf, tmp_path_factory):
    from qwha_export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("serving_ours") / "onnx"
    export_onnx(tiny_hf[0], out, quiet=True)
    return out


@pytest.fixture(scope="module")
def builder(tiny_hf, tmp_path_factory):
    pytest.importorskip("onnxruntime_genai")
    out = tmp_path_factory.mktemp("serving_builder") / "onnx"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(tiny_hf[0]), "-o", str(out)]
    r = subprocess.run([*cmd, "-p", "fp32", "-e", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="module", params=["ours", "builder"])
def lm(request):
    """The tiny model served from our export and from the onnxruntime-genai builder's export."""
    return OnnxCausalLM.from_folder(request.getfixturevalue(request.param), provider="cpu")


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy ``generate`` for exactly ``n`` tokens (no EOS stop, no EOS suppression)."""
    from transformers import GenerationConfig as HFGenerationConfig

    ids = torch.tensor([prompt])
    gen = HFGenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=[], pad_token_id=0)  # [] = no EOS
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
    return out[0, len(prompt) :].tolist()


# --------------------------------------------------------------------------------------------------------------
# pure pieces


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 2.5}, "max_new_tokens"),
        ({"do_sample": True, "temperature": 0.0}, "temperature"),
        ({"do_sample": True, "temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": -3}, "seed"),
        ({"eos_token_id": (2, -1)}, "eos_token_id"),
    ],
)
def test_generation_config_rejects(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        GenerationConfig(**kwargs)


def test_greedy_temperature_is_unused():
    assert GenerationConfig(temperature=0.0).do_sample is False  # greedy ignores temperature


def test_nucleus_and_top_k_limits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 50)).astype(np.float32) * 3
    greedy = logits.argmax(-1)
    tiny_p = GenerationConfig(do_sample=True, top_p=1e-9, temperature=5.0)
    assert (select_next_tokens(logits, tiny_p, rng) == greedy).all()
    assert (select_next_tokens(logits, GenerationConfig(do_sample=True, top_k=1), rng) == greedy).all()
    # top_p = 0.5 only ever picks from the smallest head of the distribution holding >= half the mass
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    cfg = GenerationConfig(do_sample=True, top_p=0.5, seed=0)
    picks = np.stack([select_next_tokens(logits, cfg, rng) for _ in range(200)])
    for row in range(5):
        order = np.argsort(-probs[row])
        head = order[: int(np.searchsorted(np.cumsum(probs[row][order]), 0.5) + 1)]
        assert set(picks[:, row]) <= set(head.tolist())


def test_incremental_decoder_holds_back_partial_characters(tokenizer):
    text = "héllo, 世界 🌍!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte: characters span tokens
    dec = IncrementalDecoder(tokenizer)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces[:-1]  # something was held back until its character completed


# --------------------------------------------------------------------------------------------------------------
# the tiny model in onnxruntime


def test_folder_settings(lm):
    assert lm.context_length == CONTEXT
    assert set(EOS) <= set(lm.eos_token_ids)
    assert lm.device == "cpu"


def test_kv_cache_logits_equal_full_sequence(lm):
    ids = np.random.default_rng(0).integers(3, 259, size=(1, 24))
    full = lm.logits(ids)[0]
    scale = np.abs(full).max()
    k = 9
    mask = np.ones((1, k), dtype=np.int64)
    logits, past = lm.forward(ids[:, :k], mask, lm.empty_past(1))
    steps = [logits[0]]
    for t in range(k, ids.shape[1]):
        mask = np.ones((1, t + 1), dtype=np.int64)
        logits, past = lm.forward(ids[:, t : t + 1], mask, past)
        steps.append(logits[0])
    cached = np.concatenate(steps, axis=0)
    assert cached.shape == full.shape
    assert np.abs(cached - full).max() <= 1e-4 * scale


def test_greedy_32_tokens_match_transformers(lm, tiny_hf):
    _, model = tiny_hf
    for prompt in lm.encode(["hello there", "Walsh-Hadamard"]):
        ours = lm.generate_ids([prompt], GenerationConfig(max_new_tokens=32, ignore_eos=True)).token_ids[0]
        assert ours == hf_greedy(model, prompt, 32)


def test_padded_batch_equals_each_prompt_alone(lm):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 259, size=n).tolist() for n in (3, 17, 9)]
    cfg = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    batch = lm.generate_ids(prompts, cfg).token_ids
    alone = [lm.generate_ids([p], cfg).token_ids[0] for p in prompts]
    assert batch == alone


def test_sampling_is_reproducible_with_a_seed(lm):
    prompt = [lm.encode(["sample me"])[0]]

    def run(seed):
        cfg = GenerationConfig(max_new_tokens=32, do_sample=True, temperature=2.0, seed=seed, ignore_eos=True)
        return lm.generate_ids(prompt, cfg).token_ids[0]

    first = run(11)
    assert run(11) == first
    assert run(12) != first
    greedy = lm.generate_ids(prompt, GenerationConfig(max_new_tokens=32, ignore_eos=True)).token_ids[0]
    nucleus = GenerationConfig(max_new_tokens=32, do_sample=True, temperature=2.0, top_p=1e-6, seed=5, ignore_eos=True)
    assert lm.generate_ids(prompt, nucleus).token_ids[0] == greedy


def test_eos_stops_generation(lm):
    prompt = lm.encode(["stop"])[0]
    free = lm.generate_ids([prompt], GenerationConfig(20, ignore_eos=True)).token_ids[0]
    stop = free[5]
    out = lm.generate_ids([prompt], GenerationConfig(20, eos_token_id=(stop, 999)))
    first = free.index(stop)
    assert out.token_ids[0] == free[: first + 1]
    assert out.finish_reasons == ["eos"]
    # the folder's own EOS list: generation stops at the first of them (or runs to the limit)
    out = lm.generate_ids([prompt], GenerationConfig(20))
    hits = [i for i, t in enumerate(free) if t in EOS]
    assert out.token_ids[0] == (free[: hits[0] + 1] if hits else free)


def test_stream_pieces_join_to_the_text(lm):
    got: dict[int, list[str]] = {0: [], 1: []}
    out = lm.generate(["é", "one two"], GenerationConfig(24, ignore_eos=True), stream=lambda i, s: got[i].append(s))
    assert ["".join(got[0]), "".join(got[1])] == out.texts
    assert all(len(t) == 24 for t in out.token_ids)


def test_chat_template_on_by_default(lm, tokenizer):
    templated = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    templated = templated["input_ids"] if hasattr(templated, "keys") else templated
    assert lm.encode(["hi"]) == [list(templated)]
    assert lm.encode(["hi"], chat_template=False) == [tokenizer("hi")["input_ids"]]


def test_prompt_longer_than_context(lm):
    with pytest.raises(ValueError, match="context"):
        lm.generate_ids([[5] * (CONTEXT + 4)], GenerationConfig(4))
    out = lm.generate_ids([[5] * (CONTEXT - 3)], GenerationConfig(10, ignore_eos=True))
    assert len(out.token_ids[0]) == 3 and out.finish_reasons == ["context"]


def test_builder_graph_is_right_padded(builder):
    """The builder's GroupQueryAttention graph has no position_ids and reads row lengths from the mask."""
    lm = OnnxCausalLM.from_folder(builder, provider="cpu")
    assert lm.pad_right and not lm.has_position_ids


# --------------------------------------------------------------------------------------------------------------
# QWHA sources: the fused adapter export generates exactly what the PyTorch QWHA model generates


@pytest.fixture(scope="module")
def fused_export(tmp_path_factory):
    """``(onnx folder, fused PyTorch model)`` of a tiny QWHA adapter (tests/tiny_adapter.py)."""
    from tiny_adapter import build_adapter_dir

    from qwha_export.fused import load_fused, write_fused
    from qwha_export.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("fused_serving")
    adir, _, _ = build_adapter_dir(root)
    write_fused(adir, root / "fused")
    export_onnx(root / "fused", root / "onnx", quiet=True)
    return root / "onnx", load_fused(root / "fused")[0]


@pytest.mark.parametrize("ops", ["native", "function"])
def test_fused_export_greedy_matches_pytorch(ops, fused_export, monkeypatch):
    use_ops(monkeypatch, ops)
    folder, model = fused_export
    lm = OnnxCausalLM.from_folder(folder, provider="cpu")
    assert lm.qwha_ops == ops
    prompt = [3, 14, 15, 92, 65]
    ours = lm.generate_ids([prompt], GenerationConfig(32, ignore_eos=True)).token_ids[0]
    assert ours == hf_greedy(model, prompt, 32)


def test_fused_batched_decode_native_equals_function_and_each_prompt_alone(fused_export, monkeypatch):
    """Batched decode steps (the step branch: native kernels, or the step function bodies) give each prompt the
    tokens it gets alone."""
    folder, model = fused_export
    prompts = [[3, 14, 15, 92, 65], [7, 1], [200, 201, 202, 9]]
    outs = {}
    for ops in ("native", "function"):
        use_ops(monkeypatch, ops)
        lm = OnnxCausalLM.from_folder(folder, provider="cpu")
        outs[ops] = lm.generate_ids(prompts, GenerationConfig(16, ignore_eos=True)).token_ids
    assert outs["native"] == outs["function"] == [hf_greedy(model, p, 16) for p in prompts]


# --------------------------------------------------------------------------------------------------------------
# CLI


def _run(args):
    result = CliRunner().invoke(cli, ["generate", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_cli_streams_the_greedy_text(ours):
    code, out, err = _run([ours, "--prompt", "hello there", "--max-new-tokens", "16", "--provider", "cpu"])
    assert code == 0, err
    lm = OnnxCausalLM.from_folder(ours, provider="cpu")
    text = lm.generate(["hello there"], GenerationConfig(16)).texts[0]
    assert out == text + "\n"
    assert "prefill" in err
    code, out, _ = _run([ours, "--prompt", "a", "--prompt", "bcd", "--max-new-tokens", "4", "--quiet"])
    assert code == 0 and out.count("--- prompt") == 2


@pytest.fixture(scope="module")
def broken(ours, tmp_path_factory):
    """Copies of our tiny export: without model.onnx, and with external data whose file is missing."""
    root = tmp_path_factory.mktemp("serving_broken")
    no_model = root / "no_model"
    shutil.copytree(ours, no_model)
    for f in no_model.glob("model.onnx*"):
        f.unlink()
    no_data = root / "no_data"
    shutil.copytree(ours, no_data, ignore=shutil.ignore_patterns("model.onnx*"))
    proto = onnx.load(str(Path(ours) / "model.onnx"))
    onnx.save(proto, str(no_data / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    (no_data / "model.onnx.data").unlink()
    return no_model, no_data


@pytest.mark.parametrize(
    ("case", "extra", "needle"),
    [
        ("no_model", [], "model.onnx"),
        ("no_data", [], "model.onnx.data"),
        ("ok", ["--no-chat-template", "--prompt", "x" * (CONTEXT + 1)], "context"),
        ("ok", ["--sample", "--temperature", "0"], "temperature"),
        ("ok", ["--top-p", "1.5"], "--top-p"),
        ("ok", ["--max-new-tokens", "0"], "--max-new-tokens"),
        ("missing", [], "does not exist"),
    ],
)
def test_cli_errors_are_one_line(case, extra, needle, ours, broken, tmp_path):
    folder = {"ok": ours, "no_model": broken[0], "no_data": broken[1], "missing": tmp_path / "nope"}[case]
    code, out, err = _run([folder, "--prompt", "hi", *extra])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], err
    assert "Traceback" not in err
