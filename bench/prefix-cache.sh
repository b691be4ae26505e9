#!/usr/bin/env bash
# Prefix caching on the CPU: the same HTTP streaming workload, every prompt starting with one
# shared "system prompt", against a server with prefix caching (the default) and one with
# --no-prefix-caching, ROUNDS rounds interleaved; written to bench/results/prefix-cache-cpu.{jsonl,md}.
# Usage: [ROUNDS=3] [SHARED=160] [CONCURRENCY=32] bench/prefix-cache.sh [REQUESTS]
set -euo pipefail
cd "$(dirname "$0")/.."
requests="${1:-256}"
cargo build --release -p sparsemoe-engine --example loadgen --bin sparsemoe-engine >&2
model=engine/demo-model
shared=${SHARED:-160}
concurrency=${CONCURRENCY:-32}
rounds=${ROUNDS:-3}
for v in "$rounds" "$shared" "$concurrency" "$requests"; do
    [[ $v =~ ^[0-9]+$ ]] || { echo "expected whole numbers, got '$v'" >&2; exit 2; }
done
vocab=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab_size'])" "$model/config.json")

declare -A url pid
logs="$(mktemp -d)"
trap 'kill ${pid[on]:-} ${pid[off]:-} 2>/dev/null || true' EXIT
for mode in on off; do
    extra=()
    [[ $mode == off ]] && extra=(--no-prefix-caching)
    target/release/sparsemoe-engine serve --model "$model" --port 0 "${extra[@]}" 2>"$logs/$mode" &
    pid[$mode]=$!
    for _ in $(seq 200); do grep -q "serving" "$logs/$mode" && break; sleep 0.1; done
    url[$mode]="$(grep -o 'http://127.0.0.1:[0-9]*' "$logs/$mode" | head -1)"
done

# Demo model context 256: prefix + prompt 16..32 + output 32..48 stays inside it for SHARED <= 176.
common=(--requests "$requests" --concurrency "$concurrency" --shared-prefix "$shared"
        --prompt-len 16:32 --output-len 32:48 --vocab "$vocab" --label "demo model")
out=bench/results/prefix-cache-cpu.jsonl
: >"$out"
for round in $(seq "$rounds"); do
    for mode in on off; do
        # A seed per round (the same for both servers): new prompts and a new shared prefix,
        # so the caching server never finds a whole prompt it saw in an earlier round.
        target/release/examples/loadgen --url "${url[$mode]}" --seed "$((1000 * round))" "${common[@]}" |
            sed "s/^{/{\"round\":$round,\"prefix_cache\":\"$mode\",/" | tee -a "$out"
    done
done
hits="$(curl -s "${url[on]}/metrics" | grep -E '^sparsemoe_prefix_cache_(hits|queries)_total' | tr '\n' ' ')"
kill -TERM "${pid[on]}" "${pid[off]}"
wait "${pid[on]}" "${pid[off]}" || { echo "a server exited non-zero after SIGTERM" >&2; exit 1; }
trap - EXIT

cpu="$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
python3 - "$out" "$cpu" "$(nproc)" "$hits" >bench/results/prefix-cache-cpu.md <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cpu, cores, hits = sys.argv[2], sys.argv[3], sys.argv[4]
rounds = sorted({r["round"] for r in rows})
by = {(r["round"], r["prefix_cache"]): r for r in rows}
r0 = rows[0]
print("# Prefix caching on the CPU (demo model, HTTP streaming)\n")
print(f"{r0['requests']} requests per run at concurrency {r0['concurrency']}; every prompt is the "
      f"same {r0['shared_prefix']} tokens followed by {r0['prompt_len']} of its own; outputs "
      f"{r0['output_len']} tokens (greedy). Two servers side by side, one with prefix caching "
      f"(the default) and one with `--no-prefix-caching`, {len(rounds)} rounds interleaved. "
      f"Written by `bench/prefix-cache.sh` on {cpu}, {cores} cores. The caching server's "
      f"counters at the end: `{hits.strip()}`.\n")
print("| round | prefix cache | output tok/s | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['round']} | {r['prefix_cache']} | {r['output_tokens_per_s']:.0f} | "
          f"{r['requests_per_s']:.1f} | {r['ttft_ms_p50']:.1f} / {r['ttft_ms_p99']:.1f} | "
          f"{r['itl_ms_p50']:.1f} / {r['itl_ms_p99']:.1f} | {r['errors']} |")
ratio = lambda key: [by[(n, "on")][key] / by[(n, "off")][key] for n in rounds]
each = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
med = statistics.median
tps, ttft = ratio("output_tokens_per_s"), ratio("ttft_ms_p50")
print()
print(f"- Output tokens/s, on / off: **{med(tps):.2f}x** median ({each(tps)}).")
print(f"- TTFT p50, on / off: **{med(ttft):.2f}x** median ({each(ttft)}; lower is better).")
PY
cat bench/results/prefix-cache-cpu.md
