#!/usr/bin/env bash
# The GPU check of issue 19 on one GPU, in under 5 minutes: the kernel tests compiled for CUDA,
# then benchmarks/kernels_gpu.py (each megalith_kernels op against torch's own, and a 356M GPT's
# training step on the local, Triton and, when installed, Transformer Engine paths).
#
#   scripts/gpu_check.sh                      # writes ./gpu_check_out/{gpu_check.json,*.txt}
#   OUT=/tmp/check PYTHON=.venv/bin/python scripts/gpu_check.sh
#
# It installs nothing. It needs a Python with a CUDA build of torch, triton and megalith
# installed (editable is fine): see setup_hint below. TRITON_INTERPRET is unset, so the tests
# compile the kernels for the GPU instead of interpreting them.
# Environment: PYTHON OUT TEST_TIMEOUT BENCH_TIMEOUT (seconds per step).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
OUT="${OUT:-./gpu_check_out}"
TEST_TIMEOUT="${TEST_TIMEOUT:-120}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-150}"
unset TRITON_INTERPRET
mkdir -p "$OUT"
failed=()

setup_hint() {
    cat >&2 <<'EOF'
gpu_check: set up a Python first, for example:
  python -m venv .venv && . .venv/bin/activate
  pip install torch --index-url https://download.pytorch.org/whl/cu128   # a CUDA build of torch
  pip install -e '.[test,triton]'                                         # megalith, pytest, triton
  PYTHON=.venv/bin/python scripts/gpu_check.sh
EOF
}

# step NAME LIMIT_S LOG COMMAND...: run it under a time limit, its output to the screen and LOG
step() {
    local name=$1 limit=$2 log=$3 began=$SECONDS rc=0
    shift 3
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
    if [[ $rc -eq 0 ]]; then
        echo "== $name: ok in $((SECONDS - began)) s"
    else
        echo "== $name: FAILED (exit $rc$([[ $rc -eq 124 ]] && echo ', timed out')) after $((SECONDS - began)) s"
        failed+=("$name")
    fi
}

if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
    echo "gpu_check: nvidia-smi not found; asking torch" >&2
fi
if ! timeout 60 "$PYTHON" -c '
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device (torch.version.cuda = {torch.version.cuda})")
import triton, megalith, megalith_kernels
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"GPU {torch.cuda.get_device_name()}")
'; then
    setup_hint
    exit 1
fi

step "kernel tests on CUDA" "$TEST_TIMEOUT" "$OUT/pytest.txt" \
    "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels_*.py
step "benchmark" "$BENCH_TIMEOUT" "$OUT/benchmark.txt" \
    "$PYTHON" benchmarks/kernels_gpu.py --json "$OUT/gpu_check.json"

echo "gpu_check: $SECONDS s in all; results in $OUT"
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "gpu_check: failed: ${failed[*]}" >&2
    exit 1
fi
