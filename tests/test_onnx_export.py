"""ONNX export (issue 5): MatMulNBits layout, the WalshHadamard function, fused-layer parity against the Triton
kernels, and whole-model parity (full sequence, KV cache, left padding) on a tiny Llama; CLI and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from native_ops import require_native, use_ops
from test_merge_errors import _byte_tokenizer
from tiny_adapter import build_adapter_dir, tiny_config, write_adapter_dir

from qwha_export.cli import main
from qwha_export.converters.onnx_export import nbits_linear, wht_factors
from qwha_export.converters.quantize import QuantizedWeight, quantize_rtn
from qwha_export.formats import ExportFormat
from qwha_export.formats.onnx_graph import Projection, SpectralAdapter, build_projection_model
from qwha_export.formats.onnx_ops import SPECTRAL_MODES as MODES
from qwha_export.formats.onnx_ops import matmul_nbits_tensors, wht_function, wht_node
from qwha_export.kernels import hadamard_order, wht
from qwha_export.onnx_export import DATA_FILE, MODEL_FILE, export_onnx, onnx_session, open_onnx_session
from qwha_export.quant_linear import QuantLinear
from qwha_export.verify import detect_format, load_export


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _qlinear(d_out: int, d_in: int, bits: int, group_size: int, seed: int = 0, act_order: bool = False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=gen)
    qw = quantize_rtn(w, bits, group_size)
    if act_order:  # a GPTQ act-order style mapping: group of column i = rank(i) // group_size
        rank = torch.argsort(torch.randperm(d_in, generator=gen))
        gs = qw.group_size
        qw = QuantizedWeight(qw.codes, qw.scales, qw.zeros, bits, gs, (rank // gs).to(torch.int32))
    lin = torch.nn.Linear(d_in, d_out, bias=False)
    return QuantLinear.from_linear(lin, qw), qw


# ----------------------------------------------------------------------------------------------------------------------
# MatMulNBits
# ----------------------------------------------------------------------------------------------------------------------


def _dequantize_matmul_nbits(b: np.ndarray, scales: np.ndarray, zp: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Reference reading of the MatMulNBits inputs per onnxruntime's ContribOperators.md (little-endian codes in
    each block's bytes; zero points packed the same way along the blocks of a row)."""
    n, n_blocks, blob = b.shape
    per = 8 // bits
    mask = (1 << bits) - 1
    shifts = np.arange(per) * bits
    codes = ((b.reshape(n, n_blocks * blob)[..., None] >> shifts) & mask).reshape(n, -1)[:, :k]
    zeros = ((zp[..., None] >> shifts) & mask).reshape(n, -1)[:, :n_blocks]
    block = blob * 8 // bits
    z = np.repeat(zeros, block, axis=1)[:, :k].astype(np.float32)  # a ragged last block: its first k columns
    return (codes.astype(np.float32) - z) * np.repeat(scales, block, 1)[:, :k]


@pytest.mark.parametrize(
    "bits,group_size,act_order,d_in",
    [
        (4, 32, False, 256),
        (4, 64, False, 256),
        (2, 64, False, 256),
        (3, 32, False, 256),
        (8, 128, False, 256),
        (4, -1, False, 256),
        (4, 64, True, 256),
        (4, 128, False, 320),  # ragged last group / block (64 of 128 columns)
        (4, 128, True, 320),
    ],
)
def test_matmul_nbits_dequantizes_to_identical_weights(bits, group_size, act_order, d_in):
    module, qw = _qlinear(96, d_in, bits, group_size, seed=bits, act_order=act_order)
    lin = nbits_linear(module)
    b, scales, zp = matmul_nbits_tensors(lin.codes, lin.zeros, lin.scales, lin.bits, lin.block_size)
    n_blocks = -(-d_in // lin.block_size)
    assert b.dtype == np.uint8 and b.shape == (96, n_blocks, lin.block_size * lin.bits // 8)
    assert zp.shape == (96, -(-n_blocks * lin.bits // 8))
    w = torch.from_numpy(_dequantize_matmul_nbits(b, scales, zp, lin.bits, d_in))
    want = qw.dequantize(torch.float32)
    if lin.perm is not None:  # act-order: the node reads x[..., perm]
        want = want[:, torch.from_numpy(lin.perm)]
    assert torch.equal(w, want)


@pytest.mark.parametrize(
    "bits,group_size,act_order,d_in",
    [(4, 32, False, 128), (2, 64, False, 128), (8, 64, False, 128), (4, 64, True, 128), (4, 128, True, 320)],
)
def test_matmul_nbits_node_matches_dequantized_matmul(bits, group_size, act_order, d_in):
    module, qw = _qlinear(64, d_in, bits, group_size, seed=7, act_order=act_order)
    model = build_projection_model([Projection(nbits_linear(module))], {})
    x = np.random.default_rng(0).standard_normal((3, 5, d_in)).astype(np.float32)
    y = _session(model).run(None, {"x": x})[0]
    ref = x.astype(np.float64) @ qw.dequantize(torch.float64).numpy().T
    assert _rel(y, ref) < 1e-5


# ----------------------------------------------------------------------------------------------------------------------
# WalshHadamard
# ----------------------------------------------------------------------------------------------------------------------


def _wht_model(n: int, rank: int) -> onnx.ModelProto:
    k, mats = wht_factors(n)
    dims = [f"d{i}" for i in range(rank - 1)] + [n]
    graph = onnx.helper.make_graph(
        [wht_node("x", "y", n, k, "wht")],
        "wht",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, dims)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, dims)],
    )
    return onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", 23), onnx.helper.make_opsetid("qwha", 1)],
        functions=[wht_function(n, k, mats, 23)],
        ir_version=10,
    )


@pytest.mark.parametrize("n", [12, 576, 1536, 4096])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 1, 7)])
def test_wht_function_matches_kernels(n, shape):
    model = _wht_model(n, len(shape) + 1)
    onnx.checker.check_model(model, full_check=True)
    fn = model.functions[0]
    assert (fn.domain, fn.name, fn.overload) == ("qwha", "WalshHadamard", f"n{n}")
    assert {n.op_type for n in fn.node} <= {"Shape", "Constant", "Reshape", "MatMul"}
    node = model.graph.node[0]
    assert {a.name: a.i for a in node.attribute} == {"n": n, "K": hadamard_order(n)[0]}
    x = torch.randn(*shape, n, generator=torch.Generator().manual_seed(n))
    y = _session(model).run(None, {"x": x.numpy()})[0]
    assert y.shape == x.shape
    assert _rel(y, wht(x.double()).numpy()) < 2e-6


# ----------------------------------------------------------------------------------------------------------------------
# one fused layer against the training-time Triton kernels (interpreter on CPU)
# ----------------------------------------------------------------------------------------------------------------------


def _function_ops(model: onnx.ModelProto) -> dict[tuple[str, str], set[str]]:
    return {(f.name, f.overload): {n.op_type for n in f.node} for f in model.functions}


@pytest.mark.parametrize("path", ["prompt", "step", "token"])
@pytest.mark.parametrize("d_in,density", [(576, 0.03), (1536, 0.02), (192, 0.5)])
def test_fused_layer_matches_triton_kernels(path, d_in, density):
    """The function bodies of qwha::SpectralAdd / SpectralAddDense (no native library registered) against the
    training-time Triton kernels; native kernels are compared in tests/test_ortops.py."""
    triton_spectral = pytest.importorskip("qwha_export.kernels.triton_spectral")
    if not triton_spectral.available():
        pytest.skip("needs triton (CUDA, or TRITON_INTERPRET=1)")
    from qwha_export.kernels import SpectralLayout
    from qwha_export.layer import adapter_coefficient

    d_outs = (64, 32, 32)  # three projections packed like q/k/v, the last one without adapter
    gen = torch.Generator().manual_seed(d_in)
    projs, refs = [], []
    x = torch.randn({"token": (1, 1, d_in), "step": (3, 1, d_in), "prompt": (2, 3, d_in)}[path], generator=gen)
    mode = "prompt" if path == "prompt" else "decode"  # decode bodies: one row (token) or a batch (step)
    for i, d_out in enumerate(d_outs):
        module, qw = _qlinear(d_out, d_in, 4, 64, seed=i)
        y = x @ qw.dequantize(torch.float32).T
        adapter = None
        if i < 2:
            nnz = int(density * d_out * d_in)
            flat = torch.randperm(d_out * d_in, generator=gen)[:nnz]
            rows, cols, values = flat // d_in, flat % d_in, torch.randn(nnz, generator=gen)
            coef = adapter_coefficient(2.0, d_in, d_out)
            layout = SpectralLayout.build(rows, cols, d_out, d_in)
            y = y + triton_spectral.spectral_adapter_triton(x, values, layout, coef)
            folded = (values.double() * coef).float().numpy()
            adapter = SpectralAdapter(rows.numpy(), cols.numpy(), folded, hadamard_order(d_in)[0])
        projs.append(Projection(nbits_linear(module), None, adapter))
        refs.append(y)
    model = build_projection_model(projs, {d_in: wht_factors(d_in)}, mode=mode)
    ops, bodies = {n.op_type for n in model.graph.node}, _function_ops(model)
    if density > 0.45:  # dense above 30% of the packed output (2 of 3 adapted): a float32 MatMul in every mode
        assert {"SpectralAddDense", "MatMulNBits"} <= ops and list(bodies) == [("SpectralAddDense", f"n{d_in}")]
        assert not bodies[("SpectralAddDense", f"n{d_in}")] & {"ScatterElements", "GatherElements"}
    else:  # sparse: GatherElements for decode steps, F.T scattered at run time + MatMul for any number of tokens
        assert {"SpectralAdd", "MatMulNBits"} <= ops and list(bodies) == [("SpectralAdd", f"n{d_in}_{mode}")]
        body = bodies[("SpectralAdd", f"n{d_in}_{mode}")]
        assert ("If" in body) == (mode == "decode") and ("ScatterElements" in body) == (mode == "prompt")
        if mode == "decode":  # If(one row): GatherElements on [1, 1, n], else on the flattened batch
            (branch_if,) = [n for f in model.functions for n in f.node if n.op_type == "If"]
            assert all("GatherElements" in {n.op_type for n in a.g.node} for a in branch_if.attribute)
        assert "WalshHadamard" not in body and "MatMul" in body  # the WHT is written into the body
    got = _session(model).run(None, {"x": x.numpy()})[0]
    ref = torch.cat(refs, dim=-1).numpy()
    assert _rel(got, ref) <= 1e-4, _rel(got, ref)


# ----------------------------------------------------------------------------------------------------------------------
# whole model on a tiny Llama
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Adapter dir (tests/tiny_adapter.py, byte-level tokenizer), its fused folder and a 4-bit gptq_v2 merge."""
    from qwha_export.converters.merge import stream_merge
    from qwha_export.fused import write_fused

    root = tmp_path_factory.mktemp("onnx_src")
    adir, base, _ = build_adapter_dir(root)
    _byte_tokenizer(base)
    write_fused(adir, root / "fused")
    stream_merge(adir, root / "merged", bits=4, group_size=None, requant="rtn", fmt="gptq_v2", dtype=torch.float32)
    return {"adapter": adir, "base": base, "fused": root / "fused", "merged": root / "merged"}


@pytest.fixture(scope="module")
def exports(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_out")
    out = {}
    for name in ("merged", "fused"):
        out[name] = (root / name, export_onnx(sources[name], root / name, quiet=True))
    out["dense"] = (root / "dense", export_onnx(sources["base"], root / "dense", quiet=True))
    return out


class _Runner:
    def __init__(self, folder):
        self.s, self.qwha_ops = onnx_session(folder)
        past = [i for i in self.s.get_inputs() if i.name.startswith("past_key_values.")]
        self.layers, self.kv, self.hd = len(past) // 2, past[0].shape[1], past[0].shape[3]

    def __call__(self, ids, mask, pos, past=None):
        b = ids.shape[0]
        if past is None:
            past = [np.zeros((b, self.kv, 0, self.hd), np.float32)] * (2 * self.layers)
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        for i in range(self.layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        out = self.s.run(None, feed)
        return out[0], out[1:]


def _torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


@pytest.mark.parametrize("variant", ["merged", "fused", "dense"])
def test_export_folder_manifest_and_graph(variant, exports, sources):
    folder, report = exports[variant]
    names = {p.name for p in folder.iterdir()}
    assert {MODEL_FILE, DATA_FILE, "config.json", "genai_config.json", "qwha_export.json"} <= names
    onnx.checker.check_model(str(folder / MODEL_FILE))  # path form: external data checked too
    assert detect_format(folder) == ExportFormat.ONNX
    manifest = json.loads((folder / "qwha_export.json").read_text())
    s = manifest["settings"]
    assert s["format"] == "onnx" and s["variant"] == variant and s["accuracy_level"] == 0
    assert (s["bits"], s["group_size"]) == ((32, None) if variant == "dense" else (4, 32))
    assert manifest["parity"]["top1_agreement"] == 1.0 and manifest["parity"]["max_abs_logit_diff"] < 1e-4
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["qwha_export.parity"]) == manifest["parity"]
    assert json.loads(meta["qwha_export.settings"]) == s and meta["qwha_export.tool_version"]
    src_manifest = json.loads(meta["qwha_export.source_manifest"])
    assert (src_manifest is None) == (variant == "dense")
    ops = {n.op_type for n in model.graph.node}
    sub_ops = {n.op_type for a in (n.attribute for n in model.graph.node) for x in a if x.g for n in x.g.node}
    if variant == "fused":  # If(decode step) / else prompt, each with its bodies
        assert "If" in ops and {"SpectralAdd", "MatMulNBits", "GroupQueryAttention"} <= sub_ops
        assert "If" not in sub_ops  # not nested: MatMulNBits two If levels down runs unpacked (~10x slower)
        assert set(_function_ops(model)) == {("SpectralAdd", f"n{n}_{m}") for n in (64, 128) for m in MODES}
        assert manifest["parity"]["qwha_ops"] in ("native", "function")
    else:
        assert "GroupQueryAttention" in ops and not model.functions
        assert ("MatMulNBits" in ops) == (variant == "merged") and manifest["parity"]["qwha_ops"] == "none"
    sess = open_onnx_session(folder)
    ins = [(i.name, i.shape) for i in sess.get_inputs()]
    assert ins[:3] == [
        ("input_ids", ["batch_size", "sequence_length"]),
        ("attention_mask", ["batch_size", "total_sequence_length"]),
        ("position_ids", ["batch_size", "sequence_length"]),
    ]
    assert ins[3] == ("past_key_values.0.key", ["batch_size", 2, "past_sequence_length", 16])
    outs = [(o.name, o.shape) for o in sess.get_outputs()]
    assert outs[0] == ("logits", ["batch_size", "sequence_length", 256])
    assert outs[1] == ("present.0.key", ["batch_size", 2, "total_sequence_length", 16])
    assert [n for n, _ in outs] == ["logits"] + [f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]
    genai = json.loads((folder / "genai_config.json").read_text())["model"]
    assert genai["decoder"]["filename"] == MODEL_FILE and genai["decoder"]["num_key_value_heads"] == 2
    assert genai["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"


@pytest.mark.parametrize(
    "variant,ops", [("merged", None), ("fused", "native"), ("fused", "function"), ("dense", None)]
)
def test_logits_kv_cache_and_left_padding(variant, ops, exports, sources, monkeypatch):
    """Fused: with the native qwha kernels and with the function bodies (token, step and prompt branches)."""
    use_ops(monkeypatch, ops)
    folder, _ = exports[variant]
    torch_model, _ = load_export(sources["base"] if variant == "dense" else sources[variant])
    run = _Runner(folder)
    assert run.qwha_ops == (ops or "none")
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 256, (2, 11)).astype(np.int64)
    ones = np.ones_like(ids)
    full, presents = run(ids, ones, np.tile(np.arange(11), (2, 1)))
    ref = _torch_logits(torch_model, ids)
    assert _rel(full, ref) < 1e-5
    assert presents[0].shape == (2, 2, 11, 16)
    for b in (1, 2):  # batch 1 decodes through the single-token branch of the fused graph
        logits, past = run(ids[:b, :8], ones[:b, :8], np.tile(np.arange(8), (b, 1)))
        steps = [logits]
        for t in range(8, 11):
            logits, past = run(ids[:b, t : t + 1], np.ones((b, t + 1), np.int64), np.full((b, 1), t), past)
            steps.append(logits)
        assert _rel(np.concatenate(steps, axis=1), full[:b]) < 1e-5
    _, past = run(ids[:, :8], ones[:, :8], np.tile(np.arange(8), (2, 1)))  # a 3-token chunk on a cache, batch 2
    chunk, _ = run(ids[:, 8:], ones, np.tile(np.arange(8, 11), (2, 1)), past)
    assert _rel(chunk, full[:, 8:]) < 1e-5
    pad = 4  # row 1 left-padded: its logits equal those of the unpadded sequence, also after a decode step
    ids_p, mask = ids.copy(), ones.copy()
    ids_p[1, :pad], mask[1, :pad] = 0, 0
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    logits, past = run(ids_p, mask, pos)
    assert _rel(logits[0], ref[0]) < 1e-5
    short = _torch_logits(torch_model, ids[1:, pad:])
    assert _rel(logits[1, pad:], short[0]) < 1e-5
    nxt = np.array([[3], [9]], np.int64)
    step, _ = run(nxt, np.concatenate([mask, np.ones((2, 1), np.int64)], 1), pos[:, -1:] + 1, past)
    longer = _torch_logits(torch_model, np.concatenate([ids[1:, pad:], nxt[1:]], axis=1))
    assert _rel(step[1, 0], longer[0, -1]) < 1e-5


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "llama3-rope"])
def test_other_architectures_dense_export(arch, tmp_path):
    """Qwen2 (q/k/v biases, tied lm_head), Mistral, Llama with llama3 RoPE scaling: full sequence and a decode step."""
    import transformers as tf

    common = tiny_config(vocab=128, intermediate=96)
    if arch == "qwen2":
        cls, cfg = tf.Qwen2ForCausalLM, tf.Qwen2Config(**{**common, "tie_word_embeddings": True})
    elif arch == "mistral":
        cls, cfg = tf.MistralForCausalLM, tf.MistralConfig(**common, sliding_window=None)
    else:
        rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
        cls, cfg = (
            tf.LlamaForCausalLM,
            tf.LlamaConfig(**common, rope_scaling={**rope, "original_max_position_embeddings": 16}),
        )
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(5.0)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(tmp_path / "src")
    report = export_onnx(tmp_path / "src", tmp_path / "onnx", quiet=True)
    assert report["parity"]["top1_agreement"] == 1.0 and report["parity"]["max_abs_logit_diff"] < 1e-4
    run = _Runner(tmp_path / "onnx")
    ids = np.random.default_rng(2).integers(0, 128, (1, 40)).astype(np.int64)
    ref = _torch_logits(model, ids)
    _, past = run(ids[:, :39], np.ones((1, 39), np.int64), np.arange(39)[None])
    step, _ = run(ids[:, 39:], np.ones((1, 40), np.int64), np.array([[39]]), past)
    assert _rel(step[0, 0], ref[0, -1]) < 1e-5


def _genai_greedy_matches_torch(og, model, sources) -> None:
    """16 greedy tokens of an onnxruntime-genai model equal transformers' on the fused PyTorch model."""
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=16, do_sample=False)
    gen = og.Generator(model, params)
    prompt = [5, 17, 99, 3, 42]
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    got = [int(t) for t in gen.get_sequence(0)]
    torch_model, _ = load_export(sources["fused"])
    want = torch_model.generate(torch.tensor([prompt]), max_length=16, do_sample=False, eos_token_id=None)
    assert got == want[0].tolist()


def test_onnxruntime_genai_loads_and_generates_like_torch(exports, sources):
    og = pytest.importorskip("onnxruntime_genai")
    _genai_greedy_matches_torch(og, og.Model(str(exports["fused"][0])), sources)  # function bodies


def test_bundled_ops_run_natively_in_onnxruntime_genai(sources, tmp_path):
    """export-onnx --bundle-ops: the library is copied into the folder and named in genai_config.json;
    onnxruntime-genai then creates the native kernels (counted by the bundled library) and generates greedy tokens
    identical to transformers' on the fused PyTorch model."""
    og = pytest.importorskip("onnxruntime_genai")
    from qwha_export import ortops

    require_native()
    r = _cli("export-onnx", sources["fused"], "--out", tmp_path / "f", "--quiet", "--bundle-ops", "--parity-tokens", 0)
    assert r.exit_code == 0, r.output
    folder = tmp_path / "f"
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    name = decoder["session_options"]["custom_ops_library"]
    assert name == ortops.LIB_NAME and (folder / name).is_file()
    assert json.loads((folder / "qwha_export.json").read_text())["files"]["ops_library"] == name
    before = ortops.library_info(folder / name)["kernels"]  # loads the bundled copy: the handle genai gets
    model = og.Model(str(folder))
    assert ortops.library_info(folder / name)["kernels"] > before
    _genai_greedy_matches_torch(og, model, sources)
    r = _cli("export-onnx", sources["merged"], "--out", tmp_path / "m", "--bundle-ops")
    _one_error_line(r, "--bundle-ops is for fused exports")
    assert not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------------------------------------------------
# CLI and bad input
# ----------------------------------------------------------------------------------------------------------------------


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_export_verify_and_merge_to_onnx(sources, tmp_path):
    r = _cli("export-onnx", sources["fused"], "--out", tmp_path / "f", "--quiet", "--accuracy-level", "4")
    assert r.exit_code == 0, r.output
    assert "--accuracy-level 4" in r.output and "flip the argmax" in r.output
    assert json.loads((tmp_path / "f" / "qwha_export.json").read_text())["settings"]["accuracy_level"] == 4
    r = _cli("verify", tmp_path / "f", "--against", sources["adapter"], "--tokens", "64", "--seq-len", "16", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index('{"tokens"') :].splitlines()[0])  # stderr progress bars share output
    assert res["format"] == "onnx" and res["tokens"] == 64 and res["top1_agreement"] > 0.9
    assert {"max_abs_logit_diff", "kl_per_token", "ppl_export", "ppl_reference"} <= set(res)
    r = _cli(
        "merge", sources["adapter"], "--format", "onnx", "--out", tmp_path / "m", "--quiet",
        "--calib-tokens", "0", "--verify-tokens", "0",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "m" / "qwha_export.json").read_text())
    assert manifest["settings"]["variant"] == "merged" and manifest["merge"]["settings"]["format"] == "gptq_v2"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temporary merge folder removed


def _one_error_line(r, needle: str) -> None:
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], r.output


def test_bad_input_one_line_errors(exports, sources, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    broken = tmp_path / "broken"
    shutil.copytree(exports["merged"][0], broken)
    (broken / DATA_FILE).unlink()
    _one_error_line(_cli("verify", broken, "--against", sources["adapter"]), "external data file model.onnx.data")
    with pytest.raises(ValueError, match="external data file model.onnx.data is missing"):
        open_onnx_session(broken)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    _one_error_line(_cli("export-onnx", gpt2, "--out", tmp_path / "o"), "model_type 'gpt2' cannot be exported")
    _one_error_line(_cli("export-onnx", sources["fused"], "--out", tmp_path / "o", "--accuracy-level", "7"), "0, 1")
    _one_error_line(_cli("export-onnx", tmp_path / "nope", "--out", tmp_path / "o"), "does not exist")
    _one_error_line(_cli("export-onnx", exports["fused"][0], "--out", tmp_path / "o"), "already an ONNX export")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------------------------
# real SmolLM2-135M (slow)
# ----------------------------------------------------------------------------------------------------------------------


def _smollm2_adapter(smollm2_dir, root):
    """A rank-8 QWHA adapter directory on SmolLM2 built directly (RTN 4-bit g64 base on all seven projections,
    the peft random support, values drawn so that each layer's delta is ~5% of its weight's RMS); ``init`` with
    its calibration would take minutes on 2 cores and is tested elsewhere."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from qwha_export.layer import adapter_coefficient
    from qwha_export.quant_linear import replace_linear
    from qwha_export.tuner import QWHAConfig, set_spectrum

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    quantized = {}
    for name, mod in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in targets:
            quantized[name] = quantize_rtn(mod.weight.detach(), 4, 64)
            replace_linear(model, name, QuantLinear.from_linear(mod, quantized[name]))
    peft_model = get_peft_model(model, QWHAConfig(target_modules=list(targets), rank=8, init="zeros"))
    gen = torch.Generator().manual_seed(0)
    for name, qw in quantized.items():
        layer = peft_model.base_model.model.get_submodule(name)
        _, rows, cols, scale = layer.get_spectrum()
        d_out, d_in = qw.shape
        rms = float(qw.dequantize().pow(2).mean().sqrt())
        std = 0.05 * rms / (adapter_coefficient(scale, d_in, d_out) * (rows.numel() / d_out) ** 0.5)
        set_spectrum(peft_model, name, torch.randn(rows.numel(), generator=gen) * std, rows, cols)
    return write_adapter_dir(peft_model, quantized, root / "adapter", smollm2_dir)


@pytest.mark.slow
def test_smollm2_merged_and_fused_parity_on_real_text(smollm2_dir, tmp_path, monkeypatch):
    """ONNX against the PyTorch model that was exported, 2,048 Lee-corpus tokens: top-1 >= 99.9%, KL reported.
    The fused export also with the native qwha kernels against its function bodies: top-1 1.000, KL <= 1e-9 on the
    same tokens, and the same 32 greedy tokens.

    Sources: the fused folder of the adapter (``write_fused``) and its 4-bit gptq_v2 merge (``stream_merge``, RTN
    re-quantization of ``W_deq + ΔW`` at the base's g64 grid; ~13 s here)."""
    from qwha_export.converters.merge import stream_merge
    from qwha_export.data import lee_corpus_text, token_chunks
    from qwha_export.fused import write_fused
    from qwha_export.metrics import compare_logits, logits_for
    from qwha_export.onnx_export import OnnxLogits

    adir = _smollm2_adapter(smollm2_dir, tmp_path)
    write_fused(adir, tmp_path / "fused")
    stream_merge(adir, tmp_path / "merged", bits=4, group_size=None, requant="rtn", fmt="gptq_v2")
    assert detect_format(tmp_path / "merged") == ExportFormat.GPTQ_V2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    chunks = token_chunks(tok, lee_corpus_text(), 512, max_tokens=2048)
    assert chunks.numel() >= 2000
    results = {}
    for name in ("merged", "fused"):
        report = export_onnx(tmp_path / name, tmp_path / f"onnx_{name}", quiet=True, parity_tokens=0)
        assert report["settings"]["bits"] == 4 and report["settings"]["group_size"] == 64
        ref = logits_for(load_export(tmp_path / name)[0], chunks, batch_size=2)
        onnx_logits = OnnxLogits(tmp_path / f"onnx_{name}")
        got = logits_for(onnx_logits, chunks, batch_size=2)
        if onnx_logits.qwha_ops != "none":  # fused: native kernels where the library is available
            logits = {onnx_logits.qwha_ops: got}
        results[name] = compare_logits(ref, got)
        results[name]["rel_max_abs_diff"] = results[name]["max_abs_logit_diff"] / float(ref.abs().max())
    print(json.dumps(results, indent=1))
    for name, r in results.items():
        assert r["tokens"] >= 2000
        assert r["top1_agreement"] >= 0.999, (name, r)
        assert r["kl_per_token"] < 1e-6 and r["rel_max_abs_diff"] < 1e-4, (name, r)
    from qwha_export.serving import GenerationConfig, OnnxCausalLM

    greedy = {}
    for ops in ("native", "function"):
        use_ops(monkeypatch, ops)
        if ops not in logits:
            onnx_logits = OnnxLogits(tmp_path / "onnx_fused")
            assert onnx_logits.qwha_ops == ops
            logits[ops] = logits_for(onnx_logits, chunks, batch_size=2)
        lm = OnnxCausalLM.from_folder(tmp_path / "onnx_fused", provider="cpu")
        greedy[ops] = lm.generate(["What is the capital of France?"], GenerationConfig(32, ignore_eos=True)).token_ids
    native = compare_logits(logits["function"], logits["native"])
    print("native vs function bodies:", json.dumps(native))
    assert native["tokens"] >= 2000 and native["top1_agreement"] == 1.0 and native["kl_per_token"] <= 1e-9, native
    assert greedy["native"] == greedy["function"] and len(greedy["native"][0]) == 32
