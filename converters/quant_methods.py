"""The quantizer vocabulary: :class:`Quantizer` keys the quantizer registry (:mod:`.quantizers`), the quantization
configs (:class:`~qwha_export.converters.quantize.QuantConfig`) and the CLI's choices (``init --quantizer``, ``merge
--requant``), so one choice has one spelling everywhere.

This module imports nothing heavy (no torch), so the CLI builds its option choices from it at start-up.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Quantizer", "BASE_QUANTIZERS", "REQUANTIZERS", "MERGE_REQUANT"]


class Quantizer(StrEnum):
    """How a weight is put on a low-bit grid (a ``str`` Enum: ``Quantizer.GPTQ == "gptq"``).

    * ``rtn``: round to nearest on each group's min/max grid;
    * ``gptq``: GPTQ on calibration activations (needs the Gram matrix ``X^T X`` of the layer's inputs);
    * ``grid``: the quantized base layer's own scales and zeros (needs that base; keeps its bits and groups);
    * ``auto``: per layer, ``grid`` where the layer keeps its base's bits and group size (and has no act-order
      permutation), else ``rtn``.
    """

    RTN = "rtn"
    GPTQ = "gptq"
    GRID = "grid"
    AUTO = "auto"

    @property
    def needs_base(self) -> bool:
        """True for the quantizers that read a quantized base layer's grid (``grid``, ``auto``)."""
        return self in (Quantizer.GRID, Quantizer.AUTO)

    @property
    def needs_hessian(self) -> bool:
        """True for the quantizers that need the layer's input Gram matrix (``gptq``)."""
        return self is Quantizer.GPTQ

    @classmethod
    def parse(cls, value: str | Quantizer, option: str = "quantizer") -> Quantizer:
        """Case-insensitive; ``ValueError`` naming the option, the value and the choices."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        sep = "" if option.endswith("=") else " "  # "method='awq'" or "--requant 'awq'"
        raise ValueError(f"{option}{sep}{value!r} is not supported; choose one of {', '.join(q.value for q in cls)}")


BASE_QUANTIZERS: tuple[str, ...] = tuple(q.value for q in Quantizer if not q.needs_base)
"""The quantizers of a full-precision model (``init --quantizer``): those that need no quantized base."""

REQUANTIZERS: tuple[str, ...] = tuple(q.value for q in Quantizer)
"""The quantizers of a merged weight (``merge --requant``, ``refit``): all of them."""

MERGE_REQUANT: tuple[str, ...] = (*REQUANTIZERS, "refit")
"""``merge --requant``: any quantizer, or ``refit`` (:mod:`~qwha_export.converters.refit`: the merged weights
re-quantized with ``auto`` plus a freshly fitted adapter, written as a fused checkpoint)."""
