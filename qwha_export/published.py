"""Published QWHA adapters (``qhft_*`` keys of the paper's code) as our peft adapter files.

Reading and checking the published files is :mod:`qwha_export.converters.import_published`; this module builds the
peft QWHA adapter from them (``qwha-export import-published``, :func:`qwha_export.pipeline.import_published`).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from torch import nn

from .converters.import_published import check_published_layers, published_config, read_published_adapter
from .tuner import QWHAConfig, set_spectrum

__all__ = ["convert_published_adapter"]


def convert_published_adapter(
    src_dir: str | os.PathLike, base_model: nn.Module, out_dir: str | os.PathLike, adapter: str | None = None
) -> Path:
    """Convert a published QWHA adapter into our adapter files (``adapter_config.json`` + safetensors).

    ``base_model`` (a transformers model whose target layers are ``nn.Linear`` or ``QuantLinear``) is used to check
    shapes and to build the peft model; it is restored (adapter unloaded, trainability flags back) before returning.
    Loading the result with :func:`qwha_export.tuner.load_qwha_adapter` gives the published layer's function.
    Raises one-line ``ValueError`` naming the layer for a module missing from ``base_model``, an unsupported
    ``d_in`` or out-of-range indices.
    """
    from peft import get_peft_model

    src = Path(src_dir)
    layers = read_published_adapter(src, adapter=adapter)
    cfg = published_config(src)
    check_published_layers(layers, base_model)

    scales = Counter(float(spec["scale"]) for spec in layers.values())
    scale = scales.most_common(1)[0][0]
    pattern = {n: float(s["scale"]) for n, s in layers.items() if float(s["scale"]) != scale}
    base_name = cfg.get("base_model_name_or_path")
    config = QWHAConfig(
        target_modules=sorted(layers),
        scale=scale,
        scale_pattern=pattern,
        init="published",
        base_model_name_or_path=base_name if isinstance(base_name, str) else None,
    )

    grad_flags = [(p, p.requires_grad) for p in base_model.parameters()]
    peft_model = get_peft_model(base_model, config)
    try:
        for name, spec in layers.items():
            set_spectrum(peft_model, name, spec["values"], spec["rows"], spec["cols"], scale=float(spec["scale"]))
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(str(out), safe_serialization=True)
    finally:
        peft_model.base_model.unload()
        if hasattr(base_model, "peft_config"):
            del base_model.peft_config
        for p, flag in grad_flags:
            p.requires_grad_(flag)
    return out
