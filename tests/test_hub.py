"""``qwha-export push``: real export folders (tiny adapter -> merge gptq_v2 / fuse) uploaded through the real
``huggingface_hub`` client to a local Hub-compatible endpoint (tests/hub_server.py), checked byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hub_server import LocalHub
from huggingface_hub import constants as hf_constants

from qwha_export.cli import main
from qwha_export.hub import push_folder, validate_push_folder
from qwha_export.model_card import resolve_base_model

TOKEN = "hf_localTestToken0123456789abcdef"
SHARD_BYTES = 60_000  # the multipart chunk: shards above it (the 65,792-byte embedding) go multipart


@pytest.fixture(scope="module")
def exports(flow):
    """``{"adapter", "gptq", "fused", "onnx"}``: folders the real commands wrote (tests/flow_folders.py): the trained
    adapter, its ``merge --format gptq_v2 --max-shard-size 60KB`` (three shards), its ``fuse`` and the
    ``export-onnx`` of the fused folder. Each has the parity numbers its command measured."""
    return {"adapter": flow["trained"], "gptq": flow["gptq_v2"], "fused": flow["fused"], "onnx": flow["onnx-fused"]}


def _copy(exports, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(exports[name], dst)
    return dst


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _card(text: str) -> tuple[dict, str]:
    m = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.S)
    assert m, text[:200]
    return yaml.safe_load(m.group(1)), m.group(2)


def test_push_gptq_through_lfs_to_a_new_branch(exports, tmp_path, online):
    """Function path (endpoint= and token= arguments), the client's LFS upload (Xet disabled): basic and multipart
    transfers, a new branch, then a pull request; every file arrives byte for byte."""
    online.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    folder = _copy(exports, "gptq", tmp_path)
    with LocalHub(multipart_chunk=SHARD_BYTES) as hub:
        result = push_folder(
            folder,
            "me/tiny-q4",
            token=TOKEN,
            endpoint=hub.url,
            revision="v1",
            base_model_id="org/tiny-base",
            quiet=True,
        )
        assert hub.unknown == []
        local = _local_files(folder)
        assert result["model_card"] == "generated" and "README.md" in local
        assert sorted(result["files"]) == sorted(local)
        assert hub.files("me/tiny-q4", "v1") == {**local, ".gitattributes": hub.files("me/tiny-q4")[".gitattributes"]}
        assert set(hub.files("me/tiny-q4")) == {".gitattributes"}  # main untouched: the branch was created
        assert result["commit_oid"] == hub.repos["me/tiny-q4"].commits[-1]["oid"] and result["revision"] == "v1"
        # the safetensors shards went through LFS (two multipart, one basic), each verified
        shards = {hashlib.sha256(b).hexdigest() for n, b in local.items() if n.endswith(".safetensors")}
        assert len(shards) == 3 and set(hub.lfs_puts) == shards and set(hub.verified) == shards
        paths = [r["path"] for r in hub.requests]
        assert any("/part/" in p for p in paths) and any(p.count("/") == 2 and p.startswith("/lfs/") for p in paths)
        hub_calls = [r for r in hub.requests if not r["path"].startswith("/lfs/") or r["path"].endswith("/verify")]
        assert hub_calls and all(r["auth"] == f"Bearer {TOKEN}" for r in hub_calls)
        assert not any(r["auth"] for r in hub.requests if "/part/" in r["path"])  # storage URLs get no token

        meta, body = _card(local["README.md"].decode())
        assert meta["base_model"] == "org/tiny-base" and meta["base_model_relation"] == "quantized"
        assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
        assert meta["license"] == "mit"  # from the base folder's README metadata
        assert {"qwha", "gptq", "int4"} <= set(meta["tags"]) and "onnx" not in meta["tags"]
        parity = json.loads(local["qwha_export.json"])["parity"]
        assert f"{100 * parity['top1_agreement']:.2f}%" in body and f"{parity['ppl_export']:.3f}" in body
        assert f"{parity['max_abs_logit_diff']:.3g}" in body and f"{parity['tokens']:,}" in body
        for fact in ("rank 4", "4-bit, group size 32", "| rtn |", 'from_pretrained("me/tiny-q4"'):
            assert fact in body

        pr = push_folder(folder, "me/tiny-q4", token=TOKEN, endpoint=hub.url, create_pr=True, quiet=True)
        assert pr["model_card"] == "existing" and pr["pr_url"].endswith("/discussions/1")
        assert hub.files("me/tiny-q4", "refs/pr/1") == hub.files("me/tiny-q4", "v1")
        assert hub.unknown == []


def test_cli_push_fused_with_env_endpoint_and_token(exports, tmp_path):
    """`qwha-export push` in a fresh process: HF_ENDPOINT and HF_TOKEN from the environment, the client's default
    upload pipeline (Xet installed; the endpoint answers every file 'regular'), --private; the token never shows."""
    folder = _copy(exports, "fused", tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_XET", "HUGGING_FACE_HUB_TOKEN")}
    with LocalHub(lfs_policy="regular") as hub:
        env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0")
        env["HF_HOME"] = str(tmp_path / "hf-home")
        cmd = [sys.executable, "-m", "qwha_export.cli", "push", str(folder), "--repo-id", "me/tiny-fused"]
        r = subprocess.run([*cmd, "--private", "--quiet"], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert TOKEN not in r.stdout + r.stderr
        local = _local_files(folder)
        assert "wrote model card" in r.stdout and f"pushed {len(local)} files to me/tiny-fused (main)" in r.stdout
        assert hub.unknown == [] and hub.repos["me/tiny-fused"].private
        local = _local_files(folder)
        assert {k: v for k, v in hub.files("me/tiny-fused").items() if k != ".gitattributes"} == local
        calls = [q for q in hub.requests if q["path"] != "/api/agent-harnesses"]  # public, unauthenticated
        assert {q["path"] for q in calls} >= {"/api/repos/create", "/api/models/me/tiny-fused/commit/main"}
        assert all(q["auth"] == f"Bearer {TOKEN}" for q in calls)
        assert not any(".git/info/lfs" in q["path"] for q in hub.requests)
    meta, body = _card(local["README.md"].decode())
    assert "library_name" not in meta and {"qwha", "qwha-fused", "gptq", "int4"} <= set(meta["tags"])
    assert "base_model" not in meta  # local base path and no --base-model-id: omitted, with a warning
    assert "--base-model-id" in r.stderr and "load_fused" in body


def test_failed_push_does_not_echo_the_token(exports, tmp_path, online):
    """A server that refuses the commit and echoes the Authorization header: exit code 1, one line, no token."""
    folder = _copy(exports, "fused", tmp_path)
    with LocalHub(lfs_policy="regular") as hub:
        hub.fail_commits = True
        r = CliRunner().invoke(
            main, ["push", str(folder), "--repo-id", "me/x", "--token", TOKEN, "--quiet"], env={"HF_ENDPOINT": hub.url}
        )
        assert r.exit_code == 1, r.output
        assert any(q["auth"] == f"Bearer {TOKEN}" and q["path"].endswith("/commit/main") for q in hub.requests)
    assert TOKEN not in r.output and TOKEN not in (r.stderr or "")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: push to me/x failed") and "403" in lines[0]


def _truncate(path: Path, n: int = 10) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-n])


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


BAD_FOLDERS = {
    "missing shard": ("gptq", lambda d: (d / "model-00002-of-00003.safetensors").unlink(), "00002-of-00003"),
    "truncated shard": ("gptq", lambda d: _truncate(d / "model-00001-of-00003.safetensors"), "truncated"),
    "index total_size": (
        "gptq",
        lambda d: _edit_json(
            d / "model.safetensors.index.json",
            lambda x: x["metadata"].update(total_size=x["metadata"]["total_size"] + 4),
        ),
        "total_size",
    ),
    "missing manifest": ("gptq", lambda d: (d / "qwha_export.json").unlink(), "qwha_export.json"),
    "manifest not JSON": ("gptq", lambda d: (d / "qwha_export.json").write_text("{"), "not valid JSON"),
    "missing config": ("fused", lambda d: (d / "config.json").unlink(), "config.json is missing"),
    "missing listed aux file": ("fused", lambda d: (d / "generation_config.json").unlink(), "generation_config.json"),
    "listed sha256 differs": (
        "fused",
        lambda d: _edit_json(
            d / "qwha_export.json",
            lambda m: m["files"].update(
                checksums={"config.json": {"size": (d / "config.json").stat().st_size, "sha256": "0" * 64}}
            ),
        ),
        "SHA-256",
    ),
    "leftover temporary file": ("fused", lambda d: (d / ".model-part-00001.safetensors.tmp").write_bytes(b"x"), "tmp"),
    "missing external data": ("onnx", lambda d: (d / "model.onnx.data").unlink(), "external data file"),
    "truncated external data": ("onnx", lambda d: _truncate(d / "model.onnx.data"), "truncated"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_bad_folder_is_refused_before_any_request(exports, tmp_path, online, case):
    name, breaker, expected = BAD_FOLDERS[case]
    folder = _copy(exports, name, tmp_path)
    validate_push_folder(folder)  # intact copy passes
    breaker(folder)
    with LocalHub() as hub:
        r = CliRunner().invoke(
            main, ["push", str(folder), "--repo-id", "me/x", "--quiet"], env={"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN}
        )
        assert hub.requests == []
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and expected in lines[0], lines
    assert not (folder / "README.md").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--revision", "a" * 40], "commit hash"),
        (["--revision", "dev", "--create-pr"], "pull request"),
        (["--base-model-id", "/tmp/local/model"], "not a Hub id"),
    ],
)
def test_bad_arguments_are_refused_before_any_request(exports, tmp_path, online, args, expected):
    folder = _copy(exports, "fused", tmp_path)
    with LocalHub() as hub:
        r = CliRunner().invoke(main, ["push", str(folder), "--repo-id", "me/x", *args], env={"HF_ENDPOINT": hub.url})
        assert hub.requests == []
    assert r.exit_code == 2 and expected in r.stderr, r.output


def test_offline_mode_is_refused_before_any_request(exports, tmp_path, online):
    online.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with LocalHub() as hub, pytest.raises(ValueError, match="offline"):
        push_folder(_copy(exports, "fused", tmp_path), "me/x", endpoint=hub.url)
    assert hub.requests == []


def test_onnx_folder_card(exports, tmp_path, online):
    """An ONNX folder with its external data passes validation; its card targets onnxruntime."""
    folder = _copy(exports, "onnx", tmp_path)
    online.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    with LocalHub() as hub:
        result = push_folder(folder, "me/tiny-onnx", endpoint=hub.url, base_model_id="org/tiny-base", quiet=True)
        assert hub.unknown == [] and {"model.onnx", "model.onnx.data"} <= set(result["files"])
        assert {k: v for k, v in hub.files("me/tiny-onnx").items() if k != ".gitattributes"} == _local_files(folder)
        assert len(hub.lfs_puts) == 2  # model.onnx and its external data went through LFS
    meta, body = _card((folder / "README.md").read_text())
    assert meta["library_name"] == "onnxruntime" and {"onnx", "int4", "qwha"} <= set(meta["tags"])
    assert "qwha-export generate tiny-onnx --prompt" in body and "ort.InferenceSession" in body


def test_base_model_resolution(exports, tmp_path):
    """Hub id from the config's _name_or_path; the embedded SmolLM2 folder maps to its Hub id and license."""
    from qwha_export.formats.manifest import Source, read_manifest
    from qwha_export.models import default_cache_dir

    real = read_manifest(exports["gptq"])

    def based_on(path) -> object:
        return real.replace(source=Source(base_model=str(path)))

    hub_id, license_, warnings = resolve_base_model(tmp_path, based_on(default_cache_dir()))
    assert (hub_id, license_, warnings) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", [])
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"_name_or_path": "acme/llama-7b", "license": "llama2"}))
    assert resolve_base_model(tmp_path, based_on(base))[:2] == ("acme/llama-7b", "llama2")
    assert resolve_base_model(tmp_path, based_on(base), "org/other")[0] == "org/other"
    hub_id, license_, warnings = resolve_base_model(tmp_path, based_on(tmp_path / "nope"))
    assert hub_id is None and license_ is None and "--base-model-id" in warnings[0]
    # the real manifest: the tiny base is a local folder with no Hub id; its license comes from its card
    hub_id, license_, warnings = resolve_base_model(exports["gptq"], real)
    assert hub_id is None and license_ == "mit" and "--base-model-id" in warnings[0]
