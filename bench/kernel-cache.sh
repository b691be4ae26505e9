#!/usr/bin/env bash
# What the kernel cache saves at start-up: `sparsemoe-engine logits --device cuda:0` on a fixture
# model, from process start to its logits, with an empty kernel cache (NVRTC compiles the
# engine's kernels, as every start did before the cache) and with a warm one (the same kernels
# read from disk), alternating, RUNS times each. The device is the CPU emulator of the driver
# (kernels/emu): NVRTC and the cache are the real ones and run on the host either way, and the
# model's forward pass is the same in both columns, so the difference is the compile.
#   bench/kernel-cache.sh [OUT.md]     (default bench/results/kernel-cache.md)
#   MODEL (v32_sparse_moe), RUNS (3)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/kernel-cache.md}
model=${MODEL:-v32_sparse_moe}
runs=${RUNS:-3}
(( runs > 0 )) || { echo "kernel-cache.sh: RUNS must be above 0" >&2; exit 2; }
kernels/install-nvcc.sh
eval "$(kernels/nvcc-env.sh)"
kernels/emu/build.sh >/dev/null
cargo build --locked -p sparsemoe-engine --bin sparsemoe-engine
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export LD_LIBRARY_PATH="$PWD/target/cuda-emu:${LD_LIBRARY_PATH:-}"
export SPARSEMOE_KERNEL_CACHE="$work/cache"
start() {  # one start to logits; prints its seconds
    local t0 t1
    t0=$(date +%s%N)
    target/debug/sparsemoe-engine logits --device cuda:0 --model "engine/tests/fixtures/$model" \
        --tokens 1,2,3,4 >"$work/logits.json"
    t1=$(date +%s%N)
    awk -v ns=$((t1 - t0)) 'BEGIN { printf "%.2f", ns / 1e9 }'
}
cold=() warm=()
for _ in $(seq "$runs"); do
    rm -rf "$SPARSEMOE_KERNEL_CACHE"
    cold+=("$(start)")
    warm+=("$(start)")
done
entries=$(find "$SPARSEMOE_KERNEL_CACHE" -name '*.bin' -printf '%f\n' | sed 's/-[0-9a-f]\{64\}\.bin$//' | sort | paste -sd' ')
bytes=$(du -sb "$SPARSEMOE_KERNEL_CACHE" | cut -f1)
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
mc=$(median "${cold[@]}") mw=$(median "${warm[@]}")
nvrtc=$(python3 - <<'PY'
import ctypes
lib = ctypes.CDLL("libnvrtc.so.13")
major, minor = ctypes.c_int(), ctypes.c_int()
lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
print(f"{major.value}.{minor.value}")
PY
)
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -n 1)
{
    echo "# Kernel cache: engine start to first logits, NVRTC compile vs the cache"
    echo
    echo "\`bench/kernel-cache.sh\` at $(git rev-parse --short HEAD), $(date -u +%F), on the build machine ($cpu, $(nproc) cores, no GPU):"
    echo "\`sparsemoe-engine logits --device cuda:0\` on the \`$model\` fixture, the device being the CPU emulator of the"
    echo "driver (\`kernels/emu\`, compute capability 9.0); NVRTC $nvrtc compiles \`engine.cu\` and \`topk.cu\` for it."
    echo "Each start is a new process; cold starts begin with an empty cache, warm ones follow a cold one."
    echo "Times on this machine only, for the ratio: an H200 host's CPU compiles faster, and its forward pass is"
    echo "the GPU's, not the emulator's."
    echo
    echo "| start | runs (s) | median (s) |"
    echo "|---|---|---|"
    echo "| cold: NVRTC compiles the kernels | ${cold[*]} | $mc |"
    echo "| warm: the kernels from the cache | ${warm[*]} | $mw |"
    echo
    awk -v c="$mc" -v w="$mw" -v e="$entries" -v b="$bytes" 'BEGIN {
        printf "A warm start takes %.3f of a cold one'"'"'s time (%.1f s less); the cache holds %s (entries by file and target), %d bytes.\n", w / c, c - w, e, b }'
} >"$out"
cat "$out"
