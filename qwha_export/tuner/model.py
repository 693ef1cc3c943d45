"""The QWHA ``BaseTuner`` (:class:`QWHAModel`), its registration with peft, and the helpers that install, read,
check and load spectra by layer name."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..kernels import is_supported_size
from ..quant_linear import QuantLinear
from .config import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PREFIX, QWHAConfig, _ensure_peft_type
from .layer import QWHALayer, QWHALinear

__all__ = [
    "QWHAModel",
    "Spectrum",
    "check_adapter_files",
    "load_qwha_adapter",
    "qwha_layers",
    "register_qwha",
    "set_spectrum",
    "skipped_layers",
    "spectra",
]

# ----------------------------------------------------------------------------------------------------------------------
# tuner
# ----------------------------------------------------------------------------------------------------------------------


class QWHAModel(BaseTuner):
    """peft tuner injecting :class:`QWHALinear` layers. ``qwha_skipped`` lists the targeted layers that were left
    alone because their ``d_in`` has no supported Walsh-Hadamard size."""

    prefix: str = PREFIX
    tuner_layer_cls = QWHALayer
    target_module_mapping: dict[str, list[str]] = {}

    @property
    def qwha_skipped(self) -> list[str]:
        return list(getattr(self.model, "_qwha_skipped", []))

    def _create_and_replace(
        self, config, adapter_name, target, target_name, parent, current_key=None, **optional_kwargs
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        if isinstance(target, QWHALayer):
            target.update_layer(adapter_name, config, scale=config.layer_scale(current_key))
            return
        if not isinstance(target, (nn.Linear, QuantLinear)):
            raise TypeError(
                f"{current_key}: QWHA supports nn.Linear and QuantLinear layers, got {type(target).__name__}"
            )
        if not is_supported_size(int(target.in_features)):
            self._qwha_pending_skips.append(f"{current_key} (d_in={target.in_features})")
            return
        new_module = QWHALinear(target, adapter_name, config, layer_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # peft's version reads ``child.qweight.device``; our QuantLinear.qweight is a QuantizedWeight (no device).
        # The adapter tensors are already created on the base layer's device, so only the swap is needed.
        setattr(parent, child_name, new_module)

    def inject_adapter(self, model, adapter_name, *args, **kwargs) -> None:
        self._qwha_pending_skips = []
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        skipped = self._qwha_pending_skips
        self._qwha_pending_skips = []
        if skipped:
            names = [s.split(" ")[0] for s in skipped]
            self.targeted_module_names[:] = [n for n in self.targeted_module_names if n not in names]
            previous = list(getattr(model, "_qwha_skipped", []))
            model._qwha_skipped = previous + [n for n in names if n not in previous]
            warnings.warn(
                f"QWHA: skipped {len(skipped)} layer(s) whose d_in has no supported Walsh-Hadamard size: "
                + ", ".join(skipped),
                UserWarning,
                stacklevel=2,
            )


def register_qwha() -> None:
    """Register the QWHA method with peft (idempotent; a reload re-registers the new classes)."""
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )
    from peft.utils import register_peft_method

    peft_type = _ensure_peft_type()
    if (
        PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is QWHAModel
        and PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is QWHAConfig
    ):
        return
    for mapping in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_MIXED_MODEL_MAPPING):
        mapping.pop(peft_type, None)
    PEFT_TYPE_TO_PREFIX_MAPPING.pop(peft_type, None)
    register_peft_method(name="qwha", config_cls=QWHAConfig, model_cls=QWHAModel, prefix=PREFIX)


register_qwha()


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def _inner_model(model: nn.Module) -> nn.Module:
    """The transformers model (with the injected layers) behind a PeftModel / QWHAModel / plain module."""
    if isinstance(model, PeftModel):
        return model.get_base_model()
    if isinstance(model, BaseTuner):
        return model.model
    return model


def qwha_layers(model: nn.Module) -> dict[str, QWHALayer]:
    """``{layer_name: QWHA layer}`` with names relative to the underlying transformers model."""
    inner = _inner_model(model)
    return {name: m for name, m in inner.named_modules() if isinstance(m, QWHALayer)}


def skipped_layers(model: nn.Module) -> list[str]:
    """Targeted layers left without an adapter (unsupported ``d_in``)."""
    return list(getattr(_inner_model(model), "_qwha_skipped", []))


def _peft_config_of(model: nn.Module, adapter: str) -> QWHAConfig | None:
    for obj in (model, _inner_model(model)):
        configs = getattr(obj, "peft_config", None)
        if isinstance(configs, dict) and isinstance(configs.get(adapter), QWHAConfig):
            return configs[adapter]
    return None


def set_spectrum(
    model: nn.Module,
    layer_name: str,
    values: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    adapter: str = "default",
    scale: float | None = None,
) -> None:
    """Install an initialised spectrum in layer ``layer_name`` (module path relative to the transformers model).

    ``nnz`` may differ from the current one (parameter and buffers are replaced). ``scale`` optionally changes the
    layer's ``s``; when it differs from the adapter config's ``scale`` it is recorded in ``scale_pattern`` so that
    ``save_pretrained`` keeps it. Raises ``ValueError`` naming the layer for an unknown layer, NaN/inf values or
    out-of-range indices.
    """
    layers = qwha_layers(model)
    layer = layers.get(layer_name)
    if layer is None:
        skipped = skipped_layers(model)
        hint = " (it was skipped: unsupported d_in)" if layer_name in skipped else ""
        raise ValueError(f"{layer_name}: not a QWHA layer of this model{hint}; QWHA layers: {len(layers)}")
    layer.set_spectrum(values, rows, cols, adapter=adapter, scale=scale)
    if scale is not None:
        config = _peft_config_of(model, adapter)
        if config is not None:
            if float(scale) == config.scale:
                config.scale_pattern.pop(layer_name, None)
            else:
                config.scale_pattern[layer_name] = float(scale)


Spectrum = tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]


def spectra(model: nn.Module, adapter: str = "default") -> dict[str, Spectrum]:
    """``{layer_name: (values, rows, cols, scale)}`` of every QWHA layer holding ``adapter`` (detached CPU copies)."""
    return {
        name: layer.get_spectrum(adapter)
        for name, layer in qwha_layers(model).items()
        if adapter in layer.qwha_spectrum
    }


def check_adapter_files(adapter_dir: str | os.PathLike, peft_type: str) -> Path:
    """One-line ``ValueError`` unless ``adapter_dir`` holds ``adapter_config.json`` of ``peft_type`` and
    ``adapter_model.safetensors`` (a pickled ``adapter_model.bin`` is never loaded); returns the path."""
    path = Path(adapter_dir)
    if not (path / ADAPTER_CONFIG_NAME).is_file():
        raise ValueError(f"{path}: no {ADAPTER_CONFIG_NAME}; not a peft adapter directory")
    if not (path / ADAPTER_WEIGHTS_NAME).is_file():
        extra = " (pickled adapter_model.bin files are not loaded)" if (path / "adapter_model.bin").exists() else ""
        raise ValueError(f"{path}: no {ADAPTER_WEIGHTS_NAME}{extra}")
    found = PeftConfig._get_peft_type(str(path))
    if found != peft_type:
        raise ValueError(f"{path}: adapter has peft_type {found!r}, expected {peft_type!r}")
    return path


def load_qwha_adapter(
    base_model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> PeftModel:
    """``PeftModel.from_pretrained`` for a QWHA adapter directory, safetensors only, with strict checks.

    Raises ``ValueError`` (one line) for a missing ``adapter_config.json`` / ``adapter_model.safetensors`` (a
    pickled ``adapter_model.bin`` is never loaded), a non-QWHA adapter, and -- naming the layer -- NaN/inf values,
    out-of-range indices, an adapter made for a different base model, or a QWHA layer the file has no entry for.
    """
    path = check_adapter_files(adapter_dir, "QWHA")
    from safetensors import safe_open

    with safe_open(str(path / ADAPTER_WEIGHTS_NAME), framework="pt") as f:
        keys = set(f.keys())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found missing adapter keys")
        model = PeftModel.from_pretrained(
            base_model, str(path), adapter_name=adapter_name, is_trainable=is_trainable, use_safetensors=True
        )
    for name in qwha_layers(model):
        key = f"base_model.model.{name}.qwha_spectrum"
        if key not in keys:
            raise ValueError(f"{name}: QWHA layer has no entry in {path / ADAPTER_WEIGHTS_NAME}; wrong base model?")
    return model
