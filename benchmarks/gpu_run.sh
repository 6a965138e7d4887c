#!/usr/bin/env bash
# The one command for a GPU machine: build, load check, GPU tests, short benchmark; evidence as it goes.
#
#   bash benchmarks/gpu_run.sh OUT_DIR              # a fresh GPU machine (Python 3.12, torch 2.11+cu130, triton 3.6,
#                                                   # pytest-timeout; no network needed)
#   bash benchmarks/gpu_run.sh --cpu-smoke OUT_DIR  # the same stages on a CPU: no CUDA build, Triton interpreter,
#                                                   # tiny sizes (CI runs this)
#
# Stages (each under its own hard time limit, timeout(1); its log is teed into OUT_DIR/<stage>.log and its record
# -- status, seconds, budget, exit code, details -- is rewritten atomically into OUT_DIR/stages.json when it starts
# and when it ends, so that a run killed at any point still returns what it reached):
#   1 build  STRUCTURE_OPS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python setup.py build_ext --inplace
#   2 load   _C and _C_cuda load, the CUDA build covers the GPU, raw torch.ops.structure_ops.* run; environment report
#   3 tests  pytest -m "cuda or triton" -rs, per-test timeout (pytest-timeout), files spread over 4 workers
#            (pytest-xdist, --dist loadfile) when installed
#   4 bench  benchmarks/gpu_suite.py --targets: OUT_DIR/targets.json and OUT_DIR/bench.json (Inf-CL installed from
#            benchmarks/wheels/ into a temporary folder)
#
# Budgets on an H200 machine (16 cores, cold compiler and Triton caches), in seconds. No GPU was available when
# this was written: the estimates are derived from CPU measurements, to be replaced by the first run's
# stages.json (every stage records its seconds):
#   stage   budget  estimate  why
#   build     130      ~80    nvcc for one target (9.0a): the heaviest translation unit (structure_cuda.cu,
#                             ~60 s of CPU time measured with tools/nvcc_check.py) bounds the wall time with
#                             MAX_JOBS=16; the CPU extension (~35 s) compiles beside it
#   load       30       ~10   import torch + CUDA context + two tiny raw ops (the Triton one compiles a kernel)
#   tests     210     ~150    368 tests; the CUDA ones run in ms each, the Triton ones are dominated by cold
#                             compiles (~1-5 s per kernel variant, several dozen variants), spread over 4 workers
#   bench     110      ~80    checks at N=512, then N=16384 (fp32, 3 of our passes + eager reference), 65536 and
#                             262144 (predicted from the smaller N and skipped when they cannot fit), bf16 at 65536,
#                             clip at 65536 vs Inf-CL, last torch.compile(reference) (~30-60 s of compilation);
#                             the suite keeps 20 s of the stage's limit in reserve and skips what would not fit
#   total     480 (8 min)
# Override a budget with GPU_RUN_BUDGET_<STAGE>=seconds, the workers with GPU_RUN_TEST_WORKERS, the per-test limit
# with GPU_RUN_TEST_TIMEOUT, the interpreter with PYTHON.
#
# Files in OUT_DIR (7, nothing else): stages.json, build.log, load.log, tests.log, bench.log, targets.json,
# bench.json. Exit status 0 when every stage passed, 1 otherwise.
set -u -o pipefail

MODE=gpu
if [ "${1:-}" = "--cpu-smoke" ]; then
    MODE=smoke
    shift
fi
if [ "${1:-}" = "--_stage" ]; then  # internal: the body of one stage, run under timeout(1) by this script
    STAGE_BODY=$2
    shift 2
else
    STAGE_BODY=
fi
if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: bash benchmarks/gpu_run.sh [--cpu-smoke] OUT_DIR" >&2
    exit 2
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}

# ---------------------------------------------------------------------------------------------------------------
# stage bodies (run as `bash gpu_run.sh [--cpu-smoke] --_stage NAME OUT_DIR` with OUT_DIR, WORK exported)
stage_build() {
    cd "$ROOT" || return 1
    if [ "$MODE" = gpu ]; then
        export STRUCTURE_OPS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
    else
        export STRUCTURE_OPS_BUILD_CUDA=0 MAX_JOBS=${MAX_JOBS:-2}
    fi
    echo "STRUCTURE_OPS_BUILD_CUDA=$STRUCTURE_OPS_BUILD_CUDA TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=$MAX_JOBS"
    # build_ext --inplace: the extensions land in structure_ops/ (PYTHONPATH points here), ninja reuses build/ when
    # nothing changed, and nothing is resolved or installed (no network, no pip)
    local cmd=("$PY" setup.py build_ext --inplace)
    # concurrent builds in one checkout clobber build/: serialize them when a lock file is named
    if [ -n "${STRUCTURE_OPS_BUILD_LOCK:-}" ] && command -v flock >/dev/null; then
        cmd=(flock "$STRUCTURE_OPS_BUILD_LOCK" "${cmd[@]}")
    fi
    "${cmd[@]}" || return 1
    ls -l structure_ops/*.so
    if [ "$MODE" = gpu ]; then
        ls structure_ops/_C_cuda*.so >/dev/null 2>&1 || { echo "the CUDA extension was not built"; return 1; }
    fi
}

stage_load() {
    cd "$ROOT" || return 1
    if [ "$MODE" = gpu ]; then
        nvidia-smi || echo "(nvidia-smi not available)"
    fi
    "$PY" benchmarks/_gpu_run.py load-check "$WORK" "$MODE"
}

stage_tests() {
    cd "$ROOT" || return 1
    local args=(-m pytest -rs -v -p no:cacheprovider --durations=30 --junitxml="$WORK/tests.xml")
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then
        args+=(--timeout="${GPU_RUN_TEST_TIMEOUT:-150}")
    else
        echo "pytest-timeout is not installed: no per-test time limit (the stage's limit still applies)"
    fi
    local workers=${GPU_RUN_TEST_WORKERS:-4}
    if [ "$MODE" = gpu ]; then
        if [ "$workers" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null; then
            args+=(-n "$workers" --dist loadfile)
        fi
        args+=(-m "cuda or triton" tests)
    else
        # On a CPU the CUDA tests skip (their reasons are listed) and the Triton tests run in the interpreter,
        # which is slow: the quick ones only.
        args+=(-m "(cuda or triton) and not slow" tests/test_cuda_structure.py tests/test_cuda_clip_knn.py
               tests/test_triton_backend.py tests/test_gpu_run.py)
    fi
    echo "$PY ${args[*]}"
    "$PY" "${args[@]}"
}

stage_bench() {
    cd "$ROOT" || return 1
    local whl
    whl=$(ls benchmarks/wheels/inf_cl-*.whl 2>/dev/null | head -n 1)
    if [ -n "$whl" ]; then
        "$PY" -m pip install -q --no-deps --no-index --no-compile --target "$WORK/site" "$whl" \
            && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" \
            || echo "installing $whl failed: the clip comparison will be null"
    else
        echo "no benchmarks/wheels/inf_cl-*.whl: the clip comparison will be null"
    fi
    local args=(benchmarks/gpu_suite.py --targets --out "$OUT" --budget-s "$((BUDGET - 20))")
    [ "$MODE" = smoke ] && args+=(--smoke)
    "$PY" "${args[@]}"
    local rc=$?
    "$PY" benchmarks/_gpu_run.py validate-targets "$OUT/targets.json" || rc=1
    return $rc
}

if [ -n "$STAGE_BODY" ]; then
    OUT=$1
    "stage_$STAGE_BODY"
    exit $?
fi

# ---------------------------------------------------------------------------------------------------------------
# the driver
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX")
export OUT WORK MODE PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "$MODE" = smoke ]; then
    export TRITON_INTERPRET=1  # the Triton kernels run on CPU tensors
    DEFAULTS=(build:240 load:60 tests:150 bench:150)
else
    DEFAULTS=(build:130 load:30 tests:210 bench:110)
fi
rm -f "$OUT/stages.json"

cpu_children() {  # CPU_NOW = user + system CPU seconds of this shell's finished children (bash's `times`, run
    times > "$WORK/times"  # in this shell: a pipe or $(...) would run it in a subshell, which has no children)
    CPU_NOW=$(tail -n 1 "$WORK/times" | awk '{ s = 0; for (i = 1; i <= 2; i++) { split($i, p, /[ms]/); s += 60 * p[1] + p[2] } printf "%.1f", s }')
}

overall=0
for entry in "${DEFAULTS[@]}"; do
    name=${entry%%:*}
    var="GPU_RUN_BUDGET_$(echo "$name" | tr '[:lower:]' '[:upper:]')"
    BUDGET=${!var:-${entry#*:}}
    export BUDGET
    "$PY" "$ROOT/benchmarks/_gpu_run.py" record "$OUT" "$WORK" "$MODE" "$name" running 0 "$BUDGET" ""
    printf '\n==== stage %s (budget %s s) ====\n' "$name" "$BUDGET"
    start=$(date +%s.%N)
    cpu_children
    cpu0=$CPU_NOW
    if [ "$MODE" = smoke ]; then
        timeout -k 10 "$BUDGET" bash "$0" --cpu-smoke --_stage "$name" "$OUT" 2>&1 | tee "$OUT/$name.log"
    else
        timeout -k 10 "$BUDGET" bash "$0" --_stage "$name" "$OUT" 2>&1 | tee "$OUT/$name.log"
    fi
    rc=${PIPESTATUS[0]}
    seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    cpu_children
    cpu=$(awk -v a="$cpu0" -v b="$CPU_NOW" 'BEGIN { printf "%.1f", b - a }')
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    [ "$rc" -eq 0 ] || overall=1
    "$PY" "$ROOT/benchmarks/_gpu_run.py" record "$OUT" "$WORK" "$MODE" "$name" "$status" "$seconds" "$BUDGET" "$rc" "$cpu"
    printf '==== stage %s: %s after %s s, %s CPU-s (rc %s) ====\n' "$name" "$status" "$seconds" "$cpu" "$rc"
done
rm -rf "$WORK"
printf '\nstages: %s\n' "$OUT/stages.json"
"$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps({k: (v['status'], v['seconds']) for k, v in d['stages'].items()}), 'total', d['total_seconds'], 's')" "$OUT/stages.json"
exit $overall
