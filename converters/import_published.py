"""Import adapters saved by the published QWHA code (a peft fork where the method is called ``QHFT``).

The published adapter directory is a peft layout: ``adapter_config.json`` + ``adapter_model.safetensors``, where
each adapted module ``<m>`` has

* ``<m>.qhft_spectrum``: ``(p,)`` float values (``qhft_spectrum.<adapter>`` / ``qhft_spectrum_<adapter>`` also read);
* ``<m>.qhft_indices_default``: integer ``(2, p)``, row 0 = output channel, row 1 = Walsh index;
* optionally ``<m>.qhft_scaling_default``: the scalar ``s`` of that layer; otherwise the config's ``scaling``
  (``qhft_scaling`` or ``alpha`` are accepted too; default 1.0).

Module paths may carry the ``base_model.model.`` prefix, ``_orig_mod.``, an adapter-name segment (``.default``) or a
trailing ``.base_layer``; they are normalised to paths relative to the transformers model
(``model.layers.0.self_attn.q_proj``).

The published layer computes ``Delta W = iwht(dense(F)) * s / sqrt(d_out)`` with ``iwht(F) = F @ M / d_in``, i.e.
``Delta W = (s / (d_in sqrt(d_out))) * F @ M`` -- exactly our adapter coefficient -- so values and indices carry
over unchanged. Duplicate ``(row, col)`` positions are refused: the published dense assignment keeps one of them
while a sparse sum would add them up, so the two functions would differ.

Only safetensors files are read (never pickles).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..kernels import is_supported_size
from ..kernels.spectral import validate_spectrum

__all__ = ["check_published_layers", "published_config", "read_published_adapter"]

_WEIGHTS = "adapter_model.safetensors"
_CONFIG = "adapter_config.json"
_SCALING_KEYS = ("scaling", "qhft_scaling", "alpha")
_ATTR = re.compile(r"^qhft_(spectrum|indices|scaling|n_frequency|random_loc_seed)(?:[._](.+))?$")


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / _CONFIG
    if not cfg_path.is_file():
        raise ValueError(f"{path}: missing {_CONFIG}; not a published QWHA adapter directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{cfg_path}: cannot read JSON ({exc.__class__.__name__}: {exc})".splitlines()[0]) from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _config_scaling(cfg: dict[str, Any], where: Path) -> float:
    for key in _SCALING_KEYS:
        if key in cfg and cfg[key] is not None:
            s = cfg[key]
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s == 0:
                raise ValueError(f"{where / _CONFIG}: {key}={s!r} is not a finite non-zero number")
            return float(s)
    return 1.0


def _normalise_module(path: str, adapter_names: set[str]) -> str:
    stripped = None
    while stripped != path:
        stripped = path
        for pre in ("base_model.model.", "_orig_mod."):
            path = path.removeprefix(pre)
    parts = [p for p in path.split(".") if p and p not in adapter_names and p != "_orig_mod"]
    while parts and parts[-1] == "base_layer":
        parts.pop()
    return ".".join(parts)


def read_published_adapter(
    path: str | os.PathLike, adapter: str | None = None
) -> dict[str, dict[str, torch.Tensor | float]]:
    """Read a published QWHA (QHFT) adapter directory.

    Returns ``{layer_name: {"values": float32 (p,), "rows": int64 (p,), "cols": int64 (p,), "scale": float}}``
    with layer names relative to the transformers model. ``adapter`` selects one adapter name when the file holds
    several (default: the only one present). Raises one-line ``ValueError`` for missing files, no ``qhft_`` keys,
    malformed shapes/dtypes, NaN/inf values, negative or duplicate indices.
    """
    from safetensors import SafetensorError, safe_open

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    weights = root / _WEIGHTS
    if not weights.is_file():
        extra = " (pickled adapter_model.bin files are not read)" if (root / "adapter_model.bin").exists() else ""
        raise ValueError(f"{root}: missing {_WEIGHTS}{extra}")
    cfg = _read_config(root)
    default_scale = _config_scaling(cfg, root)

    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = [k for k in f.keys() if ".qhft_" in k or k.startswith("qhft_")]  # noqa: SIM118 (not a dict)
            tensors = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{weights}: unreadable safetensors file ({exc})".splitlines()[0]) from exc
    if not tensors:
        raise ValueError(f"{weights}: no qhft_ tensors; not an adapter saved by the published QWHA code")

    # split keys into (module path, kind, adapter name)
    entries: list[tuple[str, str, str | None, torch.Tensor]] = []
    for key, t in tensors.items():
        module, _, attr = key.rpartition(".qhft_") if ".qhft_" in key else ("", "", key[len("qhft_") :])
        m = _ATTR.match("qhft_" + attr)
        if m is None:
            continue
        entries.append((module, m.group(1), m.group(2), t))
    names = {a for _, kind, a, _ in entries if a is not None and kind in ("spectrum", "indices", "scaling")}
    if adapter is None:
        if len(names) > 1:
            raise ValueError(f"{weights}: holds several adapters {sorted(names)}; pass adapter=")
        adapter = next(iter(names), "default")
    known_names = names | {adapter}

    layers: dict[str, dict[str, Any]] = {}
    for module, kind, name, t in entries:
        if kind not in ("spectrum", "indices", "scaling") or (name is not None and name != adapter):
            continue
        layer = _normalise_module(module, known_names)
        if not layer:
            raise ValueError(f"{weights}: qhft_{kind} tensor without a module path")
        slot = layers.setdefault(layer, {})
        if kind in slot:
            raise ValueError(f"{layer}: more than one qhft_{kind} tensor for adapter {adapter!r}")
        slot[kind] = t

    out: dict[str, dict[str, torch.Tensor | float]] = {}
    for layer in sorted(layers):
        slot = layers[layer]
        if "spectrum" not in slot or "indices" not in slot:
            missing = "qhft_spectrum" if "spectrum" not in slot else "qhft_indices"
            raise ValueError(f"{layer}: {missing} is missing from {weights.name}")
        values, indices = slot["spectrum"], slot["indices"]
        if not values.dtype.is_floating_point:
            raise ValueError(f"{layer}: qhft_spectrum must be floating point, got {values.dtype}")
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError(f"{layer}: qhft_indices must be integers, got {indices.dtype}")
        values = values.reshape(-1)
        if indices.dim() != 2 or indices.shape[0] != 2:
            raise ValueError(f"{layer}: qhft_indices must have shape (2, p), got {tuple(indices.shape)}")
        if indices.shape[1] != values.numel():
            raise ValueError(f"{layer}: {values.numel()} spectrum values but {indices.shape[1]} index pairs")
        if not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values)).sum())
            raise ValueError(f"{layer}: spectrum has {bad} NaN/inf value(s); the adapter file is corrupt")
        rows, cols = indices[0].long(), indices[1].long()
        if rows.numel() and (int(rows.min()) < 0 or int(cols.min()) < 0):
            raise ValueError(f"{layer}: negative spectrum index (min row {int(rows.min())}, col {int(cols.min())})")
        if rows.numel():
            key = rows * (int(cols.max()) + 1) + cols
            if torch.unique(key).numel() != key.numel():
                raise ValueError(f"{layer}: duplicate (row, col) spectrum positions")
        scale = default_scale
        if "scaling" in slot:
            st = slot["scaling"]
            if st.numel() != 1 or not torch.isfinite(st.double()).all() or float(st.reshape(-1)[0]) == 0:
                raise ValueError(f"{layer}: qhft_scaling must be one finite non-zero number, got {st.tolist()}")
            scale = float(st.reshape(-1)[0])
        out[layer] = {"values": values.to(torch.float32).clone(), "rows": rows, "cols": cols, "scale": scale}
    if not out:
        raise ValueError(f"{weights}: no qhft_spectrum/qhft_indices pairs found")
    return out


def check_published_layers(layers: Mapping[str, Mapping[str, Any]], base_model: nn.Module) -> None:
    """One-line ``ValueError`` naming the layer when a published spectrum does not fit ``base_model``: a module
    missing from it, not a linear layer, an unsupported ``d_in`` or out-of-range indices."""
    for name, spec in layers.items():
        try:
            module = base_model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{name}: no such module in the base model; adapter made for another model?") from None
        d_out, d_in = getattr(module, "out_features", None), getattr(module, "in_features", None)
        if not isinstance(d_out, int) or not isinstance(d_in, int):
            raise ValueError(f"{name}: not a linear layer ({type(module).__name__})")
        if not is_supported_size(d_in):
            raise ValueError(f"{name}: d_in={d_in} has no supported Walsh-Hadamard size")
        validate_spectrum(spec["values"], spec["rows"], spec["cols"], d_out, d_in, name)


def published_config(src_dir: str | os.PathLike) -> dict[str, Any]:
    """The published adapter's ``adapter_config.json`` (empty when it has none)."""
    return _read_config(Path(src_dir))
