#!/usr/bin/env bash
# Serving benchmark on the CPU: HTTP streaming at concurrency 1 and 32, and the same workload
# in-process on the scheduler (no HTTP), written to bench/results/serving-cpu.{jsonl,md}.
# Model: engine/demo-model when it exists, else the tiny conformance fixture (say which in the
# results). Usage: [ROUNDS=3] bench/loadgen.sh [REQUESTS]
set -euo pipefail
cd "$(dirname "$0")/.."
requests="${1:-384}" # long enough that a run at 32 concurrent lasts seconds, not one
cargo build --release -p sparsemoe-engine --example loadgen --bin sparsemoe-engine >&2

# MODEL: a model directory to serve instead (e.g. bench/.cache/v32-50m, the 48M-parameter model
# of bench/cpu_engine_vs_transformers.py); one without tokenizer.json gets a word-level stand-in
# for its vocabulary (the load uses random token ids; the tokenizer only turns outputs into text).
# OUT: the results' file stem under bench/results (default serving-cpu).
model=${MODEL:-engine/demo-model}
out_stem=${OUT:-serving-cpu}
if [[ -z ${MODEL:-} && ! -f $model/model.safetensors ]]; then
    model=engine/tests/fixtures/v32_sparse_moe
    label="fixture v32_sparse_moe (2 layers, hidden 64, 8 experts)"
elif [[ -z ${MODEL:-} ]]; then
    label="demo model"
else
    label="$(basename "$model")"
fi
if [[ ! -f $model/tokenizer.json ]]; then
    src=$model
    model="$(mktemp -d)"
    ln -s "$(realpath "$src")"/{config.json,*.safetensors} "$model/"
    [[ -f $src/model.safetensors.index.json ]] && ln -s "$(realpath "$src")/model.safetensors.index.json" "$model/"
    python3 - "$model" <<'PY'
import json, sys
d = sys.argv[1]
n = json.load(open(f"{d}/config.json"))["vocab_size"]
vocab = {"<s>": 0, "</s>": 1, **{f"t{i}": i for i in range(2, n)}}
sp = lambda i, c: {"id": i, "content": c, "single_word": False, "lstrip": False,
                   "rstrip": False, "normalized": False, "special": True}
json.dump({"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [sp(0, "<s>"), sp(1, "</s>")], "normalizer": None,
           "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
           "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t2"}},
          open(f"{d}/tokenizer.json", "w"))
json.dump({"bos_token": "<s>", "eos_token": "</s>"}, open(f"{d}/tokenizer_config.json", "w"))
PY
fi
vocab=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab_size'])" "$model/config.json")

log="$(mktemp)"
target/release/sparsemoe-engine serve --model "$model" --port 0 2>"$log" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 200); do grep -q "serving" "$log" && break; sleep 0.1; done
url="$(grep -o 'http://127.0.0.1:[0-9]*' "$log" | head -1)"

common=(--requests "$requests" --prompt-len 16:64 --output-len 32:64 --vocab "$vocab")
out=bench/results/$out_stem.jsonl
: >"$out"
# ROUNDS rounds of the four runs, interleaved, so a change in the machine's speed (it is shared)
# moves both sides of each ratio alike; the report gives each round's ratios and their medians.
rounds=${ROUNDS:-3}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS=$rounds: expected a whole number >= 1" >&2; exit 2; }
for round in $(seq "$rounds"); do
    for c in 1 32; do
        for mode in http in-process; do
            if [[ $mode == http ]]; then src=(--url "$url"); else src=(--in-process "$model"); fi
            # A seed per round and concurrency: the server lives through every run, and a prompt
            # it saw before would find its blocks in the prefix cache (the HTTP and in-process
            # runs of one round and concurrency get the same prompts, on different engines).
            target/release/examples/loadgen "${src[@]}" --concurrency "$c" --label "$label" \
                --seed "$((1000 * round + c))" "${common[@]}" |
                sed "s/^{/{\"round\":$round,/" | tee -a "$out"
        done
    done
done
kill -TERM $server
wait $server || { echo "server exited non-zero after SIGTERM" >&2; exit 1; }
trap - EXIT

load="$(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$out" "$load" "$(nproc)" >"bench/results/$out_stem.md" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rounds = sorted({r["round"] for r in rows})
by = {(r["round"], r["mode"], r["concurrency"]): r for r in rows}
tps = lambda rnd, mode, c: by[(rnd, mode, c)]["output_tokens_per_s"]
print(f"# Serving on the CPU ({rows[0]['label']})\n")
print(f"{rows[0]['requests']} requests per run, prompts {rows[0]['prompt_len']} tokens, outputs "
      f"{rows[0]['output_len']} (random token ids, greedy; eos may end some early). "
      f"Written by `bench/loadgen.sh` on {sys.argv[3]} CPU cores, {len(rounds)} rounds of the "
      f"four runs interleaved; load average after the runs: {sys.argv[2]} (the machine is "
      f"shared, so absolute numbers move from run to run; the ratios are taken within a round).\n")
print("| round | mode | concurrency | output tok/s | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | errors |")
print("|---|---|---|---|---|---|---|---|")
f = lambda x: "-" if x is None else f"{x:.1f}"
for r in rows:
    print(f"| {r['round']} | {r['mode']} | {r['concurrency']} | {r['output_tokens_per_s']:.0f} | "
          f"{r['requests_per_s']:.1f} | {f(r['ttft_ms_p50'])} / {f(r['ttft_ms_p99'])} | "
          f"{f(r['itl_ms_p50'])} / {f(r['itl_ms_p99'])} | {r['errors']} |")
batching = [tps(n, "http-streaming", 32) / tps(n, "http-streaming", 1) for n in rounds]
batching_ip = [tps(n, "in-process", 32) / tps(n, "in-process", 1) for n in rounds]
over1 = [tps(n, "http-streaming", 1) / tps(n, "in-process", 1) for n in rounds]
over32 = [tps(n, "http-streaming", 32) / tps(n, "in-process", 32) for n in rounds]
each = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
med = statistics.median
print()
print(f"- Continuous batching: HTTP tokens/s at 32 concurrent / at 1 = **{med(batching):.2f}x** "
      f"median (rounds: {each(batching)}; target >= 4x); in-process {med(batching_ip):.2f}x "
      f"({each(batching_ip)}).")
print(f"- Server overhead: HTTP streaming / in-process tokens/s = **{med(over1):.2f}** at "
      f"concurrency 1 ({each(over1)}), **{med(over32):.2f}** at 32 ({each(over32)}) (target >= 0.9).")
PY
cat "bench/results/$out_stem.md"
