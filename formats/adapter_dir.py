"""The adapter directory that ``init`` writes (and ``train``, ``import-published``, ``refit`` write again): its file
names, the base model's fingerprint it records, and the atomic output folder every command writes into.

Layout::

    adapter_config.json         peft config of the QWHA adapter (ADAPTER_CONFIG)
    adapter_model.safetensors   the spectra, peft's key names (ADAPTER_WEIGHTS)
    quantized_base.safetensors  per quantized linear <name>.codes|scales|zeros|bits|group_size[|g_idx] (BASE_FILE)
    qwha_base.json              base model path, base_hash {file: SHA-256}, quantization settings, quantized
                                layers (BASE_META)
    init_report.json            per layer: shape, budget, relative output error before/after the init on
                                calibration and held-out activations; totals (REPORT_FILE)

:func:`base_fingerprint` is the SHA-256 of the base's ``config.json`` and every ``*.safetensors`` file;
:func:`check_base_hash` refuses a base that no longer matches it. :class:`atomic_output_dir` writes a folder into a
temporary sibling and renames it into place only when complete (so an interrupted command leaves nothing that looks
finished); :func:`check_output_dir` refuses an existing one, in the command line's words, before any work.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .shards import sha256_file

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "BASE_FILE",
    "BASE_META",
    "REPORT_FILE",
    "atomic_output_dir",
    "base_fingerprint",
    "check_base_hash",
    "check_output_dir",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT_FILE = "init_report.json"
BASE_FILE = "quantized_base.safetensors"
BASE_META = "qwha_base.json"


def base_fingerprint(model_dir: str | Path) -> dict[str, str]:
    """SHA-256 of the base model's ``config.json`` and each ``*.safetensors`` file (sorted by name)."""
    p = Path(model_dir)
    files = [p / "config.json", *sorted(p.glob("*.safetensors"))]
    return {f.name: sha256_file(f) for f in files if f.is_file()}


def check_base_hash(base_dir: str | Path, recorded: Any) -> None:
    """One-line ``ValueError`` naming the changed files when ``base_dir`` no longer matches the fingerprint
    recorded by ``init`` (``qwha_base.json`` ``base_hash``); nothing to check when none was recorded."""
    if not recorded:
        return
    if not isinstance(recorded, dict):
        raise ValueError(
            f"{BASE_META}: base_hash must map file names to SHA-256 digests, not {type(recorded).__name__}"
        )
    now = base_fingerprint(base_dir)
    if now == recorded:
        return
    changed = sorted(n for n in set(now) | set(recorded) if now.get(n) != recorded.get(n))
    more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
    raise ValueError(
        f"base model {base_dir} differs from the one this adapter was made for (hash mismatch: "
        f"{', '.join(changed[:3])}{more} changed); point base_model in {BASE_META} at the original files or run "
        "init again"
    )


def check_output_dir(path: str | Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless ``overwrite`` (call before any long work)."""
    if Path(path).exists() and not overwrite:
        raise ValueError(f"output folder {path} already exists; pass --overwrite or choose another --out")


class atomic_output_dir:  # noqa: N801 - used as a context manager
    """Write into a temporary sibling folder; rename onto ``path`` only when the block completes without error.

    Refuses an existing ``path`` unless ``overwrite``. On error the temporary folder is removed, so no partial
    output is ever left looking complete.
    """

    def __init__(self, path: str | Path, overwrite: bool = False):
        self.path = Path(path)
        self.overwrite = overwrite
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        check_output_dir(self.path, self.overwrite)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        self.tmp.chmod(0o755)  # mkdtemp makes 0700; outputs are meant to be shared
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for f in self.tmp.rglob("*"):  # temp files (mkstemp) are 0600: give them ordinary permissions
            if f.is_file() and not f.stat().st_mode & 0o044:
                f.chmod(0o644)
        if self.path.exists():
            old = self.path.with_name(f".{self.path.name}.old-{int(time.time())}")
            self.path.rename(old)
            self.tmp.rename(self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.path)
