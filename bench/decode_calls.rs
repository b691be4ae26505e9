//! A paged prefill and decode on the CUDA backend, as the server batches them (an example of the
//! engine crate), for `bench/decode-calls.sh`: that script runs it twice on the CPU emulator
//! of the driver (`kernels/emu`, `SPARSEMOE_EMU_STATS`), with `--decode 1` and with more, and
//! divides the difference of the two runs' driver calls by the extra steps: what one decode
//! step asks of a GPU (kernel launches by kernel, cuBLAS calls, copies, memsets, allocations,
//! waits for the host), the calls a CUDA graph of the step would replace. On a GPU it runs too
//! (it counts nothing there). `--devices 0,0` splits the routed experts over two expert shards
//! (here on one device), `--route-on-host` routes every MoE layer on the host, for the
//! comparison the script's second table makes, and `--graph-rows` runs the MLP blocks of steps
//! of up to that many rows as CUDA graphs (`Cuda::graph_rows`), for its third.
//!
//! ```sh
//! cargo run --release -p sparsemoe-engine --example decode_calls -- --model DIR --decode 9
//! ```

use std::sync::Arc;

use clap::Parser;
use sparsemoe_engine::backend::Backend;
use sparsemoe_engine::backend::cuda::{Cuda, Dtype};
use sparsemoe_engine::config::ModelConfig;
use sparsemoe_engine::expert_shards::ExpertShards;
use sparsemoe_engine::kv_cache::{KvDtype, SeqCache};
use sparsemoe_engine::model::{LogitRows, Model, ModelOptions, SeqStep};
use sparsemoe_engine::sampling::argmax;

#[derive(Parser)]
struct Args {
    /// A Hugging Face model directory.
    #[arg(long)]
    model: std::path::PathBuf,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Prompt tokens a sequence, prefilled in one step.
    #[arg(long, default_value_t = 16)]
    prompt: usize,
    /// Decode steps after the prefill.
    #[arg(long, default_value_t = 1)]
    decode: usize,
    /// `bfloat16` or `float32` weights.
    #[arg(long, default_value = "bfloat16")]
    dtype: String,
    /// Devices, as `--device cuda:…` lists them: with several, the routed experts are split
    /// over expert shards, one a device (an index may repeat: shards on one GPU).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    devices: Vec<usize>,
    /// Route every MoE layer on the host (`Cuda::route_on_device(false)`), for comparison.
    #[arg(long)]
    route_on_host: bool,
    /// Steps of at most this many rows run each layer's MLP block as a CUDA graph (0: none).
    #[arg(long, default_value_t = 0)]
    graph_rows: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.batch > 0 && args.prompt > 0 && args.decode > 0,
        "--batch, --prompt and --decode must be above 0"
    );
    let dtype: Dtype = args.dtype.parse()?;
    let cuda = Cuda::new(&args.devices, dtype)?;
    cuda.route_on_device(!args.route_on_host);
    cuda.graph_rows(args.graph_rows);
    let config = ModelConfig::from_dir(&args.model)?;
    let options = ModelOptions {
        expert_shards: ExpertShards::from_options(&config, None, None, args.devices.len())?
            .map(Arc::new),
        ..ModelOptions::default()
    };
    let model = Model::load(&args.model, cuda.clone(), options)?;
    let vocab = model.config.vocab_size as u32;
    // Blocks of 16 tokens, enough for every sequence's prompt and decode steps.
    let block = 16;
    let per_seq = (args.prompt + args.decode).div_ceil(block);
    let pool = model.new_paged_pool(block, per_seq * args.batch, KvDtype::Bfloat16)?;
    let mut caches: Vec<SeqCache<Cuda>> = (0..args.batch)
        .map(|s| {
            let mut cache = SeqCache::paged(pool.clone());
            let blocks: Vec<u32> = (0..per_seq).map(|b| (b * args.batch + s) as u32).collect();
            cache.set_blocks(&blocks);
            cache
        })
        .collect();
    let prompts: Vec<Vec<u32>> = (0..args.batch)
        .map(|s| {
            (0..args.prompt)
                .map(|i| ((s * 131 + i * 37) as u32) % (vocab - 2) + 2)
                .collect()
        })
        .collect();
    let mut logits = step(&model, &prompts, &mut caches)?;
    for _ in 0..args.decode {
        let next: Vec<Vec<u32>> = logits.iter().map(|l| vec![argmax(l)]).collect();
        logits = step(&model, &next, &mut caches)?;
    }
    let c = &model.config;
    let graphs = cuda.graph_counts();
    println!(
        "{}",
        serde_json::json!({
            "backend": cuda.name(),
            "layers": c.num_layers,
            "moe_layers": c.moe_layers.iter().filter(|&&moe| moe).count(),
            "batch": args.batch,
            "prompt": args.prompt,
            "decode": args.decode,
            "routed_on_device": cuda.routed_on_device(),
            "expert_shards": model.expert_shards().map_or(0, |s| s.shards()),
            "graphs": {
                "captured": graphs.captured,
                "replayed": graphs.replayed,
                "eager": graphs.eager,
            },
        })
    );
    Ok(())
}

/// One step of the batch: sequence `i` takes `tokens[i]` into `caches[i]`; the last row's
/// logits of each.
fn step(
    model: &Model<Cuda>,
    tokens: &[Vec<u32>],
    caches: &mut [SeqCache<Cuda>],
) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut steps: Vec<SeqStep<'_, Cuda>> = tokens
        .iter()
        .zip(caches.iter_mut())
        .map(|(tokens, cache)| SeqStep {
            tokens,
            cache,
            logits: LogitRows::Last,
        })
        .collect();
    Ok(model.forward(&mut steps, None)?)
}
