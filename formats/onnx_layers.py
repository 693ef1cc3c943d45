"""Node writers shared by the decoder and the one-projection model: a (sub)graph with shared initializers, and the
(packed) projections -- MatMulNBits / MatMul, bias, ``qwha::SpectralAdd`` (layout and wiring only, no math)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_ops import SpectralTables, matmul_nbits_tensors, spectral_dense_node, spectral_node, spectral_tables
from .onnx_spec import DenseLinear, NBitsLinear, Projection

__all__ = ["MS", "Graph", "Layers", "layer_prefix"]

MS = "com.microsoft"


class Graph:
    """Nodes of one (sub)graph; initializers live in the root graph and are shared by subgraphs."""

    def __init__(self, prefix: str = "", root: Graph | None = None):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.root = root or self
        if root is None:
            self.inits: dict[str, TensorProto] = {}
            self.consts: dict[tuple, str] = {}
        self._n = 0

    def init(self, name: str, array: np.ndarray) -> str:
        """Add a root initializer once (a second call with the same name returns the name unchanged)."""
        inits = self.root.inits
        if name not in inits:
            inits[name] = numpy_helper.from_array(np.array(array, order="C", copy=True), name)
        return name

    def const(self, values, dtype=np.int64) -> str:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        consts = self.root.consts
        if key not in consts:
            consts[key] = self.init(f"const.{len(consts)}", arr)
        return consts[key]

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        n_out: int = 1,
        domain: str = "",
        name: str = "",
        outputs: Sequence[str] | None = None,
        **attrs,
    ):
        self._n += 1
        base = f"{self.prefix}{name or op_type}_{self._n}"
        outs = list(outputs) if outputs is not None else [f"{base}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def add(self, node: onnx.NodeProto) -> None:
        self.nodes.append(node)


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def _same_perm(a: NBitsLinear, b: NBitsLinear) -> bool:
    if a.perm is None or b.perm is None:
        return a.perm is None and b.perm is None
    return bool(np.array_equal(a.perm, b.perm))


def _stack_linear(lins: Sequence[NBitsLinear | DenseLinear]) -> NBitsLinear | DenseLinear | None:
    """One weight whose output rows are those of ``lins`` in order (None if they cannot share one node)."""
    if len(lins) == 1:
        return lins[0]
    if all(isinstance(x, DenseLinear) for x in lins):
        return DenseLinear(np.concatenate([x.weight for x in lins]))
    first = lins[0]
    if not all(
        isinstance(x, NBitsLinear)
        and x.bits == first.bits
        and x.block_size == first.block_size
        and _same_perm(x, first)
        for x in lins
    ):
        return None
    return NBitsLinear(
        np.concatenate([x.codes for x in lins]),
        np.concatenate([x.zeros for x in lins]),
        np.concatenate([x.scales for x in lins]),
        first.bits,
        first.block_size,
        first.perm,
    )


def _stack_adapters(projs: Sequence[Projection]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, cols, values)`` of the adapters of ``projs`` with rows offset to the stacked output."""
    rows, cols, vals, off = [], [], [], 0
    for p in projs:
        if p.adapter is not None:
            rows.append(np.asarray(p.adapter.rows, np.int64) + off)
            cols.append(np.asarray(p.adapter.cols, np.int64))
            vals.append(np.asarray(p.adapter.values, np.float32))
        off += p.linear.shape[0]
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)


def _stack_bias(projs: Sequence[Projection]) -> np.ndarray | None:
    if all(p.bias is None for p in projs):
        return None
    parts = [p.bias if p.bias is not None else np.zeros(p.linear.shape[0]) for p in projs]
    return np.concatenate(parts).astype(np.float32)


class Layers:
    """Writes (packed) projections: MatMulNBits / MatMul, bias, ``qwha::SpectralAdd`` (WHT + spectral product)."""

    def __init__(self, accuracy_level: int, ell_width: int, dense_adapter_density: float, wht_factors: dict):
        self.accuracy_level, self.ell_width, self.dense_density = accuracy_level, ell_width, dense_adapter_density
        self.wht_factors = wht_factors
        self.root = Graph()
        self.tables: dict[str, tuple[SpectralTables, str, str, str]] = {}
        self.linears: dict[str, tuple[str, list[str], dict]] = {}

    # -- shared initializers (written once, used by both If branches) ----------------------------------------------
    def linear_init(self, name: str, lin: NBitsLinear | DenseLinear) -> tuple[str, list[str], dict]:
        if name in self.linears:
            return self.linears[name]
        g = self.root
        if isinstance(lin, DenseLinear):
            rec = ("MatMul", [g.init(f"{name}.weight_t", np.ascontiguousarray(lin.weight.T, dtype=np.float32))], {})
        else:
            n, k = lin.shape
            b, scales, zp = matmul_nbits_tensors(lin.codes, lin.zeros, lin.scales, lin.bits, lin.block_size)
            inputs = [g.init(f"{name}.qweight", b), g.init(f"{name}.scales", scales), g.init(f"{name}.qzeros", zp)]
            attrs = dict(K=k, N=n, bits=lin.bits, block_size=lin.block_size, accuracy_level=self.accuracy_level)
            perm = g.init(f"{name}.perm", lin.perm.astype(np.int64)) if lin.perm is not None else ""
            rec = ("MatMulNBits", inputs, {"attrs": attrs, "perm": perm})
        self.linears[name] = rec
        return rec

    def table_init(self, name: str, projs: Sequence[Projection]):
        if name in self.tables:
            return self.tables[name]
        rows, cols, vals = _stack_adapters(projs)
        t = spectral_tables(rows, cols, vals, sum(p.linear.shape[0] for p in projs), self.ell_width)
        g = self.root
        rec = (
            t,
            g.init(f"{name}.ell_cols", t.cols1),
            g.init(f"{name}.ell_values", t.vals1),
            g.init(f"{name}.ell_pieces", t.pieces2),
            g.init(f"{name}.ell_flat", t.flat1),
        )
        self.tables[name] = rec
        return rec

    # -- ops ------------------------------------------------------------------------------------------------------
    def matmul(self, g: Graph, x: str, name: str, lin: NBitsLinear | DenseLinear, outputs=None) -> str:
        op_type, inputs, extra = self.linear_init(name, lin)
        if op_type == "MatMul":
            return g.op("MatMul", [x, inputs[0]], name=f"{name}.MatMul", outputs=outputs)
        if extra["perm"]:
            x = g.op("Gather", [x, extra["perm"]], axis=-1, name=f"{name}.perm")
        return g.op(
            "MatMulNBits", [x, *inputs], domain=MS, name=f"{name}.MatMulNBits", outputs=outputs, **extra["attrs"]
        )

    def hadamard_init(self, n: int) -> tuple[int, str]:
        """``(K, name)`` of the ``H_K`` initializer of size ``n`` (``[[1]]`` when ``K = 1``), shared by all layers."""
        if n not in self.wht_factors:
            raise ValueError(f"no Walsh-Hadamard factors given for size {n}")
        k, mats = self.wht_factors[n]
        hk = mats[0] if k > 1 else np.ones((1, 1), np.float32)
        return k, self.root.init(f"qwha.hadamard_{k}", np.asarray(hk, np.float32))

    def projection(self, g: Graph, x: str, name: str, projs: Sequence[Projection], mode: str) -> str:
        stacked = _stack_linear([p.linear for p in projs])
        if stacked is None:  # different quantization settings: one node each, outputs concatenated
            y = g.op("Concat", [self.matmul(g, x, f"{name}.{i}", p.linear) for i, p in enumerate(projs)], axis=-1)
        else:
            y = self.matmul(g, x, name, stacked)
        bias = _stack_bias(projs)
        if bias is not None:
            y = g.op("Add", [y, g.init(f"{name}.bias", bias)], name=f"{name}.bias_add")
        if any(p.adapter is not None for p in projs):
            y = self.spectral(g, x, y, name, projs, mode)
        return y

    def spectral(self, g: Graph, x: str, base: str, name: str, projs: Sequence[Projection], mode: str) -> str:
        """``base + WHT(x) @ F.T`` for the packed projections: one ``qwha::SpectralAdd`` node (``SpectralAddDense``
        when ``F`` is dense enough), whose function body is the ``mode`` path (see the module docstring)."""
        n, d_out = projs[0].linear.shape[1], sum(p.linear.shape[0] for p in projs)
        k, hk = self.hadamard_init(n)
        rows, cols, vals = _stack_adapters(projs)
        out = f"{g.prefix}{name}.adapter/out0"
        if vals.size >= self.dense_density * d_out * n:  # dense enough: one float32 MatMul in the function body
            ft = np.zeros((n, d_out), np.float32)
            np.add.at(ft, (cols, rows), vals)
            ft_name = self.root.init(f"{name}.adapter_dense_t", ft)
            g.add(spectral_dense_node([x, base, hk, ft_name], out, n, k, f"{g.prefix}{name}.adapter"))
            return out
        t, cols, vals, pieces, flat = self.table_init(name, projs)
        g.add(spectral_node([x, base, hk, vals, flat, cols, pieces], out, n, k, t, mode, f"{g.prefix}{name}.adapter"))
        return out
