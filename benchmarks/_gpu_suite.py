"""Helpers of benchmarks/gpu_suite.sh: the ``gpu`` tests in parallel shards, their summary, the suite's report.

Compiling the Triton kernels (one variant per transform size and dtype) costs far more than running them, and it is
CPU work, so the suite runs the tests in several pytest processes on the one GPU:

* ``plan``: collect the ``gpu`` tests, group them so that every test of one transform size lands in one shard
  (the size's kernels compile once), order each shard cheap-first by an estimate of the compile cost (the kernel's
  tile size; sizes whose ``H_K`` needs a 256-wide tile cost most and run last, except the smallest size of each such
  ``K``), balance the groups over the shards and write ``shard_XX.txt`` (node ids, one a line);
* ``summary``: read the shards' JSON lines (``_pytest_jsonl``), count passed / failed / skipped / not run (a shard
  stopped by the time cap), list the failures and write ``tests.json``;
* ``report``: gather the phases' exit codes and times, the test summary and every benchmark's goals into
  ``gpu_suite.json`` and print the goals.

    python benchmarks/_gpu_suite.py plan --dir D --shards 12 tests/test_gpu_kernels.py tests/test_gpu_e2e.py
    python benchmarks/_gpu_suite.py summary --dir D --json D/tests.json
    python benchmarks/_gpu_suite.py report --results R
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_SIZE = re.compile(r"\[n(\d+)=K(\d+)x\d+")
_REAL = re.compile(r"test_spectral_real_shapes\[(\d+)->")


def collect(paths: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu", *paths]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    ids = [line.strip() for line in out.stdout.splitlines() if "::" in line]
    if out.returncode != 0 or not ids:
        sys.exit(f"collecting {paths} failed (exit {out.returncode}):\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return ids


def _plan_of(n: int) -> dict[str, int]:
    from qwha_export.kernels.triton_wht import _plan

    return _plan(n)


def group_key_and_cost(nodeid: str, smallest: dict[int, int]) -> tuple[str, float, int]:
    """``(group, estimated cost, tier)``: tests of one size share a group; tier 1 runs after every tier 0 test."""
    m = _SIZE.search(nodeid) or _REAL.search(nodeid)
    if m is None:  # end-to-end tests share module fixtures: one group per file
        return nodeid.split("::")[0], 5.0, 0
    n = int(m.group(1))
    plan = _plan_of(n)
    tile = plan["K_PAD"] * plan["P1"] * plan["P2_PAD"] * plan["BLOCK_R"]
    wide = plan["K_PAD"] >= 256
    cost = 1.0 + tile / 4096 * (8.0 if wide else 1.0)
    tier = 1 if wide and smallest.get(plan["K"]) != n else 0
    return f"n{n}", cost, tier


def plan_shards(nodeids: list[str], shards: int) -> list[list[str]]:
    sizes = [int(m.group(1)) for m in map(_SIZE.search, nodeids) if m]
    smallest: dict[int, int] = {}
    for n in sorted(set(sizes)):
        smallest.setdefault(_plan_of(n)["K"], n)
    groups: dict[str, list[str]] = defaultdict(list)
    cost: Counter = Counter()
    tier: dict[str, int] = {}
    for nid in nodeids:
        key, c, t = group_key_and_cost(nid, smallest)
        groups[key].append(nid)
        cost[key] += c
        tier[key] = t
    out: list[list[str]] = [[] for _ in range(shards)]
    load = [0.0] * shards
    for t in (0, 1):  # longest-processing-time-first within each tier; tier 1 after all of tier 0 in every shard
        chosen: dict[int, list[str]] = defaultdict(list)
        for key in sorted((k for k in groups if tier[k] == t), key=lambda k: -cost[k]):
            i = min(range(shards), key=load.__getitem__)
            load[i] += cost[key]
            chosen[i].append(key)
        for i, keys in chosen.items():
            for key in sorted(keys, key=lambda k: cost[k]):  # cheap first inside the shard
                out[i].extend(groups[key])
    return [s for s in out if s]


def read_results(folder: Path) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for path in sorted(folder.glob("shard_*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                prev = results.get(rec["nodeid"])
                if prev is None or prev["outcome"] == "passed":  # a failing teardown overrides a passed call
                    results[rec["nodeid"]] = rec
    return results


def summary(folder: Path) -> dict:
    planned = [n for p in sorted(folder.glob("shard_*.txt")) for n in p.read_text().split()]
    results = read_results(folder)
    counts = Counter(results[n]["outcome"] if n in results else "not run" for n in planned)
    failures = [{"nodeid": n, "message": results[n].get("message", "")} for n in planned
                if n in results and results[n]["outcome"] == "failed"]
    skipped = sorted({results[n].get("message", "") for n in planned
                      if n in results and results[n]["outcome"] == "skipped"})
    return {"planned": len(planned), "counts": dict(counts), "failures": failures, "skip_reasons": skipped[:5],
            "not_run": [n for n in planned if n not in results],
            "seconds_per_shard": {p.stem: round(sum(json.loads(line)["seconds"] for line in p.read_text().splitlines()
                                                    if line.strip()), 1) for p in sorted(folder.glob("shard_*.jsonl"))}}


BENCHMARKS = ("bench_wht", "bench_layer", "bench_train_step")
_FINDER = """# written by benchmarks/gpu_suite.sh: import qwha_export from {root} (as an editable install does)
import importlib.util
import sys

_MAP = {mapping!r}


class _QwhaExportSuiteFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        where = _MAP.get(name)
        if where is None:
            return None
        return importlib.util.spec_from_file_location(name, where + "/__init__.py", submodule_search_locations=[where])


if not any(getattr(f, "__name__", "") == "_QwhaExportSuiteFinder" for f in sys.meta_path):
    sys.meta_path.insert(0, _QwhaExportSuiteFinder)
"""


def link_package(root: Path) -> list[Path]:
    """Make ``qwha_export`` importable from ``root`` without pip: a meta-path finder module and the ``.pth`` that
    imports it, in the first writable site-packages folder (user site as the last resort). Returns both paths."""
    import site

    mapping = {"qwha_export": str(root / "qwha_export")}
    mapping.update({f"qwha_export.{sub}": str(root / sub) for sub in ("kernels", "converters", "formats")})
    candidates = list(site.getsitepackages()) + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    for folder in map(Path, candidates):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            finder = folder / "_qwha_export_suite_finder.py"
            finder.write_text(_FINDER.format(root=root, mapping=mapping))
            pth = folder / "_qwha_export_suite.pth"
            pth.write_text("import _qwha_export_suite_finder\n")
            return [finder, pth]
        except OSError:
            continue
    sys.exit(f"no writable site-packages folder among {candidates}")


def report(results: Path) -> dict:
    """``gpu_suite.json``: phases (``phases.tsv``: name, exit code, seconds, note), tests, benchmark goals."""
    phases = []
    tsv = results / "phases.tsv"
    for line in tsv.read_text().splitlines() if tsv.is_file() else []:
        name, rc, seconds, note = (line.split("\t") + [""] * 4)[:4]
        phases.append({"phase": name, "exit": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": int(seconds),
                       "note": note})
    out: dict = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "phases": phases}
    tests = results / "tests" / "tests.json"
    out["tests"] = json.loads(tests.read_text()) if tests.is_file() else None
    out["goals"], out["environment"] = [], None
    for name in BENCHMARKS:
        path = results / f"{name}.json"
        if not path.is_file():
            out["goals"].append({"goal": f"{name}: no results", "value": None, "met": None, "detail": "did not run"})
            continue
        data = json.loads(path.read_text())
        out["environment"] = out["environment"] or data.get("environment")
        out["goals"] += data.get("goals", [])
        if not data.get("complete", True):
            out["goals"].append({"goal": f"{name}: partial results", "value": None, "met": None,
                                 "detail": "stopped before the end (time cap or error); the goals above use what ran"})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="collect the gpu tests and write the shard files")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("paths", nargs="+")
    s = sub.add_parser("summary", help="summarise the shards' results")
    s.add_argument("--dir", type=Path, required=True)
    s.add_argument("--json", type=Path, default=None)
    r = sub.add_parser("report", help="write gpu_suite.json from the phases, tests and benchmark results")
    r.add_argument("--results", type=Path, required=True)
    lk = sub.add_parser("link-package", help="make qwha_export importable from this checkout without pip")
    for q in (p, s, r, lk):
        q.add_argument("--dry-run", action="store_true", help="check the arguments only")
    args = ap.parse_args(argv)
    if args.command == "plan" and args.shards < 1:
        ap.error(f"--shards must be positive, got {args.shards}")
    if args.dry_run:
        print(f"_gpu_suite {args.command} --dry-run: arguments OK")
        return
    if args.command == "plan":
        args.dir.mkdir(parents=True, exist_ok=True)
        shards = plan_shards(collect(args.paths), args.shards)
        for i, ids in enumerate(shards):
            (args.dir / f"shard_{i:02d}.txt").write_text("\n".join(ids) + "\n")
        print(f"{sum(map(len, shards))} gpu tests in {len(shards)} shards: {[len(s) for s in shards]}")
        return
    if args.command == "link-package":
        print(" ".join(str(f) for f in link_package(REPO)))
        return
    if args.command == "report":
        out = report(args.results)
        (args.results / "gpu_suite.json").write_text(json.dumps(out, indent=2))
        env = out["environment"] or {}
        print(f"GPU suite {out['date']}: {env.get('gpu', '?')}, torch {env.get('torch', '?')}, "
              f"triton {env.get('triton', '?')}")
        for ph in out["phases"]:
            print(f"  phase {ph['phase']:<18} exit {ph['exit']!s:>4} {ph['seconds']:>5} s  {ph['note']}")
        t = out["tests"]
        if t:
            c = t["counts"]
            print(f"  gpu tests: {c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('skipped', 0)} "
                  f"skipped, {c.get('not run', 0)} not run, of {t['planned']}")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _report import print_goals

        print_goals([g for g in out["goals"] if "target" in g])
        for g in out["goals"]:
            if "target" not in g:
                print(f"GOAL {g['goal']} ({g['detail']})")
        print(f"wrote {args.results / 'gpu_suite.json'}")
        return
    result = summary(args.dir)
    c = result["counts"]
    print(f"gpu tests: {result['planned']} planned, {c.get('passed', 0)} passed, {c.get('failed', 0)} failed, "
          f"{c.get('skipped', 0)} skipped, {c.get('not run', 0)} not run (time cap)")
    for f in result["failures"]:
        print(f"FAILED {f['nodeid']}\n    " + f["message"].replace("\n", "\n    ")[:600])
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
