#!/usr/bin/env bash
# Builds, on the build machine, the binaries kernels/gpu-check.sh runs on the GPU machine (which
# has no Rust toolchain): the release engine and the CUDA test binary (engine/tests/cuda.rs),
# stripped, into target/gpu-check/ (ignored by git; pass it in the device call's `carry`), with
# the hash of their sources (kernels/gpu-sources.sh) in SOURCES.
#   kernels/gpu-build.sh && ls -la target/gpu-check
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu-check
rm -rf "$out"
mkdir -p "$out"
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
# What they were built from: gpu-check.sh refuses them for another tree.
kernels/gpu-sources.sh >"$out/SOURCES"
ls -la "$out"
