"""The quantized weight every quantizer returns and every format reads and writes: :class:`QuantizedWeight`.

Every quantizer in the tool returns a :class:`QuantizedWeight`, whose contract is:

Memory layout (all tensors row-major / C-contiguous, one value per element, nothing packed):

* ``codes``  ``(d_out, d_in)`` ``torch.uint8`` -- integer codes ``q`` in ``[0, 2**bits - 1]``, in the ORIGINAL
  column order of the weight (also after GPTQ ``act_order``). Bit-packing is the job of each exporter.
* ``scales`` ``(d_out, n_groups)`` ``torch.float16`` -- one scale per (output row, group).
* ``zeros``  ``(d_out, n_groups)`` ``torch.uint8`` -- integer zero points ``z`` in ``[0, 2**bits - 1]`` (NOT
  pre-multiplied by the scale, and NOT stored minus one as the legacy AutoGPTQ "v1" ``qzeros`` packing does).
* ``g_idx``  ``(d_in,)`` ``torch.int32`` or ``None`` -- group of each input column. ``None`` means the sequential
  mapping ``column // group_size``; it is only set when the mapping differs from that (GPTQ ``act_order`` without
  ``static_groups``).

``n_groups = ceil(d_in / group_size)``, or ``1`` for per-output-channel quantization (``group_size=-1`` in
:class:`QuantConfig`; the stored ``QuantizedWeight.group_size`` is then ``d_in``). When ``group_size`` does not divide
``d_in`` the last group is shorter (``d_in - (n_groups - 1) * group_size`` columns; SmolLM2's 576 columns at group
size 128 are 4 groups of 128 and one of 64), as in AutoGPTQ / GPTQModel (``ceil(infeatures / group_size)`` rows of
``scales``) and onnxruntime's MatMulNBits (``ceil(K / block_size)`` blocks).

Dequantization (exact formula)::

    g = g_idx[i] if g_idx is not None else i // group_size
    W[o, i] = (float(codes[o, i]) - float(zeros[o, g])) * float(scales[o, g])

Why it is bit-exact everywhere: ``codes - zeros`` is a small integer (|.| <= 255, 8 significant bits) and the scale
is a float16 value (11 significant bits), so the product has at most 19 significant bits and is EXACT in float32
(24 bits). :meth:`QuantizedWeight.dequantize` computes it in float32 and then casts to the requested dtype, i.e. it
rounds the exact value once. Any runtime that evaluates ``(q - z) * s`` with a single IEEE multiply (in float32,
or in float16 / bfloat16 where ``q - z`` is exactly representable) therefore produces bit-identical weights.
(Runtimes using the pre-multiplied form ``q * s - (z * s)`` may differ in the last bit.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "SUPPORTED_BITS",
    "SUPPORTED_GROUP_SIZES",
    "QuantizedWeight",
    "config_group_size",
    "has_ragged_group",
    "n_groups_of",
]

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES: tuple[int, ...] = (32, 64, 128, -1)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_bits(bits: Any) -> int:
    if not _is_int(bits) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; choose one of {SUPPORTED_BITS}")
    return bits


def n_groups_of(d_in: int, group_size: int) -> int:
    """``ceil(d_in / group_size)``: the number of groups, the last one shorter when ``group_size`` does not divide."""
    return -(-d_in // group_size)


def config_group_size(layers: Iterable[tuple[int, int]]) -> int | None:
    """The one ``group_size`` a checkpoint's ``quantization_config`` can give all ``layers`` (``(group_size, d_in)``
    pairs, the real group sizes of :class:`QuantizedWeight`), or None if none can.

    A layer fits ``c`` when its group size is ``c``, or when it has a single group and ``c`` is -1 (per channel) or
    at least its ``d_in``: loaders allocate ``ceil(d_in / c)`` groups. A group size the layers share is preferred
    to -1, so a model quantized at 128 whose ``down_proj`` happens to be 128 wide stays ``128``.
    """
    shapes = [(gs, d_in, n_groups_of(d_in, gs)) for gs, d_in in set(layers)]
    if not shapes:
        return None

    def fits(c: int) -> bool:
        return all(gs == c or (n == 1 and (c == -1 or c >= d_in)) for gs, d_in, n in shapes)

    for c in sorted({gs for gs, _, _ in shapes}):
        if fits(c):
            return -1 if all(n == 1 and gs == d_in for gs, d_in, n in shapes) and c not in SUPPORTED_GROUP_SIZES else c
    return -1 if fits(-1) else None


def has_ragged_group(layers: Iterable[tuple[int, int]]) -> bool:
    """True when a layer's ``(group_size, d_in)`` leaves a shorter last group (``d_in % group_size != 0``)."""
    return any(d_in % gs for gs, d_in in layers)


@dataclass
class QuantizedWeight:
    """A quantized ``(d_out, d_in)`` weight; see the module docstring for layout and the dequantization formula.

    ``group_size`` is the real group size (``d_in`` for per-channel). ``g_idx`` (int32, ``(d_in,)``) is the group of
    each input column, or ``None`` for the sequential mapping ``column // group_size``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.bits = _check_bits(int(self.bits) if isinstance(self.bits, torch.Tensor) else self.bits)
        if isinstance(self.group_size, torch.Tensor):
            self.group_size = int(self.group_size)
        if self.codes.dim() != 2 or self.codes.dtype != torch.uint8:
            raise ValueError(f"codes must be a 2-D uint8 tensor, got {self.codes.dtype} {tuple(self.codes.shape)}")
        d_out, d_in = self.codes.shape
        if not _is_int(self.group_size) or self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r} must be a positive integer")
        n_groups = n_groups_of(d_in, self.group_size) if d_in else 0
        if self.scales.dtype != torch.float16 or tuple(self.scales.shape) != (d_out, n_groups):
            raise ValueError(
                f"scales must be float16 of shape {(d_out, n_groups)}, "
                f"got {self.scales.dtype} {tuple(self.scales.shape)}"
            )
        if self.zeros.dtype != torch.uint8 or tuple(self.zeros.shape) != (d_out, n_groups):
            raise ValueError(
                f"zeros must be uint8 of shape {(d_out, n_groups)}, got {self.zeros.dtype} {tuple(self.zeros.shape)}"
            )
        if self.g_idx is not None:
            if tuple(self.g_idx.shape) != (d_in,) or self.g_idx.dtype.is_floating_point or self.g_idx.is_complex():
                raise ValueError(f"g_idx must be an integer tensor of shape {(d_in,)}, got {tuple(self.g_idx.shape)}")
            self.g_idx = self.g_idx.to(torch.int32)
            if d_in and (int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= n_groups):
                raise ValueError(f"g_idx values must lie in [0, {n_groups})")

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    @property
    def device(self) -> torch.device:
        """Where the codes live (peft's LoRA reads ``layer.qweight.device`` to place new adapter weights)."""
        return self.codes.device

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_index(self) -> torch.Tensor:
        """``(d_in,)`` int64: the group of each input column (``g_idx``, or ``arange(d_in) // group_size``)."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.shape[1], device=self.codes.device) // self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(codes - zeros[:, g]) * scales[:, g]`` computed exactly in float32, then cast once to ``dtype``."""
        g = self.group_index()
        s = self.scales.float().index_select(1, g)
        z = self.zeros.float().index_select(1, g)
        w = (self.codes.float() - z) * s
        return w if dtype == torch.float32 else w.to(dtype)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(
            codes=self.codes.to(device),
            scales=self.scales.to(device),
            zeros=self.zeros.to(device),
            bits=self.bits,
            group_size=self.group_size,
            g_idx=None if self.g_idx is None else self.g_idx.to(device),
        )

    def to_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat ``{name: tensor}`` dict ready for ``safetensors.torch.save_file``.

        Keys (each preceded by ``prefix``): ``codes`` (uint8), ``scales`` (float16), ``zeros`` (uint8), ``bits`` and
        ``group_size`` (1-element int32 tensors, so the dict is self-describing without safetensors metadata), and
        ``g_idx`` (int32) only when it is not ``None``. Tensors are made contiguous, device is kept.
        """
        out = {
            f"{prefix}codes": self.codes.contiguous(),
            f"{prefix}scales": self.scales.contiguous(),
            f"{prefix}zeros": self.zeros.contiguous(),
            f"{prefix}bits": torch.tensor([self.bits], dtype=torch.int32),
            f"{prefix}group_size": torch.tensor([self.group_size], dtype=torch.int32),
        }
        if self.g_idx is not None:
            out[f"{prefix}g_idx"] = self.g_idx.contiguous()
        return out

    @classmethod
    def from_dict(
        cls,
        tensors: dict[str, Any],
        prefix: str = "",
        bits: int | None = None,
        group_size: int | None = None,
    ) -> QuantizedWeight:
        """Inverse of :meth:`to_dict`. ``bits``/``group_size`` may be given explicitly (e.g. from metadata) instead
        of being read from the ``bits``/``group_size`` entries (which may be ints, strings or 1-element tensors)."""

        def scalar(name: str, given: int | None) -> int:
            if given is not None:
                return int(given)
            key = f"{prefix}{name}"
            if key not in tensors:
                raise ValueError(f"missing {key!r} (pass {name}= explicitly)")
            v = tensors[key]
            return int(v.reshape(-1)[0]) if isinstance(v, torch.Tensor) else int(v)

        return cls(
            codes=tensors[f"{prefix}codes"],
            scales=tensors[f"{prefix}scales"],
            zeros=tensors[f"{prefix}zeros"],
            bits=scalar("bits", bits),
            group_size=scalar("group_size", group_size),
            g_idx=tensors.get(f"{prefix}g_idx"),
        )
