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

/// Bytes one cached token takes across all layers (f32 latent + rope key + indexer key).
pub fn bytes_per_token(config: &crate::config::ModelConfig) -> usize {
    let per_layer = config.kv_lora_rank
        + config.qk_rope_head_dim
        + config.indexer.as_ref().map_or(0, |ix| ix.head_dim);
    per_layer * config.num_layers * std::mem::size_of::<f32>()
}

/// Fixed-size KV blocks: a free list and per-sequence block tables. The scheduler admits,
/// grows and preempts sequences by blocks, so the cache's memory is bounded by
/// `total_blocks · block_size · bytes_per_token` whatever the traffic.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_size: usize,
    total: usize,
    free: Vec<u32>,
}

/// The blocks one sequence holds, in token order (token `t` lives in `blocks[t / block_size]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    pub blocks: Vec<u32>,
}

impl BlockAllocator {
    /// `total` blocks of `block_size` tokens.
    pub fn new(block_size: usize, total: usize) -> Self {
        let block_size = block_size.max(1);
        // Pop from the end: hand out low block ids first (easier to read in logs).
        let free = (0..total as u32).rev().collect();
        Self {
            block_size,
            total,
            free,
        }
    }

    /// As many blocks as `budget_bytes` holds for a model with `bytes_per_token`.
    pub fn from_budget(block_size: usize, budget_bytes: usize, bytes_per_token: usize) -> Self {
        let block_bytes = block_size.max(1) * bytes_per_token.max(1);
        Self::new(block_size, budget_bytes / block_bytes)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.total
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Tokens the whole cache holds.
    pub fn capacity_tokens(&self) -> usize {
        self.total * self.block_size
    }

    /// Fraction of blocks in use (0 when idle, 1 when full).
    pub fn usage(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        (self.total - self.free.len()) as f64 / self.total as f64
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Extra blocks `table` needs to hold `tokens` tokens in all.
    pub fn missing(&self, table: &BlockTable, tokens: usize) -> usize {
        self.blocks_for(tokens).saturating_sub(table.blocks.len())
    }

    /// Grows `table` to hold `tokens` tokens; `false` (and no change) when there are too few
    /// free blocks.
    pub fn grow(&mut self, table: &mut BlockTable, tokens: usize) -> bool {
        let missing = self.missing(table, tokens);
        if missing > self.free.len() {
            return false;
        }
        for _ in 0..missing {
            // Cannot fail: checked above.
            if let Some(block) = self.free.pop() {
                table.blocks.push(block);
            }
        }
        true
    }

    /// Returns all of `table`'s blocks to the free list.
    pub fn release(&mut self, table: &mut BlockTable) {
        self.free.append(&mut table.blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_allocated_grown_and_freed() {
        let mut a = BlockAllocator::new(4, 3);
        let mut t = BlockTable::default();
        assert!(a.grow(&mut t, 5));
        assert_eq!(t.blocks.len(), 2);
        assert!(a.grow(&mut t, 8), "still fits in two blocks");
        assert_eq!(a.free_blocks(), 1);
        let mut u = BlockTable::default();
        assert!(!a.grow(&mut u, 9), "needs three, one is free");
        assert!(u.blocks.is_empty(), "a failed grow takes nothing");
        assert!((a.usage() - 2.0 / 3.0).abs() < 1e-9);
        a.release(&mut t);
        assert_eq!(a.free_blocks(), 3);
        assert_eq!(a.usage(), 0.0);
        assert!(a.grow(&mut u, 12));
    }

    #[test]
    fn budget_sizes_the_pool() {
        let a = BlockAllocator::from_budget(16, 16 * 100 * 10 + 5, 100);
        assert_eq!(a.total_blocks(), 10);
        assert_eq!(a.capacity_tokens(), 160);
    }
}
