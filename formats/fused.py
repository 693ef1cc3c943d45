"""Fused-adapter checkpoints: an exported quantized base, bit-identical, with the QWHA spectrum stored beside it.

I/O only (no math). A fused folder is a normal exported Hugging Face folder of the *unchanged* quantized base
(``base_format`` ``gptq_v2`` (default), ``compressed-tensors`` or ``dense``: ``config.json`` with the base format's
``quantization_config``, weight shards, tokenizer files) plus two files:

``qwha_fused.json`` (:data:`FUSED_CONFIG_NAME`)::

    {
      "format_version": 1,
      "base_format": "gptq_v2" | "compressed-tensors" | "dense",
      "adapter_file": "qwha_adapter.safetensors",
      "layers": {"<layer>": {"d_in": int, "d_out": int, "scale": float, "coefficient": float, "nnz": int}},
      "quantized_layers": {"<layer>": {"bits": int, "group_size": int}},   # real group size (d_in = per channel)
      ...                                                                  # free-form extra keys are kept
    }

``coefficient`` is ``scale / (d_in * sqrt(d_out))``, the factor of ``wht(x) @ F.T`` in the layer forward
(:func:`qwha_export.layer.adapter_coefficient`); it is informative -- loaders recompute it from ``scale``.

``qwha_adapter.safetensors`` (:data:`FUSED_ADAPTER_NAME`), per adapted layer ``<layer>`` (the module path in the
Hugging Face model, e.g. ``model.layers.0.self_attn.q_proj``):

==========================  =======  ============  =====================================================
tensor                      dtype    shape         content
==========================  =======  ============  =====================================================
``<layer>.qwha_values``     float32  ``[nnz]``     spectrum values ``F[rows[e], cols[e]]``
``<layer>.qwha_indices``    int32    ``[2, nnz]``  row 0 = output channel, row 1 = Walsh index
==========================  =======  ============  =====================================================

The quantized base layers are stored by the base format's own writer (:data:`qwha_export.formats.WRITERS`) and
read back with its ``read_layer``; the quantized codes are never stored in a private layout.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .export_format import FUSED_BASE_FORMATS
from .jsonfile import read_json_object
from .shards import concat_safetensors, save_safetensors

__all__ = [
    "FUSED_CONFIG_NAME",
    "FUSED_ADAPTER_NAME",
    "FUSED_FORMAT_VERSION",
    "FUSED_BASE_FORMATS",
    "make_fused_config",
    "write_fused_config",
    "read_fused_config",
    "read_fused_adapter",
    "FusedAdapterWriter",
    "FusedSpectra",
]

FUSED_CONFIG_NAME = "qwha_fused.json"
FUSED_ADAPTER_NAME = "qwha_adapter.safetensors"
FUSED_FORMAT_VERSION = 1
_LAYER_KEYS = ("d_in", "d_out", "scale", "coefficient", "nnz")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def make_fused_config(
    base_format: str,
    layers: Mapping[str, Mapping[str, Any]],
    quantized_layers: Mapping[str, Mapping[str, int]],
    **extra: Any,
) -> dict[str, Any]:
    """The ``qwha_fused.json`` dict (validated; see the module docstring)."""
    cfg = {
        **extra,
        "format_version": FUSED_FORMAT_VERSION,
        "base_format": str(base_format),
        "adapter_file": FUSED_ADAPTER_NAME,
        "layers": {str(k): dict(v) for k, v in sorted(layers.items())},
        "quantized_layers": {str(k): dict(v) for k, v in sorted(quantized_layers.items())},
    }
    _validate_config(cfg, "qwha_fused config")
    return cfg


def _validate_config(cfg: Any, where: str) -> None:
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: must hold a JSON object")
    if cfg.get("format_version") != FUSED_FORMAT_VERSION:
        raise ValueError(f"{where}: format_version {cfg.get('format_version')!r} is not supported (expected 1)")
    if cfg.get("base_format") not in FUSED_BASE_FORMATS:
        raise ValueError(f"{where}: base_format {cfg.get('base_format')!r} is not one of {FUSED_BASE_FORMATS}")
    layers = cfg.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"{where}: 'layers' must map layer names to records")
    for name, rec in layers.items():
        if not isinstance(rec, dict) or any(k not in rec for k in _LAYER_KEYS):
            raise ValueError(f"{where}: layer {name} needs keys {_LAYER_KEYS}")
        if not all(_is_int(rec[k]) and rec[k] >= 0 for k in ("d_in", "d_out", "nnz")):
            raise ValueError(f"{where}: layer {name} has non-integer d_in/d_out/nnz")
        if not (_is_num(rec["scale"]) and rec["scale"] != 0 and _is_num(rec["coefficient"])):
            raise ValueError(f"{where}: layer {name} needs a finite non-zero scale and a finite coefficient")
    ql = cfg.get("quantized_layers", {})
    if not isinstance(ql, dict) or not all(
        isinstance(r, dict) and _is_int(r.get("bits")) and _is_int(r.get("group_size")) for r in ql.values()
    ):
        raise ValueError(f"{where}: 'quantized_layers' must map layer names to {{bits, group_size}} integers")


def write_fused_config(out_dir: str | os.PathLike[str], cfg: Mapping[str, Any]) -> Path:
    """Write ``out_dir/qwha_fused.json`` (validated, indent 2)."""
    _validate_config(dict(cfg), "qwha_fused config")
    path = Path(out_dir) / FUSED_CONFIG_NAME
    path.write_text(json.dumps(dict(cfg), indent=2) + "\n")
    return path


def read_fused_config(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``model_dir/qwha_fused.json``; one-line ``ValueError`` on any problem."""
    path = Path(model_dir) / FUSED_CONFIG_NAME
    cfg = read_json_object(path, missing=f"{model_dir}: no {FUSED_CONFIG_NAME}; not a fused QWHA checkpoint")
    _validate_config(cfg, str(path))
    return cfg


class FusedAdapterWriter:
    """Writes ``out_dir/qwha_adapter.safetensors`` one layer at a time: :meth:`add` saves the layer's two tensors
    as a part file, :meth:`close` joins the parts (:func:`~.shards.concat_safetensors`, 16 MiB chunks) and removes
    them. Memory: one layer's spectrum, whatever the depth. Use as a context manager; the parts live in a hidden
    folder of ``out_dir`` (the caller's temporary output folder)."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.path = Path(out_dir) / FUSED_ADAPTER_NAME
        self._parts = Path(out_dir) / ".qwha_adapter.parts"
        self._parts.mkdir()
        self._names: set[str] = set()

    def add(self, layer: str, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> int:
        """Save one layer (layout in the module docstring); returns its ``nnz``."""
        if layer in self._names:
            raise ValueError(f"{layer}: written twice into {FUSED_ADAPTER_NAME}")
        v = values.detach().reshape(-1).to(device="cpu", dtype=torch.float32).contiguous()
        idx = torch.stack([rows.detach().reshape(-1).cpu(), cols.detach().reshape(-1).cpu()])
        if idx.shape[1] != v.numel():
            raise ValueError(f"{layer}: {v.numel()} spectrum values but {idx.shape[1]} indices")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= 2**31):
            raise ValueError(f"{layer}: spectrum indices do not fit int32")
        tensors = {f"{layer}.qwha_values": v, f"{layer}.qwha_indices": idx.to(torch.int32).contiguous()}
        save_safetensors(tensors, self._parts / f"{len(self._names):06d}.safetensors")
        self._names.add(layer)
        return v.numel()

    def close(self) -> Path:
        """Join the parts into the adapter file (once; a second call does nothing)."""
        if not self._parts.exists():
            return self.path
        metadata = {"format": "pt", "qwha_fused_version": str(FUSED_FORMAT_VERSION)}
        concat_safetensors(sorted(self._parts.glob("*.safetensors")), self.path, metadata=metadata)
        shutil.rmtree(self._parts)
        return self.path

    def __enter__(self) -> FusedAdapterWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            shutil.rmtree(self._parts, ignore_errors=True)


class FusedSpectra(Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """``{layer: (values float32, rows int64, cols int64)}`` of a fused folder, read one layer at a time (a
    ``safe_open`` handle per read, so no page of the file stays resident once the caller drops the tensors).

    Building it checks every layer of the config against the file (present, float32 ``[nnz]`` values, int32
    ``[2, nnz]`` indices inside ``(d_out, d_in)``, finite values; one-line ``ValueError`` naming the layer), one
    layer at a time, before any work."""

    def __init__(self, model_dir: str | os.PathLike[str], cfg: Mapping[str, Any] | None = None) -> None:
        d = Path(model_dir)
        self.cfg = read_fused_config(d) if cfg is None else cfg
        self._path = d / str(self.cfg.get("adapter_file", FUSED_ADAPTER_NAME))
        if not self._path.is_file():
            raise ValueError(f"{d}: no {self._path.name}; the fused checkpoint is incomplete")
        with safe_open(str(self._path), framework="pt") as f:
            keys = set(f.keys())
        for layer in self.cfg["layers"]:
            vk, ik = f"{layer}.qwha_values", f"{layer}.qwha_indices"
            if vk not in keys or ik not in keys:
                raise ValueError(f"{layer}: {self._path.name} lacks {vk if vk not in keys else ik}")
            self._read(layer, check=True)

    def _read(self, layer: str, check: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rec = self.cfg["layers"][layer]
        with safe_open(str(self._path), framework="pt") as f:
            values, idx = f.get_tensor(f"{layer}.qwha_values"), f.get_tensor(f"{layer}.qwha_indices")
        nnz = int(rec["nnz"])
        if values.dtype != torch.float32 or tuple(values.shape) != (nnz,):
            raise ValueError(f"{layer}: qwha_values must be float32 [{nnz}], got {values.dtype} {list(values.shape)}")
        if idx.dtype != torch.int32 or tuple(idx.shape) != (2, nnz):
            raise ValueError(f"{layer}: qwha_indices must be int32 [2, {nnz}], got {idx.dtype} {list(idx.shape)}")
        rows, cols = idx[0].long(), idx[1].long()
        if check and nnz:
            if (
                int(rows.min()) < 0
                or int(rows.max()) >= rec["d_out"]
                or int(cols.min()) < 0
                or int(cols.max()) >= rec["d_in"]
            ):
                raise ValueError(f"{layer}: spectrum index out of range for (d_out={rec['d_out']}, d_in={rec['d_in']})")
            if not bool(torch.isfinite(values).all()):
                raise ValueError(f"{layer}: spectrum has NaN/inf values; the adapter file is corrupt")
        return values, rows, cols

    def __getitem__(self, layer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if layer not in self.cfg["layers"]:
            raise KeyError(layer)
        return self._read(layer, check=False)

    def __contains__(self, layer: object) -> bool:  # Mapping's default would read the layer
        return layer in self.cfg["layers"]

    def __iter__(self) -> Iterator[str]:
        return iter(self.cfg["layers"])

    def __len__(self) -> int:
        return len(self.cfg["layers"])


def read_fused_adapter(
    model_dir: str | os.PathLike[str], cfg: Mapping[str, Any] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every layer of :class:`FusedSpectra` at once: ``{layer: (values float32, rows int64, cols int64)}``, checked
    (for a loader that builds the whole model anyway; streamed readers use :class:`FusedSpectra`)."""
    spectra = FusedSpectra(model_dir, cfg)
    return {layer: spectra[layer] for layer in spectra}
