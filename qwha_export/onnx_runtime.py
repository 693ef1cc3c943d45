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

__all__ = ["OnnxLogits", "check_external_data", "onnx_session", "open_onnx_session"]


def check_external_data(model_path: str | os.PathLike[str]) -> list[str]:
    """The external data files ``model_path`` refers to; one-line ``ValueError`` if the graph or one of them is
    missing, outside the folder or truncated (:func:`qwha_export.formats.onnx_folder.read_onnx_model`)."""
    from .formats.onnx_folder import external_data_files, read_onnx_model

    return sorted(external_data_files(read_onnx_model(model_path)))


def open_onnx_session(folder: str | os.PathLike[str], threads: int | None = None, providers: list[str] | None = None):
    """An ``onnxruntime.InferenceSession`` of ``folder/model.onnx`` (checked for missing external data first)."""
    return onnx_session(folder, threads, providers)[0]


def onnx_session(folder: str | os.PathLike[str], threads: int | None = None, providers: list[str] | None = None):
    """``(session, qwha ops path)`` of ``folder/model.onnx``: the native qwha kernels registered when available
    (:func:`qwha_export.ortops.inference_session`; the path is ``native``, ``function`` or ``none``)."""
    import onnxruntime as ort

    from .ortops import inference_session

    path = Path(folder) / MODEL_FILE
    check_external_data(path)
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    return inference_session(path, so, providers or ["CPUExecutionProvider"])


class OnnxLogits:
    """``logits = OnnxLogits(folder)(input_ids)``: one full-sequence call with an all-ones mask and an empty cache.

    ``input_ids`` a ``(batch, seq)`` integer tensor; returns float32 torch logits ``(batch, seq, vocab)``.
    """

    def __init__(self, folder: str | os.PathLike[str], threads: int | None = None):
        self.session, self.qwha_ops = onnx_session(folder, threads)  # qwha_ops: "native", "function" or "none"
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = np.asarray(input_ids.cpu().numpy(), dtype=np.int64)
        b, s = ids.shape
        feed = {
            "input_ids": ids,
            "attention_mask": np.ones((b, s), np.int64),
            "position_ids": np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy(),
        }
        for i in self.past:
            feed[i.name] = np.zeros((b, int(i.shape[1]), 0, int(i.shape[3])), np.float32)
        return torch.from_numpy(self.session.run(["logits"], feed)[0])
