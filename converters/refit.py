"""``refit``: re-quantize the merged weights and fit a fresh QWHA adapter to the new quantization error.

For each adapted layer: ``W_m = dequant(base) + Delta W`` (float64), re-quantized at the requested bits (RTN, GPTQ
with the calibration Gram, the base's own grid, or ``auto``: the grid where the layer keeps its bits and groups, RTN
elsewhere), then the training-stage initialisation (AdaAlloc + refinement, same budget rule)
fits a new spectrum so that ``W_q' + Delta W'`` approximates ``W_m`` on the calibration activations. Quantized
layers without adapter are re-quantized from their dequantized base. The result is a new adapter directory (same
layout as ``init`` writes: ``quantized_base.safetensors``, ``qwha_base.json``, peft ``adapter_config.json`` +
``adapter_model.safetensors``), which ``fuse`` turns into a deployable fused checkpoint. This also retargets a
model trained at one bit-width to another (e.g. 4 -> 3 bits).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..formats.adapter_dir import ADAPTER_WEIGHTS, BASE_FILE, BASE_META
from ..formats.shards import concat_safetensors, natural_key
from .adapter_source import read_adapter_scales, read_quantized_layer
from .merge import merged_weight, open_adapter_source
from .quant_methods import Quantizer
from .quantizers import requantize, resolve_quantizer
from .qwha_init import InitConfig, init_layer

__all__ = ["refit_adapter"]



def refit_adapter(
    adapter_dir: str | Path,
    out_dir: Path,
    *,
    bits: int,
    group_size: int | None,
    quantizer: str | Quantizer,
    grams: dict[str, torch.Tensor],
    rank: int | None = None,
) -> dict[str, Any]:
    """Write a refitted adapter directory into ``out_dir`` (which must exist and be empty). Returns the report.

    Layers are read, refitted and written one at a time (a part file each, joined into the layout's two files at
    the end by :func:`~qwha_export.formats.shards.concat_safetensors`), so memory is one layer's, flat in depth.

    ``grams`` (``{layer: X^T X}``) are needed for every adapted layer (the refinement fits on them); ``rank``
    defaults to the source adapter's.
    """
    adapter_dir = Path(adapter_dir)
    quantizer = Quantizer.parse(quantizer)
    meta, _, quantized, spectra = open_adapter_source(adapter_dir, lazy=True)  # one layer's spectrum at a time
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    rank = int(rank or cfg.get("rank", 64))
    missing = sorted(layer for layer in spectra if layer not in grams)
    if missing:
        raise ValueError(f"refit needs calibration activations for every adapted layer; missing for {missing[0]}")
    # keep the source's s, so that training after a refit steps as before
    init_cfg = InitConfig(rank=rank, scale=read_adapter_scales(adapter_dir)[0])
    parts = out_dir / ".parts"  # one file per layer, joined at the end: memory is one layer's, flat in depth
    parts.mkdir()
    layers: list[dict[str, Any]] = []
    qpath = adapter_dir / BASE_FILE
    with safe_open(str(qpath), framework="pt") as qf:
        qkeys = set(qf.keys())
    for index, layer in enumerate(sorted(quantized | set(spectra), key=natural_key)):  # blocks in order
        base_qw = read_quantized_layer(qpath, layer, qkeys)
        if layer in spectra:
            values, rows, cols, scale = spectra[layer]
            target = merged_weight(base_qw, values, rows, cols, scale)
        else:
            target = base_qw.dequantize(torch.float64)
        gram = grams.get(layer)
        method = resolve_quantizer(quantizer, base_qw, bits, group_size, base_qw.shape[1])
        qw = requantize(target, method, bits, group_size, base_qw, hessian=gram)
        base_part = {k: v.cpu().contiguous() for k, v in qw.to_dict(prefix=f"{layer}.").items()}
        save_file(base_part, str(parts / f"quantized-{index:05d}.safetensors"))
        if layer not in spectra:
            continue
        res = init_layer(target, qw.dequantize(), gram, init_cfg)
        d_out, d_in = qw.shape
        key = f"base_model.model.{layer}.qwha_"
        adapter_part = {
            key + "spectrum": res.values.float().contiguous(),
            key + "indices": torch.stack([res.rows, res.cols]).long().contiguous(),
            key + "shape": torch.tensor([d_out, d_in], dtype=torch.int64),
        }
        save_file(adapter_part, str(parts / f"adapter-{index:05d}.safetensors"))
        layers.append({"name": layer, "shape": [d_out, d_in], "quantizer": method.value, **res.report})
    concat_safetensors(sorted(parts.glob("quantized-*.safetensors")), out_dir / BASE_FILE)
    concat_safetensors(sorted(parts.glob("adapter-*.safetensors")), out_dir / ADAPTER_WEIGHTS)
    shutil.rmtree(parts)
    cfg.update({"rank": rank, "scale": init_cfg.scale, "scale_pattern": {}, "init": "adaalloc"})
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    meta = dict(meta)
    meta["quantization"] = {**meta.get("quantization", {}), "bits": bits, "method": quantizer.value, "refit": True}
    if group_size is not None:
        meta["quantization"]["group_size"] = group_size
    (out_dir / BASE_META).write_text(json.dumps(meta, indent=2))
    errs = [layer["rel_err_after_calib"] for layer in layers]
    report = {
        "layers": layers,
        "total": {"n_layers": len(layers), "rms_rel_err_vs_merged": math.sqrt(sum(e * e for e in errs) / len(errs))},
    }
    (out_dir / "refit_report.json").write_text(json.dumps(report, indent=2))
    return report
