//! Per-sequence attention state: for every layer the MLA latent (`kv_lora_rank` values) and the
//! shared RoPE key (`qk_rope_head_dim`) of each token, plus the indexer key (`index_head_dim`)
//! for V3.2. That is all decode needs: 512 + 64 + 128 floats per token and layer on the real
//! model, against 128 heads × (192 + 128) for an expanded cache.

use std::ops::Deref;
use std::sync::{Arc, RwLock};

use crate::backend::Backend;
use crate::error::{EngineError, Result};

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

/// The paged store shared by the sequences of a server: per layer, `blocks · block_size` rows
/// of latent, RoPE key and indexer key. Token `t` of a sequence lives in row
/// `table[t / block_size] · block_size + t % block_size`.
pub struct KvPool<B: Backend> {
    block_size: usize,
    layers: Vec<LayerCache<B>>,
}

impl<B: Backend> std::fmt::Debug for KvPool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KvPool({} layers, block {})",
            self.layers.len(),
            self.block_size
        )
    }
}

/// A pool shared between sequences. The engine's thread and, when a step's batch is split into
/// groups run side by side, the pool's threads lock it to copy rows in (a write lock) or out (a
/// read lock; copies out run side by side). Each sequence only touches its own blocks.
pub type SharedPool<B> = Arc<RwLock<KvPool<B>>>;

impl<B: Backend> KvPool<B> {
    /// `layers` zero-filled layer stores of `rows = blocks · block_size` rows each.
    pub fn new(block_size: usize, layers: Vec<LayerCache<B>>) -> SharedPool<B> {
        Arc::new(RwLock::new(Self { block_size, layers }))
    }
}

enum Storage<B: Backend> {
    /// Rows appended to tensors owned by the sequence (CLI, tests, conformance).
    Contiguous(Vec<LayerCache<B>>),
    /// Rows in a shared pool, addressed through the sequence's block table.
    Paged {
        pool: SharedPool<B>,
        table: Vec<u32>,
        block_size: usize,
    },
}

/// A tensor borrowed from a contiguous cache or gathered from the pool.
pub enum CacheRows<'a, T> {
    Borrowed(&'a T),
    Owned(T),
}

impl<T> Deref for CacheRows<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Self::Borrowed(t) => t,
            Self::Owned(t) => t,
        }
    }
}

impl<T> std::fmt::Debug for CacheRows<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Borrowed(_) => "CacheRows::Borrowed",
            Self::Owned(_) => "CacheRows::Owned",
        })
    }
}

impl<B: Backend> std::fmt::Debug for AttendedRows<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AttendedRows")
    }
}

/// The latent and RoPE-key rows of one layer a step attends to, and which of them each query
/// row attends to (`None`: every row up to its own position).
pub struct AttendedRows<'a, B: Backend> {
    pub latent: CacheRows<'a, B::Tensor>,
    pub k_pe: CacheRows<'a, B::Tensor>,
    pub selection: Option<Vec<Vec<u32>>>,
}

/// The cache of one sequence.
pub struct SeqCache<B: Backend> {
    len: usize,
    storage: Storage<B>,
}

impl<B: Backend> std::fmt::Debug for SeqCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.storage {
            Storage::Contiguous(layers) => {
                write!(f, "SeqCache(len {}, {} layers)", self.len, layers.len())
            }
            Storage::Paged { table, .. } => {
                write!(f, "SeqCache(len {}, {} blocks)", self.len, table.len())
            }
        }
    }
}

impl<B: Backend> SeqCache<B> {
    /// A contiguous cache with its own (empty) layer tensors.
    pub fn new(layers: Vec<LayerCache<B>>) -> Self {
        Self {
            len: 0,
            storage: Storage::Contiguous(layers),
        }
    }

    /// An empty paged cache in `pool` (blocks are given with [`SeqCache::set_blocks`]).
    pub fn paged(pool: SharedPool<B>) -> Self {
        let block_size = pool.read().map_or(1, |p| p.block_size);
        Self {
            len: 0,
            storage: Storage::Paged {
                pool,
                table: Vec::new(),
                block_size,
            },
        }
    }

    /// Sets a paged cache's block table (the scheduler owns allocation).
    pub fn set_blocks(&mut self, blocks: &[u32]) {
        if let Storage::Paged { table, .. } = &mut self.storage {
            table.clear();
            table.extend_from_slice(blocks);
        }
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens this cache can hold without more blocks.
    pub fn capacity(&self) -> usize {
        match &self.storage {
            Storage::Contiguous(_) => usize::MAX,
            Storage::Paged {
                table, block_size, ..
            } => table.len() * block_size,
        }
    }

    /// A contiguous cache's layer (benchmarks build synthetic caches through it).
    ///
    /// # Panics
    /// On a paged cache, whose rows live in the shared pool.
    pub fn layer_mut(&mut self, layer: usize) -> &mut LayerCache<B> {
        match &mut self.storage {
            Storage::Contiguous(layers) => &mut layers[layer],
            Storage::Paged { .. } => panic!("layer_mut is for contiguous caches"),
        }
    }

    /// The pool rows of the sequence's tokens `tokens`.
    fn slots(
        table: &[u32],
        block_size: usize,
        tokens: impl IntoIterator<Item = usize>,
    ) -> Vec<usize> {
        tokens
            .into_iter()
            .map(|t| table[t / block_size] as usize * block_size + t % block_size)
            .collect()
    }

    /// Stores one layer's rows for the next `rows(latent)` tokens (after the `len` cached ones).
    pub fn append(
        &mut self,
        b: &B,
        layer: usize,
        latent: &B::Tensor,
        k_pe: &B::Tensor,
        index_keys: Option<&B::Tensor>,
    ) -> Result<()> {
        match &mut self.storage {
            Storage::Contiguous(layers) => {
                let c = &mut layers[layer];
                b.append_rows(&mut c.latent, latent);
                b.append_rows(&mut c.k_pe, k_pe);
                if let (Some(keys), Some(rows)) = (c.index_keys.as_mut(), index_keys) {
                    b.append_rows(keys, rows);
                }
            }
            Storage::Paged {
                pool,
                table,
                block_size,
            } => {
                let n = b.shape(latent).0;
                if self.len + n > table.len() * *block_size {
                    return Err(EngineError::input(format!(
                        "the KV cache has blocks for {} tokens, {} needed",
                        table.len() * *block_size,
                        self.len + n
                    )));
                }
                let slots = Self::slots(table, *block_size, self.len..self.len + n);
                let mut pool = pool
                    .write()
                    .map_err(|_| EngineError::Device("KV pool lock poisoned".into()))?;
                let c = &mut pool.layers[layer];
                b.write_rows(&mut c.latent, &slots, latent);
                b.write_rows(&mut c.k_pe, &slots, k_pe);
                if let (Some(keys), Some(rows)) = (c.index_keys.as_mut(), index_keys) {
                    b.write_rows(keys, &slots, rows);
                }
            }
        }
        Ok(())
    }

    /// Layer `layer`'s indexer keys of the first `total` tokens (the cached ones plus this
    /// step's): borrowed from a contiguous cache, gathered from the pool (the indexer scores
    /// every visible key, and its work per key, heads × dim, dwarfs the copy's dim).
    pub fn index_keys(
        &self,
        b: &B,
        layer: usize,
        total: usize,
    ) -> Result<Option<CacheRows<'_, B::Tensor>>> {
        match &self.storage {
            Storage::Contiguous(layers) => {
                Ok(layers[layer].index_keys.as_ref().map(CacheRows::Borrowed))
            }
            Storage::Paged {
                pool,
                table,
                block_size,
            } => {
                let slots = Self::slots(table, *block_size, 0..total);
                let pool = Self::lock(pool)?;
                Ok(pool.layers[layer]
                    .index_keys
                    .as_ref()
                    .map(|k| CacheRows::Owned(b.gather_rows(k, &slots))))
            }
        }
    }

    /// Layer `layer`'s latent and RoPE-key rows that a step attends to: those `selection`
    /// picks (query row `i` attends to the token positions `selection[i]`), or all of the first
    /// `total` tokens when there is none. A contiguous cache lends its rows as they are; a paged
    /// one gathers only the picked rows, so a sparse step copies top-k rows, not the context,
    /// and the returned selection is renumbered into the gathered rows.
    pub fn attended_rows(
        &self,
        b: &B,
        layer: usize,
        total: usize,
        selection: Option<Vec<Vec<u32>>>,
    ) -> Result<AttendedRows<'_, B>> {
        let (pool, table, block_size) = match &self.storage {
            Storage::Contiguous(layers) => {
                let c = &layers[layer];
                return Ok(AttendedRows {
                    latent: CacheRows::Borrowed(&c.latent),
                    k_pe: CacheRows::Borrowed(&c.k_pe),
                    selection,
                });
            }
            Storage::Paged {
                pool,
                table,
                block_size,
            } => (pool, table, *block_size),
        };
        // The picked positions in order, each once; all of them when that is no saving.
        let (tokens, selection) = match selection {
            Some(sel) => {
                // A query attends only to cached tokens: positions below `total`.
                if let Some(&p) = sel.iter().flatten().find(|&&p| p as usize >= total) {
                    return Err(EngineError::Device(format!(
                        "attention selected position {p} of a sequence with {total} tokens"
                    )));
                }
                let mut index = vec![u32::MAX; total];
                for &p in sel.iter().flatten() {
                    index[p as usize] = 0;
                }
                let picked: Vec<usize> = (0..total).filter(|&p| index[p] == 0).collect();
                if picked.len() == total {
                    ((0..total).collect(), Some(sel))
                } else {
                    // Row i of the gathered rows is token picked[i] ≥ i, so a renumbered
                    // selection still passes the causal check against the query's position.
                    for (i, &p) in picked.iter().enumerate() {
                        index[p] = i as u32;
                    }
                    let renumbered = sel
                        .iter()
                        .map(|row| row.iter().map(|&p| index[p as usize]).collect())
                        .collect();
                    (picked, Some(renumbered))
                }
            }
            None => ((0..total).collect(), None),
        };
        let slots = Self::slots(table, block_size, tokens);
        let pool = Self::lock(pool)?;
        let c = &pool.layers[layer];
        Ok(AttendedRows {
            latent: CacheRows::Owned(b.gather_rows(&c.latent, &slots)),
            k_pe: CacheRows::Owned(b.gather_rows(&c.k_pe, &slots)),
            selection,
        })
    }

    fn lock(pool: &SharedPool<B>) -> Result<std::sync::RwLockReadGuard<'_, KvPool<B>>> {
        pool.read()
            .map_err(|_| EngineError::Device("KV pool lock poisoned".into()))
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
