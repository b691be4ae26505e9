#!/usr/bin/env bash
# The one GPU check for sparsemoe's kernels, for a single device call (well under 10 minutes;
# about 2-4 minutes expected on an H200, unmeasured so far). Needs nvcc, PyTorch and CuPy on the GPU
# machine (its image has them) and nothing built elsewhere: the .cu files are compiled there for
# sm_90a. Writes under $OUT: gpu-check.md (table), gpu-check.json, gpu-check.log (raw), nvidia-smi.txt.
#   run: OUT=... kernels/gpu-check.sh [--quick]
# Commit the table and log to bench/results/ with the date and the card afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/sparsemoe-gpu-check}"
mkdir -p "$OUT"
export NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    "$NVCC" --version | tail -n 2
    python3 -c 'import torch, cupy; print("torch", torch.__version__, "cupy", cupy.__version__)'
} 2>&1 | tee "$OUT/nvidia-smi.txt"
PYTHONUNBUFFERED=1 timeout 540 python3 kernels/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu-check.log"
rc=${PIPESTATUS[0]}
rm -rf "$OUT/build"  # cubins: not needed back (the device tool returns at most 8 files)
exit "$rc"
