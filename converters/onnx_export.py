"""The numbers of an ONNX export, taken from the PyTorch model that is exported (no graph wiring here).

:class:`OnnxDecoder` walks a model of any registered architecture (:mod:`.architectures`: the entry of its
``model_type`` names the blocks, linears and norms, :func:`~.architectures.describe` gives the windows, scales, caps,
RoPE per layer type and embedding scale) as the project's loaders build it (``QuantLinear`` for quantized layers,
``QWHALinear`` for adapted ones, ``nn.Linear`` otherwise) and gives the
:class:`~qwha_export.formats.onnx_graph.DecoderSpec` / ``DecoderWeights`` that
:func:`~qwha_export.formats.onnx_graph.build_decoder_model` turns into a graph. The model is either held whole
(:func:`decoder_from_model` converts everything at once) or a meta-device skeleton whose blocks a
:class:`~.block_stream.BlockSource` materialises one at a time as the graph writer reads them (memory flat in
depth: one block, then the embedding or the head). The numbers:

* quantized layers keep their exact codes, zero points and scales (float16 -> float32 is exact); 3-bit codes are
  stored as 4-bit codes; per-channel scales are repeated over power-of-two blocks; act-order layers (``g_idx``)
  read their input columns in group order (``perm``), which is exact as every group holds ``group_size`` columns;
* adapters: ``values * s / (d_in * sqrt(d_out))`` computed in float64 and cast once to float32;
* rotary tables: the model's own rotary module evaluated at positions ``0 .. max_position_embeddings - 1``
  (``cos``/``sin`` are duplicated halves, the first half is kept), once per layer type when the RoPE base differs
  per layer type (Gemma 3 local/global), so every RoPE variant transformers implements statically (default, linear,
  llama3, yarn, and longrope when ``max_position_embeddings`` stays within its original length) is reproduced as
  PyTorch computes it;
* norms: the weight the graph multiplies by, ``offset + w`` computed in float64 and cast once (Gemma's ``1 + w``);
* fused projections (Phi-3 ``qkv_proj`` / ``gate_up_proj``) are split by output rows into q/k/v and gate/up (codes,
  scales, zero points, bias and adapter entries alike); the graph packs them back into one node, so nothing changes;
* sliding-window layers: GroupQueryAttention ``local_window_size = window``: transformers keeps the keys with
  ``q - k < window`` (the current one included), and so does onnxruntime 1.32's CPU GroupQueryAttention with
  ``local_window_size = window`` (measured: ``window - 1`` drops the oldest key, tests/test_onnx_architectures.py);
* an unquantized ``lm_head`` whose float32 weight lies exactly on a symmetric 8-bit grid with block 32..128 (e.g. a
  GGUF ``Q8_0`` embedding, as in SmolLM2) is written as an 8-bit MatMulNBits whose dequantized weight is
  bit-identical; otherwise it stays a float32 MatMul;
* ``head_bits`` (8 or 4): the embedding and the head are RTN-quantized (:func:`~.quantize.quantize_rtn`, groups of
  :data:`HEAD_BLOCK` along the hidden axis) into a GatherBlockQuantized embedding and a MatMulNBits head, as the
  onnxruntime-genai builder writes them for large vocabularies; a tied head reads the same codes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..formats.onnx_graph import (
    ACTIVATIONS,
    DecoderSpec,
    DecoderWeights,
    DenseLinear,
    LayerWeights,
    NBitsLinear,
    Projection,
    SpectralAdapter,
)
from ..formats.onnx_spec import resolve
from ..kernels import hadamard_k, hadamard_matrix, hadamard_order
from .architectures import FULL, SUPPORTED_MODEL_TYPES, ModelLayout, architecture_for, decoder_layers, describe
from .block_stream import BlockSource, release_freed_memory
from .quantize import n_groups_of, quantize_rtn

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "check_config",
    "split_projection",
    "decoder_from_model",
    "OnnxDecoder",
    "exact_grid_linear",
    "HEAD_BITS",
    "HEAD_BLOCK",
    "quantized_table",
    "nbits_linear",
    "wht_factor_sizes",
    "wht_factors",
]

_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
_LONGROPE = ("longrope", "su")  # static only while no position exceeds original_max_position_embeddings
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_MAX_FACTOR = 128  # widest Sylvester factor of the WalshHadamard function body (measured: README "ONNX export")
assert set(_ACTIVATIONS.values()) <= set(ACTIVATIONS)


def check_config(cfg: dict[str, Any]) -> ModelLayout:
    """The :class:`ModelLayout` of ``cfg`` (a config.json dict or a config's ``to_dict()``); one-line ``ValueError``
    unless it describes a model this exporter writes."""
    try:
        architecture_for(cfg)
    except ValueError:
        mt = cfg.get("model_type")
        raise ValueError(
            f"model_type {mt!r} cannot be exported to ONNX; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        ) from None
    try:
        layout = describe(cfg)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"config of model_type {cfg.get('model_type')!r} lacks or mistypes {exc}") from None
    if layout.activation not in _ACTIVATIONS:
        raise ValueError(
            f"activation {layout.activation!r} is not supported by the ONNX export; "
            f"supported: {', '.join(_ACTIVATIONS)}"
        )
    if layout.mlp_bias:
        raise ValueError("mlp_bias=true is not supported by the ONNX export")
    if layout.rotary_fraction != 1.0:
        raise ValueError(
            f"partial_rotary_factor={layout.rotary_fraction} is not supported by the ONNX export (1.0 only)"
        )
    for params in layout.rope.values():
        rtype = params.get("rope_type", params.get("type", "default"))
        if rtype in _LONGROPE:
            original = params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
            if not original or layout.max_positions > int(original):
                raise ValueError(
                    f"rope_type {rtype!r} switches to its long factors past original_max_position_embeddings="
                    f"{original} (max_position_embeddings={layout.max_positions}): not static, cannot be exported"
                )
        elif rtype not in _STATIC_ROPE:
            raise ValueError(
                f"rope_type {rtype!r} is not supported by the ONNX export; supported: {', '.join(_STATIC_ROPE)}, "
                "longrope within its original length"
            )
    return layout


def _block_size(group: int) -> int:
    for b in (128, 64, 32, 16):
        if group % b == 0:
            return b
    raise ValueError(f"group size {group} is not a multiple of 16; MatMulNBits cannot represent it")


def nbits_linear(module: nn.Module) -> NBitsLinear:
    """The MatMulNBits weight of a ``QuantLinear`` (exact codes, zero points and scales)."""
    qw = module.qweight
    d_out, d_in = qw.shape
    codes = qw.codes.cpu().numpy()
    zeros = qw.zeros.cpu().numpy()
    scales = qw.scales.cpu().float().numpy()  # float16 -> float32 is exact
    perm = None
    if qw.g_idx is not None:
        g = qw.g_idx.long().cpu()
        sizes = torch.full((qw.n_groups,), qw.group_size, dtype=torch.long)
        sizes[-1] = d_in - (qw.n_groups - 1) * qw.group_size  # a ragged last group
        if not torch.equal(torch.bincount(g, minlength=qw.n_groups), sizes):
            raise ValueError("act-order g_idx with unequal group sizes cannot be written as MatMulNBits")
        perm_t = torch.argsort(g, stable=True)
        perm = perm_t.numpy().astype(np.int64)
        codes = codes[:, perm]
    block = _block_size(qw.group_size)
    reps = qw.group_size // block
    if reps > 1:  # e.g. per-channel: the same scale and zero point for every block of the group
        n_blocks = n_groups_of(d_in, block)  # a ragged last group spans fewer blocks
        zeros = np.repeat(zeros, reps, axis=1)[:, :n_blocks]
        scales = np.repeat(scales, reps, axis=1)[:, :n_blocks]
    bits = 4 if qw.bits == 3 else qw.bits
    return NBitsLinear(np.ascontiguousarray(codes), np.ascontiguousarray(zeros), scales, bits, block, perm)


def exact_grid_linear(weight: torch.Tensor, bits: int = 8) -> NBitsLinear | None:
    """An ``NBitsLinear`` that dequantizes to exactly ``weight`` (float32) on a symmetric ``bits`` grid, or None.

    Per block of ``b`` in (128, 64, 32) columns the scale is ``max|w| / (2**(bits-1) - 1)`` and the zero point
    ``2**(bits-1)``; accepted only if ``(code - zero) * scale`` reproduces every weight bit for bit.
    """
    w = weight.detach().cpu().float()
    n, k = w.shape
    qmax, zero = 2 ** (bits - 1) - 1, 2 ** (bits - 1)
    for block in (128, 64, 32):
        if k % block:
            continue
        wb = w.reshape(n, k // block, block)
        scale = wb.abs().amax(dim=2) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round(wb / scale[..., None])
        if float(q.abs().max()) > qmax or not torch.equal(q * scale[..., None], wb):
            continue
        codes = (q + zero).to(torch.uint8).reshape(n, k).numpy()
        zeros = np.full((n, k // block), zero, np.uint8)
        return NBitsLinear(codes, zeros, scale.numpy().astype(np.float32), bits, block)
    return None


HEAD_BITS = (8, 4)
HEAD_BLOCK = 32  # the builder's block for its int4 / int8 head and embedding


def quantized_table(weight: torch.Tensor, bits: int) -> NBitsLinear:
    """RTN ``bits``-bit groups of :data:`HEAD_BLOCK` columns of a ``(rows, hidden)`` embedding or head weight."""
    if bits not in HEAD_BITS:
        raise ValueError(f"head_bits={bits!r} must be one of {HEAD_BITS} (or None: float32)")
    hidden = weight.shape[1]
    if hidden % HEAD_BLOCK:
        raise ValueError(f"hidden size {hidden} is not a multiple of {HEAD_BLOCK}: the head cannot be quantized")
    q = quantize_rtn(weight.detach().cpu(), bits, HEAD_BLOCK)
    scales = q.scales.float().numpy()  # float16 -> float32 is exact
    return NBitsLinear(q.codes.numpy(), q.zeros.numpy(), scales, bits, HEAD_BLOCK)


def _linear(module: nn.Module) -> NBitsLinear | DenseLinear:
    if hasattr(module, "qweight") and hasattr(module, "codes"):
        return nbits_linear(module)
    if isinstance(module, nn.Linear):
        return DenseLinear(module.weight.detach().cpu().float().numpy())
    raise ValueError(f"cannot export a {type(module).__name__} as an ONNX linear layer")


def _bias(module: nn.Module) -> np.ndarray | None:
    b = getattr(module, "bias", None)
    return None if b is None else b.detach().cpu().float().numpy()


def _projection(module: nn.Module) -> Projection:
    if all(hasattr(module, a) for a in ("base", "spectrum", "indices", "coefficient")):  # a QWHA layer
        d_in = module.in_features
        coef = module.coefficient
        values = (module.spectrum.detach().cpu().double() * coef).float().numpy()
        rows, cols = (t.cpu().numpy().astype(np.int64) for t in module.indices)
        adapter = SpectralAdapter(rows, cols, values, hadamard_order(d_in)[0])
        return Projection(_linear(module.base), _bias(module.base), adapter)
    return Projection(_linear(module), _bias(module), None)


def wht_factor_sizes(n: int) -> tuple[int, list[int]]:
    """``(K, sizes)`` of the WalshHadamard function body: ``H_K`` (if ``K > 1``), then Sylvester factors of ``2^m``
    with the widest (<= 128) on the last axis, so every MatMul multiplies long rows (see onnx_ops.wht_function)."""
    k, p = hadamard_order(n)
    last = min(p, _MAX_FACTOR)
    sizes, rest = [], p // last
    while rest > 1:
        sizes.append(min(rest, _MAX_FACTOR))
        rest //= sizes[-1]
    return k, ([k] if k > 1 else []) + sizes + ([last] if p > 1 else [])


def wht_factors(n: int) -> tuple[int, list[np.ndarray]]:
    k, sizes = wht_factor_sizes(n)
    mats = [hadamard_k(k) if (i == 0 and k > 1) else hadamard_matrix(f) for i, f in enumerate(sizes)]
    return k, [m.numpy().astype(np.float32) for m in mats]


def split_projection(proj: Projection, sizes: tuple[int, ...]) -> list[Projection]:
    """A fused projection (Phi-3 ``qkv_proj``, ``gate_up_proj``) as consecutive blocks of ``sizes`` output rows."""
    if sum(sizes) != proj.linear.shape[0]:
        raise ValueError(f"cannot split {proj.linear.shape[0]} output rows into {sizes}")
    lin, ad, out, off = proj.linear, proj.adapter, [], 0
    for n in sizes:
        rows = slice(off, off + n)
        part: NBitsLinear | DenseLinear
        if isinstance(lin, NBitsLinear):
            part = NBitsLinear(lin.codes[rows], lin.zeros[rows], lin.scales[rows], lin.bits, lin.block_size, lin.perm)
        else:
            part = DenseLinear(lin.weight[rows])
        adapter = None
        if ad is not None:
            keep = (ad.rows >= off) & (ad.rows < off + n)
            if keep.any():
                adapter = SpectralAdapter(ad.rows[keep] - off, ad.cols[keep], ad.values[keep], ad.wht_k)
        out.append(Projection(part, None if proj.bias is None else proj.bias[rows], adapter))
        off += n
    return out


def _norm(module: nn.Module, offset: float) -> np.ndarray:
    """The multiplier of an RMSNorm: ``offset + w`` in float64, cast once to float32."""
    return (module.weight.detach().cpu().double() + offset).float().numpy()


def _rope_tables(model: nn.Module, head_dim: int, layer_type: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    rotary = getattr(model, "model", model).rotary_emb
    max_pos = int(model.config.max_position_embeddings)
    pos = torch.arange(max_pos)[None]
    x = torch.zeros(1, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(x, pos) if layer_type is None else rotary(x, pos, layer_type)
    half = head_dim // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def _block_weights(block: nn.Module, layout: ModelLayout) -> LayerWeights:
    """The weights of one decoder block, named by the architecture entry."""
    arch = layout.architecture
    att, mlp = getattr(block, arch.attention_attr), getattr(block, arch.mlp_attr)
    qd, kd = layout.num_heads * layout.head_dim, layout.num_kv_heads * layout.head_dim
    att_names, mlp_names = arch.attention_linears, arch.mlp_linears
    if arch.fused_qkv:
        q, k, v = split_projection(_projection(getattr(att, att_names[0])), (qd, kd, kd))
    else:
        q, k, v = (_projection(getattr(att, n)) for n in att_names[:3])
    o = _projection(getattr(att, att_names[-1]))
    if arch.fused_gate_up:
        fused = _projection(getattr(mlp, mlp_names[0]))
        gate, up = split_projection(fused, (fused.linear.shape[0] // 2,) * 2)
    else:
        gate, up = (_projection(getattr(mlp, n)) for n in mlp_names[:2])
    down = _projection(getattr(mlp, mlp_names[-1]))
    norms = [_norm(block.get_submodule(n), layout.norm_offset) for n in arch.block_norms]
    four = len(norms) == 4
    return LayerWeights(
        norms[0],
        norms[1],
        q,
        k,
        v,
        o,
        gate,
        up,
        down,
        pre_ff_norm=norms[2] if four else None,
        post_ff_norm=norms[3] if four else None,
        q_norm=_norm(att.q_norm, layout.norm_offset) if arch.qk_norm else None,
        k_norm=_norm(att.k_norm, layout.norm_offset) if arch.qk_norm else None,
    )


class OnnxDecoder:
    """``spec`` (:class:`DecoderSpec`) and ``weights`` (:class:`DecoderWeights`) of the ONNX export of ``model``,
    converted when the graph writer reads them; :meth:`info` summarises what was written once it has.

    ``source`` None: ``model`` holds every weight. Else ``model`` is a skeleton with its parameters on the meta
    device (:func:`~.block_stream.model_skeleton`; buffers such as the rotary ``inv_freq`` are real) and ``source``
    (a :class:`~.block_stream.BlockSource`) materialises a copy of a module when it is read -- block ``i`` each time
    ``weights.layers[i]`` is, the embedding and the head when the writer calls ``weights.embed`` /
    ``weights.lm_head``, the final norm now -- which is converted and dropped, so at most one block and the embedding
    or the head are in memory (nothing is kept once the writer lets go). The skeleton itself stays meta and is
    referenced by names only, so a stream may run it afterwards. A head counts as tied
    when the config ties it and the source has no ``lm_head.weight`` (as :meth:`.block_stream.BlockStream.logits`
    reads it). The Walsh-Hadamard factors of ``spec.wht_factors`` are added per size as adapted blocks are read,
    before the writer sees them; ``quant_settings`` collects ``(bits, group_size)`` of every quantized layer read.
    ``head_bits`` (None, 8 or 4): quantize the embedding and the head (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        accuracy_level: int = 0,
        exact_lm_head: bool = True,
        head_bits: int | None = None,
        source: BlockSource | None = None,
    ) -> None:
        if head_bits is not None and head_bits not in HEAD_BITS:
            raise ValueError(f"head_bits={head_bits!r} must be one of {HEAD_BITS} (or None: float32)")
        self.model, self.source, self.head_bits, self.exact_lm_head = model, source, head_bits, exact_lm_head
        self.layout = layout = check_config(model.config.to_dict())
        arch, head_dim = layout.architecture, layout.head_dim
        blocks = decoder_layers(model)
        for i, block in enumerate(blocks):  # the registry's scale against the one transformers computes
            scaling = getattr(getattr(block, arch.attention_attr), "scaling", layout.attention_scale)
            if not math.isclose(float(scaling), layout.attention_scale, rel_tol=1e-12):
                raise ValueError(
                    f"layer {i}: attention scaling {scaling} differs from the registry's {layout.attention_scale}"
                )
        if arch.rope_per_layer_type:  # one table per layer type; the global one (if any) is cos_cache / sin_cache
            kinds = sorted(set(layout.layer_types), key=lambda t: t != FULL)
            tables = {t: _rope_tables(model, head_dim, t) for t in kinds}
            default, layer_rope = kinds[0], tuple("" if t == kinds[0] else t for t in layout.layer_types)
            cos, sin = tables.pop(default)
        else:
            (cos, sin), tables, layer_rope = _rope_tables(model, head_dim), {}, None
        self._names = {id(m): n for n, m in model.named_modules()}
        # by name, not the modules: a stream that later runs the skeleton loads its blocks in place and drops them
        self.block_names = [self._names[id(b)] for b in blocks]
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        if source is None:
            self.tied = (
                head is not None and not hasattr(head, "codes") and head.weight.data_ptr() == embed.weight.data_ptr()
            )
        else:
            self.tied = layout.tied_head and not source.has(f"{self._prefix(head)}weight")
        self.quant_settings: set[tuple[int, int]] = set()
        self._nbits: set[tuple[int, int]] = set()
        self._head_info: str | None = None
        windows = tuple(layout.window if layout.sliding(i) else -1 for i in range(len(blocks)))
        self.spec = DecoderSpec(
            num_layers=len(blocks),
            hidden_size=layout.hidden_size,
            num_heads=layout.num_heads,
            num_kv_heads=layout.num_kv_heads,
            head_dim=head_dim,
            vocab_size=layout.vocab_size,
            rms_eps=layout.rms_eps,
            cos_cache=cos,
            sin_cache=sin,
            attention_scale=layout.attention_scale,
            window=windows[0] if len(set(windows)) == 1 else -1,
            accuracy_level=accuracy_level,
            wht_factors={},
            activation=_ACTIVATIONS[layout.activation],
            embed_scale=float(np.float32(layout.embed_scale)) if layout.embed_scale != 1.0 else None,  # as a float32
            attn_softcap=float(layout.attn_softcap or 0.0),
            final_softcap=float(layout.final_softcap or 0.0),
            layer_windows=None if len(set(windows)) == 1 else windows,
            layer_rope=layer_rope,
            rope_caches=tables,
        )
        final_norm = self._read(getattr(model, "model", model).norm, lambda m: _norm(m, layout.norm_offset))
        lm_head: Any = self._lm_head
        if self.tied and (head_bits is not None or not exact_lm_head):  # known now: no head weights of its own
            lm_head, self._head_info = None, self._head_kind(None)
        self.weights = DecoderWeights(self._embed, _Blocks(self), final_norm, lm_head)

    def _prefix(self, module: nn.Module) -> str:
        return f"{self._names[id(module)]}."

    def _read(self, module: nn.Module, convert, prefix: str | None = None):
        """``convert(module)`` of ``module`` with its weights: the model's own module, or (with a source) a copy of
        the skeleton's module materialised from ``prefix`` (its own name by default), dropped on return."""
        if self.source is None:
            return convert(module)
        release_freed_memory()  # what the previous read left behind, now that the writer has let go of it
        work = copy.deepcopy(module)  # parameters on the meta device: nothing is copied
        self.source.load(work, prefix or self._prefix(module))
        return convert(work)

    def _embed(self) -> np.ndarray | NBitsLinear:
        def convert(embed: nn.Module) -> np.ndarray | NBitsLinear:
            w = embed.weight.detach().cpu().float()
            return w.numpy() if self.head_bits is None else quantized_table(w, self.head_bits)

        return self._read(self.model.get_input_embeddings(), convert)

    def _lm_head(self) -> NBitsLinear | DenseLinear | None:
        def convert(head: nn.Module) -> NBitsLinear | DenseLinear | None:
            self.quant_settings |= _quant_settings(head)
            if self.head_bits is not None:
                return quantized_table(head.weight, self.head_bits)
            if self.exact_lm_head and not hasattr(head, "codes") and hasattr(head, "weight"):
                return exact_grid_linear(head.weight) or (None if self.tied else _linear(head))
            return _linear(head)

        embed = self.model.get_input_embeddings()
        lm_head = self._read(self.model.get_output_embeddings(), convert, self._prefix(embed) if self.tied else None)
        self._head_info = self._head_kind(lm_head)
        return lm_head

    def _head_kind(self, lm_head: NBitsLinear | DenseLinear | None) -> str:
        if self.head_bits is not None:
            return f"{'tied ' if self.tied else ''}{self.head_bits}-bit RTN/block {HEAD_BLOCK} MatMulNBits"
        if lm_head is None:
            return "tied float32"
        return "exact 8-bit MatMulNBits" if isinstance(lm_head, NBitsLinear) else "float32"

    def _block(self, index: int) -> LayerWeights:
        def convert(block: nn.Module) -> LayerWeights:
            self.quant_settings |= _quant_settings(block)
            return _block_weights(block, self.layout)

        lw = self._read(self.model.get_submodule(self.block_names[index]), convert)
        for p in lw.projections:
            if p.adapter is not None and p.linear.shape[1] not in self.spec.wht_factors:
                self.spec.wht_factors[p.linear.shape[1]] = wht_factors(p.linear.shape[1])
            if isinstance(p.linear, NBitsLinear):
                self._nbits.add((p.linear.bits, p.linear.block_size))
        return lw

    def info(self) -> dict[str, Any]:
        """What the graph holds (quantized block sizes, adapted sizes, head, embedding, RoPE, windows, caps); the
        blocks and the head must have been read."""
        if self._head_info is None:
            raise RuntimeError("the decoder's weights have not been read yet")
        layout, spec = self.layout, self.spec
        rope_types = {t: p.get("rope_type", "default") for t, p in layout.rope.items()}
        rope_type = rope_types if len(set(rope_types.values())) > 1 else next(iter(rope_types.values()), "default")
        table = f"{self.head_bits}-bit RTN/block {HEAD_BLOCK} GatherBlockQuantized"
        return {
            "model_type": self.model.config.model_type,
            "quantized": sorted({f"{b}-bit/block {s}" for b, s in self._nbits}),
            "adapted_sizes": sorted(spec.wht_factors),
            "lm_head": self._head_info,
            "embedding": "float32" if self.head_bits is None else table,
            "rope_type": rope_type,
            "window": spec.window if spec.layer_windows is None else list(spec.layer_windows),
            "layer_types": list(layout.layer_types),
            "attn_softcap": spec.attn_softcap,
            "final_softcap": spec.final_softcap,
        }


class _Blocks(Sequence[LayerWeights]):
    """The ``LayerWeights`` of an :class:`OnnxDecoder`'s blocks, converted each time one is read (nothing kept)."""

    def __init__(self, decoder: OnnxDecoder) -> None:
        self._decoder = decoder

    def __len__(self) -> int:
        return len(self._decoder.block_names)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        return self._decoder._block(range(len(self))[index])


def _quant_settings(module: nn.Module) -> set[tuple[int, int]]:
    """``(bits, group_size)`` of every quantized layer in ``module``."""
    return {(int(m.bits), int(m.group_size)) for m in module.modules() if hasattr(m, "codes") and hasattr(m, "bits")}


def decoder_from_model(
    model: nn.Module, accuracy_level: int = 0, exact_lm_head: bool = True, head_bits: int | None = None
) -> tuple[DecoderSpec, DecoderWeights, dict[str, Any]]:
    """``(spec, weights, info)`` of a model held whole in memory, every weight converted now (see
    :class:`OnnxDecoder`); ``info`` summarises what was written."""
    dec = OnnxDecoder(model, accuracy_level, exact_lm_head, head_bits)
    w = dec.weights
    weights = DecoderWeights(resolve(w.embed), list(w.layers), w.final_norm, resolve(w.lm_head))
    return dec.spec, weights, dec.info()
