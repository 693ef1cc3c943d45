"""Hadamard matrices, Walsh-Hadamard transforms and the QWHA spectral-adapter product.

Public, stable API: :func:`hadamard_matrix`, :func:`wht`, :func:`iwht`, :func:`spectral_adapter` (with
:class:`SpectralLayout`).
"""

from .hadamard import PUBLISHED_ORDERS, SUPPORTED_ORDERS, hadamard_k, hadamard_matrix, hadamard_order, is_supported_size
from .reference import (
    iwht_reference,
    spectral_adapter_reference,
    spectral_dense,
    spectral_linear_reference,
    wht_reference,
)
from .spectral import DEFAULT_SCALE, SpectralLayout, dense_delta, spectral_adapter
from .spectral_linear import choose_form, spectral_linear
from .transform import hadamard_transform, iwht, wht, wht_torch

__all__ = [
    "DEFAULT_SCALE",
    "PUBLISHED_ORDERS",
    "SUPPORTED_ORDERS",
    "hadamard_k",
    "hadamard_matrix",
    "hadamard_order",
    "is_supported_size",
    "wht",
    "spectral_adapter",
    "SpectralLayout",
    "dense_delta",
    "iwht",
    "wht_torch",
    "hadamard_transform",
    "wht_reference",
    "iwht_reference",
    "spectral_dense",
    "spectral_adapter_reference",
    "spectral_linear",
    "spectral_linear_reference",
    "choose_form",
]
