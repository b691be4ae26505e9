#!/usr/bin/env bash
# Prints one hash of the sources the binaries of kernels/gpu-build.sh are built from (the engine,
# its CUDA tests and their fixtures' code, the kernels, the lock file), so that kernels/gpu-check.sh
# can refuse binaries built from another tree than the one it was carried with.
set -euo pipefail
cd "$(dirname "$0")/.."
LC_ALL=C find Cargo.toml Cargo.lock engine/Cargo.toml engine/src engine/tests/cuda.rs engine/tests/support \
    kernels/Cargo.toml kernels/src kernels/cuda -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1
