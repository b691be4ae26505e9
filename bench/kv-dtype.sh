#!/usr/bin/env bash
# The KV cache's dtype on the CPU: the same in-process workload on the demo model, with the same
# KV-cache bytes stored as float32, bf16 and fp8 (--kv-cache-dtype), ROUNDS rounds interleaved;
# written to bench/results/kv-dtype-cpu.{jsonl,md}. Two budgets: a small one (KV_BYTES), which
# in float32 holds fewer sequences than the clients keep in flight, so the scheduler preempts,
# while bf16 and fp8 hold more tokens in the same bytes; and 1 GiB, where nothing is preempted
# and the ratio is the narrow dtype's own cost (rounding rows in, widening them out).
# Usage: [ROUNDS=3] [KV_BYTES=4194304] [CONCURRENCY=32] bench/kv-dtype.sh [REQUESTS]
set -euo pipefail
cd "$(dirname "$0")/.."
requests="${1:-256}"
rounds=${ROUNDS:-3}
kv_bytes=${KV_BYTES:-4194304}
concurrency=${CONCURRENCY:-32}
for v in "$rounds" "$kv_bytes" "$concurrency" "$requests"; do
    [[ $v =~ ^[0-9]+$ ]] || { echo "expected whole numbers, got '$v'" >&2; exit 2; }
done
cargo build --release -p sparsemoe-engine --example loadgen >&2
model=engine/demo-model
vocab=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab_size'])" "$model/config.json")
# Demo model context 256: prompts 64..128 + outputs 64..96 stay inside it.
common=(--in-process "$model" --requests "$requests" --concurrency "$concurrency"
        --prompt-len 64:128 --output-len 64:96 --vocab "$vocab" --label "demo model")
out=bench/results/kv-dtype-cpu.jsonl
: >"$out"
for round in $(seq "$rounds"); do
    for budget in "$kv_bytes" 1073741824; do
        for dtype in float32 bfloat16 fp8; do
            target/release/examples/loadgen --kv-cache-dtype "$dtype" --kv-cache-bytes "$budget" \
                --seed "$((1000 * round))" "${common[@]}" |
                sed "s/^{/{\"round\":$round,\"kv_cache_bytes\":$budget,/" | tee -a "$out"
        done
    done
done

cpu="$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
python3 - "$out" "$cpu" "$(nproc)" >bench/results/kv-dtype-cpu.md <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cpu, cores = sys.argv[2], sys.argv[3]
rounds = sorted({r["round"] for r in rows})
budgets = sorted({r["kv_cache_bytes"] for r in rows})
by = {(r["round"], r["kv_cache_bytes"], r["kv_cache_dtype"]): r for r in rows}
r0 = rows[0]
print("# KV cache dtype on the CPU (demo model, in-process)\n")
print(f"{r0['requests']} requests per run at concurrency {r0['concurrency']}; prompts "
      f"{r0['prompt_len']} tokens, outputs {r0['output_len']} (greedy); the same KV-cache bytes "
      f"stored as float32, bf16 or fp8 (`--kv-cache-dtype`), with a small budget and with 1 GiB; "
      f"{len(rounds)} rounds, the six runs of a round interleaved. Written by `bench/kv-dtype.sh` "
      f"on {cpu}, {cores} cores.\n")
print("| round | KV bytes | KV dtype | cache tokens | preemptions | output tok/s | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors |")
print("|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['round']} | {r['kv_cache_bytes']} | {r['kv_cache_dtype']} | {r['kv_cache_tokens']} | "
          f"{r['preemptions']} | {r['output_tokens_per_s']:.0f} | {r['requests_per_s']:.1f} | "
          f"{r['ttft_ms_p50']:.1f} / {r['ttft_ms_p99']:.1f} | {r['itl_ms_p50']:.1f} / {r['itl_ms_p99']:.1f} | "
          f"{r['errors']} |")
each = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
med = statistics.median
print()
for b in budgets:
    f32 = by[(rounds[0], b, "float32")]
    for dt in ("bfloat16", "fp8"):
        ratio = lambda key: [by[(n, b, dt)][key] / by[(n, b, "float32")][key] for n in rounds]
        tps, ttft = ratio("output_tokens_per_s"), ratio("ttft_ms_p50")
        narrow = by[(rounds[0], b, dt)]
        print(f"- {b} bytes, {dt}: cache tokens {narrow['kv_cache_tokens']} (float32 "
              f"{f32['kv_cache_tokens']}); output tokens/s, {dt} / float32: **{med(tps):.2f}x** "
              f"median ({each(tps)}); TTFT p50, {dt} / float32: {med(ttft):.2f}x ({each(ttft)}; "
              f"lower is better).")
PY
cat bench/results/kv-dtype-cpu.md
