"""QWHA as a peft method: ``get_peft_model(model, QWHAConfig(...))``, ``save_pretrained``, ``from_pretrained``.

The peft layout (as peft's FourierFT tuner, a spectral adapter with fixed indices): :mod:`.config`
(:class:`QWHAConfig`, the ``PeftConfig``), :mod:`.layer` (:class:`QWHALayer` / :class:`QWHALinear`, the
``BaseTunerLayer`` wrapping a frozen ``nn.Linear`` or :class:`~qwha_export.quant_linear.QuantLinear`) and
:mod:`.model` (:class:`QWHAModel`, the ``BaseTuner``, with registration and the spectrum/loading helpers).
Importing this package registers the method (peft type ``"QWHA"``, state-dict prefix ``"qwha_"``).

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

from .config import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    DEFAULT_TARGET_MODULES,
    INIT_METHODS,
    PEFT_TYPE_QWHA,
    PREFIX,
    QWHAConfig,
)
from .layer import QWHALayer, QWHALinear, random_init_support
from .model import (
    QWHAModel,
    Spectrum,
    check_adapter_files,
    load_qwha_adapter,
    qwha_layers,
    register_qwha,
    set_spectrum,
    skipped_layers,
    spectra,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "DEFAULT_TARGET_MODULES",
    "INIT_METHODS",
    "PEFT_TYPE_QWHA",
    "PREFIX",
    "QWHAConfig",
    "QWHALayer",
    "QWHALinear",
    "QWHAModel",
    "Spectrum",
    "check_adapter_files",
    "load_qwha_adapter",
    "qwha_layers",
    "random_init_support",
    "register_qwha",
    "set_spectrum",
    "skipped_layers",
    "spectra",
]
