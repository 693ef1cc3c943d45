"""Options shared by several ``qwha-export`` commands (one definition each, one vocabulary)."""

from __future__ import annotations

import re

import click

__all__ = ["ACCURACY_LEVEL", "MAX_SHARD_SIZE", "OVERWRITE", "QUIET", "VERIFY_TOKENS", "ByteSize"]

OVERWRITE = click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
QUIET = click.option("--quiet", is_flag=True, help="No progress bars.")
VERIFY_TOKENS = click.option(
    "--verify-tokens",
    default=512,
    show_default=True,
    type=int,
    help="Held-out tokens of the parity check against the training-time model, stored in qwha_export.json (0: skip).",
)
class ByteSize(click.ParamType):
    """A size in bytes: ``5GB``, ``500MB``, ``60KB`` (powers of 1000, as save_pretrained's max_shard_size), ``2GiB``
    (powers of 1024) or a plain number of bytes."""

    name = "size"
    _UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in self._UNITS or float(m.group(1)) * self._UNITS[unit] < 1:
            self.fail(f"{value!r} is not a size such as 5GB, 500MB or 60KB", param, ctx)
        return int(float(m.group(1)) * self._UNITS[unit])


MAX_SHARD_SIZE = click.option(
    "--max-shard-size",
    "max_shard_bytes",
    default="2GB",
    show_default=True,
    type=ByteSize(),
    help="Largest safetensors shard (5GB, 500MB, 60KB, ...); bigger checkpoints are split with an index.",
)
ACCURACY_LEVEL = click.option(
    "--accuracy-level",
    default=0,
    show_default=True,
    type=int,
    help="MatMulNBits accuracy_level (onnx): 0 float32 activations; 4 int8 activations (faster, may flip the argmax).",
)
