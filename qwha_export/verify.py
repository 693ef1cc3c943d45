"""``verify_export``: compare an exported folder with the training-time QWHA model it came from.

Reference: the training-time model of the adapter directory (base model with its quantized layers as
:class:`~qwha_export.quant_linear.QuantLinear` + the peft QWHA adapter, as :func:`qwha_export.pipeline.
load_qwha_model` builds it; here the tokenizer is optional so tokenizer-less test folders work).

Export, by detected format:

* ``fused`` (``qwha_fused.json`` present): :func:`qwha_export.fused.load_fused`;
* ``dense``: ``AutoModelForCausalLM.from_pretrained``;
* ``onnx`` (``model.onnx``, from ``export-onnx``): onnxruntime on the full sequence with an empty KV cache, one
  session per decoder block in :func:`verify_export` (:class:`qwha_export.onnx_runtime.OnnxBlocks`), the whole
  graph in :func:`load_export` (:class:`~qwha_export.onnx_runtime.OnnxLogits`); missing external data is a
  one-line error;
* ``gptq``/``gptq_v2``/``compressed-tensors``: a pure-torch loader
  (:func:`qwha_export.fused.load_quantized_checkpoint`: model built from ``config.json``, quantized layers
  replaced by ``QuantLinear`` read with the formats' ``read_layer``) -- GPTQModel / compressed-tensors kernels are
  not needed (and GPTQModel is not installed). This checks the *stored values*; a real serving stack's kernels may
  differ by their own rounding.

The format comes from ``qwha_export.json`` (``settings.format``, written by ``stream_merge``/``write_fused``), else
from ``config.json``'s ``quantization_config`` (none = dense).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .formats import ExportFormat
from .formats.fused import FUSED_CONFIG_NAME
from .formats.manifest import MANIFEST_FILE, read_manifest
from .metrics import LogitComparison, extract_logits

__all__ = [
    "NoTokenizerError",
    "detect_format",
    "export_stream",
    "heldout_parity",
    "load_export",
    "load_reference",
    "reference_stream",
    "verify_export",
]


class NoTokenizerError(ValueError):
    """Neither the export nor the base model has tokenizer files (evaluation needs token ids then)."""


def _check_files(model_dir: Path, *extra: Path) -> None:
    """Headers and sizes of a checkpoint folder's safetensors files (and ``extra`` files) before any load, so a
    truncated or corrupt file is a one-line error naming it rather than a loader's traceback."""
    from .formats.shards import validate_checkpoint, validate_safetensors_file

    validate_checkpoint(model_dir)
    for p in extra:
        validate_safetensors_file(p)


def _check_export_files(export_dir: Path, fmt: ExportFormat) -> None:
    if fmt == ExportFormat.ONNX:  # the graph and every external data file it names
        from .formats.onnx_folder import MODEL_FILE
        from .onnx_runtime import check_external_data

        check_external_data(export_dir / MODEL_FILE)
        return
    _check_files(export_dir, *[export_dir / "qwha_adapter.safetensors"] * (fmt == ExportFormat.FUSED))


def detect_format(export_dir: str | Path) -> ExportFormat:
    """The :class:`ExportFormat` of an export folder; one-line ``ValueError`` for folders that are not exports."""
    d = Path(export_dir)
    if not d.is_dir():
        raise ValueError(f"export folder {d} does not exist")
    if (d / FUSED_CONFIG_NAME).is_file():
        return ExportFormat.FUSED
    if (d / MANIFEST_FILE).is_file():
        return ExportFormat.parse(read_manifest(d).format)
    if (d / "model.onnx").is_file():
        return ExportFormat.ONNX
    cfg_path = d / "config.json"
    if not cfg_path.is_file() or not any(d.glob("*.safetensors")):
        raise ValueError(
            f"{d} is not an exported model folder (no {MANIFEST_FILE}, {FUSED_CONFIG_NAME} or config.json)"
        )
    try:
        qcfg = json.loads(cfg_path.read_text()).get("quantization_config")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise ValueError(f"{cfg_path}: invalid config.json") from None
    if qcfg is None:
        return ExportFormat.DENSE
    method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
    if method == "compressed-tensors":
        return ExportFormat.COMPRESSED_TENSORS
    if method == "gptq":
        ck = qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq"
        return ExportFormat.GPTQ_V2 if ck == "gptq_v2" else ExportFormat.GPTQ
    raise ValueError(f"{d}: unsupported quantization_config quant_method {method!r}")


def load_export(export_dir: str | Path, dtype: torch.dtype = torch.float32):
    """``(model, format)`` of an export folder (see the module docstring for the loader per format)."""
    fmt = detect_format(export_dir)
    if fmt == ExportFormat.ONNX:  # a callable ``logits = m(input_ids)`` running onnxruntime (full sequence, no cache)
        from .onnx_runtime import OnnxLogits

        return OnnxLogits(export_dir), fmt
    _check_export_files(Path(export_dir), fmt)
    if fmt == ExportFormat.FUSED:
        from .fused import load_fused

        return load_fused(export_dir, dtype=dtype)[0], fmt
    if fmt == ExportFormat.DENSE:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            str(export_dir), dtype=dtype, use_safetensors=True, local_files_only=True
        )
        return model.eval(), fmt
    if fmt in (ExportFormat.GPTQ, ExportFormat.GPTQ_V2, ExportFormat.COMPRESSED_TENSORS):
        from .fused import load_quantized_checkpoint

        return load_quantized_checkpoint(export_dir, fmt, dtype=dtype), fmt
    raise ValueError(f"{export_dir}: format {fmt.value!r} cannot be verified with a torch model")


def reference_kind(against: str | Path) -> str:
    """``"training-time"`` when ``against`` is an adapter directory (``qwha_base.json`` present), else the export
    format of the folder (``gptq_v2``, ``fused``, ...); one-line ``ValueError`` when it is neither."""
    from .formats.adapter_dir import BASE_META

    d = Path(against)
    if (d / BASE_META).is_file():
        return "training-time"
    if not d.is_dir():
        raise ValueError(f"--against folder {d} does not exist")
    try:
        return detect_format(d).value
    except ValueError:
        raise ValueError(
            f"{d} is neither a qwha-export adapter directory (no {BASE_META}) nor an export folder (no "
            f"{MANIFEST_FILE} or config.json); pass --against the adapter directory or the folder the export came from"
        ) from None


def _training_time_meta(d: Path) -> tuple[dict[str, Any], Path]:
    """``(qwha_base.json, base folder)`` of an adapter directory after the checks every reference load makes
    (files present and intact, base hash when recorded)."""
    from .formats.adapter_dir import BASE_FILE, BASE_META, check_base_hash

    if not (d / BASE_FILE).is_file():
        raise ValueError(f"{d} is not a complete qwha-export adapter directory (missing {BASE_FILE}); run init again")
    meta = json.loads((d / BASE_META).read_text())
    base = Path(meta["base_model"])
    if not base.is_dir():
        raise ValueError(f"base model folder {base} (from {BASE_META}) does not exist")
    _check_files(base, d / BASE_FILE, d / "adapter_model.safetensors")
    check_base_hash(base, meta.get("base_hash"))
    return meta, base


def load_reference(adapter_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The reference model of ``verify --against`` and its tokenizer (or None), whole in memory: for an adapter
    directory the training-time model (quantized base + peft adapter), for an export folder that export
    (:func:`load_export`). :func:`verify_export` runs the same layers block by block (:func:`reference_stream`).

    For adapter directories this is the construction of :func:`qwha_export.pipeline.load_qwha_model`, but a base
    without tokenizer files or without a recorded ``base_hash`` is accepted."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from .converters.quantize import QuantizedWeight
    from .formats.adapter_dir import BASE_FILE
    from .fused import _try_tokenizer
    from .quant_linear import QuantLinear, replace_linear
    from .tuner import load_qwha_adapter

    d = Path(adapter_dir)
    if reference_kind(d) != "training-time":  # an export folder: its loader checks its files first
        return load_export(d, dtype=dtype)[0], _try_tokenizer(d)
    meta, base = _training_time_meta(d)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype, use_safetensors=True, local_files_only=True)
    tensors = load_file(str(d / BASE_FILE))
    for name in meta.get("quantized_layers", []):
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"quantized layer {name} does not exist in base model {base}") from None
        replace_linear(model, name, QuantLinear.from_linear(linear, QuantizedWeight.from_dict(tensors, f"{name}.")))
    return load_qwha_adapter(model.eval(), str(d)).eval(), _try_tokenizer(base)


def _training_time_source(d: Path, dtype: torch.dtype, meta: dict[str, Any], base: Path):
    """The training-time model of an adapter directory as a block source: base tensors from the base shards, the
    quantized layers from ``quantized_base.safetensors`` and the spectra, one layer at a time."""
    from safetensors import safe_open

    from .converters.adapter_source import LazySpectra, read_quantized_layer
    from .formats.adapter_dir import BASE_FILE
    from .fused import QuantizedSource

    qpath = d / BASE_FILE
    with safe_open(str(qpath), framework="pt") as f:
        qkeys = set(f.keys())

    def read(layer: str, state: dict[str, torch.Tensor], rel: str):
        weight = state.pop(f"{rel}.weight", None)
        if weight is None:
            raise ValueError(f"quantized layer {layer} does not exist in base model {base}")
        qw = read_quantized_layer(qpath, layer, qkeys)
        if qw.shape != tuple(weight.shape):
            raise ValueError(f"quantized weight {qw.shape} does not match layer {tuple(weight.shape)}")
        return qw

    return QuantizedSource(base, dtype, set(meta.get("quantized_layers", [])), read, LazySpectra(d))


def reference_stream(adapter_dir: str | Path, dtype: torch.dtype = torch.float32, **stream_kw: Any):
    """``(BlockStream, tokenizer or None)`` of the reference of :func:`load_reference`, run block by block."""
    from .converters.block_stream import BlockStream
    from .fused import _try_tokenizer

    d = Path(adapter_dir)
    kind = reference_kind(d)
    if kind != "training-time":
        return export_stream(d, ExportFormat.parse(kind), dtype, **stream_kw), _try_tokenizer(d)
    meta, base = _training_time_meta(d)
    source = _training_time_source(d, dtype, meta, base)
    return BlockStream(base, source, dtype, **stream_kw), _try_tokenizer(base)


def export_stream(export_dir: str | Path, fmt: ExportFormat, dtype: torch.dtype = torch.float32, **stream_kw: Any):
    """The :class:`~qwha_export.converters.block_stream.BlockStream` of a torch-loadable export folder (files
    checked first)."""
    from .converters.block_stream import BlockStream
    from .fused import export_source

    if fmt == ExportFormat.ONNX:
        raise ValueError(f"{export_dir}: an ONNX export runs in onnxruntime as one graph, not block by block")
    _check_export_files(Path(export_dir), fmt)
    return BlockStream(export_dir, export_source(export_dir, fmt, dtype), dtype, **stream_kw)


def verify_export(
    export_dir: str | Path,
    adapter_dir: str | Path,
    text: str | None = None,
    tokens: int = 2048,
    seq_len: int = 256,
    batch_size: int = 4,
    chunks: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    quiet: bool = True,
    **stream_kw: Any,
) -> dict[str, Any]:
    """Logit / perplexity comparison of ``export_dir`` against the training-time model of ``adapter_dir``.

    Evaluation tokens: ``chunks`` (a ``(n, seq_len)`` LongTensor, bypasses text and tokenizer), or ``text`` cut with
    :func:`qwha_export.data.token_chunks` into ``seq_len`` chunks, at most ``tokens`` tokens from its start, or by
    default the held-out **end** of the Lee corpus (its beginning is the calibration text of ``init`` and
    ``merge``; the two cannot overlap unless calibration plus evaluation exceed the corpus, 75,680 tokens
    for SmolLM2), using the export's tokenizer, else the base model's (:class:`NoTokenizerError` when neither has
    one). Returns ``tokens``, ``max_abs_logit_diff``,
    ``mean_abs_logit_diff``, ``kl_per_token`` (KL(reference || export)), ``top1_agreement``, ``ppl_export``,
    ``ppl_reference`` and ``format``. Unless ``quiet``, a progress bar per block-by-block run.
    """
    for name, v, low in (("seq_len", seq_len, 2), ("tokens", tokens, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer of at least {low}, got {v!r}")
    fmt = detect_format(export_dir)  # fail fast on unknown folders
    _check_export_files(Path(export_dir), fmt)  # and on truncated / corrupt files, before the reference loads
    kind = reference_kind(adapter_dir)
    reference, ref_tok = reference_stream(adapter_dir, dtype=dtype, **stream_kw)
    try:
        chunks = _evaluation_chunks(export_dir, ref_tok, text, tokens, seq_len, chunks)
        comparison, qwha_ops = _compare_streams(
            reference, export_dir, fmt, chunks, batch_size, dtype, stream_kw, quiet
        )
    finally:
        reference.close()
    out: dict[str, Any] = comparison.result()
    out["ppl_export"] = out.pop("ppl_test")
    out.update(format=fmt.value, reference=kind)
    if fmt == ExportFormat.ONNX:  # "native" (qwha_export.ortops kernels), "function" or "none"
        out["qwha_ops"] = qwha_ops
    return out


def _evaluation_chunks(export_dir, ref_tok, text: str | None, tokens: int, seq_len: int, chunks) -> torch.Tensor:
    from .fused import _try_tokenizer

    if chunks is None:
        from .data import lee_corpus_text, token_chunks

        tok = _try_tokenizer(Path(export_dir)) or ref_tok
        if tok is None:
            raise NoTokenizerError(f"neither {export_dir} nor the base model has a tokenizer; pass chunks= token ids")
        if text is None:
            chunks = token_chunks(tok, lee_corpus_text(), seq_len, max_tokens=tokens, from_end=True)
        else:
            chunks = token_chunks(tok, text, seq_len, max_tokens=tokens)
    if not isinstance(chunks, torch.Tensor) or chunks.dim() != 2 or chunks.dtype.is_floating_point:
        raise ValueError("chunks must be a 2-D integer tensor of token ids (n_chunks, seq_len)")
    return chunks


def _block_bar(bars: contextlib.ExitStack, stream, desc: str, quiet: bool):
    """``on_block`` of :meth:`BlockStream.run`: a progress bar over the stream's blocks, closed by ``bars`` (so an
    error ends the bar's line before its own message)."""
    bar = bars.enter_context(tqdm(total=stream.n_blocks, desc=desc, unit="block", disable=quiet))

    def advance(index: int, *_: Any) -> None:
        bar.update()
        if index == bar.total - 1:
            bar.close()

    return advance


def _compare_streams(reference, export_dir, fmt, chunks, batch_size: int, dtype, stream_kw, quiet: bool = True):
    """The reference run block by block to its final hidden states (kept, or spilled), then the export the same
    way (ONNX: one onnxruntime session per block, :class:`~qwha_export.onnx_runtime.OnnxBlocks`), logits compared
    batch by batch. Returns the comparison and, for ONNX, the path the qwha ops ran (``native``, ``function`` or
    ``none``; else None)."""
    from .converters.block_stream import in_step, logit_rows

    comparison = LogitComparison()
    with contextlib.ExitStack() as bars:
        ref_hidden = reference.run(chunks, batch_size, on_block=_block_bar(bars, reference, "parity: reference", quiet))
    try:
        if fmt == ExportFormat.ONNX:  # block by block too: one onnxruntime session per block
            from .onnx_runtime import OnnxBlocks

            export = OnnxBlocks(export_dir)
            rows = logit_rows(batch_size, chunks.shape[1], reference.layout.vocab_size)
            pairs = in_step(reference.logits(ref_hidden, rows), export.logits(chunks, rows))
            for (start, ref_logits), (_, exp_logits) in pairs:
                ids = chunks[start : start + ref_logits.shape[0]].long()
                comparison.update(ref_logits, extract_logits(exp_logits).float(), ids)
                del ref_logits, exp_logits
            return comparison, export.qwha_ops
        with export_stream(export_dir, fmt, dtype, **stream_kw) as stream:
            with contextlib.ExitStack() as bars:
                exp_hidden = stream.run(chunks, batch_size, on_block=_block_bar(bars, stream, "parity: export", quiet))
            try:
                pairs = in_step(reference.logits(ref_hidden, batch_size), stream.logits(exp_hidden, batch_size))
                for (start, ref_logits), (_, exp_logits) in pairs:  # in_step: no batch's logits kept past its turn
                    comparison.update(ref_logits, exp_logits, chunks[start : start + ref_logits.shape[0]].long())
                    del ref_logits, exp_logits
            finally:
                exp_hidden.close()
    finally:
        ref_hidden.close()
    return comparison, None


def heldout_parity(
    export_dir: str | Path, adapter_dir: str | Path, tokens: int = 512, seq_len: int = 256, quiet: bool = True
) -> dict[str, Any]:
    """The short parity check that ``merge`` and ``fuse`` store in the manifest: :func:`verify_export` on ``tokens``
    held-out tokens (the end of the Lee corpus; ``seq_len`` capped at ``tokens``), plus ``seconds``. Returns
    ``{"skipped": reason}`` when neither folder has a tokenizer."""
    import time

    t0 = time.time()
    try:
        out = verify_export(export_dir, adapter_dir, tokens=tokens, seq_len=max(2, min(seq_len, tokens)), quiet=quiet)
    except NoTokenizerError:
        return {"skipped": "no tokenizer files in the base model folder to tokenize the held-out text with"}
    out["text"] = "lee-corpus-heldout-end"
    out["seconds"] = time.time() - t0
    return out
