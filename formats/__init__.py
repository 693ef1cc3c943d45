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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import Any

import torch

from .compressed_tensors import ct_quantization_config, read_ct_layer, write_ct_layer
from .dense import DenseFormat, write_dense_layer
from .gptq import gptq_quantization_config, needs_desc_act, read_gptq_layer, write_gptq_layer
from .quantized import QuantizedWeight
from .shards import ShardWriter, iter_checkpoint_tensors, join_key

__all__ = [
    "ExportFormat",
    "LayerWriter",
    "WRITERS",
    "get_writer",
    "DenseFormat",
    "ShardWriter",
    "iter_checkpoint_tensors",
    "join_key",
    "write_dense_layer",
    "write_gptq_layer",
    "read_gptq_layer",
    "gptq_quantization_config",
    "needs_desc_act",
    "write_ct_layer",
    "read_ct_layer",
    "ct_quantization_config",
]


class ExportFormat(StrEnum):
    """Export formats (a ``str`` Enum: ``ExportFormat.GPTQ == "gptq"``, ``str(ExportFormat.GPTQ) == "gptq"``)."""

    DENSE = "dense"
    GPTQ = "gptq"
    GPTQ_V2 = "gptq_v2"
    COMPRESSED_TENSORS = "compressed-tensors"
    FUSED = "fused"
    ONNX = "onnx"

    @classmethod
    def parse(cls, value: str | ExportFormat) -> ExportFormat:
        """Case-insensitive; ``_`` and ``-`` are interchangeable (``"compressed_tensors"``, ``"GPTQ-v2"``)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            s = value.strip().lower()
            for f in cls:
                if s == f.value or s.replace("_", "-") == f.value.replace("_", "-"):
                    return f
        raise ValueError(f"unknown export format {value!r}; choose one of {[f.value for f in cls]}")


@dataclass(frozen=True)
class LayerWriter:
    """The writer of one format.

    ``write_layer(qw, prefix="", **options) -> {name: tensor}``; ``read_layer(tensors, prefix, bits, group_size)
    -> QuantizedWeight`` (None for ``dense``, which is lossy); ``quantization_config(bits, group_size, ...)``
    builds the config.json entry (None for ``dense``).
    """

    format: ExportFormat
    write_layer: Callable[..., dict[str, torch.Tensor]]
    read_layer: Callable[[Mapping[str, torch.Tensor], str, int, int], QuantizedWeight] | None
    quantization_config: Callable[..., dict[str, Any]] | None


WRITERS: dict[ExportFormat, LayerWriter] = {
    ExportFormat.DENSE: LayerWriter(ExportFormat.DENSE, write_dense_layer, None, None),
    ExportFormat.GPTQ: LayerWriter(
        ExportFormat.GPTQ,
        partial(write_gptq_layer, checkpoint_format="gptq"),
        partial(read_gptq_layer, checkpoint_format="gptq"),
        partial(gptq_quantization_config, checkpoint_format="gptq"),
    ),
    ExportFormat.GPTQ_V2: LayerWriter(
        ExportFormat.GPTQ_V2,
        partial(write_gptq_layer, checkpoint_format="gptq_v2"),
        partial(read_gptq_layer, checkpoint_format="gptq_v2"),
        partial(gptq_quantization_config, checkpoint_format="gptq_v2"),
    ),
    ExportFormat.COMPRESSED_TENSORS: LayerWriter(
        ExportFormat.COMPRESSED_TENSORS, write_ct_layer, read_ct_layer, ct_quantization_config
    ),
}


def get_writer(fmt: str | ExportFormat) -> LayerWriter:
    """The :class:`LayerWriter` of ``fmt``; ValueError for unknown names and for formats without a layer writer."""
    f = ExportFormat.parse(fmt)
    try:
        return WRITERS[f]
    except KeyError:
        raise ValueError(
            f"export format {f.value!r} has no per-layer writer in qwha_export.formats "
            f"(available: {[k.value for k in WRITERS]})"
        ) from None
