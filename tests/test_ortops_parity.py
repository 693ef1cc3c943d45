"""Native qwha kernels (qwha_export.ortops) against the ONNX function bodies and the training-time Triton kernels
(interpreter on CPU), layer by layer: every Hadamard order K the exporter emits, odd shapes (1, 5, 64 tokens, a
batched decode step), 2..16 rows (the few-token path), rows without entries, a dense adapter (> 30%), every kernel
variant (x86-64-v4, x86-64-v3, baseline).

Bound: max |error| <= 1e-5 of the output's scale (max |y|); measured errors are printed on failure."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from native_ops import require_native

from qwha_export import ortops
from qwha_export.converters.onnx_export import nbits_linear, wht_factors
from qwha_export.converters.quantize import quantize_rtn
from qwha_export.formats.onnx_graph import DenseLinear, Projection, SpectralAdapter, build_projection_model
from qwha_export.kernels import SpectralLayout, hadamard_order
from qwha_export.kernels.hadamard import SUPPORTED_ORDERS
from qwha_export.layer import adapter_coefficient
from qwha_export.quant_linear import QuantLinear

BOUND = 1e-5
SHAPES = {"decode": [(1, 1), (3, 1)], "prompt": [(1, 5), (2, 5), (1, 64), (1, 200)]}  # decode: one row, a batch
SHAPES_SHORT = {"decode": [(1, 1), (3, 1), (8, 1)], "prompt": [(2, 5)]}
# 2..16 rows (batched decode steps, short prompts): the kernels' few-token path (tiles of 4, 8 and 16 tokens)
FEW_ROWS = {
    "decode": [(2, 1), (3, 1), (4, 1), (7, 1), (8, 1), (16, 1)],
    "prompt": [(1, 2), (1, 3), (1, 4), (1, 7), (1, 8), (1, 16), (3, 3)],
}


@pytest.fixture(scope="module")
def native():
    return require_native()


@pytest.fixture(scope="module")
def triton_spectral():
    ts = pytest.importorskip("qwha_export.kernels.triton_spectral")
    if not ts.available():
        pytest.skip("needs triton (CUDA, or TRITON_INTERPRET=1)")
    return ts


def _size(k: int) -> int:
    """A transform size n = K * 2^m whose order is K (m = 2 for K < 100, else 1, or less where the exporter picks
    another K for that size)."""
    if k == 1:
        return 256
    for m in (2, 1, 0) if k < 100 else (1, 0):
        if hadamard_order(k << m)[0] == k:
            return k << m
    raise AssertionError(k)


def _layer(n: int, d_outs: tuple[int, ...], density: float, seed: int, triton_spectral):
    """Packed projections (the last one without adapter; the first with rows 0 and 3 left empty, and for n >= 1024
    row 1 holding only columns 300, 900 and n - 1) and a function
    ``x [rows, n] -> reference y`` (float32 torch base on the dequantized weights + the Triton adapter)."""
    gen = torch.Generator().manual_seed(seed)
    projs, parts = [], []
    for i, d_out in enumerate(d_outs):
        w = torch.randn(d_out, n, generator=gen)
        if n % 32 == 0:  # a MatMulNBits base, as in the exports
            qw = quantize_rtn(w, 4, 32)
            linear = nbits_linear(QuantLinear.from_linear(torch.nn.Linear(n, d_out, bias=False), qw))
            w = qw.dequantize(torch.float32)
        else:  # MatMulNBits needs blocks of >= 16 columns: a float32 base
            linear = DenseLinear(w.numpy())
        adapter, spec = None, None
        if i < len(d_outs) - 1:
            allowed = torch.tensor([r for r in range(d_out) if not (i == 0 and r in (0, 3))])
            nnz = max(1, int(density * d_out * n))
            flat = torch.randperm(len(allowed) * n, generator=gen)[:nnz]
            rows, cols = allowed[flat // n], flat % n
            if i == 0 and n >= 1024:  # a row whose only entries are far apart, the last column among them
                keep = rows != 1
                rows = torch.cat([rows[keep], torch.tensor([1, 1, 1])])
                cols = torch.cat([cols[keep], torch.tensor([300, 900, n - 1])])
            nnz = rows.numel()
            values = torch.randn(nnz, generator=gen)
            coef = adapter_coefficient(2.0, n, d_out)
            spec = (values, SpectralLayout.build(rows, cols, d_out, n), coef)
            folded = (values.double() * coef).float().numpy()
            adapter = SpectralAdapter(rows.numpy(), cols.numpy(), folded, hadamard_order(n)[0])
        projs.append(Projection(linear, None, adapter))
        parts.append((w, spec))

    def reference(x: torch.Tensor) -> np.ndarray:
        ys = []
        for w, spec in parts:
            y = x @ w.T
            if spec is not None:
                y = y + triton_spectral.spectral_adapter_triton(x, *spec)
            ys.append(y)
        return torch.cat(ys, dim=-1).numpy()

    return projs, reference


def _sessions(model, native_lib):
    plain = ort.SessionOptions()
    plain.log_severity_level = 3
    function = ort.InferenceSession(model.SerializeToString(), plain, providers=["CPUExecutionProvider"])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.register_custom_ops_library(str(native_lib))
    before = ortops.library_info(native_lib)["kernels"]
    fast = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    assert ortops.library_info(native_lib)["kernels"] == before + 1  # the native kernel, not the body, runs
    return function, fast


def _check(projs, reference, n: int, native_lib, modes=SHAPES, label=""):
    factors = {n: wht_factors(n)}
    rng = np.random.default_rng(n)
    for mode, shapes in modes.items():
        function, fast = _sessions(build_projection_model(projs, factors, mode=mode), native_lib)
        for shape in shapes:
            x = rng.standard_normal((*shape, n)).astype(np.float32)
            ref = reference(torch.from_numpy(x.reshape(-1, n))).reshape(*shape, -1)
            y_fn = function.run(None, {"x": x})[0]
            y_nat = fast.run(None, {"x": x})[0]
            scale = float(np.abs(ref).max())
            err = {
                "native-function": float(np.abs(y_nat - y_fn).max()) / scale,
                "native-triton": float(np.abs(y_nat - ref).max()) / scale,
                "function-triton": float(np.abs(y_fn - ref).max()) / scale,
            }
            assert max(err.values()) <= BOUND, (label, mode, shape, err, f"bound {BOUND}")


@pytest.mark.parametrize("k", SUPPORTED_ORDERS)
def test_every_hadamard_order(k, native, triton_spectral):
    n = _size(k)
    projs, reference = _layer(n, (13, 6, 5), 0.05, seed=k, triton_spectral=triton_spectral)
    _check(projs, reference, n, native, modes=SHAPES_SHORT, label=f"K={k} n={n}")


def _use_isa(isa, native, monkeypatch):
    if isa == "x86-64-v4":
        monkeypatch.delenv("QWHA_ORT_OPS_ISA", raising=False)  # the best variant
    else:
        monkeypatch.setenv("QWHA_ORT_OPS_ISA", isa)
    if ortops.library_info(native)["isa"] != isa:
        pytest.skip(f"this CPU (or compiler) has no {isa} kernels")


@pytest.mark.parametrize("isa", ["x86-64-v4", "x86-64-v3", "baseline"])
@pytest.mark.parametrize(
    "n,d_outs,density",
    [
        (576, (64, 32, 32), 0.03),  # q|k|v-like, K=36 (2^m = 16: padded transform blocks)
        (1536, (40, 24), 0.02),  # down-like, K=12, 2^m = 128, a row with far-apart entries
        (256, (24, 8), 0.05),  # K=1 (Sylvester only)
        (256, (24, 8), 0.5),  # SpectralAddDense
        (20, (9, 7), 0.3),  # n = K, odd row counts
        (2, (3, 2), 0.2),  # n not a multiple of 4 (no 4 x 4 transposes)
    ],
)
def test_few_rows(isa, n, d_outs, density, native, triton_spectral, monkeypatch):
    """T = 2, 3, 4, 7, 8, 9, 16 rows, per kernel variant, against the function bodies and Triton."""
    _use_isa(isa, native, monkeypatch)
    projs, reference = _layer(n, d_outs, density, seed=n + 1, triton_spectral=triton_spectral)
    _check(projs, reference, n, native, modes=FEW_ROWS, label=f"{isa} n={n} few rows")


@pytest.mark.parametrize("isa", ["x86-64-v4", "x86-64-v3", "baseline"])
@pytest.mark.parametrize(
    "n,d_outs,density",
    [
        (576, (64, 32, 32), 0.03),  # q|k|v-like, K=36
        (1536, (40, 24), 0.02),  # down-like, K=12, 2^m = 128
        (256, (24, 8), 0.5),  # denser than 30% of the packed output: SpectralAddDense
        (20, (9, 7), 0.3),  # n = K (no Sylvester factor), odd row counts
    ],
)
def test_odd_shapes_and_variants(isa, n, d_outs, density, native, triton_spectral, monkeypatch):
    _use_isa(isa, native, monkeypatch)
    baseline_before = ortops.library_info(native)["baseline_kernels"]
    projs, reference = _layer(n, d_outs, density, seed=n, triton_spectral=triton_spectral)
    _check(projs, reference, n, native, label=f"{isa} n={n}")
    created = ortops.library_info(native)["baseline_kernels"] - baseline_before
    assert created == (len(SHAPES) if isa == "baseline" else 0)  # one kernel per mode's model


def _one_layer(n: int, d_out: int = 3, nnz: int = 40) -> Projection:
    """A float32 base and a K = 1 adapter whose entries include columns 0 and n - 1."""
    gen = torch.Generator().manual_seed(n)
    rows = torch.cat([torch.tensor([0, d_out - 1]), torch.randint(0, d_out, (nnz - 2,), generator=gen)])
    cols = torch.cat([torch.tensor([0, n - 1]), torch.randint(0, n, (nnz - 2,), generator=gen)])
    values = (torch.randn(nnz, generator=gen) * 1e-3).numpy()
    adapter = SpectralAdapter(rows.numpy(), cols.numpy(), values, hadamard_order(n)[0])
    return Projection(DenseLinear((torch.randn(d_out, n, generator=gen) / n**0.5).numpy()), None, adapter)


def test_largest_transform_size(native):
    """The layout holds 16-bit columns: n = 65,536 (column 65,535 included) runs natively and matches the body;
    n = 131,072 fails at session load with a message that names the way out."""
    n = 65536
    model = build_projection_model([_one_layer(n)], {n: wht_factors(n)}, mode="decode")
    function, fast = _sessions(model, native)
    for rows in (1, 2):  # the one-token product and the few-token one
        x = np.random.default_rng(rows).standard_normal((rows, 1, n)).astype(np.float32)
        y_fn, y_nat = function.run(None, {"x": x})[0], fast.run(None, {"x": x})[0]
        err = float(np.abs(y_nat - y_fn).max()) / float(np.abs(y_fn).max())
        assert err <= BOUND, (rows, err, f"bound {BOUND}")
    n = 131072
    model = build_projection_model([_one_layer(n)], {n: wht_factors(n)}, mode="decode")
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.register_custom_ops_library(str(native))
    with pytest.raises(Exception, match=r"n=131072 is over 65536.*QWHA_ORT_OPS=0"):
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
