"""The decoder body of an ONNX export: embedding, per-block norms, attention and MLP, head (wiring only, no math).

Per block (contrib ops of onnxruntime, as in its genai model builder)::

    x -> [Skip]SimplifiedLayerNorm -> QKV (one MatMulNBits/MatMul, + bias, + spectral adapter)
      -> GroupQueryAttention(packed QKV, do_rotary with the layer's cos/sin tables, scale, softcap,
         local_window_size of the layer) -> o_proj
      (with q/k norms: QKV -> Split -> RMSNorm per head of q and k -> RotaryEmbedding(q), RotaryEmbedding(k)
       -> GroupQueryAttention(q, k, v, do_rotary=0))
      -> [RMSNorm of the attention output] -> SkipSimplifiedLayerNorm -> gate|up -> Split -> act(gate) * up
      -> down_proj -> [RMSNorm of the MLP output] -> SkipSimplifiedLayerNorm (next block's input norm)

The bracketed steps are those of the architectures that have them (q/k norm: Qwen3, Gemma 3; four norms per block:
Gemma); the numbers (norm weights with any ``1 + w`` folded in, windows, scales, caps, rotary tables per layer)
come from :class:`~.onnx_spec.DecoderSpec` / :class:`~.onnx_spec.LayerWeights` as the converters prepared them.

:meth:`DecoderWriter.write` writes the decoder into several graphs at once (the If branches, one per spectral path),
layer by layer: the embedding is read (and its initializers made) first, then each layer's weights once, in order,
for every graph, then the head once. With a sink (:class:`~.onnx_external.ExternalData`) nothing of the weights
outlives the layer it belongs to, so a source that converts each block as it is read keeps one block in memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from onnx import TensorProto

from .onnx_external import ExternalData
from .onnx_layers import MS, Graph, Layers, layer_prefix
from .onnx_ops import pack_le
from .onnx_spec import DecoderSpec, DecoderWeights, LayerWeights, NBitsLinear, resolve

__all__ = ["BLOCK_OUT", "EMBED_OUT", "DecoderWriter"]

# the names of the nodes that end the embedding and each block (:mod:`.onnx_stages` cuts the graph after them)
EMBED_OUT, BLOCK_OUT = "end_of_embedding", "end_of_block"

_NEG = float(np.finfo(np.float32).min)


class DecoderWriter(Layers):
    """Writes the decoder of ``spec`` / ``weights`` (:meth:`write`); initializers in memory or through ``sink``."""

    def __init__(self, spec: DecoderSpec, weights: DecoderWeights, sink: ExternalData | None = None):
        super().__init__(spec.accuracy_level, spec.ell_width, spec.dense_adapter_density, spec.wht_factors, sink)
        self.spec, self.w = spec, weights
        self.embed_blocks: tuple[int, int] | None = None  # (bits, block size) of a quantized embedding

    def write(self, branches: Mapping[str, tuple[Graph, Sequence[str]]]) -> bool:
        """All nodes of the decoder into every graph of ``branches`` (``{mode: (graph, out_names)}``, ``out_names``
        = logits, then present key/value per layer), layer by layer, each layer's weights read once (see the module
        docstring). Returns whether any projection has a spectral adapter."""
        self.shared_inits()
        states = {mode: self.embed(g) for mode, (g, _) in branches.items()}
        adapted, layers = False, self.w.layers
        for i in range(len(layers)):  # by index: an iterator would hold layer i while layer i + 1 is read
            lw = layers[i]
            adapted = adapted or any(p.adapter is not None for p in lw.projections)
            for name, weight in self._norms(lw).items():
                self.root.init(f"{layer_prefix(i)}{name}.weight", weight.astype(np.float32, copy=False))
            for mode, (g, outs) in branches.items():
                states[mode] = self.block(g, i, lw, mode, states[mode], outs[1 + 2 * i : 3 + 2 * i])
            del lw
        self.head_init()
        for mode, (g, outs) in branches.items():
            self.head(g, states[mode][0], outs[0])
        return adapted

    def shared_inits(self) -> None:
        """The embedding (read here, once), the rotary tables, the final norm; the head of a quantized embedding
        it is tied to (written from the embedding's codes while they are in memory)."""
        s, w, root = self.spec, self.w, self.root
        embed = resolve(w.embed)
        if isinstance(embed, NBitsLinear):  # GatherBlockQuantized: codes packed along hidden, low nibble first
            self.embed_blocks = (embed.bits, embed.block_size)
            root.init("model.embed_tokens.qweight", pack_le(embed.codes, embed.bits))
            root.init("model.embed_tokens.scales", np.ascontiguousarray(embed.scales, dtype=np.float32))
            root.init("model.embed_tokens.qzeros", pack_le(embed.zeros, embed.bits))
            if w.lm_head is None:  # tied: a MatMulNBits on the same codes
                self.linear_init("lm_head", embed)
        else:
            root.init("model.embed_tokens.weight", embed.astype(np.float32, copy=False))
        del embed
        root.init("cos_cache", s.cos_cache.astype(np.float32))
        root.init("sin_cache", s.sin_cache.astype(np.float32))
        for key, (cos, sin) in s.rope_caches.items():
            root.init(f"cos_cache.{key}", cos.astype(np.float32))
            root.init(f"sin_cache.{key}", sin.astype(np.float32))
        root.init("model.norm.weight", w.final_norm.astype(np.float32))

    def head_init(self) -> None:
        """The head's initializers (read here, once); none when it is tied to a float32 embedding (a Gemm)."""
        head = resolve(self.w.lm_head)
        if head is not None:
            self.linear_init("lm_head", head)
        elif self.embed_blocks is not None and "lm_head" not in self.linears:
            raise ValueError("a head tied to a quantized embedding must be given as lm_head=None, not computed")

    @staticmethod
    def _norms(lw: LayerWeights) -> dict[str, np.ndarray]:
        named = {
            "input_layernorm": lw.input_norm,
            "post_attention_layernorm": lw.post_norm,
            "pre_feedforward_layernorm": lw.pre_ff_norm,
            "post_feedforward_layernorm": lw.post_ff_norm,
            "self_attn.q_norm": lw.q_norm,
            "self_attn.k_norm": lw.k_norm,
        }
        return {k: v for k, v in named.items() if v is not None}

    def masks(self, g: Graph) -> tuple[str, str, str, str]:
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

    def rms(self, g: Graph, x: str, weight: str, name: str = "") -> str:
        return g.op("RMSNormalization", [x, weight], name=name, epsilon=self.spec.rms_eps, axis=-1)

    def skip_rms(self, g: Graph, x: str, residual: str, weight: str, name: str = "") -> tuple[str, str]:
        """``(normalized x + residual, x + residual)``; the mean and inverse deviation outputs are not asked for."""
        y, _, _, res = g.op(
            "SkipSimplifiedLayerNormalization",
            [x, residual, weight],
            n_out=4,
            unused=(1, 2),
            domain=MS,
            name=name,
            epsilon=self.spec.rms_eps,
        )
        return y, res

    def head_norm(self, g: Graph, t: str, weight: str) -> str:
        """RMSNorm of every head of ``t`` ``[B, S, H * D]`` over its ``D`` values."""
        heads = g.op("Reshape", [t, g.const([0, 0, -1, self.spec.head_dim])])
        return g.op("Reshape", [self.rms(g, heads, weight), g.const([0, 0, -1])])

    def attention(self, g: Graph, x: str, i: int, lw: LayerWeights, mode: str, masks, out_kv) -> str:
        """Self-attention of layer ``i``. Without q/k norms the packed QKV goes straight into GroupQueryAttention,
        which applies the rotary embedding itself (``do_rotary=1``) at cache-slot positions; with them (Qwen3,
        Gemma 3) the norms need q and k apart: Split, norms, two RotaryEmbedding nodes fed ``position_ids``.
        Cache-slot positions count a left-padded row's padding, shifting all its positions by the same amount;
        rotary attention scores depend only on position differences, so its logits are unchanged (up to
        float32 rounding of the angles)."""
        s, p = self.spec, layer_prefix(i)
        seqlens, total32, attn_bias, qlens = masks
        qkv = self.projection(g, x, f"{p}self_attn.qkv_proj", [lw.q, lw.k, lw.v], mode)
        cos, sin = s.rope_names(i)
        packed = lw.q_norm is None and lw.k_norm is None
        if packed:
            qkv_in, rotary = [qkv, "", ""], [cos, sin]
        else:
            qd, kd = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
            q, k, v = g.op("Split", [qkv, g.const([qd, kd, kd])], n_out=3, axis=-1)
            if lw.q_norm is not None:
                q = self.head_norm(g, q, f"{p}self_attn.q_norm.weight")
            if lw.k_norm is not None:
                k = self.head_norm(g, k, f"{p}self_attn.k_norm.weight")
            q, k = (
                g.op("RotaryEmbedding", [t, "position_ids", cos, sin], domain=MS, name=f"{p}rotary") for t in (q, k)
            )
            qkv_in, rotary = [q, k, v], ["", ""]
        attrs = dict(
            num_heads=s.num_heads,
            kv_num_heads=s.num_kv_heads,
            scale=s.attention_scale,
            local_window_size=s.window_of(i),
            do_rotary=int(packed),
        )
        if s.attn_softcap:
            attrs["softcap"] = float(s.attn_softcap)
        attn, _, _ = g.op(
            "GroupQueryAttention",
            [*qkv_in, f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total32, *rotary]
            + ["", attn_bias, "", "", "", "", "", qlens],  # inputs 9..16: attention_bias 10, query_seqlens last
            domain=MS,
            name=f"{p}GroupQueryAttention",
            outputs=[f"{g.prefix}{p}attn/out0", *out_kv],
            **attrs,
        )
        return self.projection(g, attn, f"{p}self_attn.o_proj", [lw.o], mode)

    def mlp(self, g: Graph, x: str, i: int, lw: LayerWeights, mode: str) -> str:
        p, act_kind = layer_prefix(i), self.spec.activation
        gu = self.projection(g, x, f"{p}mlp.gate_up_proj", [lw.gate, lw.up], mode)
        gate, up = g.op("Split", [gu, g.const([lw.gate.linear.shape[0], lw.up.linear.shape[0]])], n_out=2, axis=-1)
        if act_kind == "silu":
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
        elif act_kind in ("gelu_tanh", "gelu"):
            act = g.op("Gelu", [gate], approximate="tanh" if act_kind == "gelu_tanh" else "none")
        else:
            raise ValueError(f"activation {act_kind!r} has no ONNX writer; known: silu, gelu_tanh, gelu")
        return self.projection(g, g.op("Mul", [act, up], name=f"{p}mlp.act"), f"{p}mlp.down_proj", [lw.down], mode)

    def embed(self, g: Graph) -> tuple[str, str, tuple[str, str, str, str]]:
        """The embedding and the masks: ``(x, residual, masks)``, ``x`` normalized for block 0."""
        s = self.spec
        if self.embed_blocks is not None:
            qe = "model.embed_tokens"
            bits, block_size = self.embed_blocks
            h = g.op(
                "GatherBlockQuantized",
                [f"{qe}.qweight", "input_ids", f"{qe}.scales", f"{qe}.qzeros"],
                domain=MS,
                name="embed",
                gather_axis=0,
                quantize_axis=1,
                block_size=block_size,
                bits=bits,
            )
        else:
            h = g.op("Gather", ["model.embed_tokens.weight", "input_ids"], axis=0, name="embed")
        if s.embed_scale is not None:
            h = g.op("Mul", [h, g.const(s.embed_scale, np.float32)], name="embed_scale")
        masks = self.masks(g)
        return self.rms(g, h, f"{layer_prefix(0)}input_layernorm.weight", name=EMBED_OUT), h, masks

    def block(self, g: Graph, i: int, lw: LayerWeights, mode: str, state, out_kv: Sequence[str]):
        """Decoder block ``i`` on ``state`` = ``(x, residual, masks)``; returns the next state, ``x`` normalized by
        the next block's input norm (the final norm after the last block)."""
        x, residual, masks = state
        p = layer_prefix(i)
        attn = self.attention(g, x, i, lw, mode, masks, out_kv)
        if lw.pre_ff_norm is not None:  # four norms: the attention output is normalized before the residual add
            attn = self.rms(g, attn, f"{p}post_attention_layernorm.weight")
            x, residual = self.skip_rms(g, attn, residual, f"{p}pre_feedforward_layernorm.weight")
        else:
            x, residual = self.skip_rms(g, attn, residual, f"{p}post_attention_layernorm.weight")
        down = self.mlp(g, x, i, lw, mode)
        if lw.post_ff_norm is not None:
            down = self.rms(g, down, f"{p}post_feedforward_layernorm.weight")
        last = i + 1 == self.spec.num_layers
        next_norm = "model.norm.weight" if last else f"{layer_prefix(i + 1)}input_layernorm.weight"
        x, residual = self.skip_rms(g, down, residual, next_norm, name=BLOCK_OUT)
        return x, residual, masks

    def head(self, g: Graph, x: str, logits_name: str) -> None:
        """The logits of the final hidden states ``x`` (after :meth:`head_init`), soft-capped when configured."""
        s = self.spec
        logits = [logits_name] if not s.final_softcap else None
        if "lm_head" in self.linears:  # its own weights, or the codes of a quantized embedding it is tied to
            lg = self.linear(g, x, "lm_head", outputs=logits)
        else:  # tied: Gemm against the embedding (one copy of the matrix)
            flat = g.op("Reshape", [x, g.const([-1, s.hidden_size])])
            lg = g.op("Gemm", [flat, "model.embed_tokens.weight"], transB=1, name="lm_head")
            shape = g.op("Concat", [g.op("Shape", ["input_ids"]), g.const([s.vocab_size])], axis=0)
            lg = g.op("Reshape", [lg, shape], outputs=logits)
        if s.final_softcap:  # c * tanh(z / c), in the order transformers computes it
            cap = g.const(float(s.final_softcap), np.float32)
            capped = g.op("Tanh", [g.op("Div", [lg, cap], name="final_softcap")])
            g.op("Mul", [capped, cap], outputs=[logits_name])
