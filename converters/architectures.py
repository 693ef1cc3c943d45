"""One registry of the decoder architectures qwha-export adapts, keyed by ``config.model_type``.

Every command reads the same :class:`Architecture` entry (as optimum registers one ONNX config per model type):
``init`` finds the decoder blocks and the target linears here, the loaders refuse an unsupported ``model_type``
here, and :func:`describe` resolves the entry against one model's config into a :class:`ModelLayout` -- the
concrete attention, norm, MLP, RoPE and embedding numbers an exporter needs (layer types, windows, scaling,
softcapping, ``1 + w`` norms, RoPE bases per layer type, embedding scale, tied head).

The layouts below were read from the transformers 5.x modeling code (``models/<type>/modeling_<type>.py``):

========== ============================== ============================ =====================================
model_type attention linears              MLP linears                  specifics
========== ============================== ============================ =====================================
llama      q/k/v/o_proj                   gate/up/down_proj            GQA, SiLU
mistral    q/k/v/o_proj                   gate/up/down_proj            sliding window on every layer
qwen2      q/k/v/o_proj (q/k/v biased)    gate/up/down_proj            optional sliding layers (layer_types)
qwen3      q/k/v/o_proj                   gate/up/down_proj            q/k RMSNorm over head_dim
gemma2     q/k/v/o_proj                   gate/up/down_proj            4 norms ``1 + w``, softcapping, GELU-tanh,
                                                                       query_pre_attn_scalar, local/global layers
gemma3_text q/k/v/o_proj                  gate/up/down_proj            gemma2 + q/k norm, RoPE base per layer type
phi3       qkv_proj (fused), o_proj       gate_up_proj (fused), down   fused projections, optional sliding window
========== ============================== ============================ =====================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from torch import nn

from ..kernels import SUPPORTED_ORDERS, is_supported_size

__all__ = [
    "ARCHITECTURES",
    "FULL",
    "SLIDING",
    "SUPPORTED_MODEL_TYPES",
    "Architecture",
    "ModelLayout",
    "ModelType",
    "Sliding",
    "architecture_for",
    "check_hadamard_sizes",
    "config_dict",
    "decoder_layers",
    "describe",
    "supported_sizes_near",
]

FULL, SLIDING = "full_attention", "sliding_attention"


class ModelType(StrEnum):
    LLAMA = "llama"
    MISTRAL = "mistral"
    QWEN2 = "qwen2"
    QWEN3 = "qwen3"
    GEMMA2 = "gemma2"
    GEMMA3 = "gemma3_text"
    PHI3 = "phi3"


class Sliding(StrEnum):
    """Where sliding-window (local) attention applies: nowhere, on every layer, or per ``config.layer_types``."""

    NONE = "none"
    ALL = "all"
    LAYER_TYPES = "layer_types"


_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
_GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")
_TWO_NORMS = ("input_layernorm", "post_attention_layernorm")
_FOUR_NORMS = (*_TWO_NORMS, "pre_feedforward_layernorm", "post_feedforward_layernorm")


@dataclass(frozen=True)
class Architecture:
    """How one ``model_type`` is laid out (module names relative to a decoder block, config keys)."""

    model_type: ModelType
    attention_linears: tuple[str, ...] = _QKVO
    mlp_linears: tuple[str, ...] = _GATE_UP_DOWN
    block_norms: tuple[str, ...] = _TWO_NORMS  # in the order the block applies them
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + weight): Gemma stores w with 1 + w applied
    qk_norm: bool = False  # self_attn.q_norm / k_norm (RMSNorm over head_dim)
    activation_key: str = "hidden_act"  # config key of the MLP activation
    sliding: Sliding = Sliding.NONE
    scaling_key: str | None = None  # attention scale = config[scaling_key] ** -0.5 (else head_dim ** -0.5)
    softcapping: bool = False  # attn_logit_softcapping / final_logit_softcapping
    rope_per_layer_type: bool = False  # rope_parameters = {layer_type: params} (Gemma 3 local/global bases)
    embed_scale_sqrt_hidden: bool = False  # embeddings multiplied by sqrt(hidden_size)
    layers_attr: str = "layers"  # decoder blocks: model.model.<layers_attr> (model.<layers_attr> for a base model)
    attention_attr: str = "self_attn"
    mlp_attr: str = "mlp"
    fused_qkv: bool = False  # one qkv_proj: output rows [q | k | v]
    fused_gate_up: bool = False  # one gate_up_proj: output rows [gate | up]

    @property
    def target_modules(self) -> tuple[str, ...]:
        """The linears QWHA adapts by default (last name parts, as peft's ``target_modules``)."""
        return (*self.attention_linears, *self.mlp_linears)

    def linear_paths(self) -> tuple[str, ...]:
        """Each target linear's path inside a decoder block, e.g. ``self_attn.q_proj``."""
        return tuple(f"{self.attention_attr}.{n}" for n in self.attention_linears) + tuple(
            f"{self.mlp_attr}.{n}" for n in self.mlp_linears
        )


_GEMMA = dict(
    block_norms=_FOUR_NORMS,
    norm_offset=1.0,
    activation_key="hidden_activation",
    sliding=Sliding.LAYER_TYPES,
    scaling_key="query_pre_attn_scalar",
    softcapping=True,
    embed_scale_sqrt_hidden=True,
)

ARCHITECTURES: dict[ModelType, Architecture] = {
    a.model_type: a
    for a in (
        Architecture(ModelType.LLAMA),
        Architecture(ModelType.MISTRAL, sliding=Sliding.ALL),
        Architecture(ModelType.QWEN2, sliding=Sliding.LAYER_TYPES),
        Architecture(ModelType.QWEN3, sliding=Sliding.LAYER_TYPES, qk_norm=True),
        Architecture(ModelType.GEMMA2, **_GEMMA),
        Architecture(ModelType.GEMMA3, qk_norm=True, rope_per_layer_type=True, **_GEMMA),
        Architecture(
            ModelType.PHI3,
            attention_linears=("qkv_proj", "o_proj"),
            mlp_linears=("gate_up_proj", "down_proj"),
            sliding=Sliding.ALL,
            fused_qkv=True,
            fused_gate_up=True,
        ),
    )
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t.value for t in ARCHITECTURES)


def config_dict(config: Any) -> dict[str, Any]:
    """A config as a plain dict: a ``PretrainedConfig``, a model (its ``.config``) or a config.json dict."""
    if isinstance(config, dict):
        return config
    config = getattr(config, "config", config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise ValueError(f"expected a model, a transformers config or a config.json dict, got {type(config).__name__}")


def architecture_for(config: Any) -> Architecture:
    """The registry entry of a model type (a string, a config, a config.json dict or a model); one-line
    ``ValueError`` listing the supported types otherwise."""
    model_type = config if isinstance(config, str) else config_dict(config).get("model_type")
    try:
        return ARCHITECTURES[ModelType(model_type)]
    except ValueError:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        ) from None


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a causal LM (``model.model.layers``) or of its bare base model (``model.layers``); a
    peft wrapper is looked through. ``ValueError`` for an unsupported ``model_type`` or when there are none."""
    config = getattr(model, "config", None)
    arch = architecture_for(config) if config is not None else ARCHITECTURES[ModelType.LLAMA]
    root = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: look through it
    for owner in (getattr(root, "model", None), root):
        layers = getattr(owner, arch.layers_attr, None) if owner is not None else None
        if isinstance(layers, (nn.ModuleList, list, tuple)) and len(layers) > 0:
            return list(layers)
    raise ValueError(
        f"cannot find decoder layers in {type(model).__name__}: expected model.model.{arch.layers_attr} "
        f"(an nn.ModuleList of decoder blocks) as in transformers' {arch.model_type.value} models"
    )


def supported_sizes_near(n: int, count: int = 3) -> tuple[list[int], list[int]]:
    """The ``count`` nearest sizes with a Hadamard transform below and above ``n``."""
    below = [m for m in range(n - 1, 0, -1) if is_supported_size(m)][:count]
    above, m = [], n + 1
    while len(above) < count:
        if is_supported_size(m):
            above.append(m)
        m += 1
    return below[::-1], above


def check_hadamard_sizes(config: Any) -> None:
    """One-line ``ValueError`` when ``hidden_size`` (the input of q/k/v and gate/up) has no Hadamard transform."""
    hidden = config_dict(config).get("hidden_size")
    if isinstance(hidden, int) and not is_supported_size(hidden):
        below, above = supported_sizes_near(hidden)
        raise ValueError(
            f"hidden_size {hidden} has no Hadamard transform, so QWHA cannot adapt this model: sizes must be K*2^m "
            f"with K in {{{', '.join(map(str, SUPPORTED_ORDERS))}}} (nearest: {', '.join(map(str, below + above))})"
        )


@dataclass(frozen=True)
class ModelLayout:
    """An :class:`Architecture` resolved against one config: what an exporter or a runtime must reproduce.

    ``layer_types[i]`` is ``"full_attention"`` or ``"sliding_attention"``; ``window`` is the sliding window (keys
    kept, as transformers counts it) of the sliding layers, None when there are none; ``rope[layer_type]`` is that
    layer type's ``rope_parameters`` (``rope_theta``, ``rope_type`` and scaling keys); RMSNorms compute
    ``x / rms(x) * (norm_offset + w)``; embeddings are multiplied by ``embed_scale``; attention scores by
    ``attention_scale`` and, when set, ``softcap * tanh(s / softcap)``; the final logits likewise with
    ``final_softcap``.
    """

    architecture: Architecture
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_eps: float
    norm_offset: float
    activation: str
    layer_types: tuple[str, ...]
    window: int | None
    attention_scale: float
    attn_softcap: float | None
    final_softcap: float | None
    rope: dict[str, dict[str, Any]] = field(default_factory=dict)
    embed_scale: float = 1.0
    tied_head: bool = False
    attention_bias: bool = False
    max_positions: int = 2048  # max_position_embeddings
    rotary_fraction: float = 1.0  # partial_rotary_factor: the rotated share of each head
    mlp_bias: bool = False

    def sliding(self, layer: int) -> bool:
        """Whether decoder block ``layer`` attends through the sliding window (local attention)."""
        return self.layer_types[layer] == SLIDING

    def rope_of(self, layer: int) -> dict[str, Any]:
        """The ``rope_parameters`` of block ``layer`` (its layer type's, for per-layer-type RoPE)."""
        return self.rope.get(self.layer_types[layer]) or self.rope.get(FULL, {})


def _rope(cfg: dict[str, Any], arch: Architecture) -> dict[str, dict[str, Any]]:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if arch.rope_per_layer_type:
        return {k: dict(v) for k, v in params.items() if k in (FULL, SLIDING)}
    single = dict(params) if isinstance(params, dict) else {}
    single.setdefault("rope_type", single.pop("type", "default"))
    if "rope_theta" in cfg:
        single.setdefault("rope_theta", cfg["rope_theta"])
    return {FULL: single, SLIDING: single}


def describe(config: Any) -> ModelLayout:
    """The :class:`ModelLayout` of a config (``PretrainedConfig``, model or config.json dict)."""
    cfg = config_dict(config)
    arch = architecture_for(cfg)
    n_layers, heads = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    window = cfg.get("sliding_window")
    if arch.sliding is Sliding.LAYER_TYPES and cfg.get("layer_types"):
        types = tuple(cfg["layer_types"][:n_layers])
    elif arch.sliding is Sliding.ALL and window:
        types = (SLIDING,) * n_layers
    else:
        types = (FULL,) * n_layers
    if SLIDING not in types:
        window = None
    scale_base = cfg.get(arch.scaling_key) if arch.scaling_key else None
    return ModelLayout(
        architecture=arch,
        num_layers=n_layers,
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        vocab_size=int(cfg["vocab_size"]),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        norm_offset=arch.norm_offset,
        activation=str(cfg.get(arch.activation_key) or cfg.get("hidden_act") or "silu"),
        layer_types=types,
        window=int(window) if window else None,
        attention_scale=float(scale_base) ** -0.5 if scale_base else head_dim**-0.5,
        attn_softcap=cfg.get("attn_logit_softcapping") if arch.softcapping else None,
        final_softcap=cfg.get("final_logit_softcapping") if arch.softcapping else None,
        rope=_rope(cfg, arch),
        embed_scale=math.sqrt(cfg["hidden_size"]) if arch.embed_scale_sqrt_hidden else 1.0,
        tied_head=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", arch.model_type is ModelType.QWEN2)),
        max_positions=int(cfg.get("max_position_embeddings") or 2048),
        rotary_fraction=float(_rotary_fraction(cfg)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
    )


def _rotary_fraction(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    nested = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    return nested or cfg.get("partial_rotary_factor") or 1.0
