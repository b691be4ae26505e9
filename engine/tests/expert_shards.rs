//! Expert parallelism on the CPU backend (shards as pool tasks): the same logits as one shard
//! holding every expert, for even splits and for a placement plan with redundant copies, every
//! routed (token, expert) pair computed exactly once, and redundant copies sharing the load.

use std::path::{Path, PathBuf};

use sparsemoe_api::placement::{GpuAssignment, PLAN_VERSION, PlacementPlan};
use sparsemoe_engine::backend::cpu::Cpu;
use sparsemoe_engine::model::{LogitRows, Model, ModelOptions, SeqStep};

fn fixture() -> PathBuf {
    // 2 layers (the first dense), 8 routed experts, top-2, one shared expert.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v32_sparse_moe")
}

fn tokens() -> Vec<u32> {
    (0..40).map(|i| (i * 53 % 250 + 2) as u32).collect()
}

fn logits(model: &Model<Cpu>) -> Vec<f32> {
    let tokens = tokens();
    let mut cache = model.new_cache();
    let mut step = [SeqStep {
        tokens: &tokens,
        cache: &mut cache,
        logits: LogitRows::All,
    }];
    model.forward(&mut step, None).unwrap().remove(0)
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
        / scale
}

fn load() -> Model<Cpu> {
    Model::load(&fixture(), Cpu, ModelOptions::default()).unwrap()
}

#[test]
fn sharded_experts_give_the_unsharded_logits() {
    let want = logits(&load());
    let moe_layers = 1;
    let pairs = tokens().len() * 2 * moe_layers;
    for shards in [1, 2, 4, 8] {
        let mut model = load();
        model.configure_expert_shards(Some(shards), None).unwrap();
        let got = logits(&model);
        let diff = max_rel_diff(&want, &got);
        assert!(diff < 1e-5, "{shards} shards: max relative diff {diff}");
        let computed = model.expert_shards().unwrap().computed();
        assert_eq!(computed.len(), shards);
        assert_eq!(computed.iter().sum::<u64>() as usize, pairs, "{computed:?}");
    }
}

#[test]
fn shard_work_is_exported_as_metrics() {
    let mut model = load();
    model.configure_expert_shards(Some(2), None).unwrap();
    let metrics = sparsemoe_engine::metrics::Metrics::new();
    metrics.set_expert_shards(model.expert_shards().unwrap().clone());
    logits(&model);
    let text = metrics.render();
    let counts: Vec<u64> = (0..2)
        .map(|s| {
            let prefix = format!("sparsemoe_expert_shard_pairs_total{{shard=\"{s}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .unwrap_or_else(|| panic!("no counter for shard {s}:\n{text}"))
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(counts, model.expert_shards().unwrap().computed());
    assert_eq!(counts.iter().sum::<u64>() as usize, tokens().len() * 2);
}

#[test]
fn a_plan_with_redundant_copies_spreads_hot_experts_and_keeps_the_logits() {
    let want = logits(&load());
    // 3 shards x 4 slots: experts 0-7 once each, and copies of 0, 1, 2, 3 on other shards.
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
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("placement.json");
    std::fs::write(&file, plan.to_canonical_json()).unwrap();
    let mut model = load();
    model.configure_expert_shards(None, Some(&file)).unwrap();
    let got = logits(&model);
    let diff = max_rel_diff(&want, &got);
    assert!(diff < 1e-5, "max relative diff {diff}");
    let computed = model.expert_shards().unwrap().computed();
    assert_eq!(computed.iter().sum::<u64>() as usize, tokens().len() * 2);
    assert!(
        computed.iter().all(|&c| c > 0),
        "an idle shard: {computed:?}"
    );
}

#[test]
fn bad_shard_options_are_clear_errors() {
    let mut model = load();
    let e = model
        .configure_expert_shards(Some(3), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 shards cannot hold 8 experts"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.json");
    let e = model
        .configure_expert_shards(None, Some(&missing))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.json"), "{e}");

    let wrong = dir.path().join("wrong.json");
    let plan = PlacementPlan::balanced(16, 4, 1).unwrap();
    std::fs::write(&wrong, plan.to_canonical_json()).unwrap();
    let e = model
        .configure_expert_shards(None, Some(&wrong))
        .unwrap_err()
        .to_string();
    assert!(e.contains("numExperts is 16"), "{e}");
    let e = model
        .configure_expert_shards(Some(2), Some(&wrong))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--expert-shards 2 disagrees"), "{e}");

    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "{\"version\": 1").unwrap();
    let e = model
        .configure_expert_shards(None, Some(&garbage))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("garbage.json") && e.contains("invalid JSON"),
        "{e}"
    );
    assert!(
        model.expert_shards().is_none(),
        "a failed setup left shards behind"
    );
}
