"""Streaming safetensors shard writer and a validating tensor-by-tensor checkpoint reader (HF layout).

On-disk layout written by :class:`ShardWriter` (the Hugging Face convention, readable by ``transformers``,
vLLM and ``safetensors``):

* one shard: ``<prefix>.safetensors`` (no index file);
* N > 1 shards: ``<prefix>-00001-of-0000N.safetensors`` ... plus ``<prefix>.safetensors.index.json``::

      {"metadata": {"total_size": <sum of tensor bytes>}, "weight_map": {"<tensor name>": "<shard file>", ...}}

  ``weight_map`` is sorted by tensor name; ``total_size`` counts tensor data bytes only (as ``transformers``
  does), not headers. Every shard carries safetensors metadata ``{"format": "pt"}``.

Tensors are added in order and packed greedily: a shard is written as soon as the next tensor would push it over
``max_shard_bytes`` (a tensor larger than the limit gets a shard of its own). At most ``buffer_bytes`` (256 MiB)
of a shard's tensors are held in memory: past that the buffer is saved as a hidden piece file
(``.<prefix>-part-00001.piece-0001.tmp``) and the pieces are joined into the shard when it is complete
(:func:`concat_safetensors`, which lays tensors out in ``save_file``'s order). So memory stays one buffer, not one
2 GB shard, whatever the shard size. Because N is unknown while streaming, shards are first written under hidden
temporary names (``.<prefix>-part-00001.safetensors.tmp``) and renamed to their final names by
:meth:`ShardWriter.close`. Use it inside :func:`qwha_export.pipeline.atomic_output_dir` so that an interrupted
export never leaves a folder that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = [
    "DEFAULT_BUFFER_BYTES",
    "DEFAULT_MAX_SHARD_BYTES",
    "SAFE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "ShardWriter",
    "checkpoint_files",
    "concat_safetensors",
    "save_safetensors",
    "validate_checkpoint",
    "iter_checkpoint_tensors",
    "validate_safetensors_file",
    "join_key",
    "natural_key",
]

DEFAULT_MAX_SHARD_BYTES = 2 * 10**9  # "2GB" in the Hugging Face (decimal) convention
DEFAULT_BUFFER_BYTES = 256 * 2**20  # tensors of the shard being filled held in memory before a piece file is written
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
READ_HANDLE_BYTES = 256 * 2**20  # tensor bytes read through one safe_open handle before it is reopened
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
REDOWNLOAD_HINT = "re-download it or export it again"
_OS_ERROR = re.compile(r"os error (\d+)")


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` whose I/O failures (disk full, quota, permissions) surface as ``OSError``
    with the errno and the path, instead of safetensors' ``SafetensorError("... (os error 28)")``."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        m = _OS_ERROR.search(str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def join_key(prefix: str, name: str) -> str:
    """``"a.b" + "qweight" -> "a.b.qweight"``; a trailing dot on ``prefix`` is accepted; ``""`` -> ``name``."""
    if not prefix:
        return name
    return f"{prefix}{name}" if prefix.endswith(".") else f"{prefix}.{name}"


class ShardWriter:
    """Write tensors into size-limited safetensors shards, streaming (see the module docstring for the layout).

    ``add(name, tensor)`` buffers a tensor (moved to CPU, made contiguous; cloned only when it is a view into a
    larger or shared storage, which safetensors cannot serialise); ``close()`` flushes, renames the shards to
    their final names, writes the index (when more than one shard) and returns the index dict. Usable as a
    context manager: a clean exit calls :meth:`close`, an exception calls :meth:`abort` (temporary shards are
    deleted). ``out_dir`` is created if missing; final file names in it are overwritten.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        prefix: str = "model",
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ) -> None:
        for label, value in (("max_shard_bytes", max_shard_bytes), ("buffer_bytes", buffer_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive int, got {value!r}")
        if not isinstance(prefix, str) or not prefix or "/" in prefix or os.sep in prefix:
            raise ValueError(f"prefix must be a non-empty file name stem, got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.prefix = prefix
        self.buffer_bytes = buffer_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0  # bytes of the shard being filled (in memory and in its pieces)
        self._held_bytes = 0  # ...of them in memory
        self._pieces: list[Path] = []  # piece files of the shard being filled
        self._buffer_storages: set[int] = set()
        self._temp_files: list[Path] = []
        self._shard_of: dict[str, int] = {}  # tensor name -> shard number (0-based)
        self._total_size = 0
        self._closed = False

    # -- properties ---------------------------------------------------------------------------------------------
    @property
    def total_size(self) -> int:
        """Bytes of tensor data added so far."""
        return self._total_size

    @property
    def num_shards(self) -> int:
        """Shards written so far plus the one being filled (if any)."""
        return len(self._temp_files) + (1 if self._buffer or self._pieces else 0)

    @property
    def buffered_bytes(self) -> int:
        """Bytes of the shard being filled (held in memory or already in its piece files)."""
        return self._buffer_bytes

    @property
    def held_bytes(self) -> int:
        """Bytes of tensors held in memory (at most ``buffer_bytes`` plus the last tensor added)."""
        return self._held_bytes

    # -- writing ------------------------------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Buffer ``tensor`` under ``name``; writes the current shard first if ``tensor`` would overflow it."""
        if self._closed:
            raise ValueError("ShardWriter is closed")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor name must be a non-empty str, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
        if name in self._shard_of:
            raise ValueError(f"duplicate tensor name {name!r}")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous()
        storage = t.untyped_storage()
        if storage.nbytes() != t.nbytes or storage.data_ptr() in self._buffer_storages:
            t = t.clone()
            storage = t.untyped_storage()
        nbytes = t.nbytes
        if self._buffer_bytes and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = t
        if t.nbytes:
            self._buffer_storages.add(storage.data_ptr())
        self._buffer_bytes += nbytes
        self._held_bytes += nbytes
        self._shard_of[name] = len(self._temp_files)
        self._total_size += nbytes
        if self._held_bytes > self.buffer_bytes:
            self._spill()

    def add_many(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.add(k, v)

    def _temp_path(self, i: int) -> Path:
        return self.out_dir / f".{self.prefix}-part-{i + 1:05d}.safetensors.tmp"

    def _spill(self) -> None:
        """Save the tensors held in memory as a piece of the shard being filled."""
        shard, piece = len(self._temp_files) + 1, len(self._pieces) + 1
        path = self.out_dir / f".{self.prefix}-part-{shard:05d}.piece-{piece:04d}.tmp"
        save_safetensors(self._buffer, path, metadata={"format": "pt"})
        self._pieces.append(path)
        self._buffer, self._held_bytes, self._buffer_storages = {}, 0, set()

    def _flush(self) -> None:
        """Write the shard being filled (possibly empty) under its temporary name."""
        path = self._temp_path(len(self._temp_files))
        if self._pieces:
            if self._buffer:
                self._spill()
            concat_safetensors(self._pieces, path, metadata={"format": "pt"})
            for piece in self._pieces:
                piece.unlink()
        else:
            save_safetensors(self._buffer, path, metadata={"format": "pt"})
        self._temp_files.append(path)
        self._pieces = []
        self._buffer, self._buffer_bytes, self._held_bytes, self._buffer_storages = {}, 0, 0, set()

    def close(self) -> dict[str, Any]:
        """Write the last shard, give every shard its final name, write the index; return the index dict.

        With a single shard (or no tensors at all) the file is ``<prefix>.safetensors`` and no index file is
        written; the returned dict has the same form in every case.
        """
        if self._closed:
            raise ValueError("ShardWriter is already closed")
        if self._buffer or self._pieces or not self._temp_files:
            self._flush()
        n = len(self._temp_files)
        if n == 1:
            finals = [f"{self.prefix}.safetensors"]
        else:
            width = max(5, len(str(n)))
            finals = [f"{self.prefix}-{i + 1:0{width}d}-of-{n:0{width}d}.safetensors" for i in range(n)]
        for tmp, final in zip(self._temp_files, finals, strict=True):
            os.replace(tmp, self.out_dir / final)
        # a stale file of the other layout would shadow this one for loaders (the index wins over the single file)
        stale = self.out_dir / (f"{self.prefix}.safetensors.index.json" if n == 1 else f"{self.prefix}.safetensors")
        stale.unlink(missing_ok=True)
        self._temp_files = []
        index = {
            "metadata": {"total_size": self._total_size},
            "weight_map": {k: finals[self._shard_of[k]] for k in sorted(self._shard_of)},
        }
        if n > 1:
            tmp_index = self.out_dir / f".{self.prefix}.safetensors.index.json.tmp"
            tmp_index.write_text(json.dumps(index, indent=2) + "\n")
            os.replace(tmp_index, self.out_dir / f"{self.prefix}.safetensors.index.json")
        self._closed = True
        return index

    def abort(self) -> None:
        """Drop buffered tensors and delete the temporary shards written so far."""
        for p in self._temp_files + self._pieces:
            p.unlink(missing_ok=True)
        self._temp_files, self._pieces = [], []
        self._buffer, self._buffer_bytes, self._held_bytes, self._buffer_storages = {}, 0, 0, set()
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()


# ----------------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------------


def validate_safetensors_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a safetensors file's header and size; return the parsed header. One-line ValueError naming the file.

    Checks: file exists and holds the 8-byte header length; the header is valid UTF-8 JSON object within the
    file; every tensor entry has ``dtype``/``shape``/``data_offsets``; the file is exactly
    ``8 + header_len + max(end offset)`` bytes long (so a truncated download is caught before any read).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: safetensors file is missing; {REDOWNLOAD_HINT}")
    size = p.stat().st_size
    if size < 8:
        raise ValueError(f"{p}: truncated safetensors file ({size} bytes, no header); {REDOWNLOAD_HINT}")
    with open(p, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _HEADER_LIMIT or 8 + n > size:
            raise ValueError(
                f"{p}: corrupted or truncated safetensors header (header length {n}, file size {size}); "
                f"{REDOWNLOAD_HINT}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise TypeError("header is not a JSON object")
        end = 0
        for key, info in header.items():
            if key == "__metadata__":
                continue
            start, stop = info["data_offsets"]
            _ = info["dtype"], info["shape"]
            if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop):
                raise TypeError(f"bad data_offsets for {key!r}")
            end = max(end, stop)
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{p}: corrupted safetensors header ({msg}); {REDOWNLOAD_HINT}") from None
    expected = 8 + n + end
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise ValueError(f"{p}: safetensors file {what} (expected {expected} bytes, found {size}); {REDOWNLOAD_HINT}")
    return header


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise TypeError("weight_map must map tensor names to file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{index_path}: invalid safetensors index ({type(e).__name__}: {msg})") from None
    return weight_map


def checkpoint_files(model_dir: str | os.PathLike[str]) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of a HF checkpoint folder and its ``weight_map`` (None when not sharded).

    Uses ``model.safetensors.index.json`` when present (ValueError naming every referenced shard that is
    missing), else ``model.safetensors``, else the folder's only ``*.safetensors`` file.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise ValueError(f"{d}: checkpoint folder does not exist")
    index_path = d / SAFE_WEIGHTS_INDEX_NAME
    if index_path.is_file():
        weight_map = _read_index(index_path)
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (d / n).is_file()]
        if missing:
            raise ValueError(
                f"{index_path}: shard file(s) referenced by the index are missing: {', '.join(missing)}; "
                "re-download the model (every shard) or export it again"
            )
        return [d / n for n in names], weight_map
    single = d / SAFE_WEIGHTS_NAME
    if single.is_file():
        return [single], None
    found = sorted(p for p in d.glob("*.safetensors") if p.is_file())
    if len(found) == 1:
        return found, None
    if not found:
        raise ValueError(f"{d}: no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} found")
    raise ValueError(f"{d}: {len(found)} safetensors files but no {SAFE_WEIGHTS_INDEX_NAME}")


def validate_checkpoint(model_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Check every safetensors file of a checkpoint folder (index, shards present, headers, sizes) without reading
    tensor data; return ``{tensor name: header entry}`` (``dtype``, ``shape``, ``data_offsets``). One-line
    ``ValueError`` naming the bad file."""
    files, _ = checkpoint_files(model_dir)
    entries: dict[str, dict[str, Any]] = {}
    for p in files:
        entries.update((k, v) for k, v in validate_safetensors_file(p).items() if k != "__metadata__")
    return entries


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}  # fmt: skip


def concat_safetensors(
    parts: list[str | os.PathLike[str]], out: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> int:
    """Write the tensors of the safetensors files ``parts`` into the one file ``out``, copying bytes in 16 MiB chunks
    (memory: one chunk, whatever the sizes): what a writer that produces a single file piece by piece (``init``'s
    quantized base and adapter, one decoder block at a time) needs. Tensors are laid out as ``save_file`` does
    (widest dtype first, then by name, header padded to 8 bytes, so every tensor stays aligned); a name in two
    parts is a ``ValueError``. Returns the number of tensors."""
    entries: dict[str, tuple[Path, dict[str, Any], int]] = {}  # name -> (part, header entry, part's data start)
    for part in parts:
        header = validate_safetensors_file(part)
        with open(part, "rb") as f:
            data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in entries:
                raise ValueError(f"tensor {name!r} is in two parts ({entries[name][0]} and {part})")
            entries[name] = (Path(part), info, data_start)
    order = sorted(entries, key=lambda n: (-_DTYPE_BYTES.get(entries[n][1]["dtype"], 1), n))
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name in order:
        info = entries[name][1]
        size = info["data_offsets"][1] - info["data_offsets"][0]
        header[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            part, info, data_start = entries[name]
            start, stop = info["data_offsets"]
            with open(part, "rb") as src:
                src.seek(data_start + start)
                left = stop - start
                while left:
                    chunk = src.read(min(left, 1 << 24))
                    if not chunk:
                        raise ValueError(f"{part}: truncated while copying {name!r}; {REDOWNLOAD_HINT}")
                    f.write(chunk)
                    left -= len(chunk)
    return len(order)


def natural_key(name: str) -> tuple[tuple[int, str], ...]:
    """Sort key of a tensor or layer name with its numbers compared as numbers: ``model.layers.2.x`` before
    ``model.layers.10.x`` (plain string order puts block 10 between 1 and 2), i.e. decoder blocks in order."""
    return tuple((int(t), "") if t.isdigit() else (-1, t) for t in re.split(r"(\d+)", name))


def _open_checked(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError and friends
        reason = str(e).splitlines()[0]
        raise ValueError(f"{path}: cannot open safetensors file ({reason}); {REDOWNLOAD_HINT}") from None


def iter_checkpoint_tensors(
    model_dir: str | os.PathLike[str], natural_order: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of a (sharded or single-file) HF safetensors checkpoint.

    Reads one tensor at a time with ``safe_open`` (memory: one tensor): files in sorted order, names in each file's
    sorted order; or, with ``natural_order``, all names across files in :func:`natural_key` order (decoder blocks in
    order, a handle per run of names in one file), which is what a block-by-block consumer needs. Every file's
    header and size are validated before the first tensor is read (before its first tensor without
    ``natural_order``), and every tensor the index assigns to a file must be in it; all failures are one-line
    ValueErrors naming the file. A handle is reopened after every :data:`READ_HANDLE_BYTES` read: ``safe_open``
    maps the whole file and every page read through it stays resident while the handle lives, so one handle over a
    2 GB shard held 2 GB of it by the end (at Llama-3-8B shapes, merge's and fuse's peak grew by that much).
    """
    files, weight_map = checkpoint_files(model_dir)
    expected: dict[str, set[str]] = {}
    if weight_map is not None:
        for k, v in weight_map.items():
            expected.setdefault(v, set()).add(k)

    def checked_names(path: Path) -> list[str]:
        names = sorted(k for k in validate_safetensors_file(path) if k != "__metadata__")
        absent = sorted(expected.get(path.name, set()).difference(names))
        if absent:
            more = f" (+{len(absent) - 3} more)" if len(absent) > 3 else ""
            raise ValueError(f"{path}: tensors listed in the index are missing: {', '.join(absent[:3])}{more}")
        return names

    if natural_order:
        order = sorted(((n, p) for p in files for n in checked_names(p)), key=lambda np_: natural_key(np_[0]))
        runs: list[tuple[Path, list[str]]] = []
        for name, path in order:
            if runs and runs[-1][0] == path:
                runs[-1][1].append(name)
            else:
                runs.append((path, [name]))
    else:
        runs = ((path, checked_names(path)) for path in files)
    for path, names in runs:
        done = 0
        while done < len(names):  # a handle per READ_HANDLE_BYTES read: see the docstring
            with _open_checked(path) as f:
                read = 0
                while done < len(names) and read < READ_HANDLE_BYTES:
                    name = names[done]
                    try:
                        tensor = f.get_tensor(name)
                    except Exception as e:
                        raise ValueError(
                            f"{path}: cannot read tensor {name!r} ({str(e).splitlines()[0]}); {REDOWNLOAD_HINT}"
                        ) from None
                    done += 1
                    read += tensor.nbytes
                    yield name, tensor
                    del tensor


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
