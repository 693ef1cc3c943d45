"""The adapter side of ``merge``/``fuse``/``refit``: read a QWHA adapter directory and check it against its base.

* :func:`read_adapter_spectra` reads every layer's sparse spectrum (values, rows, cols, scale) from
  ``adapter_model.safetensors`` + ``adapter_config.json`` with safetensors only (no peft, no model);
* :func:`open_adapter_source` checks, before any long work, that the base checkpoint named in ``qwha_base.json``
  exists and is complete (every shard present, headers and sizes intact), still has the SHA-256 recorded by
  ``init``, and has every adapted/quantized layer with the shape the adapter was made for. Every failure is a
  one-line ``ValueError`` that names the file or layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..formats.adapter_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_FILE, BASE_META, check_base_hash
from ..formats.jsonfile import read_json_object
from ..formats.manifest import Source
from ..formats.shards import iter_checkpoint_tensors, sha256_file, validate_checkpoint, validate_safetensors_file

__all__ = [
    "iter_base_layers",
    "read_quantized_layer",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "BASE_FILE",
    "BASE_META",
    "LazySpectra",
    "Spectrum",
    "open_adapter_source",
    "read_adapter_scales",
    "read_adapter_spectra",
    "source_record",
]

_KEY_PREFIX = "base_model.model."
_SUFFIXES = ("qwha_spectrum", "qwha_indices", "qwha_shape")

Spectrum = tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]


def _layer_of(key: str) -> tuple[str, str] | None:
    """``base_model.model.<layer>.qwha_spectrum[.default]`` -> ``(<layer>, "qwha_spectrum")``."""
    if not key.startswith(_KEY_PREFIX):
        return None
    rest = key[len(_KEY_PREFIX) :]
    for suffix in _SUFFIXES:
        for tail in (f".{suffix}", f".{suffix}.default"):
            if rest.endswith(tail):
                return rest[: -len(tail)], suffix
    return None


def read_adapter_scales(adapter_dir: Path) -> tuple[float, dict[str, float]]:
    """The adapter's ``(s, scale_pattern)`` from its ``adapter_config.json``, checked (a missing ``scale`` is 1, the
    default adapters were written with before ``kernels.DEFAULT_SCALE``)."""
    path = adapter_dir / ADAPTER_CONFIG
    cfg = read_json_object(path, missing=f"{adapter_dir}: no {ADAPTER_CONFIG}; not a peft adapter directory")
    if cfg.get("peft_type") not in (None, "QWHA"):
        raise ValueError(f"{path}: adapter has peft_type {cfg.get('peft_type')!r}, expected 'QWHA'")
    scale = cfg.get("scale", 1.0)
    pattern = cfg.get("scale_pattern") or {}

    def ok(s: Any) -> bool:
        return isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s) and s != 0

    if not ok(scale):
        raise ValueError(f"{path}: scale must be a finite non-zero number, got {scale!r}")
    if not isinstance(pattern, dict) or not all(ok(v) for v in pattern.values()):
        raise ValueError(f"{path}: scale_pattern must map layer names to finite non-zero numbers")
    return float(scale), {str(k): float(v) for k, v in pattern.items()}


def _adapter_keys(d: Path) -> tuple[Path, dict[str, dict[str, str]]]:
    """The adapter weights file (header validated) and its QWHA entries ``{layer: {suffix: key}}``."""
    path = d / ADAPTER_WEIGHTS
    if not path.is_file():
        extra = " (pickled adapter_model.bin files are not read)" if (d / "adapter_model.bin").exists() else ""
        raise ValueError(f"{d}: no {ADAPTER_WEIGHTS}{extra}")
    keys: dict[str, dict[str, str]] = {}
    for key in validate_safetensors_file(path):
        hit = _layer_of(key)
        if hit is not None:
            keys.setdefault(hit[0], {})[hit[1]] = key
    if not keys:
        raise ValueError(f"{path}: no QWHA spectra (qwha_spectrum/qwha_indices/qwha_shape entries) found")
    return path, keys


def read_adapter_spectra(adapter_dir: str | Path) -> dict[str, Spectrum]:
    """``{layer: (values float32, rows int64, cols int64, scale)}`` read from ``adapter_model.safetensors`` and
    ``adapter_config.json`` with safetensors only (no peft model, no base model).

    Validation (one-line ``ValueError`` naming the layer): all three of ``qwha_spectrum``/``qwha_indices``/
    ``qwha_shape`` present, 1-D floating values, ``(2, nnz)`` integer indices matching the values, a 2-value shape,
    finite values, indices inside the recorded ``(d_out, d_in)``.
    """
    d = Path(adapter_dir)
    scale, pattern = read_adapter_scales(d)
    path, keys = _adapter_keys(d)
    with safe_open(str(path), framework="pt") as f:
        parts = {layer: {s: f.get_tensor(k) for s, k in ks.items()} for layer, ks in keys.items()}
    return {layer: _spectrum(layer, parts[layer], pattern.get(layer, scale)) for layer in sorted(parts)}


def _spectrum(layer: str, p: Mapping[str, torch.Tensor], scale: float, check_values: bool = True) -> Spectrum:
    """One layer's checked ``(values, rows, cols, scale)`` from its ``qwha_*`` tensors (see read_adapter_spectra)."""
    missing = [s for s in _SUFFIXES if s not in p]
    if missing:
        raise ValueError(f"{layer}: adapter file lacks {', '.join(missing)}")
    values, indices, shape = p["qwha_spectrum"], p["qwha_indices"], p["qwha_shape"]
    if values.dim() != 1 or not values.dtype.is_floating_point:
        raise ValueError(
            f"{layer}: spectrum values must be a 1-D float tensor, got {values.dtype} {tuple(values.shape)}"
        )
    if (
        indices.dim() != 2
        or indices.shape[0] != 2
        or indices.dtype.is_floating_point
        or indices.dtype == torch.bool
    ):
        raise ValueError(
            f"{layer}: spectrum indices must be an integer (2, nnz) tensor, got {indices.dtype} "
            f"{tuple(indices.shape)}"
        )
    if indices.shape[1] != values.numel():
        raise ValueError(f"{layer}: spectrum has {values.numel()} values but {indices.shape[1]} indices")
    if shape.numel() != 2 or shape.dtype.is_floating_point:
        raise ValueError(f"{layer}: malformed qwha_shape entry {shape.reshape(-1).tolist()}")
    d_out, d_in = (int(v) for v in shape.reshape(-1).tolist())
    if d_out < 1 or d_in < 1:
        raise ValueError(f"{layer}: malformed qwha_shape entry {[d_out, d_in]}")
    rows, cols = indices[0].long(), indices[1].long()
    if check_values:
        _validate(layer, values, rows, cols, d_out, d_in)
    return values.float(), rows, cols, scale


class LazySpectra(Mapping[str, Spectrum]):
    """:func:`read_adapter_spectra` one layer at a time (for :func:`~.merge.stream_merge`): building the mapping
    runs every check on every layer (same errors, before any work), reading one layer at a time; ``spectra[layer]``
    then reads that layer again (its values were checked at build; stream_merge checks them once more). Why:
    ``safe_open`` maps the whole file and keeps every page read through it resident while the handle or any of its
    tensors lives, so holding all spectra costs the whole adapter file in RSS (~105 MB per Llama-3-8B block at
    rank 64)."""

    def __init__(self, adapter_dir: str | Path) -> None:
        d = Path(adapter_dir)
        self._scale, self._pattern = read_adapter_scales(d)
        self._path, self._keys = _adapter_keys(d)
        for layer in sorted(self._keys):
            self._load(layer, check_values=True)

    def _load(self, layer: str, check_values: bool) -> Spectrum:
        with safe_open(str(self._path), framework="pt") as f:  # a handle per layer: see the class docstring
            parts = {s: f.get_tensor(k) for s, k in self._keys[layer].items()}
        return _spectrum(layer, parts, self._pattern.get(layer, self._scale), check_values)

    def __getitem__(self, layer: str) -> Spectrum:
        if layer not in self._keys:
            raise KeyError(layer)
        return self._load(layer, check_values=False)

    def __contains__(self, layer: object) -> bool:  # Mapping's default would read the layer
        return layer in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)


def _validate(layer: str, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, d_out: int, d_in: int) -> None:
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"{layer}: spectrum has {bad} NaN/inf value(s); the adapter file is corrupt")
    if rows.numel():
        if int(rows.min()) < 0 or int(rows.max()) >= d_out:
            raise ValueError(
                f"{layer}: output-channel index out of range for d_out={d_out} "
                f"(min {int(rows.min())}, max {int(rows.max())})"
            )
        if int(cols.min()) < 0 or int(cols.max()) >= d_in:
            raise ValueError(
                f"{layer}: Walsh index out of range for d_in={d_in} (min {int(cols.min())}, max {int(cols.max())})"
            )


def _read_base_meta(adapter_dir: Path) -> dict[str, Any]:
    if not (adapter_dir / BASE_META).is_file() or not (adapter_dir / BASE_FILE).is_file():
        raise ValueError(f"{adapter_dir} is not a qwha-export adapter directory (missing {BASE_META} or {BASE_FILE})")
    meta = read_json_object(adapter_dir / BASE_META)
    if not isinstance(meta.get("base_model"), str):
        raise ValueError(f"{adapter_dir / BASE_META}: no base_model path")
    ql = meta.get("quantized_layers", [])
    if not isinstance(ql, list) or not all(isinstance(x, str) for x in ql):
        raise ValueError(f"{adapter_dir / BASE_META}: quantized_layers must be a list of layer names")
    return meta


def source_record(adapter_dir: Path, base_dir: Path, meta: Mapping[str, Any]) -> Source:
    """The manifest's ``source``: adapter and base paths, base hash, SHA-256 of the adapter files."""
    adapter_files = [adapter_dir / n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_FILE, BASE_META)]
    base_hash = meta.get("base_hash")
    return Source(
        adapter_dir=str(adapter_dir.resolve()),
        base_model=str(base_dir.resolve()),
        base_hash=dict(base_hash) if isinstance(base_hash, Mapping) and base_hash else None,
        adapter_sha256={p.name: sha256_file(p) for p in adapter_files if p.is_file()},
    )


def _adapter_shapes(adapter_dir: Path) -> dict[str, tuple[int, int]]:
    """``{layer: (d_out, d_in)}`` recorded in the adapter's ``qwha_shape`` entries (file already validated)."""
    shapes: dict[str, tuple[int, int]] = {}
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
            hit = _layer_of(key)
            if hit is not None and hit[1] == "qwha_shape":
                d_out, d_in = (int(v) for v in f.get_tensor(key).reshape(-1).tolist())
                shapes[hit[0]] = (d_out, d_in)
    return shapes


def _check_layer_shapes(
    adapter_dir: Path, base_dir: Path, base_entries: Mapping[str, Any], quantized: set[str], spectra: Mapping
) -> None:
    """Every adapted / quantized layer of the adapter directory has the shape of the base's ``<layer>.weight``
    (an adapter made for another base model of the same architecture fails here, before any work)."""
    qheader = validate_safetensors_file(adapter_dir / BASE_FILE)
    recorded = {layer: tuple(qheader[f"{layer}.codes"]["shape"]) for layer in quantized if f"{layer}.codes" in qheader}
    missing = sorted(layer for layer in quantized if layer not in recorded)
    if missing:
        raise ValueError(
            f"{adapter_dir / BASE_FILE}: no codes for quantized layer {missing[0]}; the file is incomplete"
        )
    adapter_shapes = _adapter_shapes(adapter_dir) if spectra else {}
    for layer in sorted(quantized | set(spectra)):
        want = tuple(int(v) for v in base_entries[f"{layer}.weight"]["shape"])
        for what, got in (("quantized base", recorded.get(layer)), ("adapter", adapter_shapes.get(layer))):
            if got is not None and tuple(got) != want:
                raise ValueError(
                    f"{layer}: the {what} in {adapter_dir} has shape {tuple(got)} but base model {base_dir} has "
                    f"{want}; the adapter was made for a different base model (point base_model in {BASE_META} at "
                    "that one)"
                )


def open_adapter_source(adapter_dir: Path, check_hash: bool = True, lazy: bool = False):
    """Check an adapter directory against its base checkpoint (exists, same hash, every layer present) before any
    work. Returns ``(meta, base_dir, quantized_layer_names, spectra)``; ``lazy`` gives a :class:`LazySpectra`."""
    meta = _read_base_meta(adapter_dir)
    base_dir = Path(meta["base_model"])
    if not base_dir.is_dir():
        raise ValueError(f"base model folder {base_dir} (from {BASE_META}) does not exist")
    entries = validate_checkpoint(base_dir)  # shards present, headers and sizes intact (names the bad file)
    if check_hash:
        check_base_hash(base_dir, meta.get("base_hash"))
    quantized = set(meta.get("quantized_layers", []))
    spectra = LazySpectra(adapter_dir) if lazy else read_adapter_spectra(adapter_dir)
    for layer in sorted(quantized | set(spectra)):
        if f"{layer}.weight" not in entries:
            raise ValueError(f"{layer}: layer of the adapter directory has no {layer}.weight in base model {base_dir}")
    _check_layer_shapes(adapter_dir, base_dir, entries, quantized, spectra)
    return meta, base_dir, quantized, spectra


def read_quantized_layer(path: str | Path, layer: str, keys: set[str] | None = None):
    """One layer's :class:`QuantizedWeight` from a ``quantized_base.safetensors`` file (``keys``: the file's tensor
    names, if already known).

    Opens a handle per call on purpose: ``safe_open`` maps the whole file and keeps every page read through it
    resident until the handle closes, so one handle held across all layers would keep the entire quantized base in
    memory.
    """
    from .quantize import QuantizedWeight

    prefix = f"{layer}."
    with safe_open(str(path), framework="pt") as qf:
        names = qf.keys() if keys is None else keys
        wanted = [k for k in names if k.startswith(prefix) and "." not in k[len(prefix) :]]
        return QuantizedWeight.from_dict({k: qf.get_tensor(k) for k in wanted}, prefix=prefix)


def iter_base_layers(
    base_dir: str | Path,
    qpath: str | Path,
    layers: Mapping[str, str],
    quantized: Collection[str],
    qkeys: set[str],
    passthrough: Callable[[str, torch.Tensor], None],
) -> Iterator[tuple[str, torch.Tensor, Any]]:
    """Stream the base checkpoint: tensors not in ``layers`` (``{weight name: layer}``) go to ``passthrough``
    unchanged; for the others yield ``(layer, weight, base_qw)``, ``base_qw`` the layer's quantized base when it is in
    ``quantized`` (read from ``qpath``; ValueError on a shape mismatch), else None."""
    for name, tensor in iter_checkpoint_tensors(base_dir, natural_order=True):  # blocks in order (StreamedGrams)
        layer = layers.get(name)
        if layer is None:
            passthrough(name, tensor)
            continue
        base_qw = None
        if layer in quantized:
            base_qw = read_quantized_layer(qpath, layer, qkeys)
            if base_qw.shape != tuple(tensor.shape):
                raise ValueError(
                    f"{layer}: quantized base {base_qw.shape} does not match base weight {tuple(tensor.shape)}"
                )
        yield layer, tensor, base_qw
