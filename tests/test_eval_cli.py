"""`qwha-export eval` on real outputs of our own commands: `init` on a tiny Llama that uses the real SmolLM2
tokenizer, then `fuse`; scores equal the in-process scorer's; bad input is one line and exit 2."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from qwha_export.cli import main
from qwha_export.mc_eval import evaluate_model
from qwha_export.pipeline import load_qwha_model
from qwha_export.tasks import Task, load_task


@pytest.fixture(scope="module")
def tiny_adapter(smollm2_dir, tmp_path_factory):
    """A tiny random Llama (vocab of SmolLM2, hidden 64) with SmolLM2's tokenizer files; `init` into an adapter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("evalcli")
    base = root / "base"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(str(base), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(smollm2_dir / name, base / name)
    out = root / "adapter"
    r = CliRunner().invoke(main, ["init", str(base), "--out", str(out), "--bits", "4", "--group-size", "32",
                                  "--rank", "2", "--calib-tokens", "128", "--heldout-tokens", "128",
                                  "--seq-len", "64", "--quiet"])
    assert r.exit_code == 0, r.output
    return out


def test_eval_adapter_and_fused_export_match_the_scorer(tiny_adapter, tmp_path):
    r = CliRunner().invoke(main, ["eval", str(tiny_adapter), "--tasks", "piqa,winogrande", "--limit", "3",
                                  "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["kind"] == "adapter:qwha" and set(report["tasks"]) == {"piqa", "winogrande"}
    assert report["tasks"]["piqa"]["n"] == 3

    model, tok = load_qwha_model(tiny_adapter)
    direct = evaluate_model(model, tok, {t: load_task(t)[:3] for t in (Task.PIQA, Task.WINOGRANDE)})
    for task in ("piqa", "winogrande"):
        got = [p["ll"] for p in report["predictions"][task]]
        want = [p["ll"] for p in direct["predictions"][task]]
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4), task

    fused = tmp_path / "fused"
    r = CliRunner().invoke(main, ["fuse", str(tiny_adapter), "--out", str(fused), "--verify-tokens", "0"])
    assert r.exit_code == 0, r.output
    assert (fused / "tokenizer.json").is_file()  # fuse copies the base's tokenizer files
    r = CliRunner().invoke(main, ["eval", str(fused), "--tasks", "piqa", "--limit", "3", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    ex = json.loads(r.stdout)
    assert ex["kind"].startswith("export:")
    got = torch.tensor([p["ll"] for p in ex["predictions"]["piqa"]])
    assert torch.allclose(got, torch.tensor([p["ll"] for p in report["predictions"]["piqa"]]), atol=1e-3)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--tasks", "piqa,mmlu"], "unknown task 'mmlu'"),
        (["--limit", "0"], "--limit must be a positive integer"),
        (["--batch-tokens", "1"], "--batch-tokens must be >= 2"),
    ],
)
def test_eval_bad_input_is_one_line(tiny_adapter, args, needle):
    r = CliRunner().invoke(main, ["eval", str(tiny_adapter), *args])
    assert r.exit_code == 2 and needle in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_eval_refuses_a_folder_that_is_not_a_model(tmp_path):
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "missing"), "--tasks", "piqa"])
    assert r.exit_code == 2 and "does not exist" in r.output
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "empty"), "--tasks", "piqa"])
    assert r.exit_code == 2 and r.output.startswith("Error:") and len(r.output.strip().splitlines()) == 1
