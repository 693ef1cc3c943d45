"""Readers and writers of exported checkpoints: bit packing, GPTQ, compressed-tensors, dense HF folders, shards.

Rule of this package: it only reads and writes (bit layout, file layout, config dicts) -- no quantization math.
One writer per format, selected by :class:`ExportFormat`; :func:`get_writer` returns a :class:`LayerWriter`
whose ``write_layer(qw, prefix, **options)`` gives the tensors of one quantized linear for that format.

======================  ===========================================================  ===========================
format                  per-layer tensors                                            ``quantization_config``
======================  ===========================================================  ===========================
``dense``               ``weight`` (dequantized)                                     none
``gptq``                ``qweight, qzeros (zero-1), scales, g_idx``                  :func:`gptq_quantization_config`
``gptq_v2``             ``qweight, qzeros (zero), scales, g_idx``                    :func:`gptq_quantization_config`
``compressed-tensors``  ``weight_packed, weight_scale, weight_zero_point,``          :func:`ct_quantization_config`
                        ``weight_shape``
``fused``, ``onnx``     not per-layer tensor formats: no writer registered here
======================  ===========================================================  ===========================

The package namespace is lazy (PEP 562): ``ExportFormat`` comes from the torch-free :mod:`.export_format`, every
other name is imported from its module on first use, so ``from qwha_export.formats import ExportFormat`` (the CLI's
choices) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .export_format import FUSED_BASE_FORMATS, ExportFormat

_LAZY = {
    "LayerWriter": "registry",
    "WRITERS": "registry",
    "get_writer": "registry",
    "checkpoint_quantization_config": "registry",
    "DenseFormat": "dense",
    "write_dense_layer": "dense",
    "ShardWriter": "shards",
    "iter_checkpoint_tensors": "shards",
    "join_key": "shards",
    "write_gptq_layer": "gptq",
    "read_gptq_layer": "gptq",
    "gptq_quantization_config": "gptq",
    "needs_desc_act": "gptq",
    "write_ct_layer": "compressed_tensors",
    "read_ct_layer": "compressed_tensors",
    "ct_quantization_config": "compressed_tensors",
}

__all__ = ["ExportFormat", "FUSED_BASE_FORMATS", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value
