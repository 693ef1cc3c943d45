"""Compare initialisations on a real model: QWHA (AdaAlloc + refinement) vs random selection vs no adapter.

One streaming pass collects calibration and held-out Gram matrices of every target layer from the full-precision
model (they do not depend on the quantization), then each (bits, method) variant is quantized and initialised per
layer, its held-out relative output error recorded, and its perplexity measured on held-out text with the merged
weights ``W_q + Delta W`` (the QWHA layer's function; see :mod:`qwha_export.layer`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .converters.calibration import TARGET_MODULES_DEFAULT, iter_block_grams
from .converters.quantize import QuantConfig
from .converters.quantizers import quantize_weight
from .converters.qwha_init import InitConfig, init_layer
from .kernels import dense_delta, is_supported_size
from .metrics import perplexity

__all__ = ["StudyConfig", "compare_initialisations"]


@dataclass(frozen=True)
class StudyConfig:
    bits: Sequence[int] = (4, 2)
    group_size: int = 64
    quantizer: str = "rtn"
    rank: int = 64
    methods: Sequence[str] = ("adaalloc", "random")
    calib_tokens: int = 2048
    heldout_tokens: int = 2048
    seq_len: int = 512
    target_modules: Sequence[str] = TARGET_MODULES_DEFAULT
    quiet: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _swapped_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    saved = {}
    try:
        for name, w in weights.items():
            lin = model.get_submodule(name)
            saved[name] = lin.weight.data
            lin.weight.data = w.to(lin.weight.dtype)
        yield
    finally:
        for name, w in saved.items():
            model.get_submodule(name).weight.data = w


def compare_initialisations(model, tokenizer, config: StudyConfig = StudyConfig()) -> dict[str, Any]:
    """Returns ``{"ppl": {variant: ppl}, "layers": {variant: {layer: report}}, "summary": {...}}``.

    Variants: ``fp``, ``q{bits}`` (quantized, no adapter) and ``q{bits}+{method}`` for each method.
    """
    from .data import calibration_and_heldout

    calib, heldout = calibration_and_heldout(tokenizer, config.seq_len, config.calib_tokens, config.heldout_tokens)
    layers: dict[str, dict[str, dict[str, float]]] = {}
    merged: dict[str, dict[str, torch.Tensor]] = {}
    it_c = iter_block_grams(model, calib, config.target_modules, batch_size=4, sequential=False)
    it_h = iter_block_grams(model, heldout, config.target_modules, batch_size=4, sequential=False)
    n_blocks = model.config.num_hidden_layers
    for (_, _, grams), (_, _, held) in tqdm(zip(it_c, it_h, strict=True), total=n_blocks, disable=config.quiet):
        for name, gram in grams.items():
            w = model.get_submodule(name).weight.detach()
            for bits in config.bits:
                qcfg = QuantConfig(bits=bits, group_size=config.group_size, method=config.quantizer)
                qw = quantize_weight(w, qcfg, hessian=gram)
                w_deq = qw.dequantize()
                merged.setdefault(f"q{bits}", {})[name] = w_deq
                if not is_supported_size(w.shape[1]):
                    continue
                for method in config.methods:
                    icfg = InitConfig(rank=config.rank, method=method)
                    res = init_layer(w, w_deq, gram, icfg, eval_gram=held[name], report_calibration=False)
                    variant = f"q{bits}+{method}"
                    layers.setdefault(variant, {})[name] = res.report
                    coef = icfg.scale / (w.shape[1] * w.shape[0] ** 0.5)
                    delta = dense_delta(res.values, res.rows, res.cols, w.shape[0], w.shape[1], coef)
                    merged.setdefault(variant, {})[name] = (w_deq.double() + delta).float()
    ppl = {"fp": perplexity(model, heldout)}
    for variant, weights in merged.items():
        with _swapped_weights(model, weights):
            ppl[variant] = perplexity(model, heldout)
    summary = {}
    for variant, reps in layers.items():
        before = [r["rel_err_before_heldout"] for r in reps.values()]
        after = [r["rel_err_after_heldout"] for r in reps.values()]
        summary[variant] = {
            "layers": len(reps),
            "layers_improved": sum(a < b for a, b in zip(after, before, strict=True)),
            "mean_rel_err_before": sum(before) / len(before),
            "mean_rel_err_after": sum(after) / len(after),
        }
    return {"ppl": ppl, "layers": layers, "summary": summary}
