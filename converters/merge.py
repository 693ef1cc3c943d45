"""Streaming merge of a QWHA adapter directory into an exportable checkpoint (``qwha-export merge``).

The base checkpoint is read one tensor at a time (:func:`~qwha_export.formats.shards.iter_checkpoint_tensors`);
the model is never instantiated. For each tensor:

* ``<layer>.weight`` of an adapted layer: ``W = dequant(base) + coefficient * F @ M`` in float64
  (:func:`merged_weight`), then either cast once to ``dtype`` (``fmt="dense"``, ``bits=16``) or re-quantized
  (:func:`~qwha_export.converters.quantizers.requantize`: any registered quantizer; ``"gptq"`` with a Gram
  matrix, ``"grid"`` = the base layer's own grid, ``"auto"`` = the grid where the layer keeps it, else RTN) and
  written with the format's layer writer (:data:`qwha_export.formats.WRITERS`) under the layer prefix;
* ``<layer>.weight`` of a quantized layer without adapter (e.g. skipped ``d_in``): written from its quantized base
  (dequantized for dense; as is when the target grid equals the base grid, else re-quantized);
* anything else (embeddings, norms, ``lm_head``, biases, non-quantized linears): passed through bit-identical.

Output: a Hugging Face folder written atomically (:func:`qwha_export.pipeline.atomic_output_dir`) through
:class:`~qwha_export.formats.shards.ShardWriter`, with ``config.json`` (+ the format's ``quantization_config``),
the tokenizer / generation files of the base, and a ``qwha_export.json`` manifest (tool version, sources, SHA-256 of
the adapter files, settings, per-layer report). Peak memory: one layer's tensors and spectrum plus the output shard
being filled (at most ``max_shard_bytes``); flat in the number of layers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..formats import ExportFormat, get_writer
from ..formats.adapter_dir import atomic_output_dir, check_output_dir
from ..formats.manifest import Manifest, finish_manifest
from ..formats.shards import DEFAULT_MAX_SHARD_BYTES
from ..kernels.spectral import adapter_coefficient, dense_delta
from .adapter_source import (  # noqa: F401 - re-exported: merge.open_adapter_source etc. predate the split
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE_FILE,
    BASE_META,
    Spectrum,
    _validate,
    iter_base_layers,
    open_adapter_source,
    read_adapter_spectra,
    read_quantized_layer,
    source_record,
)
from .calibration import InputRows
from .checkpoint_writer import LayerOutput, write_checkpoint
from .quant_methods import Quantizer
from .quantize import QuantConfig, QuantizedWeight
from .quantizers import requantize, resolve_quantizer
from .qwha_init import row_blocks

__all__ = [
    "read_adapter_spectra",
    "merged_weight",
    "relative_output_error",
    "relative_output_errors",
    "stream_merge",
]

_DENSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------------------------------
# per-layer math (float64)
# ----------------------------------------------------------------------------------------------------------------------


def merged_weight(
    qw: QuantizedWeight | torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, scale: float
) -> torch.Tensor:
    """``dequant(qw) + adapter_coefficient(scale, d_in, d_out) * F @ M`` as a float64 ``(d_out, d_in)`` tensor.

    ``qw`` may also be a dense base weight (a layer adapted but not quantized)."""
    base = qw.dequantize(torch.float64) if isinstance(qw, QuantizedWeight) else qw.detach().to(torch.float64)
    d_out, d_in = int(base.shape[0]), int(base.shape[1])
    coeff = adapter_coefficient(scale, d_in, d_out)
    delta = dense_delta(values, rows.long(), cols.long(), d_out, d_in, coeff)
    return base + delta.to(device=base.device, dtype=torch.float64)


def relative_output_error(w_ref: torch.Tensor, w_test: torch.Tensor, gram: torch.Tensor) -> float:
    """``sqrt(tr(D G D^T) / tr(W G W^T))`` with ``D = w_test - w_ref``, ``W = w_ref`` (float64)."""
    return relative_output_errors(w_ref, [w_test], gram)[0]


def relative_output_errors(
    w_ref: torch.Tensor, w_tests: list[torch.Tensor], gram: torch.Tensor | InputRows
) -> list[float]:
    """:func:`relative_output_error` of several weights against one reference (``tr(W G W^T)`` computed once).

    With ``G = X^T X`` this is ``||X (W_test - W_ref)^T|| / ||X W_ref^T||`` on the calibration activations ``X``;
    ``gram`` may be those rows themselves (:class:`~.calibration.InputRows`), which is cheaper when there are fewer
    of them than inputs (``||X A^T||^2`` instead of ``tr(A G A^T)``). Computed over blocks of 64 MiB of rows, so it
    holds no full-size product (a 4096 x 14336 layer: ~2 GB less)."""
    w = w_ref.detach()
    if isinstance(gram, InputRows):
        x = gram.rows[: gram.filled].to(device=w.device, dtype=torch.float64)

        def quadratic(a: torch.Tensor) -> float:
            return float((a @ x.T).square().sum())
    else:
        g = gram.detach().to(device=w.device, dtype=torch.float64)

        def quadratic(a: torch.Tensor) -> float:
            return float(((a @ g) * a).sum())

    den, nums = 0.0, [0.0] * len(w_tests)
    for blk in row_blocks(w.shape[0], 8 * w.shape[1], 64 * 2**20):
        wb = w[blk].to(torch.float64)
        den += quadratic(wb)
        for i, w_test in enumerate(w_tests):
            nums[i] += quadratic(w_test[blk].detach().to(device=w.device, dtype=torch.float64) - wb)
    return [(0.0 if num == 0 else math.inf) if den <= 0 else math.sqrt(max(num, 0.0) / den) for num in nums]


# ----------------------------------------------------------------------------------------------------------------------
# streaming merge
# ----------------------------------------------------------------------------------------------------------------------


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.strip().lower(), None)
    if dtype not in _DENSE_DTYPES:
        raise ValueError(f"dtype must be one of float16, bfloat16, float32, got {dtype!r}")
    return dtype


def _check_ct_groups(qf: Any, layers: Any, group_size: int | None) -> None:
    """ValueError before any work when a layer's group size would not divide its ``d_in`` (compressed-tensors
    cannot dequantize a ragged last group)."""
    keys = set(qf.keys())
    for layer in sorted(layers):
        if f"{layer}.codes" not in keys or (group_size is None and f"{layer}.group_size" not in keys):
            continue  # left to the layer reader's own error
        d_in = qf.get_slice(f"{layer}.codes").get_shape()[1]
        gs = int(qf.get_tensor(f"{layer}.group_size").reshape(-1)[0]) if group_size is None else group_size
        if gs != -1 and d_in % gs:
            raise ValueError(
                f"layer {layer}: group_size={gs} does not divide d_in={d_in}; compressed-tensors cannot dequantize a "
                "ragged last group: pick a group size dividing it or --format gptq_v2"
            )


def stream_merge(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    bits: int,
    group_size: int | None,
    requant: str,
    fmt: ExportFormat | str,
    dtype: torch.dtype | str = torch.float16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    grams: Mapping[str, torch.Tensor] | None = None,
    check_hash: bool = True,
    on_written: Callable[[Path], Mapping[str, Any]] | None = None,
    on_layer: Callable[[int, int], Any] | None = None,
) -> dict[str, Any]:
    """Merge the adapter of ``adapter_dir`` into its base, streaming tensor by tensor, and write ``out_dir``.

    ``bits`` 16 writes merged float weights (``fmt`` must be ``dense``; cast once to ``dtype``); bits in
    {2, 3, 4, 8} re-quantizes with ``requant`` (``rtn``/``gptq``/``grid``) and writes with ``fmt``'s layer writer
    (``dense`` then stores the dequantized re-quantized weight in ``dtype``). ``group_size`` None keeps each base
    layer's. ``grams`` (``{layer: d_in x d_in Gram}``) adds ``rel_err_requant_vs_merged`` to the report and is
    required by ``gptq``; for adapted layers it also adds ``rel_err_base_vs_merged`` (the untouched quantized base
    against the merged target) and ``kept_fraction = (err_base - err_requant) / err_base``, the share of the
    adapter's error reduction that survives the re-quantization (1 = all of it, the fused adapter; 0 = none).
    ``report["adapter_gain"]`` holds the total ``kept_fraction`` and, for a same-bit merge that kept less than
    half, a one-line ``advice``. ``on_written(folder)`` is called on the complete temporary folder before it is
    renamed into place; the entries it returns are added to the report and the manifest (the parity check).
    ``on_layer(done, total)`` is called after each layer is written (a progress bar).
    Returns the report (also in ``qwha_export.json``).
    """
    t0 = time.time()
    adapter_dir = Path(adapter_dir)
    fmt = ExportFormat.parse(fmt)
    writer = get_writer(fmt)
    dtype = _parse_dtype(dtype)
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"bits must be an int, got {bits!r}")
    dense_merge = bits == 16
    if dense_merge and fmt != ExportFormat.DENSE:
        raise ValueError(f"bits=16 writes merged float weights; use fmt='dense', not {fmt.value!r}")
    method = Quantizer.parse(requant, option="requant method")
    if not dense_merge:
        QuantConfig(bits=bits, group_size=-1 if group_size is None else group_size)  # validates both
    check_output_dir(out_dir, overwrite)

    meta, base_dir, quantized, spectra = open_adapter_source(adapter_dir, check_hash, lazy=True)  # one layer at a time
    if not dense_merge and method.needs_hessian:
        lacking = sorted(layer for layer in spectra if grams is None or layer not in grams)
        if lacking:
            raise ValueError(
                f"gptq re-quantization needs a Gram matrix per adapted layer; missing for {lacking[0]}"
                + (f" (+{len(lacking) - 1} more)" if len(lacking) > 1 else "")
            )

    by_weight = {f"{layer}.weight": layer for layer in quantized | set(spectra)}
    base_bits: set[int] = set()  # bits of the quantized base of the adapted layers
    qpath = adapter_dir / BASE_FILE
    if fmt == ExportFormat.COMPRESSED_TENSORS and not dense_merge:
        with safe_open(str(qpath), framework="pt") as qf:
            _check_ct_groups(qf, quantized, group_size)

    def merge_layer(layer: str, weight: torch.Tensor, base_qw: QuantizedWeight | None) -> LayerOutput:
        if base_qw is not None and layer in spectra:
            base_bits.add(base_qw.bits)
        rec, tensors, qw_out = _merge_layer(
            layer, weight, base_qw, spectra.get(layer), grams, dense_merge, method, bits, group_size, writer, fmt, dtype
        )
        return LayerOutput(tensors, qw_out, rec)

    with atomic_output_dir(out_dir, overwrite) as tmp:
        written = write_checkpoint(
            tmp,
            base_dir,
            qpath,
            by_weight,
            quantized,
            merge_layer,
            fmt=fmt,
            max_shard_bytes=max_shard_bytes,
            dtype=dtype,
            empty=(bits, -1 if group_size is None else group_size),
            on_layer=on_layer,
        )
        qconfig, layers = written.quantization_config, written.records
        totals = _totals(layers)
        same_bit = not dense_merge and base_bits == {bits}
        manifest = Manifest(
            settings={
                "format": fmt.value,
                "bits": bits,
                "group_size": group_size,
                "requant": None if dense_merge else method.value,
                "dtype": str(dtype).removeprefix("torch."),
                "max_shard_bytes": max_shard_bytes,
                "grams": grams is not None,
            },
            source=source_record(adapter_dir, base_dir, meta),
            quantization_config=qconfig,
            files=written.files(),
            seconds=time.time() - t0,
            sections={
                "layers": layers,
                "total": totals,
                "adapter_gain": _adapter_gain(totals.get("kept_fraction"), same_bit, bits, method),
            },
        )
        manifest = finish_manifest(tmp, manifest, on_written)
    return manifest.to_json()


def _adapter_gain(kept: float | None, same_bit: bool, bits: int, method: str) -> dict[str, Any]:
    """``{"kept_fraction", "same_bit", "advice"}``: advice (one line) when a same-bit merge kept < half the gain."""
    advice = None
    if same_bit and kept is not None and kept < 0.5:
        advice = (
            f"the same-bit re-quantization ({bits}-bit {method}) kept only {kept:.0%} of the adapter's error reduction "
            "on calibration activations (lost more than half); keep the adapter with `qwha-export fuse`, fit a new "
            "one with `--requant refit`, or merge at `--bits 8`"
        )
    return {"kept_fraction": kept, "same_bit": same_bit, "advice": advice}


def _merge_layer(
    layer: str,
    base_weight: torch.Tensor,
    base_qw: QuantizedWeight | None,
    spectrum: Spectrum | None,
    grams: Mapping[str, torch.Tensor] | None,
    dense_merge: bool,
    method: Quantizer,
    bits: int,
    group_size: int | None,
    writer,
    fmt: ExportFormat,
    dtype: torch.dtype,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], QuantizedWeight | None]:
    """One layer: report record, tensors to write, and the written QuantizedWeight (None for dense merges)."""
    d_out, d_in = int(base_weight.shape[0]), int(base_weight.shape[1])
    rec: dict[str, Any] = {
        "name": layer,
        "shape": [d_out, d_in],
        "adapted": spectrum is not None,
        "quantized_base": base_qw is not None,
    }
    gram = None if grams is None else grams.get(layer)
    if spectrum is not None:
        values, rows, cols, scale = spectrum
        _validate(layer, values, rows, cols, d_out, d_in)
        w_ref = merged_weight(base_qw if base_qw is not None else base_weight, values, rows, cols, scale)
        rec.update(nnz=int(values.numel()), scale=scale)
    elif base_qw is not None:
        w_ref = base_qw.dequantize(torch.float64)
    else:  # pragma: no cover - by_weight only holds adapted or quantized layers
        raise AssertionError(layer)

    if dense_merge:
        w_out = w_ref.to(dtype).contiguous()
        rec["action"] = "merged-dense" if spectrum is not None else "dequantized-base"
        if gram is not None:
            _record_errors(rec, w_ref, w_out, base_qw if spectrum is not None else None, gram)
        return rec, {f"{layer}.weight": w_out}, None

    method = resolve_quantizer(method, base_qw, bits, group_size, d_in)  # auto: grid or rtn for this layer
    real_gs = None if group_size is None else (d_in if group_size == -1 else group_size)
    keep_base = (
        spectrum is None
        and base_qw is not None
        and (method == "grid" or (bits == base_qw.bits and real_gs in (None, base_qw.group_size)))
    )
    if keep_base:
        qw = base_qw
        rec["action"] = "base-quantized"
    else:
        hessian = gram  # rows (the report's) become a Gram only for a quantizer that needs one
        if isinstance(gram, InputRows):
            hessian = gram.gram() if Quantizer(method).needs_hessian else None
        qw = requantize(w_ref, method, bits, group_size, base_qw, hessian=hessian)
        rec["action"] = f"requantized-{method}" if spectrum is not None else f"base-requantized-{method}"
        if method == "grid":
            rec["max_abs_code_change"] = (
                int((qw.codes.int() - base_qw.codes.int()).abs().max()) if qw.codes.numel() else 0
            )
    if gram is not None:
        _record_errors(rec, w_ref, qw.dequantize(torch.float64), base_qw if spectrum is not None else None, gram)
    if fmt == ExportFormat.DENSE:
        tensors = writer.write_layer(qw, prefix=layer, dtype=dtype)
    else:
        tensors = writer.write_layer(qw, prefix=layer)
    return rec, tensors, qw


def _record_errors(
    rec: dict[str, Any],
    w_merged: torch.Tensor,
    w_out: torch.Tensor,
    base_qw: QuantizedWeight | None,
    gram: torch.Tensor,
) -> None:
    """``rel_err_requant_vs_merged`` and, for an adapted quantized layer, ``rel_err_base_vs_merged`` and
    ``kept_fraction`` (float64, Gram-based: ``||X A^T||^2 = tr(A G A^T)``)."""
    if base_qw is None:
        rec["rel_err_requant_vs_merged"] = relative_output_error(w_merged, w_out, gram)
        return
    err_out, err_base = relative_output_errors(w_merged, [w_out, base_qw.dequantize(torch.float64)], gram)
    rec["rel_err_requant_vs_merged"] = err_out
    rec["rel_err_base_vs_merged"] = err_base
    rec["kept_fraction"] = (err_base - err_out) / err_base if err_base > 0 else None


def _totals(layers: list[dict[str, Any]]) -> dict[str, Any]:
    errs = [r["rel_err_requant_vs_merged"] for r in layers if "rel_err_requant_vs_merged" in r]
    out: dict[str, Any] = {
        "n_layers": len(layers),
        "n_adapted": sum(1 for r in layers if r["adapted"]),
    }
    if errs:
        out["rms_rel_err_requant_vs_merged"] = math.sqrt(sum(e * e for e in errs) / len(errs))
    pairs = [(r["rel_err_base_vs_merged"], r["rel_err_requant_vs_merged"]) for r in layers if "kept_fraction" in r]
    if pairs:  # adapted layers only: how much of the adapter's error reduction the written weights keep
        rms_base = math.sqrt(sum(b * b for b, _ in pairs) / len(pairs))
        rms_out = math.sqrt(sum(e * e for _, e in pairs) / len(pairs))
        out["rms_rel_err_base_vs_merged"] = rms_base
        out["rms_rel_err_requant_vs_merged_adapted"] = rms_out
        out["kept_fraction"] = (rms_base - rms_out) / rms_base if rms_base > 0 else None
    changes = [r["max_abs_code_change"] for r in layers if "max_abs_code_change" in r]
    if changes:
        out["max_abs_code_change"] = max(changes)
    return out
