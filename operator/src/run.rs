//! `sparsemoe-operator run`: leader election, the controller and its watch caches, the HTTP
//! endpoints, and graceful shutdown on SIGTERM / Ctrl-C.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::{FutureExt as _, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::core::DynamicObject;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use sparsemoe_api::InferenceDeployment;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::children::{self, Capabilities, LABEL_DEPLOYMENT, MANAGED_SELECTOR};
use crate::metrics::Metrics;
use crate::reconcile::{self, Context, Stores};
use crate::server::{self, Health};

/// Settings of `sparsemoe-operator run`.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Where /metrics, /healthz and /readyz listen.
    pub http_addr: SocketAddr,
    /// Elect a leader on a Lease so that several replicas can run.
    pub leader_election: bool,
    pub lease_name: String,
    /// Namespace of the Lease; defaults to the operator's own namespace.
    pub lease_namespace: Option<String>,
    /// This replica's identity in the Lease (the pod name).
    pub identity: String,
    /// Watch one namespace only; all namespaces when unset.
    pub watch_namespace: Option<String>,
}

/// Seconds a Lease is valid without renewal, and how long before expiry it is renewed.
const LEASE_SECONDS: u64 = 15;
const LEASE_GRACE_SECONDS: u64 = 5;
/// The leader stops leading once the Lease it last saw renewed is this old (client-go's
/// RenewDeadline): past the renewal due at `LEASE_SECONDS - LEASE_GRACE_SECONDS`, short of
/// the `LEASE_SECONDS` after which a standby may take the Lease.
const RENEW_DEADLINE: Duration = Duration::from_secs(12);
/// How often the leader reads its Lease back to see that it is still renewed.
const LEASE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// A future that resolves on SIGTERM or Ctrl-C.
async fn termination() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the operator");
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn wait_true(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// The field manager a replica takes the Lease under: its own. kube-lease-manager takes a free
/// Lease with a server-side apply that is not forced, so a second replica's apply conflicts and
/// backs off, but only between different field managers: under one shared name the second
/// apply silently replaced the first holder, and both replicas led until the first one's next
/// renewal (seen as the standby writing in the e2e failover test).
fn lease_field_manager(identity: &str) -> String {
    // Field managers are at most 128 bytes; pod names at most 63.
    let mut name = format!("{}-{identity}", crate::FIELD_MANAGER);
    let mut end = name.len().min(128);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name.truncate(end);
    name
}

/// Leadership for a replica that runs without leader election: always true. The sender must
/// live as long as the controller, or [`leadership_lost`] resolves at once.
fn always_leader() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(true)
}

/// Resolves when leadership turns false or its sender is gone (the lease task ended).
/// What the leader's read of its Lease says: `Ok` with the last renewal the Lease shows (or
/// `last`, the latest seen before, where that is later or the Lease shows none), while it is
/// this replica's and that renewal is younger than [`RENEW_DEADLINE`] at `now`; `Err` with why
/// not.
fn lease_still_held(
    lease: Option<&Lease>,
    identity: &str,
    last: jiff::Timestamp,
    now: jiff::Timestamp,
) -> Result<jiff::Timestamp, String> {
    let mut renewed = last;
    if let Some(lease) = lease {
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(identity) {
            return Err(format!(
                "the Lease is held by {}",
                spec.holder_identity.as_deref().unwrap_or("no one")
            ));
        }
        if let Some(t) = spec.renew_time.or(spec.acquire_time) {
            renewed = renewed.max(t.0);
        }
    }
    // A renewal stamped after `now` (clocks a step apart) is as fresh as can be.
    let age = Duration::try_from(now.duration_since(renewed)).unwrap_or(Duration::ZERO);
    if age > RENEW_DEADLINE {
        return Err(format!(
            "the Lease was last seen renewed {:.1} s ago, past the {} s renew deadline",
            age.as_secs_f64(),
            RENEW_DEADLINE.as_secs()
        ));
    }
    Ok(renewed)
}

/// Resolves when the leader can no longer be sure it holds its Lease: another replica holds
/// it, or no renewal has been seen for [`RENEW_DEADLINE`] (renewals failing, or the API server
/// out of reach). kube-lease-manager only logs a renewal that fails and tries again, so without
/// this a leader cut off from the API server would lead on after a standby took the Lease.
async fn renew_deadline_passed(api: Api<Lease>, name: String, identity: String) {
    let mut renewed = jiff::Timestamp::now();
    loop {
        tokio::time::sleep(LEASE_CHECK_EVERY).await;
        let lease = match api.get(&name).await {
            Ok(lease) => Some(lease),
            Err(error) => {
                warn!(%error, lease = %name, "cannot read the leader Lease");
                None
            }
        };
        match lease_still_held(lease.as_ref(), &identity, renewed, jiff::Timestamp::now()) {
            Ok(at) => renewed = at,
            Err(why) => {
                warn!(lease = %name, "{why}: no longer leading");
                return;
            }
        }
    }
}

async fn leadership_lost(mut leader: watch::Receiver<bool>) {
    while *leader.borrow_and_update() {
        if leader.changed().await.is_err() {
            break;
        }
    }
}

/// Runs the operator until SIGTERM; Err if leadership is lost (the pod restarts as a standby).
pub async fn run(config: RunConfig) -> anyhow::Result<()> {
    reconcile::fault_pause();
    let mut kube_config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration (in-cluster service account or KUBECONFIG)")?;
    kube_config
        .headers
        .push((http::header::USER_AGENT, user_agent(&config.identity)));
    let client = Client::try_from(kube_config).context("building the Kubernetes client")?;
    let metrics = Arc::new(Metrics::new());
    let health = Health {
        metrics: metrics.clone(),
        ready: Arc::default(),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        termination().await;
        info!("termination signal: shutting down");
        let _ = stop_tx.send(true);
    });
    let stopped = {
        let rx = stop_rx.clone();
        move || {
            let mut rx = rx.clone();
            async move { wait_true(&mut rx).await }
        }
    };
    let server = tokio::spawn(server::serve(config.http_addr, health.clone(), stopped()));

    // Leadership: `leader` turns true while this replica holds the Lease.
    // Without leader election the sender is held until the end (`_always_leader`): a closed
    // watch reads as lost leadership.
    let (mut leader, lease_task, _always_leader) = if config.leader_election {
        let namespace = config
            .lease_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        let manager =
            kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &config.lease_name)
                .with_namespace(&namespace)
                .with_identity(&config.identity)
                .with_duration(LEASE_SECONDS)
                .with_grace(LEASE_GRACE_SECONDS)
                .with_field_manager(lease_field_manager(&config.identity))
                .build()
                .await
                .with_context(|| format!("cannot use Lease {namespace}/{}", config.lease_name))?;
        let (rx, task) = manager.watch().await;
        let guard = (
            Api::<Lease>::namespaced(client.clone(), &namespace),
            config.lease_name.clone(),
        );
        (rx, Some((task, guard)), None)
    } else {
        let (tx, rx) = always_leader();
        (rx, None, Some(tx))
    };
    health.ready.store(true, Ordering::Relaxed);
    info!(identity = %config.identity, leader_election = config.leader_election, "waiting for leadership");
    tokio::select! {
        _ = wait_true(&mut leader) => {},
        _ = stopped() => {},
    }
    let mut lost_leadership = false;
    if !*stop_rx.borrow() {
        info!(identity = %config.identity, "leading; starting the controller");
        health.ready.store(false, Ordering::Relaxed);
        let lost = leadership_lost(leader.clone());
        // On a task of its own: the controller's shutdown future must be Sync.
        let stale = lease_task.as_ref().map(|(_, (api, name))| {
            tokio::spawn(renew_deadline_passed(
                api.clone(),
                name.clone(),
                config.identity.clone(),
            ))
        });
        let stop_checking = stale.as_ref().map(|task| task.abort_handle());
        let stop = stopped();
        let shutdown = async move {
            let stale = async move {
                match stale {
                    Some(task) => {
                        let _ = task.await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = lost => {},
                _ = stale => {},
                _ = stop => {},
            }
        };
        // Shared, so that the controller can restart under the same shutdown.
        let shutdown = shutdown.shared();
        let ran = loop {
            let ran = run_controller(
                client.clone(),
                &config,
                metrics.clone(),
                health.clone(),
                shutdown.clone(),
            )
            .await;
            // Unless it is to stop anyway (a termination, or leadership lost at the same time).
            let stopping = *stop_rx.borrow() || shutdown.clone().now_or_never().is_some();
            match ran {
                Ok(Stopped::ToWatchNewKinds) if !stopping => {
                    info!("restarting the controller to watch LeaderWorkerSets");
                    // Not ready again until the new controller's caches sync.
                    health.ready.store(false, Ordering::Relaxed);
                }
                ran => break ran.map(drop),
            }
        };
        if let Some(task) = stop_checking {
            task.abort();
        }
        ran?;
        lost_leadership = !*stop_rx.borrow();
    }
    // Dropping the receiver makes the lease task release the Lease for the next leader.
    drop(leader);
    if let Some((task, _)) = lease_task {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(_))) => info!("released the Lease"),
            Ok(Ok(Err(e))) => warn!(error = %e, "could not release the Lease"),
            _ => warn!("the lease task did not finish in time"),
        }
    }
    if lost_leadership {
        anyhow::bail!("lost the leader Lease; exiting so that this replica restarts as a standby");
    }
    let _ = server.await;
    Ok(())
}

/// The User-Agent of every request, `sparsemoe-operator/<version> (<identity>)`, so that the API
/// server's audit log and `apiserver_request_total` tell the operator's requests (and each
/// replica's) apart; kube-rs sends none of its own.
pub fn user_agent(identity: &str) -> http::HeaderValue {
    let version = env!("CARGO_PKG_VERSION");
    http::HeaderValue::from_str(&format!("{}/{version} ({identity})", crate::FIELD_MANAGER))
        .unwrap_or_else(|_| {
            http::HeaderValue::from_str(&format!("{}/{version}", crate::FIELD_MANAGER))
                .expect("a valid header value")
        })
}

/// Whether a discovery error means the API group is not installed. The API server answers an
/// unknown group-version with a plain-text `404 page not found`, which kube-rs turns into a
/// Status with code 404 but no `NotFound` reason (so `is_not_found` is false).
fn group_not_served(status: &kube::core::Status) -> bool {
    status.is_not_found() || status.code == 404
}

/// Attempts at LeaderWorkerSet discovery before an error counts as "absent"; the waits between
/// them double from [`DISCOVERY_FIRST_WAIT`] (1 + 2 + 4 + 8 + 16 s).
const DISCOVERY_ATTEMPTS: u32 = 6;
const DISCOVERY_FIRST_WAIT: Duration = Duration::from_secs(1);
/// How often a replica whose child caches have not synced says which.
const CACHE_SYNC_WARNING: Duration = Duration::from_secs(30);

/// How often an operator that runs without the LeaderWorkerSet API looks for it again.
pub const REDISCOVER_EVERY: Duration = Duration::from_secs(60);

/// Whether the API server serves LeaderWorkerSets, or the error that kept it from saying.
async fn leader_worker_sets_served(client: &Client) -> Result<bool, kube::Error> {
    match client
        .list_api_group_resources(children::LWS_API_VERSION)
        .await
    {
        Ok(list) => Ok(list
            .resources
            .iter()
            .any(|r| r.name == children::LWS_PLURAL)),
        Err(kube::Error::Api(status)) if group_not_served(&status) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether the LeaderWorkerSet API is served (API discovery), read when the controller starts
/// (its watches are wired then). An error other than "not served" (an API server restarting, a
/// timeout) is retried for about half a minute before the API is taken as absent; while it is,
/// [`leader_worker_sets_appear`] keeps looking, and the controller restarts when it is found.
pub async fn discover(client: &Client) -> Capabilities {
    let mut wait = DISCOVERY_FIRST_WAIT;
    let mut attempt = 1;
    let leader_worker_set = loop {
        match leader_worker_sets_served(client).await {
            Ok(served) => break served,
            Err(e) if attempt < DISCOVERY_ATTEMPTS => {
                warn!(error = %e, attempt, retry_in = ?wait, "LeaderWorkerSet discovery failed");
                tokio::time::sleep(wait).await;
                wait *= 2;
                attempt += 1;
            }
            Err(e) => {
                warn!(error = %e, attempt, every = ?REDISCOVER_EVERY, "LeaderWorkerSet discovery failed; treating it as absent and looking again");
                break false;
            }
        }
    };
    info!(leader_worker_set, "discovered cluster capabilities");
    Capabilities { leader_worker_set }
}

/// Resolves once the LeaderWorkerSet API is served, looking every `every`: LeaderWorkerSet
/// installed after the operator, or discovery that failed at start-up, then needs no restart.
async fn leader_worker_sets_appear(client: Client, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match leader_worker_sets_served(&client).await {
            Ok(true) => {
                info!("the LeaderWorkerSet API is served now");
                return;
            }
            Ok(false) => {}
            Err(e) => warn!(error = %e, "LeaderWorkerSet discovery failed; looking again"),
        }
    }
}

fn api_for<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// A label-filtered watch feeding a cache; returns the cache and the trigger stream. `prune`
/// drops what the operator never reads before an object is stored (managed fields are always
/// dropped): at 1,000s of objects the caches are most of the operator's memory.
fn cached<K>(
    api: Api<K>,
    prune: fn(&mut K),
) -> (
    Store<K>,
    impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default().labels(MANAGED_SELECTOR))
            .modify(move |o: &mut K| {
                o.managed_fields_mut().clear();
                prune(o);
            })
            .default_backoff(),
    )
    .touched_objects();
    (reader, stream)
}

/// For [`cached`]: store objects whole (but for their managed fields).
fn keep_all<K>(_: &mut K) {}

/// What the operator reads of a pod: its labels, name and namespace; its containers' states
/// and its `PodScheduled` condition (for [`crate::status::pod_problems`]); and the ConfigMap
/// volumes it mounts, by ConfigMap name and key (for [`crate::children::mounted_plans`]). The
/// rest of the spec and of the status goes.
pub(crate) fn prune_pod(pod: &mut Pod) {
    use k8s_openapi::api::core::v1::{
        ConfigMapVolumeSource, KeyToPath, PodCondition, PodSpec, PodStatus, Volume,
    };
    let config_maps: Vec<Volume> = pod
        .spec
        .take()
        .and_then(|s| s.volumes)
        .into_iter()
        .flatten()
        .filter_map(|v| {
            let c = v.config_map?;
            Some(Volume {
                name: v.name,
                config_map: Some(ConfigMapVolumeSource {
                    name: c.name,
                    items: c.items.map(|items| {
                        items
                            .into_iter()
                            .map(|i| KeyToPath {
                                key: i.key,
                                path: i.path,
                                mode: None,
                            })
                            .collect()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })
        })
        .collect();
    pod.spec = (!config_maps.is_empty()).then(|| PodSpec {
        volumes: Some(config_maps),
        ..Default::default()
    });
    pod.metadata.annotations = None;
    if let Some(status) = &mut pod.status {
        let scheduled = status
            .conditions
            .take()
            .into_iter()
            .flatten()
            .filter(|c| c.type_ == "PodScheduled")
            .map(|c| PodCondition {
                type_: c.type_,
                status: c.status,
                reason: c.reason,
                message: c.message,
                last_transition_time: c.last_transition_time,
                ..Default::default()
            })
            .collect::<Vec<_>>();
        *status = PodStatus {
            // Where the queueDepth policy reads the engine's metrics.
            pod_ip: status.pod_ip.take(),
            container_statuses: status.container_statuses.take(),
            init_container_statuses: status.init_container_statuses.take(),
            conditions: (!scheduled.is_empty()).then_some(scheduled),
            ..Default::default()
        };
    }
}

/// Why the controller stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stopped {
    /// Its shutdown future resolved.
    Shutdown,
    /// The LeaderWorkerSet API appeared: a controller that watches it must take over.
    ToWatchNewKinds,
}

async fn run_controller(
    client: Client,
    config: &RunConfig,
    metrics: Arc<Metrics>,
    health: Health,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<Stopped> {
    let capabilities = discover(&client).await;
    // Without LeaderWorkerSets, look for them again; on a task of its own, since the
    // controller's shutdown future must be Sync.
    let appeared = (!capabilities.leader_worker_set)
        .then(|| tokio::spawn(leader_worker_sets_appear(client.clone(), REDISCOVER_EVERY)));
    let appeared_abort = appeared.as_ref().map(|task| task.abort_handle());
    let new_kinds = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shutdown = {
        let new_kinds = new_kinds.clone();
        async move {
            let appeared = async move {
                match appeared {
                    Some(task) => {
                        if task.await.is_ok() {
                            new_kinds.store(true, Ordering::Relaxed);
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown => {},
                _ = appeared => {},
            }
        }
    };
    let ns = config.watch_namespace.as_deref();
    let (deployments, deployment_events) = cached(api_for::<Deployment>(&client, ns), keep_all);
    let (services, service_events) = cached(api_for::<Service>(&client, ns), keep_all);
    let (pdbs, pdb_events) = cached(api_for::<PodDisruptionBudget>(&client, ns), keep_all);
    let (config_maps, config_map_events) = cached(api_for::<ConfigMap>(&client, ns), keep_all);
    let (pods, pod_events) = cached(api_for::<Pod>(&client, ns), prune_pod);

    let idep_api: Api<InferenceDeployment> = api_for(&client, ns);
    let (idep_store, idep_writer) = reflector::store();
    let idep_events = reflector::reflector(
        idep_writer,
        watcher(idep_api, watcher::Config::default())
            .modify(|o: &mut InferenceDeployment| o.managed_fields_mut().clear())
            .default_backoff(),
    )
    .applied_objects();
    let mut controller = Controller::for_stream(idep_events, idep_store)
        .with_config(ControllerConfig::default().debounce(Duration::from_millis(500)))
        .owns_stream(deployment_events)
        .owns_stream(service_events)
        .owns_stream(pdb_events)
        .owns_stream(config_map_events)
        // Pods belong to ReplicaSets; map them to their InferenceDeployment by label.
        .watches_stream(pod_events, |pod: Pod| {
            let name = pod.labels().get(LABEL_DEPLOYMENT)?.clone();
            Some(ObjectRef::new(&name).within(&pod.namespace()?))
        });

    let leader_worker_sets = if capabilities.leader_worker_set {
        let resource = children::lws_api_resource();
        let api: Api<DynamicObject> = match ns {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        let writer = reflector::store::Writer::new(resource.clone());
        let reader = writer.as_reader();
        let stream = reflector::reflector(
            writer,
            watcher(api, watcher::Config::default().labels(MANAGED_SELECTOR))
                .modify(|o: &mut DynamicObject| o.managed_fields_mut().clear())
                .default_backoff(),
        )
        .touched_objects();
        controller = controller.owns_stream_with(stream, resource);
        Some(reader)
    } else {
        None
    };

    let stores = Stores {
        deployments: deployments.clone(),
        services,
        pdbs,
        config_maps,
        pods,
        leader_worker_sets,
    };
    let waiting_stores = stores.clone();
    let reporter = Reporter {
        controller: crate::FIELD_MANAGER.into(),
        instance: Some(config.identity.clone()),
    };
    let context = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        metrics: metrics.clone(),
        stores,
        capabilities,
        failures: Mutex::new(HashMap::new()),
        applied: Mutex::new(HashMap::new()),
        scrape: Arc::new(crate::queue_scaling::HttpScrape::default()),
        queues: Mutex::new(HashMap::new()),
    });
    // Ready once every cache has its first list: until then reconciles wait (see
    // `reconcile::caches_synced`), and a cache that never syncs (a list the operator's RBAC
    // forbids) is named in the log rather than leaving every object waiting in silence.
    let main_store = controller.store();
    let ready_flag = health.ready.clone();
    let waiting = tokio::spawn(async move {
        if main_store.wait_until_ready().await.is_err() {
            return;
        }
        let started = tokio::time::Instant::now();
        let mut warned = started;
        loop {
            let missing = reconcile::unsynced_caches(&waiting_stores);
            if missing.is_empty() {
                ready_flag.store(true, Ordering::Relaxed);
                info!("caches synced; ready");
                return;
            }
            if warned.elapsed() >= CACHE_SYNC_WARNING {
                warned = tokio::time::Instant::now();
                warn!(
                    caches = ?missing,
                    waited_s = started.elapsed().as_secs(),
                    "child caches not synced yet, so nothing is reconciled: check that the operator may list and watch these kinds"
                );
            }
            tokio::time::sleep(reconcile::CACHE_SYNC_WAIT).await;
        }
    });
    // Forget what the context keeps about deleted objects, every resync period.
    let (pruned, ideps) = (context.clone(), controller.store());
    let pruning = tokio::spawn(async move {
        let mut every = tokio::time::interval(reconcile::RESYNC);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            reconcile::prune(&pruned, &ideps);
        }
    });
    let managed = controller.store();
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, reconcile::error_policy, context)
        .for_each(|result| {
            metrics.managed.set(managed.len() as i64);
            if let Err(error) = result {
                // Reconcile errors are already counted and logged by the error policy.
                tracing::debug!(%error, "controller");
            }
            futures::future::ready(())
        })
        .await;
    // A controller that restarts brings its own.
    waiting.abort();
    pruning.abort();
    if let Some(task) = appeared_abort {
        task.abort();
    }
    info!("controller stopped");
    Ok(if new_kinds.load(Ordering::Relaxed) {
        Stopped::ToWatchNewKinds
    } else {
        Stopped::Shutdown
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The leader leads while it reads its Lease as its own and renewed within the deadline;
    /// a Lease another holds, or one whose last renewal it saw is past the deadline (renewals
    /// failing, or the Lease out of reach), ends its leading, before a standby may take it.
    #[test]
    fn the_leader_stops_leading_past_its_renew_deadline() {
        use k8s_openapi::api::coordination::v1::LeaseSpec;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
        let t = |s: i64| jiff::Timestamp::from_second(s).unwrap();
        let lease = |holder: &str, renewed: i64| Lease {
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(t(renewed))),
                ..Default::default()
            }),
            ..Default::default()
        };
        // Renewed at 110: held at 121, and the renewal is what counts from now on.
        assert_eq!(
            lease_still_held(Some(&lease("me", 110)), "me", t(100), t(121)),
            Ok(t(110))
        );
        // Renewals stopped at 110 (PATCHes failing): past the deadline at 123, still short of
        // the 125 from which a standby may take the Lease.
        assert!(RENEW_DEADLINE.as_secs() < LEASE_SECONDS);
        assert!(RENEW_DEADLINE.as_secs() > LEASE_SECONDS - LEASE_GRACE_SECONDS);
        let err = lease_still_held(Some(&lease("me", 110)), "me", t(110), t(123)).unwrap_err();
        assert!(err.contains("renew deadline"), "{err}");
        // Unreadable: the last renewal seen counts.
        assert_eq!(lease_still_held(None, "me", t(110), t(120)), Ok(t(110)));
        assert!(lease_still_held(None, "me", t(110), t(123)).is_err());
        // An older renewal read back (a stale read) does not move the last one seen back.
        assert_eq!(
            lease_still_held(Some(&lease("me", 105)), "me", t(110), t(111)),
            Ok(t(110))
        );
        // Another holder: lost at once.
        let err = lease_still_held(Some(&lease("other", 111)), "me", t(110), t(111)).unwrap_err();
        assert!(err.contains("held by other"), "{err}");
        // A renewal stamped a moment ahead of this clock is fresh.
        assert_eq!(
            lease_still_held(Some(&lease("me", 112)), "me", t(110), t(111)),
            Ok(t(112))
        );
    }

    #[test]
    fn each_replica_takes_the_lease_under_its_own_field_manager() {
        let a = lease_field_manager("sparsemoe-operator-7d9f-abcde");
        let b = lease_field_manager("sparsemoe-operator-7d9f-fghij");
        assert_ne!(a, b);
        assert!(
            a.starts_with(crate::FIELD_MANAGER) && a.ends_with("abcde"),
            "{a}"
        );
        assert_eq!(lease_field_manager(&"x".repeat(300)).len(), 128);
    }

    /// Regression: without leader election the controller shut down right after starting
    /// (the sender of the always-true leadership was dropped at once, which read as lost).
    #[tokio::test]
    async fn without_leader_election_leadership_is_never_lost() {
        let (tx, rx) = always_leader();
        let lost = tokio::time::timeout(Duration::from_millis(200), leadership_lost(rx.clone()));
        assert!(
            lost.await.is_err(),
            "leadership was lost while the sender lives"
        );
        drop(tx);
        let lost = tokio::time::timeout(Duration::from_millis(200), leadership_lost(rx));
        assert!(
            lost.await.is_ok(),
            "a closed leadership watch counts as lost"
        );
    }

    /// The pruned pod still gives the same problems, the same mounted plans and the same owner
    /// lookup.
    #[test]
    fn pruned_pods_keep_what_status_and_triggers_read() {
        let cm = "d-placement";
        let plan = crate::children::plan_key(8, 1);
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "labels": {LABEL_DEPLOYMENT: "d"},
                         "annotations": {"a": "b"}},
            "spec": {"containers": [{"name": "engine", "image": "img", "args": ["serve"]}],
                     "volumes": [
                         {"name": "placement", "configMap": {"name": cm, "defaultMode": 292,
                             "items": [{"key": plan, "path": "placement.json"}]}},
                         {"name": "shm", "emptyDir": {"medium": "Memory"}}]},
            "status": {"phase": "Pending", "conditions": [
                           {"type": "Ready", "status": "False"},
                           {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                            "message": "0/12 nodes are available: 12 Insufficient nvidia.com/gpu.",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                       "containerStatuses": [{"name": "engine", "image": "img", "imageID": "",
                           "ready": false, "restartCount": 3,
                           "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}
        }))
        .unwrap();
        let mut pruned = pod.clone();
        prune_pod(&mut pruned);
        let spec = pruned.spec.as_ref().unwrap();
        assert!(spec.containers.is_empty());
        assert_eq!(
            spec.volumes.as_ref().unwrap().len(),
            1,
            "only ConfigMap volumes"
        );
        let conditions = pruned.status.as_ref().unwrap().conditions.as_ref().unwrap();
        assert_eq!(conditions.len(), 1, "only PodScheduled: {conditions:?}");
        assert_eq!(pruned.labels(), pod.labels());
        assert_eq!(pruned.namespace(), pod.namespace());
        assert!(pruned.annotations().is_empty());
        let later = "2026-01-01T01:00:00Z".parse().unwrap();
        let problems = |p: &Pod| crate::status::pod_problems([p], later);
        assert_eq!(problems(&pruned), problems(&pod));
        assert_eq!(
            problems(&pruned)
                .iter()
                .map(|p| p.reason)
                .collect::<Vec<_>>(),
            ["EngineCrashLooping", crate::status::UNSCHEDULABLE]
        );
        let mounted = |p: &Pod| crate::children::mounted_plans([p], cm);
        assert_eq!(mounted(&pruned), mounted(&pod));
        assert_eq!(mounted(&pruned).into_iter().collect::<Vec<_>>(), [plan]);

        // A pod with no ConfigMap volume and no conditions keeps no spec and no conditions.
        let mut bare: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "q"},
            "spec": {"containers": [{"name": "engine", "image": "img"}]},
            "status": {"phase": "Running"}
        }))
        .unwrap();
        prune_pod(&mut bare);
        assert!(bare.spec.is_none());
        assert!(bare.status.unwrap().conditions.is_none());
    }

    #[tokio::test]
    async fn leadership_is_lost_when_it_turns_false() {
        let (tx, rx) = watch::channel(true);
        let waiter = tokio::spawn(leadership_lost(rx));
        tx.send(false).unwrap();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("lost in time")
            .unwrap();
    }

    /// Discovery retries a failing API server, and takes "not served" at once.
    #[tokio::test(start_paused = true)]
    async fn discovery_retries_errors_but_not_a_group_that_is_not_served() {
        use crate::fixtures::{Reply, expect, finish, verify};
        let path = format!("/apis/{}", children::LWS_API_VERSION);
        let served = Reply::Json(serde_json::json!({
            "kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": children::LWS_API_VERSION,
            "resources": [{"name": children::LWS_PLURAL, "singularName": "", "namespaced": true,
                           "kind": "LeaderWorkerSet", "verbs": ["get"]}]
        }));
        let (service, handle) = tower_test::mock::pair();
        let verifier = verify(
            handle,
            vec![
                expect(
                    http::Method::GET,
                    &path,
                    Reply::Fail(503, "ServiceUnavailable"),
                ),
                expect(http::Method::GET, &path, Reply::Fail(500, "InternalError")),
                expect(http::Method::GET, &path, served),
            ],
        );
        let started = tokio::time::Instant::now();
        assert!(
            discover(&Client::new(service, "ns"))
                .await
                .leader_worker_set
        );
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(3),
            "waited 1 s, then 2 s"
        );
        finish(verifier).await;

        let (service, handle) = tower_test::mock::pair();
        let verifier = verify(
            handle,
            vec![expect(
                http::Method::GET,
                &path,
                Reply::Fail(404, "NotFound"),
            )],
        );
        assert!(
            !discover(&Client::new(service, "ns"))
                .await
                .leader_worker_set
        );
        finish(verifier).await;

        let (service, handle) = tower_test::mock::pair();
        let failures = (0..DISCOVERY_ATTEMPTS)
            .map(|_| expect(http::Method::GET, &path, Reply::Fail(500, "InternalError")))
            .collect();
        let verifier = verify(handle, failures);
        assert!(
            !discover(&Client::new(service, "ns"))
                .await
                .leader_worker_set
        );
        finish(verifier).await;
    }

    /// Without LeaderWorkerSets the operator keeps looking, past "not served" and failures,
    /// until they are served.
    #[tokio::test(start_paused = true)]
    async fn leader_worker_sets_installed_later_are_found() {
        use crate::fixtures::{Reply, expect, finish, verify};
        let path = format!("/apis/{}", children::LWS_API_VERSION);
        let list = |resources: serde_json::Value| {
            Reply::Json(serde_json::json!({
                "kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": children::LWS_API_VERSION, "resources": resources
            }))
        };
        let (service, handle) = tower_test::mock::pair();
        let verifier = verify(
            handle,
            vec![
                expect(http::Method::GET, &path, Reply::Fail(404, "NotFound")),
                expect(
                    http::Method::GET,
                    &path,
                    Reply::Fail(503, "ServiceUnavailable"),
                ),
                // The group served before the kind is established.
                expect(http::Method::GET, &path, list(serde_json::json!([]))),
                expect(
                    http::Method::GET,
                    &path,
                    list(
                        serde_json::json!([{"name": children::LWS_PLURAL, "singularName": "",
                        "namespaced": true, "kind": "LeaderWorkerSet", "verbs": ["get"]}]),
                    ),
                ),
            ],
        );
        let started = tokio::time::Instant::now();
        leader_worker_sets_appear(Client::new(service, "ns"), REDISCOVER_EVERY).await;
        assert_eq!(started.elapsed(), REDISCOVER_EVERY * 4);
        finish(verifier).await;
    }

    /// Regression: a real API server's answer for an uninstalled group was logged as a failed
    /// discovery.
    #[test]
    fn a_plain_404_means_the_group_is_not_served() {
        let plain = kube::core::Status {
            status: Some(kube::core::response::StatusSummary::Failure),
            code: 404,
            message: "404 page not found".into(),
            metadata: None,
            reason: "Failed to parse error data".into(),
            details: None,
        };
        assert!(group_not_served(&plain));
        let forbidden = kube::core::Status {
            code: 403,
            reason: "Forbidden".into(),
            ..plain
        };
        assert!(!group_not_served(&forbidden));
    }

    #[test]
    fn user_agent_names_the_operator_and_the_replica() {
        let ua = user_agent("op-a");
        let ua = ua.to_str().unwrap();
        assert!(ua.starts_with("sparsemoe-operator/"), "{ua}");
        assert!(ua.ends_with(" (op-a)"), "{ua}");
        // An identity that cannot be a header value still gives a usable agent.
        assert_eq!(
            user_agent("bad\nname").to_str().unwrap(),
            concat!("sparsemoe-operator/", env!("CARGO_PKG_VERSION"))
        );
    }
}
