#!/usr/bin/env bash
# One GPU check, in at most 8 minutes on a fresh machine with its own PyTorch, Triton and nvcc (no
# internet needed): build the extension for this GPU, run the mask, fused-step and CURE-versus-TRADES
# benchmarks (CSVs named with the GPU under bench/results/; each provider's result checked against the
# reference), then the GPU tests with the time left. Benchmarks come first so that their numbers are
# recorded even when the tests need longer than the budget leaves them.
#
# Usage:  bash bench/gpu_check.sh [--dry-run] [--out DIR]
#   --dry-run   check every step on a machine without a GPU: no CUDA build (the CPU-only build when
#               the extension is missing), a few tests, tiny benchmark shapes on the CPU with Triton in
#               its interpreter; CSVs go to a temporary directory unless --out is given.
# Environment:  PYTHON (default: .venv/bin/python if present, else python3), CUDA_HOME (default: from
#               nvcc on PATH, else /usr/local/cuda), MAX_JOBS (default: the CPU count).
# Exit status: 0 when every step passed; otherwise the number of failed steps (each is still run).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "$OUT" ]; then
    if [ "$DRY" = 1 ]; then OUT=$(mktemp -d /tmp/gpu_check.XXXXXX); else OUT=$ROOT/bench/results; fi
fi
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
START=$(date +%s)
FAILED=()

log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

BUDGET=${GPU_CHECK_BUDGET:-475}  # seconds for the whole check; each step is capped by what is left too

# step NAME TIMEOUT_S COMMAND...: run with a time cap, log, record a failure, keep going.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$left" -lt 5 ]; then
        log "$name SKIPPED: the ${BUDGET}s budget is spent"
        FAILED+=("$name")
        return
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    log "$name: $* (cap ${cap}s)"
    timeout --kill-after=10 "$cap" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" != 0 ]; then
        log "$name FAILED (exit $rc${rc/124/, time cap reached})"
        FAILED+=("$name")
    else
        log "$name ok"
    fi
}

if [ "$DRY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""  # the dry run must not touch a GPU even where there is one
    export TRITON_INTERPRET=1
    log "dry run: CSVs to $OUT"
fi

# --- 1. environment ----------------------------------------------------------------------------------
step environment 60 "$PYTHON" -c "
import platform, torch
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = 'not installed'
print(f'python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})  triton {tv}')
import importlib.util
for mod in ('numpy', 'pytest', 'hypothesis'):
    print(f'{mod}: {\"present\" if importlib.util.find_spec(mod) else \"MISSING (the steps that need it will fail)\"}')
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f'GPU {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs')
    open('$OUT/arch.txt', 'w').write(f'{p.major}.{p.minor}')
else:
    print('no CUDA GPU visible')
"

# --- 2. build the extension for this GPU -------------------------------------------------------------
ARCH=$(cat "$OUT/arch.txt" 2>/dev/null)  # torch.cuda.get_device_capability(), from step 1
if [ -z "${CUDA_HOME:-}" ]; then
    if command -v nvcc >/dev/null 2>&1; then CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")"); else CUDA_HOME=/usr/local/cuda; fi
fi
JOBS=${MAX_JOBS:-$(nproc)}
if [ "$DRY" = 1 ]; then
    log "build (dry run): would run TORCH_CUDA_ARCH_LIST=<capability> CUDA_HOME=$CUDA_HOME MAX_JOBS=$JOBS $PYTHON setup.py -q build_ext --inplace"
    if ls cure_kernels/_C*.so >/dev/null 2>&1; then
        log "build: extension present, not rebuilt in a dry run"
    else
        step build-cpu 300 env CURE_SKIP_CUDA_BUILD=1 MAX_JOBS="$JOBS" "$PYTHON" setup.py -q build_ext --inplace
    fi
elif [ -z "$ARCH" ]; then
    log "build FAILED: torch sees no CUDA GPU"
    FAILED+=("build")
else
    step build 130 env TORCH_CUDA_ARCH_LIST="$ARCH" CUDA_HOME="$CUDA_HOME" MAX_JOBS="$JOBS" \
        "$PYTHON" setup.py -q build_ext --inplace
fi

# --- 3. benchmarks (one process: mask, fused step, CURE vs TRADES; each part with its own budget) -----
EXTRA=(--out "$OUT")
if [ "$DRY" = 1 ]; then
    EXTRA+=(--dry-run --models resnet18,large --budget 60)
else
    EXTRA+=(--budget 75)
fi
step benchmarks 230 "$PYTHON" bench/gpu_check.py mask step train "${EXTRA[@]}"

# --- 4. tests on the GPU (with what the budget leaves, at least ~100 s) ------------------------------
TESTS=(tests/test_cuda_backend.py tests/test_rgp_mask.py tests/test_revise.py tests/test_sgd_step.py
       tests/test_triton_backend.py)
if [ "$DRY" = 1 ]; then
    step tests 120 "$PYTHON" -m pytest -x -q -p no:cacheprovider "${TESTS[@]}" \
        -k "test_revise_exact and float32 or test_triton_matches_reference and float32-grad-False or digit_widths_follow"
else
    step tests 400 "$PYTHON" -m pytest -q -rfE -p no:cacheprovider "${TESTS[@]}"
fi

# --- summary ------------------------------------------------------------------------------------------
log "CSVs in $OUT:"
ls -1 "$OUT"/*.csv 2>/dev/null | tee -a "$LOG"
if [ ${#FAILED[@]} -gt 0 ]; then
    log "FAILED steps: ${FAILED[*]} (total $(( $(date +%s) - START ))s)"
    exit ${#FAILED[@]}
fi
log "all steps passed (total $(( $(date +%s) - START ))s)"
