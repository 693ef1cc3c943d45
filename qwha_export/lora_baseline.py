"""peft LoRA on our quantized base: ``get_peft_model(model, quant_lora_config(...))`` for models holding
:class:`~qwha_export.quant_linear.QuantLinear` layers (the LoRA baselines QWHA is compared with).

peft's LoRA dispatchers know ``nn.Linear``, bitsandbytes, GPTQ, AWQ, ... but not our ``QuantLinear``
(``get_peft_model`` refuses it: "Target module ... is not supported"). peft's supported extension point for such
layers is the custom module mapping ``LoraConfig._register_custom_module({QuantLinear: QuantLoraLinear})`` (the
"dynamic dispatch" of peft's custom-models guide): :func:`quant_lora_config` returns a ``LoraConfig`` with that
mapping, so plain ``nn.Linear`` layers get peft's own ``lora.Linear`` and ``QuantLinear`` layers get
:class:`QuantLoraLinear`.

:class:`QuantLoraLinear` is peft's ``lora.Linear`` (forward ``base(x) + scaling * lora_B(lora_A(dropout(x)))``,
dropout, rsLoRA, adapter switching, saving) around the frozen quantized layer; it refuses ``merge`` (the base weight is
quantized -- merge with ``qwha-export merge``-style re-quantization instead) and reads its sizes from the
``QuantLinear``. The mapping is not saved with the config (peft keeps it in a private field), so a saved adapter is
loaded with :func:`load_lora_adapter`, which re-registers it.

:func:`set_lora_weights` installs initialised factors (e.g. from :func:`qwha_export.converters.lora_init.
lora_from_error`, LoftQ/CLoQ style); a fresh config gives peft's default init (Kaiming ``A``, zero ``B``: QLoRA
style).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn

from .quant_linear import QuantLinear

__all__ = ["QuantLoraLinear", "load_lora_adapter", "lora_layers", "quant_lora_config", "set_lora_weights"]



class QuantLoraLinear(LoraLinear):
    """peft ``lora.Linear`` around a frozen :class:`QuantLinear` (no in-place merge: the base is quantized)."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        return int(base.in_features), int(base.out_features)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(
            "cannot merge a LoRA adapter into a QuantLinear base in place (the weight is quantized); "
            "merge into the full-precision weights and re-quantize instead"
        )

    def unmerge(self) -> None:
        if self.merged:  # never reached: merge refuses
            raise ValueError("QuantLoraLinear adapters are never merged")


def quant_lora_config(**kwargs: Any) -> LoraConfig:
    """``LoraConfig(**kwargs)`` that also adapts :class:`QuantLinear` layers (peft's custom module mapping)."""
    config = LoraConfig(**kwargs)
    return register_quant_lora(config)


def register_quant_lora(config: LoraConfig) -> LoraConfig:
    """Add the ``QuantLinear -> QuantLoraLinear`` mapping to an existing ``LoraConfig`` (in place; returned)."""
    if not isinstance(config, LoraConfig):
        raise ValueError(f"expected a peft LoraConfig, got {type(config).__name__}")
    config._register_custom_module({QuantLinear: QuantLoraLinear})
    return config


def _inner(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """``{layer_name: LoRA layer}`` with names relative to the underlying transformers model."""
    return {n: m for n, m in _inner(model).named_modules() if isinstance(m, LoraLayer)}


def set_lora_weights(
    model: nn.Module, layer_name: str, A: torch.Tensor, B: torch.Tensor, adapter: str = "default"
) -> None:
    """Copy factors ``A`` (``r x d_in``) and ``B`` (``d_out x r``) into LoRA layer ``layer_name``.

    ``ValueError`` (naming the layer) for an unknown layer or adapter, a shape mismatch or non-finite values.
    """
    layer = lora_layers(model).get(layer_name)
    if layer is None:
        raise ValueError(f"{layer_name}: not a LoRA layer of this model")
    if adapter not in layer.lora_A:
        raise ValueError(f"{layer_name}: has no LoRA adapter {adapter!r}")
    wa, wb = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    for name, t, target in (("A", A, wa), ("B", B, wb)):
        if tuple(t.shape) != tuple(target.shape):
            raise ValueError(f"{layer_name}: LoRA {name} has shape {tuple(t.shape)}, expected {tuple(target.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{layer_name}: LoRA {name} has NaN/inf values")
    with torch.no_grad():
        wa.copy_(A.to(wa.dtype))
        wb.copy_(B.to(wb.dtype))


def load_lora_adapter(
    base_model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> PeftModel:
    """``PeftModel.from_pretrained`` for a LoRA adapter saved from a quantized (or plain) base, safetensors only.

    One-line ``ValueError`` for a missing config/weights file (a pickled ``adapter_model.bin`` is never loaded) or a
    non-LoRA adapter.
    """
    from .tuner import check_adapter_files

    path = check_adapter_files(adapter_dir, "LORA")
    config = register_quant_lora(LoraConfig.from_pretrained(str(path)))
    config.inference_mode = not is_trainable
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found missing adapter keys")
        return PeftModel.from_pretrained(
            base_model, str(path), adapter_name=adapter_name, is_trainable=is_trainable, config=config,
            use_safetensors=True,
        )
