"""QWHA training on a CUDA GPU, from one layer to a whole (tiny) model (``gpu`` marker; skipped without CUDA).

* One :class:`qwha_export.layer.QWHALinear` training step (forward, backward, SGD update, forward again) on CUDA,
  against the same step on CPU in float64 (the reference) and in the same dtype (the bar of
  :func:`kernel_parity.check_parity`).
* End to end on a tiny Llama with a real byte-level tokenizer: ``init`` on CUDA (calibration, RTN quantization and
  the AdaAlloc init on the GPU), 5 ``train`` steps on CUDA through the Triton kernels (counted), ``fuse``, then
  ``verify`` (top-1 = 1.000) and the fused export on CUDA against the CUDA training-time model (top-1 = 1.000).

Text comes from this package's own docstrings, so nothing beyond the GPU machine's torch / transformers / peft
stack is needed (no gensim, no lm-eval).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kernel_parity import check_parity, random_spectrum
from safetensors.torch import load_file
from tiny_adapter import save_byte_tokenizer, tiny_config

from qwha_export.converters.quantize import QuantConfig, quantize_rtn
from qwha_export.converters.qwha_init import InitConfig
from qwha_export.layer import QWHALinear
from qwha_export.quant_linear import QuantLinear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICE = "cuda"
TRAIN_STEPS = 5


def _layer_step(qw, values, rows, cols, x, dy, device: str, dtype: torch.dtype, lr: float = 1.0):
    """``(y, dx, dvalues, y_after)`` of one SGD step of a QWHALinear on ``device``, base computed in ``dtype``
    (the spectrum stays float32 as in training, except in the float64 reference where the whole layer is float64).
    The activation-side form everywhere (what CUDA runs: the Triton kernels; torch sparse ops on CPU)."""
    base_dtype = torch.float32 if dtype == torch.float64 else dtype
    layer = QWHALinear(QuantLinear(qw, dtype=base_dtype), values, rows, cols, scale=2.0, form="activation")
    layer = layer.to(device)
    if dtype == torch.float64:
        layer = layer.double()
    opt = torch.optim.SGD([layer.spectrum], lr=lr)
    xi = x.to(device=device, dtype=dtype).detach().requires_grad_()
    y = layer(xi)
    y.backward(dy.to(device=device, dtype=dtype))
    dvalues = layer.spectrum.grad.detach().clone()
    opt.step()
    with torch.no_grad():
        y_after = layer(xi)
    return y.detach(), xi.grad.detach(), dvalues, y_after


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("d_in,d_out", [(576, 1536), (1536, 576)], ids=["576->1536", "1536->576"])
def test_qwha_linear_training_step(d_in, d_out, dtype):
    gen = torch.Generator().manual_seed(d_in + d_out)
    qw = quantize_rtn(torch.randn(d_out, d_in, generator=gen) * 0.02, 4, 64)
    rows, cols, values = random_spectrum(d_out, d_in, 8 * (d_in + d_out), seed=d_in)
    values = values * 200.0  # adapter output a few % of the base output, as after init
    x = torch.randn(3, 37, d_in, generator=gen)
    dy = torch.randn(3, 37, d_out, generator=gen)
    ref = _layer_step(qw, values, rows, cols, x, dy, "cpu", torch.float64)
    lr = 0.1 * float(values.abs().max() / ref[2].abs().max())  # moves the largest value by a tenth of it
    ref = _layer_step(qw, values, rows, cols, x, dy, "cpu", torch.float64, lr)
    got = _layer_step(qw, values, rows, cols, x, dy, DEVICE, dtype, lr)
    same = _layer_step(qw, values, rows, cols, x, dy, "cpu", dtype, lr)
    assert all(t.is_cuda for t in got)
    for name, a, b, c in zip(("y", "dx", "dvalues", "y after the step"), got, same, ref, strict=True):
        check_parity(f"QWHALinear {d_in}->{d_out} {dtype} {name}", a, b, c, dtype)
    assert not torch.equal(got[0], got[3])  # the step changed the layer


# ----------------------------------------------------------------------------------------------------------------------
# end to end on a tiny Llama


def _package_text() -> list[str]:
    """Paragraphs of real English text: the docstrings of this package's stage modules."""
    from qwha_export import data, fused, layer, pipeline, training, verify

    paragraphs = []
    for mod in (pipeline, training, verify, fused, layer, data):
        paragraphs += [p.strip() for p in (mod.__doc__ or "").split("\n\n") if len(p.strip()) > 80]
    return paragraphs


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """init (on CUDA) -> train 5 steps (CUDA) -> fuse, on a tiny Llama; returns the folders and in-memory objects."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qwha_export.initialise import InitJob, init_qwha
    from qwha_export.kernels import triton_spectral
    from qwha_export.pipeline import fuse_qwha
    from qwha_export.training import TrainConfig, train_qwha_model

    root = tmp_path_factory.mktemp("gpu_flow")
    paragraphs = _package_text()
    base = root / "base"
    save_byte_tokenizer(base)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**tiny_config(vocab=257, max_positions=128, bos_token_id=256,
                                                       eos_token_id=256)))
    with torch.no_grad():  # random N(0, 0.02) logits are ~uniform; give the head range so the loss can move
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(str(base))
    calib = root / "calib.txt"
    calib.write_text("\n\n".join(paragraphs))
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[:8]))

    adapter = root / "adapter"
    init_report = init_qwha(InitJob(
        model=str(base), out=str(adapter), quant=QuantConfig(bits=4, group_size=32), init=InitConfig(rank=8),
        calib=str(calib), calib_tokens=256, heldout_tokens=256, seq_len=64, quiet=True, device=DEVICE,
    ))

    calls = {"n": 0}
    original = triton_spectral.spectral_adapter_triton

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    trained = root / "trained"
    triton_spectral.spectral_adapter_triton = counting
    try:
        config = TrainConfig(adapter_dir=str(adapter), data=str(data), out=str(trained), max_steps=TRAIN_STEPS,
                             lr=0.05, warmup_ratio=0.0, batch_size=2, max_len=96, logging_steps=1, quiet=True)
        model, tokenizer, report = train_qwha_model(config)
    finally:
        triton_spectral.spectral_adapter_triton = original
    fused = root / "fused"
    fuse_qwha(trained, fused, verify_tokens=0)
    held = tokenizer(" ".join(paragraphs[8:]))["input_ids"]
    chunks = torch.tensor(held[: 4 * 64]).reshape(4, 64)
    return {"adapter": adapter, "trained": trained, "fused": fused, "model": model, "report": report,
            "init_report": init_report, "triton_calls": calls["n"], "chunks": chunks}


def test_init_on_cuda(flow):
    from qwha_export.pipeline import load_qwha_model

    total = flow["init_report"]["total"]
    assert total["n_layers"] == 14 and total["layers_improved_heldout"] >= 12, total
    model, _ = load_qwha_model(flow["adapter"])  # a complete adapter directory, loadable on CPU
    assert sum(p.numel() for n, p in model.named_parameters() if "qwha_spectrum" in n) == total["budget"]


def test_train_on_cuda_through_triton(flow):
    report = flow["report"]
    assert report["device"].startswith("cuda") and report["steps"] == TRAIN_STEPS
    losses = [e["loss"] for e in report["losses"]]
    assert len(losses) == TRAIN_STEPS and all(torch.isfinite(torch.tensor(losses))), losses
    n_layers = flow["init_report"]["total"]["n_layers"]
    assert flow["triton_calls"] >= TRAIN_STEPS * n_layers, flow["triton_calls"]
    init = load_file(str(Path(flow["adapter"]) / "adapter_model.safetensors"))
    final = load_file(str(Path(flow["trained"]) / "adapter_model.safetensors"))
    moved = [k for k in init if "qwha_spectrum" in k and not torch.equal(init[k], final[k])]
    assert len(moved) == n_layers, moved
    print(f"\nCUDA training losses {[round(v, 4) for v in losses]}; {flow['triton_calls']} Triton adapter calls")


def test_fuse_and_verify_against_cuda_training_model(flow):
    from qwha_export.fused import load_fused
    from qwha_export.metrics import compare_logits, logits_for
    from qwha_export.pipeline import load_qwha_model
    from qwha_export.verify import verify_export

    chunks = flow["chunks"]
    verified = verify_export(flow["fused"], flow["trained"], chunks=chunks)  # the command's own check, on CPU
    assert verified["top1_agreement"] == 1.0, verified

    trained = flow["model"].eval()
    assert next(trained.parameters()).is_cuda
    ref = logits_for(trained, chunks)  # the CUDA training-time model, Triton kernels
    fused, _ = load_fused(flow["fused"])
    on_cuda = compare_logits(ref, logits_for(fused.to(DEVICE), chunks))
    cpu_training, _ = load_qwha_model(flow["trained"])
    on_cpu = compare_logits(ref, logits_for(cpu_training, chunks))
    print(f"\nfused on CUDA vs CUDA training model: {on_cuda}\nCPU training model vs CUDA: {on_cpu}")
    assert on_cuda["top1_agreement"] == 1.0, on_cuda
    assert on_cpu["top1_agreement"] == 1.0, on_cpu
    assert on_cuda["max_abs_logit_diff"] <= 1e-3 * float(ref.abs().max()), on_cuda
