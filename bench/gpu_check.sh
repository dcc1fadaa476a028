#!/usr/bin/env bash
# GPU check of the packed kernels, for a machine with an NVIDIA GPU (< 8 min on one H100/H200):
#   1. the Triton kernel tests on CUDA (tests/qvla_quant/test_kernels_triton.py, marker gpu), natively
#   2. bench/gpu_check.py: time per layer shape and batch, bf16 cuBLAS vs W8 / W4 / W2 / mixed, every number printed
# Usage, from anywhere:  bash bench/gpu_check.sh [--quick] [--reps N]   (arguments go to gpu_check.py)
# Python: $PYTHON, else .venv/bin/python, else python3; it needs a CUDA build of torch and triton.
# Without a CUDA device it says so and exits 0. Exit status: non-zero if the tests or the benchmark failed.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' 2>/dev/null; then
    echo "gpu_check: no CUDA device visible to torch under $PY: nothing to check (this script is for a GPU machine)"
    exit 0
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))'
"$PY" -c 'import triton; print("triton", triton.__version__)' || echo "gpu_check: triton is not importable"

echo "== 1/2 kernel tests on CUDA"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/qvla_quant/test_kernels_triton.py
tests=$?

echo "== 2/2 per-layer timings"
timeout 360 "$PY" bench/gpu_check.py "$@"
bench=$?

echo "gpu_check: tests exit $tests, benchmark exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
