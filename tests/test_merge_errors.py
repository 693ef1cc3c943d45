"""`merge` / `fuse` / `verify` through the CLI: bad input is one line ``Error: ...`` with exit code 2 and nothing
left at ``--out``; `merge` and `fuse` store a held-out parity check in the manifest; a same-bit merge that loses
most of the adapter's error reduction says so.

Each test works on its own copy of the tiny hand-built adapter directory (tests/tiny_adapter.py), whose base gets a
byte-level tokenizer here so that calibration (Lee-corpus start) and the parity check (Lee-corpus end) can run.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors import SafetensorError
from tiny_adapter import build_adapter_dir

from qwha_export.cli import main
from qwha_export.converters import merge as M
from qwha_export.formats import shards as S
from qwha_export.pipeline import base_fingerprint

PARITY_KEYS = ("tokens", "max_abs_logit_diff", "kl_per_token", "top1_agreement", "ppl_export", "ppl_reference")
FAST = ("--verify-tokens", "0")  # error cases: no parity check needed


def _byte_tokenizer(folder):
    """A real HF fast tokenizer with one token per byte (vocab 256, the tiny model's), saved into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0]).save_pretrained(str(folder))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    adir, base, quantized = build_adapter_dir(root)
    _byte_tokenizer(base)
    return root


@pytest.fixture
def work(source, tmp_path):
    """A private copy ``(adapter_dir, base_dir)`` whose qwha_base.json points at the copied base."""
    shutil.copytree(source / "base", tmp_path / "base")
    shutil.copytree(source / "adapter", tmp_path / "adapter")
    _set_meta(tmp_path / "adapter", base_model=str(tmp_path / "base"))
    return tmp_path / "adapter", tmp_path / "base"


def _set_meta(adir, **kw):
    meta = json.loads((adir / "qwha_base.json").read_text())
    meta.update(kw)
    (adir / "qwha_base.json").write_text(json.dumps(meta))


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _error(result, *needles):
    """Exit code 2, stderr is exactly one line ``Error: ...`` containing every needle; returns that line."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _no_output(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], list(out.parent.iterdir())


def _reshard(base, max_shard_bytes=60_000):
    """Rewrite the base checkpoint as several shards + index; return the shard paths."""
    tensors = dict(S.iter_checkpoint_tensors(base))
    (base / "model.safetensors").unlink()
    with S.ShardWriter(base, max_shard_bytes=max_shard_bytes) as sw:
        sw.add_many(tensors)
    shards = sorted(base.glob("model-*.safetensors"))
    assert len(shards) >= 3
    return shards


# ----------------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["merge", "fuse"])
def test_missing_shard(work, tmp_path, cmd):
    adir, base = work
    shards = _reshard(base)
    shards[1].unlink()
    out = tmp_path / "out"
    _error(_cli(cmd, adir, "--out", out, *FAST), "missing", shards[1].name, "re-download")
    _no_output(out)


@pytest.mark.parametrize("cmd", ["merge", "fuse", "verify"])
def test_truncated_shard(work, tmp_path, cmd):
    adir, base = work
    out = tmp_path / "out"
    if cmd == "verify":  # a good export first; then its base is truncated
        assert _cli("merge", adir, "--bits", "16", "--out", out, *FAST).exit_code == 0
    victim = _reshard(base)[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    args = ["verify", out, "--against", adir] if cmd == "verify" else [cmd, adir, "--out", out, *FAST]
    _error(_cli(*args), "truncated", victim.name, "re-download")
    if cmd != "verify":
        _no_output(out)


@pytest.mark.parametrize("how", ["length", "json"])
@pytest.mark.parametrize("where", ["base", "quantized_base", "export"])
def test_corrupted_safetensors_header(work, tmp_path, how, where):
    adir, base = work
    out = tmp_path / "out"
    if where == "export":
        assert _cli("merge", adir, "--bits", "16", "--out", out, *FAST).exit_code == 0
    victim = {
        "base": base / "model.safetensors",
        "quantized_base": adir / "quantized_base.safetensors",
        "export": out / "model.safetensors",
    }[where]
    data = bytearray(victim.read_bytes())
    if how == "length":
        data[:8] = (10**12).to_bytes(8, "little")  # what safetensors itself calls HeaderTooLarge
    else:
        data[8:16] = b"\x00garbage"
    victim.write_bytes(bytes(data))
    if where == "export":
        _error(_cli("verify", out, "--against", adir), "corrupted", victim.name, "re-download")
        return
    for cmd in ("merge", "fuse"):
        _error(_cli(cmd, adir, "--out", out, *FAST), "corrupted", victim.name, "re-download")
        _no_output(out)


def test_adapter_for_a_different_base_shape(work, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    adir, base = work
    other = tmp_path / "other"
    cfg = LlamaConfig.from_pretrained(str(base))
    cfg.intermediate_size = 256  # same layer names, other MLP shapes
    LlamaForCausalLM(cfg).save_pretrained(str(other))
    _set_meta(adir, base_model=str(other))
    out = tmp_path / "out"
    for cmd in ("merge", "fuse"):
        line = _error(_cli(cmd, adir, "--out", out, *FAST), "different base model", str(other))
        assert "mlp.down_proj" in line and "(64, 128)" in line and "(64, 256)" in line, line
        _no_output(out)


def test_base_changed_after_init_hash_mismatch(work, tmp_path):
    adir, base = work
    _set_meta(adir, base_hash=base_fingerprint(base))
    out = tmp_path / "out"
    assert _cli("merge", adir, "--bits", "16", "--out", out, *FAST).exit_code == 0  # unchanged base: fine
    cfg = json.loads((base / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (base / "config.json").write_text(json.dumps(cfg))
    fresh = tmp_path / "fresh"
    for args in (["merge", adir, "--out", fresh, *FAST], ["fuse", adir, "--out", fresh, *FAST]):
        _error(_cli(*args), "hash mismatch", "config.json", "qwha_base.json")
        _no_output(fresh)
    _error(_cli("verify", out, "--against", adir), "hash mismatch", "config.json")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--bits", "5"], "--bits 5 is not supported"),
        (["--bits", "4", "--group-size", "48"], "--group-size 48"),
        (["--bits", "16", "--format", "gptq_v2"], "--bits 16"),
        (["--verify-tokens", "-1"], "--verify-tokens"),
    ],
)
def test_unsupported_settings(work, tmp_path, args, needle):
    out = tmp_path / "out"
    _error(_cli("merge", work[0], "--out", out, *args), needle)
    _no_output(out)


@pytest.mark.parametrize("cmd", ["merge", "fuse"])
def test_existing_output_folder_refused_and_untouched(work, tmp_path, cmd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _error(_cli(cmd, work[0], "--out", out, *FAST), "already exists", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    result = _cli(cmd, work[0], "--out", out, "--overwrite", *FAST)
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "qwha_export.json").is_file()


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_disk_full_mid_write_leaves_nothing(work, tmp_path, monkeypatch, kind):
    """The second shard hits a full disk (half the file written): one line, exit 2, no output folder, no temp."""
    real_save = S.save_file
    calls = []

    def full_disk(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 1:
            return real_save(tensors, path, metadata=metadata)
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)
        if kind == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(S, "save_file", full_disk)
    out = tmp_path / "out"
    args = ("merge", work[0], "--bits", "16", "--max-shard-size", "60KB", "--out", out, *FAST)
    line = _error(_cli(*args), "No space left on device")
    assert "free some disk space or choose another --out" in line and f".{out.name}.tmp-" in line, line
    assert len(calls) == 2
    _no_output(out)


def test_real_write_error_in_a_subprocess(work, tmp_path):
    """A real file-system refusal (RLIMIT_FSIZE -> EFBIG from write(2)) while writing the shards."""
    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    r = subprocess.run(
        [sys.executable, "-m", "qwha_export.cli", "merge", str(work[0]), "--bits", "16", "--dtype", "float32"]
        + ["--out", str(out), *FAST],
        capture_output=True,
        text=True,
        preexec_fn=limit,
    )
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[-1].startswith("Error: File too large") and "choose another --out" in lines[-1], lines[-1]
    _no_output(out)


# ----------------------------------------------------------------------------------------------------------------------
# parity in the manifest, the "lost more than half" advice, held-out text
# ----------------------------------------------------------------------------------------------------------------------


def test_merge_stores_parity_and_warns_when_same_bit_loses_the_gain(work, tmp_path):
    adir, _ = work
    out4 = tmp_path / "m4"
    r = _cli("merge", adir, "--bits", "4", "--requant", "rtn", "--format", "gptq_v2", "--out", out4)
    assert r.exit_code == 0, r.output
    manifest = json.loads((out4 / "qwha_export.json").read_text())
    parity = manifest["parity"]
    assert set(PARITY_KEYS) <= set(parity) and parity["tokens"] == 512, parity
    assert 0.0 <= parity["top1_agreement"] < 1.0 and parity["kl_per_token"] > 0  # a lossy re-quantization
    assert f"parity on 512 held-out tokens: top-1 agreement {parity['top1_agreement']:.4f}" in r.stdout
    gain = manifest["adapter_gain"]
    assert gain["same_bit"] and gain["kept_fraction"] < 0.5 and "lost more than half" in gain["advice"]
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("Warning:")]
    assert len(warnings) == 1 and all(s in warnings[0] for s in ("qwha-export fuse", "--requant refit", "--bits 8"))
    for layer in manifest["layers"]:
        if layer["adapted"]:
            eb, er = layer["rel_err_base_vs_merged"], layer["rel_err_requant_vs_merged"]
            assert layer["kept_fraction"] == pytest.approx((eb - er) / eb)

    out8 = tmp_path / "m8"
    r = _cli("merge", adir, "--bits", "8", "--requant", "rtn", "--format", "gptq_v2", "--out", out8)
    assert r.exit_code == 0, r.output
    manifest8 = json.loads((out8 / "qwha_export.json").read_text())
    assert manifest8["adapter_gain"]["advice"] is None and manifest8["adapter_gain"]["kept_fraction"] > 0.9
    assert not [ln for ln in r.stderr.splitlines() if ln.startswith("Warning:")]
    assert manifest8["parity"]["kl_per_token"] < parity["kl_per_token"]
    # --quiet silences the warning, not the manifest
    r = _cli("merge", adir, "--bits", "4", "--format", "gptq_v2", "--out", tmp_path / "q", "--quiet", *FAST)
    assert r.exit_code == 0 and "Warning" not in r.stderr
    q = json.loads((tmp_path / "q" / "qwha_export.json").read_text())
    assert q["adapter_gain"]["advice"] and q["parity"] is None


def test_same_bit_merge_of_a_large_adapter_keeps_the_gain(work, tmp_path):
    """The advice depends on the numbers: an adapter far above the grid step survives a same-bit merge."""
    adir, _ = work
    cfg = json.loads((adir / "adapter_config.json").read_text())
    cfg["scale"] = 100 * cfg["scale"]
    cfg["scale_pattern"] = {k: 100 * v for k, v in (cfg.get("scale_pattern") or {}).items()}
    (adir / "adapter_config.json").write_text(json.dumps(cfg))
    gen = torch.Generator().manual_seed(0)
    grams = {}
    for name in json.loads((adir / "qwha_base.json").read_text())["quantized_layers"]:
        d_in = 64 if "down_proj" not in name else 128
        x = torch.randn(256, d_in, generator=gen, dtype=torch.float64)
        grams[name] = x.T @ x
    report = M.stream_merge(adir, tmp_path / "big", bits=4, group_size=None, requant="rtn", fmt="gptq_v2", grams=grams)
    assert report["adapter_gain"]["same_bit"] and report["adapter_gain"]["kept_fraction"] > 0.5
    assert report["adapter_gain"]["advice"] is None
    total = report["total"]
    assert total["kept_fraction"] == pytest.approx(
        (total["rms_rel_err_base_vs_merged"] - total["rms_rel_err_requant_vs_merged_adapted"])
        / total["rms_rel_err_base_vs_merged"]
    )


def test_fuse_stores_exact_parity(work, tmp_path):
    out = tmp_path / "fused"
    r = _cli("fuse", work[0], "--out", out, "--verify-tokens", "256")
    assert r.exit_code == 0, r.output
    parity = json.loads((out / "qwha_export.json").read_text())["parity"]
    assert set(PARITY_KEYS) <= set(parity) and parity["tokens"] == 256
    assert parity["top1_agreement"] == 1.0 and parity["max_abs_logit_diff"] < 1e-4
    assert "parity on 256 held-out tokens: top-1 agreement 1.0000" in r.stdout


def test_parity_skipped_without_tokenizer(work, tmp_path):
    adir, base = work
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).unlink(missing_ok=True)
    out = tmp_path / "o"
    r = _cli("merge", adir, "--bits", "16", "--out", out)
    assert r.exit_code == 0, r.output
    assert "skipped" in json.loads((out / "qwha_export.json").read_text())["parity"]
    assert "parity check skipped" in r.stderr


def test_verify_default_text_is_the_heldout_end_of_the_corpus(work, tmp_path, monkeypatch):
    from qwha_export import data
    from qwha_export.verify import verify_export

    adir, base = work
    out = tmp_path / "o"
    assert _cli("merge", adir, "--bits", "16", "--out", out, *FAST).exit_code == 0
    seen = []
    real = data.token_chunks

    def spy(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    monkeypatch.setattr(data, "token_chunks", spy)
    verify_export(out, adir, tokens=96, seq_len=32)
    from transformers import AutoTokenizer

    ids = data.tokenize_text(AutoTokenizer.from_pretrained(str(base)), data.lee_corpus_text())
    assert seen[0].shape == (3, 32) and seen[0].reshape(-1).tolist() == ids[-96:]
    # the calibration side (init, merge's Grams) takes the start: disjoint
    calib = real(AutoTokenizer.from_pretrained(str(base)), data.lee_corpus_text(), 32, max_tokens=96)
    assert calib.reshape(-1).tolist() == ids[:96]
