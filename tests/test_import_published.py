"""Import of adapters saved by the published QWHA (QHFT) code."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from qwha_export.converters.import_published import read_published_adapter
from qwha_export.kernels import hadamard_matrix
from qwha_export.published import convert_published_adapter
from qwha_export.tuner import load_qwha_adapter, spectra

Q = "model.layers.0.self_attn.q_proj"  # 48 x 48, own scaling tensor
DOWN = "model.layers.1.mlp.down_proj"  # 48 x 96, config scaling
Q_SCALE, CFG_SCALE = 0.75, 2.0


def _published_spectrum(d_out: int, d_in: int, p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pos = torch.randperm(d_out * d_in, generator=g)[:p]
    values = torch.randn(p, generator=g)
    return values, torch.stack([pos // d_in, pos % d_in]).to(torch.int32)  # the published code saves IntTensors


def _write_published(path, tensors: dict[str, torch.Tensor] | None = None, config: dict | None = None):
    """A published-format adapter directory (keys as saved by the published peft fork)."""
    if tensors is None:
        tensors = {}
        for name, (d_out, d_in), seed in ((Q, (48, 48), 1), (DOWN, (48, 96), 2)):
            values, idx = _published_spectrum(d_out, d_in, 60 + seed, seed)
            key = f"base_model.model.{name}"
            tensors[f"{key}.qhft_spectrum"] = values
            tensors[f"{key}.qhft_indices_default"] = idx
            tensors[f"{key}.qhft_n_frequency_default"] = torch.tensor(values.numel())
            tensors[f"{key}.qhft_random_loc_seed_default"] = torch.tensor(777)
        tensors[f"base_model.model.{Q}.qhft_scaling_default"] = torch.tensor(Q_SCALE)
    if config is None:
        config = {"peft_type": "QHFT", "scaling": CFG_SCALE, "n_frequency": 1000, "target_modules": ["q_proj"]}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(config))
    return tensors


def _published_reference(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """``W + iwht(dense(F)) * s / sqrt(d_out)`` with ``iwht(F) = F @ M / d_in``, applied to a float64 copy."""
    ref = copy.deepcopy(model).double()
    for name, s in ((Q, Q_SCALE), (DOWN, CFG_SCALE)):
        lin = ref.get_submodule(name)
        d_out, d_in = lin.weight.shape
        values = tensors[f"base_model.model.{name}.qhft_spectrum"].double()
        idx = tensors[f"base_model.model.{name}.qhft_indices_default"].long()
        dense = torch.zeros(d_out, d_in, dtype=torch.float64)
        dense[idx[0], idx[1]] = values
        iwht = dense @ hadamard_matrix(d_in, dtype=torch.float64) / d_in
        with torch.no_grad():
            lin.weight += iwht * s / math.sqrt(d_out)
    return ref


def test_read_published_adapter(tmp_path):
    tensors = _write_published(tmp_path)
    layers = read_published_adapter(tmp_path)
    assert sorted(layers) == sorted([Q, DOWN])
    assert layers[Q]["scale"] == Q_SCALE and layers[DOWN]["scale"] == CFG_SCALE
    idx = tensors[f"base_model.model.{DOWN}.qhft_indices_default"].long()
    assert torch.equal(layers[DOWN]["rows"], idx[0]) and torch.equal(layers[DOWN]["cols"], idx[1])
    assert torch.equal(layers[DOWN]["values"], tensors[f"base_model.model.{DOWN}.qhft_spectrum"])
    assert layers[DOWN]["values"].dtype == torch.float32 and layers[DOWN]["rows"].dtype == torch.int64


def test_convert_and_load_matches_published_formula(tiny_llama, tmp_path):
    src, out = tmp_path / "published", tmp_path / "ours"
    tensors = _write_published(src)
    base = copy.deepcopy(tiny_llama)
    x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base(x).logits
    convert_published_adapter(src, base, out)
    # the base model handed to the converter is given back untouched
    assert type(base.get_submodule(Q)) is nn.Linear and not hasattr(base, "peft_config")
    assert all(p.requires_grad for p in base.parameters())
    with torch.no_grad():
        assert torch.equal(base(x).logits, before)

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "QWHA"
    model = load_qwha_adapter(copy.deepcopy(tiny_llama).double(), out)
    assert sorted(spectra(model)) == sorted([Q, DOWN])
    assert spectra(model)[Q][3] == Q_SCALE and spectra(model)[DOWN][3] == CFG_SCALE
    ref = _published_reference(tiny_llama, tensors)
    with torch.no_grad():
        got, want = model(x).logits, ref(x).logits
        plain = copy.deepcopy(tiny_llama).double()(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    assert float((want - plain).abs().max()) > 1e-3  # the adapter matters


def _tensors_with(**changes):
    values, idx = _published_spectrum(48, 48, 40, 3)
    key = f"base_model.model.{Q}"
    t = {f"{key}.qhft_spectrum": values, f"{key}.qhft_indices_default": idx}
    for what, fn in changes.items():
        name = f"{key}.qhft_{what}" if what == "spectrum" else f"{key}.qhft_{what}_default"
        t[name] = fn(t[name].clone())
    return t


def _nan(v):
    v[5] = float("nan")
    return v


def _negative(i):
    i[0, 2] = -1
    return i


def _duplicate(i):
    i[:, 1] = i[:, 0]
    return i


@pytest.mark.parametrize(
    "tensors,match",
    [
        ({"foo.weight": torch.zeros(3)}, "no qhft_ tensors"),
        (_tensors_with(spectrum=_nan), rf"^{Q}: .*NaN"),
        (_tensors_with(indices=_negative), rf"^{Q}: negative"),
        (_tensors_with(indices=_duplicate), rf"^{Q}: duplicate"),
        (_tensors_with(indices=lambda i: i[:, :-1].contiguous()), rf"^{Q}: 40 spectrum values but 39"),
        (_tensors_with(indices=lambda i: i.float()), rf"^{Q}: qhft_indices must be integers"),
    ],
)
def test_read_rejects_bad_adapters(tmp_path, tensors, match):
    _write_published(tmp_path, tensors)
    with pytest.raises(ValueError, match=match) as exc:
        read_published_adapter(tmp_path)
    assert "\n" not in str(exc.value)


def test_missing_files(tmp_path):
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        read_published_adapter(tmp_path)
    _write_published(tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match="adapter_config.json"):
        read_published_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickled"):
        read_published_adapter(tmp_path)


def test_config_scaling_keys_and_default(tmp_path):
    tensors = _tensors_with()
    _write_published(tmp_path, tensors, {"alpha": 3.0})
    assert read_published_adapter(tmp_path)[Q]["scale"] == 3.0
    _write_published(tmp_path, tensors, {"qhft_scaling": 0.5})
    assert read_published_adapter(tmp_path)[Q]["scale"] == 0.5
    _write_published(tmp_path, tensors, {"peft_type": "QHFT"})
    assert read_published_adapter(tmp_path)[Q]["scale"] == 1.0


def test_normalises_module_paths(tmp_path):
    values, idx = _published_spectrum(48, 48, 10, 4)
    _write_published(
        tmp_path,
        {f"_orig_mod.base_model.model.{Q}.default.qhft_spectrum.default": values, f"{Q}.qhft_indices.default": idx},
    )
    assert list(read_published_adapter(tmp_path)) == [Q]


def test_convert_rejects_out_of_range_and_unknown_layers(tiny_llama, tmp_path):
    values, idx = _published_spectrum(48, 96, 30, 5)  # Walsh indices up to 95 on a d_in = 48 layer
    _write_published(tmp_path / "a", {f"{Q}.qhft_spectrum": values, f"{Q}.qhft_indices_default": idx})
    with pytest.raises(ValueError, match=rf"^{Q}: Walsh index \d+ out of range for d_in=48"):
        convert_published_adapter(tmp_path / "a", copy.deepcopy(tiny_llama), tmp_path / "out")
    values, idx = _published_spectrum(48, 48, 30, 6)
    _write_published(
        tmp_path / "b",
        {
            "model.layers.7.self_attn.q_proj.qhft_spectrum": values,
            "model.layers.7.self_attn.q_proj.qhft_indices_default": idx,
        },
    )
    with pytest.raises(ValueError, match=r"^model\.layers\.7\.self_attn\.q_proj: no such module"):
        convert_published_adapter(tmp_path / "b", copy.deepcopy(tiny_llama), tmp_path / "out")
