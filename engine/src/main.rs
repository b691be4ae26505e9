//! `sparsemoe-engine`: run DeepSeek-V3.2 / V3 models (see `--help`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use sparsemoe_engine::backend::Backend;
use sparsemoe_engine::backend::cpu::Cpu;
use sparsemoe_engine::backend::cuda::Cuda;
use sparsemoe_engine::bench;
use sparsemoe_engine::config::ModelConfig;
use sparsemoe_engine::expert_shards::ExpertShards;
use sparsemoe_engine::generate::generate;
use sparsemoe_engine::model::{AttentionMode, Model, ModelOptions};
use sparsemoe_engine::sampling::{Sampler, SamplingParams};
use sparsemoe_engine::serve::Device;
use sparsemoe_engine::tokenizer::{ChatMessage, Tokenizer};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "DeepSeek-V3.2 / V3 inference: sparse MLA attention and MoE"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the model's logits at every position as JSON `{"logits": [[f32; vocab]; n]}`.
    Logits {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated token ids, e.g. 1,2,3.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
    },
    /// Generate a continuation of a prompt.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Wrap the prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Serve the OpenAI-compatible HTTP API (the built-in demo model without --model).
    Serve(Box<sparsemoe_engine::serve::ServeArgs>),
    /// Measure throughput and long-context decode steps; prints JSON (see bench/).
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        /// Batch sizes for the prefill/decode throughput runs.
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        batch: Vec<usize>,
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 32)]
        decode_tokens: usize,
        /// Context lengths for single decode-step timings (synthetic cache); empty to skip.
        #[arg(long, value_delimiter = ',')]
        context: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
}

#[derive(Debug, Args)]
struct ModelArgs {
    /// A Hugging Face model directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// `cpu`, `cuda:N` for GPU N, or `cuda:N,M,…`: the model on the first GPU, its routed
    /// experts split over all of them (one expert shard each; see --placement).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// With a GPU: `float32` or `bfloat16` (bf16 weights; products, attention and the
    /// indexer on the tensor cores).
    #[arg(long, default_value = "float32")]
    dtype: String,
    /// Attention: sparse (DSA top-k; V3.2) or dense.
    #[arg(long, value_enum, default_value_t = Attention::Sparse)]
    attention: Attention,
    /// Overrides the model's index_topk.
    #[arg(long)]
    index_topk: Option<usize>,
    /// Expert parallelism: split each MoE layer's routed experts evenly over this many shards.
    #[arg(long)]
    expert_shards: Option<usize>,
    /// A placement plan (JSON) saying which shard holds which experts.
    #[arg(long)]
    placement: Option<PathBuf>,
    /// With a GPU: steps of at most this many rows (64 at most) run each layer's MLP block as a
    /// CUDA graph (0: none; none either with expert shards on several lanes).
    #[arg(long, default_value_t = 0)]
    cuda_graph_rows: usize,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Attention {
    Sparse,
    Dense,
}

impl ModelArgs {
    fn load<B: Backend>(&self, backend: B, devices: usize) -> anyhow::Result<Model<B>> {
        // The config first: the expert shards decide where the experts are uploaded.
        let config = ModelConfig::from_dir(&self.model)
            .with_context(|| format!("loading {}", self.model.display()))?;
        let expert_shards = ExpertShards::from_options(
            &config,
            self.expert_shards,
            self.placement.as_deref(),
            devices,
        )?;
        let options = ModelOptions {
            attention: match self.attention {
                Attention::Sparse => AttentionMode::Sparse,
                Attention::Dense => AttentionMode::Dense,
            },
            index_topk: self.index_topk,
            expert_shards: expert_shards.map(Arc::new),
            ..ModelOptions::default()
        };
        Model::load(&self.model, backend, options)
            .with_context(|| format!("loading {}", self.model.display()))
    }
}

fn main() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    let (device, dtype, graph_rows) = match &command {
        Command::Serve(_) => (Device::Cpu, "float32", 0), // serve opens its own device
        Command::Logits { model, .. }
        | Command::Generate { model, .. }
        | Command::Bench { model, .. } => (
            model.device.parse::<Device>()?,
            model.dtype.as_str(),
            model.cuda_graph_rows,
        ),
    };
    let devices = device.count();
    let dtype = device.dtype(dtype)?;
    let graph_rows = device.graph_rows(graph_rows)?;
    match device {
        Device::Cpu => run(command, Cpu, devices),
        Device::Cuda(ordinals) => {
            let cuda = Cuda::new(&ordinals, dtype)?;
            cuda.graph_rows(graph_rows);
            run(command, cuda, devices)
        }
    }
}

/// Runs `command` with its model on `backend`, which spans `devices` devices.
fn run<B: Backend>(command: Command, backend: B, devices: usize) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => sparsemoe_engine::serve::run(*args)?,
        Command::Bench {
            model,
            batch,
            prompt_tokens,
            decode_tokens,
            context,
            steps,
        } => {
            for (flag, value) in [
                ("--prompt-tokens", prompt_tokens),
                ("--decode-tokens", decode_tokens),
                ("--steps", steps),
                ("--batch", batch.iter().copied().min().unwrap_or(1)),
                ("--context", context.iter().copied().min().unwrap_or(1)),
            ] {
                if value == 0 {
                    anyhow::bail!("{flag} 0: must be at least 1");
                }
            }
            let loaded = model.load(backend, devices)?;
            let mut throughput = Vec::new();
            for b in batch {
                throughput.push(bench::throughput(
                    &loaded,
                    b,
                    prompt_tokens,
                    decode_tokens,
                    1,
                )?);
            }
            let mut decode_steps = Vec::new();
            for ctx in context {
                decode_steps.push(bench::decode_step(&loaded, ctx, steps)?);
            }
            let report = serde_json::json!({
                "backend": loaded.backend().name(),
                "attention": format!("{:?}", model.attention).to_lowercase(),
                "index_topk": loaded.index_topk(),
                "cuda_graph_rows": model.cuda_graph_rows,
                "weight_bytes": loaded.weight_bytes(),
                "throughput": throughput,
                "decode_steps": decode_steps,
                "peak_rss_bytes": bench::peak_rss_bytes(),
            });
            println!("{report}");
        }
        Command::Logits { model, tokens } => {
            let loaded = model.load(backend, devices)?;
            let logits = loaded.logits(&tokens, None)?;
            let rows: Vec<&[f32]> = logits.chunks(loaded.config.vocab_size).collect();
            let mut out = std::io::stdout().lock();
            serde_json::to_writer(&mut out, &serde_json::json!({ "logits": rows }))?;
            writeln!(out)?;
        }
        Command::Generate {
            model,
            prompt,
            max_tokens,
            chat,
            temperature,
            top_p,
            top_k,
            seed,
        } => {
            let params = SamplingParams {
                temperature,
                top_p,
                top_k,
                seed,
                ..SamplingParams::default()
            };
            params.validate()?;
            let mut tokenizer = Tokenizer::from_dir(&model.model)?;
            let loaded = model.load(backend, devices)?;
            tokenizer.default_chat_format_for(loaded.config.arch);
            let text = if chat {
                let message = ChatMessage::new("user", &prompt);
                tokenizer.apply_chat_template(&[message], true, &Default::default(), &[])?
            } else {
                prompt
            };
            let mut ids = tokenizer.encode(&text)?;
            // A chat format that writes the BOS itself (DeepSeek's do) is not given a second.
            if let Some(bos) = loaded.config.bos_token_id.or(tokenizer.bos_token_id())
                && ids.first() != Some(&bos)
            {
                ids.insert(0, bos);
            }
            if ids.is_empty() {
                bail!("the prompt encodes to no tokens");
            }
            let mut stops = loaded.config.eos_token_ids.clone();
            stops.extend(tokenizer.eos_token_id());
            let mut sampler = Sampler::new(params).with_prompt(&ids);
            let mut out = std::io::stdout().lock();
            write!(out, "{text}")?;
            // Token by token, as the server streams: a character split across tokens prints
            // once whole, and a long output costs the same per token as a short one.
            let mut decoding = sparsemoe_engine::tokenizer::DecodeState::default();
            generate(&loaded, &ids, max_tokens, &mut sampler, &stops, |token| {
                let _ = write!(out, "{}", tokenizer.decode_next(&mut decoding, token));
                let _ = out.flush();
            })?;
            writeln!(out, "{}", tokenizer.decode_rest(&mut decoding))?;
        }
    }
    Ok(())
}
