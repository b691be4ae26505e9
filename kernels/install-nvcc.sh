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
# The venv is current when it was made from exactly these pins (a marker it gets last).
if [[ -f $venv/.pins && "$(cat "$venv/.pins")" == "${pins[*]}" ]] &&
    compgen -G "$venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc" >/dev/null; then
    exit 0
fi
mkdir -p "$cache/wheels"
# Each pin's own wheel (name-version-*.whl, the name with underscores), downloaded if missing:
# a changed pin is fetched even where older wheels are cached.
wheel_of() {
    local name=${1%%==*} version=${1#*==}
    compgen -G "$cache/wheels/${name//-/_}-$version-*.whl" | head -n 1 || true
}
missing=()
for pin in "${pins[@]}"; do
    [[ -n $(wheel_of "$pin") ]] || missing+=("$pin")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$cache/wheels" "${missing[@]}" >&2
fi
wheels=()
for pin in "${pins[@]}"; do
    wheel=$(wheel_of "$pin")
    [[ -n $wheel ]] || { echo "install-nvcc: no wheel for $pin after downloading it" >&2; exit 1; }
    wheels+=("$wheel")
done
# A venv this script made earlier (its marker, or the default place) is made again; anything
# else at that path is someone else's, left alone.
if [[ -e $venv ]]; then
    if [[ -f $venv/.pins || $venv == "$cache/venv" ]]; then
        rm -rf "$venv"
    else
        echo "install-nvcc: $venv exists and was not made by this script; remove it or set SPARSEMOE_CUDA_VENV elsewhere" >&2
        exit 1
    fi
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --no-index --no-deps "${wheels[@]}" >&2
printf '%s' "${pins[*]}" >"$venv/.pins"
