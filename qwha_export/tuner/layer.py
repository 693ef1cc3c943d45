"""The QWHA tuner layer: :class:`QWHALayer` (adapter state and helpers) and :class:`QWHALinear` (around a frozen
``nn.Linear`` or ``QuantLinear``); see the package docstring for the tensors it holds per adapter."""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Mapping
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..kernels import SpectralLayout, is_supported_size, spectral_adapter, spectral_linear
from ..layer import adapter_coefficient, delta_weight, validate_spectrum
from ..quant_linear import QuantLinear
from .config import QWHAConfig, _is_finite_number

__all__ = ["QWHALayer", "QWHALinear", "random_init_support"]

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


def random_init_support(
    config: QWHAConfig, layer_name: str, d_out: int, d_in: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The support ``(rows, cols)`` that ``init="zeros"`` draws for layer ``layer_name``: ``min(r (d_in + d_out),
    d_out d_in)`` distinct positions seeded by ``config.seed`` and the layer's name (the same in every process)."""
    nnz = min(config.rank * (d_in + d_out), d_out * d_in)
    return _random_support(d_out, d_in, nnz, _layer_seed(config.seed, layer_name))


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
            rows, cols = random_init_support(config, self.qwha_layer_name, d_out, d_in)
        else:
            rows = cols = torch.zeros(0, dtype=torch.int64)
        self._install(adapter_name, torch.zeros(rows.numel(), dtype=torch.float32), rows, cols, s)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _adapter_device(self) -> torch.device:
        base = self.get_base_layer()
        for t in (*base.parameters(recurse=False), *base.buffers(recurse=False)):
            # a base on the meta device is a skeleton (init writes its adapter files without loading the model):
            # the adapter itself is real and lives on the CPU
            return torch.device("cpu") if t.is_meta else t.device
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
