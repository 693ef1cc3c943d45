"""The format vocabulary: :class:`ExportFormat` keys the writer registry (:mod:`.registry`), the manifests and the
CLI's ``--format`` / ``--base-format`` choices, so one format has one spelling everywhere.

This module imports nothing heavy (no torch): the CLI builds its option choices from it at start-up.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ExportFormat", "FUSED_BASE_FORMATS"]


class ExportFormat(StrEnum):
    """Export formats (a ``str`` Enum: ``ExportFormat.GPTQ == "gptq"``, ``str(ExportFormat.GPTQ) == "gptq"``)."""

    DENSE = "dense"
    GPTQ = "gptq"
    GPTQ_V2 = "gptq_v2"
    COMPRESSED_TENSORS = "compressed-tensors"
    FUSED = "fused"
    ONNX = "onnx"

    @classmethod
    def parse(cls, value: str | ExportFormat) -> ExportFormat:
        """Case-insensitive; ``_`` and ``-`` are interchangeable (``"compressed_tensors"``, ``"GPTQ-v2"``)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            s = value.strip().lower()
            for f in cls:
                if s == f.value or s.replace("_", "-") == f.value.replace("_", "-"):
                    return f
        raise ValueError(f"unknown export format {value!r}; choose one of {[f.value for f in cls]}")


FUSED_BASE_FORMATS: tuple[str, ...] = ("gptq_v2", "compressed-tensors", "dense")
"""The formats a fused checkpoint's untouched quantized base can be written in (``fuse --base-format``)."""
