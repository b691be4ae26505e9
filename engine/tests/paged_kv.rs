//! A paged cache (rows in a shared pool, read through a block table of scattered blocks) gives
//! the same logits as the contiguous cache, across prefill chunks and decode steps, with two
//! sequences interleaved in one pool; a pool kept in bf16 holds each row rounded to bf16, in
//! half the bytes, and moves the logits only as far as that rounding does.

mod support;

use std::path::Path;

use sparsemoe_engine::backend::Backend;
use sparsemoe_engine::backend::cpu::Cpu;
use sparsemoe_engine::config::ModelConfig;
use sparsemoe_engine::kv_cache::{KvDtype, SeqCache, bytes_per_token};
use sparsemoe_engine::model::{AttentionMode, LogitRows, Model, ModelOptions, SeqStep};
use support::{FIXTURE_MODELS, fixture, rel_l2, sorted_row_errors};

#[test]
fn paged_and_contiguous_caches_agree() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v32_sparse_moe");
    let model = Model::load(&dir, Cpu, ModelOptions::default()).unwrap();
    let block = 4;
    let pool = model.new_paged_pool(block, 16, KvDtype::Float32).unwrap();
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
        let kv = model.new_paged_pool(4, 32, KvDtype::Float32).unwrap();
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

/// A bf16 store holds each written row rounded to the nearest bf16, ties to even (the rounding
/// of the CUDA backend's `scatter_rows_f32_to_bf16_bits`), and reads it back as float32; a
/// float32 store holds rows exactly. Rows land in their slots only, and a model's cache takes
/// half the bytes per token.
#[test]
fn a_bf16_pool_holds_each_row_rounded_to_bf16() {
    let cols = 6;
    // Hand-worked roundings: bf16 keeps 8 significant bits, so at 1.0 its step is 2^-7.
    let cases: [(f32, f32); 6] = [
        (1.0 + 2f32.powi(-8), 1.0), // a tie: to the even neighbour
        (1.0 + 3.0 * 2f32.powi(-8), 1.0 + 2f32.powi(-6)), // a tie: to the even neighbour
        (1.0 + 2f32.powi(-8) + 2f32.powi(-20), 1.0 + 2f32.powi(-7)), // past the tie: up
        (-3.0, -3.0),               // exact
        (f32::MAX, f32::INFINITY),  // past the largest bf16
        (f32::from_bits(0x0001_16c2), f32::from_bits(0x0001_0000)), // a subnormal: down
    ];
    let x: Vec<f32> = (0..3 * cols)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.0137)
        .chain(cases.iter().map(|c| c.0))
        .collect();
    let rows = Cpu.tensor(4, cols, x.clone());
    let slots = [5, 0, 7, 2];
    for dtype in [KvDtype::Float32, KvDtype::Bfloat16] {
        let mut store = Cpu.kv_store(8, cols, dtype).unwrap();
        Cpu.write_rows(&mut store, &slots, &rows);
        let back = Cpu.to_host(&Cpu.gather_rows(&store, &slots));
        let untouched = Cpu.to_host(&Cpu.gather_rows(&store, &[1, 3, 4, 6]));
        assert!(
            untouched.iter().all(|&v| v == 0.0),
            "{dtype:?}: other slots written"
        );
        match dtype {
            KvDtype::Float32 => assert_eq!(back, x),
            KvDtype::Bfloat16 => {
                for (i, (&v, &b)) in x.iter().zip(&back).enumerate() {
                    assert_eq!(b.to_bits() & 0xffff, 0, "row value {i}: {b} is not a bf16");
                    if (f32::MIN_POSITIVE..f32::from_bits(0x7f7f_0000)).contains(&v.abs()) {
                        let step = 2f32.powi(v.abs().log2().floor() as i32 - 7);
                        assert!((b - v).abs() <= step / 2.0, "value {i}: {v} stored as {b}");
                    }
                }
                for (k, &(_, want)) in cases.iter().enumerate() {
                    assert_eq!(back[3 * cols + k], want, "case {k}");
                }
            }
            KvDtype::Fp8 | KvDtype::Fp8Ue8m0 => unreachable!("checked by the fp8 test below"),
        }
    }
    let config = ModelConfig::from_dir(&fixture("v32_sparse_moe")).unwrap();
    assert_eq!(
        bytes_per_token(&config, KvDtype::Float32),
        2 * bytes_per_token(&config, KvDtype::Bfloat16)
    );
}

/// An fp8 store keeps each block of 128 values of a row as e4m3 codes times one scale, the
/// block's largest magnitude over 448 (or, UE8M0, the power of two at or above that): every
/// value comes back within half an e4m3 step (1/16 relative for normal codes, or half the
/// smallest subnormal step times the scale), each block's largest magnitude exactly with float
/// scales (it is the code 448) and within its rounding with UE8M0 ones, an all-zero row as
/// zeros, and other slots untouched. The pool then takes about a quarter of the float32 bytes
/// (RoPE keys in bf16).
#[test]
fn an_fp8_pool_keeps_e4m3_codes_with_a_scale_per_128_values() {
    let cols = 300; // blocks of 128, 128 and 44
    let mut x: Vec<f32> = (0..3 * cols)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.0173 * (1.0 + (i % 128) as f32 / 16.0))
        .collect();
    x.extend(std::iter::repeat_n(0.0, cols)); // an all-zero row
    let rows = Cpu.tensor(4, cols, x.clone());
    let slots = [6, 1, 3, 0];
    for dtype in [KvDtype::Fp8, KvDtype::Fp8Ue8m0] {
        let mut store = Cpu.kv_store(8, cols, dtype).unwrap();
        Cpu.write_rows(&mut store, &slots, &rows);
        let back = Cpu.to_host(&Cpu.gather_rows(&store, &slots));
        let untouched = Cpu.to_host(&Cpu.gather_rows(&store, &[2, 4, 5, 7]));
        assert!(untouched.iter().all(|&v| v == 0.0), "other slots written");
        for r in 0..4 {
            for (b, block) in x[r * cols..(r + 1) * cols].chunks(128).enumerate() {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let mut scale = amax.max(1e-4) / 448.0;
                if dtype == KvDtype::Fp8Ue8m0 {
                    scale = 2f32.powf(scale.log2().ceil());
                }
                let got = &back[r * cols + b * 128..][..block.len()];
                for (i, (&v, &g)) in block.iter().zip(got).enumerate() {
                    let tolerance = (v.abs() / 16.0).max(scale * 2f32.powi(-10)) * 1.0001;
                    assert!(
                        (v - g).abs() <= tolerance,
                        "{dtype:?} row {r}, block {b}, value {i}: {v} came back as {g}"
                    );
                }
                let back_max = got.iter().fold(0f32, |m, v| m.max(v.abs()));
                let exact = if dtype == KvDtype::Fp8 {
                    1e-6
                } else {
                    1.0 / 16.0
                };
                assert!(
                    (back_max - amax).abs() <= amax * exact,
                    "{dtype:?} row {r} block {b}"
                );
            }
        }
        assert!(back[3 * cols..].iter().all(|&v| v == 0.0));
    }
    let config = ModelConfig::from_dir(&fixture("v32_sparse_moe")).unwrap();
    let (f32_bytes, fp8_bytes) = (
        bytes_per_token(&config, KvDtype::Float32),
        bytes_per_token(&config, KvDtype::Fp8),
    );
    // Per layer: the latent and the indexer key (each under 128 values) as a byte a value plus
    // one float32 scale, the RoPE key as bf16; against 4 bytes a value.
    let (latent, rope) = (config.kv_lora_rank, config.qk_rope_head_dim);
    let index = config.indexer.as_ref().unwrap().head_dim;
    assert!(latent <= 128 && index <= 128);
    let per_layer_fp8 = (latent + 4) + 2 * rope + (index + 4);
    assert_eq!(
        fp8_bytes * 4 * (latent + rope + index),
        f32_bytes * per_layer_fp8
    );
}

/// The logits of every position of `tokens` run through a fresh paged pool of `dtype`, in
/// prefill chunks of `chunk` tokens.
fn paged_logits(model: &Model<Cpu>, tokens: &[u32], dtype: KvDtype, chunk: usize) -> Vec<f32> {
    let pool = model.new_paged_pool(4, 16, dtype).unwrap();
    let mut cache = SeqCache::paged(pool);
    cache.set_blocks(&[9, 2, 14, 5, 0, 11, 3, 8, 1, 13, 6, 15]);
    let mut logits = Vec::new();
    for part in tokens.chunks(chunk) {
        let mut step = [SeqStep {
            tokens: part,
            cache: &mut cache,
            logits: LogitRows::All,
        }];
        logits.extend(model.forward(&mut step, None).unwrap().remove(0));
    }
    logits
}

/// bf16 and fp8 pools against a float32 one on every fixture model, in dense and in sparse
/// attention: the rounding must show (the rows are really stored narrower) and stay within
/// twice what `tests/fixtures/bf16_error_model.py` measures by rounding the same cached rows
/// (latent, RoPE key, indexer key) in the float64 reference on these tokens. Median row error
/// there: bf16 1.1e-3 to 1.9e-3; fp8 (e4m3 with a scale per 128 values, RoPE keys bf16) 1.5e-2
/// to 2.5e-2 in dense attention and up to 1.1e-1 in sparse attention, where the coarser keys
/// flip more of the indexer's choices on these small random models; fp8 with UE8M0 scales
/// (each up to twice as coarse) 1.5e-2 to 3.7e-2 dense and up to 4.8e-2 sparse. The floors are
/// far above float32's own noise (1e-6).
#[test]
fn narrow_kv_caches_stay_within_their_rounding_of_float32() {
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 % 250 + 2) as u32).collect();
    let bounds = |dtype: KvDtype, attention: AttentionMode| match (dtype, attention) {
        (KvDtype::Bfloat16, _) => (1e-5, 4e-3),
        (KvDtype::Fp8, AttentionMode::Dense) => (1e-3, 5e-2),
        (KvDtype::Fp8Ue8m0, AttentionMode::Dense) => (1e-3, 8e-2),
        (KvDtype::Fp8 | KvDtype::Fp8Ue8m0, _) => (1e-3, 2.5e-1),
        (KvDtype::Float32, _) => unreachable!(),
    };
    for (name, dtype) in FIXTURE_MODELS
        .iter()
        .flat_map(|n| [KvDtype::Bfloat16, KvDtype::Fp8, KvDtype::Fp8Ue8m0].map(|d| (n, d)))
    {
        for attention in [AttentionMode::Dense, AttentionMode::Sparse] {
            let options = ModelOptions {
                attention,
                index_topk: Some(8),
                ..ModelOptions::default()
            };
            let model = Model::load(&fixture(name), Cpu, options).unwrap();
            let vocab = model.config.vocab_size;
            let want = paged_logits(&model, &tokens, KvDtype::Float32, 40);
            let got = paged_logits(&model, &tokens, dtype, 40);
            let rows = sorted_row_errors(&want, &got, vocab);
            let median = rows[rows.len() / 2];
            let (floor, bound) = bounds(dtype, attention);
            eprintln!("{name} {attention:?} {dtype:?}: median row error {median:.2e}");
            assert!(
                median > floor && median < bound,
                "{name} {attention:?} {dtype:?}: median row error {median:.2e}"
            );
        }
    }
}

/// Every row attention reads comes out of a bf16 or fp8 pool, the step's own rows included, so
/// the logits do not depend on how a prompt is split into prefill chunks.
#[test]
fn narrow_kv_caches_do_not_depend_on_chunking() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v32_sparse_moe");
    let options = ModelOptions {
        index_topk: Some(8),
        ..ModelOptions::default()
    };
    let model = Model::load(&dir, Cpu, options).unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 % 250 + 2) as u32).collect();
    for dtype in [KvDtype::Bfloat16, KvDtype::Fp8, KvDtype::Fp8Ue8m0] {
        let whole = paged_logits(&model, &tokens, dtype, 40);
        for chunk in [1, 7, 16] {
            let chunked = paged_logits(&model, &tokens, dtype, chunk);
            let err = rel_l2(&whole, &chunked);
            assert!(
                err < 1e-5,
                "{dtype:?}, chunks of {chunk}: relative L2 {err:.2e}"
            );
        }
    }
}
