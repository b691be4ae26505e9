#!/usr/bin/env bash
# Builds the CPU stand-in for the CUDA driver and cuBLAS (see driver.cc) into DIR (default
# target/cuda-emu): libsparsemoe_cuda_emu.so, with libcuda.so and libcublas.so linked to it.
# Put DIR first on LD_LIBRARY_PATH and the engine's CUDA backend opens it as GPUs named
# "sparsemoe CPU emulation N (not a GPU)" (SPARSEMOE_EMU_DEVICES of them, default 2).
# Needs g++ (C++17) and the CUDA headers: run eval "$(kernels/nvcc-env.sh)" first.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$(dirname "$here")")
out=${1:-$root/target/cuda-emu}
include=${CUDA_HOME:?CUDA_HOME is unset: run eval \"\$(kernels/nvcc-env.sh)\" first}/include
mkdir -p "$out"
# The sources the engine compiles with NVRTC, as kernels/src/lib.rs lists them.
sources=$(sed -n 's/^pub const ENGINE_SOURCES: &\[&str\] = &\[\(.*\)\];$/\1/p' "$root/kernels/src/lib.rs" | tr -d '"' | tr ',' ' ')
[[ -n $sources ]] || { echo "build.sh: ENGINE_SOURCES not found in kernels/src/lib.rs" >&2; exit 1; }
# shellcheck disable=SC2086
python3 "$here/gen_kernels.py" "$root/kernels/cuda" "$out/kernels.gen.cc" $sources
# -fno-strict-aliasing: the kernels read bf16 storage as 32-bit words, as CUDA allows and C++
# aliasing rules do not.
flags=(-std=c++17 -O2 -fno-strict-aliasing -g -fPIC -fvisibility=hidden -Wall -Wextra -Werror -Wno-unknown-pragmas
       -DSMOE_RTC -I"$here" -I"$root/kernels/cuda" -I"$include")
pids=()
for file in "$here/driver.cc" "$here/cublas.cc" "$out/kernels.gen.cc"; do
    g++ "${flags[@]}" -c "$file" -o "$out/$(basename "$file" .cc).o" &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
g++ -shared -o "$out/libsparsemoe_cuda_emu.so" "$out"/driver.o "$out"/cublas.o "$out"/kernels.gen.o -lpthread
ln -sf libsparsemoe_cuda_emu.so "$out/libcuda.so"
ln -sf libsparsemoe_cuda_emu.so "$out/libcublas.so"
# Every kernel of kernels/cuda (SOURCES), for kernels/gpu_check.py --emulate: with the bf16 and
# fp8 headers of include/ in place of CUDA's.
all=$(sed -n '/^pub const SOURCES/,/^];/p' "$root/kernels/src/lib.rs" | grep -o '"[a-z_0-9]*\.cu"' | tr -d '"' | tr '\n' ' ')
# shellcheck disable=SC2086
python3 "$here/gen_kernels.py" "$root/kernels/cuda" "$out/all_kernels.gen.cc" $all
g++ "${flags[@]/-DSMOE_RTC/-I$here/include}" -shared "$here/standalone.cc" "$out/all_kernels.gen.cc" -lpthread \
    -o "$out/libsparsemoe_kernels_emu.so"
# The emulator's own checks (selftest.cc).
g++ "${flags[@]}" "$here/selftest.cc" "$out"/driver.o "$out"/cublas.o "$out"/kernels.gen.o -lpthread -o "$out/selftest"
"$out/selftest" >"$out/selftest.log" || { cat "$out/selftest.log" >&2; exit 1; }
echo "$out"
