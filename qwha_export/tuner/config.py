"""The QWHA ``PeftConfig`` (:class:`QWHAConfig`), the names of the adapter files, and ``PeftType.QWHA``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from peft import PeftConfig
from peft.utils import PeftType

from ..kernels import DEFAULT_SCALE

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "DEFAULT_TARGET_MODULES",
    "INIT_METHODS",
    "PEFT_TYPE_QWHA",
    "PREFIX",
    "QWHAConfig",
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
    scale: float = field(default=DEFAULT_SCALE, metadata={"help": "s: coefficient s / (d_in * sqrt(d_out))."})
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
