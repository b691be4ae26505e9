//! Host work the CUDA backend does for one decode layer's sparse attention (an example of the
//! engine crate), the way it does it now against the way it did before, in one run:
//!
//! ```sh
//! cargo run --release -p sparsemoe-engine --example host_lists -- --out bench/results/host-lists.md
//! ```
//!
//! A decode batch of `--rows` rows, each with `--topk` picks among `--context` positions, read
//! through a paged table of `--block`-row blocks:
//! - the indexer's picks as they come back from the device: before, in the order the kernel's
//!   atomics left them, then sorted a row at a time; now ascending from `topk_rows`, taken as
//!   they are;
//! - the attention's key lists (cache rows, as int32 for the kernel): before, as
//!   `MlaSeq::key_rows` was, the visible keys and then their rows (two vectors a row) into a
//!   list of usize converted at the end; now `MlaSeq::key_rows_iter` straight into int32.
//!
//! Each variant runs `--reps` times, alternating, and the medians are reported with their
//! ratio. Host time only: no device is involved (the device side is `kernels/gpu-check.sh`'s).

use clap::Parser;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sparsemoe_engine::backend::{AttentionForm, CachedRows, MlaSeq, Selection};
use sparsemoe_engine::kv_cache::PagedRows;

#[path = "support.rs"]
mod support;
use support::{machine, race};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 64)]
    rows: usize,
    #[arg(long, default_value_t = 2048)]
    topk: usize,
    #[arg(long, default_value_t = 65536)]
    context: usize,
    #[arg(long, default_value_t = 64)]
    block: usize,
    #[arg(long, default_value_t = 50)]
    reps: usize,
    /// Markdown table to write (printed either way).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.topk < args.context && args.block > 0 && args.rows > 0 && args.reps > 0,
        "--topk must be below --context, and --block, --rows and --reps above 0"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let blocks: Vec<u32> = (0..args.context.div_ceil(args.block))
        .map(|_| rng.random_range(0..1_000_000))
        .collect();
    let table = PagedRows::new(&blocks, args.block, args.context);
    // Each row's picks: distinct positions, as the device sends them (-1 never occurs: every
    // row has more visible keys than it keeps).
    let picks: Vec<Vec<i32>> = (0..args.rows)
        .map(|_| {
            let mut all: Vec<i32> = (0..args.context as i32).collect();
            for i in 0..args.topk {
                let j = rng.random_range(i..all.len());
                all.swap(i, j);
            }
            all.truncate(args.topk);
            all
        })
        .collect();
    let ascending: Vec<Vec<i32>> = picks
        .iter()
        .map(|p| {
            let mut p = p.clone();
            p.sort_unstable();
            p
        })
        .collect();

    let take = |rows: &[Vec<i32>], sort: bool| -> Vec<Vec<u32>> {
        rows.iter()
            .map(|row| {
                let mut keep: Vec<u32> =
                    row.iter().filter(|&&s| s >= 0).map(|&s| s as u32).collect();
                if sort {
                    keep.sort_unstable();
                }
                keep
            })
            .collect()
    };
    let (picks_before, picks_after) = race(
        args.reps,
        || take(&picks, true).len() as u64,
        || take(&ascending, false).len() as u64,
    );

    let selection = take(&ascending, false);
    let positions = vec![args.context - 1; args.rows];
    let dummy = ();
    let seq: MlaSeq<'_, (), ()> = MlaSeq {
        first: 0,
        cached: CachedRows::Tensors {
            latent: &dummy,
            k_pe: &dummy,
        },
        positions: &positions,
        selection: Some(Selection::Listed(&selection)),
        rows: Some(table),
        form: AttentionForm::Absorbed,
    };
    let (keys_before, keys_after) = race(
        args.reps,
        || {
            // As `key_rows` was: the visible keys, then their rows, a vector each.
            let mut keys: Vec<usize> = Vec::new();
            for i in 0..args.rows {
                keys.extend(table.rows(seq.visible_keys(i)));
            }
            let keys: Vec<i32> = keys.into_iter().map(|k| k as i32).collect();
            keys.len() as u64
        },
        || {
            let mut keys: Vec<i32> = Vec::new();
            for i in 0..args.rows {
                keys.extend(seq.key_rows_iter(i).map(|k| k as i32));
            }
            keys.len() as u64
        },
    );

    let (model, cpus) = machine();
    let table = format!(
        "# Host work a CUDA decode layer does for sparse attention\n\n\
         `cargo run --release -p sparsemoe-engine --example host_lists` (`bench/host_lists.rs`) on \
         {model}, {cpus} CPUs: {rows} rows, {k} picks each among {ctx} positions, blocks of {block} \
         rows; median of {reps} runs each, alternating. Host time only.\n\n\
         | step | before (ms) | now (ms) | before / now |\n|---|---|---|---|\n\
         | the indexer's picks from the device (before: sorted a row at a time) | {pb:.3} | {pa:.3} | {pr:.1}x |\n\
         | the attention's key lists (before: two vectors a row, then int32) | {kb:.3} | {ka:.3} | {kr:.1}x |\n\
         | both | {tb:.3} | {ta:.3} | {tr:.1}x |\n",
        rows = args.rows,
        k = args.topk,
        ctx = args.context,
        block = args.block,
        reps = args.reps,
        pb = picks_before,
        pa = picks_after,
        pr = picks_before / picks_after,
        kb = keys_before,
        ka = keys_after,
        kr = keys_before / keys_after,
        tb = picks_before + keys_before,
        ta = picks_after + keys_after,
        tr = (picks_before + keys_before) / (picks_after + keys_after),
    );
    print!("{table}");
    if let Some(out) = args.out {
        std::fs::write(&out, &table)?;
    }
    Ok(())
}
