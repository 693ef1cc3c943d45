"""qwha_export.formats: GPTQ / compressed-tensors layers, the format registry, dense/config helpers
(bit packing: tests/test_packing.py; shards and JSON files: tests/test_shards.py).

Reference checks against real libraries: compressed-tensors (installed) decompresses our ``pack-quantized``
tensors; transformers parses our GPTQ / compressed-tensors configs. GPTQModel is not installed (it is a CUDA
source build), so GPTQ tensors are checked with a literal re-implementation of AutoGPTQ's ``QuantLinear.pack`` loop
and of GPTQModel's ``dequantize_weight`` (``wf`` shift tables), written here independently of ``formats.packing``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_adapter import tiny_config

from qwha_export.converters.quantize import QuantizedWeight, quantize_rtn
from qwha_export.formats import (
    WRITERS,
    DenseFormat,
    ExportFormat,
    ShardWriter,
    ct_quantization_config,
    get_writer,
    gptq_quantization_config,
    iter_checkpoint_tensors,
    needs_desc_act,
    read_ct_layer,
    read_gptq_layer,
    write_ct_layer,
    write_gptq_layer,
)
from qwha_export.formats.packing import (
    packed_words,
    to_ct_signed,
    unpack_gptq_qzeros,
)
from qwha_export.pipeline import atomic_output_dir

# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def _random_qw(d_out, d_in, bits, group_size, seed=0, zero_min=0, act_order=False) -> QuantizedWeight:
    """A QuantizedWeight with random codes / zeros / positive float16 scales (full code range exercised)."""
    g = torch.Generator().manual_seed(seed)
    gs = d_in if group_size == -1 else group_size
    n_groups = -(-d_in // gs)  # a ragged last group when gs does not divide d_in
    maxq = 2**bits - 1
    codes = torch.randint(0, maxq + 1, (d_out, d_in), generator=g, dtype=torch.int64).to(torch.uint8)
    zeros = torch.randint(zero_min, maxq + 1, (d_out, n_groups), generator=g, dtype=torch.int64).to(torch.uint8)
    # make sure the extremes appear
    codes[0, 0], codes[-1, -1] = 0, maxq
    zeros[-1, -1] = maxq
    scales = (torch.rand(d_out, n_groups, generator=g) * 0.05 + 1e-3).to(torch.float16)
    g_idx = None
    if act_order:
        perm = torch.randperm(d_in, generator=g)
        g_idx = (torch.argsort(perm) // gs).to(torch.int32)
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=gs, g_idx=g_idx)


def _same_qw(a: QuantizedWeight, b: QuantizedWeight) -> None:
    assert a.bits == b.bits and a.group_size == b.group_size
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.zeros, b.zeros)
    assert a.scales.dtype == b.scales.dtype == torch.float16 and torch.equal(a.scales, b.scales)
    assert (a.g_idx is None) == (b.g_idx is None)
    if a.g_idx is not None:
        assert torch.equal(a.g_idx, b.g_idx)


_WF3 = torch.tensor(
    [[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0], [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
     [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]],
    dtype=torch.int32,
).reshape(1, 3, 12)  # fmt: skip


def _gptqmodel_dequant(t: dict, prefix: str, bits: int, v1: bool) -> torch.Tensor:
    """GPTQModel ``PackableQuantLinear.dequantize_weight`` re-implemented: returns W ``(d_out, d_in)`` float16."""
    qweight, qzeros = t[prefix + "qweight"], t[prefix + "qzeros"]
    scales, g_idx = t[prefix + "scales"], t[prefix + "g_idx"].long()
    maxq = 2**bits - 1
    if bits in (2, 4, 8):
        wf = torch.arange(0, 32, bits, dtype=torch.int32).unsqueeze(0)
        pf = 32 // bits
        zeros = torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, pf), wf.unsqueeze(0)).to(torch.int16)
        zeros = torch.bitwise_and(zeros, maxq).reshape(scales.shape)
        weight = torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, pf, -1), wf.unsqueeze(-1)).to(torch.int16)
        weight = torch.bitwise_and(weight, maxq)
    else:
        zeros = qzeros.reshape(qzeros.shape[0], qzeros.shape[1] // 3, 3, 1).expand(-1, -1, -1, 12)
        zeros = zeros >> _WF3.unsqueeze(0)
        zeros[:, :, 0, 10] = (zeros[:, :, 0, 10] & 0x3) | ((zeros[:, :, 1, 0] << 2) & 0x4)
        zeros[:, :, 1, 11] = (zeros[:, :, 1, 11] & 0x1) | ((zeros[:, :, 2, 0] << 1) & 0x6)
        zeros = zeros & 0x7
        zeros = torch.cat([zeros[:, :, 0, :11], zeros[:, :, 1, 1:12], zeros[:, :, 2, 1:11]], dim=2)
        zeros = zeros.reshape(scales.shape)
        weight = qweight.reshape(qweight.shape[0] // 3, 3, 1, qweight.shape[1]).expand(-1, -1, 12, -1)
        weight = (weight >> _WF3.unsqueeze(-1)) & 0x7
        weight[:, 0, 10] = (weight[:, 0, 10] & 0x3) | ((weight[:, 1, 0] << 2) & 0x4)
        weight[:, 1, 11] = (weight[:, 1, 11] & 0x1) | ((weight[:, 2, 0] << 1) & 0x6)
        weight = weight & 0x7
        weight = torch.cat([weight[:, 0, :11], weight[:, 1, 1:12], weight[:, 2, 1:11]], dim=1)
    if v1:
        zeros = zeros + 1
    weight = weight.reshape(weight.shape[0] * weight.shape[1], weight.shape[2])
    w = scales[g_idx] * (weight - zeros[g_idx])  # (d_in, d_out) float16
    assert w.dtype == torch.float16
    return w.t().contiguous()


def _tiny_llama(hidden=64, inter=128):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**tiny_config(vocab=128, hidden=hidden, intermediate=inter, layers=1))
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _write_quantized_folder(out: Path, model, fmt: ExportFormat, bits: int, group_size: int, max_shard_bytes: int):
    """Quantize every decoder linear with RTN and write an HF folder in ``fmt``; returns {module: qw}."""
    writer = get_writer(fmt)
    qws = {}
    with ShardWriter(out, max_shard_bytes=max_shard_bytes) as sw:
        for name, t in model.state_dict().items():
            module = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and module.rsplit(".", 1)[-1] in _LINEARS:
                qw = quantize_rtn(t, bits, group_size)
                qws[module] = qw
                sw.add_many(writer.write_layer(qw, prefix=module))
            else:
                sw.add(name, t.to(torch.float16))
    if fmt is ExportFormat.COMPRESSED_TENSORS:
        qcfg = ct_quantization_config(bits, group_size)
    else:
        qcfg = writer.quantization_config(bits, group_size, desc_act=False)
    DenseFormat.write_config(out, model.config, quantization_config=qcfg, dtype=torch.float16)
    return qws


# ----------------------------------------------------------------------------------------------------------------------
# GPTQ layers
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,d_in", [(32, 256), (64, 256), (128, 256), (-1, 256), (128, 320)])
def test_gptq_layer_roundtrip_and_gptqmodel_dequant(fmt, bits, group_size, d_in):
    """(128, 320): a ragged last group of 64 columns (ceil(320 / 128) = 3 rows of scales and qzeros)."""
    d_out = 96
    qw = _random_qw(d_out, d_in, bits, group_size, seed=bits * 7 + d_in, zero_min=1 if fmt == "gptq" else 0)
    prefix = "model.layers.0.mlp.up_proj"
    t = write_gptq_layer(qw, fmt, prefix=prefix)
    p = prefix + "."
    assert set(t) == {p + "qweight", p + "qzeros", p + "scales", p + "g_idx"}
    assert t[p + "qweight"].dtype == torch.int32 and t[p + "qweight"].shape == (d_in * bits // 32, d_out)
    assert t[p + "qzeros"].dtype == torch.int32 and t[p + "qzeros"].shape == (qw.n_groups, d_out * bits // 32)
    assert t[p + "scales"].dtype == torch.float16 and t[p + "scales"].shape == (qw.n_groups, d_out)
    assert t[p + "g_idx"].dtype == torch.int32 and t[p + "g_idx"].shape == (d_in,)
    stored = unpack_gptq_qzeros(t[p + "qzeros"], bits, d_out)
    assert torch.equal(stored, qw.zeros - 1 if fmt == "gptq" else qw.zeros)
    back = read_gptq_layer(t, prefix, bits, group_size, fmt)
    _same_qw(back, qw)
    w = _gptqmodel_dequant(t, p, bits, v1=fmt == "gptq")
    assert torch.equal(w, qw.dequantize(torch.float16))


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_act_order_g_idx(bits):
    qw = _random_qw(64, 256, bits, 64, seed=3, zero_min=1, act_order=True)
    assert needs_desc_act(qw)
    t = write_gptq_layer(qw, "gptq", prefix="m")
    assert torch.equal(t["m.g_idx"], qw.g_idx)
    back = read_gptq_layer(t, "m", bits, 64, "gptq")
    _same_qw(back, qw)
    assert torch.equal(_gptqmodel_dequant(t, "m.", bits, v1=True), qw.dequantize(torch.float16))
    assert not needs_desc_act(_random_qw(64, 256, bits, 64))


def test_gptq_v1_refuses_zero_point_zero():
    qw = _random_qw(64, 128, 4, 32, seed=1, zero_min=1)
    qw.zeros[3, 2] = 0
    with pytest.raises(ValueError, match="gptq_v2") as e:
        write_gptq_layer(qw, "gptq", prefix="model.layers.0.self_attn.q_proj")
    msg = str(e.value)
    assert "\n" not in msg and "zero point" in msg and "q_proj" in msg
    t = write_gptq_layer(qw, "gptq_v2")  # v2 stores it fine
    _same_qw(read_gptq_layer(t, "", 4, 32, "gptq_v2"), qw)


def test_gptq_refusals():
    with pytest.raises(ValueError, match="divisible by 32"):
        write_gptq_layer(_random_qw(40, 192, 4, 32, zero_min=1), "gptq")
    with pytest.raises(ValueError, match="checkpoint_format"):
        write_gptq_layer(_random_qw(64, 128, 4, 32, zero_min=1), "gptq_v3")
    t = write_gptq_layer(_random_qw(64, 128, 4, 32, zero_min=1), "gptq_v2")
    t = dict(t)
    del t["qzeros"]
    with pytest.raises(ValueError, match="qzeros"):
        read_gptq_layer(t, "", 4, 32, "gptq_v2")


def test_gptq_quantization_config_parsed_by_transformers():
    from transformers import GPTQConfig

    for fmt in ("gptq", "gptq_v2"):
        cfg = gptq_quantization_config(4, 128, fmt, desc_act=True)
        assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == fmt and cfg["sym"] is False
        q = GPTQConfig.from_dict(cfg)
        assert (q.bits, q.group_size, q.desc_act, q.sym, q.format) == (4, 128, True, False, fmt)
        assert q.to_dict()["checkpoint_format"] == fmt
    with pytest.raises(ValueError):
        gptq_quantization_config(5, 128)
    with pytest.raises(ValueError):
        gptq_quantization_config(4, 0)
    # the kernel choice transformers hands to GPTQModel (a ragged last group needs its torch kernel)
    cfg = gptq_quantization_config(4, 128, "gptq_v2", backend="torch")
    assert cfg["backend"] == "torch" and GPTQConfig.from_dict(cfg).backend == "torch"
    assert "backend" not in gptq_quantization_config(4, 128, "gptq_v2")
    with pytest.raises(ValueError, match="backend"):
        gptq_quantization_config(4, 128, backend="")


def _tiny_llama_zero_points(positive_group: tuple[str, int, int] | None = None, group_size: int = 32):
    """The tiny Llama with each group of ``group_size`` weights led by ``-max |w|`` of its group, so that 0 sits
    mid-grid and every RTN zero point is >= 1; ``positive_group = (module, row, group)`` then makes that group
    all-positive, so its RTN zero point is 0 (what GPTQ v1 cannot store)."""
    model = _tiny_llama()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.rsplit(".", 1)[-1] in _LINEARS:
                w = mod.weight
                w[:, ::group_size] = -w.abs().reshape(w.shape[0], -1, group_size).amax(-1)
                if positive_group and positive_group[0] == name:
                    _, row, g = positive_group
                    w[row, g * group_size : (g + 1) * group_size].abs_().add_(1e-3)
    return model


@pytest.mark.parametrize("fmt", [ExportFormat.GPTQ, ExportFormat.GPTQ_V2])
def test_gptq_tiny_llama_folder(tmp_path, fmt):
    """Zero points never 0: both checkpoint formats must write, and read back bit-identical (GPTQModel's reading)."""
    from transformers import AutoConfig, GPTQConfig

    model = _tiny_llama_zero_points()
    out = tmp_path / "gptq"
    bits, gs = 4, 32
    with atomic_output_dir(out) as tmp:  # the pipeline's all-or-nothing output folder
        qws = _write_quantized_folder(tmp, model, fmt, bits, gs, max_shard_bytes=20_000)
    assert min(int(qw.zeros.min()) for qw in qws.values()) >= 1
    cfg = AutoConfig.from_pretrained(out)
    qc = cfg.quantization_config
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == fmt.value
    q = GPTQConfig.from_dict(qc)
    assert (q.bits, q.group_size, q.format, q.sym) == (bits, gs, fmt.value, False)
    assert (out / "model.safetensors.index.json").is_file()
    tensors = dict(iter_checkpoint_tensors(out))
    for module, qw in qws.items():
        assert module + ".weight" not in tensors
        back = read_gptq_layer(tensors, module, bits, gs, fmt.value)
        _same_qw(back, qw)
        w = _gptqmodel_dequant(tensors, module + ".", bits, v1=fmt is ExportFormat.GPTQ)
        assert torch.equal(w, qw.dequantize(torch.float16))
    assert torch.equal(tensors["lm_head.weight"], model.lm_head.weight.detach().to(torch.float16))


def test_gptq_v1_folder_refuses_rtn_zero_point_zero(tmp_path):
    """One RTN group with zero point 0: v1 refuses in one line naming the layer and gptq_v2, and leaves nothing;
    gptq_v2 writes the same model and stores that zero point."""
    layer = "model.layers.0.self_attn.q_proj"
    model = _tiny_llama_zero_points(positive_group=(layer, 3, 1))
    out = tmp_path / "gptq"
    with pytest.raises(ValueError, match="gptq_v2") as e, atomic_output_dir(out) as tmp:
        _write_quantized_folder(tmp, model, ExportFormat.GPTQ, 4, 32, max_shard_bytes=20_000)
    msg = str(e.value)
    assert "\n" not in msg and "zero point" in msg and layer in msg
    assert list(tmp_path.iterdir()) == []
    with atomic_output_dir(tmp_path / "v2") as tmp:
        qws = _write_quantized_folder(tmp, model, ExportFormat.GPTQ_V2, 4, 32, max_shard_bytes=20_000)
    assert int(qws[layer].zeros[3, 1]) == 0 and int((qws[layer].zeros == 0).sum()) == 1
    back = read_gptq_layer(dict(iter_checkpoint_tensors(tmp_path / "v2")), layer, 4, 32, "gptq_v2")
    _same_qw(back, qws[layer])


# ----------------------------------------------------------------------------------------------------------------------
# compressed-tensors layers
# ----------------------------------------------------------------------------------------------------------------------


def _ct_scheme(bits, group_size):
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(ct_quantization_config(bits, group_size))
    return qc.config_groups["group_0"]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_ct_layer_roundtrip_and_library_decompress(bits, group_size):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    d_out, d_in = (40, 256) if group_size == 128 else (40, 192)
    qw = _random_qw(d_out, d_in, bits, group_size, seed=bits + d_in)
    t = write_ct_layer(qw, prefix="model.layers.0.mlp.down_proj")
    p = "model.layers.0.mlp.down_proj."
    assert t[p + "weight_packed"].dtype == torch.int32
    assert t[p + "weight_packed"].shape == (d_out, packed_words(d_in, bits))
    assert t[p + "weight_zero_point"].dtype == torch.int32
    assert t[p + "weight_zero_point"].shape == (packed_words(d_out, bits), qw.n_groups)
    assert t[p + "weight_scale"].dtype == torch.float16 and t[p + "weight_scale"].shape == (d_out, qw.n_groups)
    assert t[p + "weight_shape"].dtype == torch.int64 and t[p + "weight_shape"].tolist() == [d_out, d_in]
    _same_qw(read_ct_layer(t, p, bits, group_size), qw)

    scheme = _ct_scheme(bits, group_size)
    assert PackedQuantizationCompressor.compression_param_names(scheme) == (
        "weight_packed",
        "weight_scale",
        "weight_shape",
        "weight_zero_point",
    )
    local = {k[len(p) :]: v for k, v in t.items()}
    out = PackedQuantizationCompressor.decompress(local, scheme)
    # CT: (q_ct.to(fp16) - zp_ct.to(fp16)) * scale_fp16 -> one fp16 rounding of the exact value
    assert out["weight"].dtype == torch.float16
    assert torch.equal(out["weight"], qw.dequantize(torch.float16))
    # float32 scales: CT computes in float32, which is exact
    t32 = write_ct_layer(qw, scale_dtype=torch.float32)
    out32 = PackedQuantizationCompressor.decompress(dict(t32), scheme)
    assert out32["weight"].dtype == torch.float32 and torch.equal(out32["weight"], qw.dequantize(torch.float32))
    # and the library's own compressor packs the same bits from the dequantized weight
    ref = PackedQuantizationCompressor.compress(
        {
            "weight": qw.dequantize(torch.float32),
            "weight_scale": qw.scales.float(),
            "weight_zero_point": to_ct_signed(qw.zeros, bits),
        },
        scheme,
    )
    assert torch.equal(ref["weight_packed"], t[p + "weight_packed"])
    assert torch.equal(ref["weight_zero_point"], t[p + "weight_zero_point"])
    assert torch.equal(ref["weight_shape"], t[p + "weight_shape"])


def test_ct_refusals_and_symmetric_read():
    with pytest.raises(ValueError, match="3-bit"):
        write_ct_layer(_random_qw(32, 64, 3, 32))
    with pytest.raises(ValueError, match="g_idx"):
        write_ct_layer(_random_qw(32, 128, 4, 32, act_order=True))
    with pytest.raises(ValueError, match="float16 or torch.float32"):
        write_ct_layer(_random_qw(32, 64, 4, 32), scale_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"group_size=128 does not divide d_in=320.*gptq_v2") as exc:
        write_ct_layer(_random_qw(32, 320, 4, 128), prefix="model.layers.0.mlp.up_proj")
    assert "\n" not in str(exc.value) and "up_proj" in str(exc.value)
    # a symmetric checkpoint (no zero point) reads back with zero = 2**(bits-1)
    qw = _random_qw(32, 64, 4, 32)
    t = write_ct_layer(qw)
    del t["weight_zero_point"]
    back = read_ct_layer(t, "", 4, 32)
    assert bool((back.zeros == 8).all()) and torch.equal(back.codes, qw.codes)
    # an unpacked signed int8 zero point is accepted too
    t["weight_zero_point"] = to_ct_signed(qw.zeros, 4)
    _same_qw(read_ct_layer(t, "", 4, 32), qw)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, -1)])
def test_ct_quantization_config_matches_library(bits, group_size):
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )
    from transformers import CompressedTensorsConfig

    cfg = ct_quantization_config(bits, group_size)
    strategy = "channel" if group_size == -1 else "group"
    ref = QuantizationConfig(
        config_groups={
            "group_0": QuantizationScheme(
                targets=["Linear"],
                weights=QuantizationArgs(
                    num_bits=bits,
                    type="int",
                    symmetric=False,
                    strategy=strategy,
                    group_size=None if group_size == -1 else group_size,
                ),
                format="pack-quantized",
            )
        },
        ignore=["lm_head"],
        format="pack-quantized",
        quantization_status="compressed",
    )
    assert QuantizationConfig.model_validate(cfg).model_dump() == ref.model_dump()
    # every key the library writes is present in ours (update_config adds version/sparsity/transform)
    assert set(ref.model_dump()) - {"moe_sparsity_config"} <= set(cfg)
    hf = CompressedTensorsConfig.from_dict(dict(cfg))
    assert hf.quantization_config.format == "pack-quantized"


def test_ct_tiny_llama_folder_dequantized_by_library(tmp_path):
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    model = _tiny_llama()
    out = tmp_path / "ct"
    qws = _write_quantized_folder(out, model, ExportFormat.COMPRESSED_TENSORS, 4, 32, max_shard_bytes=16_000)
    assert (out / "model.safetensors.index.json").is_file()
    deq = CompressedTensorsDequantizer(out, dtype=torch.float16)  # reads and validates config.json
    tensors = dict(iter_checkpoint_tensors(out))
    result = deq.validate(tensors)  # decompress + check no orphan qparams are left
    for module, qw in qws.items():
        assert torch.equal(result[module + ".weight"], qw.dequantize(torch.float16)), module
    assert torch.equal(result["lm_head.weight"], model.lm_head.weight.detach().to(torch.float16))
    assert not any(k.endswith(("weight_packed", "weight_zero_point")) for k in result)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_ct_tiny_llama_folder_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = _tiny_llama()
    out = tmp_path / "ct"
    qws = _write_quantized_folder(out, model, ExportFormat.COMPRESSED_TENSORS, 8, -1, max_shard_bytes=16_000)
    loaded = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=torch.float16
    )
    sd = loaded.state_dict()
    for module, qw in qws.items():
        assert torch.equal(sd[module + ".weight"], qw.dequantize(torch.float16)), module
    assert torch.equal(sd["model.embed_tokens.weight"], model.model.embed_tokens.weight.detach().to(torch.float16))


# ----------------------------------------------------------------------------------------------------------------------
# enum / registry / dense helpers
# ----------------------------------------------------------------------------------------------------------------------


def test_export_format_enum_and_registry():
    assert [f.value for f in ExportFormat] == ["dense", "gptq", "gptq_v2", "compressed-tensors", "fused", "onnx"]
    assert isinstance(ExportFormat.GPTQ, str) and ExportFormat("compressed-tensors") is ExportFormat.COMPRESSED_TENSORS
    assert ExportFormat.parse("Compressed_Tensors") is ExportFormat.COMPRESSED_TENSORS
    assert str(ExportFormat.GPTQ_V2) == "gptq_v2" and f"{ExportFormat.DENSE}" == "dense"
    with pytest.raises(ValueError, match="unknown export format"):
        ExportFormat.parse("awq")
    assert set(WRITERS) == {
        ExportFormat.DENSE,
        ExportFormat.GPTQ,
        ExportFormat.GPTQ_V2,
        ExportFormat.COMPRESSED_TENSORS,
    }
    for fmt in ("fused", "onnx"):
        with pytest.raises(ValueError, match="no per-layer writer"):
            get_writer(fmt)
    qw = _random_qw(64, 128, 4, 32, zero_min=1)
    for fmt, writer in WRITERS.items():
        t = writer.write_layer(qw, prefix="m")
        assert all(k.startswith("m.") for k in t)
        if writer.read_layer is not None:
            _same_qw(writer.read_layer(t, "m", 4, 32), qw)
        else:
            assert fmt is ExportFormat.DENSE and torch.equal(t["m.weight"], qw.dequantize(torch.float16))
    assert get_writer("gptq_v2").quantization_config(4, 32)["checkpoint_format"] == "gptq_v2"


def test_dense_format_config_and_aux_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    base_cfg = {"model_type": "llama", "hidden_size": 64, "torch_dtype": "float32", "quantization_config": {"x": 1}}
    (src / "config.json").write_text(json.dumps(base_cfg))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        (src / name).write_text(json.dumps({"name": name}))
    (src / "model.safetensors").write_bytes(b"not copied")
    out = tmp_path / "out"
    copied = DenseFormat.copy_aux_files(src, out)
    assert sorted(copied) == sorted(
        ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"]
    )
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    # dense: any quantization_config of the source is dropped
    DenseFormat.write_config(out, src, dtype=torch.bfloat16)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    # quantized: stored as given
    qc = gptq_quantization_config(4, 64, "gptq_v2")
    DenseFormat.write_config(out, src, quantization_config=qc)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == qc and cfg["hidden_size"] == 64
    with pytest.raises(ValueError, match="does not exist"):
        DenseFormat.copy_aux_files(tmp_path / "nope", out)


def test_checkpoint_quantization_config_is_one_call_for_every_format():
    """merge and fuse describe their quantized layers through formats.checkpoint_quantization_config: one group size
    for all (a single-group layer fits any larger one), the GPTQ padding backend for a ragged last group, the
    compressed-tensors targets, None for dense, and a ValueError naming the settings one config cannot hold."""
    from qwha_export.formats import checkpoint_quantization_config

    layers = {(4, 64, 576), (4, 64, 1536), (4, 64, 64)}
    cfg = checkpoint_quantization_config("gptq_v2", layers, targets=["a.q_proj"])
    assert (cfg["bits"], cfg["group_size"], cfg["checkpoint_format"]) == (4, 64, "gptq_v2")
    assert "backend" not in cfg or cfg["backend"] is None
    ragged = checkpoint_quantization_config("gptq", {(4, 128, 576)}, targets=["a.q_proj"])
    assert ragged["group_size"] == 128 and ragged["backend"] == "torch"
    ct = checkpoint_quantization_config("compressed-tensors", layers, targets=["b.down_proj", "a.q_proj"])
    assert ct["config_groups"]["group_0"]["targets"] == ["a.q_proj", "b.down_proj"]
    assert ct["config_groups"]["group_0"]["weights"]["group_size"] == 64
    assert checkpoint_quantization_config("dense", layers, targets=[]) is None
    assert checkpoint_quantization_config("gptq_v2", set(), targets=[]) is None
    assert checkpoint_quantization_config("gptq_v2", set(), targets=[], empty=(8, -1))["bits"] == 8
    with pytest.raises(ValueError, match=r"mixed \(bits, group_size\) settings \[\(3, 64\), \(4, 64\)\]"):
        checkpoint_quantization_config("gptq_v2", {(4, 64, 576), (3, 64, 576)}, targets=[])
    with pytest.raises(ValueError, match="mixed"):
        checkpoint_quantization_config("gptq_v2", {(4, 64, 576), (4, 128, 576)}, targets=[])
