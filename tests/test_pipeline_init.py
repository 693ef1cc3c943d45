"""`qwha-export init` on the real SmolLM2-135M: adapter directory, reload, report, CLI errors."""

import json
import subprocess
import sys

import pytest
import torch

from qwha_export.converters.quantize import QuantConfig
from qwha_export.converters.qwha_init import InitConfig
from qwha_export.initialise import InitJob, init_qwha
from qwha_export.pipeline import load_qwha_model

pytestmark = pytest.mark.slow
SMALL = dict(calib_tokens=256, heldout_tokens=256, seq_len=128, target_modules=("q_proj", "down_proj"))


@pytest.fixture(scope="module")
def adapter_dir(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("init") / "adapter"
    job = InitJob(
        model=str(smollm2_dir),
        out=str(out),
        quant=QuantConfig(bits=4, group_size=64, method="rtn"),
        init=InitConfig(rank=8),
        quiet=True,
        **SMALL,
    )
    report = init_qwha(job)
    return out, report


def test_adapter_dir_contents_and_report(adapter_dir):
    out, report = adapter_dir
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "quantized_base.safetensors",
        "qwha_base.json",
        "init_report.json",
    ):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "QWHA"
    on_disk = json.loads((out / "init_report.json").read_text())
    assert len(on_disk["layers"]) == 60  # 30 blocks x (q_proj, down_proj)
    for layer in on_disk["layers"]:
        assert layer["budget"] == 8 * (layer["d_in"] + layer["d_out"])
        assert layer["rel_err_after_calib"] < layer["rel_err_before_calib"], layer["name"]
    assert report["total"]["rms_rel_err_after_heldout"] < report["total"]["rms_rel_err_before_heldout"]
    meta = json.loads((out / "qwha_base.json").read_text())
    assert meta["quantization"]["method"] == "rtn" and meta["base_hash"]


def test_reload_gives_the_training_time_model(adapter_dir, smollm2):
    out, _ = adapter_dir
    model, _tok = load_qwha_model(out)
    ids = torch.randint(0, 1000, (1, 24))
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = load_qwha_model(out)[0](input_ids=ids).logits
        fp = smollm2[0](input_ids=ids).logits
    assert torch.equal(a, b)
    assert not torch.equal(a, fp)  # quantized + adapter differs from full precision
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("qwha_spectrum" in n for n in trainable)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qwha_export.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["/no/such/model", "--out", "{tmp}/o"], "does not exist"),
        (["{model}", "--out", "{tmp}/o", "--bits", "5"], "--bits 5"),
        (["{model}", "--out", "{tmp}/o", "--group-size", "48"], "--group-size 48"),
        (["{model}", "--out", "{tmp}/o", "--calib", "{tmp}/empty.txt"], "empty"),
    ],
)
def test_cli_bad_input_one_line_exit_2(args, needle, smollm2_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    args = [a.format(tmp=tmp_path, model=smollm2_dir) for a in args]
    r = _cli("init", *args)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_refuses_existing_output(adapter_dir, smollm2_dir):
    out, _ = adapter_dir
    r = _cli("init", str(smollm2_dir), "--out", str(out), "--quiet")
    assert r.returncode == 2 and "already exists" in r.stderr


def test_cli_train_lowers_loss_on_real_text(adapter_dir, tmp_path):
    """`qwha-export train` on real instruction data (MMLU chain-of-thought samples): a few steps lower the loss."""
    from qwha_export.data import mmlu_cot_records

    out, _ = adapter_dir
    data = tmp_path / "train.jsonl"
    records = mmlu_cot_records()[:4]
    data.write_text("\n".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) for r in records))
    r = _cli(
        "train",
        str(out),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "trained"),
        "--max-steps",
        "4",
        "--logging-steps",
        "1",
        "--batch-size",
        "4",
        "--max-len",
        "128",
        "--lr",
        "0.05",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "trained" / "train_report.json").read_text())
    assert report["steps"] == 4
    assert report["final_loss"] < report["first_loss"], report["losses"]
    model, _ = load_qwha_model(tmp_path / "trained")
    assert model is not None


def _corrupt_copy(src, dst, how):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.3.self_attn.q_proj.qwha_"
    if how == "nan":
        tensors[key + "spectrum"][5] = float("nan")
    elif how == "index":
        tensors[key + "indices"][1, 0] = 10_000
    else:  # adapter made for another base: a layer of a different shape
        tensors[key + "shape"] = torch.tensor([576, 1152], dtype=tensors[key + "shape"].dtype)
    save_file(tensors, str(dst / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    "how,needle", [("nan", "NaN"), ("index", "out of range"), ("shape", "layers.3.self_attn.q_proj")]
)
def test_cli_rejects_corrupt_adapter(adapter_dir, tmp_path, how, needle):
    out, _ = adapter_dir
    bad = tmp_path / "bad"
    _corrupt_copy(out, bad, how)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "Hello world. " * 20}) + "\n")
    r = _cli("train", str(bad), "--data", str(data), "--out", str(tmp_path / "t"), "--max-steps", "1", "--quiet")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn" not in ln]
    assert r.returncode == 2, r.stderr[-1500:]
    assert lines[-1].startswith("Error:") and needle in lines[-1], r.stderr[-1500:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "t").exists()


def test_cli_merge_dense_matches_training_time_model(adapter_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out, _ = adapter_dir
    merged = tmp_path / "merged16"
    r = _cli(
        "merge",
        str(out),
        "--bits",
        "16",
        "--format",
        "dense",
        "--dtype",
        "float32",
        "--out",
        str(merged),
        "--quiet",
        "--verify-tokens",
        "0",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((merged / "qwha_export.json").read_text())
    assert manifest["total"]["n_adapted"] == 60
    ids = torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        ref = load_qwha_model(out)[0](input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)(input_ids=ids).logits
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.99


def test_cli_merge_gptq_v2_reports_requant_error(adapter_dir, tmp_path):
    out, _ = adapter_dir
    merged = tmp_path / "m4"
    r = _cli(
        "merge",
        str(out),
        "--bits",
        "4",
        "--requant",
        "rtn",
        "--format",
        "gptq_v2",
        "--calib-tokens",
        "256",
        "--out",
        str(merged),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == 4
    total = json.loads((merged / "qwha_export.json").read_text())["total"]
    assert 0 < total["rms_rel_err_requant_vs_merged"] < 0.5
    parity = json.loads((merged / "qwha_export.json").read_text())["parity"]  # merge's built-in short verify
    assert parity["tokens"] >= 256 and 0.5 < parity["top1_agreement"] <= 1.0 and parity["kl_per_token"] > 0
    r = _cli("merge", str(out), "--bits", "4", "--format", "gptq_v2", "--out", str(merged), "--quiet")
    assert r.returncode == 2 and "already exists" in r.stderr


def test_cli_fuse_then_verify_matches_training_time_model(adapter_dir, tmp_path):
    """The fused checkpoint (untouched gptq_v2 base + spectrum) reproduces the training-time model exactly."""
    out, _ = adapter_dir
    fused = tmp_path / "fused"
    r = _cli("fuse", str(out), "--out", str(fused), "--verify-tokens", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (fused / "qwha_fused.json").is_file() and (fused / "qwha_adapter.safetensors").is_file()
    r = _cli("verify", str(fused), "--against", str(out), "--tokens", "2048", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("tokens", "max_abs_logit_diff", "kl_per_token", "top1_agreement", "ppl_export", "ppl_reference"):
        assert key in result
    assert result["tokens"] >= 2000
    assert result["top1_agreement"] >= 0.999 and result["kl_per_token"] < 1e-6
    r = _cli("verify", str(tmp_path), "--against", str(out), "--json")
    assert r.returncode == 2 and r.stderr.startswith("Error:")
