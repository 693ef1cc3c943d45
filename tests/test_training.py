"""Fine-tuning the QWHA spectrum with ``train_qwha``: loss goes down, the output folder reloads to the same logits,
resume continues a run exactly, bad inputs raise ``ValueError``.

Everything runs on a tiny random Llama (hidden 64, 2 layers) with a real byte-level ``PreTrainedTokenizerFast`` (one
token per UTF-8 byte plus ``</s>``), quantized and initialised by ``init_qwha`` in a temporary folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from flow_folders import write_tiny_base
from safetensors.torch import load_file

from qwha_export.data import lee_corpus_text, mmlu_cot_records

MAX_LEN = 112
STEPS = 12
SAVE = 6


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def adapter_dir(work: Path) -> Path:
    """A tiny Llama with a byte-level tokenizer, quantized (4-bit RTN, groups of 32) + QWHA init (rank 8)."""

    from qwha_export.converters.quantize import QuantConfig
    from qwha_export.converters.qwha_init import InitConfig
    from qwha_export.initialise import InitJob, init_qwha

    base = write_tiny_base(work / "base")
    out = work / "adapter"
    init_qwha(
        InitJob(
            model=str(base),
            out=str(out),
            quant=QuantConfig(bits=4, group_size=32),
            init=InitConfig(rank=8),
            calib_tokens=256,
            heldout_tokens=256,
            seq_len=64,
            quiet=True,
        )
    )
    return out


@pytest.fixture(scope="module")
def data_file(work: Path) -> Path:
    """Real text: the 4 MMLU chain-of-thought records (prompt/response) with the shortest prompts + 8 Lee corpus
    articles (text)."""
    mmlu = sorted(mmlu_cot_records(), key=lambda r: len(r["prompt"]))[:4]
    lee = [line for line in lee_corpus_text().splitlines() if line.strip()][:8]
    recs = [{"prompt": r["prompt"], "response": r["response"]} for r in mmlu] + [{"text": t} for t in lee]
    path = work / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _config(adapter_dir: Path, data: Path, out: Path, **kw):
    from qwha_export.training import TrainConfig

    base = dict(
        adapter_dir=str(adapter_dir),
        data=str(data),
        out=str(out),
        max_steps=STEPS,
        lr=0.5,
        warmup_ratio=0.0,
        batch_size=2,
        max_len=MAX_LEN,
        logging_steps=1,
        save_steps=SAVE,
        seed=0,
        quiet=True,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(adapter_dir: Path, data_file: Path, work: Path):
    """One 12-step run (checkpoints at 6 and 12): ``(model, tokenizer, report, out)``."""
    from qwha_export.training import train_qwha_model

    out = work / "trained"
    model, tokenizer, report = train_qwha_model(_config(adapter_dir, data_file, out))
    return model, tokenizer, report, out


def _batch(tokenizer, data_file: Path) -> dict[str, torch.Tensor]:
    from qwha_export.data import encode_records, read_jsonl
    from qwha_export.training import PadCollator

    examples = encode_records(tokenizer, read_jsonl(data_file), MAX_LEN)
    return PadCollator(int(tokenizer.eos_token_id))(examples)


@torch.no_grad()
def _loss(model, batch) -> float:
    model.eval()
    return float(model(**batch).loss)


def _spectra(adapter: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(adapter / "adapter_model.safetensors")).items() if "qwha_spectrum" in k}


def test_training_lowers_loss(trained, adapter_dir: Path, data_file: Path):
    from qwha_export.pipeline import load_qwha_model

    model, tokenizer, report, out = trained
    assert report["steps"] == STEPS
    assert [e["step"] for e in report["losses"]] == list(range(1, STEPS + 1))
    first = sum(e["loss"] for e in report["losses"][:3]) / 3
    last = sum(e["loss"] for e in report["losses"][-3:]) / 3
    assert last < first - 0.05, (first, last)
    assert report["first_loss"] == report["losses"][0]["loss"] and report["final_loss"] == report["losses"][-1]["loss"]

    # the same fixed batch (all records) before and after training
    before, _ = load_qwha_model(adapter_dir)
    batch = _batch(tokenizer, data_file)
    loss_before, loss_after = _loss(before, batch), _loss(model, batch)
    assert loss_after < loss_before - 0.1, (loss_before, loss_after)
    # only spectrum values are trained: the support (indices) is unchanged, the values moved
    init = load_file(str(adapter_dir / "adapter_model.safetensors"))
    final = load_file(str(out / "adapter_model.safetensors"))
    assert init.keys() == final.keys()
    for k in init:
        if "qwha_spectrum" in k:
            assert not torch.equal(init[k], final[k]), k
        else:
            assert torch.equal(init[k], final[k]), k
    print(
        f"\nloss per step {report['first_loss']:.3f} -> {report['final_loss']:.3f}; "
        f"fixed batch {loss_before:.3f} -> {loss_after:.3f}; {report['seconds']:.1f} s"
    )


def test_output_dir_is_a_complete_adapter(trained, data_file: Path):
    from qwha_export.pipeline import load_qwha_model

    model, tokenizer, report, out = trained
    for name in ("adapter_config.json", "adapter_model.safetensors", "qwha_base.json", "quantized_base.safetensors"):
        assert (out / name).is_file(), name
    assert not (out / "training_args.bin").exists()
    assert {p.name for p in (out / "checkpoints").iterdir()} == {f"checkpoint-{SAVE}", f"checkpoint-{STEPS}"}
    assert not Path(f"{out}.partial").exists()
    saved = json.loads((out / "train_report.json").read_text())
    assert saved["steps"] == STEPS and saved["losses"] == report["losses"]
    assert saved["config"]["lr"] == 0.5 and saved["data"]["examples"] == 12

    loaded, _ = load_qwha_model(out)
    batch = _batch(tokenizer, data_file)
    model.eval()
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(a, b)


def test_resume_interrupted_run_continues_exactly(trained, adapter_dir: Path, data_file: Path, work: Path):
    """An interrupted run (only ``<out>.partial/checkpoints/checkpoint-6`` exists) resumed with ``resume=True`` runs
    steps 7..12 and ends with the same spectrum as the uninterrupted run."""
    from qwha_export.training import train_qwha

    _, _, full, full_out = trained
    out = work / "resumed"
    partial = Path(f"{out}.partial") / "checkpoints"
    partial.mkdir(parents=True)
    shutil.copytree(full_out / "checkpoints" / f"checkpoint-{SAVE}", partial / f"checkpoint-{SAVE}")

    with pytest.raises(ValueError, match="interrupted run"):
        train_qwha(_config(adapter_dir, data_file, out))
    report = train_qwha(_config(adapter_dir, data_file, out, resume=True))
    assert report["resumed_from"] == str(out / "checkpoints" / f"checkpoint-{SAVE}")
    assert report["steps"] == STEPS
    assert [e["step"] for e in report["losses"]] == list(range(1, STEPS + 1))
    assert report["losses"][:SAVE] == full["losses"][:SAVE]  # history restored from the checkpoint
    new, ref = _spectra(out), _spectra(full_out)
    assert new.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(new[k], ref[k], rtol=1e-5, atol=1e-6)
    for a, b in zip(report["losses"][SAVE:], full["losses"][SAVE:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert not Path(f"{out}.partial").exists()


def test_checkpoint_loading_is_strict(trained, work: Path):
    from qwha_export.pipeline import load_qwha_model
    from qwha_export.training import load_adapter_checkpoint

    _, _, _, out = trained
    model, _ = load_qwha_model(out)
    for n, p in model.named_parameters():
        p.requires_grad_("qwha_spectrum" in n)
    ckpt = out / "checkpoints" / f"checkpoint-{SAVE}"
    load_adapter_checkpoint(model, ckpt)
    state = load_file(str(ckpt / "adapter_model.safetensors"))
    key = next(k for k in state if "qwha_spectrum" in k)
    got = dict(model.named_parameters())[key.replace("qwha_spectrum", "qwha_spectrum.default")]
    assert torch.equal(got.detach(), state[key])

    bad = work / "bad-ckpt"
    bad.mkdir()
    del state[key]
    from safetensors.torch import save_file

    save_file(state, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="does not match the model"):
        load_adapter_checkpoint(model, bad)
    with pytest.raises(ValueError, match="not a QWHA training checkpoint"):
        load_adapter_checkpoint(model, work)


def test_bad_inputs(trained, adapter_dir: Path, data_file: Path, work: Path):
    from qwha_export.training import TrainConfig, train_qwha

    _, _, _, out = trained
    new = work / "new-out"
    # config values
    for kw, word in [
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"grad_accum": -1}, "grad_accum"),
        ({"max_len": 1}, "max_len"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"lr_scheduler": "nope"}, "lr_scheduler"),
        ({"max_steps": 0, "epochs": 0}, "epochs"),
        ({"save_steps": -1}, "save_steps"),
        ({"bf16": "yes"}, "bf16"),
        ({"resume": 3}, "resume"),
    ]:
        with pytest.raises(ValueError, match=word):
            _config(adapter_dir, data_file, new, **kw)
    with pytest.raises(ValueError, match="must differ"):
        _config(adapter_dir, data_file, adapter_dir)
    with pytest.raises(ValueError, match="does not exist"):
        train_qwha(_config(work / "missing", data_file, new))
    with pytest.raises(ValueError, match="not a qwha-export adapter directory"):
        train_qwha(_config(work / "base", data_file, new))
    with pytest.raises(ValueError, match="no such file"):
        train_qwha(_config(adapter_dir, work / "missing.jsonl", new))
    empty = work / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        train_qwha(_config(adapter_dir, empty, new))
    long_prompts = work / "long.jsonl"
    long_prompts.write_text(json.dumps({"prompt": "x" * 200, "response": "y"}) + "\n")
    with pytest.warns(UserWarning, match="dropped 1"), pytest.raises(ValueError, match="max_len=112 is too small"):
        train_qwha(_config(adapter_dir, long_prompts, new))
    with pytest.raises(ValueError, match="already exists"):
        train_qwha(_config(adapter_dir, data_file, out))
    with pytest.raises(ValueError, match="no checkpoint"):
        train_qwha(_config(adapter_dir, data_file, new, resume=True))
    with pytest.raises(ValueError, match="not a training checkpoint"):
        train_qwha(_config(adapter_dir, data_file, new, resume=str(work)))
    assert not new.exists() and not Path(f"{new}.partial").exists()
    assert isinstance(_config(adapter_dir, data_file, new, max_steps=0, epochs=0.5), TrainConfig)


def test_epochs_grad_accum_and_checkpointing(adapter_dir: Path, data_file: Path, work: Path):
    """``max_steps <= 0`` trains by epochs; gradient accumulation and activation checkpointing run with QWHA layers."""
    from qwha_export.pipeline import load_qwha_model
    from qwha_export.training import train_qwha

    out = work / "epochs"
    report = train_qwha(
        _config(
            adapter_dir,
            data_file,
            out,
            max_steps=0,
            epochs=0.5,
            grad_accum=3,
            gradient_checkpointing=True,
            save_steps=0,
        )
    )
    assert report["steps"] == 1  # 12 records / batch 2 / accumulation 3 = 2 updates per epoch; half an epoch
    assert not (out / "checkpoints").exists()
    assert report["final_loss"] is not None and report["config"]["gradient_checkpointing"] is True
    load_qwha_model(out)
