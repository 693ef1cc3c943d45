"""An independent float64 reference of what an adapter directory means, built from its files by a few lines of torch.

No reader, kernel or quantizer of ``qwha_export`` is used here, so a test comparing an export against these weights
does not compare the code with itself. From the README: each quantized layer dequantizes as
``W_deq = (codes - zeros[:, g]) * scales[:, g]`` (``g = column // group_size``, or ``g_idx``), each adapted layer adds
``ΔW = (s / (d_in * sqrt(d_out))) * F @ M`` with ``F`` the dense ``(d_out, d_in)`` spectrum, ``M`` the Walsh-Hadamard
matrix (Sylvester order; the tiny test models have power-of-two widths) and ``s`` the adapter's ``scale`` or its
``scale_pattern[layer]`` override. RTN re-quantization follows the grid formulas of ``converters/quantize.py``'s
docstring (min/max including 0, float16 scale rounded upward, round half to even).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


def sylvester(n: int) -> torch.Tensor:
    """The ``n x n`` Sylvester Hadamard matrix (float64, ``n`` a power of two)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    assert h.shape[0] == n, f"the reference covers power-of-two widths only, got {n}"
    return h


def reference_weights(adapter_dir: Path, drop: str | None = None) -> dict[str, torch.Tensor]:
    """``{layer: W_deq + ΔW}`` (float64) for every layer of ``quantized_base.safetensors`` (``W_deq`` alone where
    the layer has no spectrum); ``drop="adapter"`` leaves every ``ΔW`` out (the plain quantized base)."""
    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = load_file(str(adapter_dir / "quantized_base.safetensors"))
    spectra = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for name in sorted(k.removesuffix(".codes") for k in base if k.endswith(".codes")):
        codes = base[f"{name}.codes"].double()
        d_out, d_in = codes.shape
        g = base.get(f"{name}.g_idx")
        g = torch.arange(d_in) // int(base[f"{name}.group_size"]) if g is None else g.long()
        w = (codes - base[f"{name}.zeros"].double()[:, g]) * base[f"{name}.scales"].double()[:, g]
        key = f"base_model.model.{name}.qwha_"
        if key + "spectrum" in spectra and drop != "adapter":
            rows, cols = spectra[key + "indices"].long()
            f = torch.zeros(d_out, d_in, dtype=torch.float64)
            f.index_put_((rows, cols), spectra[key + "spectrum"].double(), accumulate=True)
            s = cfg.get("scale_pattern", {}).get(name, cfg["scale"])
            w = w + s / (d_in * math.sqrt(d_out)) * f @ sylvester(d_in)
        out[name] = w
    return out


def base_model_dir(adapter_dir: Path) -> Path:
    return Path(json.loads((Path(adapter_dir) / "qwha_base.json").read_text())["base_model"])


def reference_model(adapter_dir: Path, weights: dict[str, torch.Tensor], dtype: torch.dtype):
    """The base model of ``adapter_dir`` in ``dtype`` with each layer's weight replaced by ``weights[layer]``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir(adapter_dir)), dtype=dtype).eval()
    for name, w in weights.items():
        model.get_submodule(name).weight.data = w.to(dtype)
    return model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def check_logits(name: str, got: torch.Tensor, adapter_dir: Path, ids: torch.Tensor) -> None:
    """``got`` (float32 logits on ``ids``) against the float64 reference model of ``adapter_dir``: error <= 2x that
    of the same reference model run in float32 + 1e-6 (:func:`kernel_parity.check_parity`); and the quantized base
    without the adapter is >1000x that atol away, so a dropped adapter cannot pass."""
    from kernel_parity import ATOL, check_parity, rel_err

    ref = reference_weights(adapter_dir)
    a64 = logits(reference_model(adapter_dir, ref, torch.float64), ids)
    a32 = logits(reference_model(adapter_dir, ref, torch.float32), ids)
    check_parity(name, got, a32, a64, torch.float32)
    plain = logits(reference_model(adapter_dir, reference_weights(adapter_dir, drop="adapter"), torch.float64), ids)
    assert rel_err(plain, a64) > 1e3 * ATOL[torch.float32], f"{name}: the adapter barely changes the logits"


def fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 value >= ``x`` (float64 in, float64 out), clamped into [2**-14, 65504]."""
    x = x.clamp(2.0**-14, 65504.0)
    h = x.to(torch.float16)
    up = torch.from_numpy(np.nextafter(h.numpy(), np.float16(np.inf)))
    return torch.where(h.double() < x, up, h).double()


def rtn_reference(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scales, zeros)`` (float64) of group-wise asymmetric min/max RTN of ``w`` (``d_in`` a multiple of
    ``group_size``); ``scales``/``zeros`` are ``(d_out, n_groups)``."""
    maxq = 2**bits - 1
    d_out, d_in = w.shape
    wg = w.double().reshape(d_out, d_in // group_size, group_size)
    lo, hi = wg.amin(-1).clamp(max=0.0), wg.amax(-1).clamp(min=0.0)
    scale = (hi - lo) / maxq
    scale = fp16_ceil(torch.where(scale == 0, torch.ones_like(scale), scale))
    zero = torch.round(-lo / scale).clamp(0, maxq)
    codes = (torch.round(wg / scale[..., None]) + zero[..., None]).clamp(0, maxq)
    return codes.reshape(d_out, d_in), scale, zero
