//! Rotary position embeddings: one cos/sin table (with YaRN) shared by MLA and the indexer,
//! applied in two layouts — interleaved pairs (MLA) and half-split / NeoX pairs (indexer).

use crate::config::{ModelConfig, RopeScaling, yarn_mscale};

/// How the rotated pairs are laid out in a vector of `dim` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs `(x[2i], x[2i+1])`.
    Interleaved,
    /// Pairs `(x[i], x[i + dim/2])`.
    HalfSplit,
}

/// Per-frequency inverse wavelengths and the cos/sin magnitude (YaRN `attention_factor`).
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
    attention_factor: f32,
}

impl Rope {
    /// The table for a model's `qk_rope_head_dim`.
    pub fn new(config: &ModelConfig) -> Self {
        let dim = config.qk_rope_head_dim;
        let theta = config.rope_theta;
        let base: Vec<f64> = (0..dim / 2)
            .map(|i| {
                // transformers computes the exponent in float32 (`arange(0, dim, 2).float() / dim`).
                let exponent = (2 * i) as f32 / dim as f32;
                1.0 / (theta as f32).powf(exponent) as f64
            })
            .collect();
        match &config.rope_scaling {
            RopeScaling::Default => Self {
                inv_freq: base.iter().map(|&f| f as f32).collect(),
                attention_factor: 1.0,
            },
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                attention_factor,
                truncate,
            } => {
                let correction = |rotations: f64| {
                    dim as f64
                        * (original_max_position_embeddings
                            / (rotations * 2.0 * std::f64::consts::PI))
                            .ln()
                        / (2.0 * theta.ln())
                };
                let (mut low, mut high) = (correction(*beta_fast), correction(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(dim as f64 - 1.0);
                if low == high {
                    high += 0.001;
                }
                let inv_freq = base
                    .iter()
                    .enumerate()
                    .map(|(i, &f)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0) as f32;
                        let extrapolation = f as f32;
                        let interpolation = (f / factor) as f32;
                        interpolation * ramp + extrapolation * (1.0 - ramp)
                    })
                    .collect();
                let attention_factor = match attention_factor {
                    Some(a) => *a,
                    None if *mscale != 0.0 && *mscale_all_dim != 0.0 => {
                        yarn_mscale(*factor, *mscale) / yarn_mscale(*factor, *mscale_all_dim)
                    }
                    None => yarn_mscale(*factor, 1.0),
                };
                Self {
                    inv_freq,
                    attention_factor: attention_factor as f32,
                }
            }
        }
    }

    /// Rotary dimension (pairs × 2).
    pub fn dim(&self) -> usize {
        self.inv_freq.len() * 2
    }

    /// cos and sin of every pair at `position`, scaled by the attention factor.
    pub fn cos_sin(&self, position: usize, cos: &mut [f32], sin: &mut [f32]) {
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let angle = position as f32 * f;
            cos[i] = angle.cos() * self.attention_factor;
            sin[i] = angle.sin() * self.attention_factor;
        }
    }

    /// Rotates `x[..dim]` in place for `position`.
    pub fn apply(&self, x: &mut [f32], position: usize, layout: RopeLayout) {
        let half = self.inv_freq.len();
        let mut cos = [0f32; 256];
        let mut sin = [0f32; 256];
        assert!(half <= 256, "rope dim above 512 is not supported");
        self.cos_sin(position, &mut cos[..half], &mut sin[..half]);
        for i in 0..half {
            let (a, b) = match layout {
                RopeLayout::Interleaved => (2 * i, 2 * i + 1),
                RopeLayout::HalfSplit => (i, i + half),
            };
            let (xa, xb) = (x[a], x[b]);
            x[a] = xa * cos[i] - xb * sin[i];
            x[b] = xb * cos[i] + xa * sin[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(scaling: RopeScaling) -> ModelConfig {
        let text = r#"{"model_type": "deepseek_v3", "vocab_size": 8, "hidden_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 1, "kv_lora_rank": 4,
            "qk_nope_head_dim": 4, "qk_rope_head_dim": 8, "v_head_dim": 4, "intermediate_size": 8,
            "moe_intermediate_size": 4, "n_routed_experts": 2, "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1}"#;
        let mut c = ModelConfig::from_json(text, "t").unwrap();
        c.rope_scaling = scaling;
        c
    }

    #[test]
    fn rotation_preserves_norm_and_layouts_pair_differently() {
        let rope = Rope::new(&config(RopeScaling::Default));
        let x: Vec<f32> = (0..8).map(|i| i as f32 + 1.0).collect();
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
        let mut a = x.clone();
        rope.apply(&mut a, 5, RopeLayout::Interleaved);
        let mut b = x.clone();
        rope.apply(&mut b, 5, RopeLayout::HalfSplit);
        assert!((norm(&a) - norm(&x)).abs() < 1e-4);
        assert!((norm(&b) - norm(&x)).abs() < 1e-4);
        assert!(a.iter().zip(&b).any(|(p, q)| (p - q).abs() > 1e-3));
        // Position 0 is the identity.
        let mut c = x.clone();
        rope.apply(&mut c, 0, RopeLayout::Interleaved);
        assert_eq!(c, x);
    }

    #[test]
    fn yarn_slows_low_frequencies_and_keeps_high_ones() {
        let plain = Rope::new(&config(RopeScaling::Default));
        let yarn = Rope::new(&config(RopeScaling::Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096.0,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 1.0,
            attention_factor: None,
            truncate: true,
        }));
        assert_eq!(yarn.inv_freq[0], plain.inv_freq[0]);
        let last = plain.inv_freq.len() - 1;
        assert!((yarn.inv_freq[last] - plain.inv_freq[last] / 40.0).abs() < 1e-9);
        assert_eq!(yarn.attention_factor, 1.0);
    }
}
