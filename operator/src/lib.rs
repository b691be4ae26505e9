//! sparsemoe-operator: reconciles `InferenceDeployment`s into engine workloads.
//!
//! Pure decisions live in [`children`] (spec → child objects), [`autoscale`] (replicas per
//! variant), [`queue_scaling`] (what the engines' queues call for), [`cost`] (what the
//! variants serve per unit of cost), [`status`] (conditions and the status no-op rule) and
//! [`placement`] (expert placement from loads). [`reconcile`] is the thin I/O shell that
//! applies them, and [`run`] wires the controller, leader election and the HTTP endpoints.

pub mod autoscale;
pub mod children;
pub mod cost;
pub mod metrics;
pub mod placement;
pub mod queue_scaling;
pub mod reconcile;
pub mod render;
pub mod run;
pub mod server;
pub mod status;

#[cfg(test)]
mod fixtures;

/// The one server-side-apply field manager for everything the operator writes.
pub const FIELD_MANAGER: &str = "sparsemoe-operator";

/// Everything a reconcile can fail with. Unrealisable specs are not errors: they are reported
/// through the `Degraded` condition, so only transient failures reach the error policy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("InferenceDeployment has no {0}")]
    MissingObjectKey(&'static str),
    #[error("serializing a child object: {0}")]
    Serialize(#[from] serde_json::Error),
    /// A child's name is held by an object this InferenceDeployment does not control (another
    /// InferenceDeployment's child whose name collides, say): not applied, not taken over.
    #[error("{kind} {name} exists and is controlled by {owner}, not this InferenceDeployment")]
    NotOurs {
        kind: String,
        name: String,
        owner: String,
    },
}

impl Error {
    /// A short, bounded label for the `reason` of the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(status)) if status.is_conflict() => "conflict",
            Error::Kube(kube::Error::Api(status)) if status.is_not_found() => "not_found",
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "transport",
            Error::MissingObjectKey(_) => "missing_key",
            Error::Serialize(_) => "serialize",
            Error::NotOurs { .. } => "not_ours",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
