//! Status and conditions, computed purely from the spec, the replica decision, the children
//! and what the cluster reports about them.
//!
//! `Ready` is True only when every variant's current generation is available (all desired
//! replicas updated and available, no old pods left) and every child of the current spec was
//! applied; `Progressing` is True while a rollout or scale is under way, and False with reason
//! `Stalled` while a problem no rollout gets past blocks it; `Degraded` is True with a reason
//! when part of the spec cannot be realised, a rollout is failing, or pods cannot start or be
//! scheduled. For tools that read kstatus (cli-utils: Flux's default health check, Config Sync,
//! kpt), which understands only the abnormal-true `Reconciling` and `Stalled`, those two are
//! written as well: `Reconciling` is True exactly while `Progressing` is, `Stalled` exactly
//! while a blocking problem holds (`Progressing=False`, reason `Stalled`); they are never both
//! True. Nothing in the status changes from one loop to the next unless the world did:
//! condition times move only when a condition's status flips, so an unchanged, settled object
//! needs no status write ([`needs_update`]).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::core::DynamicObject;
use sparsemoe_api::InferenceDeployment;
use sparsemoe_api::v1alpha1::{
    InferenceDeploymentStatus, PlacementStatus, ScalingDecision, ScalingMetrics, VariantStatus,
};

use crate::autoscale::ReplicaDecision;
use crate::children::{self, Children, Problem};

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
/// The reason of `Progressing=False` while a problem (see `Degraded`) blocks the rollout, and
/// the kstatus condition that is True then.
pub const STALLED: &str = "Stalled";
/// The kstatus condition that is True while `Progressing` is.
pub const RECONCILING: &str = "Reconciling";
pub const SCALING_ACTIVE: &str = "ScalingActive";

/// What the cluster reports about one variant's workload.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkloadObservation {
    /// metadata.generation and status.observedGeneration (None where the kind has none).
    pub generation: Option<i64>,
    pub observed_generation: Option<i64>,
    /// spec.replicas as the cluster has it.
    pub spec_replicas: i32,
    pub replicas: i32,
    pub ready: i32,
    pub updated: i32,
    pub available: i32,
    /// A failing rollout (e.g. ProgressDeadlineExceeded), as a problem.
    pub failure: Option<Problem>,
}

impl WorkloadObservation {
    pub fn from_deployment(d: &Deployment) -> Self {
        let status = d.status.clone().unwrap_or_default();
        let failure = status.conditions.iter().flatten().find_map(|c| {
            let stuck = c.type_ == "Progressing" && c.status == "False";
            let failed = c.type_ == "ReplicaFailure" && c.status == "True";
            (stuck || failed).then(|| Problem {
                reason: if stuck {
                    "RolloutStuck"
                } else {
                    "ReplicaFailure"
                },
                message: format!(
                    "deployment {}: {}",
                    d.name_any(),
                    c.message
                        .clone()
                        .unwrap_or_else(|| c.reason.clone().unwrap_or_default())
                ),
            })
        });
        Self {
            generation: d.metadata.generation,
            observed_generation: status.observed_generation,
            spec_replicas: d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            replicas: status.replicas.unwrap_or(0),
            ready: status.ready_replicas.unwrap_or(0),
            updated: status.updated_replicas.unwrap_or(0),
            available: status.available_replicas.unwrap_or(0),
            failure,
        }
    }

    /// A LeaderWorkerSet reports groups: a group is ready when all its pods are. Its generation
    /// is seen once a condition carries it (so the counts of the spec before do not pass for
    /// the new one's).
    pub fn from_leader_worker_set(l: &DynamicObject) -> Self {
        let num = |v: &serde_json::Value, key: &str| {
            v.get(key)
                .and_then(|x| x.as_i64())
                .map_or(0, |x| i32::try_from(x).unwrap_or(0))
        };
        let spec = l.data.get("spec").cloned().unwrap_or_default();
        let status = l.data.get("status").cloned().unwrap_or_default();
        // LeaderWorkerSet has no status.observedGeneration; its controller stamps each condition
        // with the generation it saw. Without that (an older controller), the counts alone.
        let observed = status
            .get("conditions")
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("observedGeneration")?.as_i64())
            .filter(|&g| g > 0)
            .max();
        Self {
            generation: observed.and(l.metadata.generation),
            observed_generation: observed,
            spec_replicas: spec.get("replicas").map_or(1, |_| num(&spec, "replicas")),
            replicas: num(&status, "replicas"),
            ready: num(&status, "readyReplicas"),
            updated: num(&status, "updatedReplicas"),
            available: num(&status, "readyReplicas"),
            failure: None,
        }
    }

    /// The current generation is fully rolled out and available at `desired` replicas.
    pub fn is_current(&self, desired: i32) -> bool {
        let generation_seen = match (self.generation, self.observed_generation) {
            (Some(g), Some(o)) => o >= g,
            (Some(_), None) => false,
            (None, _) => true,
        };
        generation_seen
            && self.spec_replicas == desired
            && self.replicas == desired
            && self.updated == desired
            && self.available == desired
    }
}

/// Restarts after which a container that is running again but not yet ready, and last ended in
/// failure, counts as crash-looping: between two back-offs it runs (loading the model, for
/// minutes) and is not `waiting`, which alone would flip `Degraded` back and forth each cycle.
const CRASH_LOOP_RESTARTS: i32 = 2;

/// Whether a container crash-loops: waiting in `CrashLoopBackOff`, or running again, not ready,
/// after [`CRASH_LOOP_RESTARTS`] or more restarts, the last one a failure.
fn crash_looping(cs: &k8s_openapi::api::core::v1::ContainerStatus) -> bool {
    let state = cs.state.as_ref();
    let backing_off = state
        .and_then(|s| s.waiting.as_ref())
        .is_some_and(|w| w.reason.as_deref() == Some("CrashLoopBackOff"));
    let failed_last = cs
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .is_some_and(|t| t.exit_code != 0);
    let running_again = state.is_some_and(|s| s.running.is_some())
        && !cs.ready
        && cs.restart_count >= CRASH_LOOP_RESTARTS
        && failed_last;
    backing_off || running_again
}

/// How long a pod may wait for a node before it counts as [`UNSCHEDULABLE`]: longer than a
/// replica takes to free its GPUs when it is replaced ([`children::TERMINATION_GRACE_SECONDS`]:
/// a rollout with `maxUnavailable` on a full cluster waits that long for each node) and than a
/// cluster autoscaler usually takes to add a GPU node, so that a rollout or a scale-up that will
/// get its nodes does not flip `Degraded` back and forth.
pub const UNSCHEDULABLE_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// The pod problem of pods the scheduler finds no node for (`PodScheduled=False`, reason
/// `Unschedulable`) for longer than [`UNSCHEDULABLE_GRACE`].
pub const UNSCHEDULABLE: &str = "Unschedulable";

/// Since when the scheduler finds no node for `pod`, and its message; `None` while it is
/// scheduled, not yet tried, gated, or being deleted.
fn unschedulable(pod: &Pod) -> Option<(jiff::Timestamp, &str)> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let scheduled = pod
        .status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled")?;
    if scheduled.status != "False" || scheduled.reason.as_deref() != Some("Unschedulable") {
        return None;
    }
    // Without a time (never from a real API server), it counts at once.
    let since = scheduled
        .last_transition_time
        .as_ref()
        .or(pod.metadata.creation_timestamp.as_ref())
        .map_or(jiff::Timestamp::UNIX_EPOCH, |t| t.0);
    Some((since, scheduled.message.as_deref().unwrap_or_default()))
}

/// How long pods unschedulable `since` have waited at `now`.
fn waited(since: jiff::Timestamp, now: jiff::Timestamp) -> std::time::Duration {
    std::time::Duration::try_from(now.duration_since(since)).unwrap_or_default()
}

/// Pods that cannot start, as problems (image pulls, crash loops, no node for them past
/// [`UNSCHEDULABLE_GRACE`] at `now`), at most one per reason.
pub fn pod_problems<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    now: jiff::Timestamp,
) -> Vec<Problem> {
    let mut found: BTreeMap<&'static str, (usize, String)> = BTreeMap::new();
    for pod in pods {
        if let Some((since, message)) = unschedulable(pod)
            && waited(since, now) >= UNSCHEDULABLE_GRACE
        {
            let entry = found
                .entry(UNSCHEDULABLE)
                .or_insert_with(|| (0, format!("pod {}: {message}", pod.name_any())));
            entry.0 += 1;
        }
        let statuses = pod.status.iter().flat_map(|s| {
            s.container_statuses
                .iter()
                .flatten()
                .chain(s.init_container_statuses.iter().flatten())
        });
        for cs in statuses {
            let waiting = cs.state.as_ref().and_then(|s| s.waiting.as_ref());
            let reason = match waiting.and_then(|w| w.reason.as_deref()) {
                _ if crash_looping(cs) => "EngineCrashLooping",
                Some("ErrImagePull" | "ImagePullBackOff" | "InvalidImageName") => "ImagePullFailed",
                Some("CreateContainerConfigError") => "ContainerConfigError",
                _ => continue,
            };
            let entry = found.entry(reason).or_insert_with(|| {
                (
                    0,
                    format!(
                        "pod {} (container {}, image {})",
                        pod.name_any(),
                        cs.name,
                        cs.image
                    ),
                )
            });
            entry.0 += 1;
        }
    }
    found
        .into_iter()
        .map(|(reason, (count, example))| Problem {
            reason,
            message: match reason {
                "ImagePullFailed" => format!("{count} engine container(s) cannot pull their image, e.g. {example}; check the image reference and pull secrets"),
                "EngineCrashLooping" => format!("{count} engine container(s) are crash-looping, e.g. {example}; see its logs"),
                UNSCHEDULABLE => format!(
                    "{count} engine pod(s) have found no node for {} min or more, e.g. {example}; add nodes of the variant with free GPUs, or lower the replicas",
                    UNSCHEDULABLE_GRACE.as_secs() / 60
                ),
                _ => format!("{count} engine container(s) cannot be configured, e.g. {example}"),
            },
        })
        .collect()
}

/// When to look at `pods` again so that one the scheduler finds no node for is reported once
/// [`UNSCHEDULABLE_GRACE`] has passed (nothing else would trigger a reconcile then): the
/// shortest wait left at `now`, `None` when no pod is waiting within its grace.
pub fn pod_recheck<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    now: jiff::Timestamp,
) -> Option<std::time::Duration> {
    pods.into_iter()
        .filter_map(unschedulable)
        .filter_map(|(since, _)| UNSCHEDULABLE_GRACE.checked_sub(waited(since, now)))
        .filter(|left| !left.is_zero())
        .min()
}

/// Everything the status is computed from.
#[derive(Debug)]
pub struct Inputs<'a> {
    pub idep: &'a InferenceDeployment,
    pub namespace: &'a str,
    pub decision: &'a ReplicaDecision,
    pub children: &'a Children,
    /// By variant name.
    pub observed: &'a BTreeMap<String, WorkloadObservation>,
    /// Children the API server refused in this reconcile, or whose write failed again (they
    /// block the rollout, and what serves is not all of the current spec: not `Ready`).
    pub refused: &'a [Problem],
    /// Variants whose workload is among `refused`: what runs is an older spec's, not current
    /// however available.
    pub refused_variants: &'a BTreeSet<String>,
    /// Pods that cannot start (a rollout may still fix them: they make the object Degraded,
    /// and block its rollout only once the workload's own progress deadline passes).
    pub pod_problems: &'a [Problem],
    /// Variants whose workload was (re)applied in this reconcile: not current until observed.
    pub applied: &'a BTreeSet<String>,
    /// Under the metric policies: what the engines read serve and cost (absent when none
    /// could be read).
    pub served: Option<&'a ScalingMetrics>,
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        // Filled by `carry_transition_times`.
        last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
    }
}

/// A condition that is `True` while there are `problems` (with the first's reason and all
/// their messages), else `False` with `AsExpected` and `fine`.
fn problems_condition(
    type_: &str,
    problems: &[&Problem],
    fine: &str,
    generation: Option<i64>,
) -> Condition {
    match problems.first() {
        Some(first) => condition(
            type_,
            true,
            first.reason,
            problems
                .iter()
                .map(|p| p.message.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            generation,
        ),
        None => condition(type_, false, "AsExpected", fine.into(), generation),
    }
}

/// The status the object should have. `previous` is the status it has now; `now` stamps the
/// conditions whose status flipped.
pub fn compute(
    inputs: &Inputs,
    previous: Option<&InferenceDeploymentStatus>,
    now: jiff::Timestamp,
) -> InferenceDeploymentStatus {
    let Inputs {
        idep,
        namespace,
        decision,
        children,
        observed,
        refused,
        refused_variants,
        pod_problems,
        applied,
        served,
    } = *inputs;
    let generation = idep.metadata.generation;

    let mut variants = Vec::new();
    let mut not_current = Vec::new();
    for v in &idep.spec.variants {
        let desired = decision.replicas_of(&v.name);
        let seen = observed.get(&v.name).cloned().unwrap_or_default();
        let unrealised = children.unrealised_variants.contains(&v.name);
        let current = !unrealised
            && !applied.contains(&v.name)
            && !refused_variants.contains(&v.name)
            && observed.contains_key(&v.name)
            && seen.is_current(desired);
        let current = current
            || (desired == 0
                && !observed.contains_key(&v.name)
                && !unrealised
                && !refused_variants.contains(&v.name));
        if !(current || unrealised && desired == 0) {
            not_current.push(format!(
                "{}: {}/{desired} updated, {}/{desired} available",
                v.name, seen.updated, seen.available
            ));
        }
        variants.push(VariantStatus {
            name: v.name.clone(),
            desired_replicas: desired,
            replicas: seen.replicas,
            ready_replicas: seen.ready,
            updated_replicas: seen.updated,
        });
    }

    // What no rollout gets past: an unrealisable spec, a refused child, a stuck workload. (Too
    // few variants' room for the replicas asked for is a problem, but the replicas that fit
    // roll out all the same.)
    let (short, unrealisable): (Vec<&Problem>, Vec<&Problem>) = children
        .problems
        .iter()
        .partition(|p| p.reason == children::INSUFFICIENT_CAPACITY);
    let blocking: Vec<&Problem> = unrealisable
        .into_iter()
        .chain(observed.values().filter_map(|o| o.failure.as_ref()))
        .chain(refused)
        .collect();
    let problems: Vec<&Problem> = blocking
        .iter()
        .copied()
        .chain(short)
        .chain(pod_problems)
        .collect();
    let degraded = problems_condition(DEGRADED, &problems, "every child is realised", generation);
    let progressing = if let Some(blocker) = blocking.first() {
        // Not progressing: waiting will not finish the rollout while a problem blocks it (nor
        // realise the rest of the spec, where every variant is current), and GitOps tools
        // should see a failure now rather than at their timeout.
        let blocked = format!("blocked by {}: see Degraded", blocker.reason);
        condition(
            PROGRESSING,
            false,
            STALLED,
            if not_current.is_empty() {
                blocked
            } else {
                format!("{}; {blocked}", not_current.join("; "))
            },
            generation,
        )
    } else if not_current.is_empty() {
        condition(
            PROGRESSING,
            false,
            "RolloutComplete",
            "every variant runs the current spec".into(),
            generation,
        )
    } else {
        let reason = if observed.is_empty() {
            "Creating"
        } else {
            "RollingOut"
        };
        condition(
            PROGRESSING,
            true,
            reason,
            not_current.join("; "),
            generation,
        )
    };
    let total = decision.total();
    let ready = if total == 0 && decision.unplaced == 0 {
        condition(
            READY,
            false,
            "NoReplicas",
            "scaled to zero replicas: nothing serves".into(),
            generation,
        )
    } else if let Some(first) = refused.first() {
        // What serves, however available, is not all of the current spec.
        condition(
            READY,
            false,
            first.reason,
            "the current spec could not be applied in full: see Degraded".into(),
            generation,
        )
    } else if not_current.is_empty() && decision.unplaced == 0 {
        condition(
            READY,
            true,
            "Available",
            format!("{total} replica(s) of the current spec are available"),
            generation,
        )
    } else if decision.unplaced > 0 {
        condition(
            READY,
            false,
            children::INSUFFICIENT_CAPACITY,
            format!("{} requested replica(s) fit no variant", decision.unplaced),
            generation,
        )
    } else {
        condition(
            READY,
            false,
            "NotAvailable",
            "the current spec is not yet available on every variant".into(),
            generation,
        )
    };
    let scaling = condition(
        SCALING_ACTIVE,
        !decision.holding,
        decision.reason_code,
        decision.reason.clone(),
        generation,
    );
    // The kstatus pair (see the module's documentation).
    let reconciling = Condition {
        type_: RECONCILING.into(),
        ..progressing.clone()
    };
    let stalled = problems_condition(
        STALLED,
        &blocking,
        "no problem blocks the rollout",
        generation,
    );
    let mut conditions = vec![ready, progressing, degraded, scaling, reconciling, stalled];
    carry_transition_times(
        &mut conditions,
        previous
            .map(|p| p.conditions.as_slice())
            .unwrap_or_default(),
        now,
    );

    InferenceDeploymentStatus {
        observed_generation: generation,
        conditions,
        replicas: variants.iter().map(|v| v.replicas).sum(),
        ready_replicas: variants.iter().map(|v| v.ready_replicas).sum(),
        updated_replicas: variants.iter().map(|v| v.updated_replicas).sum(),
        selector: Some(children::pod_selector(idep)),
        variants,
        last_scaling: last_scaling(decision, served, previous, now),
        placement: children
            .placement
            .as_ref()
            .map(|(plan, cm)| PlacementStatus {
                hash: plan.hash(),
                balancedness: plan.balancedness,
                config_map: cm.name_any(),
            }),
        endpoint: Some(children::endpoint(idep, namespace)),
    }
}

/// `status.lastScaling`: a metric policy's decision, with what the engines served, when its
/// replicas per variant differ from the last one written (so a settled object's status does
/// not change with its load); otherwise what the object has.
fn last_scaling(
    decision: &ReplicaDecision,
    served: Option<&ScalingMetrics>,
    previous: Option<&InferenceDeploymentStatus>,
    now: jiff::Timestamp,
) -> Option<ScalingDecision> {
    let last = previous.and_then(|p| p.last_scaling.as_ref());
    let (Some(served), false) = (served, decision.holding) else {
        return last.cloned();
    };
    let variants: BTreeMap<String, i32> = decision.variants.iter().cloned().collect();
    match last {
        Some(last) if last.variants == variants => Some(last.clone()),
        _ => Some(ScalingDecision {
            replicas: decision.total(),
            variants,
            reason: decision.reason.clone(),
            metrics: served.clone(),
            time: Some(Time(now)),
        }),
    }
}

/// A condition keeps its lastTransitionTime unless its status flipped.
fn carry_transition_times(
    conditions: &mut [Condition],
    previous: &[Condition],
    now: jiff::Timestamp,
) {
    for c in conditions {
        c.last_transition_time = match previous.iter().find(|p| p.type_ == c.type_) {
            Some(p) if p.status == c.status => p.last_transition_time.clone(),
            _ => Time(now),
        };
    }
}

/// The status subresource needs a write only when the computed status differs.
pub fn needs_update(
    previous: Option<&InferenceDeploymentStatus>,
    next: &InferenceDeploymentStatus,
) -> bool {
    previous != Some(next)
}

/// The condition of `type_`, if present.
pub fn find<'a>(
    status: Option<&'a InferenceDeploymentStatus>,
    type_: &str,
) -> Option<&'a Condition> {
    status?.conditions.iter().find(|c| c.type_ == type_)
}

/// `true` when the condition of `type_` is "True".
pub fn is_true(status: Option<&InferenceDeploymentStatus>, type_: &str) -> bool {
    find(status, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests;
