//! Expert parallelism on the CPU backend (shards as pool tasks): the same logits as one shard
//! holding every expert, for even splits and for a placement plan with redundant copies, every
//! routed (token, expert) pair computed exactly once, and redundant copies sharing the load.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sparsemoe_api::placement::PlacementPlan;
use sparsemoe_engine::backend::cpu::Cpu;
use sparsemoe_engine::config::ModelConfig;
use sparsemoe_engine::expert_shards::ExpertShards;
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

/// `--expert-shards` / `--placement` as the engine's commands take them, on one device.
fn shards_for(
    shards: Option<usize>,
    placement: Option<&Path>,
) -> Result<Arc<ExpertShards>, String> {
    let config = ModelConfig::from_dir(&fixture()).unwrap();
    ExpertShards::from_options(&config, shards, placement, 1)
        .map(|s| Arc::new(s.expect("an option was given")))
        .map_err(|e| e.to_string())
}

fn load_sharded(shards: Option<usize>, placement: Option<&Path>) -> Model<Cpu> {
    let options = ModelOptions {
        expert_shards: Some(shards_for(shards, placement).unwrap()),
        ..ModelOptions::default()
    };
    Model::load(&fixture(), Cpu, options).unwrap()
}

#[test]
fn sharded_experts_give_the_unsharded_logits() {
    let want = logits(&load());
    let moe_layers = 1;
    let pairs = tokens().len() * 2 * moe_layers;
    for shards in [1, 2, 4, 8] {
        let model = load_sharded(Some(shards), None);
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
    let model = load_sharded(Some(2), None);
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
    let dir = tempfile::tempdir().unwrap();
    let file = support::write_redundant_plan(dir.path());
    let model = load_sharded(None, Some(&file));
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
    let e = shards_for(Some(3), None).unwrap_err();
    assert!(e.contains("3 shards cannot hold 8 experts"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.json");
    let e = shards_for(None, Some(&missing)).unwrap_err();
    assert!(e.contains("nope.json"), "{e}");

    let wrong = dir.path().join("wrong.json");
    let plan = PlacementPlan::balanced(16, 4, 1).unwrap();
    std::fs::write(&wrong, plan.to_canonical_json()).unwrap();
    let e = shards_for(None, Some(&wrong)).unwrap_err();
    assert!(e.contains("numExperts is 16"), "{e}");
    let e = shards_for(Some(2), Some(&wrong)).unwrap_err();
    assert!(e.contains("--expert-shards 2 disagrees"), "{e}");

    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "{\"version\": 1").unwrap();
    let e = shards_for(None, Some(&garbage)).unwrap_err();
    assert!(
        e.contains("garbage.json") && e.contains("invalid JSON"),
        "{e}"
    );

    // Shards made for another model are refused at load, not met with a panic.
    let options = ModelOptions {
        expert_shards: Some(Arc::new(ExpertShards::balanced(2, 16).unwrap())),
        ..ModelOptions::default()
    };
    let e = Model::load(&fixture(), Cpu, options)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("places 16 experts") && e.contains("has 8 routed experts"),
        "{e}"
    );
}

/// With several devices (`--device cuda:0,1`) each device runs one shard: no option means an
/// even split over them, and a shard count or plan for another number of devices is refused.
#[test]
fn several_devices_take_one_shard_each() {
    let config = ModelConfig::from_dir(&fixture()).unwrap();
    assert!(
        ExpertShards::from_options(&config, None, None, 1)
            .unwrap()
            .is_none()
    );
    let split = ExpertShards::from_options(&config, None, None, 4)
        .unwrap()
        .expect("several devices split the experts");
    assert_eq!(split.shards(), 4);
    for e in 0..8 {
        assert_eq!(split.holders(1, e), &[e / 2], "expert {e}");
    }

    let e = ExpertShards::from_options(&config, Some(4), None, 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("4 shards on 2 devices"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plan.json");
    let plan = PlacementPlan::balanced(8, 4, 1).unwrap();
    std::fs::write(&file, plan.to_canonical_json()).unwrap();
    let e = ExpertShards::from_options(&config, None, Some(&file), 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("4 shards on 2 devices"), "{e}");

    // A model without routed experts has nothing to split over several devices.
    let mut dense = config.clone();
    dense.moe_layers.iter_mut().for_each(|m| *m = false);
    let e = ExpertShards::from_options(&dense, None, None, 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no routed experts"), "{e}");
}
