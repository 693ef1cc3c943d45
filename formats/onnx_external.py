"""External data of an ONNX graph written as the graph is made (I/O only, no math).

:class:`ExternalData` appends each initializer's raw little-endian bytes to one data file (``model.onnx.data``) the
moment the graph writer creates it, and hands back a ``TensorProto`` that carries only the name, dims, data type and
``external_data`` entries (``location``, ``offset``, ``length``) -- what ``onnx.save_model(...,
save_as_external_data=True, all_tensors_to_one_file=True)`` leaves in a graph -- so no initializer is held in memory
and the graph is saved with a plain ``onnx.save_model(proto, path)``. Tensors onnx would keep inline
(``sys.getsizeof(raw_data) < size_threshold``, its test with ``size_threshold=1024``) stay inline. Each tensor starts
at a multiple of 64 bytes; tensors of at least :data:`PAGE_ALIGN_FROM` bytes at a multiple of 4096 (a page, so
onnxruntime can map them rather than read them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

__all__ = ["ExternalData", "PAGE_ALIGN_FROM"]

ALIGN = 64
PAGE = 4096
PAGE_ALIGN_FROM = 1 << 20
_BYTES_HEADER = sys.getsizeof(b"")  # onnx's size test counts the header of the bytes object holding raw_data


class ExternalData:
    """An external data file being written (a context manager; closed on exit). :meth:`tensor` writes one array."""

    def __init__(self, path: str | os.PathLike[str], size_threshold: int = 1024) -> None:
        self.path = Path(path)
        self.size_threshold = size_threshold
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close() / __exit__
        self._end = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        """The ``TensorProto`` of ``array`` named ``name``: inline below the size threshold, else its bytes appended
        to the file and only a reference kept."""
        arr = np.asarray(array, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if arr.nbytes + _BYTES_HEADER < self.size_threshold:
            return numpy_helper.from_array(arr, name)
        align = PAGE if arr.nbytes >= PAGE_ALIGN_FROM else ALIGN
        offset = -(-self._end // align) * align
        self._file.write(b"\0" * (offset - self._end))
        self._file.write(arr.reshape(-1).view(np.uint8).data)
        self._end = offset + arr.nbytes
        proto = TensorProto(name=name, dims=arr.shape, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype))
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", offset), ("length", arr.nbytes)):
            proto.external_data.add(key=key, value=str(value))
        return proto

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ExternalData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
