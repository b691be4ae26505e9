//! A paged cache (rows in a shared pool, read through a block table of scattered blocks) gives
//! the same logits as the contiguous cache, across prefill chunks and decode steps, with two
//! sequences interleaved in one pool.

use std::path::Path;

use sparsemoe_engine::backend::Backend;
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

/// A batch big enough to be split into groups run side by side on the CPU pool (see
/// `Backend::batch_groups`), its sequences in one paged pool, gives every sequence the logits it
/// gets alone in a contiguous cache, prefill and decode (where the fixture's top-8 selection
/// picks a few of 13 to 23 cached tokens, so the paged rows are gathered and renumbered); also
/// when a tiny `attended_bytes` makes each sequence's attention a call of its own.
#[test]
fn a_batch_split_into_groups_matches_one_pass_per_sequence() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v32_sparse_moe");
    let model = Model::load(&dir, Cpu, ModelOptions::default()).unwrap();
    let prompts: Vec<Vec<u32>> = [20usize, 15, 12, 9]
        .iter()
        .enumerate()
        .map(|(s, &len)| {
            (0..len)
                .map(|i| ((i * 13 + s * 7) % 250 + 2) as u32)
                .collect()
        })
        .collect();
    // Alone: each sequence on its own, prefill then three decode steps of fixed tokens.
    let decode = [5u32, 77, 140];
    let alone: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .map(|p| {
            let mut cache = model.new_cache();
            let mut rows = Vec::new();
            for tokens in std::iter::once(&p[..]).chain(decode.iter().map(std::slice::from_ref)) {
                let mut step = [SeqStep {
                    tokens,
                    cache: &mut cache,
                    logits: LogitRows::Last,
                }];
                rows.push(model.forward(&mut step, None).unwrap().remove(0));
            }
            rows
        })
        .collect();
    // Together, on a 2-thread pool: the 56-token prefill batch is split into 2 groups (the
    // 4-token decode batches are not; they check the caches the groups filled).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    // The same model attending each sequence on its own call (a budget of one byte of
    // gathered rows per call) and all of a group's at once (the default).
    let one_at_a_time = ModelOptions {
        attended_bytes: 1,
        ..ModelOptions::default()
    };
    for model in [model, Model::load(&dir, Cpu, one_at_a_time).unwrap()] {
        let kv = model.new_paged_pool(4, 32);
        let together: Vec<Vec<Vec<f32>>> = pool.install(|| {
            // Interleaved blocks: sequence s holds blocks s, s + 4, s + 8, ...
            let mut caches: Vec<_> = (0..prompts.len())
                .map(|s| {
                    let mut cache = SeqCache::paged(kv.clone());
                    let blocks: Vec<u32> = (0..6).map(|b| (s + 4 * b) as u32).collect();
                    cache.set_blocks(&blocks);
                    cache
                })
                .collect();
            let mut out = vec![Vec::new(); prompts.len()];
            for round in 0..=decode.len() {
                let inputs: Vec<&[u32]> = prompts
                    .iter()
                    .map(|p| match round {
                        0 => &p[..],
                        r => std::slice::from_ref(&decode[r - 1]),
                    })
                    .collect();
                let mut steps: Vec<SeqStep<'_, Cpu>> = caches
                    .iter_mut()
                    .zip(&inputs)
                    .map(|(cache, tokens)| SeqStep {
                        tokens,
                        cache,
                        logits: LogitRows::Last,
                    })
                    .collect();
                let logits = model.forward(&mut steps, None).unwrap();
                assert_eq!(logits.len(), prompts.len());
                for (o, l) in out.iter_mut().zip(logits) {
                    o.push(l);
                }
            }
            out
        });
        for (s, (a, t)) in alone.iter().zip(&together).enumerate() {
            for (step, (a, t)) in a.iter().zip(t).enumerate() {
                let err = a
                    .iter()
                    .zip(t)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0f32, f32::max);
                assert!(
                    err < 1e-4,
                    "sequence {s}, step {step} (attended bytes {}): max |diff| {err}",
                    model.options.attended_bytes
                );
            }
        }
    }
    // The premise: on that pool the prefill batch is split, the decode batches are not.
    assert_eq!(pool.install(|| Cpu.batch_groups(&[20, 15, 12, 9])), 2);
    assert_eq!(pool.install(|| Cpu.batch_groups(&[1, 1, 1, 1])), 1);
}
