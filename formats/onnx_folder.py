"""The one check of an ONNX export folder before anything hands it to onnxruntime (verify, serving, push).

:func:`read_onnx_model` reads a ``*.onnx`` graph without its external data and checks every tensor stored outside
the graph (initializers, sparse initializers, tensor attributes, subgraphs and the bodies of model-local
functions): its external data file must name a location inside the folder, exist, and be long enough for
``offset + length``. Each failure is a one-line ``ValueError`` that names the file and says what to do, so a
missing or truncated ``model.onnx.data`` never reaches onnxruntime (whose own error is a traceback).
:func:`check_onnx_folder` finds the folder's model (``genai_config.json``'s decoder ``filename``, else
``model.onnx``) and reads it that way.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MODEL_FILE",
    "DATA_FILE",
    "check_onnx_folder",
    "external_data_files",
    "onnx_graph_tensors",
    "onnx_node_tensors",
    "read_onnx_model",
]

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
_RERUN = "re-run `qwha-export export-onnx`"


def onnx_graph_tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of an ONNX graph: initializers, sparse initializers, tensor attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    yield from onnx_node_tensors(graph.node)


def onnx_node_tensors(nodes: Sequence[Any]) -> Iterator[Any]:
    """Every TensorProto held by ``nodes``' attributes (tensors, and the tensors of their subgraphs)."""
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from onnx_graph_tensors(attr.g)
            for g in attr.graphs:
                yield from onnx_graph_tensors(g)


def _model_tensors(proto: Any) -> Iterator[Any]:
    yield from onnx_graph_tensors(proto.graph)
    yield from onnx_node_tensors([n for fn in proto.functions for n in fn.node])


def external_data_files(proto: Any) -> dict[str, int]:
    """``{location: bytes needed}`` of the external data a ModelProto (read without its data) refers to."""
    import onnx

    needed: dict[str, int] = {}
    for t in _model_tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc:
            raise ValueError(f"tensor {t.name!r} is stored externally but names no file; {_RERUN}")
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        needed[loc] = max(needed.get(loc, 0), end)
    return needed


def read_onnx_model(path: str | os.PathLike[str]) -> Any:
    """The ModelProto of ``path`` without its external data, after checking every external data file it names
    (inside the model's folder, present, at least ``offset + length`` bytes); one-line ``ValueError`` otherwise."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path.parent}: no {path.name}; export one with `qwha-export export-onnx SRC --out DIR`")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a readable ONNX model ({first}); {_RERUN}") from None
    folder = path.parent.resolve()
    try:
        needed = external_data_files(proto)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    for loc, end in sorted(needed.items()):
        data = (path.parent / loc).resolve()
        if Path(loc).is_absolute() or folder not in data.parents:
            raise ValueError(f"{path}: external data {loc!r} points outside the folder; {_RERUN}")
        if not data.is_file():
            raise ValueError(
                f"{path}: external data file {loc} is missing (copy it next to {path.name} or {_RERUN})"
            )
        size = data.stat().st_size
        if size < end:
            raise ValueError(f"{path}: external data file {loc} is truncated ({size} bytes, needs {end}); {_RERUN}")
    return proto


def check_onnx_folder(folder: str | os.PathLike[str]) -> tuple[Path, Any]:
    """``(model path, ModelProto without external data)`` of an ONNX export folder, checked by
    :func:`read_onnx_model`; the model file is ``genai_config.json``'s decoder ``filename``, else ``model.onnx``."""
    d = Path(folder).expanduser()
    if not d.is_dir():
        raise ValueError(f"ONNX folder {d} does not exist")
    name = MODEL_FILE
    genai = d / "genai_config.json"
    if genai.is_file():
        try:
            cfg = json.loads(genai.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{genai}: not valid JSON; {_RERUN}") from None
        decoder = ((cfg.get("model") or {}).get("decoder") or {}) if isinstance(cfg, dict) else {}
        name = decoder.get("filename") or MODEL_FILE if isinstance(decoder, dict) else MODEL_FILE
    return d / name, read_onnx_model(d / name)
