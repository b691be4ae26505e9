//! `config.json` of a Hugging Face DeepSeek-V3.2 (`deepseek_v32`) or V3 (`deepseek_v3`) model.
//!
//! Reads both the layout transformers 5 writes (`rope_parameters`, `mlp_layer_types`) and the
//! one DeepSeek's released checkpoints use (`rope_theta` + `rope_scaling`). Shape fields are
//! required (a default sized for the 671B model would only fail later, on a tensor); fields
//! with a semantic default take transformers' default. Every error names the file and field.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{EngineError, Result};

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

        let num_layers = f.usize_req("num_hidden_layers")?;
        let num_heads = f.usize_req("num_attention_heads")?;
        if let Some(kv_heads) = f.usize_opt("num_key_value_heads")?
            && kv_heads != num_heads
        {
            return Err(EngineError::config(
                origin,
                "num_key_value_heads",
                format!("must equal num_attention_heads ({num_heads}) for MLA, got {kv_heads}"),
            ));
        }
        let q_lora_rank = f.usize_opt("q_lora_rank")?;
        if arch == Arch::V32 && q_lora_rank.is_none() {
            return Err(EngineError::config(
                origin,
                "q_lora_rank",
                "deepseek_v32 needs q_lora_rank (the indexer reads the query latent)",
            ));
        }
        let qk_rope_head_dim = f.usize_req("qk_rope_head_dim")?;
        if qk_rope_head_dim % 2 != 0 {
            return Err(EngineError::config(
                origin,
                "qk_rope_head_dim",
                "must be even (RoPE rotates pairs)",
            ));
        }

        let (rope_theta, rope_scaling) = rope(&f)?;
        let max_position_embeddings = f
            .usize_opt("max_position_embeddings")?
            .unwrap_or(if arch == Arch::V32 { 163_840 } else { 4096 });
        let rope_scaling = match rope_scaling {
            RopeScaling::Yarn { factor, .. } if factor <= 0.0 => {
                return Err(EngineError::config(
                    origin,
                    "rope_scaling.factor",
                    "must be positive",
                ));
            }
            other => other,
        };

        let n_routed_experts = f.usize_req("n_routed_experts")?;
        let num_experts_per_tok = f.usize_req("num_experts_per_tok")?;
        let n_group = f.usize_opt("n_group")?.unwrap_or(8).max(1);
        let topk_group = f.usize_opt("topk_group")?.unwrap_or(4).min(n_group);
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
        let first_k_dense = f.usize_opt("first_k_dense_replace")?.unwrap_or(3);
        // DeepSeek's own modelling code (as vLLM): a MoE layer every `moe_layer_freq` layers
        // after the dense ones (1 in every release).
        let moe_every = f.usize_opt("moe_layer_freq")?.unwrap_or(1);
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
            _ => (0..num_layers)
                .map(|l| l >= first_k_dense && l % moe_every == 0)
                .collect(),
        };

        let indexer = if arch == Arch::V32 {
            let head_dim = f.usize_req("index_head_dim")?;
            if head_dim < qk_rope_head_dim {
                return Err(EngineError::config(
                    origin,
                    "index_head_dim",
                    format!("must be at least qk_rope_head_dim ({qk_rope_head_dim})"),
                ));
            }
            let topk = f.usize_opt("index_topk")?.unwrap_or(2048);
            if topk == 0 {
                return Err(EngineError::config(
                    origin,
                    "index_topk",
                    "must be at least 1 (each query attends to the keys the indexer picks)",
                ));
            }
            Some(IndexerConfig {
                n_heads: f.usize_req("index_n_heads")?,
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
            vocab_size: f.usize_req("vocab_size")?,
            hidden_size: f.usize_req("hidden_size")?,
            num_layers,
            num_heads,
            q_lora_rank,
            kv_lora_rank: f.usize_req("kv_lora_rank")?,
            qk_nope_head_dim: f.usize_req("qk_nope_head_dim")?,
            qk_rope_head_dim,
            v_head_dim: f.usize_req("v_head_dim")?,
            rms_norm_eps: f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            rope_interleave: arch == Arch::V32 || f.bool_opt("rope_interleave")?.unwrap_or(true),
            attention_bias: f.bool_opt("attention_bias")?.unwrap_or(false),
            max_position_embeddings,
            intermediate_size: f.usize_req("intermediate_size")?,
            moe_intermediate_size: f.usize_req("moe_intermediate_size")?,
            n_routed_experts,
            num_experts_per_tok,
            n_group,
            topk_group,
            n_shared_experts: f.usize_opt("n_shared_experts")?.unwrap_or(1),
            routed_scaling_factor: f.f64_opt("routed_scaling_factor")?.unwrap_or(2.5) as f32,
            norm_topk_prob: f.bool_opt("norm_topk_prob")?.unwrap_or(true),
            moe_layers,
            tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            indexer,
            bos_token_id: f.usize_opt("bos_token_id")?.map(|v| v as u32),
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
    let theta = match theta_in_params {
        Some(v) => v.as_f64().ok_or_else(|| {
            EngineError::config(
                f.origin,
                &format!("{field}.rope_theta"),
                "expected a number",
            )
        })?,
        None => f.f64_opt("rope_theta")?.unwrap_or(10_000.0),
    };
    let Some(p) = params else {
        return Ok((theta, RopeScaling::Default));
    };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
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
            let factor = match num("factor")? {
                Some(x) => x,
                None => f.f64_opt("max_position_embeddings")?.unwrap_or(original) / original,
            };
            Ok((
                theta,
                RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: num("beta_fast")?.unwrap_or(32.0),
                    beta_slow: num("beta_slow")?.unwrap_or(1.0),
                    mscale: num("mscale")?.unwrap_or(0.0),
                    mscale_all_dim: num("mscale_all_dim")?.unwrap_or(0.0),
                    attention_factor: num("attention_factor")?,
                    truncate: p.get("truncate").and_then(Value::as_bool).unwrap_or(true),
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

    fn usize_req(&self, key: &str) -> Result<usize> {
        match self.usize_opt(key)? {
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
