//! Builders: every field the issue asks for is visible in the output.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use sparsemoe_api::v1alpha1::{
    DemoSource, HostPathSource, ImageSource, KvCacheDtype, ModelSource, PullPolicy, WeightDtype,
};

use sparsemoe_api::placement::PLAN_FILE;

use super::*;
use crate::autoscale;
use crate::fixtures::*;

fn build_default(idep: &InferenceDeployment, caps: Capabilities) -> Children {
    let decision = autoscale::decide(&idep.spec, &BTreeMap::new());
    build(idep, NS, idep.controller_owner_ref(&()), &decision, caps)
}

fn only_deployment(c: &Children) -> &Deployment {
    match &c.workloads[..] {
        [
            VariantChild {
                workload: Workload::Deployment(d),
                ..
            },
        ] => d,
        other => panic!("expected one Deployment, got {other:?}"),
    }
}

fn pod_spec(d: &Deployment) -> &PodSpec {
    d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn engine(d: &Deployment) -> &Container {
    &pod_spec(d).containers[0]
}

fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

#[test]
fn gpu_deployment_has_every_field() {
    let idep = gpu_idep();
    let children = build_default(&idep, Capabilities::default());
    assert!(children.problems.is_empty(), "{:?}", children.problems);
    let d = only_deployment(&children);
    let meta = &d.metadata;
    assert_eq!(meta.name.as_deref(), Some("llm-h200"));
    assert_eq!(meta.namespace.as_deref(), Some(NS));
    let labels = meta.labels.as_ref().unwrap();
    for (k, v) in [
        ("app.kubernetes.io/name", "sparsemoe-engine"),
        ("app.kubernetes.io/instance", "llm"),
        ("app.kubernetes.io/managed-by", "sparsemoe-operator"),
        ("app.kubernetes.io/part-of", "sparsemoe"),
        ("sparsemoe.io/deployment", "llm"),
        ("sparsemoe.io/variant", "h200"),
    ] {
        assert_eq!(labels.get(k).map(String::as_str), Some(v), "{k}");
    }
    let owner = &meta.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
        ("InferenceDeployment", "uid-llm", Some(true))
    );
    assert!(applied_hash(meta).is_some());

    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1));
    let strategy = spec.strategy.as_ref().unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().unwrap();
    assert_eq!(
        (rolling.max_surge.clone(), rolling.max_unavailable.clone()),
        (Some(IntOrString::Int(1)), Some(IntOrString::Int(0)))
    );
    let template_labels = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert_eq!(
        template_labels.get(LABEL_ROLE).map(String::as_str),
        Some("leader")
    );
    for (k, v) in spec.selector.match_labels.as_ref().unwrap() {
        assert_eq!(template_labels.get(k), Some(v), "selector matches the pods");
    }

    let pod = pod_spec(d);
    assert_eq!(
        pod.node_selector
            .as_ref()
            .unwrap()
            .get("nvidia.com/gpu.product")
            .map(String::as_str),
        Some("NVIDIA-H200")
    );
    assert_eq!(
        pod.tolerations.as_ref().unwrap()[0].key.as_deref(),
        Some("nvidia.com/gpu")
    );
    assert_eq!(
        pod.termination_grace_period_seconds,
        Some(TERMINATION_GRACE_SECONDS)
    );
    const { assert!(TERMINATION_GRACE_SECONDS > DRAIN_SECONDS) };
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(
        psc.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );

    let c = engine(d);
    assert_eq!(
        c.image.as_deref(),
        Some(sparsemoe_api::v1alpha1::DEFAULT_ENGINE_IMAGE)
    );
    assert_eq!(
        c.command.as_deref(),
        Some(&["sparsemoe-engine".to_string()][..])
    );
    assert_eq!(
        c.args.as_ref().unwrap().join(" "),
        "serve --model /models/model --host 0.0.0.0 --port 8000 --device cuda:0,1,2,3,4,5,6,7"
    );
    let res = c.resources.as_ref().unwrap();
    for list in [&res.requests, &res.limits] {
        assert_eq!(
            list.as_ref().unwrap().get("nvidia.com/gpu"),
            Some(&Quantity("8".into()))
        );
    }
    assert_eq!(
        c.readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/ready")
    );
    assert_eq!(
        c.liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/health")
    );
    assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 8000);
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
    assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    assert_eq!(
        env_value(c, "SPARSEMOE_SERVED_MODEL_NAME"),
        Some("deepseek-ai/DeepSeek-V3.2")
    );
    assert_eq!(
        env_value(c, "SPARSEMOE_PLACEMENT"),
        Some("/etc/sparsemoe/placement/placement.json")
    );

    let mount = |name: &str| {
        c.volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("mount {name}"))
    };
    assert_eq!(mount("model").mount_path, "/models/model");
    assert_eq!(mount("model").sub_path.as_deref(), Some("DeepSeek-V3.2"));
    assert_eq!(mount("model").read_only, Some(true));
    assert_eq!(mount("dshm").mount_path, "/dev/shm");
    assert_eq!(mount("tmp").mount_path, "/tmp");
    assert_eq!(mount("placement").mount_path, PLACEMENT_DIR);
    let volume = |name: &str| {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .cloned()
            .unwrap_or_else(|| panic!("volume {name}"))
    };
    assert_eq!(
        volume("model").persistent_volume_claim.unwrap().claim_name,
        "weights"
    );
    assert_eq!(
        volume("dshm").empty_dir.unwrap().medium.as_deref(),
        Some("Memory")
    );
    assert_eq!(
        volume("placement").config_map.unwrap().name,
        "llm-placement"
    );

    // The plan: ConfigMap file, and its hash on the pod template so a new plan rolls pods.
    let (plan, cm) = children.placement.as_ref().unwrap();
    assert_eq!(cm.metadata.name.as_deref(), Some("llm-placement"));
    let text = &cm.data.as_ref().unwrap()[&plan_key(8, 1)];
    assert_eq!(&PlacementPlan::from_json(text).unwrap(), plan);
    assert_eq!(
        (plan.num_experts, plan.num_gpus, plan.default.gpus[0].len()),
        (256, 8, 36)
    );
    let annotations = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap();
    assert_eq!(
        annotations.get(ANNOTATION_PLACEMENT_HASH),
        Some(&plan.hash())
    );
}

/// A model that loads within the startup probe's allowance never has its rollout reported as
/// stuck: the Deployment's deadline leaves room for scheduling and pulls besides.
#[test]
fn a_rollout_counts_as_stuck_only_well_after_the_startup_probe_gives_up() {
    let children = build_default(&gpu_idep(), Capabilities::default());
    let d = only_deployment(&children);
    let probe = engine(d).startup_probe.as_ref().unwrap();
    let allowance = probe.period_seconds.unwrap() * probe.failure_threshold.unwrap();
    let deadline = d.spec.as_ref().unwrap().progress_deadline_seconds.unwrap();
    assert!(
        deadline >= allowance + 15 * 60,
        "deadline {deadline} s, startup allowance {allowance} s"
    );
}

/// The plans pods mount are read from their volumes: the placement ConfigMap's key of their
/// shape, and nothing from another ConfigMap.
#[test]
fn pods_mount_the_plan_of_their_shape() {
    use k8s_openapi::api::core::v1::Pod;
    let children = build_default(&gpu_idep(), Capabilities::default());
    let template = only_deployment(&children)
        .spec
        .as_ref()
        .unwrap()
        .template
        .clone();
    let pod = Pod {
        metadata: template.metadata.unwrap_or_default(),
        spec: template.spec,
        ..Pod::default()
    };
    let name = children.placement.as_ref().unwrap().1.name_any();
    let mounted = mounted_plans([&pod], &name);
    assert_eq!(mounted.into_iter().collect::<Vec<_>>(), [plan_key(8, 1)]);
    assert!(mounted_plans([&pod], "another").is_empty());
    assert!(mounted_plans([&Pod::default()], &name).is_empty());
}

/// Plans a new spec drops stay while older pods may mount them: a workload about to change,
/// one whose controller has not seen its change, one with pods of an older template.
#[test]
fn older_pods_may_remain_until_the_rollout_is_done() {
    use k8s_openapi::api::apps::v1::DeploymentStatus;
    let children = build_default(&gpu_idep(), Capabilities::default());
    let desired = Workload::Deployment(Box::new(only_deployment(&children).clone()));
    let existing = |generation: i64, status: DeploymentStatus| {
        let mut d = only_deployment(&children).clone();
        d.metadata.generation = Some(generation);
        d.status = Some(status);
        Workload::Deployment(Box::new(d))
    };
    let status = |observed: i64, replicas: i32, updated: i32| DeploymentStatus {
        observed_generation: Some(observed),
        replicas: Some(replicas),
        updated_replicas: Some(updated),
        ..DeploymentStatus::default()
    };
    // Rolled out: nothing older remains.
    assert!(!older_pods_may_remain(
        existing(3, status(3, 2, 2)).as_cached(),
        &desired
    ));
    // Its controller has not seen the last change, or old pods are still there.
    assert!(older_pods_may_remain(
        existing(4, status(3, 2, 2)).as_cached(),
        &desired
    ));
    assert!(older_pods_may_remain(
        existing(3, status(3, 3, 2)).as_cached(),
        &desired
    ));
    // A new template on its way in (another GPU count: another plan).
    let mut idep = gpu_idep();
    idep.spec.parallelism.gpus_per_replica += 8;
    let changed = build_default(&idep, Capabilities::default());
    let changed = Workload::Deployment(Box::new(only_deployment(&changed).clone()));
    assert!(older_pods_may_remain(
        existing(3, status(3, 2, 2)).as_cached(),
        &changed
    ));
    // A LeaderWorkerSet by its counts.
    let lws = |replicas: i64, updated: i64| {
        let mut l = kube::core::DynamicObject::new("llm-h200", &lws_api_resource());
        l.metadata.annotations = desired.meta().annotations.clone();
        l.data = serde_json::json!({"status": {"replicas": replicas, "updatedReplicas": updated}});
        Workload::LeaderWorkerSet(Box::new(l))
    };
    let desired_lws = lws(0, 0);
    assert!(!older_pods_may_remain(lws(2, 2).as_cached(), &desired_lws));
    assert!(older_pods_may_remain(lws(2, 1).as_cached(), &desired_lws));
}

#[test]
fn service_and_pdb_span_all_variants() {
    let mut spec = spec_with_variants(&[("h200", Some(1)), ("h100", None)]);
    spec.scaling.replicas = 3;
    let children = build_default(&idep(spec), Capabilities::default());
    assert_eq!(
        children
            .workloads
            .iter()
            .map(|w| (w.variant.as_str(), w.replicas))
            .collect::<Vec<_>>(),
        vec![("h200", 1), ("h100", 2)]
    );
    let svc = children.service.spec.as_ref().unwrap();
    assert_eq!(children.service.metadata.name.as_deref(), Some("llm"));
    let selector = svc.selector.as_ref().unwrap();
    assert_eq!(
        selector.get(LABEL_DEPLOYMENT).map(String::as_str),
        Some("llm")
    );
    assert!(!selector.contains_key(LABEL_VARIANT));
    let port = &svc.ports.as_ref().unwrap()[0];
    assert_eq!(
        (port.port, port.target_port.clone()),
        (8000, Some(IntOrString::String("http".into())))
    );
    let pdb = children.pdb.spec.as_ref().unwrap();
    assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
    // A crash-looping pod must not block node drains.
    assert_eq!(
        pdb.unhealthy_pod_eviction_policy.as_deref(),
        Some("AlwaysAllow")
    );
    assert_eq!(
        pdb.selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()
            .get(LABEL_DEPLOYMENT)
            .map(String::as_str),
        Some("llm")
    );
    assert!(
        children.placement.is_none(),
        "no plan without expert parallelism"
    );
}

#[test]
fn model_sources_map_to_volumes_and_demo_has_no_model_flag() {
    let mut host = gpu_idep();
    host.spec.model.source = ModelSource {
        host_path: Some(HostPathSource {
            path: "/data/dsv32".into(),
        }),
        ..Default::default()
    };
    let c = build_default(&host, Capabilities::default());
    let v = pod_spec(only_deployment(&c)).volumes.clone().unwrap();
    let model = v.iter().find(|v| v.name == "model").unwrap();
    assert_eq!(model.host_path.as_ref().unwrap().path, "/data/dsv32");

    let mut image = gpu_idep();
    image.spec.model.source = ModelSource {
        image: Some(ImageSource {
            reference: "registry.invalid/models/dsv32@sha256:ab".into(),
            pull_policy: Some(PullPolicy::IfNotPresent),
        }),
        ..Default::default()
    };
    let c = build_default(&image, Capabilities::default());
    let v = pod_spec(only_deployment(&c)).volumes.clone().unwrap();
    let model = v
        .iter()
        .find(|v| v.name == "model")
        .unwrap()
        .image
        .clone()
        .unwrap();
    assert_eq!(
        model.reference.as_deref(),
        Some("registry.invalid/models/dsv32@sha256:ab")
    );
    assert_eq!(model.pull_policy.as_deref(), Some("IfNotPresent"));

    let mut demo = idep(spec_with_variants(&[("cpu", None)]));
    demo.spec.model.source = ModelSource {
        demo: Some(DemoSource {}),
        ..Default::default()
    };
    demo.spec.parallelism.gpus_per_replica = 0;
    let c = build_default(&demo, Capabilities::default());
    let d = only_deployment(&c);
    assert_eq!(
        engine(d).args.as_ref().unwrap().join(" "),
        "serve --host 0.0.0.0 --port 8000 --device cpu"
    );
    assert!(
        pod_spec(d)
            .volumes
            .iter()
            .flatten()
            .all(|v| v.name != "model")
    );
    let res = engine(d).resources.clone().unwrap_or_default();
    assert!(
        !res.limits
            .unwrap_or_default()
            .contains_key("nvidia.com/gpu")
    );
}

#[test]
fn user_settings_reach_the_engine() {
    let mut idep = gpu_idep();
    idep.spec.engine.index_top_k = Some(1024);
    idep.spec.engine.kv_cache_memory_fraction = Some(0.85);
    idep.spec.engine.prefix_caching = Some(false);
    idep.spec.engine.dtype = Some(WeightDtype::Bfloat16);
    idep.spec.engine.kv_cache_dtype = Some(KvCacheDtype::Float32);
    idep.spec.engine.cuda_graph_rows = Some(8);
    idep.spec.engine.args = vec!["--log-level".into(), "debug".into()];
    let var = |name: &str, value: &str| k8s_openapi::api::core::v1::EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    };
    // One of ours overridden, and one of the user's own listed twice.
    idep.spec.engine.env = vec![
        var("SPARSEMOE_ATTENTION", "dense"),
        var("SPARSEMOE_DTYPE", "float32"),
        var("EXTRA", "1"),
        var("EXTRA", "2"),
    ];
    idep.spec.engine.image_pull_policy = Some(PullPolicy::Always);
    idep.spec.engine.image_pull_secrets = vec![k8s_openapi::api::core::v1::LocalObjectReference {
        name: "registry-creds".into(),
    }];
    idep.spec.engine.priority_class_name = Some("serving-high".into());
    idep.spec.engine.runtime_class_name = Some("nvidia".into());
    idep.spec.rollout.max_surge = IntOrString::Int(0);
    idep.spec.rollout.max_unavailable = IntOrString::String("25%".into());
    let c = build_default(&idep, Capabilities::default());
    let d = only_deployment(&c);
    let e = engine(d);
    assert_eq!(env_value(e, "SPARSEMOE_INDEX_TOPK"), Some("1024"));
    assert_eq!(env_value(e, "SPARSEMOE_NO_PREFIX_CACHING"), Some("true"));
    assert_eq!(env_value(e, "SPARSEMOE_CUDA_GRAPH_ROWS"), Some("8"));
    // The user's value wins over the spec's dtype.
    assert_eq!(env_value(e, "SPARSEMOE_DTYPE"), Some("float32"));
    assert_eq!(env_value(e, "SPARSEMOE_KV_CACHE_DTYPE"), Some("float32"));
    assert_eq!(
        env_value(e, "SPARSEMOE_KV_CACHE_MEMORY_FRACTION"),
        Some("0.85")
    );
    assert!(
        e.args
            .as_ref()
            .unwrap()
            .ends_with(&["--log-level".to_string(), "debug".to_string()])
    );
    // The user's variables win, and no name is listed twice (server-side apply refuses that).
    assert_eq!(env_value(e, "SPARSEMOE_ATTENTION"), Some("dense"));
    assert_eq!(env_value(e, "EXTRA"), Some("2"));
    let mut names: Vec<&str> = e.env.iter().flatten().map(|v| v.name.as_str()).collect();
    let listed = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), listed, "a variable listed twice");
    assert_eq!(e.image_pull_policy.as_deref(), Some("Always"));
    let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(
        pod.image_pull_secrets.as_ref().unwrap()[0].name,
        "registry-creds"
    );
    assert_eq!(pod.priority_class_name.as_deref(), Some("serving-high"));
    assert_eq!(pod.runtime_class_name.as_deref(), Some("nvidia"));
    let rolling = d
        .spec
        .as_ref()
        .unwrap()
        .strategy
        .clone()
        .unwrap()
        .rolling_update
        .unwrap();
    assert_eq!(
        rolling.max_unavailable,
        Some(IntOrString::String("25%".into()))
    );
}

#[test]
fn hashes_are_stable_and_follow_the_spec() {
    let a = build_default(&gpu_idep(), Capabilities::default());
    let b = build_default(&gpu_idep(), Capabilities::default());
    assert_eq!(a, b, "pure: same spec, same children");
    let mut changed = gpu_idep();
    changed.spec.engine.image = "other".into();
    let c = build_default(&changed, Capabilities::default());
    let hash = |c: &Children| {
        applied_hash(&only_deployment(c).metadata)
            .unwrap()
            .to_string()
    };
    assert_ne!(hash(&a), hash(&c));
    assert_eq!(
        applied_hash(&a.service.metadata),
        applied_hash(&c.service.metadata)
    );
}

#[test]
fn multi_node_variants_need_leader_worker_set() {
    let mut spec = spec_with_variants(&[("h200", None), ("h100", None)]);
    spec.variants[1].gpus_per_replica = Some(16);
    spec.variants[1].nodes_per_replica = Some(2);
    spec.scaling.replicas = 1;
    let idep = idep(spec);
    let without = build_default(&idep, Capabilities::default());
    assert_eq!(without.unrealised_variants, vec!["h100".to_string()]);
    assert_eq!(without.problems[0].reason, "LeaderWorkerSetMissing");
    assert_eq!(without.workloads.len(), 1);

    let with = build_default(
        &idep,
        Capabilities {
            leader_worker_set: true,
        },
    );
    assert!(with.problems.is_empty());
    let Workload::LeaderWorkerSet(lws) = &with.workloads[1].workload else {
        panic!("LWS expected")
    };
    let value = serde_json::to_value(lws.as_ref()).unwrap();
    assert_eq!(value["apiVersion"], LWS_API_VERSION);
    assert_eq!(value["kind"], "LeaderWorkerSet");
    assert_eq!(value["metadata"]["name"], "llm-h100");
    let template = &value["spec"]["leaderWorkerTemplate"];
    assert_eq!(template["size"], 2);
    assert_eq!(
        template["leaderTemplate"]["metadata"]["labels"][LABEL_ROLE],
        "leader"
    );
    assert_eq!(
        template["workerTemplate"]["metadata"]["labels"][LABEL_ROLE],
        "worker"
    );
    let limits = &template["workerTemplate"]["spec"]["containers"][0]["resources"]["limits"];
    assert_eq!(limits["nvidia.com/gpu"], "8", "16 GPUs over 2 nodes");
}

#[test]
fn unplaceable_expert_plans_are_problems_and_hold_the_workloads() {
    let mut idep = gpu_idep();
    idep.spec.parallelism.expert_parallel.redundant_experts = 3; // 259 experts on 8 GPUs
    let c = build_default(&idep, Capabilities::default());
    assert_eq!(c.problems[0].reason, "PlacementInfeasible");
    assert!(
        c.problems[0].message.contains("redundantExperts"),
        "{}",
        c.problems[0].message
    );
    assert!(c.workloads.is_empty());
    assert_eq!(c.unrealised_variants, vec!["h200".to_string()]);
}

#[test]
fn variants_with_different_gpu_counts_get_their_own_plans() {
    let mut spec = spec_with_variants(&[("h200", None), ("h100", None)]);
    spec.parallelism.expert_parallel.enabled = true;
    spec.variants[1].gpus_per_replica = Some(16);
    spec.variants[1].nodes_per_replica = Some(2);
    spec.scaling.replicas = 1;
    let c = build_default(
        &idep(spec),
        Capabilities {
            leader_worker_set: true,
        },
    );
    assert!(c.problems.is_empty(), "{:?}", c.problems);
    let (primary, cm) = c.placement.as_ref().unwrap();
    assert_eq!(primary.num_gpus, 8);
    let data = cm.data.as_ref().unwrap();
    let big = PlacementPlan::from_json(&data["placement-16gpu-2node.json"]).unwrap();
    assert_eq!((big.num_gpus, big.num_nodes), (16, 2));
    assert_eq!(data.len(), 2);
    let Workload::LeaderWorkerSet(lws) = &c.workloads[1].workload else {
        panic!("LWS expected")
    };
    let value = serde_json::to_value(lws.as_ref()).unwrap();
    let volumes = value["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .clone();
    let placement = volumes.iter().find(|v| v["name"] == "placement").unwrap();
    assert_eq!(
        placement["configMap"]["items"][0]["key"],
        "placement-16gpu-2node.json"
    );
    assert_eq!(placement["configMap"]["items"][0]["path"], PLAN_FILE);
}

/// A ConfigMap key holds one shape's plan whatever the variants around it: removing or
/// reordering variants never puts another shape's plan under a key that running pods mount.
#[test]
fn a_plan_key_keeps_its_shape_when_variants_change() {
    let plans = |variants: &[(&str, u32)]| {
        let names: Vec<(&str, Option<u32>)> = variants.iter().map(|(n, _)| (*n, None)).collect();
        let mut spec = spec_with_variants(&names);
        spec.parallelism.expert_parallel.enabled = true;
        for (v, (_, gpus)) in spec.variants.iter_mut().zip(variants) {
            v.gpus_per_replica = Some(*gpus);
        }
        spec.scaling.replicas = 1;
        let c = build_default(&idep(spec), Capabilities::default());
        assert!(c.problems.is_empty(), "{:?}", c.problems);
        let (_, cm) = c.placement.unwrap();
        let data = cm.data.unwrap();
        let mounted: Vec<String> = c
            .workloads
            .iter()
            .map(|w| {
                let Workload::Deployment(d) = &w.workload else {
                    panic!("deployment expected")
                };
                let spec = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
                let volume = spec
                    .volumes
                    .iter()
                    .flatten()
                    .find(|v| v.name == "placement");
                let items = volume.unwrap().config_map.as_ref().unwrap().items.clone();
                items.unwrap()[0].key.clone()
            })
            .collect();
        (data, mounted)
    };
    let (both, mounted) = plans(&[("h200", 8), ("h100", 4)]);
    assert_eq!(mounted, [plan_key(8, 1), plan_key(4, 1)]);
    let (reordered, mounted) = plans(&[("h100", 4), ("h200", 8)]);
    assert_eq!(mounted, [plan_key(4, 1), plan_key(8, 1)]);
    assert_eq!(reordered, both, "the same plans under the same keys");
    let (alone, mounted) = plans(&[("h100", 4)]);
    assert_eq!(mounted, [plan_key(4, 1)]);
    assert_eq!(alone.get(&plan_key(4, 1)), both.get(&plan_key(4, 1)));
    for (key, text) in &both {
        let plan = PlacementPlan::from_json(text).unwrap();
        assert_eq!(key, &plan_key(plan.num_gpus, plan.num_nodes));
    }
}

/// While workloads on their way out may still mount them, the plans the spec dropped stay in
/// the ConfigMap (stamped anew, so the apply happens); the spec's own plans win.
#[test]
fn plans_of_workloads_on_their_way_out_are_kept() {
    let build = |gpus: &[u32]| {
        let names: Vec<String> = gpus.iter().map(|g| format!("v{g}")).collect();
        let names: Vec<(&str, Option<u32>)> = names.iter().map(|n| (n.as_str(), None)).collect();
        let mut spec = spec_with_variants(&names);
        spec.parallelism.expert_parallel.enabled = true;
        for (v, g) in spec.variants.iter_mut().zip(gpus) {
            v.gpus_per_replica = Some(*g);
        }
        build_default(&idep(spec), Capabilities::default())
            .placement
            .unwrap()
            .1
    };
    let before = build(&[8, 4]);
    let after = build(&[4]);
    let kept = keeping_plans(&after, Some(&before));
    let data = kept.data.as_ref().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(
        data[&plan_key(8, 1)],
        before.data.as_ref().unwrap()[&plan_key(8, 1)]
    );
    assert_eq!(
        data[&plan_key(4, 1)],
        after.data.as_ref().unwrap()[&plan_key(4, 1)]
    );
    assert_ne!(applied_hash(&kept.metadata), applied_hash(&after.metadata));
    // Nothing to keep: the ConfigMap as built.
    assert_eq!(keeping_plans(&after, Some(&after)), after);
    assert_eq!(keeping_plans(&after, None), after);
}

#[test]
fn cuda_graphs_stay_the_engines_default_unless_set() {
    let idep = gpu_idep();
    let c = build_default(&idep, Capabilities::default());
    assert_eq!(
        env_value(engine(only_deployment(&c)), "SPARSEMOE_CUDA_GRAPH_ROWS"),
        None
    );
    let mut idep = gpu_idep();
    idep.spec.engine.cuda_graph_rows = Some(0);
    let c = build_default(&idep, Capabilities::default());
    assert_eq!(
        env_value(engine(only_deployment(&c)), "SPARSEMOE_CUDA_GRAPH_ROWS"),
        Some("0")
    );
}

#[test]
fn prefix_caching_stays_on_unless_turned_off() {
    for (setting, want) in [
        (None, None),
        (Some(true), None),
        (Some(false), Some("true")),
    ] {
        let mut idep = gpu_idep();
        idep.spec.engine.prefix_caching = setting;
        let c = build_default(&idep, Capabilities::default());
        let e = engine(only_deployment(&c));
        assert_eq!(
            env_value(e, "SPARSEMOE_NO_PREFIX_CACHING"),
            want,
            "prefixCaching {setting:?}"
        );
    }
}

/// A multi-node variant without the LeaderWorkerSet API cannot be realised, so the replicas go
/// to the next variant, which can serve them; the problem is still reported.
#[test]
fn replicas_skip_a_variant_that_cannot_be_realised() {
    let mut spec = spec_with_variants(&[("h200", None), ("h100", None)]);
    spec.variants[0].gpus_per_replica = Some(16);
    spec.variants[0].nodes_per_replica = Some(2);
    spec.scaling.replicas = 2;
    let idep = idep(spec);
    let (decision, c) = decide_and_build(
        &idep,
        NS,
        None,
        &Default::default(),
        Capabilities::default(),
    );
    assert_eq!(
        decision.variants,
        vec![("h200".into(), 0), ("h100".into(), 2)]
    );
    assert_eq!(c.unrealised_variants, ["h200"]);
    assert_eq!(c.problems[0].reason, "LeaderWorkerSetMissing");
    assert_eq!(c.workloads.len(), 1);
    assert_eq!(
        (c.workloads[0].variant.as_str(), c.workloads[0].replicas),
        ("h100", 2)
    );
    // With LeaderWorkerSet installed the preferred variant takes them again.
    let (decision, c) = decide_and_build(
        &idep,
        NS,
        None,
        &Default::default(),
        Capabilities {
            leader_worker_set: true,
        },
    );
    assert_eq!(decision.replicas_of("h200"), 2);
    assert!(c.problems.is_empty(), "{:?}", c.problems);
}
