"""The block-by-block streaming engine: run a causal LM on a set of sequences holding one decoder block at a time.

How it works (llm-compressor's sequential onloading, GPTQModel's layer loop):

1. The model skeleton is built from ``config.json`` with every *parameter* on the meta device (buffers, e.g. the
   RoPE ``inv_freq`` and Gemma's embedding scale, are real); nothing of the weights is read.
2. Only the input embedding is loaded; the model is run up to its decoder blocks with the calibration recorder of
   :mod:`.calibration` (``_capture_block_inputs``), which captures block 0's hidden states and the other inputs
   **each** block receives (mask and RoPE per layer type: sliding/global layers of Gemma 2/3, Qwen2). The
   embedding is freed again.
3. For each block in order: its tensors are read from the safetensors shards (only that block's keys) and the
   block is materialised by the :class:`BlockSource` (plain tensors; a caller's source swaps in quantized layers
   and adapters), the hidden states of all sequences are run through it batch by batch (optionally with
   :func:`~.calibration.gram_hooks` collecting the block's float64 Grams, handed to ``on_block``), and the block
   is dropped before the next one loads, and glibc is asked to give the freed heap back
   (:func:`release_freed_memory`; its mmap threshold is fixed once, :func:`fix_mmap_threshold`, so the peak
   within a block does not creep up with fragmentation).
4. :meth:`BlockStream.logits` loads the final norm and the head and yields the logits one batch at a time (the
   final soft-capping of Gemma from the architecture registry), never all tokens' logits at once.

The hidden states of the sequence set live in an :class:`ActivationStore`: one tensor in memory when small, else a
file in a ``TemporaryDirectory`` mapped with numpy (the file is allocated up front, so a full disk is an
``OSError`` at allocation rather than a crash mid-write). Peak memory: one block's weights, two copies of the
hidden states (or none when spilled, plus one batch), one block's Grams, and the head while logits are produced.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..formats.shards import checkpoint_files, validate_safetensors_file
from .architectures import decoder_layers, describe
from .calibration import BlockGrams, _capture_block_inputs, gram_hooks, run_block

__all__ = [
    "DEFAULT_SPILL_BYTES",
    "SPILL_BYTES_ENV",
    "ActivationStore",
    "BlockSource",
    "BlockStream",
    "BorrowingSource",
    "CheckpointSource",
    "TensorIndex",
    "load_module",
    "StreamedGrams",
    "model_skeleton",
    "fix_mmap_threshold",
    "in_step",
    "release_freed_memory",
    "spill_bytes_from_env",
]

DEFAULT_SPILL_BYTES = 1 << 30  # hidden states above this many bytes go to a temporary file (QWHA_SPILL_BYTES)
SPILL_BYTES_ENV = "QWHA_SPILL_BYTES"
LOGITS_BYTES = 256 * 2**20  # float32 logits per batch of BlockStream.logits at most (one sequence at least)


def logit_rows(batch_size: int, seq: int, vocab: int, max_bytes: int = LOGITS_BYTES) -> int:
    """Sequences per batch of logits: at most ``batch_size`` and ``max_bytes`` of float32 logits, at least one."""
    return max(1, min(batch_size, max_bytes // max(1, 4 * seq * vocab)))


_HEAD_ROWS_BYTES = 64 * 2**20  # vocabulary rows of a narrow head cast to the stream's dtype at a time


def spill_bytes_from_env() -> int:
    """``QWHA_SPILL_BYTES`` (bytes of hidden states kept in memory before they go to a file in ``TMPDIR``), else
    :data:`DEFAULT_SPILL_BYTES`; a one-line ``ValueError`` naming the variable for a value that is no integer >= 0."""
    raw = os.environ.get(SPILL_BYTES_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_SPILL_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{SPILL_BYTES_ENV}={raw!r} must be a number of bytes >= 0 (0 spills every activation)")
    return value


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
        return lib if lib is not None and hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else None
    except OSError:  # not glibc (musl, macOS): nothing to tune
        return None


_LIBC = _libc()
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20  # allocations from this size up are mapped, and unmapped when freed


def release_freed_memory() -> None:
    """Return the heap glibc keeps after large frees to the OS (``malloc_trim(0)``; a no-op without glibc). Freed
    heap is not returned by itself: without this a streamed verify grew ~25-50 MB a 67 MB block."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def fix_mmap_threshold() -> None:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD_BYTES` for this process (``mallopt``; a no-op without
    glibc); called when a :class:`BlockStream` is made.

    Why: glibc raises the threshold to the size of each large block it frees (up to 32 MiB), so the tensors of the
    next blocks come from the heap, which fragments: the peak *within* a block then grew block after block although
    the memory held between blocks was flat (streamed ``init``, 67 MB blocks: peak 1521 -> 1705 MiB over 8 blocks).
    At 8 MiB the ~1 MiB activation batches and held-out rows still fragmented it: 2 -> 8 blocks 1030 -> 1167 MiB,
    the peak within each block rising ~25 MiB a block; at 1 MiB, 1011 -> 1014 (same time within noise). Setting it
    also turns glibc's adjustment off."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


class TensorIndex:
    """Which safetensors file of a checkpoint folder holds each tensor (headers only); reads one prefix at a time.

    Every read opens the file for that call only: ``safe_open`` maps the whole file and keeps the pages read
    through it resident while the handle lives, so one long-lived handle would grow to the whole checkpoint."""

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        self.model_dir = Path(model_dir)
        files, _ = checkpoint_files(self.model_dir)
        self.file_of: dict[str, Path] = {}
        for path in files:
            for key in validate_safetensors_file(path):
                if key != "__metadata__":
                    self.file_of[key] = path

    def keys(self, prefix: str) -> list[str]:
        return sorted(k for k in self.file_of if k.startswith(prefix))

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        for path in sorted({self.file_of[k] for k in keys}):
            with safe_open(str(path), framework="pt") as f:
                out.update((k, f.get_tensor(k)) for k in keys if self.file_of[k] == path)
        return out

    def read_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """``{name without prefix: tensor}`` of every tensor whose name starts with ``prefix``."""
        return {k[len(prefix) :]: v for k, v in self.read(self.keys(prefix)).items()}


def load_module(module: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, where: str) -> None:
    """Materialise ``module`` (parameters on the meta device) from ``state`` (names relative to it): floating
    tensors cast to ``dtype`` and assigned. One-line ``ValueError`` naming ``where`` for a tensor that does not
    belong to the module or a parameter the state lacks."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    result = module.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        k = sorted(result.unexpected_keys)
        raise ValueError(f"{where}: tensor {where}{k[0]} does not belong to the model")
    missing = [n for n, p in module.named_parameters() if p.is_meta]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{where}: checkpoint lacks {where}{missing[0]}{more}")


class BlockSource(Protocol):
    """Where a stream's weights come from: ``load(module, prefix)`` materialises ``module`` (the skeleton's
    submodule whose qualified name is ``prefix`` without its dot) in place; ``has(key)`` says whether a tensor
    exists (a tied head has no ``lm_head.weight``)."""

    def load(self, module: nn.Module, prefix: str) -> None: ...

    def has(self, key: str) -> bool: ...


class CheckpointSource:
    """A plain (dense) safetensors checkpoint folder as a :class:`BlockSource`."""

    def __init__(self, model_dir: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> None:
        self.index = TensorIndex(model_dir)
        self.dtype = dtype

    def has(self, key: str) -> bool:
        return key in self.index.file_of

    def load(self, module: nn.Module, prefix: str) -> None:
        load_module(module, self.index.read_prefix(prefix), self.dtype, prefix)


class BorrowingSource:
    """A :class:`BlockSource` that takes a module's tensors from the same module of another stream's model when that
    one is loaded (no copy: the same tensors), else from ``fallback``. Two walks of one model in step (``init``'s
    calibration and held-out sets, zipped) then hold each block's weights once."""

    def __init__(self, lender: BlockStream, fallback: BlockSource) -> None:
        self.lender, self.fallback = lender, fallback

    def has(self, key: str) -> bool:
        return self.fallback.has(key)

    def load(self, module: nn.Module, prefix: str) -> None:
        try:
            other = self.lender.model.get_submodule(prefix[:-1])
        except AttributeError:
            other = None
        params = list(other.parameters()) if other is not None else []
        if params and not any(p.is_meta for p in params) and type(other) is type(module):
            module.load_state_dict(other.state_dict(keep_vars=True), strict=True, assign=True)
        else:
            self.fallback.load(module, prefix)


def model_skeleton(config_dir: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of ``config_dir/config.json`` (any ``quantization_config`` removed) with its parameters on the
    meta device and its buffers real, in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


class ActivationStore:
    """Hidden states ``(n, seq, hidden)`` of a sequence set, read and written in row ranges: a tensor in memory, or
    (above ``spill_bytes``) a file in ``spill_dir`` mapped with numpy. bfloat16 is stored as float32 (exact)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, spill_bytes: int, spill_dir: Path) -> None:
        self.shape, self.dtype = tuple(shape), dtype
        np_dtype = _NUMPY_DTYPES.get(dtype, np.float32)
        nbytes = math.prod(shape) * np.dtype(np_dtype).itemsize
        self.spilled = nbytes > spill_bytes
        self.path: Path | None = None
        if self.spilled:
            fd, name = tempfile.mkstemp(prefix="hidden-", suffix=".f32", dir=spill_dir)
            self.path = Path(name)
            try:
                os.posix_fallocate(fd, 0, max(nbytes, 1))  # a full disk fails here, not as SIGBUS mid-write
            except OSError as e:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                why = f"cannot write the activation spill file ({e.strerror}; it goes to TMPDIR, {spill_dir})"
                raise OSError(e.errno, why, name) from None
            os.close(fd)
            self._data: Any = np.memmap(self.path, dtype=np_dtype, mode="r+", shape=self.shape)
        else:
            self._data = torch.empty(self.shape, dtype=dtype)

    def write(self, start: int, values: torch.Tensor) -> None:
        stop = start + values.shape[0]
        if self.spilled:
            self._data[start:stop] = values.detach().to(torch.float32 if self.dtype == torch.bfloat16 else self.dtype)
        else:
            self._data[start:stop] = values.detach()

    def read(self, start: int, stop: int) -> torch.Tensor:
        if self.spilled:
            return torch.from_numpy(np.array(self._data[start:stop])).to(self.dtype)
        return self._data[start:stop]

    def close(self) -> None:
        self._data = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


class BlockStream:
    """One model run block by block (see the module docstring). ``config_dir`` holds ``config.json``; ``source``
    materialises the embedding, each block, the final norm and the head. Use as a context manager (the spill
    directory is removed on exit)."""

    def __init__(
        self,
        config_dir: str | os.PathLike[str],
        source: BlockSource,
        dtype: torch.dtype = torch.float32,
        spill_bytes: int | None = None,
        spill_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if spill_bytes is None:
            spill_bytes = spill_bytes_from_env()
        if isinstance(spill_bytes, bool) or not isinstance(spill_bytes, int) or spill_bytes < 0:
            raise ValueError(f"spill_bytes must be an integer >= 0, got {spill_bytes!r}")
        fix_mmap_threshold()
        self.model = model_skeleton(config_dir, dtype)
        self.source, self.dtype, self.spill_bytes = source, dtype, spill_bytes
        self.layout = describe(self.model.config)
        self._names = {id(m): n for n, m in self.model.named_modules()}
        self._tmp = tempfile.TemporaryDirectory(prefix="qwha-stream-", dir=spill_dir)

    def __enter__(self) -> BlockStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._tmp.cleanup()

    @property
    def n_blocks(self) -> int:
        return len(decoder_layers(self.model))

    def _prefix(self, module: nn.Module) -> str:
        return f"{self._names[id(module)]}."

    def _load(self, module: nn.Module) -> None:
        self.source.load(module, self._prefix(module))

    def store(self, n: int, seq: int) -> ActivationStore:
        """An empty :class:`ActivationStore` for ``n`` sequences of ``seq`` tokens."""
        return ActivationStore((n, seq, self.layout.hidden_size), self.dtype, self.spill_bytes, Path(self._tmp.name))

    def capture(self, input_ids: torch.Tensor, batch_size: int = 4) -> tuple[ActivationStore, list]:
        """Block 0's hidden states (a store) and every block's other inputs for ``input_ids``, with the embedding
        loaded for that time only: what :meth:`blocks` starts from. Separate so that a caller walking two streams
        in step (``init``) captures both before either holds a block: the embedding (2 GB at Llama-3's vocabulary
        in float32) is then never loaded beside a block and its Grams."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (n_sequences, seq_len), got shape {tuple(input_ids.shape)}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        embed = self.model.get_input_embeddings()
        self._load(embed)
        try:
            hidden, extras = _capture_block_inputs(self.model, decoder_layers(self.model), input_ids, batch_size)
        finally:
            embed.to("meta")  # frees it; the head loads its own copy when tied
        store = self.store(*input_ids.shape)
        for start, h in zip(range(0, input_ids.shape[0], batch_size), hidden, strict=True):
            store.write(start, h)
        release_freed_memory()
        return store, extras

    def blocks(
        self,
        input_ids: torch.Tensor,
        batch_size: int = 4,
        targets: tuple[str, ...] | None = None,
        keep_block: bool = True,
        rows_when_smaller: bool = False,
        captured: tuple[ActivationStore, list] | None = None,
    ) -> Iterator[tuple[int, nn.Module | None, BlockGrams | None, ActivationStore]]:
        """Run every block on ``input_ids`` (``(n, seq)``) in batches of ``batch_size``, one block at a time, and
        yield ``(index, block, grams, outputs)`` while the block is still loaded: ``grams`` its float64 Grams when
        ``targets`` (last name parts of linears) are given, else None; ``outputs`` the store of its outputs (the
        last one is the caller's to close; the earlier ones are closed here when the next block has run).
        ``keep_block=False`` drops the block's weights before the yield (``block`` is None): for a caller that
        needs only the Grams or the outputs, so they are not held beside its own work. ``rows_when_smaller``: a
        linear whose input rows take less memory than its Gram gets an :class:`~.calibration.InputRows` instead
        (for Grams that are only read as quadratic forms, e.g. the held-out error report). ``captured``: the
        blocks' inputs from :meth:`capture` on the same ``input_ids`` and ``batch_size`` (else captured here)."""
        model = self.model
        current, extras = captured if captured is not None else self.capture(input_ids, batch_size)
        layers = decoder_layers(model)
        starts = list(range(0, input_ids.shape[0], batch_size))
        container = model.get_submodule(self._prefix(layers[0])[:-1].rpartition(".")[0])
        handed_out = False  # the last store, once yielded, belongs to the caller if the walk is stopped there
        try:
            for index, block in enumerate(layers):
                self._load(block)
                out = self.store(*input_ids.shape)
                try:
                    rows = input_ids.numel() if rows_when_smaller else None
                    with gram_hooks(model, block, targets or (), index, rows_of_tokens=rows) as grams:
                        for start, kw in zip(starts, extras[index], strict=True):
                            h = current.read(start, min(start + batch_size, input_ids.shape[0]))
                            out.write(start, run_block(block, [h], [kw])[0])
                except BaseException:
                    out.close()
                    raise
                current.close()
                current = out
                handed_out = index == len(layers) - 1
                if not keep_block:
                    self._drop(container, layers, index)
                    block = None
                    release_freed_memory()
                yield index, block, (grams if targets else None), out
                del grams
                if keep_block:
                    self._drop(container, layers, index)
                    block = None
                    release_freed_memory()
        finally:  # an error, or the caller stopping the walk early (GeneratorExit at the yield)
            if not handed_out:
                current.close()

    @staticmethod
    def _drop(container: nn.Module, layers: list, index: int) -> None:
        """Drop block ``index``'s weights (the skeleton keeps a placeholder) and this walk's list reference to it,
        or every loaded block stays alive to the end (the caller drops its own)."""
        container[index] = nn.Module()
        layers[index] = None

    def run(
        self,
        input_ids: torch.Tensor,
        batch_size: int = 4,
        targets: tuple[str, ...] | None = None,
        on_block: Callable[[int, nn.Module, BlockGrams | None], Any] | None = None,
    ) -> ActivationStore:
        """:meth:`blocks` to the end; returns the store of the last block's outputs (closed by the caller or on
        exit). ``on_block(index, block, grams)`` is called for each block while it is still loaded."""
        outputs = None
        for index, block, grams, outputs in self.blocks(input_ids, batch_size, targets):  # noqa: B007 (the last)
            if on_block is not None:
                on_block(index, block, grams)
        return outputs

    def grams(
        self,
        input_ids: torch.Tensor,
        targets: tuple[str, ...],
        batch_size: int = 4,
        on_block: Callable[[int], Any] | None = None,
        rows_when_smaller: bool = False,
    ) -> StreamedGrams:
        """The Grams of ``targets`` as a :class:`StreamedGrams` mapping, computed block by block on demand
        (``on_block(index)`` after each block, e.g. a progress bar's update; ``rows_when_smaller``: :meth:`blocks`)."""
        return StreamedGrams(self, input_ids, targets, batch_size, on_block, rows_when_smaller)

    def logits(
        self, hidden: ActivationStore, batch_size: int = 4, max_bytes: int = LOGITS_BYTES
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start row, float32 logits (b, seq, vocab))`` per batch of the final hidden states: final norm, head
        (the embedding's tensor when the head is tied and the checkpoint has none) and final soft-capping.

        Batches hold at most ``batch_size`` sequences and ``max_bytes`` of logits (at least one sequence): a
        128k-token vocabulary makes 512 MB of logits for 4 x 256 tokens. A head stored narrower than the stream's
        dtype (a bf16 checkpoint) stays so and is cast one block of vocabulary rows at a time
        (:func:`_head_logits`), so it costs its stored size, not twice that."""
        model = self.model
        norm, head = model.model.norm, model.get_output_embeddings()
        self._load(norm)
        head_prefix = self._prefix(head)
        if not self.source.has(f"{head_prefix}weight") and self.layout.tied_head:
            head_prefix = self._prefix(model.get_input_embeddings())
        stored = self._stored_head(head_prefix)
        if stored is None:
            self.source.load(head, head_prefix)
        cap = self.layout.final_softcap
        step = logit_rows(batch_size, hidden.shape[1], self.layout.vocab_size, max_bytes)
        try:
            for start in range(0, hidden.shape[0], step):
                h = hidden.read(start, min(start + step, hidden.shape[0]))
                with torch.no_grad():  # not around the yield: grad mode is thread-global (see metrics._batches)
                    x = norm(h)
                    logits = head(x) if stored is None else _head_logits(x, stored)
                    if cap is not None:
                        logits = torch.tanh(logits / cap) * cap
                yield start, logits.float()
        finally:
            norm.to("meta")
            head.to("meta")

    def _stored_head(self, prefix: str) -> torch.Tensor | None:
        """The head's weight as stored, when it is a plain float tensor narrower than the stream's dtype and the
        head has no bias; else None (loaded as any module)."""
        if not isinstance(self.source, CheckpointSource):
            return None
        keys = self.source.index.keys(prefix)
        if keys != [f"{prefix}weight"]:
            return None
        weight = self.source.index.read(keys)[keys[0]]
        if not weight.is_floating_point() or weight.element_size() >= self.dtype.itemsize:
            return None
        return weight


def _head_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` with ``weight`` (``(vocab, hidden)``, stored narrower than ``x``) cast to ``x.dtype`` one
    block of rows at a time: each logit is one row's dot product, as when casting it whole (the BLAS may sum a
    smaller matrix in another order: equal to float32 rounding, not always bit for bit)."""
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)
    rows = max(1, _HEAD_ROWS_BYTES // (weight.shape[1] * x.element_size()))
    for r0 in range(0, weight.shape[0], rows):
        out[..., r0 : r0 + rows] = x @ weight[r0 : r0 + rows].to(x.dtype).T
    return out


def in_step(*walks: Iterator[Any]) -> Iterator[list[Any]]:
    """Advance several walks together (``init``'s calibration and held-out walks; a reference's and an export's
    logits), yielding one item of each per step; like ``zip(..., strict=True)``, walks of different lengths are a
    ``ValueError``. Unlike ``zip``, it holds no reference to a step's items while the next ones are computed: ``zip``
    reuses its result tuple and drops the old items only after the new ones arrive, which kept the last block's
    weights and Grams alive while the next block ran (2.8 GB at Llama-3-8B shapes). The caller should drop its own
    names for the items before asking for the next step."""
    while True:
        items: list[Any] = []  # rebinding drops the previous step's list before any walk advances
        for i, walk in enumerate(walks):
            try:
                items.append(next(walk))
            except StopIteration:
                if i or any(next(other, _END) is not _END for other in walks[1:]):
                    raise ValueError("in_step: the walks have different lengths") from None
                return
        yield items


_END = object()


class StreamedGrams(Mapping[str, torch.Tensor]):
    """The calibration Grams of a model, ``{qualified linear name: float64 X^T X}``, computed one decoder block at a
    time as they are asked for: asking for a layer of block ``i`` runs the stream up to block ``i`` and drops the
    Grams of the blocks before it, so at most one block's Grams are held (memory flat in depth).

    Layers must be asked for in block order (:func:`~qwha_export.formats.shards.natural_key` order); asking for a
    block already dropped is a ``RuntimeError``. ``in`` and ``len`` answer from the layer names alone (the targets of
    every block), without running anything. Layers outside the decoder blocks have no Gram (``get`` gives None).
    ``on_block(index)`` (settable) is called after each block has run, e.g. a progress bar's update.
    ``rows_when_smaller``: as in :meth:`BlockStream.blocks` (merge's error report reads only quadratic forms)."""

    def __init__(
        self,
        stream: BlockStream,
        input_ids: torch.Tensor,
        targets: tuple[str, ...],
        batch_size: int = 4,
        on_block: Callable[[int], Any] | None = None,
        rows_when_smaller: bool = False,
    ) -> None:
        self._stream, self.on_block = stream, on_block
        model = stream.model
        layers = decoder_layers(model)
        self._block_of: dict[str, int] = {}
        for index, block in enumerate(layers):
            prefix = stream._prefix(block)
            for name, module in block.named_modules():
                if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear):
                    self._block_of[f"{prefix}{name}"] = index
        self._n_blocks = len(layers)
        self._walk = stream.blocks(  # Grams only
            input_ids, batch_size, tuple(targets), keep_block=False, rows_when_smaller=rows_when_smaller
        )
        self._index, self._current = -1, BlockGrams()
        self.token_counts: dict[str, int] = {}

    def _advance_to(self, index: int) -> None:
        if index < self._index:
            raise RuntimeError(
                f"the Grams of block {index} were dropped when block {self._index} ran; ask in block order"
            )
        while self._index < index:
            self._current = BlockGrams()  # drop the previous block's Grams before the next one is computed
            i, _, grams, outputs = next(self._walk)
            if i == self._n_blocks - 1:  # nothing runs after the last block: free it and its outputs now
                outputs.close()
                self._walk.close()
            self._index, self._current = i, grams
            self.token_counts = dict(grams.token_counts)
            if self.on_block is not None:
                self.on_block(i)

    def __getitem__(self, layer: str) -> torch.Tensor:
        index = self._block_of.get(layer)
        if index is None:
            raise KeyError(layer)
        self._advance_to(index)
        return self._current[layer]

    def __contains__(self, layer: object) -> bool:
        return layer in self._block_of

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._block_of, key=lambda n: (self._block_of[n], n)))

    def __len__(self) -> int:
        return len(self._block_of)

    @property
    def n_blocks(self) -> int:
        return self._n_blocks

    def close(self) -> None:
        """Stop the walk and remove the stream's spill folder (frees the block and its activations)."""
        self._walk.close()
        self._current = BlockGrams()
        self._stream.close()

    def __enter__(self) -> StreamedGrams:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
