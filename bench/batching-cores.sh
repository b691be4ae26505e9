#!/usr/bin/env bash
# How much of continuous batching's gain on the CPU comes from each core, in-process (no HTTP):
# decode (and prefill) tokens/s at batch 1 and batch 32 on one core (taskset) and on all of
# them, ROUNDS rounds interleaved, written to bench/results/batching-cores.{jsonl,md}.
# Usage: [ROUNDS=3] [MODEL=engine/demo-model] bench/batching-cores.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v taskset >/dev/null || { echo "batching-cores.sh needs taskset (util-linux)" >&2; exit 2; }
cargo build --release -p sparsemoe-engine --bin sparsemoe-engine >&2
model=${MODEL:-engine/demo-model}
[[ -f $model/config.json ]] || { echo "no model at $model (MODEL=...)" >&2; exit 2; }
rounds=${ROUNDS:-3}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS=$rounds: expected a whole number >= 1" >&2; exit 2; }
cores=$(nproc)
# Prompts of 40 tokens and 96 decode steps: contexts 40..136, past the demo model's index_topk
# (64), so decode runs the indexer and sparse attention as in serving.
args=(bench --model "$model" --batch 1,32 --prompt-tokens 40 --decode-tokens 96)
out=bench/results/batching-cores.jsonl
: >"$out"
for round in $(seq "$rounds"); do
    for set in 0 "0-$((cores - 1))"; do
        taskset -c "$set" target/release/sparsemoe-engine "${args[@]}" |
            python3 -c 'import json,sys; d=json.load(sys.stdin); r,c=sys.argv[1:]
for t in d["throughput"]: print(json.dumps({"round": int(r), "cores": int(c), **t}))' \
                "$round" "$([[ $set == 0 ]] && echo 1 || echo "$cores")" | tee -a "$out"
    done
done

cpu="$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
python3 - "$out" "$cpu" "$cores" "$model" >bench/results/batching-cores.md <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cpu, cores, model = sys.argv[2], int(sys.argv[3]), sys.argv[4]
rounds = sorted({r["round"] for r in rows})
by = {(r["round"], r["cores"], r["batch"]): r for r in rows}
med = statistics.median
print("# Continuous batching per core (CPU, in-process)\n")
print(f"`{model}`, `sparsemoe-engine bench` (one forward pass per step over every sequence, no "
      f"HTTP, no scheduler), 40-token prompts then 96 decode steps (contexts 40 to 136, sparse "
      f"attention past 64). Written by `bench/batching-cores.sh` on {cpu}, {cores} cores, "
      f"{len(rounds)} rounds interleaved; 1 core = `taskset -c 0`.\n")
print("| round | cores | batch | decode tok/s | prefill tok/s |")
print("|---|---|---|---|---|")
for r in rows:
    print(f"| {r['round']} | {r['cores']} | {r['batch']} | {r['decode_tokens_per_s']:.0f} | "
          f"{r['prefill_tokens_per_s']:.0f} |")
dec = lambda n, c, b: by[(n, c, b)]["decode_tokens_per_s"]
ratio = lambda c1, b1, c2, b2: [dec(n, c2, b2) / dec(n, c1, b1) for n in rounds]
each = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
lines = [
    ("batch 32 / batch 1, both on one core (what batching gains per core)", ratio(1, 1, 1, 32)),
    (f"batch 32 on {cores} cores / on one core (what the other cores add to a batch)",
     ratio(1, 32, cores, 32)),
    (f"batch 1 on {cores} cores / on one core (what they add to one sequence)",
     ratio(1, 1, cores, 1)),
    (f"batch 32 / batch 1, both on {cores} cores (the serving benchmark's ratio, decode only)",
     ratio(cores, 1, cores, 32)),
]
print()
for text, xs in lines:
    print(f"- {text}: **{med(xs):.2f}x** median ({each(xs)})")
PY
cat bench/results/batching-cores.md
