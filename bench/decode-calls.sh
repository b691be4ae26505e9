#!/usr/bin/env bash
# What one decode step of the CUDA backend asks of the GPU, counted on the CPU emulator of the
# driver (kernels/emu, SPARSEMOE_EMU_STATS): kernel launches by kernel, cuBLAS calls, copies,
# memsets, allocations and waits for the host. Runs bench/decode_calls.rs twice, a prefill and
# one decode step, then the same with STEPS more, and divides the difference by STEPS. Counts,
# not times: the emulator models no timing. They are the calls a CUDA graph of the step would
# replace with one launch, and they hold on a GPU (the engine makes the same calls there).
#   bench/decode-calls.sh [OUT.md]     (default bench/results/decode-calls.md; what OUT.md has
#                                       from the line "<!-- kept -->" on is kept)
#   MODELS ("v32_sparse_moe v3_moe_yarn"), BATCH (8), STEPS (8), DTYPE (bfloat16)
#   SHARDED_MODEL (v3_moe_yarn), SHARDS (2): a second table, that model's routed experts over
#   SHARDS expert shards (lanes of device 0), routed on the host and on the device
#   A third table: each model with its MLP blocks as CUDA graphs (--graph-rows BATCH), the
#   runs' decode steps 2 and 2 + STEPS (the first decode step runs the blocks as they are, the
#   second captures them: the difference is replays only)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/decode-calls.md}
models=${MODELS:-v32_sparse_moe v3_moe_yarn}
batch=${BATCH:-8}
steps=${STEPS:-8}
dtype=${DTYPE:-bfloat16}
sharded_model=${SHARDED_MODEL:-v3_moe_yarn}
shards=${SHARDS:-2}
(( steps > 0 && batch > 0 && shards > 1 )) || { echo "decode-calls.sh: STEPS and BATCH must be above 0, SHARDS above 1" >&2; exit 2; }
kernels/install-nvcc.sh
eval "$(kernels/nvcc-env.sh)"
kernels/emu/build.sh >/dev/null
cargo build --release --locked -p sparsemoe-engine --example decode_calls
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for model in $models; do
    for decode in 1 $((1 + steps)); do
        SPARSEMOE_EMU_STATS="$work/$model-$decode.json" LD_LIBRARY_PATH="$PWD/target/cuda-emu:${LD_LIBRARY_PATH:-}" \
            target/release/examples/decode_calls --model "engine/tests/fixtures/$model" --batch "$batch" \
            --decode "$decode" --dtype "$dtype" >"$work/$model-$decode.run.json"
    done
done
for model in $models; do
    for decode in 2 $((2 + steps)); do
        SPARSEMOE_EMU_STATS="$work/graphs-$model-$decode.json" LD_LIBRARY_PATH="$PWD/target/cuda-emu:${LD_LIBRARY_PATH:-}" \
            target/release/examples/decode_calls --model "engine/tests/fixtures/$model" --batch "$batch" \
            --decode "$decode" --dtype "$dtype" --graph-rows "$batch" >"$work/graphs-$model-$decode.run.json"
    done
done
devices=$(printf '0,%.0s' $(seq "$shards"))  # "0,0,…": every shard a lane of device 0
devices=${devices%,}
for routing in host device; do
    flag=$([[ $routing == host ]] && echo --route-on-host || true)
    for decode in 1 $((1 + steps)); do
        SPARSEMOE_EMU_STATS="$work/shards-$routing-$decode.json" LD_LIBRARY_PATH="$PWD/target/cuda-emu:${LD_LIBRARY_PATH:-}" \
            target/release/examples/decode_calls --model "engine/tests/fixtures/$sharded_model" --batch "$batch" \
            --decode "$decode" --dtype "$dtype" --devices "$devices" $flag >"$work/shards-$routing-$decode.run.json"
    done
done
python3 - "$work" "$out" "$steps" "$batch" "$dtype" "$(git describe --always --dirty)" "$sharded_model" "$shards" $models <<'EOF'
import json
import sys

work, out, steps, batch, dtype, commit = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
sharded_model, shards, models = sys.argv[7], int(sys.argv[8]), sys.argv[9:]
runs, per_step, routed, first = {}, {}, {}, {}
graphed = [f"graphs-{m}" for m in models]
for m in models + ["shards-host", "shards-device"] + graphed:
    decodes = (2, 2 + steps) if m in graphed else (1, 1 + steps)
    one, more = (json.load(open(f"{work}/{m}-{d}.json")) for d in decodes)
    first[m], runs[m] = (json.load(open(f"{work}/{m}-{d}.run.json")) for d in decodes)
    run_one = first[m]
    routed[m] = (runs[m]["routed_on_device"] - run_one["routed_on_device"]) / steps
    per_step[m] = {k: ((more.get(k, [0, 0])[0] - one.get(k, [0, 0])[0]) / steps,
                       (more.get(k, [0, 0])[1] - one.get(k, [0, 0])[1]) / steps)
                   for k in set(one) | set(more)}
kinds = sorted({k for m in models for k, v in per_step[m].items() if v[0]})
lines = [
    "# Driver calls of one CUDA decode step",
    "",
    f"`bench/decode-calls.sh` at {commit}: `bench/decode_calls.rs` on the CPU emulator of the driver "
    f"(`kernels/emu`, `SPARSEMOE_EMU_STATS`), {batch} sequences of 16 prompt tokens in a paged bf16 pool, "
    f"{dtype} weights; a prefill and 1 decode step, then {1 + steps}, the difference divided by {steps}. "
    "Calls as the engine makes them on a GPU, not times (the emulator models none): each kernel launch and "
    "cuBLAS call costs the host a few microseconds to issue, and a CUDA graph of the step would issue them "
    "as one. cuBLAS calls launch one or more kernels of their own. A copy to the host waits for the stream.",
    "",
    "| model | layers (MoE) | routed on the device a step |",
    "|---|---|---|",
]
for m in models:
    r = runs[m]
    lines.append(f"| {m} | {r['layers']} ({r['moe_layers']}) | {routed[m]:g} (of {r['moe_layers']}) |")
lines += ["", "| call a decode step | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
total = {m: 0.0 for m in models}
for k in kinds:
    cells = []
    for m in models:
        n, b = per_step[m].get(k, (0, 0))
        cells.append(f"{n:g}" + (f" ({b / 1024:.1f} KiB)" if b and not k.startswith("memory") else ""))
        if k.startswith(("launch/", "cublas/")):
            total[m] += n
    lines.append(f"| `{k}` | " + " | ".join(cells) + " |")
lines.append("| **kernel launches and cuBLAS calls** | " + " | ".join(f"**{total[m]:g}**" for m in models) + " |")
for m in models:
    layers = runs[m]["layers"]
    lines.append("")
    lines.append(f"{m}: {total[m]:g} launches and cuBLAS calls a step, {total[m] / layers:.1f} a layer on average.")

# The same model's routed experts over expert shards, routed on the host and on the device.
sharded = ["shards-host", "shards-device"]
r = runs["shards-device"]
assert r["expert_shards"] == shards, r
lines += [
    "",
    f"## Expert shards: {sharded_model}'s routed experts over {shards} shards",
    "",
    f"The same steps with `--devices {','.join(['0'] * shards)}`: {shards} expert shards, each a lane (stream) of "
    f"device 0, holding {r['layers']} layers' ({r['moe_layers']} MoE) routed experts split evenly; every MoE layer "
    "routed on the host (`--route-on-host`: its router logits copied to the host, which deals the pairs, then "
    "each shard's rows gathered and its lists copied) and on the device (the main lane routes, each shard's lane "
    "copies in the rows and the routing and keeps its pairs). Rows where the two differ:",
    "",
    f"| call a decode step | routed on the host | routed on the device |",
    "|---|---|---|",
]
shard_kinds = sorted({k for m in sharded for k, v in per_step[m].items() if v[0]})
total = {m: 0.0 for m in sharded}
for k in shard_kinds:
    counts = [per_step[m].get(k, (0, 0)) for m in sharded]
    for m, (n, _) in zip(sharded, counts):
        if k.startswith(("launch/", "cublas/")):
            total[m] += n
    if counts[0][0] != counts[1][0]:
        lines.append(f"| `{k}` | " + " | ".join(
            f"{n:g}" + (f" ({b / 1024:.1f} KiB)" if b and not k.startswith("memory") else "") for n, b in counts) + " |")
lines.append("| **kernel launches and cuBLAS calls** | " + " | ".join(f"**{total[m]:g}**" for m in sharded) + " |")
lines.append("| MoE layers routed on the device | " + " | ".join(f"{routed[m]:g}" for m in sharded) + " |")

# Each model with its MLP blocks as CUDA graphs, against the same steps without.
lines += [
    "",
    "## CUDA graphs of the MLP blocks",
    "",
    f"The same steps with `--graph-rows {batch}` (`Cuda::graph_rows`): each layer's MLP block (its norm, the "
    "router's product, the routing, the experts, their sum and the shared expert) runs as it is in the first "
    "decode step, is captured in the second and is replayed from then on: a copy of the rows in, one graph "
    "launch, a copy out and, for a MoE layer, its counts added to the step's. These runs count decode steps 2 "
    f"and {2 + steps}, so the difference is replays only. Attention stays outside the graphs. Rows where the "
    "two differ:",
    "",
    "| call a decode step | " + " | ".join(f"{m} | {m}, graphs" for m in models) + " |",
    "|---|" + "---|" * (2 * len(models)),
]
pairs = [(m, f"graphs-{m}") for m in models]
graph_kinds = sorted({k for a, b in pairs for m in (a, b) for k, v in per_step[m].items() if v[0]})
total = {m: 0.0 for a, b in pairs for m in (a, b)}
for k in graph_kinds:
    cells, differ = [], False
    for a, b in pairs:
        ca, cb = per_step[a].get(k, (0, 0)), per_step[b].get(k, (0, 0))
        differ = differ or ca[0] != cb[0]
        for m, (n, by) in ((a, ca), (b, cb)):
            cells.append(f"{n:g}" + (f" ({by / 1024:.1f} KiB)" if by and not k.startswith("memory") else ""))
            if k.startswith(("launch/", "cublas/", "graph/")):
                total[m] += n
    if differ:
        lines.append(f"| `{k}` | " + " | ".join(cells) + " |")
lines.append("| **kernel launches, cuBLAS calls and graph launches** | "
             + " | ".join(f"**{total[m]:g}**" for a, b in pairs for m in (a, b)) + " |")
for a, b in pairs:
    g = runs[b]["graphs"]
    replays = (g["replayed"] - first[b]["graphs"]["replayed"]) / steps
    assert g["eager"] == 0 and replays == runs[b]["layers"], (b, g, replays)
    lines += ["", f"{a}: {total[a]:g} calls a step without graphs, {total[b]:g} with ({total[a] / total[b]:.2f}× "
              f"fewer; {replays:g} graph launches a step, one a layer; {g['captured']} blocks captured)."]
print("\n".join(lines))
try:
    old = open(out).read()
    kept = old[old.index("<!-- kept -->"):]
except (OSError, ValueError):
    kept = ""
open(out, "w").write("\n".join(lines) + "\n" + ("\n" + kept if kept else ""))
EOF
