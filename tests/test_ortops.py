"""Finding, building, disabling and falling back from the native qwha ops (qwha_export.ortops, `build-ops`).

Every fallback runs a real onnxruntime session of an exported fused layer and checks which path ran and that at
most one warning line says why. Builds in temporary caches compile the real sources with the headers that
`qwha-export build-ops` fetched (the tests skip, saying why, when none could be fetched)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from native_ops import require_native

from qwha_export import ortops
from qwha_export.cli import main
from qwha_export.converters.onnx_export import wht_factors
from qwha_export.formats.onnx_graph import DenseLinear, Projection, SpectralAdapter, build_projection_model
from qwha_export.ortops import build


@pytest.fixture(scope="module")
def layer_model(tmp_path_factory) -> Path:
    """One fused projection (n = 192, K = 12) written as an ONNX file, as the exporter writes it."""
    gen = torch.Generator().manual_seed(0)
    n, d_out, nnz = 192, 40, 300
    flat = torch.randperm(n * d_out, generator=gen)[:nnz].numpy()
    adapter = SpectralAdapter(flat // n, flat % n, torch.randn(nnz, generator=gen).numpy() * 0.1, 12)
    proj = Projection(DenseLinear(torch.randn(d_out, n, generator=gen).numpy()), None, adapter)
    path = tmp_path_factory.mktemp("layer") / "layer.onnx"
    path.write_bytes(build_projection_model([proj], {n: wht_factors(n)}, mode="prompt").SerializeToString())
    return path


@pytest.fixture
def fresh(monkeypatch):
    """No remembered library or warning; QWHA_ORT_OPS unset."""
    monkeypatch.delenv(ortops.ENV_VAR, raising=False)
    ortops.reset()
    yield
    ortops.reset()


@pytest.fixture(scope="module")
def headers() -> Path:
    """The headers the default cache's library was built with."""
    lib = require_native()
    return Path(json.loads((lib.parent / "build.json").read_text())["headers"])


def _run(path: Path) -> tuple[str, np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session, which = ortops.inference_session(path, so)
    x = np.random.default_rng(0).standard_normal((2, 3, 192)).astype(np.float32)
    return which, session.run(None, {"x": x})[0]


def _warnings(capfd) -> list[str]:
    return [ln for ln in capfd.readouterr().err.splitlines() if "warning: native qwha ops not used" in ln]


def _replace(path: Path, data: bytes) -> None:
    """New contents under a new inode (a library loaded in this process keeps its mapping)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _empty_machine(tmp_path: Path, monkeypatch) -> None:
    """An empty cache and no headers anywhere (ORT_INCLUDE_DIR unset, no /usr/include/onnxruntime)."""
    monkeypatch.setenv("QWHA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ORT_INCLUDE_DIR", raising=False)
    monkeypatch.setattr(build, "SYSTEM_INCLUDE", tmp_path / "no-system-headers")


def test_native_by_default_and_same_numbers_as_the_bodies(layer_model, fresh, monkeypatch):
    require_native()
    which, y_native = _run(layer_model)
    assert which == "native"
    monkeypatch.setenv(ortops.ENV_VAR, "0")
    ortops.reset()
    which, y_function = _run(layer_model)
    assert which == "function"
    err = float(np.abs(y_native - y_function).max() / np.abs(y_function).max())
    assert err <= 1e-5, err


def test_disabled_with_env_zero_runs_the_bodies_silently(layer_model, fresh, monkeypatch, capfd):
    monkeypatch.setenv(ortops.ENV_VAR, "0")
    assert ortops.library_path() is None
    assert _run(layer_model)[0] == "function"
    assert _warnings(capfd) == []


def test_env_names_a_library(layer_model, fresh, monkeypatch, tmp_path, capfd):
    lib = require_native()
    monkeypatch.setenv(ortops.ENV_VAR, str(lib))
    assert ortops.library_path() == lib.resolve() and _run(layer_model)[0] == "native"
    monkeypatch.setenv(ortops.ENV_VAR, str(tmp_path / "missing.so"))
    ortops.reset()
    assert _run(layer_model)[0] == "function"
    (line,) = _warnings(capfd)
    assert "missing.so: no such file" in line


def test_no_headers_function_bodies_and_one_warning(layer_model, fresh, monkeypatch, tmp_path, capfd):
    _empty_machine(tmp_path, monkeypatch)
    assert _run(layer_model)[0] == "function"
    assert _run(layer_model)[0] == "function"  # a second session: no second warning
    (line,) = _warnings(capfd)
    assert "no onnxruntime headers found" in line and "qwha-export build-ops" in line
    assert not (tmp_path / "cache" / "ortops" / "headers").exists()  # never fetched at serve time


def test_cuda_sessions_keep_the_function_bodies(fresh):
    require_native()
    so = ort.SessionOptions()
    assert ortops.register(so, ["CUDAExecutionProvider", "CPUExecutionProvider"]) is None
    assert ortops.register(so, ["CPUExecutionProvider"]) is not None


def test_corrupt_and_stale_cached_library_is_rebuilt(layer_model, fresh, monkeypatch, tmp_path, headers):
    lib = require_native()
    _empty_machine(tmp_path, monkeypatch)
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(headers))
    entry = tmp_path / "cache" / "ortops" / lib.parent.name
    shutil.copytree(lib.parent, entry)  # the same key: a valid entry
    assert build.cached_library() == (entry / build.LIB_NAME, "")
    so_file = entry / build.LIB_NAME
    data = bytearray(so_file.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\0" * 64
    _replace(so_file, bytes(data))  # corrupt
    assert "corrupt" in build.cached_library()[1]
    assert _run(layer_model)[0] == "native"  # rebuilt from ORT_INCLUDE_DIR on first use
    assert build.cached_library()[0] == so_file
    tag = build.library_tag(so_file)["source"].encode()
    stale = so_file.read_bytes().replace(b"QWHA_ORTOPS_SOURCE=" + tag, b"QWHA_ORTOPS_SOURCE=" + b"0" * len(tag))
    _replace(so_file, stale)  # built from other sources, with a matching sha256 record
    meta = json.loads((entry / "build.json").read_text())
    meta["sha256"] = hashlib.sha256(stale).hexdigest()
    (entry / "build.json").write_text(json.dumps(meta))
    assert "stale" in build.cached_library()[1]
    ortops.reset()
    assert _run(layer_model)[0] == "native"
    assert build.library_tag(so_file)["source"] == build.source_hash()


def test_onnxruntime_older_than_the_headers_api(layer_model, fresh, monkeypatch, tmp_path, headers, capfd):
    """Simulated with real headers whose ORT_API_VERSION is raised to 99 (this onnxruntime provides 1..32): the
    header search refuses them, a library built from them is refused before registration, and the library itself
    refuses to register in this runtime (its RegisterCustomOps asks for C API 99 and returns an error status)."""
    fake = tmp_path / "headers99"
    shutil.copytree(headers, fake)
    c_api = fake / "onnxruntime_c_api.h"
    c_api.write_text(c_api.read_text().replace("#define ORT_API_VERSION 21", "#define ORT_API_VERSION 99"))
    with pytest.raises(ortops.OrtOpsError, match="C API 99, newer than this onnxruntime's"):
        build.find_headers(fake)
    _empty_machine(tmp_path, monkeypatch)
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(fake))
    assert _run(layer_model)[0] == "function"
    (line,) = _warnings(capfd)
    assert "C API 99, newer than" in line
    lib99 = tmp_path / "lib99" / build.LIB_NAME
    lib99.parent.mkdir()
    build._compile(build._compiler(), build.Headers(fake, 99, "test"), lib99, lib99.parent)
    assert build.library_tag(lib99)["api"] == "99"
    monkeypatch.setenv(ortops.ENV_VAR, str(lib99))
    ortops.reset()
    assert _run(layer_model)[0] == "function"
    (line,) = _warnings(capfd)
    assert "built for onnxruntime C API 99" in line
    so = ort.SessionOptions()
    with pytest.raises(Exception, match="does not provide C API version 99"):
        so.register_custom_ops_library(str(lib99))


def test_build_ops_cli(fresh, tmp_path):
    lib = require_native()
    r = CliRunner().invoke(main, ["build-ops", "--quiet"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(lib)  # the cached library, not rebuilt
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["build-ops", "--headers", str(tmp_path / "empty")])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "no onnxruntime headers" in lines[0], r.output
