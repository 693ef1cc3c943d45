"""The QWHA layer: a frozen quantized base plus a sparse Walsh-Hadamard spectral adapter.

``y = x @ W_deq.T + (s / (d_in * sqrt(d_out))) * wht(x) @ F.T + bias``

``F`` (``d_out x d_in``) is sparse: ``values[e]`` at ``(rows[e], cols[e])`` (row = output channel, col = Walsh
index). This equals the published QWHA layer, whose dense delta is ``Delta W = iwht(dense(F)) * s / sqrt(d_out)``
with ``iwht(F) = F @ M / d_in`` (see :func:`delta_weight`). The training forward never builds ``Delta W``: the
adapter runs on activations through :func:`qwha_export.kernels.spectral_adapter` (Triton on CUDA, torch on CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import SpectralLayout, dense_delta, is_supported_size, spectral_adapter, spectral_linear
from .kernels.spectral import adapter_coefficient, validate_spectrum
from .quant_linear import QuantLinear

__all__ = ["QWHALinear", "adapter_coefficient", "delta_weight", "validate_spectrum"]


def delta_weight(
    values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, d_out: int, d_in: int, scale: float
) -> torch.Tensor:
    """Dense ``Delta W = (s / (d_in sqrt(d_out))) * F @ M`` in float64, O(d_out d_in log d_in) from the sparse form."""
    return dense_delta(values, rows, cols, d_out, d_in, adapter_coefficient(scale, d_in, d_out))


class QWHALinear(nn.Module):
    """QWHA layer around a frozen base (a :class:`~qwha_export.quant_linear.QuantLinear` or any linear module).

    Args:
        base: module computing ``x @ W_deq.T + bias``; its parameters are frozen.
        values: ``(nnz,)`` spectrum values (trainable, float32).
        rows, cols: ``(nnz,)`` output-channel and Walsh indices.
        scale: ``s``; the adapter coefficient is ``s / (d_in * sqrt(d_out))``.
        form: ``"auto"`` (the faster of the activation-side and dense-Delta-W forms for each call's token count,
            :func:`qwha_export.kernels.choose_form`), ``"activation"`` or ``"dense"``; bases other than
            ``nn.Linear``/``QuantLinear`` always run the activation side.
    """

    def __init__(
        self,
        base: nn.Module,
        values: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        scale: float = 1.0,
        form: str = "auto",
    ):
        super().__init__()
        self.base = base
        self.out_features, self.in_features = base.out_features, base.in_features
        if not is_supported_size(self.in_features):
            raise ValueError(f"d_in={self.in_features} has no supported Walsh-Hadamard size")
        validate_spectrum(values, rows, cols, self.out_features, self.in_features)
        for p in base.parameters():
            p.requires_grad_(False)
        self.spectrum = nn.Parameter(values.detach().to(torch.float32).clone())
        self.register_buffer("indices", torch.stack([rows.long(), cols.long()]))
        self.scale = float(scale)
        self.form = form
        self._layout: SpectralLayout | None = None

    @property
    def coefficient(self) -> float:
        return adapter_coefficient(self.scale, self.in_features, self.out_features)

    def layout(self) -> SpectralLayout:
        lay = self._layout
        if lay is None:
            lay = SpectralLayout.build(self.indices[0], self.indices[1], self.out_features, self.in_features)
        if lay.rows.device != self.indices.device:
            lay = lay.to(self.indices.device)
        self._layout = lay
        return lay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, (nn.Linear, QuantLinear)):  # weight known: the faster form for this token count
            w = self.base.weight
            return spectral_linear(x, w, self.base.bias, self.spectrum, self.layout(), self.coefficient, self.form)
        y = self.base(x)
        return y + spectral_adapter(x, self.spectrum, self.layout(), self.coefficient).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        return delta_weight(
            self.spectrum, self.indices[0], self.indices[1], self.out_features, self.in_features, self.scale
        )
