"""``qwha_export.json``: the manifest of every export folder, its one schema, writer and reader.

Every folder that ``merge``, ``fuse``, ``merge --requant refit``, ``export-onnx`` and ``merge --format onnx`` write
carries this file; ``verify``, the model card and ``push`` read it through :func:`read_manifest`. Schema version
:data:`SCHEMA_VERSION` (a JSON object)::

    schema_version      1
    tool, tool_version  "qwha-export", the version that wrote it
    settings            how the folder was made; settings.format is one of dense, gptq, gptq_v2,
                        compressed-tensors, fused, onnx (plus bits, group_size, requant, dtype, base_format,
                        variant, accuracy_level, ... as the format has them)
    source              adapter_dir, base_model (local paths), base_hash ({file: SHA-256} of the base model's
                        config.json and weights, as ``init`` recorded it), adapter_sha256 ({file: SHA-256});
                        for ONNX exports: path and format of the exported folder and its manifest (nested)
    quantization_config the config.json block (null for dense and ONNX)
    files               what the folder holds: shards (list), aux (list), total_size (tensor bytes);
                        ONNX: model, data, aux
    parity              the export's logits against its reference (see :class:`Parity`), or null
    seconds             wall time of the export
    <sections>          format-specific reports kept as written: layers, total, adapter_gain (merge),
                        fused (fuse), graph and merge (ONNX), refit (refit)

Manifests written before the schema had a version (qwha-export 0.1.0 before this module) are migrated on read:
their layout is the same; a ``source.base_hash`` that is a single string becomes ``{"base": digest}``. A manifest
of a newer schema, one that is not a JSON object, or one without ``settings.format`` is refused in one line that
says what to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .jsonfile import read_json_object

__all__ = [
    "MANIFEST_FILE",
    "SCHEMA_VERSION",
    "FORMATS",
    "Manifest",
    "Parity",
    "Source",
    "finish_manifest",
    "read_manifest",
    "write_manifest",
]

MANIFEST_FILE = "qwha_export.json"
SCHEMA_VERSION = 1
FORMATS = ("dense", "gptq", "gptq_v2", "compressed-tensors", "fused", "onnx")
_CORE = ("schema_version", "tool", "tool_version", "settings", "source", "quantization_config", "files", "parity",
         "seconds")


def _digests(value: Any, where: str) -> dict[str, str] | None:
    if value is None or value == {}:
        return None
    if isinstance(value, str):  # pre-schema manifests of hand-made adapter folders
        return {"base": value}
    if isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    raise ValueError(f"{where}: source.base_hash must map file names to SHA-256 digests; re-run the export")


@dataclass(frozen=True)
class Parity:
    """Logits of the export against a reference on the same tokens (:func:`qwha_export.verify.verify_export`).

    ``reference``: what it was compared with (``training-time`` model of the adapter directory, or ``pytorch``:
    the PyTorch model an ONNX graph was built from). ``skipped``: why no check ran (then the numbers are None).
    ``extra`` keeps any further numbers (``seconds``, ``max_abs_logit``, ...)."""

    tokens: int | None = None
    top1_agreement: float | None = None
    kl_per_token: float | None = None
    max_abs_logit_diff: float | None = None
    mean_abs_logit_diff: float | None = None
    ppl_export: float | None = None
    ppl_reference: float | None = None
    format: str | None = None
    text: str | None = None
    reference: str | None = None
    skipped: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST_FILE) -> Parity | None:
        if data is None:
            return None
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: parity must be a JSON object; re-run the export")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = {k: v for k, v in out.items() if v is not None}
        return {**out, **self.extra}

    @property
    def measured(self) -> bool:
        return self.skipped is None and self.top1_agreement is not None


@dataclass(frozen=True)
class Source:
    """Where the export came from: the adapter directory and base model (merge, fuse), or the exported folder
    (ONNX: ``path``, ``format`` and its ``manifest``)."""

    adapter_dir: str | None = None
    base_model: str | None = None
    base_hash: dict[str, str] | None = None
    adapter_sha256: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    format: str | None = None
    manifest: Manifest | None = None

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST_FILE) -> Source:
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: source must be a JSON object; re-run the export")
        nested = data.get("manifest")
        sha = data.get("adapter_sha256") or {}
        return cls(
            adapter_dir=_str_or_none(data.get("adapter_dir")),
            base_model=_str_or_none(data.get("base_model")),
            base_hash=_digests(data.get("base_hash"), where),
            adapter_sha256=dict(sha) if isinstance(sha, Mapping) else {},
            path=_str_or_none(data.get("path")),
            format=_str_or_none(data.get("format")),
            manifest=Manifest.from_json(nested, f"{where} (source.manifest)") if nested is not None else None,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.path is not None:
            out.update(path=self.path, format=self.format, manifest=self.manifest.to_json() if self.manifest else None)
        if self.adapter_dir is not None or self.base_model is not None or self.path is None:
            out.update(
                adapter_dir=self.adapter_dir,
                base_model=self.base_model,
                base_hash=self.base_hash,
                adapter_sha256=self.adapter_sha256,
            )
        return out

    def origin(self) -> Source:
        """The first source in the chain that names an adapter directory (an ONNX export's merged folder's)."""
        if self.adapter_dir is None and self.manifest is not None:
            return self.manifest.source.origin()
        return self


def _package_version() -> str | None:
    """The installed qwha-export version (what writes a new manifest)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("qwha-export")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
        return None


def _str_or_none(v: Any) -> str | None:
    return v if isinstance(v, str) else None


@dataclass(frozen=True)
class Manifest:
    """One ``qwha_export.json`` (see the module docstring). ``sections`` holds the format-specific reports."""

    settings: dict[str, Any]
    source: Source = field(default_factory=Source)
    tool_version: str | None = field(default_factory=_package_version)
    quantization_config: dict[str, Any] | None = None
    files: dict[str, Any] = field(default_factory=dict)
    parity: Parity | None = None
    seconds: float | None = None
    sections: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    tool: str = "qwha-export"

    def __post_init__(self) -> None:
        fmt = self.settings.get("format") if isinstance(self.settings, Mapping) else None
        if fmt not in FORMATS:
            raise ValueError(f"manifest settings.format {fmt!r} is not one of {', '.join(FORMATS)}")

    @property
    def format(self) -> str:
        return str(self.settings["format"])

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)

    def with_sections(self, **sections: Any) -> Manifest:
        return dataclasses.replace(self, sections={**self.sections, **sections})

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST_FILE) -> Manifest:
        """Validate (and migrate, for pre-schema manifests) a parsed ``qwha_export.json``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: manifest is not a JSON object; re-run the export")
        version = data.get("schema_version", 0)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"{where}: schema_version {version!r} is not a version number; re-run the export")
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"{where}: manifest schema {version} was written by a newer qwha-export (this one reads up to "
                f"{SCHEMA_VERSION}); upgrade qwha-export"
            )
        settings = data.get("settings")
        fmt = settings.get("format") if isinstance(settings, Mapping) else None
        if not isinstance(fmt, str):
            raise ValueError(f"{where}: no settings.format; not a qwha-export manifest, re-run the export")
        if fmt not in FORMATS:
            raise ValueError(f"{where}: unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
        qc = data.get("quantization_config")
        files = data.get("files")
        seconds = data.get("seconds")
        return cls(
            settings=dict(settings),
            source=Source.from_json(data.get("source"), where),
            tool_version=_str_or_none(data.get("tool_version")),
            quantization_config=dict(qc) if isinstance(qc, Mapping) else None,
            files=dict(files) if isinstance(files, Mapping) else {},
            parity=Parity.from_json(data.get("parity"), where),
            seconds=float(seconds) if isinstance(seconds, int | float) and not isinstance(seconds, bool) else None,
            sections={k: v for k, v in data.items() if k not in _CORE},
            schema_version=SCHEMA_VERSION,
            tool=str(data.get("tool") or "qwha-export"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "tool": self.tool,
            "tool_version": self.tool_version,
            "settings": self.settings,
            "source": self.source.to_json(),
            "quantization_config": self.quantization_config,
            "files": self.files,
            "parity": self.parity.to_json() if self.parity is not None else None,
            "seconds": self.seconds,
            **self.sections,
        }


def write_manifest(folder: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write ``folder/qwha_export.json`` atomically (temporary file + rename); returns its path."""
    path = Path(folder) / MANIFEST_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST_FILE}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest.to_json(), indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def finish_manifest(
    folder: str | os.PathLike[str],
    manifest: Manifest,
    on_written: Callable[[Path], Mapping[str, Any]] | None = None,
) -> Manifest:
    """Write ``manifest`` into the finished (temporary) ``folder``; then, when given, run ``on_written(folder)``
    (the parity check, which reads the folder as a user would) and write the manifest again with the entries it
    returns (``{"parity": {...}}``). Returns the final manifest."""
    write_manifest(folder, manifest)
    if on_written is None:
        return manifest
    extra = dict(on_written(Path(folder)))
    final = Manifest.from_json({**manifest.to_json(), **extra}, str(Path(folder) / MANIFEST_FILE))
    write_manifest(folder, final)
    return final


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """The manifest of an export folder; one-line ``ValueError`` when it is missing, unreadable or invalid."""
    path = Path(folder) / MANIFEST_FILE
    data = read_json_object(
        path, missing=f"{Path(folder)}: no {MANIFEST_FILE}; not a qwha-export export folder", what="manifest",
        hint="re-run the export that writes it",
    )
    return Manifest.from_json(data, str(path))
