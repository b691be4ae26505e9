//! Per-sequence attention state: for every layer the MLA latent (`kv_lora_rank` values) and the
//! shared RoPE key (`qk_rope_head_dim`) of each token, plus the indexer key (`index_head_dim`)
//! for V3.2. That is all decode needs: 512 + 64 + 128 floats per token and layer on the real
//! model, against 128 heads × (192 + 128) for an expanded cache.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use crate::backend::{Backend, CachedRows, IndexerSeq};
use crate::error::{EngineError, Result};

/// How a paged KV pool stores its rows (`--kv-cache-dtype`). Attention reads them back as
/// float32 either way; the contiguous caches of the CLI and tests keep float32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDtype {
    /// float32: the rows exactly as computed.
    #[default]
    Float32,
    /// bf16 (rounded to nearest, ties to even): half the bytes, so twice the tokens fit.
    Bfloat16,
    /// fp8 e4m3 with a float32 scale per 128 values of a row (each block's largest magnitude
    /// maps to 448), as DeepSeek's FlashMLA keeps V3.2's latent cache; the RoPE keys stay bf16
    /// ([`KvDtype::rope_keys`]). About a quarter of the float32 bytes.
    Fp8,
    /// [`KvDtype::Fp8`] with each scale rounded up to a power of two (UE8M0: an exponent, no
    /// mantissa), as DeepSeek's reference rounds V3.2's cache and its indexer's queries when
    /// the checkpoint's `quantization_config` has `scale_fmt: "ue8m0"`
    /// ([`KvDtype::for_model`] picks it for `fp8`). Same bytes as `Fp8`.
    Fp8Ue8m0,
}

/// Values per fp8 scale in a row.
pub const FP8_BLOCK: usize = 128;

impl KvDtype {
    /// Bytes one row of `cols` values takes.
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            Self::Float32 => 4 * cols,
            Self::Bfloat16 => 2 * cols,
            Self::Fp8 | Self::Fp8Ue8m0 => cols + 4 * cols.div_ceil(FP8_BLOCK),
        }
    }

    /// Whether rows are kept as fp8 codes and scales.
    pub fn is_fp8(self) -> bool {
        matches!(self, Self::Fp8 | Self::Fp8Ue8m0)
    }

    /// The dtype a pool of `config`'s model keeps: `fp8` takes the checkpoint's scale format
    /// (power-of-two scales for `scale_fmt: "ue8m0"`, so the cache rounds as the model's own
    /// reference does); every other dtype, and an explicit `fp8_ue8m0`, as asked.
    pub fn for_model(self, config: &crate::config::ModelConfig) -> Self {
        match (self, config.scale_fmt) {
            (Self::Fp8, crate::config::ScaleFmt::Ue8m0) => Self::Fp8Ue8m0,
            (other, _) => other,
        }
    }

    /// How a pool of this dtype keeps the RoPE keys: in bf16 under fp8 (the rotated part is the
    /// precision-sensitive one, and FlashMLA keeps it bf16 too), else as the rest.
    pub fn rope_keys(self) -> Self {
        match self {
            Self::Fp8 | Self::Fp8Ue8m0 => Self::Bfloat16,
            other => other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Float32 => "float32",
            Self::Bfloat16 => "bfloat16",
            Self::Fp8 => "fp8",
            Self::Fp8Ue8m0 => "fp8_ue8m0",
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "float32" => Ok(Self::Float32),
            "bfloat16" => Ok(Self::Bfloat16),
            "fp8" | "fp8_e4m3" => Ok(Self::Fp8),
            "fp8_ue8m0" => Ok(Self::Fp8Ue8m0),
            other => Err(EngineError::input(format!(
                "--kv-cache-dtype {other}: expected `auto`, `float32`, `bfloat16`, `fp8` or \
                 `fp8_ue8m0`"
            ))),
        }
    }
}

/// One layer's cached rows in a contiguous cache.
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

/// One layer's rows in a paged pool, each kind in a store of the pool's [`KvDtype`].
pub struct PoolLayer<B: Backend> {
    pub latent: B::Store,
    pub k_pe: B::Store,
    pub index_keys: Option<B::Store>,
}

impl<B: Backend> std::fmt::Debug for PoolLayer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolLayer")
    }
}

/// The paged store shared by the sequences of a server: per layer, `blocks · block_size` rows
/// of latent, RoPE key and indexer key. Token `t` of a sequence lives in row
/// `table[t / block_size] · block_size + t % block_size`.
pub struct KvPool<B: Backend> {
    block_size: usize,
    layers: Vec<PoolLayer<B>>,
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
    pub fn new(block_size: usize, layers: Vec<PoolLayer<B>>) -> SharedPool<B> {
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

/// Where a paged cache's first `tokens` tokens are in its pool: token `t` is pool row
/// `blocks[t / block_size] · block_size + t % block_size`. Backends read a pool through the
/// table, not through a row number per token, so what a step computes and uploads for it grows
/// with the sequence's blocks, not its tokens.
#[derive(Clone, Copy, Debug)]
pub struct PagedRows<'a> {
    blocks: &'a [u32],
    block_size: usize,
    tokens: usize,
}

impl<'a> PagedRows<'a> {
    /// The table of `tokens` tokens in `blocks` of `block_size` rows.
    ///
    /// # Panics
    /// When `block_size` is 0 or the blocks hold fewer than `tokens` rows.
    pub fn new(blocks: &'a [u32], block_size: usize, tokens: usize) -> Self {
        assert!(block_size > 0, "paged rows: block size 0");
        assert!(
            tokens <= blocks.len() * block_size,
            "paged rows: {tokens} tokens in {} blocks of {block_size}",
            blocks.len()
        );
        Self {
            blocks,
            block_size,
            tokens,
        }
    }

    /// The blocks that hold the tokens.
    pub fn blocks(&self) -> &'a [u32] {
        &self.blocks[..self.tokens.div_ceil(self.block_size)]
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The pool row of token `t`.
    ///
    /// # Panics
    /// When `t` is not one of the table's tokens.
    pub fn row(&self, t: usize) -> usize {
        assert!(t < self.tokens, "paged rows: token {t} of {}", self.tokens);
        self.blocks[t / self.block_size] as usize * self.block_size + t % self.block_size
    }

    /// The pool rows of `tokens`.
    pub fn rows(&self, tokens: impl IntoIterator<Item = usize>) -> Vec<usize> {
        tokens.into_iter().map(|t| self.row(t)).collect()
    }
}

/// One sequence's part of an [`index_select`] call.
#[derive(Debug)]
pub struct IndexQuery<'a, B: Backend> {
    pub cache: &'a SeqCache<B>,
    /// Tokens whose indexer keys are cached after this step (the cached ones plus its own).
    pub total: usize,
    /// Its first query row in the batch; it has `positions.len()` rows.
    pub first: usize,
    /// Each query row's position in the sequence.
    pub positions: &'a [usize],
}

/// The indexer's picks ([`Backend::indexer_select`]) for the query rows of several sequences
/// (rows `first..` of `q` and the weights `w`, at `positions`), each among its own cache's
/// layer-`layer` indexer keys of its first `total` tokens, in `queries`' order; `None` for a
/// sequence whose layer keeps no indexer keys. A contiguous cache lends its keys, a sequence
/// at a time. The paged caches of one pool are read together: the pool is read-locked once
/// and the backend gets its key store and their block tables in one call
/// ([`Backend::indexer_select_paged`]), which the CUDA backend answers with one launch for
/// the batch, reading the keys in place.
#[allow(clippy::too_many_arguments)]
pub fn index_select<B: Backend>(
    b: &B,
    layer: usize,
    queries: &[IndexQuery<'_, B>],
    q: &B::Tensor,
    w: &B::Tensor,
    k: usize,
    scale: f32,
) -> Result<Vec<Option<Vec<Vec<u32>>>>> {
    let mut picked: Vec<Option<Vec<Vec<u32>>>> = queries.iter().map(|_| None).collect();
    let mut done = vec![false; queries.len()];
    for i in 0..queries.len() {
        if done[i] {
            continue;
        }
        let query = &queries[i];
        let pool = match &query.cache.storage {
            Storage::Contiguous(layers) => {
                let n = query.positions.len();
                picked[i] = layers[layer].index_keys.as_ref().map(|keys| {
                    let (q, w) = (b.rows(q, query.first, n), b.rows(w, query.first, n));
                    b.indexer_select(&q, &w, keys, query.positions, k, scale)
                });
                done[i] = true;
                continue;
            }
            Storage::Paged { pool, .. } => pool,
        };
        // This and every later sequence of the same pool.
        let members: Vec<usize> = (i..queries.len())
            .filter(|&j| !done[j] && queries[j].cache.pool_id() == query.cache.pool_id())
            .collect();
        let guard = SeqCache::lock(pool)?;
        let seqs: Vec<IndexerSeq<'_>> = members
            .iter()
            .map(|&j| queries[j].paged().expect("members share a pool"))
            .collect();
        let chosen = guard.layers[layer]
            .index_keys
            .as_ref()
            .map(|keys| b.indexer_select_paged(q, w, keys, &seqs, k, scale));
        drop(guard);
        let mut chosen = chosen.map(Vec::into_iter);
        for &j in &members {
            picked[j] = chosen.as_mut().and_then(Iterator::next);
            done[j] = true;
        }
    }
    Ok(picked)
}

/// [`index_select`] with the picks left on the device ([`Backend::indexer_keep_paged`]) for an
/// attention that reads them there ([`crate::backend::Selection::Kept`]; query `i` is
/// `seq: i`): when every query's cache is paged in one pool whose layer-`layer` indexer keys
/// the backend keeps picks for and whose latent and RoPE-key rows it reads in place. `None`
/// otherwise (and for no queries): the caller then asks [`index_select`].
#[allow(clippy::too_many_arguments)]
pub fn index_keep<B: Backend>(
    b: &B,
    layer: usize,
    queries: &[IndexQuery<'_, B>],
    q: &B::Tensor,
    w: &B::Tensor,
    k: usize,
    scale: f32,
) -> Result<Option<B::Picks>> {
    let Some(Storage::Paged { pool, .. }) = queries.first().map(|query| &query.cache.storage)
    else {
        return Ok(None);
    };
    let id = queries[0].cache.pool_id();
    if queries.iter().any(|query| query.cache.pool_id() != id) {
        return Ok(None);
    }
    let guard = SeqCache::lock(pool)?;
    let c = &guard.layers[layer];
    let Some(keys) = c.index_keys.as_ref() else {
        return Ok(None);
    };
    if !b.reads_in_place(&c.latent) || !b.reads_in_place(&c.k_pe) {
        return Ok(None);
    }
    let seqs: Vec<IndexerSeq<'_>> = queries
        .iter()
        .map(|query| query.paged().expect("one paged pool"))
        .collect();
    Ok(b.indexer_keep_paged(q, w, keys, &seqs, k, scale))
}

impl<B: Backend> IndexQuery<'_, B> {
    /// Its part of a paged pool's indexer call; `None` for a contiguous cache.
    fn paged(&self) -> Option<IndexerSeq<'_>> {
        let Storage::Paged {
            table, block_size, ..
        } = &self.cache.storage
        else {
            return None;
        };
        Some(IndexerSeq {
            first: self.first,
            positions: self.positions,
            table: PagedRows::new(table, *block_size, self.total),
        })
    }
}

/// The latent and RoPE-key rows an [`AttendedRows`] holds: a contiguous cache's tensors, rows
/// gathered from the pool, or the pool's stores themselves.
enum Held<'a, B: Backend> {
    Borrowed(&'a B::Tensor, &'a B::Tensor),
    Owned(B::Tensor, B::Tensor),
    Stores(&'a B::Store, &'a B::Store),
}

impl<B: Backend> std::fmt::Debug for AttendedRows<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.held {
            Held::Borrowed(..) => "AttendedRows::Borrowed",
            Held::Owned(..) => "AttendedRows::Owned",
            Held::Stores(..) => "AttendedRows::Stores",
        })
    }
}

/// The latent and RoPE-key rows of one layer a step attends to, and which of them each query
/// row attends to (`None`: every row up to its own position).
pub struct AttendedRows<'a, B: Backend> {
    held: Held<'a, B>,
    pub selection: Option<Vec<Vec<u32>>>,
    /// When the rows are a pool's, read in place: where the sequence's tokens are in it
    /// ([`crate::backend::MlaSeq::rows`]).
    pub rows: Option<PagedRows<'a>>,
}

impl<B: Backend> AttendedRows<'_, B> {
    /// The rows, as [`crate::backend::MlaSeq::cached`].
    pub fn cached(&self) -> CachedRows<'_, B::Tensor, B::Store> {
        match &self.held {
            Held::Borrowed(latent, k_pe) => CachedRows::Tensors { latent, k_pe },
            Held::Owned(latent, k_pe) => CachedRows::Tensors { latent, k_pe },
            Held::Stores(latent, k_pe) => CachedRows::Stores { latent, k_pe },
        }
    }
}

/// A read lock on a paged cache's pool, held across a step's [`SeqCache::attended_rows`] so
/// that they can lend the pool's own rows (see [`Backend::reads_in_place`]).
pub struct PoolRead<'p, B: Backend> {
    shared: &'p SharedPool<B>,
    guard: std::sync::RwLockReadGuard<'p, KvPool<B>>,
}

impl<B: Backend> std::fmt::Debug for PoolRead<'_, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolRead")
    }
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

    /// A paged cache's pool and the pool rows of its next `n` tokens (after the `len` cached
    /// ones); `None` for a contiguous cache. An error when its blocks hold fewer tokens.
    fn next_slots(&self, n: usize) -> Result<Option<(&SharedPool<B>, Vec<usize>)>> {
        match &self.storage {
            Storage::Contiguous(_) => Ok(None),
            Storage::Paged {
                pool,
                table,
                block_size,
            } => {
                if self.len + n > table.len() * *block_size {
                    return Err(EngineError::input(format!(
                        "the KV cache has blocks for {} tokens, {} needed",
                        table.len() * *block_size,
                        self.len + n
                    )));
                }
                let slots =
                    PagedRows::new(table, *block_size, self.len + n).rows(self.len..self.len + n);
                Ok(Some((pool, slots)))
            }
        }
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
        if let Storage::Contiguous(layers) = &mut self.storage {
            let c = &mut layers[layer];
            b.append_rows(&mut c.latent, latent);
            b.append_rows(&mut c.k_pe, k_pe);
            if let (Some(keys), Some(rows)) = (c.index_keys.as_mut(), index_keys) {
                b.append_rows(keys, rows);
            }
            return Ok(());
        }
        let Some((pool, slots)) = self.next_slots(b.shape(latent).0)? else {
            unreachable!("not contiguous, so paged")
        };
        write_pool_rows(b, pool, layer, &slots, latent, k_pe, index_keys)
    }

    /// Layer `layer`'s latent and RoPE-key rows that a step attends to: those `selection`
    /// picks (query row `i` attends to the token positions `selection[i]`), or all of the first
    /// `total` tokens when there is none. A contiguous cache lends its rows as they are; a paged
    /// one gathers only the picked rows, so a sparse step copies top-k rows, not the context,
    /// and the returned selection is renumbered into the gathered rows.
    ///
    /// With `locked`, a read lock on this cache's pool that outlives the returned rows, a
    /// backend that reads the pool's stores in place ([`Backend::reads_in_place`]) gets them
    /// and the block table instead of a copy: no rows are gathered.
    pub fn attended_rows<'a>(
        &'a self,
        b: &B,
        layer: usize,
        total: usize,
        selection: Option<Vec<Vec<u32>>>,
        locked: Option<&'a PoolRead<'a, B>>,
    ) -> Result<AttendedRows<'a, B>> {
        let (pool, table, block_size) = match &self.storage {
            Storage::Contiguous(layers) => {
                let c = &layers[layer];
                return Ok(AttendedRows {
                    held: Held::Borrowed(&c.latent, &c.k_pe),
                    selection,
                    rows: None,
                });
            }
            Storage::Paged {
                pool,
                table,
                block_size,
            } => (pool, table, *block_size),
        };
        // A query attends only to cached tokens: positions below `total`.
        if let Some(&p) = selection
            .iter()
            .flatten()
            .flatten()
            .find(|&&p| p as usize >= total)
        {
            return Err(EngineError::Device(format!(
                "attention selected position {p} of a sequence with {total} tokens"
            )));
        }
        if let Some(locked) = locked.filter(|l| Arc::ptr_eq(l.shared, pool)) {
            let c = &locked.guard.layers[layer];
            if b.reads_in_place(&c.latent) && b.reads_in_place(&c.k_pe) {
                return Ok(AttendedRows {
                    held: Held::Stores(&c.latent, &c.k_pe),
                    selection,
                    rows: Some(PagedRows::new(table, block_size, total)),
                });
            }
        }
        // The picked positions in order, each once; all of them when that is no saving.
        let (tokens, selection) = match selection {
            Some(sel) => {
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
        let slots = PagedRows::new(table, block_size, total).rows(tokens);
        let gather = |pool: &KvPool<B>| {
            let c = &pool.layers[layer];
            Held::Owned(
                b.gather_rows(&c.latent, &slots),
                b.gather_rows(&c.k_pe, &slots),
            )
        };
        // This cache's pool may be the one `locked` holds: a second read lock from the same
        // thread could wait behind a writer, so it is not taken.
        let held = match locked.filter(|l| Arc::ptr_eq(l.shared, pool)) {
            Some(locked) => gather(&locked.guard),
            None => gather(&*Self::lock(pool)?),
        };
        Ok(AttendedRows {
            held,
            selection,
            rows: None,
        })
    }

    /// Which pool this paged cache's rows live in, as an identity to compare with another
    /// cache's; `None` for a contiguous cache.
    pub fn pool_id(&self) -> Option<usize> {
        match &self.storage {
            Storage::Paged { pool, .. } => Some(Arc::as_ptr(pool).cast::<()>() as usize),
            Storage::Contiguous(_) => None,
        }
    }

    /// A read lock on this cache's pool for [`SeqCache::attended_rows`], when `b` reads the
    /// pool's rows of `layer` in place; `None` for a contiguous cache, or when the rows are
    /// gathered anyway (then no lock is held across the attention: the CPU backend's groups
    /// of a batch append to the same pool side by side).
    pub fn read_pool(&self, b: &B, layer: usize) -> Result<Option<PoolRead<'_, B>>> {
        let Storage::Paged { pool, .. } = &self.storage else {
            return Ok(None);
        };
        let guard = Self::lock(pool)?;
        let c = &guard.layers[layer];
        if !b.reads_in_place(&c.latent) || !b.reads_in_place(&c.k_pe) {
            return Ok(None);
        }
        Ok(Some(PoolRead {
            shared: pool,
            guard,
        }))
    }

    fn lock(pool: &SharedPool<B>) -> Result<std::sync::RwLockReadGuard<'_, KvPool<B>>> {
        pool.read()
            .map_err(|_| EngineError::Device("KV pool lock poisoned".into()))
    }

    /// Marks `tokens` more tokens as cached (after every layer appended their rows).
    pub(crate) fn advance(&mut self, tokens: usize) {
        self.len += tokens;
    }

    /// Marks the first `tokens` tokens of an empty paged cache as cached: their rows are
    /// already in the pool, in blocks of the table given next (a shared prefix).
    ///
    /// # Panics
    /// On a contiguous or non-empty cache.
    pub fn start_after_shared_prefix(&mut self, tokens: usize) {
        assert!(
            matches!(self.storage, Storage::Paged { .. }) && self.len == 0,
            "a shared prefix starts an empty paged cache"
        );
        self.len = tokens;
    }
}

/// Writes layer `layer`'s rows of a paged pool: `latent`, `k_pe` and (where the pool keeps
/// them) `index_keys` at pool rows `slots`, a row each.
fn write_pool_rows<B: Backend>(
    b: &B,
    pool: &SharedPool<B>,
    layer: usize,
    slots: &[usize],
    latent: &B::Tensor,
    k_pe: &B::Tensor,
    index_keys: Option<&B::Tensor>,
) -> Result<()> {
    let mut pool = pool
        .write()
        .map_err(|_| EngineError::Device("KV pool lock poisoned".into()))?;
    let c = &mut pool.layers[layer];
    b.write_rows(&mut c.latent, slots, latent);
    b.write_rows(&mut c.k_pe, slots, k_pe);
    if let (Some(keys), Some(rows)) = (c.index_keys.as_mut(), index_keys) {
        b.write_rows(keys, slots, rows);
    }
    Ok(())
}

/// Stores one layer's rows for a batch: cache `i`'s next rows are rows `spans[i]` (start, len)
/// of `latent`, `k_pe` and `index_keys`. When every cache is paged in one pool and the spans
/// tile the tensors' rows in order (as a step's batch does), each store takes one
/// `write_rows` of all the batch's pool rows: one launch a store on the CUDA backend, where a
/// cache at a time took one a cache and store, and a copy of each cache's rows besides.
/// Otherwise each cache appends its own rows. Either way every cache's capacity is checked
/// before anything is written.
pub fn append_batch<B: Backend>(
    b: &B,
    layer: usize,
    caches: &mut [&mut SeqCache<B>],
    spans: &[(usize, usize)],
    latent: &B::Tensor,
    k_pe: &B::Tensor,
    index_keys: Option<&B::Tensor>,
) -> Result<()> {
    if caches.len() != spans.len() {
        return Err(EngineError::input(format!(
            "{} caches for {} spans of rows",
            caches.len(),
            spans.len()
        )));
    }
    let rows = b.shape(latent).0;
    let tiled = spans
        .iter()
        .try_fold(0, |at, &(start, len)| (start == at).then_some(at + len))
        == Some(rows);
    // Every cache's capacity is checked (an error) before any row is written.
    let mut one_pool: Option<Option<&SharedPool<B>>> = None;
    let mut slots = Vec::with_capacity(rows);
    for (cache, &(_, len)) in caches.iter().zip(spans) {
        let next = cache.next_slots(len)?;
        one_pool = match (one_pool, next) {
            (None, Some((pool, more))) => {
                slots.extend(more);
                Some(Some(pool))
            }
            (Some(Some(p)), Some((pool, more))) if Arc::ptr_eq(p, pool) => {
                slots.extend(more);
                Some(Some(p))
            }
            _ => Some(None),
        };
    }
    if let (true, Some(Some(pool))) = (tiled, one_pool) {
        return write_pool_rows(b, pool, layer, &slots, latent, k_pe, index_keys);
    }
    for (cache, &(start, len)) in caches.iter_mut().zip(spans) {
        let keys = index_keys.map(|k| b.rows(k, start, len));
        cache.append(
            b,
            layer,
            &b.rows(latent, start, len),
            &b.rows(k_pe, start, len),
            keys.as_ref(),
        )?;
    }
    Ok(())
}

/// Bytes one cached token takes across all layers (latent + rope key + indexer key) in a pool
/// of `dtype`.
pub fn bytes_per_token(config: &crate::config::ModelConfig, dtype: KvDtype) -> usize {
    let per_layer = dtype.row_bytes(config.kv_lora_rank)
        + dtype.rope_keys().row_bytes(config.qk_rope_head_dim)
        + config
            .indexer
            .as_ref()
            .map_or(0, |ix| dtype.row_bytes(ix.head_dim));
    per_layer * config.num_layers
}

/// Fixed-size KV blocks: a free list and per-sequence block tables. The scheduler admits,
/// grows and preempts sequences by blocks, so the cache's memory is bounded by
/// `total_blocks · block_size · bytes_per_token` whatever the traffic.
///
/// Prefix caching: a full block whose rows are computed can be registered under its content
/// (its tokens and the block before it), and a new sequence whose prompt starts with the same
/// tokens shares it instead of computing it again (the rows of a token depend only on the
/// tokens up to it). Blocks are reference-counted; a registered block no sequence holds stays
/// cached until its space is needed, least recently released first.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_size: usize,
    total: usize,
    /// Unregistered blocks nobody holds.
    free: Vec<u32>,
    /// Sequences holding each block.
    refs: Vec<u32>,
    /// Bumped each time a block is handed out anew, so a key naming it as the block before
    /// (see [`BlockKey`]) cannot match its next contents.
    generation: Vec<u64>,
    /// The key each registered block is found under.
    key_of: Vec<Option<BlockKey>>,
    cached: HashMap<BlockKey, u32>,
    /// Registered blocks nobody holds, by release time (oldest first): reused last.
    evictable: BTreeMap<u64, u32>,
    released_at: Vec<u64>,
    clock: u64,
}

/// A full block's contents: the block before it (id and generation; `None` for a sequence's
/// first block) and its tokens. Exact, so two different prefixes never share a block.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BlockKey {
    parent: Option<(u32, u64)>,
    tokens: Box<[u32]>,
}

/// The blocks one sequence holds, in token order (token `t` lives in `blocks[t / block_size]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    pub blocks: Vec<u32>,
    /// Leading blocks already offered to the prefix cache (see [`BlockAllocator::register`]).
    registered: usize,
    /// Leading blocks taken from the prefix cache (see [`BlockAllocator::share_prefix`]): rows
    /// other sequences computed.
    shared: usize,
    /// The registered block holding the contents of the last of those (this table's own, or
    /// the one registered first when this table computed the same rows), with its generation
    /// then: the next block's key follows it. The generation is kept, not read again, because
    /// that other block may since have been evicted and handed out anew: a key naming its new
    /// generation would claim rows computed after the old contents follow the new ones.
    chain: Option<(u32, u64)>,
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
            refs: vec![0; total],
            generation: vec![0; total],
            key_of: vec![None; total],
            cached: HashMap::new(),
            evictable: BTreeMap::new(),
            released_at: vec![0; total],
            clock: 0,
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

    /// Blocks no sequence holds (including cached prefix blocks, which are reused on demand).
    pub fn free_blocks(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Registered prefix blocks no sequence holds.
    pub fn cached_blocks(&self) -> usize {
        self.evictable.len()
    }

    /// Tokens the whole cache holds.
    pub fn capacity_tokens(&self) -> usize {
        self.total * self.block_size
    }

    /// Fraction of blocks sequences hold (0 when idle, 1 when full).
    pub fn usage(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        (self.total - self.free_blocks()) as f64 / self.total as f64
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
    /// free blocks. Unregistered free blocks go first, then the least recently released
    /// cached ones (which leave the prefix cache).
    pub fn grow(&mut self, table: &mut BlockTable, tokens: usize) -> bool {
        let missing = self.missing(table, tokens);
        if missing > self.free_blocks() {
            return false;
        }
        for _ in 0..missing {
            let block = match self.free.pop() {
                Some(block) => block,
                None => {
                    // Cannot fail: checked above.
                    let Some((_, block)) = self.evictable.pop_first() else {
                        break;
                    };
                    if let Some(key) = self.key_of[block as usize].take() {
                        self.cached.remove(&key);
                    }
                    block
                }
            };
            let b = block as usize;
            self.generation[b] += 1;
            self.refs[b] = 1;
            table.blocks.push(block);
        }
        true
    }

    /// Returns all of `table`'s blocks: each one no other sequence holds is free again, or,
    /// registered, cached until its space is needed. Last block first, so a prefix's later
    /// blocks are evicted before its earlier ones (evicting an early block makes every block
    /// after it unreachable).
    pub fn release(&mut self, table: &mut BlockTable) {
        for block in table.blocks.drain(..).rev() {
            let b = block as usize;
            debug_assert!(
                self.refs[b] > 0,
                "block {block} released more often than held"
            );
            self.refs[b] = self.refs[b].saturating_sub(1);
            if self.refs[b] > 0 {
                continue;
            }
            if self.key_of[b].is_some() {
                self.clock += 1;
                self.released_at[b] = self.clock;
                self.evictable.insert(self.clock, block);
            } else {
                self.free.push(block);
            }
        }
        table.registered = 0;
        table.shared = 0;
        table.chain = None;
    }

    /// As [`release`](Self::release), for a sequence whose rows cannot be trusted (its model
    /// output was unusable): the blocks it computed itself leave the prefix cache, so no later
    /// request finds their rows (a sequence that shares one already keeps it, and it is freed
    /// with the last), while those it took from the cache, which others computed, stay.
    pub fn discard(&mut self, table: &mut BlockTable) {
        for &block in table.blocks.iter().skip(table.shared) {
            if let Some(key) = self.key_of[block as usize].take() {
                self.cached.remove(&key);
            }
        }
        self.release(table);
    }

    /// For an empty `table`: shares the cached blocks that hold the longest run of whole
    /// blocks at the start of `tokens`, and returns how many tokens they hold.
    pub fn share_prefix(&mut self, table: &mut BlockTable, tokens: &[u32]) -> usize {
        debug_assert!(
            table.blocks.is_empty(),
            "share_prefix on a table with blocks"
        );
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.block_size) {
            let key = BlockKey {
                parent,
                tokens: chunk.into(),
            };
            let Some(&block) = self.cached.get(&key) else {
                break;
            };
            let b = block as usize;
            if self.refs[b] == 0 {
                self.evictable.remove(&self.released_at[b]);
            }
            self.refs[b] += 1;
            table.blocks.push(block);
            parent = Some((block, self.generation[b]));
        }
        table.registered = table.blocks.len();
        table.shared = table.blocks.len();
        table.chain = parent;
        table.blocks.len() * self.block_size
    }

    /// Registers `table`'s full blocks among the first `computed` tokens of `tokens` (the
    /// sequence's tokens, whose rows are in the cache up to `computed`) that are not yet
    /// registered. A block whose contents another block is already registered for (two
    /// requests that computed the same prefix side by side) stays unregistered and is freed as
    /// usual; the blocks after it are registered as following that other block, so a lookup
    /// reaches them.
    pub fn register(&mut self, table: &mut BlockTable, tokens: &[u32], computed: usize) {
        let full = (computed.min(tokens.len()) / self.block_size).min(table.blocks.len());
        if table.registered >= full {
            return;
        }
        for i in table.registered..full {
            let block = table.blocks[i];
            let key = BlockKey {
                parent: table.chain,
                tokens: tokens[i * self.block_size..(i + 1) * self.block_size].into(),
            };
            let canonical = match self.cached.get(&key) {
                Some(&other) => other,
                None => {
                    // Blocks past `registered` are this table's own, never registered yet.
                    debug_assert!(self.key_of[block as usize].is_none());
                    self.cached.insert(key.clone(), block);
                    self.key_of[block as usize] = Some(key);
                    block
                }
            };
            table.chain = Some((canonical, self.generation[canonical as usize]));
        }
        table.registered = full;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `fp8` follows the checkpoint's scale format, so a V3.2 cache rounds as DeepSeek's
    /// reference does; the other dtypes, and `fp8_ue8m0` asked for by name, are kept. Names
    /// round-trip.
    #[test]
    fn fp8_pools_take_the_checkpoints_scale_format() {
        use crate::config::{ModelConfig, ScaleFmt};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut config = ModelConfig::from_dir(&dir.join("tests/fixtures/v32_sparse_moe")).unwrap();
        let all = [
            KvDtype::Float32,
            KvDtype::Bfloat16,
            KvDtype::Fp8,
            KvDtype::Fp8Ue8m0,
        ];
        for (fmt, fp8) in [
            (ScaleFmt::Float32, KvDtype::Fp8),
            (ScaleFmt::Ue8m0, KvDtype::Fp8Ue8m0),
        ] {
            config.scale_fmt = fmt;
            let got = all.map(|d| d.for_model(&config));
            assert_eq!(
                got,
                [KvDtype::Float32, KvDtype::Bfloat16, fp8, KvDtype::Fp8Ue8m0],
                "{fmt:?}"
            );
        }
        for d in all {
            assert_eq!(d.as_str().parse::<KvDtype>().unwrap(), d);
            assert_eq!(d.is_fp8(), d.as_str().starts_with("fp8"));
            assert!(!d.rope_keys().is_fp8(), "{d:?} keeps RoPE keys as fp8");
        }
        assert_eq!(
            KvDtype::Fp8Ue8m0.row_bytes(300),
            KvDtype::Fp8.row_bytes(300)
        );
    }

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

    /// Tokens of `blocks` whole blocks of 4, block `i` filled with `ids[i]`.
    fn filled(ids: &[u32]) -> Vec<u32> {
        ids.iter().flat_map(|&i| [i; 4]).collect()
    }

    #[test]
    fn registered_blocks_are_shared_by_content_and_counted_once() {
        let mut a = BlockAllocator::new(4, 6);
        let tokens = filled(&[7, 8, 9]);
        let mut t = BlockTable::default();
        assert!(a.grow(&mut t, 11));
        // Rows computed for 9 tokens: two full blocks register, the third is not full.
        a.register(&mut t, &tokens, 9);
        assert_eq!(a.cached.len(), 2);
        // A second sequence shares them while the first still holds them.
        let mut u = BlockTable::default();
        assert_eq!(a.share_prefix(&mut u, &tokens[..11]), 8);
        assert_eq!(u.blocks, t.blocks[..2]);
        assert_eq!(a.free_blocks(), 3, "shared blocks are held once");
        // Released by both: cached, and free for the count.
        a.release(&mut t);
        a.release(&mut u);
        assert_eq!((a.free_blocks(), a.cached_blocks(), a.usage()), (6, 2, 0.0));
        // Found again after release; a sequence whose first block differs finds nothing,
        // even where its second block's tokens match (a block's key includes its prefix).
        let mut v = BlockTable::default();
        assert_eq!(a.share_prefix(&mut v, &filled(&[7, 8])), 8);
        assert_eq!(a.cached_blocks(), 0, "held again: not evictable");
        let mut w = BlockTable::default();
        assert_eq!(a.share_prefix(&mut w, &filled(&[6, 8])), 0);
        assert!(w.blocks.is_empty());
    }

    /// A sequence whose rows are discarded takes out of the prefix cache the blocks it
    /// computed, even one another sequence shares (which keeps its rows, freed with the last
    /// holder), and leaves the blocks it took from the cache.
    #[test]
    fn discarded_rows_leave_the_cache_but_shared_ones_stay() {
        let mut a = BlockAllocator::new(4, 8);
        let two = filled(&[7, 8]);
        let three = filled(&[7, 8, 9]);
        let mut t = BlockTable::default();
        assert!(a.grow(&mut t, 8));
        a.register(&mut t, &two, 8);
        // u takes t's two blocks from the cache and computes a third.
        let mut u = BlockTable::default();
        assert_eq!(a.share_prefix(&mut u, &three), 8);
        assert!(a.grow(&mut u, 12));
        a.register(&mut u, &three, 12);
        // v shares all three, then u faults: its own third block leaves the cache, the two it
        // shared stay.
        let mut v = BlockTable::default();
        assert_eq!(a.share_prefix(&mut v, &three), 12);
        a.discard(&mut u);
        let mut w = BlockTable::default();
        assert_eq!(a.share_prefix(&mut w, &three), 8);
        a.release(&mut w);
        // t faults while v holds its blocks: they leave the cache, v keeps them.
        a.discard(&mut t);
        let mut x = BlockTable::default();
        assert_eq!(a.share_prefix(&mut x, &three), 0);
        assert_eq!(a.free_blocks(), 5, "v still holds its 3");
        // Once v lets go, nothing is cached and every block is free.
        a.release(&mut v);
        assert_eq!(
            (a.free_blocks(), a.cached_blocks(), a.cached.len()),
            (8, 0, 0)
        );
    }

    #[test]
    fn cached_blocks_are_evicted_oldest_first_and_never_match_new_contents() {
        let mut a = BlockAllocator::new(4, 4);
        let (x, y) = (filled(&[1, 2]), filled(&[3]));
        let mut t = BlockTable::default();
        assert!(a.grow(&mut t, 8));
        a.register(&mut t, &x, 8);
        a.release(&mut t); // [2] then [1] become evictable, in that order (last block first)
        let mut u = BlockTable::default();
        assert!(a.grow(&mut u, 4));
        a.register(&mut u, &y, 4);
        a.release(&mut u);
        // Three blocks wanted, one free: the two oldest cached ones go, [2] first.
        let mut big = BlockTable::default();
        assert!(a.grow(&mut big, 12));
        assert_eq!(a.cached_blocks(), 1);
        let mut probe = BlockTable::default();
        assert_eq!(a.share_prefix(&mut probe, &x), 0, "[1] was evicted");
        assert_eq!(
            a.share_prefix(&mut probe, &y),
            4,
            "[3], the newest, is kept"
        );
        a.release(&mut probe);
        // The evicted block ids now hold other rows: writing [1] there and registering it
        // must not revive the old [1][2] chain (the [2] key named [1]'s old generation).
        a.release(&mut big);
        let mut again = BlockTable::default();
        assert!(a.grow(&mut again, 4));
        a.register(&mut again, &filled(&[1]), 4);
        let mut probe = BlockTable::default();
        assert_eq!(a.share_prefix(&mut probe, &x), 4, "only the new [1]");
        // One block held (by two tables): three to grow into, not four.
        assert_eq!(probe.blocks, again.blocks);
        assert_eq!(a.free_blocks(), 3);
        let mut too_big = BlockTable::default();
        assert!(!a.grow(&mut too_big, 16));
        assert!(too_big.blocks.is_empty());
    }

    #[test]
    fn a_cached_block_after_an_evicted_one_does_not_follow_its_new_contents() {
        let mut a = BlockAllocator::new(4, 2);
        let mut t = BlockTable::default();
        assert!(a.grow(&mut t, 8));
        a.register(&mut t, &filled(&[1, 2]), 8);
        let (first, second) = (t.blocks[0] as usize, t.blocks[1] as usize);
        a.release(&mut t);
        // Releasing last block first never leaves a prefix's first block older than its
        // second; swap their ages so that [1] goes first, to check the generations guard.
        let (old, new) = (a.released_at[second], a.released_at[first]);
        a.evictable.insert(old, first as u32);
        a.evictable.insert(new, second as u32);
        a.released_at.swap(first, second);
        // [1]'s block is evicted and refilled with [3]; [2] stays cached, computed after [1].
        let mut v = BlockTable::default();
        assert!(a.grow(&mut v, 4));
        a.register(&mut v, &filled(&[3]), 4);
        a.release(&mut v);
        assert_eq!(a.cached_blocks(), 2);
        // [3][2] reaches the refilled block, and must not take [2]'s rows (they follow [1]).
        let mut probe = BlockTable::default();
        assert_eq!(a.share_prefix(&mut probe, &filled(&[3, 2])), 4);
    }

    #[test]
    fn blocks_after_a_duplicate_follow_the_registered_copy() {
        let mut a = BlockAllocator::new(4, 8);
        let tokens = filled(&[1, 2, 3]);
        // Two sequences compute the same prompt side by side: the first registers its blocks.
        let (mut t, mut u) = (BlockTable::default(), BlockTable::default());
        assert!(a.grow(&mut t, 12) && a.grow(&mut u, 12));
        a.register(&mut t, &tokens[..8], 8);
        // The second's first two blocks duplicate them; its third follows the first's second.
        a.register(&mut u, &tokens, 12);
        assert_eq!(a.cached.len(), 3);
        let mut probe = BlockTable::default();
        assert_eq!(a.share_prefix(&mut probe, &tokens), 12);
        assert_eq!(probe.blocks, [t.blocks[0], t.blocks[1], u.blocks[2]]);
        a.release(&mut probe);
        // The duplicates were never registered: released, they are plainly free.
        a.release(&mut u);
        assert_eq!(a.cached_blocks(), 1, "only u's third block is cached");
    }

    #[test]
    fn a_duplicates_later_blocks_follow_the_registered_copy_step_after_step() {
        let mut a = BlockAllocator::new(4, 8);
        let tokens = filled(&[1, 2, 3]);
        let (mut t, mut u) = (BlockTable::default(), BlockTable::default());
        assert!(a.grow(&mut t, 12) && a.grow(&mut u, 12));
        // One step computes the first two blocks of both: t registers them, u's duplicate them.
        a.register(&mut t, &tokens, 8);
        a.register(&mut u, &tokens, 8);
        // A later step fills u's third block: it follows t's second, so a lookup reaches it.
        a.register(&mut u, &tokens, 12);
        let mut probe = BlockTable::default();
        assert_eq!(a.share_prefix(&mut probe, &tokens), 12);
        assert_eq!(probe.blocks, [t.blocks[0], t.blocks[1], u.blocks[2]]);
    }

    #[test]
    fn a_duplicates_later_blocks_never_follow_the_copys_next_contents() {
        let mut a = BlockAllocator::new(4, 6);
        let tokens = filled(&[1, 2, 3]);
        let (mut t, mut u) = (BlockTable::default(), BlockTable::default());
        assert!(a.grow(&mut t, 12) && a.grow(&mut u, 12));
        // One step computes the first two blocks of both: t registers them, u follows t's.
        a.register(&mut t, &tokens, 8);
        a.register(&mut u, &tokens, 8);
        let t_second = t.blocks[1];
        // t ends; v takes the free blocks, then t's cached ones, its second among them, and
        // registers new contents in them.
        a.release(&mut t);
        let mut v = BlockTable::default();
        assert!(a.grow(&mut v, 8 + 4 * a.free.len()));
        assert!(v.blocks.contains(&t_second), "{v:?}");
        let other = filled(&[9, 7, 5, 6, 4][..v.blocks.len()]);
        a.register(&mut v, &other, other.len());
        // u's third block was computed after [1][2]: registering it must not make it reachable
        // after whatever t's second block holds now.
        a.register(&mut u, &tokens, 12);
        let at = v.blocks.iter().position(|&b| b == t_second).unwrap();
        let mut lie = other[..(at + 1) * 4].to_vec();
        lie.extend(&tokens[8..12]);
        let mut probe = BlockTable::default();
        assert_eq!(a.share_prefix(&mut probe, &lie), (at + 1) * 4, "{probe:?}");
        assert!(!probe.blocks.contains(&u.blocks[2]));
    }

    #[test]
    fn budget_sizes_the_pool() {
        let a = BlockAllocator::from_budget(16, 16 * 100 * 10 + 5, 100);
        assert_eq!(a.total_blocks(), 10);
        assert_eq!(a.capacity_tokens(), 160);
    }

    /// A paged pool of one layer (block 2, 12 rows: latent 3 wide, RoPE keys 2, indexer keys 2).
    fn small_pool(b: &crate::backend::cpu::Cpu) -> SharedPool<crate::backend::cpu::Cpu> {
        let store = |cols| b.kv_store(12, cols, KvDtype::Float32).unwrap();
        Arc::new(RwLock::new(KvPool {
            block_size: 2,
            layers: vec![PoolLayer {
                latent: store(3),
                k_pe: store(2),
                index_keys: Some(store(2)),
            }],
        }))
    }

    /// Every store's 12 rows, as the host sees them.
    fn pool_rows(
        b: &crate::backend::cpu::Cpu,
        pool: &SharedPool<crate::backend::cpu::Cpu>,
    ) -> Vec<Vec<f32>> {
        let pool = pool.read().unwrap();
        let c = &pool.layers[0];
        let all: Vec<usize> = (0..12).collect();
        [&c.latent, &c.k_pe, c.index_keys.as_ref().unwrap()]
            .map(|store| b.to_host(&b.gather_rows(store, &all)))
            .to_vec()
    }

    /// A batch's rows written in one call (`append_batch`) land where appending cache by cache
    /// puts them, for caches with blocks interleaved in one pool, one with rows cached already;
    /// caches in two pools take the cache-by-cache path with the same result; and a batch with
    /// a cache short of blocks is an error that writes nothing.
    #[test]
    fn a_batch_appends_as_its_caches_would_one_by_one() {
        use crate::backend::cpu::Cpu;
        let b = Cpu;
        // Rows 0..2 for cache 0, 2..5 for cache 1.
        let tensor = |cols: usize, base: f32| {
            b.tensor(5, cols, (0..5 * cols).map(|i| base + i as f32).collect())
        };
        let (latent, k_pe, keys) = (tensor(3, 100.0), tensor(2, 200.0), tensor(2, 300.0));
        let spans = [(0, 2), (2, 3)];
        // Cache 0 in pools[0], one token cached (its rows go to pool rows 9 and 2); cache 1 in
        // pools[1], with one block (too few) when `short`.
        let setup = |pools: [&SharedPool<Cpu>; 2], short: bool| {
            let mut first = SeqCache::paged(pools[0].clone());
            first.set_blocks(&[4, 1]);
            first.len = 1;
            let mut second = SeqCache::paged(pools[1].clone());
            second.set_blocks(if short { &[0] } else { &[0, 5] });
            (first, second)
        };
        let append = |pools: [&SharedPool<Cpu>; 2], short: bool| {
            let (mut first, mut second) = setup(pools, short);
            let mut caches = [&mut first, &mut second];
            append_batch(&b, 0, &mut caches, &spans, &latent, &k_pe, Some(&keys))
        };

        let one_by_one = small_pool(&b);
        let (mut first, mut second) = setup([&one_by_one, &one_by_one], false);
        for (cache, (start, len)) in [(&mut first, spans[0]), (&mut second, spans[1])] {
            let keys = b.rows(&keys, start, len);
            let (l, k) = (b.rows(&latent, start, len), b.rows(&k_pe, start, len));
            cache.append(&b, 0, &l, &k, Some(&keys)).unwrap();
        }
        let want = pool_rows(&b, &one_by_one);

        let batched = small_pool(&b);
        append([&batched, &batched], false).unwrap();
        assert_eq!(pool_rows(&b, &batched), want, "one pool, one write a store");
        // Cache 0's second row went to pool row 2 (block 1's first row).
        assert_eq!(pool_rows(&b, &batched)[0][6..9], [103.0, 104.0, 105.0]);

        let (a, c) = (small_pool(&b), small_pool(&b));
        append([&a, &c], false).unwrap();
        let merged: Vec<Vec<f32>> = pool_rows(&b, &a)
            .into_iter()
            .zip(pool_rows(&b, &c))
            .map(|(x, y)| x.iter().zip(&y).map(|(p, q)| p + q).collect())
            .collect();
        assert_eq!(merged, want, "two pools, cache by cache");

        let full = small_pool(&b);
        let err = append([&full, &full], true).unwrap_err().to_string();
        assert!(err.contains("blocks for 2 tokens, 3 needed"), "{err}");
        let untouched = pool_rows(&b, &full).iter().flatten().all(|&v| v == 0.0);
        assert!(untouched, "rows written");
    }
}
