//! Per-sequence attention state: for every layer the MLA latent (`kv_lora_rank` values) and the
//! shared RoPE key (`qk_rope_head_dim`) of each token, plus the indexer key (`index_head_dim`)
//! for V3.2. That is all decode needs: 512 + 64 + 128 floats per token and layer on the real
//! model, against 128 heads × (192 + 128) for an expanded cache.

use crate::backend::Backend;

/// One layer's cached rows.
pub struct LayerCache<B: Backend> {
    pub latent: B::Tensor,
    pub k_pe: B::Tensor,
    pub index_keys: Option<B::Tensor>,
}

impl<B: Backend> std::fmt::Debug for LayerCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LayerCache")
    }
}

/// The cache of one sequence.
pub struct SeqCache<B: Backend> {
    len: usize,
    layers: Vec<LayerCache<B>>,
}

impl<B: Backend> std::fmt::Debug for SeqCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SeqCache(len {}, {} layers)",
            self.len,
            self.layers.len()
        )
    }
}

impl<B: Backend> SeqCache<B> {
    pub fn new(layers: Vec<LayerCache<B>>) -> Self {
        Self { len: 0, layers }
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn layer_mut(&mut self, layer: usize) -> &mut LayerCache<B> {
        &mut self.layers[layer]
    }

    /// Marks `tokens` more tokens as cached (after every layer appended their rows).
    pub(crate) fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }
}
