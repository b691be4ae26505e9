//! `sparsemoe-operator render`: the children of one InferenceDeployment as multi-document
//! YAML, with no cluster (for review and GitOps diffs).

use kube::ResourceExt;
use serde::Serialize;
use sparsemoe_api::InferenceDeployment;

use crate::children::{self, Capabilities, Workload};

fn document<T: Serialize>(object: &T) -> Result<String, String> {
    serde_saphyr::to_string(object).map_err(|e| format!("cannot print a child as YAML: {e}"))
}

/// Renders the children of the InferenceDeployment in `manifest` (YAML). Validates it first
/// with the same rules the API server runs. With `leader_worker_set`, multi-node variants
/// render as LeaderWorkerSets. Problems (what a cluster would report as Degraded) are
/// returned as YAML comments at the top.
pub fn render(manifest: &str, leader_worker_set: bool) -> Result<String, String> {
    let idep: InferenceDeployment = sparsemoe_api::parse_and_validate(manifest)?;
    if idep.metadata.name.is_none() {
        return Err("invalid InferenceDeployment: metadata.name is required".into());
    }
    let namespace = idep.namespace().unwrap_or_else(|| "default".into());
    // No cluster: nothing runs yet, so autoscaling policies start at their minimum.
    let (_, built) = children::decide_and_build(
        &idep,
        &namespace,
        None,
        &Default::default(),
        Capabilities { leader_worker_set },
    );
    let mut out = String::new();
    for problem in &built.problems {
        out.push_str(&format!(
            "# Degraded ({}): {}\n",
            problem.reason, problem.message
        ));
    }
    let mut docs = Vec::new();
    if let Some((_, config_map)) = &built.placement {
        docs.push(document(config_map)?);
    }
    for child in &built.workloads {
        docs.push(match &child.workload {
            Workload::Deployment(d) => document(d.as_ref())?,
            Workload::LeaderWorkerSet(l) => document(l.as_ref())?,
        });
    }
    docs.push(document(&built.service)?);
    docs.push(document(&built.pdb)?);
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&doc);
        if !doc.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}
