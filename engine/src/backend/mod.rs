//! The compute interface the model is written against. The CPU backend is the reference
//! (exact float32, used in CI and to check every GPU kernel); a CUDA backend implements the
//! same trait, so the model code exists once.

pub mod cpu;
pub mod cuda;

use crate::error::Result;
use crate::kv_cache::{KvDtype, PagedRows};
use crate::rope::{Rope, RopeLayout};
use crate::weights::{Matrix, StoredType};

/// Multi-head latent attention dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlaDims {
    pub heads: usize,
    pub nope: usize,
    pub rope: usize,
    pub v: usize,
    pub latent: usize,
}

/// Expanded: build per-head keys and values from the latent (cheap for many queries).
/// Absorbed: fold `kv_b_proj` into the query and output (cheap for few queries over a long cache).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionForm {
    Expanded,
    Absorbed,
}

/// One routed expert's SwiGLU weights.
#[derive(Debug)]
pub struct Expert<W> {
    pub gate: W,
    pub up: W,
    pub down: W,
}

/// Routing of one batch: for each row, the chosen experts and their weights.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routing {
    pub experts: Vec<Vec<usize>>,
    pub weights: Vec<Vec<f32>>,
}

impl Routing {
    /// Every (row, expert, weight) choice, row by row.
    pub fn pairs(&self) -> impl Iterator<Item = crate::expert_shards::Pair> + '_ {
        self.experts
            .iter()
            .zip(&self.weights)
            .enumerate()
            .flat_map(|(row, (ids, weights))| {
                ids.iter()
                    .zip(weights)
                    .map(move |(&expert, &weight)| crate::expert_shards::Pair {
                        row,
                        expert,
                        weight,
                    })
            })
    }
}

/// One expert and the (row, weight) pairs routed to it.
pub type ExpertRows = (usize, Vec<(usize, f32)>);

/// `pairs` grouped by expert, in expert order (so each expert runs one product over all its
/// rows, and sums are added in a fixed order).
pub fn by_expert(
    pairs: impl Iterator<Item = crate::expert_shards::Pair>,
    num_experts: usize,
) -> Vec<ExpertRows> {
    let mut rows_of: Vec<Vec<(usize, f32)>> = vec![Vec::new(); num_experts];
    for p in pairs {
        rows_of[p.expert].push((p.row, p.weight));
    }
    rows_of
        .into_iter()
        .enumerate()
        .filter(|(_, rows)| !rows.is_empty())
        .collect()
}

/// `(expert, first row, rows)` of each expert with rows, in expert order, from the experts'
/// group offsets (`offsets[e]..offsets[e + 1]` are expert e's rows in expert order).
pub fn experts_with_rows(offsets: &[i32]) -> Vec<(usize, usize, usize)> {
    offsets
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[1] > w[0])
        .map(|(e, w)| (e, w[0] as usize, (w[1] - w[0]) as usize))
        .collect()
}

/// The pairs of each row: `rows[j]` is pair `j`'s row (of `n_rows`); row `r`'s pairs are
/// `pairs[offsets[r]..offsets[r + 1]]`, ascending (a compressed-row list, `offsets` has
/// `n_rows + 1` entries).
pub fn pairs_by_row(rows: &[usize], n_rows: usize) -> (Vec<usize>, Vec<usize>) {
    let mut offsets = vec![0usize; n_rows + 1];
    for &r in rows {
        offsets[r + 1] += 1;
    }
    for r in 0..n_rows {
        offsets[r + 1] += offsets[r];
    }
    let mut next = offsets.clone();
    let mut pairs = vec![0usize; rows.len()];
    for (j, &r) in rows.iter().enumerate() {
        pairs[next[r]] = j;
        next[r] += 1;
    }
    (offsets, pairs)
}

/// A sequence's cached latent (`[T, latent]`) and RoPE-key (`[T, rope]`) rows as
/// [`Backend::mla_attention`] reads them: tensors, or a paged pool's KV stores read in place
/// (only stores the backend reads in place: [`Backend::reads_in_place`]).
#[derive(Debug)]
pub enum CachedRows<'a, T, S> {
    Tensors { latent: &'a T, k_pe: &'a T },
    Stores { latent: &'a S, k_pe: &'a S },
}

impl<T, S> Clone for CachedRows<'_, T, S> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T, S> Copy for CachedRows<'_, T, S> {}

impl<'a, T, S> CachedRows<'a, T, S> {
    /// The latent and RoPE-key tensors, when the rows are tensors.
    pub fn tensors(self) -> Option<(&'a T, &'a T)> {
        match self {
            Self::Tensors { latent, k_pe } => Some((latent, k_pe)),
            Self::Stores { .. } => None,
        }
    }
}

/// One sequence's part of a batched [`Backend::indexer_select_paged`] call.
#[derive(Clone, Copy, Debug)]
pub struct IndexerSeq<'a> {
    /// Its first query row in the batch; it has `positions.len()` rows.
    pub first: usize,
    /// Each query row's position in the sequence (its visible keys: `0..=position`).
    pub positions: &'a [usize],
    /// Where its keys are in the store; it holds at least `max(positions) + 1` tokens.
    pub table: PagedRows<'a>,
}

/// [`Backend::indexer_select_paged`] a sequence at a time over its keys gathered as float32
/// ([`Backend::gather_rows`]): the trait's default, and a backend's fallback for keys its
/// in-place kernels cannot read. Under an fp8 store the queries are rounded to fp8 first, on
/// the host ([`fp8_indexer_queries`]).
pub fn indexer_select_gathered<B: Backend + ?Sized>(
    b: &B,
    q: &B::Tensor,
    w: &B::Tensor,
    keys: &B::Store,
    seqs: &[IndexerSeq<'_>],
    k: usize,
    scale: f32,
) -> Vec<Vec<Vec<u32>>> {
    let rounded;
    let q = match fp8_indexer_queries(b, q, w, keys) {
        Some(r) => {
            rounded = r;
            &rounded
        }
        None => q,
    };
    seqs.iter()
        .map(|seq| {
            let n = seq.positions.len();
            let gathered = b.gather_rows(keys, &seq.table.rows(0..seq.table.tokens()));
            let (q, w) = (b.rows(q, seq.first, n), b.rows(w, seq.first, n));
            b.indexer_select(&q, &w, &gathered, seq.positions, k, scale)
        })
        .collect()
}

/// The indexer's queries `q` (`[rows, heads·dim]`, `w` `[rows, heads]`) as the indexer
/// multiplies them against the keys of `keys`: under an fp8 store, DeepSeek's fp8 indexer
/// rounds each head's query to e4m3 with a scale per [`crate::kv_cache::FP8_BLOCK`] values, as
/// the store rounds each key ([`cpu::fp8_round_rows`]), so the scores are those of the rounded
/// values on both sides (`Some`: the rounded copy, made on the host); other stores score the
/// queries as they are (`None`). Every backend's indexer over a store answers for these values:
/// the CUDA backend's kernels round in shared memory.
pub fn fp8_indexer_queries<B: Backend + ?Sized>(
    b: &B,
    q: &B::Tensor,
    w: &B::Tensor,
    keys: &B::Store,
) -> Option<B::Tensor> {
    let dtype = b.kv_dtype(keys);
    if !dtype.is_fp8() {
        return None;
    }
    let ((rows, cols), heads) = (b.shape(q), b.shape(w).1);
    assert!(
        heads > 0 && cols.is_multiple_of(heads),
        "indexer: q is not [rows, heads·dim]"
    );
    let mut host = b.to_host(q);
    cpu::fp8_round_rows(&mut host, cols / heads, dtype == KvDtype::Fp8Ue8m0);
    Some(b.tensor(rows, cols, host))
}

/// The keys an [`MlaSeq`]'s rows attend to, when the indexer chose them.
#[derive(Debug)]
pub enum Selection<'a, P> {
    /// Row `i` attends to the tokens `listed[i]` (those at or before its position).
    Listed(&'a [Vec<u32>]),
    /// Row `i` attends to the keys the indexer picked for row `i` of sequence `seq` of a batch
    /// whose picks the backend kept on its device ([`Backend::indexer_keep_paged`]). Only a
    /// backend that keeps picks gets these, for rows it reads in place ([`MlaSeq::rows`]); it
    /// reads them itself, and [`MlaSeq`]'s host lists ([`MlaSeq::key_rows_iter`] and the
    /// others) have none to give.
    Kept { picks: &'a P, seq: usize },
}

impl<P> Clone for Selection<'_, P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P> Copy for Selection<'_, P> {}

/// A backend's [`Backend::Picks`] when it keeps none: no value of it exists, so no
/// [`Selection::Kept`] can be made for that backend.
#[derive(Debug)]
pub enum NoPicks {}

/// One sequence's part of a batched [`Backend::mla_attention`] call.
#[derive(Debug)]
pub struct MlaSeq<'a, T, S, P = NoPicks> {
    /// Its first query row in the batch; it has `positions.len()` rows.
    pub first: usize,
    /// The cached latent and RoPE-key rows it attends to.
    pub cached: CachedRows<'a, T, S>,
    /// Each query row's position in the sequence.
    pub positions: &'a [usize],
    /// The keys the indexer chose for its rows ([`Selection`]), or, when `None`, every row
    /// `s ≤ positions[i]` for row `i`.
    pub selection: Option<Selection<'a, P>>,
    /// Where cache row `s` is: row `rows.row(s)` of the cached rows (a paged pool's rows, read
    /// in place through its block table), or, when `None`, row `s`.
    pub rows: Option<PagedRows<'a>>,
    pub form: AttentionForm,
}

impl<T, S, P> Clone for MlaSeq<'_, T, S, P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T, S, P> Copy for MlaSeq<'_, T, S, P> {}

impl<'a, T, S, P> MlaSeq<'a, T, S, P> {
    /// The host's lists of its picks (`None`: it attends densely).
    ///
    /// # Panics
    /// With picks kept on the device ([`Selection::Kept`]): the backend that kept them reads
    /// them there.
    fn listed(&self) -> Option<&'a [Vec<u32>]> {
        match self.selection {
            None => None,
            Some(Selection::Listed(lists)) => Some(lists),
            Some(Selection::Kept { .. }) => {
                panic!("MlaSeq: the picks are kept on the device; the backend reads them there")
            }
        }
    }

    /// Keys its rows attend to, summed over the rows (the measure of its attention's work).
    pub fn keys(&self) -> usize {
        match self.listed() {
            Some(sel) => sel.iter().map(Vec::len).sum(),
            None => self.positions.iter().map(|p| p + 1).sum(),
        }
    }

    /// The cache rows its row `i` attends to: its selection's rows at or before its position,
    /// or, without a selection, every row up to its position.
    pub fn visible_keys(&self, i: usize) -> Vec<usize> {
        let pos = self.positions[i];
        match self.listed() {
            Some(sel) => sel[i]
                .iter()
                .map(|&s| s as usize)
                .filter(|&s| s <= pos)
                .collect(),
            None => (0..=pos).collect(),
        }
    }

    /// [`MlaSeq::visible_keys`] as rows of the cached rows.
    pub fn key_rows(&self, i: usize) -> Vec<usize> {
        self.key_rows_iter(i).collect()
    }

    /// [`MlaSeq::key_rows`] one at a time, in the same order, collecting nothing (a decode
    /// batch's rows each have thousands).
    pub fn key_rows_iter(&self, i: usize) -> impl Iterator<Item = usize> + use<'a, T, S, P> {
        let pos = self.positions[i];
        // Every key up to the position, or the picks: one of the two is empty.
        let (every, picked) = match self.listed() {
            Some(sel) => (0..0, &sel[i][..]),
            None => (0..pos + 1, &[][..]),
        };
        let table = self.rows;
        every
            .chain(
                picked
                    .iter()
                    .map(|&s| s as usize)
                    .filter(move |&s| s <= pos),
            )
            .map(move |s| table.map_or(s, |t| t.row(s)))
    }

    /// How many keys row `i` lists: [`MlaSeq::key_rows`]' length, or more when its selection
    /// names keys past its position (which it does not attend to).
    pub fn listed_keys(&self, i: usize) -> usize {
        self.listed()
            .map_or(self.positions[i] + 1, |sel| sel[i].len())
    }

    /// For a backend that reads only tensors: the cache rows its query rows can see (tokens
    /// `0..=max(positions)`) gathered out of the stores it reads, or `None` when it reads
    /// tensors. [`MlaSeq::over`] makes the sequence that reads the copies.
    pub fn gather_stores<B>(&self, b: &B) -> Option<(T, T)>
    where
        B: Backend<Tensor = T, Store = S, Picks = P> + ?Sized,
    {
        let CachedRows::Stores { latent, k_pe } = self.cached else {
            return None;
        };
        let tokens = self.positions.iter().max().map_or(0, |p| p + 1);
        let slots = match self.rows {
            Some(table) => table.rows(0..tokens),
            None => (0..tokens).collect(),
        };
        Some((b.gather_rows(latent, &slots), b.gather_rows(k_pe, &slots)))
    }

    /// This sequence reading the tensors `latent` and `k_pe`, whose row `s` is its token `s`
    /// (as [`MlaSeq::gather_stores`] returns them).
    pub fn over<'b>(&self, latent: &'b T, k_pe: &'b T) -> MlaSeq<'b, T, S, P>
    where
        'a: 'b,
    {
        MlaSeq {
            cached: CachedRows::Tensors { latent, k_pe },
            rows: None,
            ..*self
        }
    }
}

/// The weights of a layer's MLA that the attention itself uses.
#[derive(Debug)]
pub struct MlaWeights<'a, W> {
    /// `kv_b_proj`: per head `h`, rows `h·(nope+v) ..` hold `W_UK,h` (`[nope, latent]`) and
    /// then `W_UV,h` (`[v, latent]`).
    pub kv_b: &'a W,
    /// `W_UK,hᵀ` (`[latent, nope]`) of every head, stacked (`[heads·latent, nope]`): the
    /// absorbed form's query projection as an ordinary product (see
    /// [`absorbed_query_weight`]).
    pub uk_t: &'a W,
}

// By hand: a derive would ask `W: Copy`, and only references are copied.
impl<W> Clone for MlaWeights<'_, W> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<W> Copy for MlaWeights<'_, W> {}

/// `W_UK,hᵀ` of every head of `kv_b` (`[heads·(nope+v), latent]`), stacked into
/// `[heads·latent, nope]`, so that a query's latent form `q_nope,h · W_UK,h` is the product
/// `q_nope,h · (W_UK,hᵀ)ᵀ` every backend computes fast. Kept as bf16 when `kv_b` is bf16
/// (transposing is exact), else as f32 (fp8 values times their block scales, exactly as the
/// products dequantise them).
pub fn absorbed_query_weight(kv_b: &Matrix, dims: MlaDims) -> Matrix {
    let (kv_width, latent, nope) = (dims.nope + dims.v, dims.latent, dims.nope);
    assert_eq!(kv_b.rows, dims.heads * kv_width, "kv_b rows");
    assert_eq!(kv_b.cols, latent, "kv_b columns");
    let w = kv_b.to_f32_vec();
    let mut t = vec![0f32; dims.heads * latent * nope];
    for h in 0..dims.heads {
        for c in 0..nope {
            let src = &w[(h * kv_width + c) * latent..][..latent];
            for (j, &x) in src.iter().enumerate() {
                t[(h * latent + j) * nope + c] = x;
            }
        }
    }
    let rows = dims.heads * latent;
    match kv_b.dtype {
        StoredType::Bf16 => {
            let bytes = t
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
                .collect();
            Matrix::from_bytes(rows, nope, StoredType::Bf16, bytes)
        }
        _ => Matrix::from_f32(rows, nope, t),
    }
}

/// Compute primitives over row-major `[rows, cols]` float32 activations.
pub trait Backend: Send + Sync + 'static {
    /// Activations on the device.
    type Tensor: Send + Sync;
    /// A weight matrix on the device.
    type Weight: Send + Sync;
    /// Rows of one kind (MLA latent, RoPE key or indexer key) of a paged KV pool, stored as a
    /// [`KvDtype`].
    type Store: Send + Sync;
    /// A batch's indexer picks kept on the device ([`Backend::indexer_keep_paged`]);
    /// [`NoPicks`] for a backend that keeps none.
    type Picks: Send + Sync;

    /// Human-readable device name (metrics, logs).
    fn name(&self) -> String;

    /// Runs one forward pass `f` where this backend's host work runs best (the CPU backend:
    /// on its worker pool, so the calling thread does not compete with the workers).
    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    /// Into how many groups a batch with `tokens[s]` new tokens for sequence `s` is split, each
    /// group run as its own forward pass side by side (inside [`Backend::install`]). The
    /// default, one, runs the whole batch as one pass.
    fn batch_groups(&self, tokens: &[usize]) -> usize {
        let _ = tokens;
        1
    }

    /// Free device memory in bytes, for a device with memory of its own (sizing the KV cache
    /// with `--kv-cache-memory-fraction`); `None` means host memory.
    fn device_memory_available(&self) -> Option<u64> {
        None
    }

    /// Moves a weight matrix to the device (once, at load).
    fn upload(&self, matrix: Matrix) -> Result<Self::Weight>;
    /// Moves a routed expert's weight matrix to the device, at load: with expert parallelism
    /// across devices, to each of the expert shards `holders` (see [`crate::expert_shards`]);
    /// by default, with the other weights.
    fn upload_expert(&self, matrix: Matrix, holders: &[usize]) -> Result<Self::Weight> {
        let _ = holders;
        self.upload(matrix)
    }
    /// Makes a `[rows, cols]` tensor from host data.
    fn tensor(&self, rows: usize, cols: usize, data: Vec<f32>) -> Self::Tensor;
    /// A zero-filled KV store of `rows` rows of `cols` values kept as `dtype` (allocated once,
    /// at start-up); an allocation that does not fit is an error naming its size.
    fn kv_store(&self, rows: usize, cols: usize, dtype: KvDtype) -> Result<Self::Store>;

    /// How a KV store keeps its rows (the dtype [`Backend::kv_store`] made it with).
    fn kv_dtype(&self, store: &Self::Store) -> KvDtype;
    /// An empty `[0, cols]` tensor (a cache to append to).
    fn empty(&self, cols: usize) -> Self::Tensor {
        self.tensor(0, cols, Vec::new())
    }
    /// Copies a tensor to the host.
    fn to_host(&self, x: &Self::Tensor) -> Vec<f32>;
    /// `(rows, cols)`.
    fn shape(&self, x: &Self::Tensor) -> (usize, usize);

    /// Rows of `table` for each token.
    fn embed(&self, table: &Self::Weight, tokens: &[u32]) -> Self::Tensor;
    /// `x · wᵀ`.
    fn linear(&self, x: &Self::Tensor, w: &Self::Weight) -> Self::Tensor;
    /// RMSNorm of each row with weight `w` (`[1, cols]`).
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Tensor, eps: f32) -> Self::Tensor;
    /// LayerNorm of each row (biased variance) with weight and bias (`[1, cols]`).
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: &Self::Tensor,
        eps: f32,
    ) -> Self::Tensor;
    /// `x += y`.
    fn add(&self, x: &mut Self::Tensor, y: &Self::Tensor);
    /// Columns `start..start + len` of every row.
    fn columns(&self, x: &Self::Tensor, start: usize, len: usize) -> Self::Tensor;
    /// Rows `start..start + len`.
    fn rows(&self, x: &Self::Tensor, start: usize, len: usize) -> Self::Tensor;
    /// Stacks tensors with equal column counts.
    fn concat_rows(&self, parts: &[&Self::Tensor]) -> Self::Tensor;
    /// Rows `rows[0]`, `rows[1]`, … of `x`, stacked (each below x's row count). By default
    /// each run of consecutive rows is cut out ([`Backend::rows`]) and the runs stacked; a
    /// backend that gathers rows in one go overrides it.
    fn select_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Self::Tensor {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for &r in rows {
            match runs.last_mut() {
                Some((start, len)) if *start + *len == r => *len += 1,
                _ => runs.push((r, 1)),
            }
        }
        match runs[..] {
            [(start, len)] => self.rows(x, start, len),
            _ => {
                let parts: Vec<Self::Tensor> =
                    runs.iter().map(|&(s, n)| self.rows(x, s, n)).collect();
                self.concat_rows(&parts.iter().collect::<Vec<_>>())
            }
        }
    }
    /// Appends `rows` to `cache`.
    fn append_rows(&self, cache: &mut Self::Tensor, rows: &Self::Tensor);
    /// Writes row `i` of `rows` to row `slots[i]` of the KV store `dst`, in its dtype (bf16:
    /// rounded to nearest, ties to even).
    fn write_rows(&self, dst: &mut Self::Store, slots: &[usize], rows: &Self::Tensor);
    /// Rows `slots[0], slots[1], …` of the KV store `src` as float32, stacked (reading a paged
    /// KV cache through a sequence's block table).
    fn gather_rows(&self, src: &Self::Store, slots: &[usize]) -> Self::Tensor;
    /// Rotates, in every row `r` and head `h`, the values
    /// `x[r, h·head_width + offset ..][..rope.dim()]` for position `positions[r]`.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Self::Tensor,
        heads: usize,
        head_width: usize,
        offset: usize,
        positions: &[usize],
        rope: &Rope,
        layout: RopeLayout,
    );

    /// Rotates every `dim` values of each row of `x` (`dim` a power of two dividing its width)
    /// by the orthonormal Walsh–Hadamard matrix `H / √dim` ([`crate::linalg::hadamard`]).
    fn hadamard(&self, x: &mut Self::Tensor, dim: usize);

    /// DSA lightning indexer: for query row `i` at position `positions[i]` the indices of the
    /// `k` cached keys `s ≤ positions[i]` with the largest `Σ_h w[i,h]·ReLU(scale·q[i,h]·keys[s])`
    /// (all of them when there are at most `k`).
    fn indexer_select(
        &self,
        q: &Self::Tensor,
        w: &Self::Tensor,
        keys: &Self::Tensor,
        positions: &[usize],
        k: usize,
        scale: f32,
    ) -> Vec<Vec<u32>>;

    /// Whether [`Backend::mla_attention`] can run attention of these dimensions: an error that
    /// names the limit when it cannot, checked when a model is loaded rather than at its first
    /// step. The default takes any.
    fn check_attention(&self, dims: MlaDims) -> Result<()> {
        let _ = dims;
        Ok(())
    }

    /// Whether the indexer's scores can run for `heads` heads of `dim` values, over a KV pool
    /// of any dtype: as [`Backend::check_attention`], checked when a model that runs its
    /// indexer is loaded. The default takes any.
    fn check_indexer(&self, heads: usize, dim: usize) -> Result<()> {
        let _ = (heads, dim);
        Ok(())
    }

    /// Whether [`Backend::mla_attention`] reads this KV store's rows where they are (through
    /// [`CachedRows::Stores`] and [`MlaSeq::rows`]), in the store's dtype. The default, false,
    /// has a paged cache gather the attended rows into float32 tensors first: the CPU
    /// backend's choice, as its expanded form expands every row it is given.
    fn reads_in_place(&self, store: &Self::Store) -> bool {
        let _ = store;
        false
    }

    /// [`Backend::indexer_select`] for the query rows of several sequences whose indexer keys
    /// are kept in one KV store (a paged pool's): sequence `i`'s rows are rows
    /// `seqs[i].first..` of `q` and `w`, and its key `s` is row `seqs[i].table.row(s)` of
    /// `keys`. Under an fp8 store the scores are those of the queries rounded as the store
    /// rounds its keys ([`fp8_indexer_queries`]: DeepSeek's fp8 indexer), so every backend
    /// picks the same keys. Returns each sequence's selections, in `seqs`' order. This default
    /// gathers each sequence's keys as float32 and selects a sequence at a time; a backend that
    /// reads the store in place overrides it (the CUDA backend: one launch for the whole
    /// batch).
    fn indexer_select_paged(
        &self,
        q: &Self::Tensor,
        w: &Self::Tensor,
        keys: &Self::Store,
        seqs: &[IndexerSeq<'_>],
        k: usize,
        scale: f32,
    ) -> Vec<Vec<Vec<u32>>> {
        indexer_select_gathered(self, q, w, keys, seqs, k, scale)
    }

    /// [`Backend::indexer_select_paged`] with the picks left on the device, each pick already
    /// the pool row that holds its token (through its sequence's block table), for an
    /// attention that reads the same pool in place to take as [`Selection::Kept`] (sequence
    /// `i` of `seqs` is `seq: i`), so that neither the picks nor the attention's key lists
    /// cross to the host. `None` (the default) when this backend keeps no picks, or not these:
    /// the caller then asks [`Backend::indexer_select_paged`].
    fn indexer_keep_paged(
        &self,
        q: &Self::Tensor,
        w: &Self::Tensor,
        keys: &Self::Store,
        seqs: &[IndexerSeq<'_>],
        k: usize,
        scale: f32,
    ) -> Option<Self::Picks> {
        let _ = (q, w, keys, seqs, k, scale);
        None
    }

    /// Multi-head latent attention of the query rows `q` (`[n, heads·(nope+rope)]`, RoPE
    /// applied) of several sequences, each against its own cache (see [`MlaSeq`]). Returns
    /// `[n, heads·v]`; rows of `q` that no sequence names are left zero.
    fn mla_attention(
        &self,
        q: &Self::Tensor,
        seqs: &[MlaSeq<'_, Self::Tensor, Self::Store, Self::Picks>],
        weights: MlaWeights<'_, Self::Weight>,
        dims: MlaDims,
        scale: f32,
    ) -> Self::Tensor;

    /// `down(silu(gate(x)) ⊙ up(x))`.
    fn swiglu(&self, x: &Self::Tensor, expert: &Expert<Self::Weight>) -> Self::Tensor;

    /// `Σ_j weights[i][j] · experts[ids[i][j]](x[i])` for every row.
    fn moe_experts(
        &self,
        x: &Self::Tensor,
        routing: &Routing,
        experts: &[Expert<Self::Weight>],
    ) -> Self::Tensor;

    /// The routed experts of a MoE layer, routed where the tensors are: each row of `x` routed
    /// by its router `logits` (`[n, router.n_experts]`) and the selection `bias`
    /// (`[1, n_experts]`) as [`crate::moe::route`] routes it, and the sum
    /// [`Backend::moe_experts`] returns for that routing. Each expert's routed rows are added
    /// to row `layer` of `load`, the step's counts (`[layers, n_experts]`, made as zeros by the
    /// first layer routed this way in the step), so that they cross to the host once a step
    /// rather than a layer. `None` (the default), having launched nothing (nor made `load`),
    /// when this backend routes on the host, or not these rows: the caller then copies the
    /// logits to the host, routes them there and calls [`Backend::moe_experts`] (or, with
    /// `shards`, [`Backend::moe_experts_sharded`]).
    ///
    /// With expert `shards`, each pair is computed by the shard
    /// [`crate::expert_shards::ExpertShards::dispatch`]'s rule names, and the caller counts the
    /// shards' pairs from `load` ([`crate::expert_shards::ExpertShards::count_routed`]).
    #[allow(clippy::too_many_arguments)]
    fn moe_routed(
        &self,
        x: &Self::Tensor,
        logits: &Self::Tensor,
        bias: &Self::Tensor,
        router: &crate::moe::RouterConfig,
        experts: &[Expert<Self::Weight>],
        load: &mut Option<Self::Tensor>,
        (layer, layers): (usize, usize),
        shards: Option<&crate::expert_shards::ExpertShards>,
    ) -> Option<Self::Tensor> {
        let _ = (
            x, logits, bias, router, experts, load, layer, layers, shards,
        );
        None
    }

    /// Runs a layer's MLP block, `block(h, load)`: `h += mlp(norm(h))`, adding the layer's
    /// routed-token counts to `load` where [`Backend::moe_routed`] routes on the device (a
    /// dense layer is given a `None` of its own). While the backend's settings stay as they
    /// are, a block that copies nothing to or from the host launches the same work for the
    /// same `(id, rows)` every time, so a backend may record it once and replay the recording
    /// after (the CUDA backend's graphs, `Cuda::graph_rows`, forgotten when a setting
    /// changes). The default runs `block`.
    fn mlp_block(
        &self,
        id: BlockId,
        h: &mut Self::Tensor,
        load: &mut Option<Self::Tensor>,
        block: &mut MlpBlock<'_, Self::Tensor>,
    ) {
        let _ = id;
        block(h, load)
    }

    /// Drops whatever [`Backend::mlp_block`] kept for `model`'s blocks (its model is gone).
    fn forget_blocks(&self, model: u64) {
        let _ = model;
    }

    /// What this backend's recordings of [`Backend::mlp_block`] did so far, read from any
    /// thread (`/metrics`), where it records them (the CUDA backend's graphs); `None` where it
    /// records nothing.
    fn graph_counts_source(&self) -> Option<GraphCountsSource> {
        None
    }

    /// The same sum with expert parallelism: `work[s]` holds the (row, expert, weight) pairs
    /// shard `s` computes (see [`crate::expert_shards`]); the shards run side by side and their
    /// outputs are combined per row.
    fn moe_experts_sharded(
        &self,
        x: &Self::Tensor,
        work: &[Vec<crate::expert_shards::Pair>],
        experts: &[Expert<Self::Weight>],
    ) -> Self::Tensor;
}

/// A layer's MLP block as [`Backend::mlp_block`] runs it: `(h, load)`.
pub type MlpBlock<'a, T> = dyn FnMut(&mut T, &mut Option<T>) + 'a;

/// Which model's which layer a [`Backend::mlp_block`] is: two models on one backend never
/// share a recording.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockId {
    /// The model's serial number (each model loaded in the process has its own).
    pub model: u64,
    pub layer: usize,
}

/// What a backend's recordings of MLP blocks (CUDA graphs) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphCounts {
    /// Blocks captured into graphs.
    pub captured: u64,
    /// Graph launches.
    pub replayed: u64,
    /// Captures spoiled by a copy to or from the host (each tried again after a clean run).
    pub spoiled: u64,
    /// Blocks that run without a graph for good (their captures were refused or spoiled).
    pub eager: u64,
}

impl std::ops::Sub for GraphCounts {
    type Output = Self;

    /// What happened between two readings (`later - earlier`).
    fn sub(self, earlier: Self) -> Self {
        Self {
            captured: self.captured - earlier.captured,
            replayed: self.replayed - earlier.replayed,
            spoiled: self.spoiled - earlier.spoiled,
            eager: self.eager - earlier.eager,
        }
    }
}

/// Reads a backend's [`GraphCounts`] ([`Backend::graph_counts_source`]).
pub type GraphCountsSource = std::sync::Arc<dyn Fn() -> GraphCounts + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::{AttentionForm, CachedRows, MlaSeq, Selection, experts_with_rows, pairs_by_row};
    use crate::kv_cache::PagedRows;

    #[test]
    fn experts_with_rows_skip_the_empty_ones_and_keep_their_places() {
        // Experts 0 and 3 have no rows; expert 4's start where expert 2's end.
        let offsets = [0, 0, 3, 5, 5, 9];
        assert_eq!(
            experts_with_rows(&offsets),
            [(1, 0, 3), (2, 3, 2), (4, 5, 4)]
        );
        assert!(experts_with_rows(&[0, 0, 0]).is_empty());
        assert!(experts_with_rows(&[]).is_empty());
    }

    #[test]
    fn key_rows_are_the_visible_keys_through_the_table() {
        // Tokens 0..8 in blocks of 2: token t is pool row 2·blocks[t / 2] + t % 2.
        let blocks = [3, 0, 5, 1];
        let table = PagedRows::new(&blocks, 2, 8);
        let picks = [vec![0, 3, 6], vec![1, 7, 2]];
        let positions = [5, 7];
        let unit = ();
        let seq = |selection, rows| MlaSeq::<'_, (), ()> {
            first: 0,
            cached: CachedRows::Tensors {
                latent: &unit,
                k_pe: &unit,
            },
            positions: &positions,
            selection,
            rows,
            form: AttentionForm::Absorbed,
        };
        // Row 0 lists 6 but sits at position 5: it attends to 0 and 3 only.
        let picked = seq(Some(Selection::Listed(&picks[..])), None);
        assert_eq!(picked.key_rows(0), [0, 3]);
        assert_eq!(picked.listed_keys(0), 3);
        assert_eq!(picked.key_rows(1), [1, 7, 2], "the picks' own order");
        let paged = seq(Some(Selection::Listed(&picks[..])), Some(table));
        assert_eq!(paged.key_rows(0), [6, 1]);
        assert_eq!(paged.key_rows(1), [7, 3, 0]);
        let dense = seq(None, Some(table));
        assert_eq!(dense.key_rows(0), [6, 7, 0, 1, 10, 11]);
        assert_eq!(dense.listed_keys(1), 8);
        assert_eq!(dense.key_rows_iter(1).count(), 8);
    }

    #[test]
    fn pairs_are_listed_by_row_in_ascending_order() {
        // Pairs 0..6 in expert order, their rows scattered; row 1 and row 4 have none.
        let rows = [3, 0, 3, 2, 0, 3];
        let (offsets, pairs) = pairs_by_row(&rows, 5);
        assert_eq!(offsets, [0, 2, 2, 3, 6, 6]);
        assert_eq!(pairs, [1, 4, 3, 0, 2, 5]);
        for r in 0..5 {
            for &j in &pairs[offsets[r]..offsets[r + 1]] {
                assert_eq!(rows[j], r);
            }
        }
        assert_eq!(pairs_by_row(&[], 3), (vec![0, 0, 0, 0], vec![]));
    }
}
