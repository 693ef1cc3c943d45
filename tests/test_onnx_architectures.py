"""The ONNX graph per architecture (issue 14) against transformers' own modeling, on a tiny random model per type.

For every registered ``model_type`` (tests/test_architectures.py: llama, mistral, qwen2, qwen3, gemma2, gemma3_text,
phi3; sliding windows of 8 keys) three sources are exported with ``export_onnx`` and run in a real onnxruntime
session:

* ``dense``: the float32 Hugging Face folder (transformers' model is the reference);
* ``fused``: RTN 4-bit g32 base on every target linear plus a random QWHA spectrum on all of them but ``o_proj``
  (fused folder; the reference is the project's fused PyTorch model);
* ``merged``: the 4-bit gptq_v2 re-quantization of that adapter (quantized layers, no adapter).

Each must give logits equal to the reference within 1e-4 relative (max |diff| / max |ref|) on a full 24-token
sequence (three windows), one token at a time with the KV cache (present -> past) from 6 tokens on (so decode steps
run past the window), a 5-token chunk on a cache, and a left-padded batch (the padded row equals its unpadded
sequence, also after decode steps). The measured errors are printed and named in every failed assertion.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from native_ops import use_ops
from test_architectures import TINY, WINDOW, write_base

from qwha_export.converters.architectures import SUPPORTED_MODEL_TYPES, architecture_for, describe
from qwha_export.converters.onnx_export import check_config
from qwha_export.formats.onnx_folder import MODEL_FILE
from qwha_export.onnx_export import export_onnx, onnx_session
from qwha_export.verify import load_export

TOL = 1e-4
SEQ = 24  # > 2 windows of 8
VARIANTS = ("dense", "fused", "fused-function", "merged")  # fused: native qwha kernels if built; -function: bodies


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# the tiny models: every registered type; Gemma 3 at hidden 160 = 40 * 4 (q/k/v and gate/up inputs need H_40, as the
# real 270M's 640 = 20 * 32 needs H_20; the other sizes are powers of two); and with the 270M's attention shape
# (4 query heads, 1 KV head of dimension 256, query_pre_attn_scalar 256)
MODELS = {
    **{t: (t, {}) for t in TINY},
    "gemma3_text-h160": ("gemma3_text", {"hidden": 160}),
    "gemma3_text-270m-heads": (
        "gemma3_text",
        {"hidden": 160, "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256},
    ),
}


def _adapter_sources(base, root) -> dict:
    """Adapter dir on ``base`` (RTN 4-bit g32 on every target linear, random spectra on all but o_proj), its fused
    folder and its 4-bit gptq_v2 merge."""
    from peft import get_peft_model
    from tiny_adapter import write_adapter_dir
    from transformers import AutoModelForCausalLM

    from qwha_export.converters.merge import stream_merge
    from qwha_export.converters.quantize import quantize_rtn
    from qwha_export.fused import write_fused
    from qwha_export.quant_linear import QuantLinear, replace_linear
    from qwha_export.tuner import QWHAConfig, set_spectrum

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    targets = architecture_for(model.config).target_modules
    quantized = {
        name: quantize_rtn(mod.weight.detach(), 4, 32)
        for name, mod in model.named_modules()
        if name.rsplit(".", 1)[-1] in targets
    }
    for name, qw in quantized.items():
        replace_linear(model, name, QuantLinear.from_linear(model.get_submodule(name), qw))
    adapted = [t for t in targets if t != "o_proj"]
    peft_model = get_peft_model(model, QWHAConfig(target_modules=adapted, rank=4, scale=2.0, init="random"))
    gen = torch.Generator().manual_seed(1)
    for name in sorted(n for n in quantized if n.rsplit(".", 1)[-1] in adapted):
        d_out, d_in = quantized[name].shape
        flat = torch.randperm(d_out * d_in, generator=gen)[: 5 * d_out]
        set_spectrum(peft_model, name, torch.randn(flat.numel(), generator=gen), flat // d_in, flat % d_in)
    adir = write_adapter_dir(peft_model, quantized, root / "adapter", base)
    write_fused(adir, root / "fused")
    stream_merge(adir, root / "merged", bits=4, group_size=None, requant="rtn", fmt="gptq_v2", dtype=torch.float32)
    return {"fused": root / "fused", "merged": root / "merged"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(model_type, variant) -> (source folder, ONNX folder)``, built on first use."""
    cache: dict = {}

    def get(name: str, variant: str):
        if name not in cache:
            model_type, more = MODELS[name]
            root = tmp_path_factory.mktemp(name)
            base = write_base(root / "base", model_type, **more)
            srcs = {"dense": base, **_adapter_sources(base, root)}
            cache[name] = {
                v: (src, root / f"onnx_{v}", export_onnx(src, root / f"onnx_{v}", quiet=True, parity_tokens=0))
                for v, src in srcs.items()
            }
        return cache[name][variant]

    return get


class _Runner:
    def __init__(self, folder):
        self.s, self.qwha_ops = onnx_session(folder)
        past = [i for i in self.s.get_inputs() if i.name.startswith("past_key_values.")]
        self.layers, self.kv, self.hd = len(past) // 2, past[0].shape[1], past[0].shape[3]

    def __call__(self, ids, mask, pos, past=None):
        if past is None:
            past = [np.zeros((ids.shape[0], self.kv, 0, self.hd), np.float32)] * (2 * self.layers)
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        out = self.s.run(None, feed)
        return out[0], out[1:]


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.float().numpy()


def parity_errors(run: _Runner, model, seq: int = SEQ, prefill: int = 6, pad: int = 5) -> dict[str, float]:
    """Relative max errors of the ONNX session ``run`` against ``model`` (see the module docstring)."""
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 256, (2, seq)).astype(np.int64)
    ones = np.ones_like(ids)
    ref = _torch_logits(model, ids)
    err = {}
    full, _ = run(ids, ones, np.tile(np.arange(seq), (2, 1)))
    err["full"] = _rel(full, ref)
    logits, past = run(ids[:, :prefill], ones[:, :prefill], np.tile(np.arange(prefill), (2, 1)))
    steps = [logits]
    for t in range(prefill, seq):  # one token at a time, present -> past, far past the window
        logits, past = run(ids[:, t : t + 1], np.ones((2, t + 1), np.int64), np.full((2, 1), t), past)
        steps.append(logits)
    err["decode"] = _rel(np.concatenate(steps, axis=1), ref)
    logits, past = run(ids[:1, :prefill], ones[:1, :prefill], np.arange(prefill)[None])
    steps = [logits]
    for t in range(prefill, seq):  # batch 1 (the fused graph's single-row decode branch)
        logits, past = run(ids[:1, t : t + 1], np.ones((1, t + 1), np.int64), np.array([[t]]), past)
        steps.append(logits)
    err["decode_batch1"] = _rel(np.concatenate(steps, axis=1), ref[:1])
    cut = seq - 8
    _, past = run(ids[:, :cut], ones[:, :cut], np.tile(np.arange(cut), (2, 1)))
    chunk, _ = run(ids[:, cut : cut + 5], ones[:, : cut + 5], np.tile(np.arange(cut, cut + 5), (2, 1)), past)
    err["chunk"] = _rel(chunk, ref[:, cut : cut + 5])
    ids_p, mask = ids.copy(), ones.copy()  # row 1 left-padded: equals its unpadded sequence
    ids_p[1, :pad], mask[1, :pad] = 0, 0
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    logits, past = run(ids_p, mask, pos)
    short = _torch_logits(model, ids[1:, pad:])
    err["left_pad"] = max(_rel(logits[0], ref[0]), _rel(logits[1, pad:], short[0]))
    nxt = rng.integers(0, 256, (2, 3)).astype(np.int64)
    steps = []
    for j in range(3):
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        step, past = run(nxt[:, j : j + 1], mask, pos[:, -1:] + 1 + j, past)
        steps.append(step)
    longer = _torch_logits(model, np.concatenate([ids[1:, pad:], nxt[1:]], axis=1))
    err["left_pad_decode"] = _rel(np.concatenate(steps, axis=1)[1], longer[0, -3:])
    return err


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_type", list(MODELS))
def test_onnx_matches_transformers(model_type, variant, exported, monkeypatch):
    src, folder, report = exported(model_type, variant.split("-")[0])
    use_ops(monkeypatch, "function" if variant == "fused-function" else None)
    model, _ = load_export(src)
    run = _Runner(folder)
    assert (run.qwha_ops == "function") == (variant == "fused-function"), run.qwha_ops
    err = parity_errors(run, model)
    print(f"{model_type} {variant} ({run.qwha_ops}): " + json.dumps({k: float(f"{v:.3g}") for k, v in err.items()}))
    assert max(err.values()) <= TOL, (model_type, variant, err)
    layout = describe(json.loads((folder / "config.json").read_text()))
    graph = onnx.load(str(folder / MODEL_FILE), load_external_data=False).graph
    nodes = list(graph.node) + [n for node in graph.node for a in node.attribute if a.g for n in a.g.node]
    gqa = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    per_layer = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in gqa[: layout.num_layers]]
    want = [WINDOW if t == "sliding_attention" else -1 for t in layout.layer_types]
    assert [a["local_window_size"] for a in per_layer] == want, per_layer
    assert all(abs(a["scale"] - layout.attention_scale) < 1e-7 for a in per_layer)
    assert [a.get("softcap", 0.0) for a in per_layer] == [pytest.approx(layout.attn_softcap or 0.0)] * len(want)
    # without q/k norms GQA takes the packed QKV and applies the rotary embedding itself (cache-slot positions;
    # the left_pad errors above show a padded row is unchanged); with them q and k are split, normed, rotated
    qk_norm = architecture_for(json.loads((folder / "config.json").read_text())).qk_norm
    assert [a["do_rotary"] for a in per_layer] == [int(not qk_norm)] * len(want), per_layer
    rotary = [n for n in nodes if n.op_type == "RotaryEmbedding"]
    assert len(rotary) == (2 * len(gqa) if qk_norm else 0)
    assert all((n.input[1] == "" and n.input[7] != "") != qk_norm for n in gqa)
    if layout.window:  # the test sequence really runs past the window
        assert 2 * layout.window < SEQ
    assert report["graph"]["layer_types"] == list(layout.layer_types)


@pytest.mark.parametrize("delta", [-1, 1])
@pytest.mark.parametrize("model_type", ["mistral", "gemma3_text"])
def test_window_off_by_one_is_caught(model_type, delta, exported):
    """The parity checks can fail: the same graph with local_window_size = window -+ 1 (one key too few / many)
    differs from transformers past the window."""
    import onnxruntime as ort

    src, folder, _ = exported(model_type, "dense")
    proto = onnx.load(str(folder / MODEL_FILE))
    for node in proto.graph.node:
        for a in node.attribute:
            if node.op_type == "GroupQueryAttention" and a.name == "local_window_size" and a.i >= 0:
                a.i += delta
    run = _Runner(folder)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    run.s = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    err = parity_errors(run, load_export(src)[0])
    assert err["full"] > 100 * TOL and err["decode"] > 100 * TOL, err


_SHORT = [1.0 + 0.25 * i for i in range(8)]  # longrope factors per frequency (head_dim 16)
CONFIG_CASES = {  # (model_type, config keys): features the default tiny configs leave out
    "qwen3-bias-sliding": (
        "qwen3",
        {"attention_bias": True, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    ),
    "gemma3-linear-rope": (
        "gemma3_text",
        {
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            }
        },
    ),  # fmt: skip
    "phi3-longrope": (
        "phi3",
        {
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10_000.0,
                "short_factor": _SHORT,
                "long_factor": [4.0] * 8,
                "original_max_position_embeddings": 128,
            }
        },
    ),  # fmt: skip
    "mistral-untied-window-4": ("mistral", {"sliding_window": 4}),
    "gemma2-tight-softcaps": ("gemma2", {"attn_logit_softcapping": 1.5, "final_logit_softcapping": 3.0}),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_onnx_config_variants(case, tmp_path):
    """Attention biases with sliding layers (Qwen3), linear RoPE on Gemma 3's global layers only, static longrope
    (Phi-3), a window of 4: the dense export against transformers, same checks."""
    model_type, more = CONFIG_CASES[case]
    base = write_base(tmp_path / "base", model_type, **more)
    report = export_onnx(base, tmp_path / "onnx", quiet=True, parity_tokens=0)
    model, _ = load_export(base)
    cfg = model.config
    if case.startswith("qwen3"):
        assert model.model.layers[0].self_attn.q_proj.bias is not None and cfg.layer_types[1] == "sliding_attention"
    err = parity_errors(_Runner(tmp_path / "onnx"), model)
    print(f"{case}: " + json.dumps({k: float(f"{v:.3g}") for k, v in err.items()}))
    assert max(err.values()) <= TOL, (case, err)
    assert report["graph"]["layer_types"] == list(describe(cfg).layer_types)


def test_gemma2_softcapping_is_exercised(tmp_path):
    """With the caps of "gemma2-tight-softcaps" both reach the tanh range: without either, transformers' logits
    change (so that case's parity checks both); the default caps (50 / 30) barely bend the tiny model's scores."""
    model_type, more = CONFIG_CASES["gemma2-tight-softcaps"]
    model, _ = load_export(write_base(tmp_path / "base", model_type, **more))
    ids = np.random.default_rng(7).integers(0, 256, (2, SEQ)).astype(np.int64)
    ref = _torch_logits(model, ids)
    model.config.final_logit_softcapping = None
    assert _rel(_torch_logits(model, ids), ref) > 100 * TOL
    model.config.final_logit_softcapping = more["final_logit_softcapping"]
    for block in model.model.layers:
        block.self_attn.attn_logit_softcapping = None
    assert _rel(_torch_logits(model, ids), ref) > 20 * TOL  # measured 9e-3


def test_export_onnx_refuses_dynamic_rope_in_one_line(tmp_path):
    """A Phi-3 whose longrope switches to its long factors past 64 positions (of 128): exit 2, one line, no output."""
    from click.testing import CliRunner

    from qwha_export.cli import main

    rope = {**CONFIG_CASES["phi3-longrope"][1]["rope_parameters"], "original_max_position_embeddings": 64}
    base = write_base(tmp_path / "base", "phi3", rope_parameters=rope, original_max_position_embeddings=64)
    r = CliRunner().invoke(main, ["export-onnx", str(base), "--out", str(tmp_path / "o")])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert "rope_type 'longrope' switches to its long factors past original_max_position_embeddings=64" in lines[0]
    assert not (tmp_path / "o").exists()


def test_unsupported_configs_are_one_line_errors():
    with pytest.raises(ValueError, match=r"^model_type 'gpt2' cannot be exported to ONNX; supported: ") as exc:
        check_config({"model_type": "gpt2"})
    assert all(t in str(exc.value) for t in SUPPORTED_MODEL_TYPES) and "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="'gemma3' cannot be exported"):  # the multimodal wrapper
        check_config({"model_type": "gemma3"})
    phi3 = {"model_type": "phi3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 100, "max_position_embeddings": 8192}  # fmt: skip
    longrope = {"rope_type": "longrope", "original_max_position_embeddings": 4096, "short_factor": [1.0] * 8,
                "long_factor": [2.0] * 8, "rope_theta": 10000.0}  # fmt: skip
    with pytest.raises(ValueError, match=r"longrope.*not static, cannot be exported"):
        check_config({**phi3, "rope_parameters": longrope})
    check_config({**phi3, "max_position_embeddings": 4096, "rope_parameters": longrope})  # static: accepted
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5 is not supported"):
        check_config({**phi3, "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}})
    with pytest.raises(ValueError, match="activation 'relu' is not supported by the ONNX export"):
        check_config({**phi3, "hidden_act": "relu"})
