//! `sparsemoe-engine bench`: throughput of prefill and decode, and the cost of one decode step at
//! long context with sparse vs dense attention. Prints JSON; `bench/` scripts compare it with
//! peers and write `bench/results/`.

use std::time::Instant;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::backend::Backend;
use crate::error::Result;
use crate::kv_cache::SeqCache;
use crate::model::{LogitRows, Model, SeqStep};

/// Prefill and decode throughput at one batch size.
#[derive(Debug, Serialize)]
pub struct Throughput {
    pub batch: usize,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// `batch` sequences of `prompt` random tokens: one prefill step, then `decode` decode steps.
pub fn throughput<B: Backend>(
    model: &Model<B>,
    batch: usize,
    prompt: usize,
    decode: usize,
    seed: u64,
) -> Result<Throughput> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let vocab = model.config.vocab_size as u32;
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|_| (0..prompt).map(|_| rng.random_range(0..vocab)).collect())
        .collect();
    let mut caches: Vec<SeqCache<B>> = (0..batch).map(|_| model.new_cache()).collect();

    let start = Instant::now();
    let mut steps: Vec<SeqStep<'_, B>> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, cache)| SeqStep {
            tokens: p,
            cache,
            logits: LogitRows::Last,
        })
        .collect();
    let mut logits = model.forward(&mut steps, None)?;
    let prefill = start.elapsed().as_secs_f64();

    let start = Instant::now();
    for _ in 0..decode {
        let next: Vec<[u32; 1]> = logits
            .iter()
            .map(|l| [crate::sampling::argmax(l)])
            .collect();
        let mut steps: Vec<SeqStep<'_, B>> = next
            .iter()
            .zip(caches.iter_mut())
            .map(|(t, cache)| SeqStep {
                tokens: t,
                cache,
                logits: LogitRows::Last,
            })
            .collect();
        logits = model.forward(&mut steps, None)?;
    }
    let decode_time = start.elapsed().as_secs_f64();
    Ok(Throughput {
        batch,
        prompt_tokens: prompt,
        decode_tokens: decode,
        prefill_tokens_per_s: (batch * prompt) as f64 / prefill,
        decode_tokens_per_s: (batch * decode) as f64 / decode_time,
    })
}

/// One decode step over a long cache.
#[derive(Debug, Serialize)]
pub struct DecodeStep {
    pub context: usize,
    pub median_step_ms: f64,
    pub kv_cache_bytes: usize,
}

/// A cache of `context` tokens filled with random rows (the cost of a decode step does not
/// depend on the values; prefilling 64K tokens on a CPU would take hours).
pub fn synthetic_cache<B: Backend>(model: &Model<B>, context: usize, seed: u64) -> SeqCache<B> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let b = model.backend();
    let mut cache = model.new_cache();
    let mut random = |rows: usize, cols: usize| {
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect();
        b.tensor(rows, cols, data)
    };
    for l in 0..model.config.num_layers {
        let layer = cache.layer_mut(l);
        let (_, latent_cols) = b.shape(&layer.latent);
        let (_, rope_cols) = b.shape(&layer.k_pe);
        b.append_rows(&mut layer.latent, &random(context, latent_cols));
        b.append_rows(&mut layer.k_pe, &random(context, rope_cols));
        if let Some(keys) = layer.index_keys.as_mut() {
            let (_, key_cols) = b.shape(keys);
            b.append_rows(keys, &random(context, key_cols));
        }
    }
    cache.advance(context);
    cache
}

/// Median time of `steps` single-token decode steps after a synthetic cache of `context` tokens.
pub fn decode_step<B: Backend>(
    model: &Model<B>,
    context: usize,
    steps: usize,
) -> Result<DecodeStep> {
    let mut cache = synthetic_cache(model, context, 7);
    let c = &model.config;
    let per_token =
        c.kv_lora_rank + c.qk_rope_head_dim + c.indexer.as_ref().map_or(0, |ix| ix.head_dim);
    let kv_cache_bytes = context * per_token * c.num_layers * std::mem::size_of::<f32>();
    let mut times = Vec::with_capacity(steps);
    let mut token = [1u32];
    for _ in 0..steps {
        let start = Instant::now();
        let mut step = [SeqStep {
            tokens: &token,
            cache: &mut cache,
            logits: LogitRows::Last,
        }];
        let logits = model.forward(&mut step, None)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        token = [crate::sampling::argmax(&logits[0])];
    }
    times.sort_by(f64::total_cmp);
    Ok(DecodeStep {
        context,
        median_step_ms: times[times.len() / 2],
        kv_cache_bytes,
    })
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
