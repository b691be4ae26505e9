//! Condition semantics (kstatus) and the status no-op rule.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::Resource;

use super::*;
use crate::autoscale;
use crate::children::{self, Capabilities, Workload};
use crate::fixtures::*;

struct Case {
    idep: InferenceDeployment,
    decision: ReplicaDecision,
    children: Children,
}

fn case(idep: InferenceDeployment) -> Case {
    let decision = autoscale::decide(&idep.spec, &BTreeMap::new());
    let children = children::build(
        &idep,
        NS,
        idep.controller_owner_ref(&()),
        &decision,
        Capabilities::default(),
    );
    Case {
        idep,
        decision,
        children,
    }
}

fn observe(
    c: &Case,
    edit: impl Fn(&mut WorkloadObservation),
) -> BTreeMap<String, WorkloadObservation> {
    c.children
        .workloads
        .iter()
        .map(|child| {
            let Workload::Deployment(d) = &child.workload else {
                panic!("deployment expected")
            };
            let mut o = WorkloadObservation::from_deployment(&rolled_out(d, child.replicas));
            edit(&mut o);
            (child.variant.clone(), o)
        })
        .collect()
}

/// No variant's set: what [`inputs`] starts from.
static NONE: BTreeSet<String> = BTreeSet::new();

/// The inputs of case `c` with `observed` workloads, nothing refused, no pod problems and
/// nothing applied in this reconcile; tests override the rest.
fn inputs<'a>(c: &'a Case, observed: &'a BTreeMap<String, WorkloadObservation>) -> Inputs<'a> {
    Inputs {
        idep: &c.idep,
        namespace: NS,
        decision: &c.decision,
        children: &c.children,
        observed,
        refused: &[],
        refused_variants: &NONE,
        pod_problems: &[],
        applied: &NONE,
        served: None,
    }
}

fn status_of(
    c: &Case,
    observed: &BTreeMap<String, WorkloadObservation>,
    previous: Option<&InferenceDeploymentStatus>,
    at: i64,
) -> InferenceDeploymentStatus {
    compute(
        &inputs(c, observed),
        previous,
        jiff::Timestamp::from_second(at).unwrap(),
    )
}

fn cond<'a>(s: &'a InferenceDeploymentStatus, t: &str) -> &'a Condition {
    find(Some(s), t).unwrap()
}

#[test]
fn ready_only_when_the_current_generation_is_fully_available() {
    let mut idep = gpu_idep();
    idep.spec.scaling.replicas = 3;
    let c = case(idep);
    let done = status_of(&c, &observe(&c, |_| {}), None, 10);
    assert_eq!(cond(&done, READY).status, "True");
    assert_eq!(cond(&done, PROGRESSING).status, "False");
    assert_eq!(cond(&done, DEGRADED).status, "False");
    assert_eq!(
        (done.replicas, done.ready_replicas, done.updated_replicas),
        (3, 3, 3)
    );
    assert_eq!(done.variants[0].desired_replicas, 3);

    // Not yet observed by the Deployment controller.
    let lagging = status_of(&c, &observe(&c, |o| o.generation = Some(2)), None, 10);
    assert_eq!(cond(&lagging, READY).status, "False");
    assert_eq!(cond(&lagging, PROGRESSING).status, "True");
    // Two of three updated: still rolling out, even though three pods are available.
    let rolling = status_of(&c, &observe(&c, |o| o.updated = 2), None, 10);
    assert_eq!(cond(&rolling, READY).status, "False");
    assert!(
        cond(&rolling, PROGRESSING)
            .message
            .contains("h200: 2/3 updated"),
        "{:?}",
        cond(&rolling, PROGRESSING)
    );
    // A surplus old pod still running (surge): not done.
    let surge = status_of(&c, &observe(&c, |o| o.replicas = 4), None, 10);
    assert_eq!(cond(&surge, READY).status, "False");
    // Nothing observed at all: Creating.
    let creating = status_of(&c, &BTreeMap::new(), None, 10);
    assert_eq!(cond(&creating, PROGRESSING).reason, "Creating");
    for s in [&done, &lagging, &creating] {
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(1))
        );
    }
}

#[test]
fn transition_times_move_only_when_a_condition_flips_and_settled_status_needs_no_write() {
    let c = case(gpu_idep());
    let creating = status_of(&c, &BTreeMap::new(), None, 10);
    let done = status_of(&c, &observe(&c, |_| {}), Some(&creating), 20);
    assert_eq!(cond(&done, READY).last_transition_time.0.as_second(), 20);
    assert_eq!(cond(&done, DEGRADED).last_transition_time.0.as_second(), 10);
    let again = status_of(&c, &observe(&c, |_| {}), Some(&done), 30);
    assert_eq!(
        again, done,
        "a later loop over the same world gives the same status"
    );
    assert!(!needs_update(Some(&done), &again));
    assert!(needs_update(None, &again));
    assert!(needs_update(Some(&creating), &done));
}

#[test]
fn degraded_carries_reasons_from_children_rollouts_and_pods() {
    let mut spec = spec_with_variants(&[("h200", Some(1))]);
    spec.scaling.replicas = 3;
    let c = case(idep(spec));
    let s = status_of(&c, &observe(&c, |_| {}), None, 1);
    assert_eq!(cond(&s, DEGRADED).reason, "InsufficientCapacity");
    assert_eq!(cond(&s, READY).reason, "InsufficientCapacity");
    assert_eq!(cond(&s, PROGRESSING).reason, "RolloutComplete");
    // The replica that fits rolls out: progressing, not stalled by the one that does not.
    let rolling = status_of(&c, &observe(&c, |o| o.updated = 0), None, 1);
    assert_eq!(
        (
            cond(&rolling, PROGRESSING).status.as_str(),
            cond(&rolling, PROGRESSING).reason.as_str()
        ),
        ("True", "RollingOut")
    );
    assert_eq!(cond(&rolling, DEGRADED).reason, "InsufficientCapacity");

    let c = case(gpu_idep());
    let stuck = observe(&c, |o| {
        o.failure = Some(Problem {
            reason: "RolloutStuck",
            message: "deployment llm-h200: ProgressDeadlineExceeded".into(),
        })
    });
    let s = status_of(&c, &stuck, None, 1);
    assert_eq!(
        (
            cond(&s, DEGRADED).status.as_str(),
            cond(&s, DEGRADED).reason.as_str()
        ),
        ("True", "RolloutStuck")
    );

    let pod = |name: &str, reason: &str| {
        engine_pod(
            name,
            ContainerStatus {
                name: "engine".into(),
                image: "registry.invalid/engine:typo".into(),
                state: Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.into()),
                        message: Some("varies".into()),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
    };
    let pods = [
        pod("a", "ErrImagePull"),
        pod("b", "ImagePullBackOff"),
        pod("c", "ContainerCreating"),
    ];
    let problems = pod_problems(pods.iter(), jiff::Timestamp::UNIX_EPOCH);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].reason, "ImagePullFailed");
    assert!(
        problems[0]
            .message
            .starts_with("2 engine container(s) cannot pull"),
        "{}",
        problems[0].message
    );
    assert!(problems[0].message.contains("registry.invalid/engine:typo"));
    let observed = observe(&c, |o| o.available = 0);
    let inputs = Inputs {
        pod_problems: &problems,
        ..inputs(&c, &observed)
    };
    let s = compute(&inputs, None, jiff::Timestamp::UNIX_EPOCH);
    assert_eq!(cond(&s, DEGRADED).reason, "ImagePullFailed");
    assert_eq!(cond(&s, READY).status, "False");
    // Pods that cannot start leave the rollout progressing (the rollout of a fix is underway);
    // a problem no rollout gets past (a refused child, a stuck workload) stalls it, so a
    // GitOps tool fails it now rather than at its timeout.
    assert_eq!(cond(&s, PROGRESSING).status, "True");
    let refused = [Problem {
        reason: "ApplyRejected",
        message: "the API server refused Deployment llm-h200".into(),
    }];
    let blocked = Inputs {
        refused: &refused,
        ..inputs
    };
    let s = compute(&blocked, None, jiff::Timestamp::UNIX_EPOCH);
    let stalled = cond(&s, PROGRESSING);
    assert_eq!(
        (stalled.status.as_str(), stalled.reason.as_str()),
        ("False", STALLED)
    );
    assert!(
        stalled.message.contains("blocked by ApplyRejected"),
        "{}",
        stalled.message
    );
    assert_eq!(cond(&s, DEGRADED).reason, "ApplyRejected");
    let stuck = observe(&c, |o| {
        o.available = 0;
        o.failure = Some(Problem {
            reason: "RolloutStuck",
            message: "deployment llm-h200: ProgressDeadlineExceeded".into(),
        })
    });
    let s = status_of(&c, &stuck, None, 1);
    assert_eq!(cond(&s, PROGRESSING).reason, STALLED);
}

#[test]
fn scaled_to_zero_is_not_ready_and_not_progressing() {
    let mut idep = gpu_idep();
    idep.spec.scaling.replicas = 0;
    let c = case(idep);
    let s = status_of(&c, &observe(&c, |_| {}), None, 1);
    assert_eq!(
        (
            cond(&s, READY).status.as_str(),
            cond(&s, READY).reason.as_str()
        ),
        ("False", "NoReplicas")
    );
    assert_eq!(cond(&s, PROGRESSING).status, "False");
}

/// ScalingActive is False while a metric policy holds the replicas: no engine's metrics read.
#[test]
fn holding_policies_say_why_scaling_is_not_active() {
    use sparsemoe_api::v1alpha1::ScalingPolicy;
    for (policy, reason) in [
        (ScalingPolicy::QueueDepth, "MetricsUnavailable"),
        (ScalingPolicy::CostAware, "MetricsUnavailable"),
    ] {
        let mut idep = gpu_idep();
        idep.spec.scaling.policy = policy;
        idep.spec.scaling.max_replicas = Some(4);
        let c = case(idep);
        let s = status_of(&c, &observe(&c, |_| {}), None, 1);
        let scaling = cond(&s, SCALING_ACTIVE);
        assert_eq!(
            (scaling.status.as_str(), scaling.reason.as_str()),
            ("False", reason)
        );
    }
    let c = case(gpu_idep());
    let s = status_of(&c, &observe(&c, |_| {}), None, 1);
    assert_eq!(cond(&s, SCALING_ACTIVE).reason, "FixedReplicas");
}

/// A crash loop stays a crash loop between back-offs: a container running again (loading the
/// model) but not ready, after restarts that ended in failure, is `EngineCrashLooping` as it is
/// while waiting in `CrashLoopBackOff`; a first start, a ready container, or restarts that
/// ended cleanly are not.
#[test]
fn a_crash_loop_between_back_offs_is_still_one() {
    let pod = |name: &str, running: bool, ready: bool, restarts: i32, last_exit: Option<i32>| {
        engine_pod(
            name,
            ContainerStatus {
                name: "engine".into(),
                image: "engine:1".into(),
                ready,
                restart_count: restarts,
                state: Some(if running {
                    ContainerState {
                        running: Some(ContainerStateRunning::default()),
                        ..Default::default()
                    }
                } else {
                    ContainerState {
                        waiting: Some(ContainerStateWaiting {
                            reason: Some("CrashLoopBackOff".into()),
                            message: None,
                        }),
                        ..Default::default()
                    }
                }),
                last_state: last_exit.map(|code| ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: code,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
    };
    let looping = |p: &Pod| {
        pod_problems([p], jiff::Timestamp::UNIX_EPOCH)
            .iter()
            .any(|p| p.reason == "EngineCrashLooping")
    };
    assert!(looping(&pod("backing-off", false, false, 3, Some(1))));
    assert!(looping(&pod("running-again", true, false, 3, Some(1))));
    assert!(!looping(&pod("first-start", true, false, 0, None)));
    assert!(!looping(&pod("one-restart", true, false, 1, Some(1))));
    assert!(!looping(&pod("recovered", true, true, 3, Some(1))));
    assert!(!looping(&pod("clean-exits", true, false, 3, Some(0))));
}

#[test]
fn a_leader_worker_set_is_current_once_its_conditions_carry_its_generation() {
    let lws = |conditions: serde_json::Value| {
        let mut l = kube::core::DynamicObject::new("llm-h100", &children::lws_api_resource());
        l.metadata.generation = Some(2);
        l.data = serde_json::json!({
            "spec": {"replicas": 2},
            "status": {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2,
                       "conditions": conditions},
        });
        WorkloadObservation::from_leader_worker_set(&l)
    };
    let condition = |generation: i64| {
        serde_json::json!({"type": "Available", "status": "True", "reason": "AllGroupsReady",
                           "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z",
                           "observedGeneration": generation})
    };
    // The counts of generation 1 with the spec at 2: not current until the controller saw it.
    assert!(!lws(serde_json::json!([condition(1)])).is_current(2));
    assert!(lws(serde_json::json!([condition(1), condition(2)])).is_current(2));
    // A controller that stamps no generation: the counts alone, as before.
    assert!(lws(serde_json::json!([])).is_current(2));
}

/// A spec the API server refused (an edit of engine.resources whose Deployment apply gets a
/// 422) on an object that was Ready: the old Deployment is still fully available, but it runs
/// the spec before, so the new generation is neither Ready nor RolloutComplete.
#[test]
fn a_refused_workload_is_not_current_and_not_ready() {
    let mut c = case(gpu_idep());
    let settled = status_of(&c, &observe(&c, |_| {}), None, 1);
    assert_eq!(cond(&settled, READY).status, "True");
    c.idep.metadata.generation = Some(2);
    let observed = observe(&c, |_| {});
    let refused = [Problem {
        reason: "ApplyRejected",
        message: "the API server refused Deployment llm-h200: spec.template...: Invalid value"
            .into(),
    }];
    let variants = BTreeSet::from(["h200".to_string()]);
    let inputs = Inputs {
        refused: &refused,
        refused_variants: &variants,
        ..inputs(&c, &observed)
    };
    let s = compute(
        &inputs,
        Some(&settled),
        jiff::Timestamp::from_second(2).unwrap(),
    );
    assert_eq!(s.observed_generation, Some(2));
    let ready = cond(&s, READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "ApplyRejected")
    );
    let progressing = cond(&s, PROGRESSING);
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("False", STALLED)
    );
    assert!(
        progressing.message.contains("h200: 1/1 updated")
            && progressing.message.contains("blocked by ApplyRejected"),
        "{}",
        progressing.message
    );
    assert_eq!(cond(&s, DEGRADED).reason, "ApplyRejected");
    assert_eq!(cond(&s, STALLED).status, "True");
    assert_eq!(cond(&s, RECONCILING).status, "False");

    // A refused child that is not a workload (the Service): every variant runs the current
    // spec, but the spec is not all applied, so not Ready, and stalled, not complete.
    let inputs = Inputs {
        refused_variants: &NONE,
        ..inputs
    };
    let s = compute(
        &inputs,
        Some(&settled),
        jiff::Timestamp::from_second(2).unwrap(),
    );
    assert_eq!(cond(&s, READY).status, "False");
    assert_eq!(cond(&s, PROGRESSING).reason, STALLED);
    assert_eq!(
        cond(&s, PROGRESSING).message,
        "blocked by ApplyRejected: see Degraded"
    );
}

/// kstatus (cli-utils) reads only `Reconciling` and `Stalled`: `Reconciling` is True exactly
/// while `Progressing` is, `Stalled` exactly while a problem blocks the rollout, never both;
/// their transition times move only when they flip, like the others'.
#[test]
fn reconciling_and_stalled_follow_progressing_and_blocking_problems() {
    let c = case(gpu_idep());
    let both = |s: &InferenceDeploymentStatus| {
        (
            cond(s, RECONCILING).status.clone(),
            cond(s, STALLED).status.clone(),
        )
    };
    let creating = status_of(&c, &BTreeMap::new(), None, 10);
    assert_eq!(both(&creating), ("True".into(), "False".into()));
    assert_eq!(cond(&creating, RECONCILING).reason, "Creating");
    let rolling = status_of(&c, &observe(&c, |o| o.updated = 0), Some(&creating), 20);
    assert_eq!(both(&rolling), ("True".into(), "False".into()));
    assert_eq!(
        cond(&rolling, RECONCILING)
            .last_transition_time
            .0
            .as_second(),
        10
    );
    let stuck = observe(&c, |o| {
        o.failure = Some(Problem {
            reason: "RolloutStuck",
            message: "deployment llm-h200: ProgressDeadlineExceeded".into(),
        })
    });
    let stalled = status_of(&c, &stuck, Some(&rolling), 30);
    assert_eq!(both(&stalled), ("False".into(), "True".into()));
    assert_eq!(cond(&stalled, STALLED).reason, "RolloutStuck");
    assert!(
        cond(&stalled, STALLED)
            .message
            .contains("ProgressDeadlineExceeded")
    );
    assert_eq!(
        cond(&stalled, STALLED).last_transition_time.0.as_second(),
        30
    );
    let done = status_of(&c, &observe(&c, |_| {}), Some(&stalled), 40);
    assert_eq!(both(&done), ("False".into(), "False".into()));
    // Reconciling went False when the rollout stalled, and stays so.
    assert_eq!(
        cond(&done, RECONCILING).last_transition_time.0.as_second(),
        30
    );
    assert_eq!(cond(&done, STALLED).last_transition_time.0.as_second(), 40);
    for s in [&creating, &rolling, &stalled, &done] {
        assert_eq!(
            cond(s, RECONCILING).status == "True",
            cond(s, PROGRESSING).status == "True"
        );
        assert_eq!(
            cond(s, STALLED).status == "True",
            cond(s, PROGRESSING).reason == STALLED
        );
    }
}

/// A pod the scheduler finds no node for ("Insufficient nvidia.com/gpu") is `Degraded:
/// Unschedulable` with the scheduler's message once it has waited [`UNSCHEDULABLE_GRACE`]
/// (before, it may be waiting for a replaced replica's GPUs or a node being added, and the
/// reconcile looks again when the grace runs out); it blocks no rollout.
#[test]
fn a_pod_with_no_node_for_it_is_degraded_after_its_grace() {
    use k8s_openapi::api::core::v1::PodCondition;
    assert!(
        UNSCHEDULABLE_GRACE.as_secs() > children::TERMINATION_GRACE_SECONDS as u64,
        "a rollout on a full cluster waits that long for each replica's GPUs"
    );
    let since = jiff::Timestamp::from_second(1_000).unwrap();
    let pending = |name: &str, reason: &str| {
        let mut pod = engine_pod(name, ContainerStatus::default());
        let status = pod.status.as_mut().unwrap();
        status.container_statuses = None;
        status.conditions = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some(reason.into()),
            message: Some("0/12 nodes are available: 12 Insufficient nvidia.com/gpu.".into()),
            last_transition_time: Some(Time(since)),
            ..Default::default()
        }]);
        pod
    };
    let pods = [pending("a", "Unschedulable"), pending("b", "Unschedulable")];
    let at = |secs: i64| {
        since
            .checked_add(jiff::SignedDuration::from_secs(secs))
            .unwrap()
    };

    let early = at(60);
    assert!(pod_problems(pods.iter(), early).is_empty());
    assert_eq!(
        pod_recheck(pods.iter(), early),
        Some(UNSCHEDULABLE_GRACE - std::time::Duration::from_secs(60))
    );
    let late = at(UNSCHEDULABLE_GRACE.as_secs() as i64);
    let problems = pod_problems(pods.iter(), late);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].reason, UNSCHEDULABLE);
    assert!(
        problems[0]
            .message
            .starts_with("2 engine pod(s) have found no node")
            && problems[0]
                .message
                .contains("pod a: 0/12 nodes are available: 12 Insufficient nvidia.com/gpu."),
        "{}",
        problems[0].message
    );
    assert_eq!(pod_recheck(pods.iter(), late), None);
    // Gated, or scheduled: not this problem.
    let gated = [pending("g", "SchedulingGated")];
    assert!(pod_problems(gated.iter(), late).is_empty());
    assert_eq!(pod_recheck(gated.iter(), late), None);

    let c = case(gpu_idep());
    let observed = observe(&c, |o| o.available = 0);
    let inputs = Inputs {
        pod_problems: &problems,
        ..inputs(&c, &observed)
    };
    let s = compute(&inputs, None, late);
    let degraded = cond(&s, DEGRADED);
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", UNSCHEDULABLE)
    );
    assert!(degraded.message.contains("Insufficient nvidia.com/gpu"));
    assert_eq!(cond(&s, READY).status, "False");
    assert_eq!(cond(&s, PROGRESSING).status, "True");
    assert_eq!(cond(&s, STALLED).status, "False");
}

/// A pod named `name` with one container whose status is `container`.
fn engine_pod(name: &str, container: ContainerStatus) -> Pod {
    Pod {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        status: Some(PodStatus {
            container_statuses: Some(vec![container]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The GitOps health checks shipped in `gitops/` (Argo CD's Lua, Flux's CEL expressions), run
/// on statuses this module computes, so they read the conditions the operator really writes.
mod gitops {
    use mlua::LuaSerdeExt;
    use serde_json::Value;

    use super::*;

    fn repo_file(path: &str) -> String {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The object as the API server returns it: the spec at `generation`, with `status`.
    fn object(c: &Case, status: Option<&InferenceDeploymentStatus>, generation: i64) -> Value {
        let mut obj = serde_json::to_value(&c.idep).unwrap();
        obj["metadata"]["generation"] = generation.into();
        if let Some(s) = status {
            obj["status"] = serde_json::to_value(s).unwrap();
        }
        strip_nulls(&mut obj);
        obj
    }

    /// The API server leaves unset fields out; Lua would see `null` as a value.
    fn strip_nulls(v: &mut Value) {
        match v {
            Value::Object(map) => {
                map.retain(|_, v| !v.is_null());
                map.values_mut().for_each(strip_nulls);
            }
            Value::Array(items) => items.iter_mut().for_each(strip_nulls),
            _ => {}
        }
    }

    /// Argo CD's verdict: `gitops/argocd/health.lua` run with `obj`, as Argo CD runs it.
    fn argo(obj: &Value) -> (String, String) {
        let lua = mlua::Lua::new();
        lua.globals()
            .set("obj", lua.to_value(obj).unwrap())
            .unwrap();
        let hs: mlua::Table = lua
            .load(repo_file("gitops/argocd/health.lua"))
            .eval()
            .unwrap();
        (hs.get("status").unwrap(), hs.get("message").unwrap())
    }

    /// Flux's verdict from the example Kustomization's healthCheckExprs: `failed`, then
    /// `current`, else in progress; the object's top-level fields are the variables.
    fn flux(obj: &Value) -> &'static str {
        let kustomization: Value =
            serde_saphyr::from_str(&repo_file("gitops/flux/kustomization.yaml")).unwrap();
        let exprs = kustomization["spec"]["healthCheckExprs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| {
                e["kind"] == "InferenceDeployment" && e["apiVersion"] == "sparsemoe.io/v1alpha1"
            })
            .expect("an expression for InferenceDeployment")
            .clone();
        let mut context = cel::Context::default();
        for (name, value) in obj.as_object().unwrap() {
            context.add_variable(name.as_str(), value).unwrap();
        }
        let holds = |which: &str| {
            let source = exprs[which].as_str().unwrap();
            let program = cel::Program::compile(source).unwrap_or_else(|e| panic!("{which}: {e}"));
            match program.execute(&context) {
                Ok(cel::Value::Bool(b)) => b,
                other => panic!("{which} on {obj:#}: {other:?}"),
            }
        };
        if holds("failed") {
            "Failed"
        } else if holds("current") {
            "Current"
        } else {
            "InProgress"
        }
    }

    /// kstatus's verdict (cli-utils `status.Compute` on a resource of a kind it has no rules
    /// for, as Flux's default health check and Config Sync run it): an observedGeneration behind
    /// is InProgress; else the first of `Reconciling` (InProgress) and `Stalled` (Failed) that
    /// is True decides; else Current.
    fn kstatus(obj: &Value) -> &'static str {
        if obj["status"]["observedGeneration"] != obj["metadata"]["generation"] {
            return "InProgress";
        }
        for c in obj["status"]["conditions"].as_array().into_iter().flatten() {
            match (c["type"].as_str(), c["status"].as_str()) {
                (Some("Reconciling"), Some("True")) => return "InProgress",
                (Some("Stalled"), Some("True")) => return "Failed",
                _ => {}
            }
        }
        "Current"
    }

    #[test]
    fn argo_cd_and_flux_read_the_operators_conditions() {
        let mut three = gpu_idep();
        three.spec.scaling.replicas = 3;
        let c = case(three);
        // kstatus agrees with Flux's expressions but where a non-blocking problem (replicas no
        // variant has room for) leaves nothing to roll out: `Ready` is False and `Degraded`
        // True, but nothing is Reconciling or Stalled.
        let check = |what: &str, obj: Value, want_argo: &str, want_flux: &str| {
            let (status, message) = argo(&obj);
            assert_eq!(status, want_argo, "{what}: Argo CD says {message:?}");
            assert!(!message.is_empty(), "{what}: Argo CD gives no message");
            assert_eq!(flux(&obj), want_flux, "{what}: Flux");
            if what != "too little room" {
                assert_eq!(kstatus(&obj), want_flux, "{what}: kstatus");
            }
            message
        };

        let done = status_of(&c, &observe(&c, |_| {}), None, 1);
        let message = check(
            "rolled out",
            object(&c, Some(&done), 1),
            "Healthy",
            "Current",
        );
        assert!(message.contains("Available"), "{message}");
        let rolling = status_of(&c, &observe(&c, |o| o.updated = 2), None, 1);
        let message = check(
            "rolling out",
            object(&c, Some(&rolling), 1),
            "Progressing",
            "InProgress",
        );
        assert!(message.contains("h200: 2/3 updated"), "{message}");
        let creating = status_of(&c, &BTreeMap::new(), None, 1);
        check(
            "creating",
            object(&c, Some(&creating), 1),
            "Progressing",
            "InProgress",
        );
        // A new spec the operator has not written a status for yet: what says Ready is old.
        let message = check(
            "a newer spec",
            object(&c, Some(&done), 2),
            "Progressing",
            "InProgress",
        );
        assert!(message.contains("generation 2"), "{message}");
        let (status, _) = argo(&object(&c, None, 1));
        assert_eq!(status, "Progressing", "no status yet");

        let stuck = observe(&c, |o| {
            o.failure = Some(Problem {
                reason: "RolloutStuck",
                message: "deployment llm-h200: ProgressDeadlineExceeded".into(),
            })
        });
        let stuck = status_of(&c, &stuck, None, 1);
        let message = check(
            "a stuck rollout",
            object(&c, Some(&stuck), 1),
            "Degraded",
            "Failed",
        );
        assert!(message.starts_with("RolloutStuck"), "{message}");

        // An edit the API server refused on an object that was Ready: the old Deployment
        // serves on, but the new generation has failed.
        let mut edited = case(c.idep.clone());
        edited.idep.metadata.generation = Some(2);
        let refused = [Problem {
            reason: "ApplyRejected",
            message: "the API server refused Deployment llm-h200".into(),
        }];
        let observed = observe(&edited, |_| {});
        let variants = BTreeSet::from(["h200".to_string()]);
        let inputs = Inputs {
            refused: &refused,
            refused_variants: &variants,
            ..inputs(&edited, &observed)
        };
        let s = compute(&inputs, Some(&done), jiff::Timestamp::UNIX_EPOCH);
        let message = check(
            "a refused edit",
            object(&edited, Some(&s), 2),
            "Degraded",
            "Failed",
        );
        assert!(message.starts_with("ApplyRejected"), "{message}");

        let mut short = spec_with_variants(&[("h200", Some(1))]);
        short.scaling.replicas = 3;
        let c = case(idep(short));
        let s = status_of(&c, &observe(&c, |_| {}), None, 1);
        check(
            "too little room",
            object(&c, Some(&s), 1),
            "Degraded",
            "Failed",
        );
        assert_eq!(kstatus(&object(&c, Some(&s), 1)), "Current");

        let mut zero = gpu_idep();
        zero.spec.scaling.replicas = 0;
        let c = case(zero);
        let s = status_of(&c, &observe(&c, |_| {}), None, 1);
        let message = check(
            "scaled to zero",
            object(&c, Some(&s), 1),
            "Healthy",
            "Current",
        );
        assert!(message.starts_with("NoReplicas"), "{message}");
    }
}

/// `lastScaling` is written by a metric policy's decision, with what the engines served,
/// only when the replicas per variant change; a held decision (nothing read) and `fixed`
/// leave it as the object has it.
#[test]
fn last_scaling_is_written_only_when_the_decided_replicas_change() {
    use crate::queue_scaling::Recommendation;
    use sparsemoe_api::v1alpha1::{ScalingMetrics, ScalingPolicy};
    let mut idep = gpu_idep();
    idep.spec.scaling.policy = ScalingPolicy::QueueDepth;
    idep.spec.scaling.max_replicas = Some(8);
    let decided = |replicas: i64| {
        let running = autoscale::Running {
            queue: Some(Ok(Recommendation {
                replicas,
                reason: format!("{replicas} wanted"),
            })),
            ..autoscale::Running::default()
        };
        autoscale::decide_around(&idep.spec, &running, &BTreeSet::new())
    };
    let mut c = case(idep.clone());
    c.decision = decided(3);
    let observed = observe(&c, |_| {});
    let served = ScalingMetrics {
        queue_depth: 11.0,
        tokens_per_second: 900.0,
        tokens_per_second_per_dollar: 9.0,
        cost_per_million_tokens: Some(30.0),
    };
    let at = |s| jiff::Timestamp::from_second(s).unwrap();
    let with_served = |c: &Case, metrics, previous, t| {
        let inputs = Inputs {
            served: Some(metrics),
            ..inputs(c, &observed)
        };
        compute(&inputs, previous, at(t))
    };
    // Nothing read: nothing written.
    assert_eq!(
        compute(&inputs(&c, &observed), None, at(10)).last_scaling,
        None
    );
    let first = with_served(&c, &served, None, 10);
    let last = first.last_scaling.clone().expect("written");
    assert_eq!(
        (
            last.replicas,
            last.variants.get("h200"),
            last.reason.as_str()
        ),
        (3, Some(&3), "3 wanted")
    );
    assert_eq!(
        (last.metrics, last.time),
        (served.clone(), Some(Time(at(10))))
    );
    // The same replicas with other figures later: the status needs no write.
    let busier = ScalingMetrics {
        tokens_per_second: 1200.0,
        ..served.clone()
    };
    let again = with_served(&c, &busier, Some(&first), 25);
    assert!(!needs_update(Some(&first), &again));
    // Other replicas: written anew, with the figures of now.
    c.decision = decided(5);
    let scaled = with_served(&c, &busier, Some(&first), 40);
    let last = scaled.last_scaling.expect("written");
    assert_eq!((last.replicas, last.metrics.tokens_per_second), (5, 1200.0));
    assert_eq!(last.time, Some(Time(at(40))));
    // A held decision (no engine read) keeps the last one.
    c.decision = autoscale::decide(&idep.spec, &BTreeMap::from([("h200".to_string(), 2)]));
    assert!(c.decision.holding);
    let held = with_served(&c, &busier, Some(&first), 55);
    assert_eq!(held.last_scaling, first.last_scaling);
}
