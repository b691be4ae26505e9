//! The child objects one `InferenceDeployment` becomes, built by pure functions from its spec.
//!
//! Per variant a `Deployment` (or a `LeaderWorkerSet` when a replica spans nodes), one
//! `Service` across all variants, one `PodDisruptionBudget`, and, with expert parallelism,
//! the `ConfigMap <name>-placement` holding the expert plan. Nothing here does I/O: the
//! reconciler applies what [`build`] returns, and `render` prints it.

mod lws;
mod pod;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::DynamicObject;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sparsemoe_api::v1alpha1::GpuVariant;
use sparsemoe_api::{InferenceDeployment, InferenceDeploymentSpec, PlacementPlan};

use crate::autoscale::{self, ReplicaDecision};

pub use lws::{LWS_API_VERSION, LWS_GROUP, LWS_KIND, LWS_PLURAL, lws_api_resource};
pub use pod::{DRAIN_SECONDS, ENGINE_PORT, MODEL_DIR, PLACEMENT_DIR, TERMINATION_GRACE_SECONDS};

/// Label: the InferenceDeployment a child belongs to.
pub const LABEL_DEPLOYMENT: &str = "sparsemoe.io/deployment";
/// Label: the GPU variant of a workload and its pods.
pub const LABEL_VARIANT: &str = "sparsemoe.io/variant";
/// Label: `leader` on the pod that serves a replica (every single-node pod), `worker` on the
/// other pods of a multi-node replica. The Service and the /scale selector pick leaders.
pub const LABEL_ROLE: &str = "sparsemoe.io/role";
/// Label value of [`LABEL_ROLE`] on serving pods.
pub const ROLE_LEADER: &str = "leader";
/// `app.kubernetes.io/managed-by` value; the operator's watches select on it.
pub const MANAGED_BY: &str = "sparsemoe-operator";
/// Label selector the operator's watches use.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=sparsemoe-operator";
/// Annotation on each child: a hash of what the operator last applied. A child whose hash
/// matches the desired one is not re-applied, so a settled reconcile makes no write calls.
/// (It describes the child itself, so losing it only costs one redundant apply.)
pub const ANNOTATION_APPLIED_HASH: &str = "sparsemoe.io/applied-hash";
/// Pod-template annotation: the placement plan hash, so a new plan rolls the pods.
pub const ANNOTATION_PLACEMENT_HASH: &str = "sparsemoe.io/placement-hash";

/// What the cluster can run, discovered when the controller starts (see `run::discover`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The LeaderWorkerSet CRD (`leaderworkerset.x-k8s.io/v1`) is installed.
    pub leader_worker_set: bool,
}

/// Why part of a spec cannot be realised; becomes the `Degraded` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// CamelCase reason for the condition.
    pub reason: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// One variant's workload.
#[derive(Clone, Debug, PartialEq)]
pub enum Workload {
    Deployment(Box<Deployment>),
    /// A `leaderworkerset.x-k8s.io/v1` LeaderWorkerSet (not in k8s-openapi, hence dynamic).
    LeaderWorkerSet(Box<DynamicObject>),
}

impl Workload {
    pub fn name(&self) -> String {
        self.meta().name.clone().unwrap_or_default()
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Workload::Deployment(d) => &d.metadata,
            Workload::LeaderWorkerSet(l) => &l.metadata,
        }
    }
}

/// A workload as the caches hold it, borrowed.
#[derive(Clone, Copy, Debug)]
pub enum Cached<'a> {
    Deployment(&'a Deployment),
    LeaderWorkerSet(&'a DynamicObject),
}

impl Workload {
    /// This workload, borrowed as [`Cached`].
    pub fn as_cached(&self) -> Cached<'_> {
        match self {
            Workload::Deployment(d) => Cached::Deployment(d),
            Workload::LeaderWorkerSet(l) => Cached::LeaderWorkerSet(l),
        }
    }
}

/// A variant's desired workload and replica count.
#[derive(Clone, Debug, PartialEq)]
pub struct VariantChild {
    pub variant: String,
    pub replicas: i32,
    pub workload: Workload,
}

/// Every child of one InferenceDeployment.
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    /// The expert plan (with expert parallelism) and its ConfigMap.
    pub placement: Option<(PlacementPlan, ConfigMap)>,
    /// Variants that can be realised, in spec order.
    pub workloads: Vec<VariantChild>,
    /// Variants that cannot, by name; their existing workloads are left alone.
    pub unrealised_variants: Vec<String>,
    pub service: Service,
    pub pdb: PodDisruptionBudget,
    /// Why something could not be realised (empty when all is well).
    pub problems: Vec<Problem>,
}

/// The problem of replicas asked for that no variant has room for: the status says so
/// (`Degraded`, not `Ready`), but it blocks no rollout of the replicas that do fit.
pub const INSUFFICIENT_CAPACITY: &str = "InsufficientCapacity";

/// The PodDisruptionBudget's `unhealthyPodEvictionPolicy`: pods that are running but not ready
/// may be evicted whatever the budget (see [`build`]).
pub const UNHEALTHY_POD_EVICTION_POLICY: &str = "AlwaysAllow";

/// Name of the Service, the PDB, and the prefix of every other child.
pub fn service_name(idep: &InferenceDeployment) -> String {
    idep.name_any()
}

/// Name of a variant's workload.
pub fn workload_name(idep: &InferenceDeployment, variant: &str) -> String {
    format!("{}-{variant}", idep.name_any())
}

/// Name of the placement ConfigMap.
pub fn placement_config_map_name(idep: &InferenceDeployment) -> String {
    format!("{}-placement", idep.name_any())
}

/// The placement ConfigMap's key for the plan of replicas of `gpus` GPUs over `nodes` nodes.
pub fn plan_key(gpus: u32, nodes: u32) -> String {
    format!("placement-{gpus}gpu-{nodes}node.json")
}

/// `config_map` (a placement ConfigMap as [`build`] makes it) keeping the plans of `existing`
/// that it drops: workloads the spec no longer asks for keep serving until their replacements
/// are rolled out (make before break), and so do the older pods of a workload changing shape
/// in place; a pod of theirs that restarts meanwhile must still find the plan of its shape.
pub fn keeping_plans(config_map: &ConfigMap, existing: Option<&ConfigMap>) -> ConfigMap {
    let has = |key: &String| {
        config_map
            .data
            .as_ref()
            .is_some_and(|d| d.contains_key(key))
    };
    let dropped: Vec<(&String, &String)> = existing
        .and_then(|e| e.data.as_ref())
        .into_iter()
        .flatten()
        .filter(|(key, _)| key.starts_with("placement-") && !has(key))
        .collect();
    let mut kept = config_map.clone();
    if dropped.is_empty() {
        return kept;
    }
    let data = kept.data.get_or_insert_with(BTreeMap::new);
    data.extend(dropped.into_iter().map(|(k, v)| (k.clone(), v.clone())));
    if let Some(annotations) = kept.metadata.annotations.as_mut() {
        annotations.remove(ANNOTATION_APPLIED_HASH);
    }
    stamped(kept)
}

/// Whether pods of an older template than `desired`'s may still run under `existing` (the
/// workload as the cluster has it): it is about to change (its applied hash differs from the
/// desired one's), its controller has not yet seen its last change, or some of its pods are
/// not of its current template. Such pods may mount a plan the new spec dropped (a change of
/// GPUs per replica keeps the workload's name), and one that restarts must still find it.
pub fn older_pods_may_remain(existing: Cached<'_>, desired: &Workload) -> bool {
    let meta = match existing {
        Cached::Deployment(d) => &d.metadata,
        Cached::LeaderWorkerSet(l) => &l.metadata,
    };
    if applied_hash(meta) != applied_hash(desired.meta()) {
        return true;
    }
    let (generation, observed, replicas, updated) = match existing {
        Cached::Deployment(d) => {
            let status = d.status.as_ref();
            (
                d.metadata.generation,
                status.and_then(|s| s.observed_generation),
                status.and_then(|s| s.replicas).map(i64::from),
                status.and_then(|s| s.updated_replicas).map(i64::from),
            )
        }
        Cached::LeaderWorkerSet(l) => {
            let status = &l.data["status"];
            let int = |key: &str| status[key].as_i64();
            // A LeaderWorkerSet reports no observedGeneration: its counts alone.
            (None, None, int("replicas"), int("updatedReplicas"))
        }
    };
    observed < generation || replicas.unwrap_or(0) > updated.unwrap_or(0)
}

/// The placement plans (keys of the ConfigMap `config_map`) that `pods` mount. Pods that are
/// running mount what their template named when they were made, whatever the workloads say now.
pub fn mounted_plans<'p>(
    pods: impl IntoIterator<Item = &'p Pod>,
    config_map: &str,
) -> BTreeSet<String> {
    pods.into_iter()
        .filter_map(|p| p.spec.as_ref()?.volumes.as_ref())
        .flatten()
        .filter_map(|v| v.config_map.as_ref())
        .filter(|c| c.name == config_map)
        .flat_map(|c| c.items.iter().flatten().map(|i| i.key.clone()))
        .collect()
}

/// Label selector (string form) of the serving pods, for status.selector and /scale.
pub fn pod_selector(idep: &InferenceDeployment) -> String {
    format!(
        "{LABEL_DEPLOYMENT}={},{LABEL_ROLE}={ROLE_LEADER}",
        idep.name_any()
    )
}

/// In-cluster URL of the OpenAI-compatible API.
pub fn endpoint(idep: &InferenceDeployment, namespace: &str) -> String {
    format!(
        "http://{}.{namespace}.svc:{ENGINE_PORT}/v1",
        service_name(idep)
    )
}

/// Labels every child carries.
pub fn common_labels(idep: &InferenceDeployment) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "sparsemoe-engine".into()),
        ("app.kubernetes.io/instance".into(), idep.name_any()),
        ("app.kubernetes.io/component".into(), "inference".into()),
        ("app.kubernetes.io/part-of".into(), "sparsemoe".into()),
        ("app.kubernetes.io/managed-by".into(), MANAGED_BY.into()),
        (LABEL_DEPLOYMENT.into(), idep.name_any()),
    ])
}

/// Labels of one variant's workload.
pub fn variant_labels(idep: &InferenceDeployment, variant: &str) -> BTreeMap<String, String> {
    let mut labels = common_labels(idep);
    labels.insert(LABEL_VARIANT.into(), variant.into());
    labels
}

/// The replica decision for `idep` (given what its workloads run now, `running`) and its
/// children: a variant that cannot be realised ([`Children::unrealised_variants`]) is given no
/// new replicas, so the next variant in order of preference takes them.
pub fn decide_and_build(
    idep: &InferenceDeployment,
    namespace: &str,
    owner: Option<OwnerReference>,
    running: &autoscale::Running,
    capabilities: Capabilities,
) -> (ReplicaDecision, Children) {
    // Which variants cannot be realised does not depend on their replicas.
    let (shapes, problems) = shape_plans(idep);
    let spec = &idep.spec;
    let unavailable = spec
        .variants
        .iter()
        .filter(|v| !realisable(spec, v, &shapes, capabilities))
        .map(|v| v.name.clone())
        .collect();
    let decision = autoscale::decide_around(spec, running, &unavailable);
    let children = build_planned(
        idep,
        namespace,
        owner,
        &decision,
        capabilities,
        (shapes, problems),
    );
    (decision, children)
}

/// Each GPU shape's expert plan, with expert parallelism (none without), and a problem for
/// each shape no plan fits. Each shape (GPUs, nodes per replica) gets its own plan under a
/// ConfigMap key named after the shape ([`plan_key`]), so a key never changes shape when
/// variants are added, removed or reordered; every pod sees its plan mounted as
/// `placement.json`.
fn shape_plans(idep: &InferenceDeployment) -> (Vec<ShapePlan>, Vec<Problem>) {
    let spec = &idep.spec;
    let mut problems = Vec::new();
    let mut shapes: Vec<ShapePlan> = Vec::new();
    if spec.parallelism.expert_parallel.enabled {
        for v in &spec.variants {
            let shape = (v.gpus(&spec.parallelism), v.nodes(&spec.parallelism));
            if shapes.iter().any(|(s, _)| *s == shape) {
                continue;
            }
            let planned = match default_plan(idep, shape.0, shape.1) {
                Ok(plan) => Ok((plan_key(shape.0, shape.1), plan)),
                Err(message) => {
                    problems.push(Problem {
                        reason: "PlacementInfeasible",
                        message: format!("variant {}: {message}", v.name),
                    });
                    Err(())
                }
            };
            shapes.push((shape, planned));
        }
    }
    (shapes, problems)
}

/// Whether `variant` can be realised now, by the rules [`build`] applies: its GPU shape has a
/// plan (with expert parallelism), and a multi-node one has the LeaderWorkerSet API.
fn realisable(
    spec: &InferenceDeploymentSpec,
    variant: &GpuVariant,
    shapes: &[ShapePlan],
    capabilities: Capabilities,
) -> bool {
    let shape = (
        variant.gpus(&spec.parallelism),
        variant.nodes(&spec.parallelism),
    );
    let planned = !shapes.iter().any(|(s, r)| *s == shape && r.is_err());
    planned && (shape.1 <= 1 || capabilities.leader_worker_set)
}

/// Builds every child. `owner` is the controller reference (absent when rendering offline),
/// `namespace` the namespace children go to. Pure: same inputs, same objects.
pub fn build(
    idep: &InferenceDeployment,
    namespace: &str,
    owner: Option<OwnerReference>,
    decision: &ReplicaDecision,
    capabilities: Capabilities,
) -> Children {
    let planned = shape_plans(idep);
    build_planned(idep, namespace, owner, decision, capabilities, planned)
}

/// [`build`] with the shapes' plans made already ([`shape_plans`]).
fn build_planned(
    idep: &InferenceDeployment,
    namespace: &str,
    owner: Option<OwnerReference>,
    decision: &ReplicaDecision,
    capabilities: Capabilities,
    (shapes, mut problems): (Vec<ShapePlan>, Vec<Problem>),
) -> Children {
    let spec = &idep.spec;
    let meta = |name: String, labels: BTreeMap<String, String>| ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.to_string()),
        labels: Some(labels),
        owner_references: owner.clone().map(|o| vec![o]),
        ..ObjectMeta::default()
    };
    let plans: Vec<&(String, PlacementPlan)> =
        shapes.iter().filter_map(|(_, r)| r.as_ref().ok()).collect();
    let placement = plans.first().map(|(_, primary)| {
        let data = plans
            .iter()
            .map(|(key, plan)| (key.clone(), plan.to_canonical_json()))
            .collect();
        let config_map = ConfigMap {
            metadata: meta(placement_config_map_name(idep), common_labels(idep)),
            data: Some(data),
            ..ConfigMap::default()
        };
        (primary.clone(), stamped(config_map))
    });

    let mut workloads = Vec::new();
    let mut unrealised_variants = Vec::new();
    for variant in &spec.variants {
        let replicas = decision.replicas_of(&variant.name);
        let shape = (
            variant.gpus(&spec.parallelism),
            variant.nodes(&spec.parallelism),
        );
        let plan_mount = match shapes.iter().find(|(s, _)| *s == shape) {
            Some((_, Ok((key, plan)))) => Some((plan.hash(), key.clone())),
            // With expert parallelism the pods need a plan; without one, leave them as they are.
            Some((_, Err(()))) => {
                unrealised_variants.push(variant.name.clone());
                continue;
            }
            None => None,
        };
        let plan_mount = plan_mount.as_ref().map(|(h, k)| (h.as_str(), k.as_str()));
        let nodes = variant.nodes(&spec.parallelism);
        let labels = variant_labels(idep, &variant.name);
        let name = workload_name(idep, &variant.name);
        let workload = if nodes > 1 {
            if !capabilities.leader_worker_set {
                problems.push(Problem {
                    reason: "LeaderWorkerSetMissing",
                    message: format!(
                        "variant {} spans {nodes} nodes per replica, which needs a LeaderWorkerSet, but the operator has not found the leaderworkerset.x-k8s.io/v1 API (not installed, or its discovery failed: see the operator's log); install LeaderWorkerSet (kubernetes-sigs/lws), which the operator looks for every minute, or set nodesPerReplica: 1",
                        variant.name
                    ),
                });
                unrealised_variants.push(variant.name.clone());
                continue;
            }
            Workload::LeaderWorkerSet(Box::new(stamped_dynamic(lws::leader_worker_set(
                idep,
                variant,
                meta(name, labels.clone()),
                replicas,
                plan_mount,
            ))))
        } else {
            Workload::Deployment(Box::new(stamped(deployment(
                idep,
                variant,
                meta(name, labels),
                replicas,
                plan_mount,
            ))))
        };
        workloads.push(VariantChild {
            variant: variant.name.clone(),
            replicas,
            workload,
        });
    }
    if decision.unplaced > 0 {
        problems.push(Problem {
            reason: INSUFFICIENT_CAPACITY,
            message: format!(
                "{} of {} requested replicas fit no variant (every variant is at its maxReplicas); raise a variant's maxReplicas or add a variant",
                decision.unplaced,
                decision.total() + decision.unplaced
            ),
        });
    }

    let selector = BTreeMap::from([
        (LABEL_DEPLOYMENT.to_string(), idep.name_any()),
        (LABEL_ROLE.to_string(), ROLE_LEADER.to_string()),
    ]);
    let service = Service {
        metadata: meta(service_name(idep), common_labels(idep)),
        spec: Some(ServiceSpec {
            selector: Some(selector.clone()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: ENGINE_PORT,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    // One voluntary disruption at a time across all variants: node drains make progress, and
    // never take more than one serving replica away at once. A running pod that is not ready
    // (crash-looping, say) serves nothing the budget protects: it may always be evicted, so a
    // crash loop cannot block a node drain (`unhealthyPodEvictionPolicy`, beta and on by default
    // since Kubernetes 1.27, GA in 1.31).
    let pdb = PodDisruptionBudget {
        metadata: meta(service_name(idep), common_labels(idep)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    LABEL_DEPLOYMENT.to_string(),
                    idep.name_any(),
                )])),
                ..LabelSelector::default()
            }),
            unhealthy_pod_eviction_policy: Some(UNHEALTHY_POD_EVICTION_POLICY.into()),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    };

    Children {
        placement,
        workloads,
        unrealised_variants,
        service: stamped(service),
        pdb: stamped(pdb),
        problems,
    }
}

/// The plan used until measured expert loads exist: uniform load, so experts spread evenly
/// and redundant slots hold copies of the lowest-numbered experts. Err: why it cannot exist.
pub fn default_plan(
    idep: &InferenceDeployment,
    gpus: u32,
    nodes: u32,
) -> Result<PlacementPlan, String> {
    let ep = &idep.spec.parallelism.expert_parallel;
    let loads = vec![1.0; ep.experts() as usize];
    crate::placement::plan_experts(&loads, gpus, nodes, ep.redundant_experts).map_err(|e| {
        format!("{e}; choose parallelism.expertParallel.redundantExperts so that numExperts + redundantExperts is a multiple of the GPUs per replica")
    })
}

/// A GPU shape (GPUs, nodes per replica) and its plan with its ConfigMap key, or Err when
/// no plan fits that shape.
type ShapePlan = ((u32, u32), Result<(String, PlacementPlan), ()>);

/// A variant's plan in the placement ConfigMap: (plan hash, ConfigMap key).
pub type PlanMount<'a> = Option<(&'a str, &'a str)>;

fn deployment(
    idep: &InferenceDeployment,
    variant: &GpuVariant,
    metadata: ObjectMeta,
    replicas: i32,
    plan_mount: PlanMount,
) -> Deployment {
    let rollout = &idep.spec.rollout;
    let selector = metadata.labels.clone().map(|labels| {
        labels
            .into_iter()
            .filter(|(k, _)| k == LABEL_DEPLOYMENT || k == LABEL_VARIANT)
            .collect::<BTreeMap<_, _>>()
    });
    Deployment {
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: selector,
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(rollout.max_surge.clone()),
                    max_unavailable: Some(rollout.max_unavailable.clone()),
                }),
            }),
            // Model loading takes minutes; a rollout only counts as stuck well after that.
            progress_deadline_seconds: Some(pod::PROGRESS_DEADLINE_SECONDS),
            revision_history_limit: Some(3),
            template: pod::pod_template(
                idep,
                variant,
                metadata.labels.clone().unwrap_or_default(),
                ROLE_LEADER,
                plan_mount,
                1,
            ),
            ..DeploymentSpec::default()
        }),
        metadata,
        ..Deployment::default()
    }
}

/// Hash of an object as the operator would apply it (without the hash annotation itself).
pub fn content_hash<T: Serialize>(object: &T) -> String {
    // serde_json::Value sorts keys, so the hash does not depend on field order.
    let value = serde_json::to_value(object).unwrap_or_default();
    let digest = Sha256::digest(value.to_string().as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn stamped<K: Resource + Serialize>(mut object: K) -> K {
    let hash = content_hash(&object);
    object
        .meta_mut()
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANNOTATION_APPLIED_HASH.into(), hash);
    object
}

fn stamped_dynamic(mut object: DynamicObject) -> DynamicObject {
    let hash = content_hash(&object);
    object
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANNOTATION_APPLIED_HASH.into(), hash);
    object
}

/// The applied-hash annotation of an object, if any.
pub fn applied_hash(meta: &ObjectMeta) -> Option<&str> {
    meta.annotations
        .as_ref()?
        .get(ANNOTATION_APPLIED_HASH)
        .map(String::as_str)
}

#[cfg(test)]
mod tests;
