"""The decoder graph of an ONNX export, written node by node from the weights (no math: layout and wiring only).

IO (optimum / onnxruntime-genai names; ``L`` layers, ``Hkv`` KV heads, ``D`` head size)::

    input_ids                int64    [batch_size, sequence_length]
    attention_mask           int64    [batch_size, total_sequence_length]     (0 = padding, left padding works)
    position_ids             int64    [batch_size, sequence_length]
    past_key_values.{i}.key  float32  [batch_size, Hkv, past_sequence_length, D]   (and .value; length 0 at first)
    logits                   float32  [batch_size, sequence_length, vocab_size]
    present.{i}.key          float32  [batch_size, Hkv, total_sequence_length, D]  (and .value)

Per layer: :mod:`.onnx_decoder` (norms, attention, MLP per architecture); projections and spectral adapters:
:mod:`.onnx_layers`; the numbers: :mod:`.onnx_spec`.

GroupQueryAttention applies the causal mask on cache slots; padding (left or anywhere) is masked by
``attention_bias`` (``finfo(float32).min`` where ``attention_mask`` is 0), so every row of the cache holds the same
``total_sequence_length`` slots. Without q/k norms GroupQueryAttention applies the rotary embedding itself, at
cache-slot positions (a left-padded row's positions shift by its padding, which leaves rotary attention unchanged;
see :meth:`.onnx_decoder.DecoderWriter.attention`); with them, ``RotaryEmbedding`` nodes fed ``position_ids`` rotate
q and k after their norms. Sliding-window layers set
``local_window_size`` (the keys with ``slot(q) - slot(k) < local_window_size`` are kept, the current one included);
a row's slots are contiguous after its left padding, so slot distances are position distances.

Spectral adapters (fused exports): each adapted projection group (q|k|v, o, gate|up, down) is one
``qwha::SpectralAdd(x, base, HK, ELL tables)`` node computing ``base + WHT(x) @ F.T`` (:mod:`.onnx_ops`;
``SpectralAddDense`` for adapters denser than ``dense_adapter_density``). The graph is then ``If(sequence == 1)``:
a decode-step branch (the ``decode`` bodies: ``GatherElements`` for one row, the same on the flattened batch for
several) or a branch for any number of tokens (the ``prompt`` bodies: ``ScatterElements`` + ``MatMul``); both
share the initializers. With the native qwha kernels registered both branches run the same kernel; without them
each runs its bodies. The If is not nested: onnxruntime 1.32 does not prepack MatMulNBits weights read from two
levels up (a nested decoder branch ran its MatMulNBits ~10x slower).

Both branches are written layer by layer in one pass over the blocks (:meth:`.onnx_decoder.DecoderWriter.write`);
a model without adapters gets the prompt body as its graph (the If is only decided after the last block).
Initializers are held in the ``ModelProto``, or -- with a ``sink`` (:class:`.onnx_external.ExternalData`) -- written
to ``model.onnx.data`` as they are made, the proto keeping references only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from .onnx_decoder import DecoderWriter
from .onnx_external import ExternalData
from .onnx_layers import Graph, Layers
from .onnx_ops import DOMAIN, SPECTRAL_MODES, qwha_functions
from .onnx_spec import (
    ACTIVATIONS,
    DecoderSpec,
    DecoderWeights,
    DenseLinear,
    LayerWeights,
    NBitsLinear,
    Projection,
    SpectralAdapter,
    io_names,
)

__all__ = [
    "OPSET",
    "IR_VERSION",
    "ACTIVATIONS",
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
DECODE_OR_PROMPT = "decode_or_prompt"  # the If's node name (before its count): decode branch / prompt branch
IR_VERSION = 10
_MS = "com.microsoft"


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
    spec: DecoderSpec,
    weights: DecoderWeights,
    metadata: dict[str, str] | None = None,
    doc: str = "",
    sink: ExternalData | None = None,
) -> onnx.ModelProto:
    """The ``ModelProto`` of the decoder (IO in the module docstring). Initializers are held in memory, or with a
    ``sink`` written to its file as they are made (the proto then holds references only; save it with a plain
    ``onnx.save_model``). ``weights.layers`` is read once, block by block (see :class:`DecoderWeights`)."""
    if len(weights.layers) != spec.num_layers:
        raise ValueError(f"{len(weights.layers)} layer weights for num_layers={spec.num_layers}")
    dec = DecoderWriter(spec, weights, sink)
    root = dec.root
    ins, outs = _value_infos(spec)
    out_names = [o.name for o in outs]
    # both If branches are written layer by layer (one read of each block); whether the If is needed is known after
    branches = {
        mode: (Graph(prefix=f"{mode}/", root=root), [f"{mode}/{n}" for n in out_names]) for mode in SPECTRAL_MODES
    }
    if not dec.write(branches):  # no adapter: both bodies are the same, the prompt one is the graph itself
        root.nodes = _unprefixed(branches["prompt"][0])
    else:  # If(sequence == 1): decode-step branch / any-length branch, sharing the initializers (one level only:
        # onnxruntime 1.32 does not prepack MatMulNBits weights for nodes in an If nested in another If)
        graphs = {
            mode: helper.make_graph(g.nodes, f"decoder_{mode}", [], _float_infos(names))
            for mode, (g, names) in branches.items()
        }
        seq = root.op("Gather", [root.op("Shape", ["input_ids"]), root.const(1)], axis=0)
        root.op(
            "If",
            [root.op("Equal", [seq, root.const(1)], name="decode_step")],
            name=DECODE_OR_PROMPT,
            outputs=out_names,
            then_branch=graphs["decode"],
            else_branch=graphs["prompt"],
        )
    graph = helper.make_graph(root.nodes, "qwha_decoder", ins, outs, initializer=list(root.inits.values()))
    model = _with_functions(graph, spec.wht_factors, doc)
    for k, v in (metadata or {}).items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    return model


def _float_infos(names: Sequence[str]) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]


def _unprefixed(branch: Graph) -> list[onnx.NodeProto]:
    """The nodes of ``branch`` with its prefix dropped from node and value names: the nodes the same calls write
    into the root graph (a graph's names are its prefix, the op and the graph's own node count)."""
    prefix = branch.prefix

    def strip(name: str) -> str:
        return name[len(prefix) :] if name.startswith(prefix) else name

    for node in branch.nodes:
        node.name = strip(node.name)
        for field in (node.input, node.output):
            names = [strip(v) for v in field]
            del field[:]
            field.extend(names)
    return branch.nodes


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
    lw = Layers(accuracy_level, ell_width, dense_adapter_density, wht_factors)
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
