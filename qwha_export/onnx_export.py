"""``export_onnx``: an exported folder (merged, fused or dense) as an ONNX causal LM with a KV cache.

The source is read block by block (memory flat in depth): :func:`qwha_export.verify.export_stream` gives the model
skeleton on the meta device and the block source of the project's own loaders, whose blocks
:class:`qwha_export.converters.onnx_export.OnnxDecoder` materialises and converts one at a time while
:func:`qwha_export.formats.onnx_graph.build_decoder_model` writes the graph; every initializer goes to
``model.onnx.data`` as it is made (:class:`qwha_export.formats.onnx_external.ExternalData`), so neither the model
nor the graph's weights are ever held whole. The output folder::

    model.onnx            graph (IO names: qwha_export.formats.onnx_graph)
    model.onnx.data       the initializers (external data; those under 1 KiB stay in the graph, as onnx writes them)
    config.json           the source's config without quantization_config
    generation_config.json, tokenizer files, chat template (copied when the source has them)
    genai_config.json     onnxruntime-genai decoder description
    libqwha_ortops.so     the native qwha ops library (fused exports with ``bundle_ops``; named in genai_config.json)
    qwha_export.json      manifest: tool_version, settings (format "onnx", variant, bits, group_size,
                          accuracy_level), source (the source folder and its manifest), parity, files

Parity (``parity`` in the manifest and the model's metadata_props): logits of ONNX against the PyTorch model that
was exported, on ``parity_tokens`` deterministic token ids (one full-sequence call with an empty cache); the PyTorch
side runs block by block (:class:`~qwha_export.converters.block_stream.BlockStream`), and so does the ONNX side
(:class:`OnnxBlocks`: one onnxruntime session per decoder block, each closed before the next opens).

:func:`open_onnx_session` opens a folder written here (one-line ``ValueError`` if the graph or its external data is
missing); :class:`OnnxLogits` runs it like a model (``logits = m(input_ids)``, one session of the whole graph, for
serving and evaluation); :class:`OnnxBlocks` gives the same logits block by block, which the checks use.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .formats import ExportFormat
from .formats.jsonfile import read_json_object
from .formats.onnx_folder import DATA_FILE, MODEL_FILE
from .onnx_runtime import OnnxBlocks, OnnxLogits, check_external_data, onnx_session, open_onnx_session  # noqa: F401 - re-exported

__all__ = [
    "MODEL_FILE",
    "DATA_FILE",
    "export_onnx",
    "merge_to_onnx",
    "open_onnx_session",
    "onnx_session",
    "OnnxLogits",
    "check_external_data",
    "genai_config",
]

ACCURACY_LEVEL_4_WARNING = (
    "accuracy_level=4 makes MatMulNBits quantize activations to int8 per block; with outlier activations this is "
    "known to flip the argmax of the logits"
)


def _tool_version() -> str:
    from . import __version__

    return __version__


def _variant(fmt: ExportFormat) -> str:
    if fmt == ExportFormat.FUSED:
        return "fused"
    if fmt == ExportFormat.DENSE:
        return "dense"
    return "merged"


def export_onnx(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    accuracy_level: int = 0,
    overwrite: bool = False,
    quiet: bool = False,
    parity_tokens: int = 64,
    exact_lm_head: bool = True,
    bundle_ops: bool = False,
    head_bits: int | None = None,
) -> dict[str, Any]:
    """Export ``src`` (merged gptq/gptq_v2/compressed-tensors, fused, or dense HF folder) to ``out``; returns the
    manifest. ``accuracy_level`` (0-4) is MatMulNBits' attribute (4 warns). ``parity_tokens`` 0 skips the parity
    run. ``exact_lm_head``: with ``accuracy_level=4``, write an unquantized lm_head as a bit-identical 8-bit MatMulNBits
    when its weights lie on such a grid (quantized variants only; the dense variant stays float32 throughout).
    ``bundle_ops`` (fused exports): copy the native qwha ops library into ``out`` and name it in ``genai_config.json``
    (``model.decoder.session_options.custom_ops_library``), so onnxruntime-genai runs the native kernels.
    ``head_bits`` (8 or 4; None keeps them float32): RTN-quantize the embedding (GatherBlockQuantized) and the head
    (MatMulNBits), for large vocabularies; the parity check then measures its cost against the float head."""
    import onnx

    from .converters.onnx_export import OnnxDecoder, check_config
    from .formats.adapter_dir import atomic_output_dir, check_output_dir
    from .formats.dense import DenseFormat
    from .formats.manifest import MANIFEST_FILE, Manifest, Parity, Source, read_manifest, write_manifest
    from .formats.onnx_external import ExternalData
    from .formats.onnx_graph import build_decoder_model
    from .verify import detect_format, export_stream

    t0 = time.time()
    if isinstance(accuracy_level, bool) or accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level={accuracy_level!r} must be 0, 1, 2, 3 or 4")
    if accuracy_level == 4:
        warnings.warn(ACCURACY_LEVEL_4_WARNING, UserWarning, stacklevel=2)
    if head_bits is not None and (isinstance(head_bits, bool) or head_bits not in (8, 4)):
        raise ValueError(f"head_bits={head_bits!r} must be 8 or 4 (or None: float32)")
    if isinstance(parity_tokens, bool) or not isinstance(parity_tokens, int) or parity_tokens < 0:
        raise ValueError(f"parity_tokens={parity_tokens!r} must be a non-negative int")
    src = Path(src)
    check_output_dir(out, overwrite)
    fmt = detect_format(src)
    if fmt == ExportFormat.ONNX:
        raise ValueError(f"{src} is already an ONNX export")
    cfg = read_json_object(src / "config.json") if (src / "config.json").is_file() else {}
    check_config(cfg)
    variant = _variant(fmt)
    ops_lib = _ops_library(variant) if bundle_ops else None
    src_manifest = read_manifest(src) if (src / MANIFEST_FILE).is_file() else None
    # 8-bit MatMulNBits is fast only with int8 activations (accuracy_level 4); at levels 0-3 onnxruntime 1.32 runs it
    # ~20x slower than a float32 MatMul, so the exact 8-bit lm_head is used with level 4 only
    exact = exact_lm_head and variant != "dense" and accuracy_level == 4
    with export_stream(src, fmt, dtype=torch.float32) as stream, atomic_output_dir(out, overwrite) as tmp:
        # the model skeleton (meta device); the source materialises one block at a time while the graph is written
        decoder = OnnxDecoder(stream.model, accuracy_level, exact, head_bits, source=stream.source)
        spec = decoder.spec
        _say(quiet, f"writing the graph from {src} ({fmt.value}) block by block ({spec.num_layers} layers, {variant})")
        path = tmp / MODEL_FILE
        with ExternalData(tmp / DATA_FILE) as sink:  # initializers go to the data file as they are made
            proto = build_decoder_model(
                spec, decoder.weights, doc=f"qwha-export {variant} export of {src.name}", sink=sink
            )
        settings = {
            "format": ExportFormat.ONNX.value,
            "variant": variant,
            **_bits_and_group(decoder.quant_settings),
            "accuracy_level": accuracy_level,
            "head_bits": head_bits,
        }
        metadata = {
            "qwha_export.tool_version": _tool_version(),
            "qwha_export.settings": json.dumps(settings),
            "qwha_export.source_manifest": json.dumps(src_manifest.to_json() if src_manifest else None),
        }
        proto.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in metadata.items())
        onnx.save_model(proto, str(path))
        del proto
        onnx.checker.check_model(str(path))
        DenseFormat.write_config(tmp, src)
        aux = DenseFormat.copy_aux_files(src, tmp)
        files = {"model": MODEL_FILE, "data": DATA_FILE, "aux": aux}
        if ops_lib is not None:
            shutil.copy2(ops_lib, tmp / ops_lib.name)
            files["ops_library"] = ops_lib.name
        genai = genai_config(tmp, custom_ops_library=ops_lib.name if ops_lib else None)
        (tmp / "genai_config.json").write_text(json.dumps(genai, indent=2) + "\n")
        parity = None
        if parity_tokens:
            _say(quiet, "checking parity against the PyTorch model (block by block)")
            parity = {**_parity(stream, tmp, parity_tokens, spec.vocab_size), "reference": "pytorch"}
            _set_metadata(path, {"qwha_export.parity": json.dumps(parity)})
        manifest = Manifest(
            settings=settings,
            source=Source(path=str(src.resolve()), format=fmt.value, manifest=src_manifest),
            tool_version=_tool_version(),
            files=files,
            parity=Parity.from_json(parity),
            seconds=time.time() - t0,
            sections={"graph": decoder.info()},
        )
        write_manifest(tmp, manifest)
    _say(quiet, f"wrote {out}")
    return manifest.to_json()


def merge_to_onnx(job, *, accuracy_level: int = 0) -> dict[str, Any]:
    """``merge ... --format onnx``: run ``job`` (a :class:`qwha_export.pipeline.MergeJob` whose ``format`` is the
    intermediate checkpoint format, ``gptq_v2`` or ``dense``) into a temporary folder beside ``job.out``, then
    :func:`export_onnx` it into ``job.out``. The manifest gains ``merge`` (the merge report's totals and parity)."""
    import dataclasses
    import tempfile

    from .formats.adapter_dir import check_output_dir
    from .formats.manifest import read_manifest, write_manifest
    from .pipeline import merge_qwha

    check_output_dir(job.out, job.overwrite)
    if isinstance(accuracy_level, bool) or accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level={accuracy_level!r} must be 0, 1, 2, 3 or 4")
    out = Path(job.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.merge-", dir=out.parent) as tmp:
        merged = Path(tmp) / "merged"
        merge_report = merge_qwha(dataclasses.replace(job, out=str(merged), overwrite=False))
        export_onnx(merged, out, accuracy_level=accuracy_level, overwrite=job.overwrite, quiet=job.quiet)
    manifest = read_manifest(out).with_sections(
        merge={k: merge_report.get(k) for k in ("settings", "total", "parity") if k in merge_report}
    )
    write_manifest(out, manifest)
    return manifest.to_json()


def _ops_library(variant: str) -> Path:
    """The native qwha ops library to bundle; one-line ValueError when the export has no qwha ops or none is built."""
    from .ortops import OrtOpsError, find_library

    if variant != "fused":
        raise ValueError(f"--bundle-ops is for fused exports: a {variant} export has no qwha ops")
    try:
        return find_library()
    except OrtOpsError as exc:
        raise ValueError(f"--bundle-ops: no native qwha ops library ({exc})") from None


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        import click

        click.echo(msg, err=True)


def _bits_and_group(settings: set[tuple[int, int]]) -> dict[str, Any]:
    """The manifest's ``bits`` / ``group_size`` of the ``(bits, group_size)`` of every quantized layer (32 / None:
    none)."""
    if not settings:
        return {"bits": 32, "group_size": None}
    if len(settings) == 1:
        bits, gs = next(iter(settings))
        return {"bits": bits, "group_size": gs}
    return {"bits": sorted({b for b, _ in settings}), "group_size": sorted({g for _, g in settings})}


def _set_metadata(path: Path, entries: dict[str, str]) -> None:
    """Add ``entries`` to the metadata_props of ``path`` without touching its external data file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    keep = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in entries.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    onnx.save_model(model, str(path))


def _parity(stream, folder: Path, n_tokens: int, vocab: int) -> dict[str, Any]:
    """ONNX logits of ``folder`` against the PyTorch model of ``stream`` (a :class:`BlockStream`, run block by block
    before the onnxruntime sessions open, one block's at a time: :class:`OnnxBlocks`) on ``n_tokens`` deterministic
    token ids in two rows."""
    from .metrics import compare_logits

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, max(2, n_tokens // 2)), generator=gen)
    hidden = stream.run(ids, batch_size=len(ids))
    try:
        ref = torch.cat([logits for _, logits in stream.logits(hidden, batch_size=len(ids))])
    finally:
        hidden.close()
    onnx_logits = OnnxBlocks(folder)  # one block's session at a time, as the reference ran
    out = compare_logits(ref, onnx_logits(ids))
    out["max_abs_logit"] = float(ref.abs().max())
    out["qwha_ops"] = onnx_logits.qwha_ops
    return out


# ----------------------------------------------------------------------------------------------------------------------
# genai_config.json
# ----------------------------------------------------------------------------------------------------------------------


def genai_config(folder: str | os.PathLike[str], custom_ops_library: str | None = None) -> dict[str, Any]:
    """The onnxruntime-genai ``genai_config.json`` of an export folder (from its config.json and
    generation_config.json), in the layout written by onnxruntime-genai's model builder. ``custom_ops_library``: a
    library file name inside the folder for the decoder's session (onnxruntime-genai refuses paths outside it)."""
    d = Path(folder)
    cfg = read_json_object(d / "config.json")
    gen = read_json_object(d / "generation_config.json") if (d / "generation_config.json").is_file() else {}
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    ctx = int(cfg.get("max_position_embeddings", 2048))

    def pick(key: str, default: Any) -> Any:  # generation_config.json first, then config.json; nulls skipped
        for src in (gen, cfg):
            if src.get(key) is not None:
                return src[key]
        return default

    session_options: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    if custom_ops_library:
        session_options["custom_ops_library"] = custom_ops_library
    eos = pick("eos_token_id", 0)  # onnxruntime-genai needs numbers here
    first_eos = eos[0] if isinstance(eos, list) and eos else eos
    return {
        "model": {
            "bos_token_id": pick("bos_token_id", first_eos),
            "context_length": ctx,
            "decoder": {
                "session_options": session_options,
                "filename": MODEL_FILE,
                "head_size": head_dim,
                "hidden_size": int(cfg["hidden_size"]),
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": int(cfg["num_hidden_layers"]),
                "num_key_value_heads": int(cfg.get("num_key_value_heads", heads)),
            },
            "eos_token_id": eos,
            "pad_token_id": pick("pad_token_id", first_eos),
            "type": str(cfg["model_type"]),
            "vocab_size": int(cfg["vocab_size"]),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": bool(gen.get("do_sample", False)),
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": ctx,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
            "temperature": float(gen.get("temperature", 1.0)),
            "top_k": int(gen.get("top_k", 50)),
            "top_p": float(gen.get("top_p", 1.0)),
        },
    }
