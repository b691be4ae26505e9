#!/usr/bin/env bash
# Builds, on the build machine, what kernels/gpu-check.sh runs on the GPU machine (which has no
# Rust toolchain) into target/gpu-check/ (ignored by git; the device call's carry):
#   sparsemoe-engine, cuda-tests  the release engine and the CUDA test binary (engine/tests/cuda.rs), stripped
#   SOURCES                       the hash of their sources (kernels/gpu-sources.sh)
#   cubins/                       every kernels/cuda/*.cu for sm_90a, by the pinned nvcc
#                                 (kernels/install-nvcc.sh) with gpu_check.py's flags, and a manifest
#                                 of their sources' hashes and ptxas reports: gpu_check.py loads
#                                 these instead of compiling, where the hashes still match
# Then checks what it built, as --check does.
#   bash kernels/gpu-build.sh           # about 5 minutes on the 2-core build machine
#   bash kernels/gpu-build.sh --check   # right before the device call: exit 1 unless the binaries
#                                       # and cubins are of this tree's sources and the call fits
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu-check

check() {
    local ok=1 built tree size tree_size
    for f in sparsemoe-engine cuda-tests SOURCES cubins/manifest.json; do
        [[ -f $out/$f ]] || { echo "gpu-build --check: $out/$f is missing" >&2; ok=0; }
    done
    built=$(cat "$out/SOURCES" 2>/dev/null || echo none)
    tree=$(bash kernels/gpu-sources.sh)
    if [[ $built != "$tree" ]]; then
        echo "gpu-build --check: $out was built from sources $built, this tree is $tree (run bash kernels/gpu-build.sh)" >&2
        ok=0
    fi
    python3 kernels/gpu_check.py --check-cubins --cubins "$out/cubins" || ok=0
    # What travels: the carry and the working tree (tracked files and untracked ones not ignored).
    size=$(du -sb "$out" 2>/dev/null | cut -f1 || true)
    tree_size=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 |
        cut -f1 || true)
    size=${size:-0} tree_size=${tree_size:-0}
    echo "gpu-build --check: carry $out $((size >> 20)) MiB + working tree $((tree_size >> 20)) MiB (the limit: 64 MiB)"
    if ((size + tree_size > 62 << 20)); then
        echo "gpu-build --check: too large to travel" >&2
        ok=0
    fi
    if ((ok)); then
        echo "gpu-build --check: current. The device call: command 'bash kernels/gpu-check.sh', carry [\"$out\"], timeout_s 600"
    fi
    ((ok))
}

if [[ ${1:-} == --check ]]; then
    check
    exit
fi

rm -rf "$out"
mkdir -p "$out"
before=$(bash kernels/gpu-sources.sh)
cargo build --release --locked -p sparsemoe-engine --bin sparsemoe-engine
# cargo's messages stay on stderr, so a failed build says why.
test_bin=$(cargo test --release --locked -p sparsemoe-engine --test cuda --no-run \
    --message-format=json |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')
cp target/release/sparsemoe-engine "$out/sparsemoe-engine"
cp "$test_bin" "$out/cuda-tests"
strip "$out/sparsemoe-engine" "$out/cuda-tests"
chmod +x "$out/sparsemoe-engine" "$out/cuda-tests"
# The sources must not have changed while cargo read them: gpu-check.sh would call the binaries
# those of a tree they were not built from.
after=$(bash kernels/gpu-sources.sh)
if [[ $before != "$after" ]]; then
    echo "gpu-build: the sources changed during the build ($before, then $after): run it again" >&2
    exit 1
fi
echo "$after" >"$out/SOURCES"
# The cubins, with the pinned nvcc (a venv of PyPI wheels, outside the repo).
(
    bash kernels/install-nvcc.sh
    eval "$(bash kernels/nvcc-env.sh)"
    python3 kernels/gpu_check.py --prebuild "$out/cubins" --nvcc "$SPARSEMOE_NVCC"
)
ls -la "$out" "$out/cubins"
check
