"""The stages after ``init`` (:mod:`qwha_export.initialise`): the training-time model of an adapter directory
(:func:`load_quantized_base`, :func:`load_qwha_model`), the import of published adapters, and the ``merge`` and
``fuse`` jobs with their streamed calibration Grams and built-in parity check.

The adapter directory's layout is owned by :mod:`qwha_export.formats.adapter_dir`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .converters.quant_methods import MERGE_REQUANT, Quantizer
from .converters.quantize import QuantConfig, QuantizedWeight
from .formats import ExportFormat
from .formats.adapter_dir import (  # noqa: F401 - re-exported: pipeline.BASE_FILE etc. predate formats.adapter_dir
    BASE_FILE,
    BASE_META,
    atomic_output_dir,
    base_fingerprint,
    check_base_hash,
    check_output_dir,
)
from .formats.shards import DEFAULT_MAX_SHARD_BYTES, validate_checkpoint, validate_safetensors_file
from .quant_linear import QuantLinear, replace_linear

__all__ = [
    "import_published",
    "load_quantized_base",
    "load_qwha_model",
    "base_fingerprint",
    "check_base_hash",
    "MergeJob",
    "merge_qwha",
    "refit_and_fuse",
    "fuse_qwha",
    "atomic_output_dir",
]


def load_quantized_base(adapter_dir: str | Path, dtype: torch.dtype = torch.float32, check_hash: bool = True):
    """The base model of an adapter directory with its target linears replaced by :class:`QuantLinear`.

    Returns ``(model, tokenizer, meta)``. Refuses (``ValueError``) a base whose files changed since ``init``.
    """
    from .models import load_causal_lm

    d = Path(adapter_dir)
    if not (d / BASE_META).is_file() or not (d / BASE_FILE).is_file():
        raise ValueError(f"{d} is not a qwha-export adapter directory (missing {BASE_META} or {BASE_FILE})")
    meta = json.loads((d / BASE_META).read_text())
    base = meta["base_model"]
    if Path(base).is_dir():
        validate_checkpoint(base)  # a truncated/corrupt shard: one line naming it, not a loader traceback
        if check_hash:
            check_base_hash(base, meta.get("base_hash"))
    validate_safetensors_file(d / BASE_FILE)
    model, tokenizer = load_causal_lm(base, dtype=dtype)
    tensors = load_file(str(d / BASE_FILE))
    for name in meta["quantized_layers"]:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantized layer {name} does not exist in base model {base}") from None
        qw = QuantizedWeight.from_dict(tensors, prefix=f"{name}.")
        replace_linear(model, name, QuantLinear.from_linear(linear, qw))
    return model, tokenizer, meta


def load_qwha_model(adapter_dir: str | Path, dtype: torch.dtype = torch.float32, targets: Sequence[str] | None = None):
    """The training-time QWHA model of an adapter directory: quantized base + adapters. ``(peft_model, tokenizer)``."""
    from .tuner import load_qwha_adapter

    model, tokenizer, _ = load_quantized_base(adapter_dir, dtype=dtype)
    return load_qwha_adapter(model, str(adapter_dir)), tokenizer


def import_published(src: str | Path, base_dir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Convert a published QWHA adapter (``qhft_*`` keys) into a complete adapter directory ``out``.

    ``base_dir`` is an adapter directory from ``init`` whose quantized base the published adapter was trained on; its
    ``qwha_base.json`` and ``quantized_base.safetensors`` are copied so ``out`` loads with :func:`load_qwha_model`.
    """
    from .published import convert_published_adapter

    if not Path(src).exists():
        raise ValueError(f"published adapter {src} does not exist; pass the folder or file the QWHA code saved")
    check_output_dir(out, overwrite)
    model, _, _ = load_quantized_base(base_dir)
    with atomic_output_dir(out, overwrite) as tmp:
        convert_published_adapter(src, model, tmp / "adapter")
        for f in (tmp / "adapter").iterdir():
            f.rename(tmp / f.name)
        (tmp / "adapter").rmdir()
        for name in (BASE_META, BASE_FILE):
            shutil.copy2(Path(base_dir) / name, tmp / name)
    return Path(out)


@dataclass(frozen=True)
class MergeJob:
    """Inputs of ``qwha-export merge``."""

    adapter_dir: str
    out: str
    bits: int = 4
    group_size: int | None = None  # None: keep the base's
    requant: str = "rtn"
    format: str = "dense"
    dtype: str = "float16"
    calib_tokens: int = 1024  # calibration activations for gptq and the per-layer report; 0 = no report
    seq_len: int = 256
    overwrite: bool = False
    quiet: bool = False
    verify_tokens: int = 512  # held-out tokens of the parity check written into the manifest; 0 = no check
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES  # safetensors shard size limit (as save_pretrained's)

    def __post_init__(self) -> None:
        shard = self.max_shard_bytes
        if isinstance(shard, bool) or not isinstance(shard, int) or shard < 1:
            raise ValueError(f"max_shard_size must be a positive number of bytes, got {self.max_shard_bytes!r}")

        if isinstance(self.bits, bool) or self.bits not in MERGE_BITS:
            raise ValueError(
                f"--bits {self.bits!r} is not supported; choose 2, 3, 4 or 8 (re-quantize) or 16 (dense merged model)"
            )
        if self.requant not in MERGE_REQUANT:
            raise ValueError(f"--requant {self.requant!r} is not supported; choose one of {', '.join(MERGE_REQUANT)}")
        fmt = ExportFormat.parse(self.format)
        if fmt.value not in MERGE_FORMATS:
            raise ValueError(
                f"--format {self.format!r} is not written by merge; choose one of {', '.join(MERGE_FORMATS)}"
            )
        if self.bits == 16 and fmt.value not in ("dense", "fused") and self.requant != "refit":
            raise ValueError(f"--bits 16 writes a dense merged model; use --format dense, not {self.format}")
        if self.requant == "refit" and self.bits == 16:
            raise ValueError("--requant refit re-quantizes; choose --bits 2, 3, 4 or 8")
        if self.bits != 16 and self.group_size is not None and self.requant != "grid":
            QuantConfig(bits=self.bits, group_size=self.group_size)  # ValueError naming a bad group size
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"--dtype {self.dtype!r} is not supported; choose float16, bfloat16 or float32")
        for name in ("calib_tokens", "verify_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0 disables), got {v!r}")
        if self.verify_tokens == 1:
            raise ValueError("verify_tokens must be 0 (no parity check) or at least 2")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2, got {self.seq_len!r}")


MERGE_BITS: tuple[int, ...] = (2, 3, 4, 8, 16)
MERGE_FORMATS: tuple[str, ...] = tuple(f.value for f in ExportFormat if f is not ExportFormat.ONNX)  # onnx: the CLI


def calibration_grams(
    adapter_dir: str | Path, n_tokens: int, seq_len: int, quiet: bool = True, rows_when_smaller: bool = False
):
    """Float64 Grams ``X^T X`` of every quantized layer's input, from the full-precision base on Lee-corpus text,
    as a :class:`~qwha_export.converters.block_stream.StreamedGrams`: the base runs one decoder block at a time from
    its shards as the layers are asked for in block order, holding one block's weights and Grams (flat in depth).
    ``rows_when_smaller``: a layer with fewer calibration tokens than inputs gets its rows ``X`` instead
    (:class:`~qwha_export.converters.calibration.InputRows`), for the error report only: ``||X A^T||^2`` costs
    ``tokens / d_in`` of ``tr(A G A^T)`` (a 4096 x 14336 layer on 1,024 tokens: 14x less). Close it
    (``with contextlib.closing(...)``) when done."""
    from .converters.block_stream import BlockStream, CheckpointSource
    from .data import lee_corpus_text, token_chunks
    from .fused import _try_tokenizer

    meta = json.loads((Path(adapter_dir) / BASE_META).read_text())
    base = Path(meta["base_model"])
    tokenizer = _try_tokenizer(base)
    if tokenizer is None:
        raise ValueError(f"base model {base} has no tokenizer files; calibration needs them, or pass --calib-tokens 0")
    chunks = token_chunks(tokenizer, lee_corpus_text(), seq_len, max_tokens=n_tokens)
    targets = tuple(sorted({n.rsplit(".", 1)[-1] for n in meta["quantized_layers"]}))
    stream = BlockStream(base, CheckpointSource(base))
    grams = stream.grams(chunks, targets, batch_size=4, rows_when_smaller=rows_when_smaller)
    bar = tqdm(total=grams.n_blocks, desc="calibration", unit="block", disable=quiet)

    def advance(index: int) -> None:
        bar.update()
        if index == grams.n_blocks - 1:
            bar.close()

    grams.on_block = advance
    return grams


def _parity_hook(adapter_dir: str | Path, tokens: int, seq_len: int, quiet: bool = True):
    """The ``on_written`` callback of :func:`stream_merge` / :func:`write_fused` that runs the short parity check
    (:func:`qwha_export.verify.heldout_parity`) on the finished temporary folder; None when ``tokens`` is 0."""
    if tokens <= 0:
        return None

    def run(folder: Path) -> dict[str, Any]:
        from .verify import heldout_parity

        return {"parity": heldout_parity(folder, adapter_dir, tokens=tokens, seq_len=seq_len, quiet=quiet)}

    return run


def _layer_bar(desc: str, quiet: bool):
    """The ``on_layer(done, total)`` callback of :func:`stream_merge` / :func:`write_fused`: a progress bar."""
    bar = None

    def advance(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="layer", disable=quiet)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return advance


def fuse_qwha(
    adapter_dir: str | Path,
    out: str | Path,
    base_format: str = "gptq_v2",
    overwrite: bool = False,
    verify_tokens: int = 512,
    seq_len: int = 256,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    quiet: bool = False,
) -> dict[str, Any]:
    """``qwha-export fuse``: :func:`qwha_export.fused.write_fused` plus the short parity check on held-out text
    (``verify_tokens`` tokens, 0 = none) stored under ``parity`` in the manifest before the folder is renamed into
    place; progress bars unless ``quiet``. Returns the manifest."""
    from .fused import write_fused

    if isinstance(verify_tokens, bool) or not isinstance(verify_tokens, int) or verify_tokens < 0:
        raise ValueError(f"verify_tokens must be an integer >= 0 (0 disables), got {verify_tokens!r}")
    return write_fused(
        adapter_dir,
        out,
        base_format=base_format,
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
        on_written=_parity_hook(adapter_dir, verify_tokens, seq_len, quiet),
        on_layer=_layer_bar("fuse", quiet),
    )


def merge_qwha(job: MergeJob) -> dict[str, Any]:
    """Merge (and re-quantize) an adapter directory into a deployable checkpoint; see :func:`stream_merge`.

    The adapter directory and its base checkpoint are checked (files present and complete, base hash, layer
    shapes) before any long work. Unless ``verify_tokens`` is 0 the finished export is compared with the
    training-time model on held-out text (:func:`qwha_export.verify.heldout_parity`) and the numbers are stored
    under ``parity`` in ``qwha_export.json`` before the folder is renamed into place.
    """
    from .converters.merge import open_adapter_source, stream_merge

    check_output_dir(job.out, job.overwrite)
    if not (Path(job.adapter_dir) / BASE_META).is_file():
        raise ValueError(f"{job.adapter_dir} is not a qwha-export adapter directory (no {BASE_META}); run `init` first")
    if ExportFormat.parse(job.format) == ExportFormat.FUSED and job.requant != "refit":
        return fuse_qwha(
            job.adapter_dir,
            job.out,
            overwrite=job.overwrite,
            verify_tokens=job.verify_tokens,
            max_shard_bytes=job.max_shard_bytes,
            quiet=job.quiet,
        )
    open_adapter_source(Path(job.adapter_dir))  # fail fast: missing/truncated shards, hash, shapes
    if job.requant == "refit":
        return refit_and_fuse(job)
    if job.requant != "refit" and Quantizer(job.requant).needs_hessian and job.bits != 16 and job.calib_tokens <= 0:
        raise ValueError(f"--requant {job.requant} needs calibration activations; pass --calib-tokens > 0")
    use_grams = job.calib_tokens > 0 and job.bits != 16
    rows = not Quantizer(job.requant).needs_hessian  # the Grams feed the report only: rows where smaller
    streamed = calibration_grams(job.adapter_dir, job.calib_tokens, job.seq_len, job.quiet, rows) if use_grams else None
    with streamed if streamed is not None else contextlib.nullcontext() as grams:
        return stream_merge(
            job.adapter_dir,
            job.out,
            bits=job.bits,
            group_size=job.group_size,
            requant=job.requant,
            fmt=job.format,
            dtype=job.dtype,
            overwrite=job.overwrite,
            grams=grams,
            max_shard_bytes=job.max_shard_bytes,
            check_hash=False,  # checked above
            on_written=_parity_hook(job.adapter_dir, job.verify_tokens, job.seq_len, job.quiet),
            on_layer=_layer_bar("merge", job.quiet),
        )


def refit_and_fuse(job: MergeJob, quantizer: str | Quantizer = Quantizer.AUTO) -> dict[str, Any]:
    """``merge --requant refit``: one pass of the fused writer whose layer function re-quantizes the merged weights
    (``quantizer``: ``auto`` for the CLI; rtn, gptq or grid for comparisons) and fits a fresh adapter
    (:class:`~qwha_export.converters.refit.RefitLayers`), on block-streamed Grams."""
    from .converters.refit import RefitLayers
    from .fused import write_fused

    if job.bits == 16:
        raise ValueError("--requant refit re-quantizes; use --bits 2, 3, 4 or 8")
    if job.calib_tokens <= 0:
        raise ValueError("--requant refit fits the new adapter on calibration activations; pass --calib-tokens > 0")
    with calibration_grams(job.adapter_dir, job.calib_tokens, job.seq_len, job.quiet) as grams:
        refit = RefitLayers(
            job.adapter_dir, bits=job.bits, group_size=job.group_size, quantizer=quantizer, grams=grams
        )
        manifest = write_fused(
            job.adapter_dir,
            job.out,
            base_format="compressed-tensors" if job.format == "compressed-tensors" else "gptq_v2",
            overwrite=job.overwrite,
            max_shard_bytes=job.max_shard_bytes,
            check_hash=False,  # checked by merge_qwha
            on_written=_parity_hook(job.adapter_dir, job.verify_tokens, job.seq_len, job.quiet),
            settings_extra={"requant": "refit", "bits": job.bits, "group_size": job.group_size},
            on_layer=_layer_bar("fuse", job.quiet),
            refit=refit,
        )
    report = refit.report()
    if manifest.get("parity") is not None:
        report["parity"] = manifest["parity"]
    return report
