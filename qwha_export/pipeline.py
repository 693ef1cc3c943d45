"""Pipeline stage ``init``: quantize a causal LM and initialise QWHA adapters, writing an adapter directory.

Directory layout written by :func:`init_qwha` (everything later stages need):

* ``adapter_config.json`` + ``adapter_model.safetensors`` -- the peft QWHA adapter (``PeftModel.from_pretrained``).
* ``quantized_base.safetensors`` -- per quantized linear ``<name>.codes|scales|zeros|bits|group_size[|g_idx]``
  (see :class:`~qwha_export.converters.quantize.QuantizedWeight`).
* ``qwha_base.json`` -- base model path and SHA-256 of its config and weights, quantization settings, target
  modules, layers skipped (no supported Hadamard size).
* ``init_report.json`` -- per layer: name, shape, budget, relative output error before/after init on calibration
  and held-out activations; totals.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import __version__
from .converters.calibration import default_targets, iter_block_grams
from .converters.quantize import QuantConfig, QuantizedWeight, quantize_weight
from .converters.qwha_init import InitConfig, init_layer
from .formats.adapter_dir import (  # noqa: F401 - re-exported: pipeline.BASE_FILE etc. predate formats.adapter_dir
    BASE_FILE,
    BASE_META,
    atomic_output_dir,
    base_fingerprint,
    check_base_hash,
    check_output_dir,
)
from .formats.shards import DEFAULT_MAX_SHARD_BYTES, validate_checkpoint, validate_safetensors_file
from .kernels import is_supported_size
from .quant_linear import QuantLinear, replace_linear

__all__ = [
    "InitJob",
    "init_qwha",
    "import_published",
    "load_quantized_base",
    "load_qwha_model",
    "base_fingerprint",
    "check_base_hash",
    "MergeJob",
    "merge_qwha",
    "fuse_qwha",
    "atomic_output_dir",
    "resolve_model",
]

REPORT_FILE = "init_report.json"


@dataclass(frozen=True)
class InitJob:
    """Inputs of ``qwha-export init``."""

    model: str
    out: str
    quant: QuantConfig = field(default_factory=QuantConfig)
    init: InitConfig = field(default_factory=InitConfig)
    calib: str | None = None  # text or JSONL file; None = gensim's Lee corpus
    calib_tokens: int = 4096
    heldout_tokens: int = 2048
    seq_len: int = 512
    target_modules: tuple[str, ...] | None = None  # None: the architecture's (converters.architectures)
    batch_size: int = 4
    overwrite: bool = False
    quiet: bool = False
    device: str = "cpu"  # where calibration, quantization and init run ("cuda", "cuda:1"); the files are the same

    def __post_init__(self) -> None:
        for name in ("calib_tokens", "heldout_tokens", "seq_len", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but no CUDA device is available")


def resolve_model(model: str) -> str:
    """A local model folder; ``"smollm2"`` / ``"gemma3-270m"`` name the embedded SmolLM2-135M-Instruct / Gemma 3
    270M (built once from their PyPI packages, :data:`qwha_export.models.EMBEDDED`)."""
    from .models import EMBEDDED, check_embedded_available, embedded_path

    if model in EMBEDDED:
        check_embedded_available(model)  # a missing package: one line naming its install command, before any work
        return str(embedded_path(model))
    return model


def _check_model_config(model_dir: str) -> None:
    """Before any work: the folder's ``model_type`` is in the architecture registry and its hidden size has a
    Hadamard transform (one-line ``ValueError`` saying which sizes work)."""
    from .converters.architectures import architecture_for, check_hadamard_sizes

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return  # load_causal_lm names the missing file
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    architecture_for(config)
    check_hadamard_sizes(config)


def _read_calibration_text(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"calibration file {p} does not exist")
    if p.suffix == ".jsonl":
        from .data import read_jsonl

        recs = read_jsonl(p)
        text = "\n\n".join(r.get("text") or f"{r.get('prompt', '')}\n{r.get('response', '')}" for r in recs)
    else:
        text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"calibration file {p} is empty; give a text or JSONL file with some text in it")
    return text


def init_qwha(job: InitJob) -> dict[str, Any]:
    """Quantize ``job.model`` and initialise QWHA adapters; write the adapter directory ``job.out``.

    Streams calibration text through the full-precision model one decoder block at a time (float64 Gram matrices),
    quantizes each target linear (RTN or GPTQ on those activations) and fits its spectrum (AdaAlloc + refinement,
    or a baseline). Held-out activations from a disjoint part of the text measure the error reduction. Returns the
    report that is also written to ``init_report.json``.
    """
    from .data import calibration_and_heldout
    from .models import load_causal_lm
    from .tuner import QWHAConfig, set_spectrum

    t0 = time.time()
    check_output_dir(job.out, job.overwrite)
    text = _read_calibration_text(job.calib)
    model_dir = resolve_model(job.model)
    _check_model_config(model_dir)
    model, tokenizer = load_causal_lm(model_dir)
    model.to(job.device)
    targets = tuple(job.target_modules or default_targets(model))
    calib, heldout = calibration_and_heldout(tokenizer, job.seq_len, job.calib_tokens, job.heldout_tokens, text=text)

    quantized: dict[str, QuantizedWeight] = {}
    inits: dict[str, Any] = {}
    layers: list[dict[str, Any]] = []
    skipped: list[str] = []
    calib_iter = iter_block_grams(model, calib, targets, job.batch_size, sequential=False)
    held_iter = iter_block_grams(model, heldout, targets, job.batch_size, sequential=False)
    n_blocks = model.config.num_hidden_layers
    bar = tqdm(total=n_blocks, desc="quantize + init", unit="block", disable=job.quiet)
    for (_, _, grams), (_, _, held) in zip(calib_iter, held_iter, strict=True):
        for name, gram in grams.items():
            linear = model.get_submodule(name)
            w = linear.weight.detach()
            qw = quantize_weight(w, job.quant, hessian=gram)
            quantized[name] = qw
            if not is_supported_size(w.shape[1]):
                skipped.append(name)
            else:
                res = init_layer(w, qw.dequantize(), gram, job.init, eval_gram=held[name])
                inits[name] = res
                layers.append({"name": name, "shape": list(w.shape), **res.report})
            replace_linear(model, name, QuantLinear.from_linear(linear, qw))
        bar.update(1)
    bar.close()

    peft_model = _attach_adapters(model, job, targets, inits, QWHAConfig, set_spectrum)
    report = _summarise(layers, skipped, job, time.time() - t0)
    with atomic_output_dir(job.out, job.overwrite) as tmp:
        peft_model.save_pretrained(str(tmp))
        save_file(_flatten_quantized(quantized), str(tmp / BASE_FILE))
        meta = {
            "tool": "qwha-export",
            "tool_version": __version__,
            "base_model": str(Path(model_dir).resolve()),
            "base_hash": base_fingerprint(model_dir),
            "quantization": {
                "bits": job.quant.bits,
                "group_size": job.quant.group_size,
                "method": str(job.quant.method),
                "act_order": job.quant.act_order,
                "static_groups": job.quant.static_groups,
            },
            "init": asdict(job.init),
            "model_type": model.config.model_type,
            "target_modules": list(targets),
            "quantized_layers": sorted(quantized),
            "skipped_layers": skipped,
        }
        (tmp / BASE_META).write_text(json.dumps(meta, indent=2))
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def _attach_adapters(model, job: InitJob, targets, inits, config_cls, set_spectrum):
    from peft import get_peft_model

    config = config_cls(
        target_modules=list(targets),
        rank=job.init.rank,
        scale=job.init.scale,
        seed=job.init.seed,
        init=job.init.method,  # "adaalloc"/"random": empty placeholders filled below; "zeros": random support
    )
    peft_model = get_peft_model(model, config)
    if job.init.method != "zeros":
        for name, res in inits.items():
            set_spectrum(peft_model, name, res.values, res.rows, res.cols)
    return peft_model


def _flatten_quantized(quantized: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, qw in quantized.items():
        out.update({k: v.cpu().contiguous() for k, v in qw.to_dict(prefix=f"{name}.").items()})
    return out


def _summarise(layers: list[dict[str, Any]], skipped: list[str], job: InitJob, seconds: float) -> dict[str, Any]:
    def total(key: str) -> float | None:
        vals = [layer[key] for layer in layers if key in layer]
        return math.sqrt(sum(v * v for v in vals) / len(vals)) if vals else None

    return {
        "layers": layers,
        "skipped": skipped,
        "total": {
            "n_layers": len(layers),
            "budget": sum(layer["budget"] for layer in layers),
            **{
                f"rms_{k}": total(k)
                for k in (
                    "rel_err_before_calib",
                    "rel_err_after_calib",
                    "rel_err_before_heldout",
                    "rel_err_after_heldout",
                )
            },
            "layers_improved_heldout": sum(
                1 for layer in layers if layer["rel_err_after_heldout"] < layer["rel_err_before_heldout"]
            ),
        },
        "settings": {"quant": str(job.quant), "init": asdict(job.init), "calib_tokens": job.calib_tokens},
        "seconds": seconds,
    }


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
        from .formats import ExportFormat

        shard = self.max_shard_bytes
        if isinstance(shard, bool) or not isinstance(shard, int) or shard < 1:
            raise ValueError(f"max_shard_size must be a positive number of bytes, got {self.max_shard_bytes!r}")

        if isinstance(self.bits, bool) or self.bits not in MERGE_BITS:
            raise ValueError(
                f"--bits {self.bits!r} is not supported; choose 2, 3, 4 or 8 (re-quantize) or 16 (dense merged model)"
            )
        if self.requant not in (*MERGE_REQUANT, "refit"):
            raise ValueError(f"--requant {self.requant!r} is not supported; choose rtn, gptq, grid or refit")
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
MERGE_REQUANT: tuple[str, ...] = ("rtn", "gptq", "grid")
MERGE_FORMATS: tuple[str, ...] = ("dense", "gptq", "gptq_v2", "compressed-tensors", "fused")


def calibration_grams(adapter_dir: str | Path, n_tokens: int, seq_len: int, quiet: bool = True):
    """Float64 Grams ``X^T X`` of every quantized layer's input, from the full-precision base on Lee-corpus text,
    as a :class:`~qwha_export.converters.block_stream.StreamedGrams`: the base runs one decoder block at a time from
    its shards as the layers are asked for in block order, holding one block's weights and Grams (flat in depth).
    Close it (``with contextlib.closing(...)``) when done."""
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
    grams = stream.grams(chunks, targets, batch_size=4)
    bar = tqdm(total=grams.n_blocks, desc="calibration", unit="block", disable=quiet)

    def advance(index: int) -> None:
        bar.update()
        if index == grams.n_blocks - 1:
            bar.close()

    grams.on_block = advance
    return grams


def _parity_hook(adapter_dir: str | Path, tokens: int, seq_len: int):
    """The ``on_written`` callback of :func:`stream_merge` / :func:`write_fused` that runs the short parity check
    (:func:`qwha_export.verify.heldout_parity`) on the finished temporary folder; None when ``tokens`` is 0."""
    if tokens <= 0:
        return None

    def run(folder: Path) -> dict[str, Any]:
        from .verify import heldout_parity

        return {"parity": heldout_parity(folder, adapter_dir, tokens=tokens, seq_len=seq_len)}

    return run


def fuse_qwha(
    adapter_dir: str | Path,
    out: str | Path,
    base_format: str = "gptq_v2",
    overwrite: bool = False,
    verify_tokens: int = 512,
    seq_len: int = 256,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> dict[str, Any]:
    """``qwha-export fuse``: :func:`qwha_export.fused.write_fused` plus the short parity check on held-out text
    (``verify_tokens`` tokens, 0 = none) stored under ``parity`` in the manifest before the folder is renamed into
    place. Returns the manifest."""
    from .fused import write_fused

    if isinstance(verify_tokens, bool) or not isinstance(verify_tokens, int) or verify_tokens < 0:
        raise ValueError(f"verify_tokens must be an integer >= 0 (0 disables), got {verify_tokens!r}")
    return write_fused(
        adapter_dir,
        out,
        base_format=base_format,
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
        on_written=_parity_hook(adapter_dir, verify_tokens, seq_len),
    )


def merge_qwha(job: MergeJob) -> dict[str, Any]:
    """Merge (and re-quantize) an adapter directory into a deployable checkpoint; see :func:`stream_merge`.

    The adapter directory and its base checkpoint are checked (files present and complete, base hash, layer
    shapes) before any long work. Unless ``verify_tokens`` is 0 the finished export is compared with the
    training-time model on held-out text (:func:`qwha_export.verify.heldout_parity`) and the numbers are stored
    under ``parity`` in ``qwha_export.json`` before the folder is renamed into place.
    """
    from .converters.merge import open_adapter_source, stream_merge
    from .formats import ExportFormat

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
        )
    open_adapter_source(Path(job.adapter_dir))  # fail fast: missing/truncated shards, hash, shapes
    if job.requant == "refit":
        return _refit_and_fuse(job)
    if job.requant == "gptq" and job.bits != 16 and job.calib_tokens <= 0:
        raise ValueError("--requant gptq needs calibration activations; pass --calib-tokens > 0")
    use_grams = job.calib_tokens > 0 and job.bits != 16
    streamed = calibration_grams(job.adapter_dir, job.calib_tokens, job.seq_len, job.quiet) if use_grams else None
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
            on_written=_parity_hook(job.adapter_dir, job.verify_tokens, job.seq_len),
        )


def _original_source(adapter_dir: str | Path):
    """The manifest source of a refit export: the adapter directory the user passed (the refitted adapter lives in a
    temporary folder that is gone once the export is written)."""
    from .converters.adapter_source import source_record

    d = Path(adapter_dir)
    meta = json.loads((d / BASE_META).read_text())
    return source_record(d, Path(meta["base_model"]), meta)


def _refit_and_fuse(job: MergeJob) -> dict[str, Any]:
    """``merge --requant refit``: re-quantize the merged weights, fit a fresh adapter, write a fused checkpoint."""
    from .converters.refit import refit_adapter
    from .fused import write_fused

    if job.bits == 16:
        raise ValueError("--requant refit re-quantizes; use --bits 2, 3, 4 or 8")
    if job.calib_tokens <= 0:
        raise ValueError("--requant refit fits the new adapter on calibration activations; pass --calib-tokens > 0")
    with tempfile.TemporaryDirectory(prefix=".refit-", dir=Path(job.out).resolve().parent) as tmp:
        with calibration_grams(job.adapter_dir, job.calib_tokens, job.seq_len, job.quiet) as grams:
            report = refit_adapter(
                job.adapter_dir, Path(tmp), bits=job.bits, group_size=job.group_size, quantizer="auto", grams=grams
            )
        base = "compressed-tensors" if job.format == "compressed-tensors" else "gptq_v2"
        manifest = write_fused(
            tmp,
            job.out,
            base_format=base,
            overwrite=job.overwrite,
            max_shard_bytes=job.max_shard_bytes,
            on_written=_parity_hook(job.adapter_dir, job.verify_tokens, job.seq_len),  # against the original
            source=_original_source(job.adapter_dir),
            settings_extra={"requant": "refit", "bits": job.bits, "group_size": job.group_size},
        )
    if manifest.get("parity") is not None:
        report["parity"] = manifest["parity"]
    return report
