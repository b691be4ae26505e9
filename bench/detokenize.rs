//! The server's text of a streamed output, token by token (an example of the engine crate):
//! decoding the whole output again for every token, as the server did, against
//! `Tokenizer::decode_next`, which decodes the last few tokens, in one run:
//!
//! ```sh
//! cargo run --release -p sparsemoe-engine --example detokenize -- --out bench/results/detokenize.md
//! ```
//!
//! The tokenizer is the demo model's (byte-level BPE, as DeepSeek's is); the output is the demo
//! model's README and a multilingual paragraph, repeated to each length. Both variants give the
//! same text (checked before timing). Host time only.

use clap::Parser;
use sparsemoe_engine::demo::DEMO;
use sparsemoe_engine::tokenizer::{DecodeState, Tokenizer};

#[path = "support.rs"]
mod support;
use support::{machine, race};

#[derive(Parser)]
struct Args {
    /// Output lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "256,2048,8192")]
    tokens: Vec<usize>,
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Markdown table to write (printed either way).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

const MULTILINGUAL: &str = "Grüße aus Köln — naïve café. 日本語のテキストを生成します。\
    Привет, мир! 🎉🦀 ¿Qué tal? Ελληνικά κείμενα. ";

/// Decodes all ids so far for every token, as the server did before `decode_next`; returns the
/// text's length.
fn whole_every_token(t: &Tokenizer, ids: &[u32]) -> u64 {
    let mut text = String::new();
    for n in 1..=ids.len() {
        let now = t.decode(&ids[..n]).unwrap();
        if !now.ends_with('\u{FFFD}') {
            text = now;
        }
    }
    text.len() as u64
}

fn incremental(t: &Tokenizer, ids: &[u32]) -> u64 {
    let mut state = DecodeState::default();
    let mut text = String::new();
    for &id in ids {
        text.push_str(&t.decode_next(&mut state, id));
    }
    text.push_str(&t.decode_rest(&mut state));
    text.len() as u64
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.reps > 0 && args.tokens.iter().all(|&n| n > 0),
        "--reps and every --tokens must be above 0"
    );
    let demo = DEMO.ok_or_else(|| anyhow::anyhow!("built without engine/demo-model"))?;
    let t = Tokenizer::from_bytes(demo.tokenizer, Some(demo.tokenizer_config))?;
    let readme = include_str!("../engine/demo-model/README.md");
    let unit = t.encode(&format!("{readme}\n{MULTILINGUAL}"))?;
    let longest = args.tokens.iter().copied().max().unwrap_or(0);
    let ids: Vec<u32> = unit.iter().copied().cycle().take(longest).collect();

    let (cpu, cpus) = machine();
    let mut table = format!(
        "# Text of a streamed output, token by token\n\n\
         `cargo run --release -p sparsemoe-engine --example detokenize` (`bench/detokenize.rs`) \
         on {cpu}, {cpus} CPUs: the demo model's byte-level BPE tokenizer, an output of its \
         README and a multilingual paragraph; median of {} runs each, alternating. Host time \
         only.\n\n\
         | output tokens | whole output every token (ms) | last few tokens (ms) | ratio | \
         µs a token, whole | µs a token, last few |\n|---|---|---|---|---|---|\n",
        args.reps
    );
    for &n in &args.tokens {
        let ids = &ids[..n];
        let whole = t.decode(ids)?;
        anyhow::ensure!(
            incremental(&t, ids) == whole.len() as u64 && whole_every_token(&t, ids) > 0,
            "the two ways disagree at {n} tokens"
        );
        let (before, now) = race(
            args.reps,
            || whole_every_token(&t, ids),
            || incremental(&t, ids),
        );
        table.push_str(&format!(
            "| {n} | {before:.2} | {now:.3} | {:.0}x | {:.1} | {:.2} |\n",
            before / now,
            before * 1e3 / n as f64,
            now * 1e3 / n as f64
        ));
    }
    print!("{table}");
    if let Some(path) = args.out {
        std::fs::write(&path, table)?;
    }
    Ok(())
}
