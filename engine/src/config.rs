//! `config.json` of a Hugging Face DeepSeek-V3.2 (`deepseek_v32`) or V3 (`deepseek_v3`) model.
//!
//! Reads both the layout transformers 5 writes (`rope_parameters`, `mlp_layer_types`) and the
//! one DeepSeek's released checkpoints use (`rope_theta` + `rope_scaling`). Shape fields are
//! required (a default sized for the 671B model would only fail later, on a tensor); fields
//! with a semantic default take transformers' default. Every error names the file and field.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{EngineError, Result};

// Bounds on config.json's sizes, each far past DeepSeek's releases (61 layers, 128 heads,
// widths up to 18432, 256 experts, 163840 positions), so that a product of a few of them (a
// tensor's expected shape, a buffer's length) cannot overflow and a hostile file is refused by
// field instead of aborting an allocation.
const MAX_LAYERS: usize = 1 << 12;
const MAX_HEADS: usize = 1 << 12;
const MAX_WIDTH: usize = 1 << 18;
/// RoPE rotates at most 256 pairs ([`crate::rope::Rope::apply`]'s buffers).
const MAX_ROPE_DIM: usize = 512;
const MAX_VOCAB: usize = 1 << 24;
const MAX_POSITIONS: usize = 1 << 26;
/// As the operator's placement plans (`MAX_EXPERTS` there).
const MAX_EXPERTS: usize = 4096;
const MAX_SHARED_EXPERTS: usize = 64;

/// Which architecture the checkpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// DeepSeek-V3.2: MLA + DSA lightning indexer + MoE.
    V32,
    /// DeepSeek-V3: MLA (dense causal attention) + MoE.
    V3,
}

/// RoPE frequency scaling.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    Default,
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        mscale: f64,
        mscale_all_dim: f64,
        attention_factor: Option<f64>,
        truncate: bool,
    },
}

/// How the checkpoint's fp8 scales are rounded (`quantization_config.scale_fmt`): what an fp8
/// KV cache follows ([`crate::kv_cache::KvDtype::for_model`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScaleFmt {
    /// A block's largest magnitude over 448, as it falls (no `scale_fmt`: V3).
    #[default]
    Float32,
    /// Rounded up to a power of two (`"ue8m0"`: V3.1 and V3.2).
    Ue8m0,
}

/// Indexer (DSA) dimensions, V3.2 only.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexerConfig {
    pub n_heads: usize,
    pub head_dim: usize,
    pub topk: usize,
}

/// Everything in config.json that changes the math.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// `None`: a plain `q_proj` (V3 only).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// V3 only: MLA RoPE layout (V3.2 is always interleaved).
    pub rope_interleave: bool,
    pub attention_bias: bool,
    pub max_position_embeddings: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub n_routed_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub n_shared_experts: usize,
    pub routed_scaling_factor: f32,
    pub norm_topk_prob: bool,
    /// `moe_layers[l]`: layer `l` is a MoE layer (else a dense MLP).
    pub moe_layers: Vec<bool>,
    pub tie_word_embeddings: bool,
    pub indexer: Option<IndexerConfig>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub scale_fmt: ScaleFmt,
}

impl ModelConfig {
    /// Reads `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parses config.json text; `origin` names the file in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| EngineError::config(origin, "(file)", format!("invalid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| EngineError::config(origin, "(file)", "expected a JSON object"))?;
        let f = Fields { obj, origin };

        let model_type = f.string("model_type")?;
        let arch = match model_type.as_str() {
            "deepseek_v32" => Arch::V32,
            "deepseek_v3" => Arch::V3,
            other => {
                return Err(EngineError::config(
                    origin,
                    "model_type",
                    format!(
                        "unsupported model_type {other:?}; sparsemoe serves deepseek_v32 and deepseek_v3"
                    ),
                ));
            }
        };

        let num_layers = f.usize_req("num_hidden_layers", MAX_LAYERS)?;
        let num_heads = f.usize_req("num_attention_heads", MAX_HEADS)?;
        if let Some(kv_heads) = f.usize_opt("num_key_value_heads")?
            && kv_heads != num_heads
        {
            return Err(EngineError::config(
                origin,
                "num_key_value_heads",
                format!("must equal num_attention_heads ({num_heads}) for MLA, got {kv_heads}"),
            ));
        }
        let q_lora_rank = f.usize_at_most("q_lora_rank", MAX_WIDTH)?;
        if arch == Arch::V32 && q_lora_rank.is_none() {
            return Err(EngineError::config(
                origin,
                "q_lora_rank",
                "deepseek_v32 needs q_lora_rank (the indexer reads the query latent)",
            ));
        }
        let qk_rope_head_dim = f.usize_req("qk_rope_head_dim", MAX_ROPE_DIM)?;
        if qk_rope_head_dim % 2 != 0 {
            return Err(EngineError::config(
                origin,
                "qk_rope_head_dim",
                "must be even (RoPE rotates pairs)",
            ));
        }

        let (rope_theta, rope_scaling) = rope(&f)?;
        let max_position_embeddings = f
            .usize_at_most("max_position_embeddings", MAX_POSITIONS)?
            .unwrap_or(if arch == Arch::V32 { 163_840 } else { 4096 });

        let n_routed_experts = f.usize_req("n_routed_experts", MAX_EXPERTS)?;
        let num_experts_per_tok = f.usize_req("num_experts_per_tok", MAX_EXPERTS)?;
        let n_group = f.usize_at_most("n_group", MAX_EXPERTS)?.unwrap_or(8);
        let topk_group = f.usize_at_most("topk_group", MAX_EXPERTS)?.unwrap_or(4);
        if n_group == 0 || topk_group == 0 || topk_group > n_group {
            return Err(EngineError::config(
                origin,
                if n_group == 0 {
                    "n_group"
                } else {
                    "topk_group"
                },
                format!(
                    "the router keeps topk_group ({topk_group}) of n_group ({n_group}) expert \
                     groups: both must be positive, topk_group at most n_group"
                ),
            ));
        }
        if n_routed_experts % n_group != 0 || n_routed_experts / n_group < 2 && n_group > 1 {
            return Err(EngineError::config(
                origin,
                "n_group",
                format!(
                    "n_routed_experts ({n_routed_experts}) must split into n_group ({n_group}) groups of at least 2"
                ),
            ));
        }
        if num_experts_per_tok > n_routed_experts
            || num_experts_per_tok > topk_group * (n_routed_experts / n_group)
        {
            return Err(EngineError::config(
                origin,
                "num_experts_per_tok",
                format!(
                    "{num_experts_per_tok} experts per token cannot be chosen from topk_group ({topk_group}) groups of {} experts",
                    n_routed_experts / n_group
                ),
            ));
        }

        // The router the engine implements (DeepSeek-V3's `Gate`): anything else is refused
        // rather than routed wrongly.
        for (key, only) in [("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")] {
            let value = match obj.contains_key(key) {
                true => f.string(key)?,
                false => continue,
            };
            if value != only {
                return Err(EngineError::config(
                    origin,
                    key,
                    format!(
                        "{value:?} is not supported: sparsemoe routes as DeepSeek-V3 does ({key} {only:?})"
                    ),
                ));
            }
        }
        // The MLPs the engine implements: SiLU-gated, no biases (transformers' defaults).
        if obj.contains_key("hidden_act") {
            let act = f.string("hidden_act")?;
            if act != "silu" {
                return Err(EngineError::config(
                    origin,
                    "hidden_act",
                    format!("{act:?} is not supported: sparsemoe's MLPs are SiLU-gated (\"silu\")"),
                ));
            }
        }
        if f.bool_opt("mlp_bias")? == Some(true) {
            return Err(EngineError::config(
                origin,
                "mlp_bias",
                "true is not supported: sparsemoe's MLPs have no biases",
            ));
        }
        let first_k_dense = f
            .usize_at_most("first_k_dense_replace", MAX_LAYERS)?
            .unwrap_or(3);
        // DeepSeek's own modelling code (as vLLM): a MoE layer every `moe_layer_freq` layers
        // after the dense ones (1 in every release).
        let moe_every = f.usize_at_most("moe_layer_freq", MAX_LAYERS)?.unwrap_or(1);
        if moe_every == 0 {
            return Err(EngineError::config(
                origin,
                "moe_layer_freq",
                "must be at least 1",
            ));
        }
        let moe_layers = match obj.get("mlp_layer_types") {
            Some(Value::Array(kinds)) if arch == Arch::V32 => {
                if kinds.len() != num_layers {
                    return Err(EngineError::config(
                        origin,
                        "mlp_layer_types",
                        format!("has {} entries for {num_layers} layers", kinds.len()),
                    ));
                }
                kinds
                    .iter()
                    .map(|k| match k.as_str() {
                        Some("sparse") => Ok(true),
                        Some("dense") => Ok(false),
                        _ => Err(EngineError::config(
                            origin,
                            "mlp_layer_types",
                            format!("entries must be \"dense\" or \"sparse\", got {k}"),
                        )),
                    })
                    .collect::<Result<Vec<bool>>>()?
            }
            Some(other) if arch == Arch::V32 && !other.is_null() => {
                return Err(EngineError::config(
                    origin,
                    "mlp_layer_types",
                    format!("expected an array of \"dense\" and \"sparse\", got {other}"),
                ));
            }
            _ => (0..num_layers)
                .map(|l| l >= first_k_dense && l % moe_every == 0)
                .collect(),
        };

        let indexer = if arch == Arch::V32 {
            let head_dim = f.usize_req("index_head_dim", MAX_WIDTH)?;
            if head_dim < qk_rope_head_dim {
                return Err(EngineError::config(
                    origin,
                    "index_head_dim",
                    format!("must be at least qk_rope_head_dim ({qk_rope_head_dim})"),
                ));
            }
            let topk = f
                .usize_at_most("index_topk", MAX_POSITIONS)?
                .unwrap_or(2048);
            if topk == 0 {
                return Err(EngineError::config(
                    origin,
                    "index_topk",
                    "must be at least 1 (each query attends to the keys the indexer picks)",
                ));
            }
            Some(IndexerConfig {
                n_heads: f.usize_req("index_n_heads", MAX_HEADS)?,
                head_dim,
                topk,
            })
        } else {
            None
        };

        let eos_token_ids = match obj.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(ids)) => ids
                .iter()
                .map(|v| {
                    as_u32(v).ok_or_else(|| {
                        EngineError::config(origin, "eos_token_id", "expected token ids")
                    })
                })
                .collect::<Result<_>>()?,
            Some(v) => vec![as_u32(v).ok_or_else(|| {
                EngineError::config(
                    origin,
                    "eos_token_id",
                    format!("expected a token id, got {v}"),
                )
            })?],
        };

        let config = Self {
            arch,
            vocab_size: f.usize_req("vocab_size", MAX_VOCAB)?,
            hidden_size: f.usize_req("hidden_size", MAX_WIDTH)?,
            num_layers,
            num_heads,
            q_lora_rank,
            kv_lora_rank: f.usize_req("kv_lora_rank", MAX_WIDTH)?,
            qk_nope_head_dim: f.usize_req("qk_nope_head_dim", MAX_WIDTH)?,
            qk_rope_head_dim,
            v_head_dim: f.usize_req("v_head_dim", MAX_WIDTH)?,
            rms_norm_eps: f.f64_within("rms_norm_eps", 1e-6, 0.0..=1.0)? as f32,
            rope_theta,
            rope_scaling,
            rope_interleave: arch == Arch::V32 || f.bool_opt("rope_interleave")?.unwrap_or(true),
            attention_bias: f.bool_opt("attention_bias")?.unwrap_or(false),
            max_position_embeddings,
            intermediate_size: f.usize_req("intermediate_size", MAX_WIDTH)?,
            moe_intermediate_size: f.usize_req("moe_intermediate_size", MAX_WIDTH)?,
            n_routed_experts,
            num_experts_per_tok,
            n_group,
            topk_group,
            n_shared_experts: f
                .usize_at_most("n_shared_experts", MAX_SHARED_EXPERTS)?
                .unwrap_or(1),
            routed_scaling_factor: f.f64_within("routed_scaling_factor", 2.5, 1e-6..=1e6)? as f32,
            norm_topk_prob: f.bool_opt("norm_topk_prob")?.unwrap_or(true),
            moe_layers,
            tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            indexer,
            bos_token_id: match obj.get("bos_token_id") {
                None | Some(Value::Null) => None,
                Some(v) => Some(as_u32(v).ok_or_else(|| {
                    EngineError::config(
                        origin,
                        "bos_token_id",
                        format!("expected a token id, got {v}"),
                    )
                })?),
            },
            eos_token_ids,
            scale_fmt: quantization(&f)?,
        };
        Ok(config)
    }

    /// The multi-head latent attention's dimensions.
    pub fn mla_dims(&self) -> crate::backend::MlaDims {
        crate::backend::MlaDims {
            heads: self.num_heads,
            nope: self.qk_nope_head_dim,
            rope: self.qk_rope_head_dim,
            v: self.v_head_dim,
            latent: self.kv_lora_rank,
        }
    }

    /// Query/key head width: nope + rope parts.
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// The attention softmax scale, with YaRN's mscale² where it applies.
    pub fn softmax_scale(&self) -> f32 {
        let base = (self.qk_head_dim() as f64).powf(-0.5);
        match &self.rope_scaling {
            RopeScaling::Yarn {
                factor,
                mscale_all_dim,
                ..
            } if *mscale_all_dim != 0.0 => {
                let m = yarn_mscale(*factor, *mscale_all_dim);
                (base * m * m) as f32
            }
            _ => base as f32,
        }
    }
}

/// YaRN's attention magnitude correction `0.1·k·ln(s) + 1` (1 for s ≤ 1).
pub fn yarn_mscale(scale: f64, k: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * k * scale.ln() + 1.0
    }
}

/// `quantization_config`, where there is one: DeepSeek's fp8 releases say `quant_method: "fp8"`,
/// `fmt: "e4m3"`, `weight_block_size: [128, 128]` and, from V3.1 on, `scale_fmt: "ue8m0"`. The
/// loader reads e4m3 weights with a scale per 128 × 128 block (their `_scale_inv` tensors) and
/// nothing else, so any other method, format or block is refused here by name rather than met
/// later as a tensor of the wrong shape. Returns the scale format.
fn quantization(f: &Fields<'_>) -> Result<ScaleFmt> {
    let q = match f.obj.get("quantization_config") {
        None | Some(Value::Null) => return Ok(ScaleFmt::default()),
        Some(Value::Object(q)) => q,
        Some(other) => {
            return Err(EngineError::config(
                f.origin,
                "quantization_config",
                format!("expected an object, got {other}"),
            ));
        }
    };
    let refuse = |key: &str, got: &Value, supported: &str| {
        EngineError::config(
            f.origin,
            &format!("quantization_config.{key}"),
            format!("{got} is not supported: sparsemoe reads {supported}"),
        )
    };
    for (key, only) in [("quant_method", "fp8"), ("fmt", "e4m3")] {
        match q.get(key) {
            None | Some(Value::Null) => {}
            Some(v) if v.as_str() == Some(only) => {}
            Some(v) => return Err(refuse(key, v, &format!("{only:?}"))),
        }
    }
    let block = crate::weights::FP8_BLOCK as u64;
    match q.get("weight_block_size") {
        None | Some(Value::Null) => {}
        Some(Value::Array(b)) if b.len() == 2 && b.iter().all(|v| v.as_u64() == Some(block)) => {}
        Some(v) => {
            return Err(refuse(
                "weight_block_size",
                v,
                &format!("[{block}, {block}]"),
            ));
        }
    }
    match q.get("scale_fmt") {
        None | Some(Value::Null) => Ok(ScaleFmt::Float32),
        Some(v) if v.as_str() == Some("ue8m0") => Ok(ScaleFmt::Ue8m0),
        Some(v) => Err(refuse("scale_fmt", v, "\"ue8m0\" or no scale_fmt")),
    }
}

fn rope(f: &Fields<'_>) -> Result<(f64, RopeScaling)> {
    // transformers 5: `rope_parameters`; DeepSeek's releases: `rope_theta` + `rope_scaling`.
    let (params, field) = match f.obj.get("rope_parameters") {
        Some(Value::Object(p)) => (Some(p), "rope_parameters"),
        Some(Value::Null) | None => match f.obj.get("rope_scaling") {
            Some(Value::Object(p)) => (Some(p), "rope_scaling"),
            Some(Value::Null) | None => (None, "rope_scaling"),
            Some(other) => {
                return Err(EngineError::config(
                    f.origin,
                    "rope_scaling",
                    format!("expected an object, got {other}"),
                ));
            }
        },
        Some(other) => {
            return Err(EngineError::config(
                f.origin,
                "rope_parameters",
                format!("expected an object, got {other}"),
            ));
        }
    };
    let theta_in_params = params.and_then(|p| p.get("rope_theta")).cloned();
    let theta = match &theta_in_params {
        Some(v) => v.as_f64().ok_or_else(|| {
            EngineError::config(
                f.origin,
                &format!("{field}.rope_theta"),
                "expected a number",
            )
        })?,
        None => f.f64_opt("rope_theta")?.unwrap_or(10_000.0),
    };
    // Frequencies are theta^(-2i/d): a base at or below 1 gives no rotation to tell positions
    // apart (and YaRN divides by its logarithm).
    if !(theta > 1.0 && theta.is_finite()) {
        return Err(EngineError::config(
            f.origin,
            &match theta_in_params {
                Some(_) => format!("{field}.rope_theta"),
                None => "rope_theta".into(),
            },
            format!("must be a number above 1, got {theta}"),
        ));
    }
    let Some(p) = params else {
        return Ok((theta, RopeScaling::Default));
    };
    let kind = match p.get("rope_type").or_else(|| p.get("type")) {
        None | Some(Value::Null) => "default",
        Some(Value::String(kind)) => kind.as_str(),
        Some(other) => {
            return Err(EngineError::config(
                f.origin,
                &format!("{field}.rope_type"),
                format!("expected a string, got {other}"),
            ));
        }
    };
    let num = |key: &str| -> Result<Option<f64>> {
        match p.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                EngineError::config(
                    f.origin,
                    &format!("{field}.{key}"),
                    format!("expected a number, got {v}"),
                )
            }),
        }
    };
    match kind {
        "default" => Ok((theta, RopeScaling::Default)),
        "yarn" => {
            let original = num("original_max_position_embeddings")?.ok_or_else(|| {
                EngineError::config(
                    f.origin,
                    &format!("{field}.original_max_position_embeddings"),
                    "required for yarn",
                )
            })?;
            let positive = |key: &str, x: f64| {
                if x > 0.0 && x.is_finite() {
                    Ok(x)
                } else {
                    Err(EngineError::config(
                        f.origin,
                        &format!("{field}.{key}"),
                        format!("must be a positive number, got {x}"),
                    ))
                }
            };
            let original = positive("original_max_position_embeddings", original)?;
            let factor = match num("factor")? {
                Some(x) => x,
                None => f.f64_opt("max_position_embeddings")?.unwrap_or(original) / original,
            };
            // YaRN's magnitude correction 0.1·m·ln(s) + 1 stays positive for m ≥ 0.
            let at_least_zero = |key: &str| match num(key)? {
                Some(x) if x < 0.0 => Err(EngineError::config(
                    f.origin,
                    &format!("{field}.{key}"),
                    format!("must not be negative, got {x}"),
                )),
                x => Ok(x.unwrap_or(0.0)),
            };
            let truncate = match p.get("truncate") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(EngineError::config(
                        f.origin,
                        &format!("{field}.truncate"),
                        format!("expected true or false, got {other}"),
                    ));
                }
            };
            Ok((
                theta,
                RopeScaling::Yarn {
                    factor: positive("factor", factor)?,
                    original_max_position_embeddings: original,
                    beta_fast: positive("beta_fast", num("beta_fast")?.unwrap_or(32.0))?,
                    beta_slow: positive("beta_slow", num("beta_slow")?.unwrap_or(1.0))?,
                    mscale: at_least_zero("mscale")?,
                    mscale_all_dim: at_least_zero("mscale_all_dim")?,
                    attention_factor: match num("attention_factor")? {
                        Some(a) => Some(positive("attention_factor", a)?),
                        None => None,
                    },
                    truncate,
                },
            ))
        }
        other => Err(EngineError::config(
            f.origin,
            &format!("{field}.rope_type"),
            format!("unsupported RoPE type {other:?}; supported: default, yarn"),
        )),
    }
}

fn as_u32(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|x| u32::try_from(x).ok())
}

struct Fields<'a> {
    obj: &'a Map<String, Value>,
    origin: &'a str,
}

impl Fields<'_> {
    fn string(&self, key: &str) -> Result<String> {
        match self.obj.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(EngineError::config(
                self.origin,
                key,
                format!("expected a string, got {v}"),
            )),
            None => Err(EngineError::config(self.origin, key, "missing")),
        }
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                EngineError::config(
                    self.origin,
                    key,
                    format!("expected a non-negative integer, got {v}"),
                )
            }),
        }
    }

    /// An optional count of at most `most`.
    fn usize_at_most(&self, key: &str, most: usize) -> Result<Option<usize>> {
        match self.usize_opt(key)? {
            Some(x) if x > most => Err(EngineError::config(
                self.origin,
                key,
                format!("{x} is past the most sparsemoe reads ({most})"),
            )),
            other => Ok(other),
        }
    }

    /// A required positive count of at most `most`.
    fn usize_req(&self, key: &str, most: usize) -> Result<usize> {
        match self.usize_at_most(key, most)? {
            Some(0) => Err(EngineError::config(self.origin, key, "must be positive")),
            Some(x) => Ok(x),
            None => Err(EngineError::config(self.origin, key, "missing")),
        }
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                EngineError::config(self.origin, key, format!("expected a number, got {v}"))
            }),
        }
    }

    /// An optional number in `range` (`default` where absent).
    fn f64_within(
        &self,
        key: &str,
        default: f64,
        range: std::ops::RangeInclusive<f64>,
    ) -> Result<f64> {
        let x = self.f64_opt(key)?.unwrap_or(default);
        if range.contains(&x) {
            Ok(x)
        } else {
            Err(EngineError::config(
                self.origin,
                key,
                format!("{x} is outside {} to {}", range.start(), range.end()),
            ))
        }
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(EngineError::config(
                self.origin,
                key,
                format!("expected true or false, got {v}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"model_type": "deepseek_v32", "vocab_size": 256, "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "intermediate_size": 64,
        "moe_intermediate_size": 16, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4,
        "topk_group": 2, "first_k_dense_replace": 1, "index_n_heads": 4, "index_head_dim": 16}"#;

    fn with(key: &str, value: &str) -> String {
        let mut v: Value = serde_json::from_str(MINIMAL).unwrap();
        if value == "REMOVE" {
            v.as_object_mut().unwrap().remove(key);
        } else {
            v[key] = serde_json::from_str(value).unwrap();
        }
        v.to_string()
    }

    #[test]
    fn defaults_follow_transformers() {
        let c = ModelConfig::from_json(MINIMAL, "config.json").unwrap();
        assert_eq!(c.moe_layers, vec![false, true]);
        assert_eq!(c.indexer.as_ref().unwrap().topk, 2048);
        assert_eq!(c.routed_scaling_factor, 2.5);
        assert!(c.rope_interleave && c.norm_topk_prob && !c.tie_word_embeddings);
        assert_eq!(c.rope_scaling, RopeScaling::Default);
        assert!((c.softmax_scale() - 24f32.powf(-0.5)).abs() < 1e-7);
    }

    #[test]
    fn deepseek_release_yarn_gives_the_published_softmax_scale() {
        let mut v: Value = serde_json::from_str(MINIMAL).unwrap();
        v["qk_nope_head_dim"] = 128.into();
        v["qk_rope_head_dim"] = 64.into();
        v["index_head_dim"] = 128.into();
        v["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 40, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1});
        let c = ModelConfig::from_json(&v.to_string(), "config.json").unwrap();
        assert!(
            (c.softmax_scale() - 0.135_234).abs() < 1e-5,
            "{}",
            c.softmax_scale()
        );
    }

    /// DeepSeek's released values are accepted, and `moe_layer_freq` spaces the MoE layers as
    /// DeepSeek's modelling code does.
    #[test]
    fn router_fields_and_moe_layer_spacing() {
        let mut v: Value = serde_json::from_str(MINIMAL).unwrap();
        v["scoring_func"] = "sigmoid".into();
        v["topk_method"] = "noaux_tc".into();
        v["num_hidden_layers"] = 6.into();
        v["first_k_dense_replace"] = 1.into();
        let c = ModelConfig::from_json(&v.to_string(), "config.json").unwrap();
        assert_eq!(c.moe_layers, [false, true, true, true, true, true]);
        v["moe_layer_freq"] = 2.into();
        let c = ModelConfig::from_json(&v.to_string(), "config.json").unwrap();
        assert_eq!(c.moe_layers, [false, false, true, false, true, false]);
    }

    /// DeepSeek's own `quantization_config`s: V3's (no `scale_fmt`) and V3.2's (UE8M0 scales).
    #[test]
    fn released_quantization_configs_give_their_scale_format() {
        let v3 = r#"{"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": [128, 128]}"#;
        let v32 = r#"{"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}"#;
        for (q, want) in [
            ("REMOVE", ScaleFmt::Float32),
            ("null", ScaleFmt::Float32),
            (v3, ScaleFmt::Float32),
            (v32, ScaleFmt::Ue8m0),
        ] {
            let c = ModelConfig::from_json(&with("quantization_config", q), "c").unwrap();
            assert_eq!(c.scale_fmt, want, "{q}");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (with("hidden_size", "REMOVE"), "hidden_size", "missing"),
            (
                with("hidden_size", "\"64\""),
                "hidden_size",
                "expected a non-negative integer",
            ),
            (
                with("model_type", "\"llama\""),
                "model_type",
                "unsupported model_type",
            ),
            (
                with("num_key_value_heads", "2"),
                "num_key_value_heads",
                "must equal",
            ),
            (with("n_group", "3"), "n_group", "groups"),
            (
                with("num_experts_per_tok", "7"),
                "num_experts_per_tok",
                "cannot be chosen",
            ),
            (with("qk_rope_head_dim", "7"), "qk_rope_head_dim", "even"),
            (
                with("norm_topk_prob", "1"),
                "norm_topk_prob",
                "true or false",
            ),
            (
                with("rope_parameters", r#"{"rope_type": "longrope"}"#),
                "rope_type",
                "unsupported",
            ),
            (
                with("index_head_dim", "REMOVE"),
                "index_head_dim",
                "missing",
            ),
            (
                with("scoring_func", "\"softmax\""),
                "scoring_func",
                "not supported",
            ),
            (
                with("topk_method", "\"greedy\""),
                "topk_method",
                "not supported",
            ),
            (with("moe_layer_freq", "0"), "moe_layer_freq", "at least 1"),
            (with("index_topk", "0"), "index_topk", "at least 1"),
            (
                with("quantization_config", r#"{"quant_method": "awq"}"#),
                "quantization_config.quant_method",
                "not supported",
            ),
            (
                with("quantization_config", r#"{"fmt": "e5m2"}"#),
                "quantization_config.fmt",
                "not supported",
            ),
            (
                with("quantization_config", r#"{"weight_block_size": [64, 64]}"#),
                "quantization_config.weight_block_size",
                "[128, 128]",
            ),
            (
                with("quantization_config", r#"{"scale_fmt": "e8m0fnu"}"#),
                "quantization_config.scale_fmt",
                "not supported",
            ),
            (
                with("quantization_config", "[]"),
                "quantization_config",
                "expected an object",
            ),
            // Sizes past any release would overflow shapes or abort allocations.
            (
                with("num_hidden_layers", "1000000000000000"),
                "num_hidden_layers",
                "past the most",
            ),
            (
                with("num_attention_heads", "9223372036854775808"),
                "num_attention_heads",
                "past the most",
            ),
            (
                with("qk_rope_head_dim", "1024"),
                "qk_rope_head_dim",
                "reads (512)",
            ),
            (with("n_group", "0"), "n_group", "both must be positive"),
            (
                with("topk_group", "0"),
                "topk_group",
                "both must be positive",
            ),
            (with("topk_group", "5"), "topk_group", "at most n_group"),
            (
                with("bos_token_id", "4294967296"),
                "bos_token_id",
                "expected a token id",
            ),
            (with("rope_theta", "1"), "rope_theta", "above 1"),
            (
                with(
                    "rope_scaling",
                    r#"{"type": "yarn", "original_max_position_embeddings": 0}"#,
                ),
                "rope_scaling.original_max_position_embeddings",
                "positive",
            ),
            (
                with(
                    "rope_scaling",
                    r#"{"type": "yarn", "original_max_position_embeddings": 64, "beta_fast": 0}"#,
                ),
                "rope_scaling.beta_fast",
                "positive",
            ),
            (
                with(
                    "rope_scaling",
                    r#"{"type": "yarn", "original_max_position_embeddings": 64, "mscale": -1}"#,
                ),
                "rope_scaling.mscale",
                "negative",
            ),
            (
                with(
                    "rope_scaling",
                    r#"{"type": "yarn", "original_max_position_embeddings": 64, "truncate": 1}"#,
                ),
                "rope_scaling.truncate",
                "true or false",
            ),
            (
                with("rope_scaling", r#"{"type": 5}"#),
                "rope_scaling.rope_type",
                "expected a string",
            ),
            (with("hidden_act", "\"gelu\""), "hidden_act", "SiLU"),
            (with("mlp_bias", "true"), "mlp_bias", "no biases"),
            (with("rms_norm_eps", "-1"), "rms_norm_eps", "outside"),
            (
                with("routed_scaling_factor", "0"),
                "routed_scaling_factor",
                "outside",
            ),
            (
                with("mlp_layer_types", "\"sparse\""),
                "mlp_layer_types",
                "expected an array",
            ),
        ];
        for (text, field, words) in cases {
            let err = ModelConfig::from_json(&text, "m/config.json")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("m/config.json") && err.contains(field) && err.contains(words),
                "{err}"
            );
        }
        let err = ModelConfig::from_json("{", "m/config.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid JSON"), "{err}");
    }
}
