#!/usr/bin/env bash
# The one GPU check for sparsemoe's kernels and its engine, for a single device call: every step
# has a time limit and the required ones add up to under 10 minutes (kernels 300 s, engine tests
# 100 s, six benches 30 s each), then, if time is left, two benches with and without CUDA graphs
# (20 s each) and a memcheck run of three tests (90 s); about
# 5 minutes expected on an H200, unmeasured so far. Call it with timeout_s 600 and carry
# ["target/gpu-check"] (kernels/gpu-build.sh, 21 MB).
# Needs nvcc, PyTorch and CuPy on the GPU machine (its image has them): the .cu files are
# compiled there for sm_90a. The engine's own binaries (its CUDA backend) come from the build
# machine (kernels/gpu-build.sh). Writes under $OUT: gpu-check.md (table), gpu-check.json,
# gpu-check.log (raw), engine.log, engine-bench.jsonl, sanitizer.log, nvidia-smi.txt.
#   run: OUT=... kernels/gpu-check.sh [--quick]
# Commit the table and log to bench/results/ with the date and the card afterwards.
# A dry run of the whole script with no GPU, on the CPU emulator (kernels/emu): build it, then
#   OUT=... SPARSEMOE_EMULATE=target/cuda-emu SPARSEMOE_GPU_CHECK_CONTEXT=2048 kernels/gpu-check.sh
# (correctness only; its timings mean nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/sparsemoe-gpu-check}"
mkdir -p "$OUT"
export NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
emulate=${SPARSEMOE_EMULATE:+$(cd "$SPARSEMOE_EMULATE" && pwd)}
context=${SPARSEMOE_GPU_CHECK_CONTEXT:-65536}
slow=1
[[ -n $emulate ]] && slow=20  # emulated kernels run thousands of times slower: longer limits
# The CUDA tests find the fixture models here, wherever this copy of the tree is.
export SPARSEMOE_FIXTURES="$PWD/engine/tests/fixtures"
# NVRTC's builds of the engine's kernels, kept on disk: the CUDA tests compile them once and every
# bench after them loads them from here instead of compiling again (seconds each).
export SPARSEMOE_KERNEL_CACHE="${SPARSEMOE_KERNEL_CACHE:-$(mktemp -d)}"  # this run's own, mode 0700
if [[ -n $emulate ]]; then
    echo "DRY RUN on the CPU emulator in $emulate: no GPU, timings meaningless" | tee "$OUT/nvidia-smi.txt"
    kernel_check=(--emulate "$emulate/libsparsemoe_kernels_emu.so")
else
    {
        date -u +%FT%TZ
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
        "$NVCC" --version | tail -n 2
        python3 -c 'import torch, cupy; print("torch", torch.__version__, "cupy", cupy.__version__)'
    } 2>&1 | tee "$OUT/nvidia-smi.txt"
    kernel_check=()
fi
PYTHONUNBUFFERED=1 timeout $((300 * slow)) python3 kernels/gpu_check.py --out "$OUT" "${kernel_check[@]}" "$@" 2>&1 |
    tee "$OUT/gpu-check.log"
rc=${PIPESTATUS[0]}
rm -rf "$OUT/build"  # cubins: not needed back (the device tool returns at most 8 files)

# The engine on the GPU, from the binaries kernels/gpu-build.sh made on the build machine
# (carried in target/gpu-check): the CUDA backend against the CPU backend on every fixture model
# (float32 and bf16 weights), on paged batches and with expert shards on separate streams, then a
# whole decode step at 64K context, sparse vs dense: GPU float32, GPU bf16, and CPU.
# engine.log holds the output, engine-bench.jsonl the bench reports.
bin=target/gpu-check
built_from=$(cat "$bin/SOURCES" 2>/dev/null || echo none)
if [[ -x $bin/cuda-tests && -x $bin/sparsemoe-engine && $built_from != "$(kernels/gpu-sources.sh)" ]]; then
    echo "engine: skipped: the binaries in $bin were built from other sources than this tree's" \
        "(run kernels/gpu-build.sh again and carry $bin)" | tee "$OUT/engine.log"
    rc=1
elif [[ -x $bin/cuda-tests && -x $bin/sparsemoe-engine ]]; then
    # cuBLAS and NVRTC (CUDA 13) from wherever this machine has them: the toolkit or the wheels.
    libs=$(python3 - <<'PY'
import glob, os, site
dirs = ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
for sp in site.getsitepackages():
    dirs += glob.glob(os.path.join(sp, "nvidia", "*", "lib"))
want = ("libcublas.so.13", "libnvrtc.so.13")
print(":".join(d for d in dirs if any(os.path.exists(os.path.join(d, w)) for w in want)))
PY
)
    export LD_LIBRARY_PATH="${emulate:+$emulate:}$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "engine: LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee "$OUT/engine.log"
    SPARSEMOE_REQUIRE_GPU=1 timeout $((100 * slow)) "$bin/cuda-tests" --nocapture --test-threads 1 2>&1 |
        tee -a "$OUT/engine.log"
    status=${PIPESTATUS[0]}
    [[ $status == 124 ]] && echo "engine: the CUDA tests timed out after $((100 * slow)) s" | tee -a "$OUT/engine.log"
    [[ $status == 0 ]] || rc=1
    # A whole decode step at 64K context (SPARSEMOE_GPU_CHECK_CONTEXT) on a V3.2-shaped model (1 layer, random bf16 weights),
    # sparse vs dense, on the GPU and on this machine's CPUs: one JSON line per run.
    model=/tmp/sparsemoe-v32-shapes
    python3 bench/random_checkpoint.py bench/configs/v32-shapes-1layer.json "$model" 2>&1 | tee -a "$OUT/engine.log"
    [[ ${PIPESTATUS[0]} == 0 ]] || { echo "engine: writing the benches' checkpoint failed" | tee -a "$OUT/engine.log"; rc=1; }
    # A required bench that fails or runs out of time fails the check; an optional one only when
    # it fails (running out of the time left is what optional means).
    bench_status() {  # STATUS LIMIT REQUIRED
        case $1 in
            0) ;;
            124) echo "engine: timed out after $2 s" | tee -a "$OUT/engine.log"; [[ $3 == required ]] && rc=1 ;;
            *) echo "engine: the bench failed (exit $1)" | tee -a "$OUT/engine.log"; rc=1 ;;
        esac
    }
    for run in cuda:0/float32 cuda:0/bfloat16 cpu/float32; do
        for attention in sparse dense; do
            echo "engine: bench ${run%/*} ${run#*/} $attention" | tee -a "$OUT/engine.log"
            timeout $((30 * slow)) "$bin/sparsemoe-engine" bench --model "$model" --device "${run%/*}" \
                --dtype "${run#*/}" --attention "$attention" --batch 1 --prompt-tokens 16 \
                --decode-tokens 16 --context "$context" --steps 5 2>>"$OUT/engine.log" |
                tee -a "$OUT/engine-bench.jsonl"
            bench_status "${PIPESTATUS[0]}" $((30 * slow)) required
        done
    done
    # If time is left: the MLP blocks as CUDA graphs (--cuda-graph-rows) or not, side by side:
    # decode throughput at batches 1 and 8 and single decode steps at 4K context, bf16 (each
    # report says which).
    for graph_rows in 0 8; do
        echo "engine: bench cuda:0 bfloat16 sparse --cuda-graph-rows $graph_rows" | tee -a "$OUT/engine.log"
        timeout $((20 * slow)) "$bin/sparsemoe-engine" bench --model "$model" --device cuda:0 \
            --dtype bfloat16 --attention sparse --batch 1,8 --prompt-tokens 16 --decode-tokens 32 \
            --context 4096 --steps 10 --cuda-graph-rows "$graph_rows" 2>>"$OUT/engine.log" |
            tee -a "$OUT/engine-bench.jsonl"
        bench_status "${PIPESTATUS[0]}" $((20 * slow)) optional
    done
    # Last, as its output is a bonus: the paged-pool, grouped-expert and device-routing tests under
    # compute-sanitizer's memcheck (out-of-bounds and misaligned device accesses), where the
    # toolkit has it. If the call's time runs out here, everything above is already in $OUT.
    if command -v compute-sanitizer >/dev/null; then
        echo "engine: memcheck" | tee "$OUT/sanitizer.log"
        SPARSEMOE_REQUIRE_GPU=1 timeout 90 compute-sanitizer --tool memcheck --error-exitcode 1 \
            "$bin/cuda-tests" --test-threads 1 paged_batches grouped_expert decode_steps_route 2>&1 | tee -a "$OUT/sanitizer.log"
        [[ ${PIPESTATUS[0]} == 0 ]] || rc=1
    else
        echo "engine: memcheck skipped: no compute-sanitizer on this machine" | tee "$OUT/sanitizer.log"
    fi
else
    echo "engine: skipped: no binaries in $bin (run kernels/gpu-build.sh on the build machine and carry $bin)" |
        tee "$OUT/engine.log"
    rc=1
fi
exit "$rc"
