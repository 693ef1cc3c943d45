"""Shared memory the Triton WHT kernel asks for on a Hopper GPU (H100/H200, sm_90), found without a GPU.

Runs Triton's own lowering of ``_wht_kernel`` (``ttir -> ttgir -> llir``, where the shared-memory allocation is
decided) for ``target=cuda:90`` and each size's tile plan (``triton_wht._plan``), and compares the kernel's
``shared`` bytes with the per-block limit of sm_90 (227 KiB = 232448 bytes; a launch above it fails with
``OutOfResources: shared memory``). One dtype is enough: the plan, not the input dtype, sets the tile sizes.
Costs CPU time (seconds to minutes per size: the widest tiles are the slowest to lower), so it is not part of CI;
use it to check a kernel change before GPU time is spent.

    python benchmarks/triton_sm90_resources.py [--sizes 4096 11008 ...] [--json out.json]

Uses Triton's compiler internals (tested with Triton 3.9); without CUDA nothing else is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real @triton.jit kernel, not the interpreter's

SM90_MAX_SHARED = 232448  # bytes per block, opt-in maximum of H100/H200


def shared_bytes(n: int, dtype: str = "bf16", capability: int = 90) -> dict:
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    from qwha_export.kernels import triton_wht

    plan = triton_wht._plan(n)
    const = {k: plan[k] for k in ("K", "K_PAD", "P1", "P2", "P2_PAD", "BLOCK_R")}
    sig = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "hk_ptr": "*fp32", "n_rows": "i32", "stride_x": "i32",
           "stride_y": "i32", **dict.fromkeys(const, "constexpr")}
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    src = ASTSource(fn=triton_wht._wht_kernel, signature=sig, constexprs=const)
    options = backend.parse_options({"num_warps": plan["num_warps"], **src.parse_options()})
    stages: dict = {}
    backend.add_stages(stages, options, src.language)
    ctx = ir.context()
    ir.load_dialects(ctx)
    backend.load_dialects(ctx)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(), ctx)
    metadata = {"target": target, **options.__dict__}
    t0 = time.perf_counter()
    for ext in ("ttir", "ttgir", "llir"):
        module = stages[ext](module, metadata)
    return {"n": n, **plan, "shared": metadata["shared"], "fits": metadata["shared"] <= SM90_MAX_SHARED,
            "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[576, 1536, 4096, 11008, 14336, 18944, 32768])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from qwha_export.kernels import is_supported_size

    bad = [n for n in args.sizes if not is_supported_size(n) or n > 32768]
    if bad:
        ap.error(f"--sizes: {bad[0]} is not a supported transform size K*2^m <= 32768")
    rows = []
    for n in args.sizes:
        r = shared_bytes(n)
        rows.append(r)
        print(f"n={n:>6} K={r['K']:>3} tile K_PAD={r['K_PAD']:>3} P1={r['P1']:>3} P2_PAD={r['P2_PAD']:>3} "
              f"BLOCK_R={r['BLOCK_R']:>2} warps={r['num_warps']:>2}: shared {r['shared']:>7} B "
              f"{'fits' if r['fits'] else 'EXCEEDS'} sm_90's {SM90_MAX_SHARED} ({r['seconds']} s)", flush=True)
    over = [r["n"] for r in rows if not r["fits"]]
    print(f"{len(over)} of {len(rows)} sizes exceed the sm_90 limit" + (f": {over}" if over else ""))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
