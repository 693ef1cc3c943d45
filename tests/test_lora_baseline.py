"""peft LoRA on our quantized base (custom module mapping) and the LoRA-from-quantization-error init (CLoQ style)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn

from qwha_export.converters.calibration import gram_to_root
from qwha_export.converters.lora_init import lora_from_error
from qwha_export.converters.quantize import quantize_rtn
from qwha_export.converters.qwha_init import output_error
from qwha_export.lora_baseline import (
    QuantLoraLinear,
    load_lora_adapter,
    lora_layers,
    quant_lora_config,
    set_lora_weights,
)
from qwha_export.quant_linear import QuantLinear, replace_linear

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _quantized(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "up_proj", "down_proj"):
            replace_linear(model, name, QuantLinear.from_linear(module, quantize_rtn(module.weight, 4, 32)))
    return model


def _random_factors(pm, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, layer in lora_layers(pm).items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        set_lora_weights(pm, name, torch.randn(a.shape, generator=g) * 0.1, torch.randn(b.shape, generator=g) * 0.1)


def test_peft_lora_on_quantized_base_forward_and_gradients(tiny_llama):
    base = _quantized(tiny_llama)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = base(ids).logits
    pm = get_peft_model(copy.deepcopy(base), quant_lora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    kinds = {n: type(m).__name__ for n, m in lora_layers(pm).items()}
    assert kinds["model.layers.0.self_attn.q_proj"] == "QuantLoraLinear"  # QuantLinear -> our class
    assert kinds["model.layers.0.self_attn.v_proj"] == "Linear"  # plain nn.Linear -> peft's own
    assert len(kinds) == 2 * len(TARGETS)
    with torch.no_grad():  # zero-init B (QLoRA style): exactly the quantized base
        assert torch.equal(pm(ids).logits, ref)

    _random_factors(pm)
    layer = lora_layers(pm)["model.layers.0.mlp.up_proj"]
    assert isinstance(layer, QuantLoraLinear)
    x = torch.randn(3, layer.in_features)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expect = layer.base_layer(x) + layer.scaling["default"] * (x @ a.T @ b.T)
    torch.testing.assert_close(layer(x), expect, rtol=1e-5, atol=1e-6)

    pm.train()
    pm(ids, labels=ids).loss.backward()
    grads = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads), sorted(grads)[:3]
    assert len(grads) == 2 * 2 * len(TARGETS)  # A and B of every adapted layer
    with pytest.raises(ValueError, match="quantized"):
        layer.merge()


def test_peft_lora_on_quantized_base_save_load(tiny_llama, tmp_path):
    base = _quantized(tiny_llama)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(2))
    pm = get_peft_model(copy.deepcopy(base), quant_lora_config(r=4, lora_alpha=8, target_modules=TARGETS))
    _random_factors(pm, seed=3)
    with torch.no_grad():
        want = pm(ids).logits
    pm.save_pretrained(str(tmp_path / "lora"))
    loaded = load_lora_adapter(copy.deepcopy(base), tmp_path / "lora")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want)
    assert not any(p.requires_grad for p in loaded.parameters())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a peft adapter directory"):
        load_lora_adapter(copy.deepcopy(base), tmp_path / "empty")
    with pytest.raises(ValueError, match="expected"):
        set_lora_weights(pm, "model.layers.0.self_attn.q_proj", torch.zeros(3, 3), torch.zeros(3, 3))


@pytest.mark.parametrize("d_out,d_in,rank", [(48, 64, 4), (33, 96, 8)])
def test_lora_from_error_reduces_layer_error(d_out, d_in, rank):
    g = torch.Generator().manual_seed(d_out)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    w_q = quantize_rtn(w, 2, 32).dequantize(torch.float64)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.05, 2, d_in)
    x = torch.randn(256, d_in, generator=g, dtype=torch.float64) @ mix  # correlated activations
    x_held = torch.randn(256, d_in, generator=g, dtype=torch.float64) @ mix
    gram, held = x.T @ x, x_held.T @ x_held
    init = lora_from_error(w, w_q, gram, rank, scaling=2.0, eval_gram=held)
    e = w - w_q
    before, after = output_error(e, gram), output_error(e - init.delta_weight(), gram)
    print(f"rel error before {init.report['rel_err_before_calib']:.4f} after {init.report['rel_err_after_calib']:.4f}")
    assert init.A.shape == (rank, d_in) and init.B.shape == (d_out, rank) and init.A.dtype == torch.float32
    assert after < 0.95 * before
    assert init.report["rel_err_after_heldout"] < init.report["rel_err_before_heldout"]
    # activation weighting matters: the weighted fit beats the plain truncated SVD of E at the same rank
    u, s, vh = torch.linalg.svd(e)
    plain = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert after < output_error(e - plain, gram)
    # Eckart-Young: the error left is the tail of the singular values of E R (R = damped sqrt(G))
    sv = torch.linalg.svdvals(e @ gram_to_root(gram))
    resid = output_error(e - init.delta_weight(), gram + 1e-4 * gram.diagonal().mean() * torch.eye(d_in))
    assert abs(resid - float(sv[rank:].square().sum().sqrt())) <= 1e-4 * resid + 1e-6
    with pytest.raises(ValueError, match="rank"):
        lora_from_error(w, w_q, gram, 0)
