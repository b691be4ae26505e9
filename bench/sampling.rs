//! Sampling one token from a DeepSeek-sized logit row (an example of the engine crate): the way
//! the sampler did it before, sorting every finite logit, against `Sampler::sample` now, which
//! sorts at most top-k's survivors or top-p's nucleus, in one run:
//!
//! ```sh
//! cargo run --release -p sparsemoe-engine --example sampling -- --out bench/results/sampling.md
//! ```
//!
//! The row has `--vocab` logits (DeepSeek-V3's 129,280): uniform in [-4, 4], with 16 tokens
//! raised by 8 to 12, so a few tokens hold most of the probability, as a language model's do.
//! Host time only: the engine samples on the CPU, a sequence at a time, every decode step.

use clap::Parser;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparsemoe_engine::sampling::{GREEDY_BELOW, Sampler, SamplingParams};

#[path = "support.rs"]
mod support;
use support::{machine, race};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 129_280)]
    vocab: usize,
    /// Tokens sampled per timed run.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    #[arg(long, default_value_t = 15)]
    reps: usize,
    /// Markdown table to write (printed either way).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

/// The sampler's pick before: every finite logit sorted, then the filters, then the draw.
fn sorted_pick(p: &SamplingParams, logits: &[f32], rng: &mut ChaCha8Rng) -> u32 {
    let finite = || logits.iter().enumerate().filter(|(_, l)| l.is_finite());
    let top = finite().map(|(_, &l)| l).fold(f32::NEG_INFINITY, f32::max);
    let mut candidates: Vec<(u32, f32)> = finite()
        .map(|(i, &l)| (i as u32, (l - top) / p.temperature))
        .collect();
    candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if p.top_k > 0 {
        candidates.truncate(p.top_k);
    }
    let mut probs: Vec<f32> = candidates.iter().map(|&(_, l)| l.exp()).collect();
    if p.min_p > 0.0 {
        let keep = probs.iter().position(|&q| q < p.min_p);
        probs.truncate(keep.unwrap_or(probs.len()).max(1));
    }
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    if p.top_p < 1.0 {
        let mut cumulative = 0.0;
        let keep = probs.iter().position(|&q| {
            cumulative += q;
            cumulative >= p.top_p
        });
        probs.truncate(keep.map_or(probs.len(), |i| i + 1));
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
    }
    let draw: f32 = rng.random();
    let mut cumulative = 0.0;
    for (i, &q) in probs.iter().enumerate() {
        cumulative += q;
        if draw < cumulative {
            return candidates[i].0;
        }
    }
    candidates[probs.len() - 1].0
}

/// The sampler's pick with no filter before its exponentials were vectorised: a list of every
/// finite token with its weight (the standard library's `exp` a value), then the draw over it,
/// summed in f64.
fn listed_pick(p: &SamplingParams, logits: &[f32], rng: &mut ChaCha8Rng) -> u32 {
    let finite = || logits.iter().enumerate().filter(|(_, l)| l.is_finite());
    let top = finite().map(|(_, &l)| l).fold(f32::NEG_INFINITY, f32::max);
    let kept: Vec<(u32, f32)> = finite()
        .map(|(i, &l)| (i as u32, ((l - top) / p.temperature).exp()))
        .collect();
    let total: f64 = kept.iter().map(|&(_, w)| f64::from(w)).sum();
    let target = rng.random::<f64>() * total;
    let mut cumulative = 0.0;
    for &(token, w) in &kept {
        cumulative += f64::from(w);
        if target < cumulative {
            return token;
        }
    }
    kept.last().map_or(0, |&(token, _)| token)
}

/// Greedy before: the largest logit by a scan a value at a time.
fn scanned_argmax(logits: &[f32]) -> u32 {
    let mut best: Option<usize> = None;
    for (i, &l) in logits.iter().enumerate() {
        if !l.is_nan() && best.is_none_or(|b| l > logits[b]) {
            best = Some(i);
        }
    }
    best.unwrap_or(0) as u32
}

/// Milliseconds a token, `before` (drawing from its own seeded stream) against
/// `Sampler::sample` under `params`, alternating, medians of `--reps` runs of `--tokens`.
fn against(
    args: &Args,
    params: &SamplingParams,
    logits: &[f32],
    mut before: impl FnMut(&mut ChaCha8Rng) -> u32,
) -> (f64, f64) {
    let mut before_rng = ChaCha8Rng::seed_from_u64(5);
    let mut sampler = Sampler::new(SamplingParams {
        seed: Some(5),
        ..params.clone()
    });
    let (then, now) = race(
        args.reps,
        || {
            (0..args.tokens)
                .map(|_| u64::from(before(&mut before_rng)))
                .sum()
        },
        || {
            (0..args.tokens)
                .map(|_| u64::from(sampler.sample(logits, &[])))
                .sum()
        },
    );
    (then / args.tokens as f64, now / args.tokens as f64)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.vocab > 16 && args.tokens > 0 && args.reps > 0,
        "--vocab must be above 16, and --tokens and --reps above 0"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut logits: Vec<f32> = (0..args.vocab)
        .map(|_| rng.random_range(-4.0..4.0))
        .collect();
    for _ in 0..16 {
        let i = rng.random_range(0..args.vocab);
        logits[i] += rng.random_range(8.0..12.0);
    }
    let cases = [
        ("defaults (temperature 1)", SamplingParams::default()),
        (
            "top_p 0.95",
            SamplingParams {
                top_p: 0.95,
                ..Default::default()
            },
        ),
        (
            "temperature 0.7, top_p 0.9",
            SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                ..Default::default()
            },
        ),
        (
            "top_k 50",
            SamplingParams {
                top_k: 50,
                ..Default::default()
            },
        ),
        (
            "min_p 0.05",
            SamplingParams {
                min_p: 0.05,
                ..Default::default()
            },
        ),
    ];
    let (cpu, cpus) = machine();
    let mut table = format!(
        "# Sampling a token from a {}-logit row\n\n\
         `cargo run --release -p sparsemoe-engine --example sampling` (`bench/sampling.rs`) on \
         {cpu}, {cpus} CPUs: {} tokens a run, median of {} runs each, alternating. Host time \
         only.\n\n\
         | parameters | sorting every logit (ms a token) | now (ms a token) | ratio | \
         a step of 64 sequences, before → now (ms) |\n|---|---|---|---|---|\n",
        args.vocab, args.tokens, args.reps
    );
    for (name, params) in cases {
        let (before, now) = against(&args, &params, &logits, |rng| {
            sorted_pick(&params, &logits, rng)
        });
        table.push_str(&format!(
            "| {name} | {before:.3} | {now:.3} | {:.1}x | {:.0} → {:.1} |\n",
            before / now,
            before * 64.0,
            now * 64.0
        ));
    }
    // No filter (temperature only), against the one pass before its exponentials and maximum
    // were vectorised and its draw made over the weights in place; greedy against the scan.
    table.push_str(
        "\n| temperature only | before: one pass, a list of weights, `exp` a value; greedy: a \
         scan (ms a token) | now: vectorised, drawn in place (ms a token) | ratio |\n\
         |---|---|---|---|\n",
    );
    for temperature in [1.0f32, 0.7, 0.0] {
        let params = SamplingParams {
            temperature,
            ..Default::default()
        };
        let (before, now) = against(&args, &params, &logits, |rng| {
            if temperature < GREEDY_BELOW {
                scanned_argmax(&logits)
            } else {
                listed_pick(&params, &logits, rng)
            }
        });
        table.push_str(&format!(
            "| {temperature} | {before:.3} | {now:.3} | {:.1}x |\n",
            before / now
        ));
    }
    print!("{table}");
    if let Some(path) = args.out {
        std::fs::write(&path, table)?;
    }
    Ok(())
}
