"""``merge --requant refit``: re-quantize the merged weights and fit a fresh QWHA adapter to the new quantization
error, as a layer function of the checkpoint engine (:func:`~.checkpoint_writer.write_checkpoint`, through
:func:`qwha_export.fused.write_fused`).

For each quantized layer: ``W_m = dequant(base) + Delta W`` (float64; the dequantized base for a layer without
adapter), re-quantized at the requested bits (RTN, GPTQ with the calibration Gram, the base's own grid, or ``auto``:
the grid where the layer keeps its bits and groups, RTN elsewhere); for an adapted layer the training-stage
initialisation (AdaAlloc + refinement, same budget rule, the source's scale ``s``) then fits a new spectrum so that
``W_q' + Delta W'`` approximates ``W_m`` on the calibration activations. The fused writer stores the new quantized
base and the new spectrum layer by layer, so memory is one layer's, flat in depth. This also retargets a model
trained at one bit-width to another (e.g. 4 -> 3 bits).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..formats.quantized import QuantizedWeight
from .adapter_source import LazySpectra, read_adapter_scales
from .merge import merged_weight
from .quant_methods import Quantizer
from .quantizers import requantize, resolve_quantizer
from .qwha_init import InitConfig, LayerInit, init_layer

__all__ = ["RefitLayers"]


class RefitLayers:
    """The refit of one adapter directory, layer by layer: ``refit(layer, base_qw)`` returns the re-quantized
    :class:`QuantizedWeight` and, for an adapted layer, its fresh spectrum (:class:`~.qwha_init.LayerInit`, scale
    :attr:`scale`); :meth:`report` sums up the layers refitted so far.

    ``grams`` (``{layer: X^T X}``, e.g. a block-streamed :class:`~.block_stream.StreamedGrams` asked in block order)
    are needed for every adapted layer (the refinement fits on them); ``rank`` defaults to the source adapter's.
    Checked before any work: a missing Gram is a one-line ``ValueError``."""

    def __init__(
        self,
        adapter_dir: str | Path,
        *,
        bits: int,
        group_size: int | None,
        quantizer: str | Quantizer,
        grams: Mapping[str, torch.Tensor],
        rank: int | None = None,
    ) -> None:
        adapter_dir = Path(adapter_dir)
        self.spectra = LazySpectra(adapter_dir)  # one layer's spectrum at a time
        missing = sorted(layer for layer in self.spectra if layer not in grams)
        if missing:
            raise ValueError(f"refit needs calibration activations for every adapted layer; missing for {missing[0]}")
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        self.rank = int(rank or cfg.get("rank", 64))
        # keep the source's s, so that training after a refit steps as before
        self.init = InitConfig(rank=self.rank, scale=read_adapter_scales(adapter_dir)[0])
        self.bits, self.group_size, self.quantizer, self.grams = bits, group_size, Quantizer.parse(quantizer), grams
        self.layers: list[dict[str, Any]] = []

    @property
    def scale(self) -> float:
        return self.init.scale

    def __call__(self, layer: str, base_qw: QuantizedWeight) -> tuple[QuantizedWeight, LayerInit | None]:
        if layer in self.spectra:
            values, rows, cols, scale = self.spectra[layer]
            target = merged_weight(base_qw, values, rows, cols, scale)
        else:
            target = base_qw.dequantize(torch.float64)
        gram = self.grams.get(layer)
        method = resolve_quantizer(self.quantizer, base_qw, self.bits, self.group_size, base_qw.shape[1])
        qw = requantize(target, method, self.bits, self.group_size, base_qw, hessian=gram)
        if layer not in self.spectra:
            return qw, None
        res = init_layer(target, qw.dequantize(), gram, self.init)
        self.layers.append({"name": layer, "shape": list(qw.shape), "quantizer": method.value, **res.report})
        return qw, res

    def report(self) -> dict[str, Any]:
        """``{"layers": [...], "total": {"n_layers", "rms_rel_err_vs_merged"}}`` of the layers refitted so far."""
        errs = [layer["rel_err_after_calib"] for layer in self.layers]
        rms = math.sqrt(sum(e * e for e in errs) / len(errs)) if errs else 0.0
        return {"layers": list(self.layers), "total": {"n_layers": len(self.layers), "rms_rel_err_vs_merged": rms}}
