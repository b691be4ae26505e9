#!/usr/bin/env bash
# Operator scale benchmark (issue 7): N InferenceDeployments (default 1000) created at once on the
# e2e control plane; reports time to all-Ready, the operator's API requests per object (audit log,
# by its User-Agent), its peak RSS and CPU seconds, and writes bench/results/operator-scale.md.
#
#   export SPARSEMOE_E2E_KUBECONFIG=$(e2e/cluster/up)
#   cargo build --release -p sparsemoe-operator && bench/operator-scale.sh
#
# Adds 10 kwok CPU nodes (bench-cpu-*, 110 pods each) for the 1 pod per object and removes them,
# with the namespace, at the end. Goal: < 120 s, <= 10 requests/object, RSS < 150 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${SPARSEMOE_E2E_KUBECONFIG:?run e2e/cluster/up and set SPARSEMOE_E2E_KUBECONFIG}"
N="${N:-1000}"
TIMEOUT="${TIMEOUT:-600}"
BIN="${SPARSEMOE_OPERATOR_BIN:-target/release/sparsemoe-operator}"
CLIENTS="${CLIENTS:-4}" # concurrent `kubectl create`s, as a GitOps tool applies in parallel
[[ $CLIENTS =~ ^[1-9][0-9]*$ ]] || { echo "CLIENTS must be a whole number >= 1, got '$CLIENTS'" >&2; exit 2; }
STATE="$(dirname "$SPARSEMOE_E2E_KUBECONFIG")"
KUBECTL="$STATE/bin/kubectl"
k() { "$KUBECTL" --kubeconfig "$SPARSEMOE_E2E_KUBECONFIG" "$@"; }
NS=bench-scale
OUT="${OUT:-bench/results/operator-scale.md}"
WORK="$(mktemp -d)"

cleanup() {
    [ -n "${OP_PID:-}" ] && kill -9 "$OP_PID" 2>/dev/null || true
    k delete namespace "$NS" --wait=false >/dev/null 2>&1 || true
    k delete node -l sparsemoe.io/e2e-pool=bench --wait=false >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

k apply --server-side -f crds/sparsemoe.io_inferencedeployments.yaml >/dev/null
k wait --for=condition=Established --timeout=60s crd/inferencedeployments.sparsemoe.io >/dev/null
for i in $(seq 0 9); do
    cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: bench-cpu-$i
  annotations: {node.alpha.kubernetes.io/ttl: "0", kwok.x-k8s.io/node: fake}
  labels: {kubernetes.io/hostname: bench-cpu-$i, type: kwok, sparsemoe.io/e2e-pool: bench}
status:
  capacity: {cpu: "192", memory: 2Ti, pods: "110"}
  allocatable: {cpu: "190", memory: 2000Gi, pods: "110"}
EOF
done >"$WORK/nodes.yaml"
k apply -f "$WORK/nodes.yaml" >/dev/null
k wait --for=condition=Ready node -l sparsemoe.io/e2e-pool=bench --timeout=60s >/dev/null
k create namespace "$NS" >/dev/null
until k get serviceaccount default -n "$NS" >/dev/null 2>&1; do sleep 0.5; done

for i in $(seq 1 "$N"); do
    # round-robin over $CLIENTS files, one per concurrent `kubectl create`
    cat >>"$WORK/ideps-$((i % CLIENTS)).yaml" <<EOF
---
apiVersion: sparsemoe.io/v1alpha1
kind: InferenceDeployment
metadata: {name: s$i}
spec:
  model: {name: sparsemoe-demo, source: {demo: {}}}
  engine: {resources: {requests: {cpu: 100m, memory: 64Mi}}}
  parallelism: {gpusPerReplica: 0}
  variants: [{name: cpu, costPerHour: "0.05", nodeSelector: {sparsemoe.io/e2e-pool: bench}}]
  scaling: {policy: fixed, replicas: 1}
EOF
done

RUST_LOG=warn KUBECONFIG="$SPARSEMOE_E2E_KUBECONFIG" "$BIN" run --leader-election false \
    --identity bench --watch-namespace "$NS" --http-addr 127.0.0.1:0 \
    2>"$STATE/logs/operator-bench.log" &
OP_PID=$!
sleep 2
MARK=$(wc -l <"$STATE/logs/audit.log")
START=$(date +%s.%N)
pids=()
for f in "$WORK"/ideps-*.yaml; do k create -f "$f" -n "$NS" >/dev/null & pids+=($!); done
for p in "${pids[@]}"; do wait "$p"; done
CREATED=$(date +%s.%N)
ready=0
while :; do
    ready=$(k get inferencedeployments -n "$NS" \
        -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' |
        grep -c '^True$' || true)
    now=$(date +%s.%N)
    [ "$ready" -ge "$N" ] && break
    if awk -v s="$START" -v n="$now" -v t="$TIMEOUT" 'BEGIN{exit !(n-s>t)}'; then
        echo "timed out: $ready of $N Ready after ${TIMEOUT}s" >&2
        break
    fi
    sleep 2
done
END=$(date +%s.%N)
CLK=$(getconf CLK_TCK)
read -r UT ST < <(awk '{print $14, $15}' "/proc/$OP_PID/stat")
CPU=$(awk -v u="$UT" -v s="$ST" -v c="$CLK" 'BEGIN{printf "%.1f", (u+s)/c}')
RSS_KB=$(awk '/VmHWM/{print $2}' "/proc/$OP_PID/status")
tail -n +"$((MARK + 1))" "$STATE/logs/audit.log" >"$WORK/audit.log"
REQS=$(grep '"stage":"ResponseComplete"' "$WORK/audit.log" | grep -c '"userAgent":"sparsemoe-operator/' || true)
WRITES=$(grep '"stage":"ResponseComplete"' "$WORK/audit.log" | grep '"userAgent":"sparsemoe-operator/' |
    grep -cE '"verb":"(create|update|patch|delete)"' || true)
ELAPSED=$(awk -v s="$START" -v e="$END" 'BEGIN{printf "%.1f", e-s}')
CREATE_S=$(awk -v s="$START" -v e="$CREATED" 'BEGIN{printf "%.1f", e-s}')
PER=$(awk -v r="$REQS" -v n="$N" 'BEGIN{printf "%.2f", r/n}')
RSS_MIB=$(awk -v k="$RSS_KB" 'BEGIN{printf "%.1f", k/1024}')

mkdir -p "$(dirname "$OUT")"
cat >"$OUT" <<EOF
# Operator scale benchmark

\`bench/operator-scale.sh\` on the e2e control plane (kube-apiserver/controller-manager/scheduler
v1.34.12, etcd, kwok; 10 extra kwok CPU nodes), one operator (\`$BIN\`, no leader election,
watching one namespace): $N InferenceDeployments (demo model, 1 CPU replica each) created by
$CLIENTS concurrent \`kubectl create\`s.

| measure | value | goal |
|---|---|---|
| InferenceDeployments Ready | $ready of $N | all |
| time from create to all Ready | ${ELAPSED} s (the \`kubectl create\` itself: ${CREATE_S} s) | < 120 s |
| operator API requests (audit log, by User-Agent) | $REQS (${PER} per object; $WRITES writes) | <= 10 per object |
| operator peak RSS (VmHWM) | ${RSS_MIB} MiB | < 150 MiB |
| operator CPU time | ${CPU} s | |

Machine: $(nproc) cores ($(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)),
$(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo) memory; the control plane, kwok and
the operator share it with other work (load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)).
Run on $(date -u +%Y-%m-%d).
EOF
cat "$OUT"
