//! LeaderWorkerSet (kubernetes-sigs/lws) for replicas that span several nodes. The type is not
//! in k8s-openapi, so it is built as a `DynamicObject`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;
use sparsemoe_api::InferenceDeployment;
use sparsemoe_api::v1alpha1::GpuVariant;

use super::ROLE_LEADER;
use super::pod::pod_template;

pub const LWS_GROUP: &str = "leaderworkerset.x-k8s.io";
pub const LWS_API_VERSION: &str = "leaderworkerset.x-k8s.io/v1";
pub const LWS_KIND: &str = "LeaderWorkerSet";
pub const LWS_PLURAL: &str = "leaderworkersets";

/// The API resource of `leaderworkerset.x-k8s.io/v1` LeaderWorkerSet.
pub fn lws_api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(LWS_GROUP, "v1", LWS_KIND),
        LWS_PLURAL,
    )
}

pub(super) fn leader_worker_set(
    idep: &InferenceDeployment,
    variant: &GpuVariant,
    metadata: ObjectMeta,
    replicas: i32,
    plan_mount: super::PlanMount,
) -> DynamicObject {
    let nodes = variant.nodes(&idep.spec.parallelism);
    let labels = metadata.labels.clone().unwrap_or_default();
    let leader = pod_template(
        idep,
        variant,
        labels.clone(),
        ROLE_LEADER,
        plan_mount,
        nodes,
    );
    let worker = pod_template(idep, variant, labels, "worker", plan_mount, nodes);
    let rollout = &idep.spec.rollout;
    let mut object = DynamicObject::new(
        &metadata.name.clone().unwrap_or_default(),
        &lws_api_resource(),
    );
    object.metadata = metadata;
    object.data = json!({
        "spec": {
            "replicas": replicas,
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": nodes,
                // A multi-node replica is one model instance: any pod restart restarts the group.
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": leader,
                "workerTemplate": worker,
            },
            "rolloutStrategy": {
                "type": "RollingUpdate",
                "rollingUpdateConfiguration": {
                    "maxSurge": rollout.max_surge,
                    "maxUnavailable": rollout.max_unavailable,
                },
            },
        }
    });
    object
}
