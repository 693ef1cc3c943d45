"""Running an exported ONNX folder as a model: an onnxruntime session (the native qwha kernels registered when
available, :mod:`qwha_export.ortops`) and :class:`OnnxLogits` (``logits = m(input_ids)``), which verify, eval and the
export-time parity check use. Every folder is checked first (:mod:`qwha_export.formats.onnx_folder`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .formats.onnx_folder import MODEL_FILE

__all__ = ["OnnxBlocks", "OnnxLogits", "check_external_data", "onnx_session", "open_onnx_session"]


def check_external_data(model_path: str | os.PathLike[str]) -> list[str]:
    """The external data files ``model_path`` refers to; one-line ``ValueError`` if the graph or one of them is
    missing, outside the folder or truncated (:func:`qwha_export.formats.onnx_folder.read_onnx_model`)."""
    from .formats.onnx_folder import external_data_files, read_onnx_model

    return sorted(external_data_files(read_onnx_model(model_path)))


def open_onnx_session(folder: str | os.PathLike[str], threads: int | None = None, providers: list[str] | None = None):
    """An ``onnxruntime.InferenceSession`` of ``folder/model.onnx`` (checked for missing external data first)."""
    return onnx_session(folder, threads, providers)[0]


def _options(threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    return so


def _has_external_folder_option() -> bool:
    """Whether this onnxruntime has ``session.model_external_initializers_file_folder_path`` (1.21+: C API 21)."""
    from .ortops import OrtOpsError, runtime_api_version

    try:
        return runtime_api_version()[1] >= 21
    except OrtOpsError:  # not a 1.x runtime: a later one
        return True


def onnx_session(folder: str | os.PathLike[str], threads: int | None = None, providers: list[str] | None = None):
    """``(session, qwha ops path)`` of ``folder/model.onnx``: the native qwha kernels registered when available
    (:func:`qwha_export.ortops.inference_session`; the path is ``native``, ``function`` or ``none``)."""
    from .ortops import inference_session

    path = Path(folder) / MODEL_FILE
    check_external_data(path)
    return inference_session(path, _options(threads), providers or ["CPUExecutionProvider"])


class OnnxLogits:
    """``logits = OnnxLogits(folder)(input_ids)``: one full-sequence call with an all-ones mask and an empty cache.

    ``input_ids`` a ``(batch, seq)`` integer tensor; returns float32 torch logits ``(batch, seq, vocab)``.
    """

    def __init__(self, folder: str | os.PathLike[str], threads: int | None = None):
        self.session, self.qwha_ops = onnx_session(folder, threads)  # qwha_ops: "native", "function" or "none"
        self.past = {  # past key/value input -> (KV heads, head size)
            i.name: (int(i.shape[1]), int(i.shape[3]))
            for i in self.session.get_inputs()
            if i.name.startswith("past_key_values.")
        }

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = np.asarray(input_ids.cpu().numpy(), dtype=np.int64)
        return torch.from_numpy(self.session.run(["logits"], _full_sequence_feed(ids, self.past))[0])


def _full_sequence_feed(ids: np.ndarray, past: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """The graph inputs of one full-sequence call on ``ids`` ``(batch, seq)``: an all-ones mask, positions from 0
    and an empty cache (``past``: each past key/value input's KV heads and head size)."""
    b, s = ids.shape
    feed = {
        "input_ids": ids,
        "attention_mask": np.ones((b, s), np.int64),
        "position_ids": np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy(),
    }
    for name, (kv_heads, head_dim) in past.items():
        feed[name] = np.zeros((b, kv_heads, 0, head_dim), np.float32)
    return feed


class OnnxBlocks:
    """The logits of an ONNX export computed one decoder block at a time, so that a check holds one block's weights,
    not the model's: ``for start, logits in OnnxBlocks(folder).logits(input_ids, rows): ...``.

    The graph's prompt body is cut into stages (:func:`qwha_export.formats.onnx_stages.decoder_stages`: the
    embedding, each block, the head); each stage gets its own onnxruntime session over the folder's external data,
    runs on every batch of rows, and is closed before the next one opens. What passes from stage to stage (the
    hidden state, the residual, the masks) is kept per batch. Same kernels and inputs as :class:`OnnxLogits` (an
    all-ones mask and an empty cache), so the same logits. ``qwha_ops``: the path the qwha ops ran (``native``,
    ``function`` or ``none``), known once :meth:`logits` has run.
    """

    def __init__(self, folder: str | os.PathLike[str], threads: int | None = None):
        from .formats.onnx_folder import read_onnx_model
        from .formats.onnx_stages import decoder_stages

        self.folder = Path(folder)
        proto = read_onnx_model(self.folder / MODEL_FILE)
        # a stage read from memory finds its external data through this session option (onnxruntime >= 1.21);
        # older runtimes run the whole graph (OnnxLogits)
        self.stages = decoder_stages(proto) if _has_external_folder_option() else None
        dims = {i.name: i.type.tensor_type.shape.dim for i in proto.graph.input}
        self.past = {n: (d[1].dim_value, d[3].dim_value) for n, d in dims.items() if n.startswith("past_key_values.")}
        self.threads = threads
        self.qwha_ops: str | None = None

    def _session(self, stage, feed: dict[str, np.ndarray]):
        from onnx.helper import np_dtype_to_tensor_dtype

        from .ortops import FUNCTION, NATIVE, NONE, inference_session, model_uses_qwha_ops

        model = stage.model({k: np_dtype_to_tensor_dtype(v.dtype) for k, v in feed.items()})
        so = _options(self.threads)  # the stage's initializers are read from the folder's external data files
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.folder))
        uses = model_uses_qwha_ops(model)
        session, path = inference_session(model.SerializeToString(), so, ["CPUExecutionProvider"], uses)
        rank = {None: 0, NONE: 1, FUNCTION: 2, NATIVE: 3}
        if rank[path] > rank[self.qwha_ops]:
            self.qwha_ops = path
        return session

    def logits(self, input_ids: torch.Tensor, rows: int = 4):
        """``(start row, float32 logits (b, seq, vocab))`` per batch of at most ``rows`` rows of ``input_ids``
        ``(batch, seq)``: every stage but the head runs on all batches first; the head then yields one batch at a
        time."""
        ids = np.asarray(input_ids.cpu().numpy(), dtype=np.int64)
        starts = list(range(0, ids.shape[0], max(1, int(rows))))
        if self.stages is None:
            whole = OnnxLogits(self.folder, self.threads)
            self.qwha_ops = whole.qwha_ops
            for start in starts:
                yield start, whole(input_ids[start : start + rows])
            return
        graph = [_full_sequence_feed(ids[s : s + rows], self.past) for s in starts]
        carried: list[dict[str, np.ndarray]] = [{} for _ in starts]
        *body, head = self.stages
        for k, stage in enumerate(body):
            later = {n for st in self.stages[k + 1 :] for n in st.inputs}
            carried = self._run(stage, graph, carried, later)
        session = None
        try:
            for j, start in enumerate(starts):
                feed = self._feed(head, graph[j], carried[j])
                session = session or self._session(head, feed)
                out = session.run(head.outputs, feed)[0]
                carried[j] = {}
                yield start, torch.from_numpy(out)
        finally:
            del session

    def _feed(self, stage, graph: dict, carried: dict) -> dict[str, np.ndarray]:
        return {n: graph[n] if n in graph else carried[n] for n in stage.inputs}

    def _run(self, stage, graph: list[dict], carried: list[dict], later: set[str]) -> list[dict]:
        """``stage`` on every batch; per batch, the values that later stages read (``later``) afterwards."""
        session, out = None, []
        for g, c in zip(graph, carried, strict=True):
            feed = self._feed(stage, g, c)
            session = session or self._session(stage, feed)
            made = dict(zip(stage.outputs, session.run(stage.outputs, feed), strict=True))
            out.append({n: v for n, v in {**c, **made}.items() if n in later})
            del feed, made
        del session
        return out

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """All rows' logits at once (one batch)."""
        return torch.cat([lg for _, lg in self.logits(input_ids, rows=max(1, len(input_ids)))])
