"""An exported decoder cut into stages, one decoder block each, so a check can run it one block at a time.

The writer (:mod:`.onnx_decoder`) names the node that ends each stage: ``end_of_embedding`` (the embedding and the
masks, normalized for block 0) and ``end_of_block`` (block ``i``'s last node: its residual add and the next block's
input norm). :func:`decoder_stages` reads the graph's prompt body (the ``else`` branch of the ``decode_or_prompt``
If, or the graph itself for a model without adapters), cuts it after each of those nodes and after the last block, and
returns the stages in order: the embedding, block 0 ... block L-1, the head. Each stage is a ``ModelProto`` of
its own nodes, the initializers they read (references into the same external data file, not copies), the
model's functions and opsets; its inputs are the graph inputs it reads and the values earlier stages made that it
needs, its outputs the values later stages need plus, in the last stage, the logits. A graph without those names
(an export of an older version, another tool's) is one stage: the whole prompt body.

Layout and wiring only: running the stages is :class:`qwha_export.onnx_runtime.OnnxBlocks`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import onnx
from onnx import helper

from .onnx_decoder import BLOCK_OUT, EMBED_OUT
from .onnx_graph import DECODE_OR_PROMPT

__all__ = ["Stage", "decoder_stages"]

_END = re.compile(rf"(?:^|/)(?:{EMBED_OUT}|{BLOCK_OUT})_\d+$")  # a node name: the writer's prefix, name, count


@dataclass
class Stage:
    """One stage: ``nodes`` in graph order; ``inputs`` the graph inputs and earlier stages' values it reads;
    ``outputs`` the values later stages read (and the logits in the last stage)."""

    nodes: list[onnx.NodeProto]
    inputs: list[str]
    outputs: list[str]
    initializers: list[onnx.TensorProto]
    graph_inputs: dict[str, onnx.ValueInfoProto]
    template: onnx.ModelProto  # opsets, functions, IR version (no graph)

    def model(self, input_types: Mapping[str, int]) -> onnx.ModelProto:
        """The stage as a model. ``input_types``: the ONNX element type of each input that is not a graph input
        (the values earlier stages made); output types are left to onnxruntime's inference."""
        ins = []
        for name in self.inputs:
            if name in self.graph_inputs:
                ins.append(self.graph_inputs[name])
            else:
                ins.append(helper.make_tensor_value_info(name, input_types[name], None))
        outs = [onnx.ValueInfoProto(name=name) for name in self.outputs]
        graph = helper.make_graph(self.nodes, "qwha_decoder_stage", ins, outs, initializer=self.initializers)
        model = onnx.ModelProto()
        model.CopyFrom(self.template)
        model.graph.CopyFrom(graph)
        return model


def _body(proto: onnx.ModelProto) -> tuple[list[onnx.NodeProto], str]:
    """The prompt body's nodes and its logits name."""
    graph = proto.graph
    for node in graph.node:
        if node.op_type == "If" and re.fullmatch(rf"{DECODE_OR_PROMPT}_\d+", node.name):
            branch = next(a.g for a in node.attribute if a.name == "else_branch")
            return list(branch.node), branch.output[0].name
    return list(graph.node), graph.output[0].name


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def decoder_stages(proto: onnx.ModelProto) -> list[Stage]:
    """The stages of ``proto`` (read without its external data; module docstring), in the order they run."""
    nodes, logits = _body(proto)
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {v.name: v for v in graph.input}
    if any(_has_subgraph(n) for n in nodes):  # values read from inside a subgraph are not followed: one stage
        cuts = [len(nodes)]
    else:
        cuts = [i + 1 for i, n in enumerate(nodes) if _END.search(n.name)]
        cuts = [c for c in cuts if c < len(nodes)] + [len(nodes)]
    template = onnx.ModelProto()
    template.CopyFrom(proto)
    template.ClearField("graph")
    groups, start = [], 0
    for end in cuts:
        groups.append(nodes[start:end])
        start = end
    made_in = {}  # value name -> stage index
    for k, group in enumerate(groups):
        for node in group:
            for out in node.output:
                if out:
                    made_in[out] = k
    needed_by_later: list[set[str]] = [set() for _ in groups]
    reads: list[list[str]] = []
    for k, group in enumerate(groups):
        seen, own = [], set()
        for node in group:
            for name in node.input:
                if name and name not in own and name not in seen:
                    if made_in.get(name) == k:
                        continue
                    if name in inits or name in graph_inputs:
                        seen.append(name)
                    elif name in made_in and made_in[name] < k:
                        seen.append(name)
                        needed_by_later[made_in[name]].add(name)
                    else:
                        raise ValueError(f"ONNX graph: value {name!r} is read before any node makes it")
            own.update(o for o in node.output if o)
        reads.append(seen)
    if logits not in made_in:
        raise ValueError(f"ONNX graph: no node makes the logits {logits!r}")
    needed_by_later[made_in[logits]].add(logits)
    stages = []
    for k, group in enumerate(groups):
        order = [o for n in group for o in n.output if o in needed_by_later[k]]  # graph order, each once
        stages.append(
            Stage(
                nodes=group,
                inputs=[n for n in reads[k] if n not in inits],
                outputs=list(dict.fromkeys(order)),
                initializers=[inits[n] for n in reads[k] if n in inits],
                graph_inputs=graph_inputs,
                template=template,
            )
        )
    if made_in[logits] != len(stages) - 1:
        raise ValueError("ONNX graph: the logits are not made by the body's last nodes")
    return stages
