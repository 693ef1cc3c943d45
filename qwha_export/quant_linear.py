"""``QuantLinear``: a frozen linear layer whose weight is a :class:`~qwha_export.converters.quantize.QuantizedWeight`.

The integer codes, float16 scales and uint8 zero points are buffers (saved in the state dict); the dequantized
weight ``(codes - zeros[:, g]) * scales[:, g]`` is computed once per device/dtype and cached (not saved).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .converters.quantize import QuantizedWeight

__all__ = ["QuantLinear", "replace_linear"]


class QuantLinear(nn.Module):
    """``y = x @ W_deq.T + bias`` with a frozen group-quantized weight."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.bits, self.group_size = qweight.bits, qweight.group_size
        self.register_buffer("codes", qweight.codes)
        self.register_buffer("scales", qweight.scales)
        self.register_buffer("zeros", qweight.zeros)
        self.register_buffer("g_idx", qweight.g_idx)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self._compute_dtype = dtype
        self._cache: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Module, qweight: QuantizedWeight) -> QuantLinear:
        if tuple(linear.weight.shape) != qweight.shape:
            raise ValueError(f"quantized weight {qweight.shape} does not match layer {tuple(linear.weight.shape)}")
        q = qweight.to(linear.weight.device)
        return cls(q, getattr(linear, "bias", None), dtype=linear.weight.dtype)

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.codes, self.scales, self.zeros, self.bits, self.group_size, self.g_idx)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the layer's compute dtype (cached; frozen)."""
        c = self._cache
        if c is None or c.device != self.codes.device or c.dtype != self._compute_dtype:
            c = self.qweight.dequantize(self._compute_dtype)
            self._cache = c
        return c

    def _apply(self, fn, recurse=True):
        """``.to()``/``.cuda()``/``.double()``: move the quantized buffers but keep their exact dtypes
        (float16 scales, uint8 codes/zeros); a float cast changes the compute dtype instead."""
        self._cache = None
        keep = {name: b.dtype for name, b in self._buffers.items() if b is not None}
        out = super()._apply(fn, recurse)
        for name, dtype in keep.items():
            if self._buffers[name].dtype != dtype:
                self._buffers[name] = self._buffers[name].to(dtype)
        probe = fn(torch.zeros(1, dtype=self._compute_dtype))
        if probe.is_floating_point():
            self._compute_dtype = probe.dtype
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return F.linear(x.to(w.dtype), w, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}"
        )


def replace_linear(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule at dotted path ``name`` for ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
