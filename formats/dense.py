"""Dense (un-quantized) Hugging Face folders, and the config / tokenizer plumbing every exported folder shares.

Layout of an exported HF folder (all formats): ``config.json`` (+ ``quantization_config`` for quantized formats),
the tokenizer / generation files copied from the source folder (:data:`DenseFormat.AUX_FILES`), and the weights
written with :class:`~qwha_export.formats.shards.ShardWriter`. A dense layer is ``<module>.weight`` holding
``QuantizedWeight.dequantize(dtype)`` (``(d_out, d_in)``, row-major), i.e. the exact ``(code - zero) * scale``
rounded once to ``dtype``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .jsonfile import read_json_object
from .quantized import QuantizedWeight
from .shards import join_key

__all__ = ["DenseFormat", "copy_aux_files", "load_config", "write_config", "write_dense_layer"]

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


class DenseFormat:
    """Helpers shared by every exporter; all static."""

    #: files copied verbatim from the source folder when present (config.json is rewritten, not copied)
    AUX_FILES: tuple[str, ...] = (
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "spiece.model",
        "chat_template.jinja",
        "chat_template.json",
    )

    @staticmethod
    def copy_aux_files(src_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> list[str]:
        """Copy the tokenizer / generation-config files of ``src_dir`` that exist into ``out_dir``; return names."""
        src, dst = Path(src_dir), Path(out_dir)
        if not src.is_dir():
            raise ValueError(f"source model folder {src} does not exist")
        dst.mkdir(parents=True, exist_ok=True)
        copied = []
        for name in DenseFormat.AUX_FILES:
            p = src / name
            if p.is_file():
                shutil.copyfile(p, dst / name)
                copied.append(name)
        return copied

    @staticmethod
    def load_config(src: str | os.PathLike[str] | Mapping[str, Any] | Any) -> dict[str, Any]:
        """A config as a plain dict: from a folder (its ``config.json``), a ``config.json`` path, a mapping or a
        ``transformers.PretrainedConfig`` (``to_dict()``)."""
        if isinstance(src, Mapping):
            return json.loads(json.dumps(dict(src)))  # deep copy, JSON-clean
        if hasattr(src, "to_dict") and not isinstance(src, str | os.PathLike):
            return json.loads(json.dumps(src.to_dict(), default=str))
        p = Path(src)
        if p.is_dir():
            p = p / "config.json"
        return read_json_object(p, missing=f"config file {p} does not exist")

    @staticmethod
    def write_config(
        out_dir: str | os.PathLike[str],
        config: str | os.PathLike[str] | Mapping[str, Any] | Any,
        quantization_config: Mapping[str, Any] | None = None,
        dtype: torch.dtype | None = None,
    ) -> Path:
        """Write ``out_dir/config.json`` from ``config`` (see :meth:`load_config`).

        ``quantization_config`` None removes any ``quantization_config`` of the source (a dense export of a
        quantized source must not claim to be quantized); a dict is stored as is. ``dtype`` (float16, bfloat16,
        float32) sets ``dtype`` (and ``torch_dtype`` if the source has that legacy key). JSON is written with
        indent 2 and sorted keys.
        """
        cfg = DenseFormat.load_config(config)
        cfg.pop("quantization_config", None)
        if quantization_config is not None:
            if not isinstance(quantization_config, Mapping):
                raise ValueError(f"quantization_config must be a dict, got {type(quantization_config).__name__}")
            cfg["quantization_config"] = json.loads(json.dumps(dict(quantization_config)))
        if dtype is not None:
            if dtype not in _DTYPE_NAMES:
                raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {dtype}")
            cfg["dtype"] = _DTYPE_NAMES[dtype]
            if "torch_dtype" in cfg:
                cfg["torch_dtype"] = _DTYPE_NAMES[dtype]
        dst = Path(out_dir)
        dst.mkdir(parents=True, exist_ok=True)
        path = dst / "config.json"
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        return path

    @staticmethod
    def write_dense_layer(
        qw: QuantizedWeight, prefix: str = "", dtype: torch.dtype = torch.float16
    ) -> dict[str, torch.Tensor]:
        """``{prefix.weight: qw.dequantize(dtype)}`` -- the dense layer of a quantized weight."""
        if not isinstance(qw, QuantizedWeight):
            raise ValueError(f"expected a QuantizedWeight, got {type(qw).__name__}")
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {dtype}")
        return {join_key(prefix, "weight"): qw.dequantize(dtype).contiguous()}


copy_aux_files = DenseFormat.copy_aux_files
load_config = DenseFormat.load_config
write_config = DenseFormat.write_config
write_dense_layer = DenseFormat.write_dense_layer
