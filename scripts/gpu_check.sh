#!/usr/bin/env bash
# Run tensorfold's tests on a CUDA GPU in one go, logging to $OUT/gpu_check.log
# ($OUT if set, else $TMPDIR/tensorfold_gpu_check).
#
#   scripts/gpu_check.sh            # GPU part: tests taking `device` (on cuda) + cuda-marked tests
#   GPU_CHECK_FULL=1 scripts/gpu_check.sh   # then the whole default suite with --device cuda
#   GPU_CHECK_SLOW=1 scripts/gpu_check.sh   # also the slow tests (Inductor compile grid, ...)
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3),
# GPU_CHECK_TIMEOUT seconds per pytest run (default 420). Needs torch with CUDA, opt_einsum,
# pytest (hypothesis optional: its tests skip without it). No network access is needed:
# the package is imported from src/.
set -uo pipefail
cd "$(dirname "$0")/.."

LOG_DIR="${OUT:-${TMPDIR:-/tmp}/tensorfold_gpu_check}"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_check.log"
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
TIMEOUT="${GPU_CHECK_TIMEOUT:-420}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TENSORFOLD_TEST_DEVICE=cuda
export PYTHONUNBUFFERED=1

run() {
    echo "+ $*"
    timeout --signal=INT --kill-after=30 "$TIMEOUT" "$@"
    local rc=$?
    [ "$rc" -eq 124 ] && echo "!! timed out after ${TIMEOUT}s"
    return "$rc"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "(no nvidia-smi)"
    "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda)
ok = torch.cuda.is_available()
print("cuda available:", ok, "|", torch.cuda.get_device_name(0) if ok else "-")
for mod in ("opt_einsum", "pytest", "hypothesis"):
    try:
        __import__(mod)
    except ImportError:
        print(f"missing module: {mod}" + (" (its tests will skip)" if mod == "hypothesis" else ""))
sys.exit(0 if ok else 3)
EOF
    pre=$?
    if [ "$pre" -ne 0 ]; then
        echo "!! no usable CUDA device: nothing to check"
        exit "$pre"
    fi
    status=0
    markers='(device or cuda) and not slow'
    [ "${GPU_CHECK_SLOW:-0}" = 1 ] && markers='device or cuda'
    run "$PY" -m pytest -q -rs -p no:cacheprovider --device cuda -m "$markers" --durations=10 || status=$?
    if [ "${GPU_CHECK_FULL:-0}" = 1 ]; then
        full_markers='not slow'
        [ "${GPU_CHECK_SLOW:-0}" = 1 ] && full_markers=''
        run "$PY" -m pytest -q -p no:cacheprovider --device cuda ${full_markers:+-m "$full_markers"} || status=$?
    fi
    echo "gpu_check exit status: $status"
    exit "$status"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
