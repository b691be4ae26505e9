//! Shared by the expert-shard tests of the CPU (`expert_shards.rs`) and CUDA (`cuda.rs`)
//! backends.

use std::path::{Path, PathBuf};

use sparsemoe_api::placement::{GpuAssignment, PLAN_VERSION, PlacementPlan};

/// Writes, into `dir`, a plan for the 8 routed experts of `v32_sparse_moe` on 3 shards of 4
/// slots: experts 0-7 once each, and redundant copies of 0, 1, 2 and 3 on other shards.
/// Returns its path.
pub fn write_redundant_plan(dir: &Path) -> PathBuf {
    let plan = PlacementPlan {
        version: PLAN_VERSION,
        num_experts: 8,
        num_gpus: 3,
        num_nodes: 1,
        default: GpuAssignment {
            gpus: vec![vec![0, 1, 2, 3], vec![4, 5, 0, 1], vec![6, 7, 2, 3]],
        },
        layers: Default::default(),
        balancedness: None,
    };
    let file = dir.join("redundant-placement.json");
    std::fs::write(&file, plan.to_canonical_json()).unwrap();
    file
}
