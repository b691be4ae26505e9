#!/usr/bin/env bash
# The one GPU check of sparsemoe's kernels and engine, made for a single device call (at most
# 600 s): run there as `bash kernels/gpu-check.sh` with OUT set, carrying target/gpu-check, which
# `bash kernels/gpu-build.sh` makes here (and `bash kernels/gpu-build.sh --check`, right before
# the call, confirms is current). Extra arguments go to kernels/gpu_check.py (--quick, --steps).
#
# One deadline, 540 s after the start (SPARSEMOE_GPU_CHECK_BUDGET): every step runs under
# `timeout -k 10` for its own limit or the time left, whichever is less; with under 10 s left a
# step is skipped, an optional one with under 60 s. Every skip, timeout and failure is printed and
# goes into summary.txt as it happens. The steps and their limits (s):
#   the machine: nvidia-smi, nvcc, torch and cupy, the CUDA libraries (nvidia-smi.txt)   10-60 each
#   the benches' random checkpoint (bench/random_checkpoint.py, 1.2 GB), in the background
#     from the start, waited for before the benches                                    150
#   the kernels' checks, then timings (kernels/gpu_check.py: prebuilt cubins of
#     target/gpu-check/cubins, else nvcc here); when a step leaves the CUDA context broken
#     (exit 3) or the process dies, the steps left run in a fresh process (--resume)    240 in all
#   the engine's CUDA tests, one process; if it fails, each test that did not pass again
#     alone (--exact), while 150 s of the budget are left, 120 s of reruns at most    120, 30 each
#   six benches: a decode step at 64K context, sparse vs dense, GPU f32 and bf16, CPU   30 each
#   optional: bf16 decode without and with CUDA graphs (--cuda-graph-rows 8)         20 each
#   optional: three tests under compute-sanitizer memcheck                             90
# About 5 minutes expected on an H200, unmeasured so far.
# Writes under $OUT, 8 files (the device tool returns at most 8): summary.txt (each step: ok,
# FAILED, TIMED OUT or skipped, with its seconds), nvidia-smi.txt (the machine), gpu-check.md,
# gpu-check.json, gpu-check.log (the kernels), engine.log, engine-bench.jsonl, sanitizer.log.
# Commit the tables and logs to bench/results/ with the date and the card afterwards.
#
# A dry run with no GPU, on the CPU emulator (kernels/emu; limits and budget 20 times longer):
#   OUT=... SPARSEMOE_EMULATE=target/cuda-emu SPARSEMOE_GPU_CHECK_CONTEXT=2048 bash kernels/gpu-check.sh
# (correctness only; its timings mean nothing). PYTHON (default python3) and
# SPARSEMOE_GPU_CHECK_BIN (default target/gpu-check) can point at stand-ins to rehearse the
# deadline logic with short SPARSEMOE_GPU_CHECK_BUDGETs.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-/tmp/sparsemoe-gpu-check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
export NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
emulate=${SPARSEMOE_EMULATE:+$(cd "$SPARSEMOE_EMULATE" && pwd)}
context=${SPARSEMOE_GPU_CHECK_CONTEXT:-65536}
bin=${SPARSEMOE_GPU_CHECK_BIN:-target/gpu-check}
slow=1
[[ -n $emulate ]] && slow=20  # emulated kernels run thousands of times slower: longer limits
budget=${SPARSEMOE_GPU_CHECK_BUDGET:-$((540 * slow))}
deadline=$((SECONDS + budget))
rc=0
summary=$OUT/summary.txt
printf '# gpu-check %s: budget %s s\n\n| step | result | seconds | note |\n| --- | --- | --- | --- |\n' \
    "$(date -u +%FT%TZ)" "$budget" >"$summary"

# record STEP RESULT SECONDS NOTE: a row of summary.txt, and a line here.
record() {
    printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" >>"$summary"
    echo "gpu-check: $1: $2 after $3 s${4:+; $4}"
}

declare -A why=()  # what the next steps' exit statuses mean, for their summary rows
# run_step NAME LIMIT KIND LOG ERRLOG CMD...: CMD under `timeout -k 10` for LIMIT s or the time
# left, whichever is less; its output appended to LOG and shown, its stderr too, or to ERRLOG
# (which then gets the step's header) unless that is -. KIND: required (skipped with under 10 s
# left; a failure, timeout or skip fails the check), optional (skipped with under 60 s left; a
# failure fails the check, running out of time does not) or info (neither fails it). Sets
# status: CMD's exit status (124: timed out, 137: killed), or skipped.
run_step() {
    local name=$1 limit=$2 kind=$3 log=$4 errlog=$5 left floor=10 start took
    shift 5
    left=$((deadline - SECONDS))
    [[ $kind == optional ]] && floor=60
    if ((left < floor)); then
        status=skipped
        record "$name" skipped 0 "$left s of the budget left"
        [[ $kind == required ]] && rc=1
        return 0
    fi
    ((limit > left)) && limit=$left
    local header=$errlog
    [[ $header == - ]] && header=$log
    echo "== gpu-check: $name (limit $limit s, $left s of the budget left)" | tee -a "$header"
    start=$SECONDS
    if [[ $errlog == - ]]; then
        timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    else
        timeout -k 10 "$limit" "$@" 2>>"$errlog" | tee -a "$log"
    fi
    status=${PIPESTATUS[0]}
    took=$((SECONDS - start))
    case $status in
        0) record "$name" ok "$took" "" ;;
        124) record "$name" "TIMED OUT" "$took" "at its limit of $limit s"
             [[ $kind == required ]] && rc=1 ;;
        137) record "$name" "KILLED" "$took" "exit 137: killed 10 s after its limit of $limit s, or out of memory"
             [[ $kind == required ]] && rc=1 ;;
        *) record "$name" FAILED "$took" "exit $status${why[$status]:+: ${why[$status]}}"
           [[ $kind == info ]] || rc=1 ;;
    esac
}

# cuBLAS and NVRTC (CUDA 13) for the engine, from wherever this machine has them: the toolkit or
# the wheels.
libs=$(timeout -k 5 30 "$PYTHON" - <<'PY'
import glob, os, site
dirs = ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
for sp in site.getsitepackages():
    dirs += glob.glob(os.path.join(sp, "nvidia", "*", "lib"))
want = ("libcublas.so.13", "libnvrtc.so.13")
print(":".join(d for d in dirs if any(os.path.exists(os.path.join(d, w)) for w in want)))
PY
)
start=$SECONDS
if [[ -n $emulate ]]; then
    echo "DRY RUN on the CPU emulator in $emulate: no GPU, timings meaningless" | tee "$OUT/nvidia-smi.txt"
    kernel_check=(--emulate "$emulate/libsparsemoe_kernels_emu.so")
else
    {
        date -u +%FT%TZ
        timeout -k 5 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
        timeout -k 5 20 "$NVCC" --version | tail -n 2
        timeout -k 5 60 "$PYTHON" -c 'import torch, cupy; print("torch", torch.__version__, "cupy", cupy.__version__)'
        echo "the engine's library path (cuBLAS, NVRTC): ${libs:-none found}"
        echo "ldconfig -p | grep -E 'libcuda|libnvrtc|libcublas':"
        timeout -k 5 10 ldconfig -p | grep -E 'libcuda|libnvrtc|libcublas'
        for dir in ${libs//:/ }; do
            echo "ls -la $dir:"
            ls -la "$dir"
        done
    } >"$OUT/nvidia-smi.txt" 2>&1
    head -n 4 "$OUT/nvidia-smi.txt"
    kernel_check=()
fi
record "the machine (nvidia-smi.txt)" ok $((SECONDS - start)) ""

# The engine's binaries, made by kernels/gpu-build.sh on the build machine: run whatever their
# sources (a stale build still says something), but say so.
engine=0
if [[ -f $bin/cuda-tests && -f $bin/sparsemoe-engine ]]; then
    engine=1
    chmod +x "$bin/cuda-tests" "$bin/sparsemoe-engine"  # in case the carry lost the bits
    built_from=$(cat "$bin/SOURCES" 2>/dev/null || echo none)
    tree=$(bash kernels/gpu-sources.sh 2>/dev/null || echo unknown)
    if [[ $built_from != "$tree" ]]; then
        record "engine: binaries" STALE 0 "built from sources $built_from, this tree is $tree: run anyway, but their \
results are those sources' (bash kernels/gpu-build.sh --check before the call catches this)"
        rc=1
    fi
else
    record engine skipped 0 "no binaries in $bin: run bash kernels/gpu-build.sh on the build machine and carry $bin"
    rc=1
fi

# The benches' checkpoint, written in the background while the GPU works: a V3.2-shaped model
# (1 layer, random bf16 weights).
model=/tmp/sparsemoe-v32-shapes
if ((engine)); then
    checkpoint_log=$(mktemp)
    checkpoint_limit=$((150 * slow))
    ((checkpoint_limit > deadline - SECONDS)) && checkpoint_limit=$((deadline - SECONDS))
    (
        begun=$SECONDS
        timeout -k 10 "$checkpoint_limit" "$PYTHON" bench/random_checkpoint.py bench/configs/v32-shapes-1layer.json "$model"
        echo "checkpoint: exit $? after $((SECONDS - begun)) s"
    ) >"$checkpoint_log" 2>&1 &
    checkpoint_pid=$!
fi

# The kernels: every check, then the timings. Exit 3: a step left the CUDA context broken with
# steps left; 128 and up but 137: the process died of a signal. Either way the steps not yet
# begun run in a fresh process, adding to the same results, while the kernels' time lasts.
build_dir=$(mktemp -d)  # cubins compiled here, for a rerun to reuse
kernels_end=$((SECONDS + 240 * slow))
why=([1]="checks failed or steps raised (gpu-check.md says which)" [3]="a step left the CUDA context broken")
run_step "kernels: checks and timings (gpu-check.md)" $((240 * slow)) required "$OUT/gpu-check.log" - \
    "$PYTHON" kernels/gpu_check.py --out "$OUT" --cubins "$bin/cubins" --build-dir "$build_dir" "${kernel_check[@]}" "$@"
for rerun in 1 2 3; do
    [[ $status == 3 || ($status =~ ^[0-9]+$ && $status -gt 128 && $status != 137) ]] || break
    if ((kernels_end - SECONDS < 30)); then
        record "kernels: the steps left" skipped 0 "under 30 s of the kernels' $((240 * slow)) s left"
        break
    fi
    run_step "kernels: the steps left, in a fresh process ($rerun)" $((kernels_end - SECONDS)) required \
        "$OUT/gpu-check.log" - "$PYTHON" kernels/gpu_check.py --out "$OUT" --cubins "$bin/cubins" --build-dir "$build_dir" \
        --resume \
        "${kernel_check[@]}" "$@"
done
rm -rf "$build_dir"
why=([101]="tests failed")

if ((engine)); then
    export SPARSEMOE_FIXTURES="$PWD/engine/tests/fixtures"  # the CUDA tests' fixture models, in this tree
    # NVRTC's builds of the engine's kernels, kept on disk: the CUDA tests compile them once and
    # every bench after them loads them from here (seconds each).
    export SPARSEMOE_KERNEL_CACHE="${SPARSEMOE_KERNEL_CACHE:-$(mktemp -d)}"
    export LD_LIBRARY_PATH="${emulate:+$emulate:}$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "engine: LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee "$OUT/engine.log"

    # The CUDA backend against the CPU backend on every fixture model (float32 and bf16 weights),
    # on paged batches and with expert shards on separate streams, and the rest of
    # engine/tests/cuda.rs. One process; a device fault there fails every test after it, so a
    # failed run reruns each test that did not pass alone.
    from=$(($(wc -l <"$OUT/engine.log") + 1))
    run_step "engine: CUDA tests" $((120 * slow)) required "$OUT/engine.log" - \
        env SPARSEMOE_REQUIRE_GPU=1 "$bin/cuda-tests" --nocapture --test-threads 1
    if [[ $status != 0 && $status != skipped ]]; then
        # "test NAME ... ok", the ok on a line of its own when the test printed something.
        passed=$(tail -n +"$from" "$OUT/engine.log" | awk '
            /^test [^ ]+ \.\.\. / { cur = $2; if ($0 ~ / \.\.\. ok$/) { print cur; cur = "" }; next }
            /^ok$/ && cur != "" { print cur; cur = "" }')
        mapfile -t tests < <(timeout -k 5 30 "$bin/cuda-tests" --list 2>/dev/null | sed -n 's/: test$//p')
        reruns_end=$((SECONDS + 120 * slow))
        for test in "${tests[@]}"; do
            grep -qxF -- "$test" <<<"$passed" && continue
            if ((deadline - SECONDS < 150 * slow || SECONDS >= reruns_end)); then
                record "engine: $test alone" skipped 0 "the reruns' time is spent (150 s stay for the benches)"
                continue
            fi
            run_step "engine: $test alone" $((30 * slow)) info "$OUT/engine.log" - \
                env SPARSEMOE_REQUIRE_GPU=1 "$bin/cuda-tests" --exact "$test" --nocapture --test-threads 1
        done
    fi

    # A whole decode step at 64K context (SPARSEMOE_GPU_CHECK_CONTEXT) on the random checkpoint,
    # sparse vs dense, on the GPU and on this machine's CPUs: one JSON line a run.
    start=$SECONDS
    wait "$checkpoint_pid"
    cat "$checkpoint_log" >>"$OUT/engine.log"
    written=$(tail -n 1 "$checkpoint_log")
    rm -f "$checkpoint_log"
    case $written in
        "checkpoint: exit 0 "*) record "engine: the benches' checkpoint (in the background)" ok $((SECONDS - start)) \
                                    "waited for; ${written#checkpoint: }" ;;
        "checkpoint: exit 124 "*) record "engine: the benches' checkpoint (in the background)" "TIMED OUT" \
                                      $((SECONDS - start)) "${written#checkpoint: }, at its limit of $checkpoint_limit s"
                                  rc=1 ;;
        *) record "engine: the benches' checkpoint (in the background)" FAILED $((SECONDS - start)) "$written"
           rc=1 ;;
    esac
    why=()
    if [[ $written == "checkpoint: exit 0 "* ]]; then
        for run in cuda:0/float32 cuda:0/bfloat16 cpu/float32; do
            for attention in sparse dense; do
                run_step "engine: bench ${run%/*} ${run#*/} $attention" $((30 * slow)) required \
                    "$OUT/engine-bench.jsonl" "$OUT/engine.log" \
                    "$bin/sparsemoe-engine" bench --model "$model" --device "${run%/*}" --dtype "${run#*/}" \
                    --attention "$attention" --batch 1 --prompt-tokens 16 --decode-tokens 16 --context "$context" \
                    --steps 5
            done
        done
        # If time is left: the MLP blocks as CUDA graphs (--cuda-graph-rows) or not, side by
        # side: decode throughput at batches 1 and 8 and single decode steps at 4K context, bf16
        # (each report says which).
        for graph_rows in 0 8; do
            run_step "engine: bench cuda:0 bfloat16 sparse --cuda-graph-rows $graph_rows" $((20 * slow)) optional \
                "$OUT/engine-bench.jsonl" "$OUT/engine.log" \
                "$bin/sparsemoe-engine" bench --model "$model" --device cuda:0 --dtype bfloat16 --attention sparse \
                --batch 1,8 --prompt-tokens 16 --decode-tokens 32 --context 4096 --steps 10 \
                --cuda-graph-rows "$graph_rows"
        done
    fi

    # Last, as its output is a bonus: the paged-pool, grouped-expert and device-routing tests
    # under compute-sanitizer's memcheck (out-of-bounds and misaligned device accesses), where
    # the toolkit has it.
    if command -v compute-sanitizer >/dev/null; then
        run_step "engine: memcheck (sanitizer.log)" 90 optional "$OUT/sanitizer.log" - \
            env SPARSEMOE_REQUIRE_GPU=1 compute-sanitizer --tool memcheck --print-limit 20 --error-exitcode 1 \
            "$bin/cuda-tests" --test-threads 1 paged_batches grouped_expert decode_steps_route
    else
        echo "engine: memcheck skipped: no compute-sanitizer on this machine" | tee "$OUT/sanitizer.log"
        record "engine: memcheck" skipped 0 "no compute-sanitizer on this machine"
    fi
fi
record total "$( ((rc == 0)) && echo ok || echo FAILED)" "$SECONDS" "of a budget of $budget s"
exit "$rc"
