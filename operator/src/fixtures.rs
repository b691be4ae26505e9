//! Test helpers: objects, a test [`Context`] with filled watch caches, and a mocked API server
//! that asserts every request a reconcile makes (and that it makes no others).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, Toleration};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::client::Body;
use kube::core::DynamicObject;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde_json::{Value, json};
use sparsemoe_api::v1alpha1::{
    ExpertParallelSpec, GpuVariant, ModelSource, ModelSpec, ParallelismSpec, PvcSource,
};
use sparsemoe_api::{CostPerHour, InferenceDeployment, InferenceDeploymentSpec};
use tokio::task::JoinHandle;
use tower_test::mock::{self, Handle};

use crate::children::{self, Capabilities, Workload};
use crate::metrics::Metrics;
use crate::reconcile::{AppliedMark, Context, Stores, applied_key};
use crate::status::{self, WorkloadObservation};

pub const NS: &str = "ns";

pub fn variant(name: &str, max_replicas: Option<u32>) -> GpuVariant {
    GpuVariant {
        name: name.into(),
        node_selector: BTreeMap::from([(
            "nvidia.com/gpu.product".to_string(),
            format!("NVIDIA-{}", name.to_uppercase()),
        )]),
        tolerations: vec![Toleration {
            key: Some("nvidia.com/gpu".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Toleration::default()
        }],
        gpus_per_replica: None,
        nodes_per_replica: None,
        cost_per_hour: CostPerHour::parse("31.60").expect("valid price"),
        max_replicas,
        expected_tokens_per_second: None,
    }
}

pub fn spec_with_variants(variants: &[(&str, Option<u32>)]) -> InferenceDeploymentSpec {
    InferenceDeploymentSpec {
        model: ModelSpec {
            name: "deepseek-ai/DeepSeek-V3.2".into(),
            source: ModelSource {
                pvc: Some(PvcSource {
                    claim_name: "weights".into(),
                    path: "DeepSeek-V3.2".into(),
                }),
                ..ModelSource::default()
            },
            revision: None,
        },
        engine: Default::default(),
        parallelism: ParallelismSpec {
            gpus_per_replica: 8,
            nodes_per_replica: 1,
            expert_parallel: ExpertParallelSpec::default(),
        },
        variants: variants.iter().map(|(n, m)| variant(n, *m)).collect(),
        scaling: Default::default(),
        rollout: Default::default(),
    }
}

/// An object as the API server returns it: namespace, uid, generation 1.
pub fn idep(spec: InferenceDeploymentSpec) -> InferenceDeployment {
    let mut idep = InferenceDeployment::new("llm", spec);
    idep.metadata.namespace = Some(NS.into());
    idep.metadata.uid = Some("uid-llm".into());
    idep.metadata.generation = Some(1);
    idep
}

/// One H200 variant, 8 GPUs, expert parallel with 32 redundant slots.
pub fn gpu_idep() -> InferenceDeployment {
    let mut spec = spec_with_variants(&[("h200", None)]);
    spec.parallelism.expert_parallel.enabled = true;
    spec.parallelism.expert_parallel.redundant_experts = 32;
    idep(spec)
}

/// Writers for every watch cache, so tests can fill them.
pub struct Caches {
    pub deployments: Writer<Deployment>,
    pub services: Writer<Service>,
    pub pdbs: Writer<PodDisruptionBudget>,
    pub config_maps: Writer<ConfigMap>,
    pub pods: Writer<Pod>,
    pub leader_worker_sets: Writer<DynamicObject>,
    /// What `settle` applied, as the operator's [`Context::applied`] records it.
    pub applied: HashMap<String, AppliedMark>,
    /// What each engine's `/metrics` URL answers (absent: a refused connection).
    pub engine_metrics: HashMap<String, Result<String, String>>,
}

/// Engines' `/metrics` as [`Caches::engine_metrics`] has them; the URLs asked for are kept.
#[derive(Debug, Default)]
pub struct FakeScrape {
    pub answers: HashMap<String, Result<String, String>>,
    pub asked: Mutex<Vec<String>>,
}

impl crate::queue_scaling::Scrape for FakeScrape {
    fn get(
        &self,
        url: String,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send>> {
        self.asked.lock().unwrap().push(url.clone());
        let answer = self
            .answers
            .get(&url)
            .cloned()
            .unwrap_or_else(|| Err(format!("{url}: connection refused")));
        Box::pin(async move { answer })
    }
}

impl Default for Caches {
    /// Empty caches that have had their first (empty) list, as synced watches' have.
    fn default() -> Self {
        let mut caches = Self {
            deployments: Writer::default(),
            services: Writer::default(),
            pdbs: Writer::default(),
            config_maps: Writer::default(),
            pods: Writer::default(),
            leader_worker_sets: Writer::new(children::lws_api_resource()),
            applied: HashMap::new(),
            engine_metrics: HashMap::new(),
        };
        caches
            .deployments
            .apply_watcher_event(&watcher::Event::InitDone);
        caches
            .services
            .apply_watcher_event(&watcher::Event::InitDone);
        caches.pdbs.apply_watcher_event(&watcher::Event::InitDone);
        caches
            .config_maps
            .apply_watcher_event(&watcher::Event::InitDone);
        caches.pods.apply_watcher_event(&watcher::Event::InitDone);
        caches
            .leader_worker_sets
            .apply_watcher_event(&watcher::Event::InitDone);
        caches
    }
}

impl Caches {
    pub fn stores(&self, capabilities: Capabilities) -> Stores {
        Stores {
            deployments: self.deployments.as_reader(),
            services: self.services.as_reader(),
            pdbs: self.pdbs.as_reader(),
            config_maps: self.config_maps.as_reader(),
            pods: self.pods.as_reader(),
            leader_worker_sets: capabilities
                .leader_worker_set
                .then(|| self.leader_worker_sets.as_reader()),
        }
    }

    /// Makes `meta` as the API server leaves an object (a resourceVersion; a generation where
    /// the kind has one, `generation`) and records it as this process's apply of it left it.
    pub fn mark(&mut self, kind: &str, meta: &mut kube::api::ObjectMeta, generation: bool) {
        meta.resource_version = Some("1".into());
        if generation {
            meta.generation = Some(meta.generation.unwrap_or(1));
        }
        let key = applied_key(kind, NS, meta.name.as_deref().unwrap_or_default());
        self.applied
            .insert(key, AppliedMark::of(meta).expect("a resourceVersion"));
    }

    /// Fills the caches with the children of a settled `idep`: what the operator applied, each
    /// workload fully rolled out. Returns `idep` with the status the operator wrote for that.
    pub fn settle(
        &mut self,
        idep: &InferenceDeployment,
        capabilities: Capabilities,
    ) -> InferenceDeployment {
        let (decision, built) = children::decide_and_build(
            idep,
            NS,
            idep.controller_owner_ref(&()),
            &Default::default(),
            capabilities,
        );
        let mut service = built.service.clone();
        self.mark("Service", &mut service.metadata, false);
        let mut pdb = built.pdb.clone();
        self.mark("PodDisruptionBudget", &mut pdb.metadata, true);
        let mut cm = built.placement.as_ref().map(|(_, cm)| cm.clone());
        if let Some(cm) = &mut cm {
            self.mark("ConfigMap", &mut cm.metadata, false);
        }
        let mut deployments = Vec::new();
        for child in &built.workloads {
            if let Workload::Deployment(d) = &child.workload {
                let mut d = rolled_out(d, child.replicas);
                self.mark("Deployment", &mut d.metadata, true);
                deployments.push((child.variant.clone(), d));
            }
        }
        if let Some(cm) = cm {
            self.config_maps
                .apply_watcher_event(&watcher::Event::Apply(cm));
        }
        self.services
            .apply_watcher_event(&watcher::Event::Apply(service));
        self.pdbs.apply_watcher_event(&watcher::Event::Apply(pdb));
        let mut observed = BTreeMap::new();
        for (variant, d) in deployments {
            observed.insert(variant, WorkloadObservation::from_deployment(&d));
            self.deployments
                .apply_watcher_event(&watcher::Event::Apply(d));
        }
        let inputs = status::Inputs {
            idep,
            namespace: NS,
            decision: &decision,
            children: &built,
            observed: &observed,
            refused: &[],
            refused_variants: &BTreeSet::new(),
            pod_problems: &[],
            applied: &BTreeSet::new(),
            served: None,
        };
        let mut settled = idep.clone();
        settled.status = Some(status::compute(
            &inputs,
            idep.status.as_ref(),
            jiff::Timestamp::UNIX_EPOCH,
        ));
        settled
    }
}

/// `d` as the cluster reports it once all `replicas` of its current generation are available.
pub fn rolled_out(d: &Deployment, replicas: i32) -> Deployment {
    let mut d = d.clone();
    d.metadata.generation = Some(d.metadata.generation.unwrap_or(1));
    d.status = Some(DeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: Some(replicas),
        ready_replicas: Some(replicas),
        updated_replicas: Some(replicas),
        available_replicas: Some(replicas),
        ..DeploymentStatus::default()
    });
    d
}

/// A test context on a mocked API server.
pub fn context(
    caches: &Caches,
    capabilities: Capabilities,
) -> (Arc<Context>, Handle<Request<Body>, Response<Body>>) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, NS);
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: crate::FIELD_MANAGER.into(),
            instance: Some("test".into()),
        },
    );
    let ctx = Context {
        client,
        recorder,
        metrics: Arc::new(Metrics::new()),
        stores: caches.stores(capabilities),
        capabilities,
        failures: Mutex::new(HashMap::new()),
        applied: Mutex::new(caches.applied.clone()),
        scrape: Arc::new(FakeScrape {
            answers: caches.engine_metrics.clone(),
            ..FakeScrape::default()
        }),
        queues: Mutex::new(HashMap::new()),
    };
    (Arc::new(ctx), handle)
}

/// How the mocked API server answers one expected request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// 200 with the request body (what SSA returns, near enough).
    Echo,
    /// 200 with this body.
    Json(Value),
    /// An error status with a Kubernetes `Status` body.
    Fail(u16, &'static str),
}

/// One request the reconcile must make, in order.
#[derive(Clone, Debug)]
pub struct Expect {
    pub method: Method,
    /// Path without the query.
    pub path: String,
    pub reply: Reply,
}

pub fn expect(method: Method, path: impl Into<String>, reply: Reply) -> Expect {
    Expect {
        method,
        path: path.into(),
        reply,
    }
}

/// A request the mocked server saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub query: String,
    pub body: Value,
}

/// Answers the expected requests in order, then asserts no other request arrives before
/// every client is dropped. Returns what it saw.
pub fn verify(
    mut handle: Handle<Request<Body>, Response<Body>>,
    expected: Vec<Expect>,
) -> JoinHandle<Vec<Seen>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        for (i, exp) in expected.into_iter().enumerate() {
            let (request, send) = handle.next_request().await.unwrap_or_else(|| {
                panic!(
                    "request {i} never came: expected {} {}",
                    exp.method, exp.path
                )
            });
            let method = request.method().clone();
            let path = request.uri().path().to_string();
            let query = request.uri().query().unwrap_or_default().to_string();
            let bytes = request
                .into_body()
                .collect_bytes()
                .await
                .expect("request body");
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            assert_eq!(
                (&method, path.as_str()),
                (&exp.method, exp.path.as_str()),
                "request {i}: {body}"
            );
            let response = match exp.reply {
                Reply::Echo => Response::builder().body(Body::from(bytes.to_vec())),
                Reply::Json(v) => {
                    Response::builder().body(Body::from(serde_json::to_vec(&v).expect("json")))
                }
                Reply::Fail(code, reason) => Response::builder()
                    .status(StatusCode::from_u16(code).expect("status code"))
                    .body(Body::from(
                        serde_json::to_vec(&json!({
                            "kind": "Status", "apiVersion": "v1", "metadata": {},
                            "status": "Failure", "message": format!("mock {reason}"),
                            "reason": reason, "code": code
                        }))
                        .expect("json"),
                    )),
            };
            send.send_response(response.expect("response"));
            seen.push(Seen { query, body });
        }
        if let Some((request, _)) = handle.next_request().await {
            panic!("unexpected request: {} {}", request.method(), request.uri());
        }
        seen
    })
}

/// Waits for the verifier (which finishes once `ctx` and every client clone are dropped).
pub async fn finish(verifier: JoinHandle<Vec<Seen>>) -> Vec<Seen> {
    tokio::time::timeout(Duration::from_secs(10), verifier)
        .await
        .expect("verifier timed out: a client is still alive or a request is missing")
        .expect("verifier panicked")
}

pub fn success_status() -> Reply {
    Reply::Json(json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}))
}

/// The object with `status` merged in, as the status subresource returns it.
pub fn with_status_reply(idep: &InferenceDeployment) -> Reply {
    Reply::Json(serde_json::to_value(idep).expect("json"))
}
