//! `sparsemoe-engine serve`: load the model (or the built-in demo), size the KV cache, start
//! the engine thread and the HTTP server, and drain on SIGTERM / Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use crate::backend::Backend;
use crate::backend::cpu::Cpu;
use crate::backend::cuda::{Cuda, Dtype};
use crate::config::ModelConfig;
use crate::demo::{DEMO, DEMO_NAME};
use crate::expert_shards::ExpertShards;
use crate::kv_cache::{BlockAllocator, KvDtype, bytes_per_token};
use crate::metrics::{Metrics, ModelInfo};
use crate::model::{AttentionMode, Model, ModelOptions};
use crate::scheduler::{self, SchedulerConfig};
use crate::server::{self, AppState};
use crate::tokenizer::{ChatFormat, Tokenizer};
use crate::tool_calls::ToolCallParser;
use crate::weights::WeightStore;

/// Options of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// A Hugging Face model directory; without it, the built-in demo model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `cpu`, `cuda:N` for GPU N, or `cuda:N,M,…`: the model on the first GPU, its routed
    /// experts split over all of them (one expert shard each; see --placement).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// With a GPU: `float32` (weights and products in float32, as the CPU backend computes) or
    /// `bfloat16` (bf16 weights, half the memory; products, attention and the indexer on the
    /// tensor cores from inputs rounded to bf16, summed in float32).
    #[arg(long, default_value = "float32", env = "SPARSEMOE_DTYPE")]
    pub dtype: String,
    /// Address to listen on (pods: 0.0.0.0, which the operator passes).
    #[arg(long, default_value = "127.0.0.1", env = "SPARSEMOE_HOST")]
    pub host: String,
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Requests that may wait for a slot; beyond it, 429 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// A file holding the API key clients must send as `Authorization: Bearer KEY`.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// The model name clients use (default: the directory name, or `sparsemoe-demo`).
    #[arg(long, env = "SPARSEMOE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Sampling defaults for the fields a request leaves out (temperature, top_p, top_k, min_p,
    /// repetition_penalty): `auto` takes the model directory's generation_config.json when it
    /// has one, as vLLM does; `vllm` takes none (temperature 1, no top-p or top-k); a
    /// directory takes the generation_config.json in it.
    #[arg(long, default_value = "auto", env = "SPARSEMOE_GENERATION_CONFIG")]
    pub generation_config: String,
    /// The model's revision (e.g. a Hugging Face commit; the operator passes
    /// `spec.model.revision`): informational, shown in `/v1/models` and `sparsemoe_model_info`.
    #[arg(long, env = "SPARSEMOE_MODEL_REVISION")]
    pub model_revision: Option<String>,
    /// Memory for the KV cache, in bytes (default 1 GiB, unless --kv-cache-memory-fraction).
    #[arg(long)]
    pub kv_cache_bytes: Option<usize>,
    /// Size the KV cache as this share, in (0, 0.98], of the memory available to the process
    /// (the machine's or the container's cgroup headroom, whichever is smaller) less the
    /// model's weight bytes.
    #[arg(long, env = "SPARSEMOE_KV_CACHE_MEMORY_FRACTION")]
    pub kv_cache_memory_fraction: Option<f64>,
    /// How the KV cache stores its rows: `float32`, `bfloat16` (half the bytes, so twice the
    /// tokens in the same memory; rows rounded to bf16 as they are written), `fp8` (e4m3 codes
    /// with a float32 scale per 128 values, RoPE keys in bf16: about a quarter of the float32
    /// bytes; the scales powers of two where the checkpoint's quantization_config says
    /// scale_fmt "ue8m0", as V3.2's does), `fp8_ue8m0` (power-of-two scales whatever the
    /// checkpoint), or `auto`: bfloat16 with `--dtype bfloat16`, float32 otherwise.
    #[arg(long, default_value = "auto", env = "SPARSEMOE_KV_CACHE_DTYPE")]
    pub kv_cache_dtype: String,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Cap on prompt + output tokens (default: the model's max_position_embeddings). Longer
    /// than the model's is refused; longer than the KV cache holds is capped to it.
    #[arg(long, env = "SPARSEMOE_MAX_CONTEXT_TOKENS")]
    pub max_model_len: Option<usize>,
    /// Tokens one engine step processes at most (decodes plus prefill chunks).
    #[arg(long, default_value_t = 256, env = "SPARSEMOE_MAX_BATCHED_TOKENS")]
    pub max_batch_tokens: usize,
    /// Sequences running at once.
    #[arg(long, default_value_t = 64)]
    pub max_running: usize,
    /// Turns off prefix caching (on by default: requests whose prompts start with the same
    /// whole KV blocks share them instead of computing them again). The variable takes
    /// true/false, yes/no, on/off or 1/0.
    #[arg(long, env = "SPARSEMOE_NO_PREFIX_CACHING",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub no_prefix_caching: bool,
    /// Seconds running requests get to finish after SIGTERM.
    #[arg(long, default_value_t = 30, env = "SPARSEMOE_DRAIN_SECONDS")]
    pub drain_grace_secs: u64,
    /// Attention: sparse (DSA top-k), dense, or auto (dense below --dense-below-tokens).
    #[arg(long, default_value = "sparse", env = "SPARSEMOE_ATTENTION")]
    pub attention: String,
    /// With `--attention auto`: a token whose context (itself included) is shorter than this
    /// attends densely, the others sparsely, however the prompt is chunked (default: index_topk).
    #[arg(long, env = "SPARSEMOE_DENSE_BELOW_TOKENS")]
    pub dense_below_tokens: Option<usize>,
    /// Overrides the model's index_topk.
    #[arg(long, env = "SPARSEMOE_INDEX_TOPK")]
    pub index_topk: Option<usize>,
    /// Expert parallelism: split each MoE layer's routed experts evenly over this many shards
    /// (tasks on the worker pool on the CPU; GPUs with the CUDA backend).
    #[arg(long, env = "SPARSEMOE_EXPERT_SHARDS")]
    pub expert_shards: Option<usize>,
    /// Nodes one replica spans (the operator passes its `nodesPerReplica`). Only 1 runs: the
    /// engine has no transport between nodes yet, so a larger value is refused at start-up
    /// rather than serving as unrelated single-node engines.
    #[arg(long, default_value_t = 1, env = "SPARSEMOE_NODES_PER_REPLICA")]
    pub nodes_per_replica: usize,
    /// A placement plan (JSON, as `sparsemoe-operator plan-experts` prints it) saying which
    /// shard holds which experts, with redundant copies of hot ones.
    #[arg(long, env = "SPARSEMOE_PLACEMENT")]
    pub placement: Option<PathBuf>,
    /// With a GPU: steps of at most this many rows (decode batches; 64 at most) run each
    /// layer's MLP block as a CUDA graph, recorded the second time a (layer, rows) comes and
    /// replayed after that; 0 (the default) for none. Attention runs outside the graphs, and so
    /// does everything with expert shards on several lanes (`--device cuda:N,M,…`).
    #[arg(long, default_value_t = 0, env = "SPARSEMOE_CUDA_GRAPH_ROWS")]
    pub cuda_graph_rows: usize,
    /// A Jinja chat template file to use instead of the checkpoint's (vLLM's flag). Without
    /// one, a checkpoint's `tokenizer_config.json` template is used, or for a DeepSeek-V3.2
    /// checkpoint without one (the official release ships none) DeepSeek-V3.2's own encoding.
    #[arg(long, env = "SPARSEMOE_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// How tool calls are read out of chat outputs: `deepseek_v32` (DeepSeek-V3.2's DSML
    /// blocks), `deepseek_v31` or `deepseek_v3` (DeepSeek-V3.1's and V3's special-token calls),
    /// `none` (requests that offer tools are refused), or `auto`: `deepseek_v32` where
    /// DeepSeek-V3.2's own chat encoding writes the prompts, `deepseek_v3` or `deepseek_v31`
    /// for a template that writes calls in their format (V3's with a fenced JSON block), else
    /// `none`.
    #[arg(long, default_value = "auto", env = "SPARSEMOE_TOOL_CALL_PARSER")]
    pub tool_call_parser: String,
    /// Whether a thinking output's reasoning comes back apart from its answer, as
    /// `reasoning_content`: `auto` (the default; vLLM's `deepseek_r1` and `deepseek_v3` name the
    /// same) does so for a chat prompt that ends in `<think>` (DeepSeek's thinking mode), up to
    /// the `</think>` token; `none` leaves it all in `content`.
    #[arg(long, default_value = "auto", env = "SPARSEMOE_REASONING_PARSER")]
    pub reasoning_parser: String,
}

/// Sets `tokenizer`'s chat format for a model of `arch` (`--chat-template`, else the
/// checkpoint's template, else DeepSeek-V3.2's encoding for a V3.2 model) and returns the
/// tool-call parser `--tool-call-parser` names for it.
pub fn configure_chat(
    tokenizer: &mut Tokenizer,
    arch: crate::config::Arch,
    args: &ServeArgs,
) -> anyhow::Result<Option<ToolCallParser>> {
    if let Some(path) = &args.chat_template {
        let template = std::fs::read_to_string(path)
            .with_context(|| format!("reading --chat-template {}", path.display()))?;
        minijinja::Environment::new()
            .template_from_str(&template)
            .map_err(|e| anyhow::anyhow!("--chat-template {}: {e}", path.display()))?;
        tokenizer.set_chat_format(ChatFormat::Template(template));
    } else {
        tokenizer.default_chat_format_for(arch);
    }
    let parser = match args.tool_call_parser.as_str() {
        "auto" => match tokenizer.chat_format() {
            ChatFormat::DeepSeekV32 => Some(ToolCallParser::DeepSeekV32),
            ChatFormat::Template(t) => ToolCallParser::for_template(t),
            ChatFormat::Plain => None,
        },
        "none" => None,
        name => Some(ToolCallParser::from_name(name).with_context(|| {
            format!(
                "--tool-call-parser {name}: expected one of {}, `auto` or `none`",
                ToolCallParser::NAMES.map(|n| format!("`{n}`")).join(", ")
            )
        })?),
    };
    if let Some(parser) = parser {
        // A tokenizer that marks the calls' tokens special would drop them from the text.
        tokenizer.keep_in_text(parser.markers());
    }
    Ok(parser)
}

/// The most tokens a KV-cache block may hold (vLLM's largest block size is 256).
pub const MAX_BLOCK_SIZE: usize = 1024;

impl ServeArgs {
    /// Checks the settings that need no model, so that a bad one fails at once rather than
    /// after a load that may take many minutes (and again on every restart).
    pub fn check(&self) -> anyhow::Result<()> {
        self.kv_dtype()?;
        self.reasoning_parser()?;
        kv_budget_flags(self.kv_cache_bytes, self.kv_cache_memory_fraction)?;
        for (flag, value) in [
            ("--max-queue", self.max_queue),
            (
                "--max-batch-tokens (SPARSEMOE_MAX_BATCHED_TOKENS)",
                self.max_batch_tokens,
            ),
            ("--max-running", self.max_running),
            ("--block-size", self.block_size),
        ] {
            if value == 0 {
                bail!("{flag} 0: must be at least 1");
            }
        }
        if self.block_size > MAX_BLOCK_SIZE {
            bail!(
                "--block-size {}: at most {MAX_BLOCK_SIZE} tokens a block",
                self.block_size
            );
        }
        if let Some(len) = self.max_model_len
            && len < 2
        {
            bail!(
                "--max-model-len (SPARSEMOE_MAX_CONTEXT_TOKENS) {len}: at least 2 (a prompt \
                 token and one to generate)"
            );
        }
        if self.index_topk == Some(0) {
            bail!("--index-topk (SPARSEMOE_INDEX_TOPK) 0: must be at least 1");
        }
        if self.dense_below_tokens.is_some() && self.attention != "auto" {
            bail!(
                "--dense-below-tokens (SPARSEMOE_DENSE_BELOW_TOKENS) applies with --attention \
                 auto only, not {}",
                self.attention
            );
        }
        self.sampling_defaults()?;
        if self.served_model_name.as_deref().is_some_and(str::is_empty) {
            bail!("--served-model-name (SPARSEMOE_SERVED_MODEL_NAME) is empty");
        }
        self.api_key()?;
        self.listen_addr()?;
        Ok(())
    }

    /// The sampling defaults `--generation-config` names (see there).
    pub fn sampling_defaults(&self) -> anyhow::Result<crate::api::SamplingDefaults> {
        let dir = match (self.generation_config.as_str(), &self.model) {
            ("vllm", _) | ("auto", None) => return Ok(Default::default()),
            ("auto", Some(model)) => model.clone(),
            (dir, _) => PathBuf::from(dir),
        };
        let path = dir.join("generation_config.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => crate::api::SamplingDefaults::from_generation_config(
                &text,
                &path.display().to_string(),
            )
            .map_err(|e| anyhow::anyhow!("--generation-config (SPARSEMOE_GENERATION_CONFIG): {e}")),
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound && self.generation_config == "auto" =>
            {
                Ok(Default::default())
            }
            Err(e) => bail!(
                "--generation-config (SPARSEMOE_GENERATION_CONFIG) {}: cannot read {}: {e} \
                 (expected `auto`, `vllm` or a directory holding a generation_config.json)",
                self.generation_config,
                path.display()
            ),
        }
    }

    /// The key of `--api-key-file` (trimmed; an empty file is refused).
    pub fn api_key(&self) -> anyhow::Result<Option<String>> {
        let Some(path) = &self.api_key_file else {
            return Ok(None);
        };
        let key = std::fs::read_to_string(path)
            .with_context(|| format!("reading --api-key-file {}", path.display()))?;
        let key = key.trim().to_string();
        if key.is_empty() {
            bail!("--api-key-file {} is empty", path.display());
        }
        Ok(Some(key))
    }

    /// `--host` and `--port` as an address: an IPv4 or IPv6 address (`::`, with or without
    /// brackets) or a host name.
    pub fn listen_addr(&self) -> anyhow::Result<SocketAddr> {
        use std::net::ToSocketAddrs;
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        (host, self.port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut addrs| addrs.next())
            .with_context(|| {
                format!(
                    "--host {} --port {}: not an address to listen on (e.g. 0.0.0.0, ::, \
                     127.0.0.1)",
                    self.host, self.port
                )
            })
    }

    /// `--reasoning-parser`: whether reasoning is split from the answer.
    pub fn reasoning_parser(&self) -> anyhow::Result<bool> {
        match self.reasoning_parser.as_str() {
            "auto" | "deepseek_r1" | "deepseek_v3" => Ok(true),
            "none" => Ok(false),
            other => bail!(
                "--reasoning-parser {other}: expected `auto` (or `deepseek_r1`, `deepseek_v3`) \
                 or `none`"
            ),
        }
    }

    /// `--kv-cache-dtype`, with `auto` resolved against `--dtype`.
    pub fn kv_dtype(&self) -> anyhow::Result<KvDtype> {
        Ok(match self.kv_cache_dtype.as_str() {
            "auto" => match self.dtype.parse::<Dtype>()? {
                Dtype::Float32 => KvDtype::Float32,
                Dtype::Bfloat16 => KvDtype::Bfloat16,
            },
            other => other.parse()?,
        })
    }
}

struct Loaded<B: Backend> {
    model: Model<B>,
    tokenizer: Tokenizer,
    name: String,
}

/// Where the model runs: `--device cpu`, `--device cuda:N`, or `--device cuda:N,M,…` (the
/// model on the first GPU and its routed experts split over all of them, one expert shard per
/// entry; an index may repeat, which puts several shards on one GPU, each with its own stream).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(Vec<usize>),
}

impl Device {
    /// `--dtype` for this device: the CUDA backend takes `float32` or `bfloat16`; the CPU
    /// backend computes in float32 (from the weights as stored) only.
    pub fn dtype(&self, dtype: &str) -> anyhow::Result<Dtype> {
        let parsed: Dtype = dtype.parse()?;
        if *self == Self::Cpu && parsed != Dtype::Float32 {
            bail!(
                "--dtype {dtype} needs a GPU (--device cuda:N): the CPU backend computes in \
                 float32 from the weights as stored"
            );
        }
        Ok(parsed)
    }

    /// `--cuda-graph-rows` for this device: the CPU backend has no graphs, so only 0 there;
    /// on a GPU at most the rows a product reads its weight in place for.
    pub fn graph_rows(&self, rows: usize) -> anyhow::Result<usize> {
        let most = sparsemoe_kernels::launch::FP8_LINEAR_ROWS as usize;
        if *self == Self::Cpu && rows > 0 {
            bail!(
                "--cuda-graph-rows {rows} needs a GPU (--device cuda:N): the CPU backend has no \
                 CUDA graphs"
            );
        }
        if rows > most {
            bail!(
                "--cuda-graph-rows {rows}: at most {most} (longer steps read their weights \
                 through copies and cuBLAS, and copy to the host, which a graph cannot replay)"
            );
        }
        Ok(rows)
    }

    /// Devices the engine spans (one for the CPU).
    pub fn count(&self) -> usize {
        match self {
            Self::Cpu => 1,
            Self::Cuda(ordinals) => ordinals.len(),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        if s == "cpu" {
            return Ok(Self::Cpu);
        }
        let Some(list) = s.strip_prefix("cuda:") else {
            bail!(
                "--device {s}: expected `cpu`, `cuda:N` or `cuda:N,M,…` (GPU indices, e.g. cuda:0)"
            );
        };
        let ordinals = list
            .split(',')
            .map(|id| {
                id.trim().parse::<usize>().map_err(|_| {
                    anyhow::anyhow!("--device {s}: `{id}` is not a GPU index (e.g. cuda:0)")
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self::Cuda(ordinals))
    }
}

/// Loads the model on `backend`, which spans `devices` devices (expert shards need one each).
fn load<B: Backend>(args: &ServeArgs, backend: B, devices: usize) -> anyhow::Result<Loaded<B>> {
    let mut options = ModelOptions {
        attention: match args.attention.as_str() {
            "sparse" => AttentionMode::Sparse,
            "dense" => AttentionMode::Dense,
            // The threshold defaults to the model's index_topk, known once it is loaded.
            "auto" => AttentionMode::Auto {
                dense_below: args.dense_below_tokens.unwrap_or(0),
            },
            other => bail!("--attention {other}: expected `sparse`, `dense` or `auto`"),
        },
        index_topk: args.index_topk,
        ..ModelOptions::default()
    };
    // The model's config first: the expert shards decide where its experts are uploaded.
    let (source, config, store, tokenizer, name) = match (&args.model, DEMO) {
        (Some(dir), _) => {
            let source = dir.display().to_string();
            let config = ModelConfig::from_dir(dir).with_context(|| format!("loading {source}"))?;
            let store = WeightStore::open(dir).with_context(|| format!("loading {source}"))?;
            let tokenizer = Tokenizer::from_dir(dir)
                .with_context(|| format!("loading the tokenizer of {source}"))?;
            let name = dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into());
            (source, config, store, tokenizer, name)
        }
        (None, Some(demo)) => (
            "the demo model".to_string(),
            ModelConfig::from_json(demo.config, "demo-model/config.json")?,
            WeightStore::from_bytes("demo-model/model.safetensors", demo.weights)?,
            Tokenizer::from_bytes(demo.tokenizer, Some(demo.tokenizer_config))?,
            DEMO_NAME.into(),
        ),
        (None, None) => bail!(
            "--model DIR is required: this binary was built without the demo model \
             (engine/demo-model was absent at build time; rebuild once it exists, or pass --model)"
        ),
    };
    // The chat flags are checked before the weights load (and applied by build_state).
    let mut tokenizer = tokenizer;
    configure_chat(&mut tokenizer, config.arch, args)?;
    args.reasoning_parser()?;
    options.expert_shards = ExpertShards::from_options(
        &config,
        args.expert_shards,
        args.placement.as_deref(),
        devices,
    )?
    .map(Arc::new);
    let mut model = Model::from_store(config, &store, backend, options)
        .with_context(|| format!("loading {source}"))?;
    if args.attention == "auto" && args.dense_below_tokens.is_none() {
        // Below index_topk the indexer would select every key anyway.
        let dense_below = model.index_topk().unwrap_or(0);
        model.options.attention = AttentionMode::Auto { dense_below };
    }
    Ok(Loaded {
        model,
        tokenizer,
        name,
    })
}

/// Loads the model on `--device` and builds the server state.
fn load_state(args: &ServeArgs) -> anyhow::Result<Arc<AppState>> {
    args.check()?;
    if args.nodes_per_replica != 1 {
        bail!(
            "--nodes-per-replica {} (SPARSEMOE_NODES_PER_REPLICA): a replica spanning several \
             nodes needs a transport between them, which this engine does not have yet; run one \
             node per replica (its GPUs hold the replica's expert shards: --device cuda:0,1,…)",
            args.nodes_per_replica
        );
    }
    let device = args.device.parse::<Device>()?;
    match device.clone() {
        Device::Cpu => {
            device.dtype(&args.dtype)?;
            device.graph_rows(args.cuda_graph_rows)?;
            let l = load(args, Cpu, 1)?;
            build_state(l.model, l.tokenizer, l.name, args)
        }
        Device::Cuda(ordinals) => {
            let graph_rows = device.graph_rows(args.cuda_graph_rows)?;
            let cuda = Cuda::new(&ordinals, device.dtype(&args.dtype)?)?;
            cuda.graph_rows(graph_rows);
            let l = load(args, cuda, ordinals.len())?;
            if graph_rows > 0 {
                match l.model.backend().graphs_unavailable() {
                    Some(why) => eprintln!(
                        "sparsemoe-engine: --cuda-graph-rows {graph_rows}: no CUDA graphs on \
                         this configuration: {why}"
                    ),
                    None => eprintln!(
                        "sparsemoe-engine: CUDA graphs of each layer's MLP block in steps of at \
                         most {graph_rows} rows"
                    ),
                }
            }
            build_state(l.model, l.tokenizer, l.name, args)
        }
    }
}

/// The KV cache's sizing flags, before any memory is read: at most one of them, a fraction in
/// (0, 0.98].
fn kv_budget_flags(bytes: Option<usize>, fraction: Option<f64>) -> anyhow::Result<()> {
    match (bytes, fraction) {
        (Some(_), Some(_)) => bail!(
            "--kv-cache-bytes and --kv-cache-memory-fraction (SPARSEMOE_KV_CACHE_MEMORY_FRACTION) \
             both size the KV cache: give one"
        ),
        (None, Some(f)) if !(f > 0.0 && f <= 0.98) => {
            bail!("--kv-cache-memory-fraction {f}: must be in (0, 0.98], e.g. 0.9")
        }
        _ => Ok(()),
    }
}

/// The KV cache's bytes and where the number came from: `--kv-cache-bytes`, or
/// `--kv-cache-memory-fraction` of what `available()` reports, or 1 GiB.
fn kv_cache_budget(
    bytes: Option<usize>,
    fraction: Option<f64>,
    available: impl FnOnce() -> Option<u64>,
) -> anyhow::Result<(usize, String)> {
    kv_budget_flags(bytes, fraction)?;
    match (bytes, fraction) {
        (Some(bytes), _) => Ok((bytes, "--kv-cache-bytes".into())),
        (None, Some(f)) => {
            let free = available().context(
                "--kv-cache-memory-fraction: could not read the available memory \
                 (/proc/meminfo, cgroup memory files); pass --kv-cache-bytes instead",
            )?;
            let bytes = (free as f64 * f) as usize;
            Ok((
                bytes,
                format!(
                    "--kv-cache-memory-fraction {f} of {free} bytes available beside the weights"
                ),
            ))
        }
        (None, None) => Ok((1 << 30, "the default of 1 GiB".into())),
    }
}

/// Builds the engine and server state from a loaded model (tests use this directly).
pub fn build_state<B: Backend>(
    model: Model<B>,
    mut tokenizer: Tokenizer,
    name: String,
    args: &ServeArgs,
) -> anyhow::Result<Arc<AppState>> {
    let config = model.config.clone();
    let tool_parser = configure_chat(&mut tokenizer, config.arch, args)?;
    eprintln!(
        "sparsemoe-engine: chat prompts from {}; tool calls {}",
        tokenizer.chat_format().describe(),
        match tool_parser {
            Some(ToolCallParser::DeepSeekV32) => "read as DeepSeek-V3.2's DSML (deepseek_v32)",
            Some(ToolCallParser::DeepSeekV31) => "read as DeepSeek-V3.1's (deepseek_v31)",
            Some(ToolCallParser::DeepSeekV3) => "read as DeepSeek-V3's (deepseek_v3)",
            None => "not read (requests offering tools are refused)",
        }
    );
    if let (Some(_), ChatFormat::Template(t)) = (tool_parser, tokenizer.chat_format())
        && !t.contains("tools")
    {
        eprintln!(
            "sparsemoe-engine: warning: the chat template never reads `tools`, so the model is \
             not shown the tools a request offers; give one that does with --chat-template"
        );
    }
    let kv_dtype = args.kv_dtype()?.for_model(&config);
    // On the host the weights are memory-mapped: pages not yet read count as available, and
    // pages read count as reclaimable cache, yet the model needs them resident, so they are set
    // aside first (in a container whose cgroup already charges resident weights this errs
    // small). A device reports its free memory with the weights already in it.
    let weight_bytes = model.weight_bytes() as u64;
    let device_free = model.backend().device_memory_available();
    let available = || {
        device_free.or_else(|| {
            crate::host_memory::available_bytes().map(|a| a.saturating_sub(weight_bytes))
        })
    };
    let (kv_bytes, kv_source) = kv_cache_budget(
        args.kv_cache_bytes,
        args.kv_cache_memory_fraction,
        available,
    )?;
    if args.kv_cache_bytes.is_some()
        && let Some(free) = available()
        && kv_bytes as u64 > free
    {
        bail!(
            "--kv-cache-bytes {kv_bytes}: more than the {free} bytes available beside the \
             weights; give less, or size it with --kv-cache-memory-fraction"
        );
    }
    let token_bytes = bytes_per_token(&config, kv_dtype);
    let blocks = args
        .block_size
        .max(1)
        .checked_mul(token_bytes)
        .map(|b| kv_bytes / b);
    if blocks.is_none_or(|b| b > u32::MAX as usize) {
        bail!(
            "the KV cache ({kv_source}: {kv_bytes} bytes) would have more blocks of \
             {} tokens than the {} a cache may have",
            args.block_size,
            u32::MAX
        );
    }
    let blocks = BlockAllocator::from_budget(args.block_size, kv_bytes, token_bytes);
    eprintln!(
        "sparsemoe-engine: KV cache of {kv_bytes} bytes ({} tokens, {}) from {kv_source}",
        blocks.capacity_tokens(),
        kv_dtype.as_str()
    );
    let max_context = max_context(
        args.max_model_len,
        config.max_position_embeddings,
        blocks.capacity_tokens(),
    )?;
    if max_context < 2 {
        bail!(
            "the KV cache ({kv_source}: {kv_bytes} bytes) holds {} tokens; at least one block \
             of {} tokens is needed",
            blocks.capacity_tokens(),
            args.block_size
        );
    }
    let metrics = Arc::new(Metrics::new());
    let served_name = args.served_model_name.clone().unwrap_or(name);
    metrics.set_model(
        ModelInfo {
            model: &served_name,
            revision: args.model_revision.as_deref().unwrap_or(""),
            device: &model.backend().name(),
            arch: &format!("{:?}", config.arch),
            kv_cache_dtype: kv_dtype.as_str(),
        },
        model.expert_load(),
    );
    if let Some(shards) = model.expert_shards() {
        metrics.set_expert_shards(shards.clone());
    }
    if let Some(source) = model.backend().graph_counts_source() {
        metrics.set_graph_counts(source);
    }
    metrics.kv_cache_blocks.set(blocks.total_blocks() as i64);
    metrics.max_running.set(args.max_running as i64);
    let bos = config.bos_token_id.or(tokenizer.bos_token_id());
    let mut stop_tokens = config.eos_token_ids.clone();
    stop_tokens.extend(tokenizer.eos_token_id());
    let engine = scheduler::spawn(
        model,
        blocks,
        SchedulerConfig {
            max_batch_tokens: args.max_batch_tokens,
            max_running: args.max_running,
            max_waiting: args.max_queue,
            max_context,
            prefix_caching: !args.no_prefix_caching,
            kv_dtype,
        },
        metrics.clone(),
    )?;
    let mut state = AppState::new(
        engine,
        Arc::new(tokenizer),
        metrics,
        served_name,
        max_context,
        config.vocab_size,
    );
    state.model_revision = args.model_revision.clone();
    state.bos_token = bos;
    state.stop_tokens = stop_tokens;
    state.tool_parser = tool_parser;
    state.reasoning_parser = args.reasoning_parser()?;
    state.api_key = args.api_key()?;
    state.sampling_defaults = args.sampling_defaults()?;
    let defaults = state.sampling_defaults.describe();
    if !defaults.is_empty() {
        eprintln!(
            "sparsemoe-engine: sampling defaults from the model's generation_config.json for \
             fields a request leaves out: {defaults} (--generation-config vllm for none)"
        );
    }
    Ok(Arc::new(state))
}

/// The longest sequence served: `--max-model-len` when given, else the model's own context,
/// capped by what the KV cache holds. A sequence of the full context must fit in the cache, or
/// preemption could never make room for it. A length past the model's context is refused, as
/// vLLM refuses it. One past what the cache holds is capped, saying so, where vLLM refuses:
/// one InferenceDeployment's `maxContextTokens` goes to every GPU variant, and a variant with
/// less memory should serve shorter sequences rather than crash-loop.
fn max_context(asked: Option<usize>, model: usize, cache: usize) -> anyhow::Result<usize> {
    if let Some(asked) = asked
        && asked > model
    {
        bail!(
            "--max-model-len (SPARSEMOE_MAX_CONTEXT_TOKENS) {asked}: longer than the model's \
             context of {model} tokens (max_position_embeddings in config.json)"
        );
    }
    let wanted = asked.unwrap_or(model);
    if (2..wanted).contains(&cache) {
        eprintln!(
            "sparsemoe-engine: serving at most {cache} tokens a sequence, what the KV cache \
             holds, not {wanted} ({}); give the cache more memory \
             (--kv-cache-memory-fraction, --kv-cache-bytes) to serve more",
            match asked {
                Some(_) => "--max-model-len",
                None => "the model's context",
            }
        );
    }
    Ok(wanted.min(cache))
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs `serve` until drained.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let state = load_state(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let addr = args.listen_addr()?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        eprintln!(
            "sparsemoe-engine: serving `{}` on http://{} (context {} tokens, {} KV blocks)",
            state.model_name,
            listener.local_addr()?,
            state.max_context,
            state
                .engine
                .stats
                .total_blocks
                .load(std::sync::atomic::Ordering::SeqCst)
        );
        server::serve(
            listener,
            state,
            shutdown_signal(),
            Duration::from_secs(args.drain_grace_secs),
        )
        .await?;
        eprintln!("sparsemoe-engine: drained, exiting");
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::kv_cache_budget;

    #[test]
    fn the_kv_cache_is_sized_from_bytes_a_fraction_or_the_default() {
        let gib = Some(1u64 << 30);
        let (bytes, from) = kv_cache_budget(Some(4096), None, || gib).unwrap();
        assert_eq!((bytes, from.as_str()), (4096, "--kv-cache-bytes"));
        let (bytes, from) = kv_cache_budget(None, Some(0.5), || gib).unwrap();
        assert_eq!(bytes, 1 << 29);
        assert!(from.contains("0.5 of 1073741824"), "{from}");
        assert_eq!(kv_cache_budget(None, None, || None).unwrap().0, 1 << 30);

        let err =
            |b, f, avail: Option<u64>| kv_cache_budget(b, f, || avail).unwrap_err().to_string();
        assert!(err(Some(1), Some(0.5), gib).contains("give one"));
        for bad in [0.0, -0.1, 0.99, f64::NAN] {
            assert!(err(None, Some(bad), gib).contains("(0, 0.98]"), "{bad}");
        }
        assert!(err(None, Some(0.9), None).contains("--kv-cache-bytes instead"));
    }
}
