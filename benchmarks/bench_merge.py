"""Merge throughput (MB/s of weights) and peak RSS, side by side in one run: our streaming merge against the
in-memory approach (load everything, merge, save).

* **streamed**: :func:`qwha_export.converters.merge.stream_merge` exactly as ``qwha-export merge`` runs it without
  calibration (``merge_qwha`` with ``calib_tokens=0``): base checkpoint read tensor by tensor, one layer merged at a
  time, output shards written as they fill (2 GB, held in memory until written: column 'shard buf'), base-hash
  check and manifest hashes included (column 'hash s': the part of the time spent in SHA-256).
* **in-memory**: the naive script, written here with the same math: ``load_file`` every base shard, the whole
  ``quantized_base.safetensors`` and the adapter (:func:`read_adapter_spectra`), then for every quantized layer
  :func:`merged_weight` + :func:`requantize` (or the cast) and the format's layer writer, replacing the layer's
  base weight in the state dict, then ``huggingface_hub.save_torch_state_dict`` (what ``save_pretrained`` uses;
  2 GB shards). No hashing, no validation beyond the reader's.

Memory. Each run is its own subprocess (this script with ``--worker``): 'peak RSS' is the child's ``VmHWM`` (the
kernel's high-water mark of its resident anonymous + mapped-file pages since ``exec``; 'start RSS' is the
interpreter with torch imported). 'peak anon' / 'peak file' are the largest ``RssAnon`` / ``RssFile`` seen by a 10
ms poller in the child (a sample can miss a short spike; ``VmHWM`` cannot). safetensors (0.8) maps each file it
opens and returns tensors backed by that mapping: a page becomes resident when read and stays resident (counted in
RSS) while the handle is open or any tensor read through it is alive. So ``load_file`` does not read the base
projections themselves (neither approach needs them: the merge starts from the quantized base); what the in-memory
approach holds is the quantized base, the spectra, every output tensor and the pass-through tensors (embeddings,
norms, lm_head) once written.

Throughput. 'weight MB' = bytes of the base checkpoint's tensors (the input); MB/s = weight MB / seconds (measured
inside the child, from the call to the end of the write, imports excluded). After each pair the two outputs are
compared tensor by tensor (``torch.equal``): both approaches must write the same checkpoint ('same output').

Cases:

* ``smollm2``: SmolLM2-135M-Instruct (float32 checkpoint) with an adapter from ``init_qwha`` (4-bit g64 RTN base,
  rank 16, 1,024 calibration tokens in 256-token rows; ~70 s; or ``--smollm2-adapter DIR``), merged to 4-bit
  ``gptq_v2`` (RTN) and to float16 dense.
* ``8b``: a synthetic Llama-3-8B-shaped model (hidden 4096, intermediate 14336, 32 heads / 8 KV heads, vocab 128256,
  untied lm_head, bfloat16) at the decoder-block counts of ``--layers`` (default 2 and 4), written by this script
  into a temporary folder under ``--tmp`` (removed at the end): random bf16 weights in <= 2 GB shards + index, a
  random 4-bit g64 quantized base of all 7 projections (:meth:`QuantizedWeight.to_dict` layout), random sparse
  spectra with budget ``p = r (d_in + d_out)`` (``--rank`` 64) in the peft adapter layout
  (``base_model.model.<layer>.qwha_spectrum`` float32 / ``qwha_indices`` int64 ``(2, p)`` / ``qwha_shape``),
  ``adapter_config.json`` and ``qwha_base.json`` with the base hash. Every file is written tensor by tensor (header
  first, then the data as it is generated), so the generator holds one tensor at a time. Target ``--target-8b``
  (default float16 dense; ``gptq_v2-4bit`` is ~3x slower on CPU, mostly the GPTQ bit packing). Peak RSS and seconds
  are extrapolated to the 32 layers of the real model (printed as extrapolation: linear through the two largest
  counts; the streamed peak is bounded, see the printout). The in-memory run is skipped, with the reason printed,
  when its estimated peak exceeds ``--max-in-memory-gib`` (18).

Timings on a shared 2-core machine are noisy (runs are sequential, not interleaved); memory numbers are not.

    python benchmarks/bench_merge.py [--quick] [--threads 1] [--layers 2 4] [--in-memory-layers 2 4]
        [--target-8b dense-fp16|gptq_v2-4bit] [--skip-8b] [--skip-smollm2] [--skip-in-memory] [--smollm2-adapter DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from qwha_export.converters.merge import merged_weight, read_adapter_spectra, stream_merge
from qwha_export.converters.quantize import QuantizedWeight
from qwha_export.converters.quantizers import requantize
from qwha_export.formats import ExportFormat, get_writer
from qwha_export.formats.dense import DenseFormat
from qwha_export.formats.shards import DEFAULT_MAX_SHARD_BYTES, checkpoint_files, validate_safetensors_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic_8b import LLAMA3_8B, full_8b_bytes, write_synthetic_8b  # noqa: E402

MB = 1e6
TARGETS = {  # name -> (bits, format, dtype, requant)
    "gptq_v2-4bit": (4, "gptq_v2", "float16", "rtn"),
    "dense-fp16": (16, "dense", "float16", "rtn"),
}


# ----------------------------------------------------------------------------------------------------------------------
# worker side: one merge per process


def _status_mib(*fields: str) -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key = line.split(":", 1)[0]
            if key in fields:
                out[key] = int(line.split()[1]) / 1024.0
    return out


class RssPoller(threading.Thread):
    """Largest ``RssAnon`` and ``RssFile`` (mapped file pages) of this process, sampled every ``period`` seconds."""

    def __init__(self, period: float = 0.01):
        super().__init__(daemon=True)
        self.period, self.peak, self._halt = period, {"RssAnon": 0.0, "RssFile": 0.0}, threading.Event()

    def sample(self) -> None:
        for k, v in _status_mib("RssAnon", "RssFile").items():
            self.peak[k] = max(self.peak[k], v)

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.period)

    def stop(self) -> dict[str, float]:
        self._halt.set()
        self.join()
        self.sample()
        return self.peak


def in_memory_merge(adapter_dir: Path, out: Path, bits: int, fmt: str, dtype: str, requant: str) -> None:
    """The naive merge: everything in memory, same per-layer math and writers as :func:`stream_merge`."""
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file

    meta = json.loads((adapter_dir / "qwha_base.json").read_text())
    base_dir = Path(meta["base_model"])
    files, _ = checkpoint_files(base_dir)
    sd: dict[str, torch.Tensor] = {}
    for p in files:
        sd.update(load_file(str(p)))
    qsd = load_file(str(adapter_dir / "quantized_base.safetensors"))
    spectra = read_adapter_spectra(adapter_dir)
    quantized = set(meta["quantized_layers"])
    fmt_e, torch_dtype = ExportFormat.parse(fmt), getattr(torch, dtype)
    writer = get_writer(fmt_e)
    qconfig = None
    for layer in sorted(quantized | set(spectra)):
        w = sd.pop(f"{layer}.weight")
        qw = None
        if layer in quantized:
            fields = ("codes", "scales", "zeros", "bits", "group_size", "g_idx")
            qw = QuantizedWeight.from_dict({f"{layer}.{k}": qsd[f"{layer}.{k}"] for k in fields
                                            if f"{layer}.{k}" in qsd}, prefix=f"{layer}.")
        if layer in spectra:
            values, rows, cols, scale = spectra[layer]
            w_ref = merged_weight(qw if qw is not None else w, values, rows, cols, scale)
        else:
            w_ref = qw.dequantize(torch.float64)
        del w
        if bits == 16:
            sd[f"{layer}.weight"] = w_ref.to(torch_dtype).contiguous()
            continue
        keep = layer not in spectra and qw is not None and (requant == "grid" or bits == qw.bits)
        q = qw if keep else requantize(w_ref, requant, bits, None, qw)
        del w_ref
        if fmt_e == ExportFormat.DENSE:
            sd.update(writer.write_layer(q, prefix=layer, dtype=torch_dtype))
        else:
            sd.update(writer.write_layer(q, prefix=layer))
            qconfig = writer.quantization_config(q.bits, q.group_size, desc_act=False)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir()
    save_torch_state_dict(sd, str(tmp), max_shard_size=DEFAULT_MAX_SHARD_BYTES)
    DenseFormat.write_config(tmp, base_dir, quantization_config=qconfig,
                             dtype=torch_dtype if fmt_e == ExportFormat.DENSE else None)
    DenseFormat.copy_aux_files(base_dir, tmp)
    tmp.rename(out)


def worker(spec: dict) -> None:
    import qwha_export.formats.shards as shards_mod
    import qwha_export.pipeline  # noqa: F401 - the modules that import sha256_file by name

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    hash_s = [0.0]
    orig = shards_mod.sha256_file

    def timed_sha(path):
        t = time.perf_counter()
        try:
            return orig(path)
        finally:
            hash_s[0] += time.perf_counter() - t

    for name, mod in list(sys.modules.items()):  # time the SHA-256 part of the streamed run
        if name.startswith("qwha_export") and getattr(mod, "sha256_file", None) is orig:
            mod.sha256_file = timed_sha
    shard_buf = [0]
    real_add = shards_mod.ShardWriter.add

    def add(self, name, tensor):  # largest amount of tensor data the shard writer held at once
        real_add(self, name, tensor)
        shard_buf[0] = max(shard_buf[0], self.buffered_bytes)

    shards_mod.ShardWriter.add = add
    start = _status_mib("VmRSS")["VmRSS"]
    poller = RssPoller()
    poller.start()
    t0 = time.perf_counter()
    bits, fmt, dtype, requant = TARGETS[spec["target"]]
    adapter_dir, out = Path(spec["adapter_dir"]), Path(spec["out"])
    if spec["approach"] == "streamed":
        stream_merge(adapter_dir, out, bits=bits, group_size=None, requant=requant, fmt=fmt, dtype=dtype)
    else:
        in_memory_merge(adapter_dir, out, bits, fmt, dtype, requant)
    seconds = time.perf_counter() - t0
    peak = poller.stop()
    print(json.dumps({"seconds": seconds, "hash_s": hash_s[0], "start_mib": start, "peak_anon_mib": peak["RssAnon"],
                      "peak_file_mib": peak["RssFile"], "shard_buf_mb": shard_buf[0] / MB,
                      "hwm_mib": _status_mib("VmHWM")["VmHWM"]}), flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# parent side


def run_worker(spec: dict, log: Path) -> dict:
    """Run one merge in a fresh subprocess; its peak RSS is the child's own ``VmHWM`` (not ``ru_maxrss``, which
    Linux carries over ``exec`` from the forked copy of this process)."""
    with open(log, "w") as err:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                              stderr=err, text=True, check=False)
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{spec['approach']} worker failed (exit {proc.returncode}):\n{tail}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["peak_mib"] = res["hwm_mib"]
    return res


def checkpoint_bytes(model_dir: Path) -> int:
    files, _ = checkpoint_files(model_dir)
    total = 0
    for p in files:
        for k, v in validate_safetensors_file(p).items():
            if k != "__metadata__":
                total += v["data_offsets"][1] - v["data_offsets"][0]
    return total


def same_checkpoint(a: Path, b: Path) -> tuple[int, int]:
    """``(tensors, differing)`` between two HF checkpoint folders (names must match)."""
    from safetensors import safe_open

    def where(d: Path) -> dict[str, Path]:
        files, _ = checkpoint_files(d)
        return {k: p for p in files for k in validate_safetensors_file(p) if k != "__metadata__"}

    wa, wb = where(a), where(b)
    if set(wa) != set(wb):
        return len(wa), len(set(wa) ^ set(wb))
    differing = 0
    for name in sorted(wa):
        with safe_open(str(wa[name]), "pt") as fa, safe_open(str(wb[name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            differing += int(x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y))
    return len(wa), differing



# -- cases ------------------------------------------------------------------------------------------------------------


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def run_pair(model: str, layers: int, target: str, adapter_dir: Path, tmp: Path, args, skip_reason: str | None):
    """Streamed then in-memory (unless skipped) on one adapter dir; rows for the table; outputs compared."""
    meta = json.loads((adapter_dir / "qwha_base.json").read_text())
    weight_mb = checkpoint_bytes(Path(meta["base_model"])) / MB
    rows = []
    outs = {}
    for approach in ("streamed", "in-memory"):
        row = {"model": model, "target": target, "approach": approach, "layers": layers, "weight_mb": weight_mb}
        if approach == "in-memory" and (skip_reason or args.skip_in_memory):
            skip_reason = skip_reason or "--skip-in-memory"
            row["skipped"] = skip_reason
            print(f"  [{model} {target} L={layers}] in-memory skipped: {skip_reason}", flush=True)
            rows.append(row)
            continue
        out = tmp / f"out-{approach}"
        spec = {"approach": approach, "target": target, "adapter_dir": str(adapter_dir), "out": str(out),
                "threads": args.threads}
        res = run_worker(spec, tmp / f"{approach}.log")
        row.update(res, out_mb=dir_bytes(out) / MB)
        outs[approach] = out
        print(f"  [{model} {target} L={layers}] {approach}: {res['seconds']:.1f} s, peak RSS "
              f"{res['peak_mib']:.0f} MiB (anon {res['peak_anon_mib']:.0f}, file {res['peak_file_mib']:.0f}, "
              f"start {res['start_mib']:.0f})", flush=True)
        rows.append(row)
    if len(outs) == 2:
        n, bad = same_checkpoint(outs["streamed"], outs["in-memory"])
        for r in rows:
            r["same"] = f"{n - bad}/{n}"
        print(f"  outputs: {n - bad}/{n} tensors identical", flush=True)
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    return rows


def in_memory_estimate_gib(adapter_dir: Path) -> float:
    """Base + quantized base + adapter file bytes + one 14336x4096 float64 layer x4 + 0.5 GB interpreter."""
    meta = json.loads((adapter_dir / "qwha_base.json").read_text())
    files = checkpoint_bytes(Path(meta["base_model"]))
    files += (adapter_dir / "quantized_base.safetensors").stat().st_size
    files += (adapter_dir / "adapter_model.safetensors").stat().st_size
    return (files + 4 * 8 * LLAMA3_8B["hidden"] * LLAMA3_8B["intermediate"] + 0.5e9) / 2**30


def case_8b(args, tmp_root: Path) -> list[dict]:
    rows = []
    for layers in sorted(set(args.layers)):
        root = Path(tempfile.mkdtemp(prefix=f"synth8b-L{layers}-", dir=tmp_root))
        t0 = time.perf_counter()
        adir = write_synthetic_8b(root, layers, args.rank)
        print(f"[8b] wrote the synthetic {layers}-layer model ({dir_bytes(root) / 1e9:.1f} GB) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        est = in_memory_estimate_gib(adir)
        reason = None
        if est > args.max_in_memory_gib:
            reason = f"estimated peak {est:.1f} GiB > {args.max_in_memory_gib} GiB"
        elif args.in_memory_layers is not None and layers not in args.in_memory_layers:
            reason = "not in --in-memory-layers"
        rows += run_pair("8B-shaped", layers, args.target_8b, adir, root, args, reason)
        shutil.rmtree(root, ignore_errors=True)
    return rows


def case_smollm2(args, tmp_root: Path) -> list[dict]:
    from qwha_export.converters.quantize import QuantConfig
    from qwha_export.converters.qwha_init import InitConfig
    from qwha_export.initialise import InitJob, init_qwha

    root = Path(tempfile.mkdtemp(prefix="smollm2-", dir=tmp_root))
    adir = Path(args.smollm2_adapter) if args.smollm2_adapter else root / "adapter"
    if not args.smollm2_adapter:
        t0 = time.perf_counter()
        init_qwha(InitJob(model="smollm2", out=str(adir), quant=QuantConfig(bits=4, group_size=64),
                          init=InitConfig(rank=16), calib_tokens=1024, heldout_tokens=256, seq_len=256,
                          quiet=True))
        print(f"[smollm2] adapter from init_qwha in {time.perf_counter() - t0:.0f} s", flush=True)
    n_layers = json.loads((Path(json.loads((adir / "qwha_base.json").read_text())["base_model"]) /
                           "config.json").read_text())["num_hidden_layers"]
    rows = []
    for target in (["gptq_v2-4bit"] if args.quick else list(TARGETS)):
        rows += run_pair("SmolLM2-135M", n_layers, target, adir, root, args, None)
    shutil.rmtree(root, ignore_errors=True)
    return rows


# -- report -----------------------------------------------------------------------------------------------------------


def mb(mib: float) -> float:
    return mib * 2**20 / MB


def table(rows: list[dict]) -> list[str]:
    head = ("| model | target | approach | layers | weight MB | seconds | MB/s | hash s | peak RSS MB | peak anon MB "
            "| peak file MB | shard buf MB | start RSS MB | same output |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        first = f"| {r['model']} | {r['target']} | {r['approach']} | {r['layers']} | {r['weight_mb']:.0f} "
        if "skipped" in r:
            lines.append(first + f"| skipped: {r['skipped']} |" + " |" * 8)
            continue
        buf = f"{r['shard_buf_mb']:.0f}" if r["approach"] == "streamed" else "-"
        lines.append(
            first + f"| {r['seconds']:.1f} | {r['weight_mb'] / r['seconds']:.0f} | {r['hash_s']:.1f} "
            f"| {mb(r['peak_mib']):.0f} | {mb(r['peak_anon_mib']):.0f} | {mb(r['peak_file_mib']):.0f} | {buf} "
            f"| {mb(r['start_mib']):.0f} | {r.get('same', '')} |")
    return lines


def ratios(rows: list[dict]) -> list[str]:
    out = []
    done = {(r["model"], r["target"], r["layers"], r["approach"]): r for r in rows if "skipped" not in r}
    for (m, t, layers, a), s in done.items():
        i = done.get((m, t, layers, "in-memory"))
        if a != "streamed" or i is None:
            continue
        out.append(f"{m} {t} L={layers}: streamed/in-memory time {s['seconds'] / i['seconds']:.2f}x, "
                   f"peak RSS {s['peak_mib'] / i['peak_mib']:.2f}x")
    return out


def extrapolation(rows: list[dict], args) -> list[str]:
    pts: dict[str, list[dict]] = {}
    for r in rows:
        if r["model"] == "8B-shaped" and "skipped" not in r:
            pts.setdefault(r["approach"], []).append(r)
    full = LLAMA3_8B["full_layers"]
    out = [f"EXTRAPOLATION to the {full} layers of Llama-3-8B (not measured):"]
    for approach, rs in pts.items():
        rs = sorted(rs, key=lambda r: r["layers"])
        series = ", ".join(f"L={r['layers']}: {mb(r['peak_mib']) / 1e3:.2f} GB" for r in rs)
        if len(rs) < 2:
            out.append(f"  {approach}: peak RSS {series} (one point, no fit)")
            continue
        a, b = rs[-2:]
        n = b["layers"] - a["layers"]
        rss_per = (b["peak_mib"] - a["peak_mib"]) / n
        rss = b["peak_mib"] + rss_per * (full - b["layers"])
        sec = b["seconds"] + (b["seconds"] - a["seconds"]) / n * (full - b["layers"])
        line = (f"  {approach}: peak RSS {series}; linear through the last two: {mb(rss_per):+.0f} MB per layer -> "
                f"~{mb(rss) / 1e3:.1f} GB at {full} layers; time ~{sec / 60:.0f} min")
        if approach == "streamed":
            bufs = ", ".join(f"{r['shard_buf_mb']:.0f}" for r in rs)
            line += (f"\n    (streamed is bounded, not linear: one layer's float64 work + the output shard being "
                     f"filled, at most {DEFAULT_MAX_SHARD_BYTES / 1e9:.0f} GB (measured "
                     f"{bufs} MB); its peak grows only until a shard "
                     f"holds merged layers alone, so the largest measured value is the estimate for {full} layers)")
        out.append(line)
    sizes = full_8b_bytes(args.rank, full)
    out.append(f"  files of the full {full}-layer model: base {sizes['base'] / 1e9:.1f} GB bf16, quantized base "
               f"{sizes['quantized'] / 1e9:.1f} GB (uint8 codes), adapter {sizes['adapter'] / 1e9:.1f} GB "
               f"(rank {args.rank})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=None,
                    help="8B-shaped: decoder-block counts to build and merge (default 2 4; --quick 1 2)")
    ap.add_argument("--in-memory-layers", type=int, nargs="+", default=None,
                    help="8B-shaped: run the in-memory approach only at these block counts (default: all)")
    ap.add_argument("--rank", type=int, default=64, help="8B-shaped: spectrum budget p = rank (d_in + d_out)")
    ap.add_argument("--target-8b", choices=list(TARGETS), default="dense-fp16")
    ap.add_argument("--max-in-memory-gib", type=float, default=18.0)
    ap.add_argument("--quick", action="store_true", help="8B-shaped at 1 and 2 layers; SmolLM2 4-bit only")
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--skip-in-memory", action="store_true", help="streamed runs only")
    ap.add_argument("--smollm2-adapter", default=None, help="reuse this SmolLM2 adapter directory (skip init)")
    ap.add_argument("--tmp", default="/tmp", help="where the temporary models and outputs are written")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads here and in the workers (1 gives steadier numbers on a loaded machine)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    args.layers = args.layers or ([1, 2] if args.quick else [2, 4])
    if min(args.layers) < 1:
        raise SystemExit("--layers must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}, cpus {os.cpu_count()}",
          flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_merge_", dir=args.tmp) as tmp:
        if not args.skip_smollm2:
            rows += case_smollm2(args, Path(tmp))
        if not args.skip_8b:
            rows += case_8b(args, Path(tmp))
    print()
    print("\n".join(table(rows)))
    print("MB = 1e6 bytes; weight MB = base checkpoint tensor bytes; peak RSS = child's VmHWM; peak anon / file = "
          "largest RssAnon / RssFile (10 ms poll); shard buf = most tensor bytes the shard writer held; start RSS = "
          "after imports")
    print("\n".join(ratios(rows)))
    if not args.skip_8b:
        print("\n".join(extrapolation(rows, args)))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
