//! The expert placement plan: which routed experts each GPU of a replica holds.
//!
//! The operator writes it (JSON) into the ConfigMap `<name>-placement`; the engine reads it
//! from the mounted file and loads only its GPUs' experts. An expert listed on several GPUs is
//! a redundant copy of a hot expert; the engine splits that expert's tokens between the copies.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The plan format version this crate reads and writes.
pub const PLAN_VERSION: u32 = 1;

/// File name of the plan inside the placement ConfigMap (and the mounted directory).
pub const PLAN_FILE: &str = "placement.json";

/// Which experts each GPU of one replica holds, per MoE layer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlacementPlan {
    /// Format version; see [`PLAN_VERSION`].
    pub version: u32,
    /// Routed (logical) experts per MoE layer.
    pub num_experts: u32,
    /// GPUs in one replica.
    pub num_gpus: u32,
    /// Nodes in one replica; GPUs `[k * num_gpus / num_nodes, (k + 1) * num_gpus / num_nodes)` are on node k.
    pub num_nodes: u32,
    /// The assignment of every layer without its own entry in `layers`.
    pub default: GpuAssignment,
    /// Per-layer assignments, keyed by decoder layer index.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub layers: BTreeMap<u32, GpuAssignment>,
    /// Mean over max GPU load under the loads the plan was made from (1.0 = perfectly balanced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancedness: Option<f64>,
}

/// `gpus[g]` lists the experts GPU `g` holds, one per slot.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GpuAssignment {
    pub gpus: Vec<Vec<u32>>,
}

/// Why a plan cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("placement plan: unsupported version {0} (this build reads version {PLAN_VERSION})")]
    Version(u32),
    #[error("placement plan: {0} must be at least 1")]
    Zero(&'static str),
    #[error("placement plan: numGpus {gpus} is not a multiple of numNodes {nodes}")]
    NodesDoNotDivideGpus { gpus: u32, nodes: u32 },
    #[error("placement plan: {layer} lists {found} GPUs, the plan has numGpus {expected}")]
    GpuCount {
        layer: String,
        found: usize,
        expected: u32,
    },
    #[error(
        "placement plan: {layer} GPU {gpu} holds {found} experts, GPU 0 holds {expected}; every GPU needs the same number of slots"
    )]
    UnequalSlots {
        layer: String,
        gpu: usize,
        found: usize,
        expected: usize,
    },
    #[error(
        "placement plan: {layer} GPU {gpu} lists expert {expert}, but numExperts is {num_experts}"
    )]
    ExpertOutOfRange {
        layer: String,
        gpu: usize,
        expert: u32,
        num_experts: u32,
    },
    #[error("placement plan: {layer} GPU {gpu} lists expert {expert} twice")]
    Duplicate {
        layer: String,
        gpu: usize,
        expert: u32,
    },
    #[error("placement plan: {layer} places expert {expert} on no GPU")]
    Missing { layer: String, expert: u32 },
    #[error(
        "placement plan: cannot place {experts} experts on {gpus} GPUs with {redundant} redundant slots: {why}"
    )]
    Infeasible {
        experts: u32,
        gpus: u32,
        redundant: u32,
        why: &'static str,
    },
}

impl PlacementPlan {
    /// The plan used when no loads are known: expert `e` on GPU `e * gpus / experts`
    /// (contiguous blocks). Needs `num_experts` to be a multiple of `num_gpus`.
    pub fn balanced(num_experts: u32, num_gpus: u32, num_nodes: u32) -> Result<Self, PlanError> {
        if num_gpus == 0 || num_experts == 0 || num_nodes == 0 {
            return Err(PlanError::Zero(if num_gpus == 0 {
                "numGpus"
            } else if num_experts == 0 {
                "numExperts"
            } else {
                "numNodes"
            }));
        }
        if !num_experts.is_multiple_of(num_gpus) {
            return Err(PlanError::Infeasible {
                experts: num_experts,
                gpus: num_gpus,
                redundant: 0,
                why: "numExperts must be a multiple of numGpus",
            });
        }
        let per_gpu = num_experts / num_gpus;
        let gpus = (0..num_gpus)
            .map(|g| (g * per_gpu..(g + 1) * per_gpu).collect())
            .collect();
        let plan = Self {
            version: PLAN_VERSION,
            num_experts,
            num_gpus,
            num_nodes,
            default: GpuAssignment { gpus },
            layers: BTreeMap::new(),
            balancedness: None,
        };
        plan.validate()?;
        Ok(plan)
    }

    /// Parses and validates a plan from JSON.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let plan: Self =
            serde_json::from_str(text).map_err(|e| format!("placement plan: invalid JSON: {e}"))?;
        plan.validate().map_err(|e| e.to_string())?;
        Ok(plan)
    }

    /// Checks every invariant the engine relies on.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.version != PLAN_VERSION {
            return Err(PlanError::Version(self.version));
        }
        for (value, name) in [
            (self.num_experts, "numExperts"),
            (self.num_gpus, "numGpus"),
            (self.num_nodes, "numNodes"),
        ] {
            if value == 0 {
                return Err(PlanError::Zero(name));
            }
        }
        if !self.num_gpus.is_multiple_of(self.num_nodes) {
            return Err(PlanError::NodesDoNotDivideGpus {
                gpus: self.num_gpus,
                nodes: self.num_nodes,
            });
        }
        self.check_assignment("default", &self.default)?;
        for (layer, assignment) in &self.layers {
            self.check_assignment(&format!("layer {layer}"), assignment)?;
        }
        Ok(())
    }

    fn check_assignment(&self, layer: &str, assignment: &GpuAssignment) -> Result<(), PlanError> {
        if assignment.gpus.len() != self.num_gpus as usize {
            return Err(PlanError::GpuCount {
                layer: layer.to_string(),
                found: assignment.gpus.len(),
                expected: self.num_gpus,
            });
        }
        let slots = assignment.gpus[0].len();
        let mut seen = vec![false; self.num_experts as usize];
        for (gpu, experts) in assignment.gpus.iter().enumerate() {
            if experts.len() != slots {
                return Err(PlanError::UnequalSlots {
                    layer: layer.to_string(),
                    gpu,
                    found: experts.len(),
                    expected: slots,
                });
            }
            let mut on_this_gpu = std::collections::BTreeSet::new();
            for &expert in experts {
                if expert >= self.num_experts {
                    return Err(PlanError::ExpertOutOfRange {
                        layer: layer.to_string(),
                        gpu,
                        expert,
                        num_experts: self.num_experts,
                    });
                }
                if !on_this_gpu.insert(expert) {
                    return Err(PlanError::Duplicate {
                        layer: layer.to_string(),
                        gpu,
                        expert,
                    });
                }
                seen[expert as usize] = true;
            }
        }
        if let Some(expert) = seen.iter().position(|s| !s) {
            return Err(PlanError::Missing {
                layer: layer.to_string(),
                expert: expert as u32,
            });
        }
        Ok(())
    }

    /// The assignment that applies to decoder layer `layer`.
    pub fn assignment(&self, layer: u32) -> &GpuAssignment {
        self.layers.get(&layer).unwrap_or(&self.default)
    }

    /// GPUs holding a copy of `expert` in `layer`.
    pub fn replicas_of(&self, layer: u32, expert: u32) -> Vec<u32> {
        self.assignment(layer)
            .gpus
            .iter()
            .enumerate()
            .filter(|(_, experts)| experts.contains(&expert))
            .map(|(gpu, _)| gpu as u32)
            .collect()
    }

    /// Canonical JSON (sorted keys, no whitespace).
    pub fn to_canonical_json(&self) -> String {
        // serde_json::Value sorts object keys (no `preserve_order` feature), so this is canonical.
        let value = serde_json::to_value(self).expect("plan serializes");
        serde_json::to_string(&value).expect("value serializes")
    }

    /// A short content hash of the assignment (not of the informational `balancedness`):
    /// equal hashes mean the same experts on the same GPUs.
    pub fn hash(&self) -> String {
        let mut stripped = self.clone();
        stripped.balancedness = None;
        let digest = Sha256::digest(stripped.to_canonical_json().as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_default_places_contiguous_blocks() {
        let plan = PlacementPlan::balanced(16, 4, 1).unwrap();
        assert_eq!(plan.default.gpus[0], vec![0, 1, 2, 3]);
        assert_eq!(plan.default.gpus[3], vec![12, 13, 14, 15]);
        assert_eq!(plan.replicas_of(7, 5), vec![1]);
        assert!(PlacementPlan::balanced(10, 4, 1).is_err());
        assert_eq!(
            PlacementPlan::balanced(8, 0, 1),
            Err(PlanError::Zero("numGpus"))
        );
    }

    #[test]
    fn round_trips_through_json_and_hash_ignores_balancedness() {
        let mut plan = PlacementPlan::balanced(8, 2, 1).unwrap();
        plan.layers.insert(
            3,
            GpuAssignment {
                gpus: vec![vec![0, 1, 2, 3, 7], vec![4, 5, 6, 7, 0]],
            },
        );
        let text = plan.to_canonical_json();
        let back = PlacementPlan::from_json(&text).unwrap();
        assert_eq!(back, plan);
        assert_eq!(back.replicas_of(3, 7), vec![0, 1]);
        let hash = plan.hash();
        plan.balancedness = Some(0.9);
        assert_eq!(plan.hash(), hash);
        plan.layers.get_mut(&3).unwrap().gpus[1][4] = 1;
        assert_ne!(plan.hash(), hash);
    }

    #[test]
    fn rejects_broken_plans_with_named_problems() {
        let base = PlacementPlan::balanced(4, 2, 1).unwrap();
        let mut missing = base.clone();
        missing.default.gpus = vec![vec![0, 1], vec![2, 2]];
        assert!(matches!(
            missing.validate(),
            Err(PlanError::Duplicate { expert: 2, .. })
        ));
        let mut uncovered = base.clone();
        uncovered.default.gpus = vec![vec![0, 1], vec![2, 1]];
        assert!(
            uncovered
                .validate()
                .unwrap_err()
                .to_string()
                .contains("expert 3 on no GPU")
        );
        let mut out_of_range = base.clone();
        out_of_range.default.gpus[1][0] = 9;
        assert!(matches!(
            out_of_range.validate(),
            Err(PlanError::ExpertOutOfRange { expert: 9, .. })
        ));
        let mut uneven = base.clone();
        uneven.default.gpus[1].push(0);
        assert!(matches!(
            uneven.validate(),
            Err(PlanError::UnequalSlots { gpu: 1, .. })
        ));
        let mut nodes = base.clone();
        nodes.num_nodes = 3;
        assert!(matches!(
            nodes.validate(),
            Err(PlanError::NodesDoNotDivideGpus { .. })
        ));
        let err = PlacementPlan::from_json(r#"{"version": 2}"#).unwrap_err();
        assert!(err.contains("invalid JSON"), "{err}");
        let mut v2 = base;
        v2.version = 2;
        assert_eq!(v2.validate(), Err(PlanError::Version(2)));
    }
}
