"""Helpers for tests that run the native qwha ops (qwha_export.ortops) or force the ONNX function bodies."""

from __future__ import annotations

import pytest

from qwha_export import ortops


def require_native():
    """The native library's path, or a skip saying why it cannot be built here (`qwha-export build-ops` builds
    it; CI runs that before the tests and prints why when it cannot)."""
    ortops.reset()
    try:
        return ortops.find_library()
    except ortops.OrtOpsError as exc:
        pytest.skip(f"native qwha ops unavailable: {exc}")


def use_ops(monkeypatch, ops: str | None):
    """Sessions opened after this run the native kernels (``"native"``, skipped when unavailable), the function
    bodies (``"function"``: ``QWHA_ORT_OPS=0``) or whatever the environment gives (None)."""
    if ops == "function":
        monkeypatch.setenv(ortops.ENV_VAR, "0")
    elif ops == "native":
        monkeypatch.delenv(ortops.ENV_VAR, raising=False)
        require_native()
    ortops.reset()
