//! The operator against the real control plane (issue 7): `target/debug/sparsemoe-operator run`
//! (build it first: `cargo build -p sparsemoe-operator`) reconciles InferenceDeployments on the
//! cluster from `e2e/cluster/up`, whose kwok nodes run (pretend to run) the engine pods.
//!
//! Each test works in its own namespace with its own operator replica(s) watching only that
//! namespace (Lease in that namespace too), so the tests run side by side. Only
//! `ready_children_and_gpu_placement` (2 H200 nodes, 1 H100 node) and
//! `a_removed_variants_plan_stays_while_its_workload_does` (1 of each) use GPUs; the others run
//! the engine on the CPU pool. Every wait is bounded.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use serde_json::Value;
use sparsemoe_e2e::operator::Operator;
use sparsemoe_e2e::{Cluster, H100, H200, wait_until};

/// The longest any step waits for the operator and the cluster to converge.
const CONVERGE: Duration = Duration::from_secs(90);

/// The cluster (CRD installed), or None after printing the skip message.
fn cluster() -> Option<Cluster> {
    let cluster = Cluster::from_env()?;
    let bin = Operator::binary();
    assert!(
        bin.is_file(),
        "{} not found: run `cargo build -p sparsemoe-operator` before the e2e tests",
        bin.display()
    );
    cluster.install_crd().expect("install the CRD");
    Some(cluster)
}

/// An InferenceDeployment of the engine's demo model on the CPU pool.
fn cpu_idep(name: &str, replicas: u32, args: &[&str]) -> String {
    let args = args
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"apiVersion: sparsemoe.io/v1alpha1
kind: InferenceDeployment
metadata:
  name: {name}
spec:
  model:
    name: sparsemoe-demo
    source:
      demo: {{}}
  engine:
    args: [{args}]
    resources:
      requests: {{cpu: "1", memory: 512Mi}}
      limits: {{memory: 1Gi}}
  parallelism:
    gpusPerReplica: 0
  variants:
    - name: cpu
      nodeSelector:
        sparsemoe.io/e2e-pool: cpu
      costPerHour: "0.05"
  scaling:
    policy: fixed
    replicas: {replicas}
  rollout:
    maxSurge: 0
    maxUnavailable: 1
"#
    )
}

/// DeepSeek-V3.2 on 8 GPUs per replica with expert parallelism: 3 replicas filled in variant
/// order, 2 on H200 nodes (that variant's maxReplicas) and 1 on H100 nodes.
fn gpu_idep(name: &str) -> String {
    format!(
        r#"apiVersion: sparsemoe.io/v1alpha1
kind: InferenceDeployment
metadata:
  name: {name}
spec:
  model:
    name: deepseek-ai/DeepSeek-V3.2
    source:
      hostPath:
        path: /models/deepseek-v3.2
  parallelism:
    gpusPerReplica: 8
    expertParallel:
      enabled: true
      redundantExperts: 32
  variants:
    - name: h200
      nodeSelector:
        nvidia.com/gpu.product: {H200}
      costPerHour: "31.60"
      maxReplicas: 2
    - name: h100
      nodeSelector:
        nvidia.com/gpu.product: {H100}
      costPerHour: "21.60"
      maxReplicas: 2
  scaling:
    policy: fixed
    replicas: 3
  rollout:
    maxSurge: 0
    maxUnavailable: 1
"#
    )
}

/// examples/cost-aware-variants.yaml with its model on a host path: its H100 variant spans two
/// nodes per replica, which needs LeaderWorkerSet (not installed here).
fn multi_node_idep(name: &str) -> String {
    let example = std::fs::read_to_string(
        sparsemoe_e2e::repo_root().join("examples/cost-aware-variants.yaml"),
    )
    .expect("examples/cost-aware-variants.yaml");
    example
        .replace("name: deepseek-v32-mixed", &format!("name: {name}"))
        .replace(
            "      pvc:\n        claimName: deepseek-v32-weights\n        path: DeepSeek-V3.2\n",
            "      hostPath:\n        path: /models/deepseek-v3.2\n",
        )
}

fn get(cluster: &Cluster, ns: &str, what: &str) -> Result<Value> {
    cluster.get_json(&[what, "-n", ns])
}

/// The condition `type_` of an object's status, as (status, reason, message).
fn condition(obj: &Value, type_: &str) -> Option<(String, String, String)> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (s("status"), s("reason"), s("message"))
        })
}

/// Whether the status describes the current generation and says Ready.
fn ready_now(idep: &Value) -> bool {
    idep["status"]["observedGeneration"] == idep["metadata"]["generation"]
        && condition(idep, "Ready").is_some_and(|(s, _, _)| s == "True")
}

/// `kubectl wait --for=condition=Ready`, then (kstatus) that the Ready status describes the
/// current generation.
fn wait_ready(cluster: &Cluster, ns: &str, name: &str) -> Result<Duration> {
    let start = Instant::now();
    let target = format!("inferencedeployment/{name}");
    let timeout = format!("--timeout={}s", CONVERGE.as_secs());
    cluster
        .kubectl_ok(&["wait", "-n", ns, "--for=condition=Ready", &timeout, &target])
        .context("kubectl wait --for=condition=Ready")?;
    wait_until(CONVERGE, || Ok(ready_now(&get(cluster, ns, &target)?)))
        .with_context(|| format!("{name}: Ready for the current generation"))?;
    Ok(start.elapsed())
}

fn names(list: &Value) -> BTreeSet<String> {
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["metadata"]["name"].as_str().map(String::from))
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The Deployments labelled as InferenceDeployment `name`'s, as `kubectl get -o json` lists
/// them.
fn deployments_of(cluster: &Cluster, ns: &str, name: &str) -> Value {
    let selector = format!("sparsemoe.io/deployment={name}");
    cluster
        .get_json(&["deployments", "-n", ns, "-l", &selector])
        .unwrap()
}

/// Every object of the children's kinds in `ns` labelled as `name`'s, by kind.
fn children_of(cluster: &Cluster, ns: &str, name: &str) -> Result<Vec<(String, BTreeSet<String>)>> {
    let selector = format!("sparsemoe.io/deployment={name}");
    [
        "deployments",
        "services",
        "poddisruptionbudgets",
        "configmaps",
    ]
    .iter()
    .map(|kind| {
        let list = cluster.get_json(&[kind, "-n", ns, "-l", &selector])?;
        Ok((kind.to_string(), names(&list)))
    })
    .collect()
}

/// The pods of `name` that count as available: Ready and not terminating.
fn available_pods(pods: &Value) -> usize {
    pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter(|p| {
            p["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .count()
}

/// Checks every child of `name` is controlled by the InferenceDeployment `uid`, that there is
/// exactly the expected set of them, and that the pods come to match the desired replicas.
fn check_converged(
    cluster: &Cluster,
    ns: &str,
    name: &str,
    expected: &[(&str, &[&str])],
    pods: usize,
) -> Result<()> {
    let idep = get(cluster, ns, &format!("inferencedeployment/{name}"))?;
    let uid = idep["metadata"]["uid"].as_str().context("uid")?.to_string();
    let found = children_of(cluster, ns, name)?;
    for (kind, want) in expected {
        let have = found
            .iter()
            .find(|(k, _)| k == kind)
            .map(|(_, n)| n.clone())
            .unwrap_or_default();
        ensure!(have == set(want), "{kind}: have {have:?}, want {want:?}");
    }
    let selector = format!("sparsemoe.io/deployment={name}");
    for kind in [
        "deployments",
        "services",
        "poddisruptionbudgets",
        "configmaps",
    ] {
        let list = cluster.get_json(&[kind, "-n", ns, "-l", &selector])?;
        for o in list["items"].as_array().into_iter().flatten() {
            let owners = o["metadata"]["ownerReferences"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            ensure!(
                owners.len() == 1 && owners[0]["uid"] == uid && owners[0]["controller"] == true,
                "{kind}/{} is not controlled by {name}: {owners:?}",
                o["metadata"]["name"]
            );
        }
    }
    // Ready counts the Deployment's replicas, which leave out pods already terminating (a
    // scale-down or the last old pod of a rollout); those must be gone soon after, so the pod
    // count is waited for (bounded), not sampled once.
    let mut last = String::new();
    wait_until(CONVERGE, || {
        let pod_list = cluster.get_json(&["pods", "-n", ns, "-l", &selector])?;
        let all = pod_list["items"].as_array().map_or(0, Vec::len);
        let available = available_pods(&pod_list);
        last = format!("{all} pods ({available} available), want {pods}");
        Ok(all == pods && available == pods)
    })
    .with_context(|| last.clone())
}

/// Scenario 1: Ready, the children per variant, and GPU pods on nodes of their variant; a
/// variant that needs LeaderWorkerSet is reported Degraded, not retried hot.
#[test]
fn ready_children_and_gpu_placement() {
    let Some(cluster) = cluster() else { return };
    let ns = cluster.namespace("op-ready");
    let ns = ns.name();
    let op = Operator::start_in(&cluster, "a", ns, false).unwrap();

    let start = Instant::now();
    let tiny =
        std::fs::read_to_string(sparsemoe_e2e::repo_root().join("examples/tiny-cpu.yaml")).unwrap();
    cluster.apply_yaml(&tiny, ns).unwrap();
    cluster.apply_yaml(&gpu_idep("ds"), ns).unwrap();
    let tiny_ready = wait_ready(&cluster, ns, "tiny")
        .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", op.log()));
    wait_ready(&cluster, ns, "ds").unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", op.log()));
    eprintln!(
        "tiny Ready after {tiny_ready:?}; ds Ready after {:?}",
        start.elapsed()
    );

    check_converged(
        &cluster,
        ns,
        "tiny",
        &[
            ("deployments", &["tiny-cpu"]),
            ("services", &["tiny"]),
            ("poddisruptionbudgets", &["tiny"]),
            ("configmaps", &[]),
        ],
        1,
    )
    .unwrap();
    check_converged(
        &cluster,
        ns,
        "ds",
        &[
            ("deployments", &["ds-h200", "ds-h100"]),
            ("services", &["ds"]),
            ("poddisruptionbudgets", &["ds"]),
            ("configmaps", &["ds-placement"]),
        ],
        3,
    )
    .unwrap();

    // Status: replicas per variant, the endpoint, the selector.
    let ds = get(&cluster, ns, "inferencedeployment/ds").unwrap();
    assert_eq!(ds["status"]["readyReplicas"], 3, "{:#}", ds["status"]);
    assert_eq!(
        ds["status"]["endpoint"],
        format!("http://ds.{ns}.svc:8000/v1"),
        "{:#}",
        ds["status"]
    );

    // GPU pods: on nodes of their variant's product, 8 GPUs each; 2 on H200, 1 on H100.
    let nodes = cluster.get_json(&["nodes"]).unwrap();
    let product = |node: &str| -> String {
        nodes["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["metadata"]["name"] == node)
            .and_then(|n| n["metadata"]["labels"]["nvidia.com/gpu.product"].as_str())
            .unwrap_or("none")
            .to_string()
    };
    for (variant, gpu, count) in [("h200", H200, 2), ("h100", H100, 1)] {
        let selector = format!("sparsemoe.io/deployment=ds,sparsemoe.io/variant={variant}");
        let pods = cluster
            .get_json(&["pods", "-n", ns, "-l", &selector])
            .unwrap();
        let pods = pods["items"].as_array().unwrap();
        assert_eq!(pods.len(), count, "{variant} pods");
        let mut used_nodes = BTreeSet::new();
        for p in pods {
            let node = p["spec"]["nodeName"].as_str().unwrap_or_default();
            assert_eq!(
                product(node),
                gpu,
                "pod {} on {node}",
                p["metadata"]["name"]
            );
            used_nodes.insert(node.to_string());
            let container = &p["spec"]["containers"][0];
            assert_eq!(container["resources"]["limits"]["nvidia.com/gpu"], "8");
            assert_eq!(container["resources"]["requests"]["nvidia.com/gpu"], "8");
        }
        assert_eq!(used_nodes.len(), count, "one 8-GPU replica per node");
    }
    // The CPU pod asks for no GPU.
    let tiny_pods = cluster
        .get_json(&["pods", "-n", ns, "-l", "sparsemoe.io/deployment=tiny"])
        .unwrap();
    assert!(
        tiny_pods["items"][0]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
            .is_null()
    );

    // A multi-node variant without LeaderWorkerSet: Degraded with the reason; the single-node
    // variant still runs (costAware holds minReplicas: 1 on H200).
    cluster.apply_yaml(&multi_node_idep("mixed"), ns).unwrap();
    wait_until(CONVERGE, || {
        let m = get(&cluster, ns, "inferencedeployment/mixed")?;
        Ok(condition(&m, "Degraded")
            .is_some_and(|(s, r, _)| s == "True" && r == "LeaderWorkerSetMissing"))
    })
    .unwrap_or_else(|e| panic!("{e:#}\noperator log:\n{}", op.log()));
    let mixed = get(&cluster, ns, "inferencedeployment/mixed").unwrap();
    let (_, _, message) = condition(&mixed, "Degraded").unwrap();
    assert!(message.contains("LeaderWorkerSet"), "{message}");
    assert_eq!(
        condition(&mixed, "Ready").map(|c| c.0).as_deref(),
        Some("False"),
        "{:#}",
        mixed["status"]
    );
    let deployments = deployments_of(&cluster, ns, "mixed");
    assert_eq!(names(&deployments), set(&["mixed-h200"]));
    // Not retried hot: one reconcile's worth of writes, then quiet.
    let mark = cluster.audit_mark().unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let writes = cluster
        .writes_in(mark, Operator::USER_AGENT_PREFIX, ns)
        .unwrap();
    let on_mixed: Vec<_> = writes
        .iter()
        .filter(|w| {
            w["objectRef"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("mixed"))
        })
        .filter(|w| w["objectRef"]["resource"] != "events")
        .collect();
    assert!(
        on_mixed.len() <= 2,
        "writes on a degraded object: {on_mixed:#?}"
    );
    eprintln!("scenario 1 took {:?}", start.elapsed());
}

/// Scenario 2: a spec change rolls out with never more than maxUnavailable pods unavailable,
/// and Ready is false for the new generation until it is fully available.
#[test]
fn rollout_respects_max_unavailable_and_ready_waits_for_it() {
    let Some(cluster) = cluster() else { return };
    let ns = cluster.namespace("op-rollout");
    let ns = ns.name();
    let op = Operator::start_in(&cluster, "a", ns, false).unwrap();
    const REPLICAS: usize = 4;
    const MAX_UNAVAILABLE: usize = 1;
    cluster
        .apply_yaml(&cpu_idep("roll", REPLICAS as u32, &[]), ns)
        .unwrap();
    wait_ready(&cluster, ns, "roll").unwrap_or_else(|e| panic!("{e:#}\n{}", op.log()));
    let before = get(&cluster, ns, "deployment/roll-cpu").unwrap();
    let old_template = before["spec"]["template"].clone();

    let start = Instant::now();
    cluster
        .apply_yaml(
            &cpu_idep("roll", REPLICAS as u32, &["--log-level=debug"]),
            ns,
        )
        .unwrap();
    let generation =
        get(&cluster, ns, "inferencedeployment/roll").unwrap()["metadata"]["generation"].clone();

    // Sample pods, the Deployment and the InferenceDeployment (through a kube client: a few
    // ms a sample) until the new generation is Ready.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(cluster.client()).unwrap();
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let deployments_api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let gvk = GroupVersionKind::gvk("sparsemoe.io", "v1alpha1", "InferenceDeployment");
    let idep_api: Api<DynamicObject> =
        Api::namespaced_with(client, ns, &ApiResource::from_gvk(&gvk));
    let by_label = ListParams::default().labels("sparsemoe.io/deployment=roll");
    let sample = |what: &str| -> Value {
        rt.block_on(async {
            match what {
                "pods" => serde_json::to_value(pods_api.list(&by_label).await?),
                "deployment" => serde_json::to_value(deployments_api.get("roll-cpu").await?),
                _ => serde_json::to_value(idep_api.get("roll").await?),
            }
            .map_err(anyhow::Error::from)
        })
        .unwrap()
    };
    let mut min_available = usize::MAX;
    let mut samples = 0;
    let mut saw_not_ready = false;
    let mut template_changed = false;
    loop {
        assert!(
            start.elapsed() < CONVERGE,
            "rollout did not finish in {CONVERGE:?}\n{}",
            op.log()
        );
        let pods = sample("pods");
        let available = available_pods(&pods);
        min_available = min_available.min(available);
        samples += 1;
        assert!(
            available >= REPLICAS - MAX_UNAVAILABLE,
            "only {available} of {REPLICAS} pods available during the rollout (maxUnavailable {MAX_UNAVAILABLE})"
        );
        let idep = sample("idep");
        let deployment = sample("deployment");
        template_changed |= deployment["spec"]["template"] != old_template;
        let current = idep["status"]["observedGeneration"] == generation;
        let ready = condition(&idep, "Ready").is_some_and(|(s, _, _)| s == "True");
        if current && !ready {
            saw_not_ready = true;
        }
        if current && ready {
            // Ready for the new generation: every pod must run the new template.
            let st = &deployment["status"];
            assert_eq!(
                deployment["metadata"]["generation"], st["observedGeneration"],
                "Ready before the Deployment controller saw the new template"
            );
            for k in [
                "updatedReplicas",
                "availableReplicas",
                "replicas",
                "readyReplicas",
            ] {
                assert_eq!(
                    st[k], REPLICAS,
                    "Ready with {k}={} mid-rollout: {st:#}",
                    st[k]
                );
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        template_changed,
        "the engine args never reached the pod template"
    );
    assert!(
        saw_not_ready,
        "Ready never went false for the new generation during the rollout"
    );
    let deployment = get(&cluster, ns, "deployment/roll-cpu").unwrap();
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("--log-level=debug"), "{args}");
    check_converged(
        &cluster,
        ns,
        "roll",
        &[("deployments", &["roll-cpu"])],
        REPLICAS,
    )
    .unwrap();
    eprintln!(
        "rollout of {REPLICAS} pods took {:?}; {samples} samples, at least {min_available} available",
        start.elapsed()
    );
}

/// Scenario 3: SIGKILL the operator right after spec changes, several times; each restart
/// converges with exactly the expected children, all owned, no duplicates or orphans.
#[test]
fn sigkill_mid_reconcile_converges_without_duplicates_or_orphans() {
    let Some(cluster) = cluster() else { return };
    let ns = cluster.namespace("op-kill");
    let ns = ns.name();
    let start = Instant::now();
    // (replicas, engine args): each change is applied, and the operator SIGKILLed as soon as
    // its log shows the first child applied for it. A fault-injected pause after every child
    // apply makes that moment fall inside the reconcile: before the other children and the
    // status are written.
    let steps: [(u32, &[&str]); 4] = [
        (2, &[]),
        (3, &["--log-level=debug"]),
        (1, &["--log-level=info"]),
        (2, &[]),
    ];
    let pause = [(Operator::FAULT_PAUSE_ENV, "1500")];
    let mut op = Operator::start_in_with_env(&cluster, "a", ns, false, &pause).unwrap();
    let mut mid_reconcile = 0;
    for (i, (replicas, args)) in steps.iter().enumerate() {
        let applied_before = op.log().matches(" applied").count();
        cluster
            .apply_yaml(&cpu_idep("crash", *replicas, args), ns)
            .unwrap();
        let caught = wait_until(Duration::from_secs(10), || {
            Ok(op.log().matches(" applied").count() > applied_before)
        });
        op.kill();
        let log = op.log();
        // Killed after the first apply and before the status write: mid-reconcile.
        let status_written = get(&cluster, ns, "inferencedeployment/crash").unwrap()["status"]["observedGeneration"]
            == get(&cluster, ns, "inferencedeployment/crash").unwrap()["metadata"]["generation"];
        if caught.is_ok() && !status_written {
            mid_reconcile += 1;
        }
        // Also a crash while nothing runs: the next replica starts from an empty cache.
        op = Operator::start_in_with_env(&cluster, &format!("a{i}"), ns, false, &pause).unwrap();
        wait_ready(&cluster, ns, "crash").unwrap_or_else(|e| {
            panic!(
                "step {i}: {e:#}\nbefore the kill:\n{log}\nafter:\n{}",
                op.log()
            )
        });
        check_converged(
            &cluster,
            ns,
            "crash",
            &[
                ("deployments", &["crash-cpu"]),
                ("services", &["crash"]),
                ("poddisruptionbudgets", &["crash"]),
                ("configmaps", &[]),
            ],
            *replicas as usize,
        )
        .unwrap_or_else(|e| panic!("step {i}: {e:#}\n{}", op.log()));
        let d = get(&cluster, ns, "deployment/crash-cpu").unwrap();
        let have_args = d["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
        for a in *args {
            assert!(have_args.contains(a), "step {i}: {have_args}");
        }
    }
    // Exactly one field manager of ours on each child (no duplicate applies under other names).
    let d = cluster
        .get_json(&["deployment/crash-cpu", "-n", ns, "--show-managed-fields"])
        .unwrap();
    let managers: Vec<_> = d["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["manager"] == "sparsemoe-operator")
        .map(|m| m["operation"].clone())
        .collect();
    assert_eq!(managers, vec![Value::from("Apply")], "{managers:?}");
    assert_eq!(
        mid_reconcile,
        steps.len(),
        "every kill must land after a child apply and before the status write"
    );
    eprintln!(
        "4 kills ({mid_reconcile} mid-reconcile) and restarts converged in {:?}",
        start.elapsed()
    );
}

/// The holder of the Lease `sparsemoe-operator` in `ns`, if any.
fn lease_holder(cluster: &Cluster, ns: &str) -> Option<String> {
    let lease = cluster
        .get_json(&["lease/sparsemoe-operator", "-n", ns])
        .ok()?;
    lease["spec"]["holderIdentity"].as_str().map(String::from)
}

/// Why each replica takes the Lease under its own field manager: a free Lease is taken with an
/// unforced server-side apply of `holderIdentity`, which the API server refuses to a second
/// field manager (409, so the second replica backs off) but lets the same field manager
/// overwrite, which made two replicas lead at once.
#[test]
fn a_held_lease_conflicts_only_for_another_field_manager() {
    let Some(cluster) = cluster() else { return };
    let ns = cluster.namespace("op-lease-ssa");
    let ns = ns.name();
    let dir = tempfile_dir();
    let apply_as = |manager: &str, holder: &str| {
        let path = dir.join(format!("{manager}-{holder}.yaml"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: race\n\
                 spec:\n  holderIdentity: {holder}\n  leaseDurationSeconds: 15\n"
            ),
        )
        .unwrap();
        cluster.kubectl(&[
            "apply",
            "--server-side",
            "--field-manager",
            manager,
            "-n",
            ns,
            "-f",
            path.to_str().unwrap(),
        ])
    };
    let holder = || {
        cluster.get_json(&["lease/race", "-n", ns]).unwrap()["spec"]["holderIdentity"]
            .as_str()
            .map(String::from)
    };
    let first = apply_as("sparsemoe-operator-a", "a");
    assert!(first.success, "{}", first.stderr);
    let second = apply_as("sparsemoe-operator-b", "b");
    assert!(
        !second.success && second.stderr.to_lowercase().contains("conflict"),
        "another field manager took a held Lease: {} {}",
        second.stdout,
        second.stderr
    );
    assert_eq!(holder().as_deref(), Some("a"));
    // The old shared name: the same field manager silently replaces the holder.
    let shared = apply_as("sparsemoe-operator-a", "b");
    assert!(shared.success, "{}", shared.stderr);
    assert_eq!(holder().as_deref(), Some("b"));
}

/// A fresh directory for this test process's files.
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sparsemoe-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Scenario 4: two replicas, exactly one reconciles (the Lease holder); when it dies, the
/// other takes over.
#[test]
fn two_replicas_one_leader_and_failover() {
    let Some(cluster) = cluster() else { return };
    let ns = cluster.namespace("op-lease");
    let ns = ns.name();
    let mark = cluster.audit_mark().unwrap();
    let mut a = Operator::start_in(&cluster, "a", ns, true).unwrap();
    let mut b = Operator::start_in(&cluster, "b", ns, true).unwrap();
    let mut holder = None;
    wait_until(Duration::from_secs(30), || {
        holder = lease_holder(&cluster, ns);
        Ok(holder.is_some())
    })
    .unwrap_or_else(|e| panic!("{e:#}\na:\n{}\nb:\n{}", a.log(), b.log()));
    let first = holder.unwrap();
    assert!(first == "a" || first == "b", "holder {first}");
    // The holder took the Lease under its own field manager (see the next test for why).
    let lease = cluster
        .get_json(&[
            "lease/sparsemoe-operator",
            "-n",
            ns,
            "--show-managed-fields",
        ])
        .unwrap();
    let applied_by: Vec<&str> = lease["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["fieldsV1"]["f:spec"]["f:holderIdentity"].is_object())
        .filter_map(|f| f["manager"].as_str())
        .collect();
    assert_eq!(
        applied_by,
        [format!("sparsemoe-operator-{first}")],
        "the holder's field manager: {lease:#}"
    );
    cluster.apply_yaml(&cpu_idep("lead", 2, &[]), ns).unwrap();
    wait_ready(&cluster, ns, "lead")
        .unwrap_or_else(|e| panic!("{e:#}\na:\n{}\nb:\n{}", a.log(), b.log()));

    // Only the leader wrote anything other than the Lease.
    let (leader, standby, standby_id) = if first == "a" {
        (&mut a, &mut b, "b")
    } else {
        (&mut b, &mut a, "a")
    };
    let writes = cluster
        .writes_in(mark, Operator::USER_AGENT_PREFIX, ns)
        .unwrap();
    let by = |id: &str| -> Vec<&Value> {
        let suffix = Operator::user_agent_suffix(id);
        writes
            .iter()
            .filter(|w| {
                w["userAgent"]
                    .as_str()
                    .is_some_and(|ua| ua.ends_with(&suffix))
            })
            .filter(|w| w["objectRef"]["resource"] != "leases")
            .collect()
    };
    assert!(!by(&first).is_empty(), "the leader made no writes");
    assert!(
        by(standby_id).is_empty(),
        "the standby wrote: {:#?}",
        by(standby_id)
    );
    assert_eq!(
        standby
            .metric("sparsemoe_operator_reconciles_total")
            .unwrap(),
        0.0
    );
    assert!(
        leader
            .metric("sparsemoe_operator_reconciles_total")
            .unwrap()
            > 0.0
    );

    // The leader dies without releasing the Lease; the standby takes over once it expires.
    let killed = Instant::now();
    leader.kill();
    wait_until(Duration::from_secs(45), || {
        Ok(lease_holder(&cluster, ns).as_deref() == Some(standby_id))
    })
    .unwrap_or_else(|e| panic!("{e:#}\nstandby:\n{}", standby.log()));
    let takeover = killed.elapsed();
    // The new leader reconciles: a spec change reaches the cluster.
    let mark = cluster.audit_mark().unwrap();
    cluster.apply_yaml(&cpu_idep("lead", 3, &[]), ns).unwrap();
    wait_ready(&cluster, ns, "lead").unwrap_or_else(|e| panic!("{e:#}\n{}", standby.log()));
    check_converged(&cluster, ns, "lead", &[("deployments", &["lead-cpu"])], 3).unwrap();
    let writes = cluster
        .writes_in(mark, Operator::USER_AGENT_PREFIX, ns)
        .unwrap();
    assert!(
        writes
            .iter()
            .filter(|w| w["objectRef"]["resource"] != "leases")
            .all(|w| w["userAgent"]
                .as_str()
                .unwrap_or_default()
                .ends_with(&Operator::user_agent_suffix(standby_id))),
        "{writes:#?}"
    );
    eprintln!("leader {first} killed; {standby_id} took over after {takeover:?}");
}

/// Scenario 5: deleting the InferenceDeployment garbage-collects every child.
#[test]
fn delete_garbage_collects_every_child() {
    let Some(cluster) = cluster() else { return };
    let ns = cluster.namespace("op-gc");
    let ns = ns.name();
    let op = Operator::start_in(&cluster, "a", ns, false).unwrap();
    cluster.apply_yaml(&cpu_idep("gone", 2, &[]), ns).unwrap();
    wait_ready(&cluster, ns, "gone").unwrap_or_else(|e| panic!("{e:#}\n{}", op.log()));
    let children = children_of(&cluster, ns, "gone").unwrap();
    assert!(
        children.iter().filter(|(_, n)| !n.is_empty()).count() >= 3,
        "{children:?}"
    );

    let start = Instant::now();
    cluster
        .kubectl_ok(&[
            "delete",
            "-n",
            ns,
            "inferencedeployment/gone",
            "--wait=true",
        ])
        .unwrap();
    wait_until(CONVERGE, || {
        let left = children_of(&cluster, ns, "gone")?;
        let pods = cluster.get_json(&["pods", "-n", ns, "-l", "sparsemoe.io/deployment=gone"])?;
        let rs = cluster.get_json(&[
            "replicasets",
            "-n",
            ns,
            "-l",
            "sparsemoe.io/deployment=gone",
        ])?;
        Ok(left.iter().all(|(_, n)| n.is_empty())
            && names(&pods).is_empty()
            && names(&rs).is_empty())
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}: left {:?}",
            children_of(&cluster, ns, "gone").unwrap_or_default()
        )
    });
    eprintln!("every child gone {:?} after the delete", start.elapsed());
}

/// Scenario 6: a settled operator makes zero writes over 60 s, even though it reconciles
/// (each InferenceDeployment is poked with an annotation every 5 s, which triggers a reconcile).
#[test]
fn steady_state_makes_zero_writes() {
    let Some(cluster) = cluster() else { return };
    let ns = cluster.namespace("op-steady");
    let ns = ns.name();
    let op = Operator::start_in(&cluster, "a", ns, false).unwrap();
    cluster.apply_yaml(&cpu_idep("calm", 2, &[]), ns).unwrap();
    cluster
        .apply_yaml(&cpu_idep("still", 1, &["--log-level=info"]), ns)
        .unwrap();
    for name in ["calm", "still"] {
        wait_ready(&cluster, ns, name).unwrap_or_else(|e| panic!("{e:#}\n{}", op.log()));
    }
    // Let the last status write and events land.
    std::thread::sleep(Duration::from_secs(3));
    let mark = cluster.audit_mark().unwrap();
    let reconciles_before = op.metric("sparsemoe_operator_reconciles_total").unwrap();
    let writes_before = op.metric("sparsemoe_operator_api_writes_total").unwrap();
    let start = Instant::now();
    let mut poke = 0;
    while start.elapsed() < Duration::from_secs(60) {
        poke += 1;
        for name in ["calm", "still"] {
            cluster
                .kubectl_ok(&[
                    "annotate",
                    "-n",
                    ns,
                    "--overwrite",
                    &format!("inferencedeployment/{name}"),
                    &format!("e2e.sparsemoe.io/poke={poke}"),
                ])
                .unwrap();
        }
        std::thread::sleep(Duration::from_secs(5));
    }
    let writes = cluster
        .writes_in(mark, Operator::USER_AGENT_PREFIX, ns)
        .unwrap();
    let reconciles = op.metric("sparsemoe_operator_reconciles_total").unwrap() - reconciles_before;
    assert!(
        writes.is_empty(),
        "{} writes at steady state: {writes:#?}\n{}",
        writes.len(),
        op.log()
    );
    assert_eq!(
        op.metric("sparsemoe_operator_api_writes_total").unwrap(),
        writes_before
    );
    assert!(
        reconciles >= 2.0 * (poke as f64) - 2.0,
        "only {reconciles} reconciles for {poke} pokes"
    );
    eprintln!("60 s steady: {reconciles} reconciles, 0 writes");
}

/// Scenario 7: a workload changed by hand (`kubectl scale`, an edited image) is put back as the
/// spec says (drift repair), by the reconcile its change triggers, and the operator is quiet
/// again afterwards.
#[test]
fn a_child_changed_by_hand_is_put_back() {
    let Some(cluster) = cluster() else { return };
    let ns = cluster.namespace("op-drift");
    let ns = ns.name();
    let op = Operator::start_in(&cluster, "a", ns, false).unwrap();
    cluster.apply_yaml(&cpu_idep("drift", 2, &[]), ns).unwrap();
    wait_ready(&cluster, ns, "drift").unwrap_or_else(|e| panic!("{e:#}\n{}", op.log()));
    let deployment = "deployment/drift-cpu";
    let image = |d: &Value| d["spec"]["template"]["spec"]["containers"][0]["image"].clone();
    let before = get(&cluster, ns, deployment).unwrap();
    assert_eq!(before["spec"]["replicas"], 2);

    cluster
        .kubectl_ok(&["scale", "-n", ns, deployment, "--replicas=4"])
        .unwrap();
    cluster
        .kubectl_ok(&[
            "set",
            "image",
            "-n",
            ns,
            deployment,
            "engine=example.invalid/other:1",
        ])
        .unwrap();
    let start = Instant::now();
    wait_until(CONVERGE, || {
        let d = get(&cluster, ns, deployment)?;
        Ok(d["spec"]["replicas"] == 2 && image(&d) == image(&before))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}: {:#}\n{}",
            get(&cluster, ns, deployment).unwrap_or_default()["spec"],
            op.log()
        )
    });
    assert!(
        op.log().contains("changed by someone else"),
        "no drift repair in the log:\n{}",
        op.log()
    );
    wait_ready(&cluster, ns, "drift").unwrap_or_else(|e| panic!("{e:#}\n{}", op.log()));
    eprintln!(
        "scaled and re-imaged by hand; put back after {:?}",
        start.elapsed()
    );

    // A Service has no generation: its edited selector is put back all the same.
    let selector = |s: &Value| s["spec"]["selector"].clone();
    let service = get(&cluster, ns, "service/drift").unwrap();
    cluster
        .kubectl_ok(&[
            "patch",
            "-n",
            ns,
            "service/drift",
            "-p",
            r#"{"spec":{"selector":{"app":"someone-else"}}}"#,
        ])
        .unwrap();
    wait_until(CONVERGE, || {
        let now = get(&cluster, ns, "service/drift")?;
        Ok(selector(&now) == selector(&service))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}: {:#}\n{}",
            get(&cluster, ns, "service/drift").unwrap_or_default()["spec"],
            op.log()
        )
    });

    // Settled again: a reconcile (an annotation on the object) writes nothing.
    std::thread::sleep(Duration::from_secs(3));
    let mark = cluster.audit_mark().unwrap();
    cluster
        .kubectl_ok(&[
            "annotate",
            "-n",
            ns,
            "--overwrite",
            "inferencedeployment/drift",
            "e2e.sparsemoe.io/poke=1",
        ])
        .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let writes = cluster
        .writes_in(mark, Operator::USER_AGENT_PREFIX, ns)
        .unwrap();
    assert!(writes.is_empty(), "writes once settled: {writes:#?}");
}

/// Waits until `target` is `Degraded=True` with `reason`; its message.
fn wait_degraded(cluster: &Cluster, ns: &str, target: &str, reason: &str, op: &Operator) -> String {
    wait_until(CONVERGE, || {
        let idep = get(cluster, ns, target)?;
        Ok(condition(&idep, "Degraded").is_some_and(|(s, r, _)| s == "True" && r == reason))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}: {:#}\n{}",
            get(cluster, ns, target).unwrap_or_default()["status"],
            op.log()
        )
    });
    condition(&get(cluster, ns, target).unwrap(), "Degraded")
        .unwrap()
        .2
}

/// Scenario 8: a spec the CRD lets through but a child's API refuses (memory requested above its
/// limit) is `Degraded: ApplyRejected` with the API server's message, the other children are
/// still applied, and a fixed spec then goes Ready.
#[test]
fn a_child_the_api_server_refuses_is_reported() {
    let Some(cluster) = cluster() else { return };
    let ns = cluster.namespace("op-refused");
    let ns = ns.name();
    let op = Operator::start_in(&cluster, "a", ns, false).unwrap();
    let good = cpu_idep("refused", 1, &[]);
    let bad = good.replace("limits: {memory: 1Gi}", "limits: {memory: 256Mi}");
    assert_ne!(bad, good);
    cluster.apply_yaml(&bad, ns).unwrap();
    let target = "inferencedeployment/refused";
    let message = wait_degraded(&cluster, ns, target, "ApplyRejected", &op);
    let idep = get(&cluster, ns, target).unwrap();
    assert!(
        message.contains("Deployment refused-cpu") && message.contains("memory"),
        "{message}"
    );
    assert_eq!(
        idep["status"]["observedGeneration"],
        idep["metadata"]["generation"]
    );
    // The Deployment was refused; the Service after it was still applied.
    let children = children_of(&cluster, ns, "refused").unwrap();
    let of = |kind: &str| {
        children
            .iter()
            .find(|(k, _)| k == kind)
            .map(|(_, n)| n.clone())
            .unwrap_or_default()
    };
    assert!(of("deployments").is_empty(), "{children:?}");
    assert_eq!(of("services"), set(&["refused"]), "{children:?}");

    cluster.apply_yaml(&good, ns).unwrap();
    wait_ready(&cluster, ns, "refused").unwrap_or_else(|e| panic!("{e:#}\n{}", op.log()));
    let idep = get(&cluster, ns, target).unwrap();
    assert_eq!(condition(&idep, "Degraded").unwrap().0, "False");
}

/// Scenario 9: a child's name already taken by someone else's object (a user's Service named
/// like the InferenceDeployment, without a selector, so that an apply would merge into it
/// rather than conflict) is `Degraded: NameConflict`, and that object is left as it was (not
/// taken over, so not garbage-collected with the InferenceDeployment); the other children are
/// made all the same.
#[test]
fn a_taken_child_name_is_a_conflict_not_a_takeover() {
    let Some(cluster) = cluster() else { return };
    let ns = cluster.namespace("op-taken");
    let ns = ns.name();
    let op = Operator::start_in(&cluster, "a", ns, false).unwrap();
    let users = r#"apiVersion: v1
kind: Service
metadata:
  name: taken
spec:
  ports:
    - {name: web, port: 9999}
"#;
    cluster.apply_yaml(users, ns).unwrap();
    cluster.apply_yaml(&cpu_idep("taken", 1, &[]), ns).unwrap();
    let target = "inferencedeployment/taken";
    let message = wait_degraded(&cluster, ns, target, "NameConflict", &op);
    assert!(message.contains("Service taken"), "{message}");
    let service = get(&cluster, ns, "service/taken").unwrap();
    assert!(service["spec"]["selector"].is_null(), "{service:#}");
    let ports = service["spec"]["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 1, "{service:#}");
    assert!(
        service["metadata"]["ownerReferences"].is_null(),
        "taken over: {service:#}"
    );
    // The Deployment was made regardless.
    wait_until(CONVERGE, || {
        Ok(get(&cluster, ns, "deployment/taken-cpu").is_ok_and(|d| d["spec"]["replicas"] == 1))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", op.log()));
}

/// Scenario 10: a variant renamed. The old name's Deployment keeps serving until the new one's
/// pods are all available, and only then goes (make before break): at every look the two
/// together have at least the replicas asked for available.
#[test]
fn a_renamed_variant_is_made_before_the_old_is_broken() {
    let Some(cluster) = cluster() else { return };
    let ns = cluster.namespace("op-rename");
    let ns = ns.name();
    let op = Operator::start_in(&cluster, "a", ns, false).unwrap();
    let before = cpu_idep("rename", 2, &[]);
    cluster.apply_yaml(&before, ns).unwrap();
    wait_ready(&cluster, ns, "rename").unwrap_or_else(|e| panic!("{e:#}\n{}", op.log()));
    let renamed = before.replace("    - name: cpu\n", "    - name: cpu-b\n");
    assert_ne!(renamed, before);
    cluster.apply_yaml(&renamed, ns).unwrap();
    let start = Instant::now();
    let mut looks = 0;
    loop {
        let list = deployments_of(&cluster, ns, "rename");
        let available: i64 = list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| d["status"]["availableReplicas"].as_i64().unwrap_or(0))
            .sum();
        looks += 1;
        assert!(
            available >= 2,
            "look {looks}: {available} available over {:?}\n{}",
            names(&list),
            op.log()
        );
        if names(&list) == set(&["rename-cpu-b"]) {
            break;
        }
        assert!(
            start.elapsed() < CONVERGE,
            "the old Deployment never went: {:?}\n{}",
            names(&list),
            op.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_ready(&cluster, ns, "rename").unwrap_or_else(|e| panic!("{e:#}\n{}", op.log()));
    eprintln!(
        "renamed a variant: the old Deployment went after {:?} ({looks} looks)",
        start.elapsed()
    );
}

/// Expert plans by GPU shape: an 8-GPU H200 variant and a 4-GPU H100 variant each mount the
/// ConfigMap key of their own shape. When the H200 variant is removed, its Deployment keeps
/// serving until the spec's workloads are rolled out, and as long as it is there the plan its
/// pods mount stays in the ConfigMap (a pod of it that restarts must find a plan for 8 GPUs);
/// once it is gone, so is its plan.
#[test]
fn a_removed_variants_plan_stays_while_its_workload_does() {
    let Some(cluster) = cluster() else { return };
    let ns = cluster.namespace("op-plans");
    let ns = ns.name();
    // A pause after each apply, so that a plan dropped before its workload would be seen.
    let pause = [(Operator::FAULT_PAUSE_ENV, "300")];
    let op = Operator::start_in_with_env(&cluster, "a", ns, false, &pause).unwrap();
    let spec = |variants: &str, replicas: u32| {
        format!(
            r#"apiVersion: sparsemoe.io/v1alpha1
kind: InferenceDeployment
metadata:
  name: plans
spec:
  model:
    name: deepseek-ai/DeepSeek-V3.2
    source:
      hostPath:
        path: /models/deepseek-v3.2
  parallelism:
    gpusPerReplica: 8
    expertParallel:
      enabled: true
  variants:
{variants}  scaling:
    policy: fixed
    replicas: {replicas}
"#
        )
    };
    let h100 = format!(
        "    - name: h100\n      gpusPerReplica: 4\n      nodeSelector:\n        nvidia.com/gpu.product: {H100}\n      costPerHour: \"10.80\"\n      maxReplicas: 1\n"
    );
    let h200 = format!(
        "    - name: h200\n      nodeSelector:\n        nvidia.com/gpu.product: {H200}\n      costPerHour: \"31.60\"\n      maxReplicas: 1\n"
    );
    cluster
        .apply_yaml(&spec(&format!("{h200}{h100}"), 2), ns)
        .unwrap();
    wait_ready(&cluster, ns, "plans").unwrap_or_else(|e| panic!("{e:#}\n{}", op.log()));
    let keys = || -> BTreeSet<String> {
        let cm = get(&cluster, ns, "configmap/plans-placement").unwrap();
        cm["data"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k.clone())
            .collect()
    };
    let (k8, k4) = ("placement-8gpu-1node.json", "placement-4gpu-1node.json");
    assert_eq!(keys(), set(&[k8, k4]));
    for (deployment, key) in [("plans-h200", k8), ("plans-h100", k4)] {
        let d = get(&cluster, ns, &format!("deployment/{deployment}")).unwrap();
        let volumes = d["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
        let placement = volumes.iter().find(|v| v["name"] == "placement").unwrap();
        assert_eq!(
            placement["configMap"]["items"][0]["key"], key,
            "{deployment}"
        );
    }

    cluster.apply_yaml(&spec(&h100, 1), ns).unwrap();
    let start = Instant::now();
    let mut looks = 0;
    loop {
        let list = deployments_of(&cluster, ns, "plans");
        let have = keys();
        looks += 1;
        if names(&list).contains("plans-h200") {
            assert!(
                have.contains(k8),
                "look {looks}: plans-h200 still serves, its plan is gone: {have:?}\n{}",
                op.log()
            );
        } else if have == set(&[k4]) {
            break;
        }
        assert!(
            start.elapsed() < CONVERGE,
            "never settled: {:?}, keys {have:?}\n{}",
            names(&list),
            op.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_ready(&cluster, ns, "plans").unwrap_or_else(|e| panic!("{e:#}\n{}", op.log()));
    eprintln!(
        "removed a variant: its plan went with its Deployment after {:?} ({looks} looks)",
        start.elapsed()
    );
}

/// Workloads left by a `--cascade=orphan` delete: the InferenceDeployment applied again adopts
/// the one its spec still names and, once that serves, deletes the one of the variant it no
/// longer has, rather than leaving it running without an owner.
#[test]
fn an_orphaned_workload_of_a_removed_variant_is_deleted() {
    let Some(cluster) = cluster() else { return };
    let ns = cluster.namespace("op-orphans");
    let ns = ns.name();
    let op = Operator::start_in(&cluster, "a", ns, false).unwrap();
    let one = cpu_idep("orphans", 1, &[]);
    let second = "    - name: cpu-b\n      nodeSelector:\n        sparsemoe.io/e2e-pool: cpu\n      costPerHour: \"0.05\"\n      maxReplicas: 1\n";
    let two = one
        .replace(
            "      costPerHour: \"0.05\"\n",
            "      costPerHour: \"0.05\"\n      maxReplicas: 1\n",
        )
        .replace("  scaling:\n", &format!("{second}  scaling:\n"))
        .replace("    replicas: 1\n", "    replicas: 2\n");
    assert_ne!(two, one);
    cluster.apply_yaml(&two, ns).unwrap();
    wait_ready(&cluster, ns, "orphans").unwrap_or_else(|e| panic!("{e:#}\n{}", op.log()));
    let deployments = || {
        let list = deployments_of(&cluster, ns, "orphans");
        names(&list)
    };
    assert_eq!(deployments(), set(&["orphans-cpu", "orphans-cpu-b"]));

    cluster
        .kubectl_ok(&[
            "delete",
            "-n",
            ns,
            "inferencedeployment/orphans",
            "--cascade=orphan",
            "--wait",
        ])
        .unwrap();
    assert_eq!(
        deployments(),
        set(&["orphans-cpu", "orphans-cpu-b"]),
        "orphaned, not deleted"
    );
    cluster.apply_yaml(&one, ns).unwrap();
    wait_until(CONVERGE, || Ok(deployments() == set(&["orphans-cpu"])))
        .unwrap_or_else(|e| panic!("{e:#}: {:?}\n{}", deployments(), op.log()));
    wait_ready(&cluster, ns, "orphans").unwrap_or_else(|e| panic!("{e:#}\n{}", op.log()));
    check_converged(
        &cluster,
        ns,
        "orphans",
        &[("deployments", &["orphans-cpu"])],
        1,
    )
    .unwrap();
}

/// Under a holding policy (`queueDepth` holds what runs while no engine's metrics can be read,
/// as here, where no engine listens), a renamed variant's replicas move to the new name rather
/// than falling back to minReplicas.
#[test]
fn a_renamed_variant_keeps_its_held_replicas() {
    let Some(cluster) = cluster() else { return };
    let ns = cluster.namespace("op-hold");
    let ns = ns.name();
    let op = Operator::start_in(&cluster, "a", ns, false).unwrap();
    let holding = |min: u32| {
        cpu_idep("hold", 1, &[]).replace(
            "    policy: fixed\n    replicas: 1\n",
            &format!("    policy: queueDepth\n    minReplicas: {min}\n    maxReplicas: 3\n"),
        )
    };
    let before = holding(2);
    assert!(before.contains("queueDepth"));
    cluster.apply_yaml(&before, ns).unwrap();
    wait_ready(&cluster, ns, "hold").unwrap_or_else(|e| panic!("{e:#}\n{}", op.log()));
    // Renamed, and minReplicas lowered: 2 run, and 2 are held under the new name.
    let renamed = holding(1).replace("    - name: cpu\n", "    - name: cpu-b\n");
    cluster.apply_yaml(&renamed, ns).unwrap();
    let replicas = || {
        let list = deployments_of(&cluster, ns, "hold");
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                let name = d["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                (name, d["spec"]["replicas"].as_i64().unwrap_or(0))
            })
            .collect::<Vec<_>>()
    };
    wait_until(CONVERGE, || {
        Ok(replicas() == [("hold-cpu-b".to_string(), 2)])
    })
    .unwrap_or_else(|e| panic!("{e:#}: {:?}\n{}", replicas(), op.log()));
    wait_ready(&cluster, ns, "hold").unwrap_or_else(|e| panic!("{e:#}\n{}", op.log()));
}
