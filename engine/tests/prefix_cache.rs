//! Prefix caching through the scheduler, on the demo model: requests whose prompts start with
//! the same whole KV blocks share them, and every request's greedy output (and its logprobs)
//! is what it is without prefix caching, also when cached blocks are evicted for space and
//! when identical prompts run side by side. And chunked prefill in a cache too small for a
//! whole chunk: it shrinks rather than preempts, and changes no output.

use std::path::PathBuf;
use std::sync::Arc;

use sparsemoe_engine::backend::cpu::Cpu;
use sparsemoe_engine::kv_cache::BlockAllocator;
use sparsemoe_engine::metrics::Metrics;
use sparsemoe_engine::model::{Model, ModelOptions};
use sparsemoe_engine::sampling::SamplingParams;
use sparsemoe_engine::scheduler::{self, EngineHandle, Event, GenerationRequest, SchedulerConfig};

const BLOCK: usize = 16;

fn demo_model() -> Model<Cpu> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo-model");
    Model::load(&dir, Cpu, ModelOptions::default()).expect("loading the demo model")
}

fn engine(prefix_caching: bool, blocks: usize) -> (EngineHandle, Arc<Metrics>) {
    let config = SchedulerConfig {
        max_context: 256,
        prefix_caching,
        ..SchedulerConfig::default()
    };
    engine_with(config, blocks)
}

fn engine_with(config: SchedulerConfig, blocks: usize) -> (EngineHandle, Arc<Metrics>) {
    let allocator = BlockAllocator::new(BLOCK, blocks);
    let metrics = Arc::new(Metrics::new());
    let handle = scheduler::spawn(demo_model(), allocator, config, metrics.clone())
        .expect("starting the engine");
    (handle, metrics)
}

/// Greedy output of one request: tokens and their logprobs.
type Output = Vec<(u32, f32)>;

fn submit(engine: &EngineHandle, prompt: &[u32]) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
    submit_for(engine, prompt, 12)
}

fn submit_for(
    engine: &EngineHandle,
    prompt: &[u32],
    max_tokens: usize,
) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
    engine
        .submit(GenerationRequest {
            prompt: prompt.to_vec(),
            max_tokens,
            params: SamplingParams::greedy(),
            stop_tokens: Vec::new(),
            min_tokens: 0,
            logprobs: Some(0),
        })
        .expect("submitting")
}

fn collect(mut events: tokio::sync::mpsc::UnboundedReceiver<Event>) -> Output {
    let mut out = Vec::new();
    while let Some(event) = events.blocking_recv() {
        match event {
            Event::Token { id, logprob } => out.push((id, logprob.expect("logprob").logprob)),
            Event::Finished { .. } => return out,
            Event::Error(e) => panic!("request failed: {e}"),
        }
    }
    panic!("the engine stopped before the request finished")
}

/// Each wave's prompts are submitted together and run side by side; waves run one after another.
fn run(engine: &EngineHandle, waves: &[Vec<Vec<u32>>]) -> Vec<Output> {
    let mut outputs = Vec::new();
    for wave in waves {
        let receivers: Vec<_> = wave.iter().map(|p| submit(engine, p)).collect();
        outputs.extend(receivers.into_iter().map(collect));
    }
    outputs
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    // Ids away from the demo model's special tokens (0 and 1).
    (0..len as u32)
        .map(|i| 2 + (seed.wrapping_mul(2_654_435_761).wrapping_add(i * 7919)) % 2000)
        .collect()
}

fn assert_same(with: &[Output], without: &[Output]) {
    assert_eq!(with.len(), without.len());
    for (r, (a, b)) in with.iter().zip(without).enumerate() {
        let tokens = |o: &Output| o.iter().map(|&(t, _)| t).collect::<Vec<_>>();
        assert_eq!(tokens(a), tokens(b), "request {r}: tokens differ");
        for ((_, x), (_, y)) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-3, "request {r}: logprob {x} vs {y}");
        }
    }
}

#[test]
fn shared_prompt_prefixes_are_computed_once_and_change_no_output() {
    let a = prompt(1, 40);
    let mut b = a[..2 * BLOCK].to_vec(); // A's first two blocks, then its own tokens
    b.extend(prompt(2, 9));
    let c = prompt(3, 20);
    let waves = vec![
        vec![a.clone()],
        vec![b.clone()],
        vec![a.clone()],
        // Side by side: identical prompts submitted together. Those the engine takes into one
        // step compute their blocks separately; one it takes after the first's prefill (the
        // requests arrive one by one at a running engine) finds C's block cached.
        vec![c.clone(), c.clone(), c.clone()],
        vec![c.clone()],
    ];
    let (plain, plain_metrics) = engine(false, 64);
    let without = run(&plain, &waves);
    assert_eq!(plain_metrics.prefix_cache_queries.get(), 0);

    let (cached, metrics) = engine(true, 64);
    let with = run(&cached, &waves);
    assert_same(&with, &without);
    // Looked up: every prompt but its last token.
    let queried: usize = waves.iter().flatten().map(|p| p.len() - 1).sum();
    assert_eq!(metrics.prefix_cache_queries.get(), queried as u64);
    // Hits: B and the second A share A's two full prompt blocks; the last C shares the one
    // full block of C's 19 looked-up tokens; of the side-by-side Cs, the second and third do
    // too when they reached the engine after the first's prefill (a race with its loop).
    let hits = metrics.prefix_cache_hits.get();
    let least = (2 * BLOCK + 2 * BLOCK + BLOCK) as u64;
    assert!(
        (least..=least + 2 * BLOCK as u64).contains(&hits) && hits.is_multiple_of(BLOCK as u64),
        "{hits} prefix-cache hits: {least} plus a block for each side-by-side C that came late"
    );
    // Idle: no block is held (cached ones are free for reuse).
    assert_idle(&cached);
}

#[test]
fn evicted_prefix_blocks_are_recomputed_and_change_no_output() {
    // 8 blocks of 16: each request (40 + 12 tokens) needs 4, so the cache keeps at most a
    // request's worth of released blocks and every new prompt evicts older ones.
    let prompts: Vec<Vec<u32>> = (10..16).map(|s| prompt(s, 40)).collect();
    let mut waves: Vec<Vec<Vec<u32>>> = prompts.iter().map(|p| vec![p.clone()]).collect();
    waves.push(vec![prompts[0].clone()]); // long evicted
    waves.push(vec![prompts[5].clone()]); // the last one: still cached
    let (plain, _) = engine(false, 8);
    let without = run(&plain, &waves);
    let (cached, metrics) = engine(true, 8);
    let with = run(&cached, &waves);
    assert_same(&with, &without);
    assert_eq!(
        metrics.prefix_cache_hits.get(),
        (2 * BLOCK) as u64,
        "only the last prompt's blocks survive"
    );
    assert_idle(&cached);
}

/// Two requests of 60 tokens in 32-token chunks in 7 blocks of 16: the second's last chunk
/// (which would take its fourth block) finds one block short while the first still decodes in
/// its four. It computes what its blocks hold instead of preempting itself, which without
/// prefix caching would throw its computed rows away; and the outputs are those of a roomy
/// cache.
#[test]
fn a_prefill_chunk_shrinks_to_the_free_blocks_rather_than_preempting() {
    let config = SchedulerConfig {
        max_context: 256,
        max_batch_tokens: 32,
        prefix_caching: false,
        ..SchedulerConfig::default()
    };
    let p = prompt(5, 60);
    let both = |engine: &EngineHandle| -> Vec<Output> {
        let receivers: Vec<_> = (0..2).map(|_| submit_for(engine, &p, 3)).collect();
        receivers.into_iter().map(collect).collect()
    };
    let (tight, metrics) = engine_with(config.clone(), 7);
    let outputs = both(&tight);
    assert_eq!(
        metrics.preemptions.get(),
        0,
        "a chunk preempted for its whole size"
    );
    assert_idle(&tight);
    let (roomy, _) = engine_with(config, 64);
    assert_same(&outputs, &both(&roomy));
}

/// Without prefix caching, the newest sequence that finds no free block waits for the older
/// ones, keeping its own: a 100-token prompt beside a 20-token one that holds its 2 blocks of 16
/// to the end fills the other 6 (96 tokens) and needs a seventh. Giving its blocks back would
/// only see it admitted again at once, to recompute and meet the same wall until the older
/// request ends. Both outputs are those of a roomy cache, with no preemption.
#[test]
fn the_newest_sequence_waits_for_blocks_rather_than_recomputing() {
    let config = SchedulerConfig {
        max_context: 128,
        max_batch_tokens: 32,
        prefix_caching: false,
        ..SchedulerConfig::default()
    };
    // The first's prompt and 12 of its 13 tokens fill its 2 blocks exactly (its last token is
    // sampled, never cached), so it never needs a third; it runs 12 decode steps, the second
    // meets the wall after 4 (31 + 31 + 31 + 3 prompt tokens).
    let (short, long) = (prompt(21, 20), prompt(22, 100));
    let both = |engine: &EngineHandle| -> Vec<Output> {
        let receivers = [submit_for(engine, &short, 13), submit_for(engine, &long, 3)];
        receivers.map(collect).into()
    };
    let (tight, metrics) = engine_with(config.clone(), 8);
    let outputs = both(&tight);
    assert_eq!(
        metrics.preemptions.get(),
        0,
        "the second sequence gave its blocks back"
    );
    assert_idle(&tight);
    let (roomy, _) = engine_with(config, 64);
    assert_same(&outputs, &both(&roomy));
}

/// Every request done and no KV block held. The engine publishes its counts after each
/// step: this waits (up to 2 s) for the one after the last.
fn assert_idle(engine: &EngineHandle) {
    use std::sync::atomic::Ordering::SeqCst;
    let idle =
        || engine.stats.active.load(SeqCst) == 0 && engine.stats.used_blocks.load(SeqCst) == 0;
    for _ in 0..200 {
        if idle() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!(
        "not idle: {} requests active, {} blocks held",
        engine.stats.active.load(SeqCst),
        engine.stats.used_blocks.load(SeqCst)
    );
}
