"""The ``init`` command: quantize a causal LM and initialise QWHA adapters, writing an adapter directory, one decoder
block at a time (memory flat in depth: the model is never loaded whole).

How: two :class:`~qwha_export.converters.block_stream.BlockStream` walks over the base checkpoint, one on the
calibration tokens and one on the held-out tokens, run in step; while block ``i`` is loaded (once: the held-out walk
borrows the calibration walk's tensors, :class:`~qwha_export.converters.block_stream.BorrowingSource`), each target
linear is quantized (RTN, or GPTQ on the calibration Gram) and its spectrum fitted (AdaAlloc + refinement, or a
baseline), and the held-out activations measure the error reduction (kept as their Gram, or as the rows themselves
where those are smaller: :class:`~qwha_export.converters.calibration.InputRows`; linears fed the same input share
one). Each block's quantized tensors and spectra go to a
part file; the parts are joined into the two files of the layout at the end
(:func:`~qwha_export.formats.shards.concat_safetensors`), and peft writes ``adapter_config.json`` and the model
card from a skeleton of the model (parameters on the meta device).

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

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from . import __version__
from .converters.architectures import decoder_layers
from .converters.calibration import default_targets
from .converters.quant_methods import BASE_QUANTIZERS
from .converters.quantize import QuantConfig
from .converters.quantizers import quantize_weight
from .converters.qwha_init import InitConfig, TransformedGram, init_layer
from .formats.adapter_dir import (
    ADAPTER_WEIGHTS,
    BASE_FILE,
    BASE_META,
    REPORT_FILE,
    atomic_output_dir,
    base_fingerprint,
    check_output_dir,
)
from .formats.shards import concat_safetensors
from .kernels import is_supported_size

__all__ = ["InitJob", "init_qwha", "resolve_model"]


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
        if self.quant.method.needs_base:
            raise ValueError(
                f"--quantizer {self.quant.method.value} re-quantizes onto a quantized base's grid; init quantizes a "
                f"full-precision model: choose {' or '.join(BASE_QUANTIZERS)}"
            )
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
    270M (built once from their PyPI packages, :data:`qwha_export.models.EMBEDDED`); a ``.gguf`` file is
    de-quantized once into a cached folder (:func:`qwha_export.models.gguf_model_path`)."""
    from .models import EMBEDDED, check_embedded_available, embedded_path, gguf_model_path

    if model.endswith(".gguf") and Path(model).is_file():  # a GGUF file: de-quantized once into a cached folder
        return str(gguf_model_path(model))
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
    """Quantize ``job.model`` and initialise QWHA adapters block by block (see the module docstring); write the
    adapter directory ``job.out``. Returns the report that is also written to ``init_report.json``."""
    from .converters.block_stream import BlockStream, BorrowingSource, CheckpointSource, in_step, model_skeleton
    from .data import calibration_and_heldout
    from .fused import _try_tokenizer
    from .models import check_weights_match, read_model_config

    t0 = time.time()
    check_output_dir(job.out, job.overwrite)
    text = _read_calibration_text(job.calib)
    model_dir = resolve_model(job.model)
    _check_model_config(model_dir)
    read_model_config(model_dir)
    calib_stream = BlockStream(model_dir, CheckpointSource(model_dir))
    held_stream = BlockStream(model_dir, BorrowingSource(calib_stream, CheckpointSource(model_dir)))  # one copy
    check_weights_match(model_dir, calib_stream.model)  # from the headers, before any work
    tokenizer = _try_tokenizer(Path(model_dir))
    if tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer files; init tokenizes the calibration text with them")
    targets = tuple(job.target_modules or default_targets(calib_stream.model))
    calib, heldout = calibration_and_heldout(tokenizer, job.seq_len, job.calib_tokens, job.heldout_tokens, text=text)
    device = torch.device(job.device)
    random_support = job.init.method == "zeros"  # peft's own init: a random support, zero values

    quantized: list[str] = []
    layers: list[dict[str, Any]] = []
    skipped: list[str] = []
    with atomic_output_dir(job.out, job.overwrite) as tmp, calib_stream, held_stream:
        parts = tmp / ".parts"
        parts.mkdir()
        config = _adapter_config(job, targets)
        # both walks' inputs first, one embedding load at a time, before either holds a block and its Grams
        calib_in = calib_stream.capture(calib, job.batch_size)
        held_in = held_stream.capture(heldout, job.batch_size)
        walks = in_step(  # not zip: it would hold the last block and its Grams while the next one runs
            calib_stream.blocks(calib, job.batch_size, targets, captured=calib_in),
            # the held-out walk only measures: it lets go of the block it borrowed before yielding, and keeps
            # activations as rows where smaller than their Gram (the error report reads nothing else)
            held_stream.blocks(
                heldout, job.batch_size, targets, keep_block=False, rows_when_smaller=True, captured=held_in
            ),
        )
        n_blocks = len(decoder_layers(calib_stream.model))
        bar = tqdm(total=n_blocks, desc="quantize + init", unit="block", disable=job.quiet)
        for (index, _, grams, outputs), (_, _, held, held_outputs) in walks:
            qtensors: dict[str, torch.Tensor] = {}
            spectra: dict[str, torch.Tensor] = {}
            records: dict[str, dict[str, Any]] = {}
            qws = w = qw = res = None
            for names in _same_input(grams):  # q/k/v, gate/up: one Gram, quantized against, then transformed once
                qws = {}
                for name in names:
                    w = calib_stream.model.get_submodule(name).weight.detach()
                    qws[name] = quantize_weight(w.to(device), job.quant, hessian=grams[name].to(device))
                    qtensors.update({k: v.cpu().contiguous() for k, v in qws[name].to_dict(prefix=f"{name}.").items()})
                if not is_supported_size(qws[names[0]].shape[1]):
                    skipped.extend(names)
                    continue
                # in place of the Gram (this walk's own tensor, not needed after quantization): no second d_in^2
                gram = grams[names[0]].to(device)
                g_hat = TransformedGram.of(gram, job.init, inplace=gram.dtype == torch.float64 and gram.is_contiguous())
                for name, qw in qws.items():
                    w = calib_stream.model.get_submodule(name).weight.detach().to(device)
                    res = init_layer(w, qw.dequantize(), g_hat, job.init, eval_gram=held[name].to(device))
                    records[name] = {"name": name, "shape": list(w.shape), **res.report}
                    spectra.update(_spectrum_tensors(config, name, tuple(w.shape), None if random_support else res))
                del g_hat, gram
            quantized.extend(grams)
            layers.extend(records[name] for name in grams if name in records)
            save_file(qtensors, str(parts / f"quantized-{index:05d}.safetensors"))
            save_file(spectra, str(parts / f"adapter-{index:05d}.safetensors"))
            if index == n_blocks - 1:  # the last block's outputs are the caller's; blocks() closes the others
                outputs.close()
                held_outputs.close()
            # or they live on while the walks compute the next block
            del grams, held, qtensors, spectra, records, qws, w, qw, res
            bar.update(1)
        bar.close()
        _write_adapter_files(model_skeleton(model_dir), config, tmp, parts)  # the walks emptied theirs
        concat_safetensors(sorted(parts.glob("quantized-*.safetensors")), tmp / BASE_FILE)
        shutil.rmtree(parts)
        report = _summarise(layers, skipped, job, time.time() - t0)
        meta = {
            "tool": "qwha-export",
            "tool_version": __version__,
            "base_model": str(Path(model_dir).resolve()),
            "base_hash": base_fingerprint(model_dir),
            "quantization": {
                "bits": job.quant.bits,
                "group_size": job.quant.group_size,
                "method": job.quant.method.value,
                "act_order": job.quant.act_order,
                "static_groups": job.quant.static_groups,
            },
            "init": asdict(job.init),
            "model_type": calib_stream.model.config.model_type,
            "target_modules": list(targets),
            "quantized_layers": sorted(quantized),
            "skipped_layers": skipped,
        }
        (tmp / BASE_META).write_text(json.dumps(meta, indent=2))
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def _same_input(grams: dict[str, Any]) -> list[list[str]]:
    """The block's linears grouped by Gram tensor (those fed the same input share one), in first-seen order."""
    groups: dict[int, list[str]] = {}
    for name, gram in grams.items():
        groups.setdefault(id(gram), []).append(name)
    return list(groups.values())


def _adapter_config(job: InitJob, targets: tuple[str, ...]):
    from .tuner import QWHAConfig

    return QWHAConfig(
        target_modules=list(targets),
        rank=job.init.rank,
        scale=job.init.scale,
        seed=job.init.seed,
        init=job.init.method,  # "adaalloc"/"random"/"published": computed here; "zeros": peft's random support
    )


def _spectrum_tensors(config, name: str, shape: tuple[int, int], res) -> dict[str, torch.Tensor]:
    """One layer's entries of ``adapter_model.safetensors`` under peft's key names: the fitted spectrum of ``res``,
    or (``res`` None, ``init="zeros"``) the random support peft draws for the layer with zero values."""
    from .tuner import random_init_support

    d_out, d_in = shape
    if res is None:
        rows, cols = random_init_support(config, name, d_out, d_in)
        values = torch.zeros(rows.numel(), dtype=torch.float32)
    else:
        values, rows, cols = res.values, res.rows, res.cols
    key = f"base_model.model.{name}"
    return {
        f"{key}.qwha_spectrum": values.detach().float().cpu().contiguous(),
        f"{key}.qwha_indices": torch.stack([rows.long(), cols.long()]).cpu().contiguous(),
        f"{key}.qwha_shape": torch.tensor([d_out, d_in], dtype=torch.int64),
    }


def _write_adapter_files(skeleton: torch.nn.Module, config, out: Path, parts: Path) -> None:
    """peft writes ``adapter_config.json`` and the model card from ``skeleton`` (meta parameters) with empty
    placeholder adapters; ``adapter_model.safetensors`` is then the join of the per-block parts."""
    import copy
    import warnings

    from peft import get_peft_model

    placeholder = copy.deepcopy(config)
    placeholder.init = "adaalloc"  # empty placeholders, not peft's random supports for every layer at once
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # skipped layers were counted above
        peft_model = get_peft_model(skeleton, placeholder)
    peft_model.peft_config["default"].init = config.init
    peft_model.save_pretrained(str(out))
    concat_safetensors(sorted(parts.glob("adapter-*.safetensors")), out / ADAPTER_WEIGHTS)


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
