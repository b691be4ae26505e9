#!/usr/bin/env bash
# Prints the exports that point the kernel compile check (and a shell) at the nvcc of a venv
# holding the PyPI CUDA wheels (kernels/install-nvcc.sh makes one): eval "$(kernels/nvcc-env.sh [VENV])".
# The wheels' layout is self-contained (nvidia/cu13/{bin,nvvm,include,lib}; nvcc.profile finds
# cicc, libdevice, the crt and cccl headers relative to bin/), so no --include-path is needed.
set -euo pipefail
cache="${SPARSEMOE_CUDA_CACHE:-$HOME/.cache/sparsemoe/cuda-13.0.88}"
venv="${1:-${SPARSEMOE_CUDA_VENV:-$cache/venv}}"
nvcc=$(compgen -G "$venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc" | head -n 1 || true)
if [[ -z $nvcc ]]; then
    echo "nvcc-env.sh: no nvcc under $venv (run kernels/install-nvcc.sh)" >&2
    exit 1
fi
root=$(dirname "$(dirname "$nvcc")")
printf 'export SPARSEMOE_NVCC=%q\n' "$nvcc"
printf 'export CUDA_HOME=%q\n' "$root"
printf 'export PATH=%q:"$PATH"\n' "$root/bin"
# NVRTC (libnvrtc.so.13 and its builtins) for the engine's start-up kernel compile and its test.
printf 'export LD_LIBRARY_PATH=%q${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\n' "$root/lib"
