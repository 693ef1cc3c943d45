"""The decoder graph of an ONNX export, written node by node from the weights (no math: layout and wiring only).

IO (optimum / onnxruntime-genai names; ``L`` layers, ``Hkv`` KV heads, ``D`` head size)::

    input_ids                int64    [batch_size, sequence_length]
    attention_mask           int64    [batch_size, total_sequence_length]     (0 = padding, left padding works)
    position_ids             int64    [batch_size, sequence_length]
    past_key_values.{i}.key  float32  [batch_size, Hkv, past_sequence_length, D]   (and .value; length 0 at first)
    logits                   float32  [batch_size, sequence_length, vocab_size]
    present.{i}.key          float32  [batch_size, Hkv, total_sequence_length, D]  (and .value)

Per layer (contrib ops of onnxruntime, as in its genai model builder)::

    x -> [Skip]SimplifiedLayerNorm -> QKV (one MatMulNBits/MatMul, + bias, + spectral adapter)
      -> Split -> RotaryEmbedding(q), RotaryEmbedding(k) (position_ids from the caller)
      -> GroupQueryAttention(q, k, v, past, seqlens_k = total-1, attention_bias = padding mask) -> o_proj
      -> SkipSimplifiedLayerNorm -> gate|up (one MatMulNBits) -> Split -> silu(gate) * up -> down_proj

GroupQueryAttention applies the causal mask on cache slots; padding (left or anywhere) is masked by
``attention_bias`` (``finfo(float32).min`` where ``attention_mask`` is 0), so every row of the cache holds the same
``total_sequence_length`` slots. Rotary embedding runs outside the attention op because GroupQueryAttention's own
rotary uses only the first position id of a prompt, which is wrong for left-padded rows.

Spectral adapters (fused exports): each adapted projection group (q|k|v, o, gate|up, down) is one
``qwha::SpectralAdd(x, base, HK, ELL tables)`` node computing ``base + WHT(x) @ F.T`` (:mod:`.onnx_ops`;
``SpectralAddDense`` for adapters denser than ``dense_adapter_density``). The graph is then ``If(sequence == 1)``:
a decode-step branch (the ``decode`` bodies: ``GatherElements`` for one row, the same on the flattened batch for
several) or a branch for any number of tokens (the ``prompt`` bodies: ``ScatterElements`` + ``MatMul``); both
share the initializers. With the native qwha kernels registered both branches run the same kernel; without them
each runs its bodies. The If is not nested: onnxruntime 1.32 does not prepack MatMulNBits weights read from two
levels up (a nested decoder branch ran its MatMulNBits ~10x slower).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_ops import (
    DOMAIN,
    SPECTRAL_MODES,
    SpectralTables,
    matmul_nbits_tensors,
    qwha_functions,
    spectral_dense_node,
    spectral_node,
    spectral_tables,
)

__all__ = [
    "OPSET",
    "IR_VERSION",
    "NBitsLinear",
    "DenseLinear",
    "SpectralAdapter",
    "Projection",
    "LayerWeights",
    "DecoderSpec",
    "DecoderWeights",
    "build_decoder_model",
    "build_projection_model",
    "io_names",
]

OPSET = 23
IR_VERSION = 10
_MS = "com.microsoft"
_NEG = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class NBitsLinear:
    """A block-quantized weight ``(N, K)`` for MatMulNBits: ``W = (codes - zeros) * scales`` per block of ``K``.

    ``bits`` is the storage width (2, 4 or 8). ``perm`` (int64 ``[K]``) or None: the input columns in block order
    (act-order GPTQ layers); the node then reads ``x[..., perm]``.
    """

    codes: np.ndarray  # uint8 [N, K]
    zeros: np.ndarray  # uint8 [N, n_blocks]
    scales: np.ndarray  # float32 [N, n_blocks]
    bits: int
    block_size: int
    perm: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.codes.shape[0]), int(self.codes.shape[1])


@dataclass(frozen=True)
class DenseLinear:
    weight: np.ndarray  # float32 [N, K]

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.weight.shape[0]), int(self.weight.shape[1])


@dataclass(frozen=True)
class SpectralAdapter:
    """``y += WHT_n(x) @ F.T`` with ``F[rows[e], cols[e]] = values[e]`` (values include the layer coefficient)."""

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray  # float32
    wht_k: int  # K of the transform size n = d_in


@dataclass(frozen=True)
class Projection:
    linear: NBitsLinear | DenseLinear
    bias: np.ndarray | None = None
    adapter: SpectralAdapter | None = None


@dataclass(frozen=True)
class LayerWeights:
    input_norm: np.ndarray
    post_norm: np.ndarray
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    gate: Projection
    up: Projection
    down: Projection


@dataclass(frozen=True)
class DecoderSpec:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_eps: float
    cos_cache: np.ndarray  # float32 [max_positions, head_dim / 2]
    sin_cache: np.ndarray
    attention_scale: float
    window: int = -1  # GroupQueryAttention local_window_size (-1: none)
    accuracy_level: int = 0
    wht_factors: dict[int, tuple[int, list[np.ndarray]]] = field(default_factory=dict)  # n -> (K, matrices)
    ell_width: int = 16
    dense_adapter_density: float = 0.3  # nnz / (d_out * n) from which F is applied as a dense float32 MatMul


@dataclass(frozen=True)
class DecoderWeights:
    embed: np.ndarray  # float32 [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: np.ndarray
    lm_head: NBitsLinear | DenseLinear | None  # None: tied to ``embed`` (Gemm with transB)


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """``(input names, output names)`` of the decoder graph, in order."""
    ins = ["input_ids", "attention_mask", "position_ids"]
    outs = ["logits"]
    for i in range(num_layers):
        ins += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outs += [f"present.{i}.key", f"present.{i}.value"]
    return ins, outs


# ----------------------------------------------------------------------------------------------------------------------
# graph builder
# ----------------------------------------------------------------------------------------------------------------------


class _Graph:
    """Nodes of one (sub)graph; initializers live in the root graph and are shared by subgraphs."""

    def __init__(self, prefix: str = "", root: _Graph | None = None):
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


def _layer_prefix(i: int) -> str:
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


class _Layers:
    """Writes (packed) projections: MatMulNBits / MatMul, bias, ``qwha::SpectralAdd`` (WHT + spectral product)."""

    def __init__(self, accuracy_level: int, ell_width: int, dense_adapter_density: float, wht_factors: dict):
        self.accuracy_level, self.ell_width, self.dense_density = accuracy_level, ell_width, dense_adapter_density
        self.wht_factors = wht_factors
        self.root = _Graph()
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
    def matmul(self, g: _Graph, x: str, name: str, lin: NBitsLinear | DenseLinear, outputs=None) -> str:
        op_type, inputs, extra = self.linear_init(name, lin)
        if op_type == "MatMul":
            return g.op("MatMul", [x, inputs[0]], name=f"{name}.MatMul", outputs=outputs)
        if extra["perm"]:
            x = g.op("Gather", [x, extra["perm"]], axis=-1, name=f"{name}.perm")
        return g.op(
            "MatMulNBits", [x, *inputs], domain=_MS, name=f"{name}.MatMulNBits", outputs=outputs, **extra["attrs"]
        )

    def hadamard_init(self, n: int) -> tuple[int, str]:
        """``(K, name)`` of the ``H_K`` initializer of size ``n`` (``[[1]]`` when ``K = 1``), shared by all layers."""
        if n not in self.wht_factors:
            raise ValueError(f"no Walsh-Hadamard factors given for size {n}")
        k, mats = self.wht_factors[n]
        hk = mats[0] if k > 1 else np.ones((1, 1), np.float32)
        return k, self.root.init(f"qwha.hadamard_{k}", np.asarray(hk, np.float32))

    def projection(self, g: _Graph, x: str, name: str, projs: Sequence[Projection], mode: str) -> str:
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

    def spectral(self, g: _Graph, x: str, base: str, name: str, projs: Sequence[Projection], mode: str) -> str:
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


class _Decoder(_Layers):
    def __init__(self, spec: DecoderSpec, weights: DecoderWeights):
        super().__init__(spec.accuracy_level, spec.ell_width, spec.dense_adapter_density, spec.wht_factors)
        self.spec, self.w = spec, weights

    def shared_inits(self) -> None:
        s, w, root = self.spec, self.w, self.root
        root.init("model.embed_tokens.weight", w.embed.astype(np.float32))
        root.init("cos_cache", s.cos_cache.astype(np.float32))
        root.init("sin_cache", s.sin_cache.astype(np.float32))
        for i, lw in enumerate(w.layers):
            root.init(f"{_layer_prefix(i)}input_layernorm.weight", lw.input_norm.astype(np.float32))
            root.init(f"{_layer_prefix(i)}post_attention_layernorm.weight", lw.post_norm.astype(np.float32))
        root.init("model.norm.weight", w.final_norm.astype(np.float32))

    def masks(self, g: _Graph) -> tuple[str, str, str, str]:
        """``(seqlens_k, total_sequence_length, attention_bias, query_seqlens)``: every row holds ``total`` cache
        slots; padding is masked by ``attention_bias`` ``[B, 1, S, T]``; ``query_seqlens`` (= S for every row) lets
        GroupQueryAttention take multi-token steps with a cache for batches > 1."""
        mask_shape = g.op("Shape", ["attention_mask"])
        total = g.op("Gather", [mask_shape, g.const(1)], axis=0)
        batch = g.op("Gather", [mask_shape, g.const([0])], axis=0)
        seq = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const([1])], axis=0)
        total32 = g.op("Cast", [total], to=TensorProto.INT32)
        seqlens = g.op("Expand", [g.op("Sub", [total32, g.const(1, np.int32)]), batch])
        maskf = g.op("Cast", [g.op("Equal", ["attention_mask", g.const(0)])], to=TensorProto.FLOAT)
        bias4 = g.op("Unsqueeze", [g.op("Mul", [maskf, g.const(_NEG, np.float32)]), g.const([1, 2])])  # [B,1,1,T]
        bshape = g.op("Concat", [batch, g.const([1]), seq, g.op("Unsqueeze", [total, g.const([0])])], axis=0)
        qlens = g.op("Expand", [g.op("Cast", [seq], to=TensorProto.INT32), batch])
        return seqlens, total32, g.op("Expand", [bias4, bshape], name="attention_bias"), qlens

    def body(self, g: _Graph, mode: str, out_names: Sequence[str]) -> None:
        """All nodes of the decoder into ``g``; ``out_names`` = logits, then present key/value per layer."""
        s, w = self.spec, self.w
        ids, pos = "input_ids", "position_ids"
        h = g.op("Gather", ["model.embed_tokens.weight", ids], axis=0, name="embed")
        seqlens, total32, attn_bias, qlens = self.masks(g)
        extra = ["", "", "", "", "", qlens]  # inputs 11..16: query_seqlens last
        x = g.op("RMSNormalization", [h, f"{_layer_prefix(0)}input_layernorm.weight"], epsilon=s.rms_eps, axis=-1)
        residual = h
        qd, kd = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        for i, lw in enumerate(w.layers):
            p = _layer_prefix(i)
            qkv = self.projection(g, x, f"{p}self_attn.qkv_proj", [lw.q, lw.k, lw.v], mode)
            q, k, v = g.op("Split", [qkv, g.const([qd, kd, kd])], n_out=3, axis=-1)
            q, k = (
                g.op("RotaryEmbedding", [t, pos, "cos_cache", "sin_cache"], domain=_MS, name=f"{p}rotary")
                for t in (q, k)
            )
            attn, _, _ = g.op(
                "GroupQueryAttention",
                [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total32]
                + ["", "", "", attn_bias, *extra],
                domain=_MS,
                name=f"{p}GroupQueryAttention",
                outputs=[f"{g.prefix}{p}attn/out0", out_names[1 + 2 * i], out_names[2 + 2 * i]],
                num_heads=s.num_heads,
                kv_num_heads=s.num_kv_heads,
                scale=s.attention_scale,
                local_window_size=s.window,
                do_rotary=0,
            )
            attn = self.projection(g, attn, f"{p}self_attn.o_proj", [lw.o], mode)
            x, _, _, residual = g.op(
                "SkipSimplifiedLayerNormalization",
                [attn, residual, f"{p}post_attention_layernorm.weight"],
                n_out=4,
                domain=_MS,
                epsilon=s.rms_eps,
            )
            gu = self.projection(g, x, f"{p}mlp.gate_up_proj", [lw.gate, lw.up], mode)
            gate, up = g.op("Split", [gu, g.const([lw.gate.linear.shape[0], lw.up.linear.shape[0]])], n_out=2, axis=-1)
            act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up], name=f"{p}mlp.act")
            down = self.projection(g, act, f"{p}mlp.down_proj", [lw.down], mode)
            norm_w = f"{_layer_prefix(i + 1)}input_layernorm.weight" if i + 1 < len(w.layers) else "model.norm.weight"
            x, _, _, residual = g.op(
                "SkipSimplifiedLayerNormalization", [down, residual, norm_w], n_out=4, domain=_MS, epsilon=s.rms_eps
            )
        if w.lm_head is None:  # tied: Gemm against the embedding (one copy of the matrix)
            flat = g.op("Reshape", [x, g.const([-1, s.hidden_size])])
            lg = g.op("Gemm", [flat, "model.embed_tokens.weight"], transB=1, name="lm_head")
            shape = g.op("Concat", [g.op("Shape", ["input_ids"]), g.const([s.vocab_size])], axis=0)
            g.op("Reshape", [lg, shape], outputs=[out_names[0]])
        else:
            self.matmul(g, x, "lm_head", w.lm_head, outputs=[out_names[0]])


def _value_infos(spec: DecoderSpec) -> tuple[list, list]:
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv = ["batch_size", spec.num_kv_heads, "past_sequence_length", spec.head_dim]
    pkv = ["batch_size", spec.num_kv_heads, "total_sequence_length", spec.head_dim]
    ins = [
        helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", i64, ["batch_size", "sequence_length"]),
    ]
    outs = [helper.make_tensor_value_info("logits", f, ["batch_size", "sequence_length", spec.vocab_size])]
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            ins.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f, kv))
            outs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", f, pkv))
    return ins, outs


def build_decoder_model(
    spec: DecoderSpec, weights: DecoderWeights, metadata: dict[str, str] | None = None, doc: str = ""
) -> onnx.ModelProto:
    """The ``ModelProto`` of the decoder (IO in the module docstring); initializers held in memory."""
    if len(weights.layers) != spec.num_layers:
        raise ValueError(f"{len(weights.layers)} layer weights for num_layers={spec.num_layers}")
    dec = _Decoder(spec, weights)
    root = dec.root
    dec.shared_inits()
    ins, outs = _value_infos(spec)
    out_names = [o.name for o in outs]
    adapted = any(
        p.adapter is not None for lw in weights.layers for p in (lw.q, lw.k, lw.v, lw.o, lw.gate, lw.up, lw.down)
    )
    if not adapted:
        dec.body(root, "prompt", out_names)
    else:  # If(sequence == 1): decode-step branch / any-length branch, sharing the initializers (one level only:
        # onnxruntime 1.32 does not prepack MatMulNBits weights for nodes in an If nested in another If)
        branches = {mode: _branch(dec, root, mode, out_names) for mode in SPECTRAL_MODES}
        seq = root.op("Gather", [root.op("Shape", ["input_ids"]), root.const(1)], axis=0)
        root.op(
            "If",
            [root.op("Equal", [seq, root.const(1)], name="decode_step")],
            name="decode_or_prompt",
            outputs=out_names,
            then_branch=branches["decode"],
            else_branch=branches["prompt"],
        )
    graph = helper.make_graph(root.nodes, "qwha_decoder", ins, outs, initializer=list(root.inits.values()))
    model = _with_functions(graph, spec.wht_factors, doc)
    for k, v in (metadata or {}).items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    return model


def _float_infos(names: Sequence[str]) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]


def _branch(dec: _Decoder, root: _Graph, mode: str, out_names: Sequence[str]) -> onnx.GraphProto:
    """The decoder as an If branch whose spectral adapters take the ``mode`` path."""
    sub = _Graph(prefix=f"{mode}/", root=root)
    sub_outs = [f"{mode}/{n}" for n in out_names]
    dec.body(sub, mode, sub_outs)
    return helper.make_graph(sub.nodes, f"decoder_{mode}", [], _float_infos(sub_outs))


def build_projection_model(
    projs: Sequence[Projection],
    wht_factors: dict[int, tuple[int, list[np.ndarray]]],
    mode: str = "prompt",
    accuracy_level: int = 0,
    ell_width: int = 16,
    dense_adapter_density: float = 0.3,
) -> onnx.ModelProto:
    """One exported (packed) projection as a model ``x [batch, seq, d_in] -> y [batch, seq, sum d_out]``, written
    exactly as inside the decoder (``mode`` "decode" needs seq = 1); for layer-level tests and benchmarks."""
    if mode not in SPECTRAL_MODES:
        raise ValueError(f"mode={mode!r} must be one of {SPECTRAL_MODES}")
    lw = _Layers(accuracy_level, ell_width, dense_adapter_density, wht_factors)
    g = lw.root
    y = lw.projection(g, "x", "proj", projs, mode)
    g.op("Identity", [y], outputs=["y"])
    d_in, d_out = projs[0].linear.shape[1], sum(p.linear.shape[0] for p in projs)
    graph = helper.make_graph(
        g.nodes,
        "projection",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d_out])],
        initializer=list(g.inits.values()),
    )
    return _with_functions(graph, wht_factors, "")


def _with_functions(graph: onnx.GraphProto, wht_factors: dict, doc: str) -> onnx.ModelProto:
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(_MS, 1), helper.make_opsetid(DOMAIN, 1)],
        functions=qwha_functions(_all_nodes(graph), wht_factors, OPSET),
        ir_version=IR_VERSION,
        producer_name="qwha-export",
        doc_string=doc,
    )


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
