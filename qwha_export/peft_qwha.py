"""QWHA as a peft method: ``get_peft_model(model, QWHAConfig(...))``, ``save_pretrained``, ``from_pretrained``.

Structure follows peft's FourierFT tuner (a spectral adapter with fixed indices): :class:`QWHAConfig` (the
``PeftConfig``), :class:`QWHALayer` / :class:`QWHALinear` (the ``BaseTunerLayer`` wrapping a frozen ``nn.Linear`` or
:class:`~qwha_export.quant_linear.QuantLinear`) and :class:`QWHAModel` (the ``BaseTuner``). Importing this module
registers the method (peft type ``"QWHA"``, state-dict prefix ``"qwha_"``).

Per adapter name, a QWHA layer holds

* ``qwha_spectrum[adapter]``: trainable float32 values, shape ``(nnz,)`` (``nn.ParameterDict``);
* ``qwha_indices[adapter]``: int64 ``(2, nnz)``, row 0 = output channel, row 1 = Walsh index (persistent buffer);
* ``qwha_shape[adapter]``: int64 ``(d_out, d_in)`` of the layer the adapter was made for (persistent buffer; checked
  on load, so an adapter saved for another base model is refused);
* ``qwha_scaling[adapter]``: the float ``s`` (from ``QWHAConfig.scale``, or ``scale_pattern[layer_name]``).

Forward: ``base_layer(x) + sum_a spectral_adapter(x, values_a, layout_a, s_a / (d_in sqrt(d_out)))`` -- the adapter
runs on activations (fast WHT + sparse product), never through a dense ``Delta W``.

The number of spectrum entries of a layer is data dependent (an initialised spectrum replaces the random one with
:func:`set_spectrum`), so a freshly injected layer has the wrong size for a saved file. The layer's
``_load_from_state_dict`` therefore validates the incoming tensors and resizes its parameter/buffers to them before
peft copies them in (see :meth:`QWHALayer._load_from_state_dict`).

Layer names used by :func:`set_spectrum` / :func:`spectra` are module paths relative to the underlying transformers
model, e.g. ``model.layers.0.self_attn.q_proj``.
"""

from __future__ import annotations

import math
import os
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import PeftType
from torch import nn

from .kernels import SpectralLayout, is_supported_size, spectral_adapter, spectral_linear
from .layer import adapter_coefficient, delta_weight, validate_spectrum
from .quant_linear import QuantLinear

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "INIT_METHODS",
    "PEFT_TYPE_QWHA",
    "check_adapter_files",
    "QWHAConfig",
    "QWHALayer",
    "QWHALinear",
    "QWHAModel",
    "load_qwha_adapter",
    "qwha_layers",
    "register_qwha",
    "set_spectrum",
    "skipped_layers",
    "spectra",
]

PREFIX = "qwha_"
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# "zeros": peft itself draws a random support (plain WHA) with zero values. The other names are produced outside
# peft (qwha_export.converters.qwha_init, import_published): peft only creates empty placeholders for them, to be
# filled with set_spectrum (or sized from the saved file by from_pretrained).
INIT_METHODS: tuple[str, ...] = ("zeros", "adaalloc", "random", "published")

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"


# ----------------------------------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------------------------------


def _ensure_peft_type() -> PeftType:
    """Add ``PeftType.QWHA`` (value ``"QWHA"``) to peft's ``PeftType`` enum if it is not there yet; return it.

    peft's ``register_peft_method`` only accepts names that are members of ``PeftType``, and an ``Enum`` cannot be
    extended through its public API. A member is created the way ``EnumType`` does it for a ``str`` mixin
    (``str.__new__`` + ``_name_``/``_value_``) and entered into the three tables the enum machinery reads:
    ``_member_map_`` (name lookup, ``PeftType["QWHA"]``, ``__members__``), ``_value2member_map_`` (value lookup,
    ``PeftType("QWHA")``, used when a config is read back from JSON) and ``_member_names_`` (iteration,
    ``"QWHA" in list(PeftType)``). ``type.__setattr__`` makes ``PeftType.QWHA`` an attribute (``EnumType.__setattr__``
    would refuse to touch a member name). Idempotent: a second call (re-import, ``importlib.reload``) returns the
    existing member. Hashing/equality match ``"QWHA"`` (a ``str`` enum whose name equals its value), so peft's
    mappings keyed by ``PeftType`` also answer the plain string read from ``adapter_config.json``.
    """
    existing = PeftType._member_map_.get("QWHA")
    if existing is not None:
        return existing
    member = str.__new__(PeftType, "QWHA")
    member._name_ = "QWHA"
    member._value_ = "QWHA"
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_["QWHA"] = member
    PeftType._value2member_map_["QWHA"] = member
    PeftType._member_names_.append("QWHA")
    type.__setattr__(PeftType, "QWHA", member)
    return member


PEFT_TYPE_QWHA: PeftType = _ensure_peft_type()


def _is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


# ----------------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class QWHAConfig(PeftConfig):
    """Configuration of a QWHA adapter.

    Args:
        target_modules: module names (exact or suffix match) or a regex; default: the seven Llama projections.
        rank: ``r``; the random-init budget of a layer is ``p = r * (d_in + d_out)``, capped at ``d_out * d_in``.
        scale: ``s``; the adapter adds ``(s / (d_in sqrt(d_out))) * wht(x) @ F.T``.
        scale_pattern: per-layer ``s`` overrides, ``{layer_name: s}`` (exact module paths).
        init: ``"zeros"`` (random support, zero values, drawn here) or one of :data:`INIT_METHODS` whose spectra are
            computed elsewhere and installed with :func:`set_spectrum` (peft creates empty placeholders).
        seed: seed of the random support (combined with the layer name, so same-shape layers differ).
        exclude_modules, layers_to_transform, layers_pattern, modules_to_save: as in every peft config.
    """

    target_modules: list[str] | str | None = field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        metadata={"help": "Module names (exact or suffix) or a regex of the linear layers to adapt."},
    )
    rank: int = field(default=64, metadata={"help": "r: budget p = r * (d_in + d_out) entries per layer."})
    scale: float = field(default=1.0, metadata={"help": "s: coefficient s / (d_in * sqrt(d_out))."})
    scale_pattern: dict = field(default_factory=dict, metadata={"help": "Per-layer s overrides {layer_name: s}."})
    init: str = field(default="zeros", metadata={"help": f"Initialisation, one of {INIT_METHODS}."})
    seed: int = field(default=0, metadata={"help": "Seed of the random spectrum support."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules not to adapt."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra fully-trained modules."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE_QWHA
        if isinstance(self.target_modules, (list, tuple, set)):
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"target_modules must be non-empty module names, got {self.target_modules!r}")
            self.target_modules = set(self.target_modules)
        elif not (isinstance(self.target_modules, str) and self.target_modules):
            raise ValueError(f"target_modules must be a list of module names or a regex, got {self.target_modules!r}")
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not _is_finite_number(self.scale) or self.scale == 0:
            raise ValueError(f"scale must be a finite non-zero number, got {self.scale!r}")
        self.scale = float(self.scale)
        if not isinstance(self.scale_pattern, Mapping):
            raise ValueError(f"scale_pattern must be a dict {{layer_name: scale}}, got {self.scale_pattern!r}")
        for name, s in self.scale_pattern.items():
            if not _is_finite_number(s) or s == 0:
                raise ValueError(f"scale_pattern[{name!r}] must be a finite non-zero number, got {s!r}")
        self.scale_pattern = {str(k): float(v) for k, v in self.scale_pattern.items()}
        if self.init not in INIT_METHODS:
            raise ValueError(f"init must be one of {INIT_METHODS}, got {self.init!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")

    def layer_scale(self, layer_name: str) -> float:
        return self.scale_pattern.get(layer_name, self.scale)


# ----------------------------------------------------------------------------------------------------------------------
# layer
# ----------------------------------------------------------------------------------------------------------------------


def _random_support(d_out: int, d_in: int, nnz: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``nnz`` distinct uniformly random positions of a ``d_out x d_in`` matrix, sorted row-major (CPU int64)."""
    total = d_out * d_in
    gen = torch.Generator().manual_seed(seed)
    if nnz * 4 >= total or total <= 1 << 22:
        pos = torch.randperm(total, generator=gen)[:nnz]
    else:
        # sparse budget on a big layer: draw with replacement until enough distinct positions, then keep a random
        # nnz-subset of them (the distinct set is exchangeable, so the subset is a uniform nnz-subset)
        pos = torch.empty(0, dtype=torch.int64)
        while pos.numel() < nnz:
            draw = torch.randint(0, total, (int(1.25 * (nnz - pos.numel())) + 16,), generator=gen)
            pos = torch.unique(torch.cat([pos, draw]))
        pos = pos[torch.randperm(pos.numel(), generator=gen)[:nnz]]
    pos = torch.sort(pos).values
    return pos // d_in, pos % d_in


def _layer_seed(seed: int, layer_name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(layer_name.encode("utf-8"))) % (2**63 - 1)


class QWHALayer(BaseTunerLayer):
    """State and helpers of a QWHA tuner layer (see the module docstring)."""

    adapter_layer_names = ("qwha_spectrum",)
    other_param_names = ("qwha_indices", "qwha_shape", "qwha_scaling")

    def __init__(self, base_layer: nn.Module, layer_name: str = "", **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.qwha_spectrum = nn.ParameterDict({})
        self.qwha_indices = BufferDict({}, persistent=True)
        self.qwha_shape = BufferDict({}, persistent=True)
        self.qwha_scaling: dict[str, float] = {}
        self.qwha_layer_name = layer_name
        self._qwha_layouts: dict[str, tuple[tuple, SpectralLayout]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs

        base = self.get_base_layer()
        if not isinstance(base, (nn.Linear, QuantLinear)):
            raise TypeError(
                f"{layer_name or type(base).__name__}: QWHA supports nn.Linear and QuantLinear layers, "
                f"got {type(base).__name__}"
            )
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)

    # -- adapter management ------------------------------------------------------------------------------------------

    def update_layer(self, adapter_name: str, config: QWHAConfig, scale: float | None = None) -> None:
        """Create adapter ``adapter_name``: a random support with zero values (``init="zeros"``) or an empty
        placeholder (other inits; filled by :func:`set_spectrum` or by loading a saved adapter)."""
        d_out, d_in = self.out_features, self.in_features
        if not is_supported_size(d_in):
            raise ValueError(f"{self.qwha_layer_name}: d_in={d_in} has no supported Walsh-Hadamard size")
        s = float(config.scale if scale is None else scale)
        if config.init == "zeros":
            nnz = min(config.rank * (d_in + d_out), d_out * d_in)
            rows, cols = _random_support(d_out, d_in, nnz, _layer_seed(config.seed, self.qwha_layer_name))
        else:
            rows = cols = torch.zeros(0, dtype=torch.int64)
        self._install(adapter_name, torch.zeros(rows.numel(), dtype=torch.float32), rows, cols, s)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _adapter_device(self) -> torch.device:
        base = self.get_base_layer()
        for t in (*base.parameters(recurse=False), *base.buffers(recurse=False)):
            return t.device
        return torch.device("cpu")

    def _install(
        self, adapter_name: str, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, scale: float
    ) -> None:
        """Replace the adapter's parameter and buffers (any nnz); keeps the trainability of an existing spectrum."""
        device = self._adapter_device()
        old = self.qwha_spectrum.get(adapter_name)
        requires_grad = True if old is None else old.requires_grad
        dtype = torch.float32 if old is None or not old.dtype.is_floating_point else old.dtype
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        self.qwha_spectrum[adapter_name] = nn.Parameter(
            values.detach().to(device=device, dtype=dtype).clone(), requires_grad=requires_grad
        )
        self.qwha_indices[adapter_name] = torch.stack([rows.long(), cols.long()]).to(device)
        self.qwha_shape[adapter_name] = torch.tensor([self.out_features, self.in_features], dtype=torch.int64).to(
            device
        )
        self.qwha_scaling[adapter_name] = float(scale)
        self._qwha_layouts.pop(adapter_name, None)

    def set_spectrum(
        self,
        values: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        adapter: str = "default",
        scale: float | None = None,
    ) -> None:
        """Install a spectrum (``nnz`` may differ from the current one); validates it first."""
        if adapter not in self.qwha_spectrum:
            raise ValueError(f"{self.qwha_layer_name}: no QWHA adapter named {adapter!r}")
        values, rows, cols = torch.as_tensor(values), torch.as_tensor(rows), torch.as_tensor(cols)
        if not values.dtype.is_floating_point:
            raise ValueError(f"{self.qwha_layer_name}: spectrum values must be floating point, got {values.dtype}")
        if rows.dtype.is_floating_point or cols.dtype.is_floating_point:
            raise ValueError(f"{self.qwha_layer_name}: spectrum indices must be integers")
        values, rows, cols = values.reshape(-1), rows.reshape(-1), cols.reshape(-1)
        validate_spectrum(values, rows, cols, self.out_features, self.in_features, self.qwha_layer_name)
        if scale is not None and (not _is_finite_number(scale) or scale == 0):
            raise ValueError(f"{self.qwha_layer_name}: scale must be a finite non-zero number, got {scale!r}")
        s = self.qwha_scaling[adapter] if scale is None else float(scale)
        self._install(adapter, values, rows, cols, s)

    def get_spectrum(self, adapter: str = "default") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """``(values, rows, cols, scale)`` of an adapter (detached CPU copies)."""
        v = self.qwha_spectrum[adapter].detach().cpu().clone()
        idx = self.qwha_indices[adapter].detach().cpu().clone()
        return v, idx[0], idx[1], self.qwha_scaling[adapter]

    def layout(self, adapter: str) -> SpectralLayout:
        """The cached :class:`SpectralLayout` of an adapter, rebuilt when its index buffer changes."""
        idx = self.qwha_indices[adapter]
        key = (id(idx), idx.data_ptr(), idx._version, idx.device)
        cached = self._qwha_layouts.get(adapter)
        if cached is not None and cached[0] == key:
            return cached[1]
        lay = SpectralLayout.build(idx[0], idx[1], self.out_features, self.in_features)
        if idx.device.type != "cpu":
            lay = lay.to(idx.device)
        self._qwha_layouts[adapter] = (key, lay)
        return lay

    def coefficient(self, adapter: str) -> float:
        return adapter_coefficient(self.qwha_scaling[adapter], self.in_features, self.out_features)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """Dense ``Delta W`` (float64, ``d_out x d_in``) of an adapter, from :func:`qwha_export.layer.delta_weight`."""
        idx = self.qwha_indices[adapter]
        return delta_weight(
            self.qwha_spectrum[adapter], idx[0], idx[1], self.out_features, self.in_features, self.qwha_scaling[adapter]
        )

    @property
    def weight(self) -> torch.Tensor:
        # peft's default returns ``base.qweight`` when present, which for our QuantLinear is a QuantizedWeight object;
        # the (dequantized) tensor is what callers of ``.weight`` expect.
        return self.get_base_layer().weight

    # -- loading -----------------------------------------------------------------------------------------------------

    def _check_incoming(
        self, adapter: str, values: torch.Tensor | None, indices: torch.Tensor | None, shape: torch.Tensor | None
    ) -> None:
        name = self.qwha_layer_name or "layer"
        if shape is not None:
            stored = [int(v) for v in shape.reshape(-1).tolist()]
            if len(stored) != 2:
                raise ValueError(f"{name}: malformed qwha_shape entry {stored}")
            if stored != [self.out_features, self.in_features]:
                raise ValueError(
                    f"{name}: adapter was saved for a {stored[0]}x{stored[1]} layer (d_out x d_in) but the base layer "
                    f"is {self.out_features}x{self.in_features}; wrong base model"
                )
        if indices is not None:
            if indices.dim() != 2 or indices.shape[0] != 2:
                raise ValueError(f"{name}: spectrum indices must have shape (2, nnz), got {tuple(indices.shape)}")
            if indices.dtype.is_floating_point or indices.dtype == torch.bool:
                raise ValueError(f"{name}: spectrum indices must be integers, got {indices.dtype}")
        if values is not None:
            if values.dim() != 1:
                raise ValueError(f"{name}: spectrum values must be 1-D, got shape {tuple(values.shape)}")
            if not values.dtype.is_floating_point:
                raise ValueError(f"{name}: spectrum values must be floating point, got {values.dtype}")
        if values is None and indices is None:
            return
        if values is None or indices is None:
            # only one half in the file: it must fit the other half already in the layer
            values = self.qwha_spectrum[adapter].detach().cpu() if values is None else values
            indices = self.qwha_indices[adapter].cpu() if indices is None else indices
            if values.numel() != indices.shape[1]:
                raise ValueError(f"{name}: the saved adapter has spectrum values without matching indices")
        validate_spectrum(values, indices[0], indices[1], self.out_features, self.in_features, name)

    def _prepare_load(self, state_dict: Mapping[str, torch.Tensor], prefix: str) -> None:
        """Validate the incoming adapter tensors and resize the per-adapter parameter/buffers to them.

        Called from :meth:`QWHALinear._load_from_state_dict`, i.e. by ``nn.Module.load_state_dict`` on the layer
        *before* it recurses into the child containers (``qwha_spectrum``/``qwha_indices``/``qwha_shape``) that do
        the copying; resizing here makes those copies succeed whatever the saved nnz. NaN/inf values, out-of-range
        indices and a recorded shape that does not match the base layer raise ``ValueError`` naming the layer.
        """
        for adapter in list(self.qwha_spectrum.keys()):
            vk, ik, sk = (f"{prefix}qwha_{kind}.{adapter}" for kind in ("spectrum", "indices", "shape"))
            values, indices, shape = state_dict.get(vk), state_dict.get(ik), state_dict.get(sk)
            if values is None and indices is None and shape is None:
                continue
            self._check_incoming(adapter, values, indices, shape)
            old = self.qwha_spectrum[adapter]
            if values is not None and values.shape != old.shape:
                self.qwha_spectrum[adapter] = nn.Parameter(
                    torch.zeros(values.shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad
                )
            old_idx = self.qwha_indices[adapter]
            if indices is not None and indices.shape != old_idx.shape:
                self.qwha_indices[adapter] = torch.zeros(indices.shape, dtype=torch.int64, device=old_idx.device)
            self._qwha_layouts.pop(adapter, None)


class QWHALinear(nn.Module, QWHALayer):
    """QWHA adapter around a frozen ``nn.Linear`` or ``QuantLinear``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: QWHAConfig, layer_name: str = "", **kwargs):
        super().__init__()
        QWHALayer.__init__(self, base_layer, layer_name=layer_name, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, scale=config.layer_scale(layer_name))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # defined here, not on QWHALayer: nn.Module precedes QWHALayer in the MRO
        self._prepare_load(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_mergeable(self) -> nn.Linear:
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise ValueError(
                f"{self.qwha_layer_name}: cannot merge a QWHA adapter into a {type(base).__name__} base in place "
                "(the weight is quantized); use `qwha-export merge` to merge and re-quantize"
            )
        return base

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self._check_mergeable()
        for adapter in adapter_names:
            if adapter not in self.qwha_spectrum:
                continue
            delta = self.get_delta_weight(adapter).to(device=base.weight.device)
            merged = (base.weight.data.double() + delta).to(base.weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            base.weight.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self._check_mergeable()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.qwha_spectrum:
                delta = self.get_delta_weight(adapter).to(device=base.weight.device)
                base.weight.data = (base.weight.data.double() - delta).to(base.weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        active = [a for a in self.active_adapters if a in self.qwha_spectrum and self.qwha_spectrum[a].numel()]
        plain = isinstance(base, (nn.Linear, QuantLinear)) and not args and not kwargs
        if plain and not self.merged and len(active) == 1:
            # one adapter on a plain/quantized linear: the faster of the activation-side and dense-Delta-W forms
            a = active[0]
            values, layout, coef = self.qwha_spectrum[a], self.layout(a), self.coefficient(a)
            return spectral_linear(x, base.weight, base.bias, values, layout, coef)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.qwha_spectrum:
                continue
            values = self.qwha_spectrum[adapter]
            if values.numel() == 0:
                continue
            y = spectral_adapter(x, values, self.layout(adapter), self.coefficient(adapter))
            result = result + y.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "qwha." + super().__repr__()


# ----------------------------------------------------------------------------------------------------------------------
# tuner
# ----------------------------------------------------------------------------------------------------------------------


class QWHAModel(BaseTuner):
    """peft tuner injecting :class:`QWHALinear` layers. ``qwha_skipped`` lists the targeted layers that were left
    alone because their ``d_in`` has no supported Walsh-Hadamard size."""

    prefix: str = PREFIX
    tuner_layer_cls = QWHALayer
    target_module_mapping: dict[str, list[str]] = {}

    @property
    def qwha_skipped(self) -> list[str]:
        return list(getattr(self.model, "_qwha_skipped", []))

    def _create_and_replace(
        self, config, adapter_name, target, target_name, parent, current_key=None, **optional_kwargs
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        if isinstance(target, QWHALayer):
            target.update_layer(adapter_name, config, scale=config.layer_scale(current_key))
            return
        if not isinstance(target, (nn.Linear, QuantLinear)):
            raise TypeError(
                f"{current_key}: QWHA supports nn.Linear and QuantLinear layers, got {type(target).__name__}"
            )
        if not is_supported_size(int(target.in_features)):
            self._qwha_pending_skips.append(f"{current_key} (d_in={target.in_features})")
            return
        new_module = QWHALinear(target, adapter_name, config, layer_name=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # peft's version reads ``child.qweight.device``; our QuantLinear.qweight is a QuantizedWeight (no device).
        # The adapter tensors are already created on the base layer's device, so only the swap is needed.
        setattr(parent, child_name, new_module)

    def inject_adapter(self, model, adapter_name, *args, **kwargs) -> None:
        self._qwha_pending_skips = []
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        skipped = self._qwha_pending_skips
        self._qwha_pending_skips = []
        if skipped:
            names = [s.split(" ")[0] for s in skipped]
            self.targeted_module_names[:] = [n for n in self.targeted_module_names if n not in names]
            previous = list(getattr(model, "_qwha_skipped", []))
            model._qwha_skipped = previous + [n for n in names if n not in previous]
            warnings.warn(
                f"QWHA: skipped {len(skipped)} layer(s) whose d_in has no supported Walsh-Hadamard size: "
                + ", ".join(skipped),
                UserWarning,
                stacklevel=2,
            )


def register_qwha() -> None:
    """Register the QWHA method with peft (idempotent; a reload re-registers the new classes)."""
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )
    from peft.utils import register_peft_method

    peft_type = _ensure_peft_type()
    if (
        PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is QWHAModel
        and PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is QWHAConfig
    ):
        return
    for mapping in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_MIXED_MODEL_MAPPING):
        mapping.pop(peft_type, None)
    PEFT_TYPE_TO_PREFIX_MAPPING.pop(peft_type, None)
    register_peft_method(name="qwha", config_cls=QWHAConfig, model_cls=QWHAModel, prefix=PREFIX)


register_qwha()


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def _inner_model(model: nn.Module) -> nn.Module:
    """The transformers model (with the injected layers) behind a PeftModel / QWHAModel / plain module."""
    if isinstance(model, PeftModel):
        return model.get_base_model()
    if isinstance(model, BaseTuner):
        return model.model
    return model


def qwha_layers(model: nn.Module) -> dict[str, QWHALayer]:
    """``{layer_name: QWHA layer}`` with names relative to the underlying transformers model."""
    inner = _inner_model(model)
    return {name: m for name, m in inner.named_modules() if isinstance(m, QWHALayer)}


def skipped_layers(model: nn.Module) -> list[str]:
    """Targeted layers left without an adapter (unsupported ``d_in``)."""
    return list(getattr(_inner_model(model), "_qwha_skipped", []))


def _peft_config_of(model: nn.Module, adapter: str) -> QWHAConfig | None:
    for obj in (model, _inner_model(model)):
        configs = getattr(obj, "peft_config", None)
        if isinstance(configs, dict) and isinstance(configs.get(adapter), QWHAConfig):
            return configs[adapter]
    return None


def set_spectrum(
    model: nn.Module,
    layer_name: str,
    values: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    adapter: str = "default",
    scale: float | None = None,
) -> None:
    """Install an initialised spectrum in layer ``layer_name`` (module path relative to the transformers model).

    ``nnz`` may differ from the current one (parameter and buffers are replaced). ``scale`` optionally changes the
    layer's ``s``; when it differs from the adapter config's ``scale`` it is recorded in ``scale_pattern`` so that
    ``save_pretrained`` keeps it. Raises ``ValueError`` naming the layer for an unknown layer, NaN/inf values or
    out-of-range indices.
    """
    layers = qwha_layers(model)
    layer = layers.get(layer_name)
    if layer is None:
        skipped = skipped_layers(model)
        hint = " (it was skipped: unsupported d_in)" if layer_name in skipped else ""
        raise ValueError(f"{layer_name}: not a QWHA layer of this model{hint}; QWHA layers: {len(layers)}")
    layer.set_spectrum(values, rows, cols, adapter=adapter, scale=scale)
    if scale is not None:
        config = _peft_config_of(model, adapter)
        if config is not None:
            if float(scale) == config.scale:
                config.scale_pattern.pop(layer_name, None)
            else:
                config.scale_pattern[layer_name] = float(scale)


Spectrum = tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]


def spectra(model: nn.Module, adapter: str = "default") -> dict[str, Spectrum]:
    """``{layer_name: (values, rows, cols, scale)}`` of every QWHA layer holding ``adapter`` (detached CPU copies)."""
    return {
        name: layer.get_spectrum(adapter)
        for name, layer in qwha_layers(model).items()
        if adapter in layer.qwha_spectrum
    }


def check_adapter_files(adapter_dir: str | os.PathLike, peft_type: str) -> Path:
    """One-line ``ValueError`` unless ``adapter_dir`` holds ``adapter_config.json`` of ``peft_type`` and
    ``adapter_model.safetensors`` (a pickled ``adapter_model.bin`` is never loaded); returns the path."""
    path = Path(adapter_dir)
    if not (path / ADAPTER_CONFIG_NAME).is_file():
        raise ValueError(f"{path}: no {ADAPTER_CONFIG_NAME}; not a peft adapter directory")
    if not (path / ADAPTER_WEIGHTS_NAME).is_file():
        extra = " (pickled adapter_model.bin files are not loaded)" if (path / "adapter_model.bin").exists() else ""
        raise ValueError(f"{path}: no {ADAPTER_WEIGHTS_NAME}{extra}")
    found = PeftConfig._get_peft_type(str(path))
    if found != peft_type:
        raise ValueError(f"{path}: adapter has peft_type {found!r}, expected {peft_type!r}")
    return path


def load_qwha_adapter(
    base_model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> PeftModel:
    """``PeftModel.from_pretrained`` for a QWHA adapter directory, safetensors only, with strict checks.

    Raises ``ValueError`` (one line) for a missing ``adapter_config.json`` / ``adapter_model.safetensors`` (a
    pickled ``adapter_model.bin`` is never loaded), a non-QWHA adapter, and -- naming the layer -- NaN/inf values,
    out-of-range indices, an adapter made for a different base model, or a QWHA layer the file has no entry for.
    """
    path = check_adapter_files(adapter_dir, "QWHA")
    from safetensors import safe_open

    with safe_open(str(path / ADAPTER_WEIGHTS_NAME), framework="pt") as f:
        keys = set(f.keys())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Found missing adapter keys")
        model = PeftModel.from_pretrained(
            base_model, str(path), adapter_name=adapter_name, is_trainable=is_trainable, use_safetensors=True
        )
    for name in qwha_layers(model):
        key = f"base_model.model.{name}.qwha_spectrum"
        if key not in keys:
            raise ValueError(f"{name}: QWHA layer has no entry in {path / ADAPTER_WEIGHTS_NAME}; wrong base model?")
    return model
