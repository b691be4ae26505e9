//! Reconcile flows against a mocked API server: every request is asserted, in order, and no
//! other request may be made.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use serde_json::{Value, json};

use super::*;
use crate::fixtures::*;

const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/ns/deployments";
const SERVICES: &str = "/api/v1/namespaces/ns/services";
const CONFIG_MAPS: &str = "/api/v1/namespaces/ns/configmaps";
const PDBS: &str = "/apis/policy/v1/namespaces/ns/poddisruptionbudgets";
const IDEPS: &str = "/apis/sparsemoe.io/v1alpha1/namespaces/ns/inferencedeployments";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ns/events";
const LWS: &str = "/apis/leaderworkerset.x-k8s.io/v1/namespaces/ns/leaderworkersets";

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

fn status_reply(idep: &InferenceDeployment) -> Reply {
    with_status_reply(idep)
}

fn patch(path: String) -> Expect {
    expect(Method::PATCH, path, Reply::Echo)
}

/// A new object's placement ConfigMap looked up and applied, then its Deployment's apply,
/// answered with `reply`.
fn placement_then_deployment(reply: Reply) -> Vec<Expect> {
    vec![
        absent(format!("{CONFIG_MAPS}/llm-placement")),
        patch(format!("{CONFIG_MAPS}/llm-placement")),
        expect(Method::PATCH, format!("{DEPLOYMENTS}/llm-h200"), reply),
    ]
}

/// A new object's requests after its placement ConfigMap's: its Deployment applied, then
/// [`after_workload`].
fn after_placement(idep: &InferenceDeployment) -> Vec<Expect> {
    [
        vec![patch(format!("{DEPLOYMENTS}/llm-h200"))],
        after_workload(idep),
    ]
    .concat()
}

/// A new object's requests after its workload's: the Service (looked up first) and the PDB
/// applied as new, the status, the `Created` event.
fn after_workload(idep: &InferenceDeployment) -> Vec<Expect> {
    vec![
        absent(format!("{SERVICES}/llm")),
        patch(format!("{SERVICES}/llm")),
        patch(format!("{PDBS}/llm")),
        expect(
            Method::PATCH,
            format!("{IDEPS}/llm/status"),
            status_reply(idep),
        ),
        expect(Method::POST, EVENTS, Reply::Echo),
    ]
}

/// What `seen` wrote: the requests with bodies (not the lookups of [`absent`]).
fn writes(seen: Vec<Seen>) -> Vec<Seen> {
    seen.into_iter().filter(|s| !s.body.is_null()).collect()
}

/// The lookup of a ConfigMap or Service child the caches do not hold (a user's object of that
/// name would merge with the apply), which the server does not have either.
fn absent(path: String) -> Expect {
    expect(Method::GET, path, Reply::Fail(404, "NotFound"))
}

async fn run(idep: InferenceDeployment, ctx: Arc<Context>) -> Result<Action> {
    reconcile(Arc::new(idep), ctx).await
}

#[tokio::test]
async fn create_applies_every_child_then_status_then_one_event() {
    let caches = Caches::default();
    let (ctx, handle) = context(&caches, Capabilities::default());
    let idep = gpu_idep();
    let verifier = verify(
        handle,
        [
            vec![
                absent(format!("{CONFIG_MAPS}/llm-placement")),
                patch(format!("{CONFIG_MAPS}/llm-placement")),
            ],
            after_placement(&idep),
        ]
        .concat(),
    );
    let action = run(idep, ctx.clone()).await.expect("reconcile");
    assert_eq!(action, Action::requeue(RESYNC));
    assert_eq!(ctx.metrics.writes.get(), 5);
    drop(ctx);
    let seen = writes(finish(verifier).await);

    // New children are applied without force (a name someone else holds is a conflict, not a
    // takeover); the status is forced.
    for s in &seen[..4] {
        assert!(
            s.query.contains("fieldManager=sparsemoe-operator") && !s.query.contains("force=true"),
            "{}",
            s.query
        );
    }
    assert!(seen[4].query.contains("force=true"), "{}", seen[4].query);
    let deployment = &seen[1].body;
    assert_eq!(
        deployment["metadata"]["ownerReferences"][0]["uid"],
        "uid-llm"
    );
    assert_eq!(
        deployment["metadata"]["ownerReferences"][0]["controller"],
        true
    );
    assert_eq!(deployment["spec"]["replicas"], 1);
    let status = &seen[4].body;
    assert_eq!(status["status"]["observedGeneration"], 1);
    assert_eq!(condition(status, "Ready")["status"], "False");
    assert_eq!(condition(status, "Progressing")["status"], "True");
    assert_eq!(condition(status, "Progressing")["reason"], "Creating");
    assert_eq!(condition(status, "Degraded")["status"], "False");
    assert_eq!(status["status"]["endpoint"], "http://llm.ns.svc:8000/v1");
    assert_eq!(
        status["status"]["selector"],
        "sparsemoe.io/deployment=llm,sparsemoe.io/role=leader"
    );
    assert_eq!(status["status"]["placement"]["configMap"], "llm-placement");
    assert_eq!(status["status"]["variants"][0]["desiredReplicas"], 1);
    assert_eq!(seen[5].body["reason"], "Created");
    assert_eq!(seen[5].body["type"], "Normal");
}

#[tokio::test]
async fn settled_object_makes_zero_api_calls() {
    let mut caches = Caches::default();
    let settled = caches.settle(&gpu_idep(), Capabilities::default());
    assert!(
        status::is_true(settled.status.as_ref(), status::READY),
        "{:?}",
        settled.status
    );
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(handle, vec![]);
    let action = run(settled, ctx.clone()).await.expect("reconcile");
    assert_eq!(action, Action::requeue(RESYNC));
    assert_eq!(ctx.metrics.writes.get(), 0);
    drop(ctx);
    assert!(finish(verifier).await.is_empty());
}

#[tokio::test]
async fn spec_change_rolls_out_one_deployment_and_ready_waits_for_it() {
    let mut caches = Caches::default();
    let settled = caches.settle(&gpu_idep(), Capabilities::default());
    let mut changed = settled.clone();
    changed.spec.engine.image = "registry.invalid/engine:v2".into();
    changed.metadata.generation = Some(2);
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(
        handle,
        vec![
            patch(format!("{DEPLOYMENTS}/llm-h200")),
            expect(
                Method::PATCH,
                format!("{IDEPS}/llm/status"),
                status_reply(&changed),
            ),
        ],
    );
    run(changed.clone(), ctx.clone()).await.expect("reconcile");
    drop(ctx);
    let seen = finish(verifier).await;
    let image = &seen[0].body["spec"]["template"]["spec"]["containers"][0]["image"];
    assert_eq!(image, "registry.invalid/engine:v2");
    let status = &seen[1].body;
    assert_eq!(status["status"]["observedGeneration"], 2);
    assert_eq!(condition(status, "Ready")["status"], "False");
    assert_eq!(condition(status, "Progressing")["reason"], "RollingOut");
    // Ready's transition time moved (it flipped); Degraded's did not.
    let before = settled.status.as_ref().unwrap();
    let degraded_before = &before
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap()
        .last_transition_time;
    let degraded_after: Time =
        serde_json::from_value(condition(status, "Degraded")["lastTransitionTime"].clone())
            .unwrap();
    assert_eq!(&degraded_after, degraded_before);

    // The Deployment controller finishes the rollout: one status write and the event.
    let mut rolled: InferenceDeployment = changed.clone();
    rolled.status = Some(serde_json::from_value(status["status"].clone()).unwrap());
    let mut caches = Caches::default();
    let settled_v2 = caches.settle(&changed, Capabilities::default());
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(
        handle,
        vec![
            expect(
                Method::PATCH,
                format!("{IDEPS}/llm/status"),
                status_reply(&settled_v2),
            ),
            expect(Method::POST, EVENTS, Reply::Echo),
        ],
    );
    run(rolled, ctx.clone()).await.expect("reconcile");
    drop(ctx);
    let seen = finish(verifier).await;
    assert_eq!(condition(&seen[0].body, "Ready")["status"], "True");
    assert_eq!(condition(&seen[0].body, "Progressing")["status"], "False");
    assert_eq!(seen[1].body["reason"], "RolloutComplete");
}

/// A settled object's requests when its replicas change: the Deployment's apply, the status,
/// the `Scaled` event.
fn scaled_requests(idep: &InferenceDeployment) -> Vec<Expect> {
    vec![
        patch(format!("{DEPLOYMENTS}/llm-h200")),
        expect(
            Method::PATCH,
            format!("{IDEPS}/llm/status"),
            status_reply(idep),
        ),
        expect(Method::POST, EVENTS, Reply::Echo),
    ]
}

#[tokio::test]
async fn scale_changes_replicas_and_records_an_event() {
    let mut caches = Caches::default();
    let mut scaled = caches.settle(&gpu_idep(), Capabilities::default());
    scaled.spec.scaling.replicas = 3;
    scaled.metadata.generation = Some(2);
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(handle, scaled_requests(&scaled));
    run(scaled, ctx.clone()).await.expect("reconcile");
    drop(ctx);
    let seen = finish(verifier).await;
    assert_eq!(seen[0].body["spec"]["replicas"], 3);
    assert_eq!(seen[1].body["status"]["variants"][0]["desiredReplicas"], 3);
    assert_eq!(seen[2].body["reason"], "Scaled");
    assert!(seen[2].body["note"].as_str().unwrap().contains("1 -> 3"));
}

/// Under queueDepth the reconcile reads each ready engine's /metrics (not a pod that is not
/// ready, nor a LeaderWorkerSet worker), scales to what the queue calls for, says so in
/// ScalingActive, and comes back within the scrape interval to read them again.
#[tokio::test]
async fn queue_depth_scales_to_what_the_engines_queues_call_for() {
    use k8s_openapi::api::core::v1::{ContainerStatus, PodStatus};
    let mut queued = gpu_idep();
    queued.spec.scaling.policy = ScalingPolicy::QueueDepth;
    queued.spec.scaling.min_replicas = 1;
    queued.spec.scaling.max_replicas = Some(6);
    queued.spec.scaling.target_queue_depth_per_replica = 4;
    let mut caches = Caches::default();
    let settled = caches.settle(&queued, Capabilities::default());
    assert_eq!(
        condition(&json!({"status": settled.status}), "ScalingActive")["reason"],
        "MetricsUnavailable"
    );
    let pod = |name: &str, ip: &str, ready: bool, worker: Option<&str>| {
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.into());
        pod.metadata.namespace = Some(NS.into());
        let mut labels =
            std::collections::BTreeMap::from([(LABEL_DEPLOYMENT.to_string(), "llm".to_string())]);
        if let Some(index) = worker {
            labels.insert(LWS_WORKER_INDEX.into(), index.into());
        }
        pod.metadata.labels = Some(labels);
        pod.status = Some(PodStatus {
            pod_ip: Some(ip.into()),
            container_statuses: Some(vec![ContainerStatus {
                name: "engine".into(),
                ready,
                ..Default::default()
            }]),
            ..Default::default()
        });
        pod
    };
    for p in [
        pod("llm-h200-a", "10.0.0.7", true, None),
        pod("llm-h200-b", "fd00::8", true, Some("0")),
        pod("llm-h200-loading", "10.0.0.9", false, None),
        pod("llm-h200-worker", "10.0.0.10", true, Some("1")),
    ] {
        caches.pods.apply_watcher_event(&watcher::Event::Apply(p));
    }
    caches.engine_metrics = std::collections::HashMap::from([
        (
            "http://10.0.0.7:8000/metrics".to_string(),
            Ok("# TYPE sparsemoe_num_requests_waiting gauge\n\
                sparsemoe_num_requests_waiting 2\n\
                sparsemoe_num_requests_running 200\n\
                sparsemoe_max_running_requests 64\n"
                .into()),
        ),
        (
            "http://[fd00::8]:8000/metrics".to_string(),
            Ok("sparsemoe_num_requests_waiting 1\n\
                sparsemoe_num_requests_running 100\n\
                sparsemoe_max_running_requests 64\n"
                .into()),
        ),
    ]);
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(handle, scaled_requests(&settled));
    let action = run(settled, ctx.clone()).await.expect("reconcile");
    assert_eq!(action, Action::requeue(queue_scaling::SCRAPE_EVERY));
    let scrape = ctx.scrape.clone();
    drop(ctx);
    let seen = finish(verifier).await;
    // 3 waiting call for 1 replica at 4 each; 300 running, at 64 slots an engine, for 5.
    assert_eq!(seen[0].body["spec"]["replicas"], 5);
    let scaling = condition(&seen[1].body, "ScalingActive");
    assert_eq!(
        (&scaling["status"], &scaling["reason"]),
        (&json!("True"), &json!("ValidMetricFound"))
    );
    assert!(
        scaling["message"]
            .as_str()
            .unwrap()
            .starts_with("policy queueDepth: 5 replica(s)"),
        "{scaling}"
    );
    assert_eq!(seen[2].body["reason"], "Scaled");
    // Only the ready pods that serve were read.
    let fake = format!("{scrape:?}");
    assert!(
        fake.contains("10.0.0.7") && fake.contains("[fd00::8]"),
        "{fake}"
    );
    assert!(
        !fake.contains("10.0.0.9") && !fake.contains("10.0.0.10"),
        "{fake}"
    );
}

/// An engine whose metrics say a count that is not a finite number is not read (a status
/// carrying it would be refused); one full batch and one waiting for KV cache are full, one
/// with free slots and requests waiting is not.
#[tokio::test]
async fn engines_are_read_for_their_queues_and_full_batches() {
    use k8s_openapi::api::core::v1::{ContainerStatus, PodStatus};
    let pod = |name: &str, ip: &str| {
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.into());
        pod.metadata.labels = Some(std::collections::BTreeMap::from([(
            LABEL_VARIANT.to_string(),
            "h200".to_string(),
        )]));
        pod.status = Some(PodStatus {
            pod_ip: Some(ip.into()),
            container_statuses: Some(vec![ContainerStatus {
                ready: true,
                ..Default::default()
            }]),
            ..Default::default()
        });
        Arc::new(pod)
    };
    let body = |waiting: &str, running: u32, kv: f64| {
        Ok(format!(
            "sparsemoe_num_requests_waiting {waiting}\n\
             sparsemoe_num_requests_running {running}\n\
             sparsemoe_max_running_requests 8\n\
             sparsemoe_kv_cache_usage_perc {kv}\n\
             sparsemoe_generation_tokens_total 100\n"
        ))
    };
    let scrape = FakeScrape {
        answers: std::collections::HashMap::from([
            (
                "http://10.0.0.1:8000/metrics".to_string(),
                body("0", 8, 0.2),
            ),
            (
                "http://10.0.0.2:8000/metrics".to_string(),
                body("3", 2, 0.95),
            ),
            (
                "http://10.0.0.3:8000/metrics".to_string(),
                body("2", 5, 0.5),
            ),
            (
                "http://10.0.0.4:8000/metrics".to_string(),
                body("+Inf", 8, 0.2),
            ),
        ]),
        ..FakeScrape::default()
    };
    let pods = [
        pod("slots", "10.0.0.1"),
        pod("cache", "10.0.0.2"),
        pod("room", "10.0.0.3"),
        pod("inf", "10.0.0.4"),
    ];
    let seen = read_queues(&pods, &scrape).await;
    assert_eq!((seen.read, seen.waiting, seen.running), (3, 5.0, 15.0));
    assert_eq!(seen.unread.len(), 1);
    assert!(
        seen.unread[0].starts_with("pod inf:") && seen.unread[0].contains("not a finite number"),
        "{:?}",
        seen.unread
    );
    let full: Vec<(&str, bool)> = seen
        .engines
        .iter()
        .map(|e| (e.pod.as_str(), e.full))
        .collect();
    assert_eq!(full, [("slots", true), ("cache", true), ("room", false)]);
    assert_eq!(seen.engines[0].generated, Some(100.0));
    assert_eq!(seen.engines[0].variant.as_deref(), Some("h200"));
}

/// One reconcile of `idep` with the engines' answers of `caches` and the metric policies'
/// memory `history` (taken back afterwards), expecting `expected`; the object comes back
/// with the status it wrote, if it wrote one.
async fn metric_round(
    caches: &Caches,
    idep: &mut InferenceDeployment,
    history: &mut Vec<(String, ScalingHistory)>,
    expected: Vec<Expect>,
) -> Vec<Seen> {
    let (ctx, handle) = context(caches, Capabilities::default());
    ctx.queues.lock().unwrap().extend(history.drain(..));
    let verifier = verify(handle, expected);
    run(idep.clone(), ctx.clone()).await.expect("reconcile");
    history.extend(ctx.queues.lock().unwrap().drain());
    drop(ctx);
    let seen = finish(verifier).await;
    for s in &seen {
        if let Some(status) = s.body.get("status") {
            idep.status = Some(serde_json::from_value(status.clone()).unwrap());
        }
    }
    seen
}

/// costAware measures each variant's full-batch tokens per second between reads of its
/// engines and sends new replicas to the variant that serves the most per unit of cost,
/// whatever the listed order; `lastScaling` records the decision with what was served, and a
/// settled object is not written as its engines' figures move.
#[tokio::test(start_paused = true)]
async fn cost_aware_sends_new_replicas_where_tokens_cost_least() {
    use k8s_openapi::api::core::v1::{ContainerStatus, PodStatus};
    use sparsemoe_api::CostPerHour;
    let mut spec = spec_with_variants(&[("h200", Some(1)), ("h100", None)]);
    spec.variants[0].cost_per_hour = CostPerHour::parse("40").unwrap();
    spec.variants[1].cost_per_hour = CostPerHour::parse("20").unwrap();
    spec.scaling.policy = ScalingPolicy::CostAware;
    spec.scaling.min_replicas = 2;
    spec.scaling.max_replicas = Some(6);
    spec.scaling.target_queue_depth_per_replica = 4;
    let mut caches = Caches::default();
    // One replica on each (h200 could take only one then).
    let mut idep = caches.settle(&idep(spec), Capabilities::default());
    idep.spec.variants[0].max_replicas = None;
    for (variant, ip) in [("h200", "10.0.0.7"), ("h100", "10.0.0.8")] {
        let mut pod = Pod::default();
        pod.metadata.name = Some(format!("llm-{variant}-a"));
        pod.metadata.namespace = Some(NS.into());
        pod.metadata.uid = Some(format!("uid-{variant}"));
        pod.metadata.labels = Some(std::collections::BTreeMap::from([
            (LABEL_DEPLOYMENT.to_string(), "llm".to_string()),
            (LABEL_VARIANT.to_string(), variant.to_string()),
        ]));
        pod.status = Some(PodStatus {
            pod_ip: Some(ip.into()),
            container_statuses: Some(vec![ContainerStatus {
                name: "engine".into(),
                ready: true,
                ..Default::default()
            }]),
            ..Default::default()
        });
        caches.pods.apply_watcher_event(&watcher::Event::Apply(pod));
    }
    // Every 15 s, h200's engine makes 2,000 tokens/s (50 per unit of cost) and h100's 1,500
    // (75 per unit), both with every slot taken; `waiting` requests wait on each.
    let answers = |round: u32, waiting: u32| {
        let answer = |generated: u32| {
            Ok(format!(
                "sparsemoe_num_requests_waiting {waiting}\n\
                 sparsemoe_num_requests_running 64\n\
                 sparsemoe_max_running_requests 64\n\
                 sparsemoe_generation_tokens_total {generated}\n"
            ))
        };
        std::collections::HashMap::from([
            (
                "http://10.0.0.7:8000/metrics".to_string(),
                answer(100_000 + 30_000 * round),
            ),
            (
                "http://10.0.0.8:8000/metrics".to_string(),
                answer(50_000 + 22_500 * round),
            ),
        ])
    };
    let status_patch = |idep: &InferenceDeployment| {
        expect(
            Method::PATCH,
            format!("{IDEPS}/llm/status"),
            status_reply(idep),
        )
    };
    let mut history = Vec::new();
    // The first read: the 2 replicas keep the running requests in their slots; no rate yet,
    // so no lastScaling.
    caches.engine_metrics = answers(0, 1);
    let expected = vec![status_patch(&idep)];
    let seen = metric_round(&caches, &mut idep, &mut history, expected).await;
    let scaling = condition(&seen[0].body, "ScalingActive");
    assert!(
        scaling["message"].as_str().unwrap().contains(
            "best first: h200 (not measured, kept in its listed place), h100 (not measured"
        ),
        "{scaling}"
    );
    assert_eq!(seen[0].body["status"].get("lastScaling"), None);
    // 15 s on: a rate, so the decision is recorded with what was served.
    tokio::time::advance(Duration::from_secs(15)).await;
    caches.engine_metrics = answers(1, 1);
    let expected = vec![status_patch(&idep)];
    let seen = metric_round(&caches, &mut idep, &mut history, expected).await;
    let last = &seen[0].body["status"]["lastScaling"];
    assert_eq!(last["variants"], json!({"h200": 1, "h100": 1}), "{last}");
    assert_eq!(last["metrics"]["queueDepth"], json!(2.0));
    assert_eq!(last["metrics"]["tokensPerSecond"], json!(3500.0));
    // 15 s on: new figures, the same decision and ranking (two intervals measure nothing
    // yet): no write.
    tokio::time::advance(Duration::from_secs(15)).await;
    caches.engine_metrics = answers(2, 1);
    let seen = metric_round(&caches, &mut idep, &mut history, vec![]).await;
    assert!(seen.is_empty());
    // The third interval measures both; 14 waiting call for 4 replicas, and the 2 new ones
    // go to h100, listed second.
    tokio::time::advance(Duration::from_secs(15)).await;
    caches.engine_metrics = answers(3, 7);
    let expected = vec![
        patch(format!("{DEPLOYMENTS}/llm-h100")),
        status_patch(&idep),
        expect(Method::POST, EVENTS, Reply::Echo),
    ];
    let seen = metric_round(&caches, &mut idep, &mut history, expected).await;
    assert_eq!(seen[0].body["spec"]["replicas"], 3);
    let scaling = condition(&seen[1].body, "ScalingActive");
    let message = scaling["message"].as_str().unwrap();
    assert!(
        message.starts_with("policy costAware: 4 replica(s)")
            && message.contains("best first: h100 (measured), h200 (measured)"),
        "{message}"
    );
    let last = &seen[1].body["status"]["lastScaling"];
    assert_eq!(last["variants"], json!({"h200": 1, "h100": 3}), "{last}");
    assert_eq!(last["metrics"]["tokensPerSecond"], json!(3500.0));
    // 60 an hour for 12.6M tokens an hour.
    let per_million = last["metrics"]["costPerMillionTokens"].as_f64().unwrap();
    assert!((per_million - 60.0 / 12.6).abs() < 1e-9, "{last}");
}

#[tokio::test]
async fn deleted_object_makes_no_calls_and_removed_variant_is_deleted() {
    // Being deleted: owner references garbage-collect the children, nothing to do.
    let mut caches = Caches::default();
    let mut deleting = caches.settle(&gpu_idep(), Capabilities::default());
    deleting.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(handle, vec![]);
    assert_eq!(
        run(deleting, ctx.clone()).await.unwrap(),
        Action::await_change()
    );
    drop(ctx);
    finish(verifier).await;

    // A variant removed from the spec: its Deployment is deleted.
    let mut two = spec_with_variants(&[("h200", Some(1)), ("h100", None)]);
    two.scaling.replicas = 2;
    let mut caches = Caches::default();
    let settled = caches.settle(&idep(two), Capabilities::default());
    let mut one = settled.clone();
    one.spec.variants.truncate(1);
    one.spec.scaling.replicas = 1;
    one.metadata.generation = Some(2);
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(
        handle,
        vec![
            expect(
                Method::DELETE,
                format!("{DEPLOYMENTS}/llm-h100"),
                success_status(),
            ),
            expect(
                Method::PATCH,
                format!("{IDEPS}/llm/status"),
                status_reply(&one),
            ),
            expect(Method::POST, EVENTS, Reply::Echo),
        ],
    );
    run(one, ctx.clone()).await.expect("reconcile");
    drop(ctx);
    let seen = finish(verifier).await;
    assert_eq!(
        seen[1].body["status"]["variants"].as_array().unwrap().len(),
        1
    );
    assert_eq!(seen[2].body["reason"], "Scaled");
}

#[tokio::test]
async fn a_failed_apply_backs_off_and_the_retry_converges() {
    let caches = Caches::default();
    let (ctx, handle) = context(&caches, Capabilities::default());
    let idep = gpu_idep();
    let verifier = verify(
        handle,
        placement_then_deployment(Reply::Fail(500, "InternalError")),
    );
    let error = run(idep.clone(), ctx.clone())
        .await
        .expect_err("a server error");
    assert_eq!(error.metric_label(), "api");
    let first = error_policy(Arc::new(idep.clone()), &error, ctx.clone());
    let second = error_policy(Arc::new(idep.clone()), &error, ctx.clone());
    assert_eq!(first, Action::requeue(Duration::from_secs(5)));
    assert_eq!(second, Action::requeue(Duration::from_secs(10)));
    assert_eq!(ctx.metrics.failures.with_label_values(&["api"]).get(), 2);
    drop(ctx);
    finish(verifier).await;

    // The retry: the ConfigMap is in the cache now, so only the rest is applied.
    let mut caches = Caches::default();
    let (_, built) = children::decide_and_build(
        &idep,
        NS,
        idep.controller_owner_ref(&()),
        &Default::default(),
        Capabilities::default(),
    );
    let mut cm = built.placement.unwrap().1;
    caches.mark("ConfigMap", &mut cm.metadata, false);
    caches
        .config_maps
        .apply_watcher_event(&watcher::Event::Apply(cm));
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(handle, after_placement(&idep));
    ctx.failures
        .lock()
        .unwrap()
        .insert(ObjectRef::from_obj(&idep), 2);
    run(idep, ctx.clone()).await.expect("retry converges");
    assert!(
        ctx.failures.lock().unwrap().is_empty(),
        "success resets the backoff"
    );
    drop(ctx);
    finish(verifier).await;
    assert_eq!(backoff(100), BACKOFF_MAX);
}

/// A child write the API server refuses for a reason a retry cannot get past is `Degraded`
/// with its message, looked at again later, not an error retried hot; the other children are
/// applied, and the object is neither Ready nor progressing. A new child whose name someone
/// else's object holds meets a conflict on the unforced apply (`NameConflict`); one forbidden
/// (an admission policy denies it, a ResourceQuota on object counts is exceeded, the
/// operator's role lacks the verb: 403) waits for the policy, quota or role to change
/// (`ApplyRejected`).
#[tokio::test]
async fn a_refused_child_is_degraded_not_an_error() {
    for (code, reason, words) in [
        (
            409,
            "NameConflict",
            "Deployment llm-h200 exists and is not this InferenceDeployment's",
        ),
        (
            403,
            "ApplyRejected",
            "the API server refused Deployment llm-h200: mock Forbidden",
        ),
    ] {
        let caches = Caches::default();
        let (ctx, handle) = context(&caches, Capabilities::default());
        let idep = gpu_idep();
        let mock_reason = if code == 409 { "Conflict" } else { "Forbidden" };
        let verifier = verify(
            handle,
            [
                placement_then_deployment(Reply::Fail(code, mock_reason)),
                after_workload(&idep),
                vec![expect(Method::POST, EVENTS, Reply::Echo)],
            ]
            .concat(),
        );
        let action = run(idep, ctx.clone())
            .await
            .unwrap_or_else(|e| panic!("{code} is not an error: {e}"));
        assert_eq!(action, Action::requeue(UNREALISABLE_REQUEUE));
        assert!(ctx.failures.lock().unwrap().is_empty());
        drop(ctx);
        let seen = writes(finish(verifier).await);
        let status = &seen[4].body;
        let degraded = condition(status, "Degraded");
        assert_eq!(degraded["status"], "True", "{code}");
        assert_eq!(degraded["reason"], reason, "{code}");
        assert!(
            degraded["message"].as_str().unwrap().contains(words),
            "{code}: {degraded}"
        );
        assert_eq!(condition(status, "Ready")["status"], "False", "{code}");
        assert_eq!(
            condition(status, "Progressing")["reason"],
            "Stalled",
            "{code}"
        );
    }
}

/// A user's ConfigMap named like the placement ConfigMap, which the caches do not hold (it is
/// not labelled as a child): an apply would merge into it (other keys) and own it, to delete
/// it later; it is a `NameConflict` instead, left untouched. One this object controls that
/// the caches do not hold yet (an earlier apply) is applied.
#[tokio::test]
async fn a_users_object_that_would_merge_is_a_conflict_not_a_takeover() {
    let idep = gpu_idep();
    let found = |object: Value| {
        expect(
            Method::GET,
            format!("{CONFIG_MAPS}/llm-placement"),
            Reply::Json(object),
        )
    };
    let users = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "llm-placement", "namespace": NS}, "data": {"theirs": "1"}});
    let (ctx, handle) = context(&Caches::default(), Capabilities::default());
    let degraded_event = expect(Method::POST, EVENTS, Reply::Echo);
    let verifier = verify(
        handle,
        [
            vec![found(users)],
            after_placement(&idep),
            vec![degraded_event],
        ]
        .concat(),
    );
    run(idep.clone(), ctx.clone())
        .await
        .expect("a taken name is not an error");
    drop(ctx);
    let seen = writes(finish(verifier).await);
    let degraded = condition(&seen[3].body, "Degraded");
    assert_eq!(degraded["reason"], "NameConflict");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("ConfigMap llm-placement exists and is controlled by no controller"),
        "{degraded}"
    );

    // Ours, from an earlier apply the caches have not seen yet: applied.
    let ours = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "llm-placement", "namespace": NS,
                     "ownerReferences": [idep.controller_owner_ref(&())]}});
    let (ctx, handle) = context(&Caches::default(), Capabilities::default());
    let apply = patch(format!("{CONFIG_MAPS}/llm-placement"));
    let verifier = verify(
        handle,
        [vec![found(ours), apply], after_placement(&idep)].concat(),
    );
    run(idep, ctx.clone()).await.expect("reconcile");
    drop(ctx);
    finish(verifier).await;
}

#[tokio::test]
async fn multi_node_without_lws_is_degraded_not_an_error() {
    let mut spec = spec_with_variants(&[("h100", None)]);
    spec.variants[0].gpus_per_replica = Some(16);
    spec.variants[0].nodes_per_replica = Some(2);
    let idep = idep(spec);
    let caches = Caches::default();
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(
        handle,
        // No workload; a second event (`Degraded`).
        [
            after_workload(&idep),
            vec![expect(Method::POST, EVENTS, Reply::Echo)],
        ]
        .concat(),
    );
    let action = run(idep.clone(), ctx.clone())
        .await
        .expect("degraded is not an error");
    assert_eq!(action, Action::requeue(UNREALISABLE_REQUEUE));
    drop(ctx);
    let seen = writes(finish(verifier).await);
    let degraded = condition(&seen[2].body, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "LeaderWorkerSetMissing");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("install LeaderWorkerSet")
    );
    assert_eq!(condition(&seen[2].body, "Ready")["status"], "False");
    assert_eq!(seen[3].body["reason"], "Created");
    assert_eq!(seen[4].body["type"], "Warning");
    assert_eq!(seen[4].body["reason"], "Degraded");

    // Reconciling the degraded status again changes nothing and writes nothing.
    let mut again = idep.clone();
    again.status = Some(serde_json::from_value(seen[2].body["status"].clone()).unwrap());
    let mut caches = Caches::default();
    let mut service: Service = serde_json::from_value(seen[0].body.clone()).unwrap();
    caches.mark("Service", &mut service.metadata, false);
    caches
        .services
        .apply_watcher_event(&watcher::Event::Apply(service));
    let mut pdb: PodDisruptionBudget = serde_json::from_value(seen[1].body.clone()).unwrap();
    caches.mark("PodDisruptionBudget", &mut pdb.metadata, true);
    caches.pdbs.apply_watcher_event(&watcher::Event::Apply(pdb));
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(handle, vec![]);
    run(again, ctx.clone()).await.expect("reconcile");
    drop(ctx);
    finish(verifier).await;

    // With the LWS API installed the variant becomes a LeaderWorkerSet.
    let caps = Capabilities {
        leader_worker_set: true,
    };
    let (ctx, handle) = context(&Caches::default(), caps);
    let verifier = verify(
        handle,
        [
            vec![patch(format!("{LWS}/llm-h100"))],
            after_workload(&idep),
        ]
        .concat(),
    );
    run(idep, ctx.clone()).await.expect("reconcile");
    drop(ctx);
    let seen = writes(finish(verifier).await);
    assert_eq!(seen[0].body["kind"], "LeaderWorkerSet");
    assert_eq!(seen[0].body["spec"]["leaderWorkerTemplate"]["size"], 2);
    assert_eq!(condition(&seen[3].body, "Degraded")["status"], "False");
}

/// The status write and the one event of a reconcile that applies nothing.
fn status_and_event(idep: &InferenceDeployment) -> Vec<Expect> {
    vec![
        expect(
            Method::PATCH,
            format!("{IDEPS}/llm/status"),
            status_reply(idep),
        ),
        expect(Method::POST, EVENTS, Reply::Echo),
    ]
}

/// A cached child as its API server reports it: `obj` with its resourceVersion and generation
/// (the reply to an apply that changed nothing).
fn as_cached<K: Resource + Serialize>(obj: &K) -> Reply {
    Reply::Json(serde_json::to_value(obj).unwrap())
}

#[tokio::test]
async fn children_not_applied_since_start_or_edited_are_applied_again() {
    let mut caches = Caches::default();
    let settled = caches.settle(&gpu_idep(), Capabilities::default());
    let cached = |caches: &Caches| {
        let stores = caches.stores(Capabilities::default());
        (
            stores.config_maps.state()[0].clone(),
            stores.deployments.state()[0].clone(),
            stores.services.state()[0].clone(),
            stores.pdbs.state()[0].clone(),
        )
    };
    let (cm, deployment, service, pdb) = cached(&caches);

    // A new process (nothing recorded): each child applied once, which changes nothing, so
    // the status stays as it was (no rollout to wait for).
    caches.applied.clear();
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(
        handle,
        vec![
            expect(
                Method::PATCH,
                format!("{CONFIG_MAPS}/llm-placement"),
                as_cached(cm.as_ref()),
            ),
            expect(
                Method::PATCH,
                format!("{DEPLOYMENTS}/llm-h200"),
                as_cached(deployment.as_ref()),
            ),
            expect(
                Method::PATCH,
                format!("{SERVICES}/llm"),
                as_cached(service.as_ref()),
            ),
            expect(
                Method::PATCH,
                format!("{PDBS}/llm"),
                as_cached(pdb.as_ref()),
            ),
        ],
    );
    run(settled.clone(), ctx.clone()).await.expect("reconcile");
    assert_eq!(ctx.metrics.writes.get(), 4);
    // Recorded: the next reconcile writes nothing.
    let recorded = ctx.applied.lock().unwrap().clone();
    drop(ctx);
    finish(verifier).await;
    caches.applied = recorded;
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(handle, vec![]);
    run(settled.clone(), ctx.clone()).await.expect("reconcile");
    drop(ctx);
    finish(verifier).await;

    // A Service edited by hand (it has no generation: its resourceVersion moved) is applied.
    let mut edited = service.as_ref().clone();
    edited.metadata.resource_version = Some("2".into());
    caches
        .services
        .apply_watcher_event(&watcher::Event::Apply(edited));
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(handle, vec![patch(format!("{SERVICES}/llm"))]);
    run(settled, ctx.clone()).await.expect("reconcile");
    drop(ctx);
    finish(verifier).await;
}

#[tokio::test]
async fn a_child_another_object_controls_is_a_conflict_not_applied_or_observed() {
    let mut caches = Caches::default();
    let settled = caches.settle(&gpu_idep(), Capabilities::default());
    // llm-h200 as another InferenceDeployment's (a colliding name), with a different spec.
    let stores = caches.stores(Capabilities::default());
    let mut theirs = stores.deployments.state()[0].as_ref().clone();
    for owner in theirs.metadata.owner_references.iter_mut().flatten() {
        owner.uid = "uid-other".into();
        owner.name = "llm-other".into();
    }
    theirs
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(children::ANNOTATION_APPLIED_HASH.into(), "other".into());
    caches
        .deployments
        .apply_watcher_event(&watcher::Event::Apply(theirs));
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(handle, status_and_event(&settled));
    let action = run(settled, ctx.clone())
        .await
        .expect("degraded, not an error");
    assert_eq!(action, Action::requeue(UNREALISABLE_REQUEUE));
    drop(ctx);
    let seen = finish(verifier).await;
    let degraded = condition(&seen[0].body, "Degraded");
    assert_eq!(degraded["reason"], "NameConflict", "{degraded}");
    assert!(
        degraded["message"].as_str().unwrap().contains("llm-other"),
        "{degraded}"
    );
    // Its replicas are not this object's: nothing is ready.
    assert_eq!(seen[0].body["status"]["variants"][0]["readyReplicas"], 0);
}

#[tokio::test]
async fn a_removed_variants_workload_stays_until_the_rest_is_rolled_out() {
    let mut two = spec_with_variants(&[("h200", Some(1)), ("h100", None)]);
    two.scaling.replicas = 2;
    let mut caches = Caches::default();
    let settled = caches.settle(&idep(two), Capabilities::default());
    let mut one = settled.clone();
    one.spec.variants.truncate(1);
    one.spec.scaling.replicas = 1;
    one.metadata.generation = Some(2);
    // h200 is still rolling out: h100's Deployment keeps serving.
    let stores = caches.stores(Capabilities::default());
    let mut rolling = stores
        .deployments
        .get(&ObjectRef::new("llm-h200").within(NS))
        .unwrap()
        .as_ref()
        .clone();
    rolling.status.get_or_insert_default().available_replicas = Some(0);
    caches
        .deployments
        .apply_watcher_event(&watcher::Event::Apply(rolling));
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(handle, status_and_event(&one));
    run(one.clone(), ctx.clone()).await.expect("reconcile");
    drop(ctx);
    finish(verifier).await;
}

#[tokio::test]
async fn prune_forgets_what_is_gone() {
    let mut caches = Caches::default();
    let settled = caches.settle(&gpu_idep(), Capabilities::default());
    let (ctx, _handle) = context(&caches, Capabilities::default());
    let (ideps, mut writer) = kube::runtime::reflector::store::<InferenceDeployment>();
    writer.apply_watcher_event(&watcher::Event::Apply(settled.clone()));
    let mut gone = settled.clone();
    gone.metadata.name = Some("gone".into());
    {
        let mut failures = ctx.failures.lock().unwrap();
        failures.insert(ObjectRef::from_obj(&settled), 3);
        failures.insert(ObjectRef::from_obj(&gone), 2);
        let mut applied = ctx.applied.lock().unwrap();
        assert_eq!(applied.len(), 4, "{applied:?}");
        applied.insert(
            applied_key("Deployment", NS, "gone-h200"),
            AppliedMark::Generation(1),
        );
        applied.insert(
            applied_key("Service", NS, "gone"),
            AppliedMark::ResourceVersion("7".into()),
        );
    }
    prune(&ctx, &ideps);
    let failures = ctx.failures.lock().unwrap().clone();
    assert_eq!(
        failures.keys().collect::<Vec<_>>(),
        [&ObjectRef::from_obj(&settled)]
    );
    let applied = ctx.applied.lock().unwrap().clone();
    assert_eq!(
        applied, caches.applied,
        "the settled object's four children remain"
    );
}

#[test]
fn long_event_notes_are_cut_on_a_character_boundary() {
    assert_eq!(event_note("short".into()), "short");
    for filler in ["a", "é", "日", "🦀"] {
        let long = filler.repeat(2000);
        let note = event_note(long.clone());
        assert!(note.len() <= EVENT_NOTE_MAX, "{}", note.len());
        assert!(note.len() > EVENT_NOTE_MAX - 8, "{}", note.len());
        assert!(note.ends_with('…'));
        assert!(long.starts_with(note.trim_end_matches('…')));
    }
    let exact = "x".repeat(EVENT_NOTE_MAX);
    assert_eq!(event_note(exact.clone()), exact);
}

#[tokio::test]
async fn a_reconcile_waits_for_the_child_caches_to_sync() {
    let mut caches = Caches::default();
    let settled = caches.settle(&gpu_idep(), Capabilities::default());
    caches.pods = kube::runtime::reflector::store::Writer::default(); // not listed yet
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(handle, vec![]);
    let action = run(settled, ctx.clone()).await.expect("reconcile");
    assert_eq!(action, Action::requeue(CACHE_SYNC_WAIT));
    assert_eq!(ctx.metrics.writes.get(), 0);
    drop(ctx);
    finish(verifier).await;
}

#[tokio::test]
async fn an_orphaned_child_with_this_objects_labels_is_adopted() {
    let mut caches = Caches::default();
    let settled = caches.settle(&gpu_idep(), Capabilities::default());
    let stores = caches.stores(Capabilities::default());
    let owned = stores.deployments.state()[0].as_ref().clone();
    // Left by `kubectl delete --cascade=orphan` of an earlier object of this name.
    let mut orphan = owned.clone();
    orphan.metadata.owner_references = None;
    caches
        .deployments
        .apply_watcher_event(&watcher::Event::Apply(orphan));
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(
        handle,
        vec![expect(
            Method::PATCH,
            format!("{DEPLOYMENTS}/llm-h200"),
            as_cached(&owned),
        )],
    );
    run(settled, ctx.clone()).await.expect("reconcile");
    drop(ctx);
    let seen = finish(verifier).await;
    assert_eq!(
        seen[0].body["metadata"]["ownerReferences"][0]["uid"],
        "uid-llm"
    );
    assert!(seen[0].query.contains("force=true"), "{}", seen[0].query);
}

#[tokio::test]
async fn a_removed_variants_workload_stays_while_another_is_unrealisable() {
    let mut two = spec_with_variants(&[("h200", Some(1)), ("h100", None)]);
    two.scaling.replicas = 2;
    let mut caches = Caches::default();
    let settled = caches.settle(&idep(two), Capabilities::default());
    // h100 is replaced by a multi-node variant, which needs the LeaderWorkerSet API.
    let mut next = settled.clone();
    next.spec.variants[1].name = "h100-pair".into();
    next.spec.variants[1].gpus_per_replica = Some(16);
    next.spec.variants[1].nodes_per_replica = Some(2);
    next.metadata.generation = Some(2);
    let (ctx, handle) = context(&caches, Capabilities::default());
    // The status, then two events: Scaled (h100-pair's replica has nowhere to go: h200 is at
    // its maxReplicas) and Degraded.
    let mut expected = status_and_event(&next);
    expected.push(expect(Method::POST, EVENTS, Reply::Echo));
    let verifier = verify(handle, expected);
    let action = run(next, ctx.clone()).await.expect("reconcile");
    assert_eq!(action, Action::requeue(UNREALISABLE_REQUEUE));
    drop(ctx);
    let seen = finish(verifier).await;
    assert_eq!(
        condition(&seen[0].body, "Degraded")["reason"],
        "LeaderWorkerSetMissing"
    );
    assert_eq!(seen[1].body["reason"], "Scaled");
    assert_eq!(seen[2].body["reason"], "Degraded");
    // The unrealisable variant was given none of the replicas.
    let variants = seen[0].body["status"]["variants"].as_array().unwrap();
    let desired = |name: &str| {
        variants.iter().find(|v| v["name"] == name).unwrap()["desiredReplicas"].clone()
    };
    assert_eq!(
        (desired("h200"), desired("h100-pair")),
        (1.into(), 0.into())
    );
}

/// A pod of the old shape that outlives its rollout (terminating, say) keeps its plan in the
/// placement ConfigMap: with every workload rolled out to 4 GPUs a replica, the 8-GPU plan
/// stays while a pod mounts it, and the reconcile writes nothing; once the pod is gone, the
/// next one drops the plan, in one apply of the ConfigMap.
#[tokio::test]
async fn a_plan_stays_while_a_pod_mounts_it_after_its_rollout() {
    use k8s_openapi::api::core::v1::Pod;
    let mut before = Caches::default();
    let old = before.settle(&gpu_idep(), Capabilities::default());
    let name = children::placement_config_map_name(&old);
    let cached_cm = |caches: &Caches| {
        caches
            .config_maps
            .as_reader()
            .get(&ObjectRef::new(&name).within(NS))
            .expect("a placement ConfigMap")
    };
    let old_cm = cached_cm(&before);
    let old_pod = {
        let (_, children) = children::decide_and_build(
            &old,
            NS,
            old.controller_owner_ref(&()),
            &Default::default(),
            Capabilities::default(),
        );
        let Workload::Deployment(d) = &children.workloads[0].workload else {
            panic!("a Deployment")
        };
        let template = d.spec.as_ref().unwrap().template.clone();
        let mut meta = template.metadata.unwrap_or_default();
        meta.name = Some("llm-h200-old".into());
        meta.namespace = Some(NS.into());
        Pod {
            metadata: meta,
            spec: template.spec,
            ..Pod::default()
        }
    };
    assert_eq!(
        children::mounted_plans([&old_pod], &name)
            .into_iter()
            .collect::<Vec<_>>(),
        [children::plan_key(8, 1)]
    );

    let mut spec = old.spec.clone();
    spec.parallelism.gpus_per_replica = 4;
    let mut changed = idep(spec);
    changed.metadata.generation = Some(2);
    let settle_with_old_plan = |pod: Option<&Pod>| {
        let mut caches = Caches::default();
        let settled = caches.settle(&changed, Capabilities::default());
        // The ConfigMap as the rollout's reconciles left it: the new plan and the old one.
        let (_, built) = children::decide_and_build(
            &changed,
            NS,
            changed.controller_owner_ref(&()),
            &Default::default(),
            Capabilities::default(),
        );
        let new_cm = &built.placement.as_ref().expect("a placement ConfigMap").1;
        let mut kept = children::keeping_plans(new_cm, Some(&old_cm));
        caches.mark("ConfigMap", &mut kept.metadata, false);
        caches
            .config_maps
            .apply_watcher_event(&watcher::Event::Apply(kept));
        if let Some(pod) = pod {
            caches
                .pods
                .apply_watcher_event(&watcher::Event::Apply(pod.clone()));
        }
        (caches, settled)
    };

    // As the pod cache holds it.
    let mut pruned_pod = old_pod.clone();
    crate::run::prune_pod(&mut pruned_pod);
    let (caches, settled) = settle_with_old_plan(Some(&pruned_pod));
    let keys = |cm: &ConfigMap| {
        cm.data
            .clone()
            .unwrap_or_default()
            .into_keys()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keys(&cached_cm(&caches)),
        [children::plan_key(4, 1), children::plan_key(8, 1)]
    );
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(handle, vec![]);
    run(settled, ctx.clone()).await.expect("reconcile");
    drop(ctx);
    assert!(
        finish(verifier).await.is_empty(),
        "the mounted plan was dropped"
    );

    let (caches, settled) = settle_with_old_plan(None);
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(handle, vec![patch(format!("{CONFIG_MAPS}/{name}"))]);
    run(settled, ctx.clone()).await.expect("reconcile");
    drop(ctx);
    let seen = finish(verifier).await;
    let data = seen[0].body["data"].as_object().expect("the plans");
    assert_eq!(
        data.keys().cloned().collect::<Vec<_>>(),
        [children::plan_key(4, 1)]
    );
}

/// An object that was Ready, edited so that the API server refuses its Deployment (requests
/// above limits: 422): the old Deployment serves on, fully available, but it runs the spec
/// before, so the status of the new generation is not Ready and not RolloutComplete: the
/// rollout is stalled by `ApplyRejected`.
#[tokio::test]
async fn a_refused_edit_of_a_ready_object_is_neither_ready_nor_complete() {
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let mut caches = Caches::default();
    let settled = caches.settle(&gpu_idep(), Capabilities::default());
    assert!(status::is_true(settled.status.as_ref(), status::READY));
    let mut edited = settled.clone();
    let memory = |q: &str| BTreeMap::from([("memory".to_string(), Quantity(q.into()))]);
    edited.spec.engine.resources = Some(ResourceRequirements {
        requests: Some(memory("2Ti")),
        limits: Some(memory("1Ti")),
        ..Default::default()
    });
    edited.metadata.generation = Some(2);
    let (ctx, handle) = context(&caches, Capabilities::default());
    let verifier = verify(
        handle,
        [
            vec![expect(
                Method::PATCH,
                format!("{DEPLOYMENTS}/llm-h200"),
                Reply::Fail(422, "Invalid"),
            )],
            // The status, and the `Degraded` event.
            status_and_event(&edited),
        ]
        .concat(),
    );
    let action = run(edited, ctx.clone())
        .await
        .expect("a refusal is not an error");
    assert_eq!(action, Action::requeue(UNREALISABLE_REQUEUE));
    drop(ctx);
    let seen = finish(verifier).await;
    let status = &seen[1].body;
    assert_eq!(status["status"]["observedGeneration"], 2);
    let said = |type_: &str| {
        let c = condition(status, type_);
        (c["status"].clone(), c["reason"].clone())
    };
    assert_eq!(said("Ready"), ("False".into(), "ApplyRejected".into()));
    assert_eq!(said("Progressing"), ("False".into(), "Stalled".into()));
    assert_eq!(said("Degraded"), ("True".into(), "ApplyRejected".into()));
    assert_eq!(said("Stalled"), ("True".into(), "ApplyRejected".into()));
    assert_eq!(said("Reconciling").0, "False");
    assert_eq!(seen[2].body["reason"], "Degraded");
}

/// An error a retry may get past (here a 500) is retried with backoff; once it has failed
/// twice in a row it is in the status as well, `Degraded: ReconcileError` naming the child,
/// at the current generation: a new object gets a status, and an updated one stops saying its
/// old generation is Ready.
#[tokio::test]
async fn a_repeated_error_is_in_the_status_and_still_backs_off() {
    let idep = gpu_idep();
    let failing = |ctx: &Arc<Context>, times: u32| {
        ctx.failures
            .lock()
            .unwrap()
            .insert(ObjectRef::from_obj(&idep), times);
    };
    // A new object, its second failure: the children before the failing one are applied, the
    // status written (with the `Created` and `Degraded` events), and the error returned.
    let (ctx, handle) = context(&Caches::default(), Capabilities::default());
    failing(&ctx, 1);
    let verifier = verify(
        handle,
        [
            placement_then_deployment(Reply::Fail(500, "InternalError")),
            status_and_event(&idep),
            vec![expect(Method::POST, EVENTS, Reply::Echo)],
        ]
        .concat(),
    );
    let error = run(idep.clone(), ctx.clone())
        .await
        .expect_err("the error is still an error");
    assert_eq!(error.metric_label(), "api");
    assert_eq!(
        error_policy(Arc::new(idep.clone()), &error, ctx.clone()),
        Action::requeue(Duration::from_secs(10)),
        "the backoff goes on"
    );
    drop(ctx);
    let seen = writes(finish(verifier).await);
    let status = &seen[2].body;
    assert_eq!(status["status"]["observedGeneration"], 1);
    let degraded = condition(status, "Degraded");
    assert_eq!(
        (&degraded["status"], &degraded["reason"]),
        (&json!("True"), &json!(RECONCILE_ERROR))
    );
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("applying Deployment llm-h200: mock InternalError (HTTP 500 InternalError)"),
        "{degraded}"
    );
    assert_eq!(condition(status, "Ready")["status"], "False");
    assert_eq!(condition(status, "Stalled")["status"], "True");
    assert_eq!(seen[3].body["reason"], "Created");
    assert_eq!(seen[4].body["reason"], "Degraded");

    // A Ready object whose edit cannot be applied: the status moves to the new generation and
    // is no longer Ready.
    let mut caches = Caches::default();
    let settled = caches.settle(&idep, Capabilities::default());
    let mut edited = settled.clone();
    edited.spec.engine.image = "registry.invalid/engine:v2".into();
    edited.metadata.generation = Some(2);
    let (ctx, handle) = context(&caches, Capabilities::default());
    failing(&ctx, 3);
    let verifier = verify(
        handle,
        [
            vec![expect(
                Method::PATCH,
                format!("{DEPLOYMENTS}/llm-h200"),
                Reply::Fail(503, "ServiceUnavailable"),
            )],
            status_and_event(&edited),
        ]
        .concat(),
    );
    run(edited, ctx.clone()).await.expect_err("an error");
    drop(ctx);
    let seen = finish(verifier).await;
    let status = &seen[1].body;
    assert_eq!(status["status"]["observedGeneration"], 2);
    assert_eq!(condition(status, "Ready")["status"], "False");
    assert_eq!(condition(status, "Ready")["reason"], RECONCILE_ERROR);
    assert_eq!(condition(status, "Progressing")["reason"], "Stalled");
}
