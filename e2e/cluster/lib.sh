# Shared by e2e/cluster/{build,up,down}; sourced, not run.
# shellcheck shell=bash

E2E_TOOLS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/tools

log() { printf '[e2e-cluster] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# tool_version DIR MODULE: the version of MODULE required by e2e/cluster/tools/DIR/go.mod.
tool_version() {
    awk -v m="$2" '$1 == "require" && $2 == m { print $3 } $1 == m && $2 ~ /^v/ { print $2 }' \
        "$E2E_TOOLS/$1/go.mod" | head -n1
}

E2E_K8S_VERSION=$(tool_version k8s k8s.io/kubernetes)
E2E_CACHE=${SPARSEMOE_CACHE:-${HOME:-/root}/.cache/sparsemoe}
E2E_BIN=$E2E_CACHE/k8s-$E2E_K8S_VERSION/bin
E2E_DIR=${SPARSEMOE_E2E_DIR:-/tmp/sparsemoe-e2e}
export E2E_K8S_VERSION E2E_CACHE E2E_BIN E2E_DIR
