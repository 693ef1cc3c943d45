"""Native onnxruntime kernels for the ``qwha`` ops of fused ONNX exports, with the function bodies as fallback.

A fused export computes each adapted projection group as ``qwha::SpectralAdd(x, MatMulNBits(x), ...)`` (or
``SpectralAddDense``), whose ONNX function body runs on any onnxruntime. When this package's custom-op library is
registered in a session, onnxruntime runs its native kernel instead (x86-64-v3 AVX2 code where the CPU has it, a
portable baseline otherwise), at merged-int4 speed.

* :func:`library_path` -- the library to register, or None: ``QWHA_ORT_OPS=0`` disables it, ``QWHA_ORT_OPS=PATH``
  names one; otherwise the per-user cache (:mod:`.build`), built on first use from headers already on the machine
  (never fetched here: ``qwha-export build-ops`` fetches them). Any failure prints one warning line saying why and
  returns None, so the caller runs the function bodies.
* :func:`inference_session` -- an ``onnxruntime.InferenceSession`` with the library registered when the model has
  qwha ops and runs on the CPU execution provider only (the CUDA EP stays on the function bodies), and which path
  ran: ``"native"`` (the library's kernels were created for this session), ``"function"`` (the model's function
  bodies) or ``"none"`` (no qwha ops in the model).
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Any

from .build import LIB_NAME, OrtOpsError, build_library, cache_root, library_tag, runtime_api_version

__all__ = [
    "ENV_VAR",
    "LIB_NAME",
    "NATIVE",
    "FUNCTION",
    "NONE",
    "OrtOpsError",
    "library_path",
    "find_library",
    "library_info",
    "reset",
    "model_uses_qwha_ops",
    "register",
    "inference_session",
    "build_library",
    "cache_root",
]

ENV_VAR = "QWHA_ORT_OPS"
NATIVE, FUNCTION, NONE = "native", "function", "none"
_DOMAIN = "qwha"
_REGISTERED = "qwha_export.ortops.library"  # session config entry marking options that carry the library
_warned: set[str] = set()
_resolved: dict[tuple[str, str], Path | None] = {}


def _warn(reason: str) -> None:
    """One line on stderr per reason and process."""
    if reason not in _warned:
        _warned.add(reason)
        sys.stderr.write(f"qwha-export: warning: native qwha ops not used ({reason}); running the function bodies\n")
        sys.stderr.flush()


def _check_api(lib: Path) -> None:
    tag = library_tag(lib)
    if tag is None:
        raise OrtOpsError(f"{lib} is not a qwha ops library")
    version, runtime = runtime_api_version()
    if int(tag["api"]) > runtime:
        raise OrtOpsError(
            f"{lib.name} was built for onnxruntime C API {tag['api']}, this onnxruntime ({version}) provides {runtime}"
        )


def find_library() -> Path:
    """The native library to register (the rules of :func:`library_path`), or OrtOpsError saying why not."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env == "0":
        raise OrtOpsError(f"{ENV_VAR}=0")
    if env and env != "1":
        lib = Path(env).expanduser()
        if not lib.is_file():
            raise OrtOpsError(f"{ENV_VAR}={env}: no such file")
    else:
        lib = build_library(fetch=False)
    _check_api(lib)
    return lib.resolve()


def library_path() -> Path | None:
    """The native library to register, or None (after one warning line saying why); see the module docstring."""
    key = (os.environ.get(ENV_VAR, ""), str(cache_root()))
    if key not in _resolved:
        try:
            _resolved[key] = find_library()
        except OrtOpsError as exc:
            _resolved[key] = None
            if str(exc) != f"{ENV_VAR}=0":  # disabled on purpose: no warning
                _warn(str(exc))
    return _resolved[key]


def reset() -> None:
    """Forget the resolved library and the warnings given, after changing ``QWHA_ORT_OPS`` or the cache."""
    _resolved.clear()
    _warned.clear()


def _lib(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))  # the same handle onnxruntime's dlopen of this path returns
    lib.QwhaOpsIsa.restype = ctypes.c_char_p
    for name in ("QwhaOpsKernelCount", "QwhaOpsBaselineKernelCount", "QwhaOpsLayoutCount", "QwhaOpsLayoutBytes"):
        getattr(lib, name).restype = ctypes.c_int64
    return lib


def library_info(path: Path) -> dict[str, Any]:
    """Counters of a library loaded in this process: kernels created (all, and those on the baseline code), live
    layouts and their bytes, and the instruction set new kernels get (``QWHA_ORT_OPS_ISA=baseline`` forces it)."""
    lib = _lib(path)
    return {
        "kernels": int(lib.QwhaOpsKernelCount()),
        "baseline_kernels": int(lib.QwhaOpsBaselineKernelCount()),
        "layouts": int(lib.QwhaOpsLayoutCount()),
        "layout_bytes": int(lib.QwhaOpsLayoutBytes()),
        "isa": lib.QwhaOpsIsa().decode(),
    }


def model_uses_qwha_ops(model: Any) -> bool:
    """True when a ``ModelProto`` (external data not needed) calls ``qwha`` ops, in its graph or its subgraphs."""

    def nodes(graph):
        for n in graph.node:
            yield n
            for a in n.attribute:
                if a.HasField("g"):
                    yield from nodes(a.g)
                for g in a.graphs:
                    yield from nodes(g)

    return any(n.domain == _DOMAIN for n in nodes(model.graph))


def register(options: Any, providers: list[str] | None = None) -> Path | None:
    """Register the library in ``options`` (an ``onnxruntime.SessionOptions``) unless a non-CPU provider is asked
    for; returns its path, or None (registration failures warn once)."""
    if providers and any(p not in ("CPUExecutionProvider", "cpu") for p in providers):
        return None  # the kernels are CPU kernels: CUDA sessions keep the function bodies
    try:  # these options already carry the library (registering it twice fails the session)
        return Path(options.get_session_config_entry(_REGISTERED))
    except Exception:  # onnxruntime raises when the entry is absent
        pass
    lib = library_path()
    if lib is None:
        return None
    try:
        options.register_custom_ops_library(str(lib))
        options.add_session_config_entry(_REGISTERED, str(lib))
    except Exception as exc:  # onnxruntime raises its own Fail type
        _warn(f"onnxruntime refused {lib.name}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}")
        return None
    return lib


def inference_session(
    model: str | os.PathLike[str] | bytes,
    options: Any = None,
    providers: list[str] | None = None,
    uses_qwha_ops: bool | None = None,
) -> tuple[Any, str]:
    """``(onnxruntime.InferenceSession, path)`` with the library registered where it applies (module docstring).

    ``uses_qwha_ops``: whether the model has qwha ops (None: read the graph from ``model``, without external data).
    """
    import onnxruntime as ort

    if uses_qwha_ops is None:
        import onnx

        if isinstance(model, bytes):
            proto = onnx.load_from_string(model)
        else:
            proto = onnx.load(str(model), load_external_data=False)
        uses_qwha_ops = model_uses_qwha_ops(proto)
        del proto
    so = options if options is not None else ort.SessionOptions()
    providers = list(providers or ["CPUExecutionProvider"])
    lib = register(so, providers) if uses_qwha_ops else None
    before = library_info(lib)["kernels"] if lib else 0
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, so, providers=providers)
    if not uses_qwha_ops:
        return session, NONE
    return session, NATIVE if lib and library_info(lib)["kernels"] > before else FUNCTION
