"""The one loop that writes a checkpoint from an adapter directory's base, layer by layer: ``merge`` and ``fuse``
(and ``merge --requant refit``, through ``fuse``) are layer functions passed to :func:`write_checkpoint`.

The base checkpoint is streamed tensor by tensor (:func:`~.adapter_source.iter_base_layers`, blocks in order):
tensors that are not layer weights pass through bit-identical; for each layer weight ``layer_fn(layer, weight,
base_qw)`` returns the tensors to write (:class:`LayerOutput`), shards are written as they fill, and the
settings of every layer written quantized become the folder's one ``quantization_config``
(:func:`qwha_export.formats.checkpoint_quantization_config`), written with the base's ``config.json`` and auxiliary
files. The caller owns the output folder (``atomic_output_dir``) and the manifest.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..formats import ExportFormat, checkpoint_quantization_config, needs_desc_act
from ..formats.dense import DenseFormat
from ..formats.quantized import QuantizedWeight
from ..formats.shards import ShardWriter
from .adapter_source import iter_base_layers

__all__ = ["LayerOutput", "WrittenCheckpoint", "write_checkpoint"]

LayerFn = Callable[[str, torch.Tensor, QuantizedWeight | None], "LayerOutput"]


@dataclass
class LayerOutput:
    """What a layer function writes for one layer: ``tensors`` (full names), the :class:`QuantizedWeight` they
    store when the layer is written quantized (its settings go into ``quantization_config``), and an optional
    per-layer ``record`` for the manifest."""

    tensors: dict[str, torch.Tensor]
    quantized: QuantizedWeight | None = None
    record: dict[str, Any] | None = None


@dataclass
class WrittenCheckpoint:
    """The outcome of :func:`write_checkpoint`: the shard index, the ``quantization_config`` written (None for
    dense), the auxiliary files copied and the layer records, in checkpoint order."""

    index: dict[str, Any]
    quantization_config: dict[str, Any] | None
    aux: list[str]
    records: list[dict[str, Any]] = field(default_factory=list)

    def files(self) -> dict[str, Any]:
        """The manifest's ``files`` entry."""
        return {
            "shards": sorted(set(self.index["weight_map"].values())),
            "aux": self.aux,
            "total_size": self.index["metadata"]["total_size"],
        }


def write_checkpoint(
    folder: str | Path,
    base_dir: str | Path,
    base_file: str | Path,
    layers: Mapping[str, str],
    quantized: Collection[str],
    layer_fn: LayerFn,
    *,
    fmt: ExportFormat | str,
    max_shard_bytes: int,
    dtype: torch.dtype | None = None,
    empty: tuple[int, int] | None = None,
    on_layer: Callable[[int, int], Any] | None = None,
) -> WrittenCheckpoint:
    """Write the checkpoint into ``folder`` (an empty temporary folder) from the base model ``base_dir``.

    ``layers``: ``{weight name: layer}`` of the weights ``layer_fn`` replaces; ``quantized``: the layers whose
    quantized base is read from ``base_file`` (the adapter directory's base file) and handed to ``layer_fn``
    (``None`` for the others). ``fmt``: the format the layers are written in (its ``quantization_config``);
    ``dtype``: the dense checkpoint's ``torch_dtype`` (``fmt`` dense only); ``empty``: ``(bits, group_size)`` to
    describe when no layer is written quantized. ``on_layer(done, total)`` after each layer (a progress bar)."""
    fmt = ExportFormat.parse(fmt)
    folder = Path(folder)
    with safe_open(str(base_file), framework="pt") as qf:
        qkeys = set(qf.keys())
    records: list[dict[str, Any]] = []
    settings: set[tuple[int, int, int]] = set()  # (bits, real group size, d_in) of the layers written quantized
    desc_act = False
    done = 0
    with ShardWriter(folder, max_shard_bytes=max_shard_bytes) as shards:
        for layer, weight, base_qw in iter_base_layers(base_dir, base_file, layers, quantized, qkeys, shards.add):
            out = layer_fn(layer, weight, base_qw)
            shards.add_many(out.tensors)
            if out.quantized is not None:
                desc_act = desc_act or needs_desc_act(out.quantized)
                settings.add((out.quantized.bits, out.quantized.group_size, out.quantized.shape[1]))
            if out.record is not None:
                records.append(out.record)
            del weight, base_qw, out
            done += 1
            if on_layer is not None:
                on_layer(done, len(layers))
        index = shards.close()
    qconfig = checkpoint_quantization_config(fmt, settings, targets=layers.values(), desc_act=desc_act, empty=empty)
    DenseFormat.write_config(
        folder, base_dir, quantization_config=qconfig, dtype=dtype if fmt == ExportFormat.DENSE else None
    )
    aux = DenseFormat.copy_aux_files(base_dir, folder)
    return WrittenCheckpoint(index=index, quantization_config=qconfig, aux=aux, records=records)
