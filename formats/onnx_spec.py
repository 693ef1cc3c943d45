"""The numbers an ONNX decoder export is written from (prepared in ``converters.onnx_export``; no math here)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

__all__ = [
    "ACTIVATIONS",
    "NBitsLinear",
    "DenseLinear",
    "SpectralAdapter",
    "Projection",
    "LayerWeights",
    "DecoderSpec",
    "DecoderWeights",
    "io_names",
    "resolve",
]

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")  # MLP activation of DecoderSpec: x*sigmoid(x), Gelu tanh / exact


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
    """One decoder block. Norm weights are the multipliers the graph applies (a ``1 + w`` convention is folded in).

    Two-norm blocks (Llama): ``input_norm`` before attention, ``post_norm`` before the MLP. Four-norm blocks (Gemma,
    ``pre_ff_norm`` set): ``post_norm`` normalizes the attention output before the residual add, ``pre_ff_norm``
    precedes the MLP and ``post_ff_norm`` normalizes its output. ``q_norm`` / ``k_norm`` ([head_dim]): RMSNorm of each
    query / key head before the rotary embedding (Qwen3, Gemma 3).
    """

    input_norm: np.ndarray
    post_norm: np.ndarray
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    gate: Projection
    up: Projection
    down: Projection
    pre_ff_norm: np.ndarray | None = None
    post_ff_norm: np.ndarray | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None

    @property
    def projections(self) -> tuple[Projection, ...]:
        return (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)


@dataclass(frozen=True)
class DecoderSpec:
    """Shapes and constants of the decoder graph.

    ``cos_cache`` / ``sin_cache`` ([max_positions, rotary_dim / 2]) are the rotary tables of every layer unless
    ``layer_rope[i]`` names another pair in ``rope_caches``; ``window`` is GroupQueryAttention's ``local_window_size``
    (-1: none) of every layer unless ``layer_windows`` gives one per layer. ``activation`` is one of
    :data:`ACTIVATIONS`; ``embed_scale`` (None: 1) multiplies the embedded tokens; ``attn_softcap`` is
    GroupQueryAttention's ``softcap`` (0: none); ``final_softcap`` (0: none) maps the logits to ``c * tanh(z / c)``.
    """

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
    activation: str = "silu"
    embed_scale: float | None = None
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    layer_windows: tuple[int, ...] | None = None
    layer_rope: tuple[str, ...] | None = None  # "" for cos_cache / sin_cache, else a key of rope_caches
    rope_caches: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def window_of(self, layer: int) -> int:
        return self.window if self.layer_windows is None else self.layer_windows[layer]

    def rope_names(self, layer: int) -> tuple[str, str]:
        """The (cos, sin) initializer names of ``layer``'s rotary embedding."""
        key = "" if self.layer_rope is None else self.layer_rope[layer]
        return ("cos_cache", "sin_cache") if not key else (f"cos_cache.{key}", f"sin_cache.{key}")


@dataclass(frozen=True)
class DecoderWeights:
    """The weights of the decoder. ``embed``: float32 ``[vocab, hidden]`` (a Gather), or an ``NBitsLinear``
    of the same shape (GatherBlockQuantized along the hidden axis, symmetric zero points packed as MatMulNBits').
    ``lm_head`` None: tied to ``embed`` (a Gemm with ``transB`` against the float32 matrix, or a MatMulNBits on the
    same codes when ``embed`` is quantized).

    Streamed sources: ``layers`` may be any sequence, e.g. one that converts block ``i`` when it is read (the graph
    writer reads each index once, in order, and lets go of it before reading the next), and ``embed`` / ``lm_head``
    may be zero-argument callables returning them (called once: the embedding before the blocks, the head after
    them; a head tied to a quantized embedding is ``None`` itself, as its codes are written with the embedding)."""

    embed: np.ndarray | NBitsLinear | Callable[[], np.ndarray | NBitsLinear]
    layers: Sequence[LayerWeights]
    final_norm: np.ndarray
    lm_head: NBitsLinear | DenseLinear | None | Callable[[], NBitsLinear | DenseLinear | None]


_T = TypeVar("_T")


def resolve(value: _T | Callable[[], _T]) -> _T:
    """``value``, or what it returns when it is a callable (a lazily read weight of :class:`DecoderWeights`)."""
    return value() if callable(value) else value


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """``(input names, output names)`` of the decoder graph, in order."""
    ins = ["input_ids", "attention_mask", "position_ids"]
    outs = ["logits"]
    for i in range(num_layers):
        ins += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outs += [f"present.{i}.key", f"present.{i}.value"]
    return ins, outs
