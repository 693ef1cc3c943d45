"""The main job end to end on the real SmolLM2-135M (reduced token and step counts; the full demo is the README's
main command). Checks every stage ran, parity of each export, a generated answer, and pushable folders."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def _push_every_folder(folders, tmp_path, online) -> None:
    """`qwha-export push` of each folder the demo wrote reaches the local Hub endpoint with a valid card."""
    import re
    import shutil
    from pathlib import Path

    import yaml
    from click.testing import CliRunner
    from hub_server import LocalHub

    from qwha_export.cli import main

    relation = {"merged-int4": "quantized", "fused": "adapter", "onnx-merged": "quantized", "onnx-fused": "adapter"}
    with LocalHub(lfs_policy="regular") as hub:
        for src in map(Path, folders):
            folder = tmp_path / "push" / src.name
            shutil.copytree(src, folder)
            env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_demoTestToken0123456789", "HF_HOME": str(tmp_path / "hf")}
            r = CliRunner().invoke(main, ["push", str(folder), "--repo-id", f"me/{src.name}", "--quiet"], env=env)
            assert r.exit_code == 0, r.output
            local = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
            assert {k: v for k, v in hub.files(f"me/{src.name}").items() if k != ".gitattributes"} == local
            meta = yaml.safe_load(re.match(r"^---\n(.*?)\n---\n", local["README.md"].decode(), re.S).group(1))
            assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
            assert meta["base_model_relation"] == relation[src.name] and "qwha" in meta["tags"]
        assert hub.unknown == []


def test_demo_end_to_end(smollm2_dir, tmp_path, online):
    from qwha_export.demo import DEMO_REPORT, DemoConfig, format_table, run_demo
    from qwha_export.hub import validate_push_folder

    out = tmp_path / "demo"
    cfg = DemoConfig(
        out=str(out), calib_tokens=512, train_steps=2, train_max_len=128, eval_tokens=256, max_new_tokens=8, quiet=True
    )
    report = run_demo(cfg)
    saved = json.loads((out / DEMO_REPORT).read_text())
    assert saved["stages"] == report["stages"]
    stages = {row["stage"].split(" ")[0]: row for row in report["stages"]}
    assert {"full", "quantize", "fine-tune", "merge", "fuse", "export", "generate"} <= set(stages)
    rows = {row["stage"]: row for row in report["stages"]}
    fused = next(r for name, r in rows.items() if name.startswith("fuse"))
    assert fused["top1_agreement"] >= 0.999 and fused["kl_per_token"] < 1e-6
    onnx_rows = [r for name, r in rows.items() if name.startswith("export ONNX")]
    assert len(onnx_rows) == 2
    for r in onnx_rows:
        assert r["tokens"] >= 250 and r["size_mb"] > 0
    onnx_fused = next(r for name, r in rows.items() if name == "export ONNX (fused)")
    assert onnx_fused["top1_agreement"] >= 0.99, onnx_fused
    merged = next(r for name, r in rows.items() if name.startswith("merge"))
    assert 0.5 < merged["top1_agreement"] <= 1.0
    assert isinstance(report["answer"], str) and report["answer"].strip()
    assert len(report["pushable"]) == 4
    for folder in report["pushable"]:
        validate_push_folder(folder)
    _push_every_folder(report["pushable"], tmp_path, online)
    table = format_table(report)
    assert "answer:" in table and "export ONNX (fused)" in table
    with pytest.raises(ValueError, match="already exists"):
        run_demo(cfg)
