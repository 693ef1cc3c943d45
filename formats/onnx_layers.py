"""Node writers shared by the decoder and the one-projection model: a (sub)graph with shared initializers, and the
(packed) projections -- MatMulNBits / MatMul, bias, ``qwha::SpectralAdd`` (layout and wiring only, no math).

Initializers are made once per name and held in the root graph, in memory or -- when the root has a ``sink``
(:class:`~.onnx_external.ExternalData`) -- as references to the bytes the sink has already written. What a node
needs of an initialized projection (input names, attributes, table sizes) is cached by name, never its arrays, so a
projection written into several subgraphs (the If branches of the decoder) is converted once."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_external import ExternalData
from .onnx_ops import TableShape, matmul_nbits_tensors, spectral_dense_node, spectral_node, spectral_tables
from .onnx_spec import DenseLinear, NBitsLinear, Projection

__all__ = ["MS", "Graph", "Layers", "layer_prefix"]

MS = "com.microsoft"


class Graph:
    """Nodes of one (sub)graph; initializers live in the root graph and are shared by subgraphs. A root made with a
    ``sink`` writes each initializer's data there when it is made and keeps only the reference."""

    def __init__(self, prefix: str = "", root: Graph | None = None, sink: ExternalData | None = None):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.root = root or self
        if root is None:
            self.inits: dict[str, TensorProto] = {}
            self.consts: dict[tuple, str] = {}
            self.sink = sink
        self._n = 0

    def init(self, name: str, array: np.ndarray) -> str:
        """Add a root initializer once (a second call with the same name returns the name unchanged)."""
        root = self.root
        if name not in root.inits:
            if root.sink is not None:
                root.inits[name] = root.sink.tensor(name, array)
            else:
                root.inits[name] = numpy_helper.from_array(np.array(array, order="C", copy=True), name)
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
        unused: Sequence[int] = (),
        **attrs,
    ):
        """Append one node; its outputs are ``outputs`` or ``n_out`` fresh names, those at ``unused`` left empty
        (onnxruntime then neither computes nor allocates them). Returns the output name, or the list of them."""
        self._n += 1
        base = f"{self.prefix}{name or op_type}_{self._n}"
        outs = list(outputs) if outputs is not None else [f"{base}/out{i}" for i in range(n_out)]
        for i in unused:
            outs[i] = ""
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

    def __init__(
        self,
        accuracy_level: int,
        ell_width: int,
        dense_adapter_density: float,
        wht_factors: dict,
        sink: ExternalData | None = None,
    ):
        self.accuracy_level, self.ell_width, self.dense_density = accuracy_level, ell_width, dense_adapter_density
        self.wht_factors = wht_factors
        self.root = Graph(sink=sink)
        self.adapters: dict[str, tuple[TableShape | None, list[str]]] = {}
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

    def packed_init(self, name: str, projs: Sequence[Projection]) -> list[str]:
        """The initialized linears of ``projs``: ``[name]`` when their rows stack into one node, else ``name.<i>``
        each (different quantization settings)."""
        parts = [f"{name}.{i}" for i in range(len(projs))]
        if name in self.linears or parts[0] in self.linears:
            return [name] if name in self.linears else parts
        stacked = _stack_linear([p.linear for p in projs])
        if stacked is not None:
            self.linear_init(name, stacked)
            return [name]
        for part, p in zip(parts, projs, strict=True):
            self.linear_init(part, p.linear)
        return parts

    def adapter_init(self, name: str, projs: Sequence[Projection]) -> tuple[TableShape | None, list[str]]:
        """The spectral adapter of the packed ``projs`` as initializers, once per name: ``(None, [F.T])`` when ``F``
        is dense enough for one float32 MatMul, else ``(table sizes, [values, flat, cols, pieces])``."""
        if name in self.adapters:
            return self.adapters[name]
        n, d_out = projs[0].linear.shape[1], sum(p.linear.shape[0] for p in projs)
        rows, cols, vals = _stack_adapters(projs)
        g = self.root
        if vals.size >= self.dense_density * d_out * n:
            ft = np.zeros((n, d_out), np.float32)
            np.add.at(ft, (cols, rows), vals)
            rec: tuple[TableShape | None, list[str]] = (None, [g.init(f"{name}.adapter_dense_t", ft)])
        else:
            t = spectral_tables(rows, cols, vals, d_out, self.ell_width)
            ell_cols, ell_vals = g.init(f"{name}.ell_cols", t.cols1), g.init(f"{name}.ell_values", t.vals1)
            pieces, flat = g.init(f"{name}.ell_pieces", t.pieces2), g.init(f"{name}.ell_flat", t.flat1)
            rec = (t.shape, [ell_vals, flat, ell_cols, pieces])
        self.adapters[name] = rec
        return rec

    # -- ops ------------------------------------------------------------------------------------------------------
    def linear(self, g: Graph, x: str, name: str, outputs=None) -> str:
        """The node(s) of the initialized linear ``name`` (:meth:`linear_init`) applied to ``x``."""
        op_type, inputs, extra = self.linears[name]
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
        parts = self.packed_init(name, projs)
        if len(parts) > 1:  # different quantization settings: one node each, outputs concatenated
            y = g.op("Concat", [self.linear(g, x, part) for part in parts], axis=-1)
        else:
            y = self.linear(g, x, parts[0])
        bias = _stack_bias(projs)
        if bias is not None:
            y = g.op("Add", [y, g.init(f"{name}.bias", bias)], name=f"{name}.bias_add")
        if any(p.adapter is not None for p in projs):
            y = self.spectral(g, x, y, name, projs, mode)
        return y

    def spectral(self, g: Graph, x: str, base: str, name: str, projs: Sequence[Projection], mode: str) -> str:
        """``base + WHT(x) @ F.T`` for the packed projections: one ``qwha::SpectralAdd`` node (``SpectralAddDense``
        when ``F`` is dense enough), whose function body is the ``mode`` path (see the module docstring)."""
        n = projs[0].linear.shape[1]
        k, hk = self.hadamard_init(n)
        shape, tensors = self.adapter_init(name, projs)
        out, node_name = f"{g.prefix}{name}.adapter/out0", f"{g.prefix}{name}.adapter"
        if shape is None:  # dense enough: one float32 MatMul in the function body
            g.add(spectral_dense_node([x, base, hk, *tensors], out, n, k, node_name))
        else:
            g.add(spectral_node([x, base, hk, *tensors], out, n, k, shape, mode, node_name))
        return out
