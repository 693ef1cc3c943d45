"""Fused-adapter export: the quantized base written unchanged in a standard format, the QWHA spectrum beside it.

:func:`write_fused` streams the base checkpoint tensor by tensor (like
:func:`~qwha_export.converters.merge.stream_merge`, never instantiating the model): every quantized layer is
written by the base format's layer writer from its *unchanged* :class:`QuantizedWeight` (so the codes, scales
and zero points read back bit-identical to ``quantized_base.safetensors``), everything else passes through
bit-identical. The spectra go to ``qwha_adapter.safetensors`` and ``qwha_fused.json`` (layout:
:mod:`qwha_export.formats.fused`); ``qwha_export.json`` is the manifest. The folder is written atomically.

:func:`load_fused` rebuilds the model without transformers' quantization machinery (pure torch): the HF model is
instantiated from ``config.json`` (``quantization_config`` removed), the non-quantized tensors are loaded into it,
quantized layers become :class:`~qwha_export.quant_linear.QuantLinear` (read with the format's ``read_layer``) and
adapted layers are wrapped in :class:`~qwha_export.layer.QWHALinear`. :func:`load_quantized_checkpoint` is the same
loader for plain ``gptq``/``gptq_v2``/``compressed-tensors`` exports (GPTQModel is not needed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .converters.block_stream import CheckpointSource, load_module
from .converters.checkpoint_writer import LayerOutput, write_checkpoint
from .converters.merge import (
    BASE_FILE,
    open_adapter_source,
    source_record,
)
from .converters.refit import RefitLayers
from .formats import ExportFormat, get_writer
from .formats.dense import DenseFormat
from .formats.fused import (
    FUSED_BASE_FORMATS,
    FusedAdapterWriter,
    FusedSpectra,
    make_fused_config,
    read_fused_adapter,
    read_fused_config,
    write_fused_config,
)
from .formats.manifest import Manifest, finish_manifest
from .formats.shards import DEFAULT_MAX_SHARD_BYTES, checkpoint_files, iter_checkpoint_tensors
from .layer import QWHALinear, adapter_coefficient
from .quant_linear import QuantLinear, replace_linear

__all__ = [
    "QuantizedSource",
    "export_source",
    "instantiate_from_config",
    "load_fused",
    "load_quantized_checkpoint",
    "write_fused",
]

_MARKERS = {
    ExportFormat.GPTQ: ("qweight", ("qweight", "qzeros", "scales", "g_idx")),
    ExportFormat.GPTQ_V2: ("qweight", ("qweight", "qzeros", "scales", "g_idx")),
    ExportFormat.COMPRESSED_TENSORS: (
        "weight_packed",
        ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"),
    ),
}


# ----------------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------------


def write_fused(
    adapter_dir: str | Path,
    out_dir: str | Path,
    base_format: str = "gptq_v2",
    overwrite: bool = False,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    check_hash: bool = True,
    on_written: Callable[[Path], Mapping[str, Any]] | None = None,
    settings_extra: Mapping[str, Any] | None = None,
    on_layer: Callable[[int, int], Any] | None = None,
    refit: RefitLayers | None = None,
) -> dict[str, Any]:
    """Write the fused checkpoint of ``adapter_dir`` into ``out_dir``; returns the manifest (``qwha_export.json``).

    ``base_format``: ``gptq_v2`` (default), ``compressed-tensors`` or ``dense`` (dequantized base weights in
    ``dtype``; not bit-identical codes, but the exact ``(code - zero) * scale`` values for float32).
    ``on_written(folder)`` runs on the complete temporary folder before it is renamed into place; the entries it
    returns are added to the manifest (the parity check of :func:`qwha_export.pipeline.fuse_qwha`).
    ``settings_extra`` adds settings (``requant``, ``bits``). ``on_layer(done, total)``
    is called after each quantized layer is written (a progress bar). ``refit`` (``merge --requant refit``): each
    layer is re-quantized and given a fresh spectrum by that layer function instead of kept (same single pass).
    """
    from . import __version__
    from .formats.adapter_dir import atomic_output_dir, check_output_dir

    t0 = time.time()
    fmt = ExportFormat.parse(base_format)
    if fmt.value not in FUSED_BASE_FORMATS:
        raise ValueError(f"fused base_format {fmt.value!r} is not supported; choose one of {FUSED_BASE_FORMATS}")
    writer = get_writer(fmt)
    check_output_dir(out_dir, overwrite)
    adapter_dir = Path(adapter_dir)
    meta, base_dir, quantized, spectra = open_adapter_source(adapter_dir, check_hash, lazy=True)  # a layer at a time

    by_weight = {f"{layer}.weight": layer for layer in quantized}
    qrecords: dict[str, dict[str, int]] = {}
    layer_recs: dict[str, dict[str, Any]] = {}
    shapes: dict[str, tuple[int, int]] = {}  # (d_out, d_in) of each quantized layer, as written

    def add_spectrum(layer: str, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, scale: float) -> None:
        d_out, d_in = shapes[layer] if layer in shapes else _layer_shape(base_dir, layer)  # an unquantized layer
        layer_recs[layer] = {
            "d_in": d_in,
            "d_out": d_out,
            "scale": scale,
            "coefficient": adapter_coefficient(scale, d_in, d_out),
            "nnz": adapter_file.add(layer, values, rows, cols),
        }

    def write_base(layer: str, _weight: torch.Tensor, qw) -> LayerOutput:  # untouched, or refitted
        shapes[layer] = tuple(int(d) for d in qw.shape)
        if refit is not None:
            qw, fresh = refit(layer, qw)
            if fresh is not None:
                add_spectrum(layer, fresh.values, fresh.rows, fresh.cols, refit.scale)
        qrecords[layer] = {"bits": qw.bits, "group_size": qw.group_size}
        options = {"dtype": dtype} if fmt == ExportFormat.DENSE else {}
        return LayerOutput(writer.write_layer(qw, prefix=layer, **options), qw)

    with atomic_output_dir(out_dir, overwrite) as tmp, FusedAdapterWriter(tmp) as adapter_file:
        written = write_checkpoint(
            tmp,
            base_dir,
            adapter_dir / BASE_FILE,
            by_weight,
            by_weight.values(),
            write_base,
            fmt=fmt,
            max_shard_bytes=max_shard_bytes,
            dtype=dtype,
            on_layer=on_layer,
        )
        for layer in spectra if refit is None else ():  # one layer's spectrum in memory at a time
            add_spectrum(layer, *spectra[layer])
        adapter_file.close()
        cfg = make_fused_config(fmt.value, layer_recs, qrecords)
        write_fused_config(tmp, cfg)
        manifest = Manifest(
            settings={
                "format": ExportFormat.FUSED.value,
                "base_format": fmt.value,
                "max_shard_bytes": max_shard_bytes,
                **(settings_extra or {}),
            },
            source=source_record(adapter_dir, base_dir, meta),
            tool_version=__version__,
            quantization_config=written.quantization_config,
            files=written.files(),
            seconds=time.time() - t0,
            sections={"fused": cfg},
        )
        manifest = finish_manifest(tmp, manifest, on_written)
    return manifest.to_json()


def _layer_shape(base_dir: Path, layer: str) -> tuple[int, int]:
    """``(d_out, d_in)`` of ``<layer>.weight`` from the safetensors headers (no tensor data read)."""
    files, _ = checkpoint_files(base_dir)
    key = f"{layer}.weight"
    for p in files:
        with safe_open(str(p), framework="pt") as f:
            if key in set(f.keys()):
                shape = f.get_slice(key).get_shape()
                return int(shape[0]), int(shape[1])
    raise ValueError(f"{layer}: no {key} in base model {base_dir}")  # pragma: no cover - checked before


# ----------------------------------------------------------------------------------------------------------------------
# loading (pure torch)
# ----------------------------------------------------------------------------------------------------------------------


def instantiate_from_config(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """An HF causal LM built from ``model_dir/config.json`` with any ``quantization_config`` removed (random init,
    eval mode, ``dtype``); weights are loaded by the caller."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


def _quant_settings(model_dir: Path, fmt: ExportFormat) -> tuple[int, int]:
    cfg = DenseFormat.load_config(model_dir).get("quantization_config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{model_dir}: config.json has no quantization_config for format {fmt.value!r}")
    if fmt == ExportFormat.COMPRESSED_TENSORS:
        try:
            w = next(iter(cfg["config_groups"].values()))["weights"]
            return int(w["num_bits"]), -1 if w.get("group_size") is None else int(w["group_size"])
        except (KeyError, TypeError, StopIteration, ValueError):
            raise ValueError(f"{model_dir}: malformed compressed-tensors quantization_config") from None
    try:
        return int(cfg["bits"]), int(cfg["group_size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{model_dir}: malformed GPTQ quantization_config (needs bits and group_size)") from None


def load_quantized_checkpoint(
    model_dir: str | Path,
    fmt: str | ExportFormat,
    dtype: torch.dtype = torch.float32,
    layer_settings: Mapping[str, tuple[int, int]] | None = None,
):
    """Pure-torch loader of a ``gptq``/``gptq_v2``/``compressed-tensors``/``dense`` export folder.

    The model is instantiated from ``config.json`` (no quantization backend), non-quantized tensors are loaded with
    ``load_state_dict`` and every quantized layer (found by its ``qweight``/``weight_packed`` tensor) becomes a
    :class:`QuantLinear` of the format reader's :class:`QuantizedWeight`. ``layer_settings`` (``{layer: (bits,
    group_size)}``) overrides the config's single setting. ``ValueError`` for unexpected or missing tensors.
    """
    d = Path(model_dir)
    fmt = ExportFormat.parse(fmt)
    model = instantiate_from_config(d, dtype)
    marker, suffixes = _MARKERS.get(fmt, (None, ()))
    reader = get_writer(fmt).read_layer if marker else None
    qtensors: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    qlayers: set[str] = set()
    for name, tensor in iter_checkpoint_tensors(d):
        layer, _, leaf = name.rpartition(".")
        if marker and leaf in suffixes:
            qtensors[name] = tensor
            if leaf == marker:
                qlayers.add(layer)
        else:
            state[name] = tensor
    stray = sorted(k for k in qtensors if k.rpartition(".")[0] not in qlayers)
    if stray:
        raise ValueError(f"{d}: quantization tensor {stray[0]} has no {marker} for its layer")
    default = _quant_settings(d, fmt) if qlayers and layer_settings is None else None
    _load_state(model, state, {f"{q}.weight" for q in qlayers}, d)
    for layer in sorted(qlayers):
        bits, gs = layer_settings[layer] if layer_settings is not None else default
        try:
            linear = model.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"{d}: quantized layer {layer} does not exist in the model") from None
        qw = reader(qtensors, layer, bits, gs)
        replace_linear(model, layer, QuantLinear.from_linear(linear, qw))
    return model.eval()


def _load_state(model, state: dict[str, torch.Tensor], quantized_weights: set[str], where: Path) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        k = sorted(result.unexpected_keys)
        raise ValueError(f"{where}: tensor {k[0]} (+{len(k) - 1} more) does not belong to the model")
    missing = [k for k in result.missing_keys if k not in quantized_weights]
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied and missing:
        model.tie_weights()
        out_emb = model.get_output_embeddings()
        missing = [k for k in missing if out_emb is None or not k.startswith("lm_head.")]
    if missing:
        raise ValueError(
            f"{where}: checkpoint lacks {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
        )


def load_fused(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of a fused folder: quantized base (:class:`QuantLinear`) + :class:`QWHALinear`
    adapters. ``tokenizer`` is None when the folder has no loadable tokenizer."""
    d = Path(model_dir)
    cfg = read_fused_config(d)
    fmt = ExportFormat.parse(cfg["base_format"])
    settings = {k: (int(v["bits"]), int(v["group_size"])) for k, v in cfg.get("quantized_layers", {}).items()}
    model = load_quantized_checkpoint(
        d, fmt, dtype=dtype, layer_settings=settings if fmt != ExportFormat.DENSE else None
    )
    spectra = read_fused_adapter(d, cfg)
    for layer, (values, rows, cols) in spectra.items():
        rec = cfg["layers"][layer]
        base = model.get_submodule(layer)
        if (int(base.out_features), int(base.in_features)) != (rec["d_out"], rec["d_in"]):
            raise ValueError(f"{layer}: fused config shape {(rec['d_out'], rec['d_in'])} does not match the model")
        if values.numel() == 0:
            continue
        replace_linear(model, layer, QWHALinear(base, values, rows, cols, scale=float(rec["scale"])))
    return model.eval(), _try_tokenizer(d)


def _try_tokenizer(model_dir: Path):
    if not any((model_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


# ----------------------------------------------------------------------------------------------------------------------
# block-by-block sources (converters.block_stream): the same layers as the loaders above, one block at a time
# ----------------------------------------------------------------------------------------------------------------------

QuantizedReader = Callable[[str, dict[str, torch.Tensor], str], Any]  # (layer, block state, name in block) -> qw


class QuantizedSource(CheckpointSource):
    """A checkpoint folder as a :class:`~qwha_export.converters.block_stream.BlockSource` whose ``quantized``
    layers become :class:`QuantLinear` (``read(layer, block_state, name_in_block)`` returns the layer's
    :class:`QuantizedWeight` and pops its tensors from the block's state) and whose layers in ``spectra``
    (``{layer: (values, rows, cols, scale)}``, a mapping read one layer at a time) get a :class:`QWHALinear`."""

    def __init__(
        self,
        model_dir: str | Path,
        dtype: torch.dtype,
        quantized: set[str] = frozenset(),
        read: QuantizedReader | None = None,
        spectra: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] | None = None,
    ) -> None:
        super().__init__(model_dir, dtype)
        self.quantized, self.read, self.spectra = set(quantized), read, spectra or {}

    def load(self, module: torch.nn.Module, prefix: str) -> None:
        state = self.index.read_prefix(prefix)
        for layer in sorted(q for q in self.quantized if q.startswith(prefix)):
            rel = layer[len(prefix) :]
            qw = self.read(layer, state, rel)
            replace_linear(module, rel, QuantLinear(qw, state.pop(f"{rel}.bias", None), dtype=self.dtype))
        load_module(module, state, self.dtype, prefix)
        for layer in sorted(a for a in self.spectra if a.startswith(prefix)):
            values, rows, cols, scale = self.spectra[layer]
            if values.numel():
                rel = layer[len(prefix) :]
                replace_linear(module, rel, QWHALinear(module.get_submodule(rel), values, rows, cols, scale=scale))


class _ScaledSpectra(Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]):
    """A fused folder's :class:`~qwha_export.formats.fused.FusedSpectra` as ``{layer: (values, rows, cols, scale)}``
    (what :class:`QuantizedSource` reads), still one layer at a time."""

    def __init__(self, spectra: FusedSpectra) -> None:
        self.spectra = spectra

    def __getitem__(self, layer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        return (*self.spectra[layer], float(self.spectra.cfg["layers"][layer]["scale"]))

    def __contains__(self, layer: object) -> bool:
        return layer in self.spectra

    def __iter__(self):
        return iter(self.spectra)

    def __len__(self) -> int:
        return len(self.spectra)


def export_source(model_dir: str | Path, fmt: str | ExportFormat, dtype: torch.dtype = torch.float32):
    """The :class:`QuantizedSource` of a ``dense``/``gptq``/``gptq_v2``/``compressed-tensors``/``fused`` export
    folder: the layers :func:`load_quantized_checkpoint` / :func:`load_fused` build, read block by block."""
    d = Path(model_dir)
    fmt = ExportFormat.parse(fmt)
    spectra, settings = None, None
    if fmt == ExportFormat.FUSED:
        cfg = read_fused_config(d)
        fmt = ExportFormat.parse(cfg["base_format"])
        settings = {k: (int(v["bits"]), int(v["group_size"])) for k, v in cfg.get("quantized_layers", {}).items()}
        spectra = _ScaledSpectra(FusedSpectra(d, cfg))  # read one layer at a time, as the blocks load
    source = QuantizedSource(d, dtype, spectra=spectra)
    marker, suffixes = _MARKERS.get(fmt, (None, ()))
    if marker is None:
        return source
    keys = source.index.file_of
    source.quantized = {k.rpartition(".")[0] for k in keys if k.rpartition(".")[2] == marker}
    stray = sorted(k for k in keys if k.rpartition(".")[2] in suffixes and k.rpartition(".")[0] not in source.quantized)
    if stray:
        raise ValueError(f"{d}: quantization tensor {stray[0]} has no {marker} for its layer")
    default = _quant_settings(d, fmt) if source.quantized and fmt != ExportFormat.DENSE else None
    reader = get_writer(fmt).read_layer

    def read(layer: str, state: dict[str, torch.Tensor], rel: str):
        bits, gs = settings[layer] if settings is not None else default
        tensors = {f"{layer}.{s}": state.pop(f"{rel}.{s}") for s in suffixes if f"{rel}.{s}" in state}
        return reader(tensors, layer, bits, gs)

    source.read = read
    return source
