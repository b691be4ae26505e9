#!/usr/bin/env bash
# Installs CUDA 13.0's compiler from the pinned PyPI wheels into a venv outside the repo, for the
# kernel compile check (kernels/tests/compile.rs). Wheels are cached; a second run reuses them and
# an existing venv. Prints nothing on stdout; then `eval "$(kernels/nvcc-env.sh)"`.
#   SPARSEMOE_CUDA_CACHE  wheel cache  (default ~/.cache/sparsemoe/cuda-13.0.88)
#   SPARSEMOE_CUDA_VENV   the venv     (default $SPARSEMOE_CUDA_CACHE/venv)
# 13.0.x matches the CUDA 13.0 driver (580) of the H200 machines the kernels are tested on.
set -euo pipefail
cache="${SPARSEMOE_CUDA_CACHE:-$HOME/.cache/sparsemoe/cuda-13.0.88}"
venv="${SPARSEMOE_CUDA_VENV:-$cache/venv}"
pins=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-nvrtc==13.0.88
)
if compgen -G "$venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc" >/dev/null; then
    exit 0
fi
mkdir -p "$cache/wheels"
# nullglob: an empty cache counts 0 wheels (a failing `ls` would end the script under pipefail).
shopt -s nullglob
have=("$cache/wheels"/*.whl)
shopt -u nullglob
if [[ ${#have[@]} -lt ${#pins[@]} ]]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$cache/wheels" "${pins[@]}" >&2
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --no-index --no-deps "$cache/wheels"/*.whl >&2
