//! DeepSeek-V3.2 / V3, written once over [`Backend`]. Mirrors the Hugging Face module tree
//! (`model.layers.L.self_attn...`), so checkpoint names map to fields in one place (`load`).

use std::path::Path;
use std::sync::Arc;

use crate::backend::{
    self, AttentionForm, Backend, BlockId, Expert, MlaDims, MlaSeq, MlaWeights, Routing,
    absorbed_query_weight,
};
use crate::config::{Arch, ModelConfig};
use crate::error::{EngineError, Result};
use crate::expert_load::ExpertLoad;
use crate::expert_shards::ExpertShards;
use crate::kv_cache::{
    IndexQuery, KvDtype, KvPool, LayerCache, PoolLayer, SeqCache, SharedPool, append_batch,
    index_keep, index_select,
};
use crate::moe::{RouterConfig, route};
use crate::rope::{Rope, RopeLayout};
use crate::weights::WeightStore;

/// `q_a_layernorm`, `kv_a_layernorm` and the indexer's `k_norm` use this eps whatever the config says.
const LATENT_NORM_EPS: f32 = 1e-6;

/// Which attention runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionMode {
    /// DSA: each query attends to the indexer's top-k keys (V3.2; V3 has no indexer).
    Sparse,
    /// Every earlier key.
    Dense,
    /// Dense for a row whose context (itself included) is shorter than `dense_below` tokens,
    /// sparse after; the indexer is skipped while the whole sequence is that short.
    Auto { dense_below: usize },
}

/// Load-time choices.
#[derive(Clone, Debug)]
pub struct ModelOptions {
    pub attention: AttentionMode,
    /// Overrides the config's `index_topk`.
    pub index_topk: Option<usize>,
    /// Gathered cache rows one attention call of a layer holds at most: a batch whose
    /// sequences attend to more is attended a group of consecutive sequences at a time (a
    /// single sequence may exceed it). Rows the backend reads in place in a paged pool
    /// ([`Backend::reads_in_place`]) are not gathered and count nothing.
    pub attended_bytes: usize,
    /// Expert parallelism: the shards the routed experts are split over (see
    /// [`ExpertShards::from_options`]); each routed expert is uploaded to the shards holding it.
    pub expert_shards: Option<Arc<ExpertShards>>,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            attention: AttentionMode::Sparse,
            index_topk: None,
            attended_bytes: 64 << 20,
            expert_shards: None,
        }
    }
}

struct Indexer<B: Backend> {
    wq_b: B::Weight,
    wk: B::Weight,
    k_norm_weight: B::Tensor,
    k_norm_bias: B::Tensor,
    weights_proj: B::Weight,
}

enum Query<B: Backend> {
    /// `q_b(RMSNorm(q_a(x)))`.
    LowRank {
        q_a: B::Weight,
        norm: B::Tensor,
        q_b: B::Weight,
    },
    /// V3 with `q_lora_rank: null`.
    Full(B::Weight),
}

struct Attention<B: Backend> {
    query: Query<B>,
    kv_a: B::Weight,
    kv_a_norm: B::Tensor,
    kv_b: B::Weight,
    /// `W_UK,hᵀ` of every head (see [`absorbed_query_weight`]).
    uk_t: B::Weight,
    o: B::Weight,
    indexer: Option<Indexer<B>>,
}

enum Mlp<B: Backend> {
    Dense(Expert<B::Weight>),
    Moe {
        gate: B::Weight,
        bias: Vec<f32>,
        /// `bias` as a `[1, experts]` tensor, for a backend that routes where the tensors are
        /// ([`Backend::moe_routed`]).
        bias_row: B::Tensor,
        experts: Vec<Expert<B::Weight>>,
        shared: Option<Expert<B::Weight>>,
    },
}

struct Layer<B: Backend> {
    input_norm: B::Tensor,
    post_attention_norm: B::Tensor,
    attention: Attention<B>,
    mlp: Mlp<B>,
}

/// Which logits a sequence wants back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitRows {
    /// Only the last position (generation).
    Last,
    /// Every position (`logits` subcommand, conformance).
    All,
}

/// One sequence's part of a forward step: new tokens appended to its cache.
#[derive(Debug)]
pub struct SeqStep<'a, B: Backend> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache<B>,
    pub logits: LogitRows,
}

/// The indexer's chosen keys for each query row.
pub type Selection = Vec<Vec<u32>>;

/// Where each sequence's rows sit in a batch.
#[derive(Debug, Default)]
struct BatchRows {
    /// Position of every row in its sequence.
    positions: Vec<usize>,
    /// `(first row, row count)` per sequence.
    spans: Vec<(usize, usize)>,
}

/// What a forward step saw, per layer (for conformance tests and expert-load metrics).
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// Indexer selections per layer (`None`: dense attention), rows of the whole batch.
    pub selections: Vec<Option<Selection>>,
    /// Routing per layer (`None`: dense MLP), rows of the whole batch.
    pub routing: Vec<Option<Routing>>,
    /// The residual stream after the embeddings and after each layer.
    pub hidden: Vec<Vec<f32>>,
}

/// A loaded model on a backend.
pub struct Model<B: Backend> {
    pub config: ModelConfig,
    /// The load-time choices. The attention mode may change after load; the expert shards may
    /// not (the routed experts were uploaded where they said).
    pub options: ModelOptions,
    backend: B,
    embed: B::Weight,
    layers: Vec<Layer<B>>,
    final_norm: B::Tensor,
    lm_head: B::Weight,
    rope: Rope,
    router: RouterConfig,
    weight_bytes: usize,
    expert_load: Arc<ExpertLoad>,
    /// This model's number among those the process loaded ([`crate::backend::BlockId`]).
    serial: u64,
}

impl<B: Backend> Drop for Model<B> {
    fn drop(&mut self) {
        self.backend.forget_blocks(self.serial);
    }
}

impl<B: Backend> std::fmt::Debug for Model<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("arch", &self.config.arch)
            .field("layers", &self.layers.len())
            .field("backend", &self.backend.name())
            .finish()
    }
}

impl<B: Backend> Model<B> {
    /// Loads a Hugging Face model directory.
    pub fn load(dir: &Path, backend: B, options: ModelOptions) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let store = WeightStore::open(dir)?;
        Self::from_store(config, &store, backend, options)
    }

    /// Builds the model from an opened checkpoint.
    pub fn from_store(
        config: ModelConfig,
        store: &WeightStore,
        backend: B,
        options: ModelOptions,
    ) -> Result<Self> {
        if config.attention_bias {
            return Err(EngineError::config(
                "config.json",
                "attention_bias",
                "attention biases are not supported (no DeepSeek-V3/V3.2 checkpoint uses them)",
            ));
        }
        if options.index_topk == Some(0) {
            return Err(EngineError::input("index_topk must be at least 1"));
        }
        if let Some(shards) = &options.expert_shards {
            let planned = shards.plan().num_experts as usize;
            let moe = config.moe_layers.iter().any(|&m| m);
            if !moe || planned != config.n_routed_experts {
                return Err(EngineError::input(format!(
                    "expert shards: the plan places {planned} experts but the model has {} \
                     routed experts per layer{}",
                    config.n_routed_experts,
                    if moe { "" } else { " and no MoE layer" }
                )));
            }
        }
        backend.check_attention(config.mla_dims())?;
        if let Some(ix) = &config.indexer
            && options.attention != AttentionMode::Dense
        {
            backend.check_indexer(ix.n_heads, ix.head_dim)?;
        }
        let c = &config;
        let h = c.hidden_size;
        let upload =
            |name: &str, rows: usize, cols: usize| backend.upload(store.matrix(name, rows, cols)?);
        let vector = |name: &str, len: usize| -> Result<B::Tensor> {
            Ok(backend.tensor(1, len, store.vector(name, len)?))
        };
        let swiglu = |prefix: &str, width: usize| -> Result<Expert<B::Weight>> {
            Ok(Expert {
                gate: upload(&format!("{prefix}.gate_proj.weight"), width, h)?,
                up: upload(&format!("{prefix}.up_proj.weight"), width, h)?,
                down: upload(&format!("{prefix}.down_proj.weight"), h, width)?,
            })
        };

        // The shards holding each routed expert (none: it stays with the other weights).
        let holders = |layer: usize, expert: usize| -> &[usize] {
            options
                .expert_shards
                .as_deref()
                .map_or(&[], |s| s.holders(layer, expert))
        };

        let mut layers = Vec::with_capacity(c.num_layers);
        // Bytes of weights made at load on top of the checkpoint's.
        let mut derived_bytes = 0;
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let qk = c.qk_head_dim();
            let query = match c.q_lora_rank {
                Some(rank) => Query::LowRank {
                    q_a: upload(&format!("{a}.q_a_proj.weight"), rank, h)?,
                    norm: vector(&format!("{a}.q_a_layernorm.weight"), rank)?,
                    q_b: upload(&format!("{a}.q_b_proj.weight"), c.num_heads * qk, rank)?,
                },
                None => Query::Full(upload(&format!("{a}.q_proj.weight"), c.num_heads * qk, h)?),
            };
            let indexer = match (&c.indexer, c.q_lora_rank) {
                (Some(ix), Some(rank)) => {
                    let i = format!("{a}.indexer");
                    Some(Indexer {
                        wq_b: upload(&format!("{i}.wq_b.weight"), ix.n_heads * ix.head_dim, rank)?,
                        wk: upload(&format!("{i}.wk.weight"), ix.head_dim, h)?,
                        k_norm_weight: vector(&format!("{i}.k_norm.weight"), ix.head_dim)?,
                        k_norm_bias: vector(&format!("{i}.k_norm.bias"), ix.head_dim)?,
                        weights_proj: upload(&format!("{i}.weights_proj.weight"), ix.n_heads, h)?,
                    })
                }
                _ => None,
            };
            let kv_b = store.matrix(
                &format!("{a}.kv_b_proj.weight"),
                c.num_heads * (c.qk_nope_head_dim + c.v_head_dim),
                c.kv_lora_rank,
            )?;
            let uk_t = absorbed_query_weight(&kv_b, c.mla_dims());
            derived_bytes += uk_t.stored_bytes();
            let attention = Attention {
                query,
                kv_a: upload(
                    &format!("{a}.kv_a_proj_with_mqa.weight"),
                    c.kv_lora_rank + c.qk_rope_head_dim,
                    h,
                )?,
                kv_a_norm: vector(&format!("{a}.kv_a_layernorm.weight"), c.kv_lora_rank)?,
                kv_b: backend.upload(kv_b)?,
                uk_t: backend.upload(uk_t)?,
                o: upload(&format!("{a}.o_proj.weight"), h, c.num_heads * c.v_head_dim)?,
                indexer,
            };
            let mlp = if c.moe_layers[l] {
                let m = format!("{p}.mlp");
                let im = c.moe_intermediate_size;
                let experts = if store.contains(&format!("{m}.experts.gate_up_proj")) {
                    let gate_up = store.stacked(
                        &format!("{m}.experts.gate_up_proj"),
                        c.n_routed_experts,
                        2 * im,
                        h,
                    )?;
                    let down = store.stacked(
                        &format!("{m}.experts.down_proj"),
                        c.n_routed_experts,
                        h,
                        im,
                    )?;
                    (0..c.n_routed_experts)
                        .map(|e| {
                            let base = e * 2 * im;
                            let upload = |m| backend.upload_expert(m, holders(l, e));
                            Ok(Expert {
                                gate: upload(gate_up.rows_slice(base..base + im))?,
                                up: upload(gate_up.rows_slice(base + im..base + 2 * im))?,
                                down: upload(down.rows_slice(e * h..(e + 1) * h))?,
                            })
                        })
                        .collect::<Result<Vec<_>>>()?
                } else {
                    (0..c.n_routed_experts)
                        .map(|e| {
                            let prefix = format!("{m}.experts.{e}");
                            let upload = |name: &str, rows, cols| {
                                let matrix =
                                    store.matrix(&format!("{prefix}.{name}"), rows, cols)?;
                                backend.upload_expert(matrix, holders(l, e))
                            };
                            Ok(Expert {
                                gate: upload("gate_proj.weight", im, h)?,
                                up: upload("up_proj.weight", im, h)?,
                                down: upload("down_proj.weight", h, im)?,
                            })
                        })
                        .collect::<Result<Vec<_>>>()?
                };
                let shared_width = c.n_shared_experts * im;
                let shared = if shared_width > 0 {
                    Some(swiglu(&format!("{m}.shared_experts"), shared_width)?)
                } else {
                    None
                };
                let bias = store.vector(
                    &format!("{m}.gate.e_score_correction_bias"),
                    c.n_routed_experts,
                )?;
                Mlp::Moe {
                    gate: upload(&format!("{m}.gate.weight"), c.n_routed_experts, h)?,
                    bias_row: backend.tensor(1, c.n_routed_experts, bias.clone()),
                    bias,
                    experts,
                    shared,
                }
            } else {
                Mlp::Dense(swiglu(&format!("{p}.mlp"), c.intermediate_size)?)
            };
            layers.push(Layer {
                input_norm: vector(&format!("{p}.input_layernorm.weight"), h)?,
                post_attention_norm: vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                attention,
                mlp,
            });
        }

        let embed_name = "model.embed_tokens.weight";
        let lm_head = if c.tie_word_embeddings || !store.contains("lm_head.weight") {
            if !c.tie_word_embeddings {
                return Err(EngineError::tensor(
                    "lm_head.weight",
                    &store.dir(),
                    "missing (and tie_word_embeddings is false)",
                ));
            }
            upload(embed_name, c.vocab_size, h)?
        } else {
            upload("lm_head.weight", c.vocab_size, h)?
        };
        Ok(Self {
            embed: upload(embed_name, c.vocab_size, h)?,
            final_norm: vector("model.norm.weight", h)?,
            lm_head,
            rope: Rope::new(c),
            router: RouterConfig::from(c),
            weight_bytes: store.total_bytes() + derived_bytes,
            expert_load: Arc::new(ExpertLoad::new(
                &c.moe_layers
                    .iter()
                    .map(|&moe| if moe { c.n_routed_experts } else { 0 })
                    .collect::<Vec<_>>(),
            )),
            layers,
            backend,
            options,
            config,
            serial: {
                static MODELS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                MODELS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
        })
    }

    /// The backend this model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Routed-token counters per layer and expert (shared; cumulative since load).
    pub fn expert_load(&self) -> Arc<ExpertLoad> {
        self.expert_load.clone()
    }

    /// Bytes of the checkpoint files.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// The indexer's k (after the override), if the model has an indexer.
    pub fn index_topk(&self) -> Option<usize> {
        self.config
            .indexer
            .as_ref()
            .map(|ix| self.options.index_topk.unwrap_or(ix.topk))
    }

    /// An empty cache for one sequence.
    pub fn new_cache(&self) -> SeqCache<B> {
        let c = &self.config;
        let layers = (0..c.num_layers)
            .map(|_| LayerCache {
                latent: self.backend.empty(c.kv_lora_rank),
                k_pe: self.backend.empty(c.qk_rope_head_dim),
                index_keys: c.indexer.as_ref().map(|ix| self.backend.empty(ix.head_dim)),
            })
            .collect();
        SeqCache::new(layers)
    }

    /// A paged KV store of `blocks` blocks of `block_size` tokens, its rows kept as `dtype`
    /// (as the model keeps it: [`KvDtype::for_model`]; zero-filled, allocated once), for caches
    /// made with [`SeqCache::paged`].
    pub fn new_paged_pool(
        &self,
        block_size: usize,
        blocks: usize,
        dtype: KvDtype,
    ) -> Result<SharedPool<B>> {
        let c = &self.config;
        let dtype = dtype.for_model(c);
        let rows = block_size * blocks;
        let store = |cols: usize| self.backend.kv_store(rows, cols, dtype);
        let layers = (0..c.num_layers)
            .map(|_| {
                Ok(PoolLayer {
                    latent: store(c.kv_lora_rank)?,
                    k_pe: self
                        .backend
                        .kv_store(rows, c.qk_rope_head_dim, dtype.rope_keys())?,
                    index_keys: c
                        .indexer
                        .as_ref()
                        .map(|ix| store(ix.head_dim))
                        .transpose()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(KvPool::new(block_size, layers))
    }

    /// Runs new tokens of several sequences through the model, appending to their caches.
    /// Returns the requested logits per sequence (`[rows · vocab]`, row-major).
    pub fn forward(
        &self,
        batch: &mut [SeqStep<'_, B>],
        trace: Option<&mut Trace>,
    ) -> Result<Vec<Vec<f32>>> {
        self.backend.install(|| {
            let tokens: Vec<usize> = batch.iter().map(|s| s.tokens.len()).collect();
            let groups = match trace {
                Some(_) => 1, // a trace records one pass
                None => self.backend.batch_groups(&tokens).min(batch.len()),
            };
            // Every sequence is checked before any cache changes, so a bad one fails the
            // whole batch with no group's caches advanced.
            for step in batch.iter() {
                self.check_step(step)?;
            }
            if groups <= 1 {
                return self.forward_on_backend(batch, trace);
            }
            let total: usize = tokens.iter().sum();
            let parts = split_by_tokens(batch, &tokens, groups)
                .into_iter()
                .map(|part| {
                    let part_tokens: usize = part.iter().map(|s| s.tokens.len()).sum();
                    // A part well over its fair share is left free to split (see map_parts).
                    (part, part_tokens * groups * 4 <= total * 5)
                })
                .collect();
            let logits =
                crate::linalg::map_parts(parts, |part| self.forward_on_backend(part, None));
            let mut all = Vec::with_capacity(batch.len());
            for part in logits {
                all.extend(part?);
            }
            Ok(all)
        })
    }

    fn forward_on_backend(
        &self,
        batch: &mut [SeqStep<'_, B>],
        mut trace: Option<&mut Trace>,
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let b = &self.backend;
        let mut tokens = Vec::new();
        let mut rows = BatchRows::default();
        for step in batch.iter() {
            let start = step.cache.len();
            rows.spans.push((tokens.len(), step.tokens.len()));
            tokens.extend_from_slice(step.tokens);
            rows.positions.extend(start..start + step.tokens.len());
        }

        let mut h = b.embed(&self.embed, &tokens);
        if let Some(t) = trace.as_deref_mut() {
            t.hidden.push(b.to_host(&h));
        }
        // The step's routed-token counts per (layer, expert) where the backend routed on the
        // device (a row a layer), read back once, after the logits.
        let mut device_load = None;
        for (l, layer) in self.layers.iter().enumerate() {
            let x = b.rms_norm(&h, &layer.input_norm, c.rms_norm_eps);
            let (attn, selections) = self.attention(l, layer, &x, &rows, batch, trace.is_some())?;
            b.add(&mut h, &attn);
            // A trace reads the routing, which only the host's holds.
            let tracing = trace.is_some();
            let mut routing = None;
            let mut block = |h: &mut B::Tensor, load: &mut Option<B::Tensor>| {
                let x = b.rms_norm(h, &layer.post_attention_norm, c.rms_norm_eps);
                let (mlp, routed) = self.mlp(l, &layer.mlp, &x, tracing, load);
                routing = routed;
                b.add(h, &mlp);
            };
            match trace.as_deref_mut() {
                Some(t) => {
                    block(&mut h, &mut device_load);
                    t.selections.push(selections);
                    t.routing.push(routing);
                    t.hidden.push(b.to_host(&h));
                }
                None => {
                    let id = BlockId {
                        model: self.serial,
                        layer: l,
                    };
                    // A dense layer's block is given no counts, which it would not touch.
                    let mut none = None;
                    let load = match layer.mlp {
                        Mlp::Moe { .. } => &mut device_load,
                        Mlp::Dense(_) => &mut none,
                    };
                    b.mlp_block(id, &mut h, load, &mut block);
                }
            }
        }
        for step in batch.iter_mut() {
            step.cache.advance(step.tokens.len());
        }

        // Logits only for the rows that asked for them, gathered in one go.
        let mut wanted = Vec::new();
        for (step, &(start, len)) in batch.iter().zip(&rows.spans) {
            match step.logits {
                LogitRows::Last => wanted.push(start + len - 1),
                LogitRows::All => wanted.extend(start..start + len),
            }
        }
        let selected = b.select_rows(&h, &wanted);
        let normed = b.rms_norm(&selected, &self.final_norm, c.rms_norm_eps);
        let logits = b.to_host(&b.linear(&normed, &self.lm_head));
        if let Some(load) = device_load {
            let counts = b.to_host(&load);
            for (layer, row) in counts.chunks(self.router.n_experts).enumerate() {
                self.expert_load.add(layer, row);
                // A layer the host routed has a row of zeros here: its shards counted already.
                if let Some(shards) = &self.options.expert_shards {
                    shards.count_routed(layer, row);
                }
            }
        }
        let mut out = Vec::with_capacity(batch.len());
        let mut offset = 0;
        for (step, &(_, len)) in batch.iter().zip(&rows.spans) {
            let rows = match step.logits {
                LogitRows::Last => 1,
                LogitRows::All => len,
            };
            out.push(logits[offset * c.vocab_size..(offset + rows) * c.vocab_size].to_vec());
            offset += rows;
        }
        Ok(out)
    }

    /// A sequence's step is valid input: new tokens, all in the vocabulary, with room in its
    /// cache.
    fn check_step(&self, step: &SeqStep<'_, B>) -> Result<()> {
        let vocab = self.config.vocab_size;
        if step.tokens.is_empty() {
            return Err(EngineError::input(
                "a sequence in the batch has no new tokens",
            ));
        }
        if let Some(&bad) = step.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::input(format!(
                "token id {bad} is out of range: the vocabulary has {vocab} tokens (ids 0..{})",
                vocab - 1
            )));
        }
        let needed = step.cache.len() + step.tokens.len();
        if needed > step.cache.capacity() {
            return Err(EngineError::input(format!(
                "the KV cache holds {} tokens of this sequence, {needed} needed",
                step.cache.capacity(),
            )));
        }
        Ok(())
    }

    /// Logits at every position of `tokens` from an empty cache (`[n · vocab]`).
    pub fn logits(&self, tokens: &[u32], trace: Option<&mut Trace>) -> Result<Vec<f32>> {
        let mut cache = self.new_cache();
        let mut batch = [SeqStep {
            tokens,
            cache: &mut cache,
            logits: LogitRows::All,
        }];
        Ok(self.forward(&mut batch, trace)?.remove(0))
    }

    fn attention(
        &self,
        layer_index: usize,
        layer: &Layer<B>,
        x: &B::Tensor,
        rows: &BatchRows,
        batch: &mut [SeqStep<'_, B>],
        tracing: bool,
    ) -> Result<(B::Tensor, Option<Selection>)> {
        let (positions, spans) = (rows.positions.as_slice(), rows.spans.as_slice());
        let c = &self.config;
        let b = &self.backend;
        let att = &layer.attention;
        let dims = c.mla_dims();
        let mla_layout = if c.rope_interleave {
            RopeLayout::Interleaved
        } else {
            RopeLayout::HalfSplit
        };

        let (mut q, q_latent) = match &att.query {
            Query::LowRank { q_a, norm, q_b } => {
                let cq = b.rms_norm(&b.linear(x, q_a), norm, LATENT_NORM_EPS);
                (b.linear(&cq, q_b), Some(cq))
            }
            Query::Full(w) => (b.linear(x, w), None),
        };
        b.rope(
            &mut q,
            c.num_heads,
            c.qk_head_dim(),
            c.qk_nope_head_dim,
            positions,
            &self.rope,
            mla_layout,
        );
        let ckv = b.linear(x, &att.kv_a);
        let latent = b.rms_norm(
            &b.columns(&ckv, 0, c.kv_lora_rank),
            &att.kv_a_norm,
            LATENT_NORM_EPS,
        );
        let mut k_pe = b.columns(&ckv, c.kv_lora_rank, c.qk_rope_head_dim);
        b.rope(
            &mut k_pe,
            1,
            c.qk_rope_head_dim,
            0,
            positions,
            &self.rope,
            mla_layout,
        );

        // The indexer's keys are cached even when this step attends densely, so a sequence
        // that grows past the dense threshold can switch to sparse attention.
        let indexer_inputs = match (&att.indexer, &q_latent, &c.indexer) {
            (Some(ix), Some(cq), Some(ixc)) => {
                let mut qi = b.linear(cq, &ix.wq_b);
                b.rope(
                    &mut qi,
                    ixc.n_heads,
                    ixc.head_dim,
                    0,
                    positions,
                    &self.rope,
                    RopeLayout::HalfSplit,
                );
                let mut ki = b.layer_norm(
                    &b.linear(x, &ix.wk),
                    &ix.k_norm_weight,
                    &ix.k_norm_bias,
                    LATENT_NORM_EPS,
                );
                b.rope(
                    &mut ki,
                    1,
                    ixc.head_dim,
                    0,
                    positions,
                    &self.rope,
                    RopeLayout::HalfSplit,
                );
                // DeepSeek-V3.2 rotates both by a Hadamard matrix before its fp8 indexer rounds
                // them. An orthonormal rotation leaves every score as it was in exact
                // arithmetic; what it changes is what a pool rounds (fp8 most): values whose
                // outliers are spread over the head, as the model was trained with.
                if ixc.head_dim.is_power_of_two() {
                    b.hadamard(&mut qi, ixc.head_dim);
                    b.hadamard(&mut ki, ixc.head_dim);
                }
                // weights_proj's n_heads^-0.5 and the q·k scale are positive constants: they
                // scale every score of a row alike and cannot change the top-k, so only the
                // q·k scale is kept (it sits inside the ReLU, where it is harmless too).
                let w = b.linear(x, &ix.weights_proj);
                Some((qi, ki, w, (ixc.head_dim as f32).powf(-0.5)))
            }
            _ => None,
        };

        let scale = c.softmax_scale();
        let mut traced: Vec<Vec<u32>> = Vec::new();
        let mut any_sparse = false;
        // The batch's new rows go into its caches (a paged batch: one write a store); then the
        // indexer picks every sparse sequence's keys in one call, and one call attends for the
        // whole batch.
        let k = self.index_topk().unwrap_or(usize::MAX);
        let mut caches: Vec<&mut SeqCache<B>> = batch.iter_mut().map(|s| &mut *s.cache).collect();
        let new_keys = indexer_inputs.as_ref().map(|(_, ki, _, _)| ki);
        append_batch(b, layer_index, &mut caches, spans, &latent, &k_pe, new_keys)?;
        drop(caches);
        let mut appended = Vec::with_capacity(batch.len());
        for (step, &(start, len)) in batch.iter_mut().zip(spans) {
            let total = step.cache.len() + len;
            let sparse = match self.options.attention {
                AttentionMode::Sparse => true,
                AttentionMode::Dense => false,
                AttentionMode::Auto { dense_below } => total >= dense_below,
            };
            // The indexer runs (and reads its keys) only when it has more keys than it keeps.
            let indexed = indexer_inputs.is_some() && sparse && total > k;
            appended.push((step, start, len, total, indexed));
        }
        let queries: Vec<IndexQuery<'_, B>> = appended
            .iter()
            .filter(|(.., indexed)| *indexed)
            .map(|&(ref step, start, len, total, _)| IndexQuery {
                cache: step.cache,
                total,
                first: start,
                positions: &positions[start..start + len],
            })
            .collect();
        // The picks stay on the device when the backend keeps them for these caches (the
        // CUDA backend, for one pool it reads in place), unless the host needs them: to trace
        // them, or to let rows of a context shorter than dense_below attend to every key.
        let host_needs_picks = tracing
            || match self.options.attention {
                AttentionMode::Auto { dense_below } => queries
                    .iter()
                    .flat_map(|query| query.positions)
                    .any(|&p| p + 1 < dense_below),
                _ => false,
            };
        let kept = match &indexer_inputs {
            Some((qi, _, w, ix_scale)) if !host_needs_picks => {
                index_keep(b, layer_index, &queries, qi, w, k, *ix_scale)?
            }
            _ => None,
        };
        let mut selections = match &indexer_inputs {
            Some((qi, _, w, ix_scale)) if kept.is_none() => {
                index_select(b, layer_index, &queries, qi, w, k, *ix_scale)?.into_iter()
            }
            _ => Vec::new().into_iter(),
        };
        drop(queries);
        let mut kept_seqs = 0..;
        let mut attended = Vec::with_capacity(appended.len());
        for (step, start, len, total, indexed) in appended {
            let seq_positions = &positions[start..start + len];
            // The indexed sequences are the kept picks' sequences, in order.
            let kept_as = (indexed && kept.is_some())
                .then(|| kept_seqs.next())
                .flatten();
            let selection = if indexed && kept.is_none() {
                selections.next().flatten()
            } else {
                None
            };
            // Auto: a row attends to every earlier key while its own context is shorter than
            // dense_below, whichever chunk it came in, so chunking cannot change its keys.
            let selection = match (selection, self.options.attention) {
                (Some(mut rows), AttentionMode::Auto { dense_below }) => {
                    for (keys, &p) in rows.iter_mut().zip(seq_positions) {
                        if p + 1 < dense_below {
                            *keys = (0..=p as u32).collect();
                        }
                    }
                    Some(rows)
                }
                (selection, _) => selection,
            };
            let widest = match (&selection, kept_as) {
                (_, Some(_)) => Some(k.min(total)),
                (Some(s), None) => Some(s.iter().map(Vec::len).max().unwrap_or(0)),
                (None, None) => None,
            };
            let form = attention_form(len, total, widest, dims);
            if tracing {
                match &selection {
                    Some(sel) => {
                        any_sparse = true;
                        traced.extend(sel.iter().cloned());
                    }
                    None => traced.extend(seq_positions.iter().map(|&p| (0..=p as u32).collect())),
                }
            }
            attended.push(Attend {
                step,
                selection,
                kept: kept_as,
                total,
                span: (start, len),
                form,
            });
        }
        // The attended rows of consecutive sequences are gathered and attended together, a
        // group at a time, so a batch of long contexts holds about `attended_bytes` of
        // gathered rows at once, not all of them (a step of short ones is one group, and so is
        // a step whose rows are all read in place).
        let weights = MlaWeights {
            kv_b: &att.kv_b,
            uk_t: &att.uk_t,
        };
        let row_bytes = (c.kv_lora_rank + c.qk_rope_head_dim) * std::mem::size_of::<f32>();
        let mut pending = attended.into_iter().peekable();
        let mut parts = Vec::new();
        while pending.peek().is_some() {
            let mut group = Vec::new();
            let mut bytes = 0;
            // The pool the group's attention will read in place (its first sequence's that the
            // backend reads in place: see `locked` below).
            let mut in_place_pool = None;
            while let Some(next) = pending.peek() {
                // Rows the backend reads where they are (the group's pool, where the backend
                // reads it in place, as the CUDA backend does) are not copied: they cost
                // nothing here, so a decode step's batch in one pool is one call. Rows of any
                // other pool are gathered, and count.
                let pool = next.step.cache.pool_id();
                let in_place = next.step.cache.read_pool(b, layer_index)?.is_some()
                    && in_place_pool.is_none_or(|p| Some(p) == pool);
                // Kept picks are rows of the pool the attention reads in place (which a group
                // of its own gives them).
                if next.kept.is_some() && !in_place && !group.is_empty() {
                    break;
                }
                let rows = match &next.selection {
                    _ if in_place => 0,
                    Some(s) => s.iter().map(Vec::len).sum::<usize>().min(next.total),
                    None => next.total,
                };
                if !group.is_empty() && bytes + rows * row_bytes > self.options.attended_bytes {
                    break;
                }
                bytes += rows * row_bytes;
                if in_place {
                    in_place_pool = in_place_pool.or(pool);
                }
                group.extend(pending.next());
            }
            let first = group[0].span.0;
            let (last_start, last_len) = group[group.len() - 1].span;
            let n = last_start + last_len - first;
            let selections: Vec<_> = group.iter_mut().map(|a| a.selection.take()).collect();
            // The pool of the group's paged caches (one, in the server), read-locked while
            // attention reads its rows in place, where the backend can (the CUDA backend).
            let mut locked = None;
            for a in &group {
                let step: &SeqStep<'_, B> = a.step;
                if let Some(read) = step.cache.read_pool(b, layer_index)? {
                    locked = Some(read);
                    break;
                }
            }
            let rows: Vec<_> = group
                .iter()
                .zip(selections)
                .map(|(a, selection)| {
                    let step: &SeqStep<'_, B> = a.step;
                    let rows = step.cache.attended_rows(
                        b,
                        layer_index,
                        a.total,
                        selection,
                        locked.as_ref(),
                    )?;
                    if a.kept.is_some() && rows.rows.is_none() {
                        return Err(EngineError::Device(
                            "the indexer kept its picks on the device for a pool the attention \
                             does not read in place"
                                .into(),
                        ));
                    }
                    Ok(rows)
                })
                .collect::<Result<_>>()?;
            let seqs: Vec<MlaSeq<'_, B::Tensor, B::Store, B::Picks>> = rows
                .iter()
                .zip(&group)
                .map(|(r, a)| MlaSeq {
                    first: a.span.0 - first,
                    cached: r.cached(),
                    positions: &positions[a.span.0..a.span.0 + a.span.1],
                    selection: match (kept.as_ref(), a.kept) {
                        (Some(picks), Some(seq)) => Some(backend::Selection::Kept { picks, seq }),
                        _ => r.selection.as_deref().map(backend::Selection::Listed),
                    },
                    rows: r.rows,
                    form: a.form,
                })
                .collect();
            parts.push(if n == positions.len() {
                b.mla_attention(&q, &seqs, weights, dims, scale)
            } else {
                b.mla_attention(&b.rows(&q, first, n), &seqs, weights, dims, scale)
            });
        }
        let attn = match parts.len() {
            1 => parts.remove(0),
            _ => b.concat_rows(&parts.iter().collect::<Vec<_>>()),
        };
        let all_selections = any_sparse.then_some(traced);
        let out = b.linear(&attn, &att.o);
        Ok((out, all_selections))
    }

    /// A layer's MLP. A MoE layer routes where the tensors are ([`Backend::moe_routed`], its
    /// counts in `device_load`, which the backend makes on first use) unless a trace asks for
    /// the routing or the backend cannot; otherwise its router logits come to the host, which
    /// routes them, counts each choice in [`ExpertLoad`] and, with expert shards, deals the
    /// pairs to them.
    fn mlp(
        &self,
        layer_index: usize,
        mlp: &Mlp<B>,
        x: &B::Tensor,
        tracing: bool,
        device_load: &mut Option<B::Tensor>,
    ) -> (B::Tensor, Option<Routing>) {
        let b = &self.backend;
        let (gate, bias, bias_row, experts, shared) = match mlp {
            Mlp::Dense(expert) => return (b.swiglu(x, expert), None),
            Mlp::Moe {
                gate,
                bias,
                bias_row,
                experts,
                shared,
            } => (gate, bias, bias_row, experts, shared),
        };
        let logits = b.linear(x, gate);
        let layer = (layer_index, self.layers.len());
        let routed = (!tracing)
            .then(|| {
                b.moe_routed(
                    x,
                    &logits,
                    bias_row,
                    &self.router,
                    experts,
                    device_load,
                    layer,
                    self.options.expert_shards.as_deref(),
                )
            })
            .flatten();
        let (mut y, routing) = match routed {
            Some(y) => (y, None),
            None => {
                let logits = b.to_host(&logits);
                let mut routing = Routing::default();
                for row in logits.chunks(self.router.n_experts) {
                    let (ids, weights) = route(row, bias, &self.router);
                    self.expert_load.record(layer_index, &ids);
                    routing.experts.push(ids);
                    routing.weights.push(weights);
                }
                let y = match &self.options.expert_shards {
                    Some(shards) => {
                        b.moe_experts_sharded(x, &shards.dispatch(layer_index, &routing), experts)
                    }
                    None => b.moe_experts(x, &routing, experts),
                };
                (y, Some(routing))
            }
        };
        if let Some(shared) = shared {
            b.add(&mut y, &b.swiglu(x, shared));
        }
        (y, routing)
    }

    /// The expert shards, when [`ModelOptions::expert_shards`] set them up.
    pub fn expert_shards(&self) -> Option<&Arc<ExpertShards>> {
        self.options.expert_shards.as_ref()
    }

    /// The architecture.
    pub fn arch(&self) -> Arch {
        self.config.arch
    }
}

/// One sequence's attention in a layer, between its indexer and the attention call.
struct Attend<S> {
    step: S,
    selection: Option<Selection>,
    /// Its sequence in the picks the backend kept on the device, when it kept them (and then
    /// `selection` is `None`).
    kept: Option<usize>,
    /// Tokens visible after this step (cached + new).
    total: usize,
    /// Its rows in the batch: (first, count).
    span: (usize, usize),
    form: AttentionForm,
}

/// Picks the cheaper MLA form by multiply-adds: expanded builds per-head keys and values for
/// every cached token; absorbed folds `kv_b_proj` into each query and works in the latent space.
fn attention_form(
    queries: usize,
    cached: usize,
    selected: Option<usize>,
    d: MlaDims,
) -> AttentionForm {
    let keys = selected.unwrap_or(cached).min(cached);
    let kv_width = d.nope + d.v;
    let expanded =
        cached * d.heads * kv_width * d.latent + queries * keys * d.heads * (d.nope + d.rope + d.v);
    let absorbed = queries * d.heads * kv_width * d.latent
        + queries * keys * d.heads * (2 * d.latent + d.rope);
    if absorbed < expanded {
        AttentionForm::Absorbed
    } else {
        AttentionForm::Expanded
    }
}

/// `batch` cut into `groups` contiguous parts (so their outputs concatenate in batch order)
/// with about equal numbers of new tokens (`tokens[s]` for sequence `s`); none empty.
fn split_by_tokens<'b, T>(
    mut batch: &'b mut [T],
    tokens: &[usize],
    groups: usize,
) -> Vec<&'b mut [T]> {
    let total: usize = tokens.iter().sum();
    let mut parts = Vec::with_capacity(groups);
    let (mut start, mut seen) = (0, 0);
    for g in 1..groups {
        // The first index whose running total reaches g/groups of the tokens, leaving at least
        // one sequence for each later part.
        let target = total * g / groups;
        let mut end = start + 1;
        seen += tokens[start];
        while end < tokens.len() - (groups - g) && seen + tokens[end] <= target {
            seen += tokens[end];
            end += 1;
        }
        let (part, rest) = batch.split_at_mut(end - start);
        parts.push(part);
        batch = rest;
        start = end;
    }
    parts.push(batch);
    parts
}

#[cfg(test)]
mod tests {
    use super::split_by_tokens;

    #[test]
    fn batch_parts_are_contiguous_balanced_and_never_empty() {
        for (tokens, groups) in [
            (vec![1; 32], 2),
            (vec![1; 32], 3),
            (vec![200, 1, 1, 1], 2),
            (vec![1, 1, 1, 200], 2),
            (vec![5, 5], 2),
            (vec![7, 1, 1, 1, 50, 1, 1, 1, 1, 1, 1, 30], 4),
            (vec![3, 4, 5], 3),
        ] {
            let mut batch: Vec<usize> = (0..tokens.len()).collect();
            let parts = split_by_tokens(&mut batch, &tokens, groups);
            assert_eq!(parts.len(), groups, "{tokens:?}");
            assert!(parts.iter().all(|p| !p.is_empty()), "{tokens:?}: {parts:?}");
            let order: Vec<usize> = parts.iter().flat_map(|p| p.iter().copied()).collect();
            assert_eq!(order, (0..tokens.len()).collect::<Vec<_>>(), "{tokens:?}");
            // Balanced: no part exceeds an equal share by more than its largest sequence.
            let total: usize = tokens.iter().sum();
            let largest = *tokens.iter().max().unwrap();
            for p in &parts {
                let sum: usize = p.iter().map(|&i| tokens[i]).sum();
                assert!(sum <= total / groups + largest, "{tokens:?}: {parts:?}");
            }
        }
    }
}
