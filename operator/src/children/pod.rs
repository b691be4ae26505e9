//! The engine pod template shared by Deployments and LeaderWorkerSets.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities as LinuxCapabilities, ConfigMapVolumeSource, Container, ContainerPort,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, HostPathVolumeSource,
    ImageVolumeSource, KeyToPath, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, SecurityContext, SleepAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sparsemoe_api::InferenceDeployment;
use sparsemoe_api::placement::PLAN_FILE;
use sparsemoe_api::v1alpha1::{AttentionMode, GpuVariant, PullPolicy};

use super::{ANNOTATION_PLACEMENT_HASH, LABEL_ROLE, placement_config_map_name};

/// The engine's HTTP port (OpenAI API, /health, /ready, /metrics).
pub const ENGINE_PORT: i32 = 8000;
/// Where the model directory is mounted.
pub const MODEL_DIR: &str = "/models/model";
/// Where the placement ConfigMap is mounted (the plan is `PLACEMENT_DIR/placement.json`).
pub const PLACEMENT_DIR: &str = "/etc/sparsemoe/placement";
/// Seconds the engine gets to finish in-flight requests after SIGTERM (passed to it).
pub const DRAIN_SECONDS: i64 = 120;
/// Seconds before a pod is killed: the preStop pause, the drain, and a margin.
pub const TERMINATION_GRACE_SECONDS: i64 = PRE_STOP_SECONDS + DRAIN_SECONDS + 15;
/// Pause before SIGTERM so endpoints stop routing to the pod first.
const PRE_STOP_SECONDS: i64 = 5;
/// The non-root user the engine runs as.
const ENGINE_UID: i64 = 65532;

fn pull_policy(policy: Option<PullPolicy>) -> Option<String> {
    policy.map(|p| {
        match p {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
        .to_string()
    })
}

fn env(name: &str, value: impl ToString) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.to_string()),
        ..EnvVar::default()
    }
}

/// The startup probe's period and the failures it allows: how long an engine may take to load
/// its model before liveness takes over (30 minutes).
const STARTUP_PROBE_PERIOD_SECONDS: i32 = 10;
const STARTUP_PROBE_FAILURES: i32 = 180;

/// How long a pod may take from creation to ready before its rollout counts as stuck: the
/// startup probe's whole allowance, plus as long again for scheduling, pulling the image and
/// a model volume (an OCI image of hundreds of GB takes minutes).
pub const PROGRESS_DEADLINE_SECONDS: i32 =
    2 * STARTUP_PROBE_PERIOD_SECONDS * STARTUP_PROBE_FAILURES;

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(5),
        ..Probe::default()
    }
}

fn empty_dir(name: &str, memory: bool, size: &str) -> Volume {
    Volume {
        name: name.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            medium: memory.then(|| "Memory".to_string()),
            size_limit: Some(Quantity(size.into())),
        }),
        ..Volume::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool, sub_path: Option<String>) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        sub_path,
        ..VolumeMount::default()
    }
}

/// The engine pod: `nodes` is how many pods one replica spans (1 for a Deployment); each pod
/// gets `gpusPerReplica / nodes` GPUs.
pub(super) fn pod_template(
    idep: &InferenceDeployment,
    variant: &GpuVariant,
    mut labels: BTreeMap<String, String>,
    role: &str,
    plan_mount: super::PlanMount,
    nodes: u32,
) -> PodTemplateSpec {
    let spec = &idep.spec;
    let engine = &spec.engine;
    let gpus = variant.gpus(&spec.parallelism) / nodes.max(1);
    labels.insert(LABEL_ROLE.into(), role.into());

    let mut args = vec!["serve".to_string()];
    let mut volumes = vec![
        empty_dir("dshm", true, if gpus > 0 { "16Gi" } else { "256Mi" }),
        empty_dir("tmp", false, "1Gi"),
    ];
    let mut mounts = vec![
        mount("dshm", "/dev/shm", false, None),
        mount("tmp", "/tmp", false, None),
    ];
    let source = &spec.model.source;
    let model_volume = if let Some(pvc) = &source.pvc {
        let sub_path = (!pvc.path.is_empty()).then(|| pvc.path.clone());
        mounts.push(mount("model", MODEL_DIR, true, sub_path));
        Some(Volume {
            name: "model".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: pvc.claim_name.clone(),
                read_only: Some(true),
            }),
            ..Volume::default()
        })
    } else if let Some(host) = &source.host_path {
        mounts.push(mount("model", MODEL_DIR, true, None));
        Some(Volume {
            name: "model".into(),
            host_path: Some(HostPathVolumeSource {
                path: host.path.clone(),
                type_: Some("Directory".into()),
            }),
            ..Volume::default()
        })
    } else if let Some(image) = &source.image {
        mounts.push(mount("model", MODEL_DIR, true, None));
        Some(Volume {
            name: "model".into(),
            image: Some(ImageVolumeSource {
                reference: Some(image.reference.clone()),
                pull_policy: pull_policy(image.pull_policy),
            }),
            ..Volume::default()
        })
    } else {
        // The demo source: the engine's built-in model, no files.
        None
    };
    if let Some(volume) = model_volume {
        volumes.push(volume);
        args.extend(["--model".to_string(), MODEL_DIR.to_string()]);
    }
    // All interfaces: kubelet probes and the Service reach the pod IP, not loopback.
    args.extend(["--host".to_string(), "0.0.0.0".to_string()]);
    args.extend(["--port".to_string(), ENGINE_PORT.to_string()]);
    args.extend([
        "--device".to_string(),
        if gpus == 0 {
            "cpu".to_string()
        } else {
            let ids: Vec<String> = (0..gpus).map(|g| g.to_string()).collect();
            format!("cuda:{}", ids.join(","))
        },
    ]);
    args.extend(engine.args.iter().cloned());

    let mut annotations = BTreeMap::new();
    if let Some((hash, key)) = plan_mount {
        volumes.push(Volume {
            name: "placement".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: placement_config_map_name(idep),
                // This variant's plan, always seen by the engine as placement.json.
                items: Some(vec![KeyToPath {
                    key: key.to_string(),
                    path: PLAN_FILE.to_string(),
                    mode: None,
                }]),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(mount("placement", PLACEMENT_DIR, true, None));
        annotations.insert(ANNOTATION_PLACEMENT_HASH.to_string(), hash.to_string());
    }

    // Engine tuning goes through environment variables (`SPARSEMOE_*`), so the command line
    // stays the documented `sparsemoe-engine serve --model DIR --port 8000 --device …`.
    let mut env_vars = vec![
        env("SPARSEMOE_SERVED_MODEL_NAME", &spec.model.name),
        env(
            "SPARSEMOE_ATTENTION",
            match engine.attention.mode {
                AttentionMode::Sparse => "sparse",
                AttentionMode::Dense => "dense",
                AttentionMode::Auto => "auto",
            },
        ),
        env("SPARSEMOE_DRAIN_SECONDS", DRAIN_SECONDS),
        EnvVar {
            name: "POD_NAME".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
    ];
    let optional = [
        (
            "SPARSEMOE_DENSE_BELOW_TOKENS",
            engine.attention.dense_below_tokens.map(|v| v.to_string()),
        ),
        (
            "SPARSEMOE_INDEX_TOPK",
            engine.index_top_k.map(|v| v.to_string()),
        ),
        (
            "SPARSEMOE_MAX_CONTEXT_TOKENS",
            engine.max_context_tokens.map(|v| v.to_string()),
        ),
        (
            "SPARSEMOE_MAX_BATCHED_TOKENS",
            engine.max_batched_tokens.map(|v| v.to_string()),
        ),
        (
            "SPARSEMOE_KV_CACHE_MEMORY_FRACTION",
            engine.kv_cache_memory_fraction.map(|v| v.to_string()),
        ),
        (
            "SPARSEMOE_DTYPE",
            engine.dtype.map(|d| d.as_str().to_string()),
        ),
        (
            "SPARSEMOE_KV_CACHE_DTYPE",
            engine.kv_cache_dtype.map(|d| d.as_str().to_string()),
        ),
        (
            "SPARSEMOE_NO_PREFIX_CACHING",
            (engine.prefix_caching == Some(false)).then(|| "true".to_string()),
        ),
        (
            "SPARSEMOE_CUDA_GRAPH_ROWS",
            engine.cuda_graph_rows.map(|v| v.to_string()),
        ),
        ("SPARSEMOE_MODEL_REVISION", spec.model.revision.clone()),
        (
            "SPARSEMOE_PLACEMENT",
            plan_mount.map(|_| format!("{PLACEMENT_DIR}/{PLAN_FILE}")),
        ),
        (
            "SPARSEMOE_NODES_PER_REPLICA",
            (nodes > 1).then(|| nodes.to_string()),
        ),
    ];
    env_vars.extend(
        optional
            .into_iter()
            .filter_map(|(name, value)| value.map(|v| env(name, v))),
    );
    // The user's variables override ours of the same name, in place, and a name the user
    // lists twice keeps its last value (the kubelet's rule): server-side apply refuses a
    // container whose env names a variable twice, which would fail every reconcile.
    for var in &engine.env {
        match env_vars.iter_mut().find(|v| v.name == var.name) {
            Some(ours) => *ours = var.clone(),
            None => env_vars.push(var.clone()),
        }
    }

    let mut resources = engine.resources.clone().unwrap_or_default();
    if gpus > 0 {
        let gpu = Quantity(gpus.to_string());
        for list in [&mut resources.requests, &mut resources.limits] {
            list.get_or_insert_with(BTreeMap::new)
                .insert("nvidia.com/gpu".into(), gpu.clone());
        }
    }

    let container = Container {
        name: "engine".into(),
        image: Some(engine.image.clone()),
        image_pull_policy: pull_policy(engine.image_pull_policy),
        command: Some(vec!["sparsemoe-engine".into()]),
        args: Some(args),
        env: Some(env_vars),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: ENGINE_PORT,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        resources: Some(ResourceRequirements {
            claims: None,
            ..resources
        }),
        volume_mounts: Some(mounts),
        // Loading a large checkpoint takes minutes: the startup probe allows 30 of them before
        // liveness takes over.
        startup_probe: Some(http_probe(
            "/health",
            STARTUP_PROBE_PERIOD_SECONDS,
            STARTUP_PROBE_FAILURES,
        )),
        liveness_probe: Some(http_probe("/health", 10, 3)),
        readiness_probe: Some(http_probe("/ready", 5, 3)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRE_STOP_SECONDS,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(LinuxCapabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };

    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: Some(volumes),
            node_selector: (!variant.node_selector.is_empty())
                .then(|| variant.node_selector.clone()),
            tolerations: (!variant.tolerations.is_empty()).then(|| variant.tolerations.clone()),
            termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
            image_pull_secrets: (!engine.image_pull_secrets.is_empty())
                .then(|| engine.image_pull_secrets.clone()),
            priority_class_name: engine.priority_class_name.clone(),
            runtime_class_name: engine.runtime_class_name.clone(),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(ENGINE_UID),
                run_as_group: Some(ENGINE_UID),
                fs_group: Some(ENGINE_UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    localhost_profile: None,
                }),
                ..PodSecurityContext::default()
            }),
            ..PodSpec::default()
        }),
    }
}
