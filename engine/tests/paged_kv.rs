//! A paged cache (rows in a shared pool, read through a block table of scattered blocks) gives
//! the same logits as the contiguous cache, across prefill chunks and decode steps, with two
//! sequences interleaved in one pool.

use std::path::Path;

use sparsemoe_engine::backend::cpu::Cpu;
use sparsemoe_engine::kv_cache::SeqCache;
use sparsemoe_engine::model::{LogitRows, Model, ModelOptions, SeqStep};

#[test]
fn paged_and_contiguous_caches_agree() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v32_sparse_moe");
    let model = Model::load(&dir, Cpu, ModelOptions::default()).unwrap();
    let block = 4;
    let pool = model.new_paged_pool(block, 16);
    let tokens: Vec<u32> = (0..23).map(|i| (i * 37 % 250 + 2) as u32).collect();
    let other: Vec<u32> = (0..19).map(|i| (i * 11 % 250 + 2) as u32).collect();

    let mut contiguous = model.new_cache();
    let mut paged = SeqCache::paged(pool.clone());
    let mut neighbour = SeqCache::paged(pool);
    // Scattered, interleaved blocks: the sequences share the pool.
    paged.set_blocks(&[9, 2, 14, 5, 0, 11]);
    neighbour.set_blocks(&[3, 8, 1, 13, 6]);

    // Prefill in chunks of 7, then single-token decode steps, both caches side by side.
    let mut at = 0;
    while at < tokens.len() {
        let n = if at < 14 { 7 } else { 1 };
        let chunk = &tokens[at..at + n];
        let want = {
            let mut step = [SeqStep {
                tokens: chunk,
                cache: &mut contiguous,
                logits: LogitRows::All,
            }];
            model.forward(&mut step, None).unwrap().remove(0)
        };
        let other_chunk = &other[at.min(other.len() - 1)..(at + 1).min(other.len())];
        let mut steps = [
            SeqStep {
                tokens: chunk,
                cache: &mut paged,
                logits: LogitRows::All,
            },
            SeqStep {
                tokens: other_chunk,
                cache: &mut neighbour,
                logits: LogitRows::Last,
            },
        ];
        let got = model.forward(&mut steps, None).unwrap().remove(0);
        let err = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 1e-4, "at token {at}: max |diff| {err}");
        at += n;
    }

    // Past its blocks a paged cache is an error, not a panic.
    let mut step = [SeqStep {
        tokens: &[5, 6],
        cache: &mut paged,
        logits: LogitRows::Last,
    }];
    assert!(model.forward(&mut step, None).is_err());
}
