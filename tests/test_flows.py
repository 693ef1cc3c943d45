"""The three things users do, end to end on the folders the real commands wrote (tests/flow_folders.py): push every
export to the local Hub endpoint (byte for byte, a valid card), verify every export, and the defects a new user
hit (push crash on merged/fused folders, late demo failure, verify on truncated ONNX data, Python-worded CLI
errors, verify --against an export folder)."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from flow_folders import EXPORTS, KINDS
from hub_server import LocalHub

from qwha_export.cli import main
from qwha_export.formats.manifest import MANIFEST_FILE, SCHEMA_VERSION, read_manifest

TOKEN = "hf_localTestToken0123456789abcdef"


def _invoke(*args: object, env: dict[str, str] | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _front_matter(text: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert m, text[:200]
    meta = yaml.safe_load(m.group(1))
    assert isinstance(meta, dict)
    return meta


def _one_error_line(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("name", EXPORTS)
def test_every_export_pushes_byte_for_byte_with_a_valid_card(flow, tmp_path, online, name):
    """`qwha-export push` on each folder the commands wrote: the files arrive byte for byte and the generated card's
    front matter parses and says what the folder is."""
    fmt, relation, library, tags = KINDS[name]
    folder = tmp_path / name
    shutil.copytree(flow[name], folder)
    with LocalHub(lfs_policy="regular") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf-home")}
        r = _invoke("push", folder, "--repo-id", f"me/tiny-{name}", "--base-model-id", "org/tiny-base", "--quiet",
                    env=env)  # fmt: skip
        assert r.exit_code == 0, r.output
        assert hub.unknown == []
        local = _local_files(folder)
        assert "README.md" in local and f"pushed {len(local)} files" in r.stdout
        assert {k: v for k, v in hub.files(f"me/tiny-{name}").items() if k != ".gitattributes"} == local
    assert read_manifest(folder).format == fmt
    meta = _front_matter(local["README.md"].decode())
    assert meta["base_model"] == "org/tiny-base" and meta["base_model_relation"] == relation
    assert meta.get("library_name") == library and meta["license"] == "mit"  # license: the base folder's card
    assert tags <= set(meta["tags"]), meta["tags"]
    body = local["README.md"].decode()
    assert "## Parity" in body and "No parity" not in body  # every command ran its parity check
    parity = read_manifest(folder).parity
    assert parity is not None and f"{100 * parity.top1_agreement:.2f}%" in body


@pytest.mark.parametrize("name", EXPORTS)
def test_verify_accepts_every_export(flow, name):
    r = _invoke("verify", flow[name], "--against", flow["trained"], "--tokens", 64, "--seq-len", 32, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["tokens"] == 64 and res["format"] == KINDS[name][0] and res["reference"] == "training-time"
    if "fused" in name or name == "dense":  # keeps the adapter (or fp32 weights): same model
        assert res["top1_agreement"] == 1.0 and res["kl_per_token"] < 1e-6, res
    else:  # re-quantized to 4 bits: a close but different model
        assert res["top1_agreement"] > 0.5 and res["kl_per_token"] < 1.0, res


def test_verify_onnx_against_the_folder_it_came_from(flow):
    """Regression: `verify ONNX --against MERGED_FOLDER` answered "not a qwha-export adapter directory"."""
    r = _invoke("verify", flow["onnx-merged"], "--against", flow["gptq_v2"], "--tokens", 64, "--seq-len", 32, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["reference"] == "gptq_v2" and res["format"] == "onnx"
    assert res["top1_agreement"] == 1.0 and res["kl_per_token"] < 1e-6, res
    r = _invoke("verify", flow["onnx-merged"], "--against", flow["base"].parent)
    _one_error_line(r, "is neither a qwha-export adapter directory", "nor an export folder", "--against")


def test_verify_refuses_truncated_onnx_data(flow, tmp_path):
    """Regression: verify printed an onnxruntime traceback (exit 1) on a truncated model.onnx.data."""
    folder = tmp_path / "onnx"
    shutil.copytree(flow["onnx-fused"], folder)
    data = folder / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    r = _invoke("verify", folder, "--against", flow["trained"], "--tokens", 64, "--seq-len", 32)
    _one_error_line(r, "model.onnx.data is truncated", "export-onnx")
    r = _invoke("generate", folder, "--prompt", "hi", "--max-new-tokens", 2)
    _one_error_line(r, "model.onnx.data is truncated")  # the same check for serving


def test_demo_checks_its_packages_before_any_work(tmp_path, monkeypatch):
    """Regression: without lm-eval the demo ran three minutes of work, then died with a traceback."""
    from qwha_export import data

    monkeypatch.setattr(data, "MMLU_DIST", "lm-eval-not-installed-here")
    t0 = time.time()
    r = _invoke("demo", "--out", tmp_path / "demo", "--quiet")
    _one_error_line(r, "lm-eval-not-installed-here", "pip install --no-deps lm-eval")
    assert time.time() - t0 < 20 and not (tmp_path / "demo").exists()


# ----------------------------------------------------------------------------------------------------------------------
# the manifest schema
# ----------------------------------------------------------------------------------------------------------------------


def test_manifest_schema_version_and_migration(flow, tmp_path):
    m = read_manifest(flow["gptq_v2"])
    raw = json.loads((flow["gptq_v2"] / MANIFEST_FILE).read_text())
    assert raw["schema_version"] == SCHEMA_VERSION and m.schema_version == SCHEMA_VERSION
    assert isinstance(m.source.base_hash, dict) and set(m.source.base_hash) >= {"config.json", "model.safetensors"}
    onnx = read_manifest(flow["onnx-fused"])
    assert onnx.source.manifest is not None and onnx.source.manifest.format == "fused"
    assert onnx.source.origin().adapter_dir == str(flow["trained"].resolve())
    assert onnx.parity.reference == "pytorch" and onnx.source.manifest.parity.reference == "training-time"

    folder = tmp_path / "old"
    shutil.copytree(flow["gptq_v2"], folder)
    old = {k: v for k, v in raw.items() if k != "schema_version"}  # as qwha-export 0.1.0 wrote it
    old["source"]["base_hash"] = "0123456789abcdef" * 4
    (folder / MANIFEST_FILE).write_text(json.dumps(old))
    migrated = read_manifest(folder)
    assert migrated.schema_version == SCHEMA_VERSION and migrated.source.base_hash == {"base": "0123456789abcdef" * 4}
    assert migrated.sections["layers"] == raw["layers"] and migrated.format == "gptq_v2"

    for change, needle in (
        ({"schema_version": SCHEMA_VERSION + 1}, "newer qwha-export"),
        ({"settings": {"bits": 4}}, "no settings.format"),
        ({"settings": {"format": "awq"}}, "unknown export format 'awq'"),
        ({"source": {"base_hash": [1, 2]}}, "base_hash"),
    ):
        (folder / MANIFEST_FILE).write_text(json.dumps({**raw, **change}))
        r = _invoke("push", folder, "--repo-id", "me/x")
        _one_error_line(r, needle, MANIFEST_FILE)
        r = _invoke("verify", folder, "--against", flow["trained"])
        _one_error_line(r, needle)


# ----------------------------------------------------------------------------------------------------------------------
# CLI errors in the command line's words
# ----------------------------------------------------------------------------------------------------------------------

_PYTHON_WORDS = re.compile(r"(?<![-\w])[a-z][a-z0-9_]*=|\b(True|False|None)\b")


def _bad_inputs(flow, tmp: Path) -> dict[str, list[tuple[list[object], str]]]:
    """Per command: (arguments, a fragment of the one-line error)."""
    adapter, trained, data = flow["adapter"], flow["trained"], flow["base"].parent / "data.jsonl"
    fresh = tmp / "fresh"
    return {
        "init": [
            ([flow["base"], "--out", adapter], "--overwrite"),
            ([flow["base"], "--out", fresh, "--bits", 5], "--bits 5"),
            ([flow["base"], "--out", fresh, "--group-size", 48], "--group-size 48"),
            ([flow["base"], "--out", fresh, "--calib-tokens", 0], "--calib-tokens"),
            ([tmp / "no-model", "--out", fresh], "does not exist"),
        ],
        "train": [
            ([adapter, "--data", data, "--out", trained], "pass --overwrite or choose another --out"),
            ([adapter, "--data", data, "--out", fresh, "--max-len", 1], "--max-len"),
            ([adapter, "--data", data, "--out", fresh, "--lr", 0], "--lr"),
            ([adapter, "--data", data, "--out", fresh, "--resume"], "--resume"),
        ],
        "merge": [
            ([trained, "--out", flow["dense"]], "--overwrite"),
            ([trained, "--out", fresh, "--bits", 5], "--bits 5"),
            ([trained, "--out", fresh, "--bits", 16, "--format", "gptq"], "--format"),
            ([trained, "--out", fresh, "--group-size", 48], "--group-size 48"),
            ([trained, "--out", fresh, "--verify-tokens", 1], "--verify-tokens"),
            ([trained, "--out", fresh, "--requant", "gptq", "--calib-tokens", 0], "--calib-tokens"),
            ([flow["base"], "--out", fresh], "run `init` first"),
        ],
        "fuse": [
            ([trained, "--out", flow["fused"]], "--overwrite"),
            ([tmp / "nothing", "--out", fresh], "not a qwha-export adapter directory"),
            ([trained, "--out", fresh, "--verify-tokens", -1], "--verify-tokens"),
        ],
        "export-onnx": [
            ([flow["gptq_v2"], "--out", fresh, "--accuracy-level", 7], "--accuracy-level 7"),
            ([flow["gptq_v2"], "--out", fresh, "--parity-tokens", -1], "--parity-tokens -1"),
            ([flow["gptq_v2"], "--out", flow["onnx-merged"]], "--overwrite"),
            ([flow["onnx-merged"], "--out", fresh], "already an ONNX export"),
        ],
        "verify": [
            ([flow["fused"], "--against", tmp / "nothing"], "does not exist"),
            ([tmp / "nothing", "--against", trained], "does not exist"),
            ([flow["fused"], "--against", trained, "--seq-len", 1], "at least 2"),
        ],
        "generate": [
            ([flow["onnx-fused"], "--prompt", "hi", "--top-p", 0], "--top-p"),
            ([flow["onnx-fused"], "--prompt", "hi", "--max-new-tokens", 0], "--max-new-tokens"),
            ([flow["fused"], "--prompt", "hi"], "export-onnx"),
        ],
        "push": [
            ([flow["fused"], "--repo-id", "me/x", "--revision", "a" * 40], "commit hash"),
            ([flow["fused"], "--repo-id", "me/x", "--base-model-id", "/tmp/x"], "--base-model-id"),
            ([flow["fused"], "--repo-id", "me/x", "--revision", "dev", "--create-pr"], "--create-pr"),
            ([tmp / "nothing", "--repo-id", "me/x"], "does not exist"),
        ],
        "import-published": [([tmp / "nothing", "--base", adapter, "--out", fresh], "does not exist")],
        "demo": [([], "--overwrite")],
    }


def test_cli_errors_name_flags_not_python_arguments(flow, tmp_path, online, monkeypatch):
    """Every command's bad input: exit code 2, one `Error:` line in the CLI's words (no `name=value`, no Python
    literals), nothing written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo").mkdir(parents=True)  # demo's default --out exists
    cases = _bad_inputs(flow, tmp_path)
    assert set(cases) >= set(main.commands) - {"eval", "build-ops"}, sorted(set(main.commands) - set(cases))
    bad = []
    for command, rows in cases.items():
        for args, needle in rows:
            r = _invoke(command, *args, env={"HF_ENDPOINT": "http://127.0.0.1:9"})
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            line = lines[0] if len(lines) == 1 else repr(lines)
            ok = r.exit_code == 2 and len(lines) == 1 and line.startswith("Error: ") and needle in line
            if not ok or _PYTHON_WORDS.search(line.removeprefix("Error: ")):
                bad.append(f"{command} {' '.join(map(str, args[1:]))} (exit {r.exit_code}, wants {needle!r}): {line}")
    assert not bad, "\n".join(bad)
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("bits, fmt", [(4, "gptq_v2"), (16, "dense")])
def test_merge_default_format_stores_low_bit_models_packed(flow, tmp_path, bits, fmt):
    """`merge --bits 4` without --format writes packed gptq_v2 (not 16-bit weights on a 4-bit grid); --bits 16 dense."""
    out = tmp_path / f"m{bits}"
    r = _invoke("merge", flow["trained"], "--bits", bits, "--out", out, "--calib-tokens", 0, "--verify-tokens", 0)
    assert r.exit_code == 0, r.output
    assert read_manifest(out).format == fmt
    config = json.loads((out / "config.json").read_text())
    assert ("quantization_config" in config) == (bits < 16)


@pytest.mark.parametrize(
    ("command", "bars"),
    [
        (["fuse", "{trained}", "--out", "{out}", "--verify-tokens", "64"],
         ["fuse", "parity: reference", "parity: export"]),  # fmt: skip
        (["merge", "{trained}", "--out", "{out}", "--bits", "4", "--calib-tokens", "0", "--verify-tokens", "64"],
         ["merge", "parity: reference", "parity: export"]),  # fmt: skip
        (["verify", "{gptq_v2}", "--against", "{trained}", "--tokens", "64", "--seq-len", "32"],
         ["parity: reference", "parity: export"]),  # fmt: skip
    ],
    ids=["fuse", "merge", "verify"],
)
def test_long_commands_show_progress_and_quiet_hides_it(flow, tmp_path, command, bars):
    """fuse, merge and verify show a bar per layer loop and per block-by-block run on stderr; --quiet shows none
    (stderr empty) and the command does the same work."""
    stderr = {}
    for quiet in (False, True):
        out = tmp_path / f"out-{quiet}"
        args = [a.format(trained=flow["trained"], gptq_v2=flow["gptq_v2"], out=out) for a in command]
        r = _invoke(*args, *(["--quiet"] if quiet else []))
        assert r.exit_code == 0, r.output
        stderr[quiet] = r.stderr
    for desc in bars:
        assert re.search(rf"{re.escape(desc)}: +100%", stderr[False]), (desc, stderr[False][-1000:])
    assert stderr[True].strip() == "", stderr[True][-1000:]
