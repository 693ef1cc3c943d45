"""QWHA as a peft method: forward parity, save/load round trips, trainability, skipping, load validation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel, PeftType, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import qwha_export.tuner as pq
import qwha_export.tuner.layer as pq_layer
from qwha_export.converters.quantize import quantize_rtn
from qwha_export.kernels import is_supported_size
from qwha_export.layer import delta_weight
from qwha_export.quant_linear import QuantLinear, replace_linear
from qwha_export.tuner import QWHAConfig, load_qwha_adapter, set_spectrum, skipped_layers, spectra
from qwha_export.tuner.config import _ensure_peft_type

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _random_spectrum(d_out: int, d_in: int, nnz: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pos = torch.randperm(d_out * d_in, generator=g)[:nnz]
    return torch.randn(nnz, generator=g), pos // d_in, pos % d_in


def _fill_spectra(model, seed: int = 0) -> None:
    """Install random spectra of layer-dependent nnz (different from the random-init nnz) in every QWHA layer."""
    for i, (name, layer) in enumerate(sorted(pq.qwha_layers(model).items())):
        set_spectrum(model, name, *_random_spectrum(layer.out_features, layer.in_features, 17 + 5 * i, seed + i))


def _quantized(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Copy of ``model`` whose target linears are QuantLinear (4-bit RTN, per output channel)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            qw = quantize_rtn(module.weight, 4, -1)
            replace_linear(model, name, QuantLinear(qw, module.bias, dtype=dtype))
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------------------------------------------------
# registration / config
# ----------------------------------------------------------------------------------------------------------------------


def test_registration_is_idempotent():
    assert PeftType("QWHA") is PeftType.QWHA is pq.PEFT_TYPE_QWHA
    assert "QWHA" in list(PeftType) and PeftType["QWHA"] == "QWHA"
    n_members = len(PeftType)
    assert _ensure_peft_type() is PeftType.QWHA
    pq.register_qwha()
    pq.register_qwha()
    assert len(PeftType) == n_members
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_TUNER_MAPPING["QWHA"] is pq.QWHAModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.QWHA] == "qwha_"


def test_reimport_does_not_crash():
    """Executing the tuner's modules a second time (what importlib.reload does) neither crashes nor duplicates the
    enum: config.py runs ``_ensure_peft_type()`` again, model.py ``register_qwha()`` with a new ``QWHAModel``."""
    import importlib.util

    n_members = len(PeftType)
    try:
        for _ in range(2):
            fresh = {}
            for name in ("config", "model"):
                spec = importlib.util.find_spec(f"qwha_export.tuner.{name}")
                fresh[name] = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(fresh[name])
        assert len(PeftType) == n_members and fresh["config"].PEFT_TYPE_QWHA is PeftType.QWHA
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

        assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.QWHA] is fresh["model"].QWHAModel  # re-registered, new class
        net = nn.Sequential()
        net.add_module("q_proj", nn.Linear(16, 4))
        model = get_peft_model(net, pq.QWHAConfig(rank=1, target_modules=["q_proj"]))
        assert isinstance(model.base_model.model.q_proj, pq.QWHALinear)
    finally:
        pq.register_qwha()  # point peft back at this session's classes
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.QWHA] is pq.QWHAModel


@pytest.mark.parametrize(
    "kwargs,bad",
    [
        ({"rank": 0}, "0"),
        ({"rank": 2.5}, "2.5"),
        ({"scale": float("nan")}, "nan"),
        ({"init": "bogus"}, "bogus"),
        ({"target_modules": []}, r"\[\]"),
        ({"scale_pattern": {"model.layers.0.self_attn.q_proj": float("inf")}}, "inf"),
    ],
)
def test_config_validation(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        QWHAConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------------


def test_forward_matches_dense_formula_float64(tiny_llama, monkeypatch):
    base = copy.deepcopy(tiny_llama).double()
    # one QuantLinear base (float64 compute) next to nn.Linear bases; d_in = 48 = 12 * 4 and 96 = 12 * 8
    lin = base.model.layers[1].self_attn.o_proj
    replace_linear(
        base, "model.layers.1.self_attn.o_proj", QuantLinear(quantize_rtn(lin.weight, 4, -1), None, torch.float64)
    )
    cfg = QWHAConfig(rank=2, scale=0.7, target_modules=["q_proj", "down_proj", "o_proj"], layers_to_transform=[1])
    model = get_peft_model(base, cfg)
    names = sorted(pq.qwha_layers(model))
    assert names == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    _fill_spectra(model, seed=5)
    set_spectrum(model, names[0], *spectra(model)[names[0]][:3], scale=1.3)

    # the forward must not build a dense Delta W
    def _no_dense(*a, **k):
        raise AssertionError("dense delta built in forward")

    monkeypatch.setattr(pq_layer, "delta_weight", _no_dense)
    x = torch.randn(3, 5, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for name in names:
        layer = pq.qwha_layers(model)[name]
        values, rows, cols, s = spectra(model)[name]
        assert s == (1.3 if name == names[0] else 0.7)
        xi = x[..., : layer.in_features]
        with torch.no_grad():
            y = layer(xi)
        w = layer.get_base_layer().weight.double()
        ref = xi @ (w + delta_weight(values, rows, cols, layer.out_features, layer.in_features, s)).T
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, ref, rtol=0, atol=1e-10)
        assert float((ref - xi @ w.T).abs().max()) > 1e-3  # the adapter contributes


def test_zeros_init_is_identity_and_budget(tiny_llama):
    model = get_peft_model(copy.deepcopy(tiny_llama), QWHAConfig(rank=3, seed=7))
    layers = pq.qwha_layers(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        p = min(3 * (layer.in_features + layer.out_features), layer.in_features * layer.out_features)
        idx = layer.qwha_indices["default"]
        assert layer.qwha_spectrum["default"].shape == (p,) and idx.shape == (2, p) and idx.dtype == torch.int64
        assert torch.unique(idx[0] * layer.in_features + idx[1]).numel() == p, name
        assert layer.qwha_spectrum["default"].dtype == torch.float32
    x = _tokens()
    with torch.no_grad():
        assert torch.equal(model(x).logits, tiny_llama(x).logits)


# ----------------------------------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "quant"])
def test_save_load_roundtrip_identical_logits(tiny_llama, tmp_path, kind):
    make = (lambda: copy.deepcopy(tiny_llama)) if kind == "linear" else (lambda: _quantized(tiny_llama))
    model = get_peft_model(make(), QWHAConfig(rank=1, scale=0.5, seed=3))
    if kind == "quant":
        assert isinstance(model.base_model.model.model.layers[0].mlp.up_proj.get_base_layer(), QuantLinear)
    _fill_spectra(model, seed=11)
    name = "model.layers.0.mlp.up_proj"
    set_spectrum(model, name, *spectra(model)[name][:3], scale=2.5)
    x = _tokens()
    with torch.no_grad():
        ref = model(x).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "QWHA" and cfg["scale_pattern"] == {name: 2.5}

    loaded = PeftModel.from_pretrained(make(), tmp_path)
    with torch.no_grad():
        out = loaded(x).logits
    assert torch.equal(out, ref)
    a, b = spectra(model), spectra(loaded)
    assert a.keys() == b.keys()
    for k in a:
        assert all(torch.equal(u, v) for u, v in zip(a[k][:3], b[k][:3], strict=True)) and a[k][3] == b[k][3]

    again = load_qwha_adapter(make(), tmp_path)
    with torch.no_grad():
        assert torch.equal(again(x).logits, ref)


def test_only_spectrum_values_are_trainable(tiny_llama):
    model = get_peft_model(_quantized(tiny_llama), QWHAConfig(rank=1))
    _fill_spectra(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".qwha_spectrum." in n for n in trainable)
    assert len(trainable) == 14
    model(_tokens()).logits.square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, n
        else:
            assert p.grad is None, n


def test_merge_unmerge_linear_and_refuse_quant(tiny_llama):
    model = get_peft_model(copy.deepcopy(tiny_llama), QWHAConfig(rank=1, target_modules=["q_proj"]))
    _fill_spectra(model)
    x = _tokens()
    with torch.no_grad():
        ref = model(x).logits
        w0 = model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer().weight.clone()
        model.merge_adapter()
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-4, atol=1e-4)
        model.unmerge_adapter()
        torch.testing.assert_close(model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer().weight, w0)
    layer = pq.qwha_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.get_delta_weight("default").dtype == torch.float64

    qmodel = get_peft_model(_quantized(tiny_llama), QWHAConfig(rank=1, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="qwha-export merge"):
        qmodel.merge_adapter()


# ----------------------------------------------------------------------------------------------------------------------
# skipping unsupported sizes
# ----------------------------------------------------------------------------------------------------------------------


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(24, 8)
        self.odd_proj = nn.Linear(22, 8)

    def forward(self, x):
        return self.q_proj(x[..., :24]) + self.odd_proj(x[..., :22])


def test_unsupported_d_in_is_skipped_with_warning():
    assert not is_supported_size(22) and is_supported_size(24)
    with pytest.warns(UserWarning, match=r"odd_proj \(d_in=22\)"):
        model = get_peft_model(_Odd(), QWHAConfig(rank=1, target_modules=["q_proj", "odd_proj"]))
    assert model.qwha_skipped == ["odd_proj"] and skipped_layers(model) == ["odd_proj"]
    assert isinstance(model.base_model.model.odd_proj, nn.Linear)
    assert isinstance(model.base_model.model.q_proj, pq.QWHALinear)
    assert "odd_proj" not in model.base_model.targeted_module_names
    assert model(torch.randn(2, 24)).shape == (2, 8)
    with pytest.raises(ValueError, match="odd_proj.*skipped"):
        set_spectrum(
            model, "odd_proj", torch.ones(1), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        )


# ----------------------------------------------------------------------------------------------------------------------
# load validation
# ----------------------------------------------------------------------------------------------------------------------


def _saved(model_base, path, seed=0):
    model = get_peft_model(model_base, QWHAConfig(rank=1))
    _fill_spectra(model, seed=seed)
    model.save_pretrained(path)
    return path


def _corrupt(path, key, fn):
    f = path / "adapter_model.safetensors"
    sd = load_file(f)
    sd[key] = fn(sd[key].clone())
    save_file(sd, f, metadata={"format": "pt"})


LAYER = "model.layers.1.mlp.up_proj"
KEY = f"base_model.model.{LAYER}"


def _set_nan(t):
    t[3] = float("nan")
    return t


def _bad_col(t):
    t[1, 0] = 48 + 5
    return t


@pytest.mark.parametrize(
    "suffix,fn,match",
    [("qwha_spectrum", _set_nan, "NaN"), ("qwha_indices", _bad_col, "out of range")],
)
@pytest.mark.parametrize("loader", ["peft", "helper"])
def test_load_rejects_corrupt_adapter(tiny_llama, tmp_path, suffix, fn, match, loader):
    _saved(copy.deepcopy(tiny_llama), tmp_path)
    _corrupt(tmp_path, f"{KEY}.{suffix}", fn)
    load = PeftModel.from_pretrained if loader == "peft" else load_qwha_adapter
    with pytest.raises(ValueError, match=rf"^{LAYER}: .*{match}") as exc:
        load(copy.deepcopy(tiny_llama), tmp_path)
    assert "\n" not in str(exc.value)


def test_load_rejects_adapter_for_other_base(tiny_llama, tmp_path):
    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(tiny_llama.config)
    cfg.hidden_size = 64
    torch.manual_seed(1)
    _saved(LlamaForCausalLM(cfg).eval(), tmp_path)
    with pytest.raises(
        ValueError, match=r"^model\.layers\.0\.self_attn\.q_proj: adapter was saved for a 48x64 layer"
    ) as exc:
        load_qwha_adapter(copy.deepcopy(tiny_llama), tmp_path)
    assert "\n" not in str(exc.value) and "wrong base model" in str(exc.value)


def test_load_refuses_missing_or_pickled_files(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_qwha_adapter(copy.deepcopy(tiny_llama), tmp_path)
    _saved(copy.deepcopy(tiny_llama), tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickled"):
        load_qwha_adapter(copy.deepcopy(tiny_llama), tmp_path)
