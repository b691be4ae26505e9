//! The local control plane itself, and the CRD on a real API server: structural schema, CEL rules
//! and their messages, GPU-node scheduling by the real scheduler, garbage collection by the real
//! controller manager. Each test skips (and says so) without `SPARSEMOE_E2E_KUBECONFIG`.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, PostParams};
use sparsemoe_e2e::{
    Cluster, GPUS_PER_NODE, H100, H200, NODES_PER_POOL, expected_message, repo_root, wait_until,
    yaml_files,
};

const GPU_PRODUCT: &str = "nvidia.com/gpu.product";

#[test]
fn crd_installs_and_is_served() {
    let Some(cluster) = Cluster::from_env() else {
        return;
    };
    cluster.install_crd().unwrap();
    let crd = cluster
        .get_json(&["crd", "inferencedeployments.sparsemoe.io"])
        .unwrap();
    assert_eq!(crd["spec"]["group"], "sparsemoe.io");
    let conditions = crd["status"]["conditions"].as_array().unwrap();
    for wanted in ["NamesAccepted", "Established"] {
        assert!(
            conditions
                .iter()
                .any(|c| c["type"] == wanted && c["status"] == "True"),
            "CRD condition {wanted} is not True: {conditions:?}"
        );
    }
    // The short name and the /scale subresource are served.
    let resources = cluster
        .kubectl_ok(&["api-resources", "--api-group=sparsemoe.io", "-o", "wide"])
        .unwrap();
    assert!(resources.contains("idep"), "{resources}");
}

#[test]
fn every_invalid_example_is_rejected_with_its_message() {
    let Some(cluster) = Cluster::from_env() else {
        return;
    };
    cluster.install_crd().unwrap();
    let ns = cluster.namespace("invalid");
    let mut failures = Vec::new();
    let files = yaml_files(&repo_root().join("examples/invalid"));
    assert!(!files.is_empty());
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expected = expected_message(&text)
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", file.display()));
        let name = file.file_name().unwrap().to_string_lossy();
        match cluster.apply_file(file, ns.name()) {
            Ok(out) => failures.push(format!(
                "{name}: accepted ({}), expected rejection with {expected:?}",
                out.trim()
            )),
            Err(err) if !err.contains(&expected) => failures.push(format!(
                "{name}: rejected with a different message\n    expected: {expected}\n    server:   {}",
                err.trim()
            )),
            Err(_) => {}
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} invalid examples misbehaved on the real API server:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn every_valid_example_is_accepted() {
    let Some(cluster) = Cluster::from_env() else {
        return;
    };
    cluster.install_crd().unwrap();
    let ns = cluster.namespace("valid");
    let files = yaml_files(&repo_root().join("examples"));
    assert!(files.len() >= 3);
    let mut failures = Vec::new();
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy();
        if let Err(err) = cluster.apply_file(file, ns.name()) {
            failures.push(format!("{name}: {}", err.trim()));
        }
    }
    assert!(
        failures.is_empty(),
        "the real API server rejected valid examples:\n{}",
        failures.join("\n")
    );
    let listed = cluster
        .get_json(&["inferencedeployments", "-n", ns.name()])
        .unwrap();
    assert_eq!(
        listed["items"].as_array().unwrap().len(),
        files.len(),
        "one InferenceDeployment per example"
    );
    // A server-side dry run of the same objects changes nothing (no defaulting drift).
    for file in &files {
        let out = cluster
            .kubectl_ok(&[
                "apply",
                "-n",
                ns.name(),
                "--dry-run=server",
                "-f",
                &file.to_string_lossy(),
            ])
            .unwrap();
        assert!(out.contains("unchanged"), "{}: {out}", file.display());
    }
}

#[test]
fn fake_gpu_nodes_are_ready_with_eight_gpus() {
    let Some(cluster) = Cluster::from_env() else {
        return;
    };
    let nodes = cluster.get_json(&["nodes"]).unwrap();
    let mut per_product: BTreeMap<String, usize> = BTreeMap::new();
    for node in nodes["items"].as_array().unwrap() {
        let ready = node["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        assert!(ready, "node {} is not Ready", node["metadata"]["name"]);
        if let Some(product) = node["metadata"]["labels"][GPU_PRODUCT].as_str() {
            assert_eq!(
                node["status"]["allocatable"]["nvidia.com/gpu"],
                GPUS_PER_NODE.to_string()
            );
            *per_product.entry(product.to_string()).or_default() += 1;
        }
    }
    assert_eq!(per_product.get(H200), Some(&NODES_PER_POOL));
    assert_eq!(per_product.get(H100), Some(&NODES_PER_POOL));
}

/// A Deployment with `nodeSelector` + `nvidia.com/gpu` limits: the real scheduler places every
/// pod on the requested pool, kwok marks them Ready, and the pool's GPU capacity is a real limit.
#[tokio::test]
async fn gpu_deployment_lands_on_its_pool_and_capacity_is_enforced() {
    let Some(cluster) = Cluster::from_env() else {
        return;
    };
    let ns = cluster.namespace("gpu-sched");
    let client = cluster.client().await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns.name());
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let nodes: Api<Node> = Api::all(client.clone());

    // Two replicas of 4 H100 GPUs each fit.
    deployments
        .create(
            &PostParams::default(),
            &gpu_deployment("h100-pair", H100, 2, 4),
        )
        .await
        .unwrap();
    wait_available(&deployments, "h100-pair", 2).await;
    let placed = pods
        .list(&ListParams::default().labels("app=h100-pair"))
        .await
        .unwrap();
    assert_eq!(placed.items.len(), 2);
    for pod in &placed.items {
        let spec = pod.spec.as_ref().unwrap();
        let node_name = spec.node_name.as_deref().expect("scheduled");
        let node = nodes.get(node_name).await.unwrap();
        let labels = node.metadata.labels.unwrap_or_default();
        assert_eq!(
            labels.get(GPU_PRODUCT).map(String::as_str),
            Some(H100),
            "pod on {node_name}"
        );
        let gpus = &spec.containers[0]
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap()["nvidia.com/gpu"];
        assert_eq!(gpus.0, "4");
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
    }

    // Five replicas of a whole H200 node (8 GPUs) on a 4-node pool: 4 run, 1 stays Pending with
    // the scheduler saying why.
    deployments
        .create(
            &PostParams::default(),
            &gpu_deployment("h200-full", H200, 5, 8),
        )
        .await
        .unwrap();
    wait_available(&deployments, "h200-full", NODES_PER_POOL as i32).await;
    let lp = ListParams::default().labels("app=h200-full");
    wait_until(Duration::from_secs(60), || {
        let events = cluster.kubectl_ok(&[
            "get",
            "events",
            "-n",
            ns.name(),
            "--field-selector",
            "reason=FailedScheduling",
        ])?;
        Ok(events.contains("Insufficient nvidia.com/gpu"))
    })
    .expect("a FailedScheduling event for the fifth H200 replica");
    let all = pods.list(&lp).await.unwrap().items;
    let pending: Vec<_> = all
        .iter()
        .filter(|p| p.spec.as_ref().unwrap().node_name.is_none())
        .collect();
    assert_eq!(all.len(), 5);
    assert_eq!(pending.len(), 1, "exactly one replica cannot be placed");
    let mut used_nodes: Vec<String> = all
        .iter()
        .filter_map(|p| p.spec.as_ref().unwrap().node_name.clone())
        .collect();
    used_nodes.sort();
    used_nodes.dedup();
    assert_eq!(
        used_nodes.len(),
        NODES_PER_POOL,
        "one replica per H200 node"
    );
    assert!(used_nodes.iter().all(|n| n.starts_with("h200-")));
}

/// Deleting a Deployment: the controller manager's garbage collector removes its ReplicaSets and
/// Pods through their ownerReferences; a ConfigMap owned by another ConfigMap goes with it.
#[test]
fn owner_references_are_garbage_collected() {
    let Some(cluster) = Cluster::from_env() else {
        return;
    };
    let ns = cluster.namespace("gc");
    let n = ns.name();
    cluster
        .kubectl_ok(&[
            "create",
            "deployment",
            "gc-web",
            "-n",
            n,
            "--image=registry.invalid/none:1",
            "--replicas=2",
        ])
        .unwrap();
    cluster
        .kubectl_ok(&[
            "wait",
            "-n",
            n,
            "--for=condition=Available",
            "--timeout=60s",
            "deployment/gc-web",
        ])
        .unwrap();
    let count = |kind: &str| -> anyhow::Result<usize> {
        let list = cluster.get_json(&[kind, "-n", n, "-l", "app=gc-web"])?;
        Ok(list["items"].as_array().map_or(0, Vec::len))
    };
    assert_eq!(count("replicasets").unwrap(), 1);
    assert_eq!(count("pods").unwrap(), 2);

    // An explicit ownerReference between two ConfigMaps.
    cluster
        .kubectl_ok(&["create", "configmap", "gc-owner", "-n", n])
        .unwrap();
    let owner = cluster
        .get_json(&["configmap", "gc-owner", "-n", n])
        .unwrap();
    let uid = owner["metadata"]["uid"].as_str().unwrap();
    let dependent = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "gc-dependent",
            "namespace": n,
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "ConfigMap", "name": "gc-owner", "uid": uid,
            }],
        },
    });
    let path = cluster
        .state_dir()
        .join(format!("gc-dependent-{}.json", std::process::id()));
    std::fs::write(&path, dependent.to_string()).unwrap();
    cluster
        .kubectl_ok(&["create", "-f", &path.to_string_lossy()])
        .unwrap();
    let _ = std::fs::remove_file(&path);

    cluster
        .kubectl_ok(&["delete", "deployment", "gc-web", "-n", n])
        .unwrap();
    cluster
        .kubectl_ok(&["delete", "configmap", "gc-owner", "-n", n])
        .unwrap();
    wait_until(Duration::from_secs(60), || {
        Ok(count("replicasets")? == 0 && count("pods")? == 0)
    })
    .expect("ReplicaSet and Pods garbage-collected");
    wait_until(Duration::from_secs(60), || {
        Ok(!cluster
            .kubectl(&["get", "configmap", "gc-dependent", "-n", n])
            .success)
    })
    .expect("dependent ConfigMap garbage-collected");
}

fn gpu_deployment(name: &str, product: &str, replicas: i32, gpus: u32) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": {GPU_PRODUCT: product},
                    "containers": [{
                        "name": "engine",
                        "image": "registry.invalid/sparsemoe-engine:e2e",
                        "resources": {
                            "requests": {"cpu": "1", "memory": "1Gi"},
                            "limits": {"nvidia.com/gpu": gpus.to_string()},
                        },
                    }],
                },
            },
        },
    }))
    .unwrap()
}

async fn wait_available(api: &Api<Deployment>, name: &str, replicas: i32) {
    let cond = move |d: Option<&Deployment>| {
        d.and_then(|d| d.status.as_ref())
            .and_then(|s| s.available_replicas)
            .is_some_and(|a| a >= replicas)
    };
    tokio::time::timeout(
        Duration::from_secs(90),
        kube::runtime::wait::await_condition(api.clone(), name, cond),
    )
    .await
    .unwrap_or_else(|_| panic!("deployment {name}: {replicas} replicas not available in 90s"))
    .unwrap();
}
