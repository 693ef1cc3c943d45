"""Memory flat in depth, command by command: every user command on a synthetic Llama-3-8B-shaped model with 2, 8
and 32 decoder blocks, each in its own process, peak RSS (the child's own ``VmHWM``) and time per command.

The model (``_synthetic_8b.write_synthetic_base``): bf16 random weights of Llama-3-8B's real shapes (hidden 4096,
MLP 14336, 32/8 heads, vocabulary 128,256, untied head), written tensor by tensor in <= 2 GB shards, plus SmolLM2's
tokenizer folder (its ids are < 128,256). The 32-block base is ~16 GB on disk; ``--work`` needs ~2.5x that.

Commands, in this order, on the outputs of the ones before (the real CLI, ``qwha_export.cli.main``):

1. ``init BASE --bits 4 --group-size 64 --rank 64 --calib-tokens 512`` (RTN 4-bit g64, AdaAlloc + refinement);
2. ``merge ADAPTER --bits 4`` with its default calibration report and parity check (``gptq_v2``);
3. ``fuse ADAPTER`` (default parity check);
4. ``verify FUSED --against ADAPTER`` (default 2,048 tokens);
5. ``export-onnx FUSED`` (default parity check).

``init`` takes ~4-5 min per 8B block on one core, so ``--init-blocks`` (default 2 8) says at which depths it runs;
at the others the adapter directory is a random one of the same layout and budget (``write_synthetic_8b``: random
4-bit codes, ``p = 64 (d_in + d_out)`` random entries per layer) and the report prints init's time extrapolated
linearly in depth from the measured depths, and its peak ratio between them.

    python benchmarks/bench_scale.py --work /big/disk/scale --blocks 2 8 32 --threads 2 --json scale.json
    python benchmarks/bench_scale.py --work /tmp/s --blocks 2 4 --dims tiny       # a smoke run in ~2 min

Goal (issue 13): every command completes on a 24 GiB machine; peak at 32 blocks <= 1.15x the peak at 2 blocks and
<= 6 GiB for every command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic_8b import LLAMA3_8B, write_synthetic_8b, write_synthetic_base  # noqa: E402

TINY = dict(hidden=256, intermediate=512, heads=4, kv_heads=2, vocab=49152)  # smoke runs of this script only
DIMS = {"8b": LLAMA3_8B, "tiny": TINY}
COMMANDS = ("init", "merge", "fuse", "verify", "export-onnx")
GIB = 1 << 30
GOAL_RATIO, GOAL_GIB = 1.15, 6.0

# runs the CLI in this fresh interpreter, then prints its own VmHWM and wall time as the last line
_WRAP = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    from qwha_export.cli import main
    sys.argv = ["qwha-export", *sys.argv[1:]]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
    print(json.dumps({"rc": code, "seconds": time.perf_counter() - t0, "hwm_kib": int(hwm)}))
    """
)


def run_command(args: list[str], log: Path, threads: int) -> dict:
    """One CLI command in its own process; ``{"rc", "seconds", "peak_gib"}`` (a failure raises with the log tail)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log, "w") as err:  # -P: started from the repository root, its kernels/ would shadow HF's kernels
        proc = subprocess.run([sys.executable, "-P", "-c", _WRAP, *args], stdout=subprocess.PIPE, stderr=err, text=True,
                              env=env, check=False)  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    res = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {"rc": proc.returncode}
    if proc.returncode != 0 or res.get("rc"):
        raise RuntimeError(f"qwha-export {' '.join(args)} failed (exit {res.get('rc')}):\n{log.read_text()[-2000:]}")
    return {"seconds": res["seconds"], "peak_gib": res["hwm_kib"] * 1024 / GIB}


def tokenizer_folder() -> Path:
    from qwha_export.models import check_embedded_available, embedded_path

    check_embedded_available("smollm2")
    return Path(embedded_path("smollm2"))


def run_depth(layers: int, args, dims: dict) -> list[dict]:
    root = args.work / f"L{layers}"
    base, adapter = root / "base", root / "adapter"
    outs = {c: root / c for c in ("merged", "fused", "onnx")}
    if not (base / "config.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        if layers in args.init_blocks:
            write_synthetic_base(base, layers, dims, tokenizer_folder())
        else:  # base + a random adapter directory of init's layout
            write_synthetic_8b(root, layers, args.rank, dims=dims, tokenizer_from=tokenizer_folder())
        print(f"[L={layers}] wrote the synthetic model in {time.perf_counter() - t0:.0f} s", flush=True)
    plan = {
        "init": ["init", str(base), "--out", str(adapter), "--bits", "4", "--group-size", "64", "--rank",
                 str(args.rank), "--calib-tokens", str(args.calib_tokens), "--quiet", "--overwrite"],
        "merge": ["merge", str(adapter), "--bits", "4", "--out", str(outs["merged"]), "--quiet", "--overwrite"],
        "fuse": ["fuse", str(adapter), "--out", str(outs["fused"]), "--overwrite"],
        "verify": ["verify", str(outs["fused"]), "--against", str(adapter), "--json"],
        "export-onnx": ["export-onnx", str(outs["fused"]), "--out", str(outs["onnx"]), "--quiet", "--overwrite"],
    }  # fmt: skip
    rows = []
    for command in args.commands:
        if command == "init" and layers not in args.init_blocks:
            continue
        res = run_command(plan[command], root / f"{command}.log", args.threads)
        rows.append({"command": command, "blocks": layers, **res})
        print(f"[L={layers}] {command}: {res['seconds']:.0f} s, peak RSS {res['peak_gib']:.2f} GiB", flush=True)
    if not args.keep:
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    return rows


def report(rows: list[dict], blocks: list[int]) -> list[str]:
    lines = [
        "| command | " + " | ".join(f"{b} blocks: s / peak GiB" for b in blocks) + " | peak ratio | goal |",
        "|---|" + "---|" * (len(blocks) + 2),
    ]
    for command in COMMANDS:
        got = {r["blocks"]: r for r in rows if r["command"] == command}
        if not got:
            continue
        cells = [f"{got[b]['seconds']:.0f} / {got[b]['peak_gib']:.2f}" if b in got else "-" for b in blocks]
        lo, hi = min(got), max(got)
        ratio = got[hi]["peak_gib"] / got[lo]["peak_gib"]
        ok = ratio <= GOAL_RATIO and max(r["peak_gib"] for r in got.values()) <= GOAL_GIB
        note = "met" if ok else "not met"
        if hi != max(blocks):  # init measured at fewer depths
            t = {b: got[b]["seconds"] for b in got}
            per_block = (t[hi] - t[lo]) / (hi - lo) if hi > lo else t[hi] / hi
            guess = t[hi] + per_block * (max(blocks) - hi)
            note += f" ({hi}/{lo} blocks; {max(blocks)} blocks extrapolated: ~{guess:.0f} s)"
        lines.append(f"| {command} | " + " | ".join(cells) + f" | {ratio:.3f} ({hi}/{lo}) | {note} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the models and outputs (kept as a cache)")
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--init-blocks", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--commands", nargs="+", choices=COMMANDS, default=list(COMMANDS))
    ap.add_argument("--dims", choices=sorted(DIMS), default="8b")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the outputs (the bases and adapters are always kept)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    blocks = sorted(set(args.blocks))
    rows: list[dict] = []
    t0 = time.perf_counter()
    for layers in blocks:
        rows += run_depth(layers, args, DIMS[args.dims])
    lines = report(rows, blocks)
    print("\n".join(lines))
    print(f"total {time.perf_counter() - t0:.0f} s, threads {args.threads}, dims {args.dims}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "table": lines, "dims": args.dims}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
