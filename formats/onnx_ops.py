"""ONNX building blocks of the QWHA export: MatMulNBits tensors, the ``qwha`` op functions, spectra layout.

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
:func:`wht_function`). Exports no longer call it on its own (the transform is part of ``SpectralAdd``).

**qwha::SpectralAdd** (inputs :data:`SPECTRAL_INPUTS` = ``X, Base, HK, values, flat, cols, pieces``; attributes
``n``, ``K``, ``pieces_shape = [n_pieces, width]``, ``rows_shape = [d_out, depth]``, ``ft_size = [n * d_out]``,
``ft_shape = [n, d_out]``): ``Y = Base + WHT_n(X) @ F.T`` with ``F`` in the ELL tables below and ``HK`` the
``K x K`` factor (``[[1]]`` when ``K = 1``), one call per adapted projection group. One function per size and path
(``overload`` ``"n<n>_<mode>"``, :data:`SPECTRAL_MODES`), whose body is the WHT body (``H_K`` read from ``HK``)
followed by the path's sparse product: ``token`` (one token, static ``[1, 1, n]`` shapes: ``GatherElements`` on
``WHT(X)``, then the two levels of sums), ``step`` (``[B, 1, n]``: the same on the flattened batch, row ``b``'s
indices offset by ``b * n``) or ``prompt`` (any shape: ``ScatterElements`` rebuilds ``F.T`` densely at run time from
``flat``, then one ``MatMul``). **qwha::SpectralAddDense** (``X, Base, HK, FT``; ``n``, ``K``): ``Y = Base +
WHT_n(X) @ FT`` with ``FT = F.T`` dense, for dense adapters. The attributes reach the bodies as ``Constant`` nodes
with ``ref_attr_name``. The native kernels of :mod:`qwha_export.ortops` implement both ops with these inputs, so
a session that registers them runs the kernels and one that does not inlines the bodies. (onnxruntime 1.32 cannot
resolve a model-local function called with an ``overload`` from inside another function, hence the WHT nodes are
written into each body rather than called.)

**Spectral product layout** (:func:`spectral_tables`): a sparse ``F`` (``d_out x n``) in a two-level ELL layout.
Row ``r``'s entries are split into pieces of ``width`` entries (the last one zero-padded); level 1 holds the
pieces (``cols1``/``vals1`` ``[n_pieces * width]``, piece ``p`` at ``[p*width, (p+1)*width)``, piece 0 all zero),
level 2 lists each row's pieces (``pieces2`` ``[d_out * depth]``, padded with piece 0). Then
``y[r] = sum_j sum_i vals1[p_j*w + i] * z[cols1[p_j*w + i]]`` with ``p_j = pieces2[r*depth + j]``. ``flat1`` (int32,
aligned with ``vals1``) is each slot's position ``col * d_out + row`` in a row-major ``F.T`` (``n x d_out``), so
``ScatterElements(zeros, flat1, vals1, reduction="add")`` rebuilds ``F.T`` (padding slots add 0 at position 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from onnx import AttributeProto, FunctionProto, NodeProto, TensorProto, helper, numpy_helper

__all__ = [
    "DOMAIN",
    "WHT_DOMAIN",
    "WHT_OP",
    "SPECTRAL_OP",
    "SPECTRAL_DENSE_OP",
    "SPECTRAL_MODES",
    "SPECTRAL_INPUTS",
    "SPECTRAL_DENSE_INPUTS",
    "MATMUL_NBITS_BITS",
    "pack_le",
    "matmul_nbits_tensors",
    "wht_overload",
    "wht_function",
    "wht_node",
    "wht_nodes",
    "spectral_overload",
    "spectral_function",
    "spectral_dense_function",
    "spectral_node",
    "spectral_dense_node",
    "qwha_functions",
    "SpectralTables",
    "TableShape",
    "spectral_tables",
]

DOMAIN = "qwha"
WHT_DOMAIN = DOMAIN
WHT_OP = "WalshHadamard"
SPECTRAL_OP = "SpectralAdd"
SPECTRAL_DENSE_OP = "SpectralAddDense"
SPECTRAL_MODES: tuple[str, ...] = ("decode", "prompt")
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


def _attr_const(name: str, attribute: str) -> NodeProto:
    """``Constant`` whose int64 list is the calling node's attribute ``attribute`` (a function-body reference)."""
    ref = AttributeProto()
    ref.name, ref.ref_attr_name, ref.type = "value_ints", attribute, AttributeProto.INTS
    node = helper.make_node("Constant", [], [name])
    node.attribute.append(ref)
    return node


def _check_factors(n: int, factors: Sequence[np.ndarray]) -> list[int]:
    sizes = [int(f.shape[0]) for f in factors]
    if int(np.prod(sizes)) != n or any(f.shape != (s, s) for f, s in zip(factors, sizes, strict=True)):
        raise ValueError(f"WalshHadamard factors {sizes} do not multiply to n={n}")
    return sizes


def wht_nodes(x: str, y: str, factors: Sequence[np.ndarray], hk: str | None = None) -> list[NodeProto]:
    """Nodes of ``Y = X @ M_n.T`` along the last axis (names local to a function body; see :func:`wht_function`).

    ``hk``: the name of an input that holds ``factors[0]`` (``H_K``), used instead of a ``Constant`` copy of it.
    """
    sizes = [int(f.shape[0]) for f in factors]
    nodes = [helper.make_node("Shape", [x], ["wht_shape"])]
    cur, last = x, len(sizes) - 1
    for i, (f, size) in enumerate(zip(factors, sizes, strict=True)):
        mat = f"wht_h{i}"
        if i == last:  # y <- y @ H.T along the last axis of the current view
            if i == 0:
                nodes.append(_const("wht_s_last", np.array([-1, size], np.int64)))
                nodes.append(helper.make_node("Reshape", [cur, "wht_s_last"], ["wht_r_last"]))
                cur = "wht_r_last"
            if i == 0 and hk:
                nodes.append(helper.make_node("Transpose", [hk], [mat]))
            else:
                nodes.append(_const(mat, np.ascontiguousarray(f.T, dtype=np.float32)))
            nodes.append(helper.make_node("MatMul", [cur, mat], [f"wht_m{i}"]))
        else:  # y <- H @ y on the view [-1, size, rest]
            rest = int(np.prod(sizes[i + 1 :]))
            if i == 0 and hk:
                mat = hk
            else:
                nodes.append(_const(mat, np.asarray(f, dtype=np.float32)))
            nodes.append(_const(f"wht_s{i}", np.array([-1, size, rest], np.int64)))
            nodes.append(helper.make_node("Reshape", [cur, f"wht_s{i}"], [f"wht_r{i}"]))
            nodes.append(helper.make_node("MatMul", [mat, f"wht_r{i}"], [f"wht_m{i}"]))
        cur = f"wht_m{i}"
    nodes.append(helper.make_node("Reshape", [cur, "wht_shape"], [y]))
    return nodes


def wht_function(n: int, k: int, factors: Sequence[np.ndarray], opset: int) -> FunctionProto:
    """The ``qwha::WalshHadamard`` function of size ``n``: ``Y = X @ M_n.T`` along the last axis of ``X``.

    ``factors``: the matrices applied to the axes of the view ``[-1, d_0, ..., d_j]`` of ``X``, outer axis first
    (``H_K`` first when ``K > 1``, then the Sylvester factors); their sizes must multiply to ``n``. Axis ``i < j`` is
    transformed as ``Reshape(y, [-1, d_i, d_(i+1)...d_j])`` then ``MatMul(H_i, y)``; the last axis as
    ``MatMul(y, H_j.T)`` on the previous view (no reshape), so ``n = K * 2^m`` with ``2^m <= max factor`` costs two
    MatMuls and two Reshapes.
    """
    _check_factors(n, factors)
    return helper.make_function(
        DOMAIN,
        WHT_OP,
        ["X"],
        ["Y"],
        wht_nodes("X", "Y", factors),
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["n", "K"],
        doc_string=f"Walsh-Hadamard transform of size n={n} (K={k}) along the last axis: Y = X @ M_n^T",
        overload=wht_overload(n),
    )


def wht_node(x: str, y: str, n: int, k: int, name: str) -> NodeProto:
    node = helper.make_node(WHT_OP, [x], [y], name=name, domain=DOMAIN, n=n, K=k)
    node.overload = wht_overload(n)
    return node


# ----------------------------------------------------------------------------------------------------------------------
# SpectralAdd / SpectralAddDense functions
# ----------------------------------------------------------------------------------------------------------------------

SPECTRAL_INPUTS = ["X", "Base", "HK", "values", "flat", "cols", "pieces"]
SPECTRAL_DENSE_INPUTS = ["X", "Base", "HK", "FT"]
_SPECTRAL_ATTRS = ["n", "K", "pieces_shape", "rows_shape", "ft_size", "ft_shape"]


def spectral_overload(n: int, mode: str) -> str:
    if mode not in SPECTRAL_MODES:
        raise ValueError(f"mode={mode!r} must be one of {SPECTRAL_MODES}")
    return f"n{n}_{mode}"


def _token_nodes(out: str) -> list[NodeProto]:
    """One token (``Z [1, 1, n]``): GatherElements of ``WHT(X)``, then the two levels of sums; ``out`` is ``[d_out]``
    (broadcasts against ``Base``)."""
    mk = helper.make_node
    return [
        mk("Reshape", ["cols", "c_113"], ["t_cols3"]),
        mk("GatherElements", ["Z", "t_cols3"], ["t_g1"], axis=2),
        mk("Reshape", ["values", "c_113"], ["t_vals3"]),
        mk("Mul", ["t_g1", "t_vals3"], ["t_p1"]),
        mk("Reshape", ["t_p1", "pieces_shape"], ["t_p1r"]),
        mk("ReduceSum", ["t_p1r", "c_axis1"], ["t_s1"], keepdims=0),
        mk("GatherElements", ["t_s1", "pieces"], ["t_g2"], axis=0),
        mk("Reshape", ["t_g2", "rows_shape"], ["t_s2"]),
        mk("ReduceSum", ["t_s2", "c_axis1"], [out], keepdims=0),
    ]


def _step_nodes(out: str, n: int) -> list[NodeProto]:
    """A batched decode step (``Z [B, 1, n]``, B > 1): the token path on the flattened batch, row ``b``'s indices
    offset by ``b * n`` (level 1) and ``b * n_pieces`` (level 2); ``out`` has ``Base``'s shape."""
    mk = helper.make_node
    return [
        _const("s_n", np.array(n, np.int64)),
        _const("s_0", np.array(0, np.int64)),
        _const("s_1", np.array(1, np.int64)),
        _const("s_axis2", np.array([2], np.int64)),
        mk("Squeeze", ["z_batch"], ["s_batch"]),
        mk("Range", ["s_0", "s_batch", "s_1"], ["s_rows"]),
        mk("Reshape", ["s_rows", "c_col"], ["s_rows_col"]),  # [B, 1]
        mk("Reshape", ["Z", "c_flat"], ["s_z_flat"]),  # [1, B * n]
        mk("Mul", ["s_rows_col", "s_n"], ["s_z_off"]),
        mk("Reshape", ["cols", "c_flat"], ["s_cols_row"]),
        mk("Add", ["s_cols_row", "s_z_off"], ["s_cols_b"]),  # [B, S]
        mk("Reshape", ["s_cols_b", "c_flat"], ["s_cols_flat"]),
        mk("GatherElements", ["s_z_flat", "s_cols_flat"], ["s_g1"], axis=1),
        mk("Concat", ["z_batch", "pieces_shape"], ["s_pieces_shape_b"], axis=0),
        mk("Reshape", ["s_g1", "s_pieces_shape_b"], ["s_g1r"]),  # [B, n_pieces, width]
        mk("Reshape", ["values", "pieces_shape"], ["s_vals2"]),
        mk("Mul", ["s_g1r", "s_vals2"], ["s_p1"]),
        mk("ReduceSum", ["s_p1", "s_axis2"], ["s_s1"], keepdims=0),  # [B, n_pieces]
        mk("Shape", ["s_s1"], ["s_s1_width"], start=1, end=2),
        mk("Mul", ["s_rows_col", "s_s1_width"], ["s_s1_off"]),
        mk("Reshape", ["pieces", "c_flat"], ["s_pieces_row"]),
        mk("Add", ["s_pieces_row", "s_s1_off"], ["s_pieces_b"]),
        mk("Reshape", ["s_pieces_b", "c_flat"], ["s_pieces_flat"]),
        mk("Reshape", ["s_s1", "c_flat"], ["s_s1_flat"]),
        mk("GatherElements", ["s_s1_flat", "s_pieces_flat"], ["s_g2"], axis=1),
        mk("Concat", ["z_batch", "rows_shape"], ["s_rows_shape_b"], axis=0),
        mk("Reshape", ["s_g2", "s_rows_shape_b"], ["s_s2"]),  # [B, d_out, depth]
        mk("ReduceSum", ["s_s2", "s_axis2"], ["s_s3"], keepdims=0),
        mk("Shape", ["Base"], ["s_base_shape"]),
        mk("Reshape", ["s_s3", "s_base_shape"], [out]),
    ]


def _sparse_product_nodes(mode: str, n: int) -> list[NodeProto]:
    """``A = WHT(X) @ F.T`` from the ELL tables (input ``Z`` = WHT(X)), for one mode (see the module docstring)."""
    mk = helper.make_node
    if mode == "decode":  # Z [B, 1, n]: If(B == 1) the single-token path, else the batched-step path
        floats = [helper.make_tensor_value_info(f"A_{b}", TensorProto.FLOAT, None) for b in ("token", "step")]
        return [
            _const("c_113", np.array([1, 1, -1], np.int64)),
            _const("c_flat", np.array([1, -1], np.int64)),
            _const("c_col", np.array([-1, 1], np.int64)),
            _const("c_axis1", np.array([1], np.int64)),
            _const("c_one", np.array([1], np.int64)),
            _attr_const("pieces_shape", "pieces_shape"),
            _attr_const("rows_shape", "rows_shape"),
            mk("Shape", ["Z"], ["z_batch"], start=0, end=1),
            mk("Equal", ["z_batch", "c_one"], ["one_row_1"]),
            mk("Squeeze", ["one_row_1"], ["one_row"]),
            mk(
                "If",
                ["one_row"],
                ["A"],
                then_branch=helper.make_graph(_token_nodes("A_token"), "token", [], floats[:1]),
                else_branch=helper.make_graph(_step_nodes("A_step", n), "step", [], floats[1:]),
            ),
        ]
    # any number of tokens: F.T rebuilt densely at run time by one ScatterElements, then one MatMul. The zeros' size
    # is made to depend on Z so that onnxruntime does not constant-fold F.T into a resident dense copy.
    return [
        _attr_const("ft_size", "ft_size"),
        _const("c_zero", np.array([0], np.int64)),
        mk("Shape", ["Z"], ["z_batch"], start=0, end=1),
        mk("Mul", ["z_batch", "c_zero"], ["z_zero"]),
        mk("Add", ["ft_size", "z_zero"], ["size"]),
        mk("ConstantOfShape", ["size"], ["zeros"], value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])),
        mk("ScatterElements", ["zeros", "flat", "values"], ["ft_flat"], axis=0, reduction="add"),
        _attr_const("ft_shape", "ft_shape"),
        mk("Reshape", ["ft_flat", "ft_shape"], ["ft"]),
        mk("MatMul", ["Z", "ft"], ["A"]),
    ]


def spectral_function(n: int, k: int, factors: Sequence[np.ndarray], mode: str, opset: int) -> FunctionProto:
    """The ``qwha::SpectralAdd`` function of size ``n`` for ``mode``: ``Y = Base + WHT_n(X) @ F.T``, ``F`` from the
    ELL tables (:func:`spectral_tables`); the WHT body of :func:`wht_function` with ``H_K`` read from input ``HK``."""
    _check_factors(n, factors)
    body = wht_nodes("X", "Z", factors, hk="HK" if k > 1 else None)
    body += _sparse_product_nodes(mode, n) + [helper.make_node("Add", ["Base", "A"], ["Y"])]
    return helper.make_function(
        DOMAIN,
        SPECTRAL_OP,
        SPECTRAL_INPUTS,
        ["Y"],
        body,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=_SPECTRAL_ATTRS,
        doc_string=f"Y = Base + WHT_n(X) @ F^T, n={n} (K={k}), F from two-level ELL tables ({mode} path)",
        overload=spectral_overload(n, mode),
    )


def spectral_dense_function(n: int, k: int, factors: Sequence[np.ndarray], opset: int) -> FunctionProto:
    """The ``qwha::SpectralAddDense`` function of size ``n``: ``Y = Base + WHT_n(X) @ FT`` (``FT`` = ``F.T`` dense)."""
    _check_factors(n, factors)
    body = wht_nodes("X", "Z", factors, hk="HK" if k > 1 else None)
    body += [helper.make_node("MatMul", ["Z", "FT"], ["A"]), helper.make_node("Add", ["Base", "A"], ["Y"])]
    return helper.make_function(
        DOMAIN,
        SPECTRAL_DENSE_OP,
        SPECTRAL_DENSE_INPUTS,
        ["Y"],
        body,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=["n", "K"],
        doc_string=f"Y = Base + WHT_n(X) @ FT, n={n} (K={k}), FT dense",
        overload=wht_overload(n),
    )


def spectral_node(inputs: Sequence[str], y: str, n: int, k: int, t: TableShape, mode: str, name: str) -> NodeProto:
    """A ``qwha::SpectralAdd`` call; ``inputs`` in :data:`SPECTRAL_INPUTS` order, ``t`` the tables' sizes."""
    node = helper.make_node(
        SPECTRAL_OP,
        list(inputs),
        [y],
        name=name,
        domain=DOMAIN,
        n=n,
        K=k,
        pieces_shape=[t.n_pieces, t.width],
        rows_shape=[t.d_out, t.depth],
        ft_size=[n * t.d_out],
        ft_shape=[n, t.d_out],
    )
    node.overload = spectral_overload(n, mode)
    return node


def spectral_dense_node(inputs: Sequence[str], y: str, n: int, k: int, name: str) -> NodeProto:
    node = helper.make_node(SPECTRAL_DENSE_OP, list(inputs), [y], name=name, domain=DOMAIN, n=n, K=k)
    node.overload = wht_overload(n)
    return node


def qwha_functions(nodes: Iterable[NodeProto], factors: dict[int, tuple[int, list[np.ndarray]]], opset: int):
    """The model-local functions that the ``qwha`` nodes among ``nodes`` call, one per (op, overload), sorted."""
    calls = {}
    for node in nodes:
        if node.domain == DOMAIN:
            n = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "n")
            calls[(node.op_type, node.overload)] = n
    missing = sorted({n for n in calls.values() if n not in factors})
    if missing:
        raise ValueError(f"no Walsh-Hadamard factors given for sizes {missing}")
    out = []
    for (op, overload), n in sorted(calls.items()):
        k, mats = factors[n]
        if op == WHT_OP:
            out.append(wht_function(n, k, mats, opset))
        elif op == SPECTRAL_DENSE_OP:
            out.append(spectral_dense_function(n, k, mats, opset))
        elif op == SPECTRAL_OP:
            out.append(spectral_function(n, k, mats, overload.rsplit("_", 1)[1], opset))
        else:
            raise ValueError(f"unknown op {DOMAIN}::{op}")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# spectral product layout
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableShape:
    """The sizes of :class:`SpectralTables` that a ``SpectralAdd`` node's attributes carry."""

    n_pieces: int
    width: int
    depth: int
    d_out: int


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

    @property
    def shape(self) -> TableShape:
        return TableShape(self.n_pieces, self.width, self.depth, self.d_out)


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
