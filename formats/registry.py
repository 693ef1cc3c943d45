"""The writer registry: one :class:`LayerWriter` per per-layer tensor format, keyed by :class:`ExportFormat`
(:data:`WRITERS`, :func:`get_writer`), and :func:`checkpoint_quantization_config` over the registered writers."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from .compressed_tensors import ct_quantization_config, read_ct_layer, write_ct_layer
from .dense import write_dense_layer
from .export_format import ExportFormat
from .gptq import gptq_quantization_config, read_gptq_layer, write_gptq_layer
from .quantized import QuantizedWeight, config_group_size, has_ragged_group

__all__ = ["LayerWriter", "WRITERS", "get_writer", "checkpoint_quantization_config"]


@dataclass(frozen=True)
class LayerWriter:
    """The writer of one format.

    ``write_layer(qw, prefix="", **options) -> {name: tensor}``; ``read_layer(tensors, prefix, bits, group_size)
    -> QuantizedWeight`` (None for ``dense``, which is lossy); ``quantization_config(bits, group_size, ...)``
    builds the config.json entry with the format's own options (None for ``dense``); ``checkpoint_config(bits,
    group_size, *, targets, desc_act, ragged)`` builds it from what every format is told, for
    :func:`checkpoint_quantization_config` (``targets``: the quantized layers; ``ragged``: a layer's last group is
    shorter).
    """

    format: ExportFormat
    write_layer: Callable[..., dict[str, torch.Tensor]]
    read_layer: Callable[[Mapping[str, torch.Tensor], str, int, int], QuantizedWeight] | None
    quantization_config: Callable[..., dict[str, Any]] | None
    checkpoint_config: Callable[..., dict[str, Any]] | None = None


def _gptq_checkpoint_config(checkpoint_format: str):
    def config(bits: int, group_size: int, *, targets: Sequence[str], desc_act: bool, ragged: bool) -> dict[str, Any]:
        del targets  # GPTQ loaders quantize every linear but the head
        backend = "torch" if ragged else None  # GPTQModel's kernel that pads a ragged last group
        return gptq_quantization_config(
            bits, group_size, checkpoint_format=checkpoint_format, desc_act=desc_act, backend=backend
        )

    return config


def _ct_checkpoint_config(
    bits: int, group_size: int, *, targets: Sequence[str], desc_act: bool, ragged: bool
) -> dict[str, Any]:
    del desc_act, ragged  # compressed-tensors stores neither
    return ct_quantization_config(bits, group_size, targets=sorted(targets))


WRITERS: dict[ExportFormat, LayerWriter] = {
    ExportFormat.DENSE: LayerWriter(ExportFormat.DENSE, write_dense_layer, None, None),
    ExportFormat.GPTQ: LayerWriter(
        ExportFormat.GPTQ,
        partial(write_gptq_layer, checkpoint_format="gptq"),
        partial(read_gptq_layer, checkpoint_format="gptq"),
        partial(gptq_quantization_config, checkpoint_format="gptq"),
        _gptq_checkpoint_config("gptq"),
    ),
    ExportFormat.GPTQ_V2: LayerWriter(
        ExportFormat.GPTQ_V2,
        partial(write_gptq_layer, checkpoint_format="gptq_v2"),
        partial(read_gptq_layer, checkpoint_format="gptq_v2"),
        partial(gptq_quantization_config, checkpoint_format="gptq_v2"),
        _gptq_checkpoint_config("gptq_v2"),
    ),
    ExportFormat.COMPRESSED_TENSORS: LayerWriter(
        ExportFormat.COMPRESSED_TENSORS, write_ct_layer, read_ct_layer, ct_quantization_config, _ct_checkpoint_config
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


def checkpoint_quantization_config(
    fmt: str | ExportFormat,
    layers: Iterable[tuple[int, int, int]],
    targets: Collection[str],
    desc_act: bool = False,
    empty: tuple[int, int] | None = None,
) -> dict[str, Any] | None:
    """``config.json``'s ``quantization_config`` for a checkpoint whose quantized ``layers`` (``(bits, real group
    size, d_in)`` of each) were written with ``fmt``'s layer writer; ``targets`` names them. None for formats
    without one (``dense``), and for no layers unless ``empty`` gives ``(bits, group_size)`` to describe.
    ValueError when the layers mix settings that one config cannot describe."""
    writer = get_writer(fmt)
    if writer.checkpoint_config is None:
        return None
    layers = set(layers)
    if not layers:
        if empty is None:
            return None
        return writer.checkpoint_config(*empty, targets=list(targets), desc_act=desc_act, ragged=False)
    bits = {b for b, _, _ in layers}
    shapes = {(g, d_in) for _, g, d_in in layers}
    group_size = config_group_size(shapes)
    if len(bits) > 1 or group_size is None:
        mixed = sorted({(b, g) for b, g, _ in layers})
        raise ValueError(
            f"quantized layers use mixed (bits, group_size) settings {mixed}; one quantization_config cannot describe "
            "them"
        )
    return writer.checkpoint_config(
        bits.pop(), group_size, targets=list(targets), desc_act=desc_act, ragged=has_ragged_group(shapes)
    )
