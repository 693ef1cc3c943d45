"""ONNX building blocks of the QWHA export: MatMulNBits tensors, the ``qwha::WalshHadamard`` function, spectra layout.

Layout only (bit packing, reshapes, index tables); every number written here is computed by the caller.

**MatMulNBits** (``com.microsoft``, onnxruntime ``ContribOperators.md``) for a weight ``W`` of shape ``(N, K)``
quantized in blocks of ``block_size`` along ``K``, ``n_blocks = ceil(K / block_size)`` (a ragged last block's codes
are zero-padded in ``B``):

============  =====================================  ===========================================================
input         shape, dtype                           content
============  =====================================  ===========================================================
``B``         ``[N, n_blocks, blob]`` uint8          codes of row ``n``, block ``b``, packed little-endian:
                                                     ``blob = block_size * bits / 8``; for 4 bits the first code
                                                     of a byte is its low nibble, for 2 bits the lowest 2 bits
``scales``    ``[N, n_blocks]`` float32              one scale per (row, block)
``zero_points``  ``[N, ceil(n_blocks * bits / 8)]``  zero points packed the same way along the blocks of a row
                 uint8                               (a row's last byte is padded with zero bits)
============  =====================================  ===========================================================

and the runtime computes ``W[n, k] = (code - zero) * scale`` of the block of ``k``. Our QuantizedWeight codes, zero
points and float16 scales (cast exactly to float32) therefore dequantize to identical values. MatMulNBits supports
2, 4 and 8 bits: 3-bit codes are stored as 4-bit codes (exact, every code and zero point is < 8).

**qwha::WalshHadamard** (attributes ``n``, ``K``): ``y = x @ M_n.T`` along the last axis, ``M_n = H_K (x) H_{2^m}``
(the convention of :mod:`qwha_export.kernels.transform`). One ONNX function per size (``overload`` = ``"n<n>"``),
whose body uses standard ops only: ``x`` is viewed as ``[-1, K, f_1, ..., f_j]`` (``f_i`` Sylvester factors of
``2^m``, chosen by the caller) and every axis is multiplied by its small matrix with one ``MatMul`` (see
:func:`wht_function`). A runtime with a native kernel for ``qwha::WalshHadamard`` may use it instead of the body.

**Spectral product layout** (:func:`spectral_tables`): a sparse ``F`` (``d_out x n``) in a two-level ELL layout.
Row ``r``'s entries are split into pieces of ``width`` entries (the last one zero-padded); level 1 holds the
pieces (``cols1``/``vals1`` ``[n_pieces * width]``, piece ``p`` at ``[p*width, (p+1)*width)``, piece 0 all zero),
level 2 lists each row's pieces (``pieces2`` ``[d_out * depth]``, padded with piece 0). Then
``y[r] = sum_j sum_i vals1[p_j*w + i] * z[cols1[p_j*w + i]]`` with ``p_j = pieces2[r*depth + j]``. ``flat1`` (int32,
aligned with ``vals1``) is each slot's position ``col * d_out + row`` in a row-major ``F.T`` (``n x d_out``), so
``ScatterElements(zeros, flat1, vals1, reduction="add")`` rebuilds ``F.T`` (padding slots add 0 at position 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from onnx import FunctionProto, NodeProto, helper, numpy_helper

__all__ = [
    "WHT_DOMAIN",
    "WHT_OP",
    "MATMUL_NBITS_BITS",
    "pack_le",
    "matmul_nbits_tensors",
    "wht_overload",
    "wht_function",
    "wht_node",
    "SpectralTables",
    "spectral_tables",
]

WHT_DOMAIN = "qwha"
WHT_OP = "WalshHadamard"
MATMUL_NBITS_BITS: tuple[int, ...] = (2, 4, 8)


def pack_le(values: np.ndarray, bits: int) -> np.ndarray:
    """``(rows, L)`` unsigned values ``< 2**bits`` -> ``(rows, ceil(L * bits / 8))`` uint8, little-endian in a byte."""
    if bits not in MATMUL_NBITS_BITS:
        raise ValueError(f"bits={bits} cannot be packed into bytes; choose one of {MATMUL_NBITS_BITS}")
    v = np.asarray(values)
    if v.ndim != 2:
        raise ValueError(f"values must be 2-D, got shape {v.shape}")
    if v.size and (int(v.min()) < 0 or int(v.max()) >= (1 << bits)):
        raise ValueError(f"values must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    per = 8 // bits
    rows, length = v.shape
    pad = (-length) % per
    v = np.pad(v.astype(np.uint8), ((0, 0), (0, pad))).reshape(rows, -1, per)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(v << shifts, axis=2).astype(np.uint8)


def matmul_nbits_tensors(
    codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray, bits: int, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(B, scales, zero_points)`` of MatMulNBits for codes ``(N, K)``, zeros/scales ``(N, n_blocks)``.

    ``bits`` is the storage width (2, 4 or 8); ``n_blocks = ceil(K / block_size)``, a ragged last block's codes
    zero-padded in ``B`` (the runtime reads only ``K`` of them). ValueError when ``block_size`` is not a power of two
    >= 16 or the shapes disagree.
    """
    n, k = codes.shape
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"MatMulNBits block_size={block_size} must be a power of two >= 16")
    n_blocks = -(-k // block_size)
    if zeros.shape != (n, n_blocks) or scales.shape != (n, n_blocks):
        raise ValueError(f"zeros/scales must have shape {(n, n_blocks)}, got {zeros.shape} and {scales.shape}")
    codes = np.pad(codes, ((0, 0), (0, n_blocks * block_size - k)))
    b = pack_le(codes, bits).reshape(n, n_blocks, block_size * bits // 8)
    return b, np.ascontiguousarray(scales, dtype=np.float32), pack_le(zeros, bits)


# ----------------------------------------------------------------------------------------------------------------------
# WalshHadamard function
# ----------------------------------------------------------------------------------------------------------------------


def wht_overload(n: int) -> str:
    return f"n{n}"


def _const(name: str, array: np.ndarray) -> NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.ascontiguousarray(array), name))


def wht_function(n: int, k: int, factors: Sequence[np.ndarray], opset: int) -> FunctionProto:
    """The ``qwha::WalshHadamard`` function of size ``n``: ``Y = X @ M_n.T`` along the last axis of ``X``.

    ``factors``: the matrices applied to the axes of the view ``[-1, d_0, ..., d_j]`` of ``X``, outer axis first
    (``H_K`` first when ``K > 1``, then the Sylvester factors); their sizes must multiply to ``n``. Axis ``i < j`` is
    transformed as ``Reshape(y, [-1, d_i, d_(i+1)...d_j])`` then ``MatMul(H_i, y)``; the last axis as
    ``MatMul(y, H_j.T)`` on the previous view (no reshape), so ``n = K * 2^m`` with ``2^m <= max factor`` costs two
    MatMuls and two Reshapes.
    """
    sizes = [int(f.shape[0]) for f in factors]
    if int(np.prod(sizes)) != n or any(f.shape != (s, s) for f, s in zip(factors, sizes, strict=True)):
        raise ValueError(f"WalshHadamard factors {sizes} do not multiply to n={n}")
    nodes = [helper.make_node("Shape", ["X"], ["x_shape"])]
    cur = "X"
    last = len(sizes) - 1
    for i, (f, size) in enumerate(zip(factors, sizes, strict=True)):
        mat = f"h{i}"
        if i == last:  # y <- y @ H.T along the last axis of the current view
            if i == 0:
                nodes.append(_const("s_last", np.array([-1, size], np.int64)))
                nodes.append(helper.make_node("Reshape", [cur, "s_last"], ["r_last"]))
                cur = "r_last"
            nodes.append(_const(mat, np.ascontiguousarray(f.T, dtype=np.float32)))
            nodes.append(helper.make_node("MatMul", [cur, mat], [f"m{i}"]))
        else:  # y <- H @ y on the view [-1, size, rest]
            rest = int(np.prod(sizes[i + 1 :]))
            nodes.append(_const(mat, np.asarray(f, dtype=np.float32)))
            nodes.append(_const(f"s{i}", np.array([-1, size, rest], np.int64)))
            nodes.append(helper.make_node("Reshape", [cur, f"s{i}"], [f"r{i}"]))
            nodes.append(helper.make_node("MatMul", [mat, f"r{i}"], [f"m{i}"]))
        cur = f"m{i}"
    nodes.append(helper.make_node("Reshape", [cur, "x_shape"], ["Y"]))
    return helper.make_function(
        WHT_DOMAIN,
        WHT_OP,
        ["X"],
        ["Y"],
        nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["n", "K"],
        doc_string=f"Walsh-Hadamard transform of size n={n} (K={k}) along the last axis: Y = X @ M_n^T",
        overload=wht_overload(n),
    )


def wht_node(x: str, y: str, n: int, k: int, name: str) -> NodeProto:
    node = helper.make_node(WHT_OP, [x], [y], name=name, domain=WHT_DOMAIN, n=n, K=k)
    node.overload = wht_overload(n)
    return node


# ----------------------------------------------------------------------------------------------------------------------
# spectral product layout
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpectralTables:
    """Two-level ELL tables of a sparse ``F`` (see the module docstring)."""

    cols1: np.ndarray  # int64 [n_pieces * width]
    vals1: np.ndarray  # float32 [n_pieces * width]
    pieces2: np.ndarray  # int64 [d_out * depth]
    flat1: np.ndarray  # int32 [n_pieces * width]: cols1 * d_out + row of the slot (0 for padding, whose value is 0)
    n_pieces: int
    width: int
    depth: int
    d_out: int


def spectral_tables(
    rows: np.ndarray, cols: np.ndarray, values: np.ndarray, d_out: int, width: int = 16
) -> SpectralTables:
    """Lay out ``F[rows[e], cols[e]] = values[e]`` (duplicates are kept and add up) in two-level ELL tables."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    cols = np.asarray(cols, dtype=np.int64).reshape(-1)
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    if not rows.size == cols.size == values.size:
        raise ValueError(f"{values.size} values for {rows.size} rows and {cols.size} cols")
    if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= d_out):
        raise ValueError(f"row index out of range for d_out={d_out}")
    order = np.lexsort((cols, rows))
    rows, cols, values = rows[order], cols[order], values[order]
    counts = np.bincount(rows, minlength=d_out)
    row_pieces = -(-counts // width)  # ceil
    depth = max(1, int(row_pieces.max()) if rows.size else 1)
    n_pieces = 1 + int(row_pieces.sum())  # piece 0 is the all-zero padding piece
    first_piece = 1 + np.concatenate([[0], np.cumsum(row_pieces)[:-1]])
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(rows.size) - start[rows]  # position of each entry within its row
    slot = (first_piece[rows] + pos // width) * width + pos % width
    cols1 = np.zeros(n_pieces * width, np.int64)
    vals1 = np.zeros(n_pieces * width, np.float32)
    cols1[slot] = cols
    vals1[slot] = values
    if int(cols.max(initial=0) + 1) * d_out >= 2**31:
        raise ValueError(f"F.T of {d_out} x {int(cols.max()) + 1} has too many elements for int32 scatter indices")
    flat1 = np.zeros(n_pieces * width, np.int32)
    flat1[slot] = cols * d_out + rows
    j = np.arange(depth)
    pieces2 = np.where(j[None, :] < row_pieces[:, None], first_piece[:, None] + j[None, :], 0).reshape(-1)
    return SpectralTables(cols1, vals1, pieces2.astype(np.int64), flat1, n_pieces, width, depth, d_out)
