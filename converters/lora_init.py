"""LoRA initialised from the quantization error (LoftQ / CLoQ style), in float64, for the LoRA baselines.

Given a full-precision weight ``W`` (``d_out x d_in``), its dequantized quantization ``W_q`` and the calibration Gram
``G = X^T X`` of the layer's input, the rank-``r`` LoRA ``Delta W = scaling * B @ A`` that minimises the
activation-weighted error ``||(W - W_q - Delta W) X^T||_F = ||(E - Delta W) R||_F`` (``E = W - W_q``,
``R = sqrt(G + damp)``, see :func:`qwha_export.converters.calibration.gram_to_root`) is, by Eckart-Young on
``E R``:

``E R = U S V^T`` (SVD), ``Delta W = U_r S_r V_r^T R^{-1}``,

split evenly between the factors: ``B = U_r sqrt(S_r) / sqrt(scaling)``, ``A = sqrt(S_r) V_r^T R^{-1} /
sqrt(scaling)``. This is CLoQ's closed form (LoftQ's one-step variant with calibration weighting); the quantized
base is *not* changed, so the LoRA rows of a comparison share the QWHA rows' base. Everything is computed in
float64 and cast to float32 once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .calibration import gram_to_root
from .qwha_init import report_errors

__all__ = ["LoraInit", "lora_from_error"]


@dataclass
class LoraInit:
    """LoRA factors for one layer: ``A`` (``r x d_in``), ``B`` (``d_out x r``), float32; ``scaling * B @ A`` is the
    fitted ``Delta W``. ``report`` holds relative output errors before/after (as :func:`qwha_init.init_layer`)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    report: dict[str, float] = field(default_factory=dict)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in float64."""
        return self.scaling * (self.B.double() @ self.A.double())


def lora_from_error(
    weight: torch.Tensor,
    w_deq: torch.Tensor,
    gram: torch.Tensor,
    rank: int,
    scaling: float = 1.0,
    damp_ratio: float = 1e-4,
    eval_gram: torch.Tensor | None = None,
) -> LoraInit:
    """Rank-``rank`` LoRA factors cancelling ``W - W_q`` on the calibration activations (see the module docstring).

    ``weight``/``w_deq``: ``(d_out, d_in)``; ``gram``: ``(d_in, d_in)``; ``scaling``: LoRA's ``lora_alpha / r``.
    ``eval_gram`` (held-out activations) adds held-out figures to the report. ``ValueError`` for a bad rank/shape.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if not (isinstance(scaling, (int, float)) and math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"scaling must be a positive number, got {scaling!r}")
    w = weight.detach().to(torch.float64)
    e = w - w_deq.detach().to(device=w.device, dtype=torch.float64)
    d_out, d_in = e.shape
    if tuple(gram.shape) != (d_in, d_in):
        raise ValueError(f"gram has shape {tuple(gram.shape)}, expected {(d_in, d_in)}")
    r = min(rank, d_out, d_in)
    root = gram_to_root(gram.to(w.device), damp_ratio)  # symmetric, positive definite after damping
    u, s, vh = torch.linalg.svd(e @ root, full_matrices=False)
    half = s[:r].sqrt()
    b = u[:, :r] * half[None, :]
    # A = sqrt(S_r) V_r^T R^{-1}: R is symmetric, so A^T = R^{-1} (V_r sqrt(S_r)) is one solve
    a = torch.linalg.solve(root, (vh[:r].T * half[None, :])).T
    norm = 1.0 / math.sqrt(scaling)
    a, b = a * norm, b * norm
    if r < rank:  # pad with zero directions so the factors have the requested rank
        a = torch.cat([a, torch.zeros(rank - r, d_in, dtype=a.dtype, device=a.device)])
        b = torch.cat([b, torch.zeros(d_out, rank - r, dtype=b.dtype, device=b.device)], dim=1)
    delta = scaling * (b @ a)
    report: dict[str, float] = {"d_out": d_out, "d_in": d_in, "rank": rank}
    report.update(report_errors(w, w_deq, lambda rows, _: delta[rows], {"calib": gram, "heldout": eval_gram}))
    return LoraInit(a.float().cpu(), b.float().cpu(), float(scaling), report)
