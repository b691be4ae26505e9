//! The reconciler: the thin I/O shell around [`children::build`], [`autoscale::decide`] and
//! [`status::compute`].
//!
//! Reads come from the watch caches in [`Stores`] (no API calls); writes are server-side
//! applies under [`FIELD_MANAGER`] with controller owner references (so deletion is garbage
//! collection, with no finalizer), made only for children whose applied hash differs from the
//! desired one, that someone else changed since (their generation, or for kinds without one their
//! resourceVersion, moved past what this process's apply left: `kubectl scale`, an edited image
//! or Service, which is then applied again), or that this process has not applied yet (once,
//! after a restart or a change of leader); the status is applied only when it changed. A
//! settled object therefore costs zero API requests per reconcile. A child of the right name
//! that another object controls is never applied over (`NameConflict`), and a workload the spec
//! no longer asks for is deleted only once the ones it asks for are rolled out (make before
//! break).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::DynamicObject;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sparsemoe_api::InferenceDeployment;
use sparsemoe_api::v1alpha1::{InferenceDeploymentStatus, ScalingPolicy};
use tracing::{info, warn};

use crate::autoscale::{self, ReplicaDecision};
use crate::children::{
    self, Cached, Capabilities, Children, LABEL_DEPLOYMENT, LABEL_VARIANT, Workload,
};
use crate::cost;
use crate::metrics::Metrics;
use crate::queue_scaling::{self, QueueObservation, Recommendations, Scrape};
use crate::status::{self, WorkloadObservation};
use crate::{Error, FIELD_MANAGER, Result};

/// Watch caches of the children (label `app.kubernetes.io/managed-by=sparsemoe-operator`).
#[derive(Clone, Debug)]
pub struct Stores {
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    pub pdbs: Store<PodDisruptionBudget>,
    pub config_maps: Store<ConfigMap>,
    pub pods: Store<Pod>,
    /// Present when the LeaderWorkerSet API is installed.
    pub leader_worker_sets: Option<Store<DynamicObject>>,
}

/// Shared state of the controller.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub stores: Stores,
    pub capabilities: Capabilities,
    /// Consecutive failures per object, for the error policy's backoff.
    pub failures: Mutex<HashMap<ObjectRef<InferenceDeployment>, u32>>,
    /// What each child was right after this process last applied it, by `kind/ns/name`: a
    /// cached child past it was changed by someone else (drift). See [`apply_reason`].
    pub applied: Mutex<HashMap<String, AppliedMark>>,
    /// Reads engines' `/metrics` (the `queueDepth` and `costAware` policies).
    pub scrape: Arc<dyn Scrape>,
    /// What the metric policies remember of each object, by UID (an object deleted and made
    /// again under its name starts afresh).
    pub queues: Mutex<HashMap<String, ScalingHistory>>,
}

/// What the metric policies remember of one object between reconciles.
#[derive(Debug, Default)]
pub struct ScalingHistory {
    /// The recommendations of its stabilization windows.
    pub recommendations: Recommendations,
    /// Its engines' last reads and its variants' measured throughput (`costAware`).
    pub throughput: cost::Throughput,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("capabilities", &self.capabilities)
            .finish_non_exhaustive()
    }
}

/// A child as this process's last apply of it left it: its generation where its kind has one
/// (status updates do not move it), else its resourceVersion (Services and ConfigMaps, whose
/// only writers besides this operator are the people changing them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppliedMark {
    Generation(i64),
    ResourceVersion(String),
}

impl AppliedMark {
    /// The mark of `meta`, `None` when it has neither.
    pub fn of(meta: &kube::api::ObjectMeta) -> Option<Self> {
        match (meta.generation, &meta.resource_version) {
            (Some(g), _) => Some(Self::Generation(g)),
            (None, Some(v)) => Some(Self::ResourceVersion(v.clone())),
            (None, None) => None,
        }
    }

    /// Whether `live` has been changed since this mark.
    fn moved(&self, live: &kube::api::ObjectMeta) -> bool {
        match self {
            Self::Generation(ours) => live.generation.is_some_and(|g| g > *ours),
            Self::ResourceVersion(ours) => live.resource_version.as_ref() != Some(ours),
        }
    }
}

/// The `kind/ns/name` key of a child in [`Context::applied`].
pub fn applied_key(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind}/{namespace}/{name}")
}

/// How long to wait before looking again at an object that cannot be fully realised: long
/// enough not to spin, short enough to notice a fixed cluster.
pub const UNREALISABLE_REQUEUE: Duration = Duration::from_secs(300);
/// Periodic resync of a healthy object (drift repair).
pub const RESYNC: Duration = Duration::from_secs(600);
/// First and longest retry delay after a failed reconcile.
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Reconciles one InferenceDeployment.
pub async fn reconcile(idep: Arc<InferenceDeployment>, ctx: Arc<Context>) -> Result<Action> {
    let timer = ctx.metrics.duration.start_timer();
    ctx.metrics.reconciles.inc();
    let result = reconcile_inner(&idep, &ctx).await;
    timer.observe_duration();
    if result.is_ok() {
        ctx.failures
            .lock()
            .map(|mut f| f.remove(&ObjectRef::from_obj(idep.as_ref())))
            .ok();
    }
    result
}

/// Forgets what [`Context`] keeps about objects that are gone: the backoff of InferenceDeployments
/// no longer in `ideps` (deleted while failing, so never reconciled again) and the marks of
/// children no longer in the caches (garbage-collected, or deleted as stale). Without this both
/// maps would grow with every object ever made; `run` calls it every [`RESYNC`].
pub fn prune(ctx: &Context, ideps: &Store<InferenceDeployment>) {
    if let Ok(mut failures) = ctx.failures.lock() {
        failures.retain(|key, _| ideps.get(key).is_some());
    }
    if let Ok(mut queues) = ctx.queues.lock() {
        let live: std::collections::HashSet<String> =
            ideps.state().iter().map(|i| queue_key(i)).collect();
        queues.retain(|key, _| live.contains(key));
    }
    let stores = &ctx.stores;
    let cached = |key: &str| {
        let mut parts = key.splitn(3, '/');
        let (Some(kind), Some(ns), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        match kind {
            "Deployment" => stores
                .deployments
                .get(&ObjectRef::new(name).within(ns))
                .is_some(),
            "Service" => stores
                .services
                .get(&ObjectRef::new(name).within(ns))
                .is_some(),
            "PodDisruptionBudget" => stores.pdbs.get(&ObjectRef::new(name).within(ns)).is_some(),
            "ConfigMap" => stores
                .config_maps
                .get(&ObjectRef::new(name).within(ns))
                .is_some(),
            children::LWS_KIND => stores.leader_worker_sets.as_ref().is_some_and(|s| {
                s.get(&ObjectRef::new_with(name, children::lws_api_resource()).within(ns))
                    .is_some()
            }),
            _ => false,
        }
    };
    if let Ok(mut applied) = ctx.applied.lock() {
        applied.retain(|key, _| cached(key));
    }
}

/// The longest `note` an `events.k8s.io/v1` Event takes (bytes); the API server refuses a
/// longer one, and the event would be lost.
pub const EVENT_NOTE_MAX: usize = 1024;

/// `note` cut to [`EVENT_NOTE_MAX`] bytes on a character boundary, marked with an ellipsis
/// when cut (a Degraded note joins every problem, and can run long).
pub fn event_note(mut note: String) -> String {
    if note.len() <= EVENT_NOTE_MAX {
        return note;
    }
    let mut end = EVENT_NOTE_MAX - '…'.len_utf8();
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    note.truncate(end);
    note.push('…');
    note
}

/// After a failed reconcile: retry with exponential backoff per object (5 s doubling to 5 min).
pub fn error_policy(idep: Arc<InferenceDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .failures
        .with_label_values(&[error.metric_label()])
        .inc();
    let attempts = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(ObjectRef::from_obj(idep.as_ref())).or_insert(0);
            *n = n.saturating_add(1);
            *n
        })
        .unwrap_or(1);
    let delay = backoff(attempts);
    warn!(name = %idep.name_any(), namespace = ?idep.namespace(), %error, attempts, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// The delay before retry number `attempts` (1-based).
pub fn backoff(attempts: u32) -> Duration {
    let factor = 1u32
        .checked_shl(attempts.saturating_sub(1))
        .unwrap_or(u32::MAX);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

/// What the cluster reports about the workloads of `idep`, by variant: of the kind the spec
/// asks for (a LeaderWorkerSet when a replica spans several nodes), so that while a variant
/// moves between kinds the old workload, kept serving until the new one is rolled out, does
/// not pass for it; and only workloads `idep` controls (another object's of the same name
/// says nothing about this one's).
fn observe(
    idep: &InferenceDeployment,
    namespace: &str,
    stores: &Stores,
) -> BTreeMap<String, WorkloadObservation> {
    let mut observed = BTreeMap::new();
    for v in &idep.spec.variants {
        let name = children::workload_name(idep, &v.name);
        let multi_node = v.nodes(&idep.spec.parallelism) > 1;
        if let Some(d) = stores
            .deployments
            .get(&ObjectRef::new(&name).within(namespace))
            .filter(|d| !multi_node && ours_to_read(&d.metadata, idep))
        {
            observed.insert(v.name.clone(), WorkloadObservation::from_deployment(&d));
        } else if let Some(l) = stores.leader_worker_sets.as_ref().and_then(|s| {
            s.get(&ObjectRef::new_with(&name, children::lws_api_resource()).within(namespace))
                .filter(|l| multi_node && ours_to_read(&l.metadata, idep))
        }) {
            observed.insert(
                v.name.clone(),
                WorkloadObservation::from_leader_worker_set(&l),
            );
        }
    }
    observed
}

/// Whether a cached object in `namespace` is one of `idep`'s children: labelled as its, and
/// controlled by it or by nothing (see [`ours_to_read`]).
fn child_of(meta: &kube::api::ObjectMeta, idep: &InferenceDeployment, namespace: &str) -> bool {
    meta.namespace.as_deref() == Some(namespace)
        && deployment_label(meta) == idep.metadata.name.as_ref()
        && ours_to_read(meta, idep)
}

/// Whether a cached child is `idep`'s to read: it controls it, or nothing does and it carries
/// `idep`'s label (an orphan the next apply adopts).
fn ours_to_read(meta: &kube::api::ObjectMeta, idep: &InferenceDeployment) -> bool {
    match controller_of(meta) {
        Some(c) => Some(c.uid.as_str()) == idep.metadata.uid.as_deref(),
        None => deployment_label(meta) == idep.metadata.name.as_ref(),
    }
}

/// The owner reference of the object that controls `meta`'s, if any.
fn controller_of(meta: &kube::api::ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
}

/// The InferenceDeployment a child is labelled as belonging to.
fn deployment_label(meta: &kube::api::ObjectMeta) -> Option<&String> {
    meta.labels.as_ref()?.get(LABEL_DEPLOYMENT)
}

fn owned_by(meta: &kube::api::ObjectMeta, uid: Option<&str>) -> bool {
    controller_of(meta).is_some_and(|o| Some(o.uid.as_str()) == uid)
}

/// How long a reconcile waits for the children's caches to sync (see [`caches_synced`]).
pub const CACHE_SYNC_WAIT: Duration = Duration::from_secs(1);

/// Whether `store` has had its first full list.
fn synced<K>(store: &Store<K>) -> bool
where
    K: kube::runtime::reflector::Lookup + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    use futures::FutureExt;
    store
        .wait_until_ready()
        .now_or_never()
        .is_some_and(|r| r.is_ok())
}

/// Whether every child cache has had its first full list. The controller holds reconciles only
/// until the InferenceDeployments' cache is ready; until the children's are too, a child would
/// look missing: applied as new (a status of `Creating` and a `Created` event on every restart)
/// and without the check that it is this object's.
fn caches_synced(stores: &Stores) -> bool {
    unsynced_caches(stores).is_empty()
}

/// The child kinds whose caches have not had their first full list yet.
pub fn unsynced_caches(stores: &Stores) -> Vec<&'static str> {
    [
        ("Deployment", synced(&stores.deployments)),
        ("Service", synced(&stores.services)),
        ("PodDisruptionBudget", synced(&stores.pdbs)),
        ("ConfigMap", synced(&stores.config_maps)),
        ("Pod", synced(&stores.pods)),
        (
            "LeaderWorkerSet",
            stores.leader_worker_sets.as_ref().is_none_or(synced),
        ),
    ]
    .into_iter()
    .filter_map(|(kind, synced)| (!synced).then_some(kind))
    .collect()
}

/// Whether any desired workload that exists already may still run pods of an older template
/// (see [`children::older_pods_may_remain`]).
fn rolling_out(desired: &Children, namespace: &str, stores: &Stores) -> bool {
    desired.workloads.iter().any(|child| match &child.workload {
        Workload::Deployment(d) => stores
            .deployments
            .get(&ObjectRef::from_obj(d.as_ref()))
            .is_some_and(|e| {
                children::older_pods_may_remain(Cached::Deployment(&e), &child.workload)
            }),
        Workload::LeaderWorkerSet(l) => stores.leader_worker_sets.as_ref().is_some_and(|s| {
            let key =
                ObjectRef::new_with(&l.name_any(), children::lws_api_resource()).within(namespace);
            s.get(&key).is_some_and(|e| {
                children::older_pods_may_remain(Cached::LeaderWorkerSet(&e), &child.workload)
            })
        }),
    })
}

async fn reconcile_inner(idep: &InferenceDeployment, ctx: &Context) -> Result<Action> {
    if idep.metadata.deletion_timestamp.is_some() {
        // Children go with it through their owner references.
        return Ok(Action::await_change());
    }
    if !caches_synced(&ctx.stores) {
        return Ok(Action::requeue(CACHE_SYNC_WAIT));
    }
    let namespace = idep
        .namespace()
        .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let name = idep.name_any();
    let uid = idep.metadata.uid.clone();
    let owner = idep.controller_owner_ref(&());
    let stores = &ctx.stores;

    let observed = observe(idep, &namespace, stores);
    // Workloads of this object that no spec variant's observation took: those of a variant
    // renamed, removed or moved between kinds, still running until they are replaced.
    let ours = |meta: &kube::api::ObjectMeta| child_of(meta, idep, &namespace);
    let workloads = stores
        .deployments
        .state()
        .iter()
        .filter(|d| ours(&d.metadata))
        .count()
        + stores.leader_worker_sets.as_ref().map_or(0, |s| {
            s.state().iter().filter(|l| ours(&l.metadata)).count()
        });
    // This object's pods, whatever their variant.
    let object_pods = stores.pods.state_filter(|p| {
        p.namespace().as_deref() == Some(namespace.as_str())
            && p.labels().get(LABEL_DEPLOYMENT) == Some(&name)
    });
    let mut running = autoscale::Running {
        variants: observed
            .iter()
            .map(|(v, o)| (v.clone(), o.spec_replicas))
            .collect(),
        replacing: (workloads > observed.len())
            .then_some(idep.status.as_ref())
            .flatten()
            .map(|s| s.variants.iter().map(|v| v.desired_replicas).sum()),
        queue: None,
        ranking: None,
    };
    let policy = idep.spec.scaling.policy;
    let by_queue = matches!(policy, ScalingPolicy::QueueDepth | ScalingPolicy::CostAware);
    let mut served = None;
    if by_queue {
        let seen = read_queues(&object_pods, ctx.scrape.as_ref()).await;
        let current = i64::from(
            running
                .variants
                .values()
                .map(|n| (*n).max(0))
                .sum::<i32>()
                .max(running.replacing.unwrap_or(0)),
        );
        let mut queues = ctx
            .queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let history = queues.entry(queue_key(idep)).or_default();
        let now = tokio::time::Instant::now();
        history.throughput.observe(&idep.spec, &seen.engines, now);
        served = history.throughput.served(&idep.spec.variants, seen.waiting);
        running.queue = Some(queue_scaling::recommend(
            &idep.spec.scaling,
            current,
            &seen,
            &mut history.recommendations,
            now,
        ));
        if policy == ScalingPolicy::CostAware {
            running.ranking = Some(history.throughput.rank(&idep.spec.variants));
        }
    }
    let (decision, desired) =
        children::decide_and_build(idep, &namespace, owner, &running, ctx.capabilities);
    let mut applied = Applied::default();
    let stale = StaleWorkloads::find(idep, &namespace, &desired, ctx);
    let mut failure = apply_children(
        &namespace,
        &desired,
        stale.is_empty(),
        &object_pods,
        ctx,
        &mut applied,
    )
    .await
    .err();

    // Make before break: workloads the spec no longer asks for (a variant renamed, removed, or
    // switched between Deployment and LeaderWorkerSet) go only once every workload it does ask
    // for is rolled out and available, and none is refused or unrealisable; until then they
    // keep serving (and the placement ConfigMap they may mount stays).
    let replaced = failure.is_none()
        && applied.rejected.is_empty()
        && desired.unrealised_variants.is_empty()
        && desired.workloads.iter().all(|child| {
            !applied.variants.contains(&child.variant)
                && observed
                    .get(&child.variant)
                    .is_some_and(|o| o.is_current(child.replicas))
        });
    if failure.is_none() {
        failure = delete_stale(
            idep,
            &namespace,
            uid.as_deref(),
            &desired,
            stale,
            replaced,
            ctx,
        )
        .await
        .err();
    }
    // A write that failed for a reason a retry may get past: the error policy retries it with
    // backoff. Once it has failed twice in a row it is in the status too (a new object would
    // have none, and an updated one would keep saying its old generation is Ready), as a
    // problem that blocks the rollout; a single failure (an API server restarting, a timeout)
    // does not flip the conditions.
    let failed_before = ctx
        .failures
        .lock()
        .map(|f| f.get(&ObjectRef::from_obj(idep)).copied().unwrap_or(0))
        .unwrap_or(0);
    if let Some(failed) = &failure {
        if let Some(variant) = &failed.variant {
            applied.refused_variants.insert(variant.clone());
        }
        applied.rejected.push(children::Problem {
            reason: RECONCILE_ERROR,
            message: format!(
                "{} {} {}: {}; retrying with backoff",
                failed.verb,
                failed.kind,
                failed.name,
                error_message(&failed.error)
            ),
        });
    }
    let Applied {
        variants: applied_variants,
        any: applied_any,
        rejected,
        refused_variants,
    } = applied;
    let client = ctx.client.clone();

    // Pods of the variants the spec has: a removed variant's, kept serving until its
    // replacement is rolled out, say nothing about this spec.
    let mut pods: Vec<Arc<Pod>> = object_pods
        .into_iter()
        .filter(|p| {
            p.labels()
                .get(LABEL_VARIANT)
                .is_some_and(|v| idep.spec.variants.iter().any(|s| &s.name == v))
        })
        .collect();
    // In name order, so the pod a problem names does not change with the cache's order.
    pods.sort_by_key(|p| p.name_any());
    let now = jiff::Timestamp::now();
    let pod_problems = status::pod_problems(pods.iter().map(|p| p.as_ref()), now);
    let inputs = status::Inputs {
        idep,
        namespace: &namespace,
        decision: &decision,
        children: &desired,
        observed: &observed,
        refused: &rejected,
        refused_variants: &refused_variants,
        pod_problems: &pod_problems,
        applied: &applied_variants,
        served: served.as_ref(),
    };
    let previous = idep.status.as_ref();
    let next = status::compute(&inputs, previous, now);
    let write = failure.is_none() || failed_before > 0;
    if write && status::needs_update(previous, &next) {
        let api: Api<InferenceDeployment> = Api::namespaced(client.clone(), &namespace);
        let patch = serde_json::json!({
            "apiVersion": InferenceDeployment::api_version(&()),
            "kind": InferenceDeployment::kind(&()),
            "status": next,
        });
        ctx.metrics.writes.inc();
        let written = api
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await;
        match (written, &failure) {
            (Ok(_), _) => {
                publish_transitions(idep, previous, &next, &decision, applied_any, ctx).await
            }
            (Err(e), None) => return Err(e.into()),
            // The child's error is the one to retry and report.
            (Err(error), Some(_)) => warn!(%error, "could not write the status"),
        }
    }
    if let Some(failed) = failure {
        return Err(failed.error);
    }

    let every = if !desired.problems.is_empty() || !rejected.is_empty() {
        UNREALISABLE_REQUEUE
    } else {
        RESYNC
    };
    // A pod waiting for a node is looked at again when its grace runs out, so that it is
    // reported then (see `status::UNSCHEDULABLE_GRACE`).
    let recheck = status::pod_recheck(pods.iter().map(|p| p.as_ref()), now);
    // Under the metric policies, the engines' queues are read again soon.
    let every = match by_queue {
        true => every.min(queue_scaling::SCRAPE_EVERY),
        false => every,
    };
    Ok(Action::requeue(recheck.map_or(every, |r| r.min(every))))
}

/// The `/metrics` address of a pod that serves: not being deleted, every container ready, an
/// IP, and not a LeaderWorkerSet worker (a replica's leader serves its API).
fn metrics_url(pod: &Pod) -> Option<String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    if pod
        .labels()
        .get(LWS_WORKER_INDEX)
        .is_some_and(|index| index != "0")
    {
        return None;
    }
    let status = pod.status.as_ref()?;
    let containers = status.container_statuses.as_deref().unwrap_or_default();
    if containers.is_empty() || !containers.iter().all(|c| c.ready) {
        return None;
    }
    let ip = status.pod_ip.as_deref().filter(|ip| !ip.is_empty())?;
    let host = match ip.contains(':') {
        true => format!("[{ip}]"),
        false => ip.to_string(),
    };
    Some(format!("http://{host}:{}/metrics", children::ENGINE_PORT))
}

/// Where an object's queueDepth history is kept: its UID, or without one its namespace/name.
fn queue_key(idep: &InferenceDeployment) -> String {
    idep.metadata.uid.clone().unwrap_or_else(|| {
        format!(
            "{}/{}",
            idep.namespace().unwrap_or_default(),
            idep.name_any()
        )
    })
}

/// The label a LeaderWorkerSet gives each pod of a group: 0 for the leader.
const LWS_WORKER_INDEX: &str = "leaderworkerset.sigs.k8s.io/worker-index";

/// What the serving pods' queues hold and have generated, read side by side.
async fn read_queues(pods: &[Arc<Pod>], scrape: &dyn Scrape) -> QueueObservation {
    let reads = pods.iter().filter_map(|pod| {
        let url = metrics_url(pod)?;
        let name = pod.name_any();
        let engine = cost::EngineRead {
            pod: pod.metadata.uid.clone().unwrap_or_else(|| name.clone()),
            variant: pod.labels().get(LABEL_VARIANT).cloned(),
            generated: None,
            full: false,
        };
        let body = scrape.get(url);
        Some(async move {
            let read = body.await.and_then(|text| {
                let sum = |metric| queue_scaling::metric_sum(&text, metric);
                let waiting = sum(queue_scaling::WAITING_METRIC)?.ok_or_else(|| {
                    format!("no {} in its metrics", queue_scaling::WAITING_METRIC)
                })?;
                let running = sum(queue_scaling::RUNNING_METRIC)?.unwrap_or(0.0);
                let slots = sum(queue_scaling::SLOTS_METRIC)?;
                let kv_usage = sum(cost::KV_USAGE_METRIC)?;
                let generated = sum(cost::GENERATED_METRIC)?;
                let values = [Some(waiting), Some(running), slots, kv_usage, generated];
                if values.iter().flatten().any(|v| !v.is_finite()) {
                    return Err("a metric that is not a finite number".to_string());
                }
                Ok((waiting, running, slots, kv_usage, generated))
            });
            (name, engine, read)
        })
    });
    let mut seen = QueueObservation::default();
    for (name, mut engine, read) in futures::future::join_all(reads).await {
        match read {
            Ok((waiting, running, slots, kv_usage, generated)) => {
                let (waiting, running) = (waiting.max(0.0), running.max(0.0));
                seen.waiting += waiting;
                seen.running += running;
                let slots = slots.filter(|s| *s > 0.0);
                if let Some(slots) = slots {
                    seen.slots += slots;
                    seen.slotted += 1;
                }
                seen.read += 1;
                engine.generated = generated;
                // Every slot running, or requests waiting for KV cache.
                engine.full = slots.is_some_and(|s| running >= s)
                    || (waiting > 0.0 && kv_usage.is_some_and(|u| u >= cost::KV_FULL));
                seen.engines.push(engine);
            }
            Err(why) => {
                warn!(pod = %name, error = %why, "cannot read the engine's metrics");
                seen.unread.push(format!("pod {name}: {why}"));
            }
        }
    }
    seen
}

/// The reason of the `Degraded` problem of a child write that failed, again, with an error a
/// retry may get past (the reconcile retries it with backoff, and says so from the second time).
pub const RECONCILE_ERROR: &str = "ReconcileError";

/// What the applies of one reconcile did.
#[derive(Debug, Default)]
struct Applied {
    /// Variants whose workload an apply changed (not current until observed).
    variants: BTreeSet<String>,
    /// Whether any apply changed a child.
    any: bool,
    /// Children the API server refused: problems for the status (see [`refused`]).
    rejected: Vec<children::Problem>,
    /// Variants whose workload is among `rejected` (or failed: [`ChildFailure::variant`]).
    refused_variants: BTreeSet<String>,
}

/// A child write that failed with an error a retry may get past (not a refusal: see
/// [`refused`]); the reconcile stops there.
#[derive(Debug)]
struct ChildFailure {
    verb: &'static str,
    kind: String,
    name: String,
    /// The variant whose workload it is, if it is one.
    variant: Option<String>,
    error: Error,
}

impl ChildFailure {
    fn of(
        verb: &'static str,
        kind: &str,
        name: &str,
        variant: Option<&str>,
    ) -> impl FnOnce(Error) -> Self {
        let (kind, name, variant) = (
            kind.to_string(),
            name.to_string(),
            variant.map(str::to_string),
        );
        move |error| Self {
            verb,
            kind,
            name,
            variant,
            error,
        }
    }
}

/// An error as the status says it: the API server's own words where it gave some.
fn error_message(error: &Error) -> String {
    match error {
        Error::Kube(kube::Error::Api(status)) => format!(
            "{} (HTTP {} {})",
            status.message, status.code, status.reason
        ),
        other => other.to_string(),
    }
}

/// Applies the children in `desired` (the placement ConfigMap, the workloads, the Service, the
/// PDB), noting in `applied` what changed and what the API server refused; stops at the first
/// other error. `settled`: no workload of this object is on its way out (see
/// [`StaleWorkloads`]); `object_pods`: this object's pods.
async fn apply_children(
    namespace: &str,
    desired: &Children,
    settled: bool,
    object_pods: &[Arc<Pod>],
    ctx: &Context,
    applied: &mut Applied,
) -> Result<(), ChildFailure> {
    let client = ctx.client.clone();
    let stores = &ctx.stores;
    let rejected = &mut applied.rejected;
    if let Some((_, config_map)) = &desired.placement {
        let existing = stores.config_maps.get(&ObjectRef::from_obj(config_map));
        // Workloads on their way out, and older pods of those being replaced in place, may
        // mount plans the spec no longer has: while any pod does, or may yet be made from an
        // older template, they stay.
        let mounted = children::mounted_plans(
            object_pods.iter().map(|p| p.as_ref()),
            &config_map.name_any(),
        );
        let plans = config_map.data.as_ref();
        let dropped_in_use = mounted
            .iter()
            .any(|k| plans.is_none_or(|d| !d.contains_key(k)));
        let settled = settled && !dropped_in_use && !rolling_out(desired, namespace, stores);
        let config_map = match settled {
            true => config_map.clone(),
            false => children::keeping_plans(config_map, existing.as_deref()),
        };
        let cm_name = config_map.name_any();
        let result =
            apply_if_changed(&client, namespace, &config_map, existing.as_deref(), ctx).await;
        applied.any |= refused(result, "ConfigMap", &cm_name, rejected)
            .map_err(ChildFailure::of("applying", "ConfigMap", &cm_name, None))?;
    }
    for child in &desired.workloads {
        let (kind, name) = match &child.workload {
            Workload::Deployment(d) => ("Deployment", d.name_any()),
            Workload::LeaderWorkerSet(l) => (children::LWS_KIND, l.name_any()),
        };
        let result = match &child.workload {
            Workload::Deployment(d) => {
                let existing = stores.deployments.get(&ObjectRef::from_obj(d.as_ref()));
                apply_if_changed(&client, namespace, d.as_ref(), existing.as_deref(), ctx).await
            }
            Workload::LeaderWorkerSet(l) => {
                let existing = stores.leader_worker_sets.as_ref().and_then(|s| {
                    s.get(
                        &ObjectRef::new_with(&l.name_any(), children::lws_api_resource())
                            .within(namespace),
                    )
                });
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), namespace, &children::lws_api_resource());
                apply_dynamic_if_changed(&api, l.as_ref(), existing.as_deref(), ctx).await
            }
        };
        let before = rejected.len();
        let changed = refused(result, kind, &name, rejected).map_err(ChildFailure::of(
            "applying",
            kind,
            &name,
            Some(&child.variant),
        ))?;
        if rejected.len() > before {
            // What runs is the spec before, however available.
            applied.refused_variants.insert(child.variant.clone());
        }
        if changed {
            applied.variants.insert(child.variant.clone());
            applied.any = true;
        }
    }
    let existing = stores.services.get(&ObjectRef::from_obj(&desired.service));
    let service = desired.service.name_any();
    let result = apply_if_changed(
        &client,
        namespace,
        &desired.service,
        existing.as_deref(),
        ctx,
    )
    .await;
    applied.any |= refused(result, "Service", &service, rejected)
        .map_err(ChildFailure::of("applying", "Service", &service, None))?;
    let existing = stores.pdbs.get(&ObjectRef::from_obj(&desired.pdb));
    let pdb = desired.pdb.name_any();
    let result = apply_if_changed(&client, namespace, &desired.pdb, existing.as_deref(), ctx).await;
    applied.any |= refused(result, "PodDisruptionBudget", &pdb, rejected).map_err(
        ChildFailure::of("applying", "PodDisruptionBudget", &pdb, None),
    )?;
    Ok(())
}

/// An apply's result, with a refusal turned into a problem for the status: as invalid (HTTP 400
/// or 422: a spec the CRD's schema lets through but the child's own API does not, such as
/// resource requests above their limits), as forbidden (403: an admission policy such as
/// Gatekeeper's denies it, a ResourceQuota on object counts is exceeded, or the operator's RBAC
/// lacks the verb), or a conflict over a new child's name (409: see [`apply_params`]). Retrying
/// at once cannot help, only a new spec (or a changed policy, quota or role, or the other object
/// gone) can, so the reconcile goes on (the status says `Degraded`, reason `ApplyRejected` or
/// `NameConflict`, with the API server's message) and looks again after
/// [`UNREALISABLE_REQUEUE`]. Other errors stay errors.
fn refused(
    result: Result<bool>,
    kind: &str,
    name: &str,
    problems: &mut Vec<children::Problem>,
) -> Result<bool> {
    match result {
        Err(Error::Kube(kube::Error::Api(status))) if matches!(status.code, 400 | 403 | 422) => {
            warn!(%kind, %name, message = %status.message, "the API server refused a child");
            problems.push(children::Problem {
                reason: "ApplyRejected",
                message: format!("the API server refused {kind} {name}: {}", status.message),
            });
            Ok(false)
        }
        // Only an apply that is not forced meets a conflict: a new child whose name is taken.
        Err(Error::Kube(kube::Error::Api(status))) if status.code == 409 => {
            warn!(%kind, %name, message = %status.message, "a child's name is taken");
            problems.push(children::Problem {
                reason: "NameConflict",
                message: format!(
                    "{kind} {name} exists and is not this InferenceDeployment's (the API \
                     server: {}); delete or rename it, or rename this object or variant",
                    status.message
                ),
            });
            Ok(false)
        }
        Err(Error::NotOurs { kind, name, owner }) => {
            warn!(%kind, %name, %owner, "a child's name is another object's");
            problems.push(children::Problem {
                reason: "NameConflict",
                message: format!(
                    "{kind} {name} exists and is controlled by {owner}, not this \
                     InferenceDeployment; delete or rename it, or rename this object or variant"
                ),
            });
            Ok(false)
        }
        other => other,
    }
}

/// Why a child is applied, or `None` when the cached object is as this operator left it: it
/// carries the desired hash and has not moved since this process's last apply of it (`key`,
/// [`AppliedMark`]). A child this process has not applied yet (after a restart, or a new
/// leader) is applied once, since what happened to it meanwhile is unknown: a server-side apply
/// that changes nothing changes nothing, and from then on only drift or a new spec writes.
fn apply_reason(
    ctx: &Context,
    key: &str,
    desired: &kube::api::ObjectMeta,
    existing: Option<&kube::api::ObjectMeta>,
) -> Option<&'static str> {
    let Some(existing) = existing else {
        return Some("created");
    };
    if children::applied_hash(existing) != children::applied_hash(desired) {
        return Some("spec changed");
    }
    let Ok(marks) = ctx.applied.lock() else {
        return Some("not applied since this operator started");
    };
    match marks.get(key) {
        None => Some("not applied since this operator started"),
        Some(mark) if mark.moved(existing) => Some("changed by someone else"),
        Some(_) => None,
    }
}

/// Server-side apply under [`FIELD_MANAGER`]: forced over a child the caches hold (ours: its
/// labels, and [`apply_with`] has checked that this InferenceDeployment controls it; the force
/// takes back fields someone else changed), not forced where they hold none,
/// so that an object of that name made by someone else (a user's Service, another
/// InferenceDeployment's Deployment whose name collides) is a conflict (409, `NameConflict` in
/// the status; see [`refused`]) rather than taken over.
fn apply_params(ours: bool) -> PatchParams {
    let params = PatchParams::apply(FIELD_MANAGER);
    if ours { params.force() } else { params }
}

/// Notes what an apply of `key` left (see [`Context::applied`]).
fn record_apply(ctx: &Context, key: String, applied: &kube::api::ObjectMeta) {
    if let (Some(mark), Ok(mut map)) = (AppliedMark::of(applied), ctx.applied.lock()) {
        map.insert(key, mark);
    }
}

/// Server-side applies `desired` when [`apply_reason`] gives a reason; whether that changed it.
async fn apply_if_changed<K>(
    client: &Client,
    namespace: &str,
    desired: &K,
    existing: Option<&K>,
    ctx: &Context,
) -> Result<bool>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    apply_with(&api, &K::kind(&()), namespace, desired, existing, ctx).await
}

/// [`apply_if_changed`] for a LeaderWorkerSet (a dynamic object).
async fn apply_dynamic_if_changed(
    api: &Api<DynamicObject>,
    desired: &DynamicObject,
    existing: Option<&DynamicObject>,
    ctx: &Context,
) -> Result<bool> {
    let namespace = desired.namespace().unwrap_or_default();
    apply_with(api, children::LWS_KIND, &namespace, desired, existing, ctx).await
}

/// The apply itself, through `api`, for both.
async fn apply_with<K>(
    api: &Api<K>,
    kind: &str,
    namespace: &str,
    desired: &K,
    existing: Option<&K>,
    ctx: &Context,
) -> Result<bool>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = desired.name_any();
    // A cached child of this name that another object controls (the caches hold what carries
    // the managed-by label, which another InferenceDeployment's children carry too) is neither
    // applied over nor taken: its owner reference would flip at every apply. One that no
    // object controls and that is labelled as this InferenceDeployment's (its children, left
    // by a `--cascade=orphan` delete of it) is adopted.
    let ours = controller_of(desired.meta()).map(|o| &o.uid);
    let mut adopt = false;
    if let Some(existing) = existing {
        match controller_of(existing.meta()) {
            Some(c) if Some(&c.uid) != ours => {
                return Err(Error::NotOurs {
                    kind: kind.to_string(),
                    name,
                    owner: format!("{} {}", c.kind, c.name),
                });
            }
            Some(_) => {}
            None if deployment_label(existing.meta()) == deployment_label(desired.meta()) => {
                adopt = true
            }
            None => {
                return Err(Error::NotOurs {
                    kind: kind.to_string(),
                    name,
                    owner: "no controller (and another object's labels)".to_string(),
                });
            }
        }
    }
    if existing.is_none() && MERGES_WITHOUT_CONFLICT.contains(&kind) {
        // Not among this object's children: a user's object of this name would merge with
        // the apply rather than conflict (a ConfigMap's keys, a Service without a selector),
        // and carry this object's owner reference from then on, to be deleted with it.
        if let Some(found) = api.get_opt(&name).await? {
            match controller_of(found.meta()) {
                // Made by an earlier apply, not yet in the cache.
                Some(c) if Some(&c.uid) == ours => {}
                other => {
                    return Err(Error::NotOurs {
                        kind: kind.to_string(),
                        name,
                        owner: other.map_or("no controller (a user's object)".to_string(), |c| {
                            format!("{} {}", c.kind, c.name)
                        }),
                    });
                }
            }
        }
    }
    let key = applied_key(kind, namespace, &name);
    let reason = if adopt {
        Some("adopted (it had no controller)")
    } else {
        apply_reason(ctx, &key, desired.meta(), existing.map(|e| e.meta()))
    };
    let Some(reason) = reason else {
        return Ok(false);
    };
    ctx.metrics.writes.inc();
    let applied = api
        .patch(
            &name,
            &apply_params(existing.is_some()),
            &Patch::Apply(desired),
        )
        .await?;
    record_apply(ctx, key, applied.meta());
    info!(%kind, %name, %namespace, reason, "applied");
    fault_pause_after_apply().await;
    // Whether the apply changed the object: an apply that only re-asserts it (after a restart)
    // starts no rollout, so the status need not wait for one.
    Ok(existing.is_none_or(|e| AppliedMark::of(e.meta()) != AppliedMark::of(applied.meta())))
}

/// Child kinds whose apply merges with another object of the same name instead of meeting a
/// conflict (their fields can be disjoint), so one not in the caches is looked up first.
const MERGES_WITHOUT_CONFLICT: [&str; 2] = ["ConfigMap", "Service"];

/// Environment variable for fault injection in the end-to-end tests: each child apply is
/// followed by a pause of this many milliseconds, so a test can SIGKILL the operator between
/// two writes of one reconcile. Not for production use.
pub const FAULT_PAUSE_ENV: &str = "SPARSEMOE_OPERATOR_FAULT_PAUSE_AFTER_APPLY_MS";

/// The fault-injection pause, read (and warned about) once; `run` calls it at start-up so the
/// warning comes before any reconcile.
pub fn fault_pause() -> Option<Duration> {
    static PAUSE: OnceLock<Option<Duration>> = OnceLock::new();
    *PAUSE.get_or_init(|| {
        let value = std::env::var(FAULT_PAUSE_ENV).ok()?;
        match value.parse::<u64>() {
            Ok(ms) => {
                warn!("{FAULT_PAUSE_ENV}={ms}: pausing {ms} ms after every child apply (fault injection for tests)");
                Some(Duration::from_millis(ms))
            }
            Err(e) => {
                warn!("ignoring {FAULT_PAUSE_ENV}={value:?}: not a whole number of milliseconds ({e})");
                None
            }
        }
    })
}

async fn fault_pause_after_apply() {
    if let Some(pause) = fault_pause() {
        tokio::time::sleep(pause).await;
    }
}

/// Workloads of this object that the spec no longer asks for: those of removed or renamed
/// variants, or of a variant that switched between Deployment and LeaderWorkerSet, whether it
/// controls them or they were left without a controller but with its label (a
/// `--cascade=orphan` delete of it, then a spec without that variant). Workloads of variants
/// that cannot be realised right now are not among them (they are left running).
struct StaleWorkloads {
    deployments: Vec<Arc<Deployment>>,
    leader_worker_sets: Vec<Arc<DynamicObject>>,
}

impl StaleWorkloads {
    fn find(
        idep: &InferenceDeployment,
        namespace: &str,
        desired: &Children,
        ctx: &Context,
    ) -> Self {
        let wanted: BTreeSet<String> = desired
            .workloads
            .iter()
            .map(|c| match &c.workload {
                Workload::Deployment(d) => format!("Deployment/{}", d.name_any()),
                Workload::LeaderWorkerSet(l) => format!("LeaderWorkerSet/{}", l.name_any()),
            })
            .collect();
        let stale = |kind: &str, meta: &kube::api::ObjectMeta| {
            let variant = meta.labels.as_ref().and_then(|l| l.get(LABEL_VARIANT));
            let unrealised = variant.is_some_and(|v| desired.unrealised_variants.contains(v));
            child_of(meta, idep, namespace)
                && !unrealised
                && !wanted.contains(&format!(
                    "{kind}/{}",
                    meta.name.as_deref().unwrap_or_default()
                ))
        };
        Self {
            deployments: ctx
                .stores
                .deployments
                .state_filter(|d| stale("Deployment", &d.metadata)),
            leader_worker_sets: ctx
                .stores
                .leader_worker_sets
                .as_ref()
                .map_or_else(Vec::new, |store| {
                    store.state_filter(|l| stale("LeaderWorkerSet", &l.metadata))
                }),
        }
    }

    fn is_empty(&self) -> bool {
        self.deployments.is_empty() && self.leader_worker_sets.is_empty()
    }
}

/// Deletes children this object owns that the spec no longer asks for: the `stale` workloads
/// once `replaced` (the workloads it asks for are rolled out), and the placement ConfigMap once
/// expert parallelism is off.
async fn delete_stale(
    idep: &InferenceDeployment,
    namespace: &str,
    uid: Option<&str>,
    desired: &Children,
    stale: StaleWorkloads,
    replaced: bool,
    ctx: &Context,
) -> Result<(), ChildFailure> {
    if !replaced {
        return Ok(());
    }
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    for d in stale.deployments {
        ctx.metrics.writes.inc();
        delete_ignoring_missing(&api, &d.name_any())
            .await
            .map_err(ChildFailure::of(
                "deleting",
                "Deployment",
                &d.name_any(),
                None,
            ))?;
        info!(deployment = %d.name_any(), %namespace, "deleted stale workload");
    }
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), namespace, &children::lws_api_resource());
    for l in stale.leader_worker_sets {
        ctx.metrics.writes.inc();
        delete_ignoring_missing(&api, &l.name_any())
            .await
            .map_err(ChildFailure::of(
                "deleting",
                children::LWS_KIND,
                &l.name_any(),
                None,
            ))?;
        info!(leader_worker_set = %l.name_any(), %namespace, "deleted stale workload");
    }
    let placement_infeasible = desired
        .problems
        .iter()
        .any(|p| p.reason == "PlacementInfeasible");
    if desired.placement.is_none() && !placement_infeasible {
        let cm_name = children::placement_config_map_name(idep);
        if let Some(cm) = ctx
            .stores
            .config_maps
            .get(&ObjectRef::new(&cm_name).within(namespace))
            && cm.labels().get(LABEL_DEPLOYMENT) == Some(&idep.name_any())
            && owned_by(&cm.metadata, uid)
        {
            ctx.metrics.writes.inc();
            delete_ignoring_missing(
                &Api::<ConfigMap>::namespaced(ctx.client.clone(), namespace),
                &cm_name,
            )
            .await
            .map_err(ChildFailure::of("deleting", "ConfigMap", &cm_name, None))?;
        }
    }
    Ok(())
}

async fn delete_ignoring_missing<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Events for the transitions that matter: created, scaled, rollout done, degraded.
async fn publish_transitions(
    idep: &InferenceDeployment,
    previous: Option<&InferenceDeploymentStatus>,
    next: &InferenceDeploymentStatus,
    decision: &ReplicaDecision,
    applied_any: bool,
    ctx: &Context,
) {
    let mut events = Vec::new();
    let desired_total =
        |s: &InferenceDeploymentStatus| s.variants.iter().map(|v| v.desired_replicas).sum::<i32>();
    match previous {
        None if applied_any => events.push((
            EventType::Normal,
            "Created",
            format!(
                "created the engine workloads for {} replica(s)",
                decision.total()
            ),
        )),
        Some(prev) if !prev.variants.is_empty() && desired_total(prev) != desired_total(next) => {
            events.push((
                EventType::Normal,
                "Scaled",
                format!(
                    "replicas {} -> {} ({})",
                    desired_total(prev),
                    desired_total(next),
                    decision.reason
                ),
            ))
        }
        _ => {}
    }
    // Complete now, and not before (rolling out, or stalled by a problem).
    let complete = |s: Option<&InferenceDeploymentStatus>| {
        status::find(s, status::PROGRESSING)
            .is_some_and(|c| c.status == "False" && c.reason == "RolloutComplete")
    };
    if status::find(previous, status::PROGRESSING).is_some()
        && !complete(previous)
        && complete(Some(next))
    {
        events.push((
            EventType::Normal,
            "RolloutComplete",
            "every variant runs the current spec".into(),
        ));
    }
    if let Some(degraded) =
        status::find(Some(next), status::DEGRADED).filter(|c| c.status == "True")
    {
        let before = status::find(previous, status::DEGRADED);
        if before.is_none_or(|b| b.status != "True" || b.reason != degraded.reason) {
            events.push((
                EventType::Warning,
                "Degraded",
                format!("{}: {}", degraded.reason, degraded.message),
            ));
        }
    }
    let reference = idep.object_ref(&());
    for (type_, reason, note) in events {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(event_note(note)),
            action: "Reconcile".into(),
            secondary: None,
        };
        // An event that cannot be recorded is not a reason to retry the reconcile.
        if let Err(error) = ctx.recorder.publish(&event, &reference).await {
            warn!(%error, reason, "could not publish event");
        }
    }
}

#[cfg(test)]
mod tests;
