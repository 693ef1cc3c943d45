"""The architecture registry on a tiny random model of every supported ``model_type``, through the real CLI.

Each architecture (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3) is saved as a Hugging Face folder with a
real byte-level tokenizer; then ``init`` (RTN 4-bit g32, rank 2, Lee calibration) -> ``fuse`` -> ``verify`` must give
top-1 1.000 against the training-time model, and ``merge --bits 16 --format dense --dtype float32`` must reproduce
it (the dense merge is the training-time model with ``F·H⁻¹`` added to the dequantized weights). Sliding windows are
tiny (8 keys) and the sequences 64 tokens, so local layers really differ from global ones. Bad input: an
unsupported ``model_type``, a hidden size with no Hadamard transform and a config.json that disagrees with its
weights are one-line errors with exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from flow_folders import run_cli
from tiny_adapter import save_byte_tokenizer, tiny_config

from qwha_export.cli import main
from qwha_export.converters.architectures import (
    ARCHITECTURES,
    SUPPORTED_MODEL_TYPES,
    ModelType,
    architecture_for,
    decoder_layers,
    describe,
)
from qwha_export.converters.calibration import iter_block_grams

WINDOW = 8
GEMMA_TYPES = ["sliding_attention", "full_attention"]
GEMMA = {"head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": WINDOW, "layer_types": GEMMA_TYPES,
         "tie_word_embeddings": True, "pad_token_id": 0}  # fmt: skip
ROPE_LOCAL, ROPE_GLOBAL = ({"rope_type": "default", "rope_theta": theta} for theta in (10_000.0, 1_000_000.0))
# model_type -> (config class name, model class name, extra config keys)
TINY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", GEMMA),
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {**GEMMA, "rope_parameters": {"sliding_attention": ROPE_LOCAL, "full_attention": ROPE_GLOBAL}},
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "sliding_window": WINDOW}),
}


def tiny_model(model_type: str, hidden: int = 64, seed: int = 0, **more):
    import transformers

    cfg_name, model_name, extra = TINY[model_type]
    kwargs = tiny_config(vocab=257, hidden=hidden, max_positions=128, bos_token_id=256, eos_token_id=256)
    config = getattr(transformers, cfg_name)(**{**kwargs, **extra, **more})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # random N(0, 0.02) weights give ~uniform logits; give them range so top-1 is meaningful
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(8.0 if "embed" in name or "lm_head" in name else 3.0)
            elif "norm" in name:  # Gemma's start at 0 (applied as 1 + w), the others at 1: make them differ
                p.add_(0.2 * torch.randn_like(p))
    return model


def write_base(path: Path, model_type: str, hidden: int = 64, **more) -> Path:
    save_byte_tokenizer(path)
    tiny_model(model_type, hidden, **more).save_pretrained(str(path))
    return path


def _cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_error_line(result, needle: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    assert needle in lines[0], lines[0]
    return lines[0]


def test_registry_covers_the_supported_types():
    assert set(SUPPORTED_MODEL_TYPES) == set(TINY)
    assert architecture_for("phi3").target_modules == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    with pytest.raises(ValueError, match=r"^model_type 'gpt2' is not supported; supported: llama, mistral, qwen2"):
        architecture_for({"model_type": "gpt2"})


@pytest.mark.parametrize("model_type", list(TINY))
def test_layout_and_targets_match_transformers(model_type):
    """Every path the entry names exists in transformers' model, and the resolved layout matches what it computes."""
    model = tiny_model(model_type)
    arch = ARCHITECTURES[ModelType(model_type)]
    layers = decoder_layers(model)
    assert layers == list(model.model.layers)
    for block in layers:
        for path in arch.linear_paths():
            assert isinstance(block.get_submodule(path), torch.nn.Linear), path
        for norm in arch.block_norms:
            assert block.get_submodule(norm).weight.shape == (64,)
        assert hasattr(block.self_attn, "q_norm") == arch.qk_norm
    linears = {n.rsplit(".", 1)[-1] for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == set(arch.target_modules)  # no linear of the block is left out by default
    layout = describe(model.config)
    assert [blk.self_attn.scaling for blk in layers] == [layout.attention_scale] * len(layers)
    windows = [getattr(blk.self_attn, "sliding_window", None) for blk in layers]
    if model_type in ("mistral", "phi3"):  # one window for every layer, read from the config by the mask
        assert layout.layer_types == ("sliding_attention",) * 2 and layout.window == WINDOW
    else:
        assert [w if w else None for w in windows] == [
            layout.window if t == "sliding_attention" else None for t in layout.layer_types
        ]
    embed = model.get_input_embeddings()
    ids = torch.tensor([[3, 5]])
    torch.testing.assert_close(embed(ids), embed.weight[ids] * layout.embed_scale, rtol=1e-6, atol=0)
    assert layout.tied_head == (model.lm_head.weight.data_ptr() == embed.weight.data_ptr())
    x = torch.randn(2, 64)
    norm = layers[0].input_layernorm
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layout.rms_eps) * (layout.norm_offset + norm.weight)
    torch.testing.assert_close(norm(x), ref, rtol=1e-5, atol=1e-6)
    if model_type == "gemma3_text":
        assert layout.rope["sliding_attention"]["rope_theta"] == 10_000.0
        assert layout.rope["full_attention"]["rope_theta"] == 1_000_000.0
        assert layout.activation == "gelu_pytorch_tanh"


def test_calibration_gives_each_block_its_own_mask_and_rope():
    """Gemma 3: the block-by-block calibration reproduces the full forward's activations of the global layer too
    (it receives the full causal mask and the global RoPE, not block 0's local ones)."""
    model = tiny_model("gemma3_text")
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda _m, a, _o, n=n: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1]).double()))
        for n, m in model.named_modules()
        if n.endswith("o_proj")
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    for _, _, grams in iter_block_grams(model, ids, ("o_proj",), batch_size=2, sequential=False):
        for name, gram in grams.items():
            ref = seen[name].T @ seen[name]
            torch.testing.assert_close(gram, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item(), msg=name)


@pytest.mark.parametrize("model_type", list(TINY))
def test_init_fuse_verify_merge(model_type, tmp_path):
    base = write_base(tmp_path / "base", model_type)
    adapter, fused, dense = tmp_path / "adapter", tmp_path / "fused", tmp_path / "dense"
    run_cli("init", base, "--out", adapter, "--bits", 4, "--group-size", 32, "--rank", 2, "--calib-tokens", 256,
            "--heldout-tokens", 128, "--seq-len", 64, "--quiet")  # fmt: skip
    meta = json.loads((adapter / "qwha_base.json").read_text())
    arch = architecture_for(model_type)
    assert meta["model_type"] == model_type and meta["target_modules"] == list(arch.target_modules)
    assert len(meta["quantized_layers"]) == 2 * len(arch.target_modules) and not meta["skipped_layers"]
    report = json.loads((adapter / "init_report.json").read_text())["total"]
    assert report["rms_rel_err_after_calib"] < report["rms_rel_err_before_calib"]
    run_cli("fuse", adapter, "--out", fused, "--verify-tokens", 64)
    run_cli("merge", adapter, "--out", dense, "--bits", 16, "--format", "dense", "--dtype", "float32",
            "--verify-tokens", 0, "--calib-tokens", 0)  # fmt: skip
    for folder, kl_bound in ((fused, 1e-9), (dense, 1e-6)):
        printed = run_cli("verify", folder, "--against", adapter, "--tokens", 256, "--seq-len", 64, "--json")
        out = json.loads(printed[printed.index('{"tokens"') :].splitlines()[0])  # after the loaders' progress bars
        assert out["tokens"] >= 252 and out["top1_agreement"] == 1.0, (folder.name, out)
        assert out["kl_per_token"] <= kl_bound, (folder.name, out)
        assert abs(out["ppl_export"] - out["ppl_reference"]) <= 1e-3 * out["ppl_reference"], (folder.name, out)


def test_unsupported_architecture_is_one_line(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    save_byte_tokenizer(gpt2)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=257)).save_pretrained(gpt2)
    line = _one_error_line(_cli("init", gpt2, "--out", tmp_path / "a", "--quiet"), "model_type 'gpt2' is not supported")
    assert all(t in line for t in SUPPORTED_MODEL_TYPES)
    assert not (tmp_path / "a").exists()


def test_hidden_size_without_hadamard_order_is_one_line(tmp_path):
    # 100 = 25 * 4: the Hadamard order of odd part 25 is 200, so no K * 2^m gives 100
    base = write_base(tmp_path / "base", "llama", hidden=100, head_dim=16)
    line = _one_error_line(_cli("init", base, "--out", tmp_path / "a", "--quiet"), "hidden_size 100 has no Hadamard")
    assert "K*2^m" in line and "nearest: 84, 88, 96, 104, 108, 112" in line  # the sizes that work
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("num_hidden_layers", 3, "missing from the weights, e.g. model.layers.2."),
        ("num_hidden_layers", 1, "not in the config's model, e.g. model.layers.1."),
        (
            "layer_types",
            ["full_attention"],
            "is invalid: `num_hidden_layers` (2) must be equal to the number of `layer_types` (1)",
        ),
        (
            "intermediate_size",
            256,
            "6 tensor shape(s) differ, e.g. model.layers.0.mlp.down_proj.weight is 64x128 in the weights but 64x256",
        ),
    ],
)
def test_config_that_disagrees_with_weights_is_one_line(tmp_path, key, value, needle):
    base = write_base(tmp_path / "base", "qwen3" if key == "layer_types" else "llama")
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, key: value}))
    line = _one_error_line(_cli("init", base, "--out", tmp_path / "a", "--quiet"), needle)
    assert "config.json of" in line and ("disagrees with its weights" in line or "is invalid" in line)
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_gemma3_270m_real_init_fuse_verify(tmp_path):
    """The real Gemma 3 270M (gemma3_text: 5 local + 1 global layer pattern, q/k norm, 1 + w norms, GELU-tanh,
    sqrt(640) embedding scale, tied 262k head) at reduced sizes: init (RTN 4-bit g64, rank 4, q_proj and down_proj,
    whose inputs need the K=20 and the power-of-two transform) -> fuse -> verify top-1 1.000 on real held-out text
    -> export-onnx -> verify the ONNX session (top-1 >= 0.999) -> generate."""
    from qwha_export.models import embedded_path

    assert describe(json.loads((embedded_path("gemma3-270m") / "config.json").read_text())).window == 512
    adapter, fused = tmp_path / "adapter", tmp_path / "fused"
    sizes = ["--calib-tokens", 256, "--heldout-tokens", 256, "--seq-len", 128, "--target-modules", "q_proj,down_proj"]
    run_cli("init", "gemma3-270m", "--out", adapter, "--bits", 4, "--group-size", 64, "--rank", 4, *sizes, "--quiet")
    report = json.loads((adapter / "init_report.json").read_text())["total"]
    assert report["n_layers"] == 36 and report["rms_rel_err_after_heldout"] < report["rms_rel_err_before_heldout"]
    run_cli("fuse", adapter, "--out", fused, "--verify-tokens", 0)
    printed = run_cli("verify", fused, "--against", adapter, "--tokens", 512, "--seq-len", 128, "--json")
    out = json.loads(printed[printed.index('{"tokens"') :].splitlines()[0])
    assert out["tokens"] >= 500 and out["top1_agreement"] == 1.0 and out["kl_per_token"] <= 1e-9, out
    # the fused folder as ONNX (native qwha kernels when built, else the function bodies): same tokens, the ONNX
    # session against the training-time model, then greedy generation through onnxruntime
    run_cli("export-onnx", fused, "--out", tmp_path / "onnx", "--parity-tokens", 0, "--quiet")
    printed = run_cli("verify", tmp_path / "onnx", "--against", adapter, "--tokens", 512, "--seq-len", 128, "--json")
    out = json.loads(printed[printed.index('{"tokens"') :].splitlines()[0])
    print("Gemma 3 fused ONNX against the training-time model:", out)
    assert out["tokens"] >= 500 and out["top1_agreement"] >= 0.999 and out["kl_per_token"] <= 1e-6, out
    text = run_cli("generate", tmp_path / "onnx", "--prompt", "The capital of France is", "--no-chat-template",
                   "--max-new-tokens", 8, "--quiet")  # fmt: skip
    assert len(text.split()) >= 2, text  # 8 new tokens of text


def _tiny_gguf(path: Path, arch: str) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_input_refused_before_any_work_in_one_line(tmp_path, monkeypatch):
    """`init FILE.gguf`: an architecture transformers cannot read, one it reads but the registry does not support,
    and a file that is no GGUF are each one `Error:` line (exit 2), with nothing built or written."""
    monkeypatch.setenv("QWHA_CACHE", str(tmp_path / "cache"))
    cases = {
        "rwkv7": (_tiny_gguf(tmp_path / "m.gguf", "rwkv7"), "architecture 'rwkv7' cannot be loaded by transformers"),
        "gpt2": (_tiny_gguf(tmp_path / "g.gguf", "gpt2"), "model_type 'gpt2' is not supported; supported: llama"),
        "junk": (tmp_path / "junk.gguf", "is not a readable GGUF file"),
    }
    cases["junk"][0].write_bytes(b"not a gguf at all" * 10)
    for name, (path, needle) in cases.items():
        line = _one_error_line(_cli("init", path, "--out", tmp_path / f"out-{name}"), needle)
        assert "llama" in line or name == "junk", line
        assert not (tmp_path / f"out-{name}").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_gguf_file_becomes_a_cached_model_folder(tmp_path):
    """A GGUF transformers reads (SmolLM2's Q4_1 file) is de-quantized once into a float32 folder, then reused."""
    from qwha_export.models import gguf_model_path, smollm2_gguf_file

    folder = gguf_model_path(smollm2_gguf_file(), cache_root=tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg, cfg
    assert folder.parent == tmp_path and folder.name.startswith("gguf-SmolLM2-135M-Instruct.Q4_1-")
    assert gguf_model_path(smollm2_gguf_file(), cache_root=tmp_path) == folder  # built once
    assert describe(cfg).architecture is architecture_for("llama")
