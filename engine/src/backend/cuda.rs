//! The CUDA backend (`--device cuda:N`, or `cuda:N,M,…`): the model on NVIDIA GPUs through
//! cudarc.
//!
//! First version, written for correctness against the CPU reference, not yet for speed:
//! - Activations are float32 on the device, as in the CPU backend. Weights are float32 too
//!   (`--dtype float32`: bf16 and fp8 checkpoints widened at upload) or bf16 (`--dtype
//!   bfloat16`: half the bytes; a product rounds its input to bf16 and runs on the tensor cores
//!   with float32 sums). Under bf16, DeepSeek's fp8 weights stay fp8 (a quarter of the float32
//!   bytes). A product of at most [`Cuda::in_place_rows`] rows (64; a decode step's) with an
//!   fp8 or bf16 weight reads it in place on the tensor cores, x rounded to bf16 as it is read
//!   (`fp8_linear_tc`, `bf16_linear_tc`: one launch, split over k when its grid is small; the
//!   absorbed attention's per-head products into and out of the latent space as one batch
//!   each); a longer one runs on cuBLAS, an fp8 weight dequantised to bf16 for it.
//! - Other products go through cuBLAS (`Sgemm` or bf16 `GemmEx`, strided-batched for the
//!   per-head products of the absorbed MLA); the row operations between them are the float32 kernels of
//!   `kernels/cuda/engine.cu`, and the indexer's selection is `topk.cu`'s radix select. Both
//!   files are compiled at start-up with NVRTC, so no CUDA toolkit is needed at build time,
//!   for each GPU's own architecture ([`kernel_target`]: machine code for it where NVRTC knows
//!   it, so the driver compiles nothing and an NVRTC newer than the driver still loads; else PTX
//!   for the newest architecture NVRTC has that the GPU runs, [`kernel_arch`]; never NVRTC's
//!   default, sm_75 in CUDA 13, which has no bf16 `mma.sync`), and a GPU older than sm_80 is
//!   refused at start-up.
//! - The paged KV pool lives on the first GPU, in float32, as bf16 bits, or as fp8 e4m3 codes
//!   with a scale per 128 values (`--kv-cache-dtype`): rows are rounded as they are written and
//!   widened to float32 as they are read. The indexer reads its keys in place there, through
//!   each sequence's block table (`indexer_scores_store_*`: the tables, a value a block, are
//!   what is uploaded, not a row number a key; a layer's batch is one scores launch and one
//!   top-k launch, `indexer_select_paged`), and attention the latent and RoPE rows
//!   (`mla_latent_attention_{f32, bf16_bits, fp8}`, `reads_in_place`, `MlaSeq::rows`), so a
//!   step copies no cached rows.
//! - The routed experts of a MoE layer run as three grouped products over their rows gathered
//!   in expert order, and one launch adds each token's weighted outputs. fp8 experts, at any
//!   rows, and bf16 experts while no expert has more rows than [`Cuda::in_place_rows`] (a
//!   decode step's) run as three launches of our own grouped kernels (`fp8_grouped_tc`,
//!   `bf16_grouped_tc`), each reading every active expert's weight in place with float32
//!   outputs, a grid row per 64-row tile of an expert, the tiles read on the device; bf16
//!   experts with more rows and float32 experts take cuBLAS's grouped products
//!   (`cublasGemmGroupedBatchedEx`, one group per expert), and experts of mixed dtypes or
//!   shapes (or any, once cuBLAS refuses the grouped call) run one product per expert.
//! - Attention always takes the absorbed form (the same function as the expanded one): a block
//!   per row and 16 heads (on the tensor cores 16 to 64), which reads each tile of the row's
//!   keys once, widened into shared memory, and scores all its heads against it, with an online
//!   softmax per head. A launch of too few rows to give every multiprocessor a block splits
//!   each row's keys over several blocks and combines their parts by log-sum-exp (flash
//!   decoding: `launch::mla_split_keys`, `mla_combine_splits_f32`).
//! - Over an fp8 pool the indexer is DeepSeek's fp8 indexer, as the trait asks
//!   ([`super::fp8_indexer_queries`]): the kernels round each head's query to e4m3 in shared
//!   memory as the pool rounds a key, and with the tensor cores on multiply the codes
//!   (`indexer_scores_tc_store_fp8`, `mma.sync.m16n8k32` e4m3: Ada's fp8 tensor cores, fp16
//!   products on Hopper, which has fp8 rates only through `wgmma`; sm_80 widens each to two
//!   exact bf16 products), each key's scale applied to its sum. A tensor-core indexer block
//!   scores several tiles of 64 keys while the launch still leaves every multiprocessor four
//!   blocks (`launch::indexer_tc_tiles`), so a row's query is staged (and rounded) once for
//!   them all, not once a tile.
//! - The indexer's picks stay on the device ([`Backend::indexer_keep_paged`], [`KeptPicks`]):
//!   `picks_to_pool_rows` turns each top-k row into the pool rows that hold its tokens, through
//!   the row's block table, and the attention reads those as its key lists, so a layer copies
//!   neither the picks to the host nor the key lists back (`kept_picks_give_the_logits_of_listed_picks`:
//!   the same logits bit for bit). The picks come to the host only when it needs them (a trace,
//!   `--attention auto`'s dense rows, more than `KEYS_PER_LAUNCH` of them, or
//!   [`Cuda::keep_picks`] off).
//! - A MoE layer whose routed experts are fp8 or bf16 (any rows: a prefill chunk's too) routes
//!   on the device ([`Backend::moe_routed`]): `moe_route_f32` chooses each row's experts as `moe::route`
//!   does, `moe_expert_slots` lists the pairs in expert order with each expert's 64-row tiles
//!   and adds the counts to the step's load (read back once a step), and `fp8_grouped_tc` or
//!   `bf16_grouped_tc` runs every tile (the grid sized for the most tiles the pairs can take;
//!   the rows past the real ones end at once), so the layer copies neither its router logits
//!   to the host nor its lists back (`routing_on_the_device_matches_the_host`,
//!   `decode_steps_route_on_the_device`). bf16 experts past [`Cuda::in_place_rows`] rows (of
//!   widths that are multiples of 8) copy one thing back, the layer's expert offsets (each
//!   shard's lane its own, with expert shards), since cuBLAS's grouped products take their
//!   sizes from the host, and then run as the host's routing would run them
//!   (`Cuda::routed_products`). Float32 experts (the conformance mode, whose routing is the
//!   CPU backend's own code) and traces route on the host ([`Cuda::route_on_device`] turns it
//!   off).
//! - Block tables come from the host, as the trait asks. A read-only
//!   array a step gives every layer (RoPE angles, cache slots, the indexer's block tables,
//!   attention offsets, dense keys) is copied once and reused while its contents repeat
//!   ([`uploads`], [`Cuda::reuse_uploads`]); a MoE layer's lists (rows, weights, the combine's
//!   lists, the in-place grouped kernels' address tables) are one copy, and the grouped products' pointer
//!   arrays another. On the two-layer test model that is 5.0 copies a layer a step instead of
//!   20.6 (`repeated_uploads_are_copied_once`), most of them once a step rather than a layer.
//! - Expert parallelism: with several GPUs listed, the model runs on the main *lane* (the
//!   first GPU's main stream) and expert shard `s` on a lane of its own (a stream, cuBLAS
//!   handle and kernels on the `s`-th GPU; lanes may share a GPU). A shard's experts live only on
//!   its lane. A MoE layer routed on the host gathers the rows a shard needs on the main GPU,
//!   the shard's lane copies them over, runs its experts and copies the weighted sums back, and
//!   the main lane adds them; events order the lanes, which run side by side. A layer routed on
//!   the device ([`Backend::moe_routed`]) routes on the main lane, and each shard's lane copies
//!   in all the rows and the routing and keeps the pairs dealt to it (`moe_shard_pairs`), so
//!   nothing waits for the host (`sharded_steps_route_on_the_device`), but for bf16 experts
//!   past [`Cuda::in_place_rows`] rows: each shard's lane then reads its experts' offsets back,
//!   after every lane's routing work is queued.
//!
//! Start-up failures (no driver, no such device, no NVRTC, a kernel that does not compile, a
//! weight that does not fit) are errors that say what is missing. The trait's compute methods
//! cannot return errors, so a device failure in the middle of a step (an out-of-memory
//! allocation, a lost device) panics with the CUDA error; the server's engine thread catches it,
//! fails the requests in flight, and `/health` and `/ready` answer 503 with the error from then
//! on, so the pod is restarted.
//!
//! Without a GPU, `engine/tests/cuda.rs` runs this backend on the CPU emulator of the driver and
//! cuBLAS in `kernels/emu` (`./scripts/test` does): correctness, never speed.
//!
//! - CUDA graphs ([`Cuda::graph_rows`], `--cuda-graph-rows`; off by default): in steps of at
//!   most that many rows each layer's MLP block (the routing on the device included) is
//!   captured once it runs without a copy to or from the host, and replayed after that
//!   ([`graphs`]); attention stays outside. Not with expert shards on lanes of their own
//!   ([`Cuda::graphs_unavailable`]).
//!
//! Owed (issue 5): prefill's fp8 products outside the experts without the dequantised copy
//! (fp8 tensor cores); CUDA graphs of the attention half of decode (see `kernels/README.md`
//! for the steps); `wgmma`/TMA versions of the tensor-core kernels; and NCCL all-to-all in
//! place of per-shard copies.

use std::sync::Arc;

use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut,
    DriverError, LaunchConfig, PushKernelArg,
};
use sparsemoe_kernels::launch;

pub use super::GraphCounts;
use super::{
    Backend, BlockId, CachedRows, Expert, GraphCountsSource, IndexerSeq, MlaDims, MlaSeq,
    MlaWeights, MlpBlock, Routing, Selection, by_expert, indexer_select_gathered, pairs_by_row,
};
use crate::error::{EngineError, Result};
use crate::expert_shards::{ExpertShards, Pair, compact_rows};
use crate::kv_cache::{FP8_BLOCK, KvDtype, PagedRows};
use crate::rope::{Rope, RopeLayout};
use crate::weights::Matrix;

mod graphs;
pub mod kernel_cache;
mod uploads;
use uploads::{Pack, Packed, Part, Recent, Tables, UploadCounts};

/// A row-major `[rows, cols]` float32 tensor in device memory. The buffer may be longer than
/// `rows · cols` (room for appended rows).
pub struct CudaTensor {
    buf: CudaSlice<f32>,
    rows: usize,
    cols: usize,
}

/// Rows of a paged KV pool in device memory (`[rows, cols]`): float32, bf16 as its bits, or
/// fp8 e4m3 codes with a float32 scale per [`FP8_BLOCK`] values of a row (powers of two with
/// `ue8m0`: [`KvDtype::Fp8Ue8m0`]).
pub enum CudaStore {
    F32(CudaTensor),
    Bf16 {
        buf: CudaSlice<u16>,
        rows: usize,
        cols: usize,
    },
    Fp8 {
        codes: CudaSlice<u8>,
        scales: CudaSlice<f32>,
        rows: usize,
        cols: usize,
        ue8m0: bool,
    },
}

const _: () = assert!(launch::KV_FP8_BLOCK as usize == FP8_BLOCK);

impl CudaStore {
    fn rows(&self) -> usize {
        match self {
            Self::F32(t) => t.rows,
            Self::Bf16 { rows, .. } | Self::Fp8 { rows, .. } => *rows,
        }
    }

    fn cols(&self) -> usize {
        match self {
            Self::F32(t) => t.cols,
            Self::Bf16 { cols, .. } | Self::Fp8 { cols, .. } => *cols,
        }
    }
}

/// Where the indexer reads its keys: a float32 tensor (key `s` is row `s`), or a KV store
/// through each sequence's block table (its key `s` is row `table.row(s)`, read in place).
#[derive(Clone, Copy)]
enum IndexerKeys<'a> {
    Rows(&'a CudaTensor),
    Store(&'a CudaStore),
}

/// Which kernels score the indexer's keys ([`Cuda::indexer_scores_on`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IndexerScores {
    /// `indexer_scores_f32`, `indexer_scores_store_*`: float32 products (an fp8 pool's
    /// queries rounded to fp8 first).
    Float32,
    /// `indexer_scores_tc_store_{f32, bf16_bits}`: queries and keys rounded to bf16.
    TensorCores,
    /// `indexer_scores_tc_store_fp8`: DeepSeek's fp8 indexer, queries and keys as e4m3.
    Fp8TensorCores,
}

/// A batch's indexer picks kept on the device ([`Backend::indexer_keep_paged`]): each row of
/// `rows` holds a batch row's picks as rows of the paged pool (ascending in token order, -1
/// past the last), `width` a row.
pub struct KeptPicks {
    rows: CudaSlice<i32>,
    width: usize,
    /// Each sequence's first row among `rows` and its row count, in the indexer call's order.
    seqs: Vec<(usize, usize)>,
    /// The rows of the pool the picks name: each lies below it.
    pool_rows: usize,
    /// The stream that writes them.
    stream: Arc<CudaStream>,
}

impl KeptPicks {
    /// Rows `from..from + n` of the picks as one list, `width` entries a row.
    fn view(&self, from: usize, n: usize) -> CudaView<'_, i32> {
        self.rows.slice(from * self.width..(from + n) * self.width)
    }

    /// Where sequence `seq`'s row `i` is among the picks' rows.
    fn row(&self, seq: usize, i: usize) -> usize {
        let (first, n) = self.seqs[seq];
        assert!(i < n, "kept picks: row {i} of a sequence of {n}");
        first + i
    }

    /// The picks on the host, as [`Backend::indexer_select_paged`] gives them: each sequence's
    /// rows, each row its picks' pool rows in order.
    pub fn to_host(&self) -> Vec<Vec<Vec<u32>>> {
        let all = ok(self.stream.clone_dtoh(&self.rows), "copying to the host");
        self.seqs
            .iter()
            .map(|&(first, n)| {
                // (An empty sequence's rows may lie past the picks.)
                all.get(first * self.width..(first + n) * self.width)
                    .unwrap_or_default()
                    .chunks_exact(self.width)
                    .map(|row| row.iter().filter(|&&s| s >= 0).map(|&s| s as u32).collect())
                    .collect()
            })
            .collect()
    }
}

impl std::fmt::Debug for KeptPicks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KeptPicks[{} sequences, {} a row]",
            self.seqs.len(),
            self.width
        )
    }
}

impl Drop for KeptPicks {
    fn drop(&mut self) {
        let _ = self.rows.context().bind_to_thread();
    }
}

/// What [`Cuda::indexer_topk`] gives: each sequence's picks on the host, or the batch's kept
/// on the device.
enum Picked {
    Host(Vec<Vec<Vec<u32>>>),
    Kept(KeptPicks),
}

impl std::fmt::Debug for CudaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::F32(t) => write!(f, "CudaStore::F32[{}, {}]", t.rows, t.cols),
            Self::Bf16 { rows, cols, .. } => write!(f, "CudaStore::Bf16[{rows}, {cols}]"),
            Self::Fp8 { rows, cols, .. } => write!(f, "CudaStore::Fp8[{rows}, {cols}]"),
        }
    }
}

impl Drop for CudaStore {
    fn drop(&mut self) {
        match self {
            Self::Bf16 { buf, .. } => drop(buf.context().bind_to_thread()),
            Self::Fp8 { codes, .. } => drop(codes.context().bind_to_thread()),
            Self::F32(_) => {}
        }
    }
}

impl std::fmt::Debug for CudaTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaTensor[{}, {}]", self.rows, self.cols)
    }
}

/// How the backend keeps the weights its products read (`--dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dtype {
    /// float32 weights and products, as the CPU reference backend computes.
    #[default]
    Float32,
    /// bf16 weights (half the memory); each product rounds its float32 input to bf16 and runs on
    /// the tensor cores, summing in float32, and so do attention and the indexer's scores
    /// (queries, keys and softmax probabilities rounded to bf16). Everything else stays float32.
    Bfloat16,
}

impl std::str::FromStr for Dtype {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "float32" => Ok(Self::Float32),
            "bfloat16" => Ok(Self::Bfloat16),
            other => Err(EngineError::input(format!(
                "--dtype {other}: expected `float32` or `bfloat16`"
            ))),
        }
    }
}

/// A weight's data on one device.
enum WeightData {
    F32(CudaSlice<f32>),
    /// bf16 values as their bits.
    Bf16(CudaSlice<u16>),
    /// A DeepSeek fp8 weight as stored: e4m3 codes, and per row the scale of each 128-column
    /// block (`cols` is needed to read them). Products dequantise it to bf16 first.
    Fp8 {
        codes: CudaSlice<u8>,
        row_scales: CudaSlice<f32>,
    },
}

impl WeightData {
    fn context(&self) -> &Arc<CudaContext> {
        match self {
            Self::F32(buf) => buf.context(),
            Self::Bf16(buf) => buf.context(),
            Self::Fp8 { codes, .. } => codes.context(),
        }
    }
}

/// A weight's data on the host, converted once for every device that gets a copy.
enum HostWeight {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
    Fp8 {
        codes: Vec<u8>,
        row_scales: Vec<f32>,
    },
}

impl HostWeight {
    fn new(matrix: &Matrix, dtype: Dtype) -> Self {
        if dtype == Dtype::Bfloat16
            && let Some((codes, row_scales)) = matrix.fp8_parts()
        {
            // fp8 stays fp8 on the device: half the bytes of bf16.
            return Self::Fp8 {
                codes: codes.to_vec(),
                row_scales,
            };
        }
        match (dtype, matrix.as_bf16_bytes()) {
            (Dtype::Float32, _) => Self::F32(matrix.to_f32_vec()),
            // A bf16 checkpoint's bits as they are.
            (Dtype::Bfloat16, Some(bytes)) => Self::Bf16(
                bytes
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            ),
            // float32 and float16 through float32, rounded to the nearest bf16.
            (Dtype::Bfloat16, None) => Self::Bf16(
                matrix
                    .to_f32_vec()
                    .into_iter()
                    .map(|x| half::bf16::from_f32(x).to_bits())
                    .collect(),
            ),
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::F32(v) => v.len() * 4,
            Self::Bf16(v) => v.len() * 2,
            Self::Fp8 { codes, row_scales } => codes.len() + row_scales.len() * 4,
        }
    }
}

/// A weight as one product reads it: float32, or bf16 bits (stored so, or dequantised from
/// fp8 for this product).
enum Operand<'w> {
    F32(&'w CudaSlice<f32>),
    Bf16(&'w CudaSlice<u16>),
    Dequantised(CudaSlice<u16>),
}

impl Operand<'_> {
    /// Its bf16 bits from element `from` (`None` for a float32 weight).
    fn bits(&self, from: usize) -> Option<CudaView<'_, u16>> {
        match self {
            Self::F32(_) => None,
            Self::Bf16(buf) => Some(buf.slice(from..)),
            Self::Dequantised(buf) => Some(buf.slice(from..)),
        }
    }
}

/// Launches that read their weight in place ([`Cuda::in_place_products`]): `fp8_linear_tc`
/// and `fp8_grouped_tc` (fp8 weights), `bf16_linear_tc` and `bf16_grouped_tc` (bf16).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InPlaceLaunches {
    pub fp8: u64,
    pub bf16: u64,
}

impl InPlaceLaunches {
    pub fn total(&self) -> u64 {
        self.fp8 + self.bf16
    }
}

/// Indices of [`Cuda`]'s in-place launch counts (`in_place_launches`), by the weight's dtype.
const FP8: usize = 0;
const BF16: usize = 1;

/// A weight `[rows, cols]` as a product reads it in place (`fp8_linear_tc`, `bf16_linear_tc`).
#[derive(Clone, Copy)]
struct InPlace<'w> {
    data: InPlaceData<'w>,
    cols: usize,
}

#[derive(Clone, Copy)]
enum InPlaceData<'w> {
    /// e4m3 codes with a float32 scale per row and 128 columns.
    Fp8 {
        codes: &'w CudaSlice<u8>,
        row_scales: &'w CudaSlice<f32>,
    },
    /// bf16 values, their bits.
    Bf16(&'w CudaSlice<u16>),
}

impl<'w> InPlaceData<'w> {
    /// `data` as a product reads it in place; `None` for a float32 weight.
    fn of(data: &'w WeightData) -> Option<Self> {
        match data {
            WeightData::Fp8 { codes, row_scales } => Some(Self::Fp8 { codes, row_scales }),
            WeightData::Bf16(values) => Some(Self::Bf16(values)),
            WeightData::F32(_) => None,
        }
    }
}

/// A lane's cuBLAS handle, destroyed here with its context current and the result ignored:
/// cudarc's own drop binds no context and unwraps the result, which panics (or, while
/// unwinding, aborts) after a device fault, the state a failed engine keeps until it restarts.
struct Blas {
    ctx: Arc<CudaContext>,
    handle: std::mem::ManuallyDrop<CudaBlas>,
    /// The handle's workspace, given so that cuBLAS allocates none of its own while a graph is
    /// captured (see [`graphs`]).
    _workspace: CudaSlice<u8>,
}

/// Bytes of a cuBLAS handle's workspace (what cuBLAS itself suggests for Hopper).
const BLAS_WORKSPACE: usize = 32 << 20;

impl Drop for Blas {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: the handle is destroyed once, here, and cudarc's drop never runs (its stream
        // Arc is leaked with it: one per lane, at exit).
        let _ = unsafe { cudarc::cublas::result::destroy_handle(*self.handle.handle()) };
    }
}

/// A weight matrix in device memory, row-major `[rows, cols]`, float32 or bf16 (see [`Dtype`]).
pub struct CudaWeight {
    rows: usize,
    cols: usize,
    /// `(lane, data)`: its copies. An ordinary weight has one, on the main lane; a routed expert
    /// split over several devices has one on the lane of each shard that holds it.
    copies: Vec<(usize, WeightData)>,
}

impl CudaWeight {
    /// The copy on `lane`.
    fn on(&self, lane: usize) -> &WeightData {
        self.copies
            .iter()
            .find(|(l, _)| *l == lane)
            .map(|(_, buf)| buf)
            .unwrap_or_else(|| panic!("a weight used on lane {lane}, which holds no copy of it"))
    }

    /// Whether its values are fp8 codes (every copy holds the same dtype).
    fn is_fp8(&self) -> bool {
        matches!(self.copies.first(), Some((_, WeightData::Fp8 { .. })))
    }
}

impl std::fmt::Debug for CudaWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaWeight[{}, {}]", self.rows, self.cols)
    }
}

// A device buffer is freed on whatever thread drops it, which must have the context current
// (cudarc frees without binding it): bind it first.
impl Drop for CudaTensor {
    fn drop(&mut self) {
        let _ = self.buf.context().bind_to_thread();
    }
}

impl Drop for CudaWeight {
    fn drop(&mut self) {
        for (_, data) in self.copies.drain(..) {
            let _ = data.context().bind_to_thread();
            drop(data);
        }
    }
}

/// The shape of a batch of products that read their weight in place (see
/// [`Cuda::products_in_place`]).
#[derive(Clone, Copy, Debug)]
struct InPlaceProducts {
    m: usize,
    n: usize,
    k: usize,
    /// Values between rows of x and of y.
    ldx: usize,
    ldy: usize,
    batch: usize,
    /// Where product b's x starts (b · batch_x), its weight rows (first_row + b · batch_rows)
    /// and its y (b · batch_y).
    batch_x: usize,
    first_row: usize,
    batch_rows: usize,
    batch_y: usize,
}

impl InPlaceProducts {
    /// One product of dense `[m, k]` and `[n, k]` into `[m, n]`.
    fn one(m: usize, n: usize, k: usize) -> Self {
        Self {
            m,
            n,
            k,
            ldx: k,
            ldy: n,
            batch: 1,
            batch_x: 0,
            first_row: 0,
            batch_rows: 0,
            batch_y: 0,
        }
    }
}

/// A buffer of grouped expert products' rows in the weights' dtype.
enum Rows {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

impl Rows {
    fn address(&self, stream: &Arc<CudaStream>) -> u64 {
        use cudarc::driver::DevicePtr;
        match self {
            Self::F32(s) => s.device_ptr(stream).0,
            Self::Bf16(s) => s.device_ptr(stream).0,
        }
    }
}

/// The kernels the backend launches, loaded by name from the NVRTC-compiled modules.
struct Kernels {
    gather_rows: CudaFunction,
    gather_rows_bf16: CudaFunction,
    f32_to_bf16_bits: CudaFunction,
    fp8_dequant_bf16: CudaFunction,
    fp8_linear: CudaFunction,
    bf16_linear: CudaFunction,
    sum_splits: CudaFunction,
    fp8_grouped: CudaFunction,
    bf16_grouped: CudaFunction,
    scatter_rows: CudaFunction,
    scatter_rows_bf16: CudaFunction,
    scatter_rows_fp8: CudaFunction,
    gather_rows_fp8: CudaFunction,
    scatter_add_rows: CudaFunction,
    combine_rows: CudaFunction,
    combine_rows_bf16: CudaFunction,
    silu_mul_bf16: CudaFunction,
    copy_columns: CudaFunction,
    rms_norm: CudaFunction,
    layer_norm: CudaFunction,
    add: CudaFunction,
    silu_mul: CudaFunction,
    rope: CudaFunction,
    hadamard: CudaFunction,
    indexer_scores: CudaFunction,
    indexer_scores_store: CudaFunction,
    indexer_scores_store_bf16: CudaFunction,
    indexer_scores_store_fp8: CudaFunction,
    indexer_scores_tc_store: CudaFunction,
    indexer_scores_tc_store_bf16: CudaFunction,
    indexer_scores_tc_store_fp8: CudaFunction,
    mla_latent_attention: CudaFunction,
    mla_latent_attention_bf16: CudaFunction,
    mla_latent_attention_fp8: CudaFunction,
    mla_latent_attention_tc: CudaFunction,
    mla_latent_attention_tc_bf16: CudaFunction,
    mla_latent_attention_tc_fp8: CudaFunction,
    mla_combine_splits: CudaFunction,
    topk_rows: CudaFunction,
    topk_parts: CudaFunction,
    topk_merge: CudaFunction,
    picks_to_pool_rows: CudaFunction,
    moe_route: CudaFunction,
    moe_expert_slots: CudaFunction,
    moe_shard_pairs: CudaFunction,
}

/// An attention launch's key rows (the cached rows each query row attends to, a list after
/// another): every visible row (`Dense`: the same in every layer of a step), or with some of
/// the indexer's picks among them (`Selected`), or the picks where the indexer kept them
/// (`Kept`).
enum Keys<'k> {
    Dense(&'k [i32]),
    Selected(&'k [i32]),
    /// The indexer's picks kept on the device ([`KeptPicks`]), each a pool row below `below`
    /// or -1.
    Kept {
        rows: CudaView<'k, i32>,
        below: usize,
    },
}

/// Experts' gate, up and down weights as device addresses, a table a weight and an entry an
/// expert, and for fp8 weights their row scales' tables ([`Cuda::address_tables`]).
type AddressTables = ([Vec<u64>; 3], Option<[Vec<u64>; 3]>);

/// What the grouped kernels that read each expert's weight in place (`fp8_grouped_tc`,
/// `bf16_grouped_tc`) read besides their rows: each group's first row and first tile of
/// [`launch::FP8_LINEAR_ROWS`] rows (groups + 1 entries each), and for gate, up and down in
/// that order each group's weight as an address (fp8 codes or bf16 values) and, for fp8
/// weights, its row scales; `tiles` is the grid's rows, at least the groups' tiles (more when
/// the routing is on the device, so not known here: the rest end at once).
struct GroupedTables<'a> {
    offsets: CudaView<'a, i32>,
    tile_offsets: CudaView<'a, i32>,
    weights: [CudaView<'a, u64>; 3],
    scales: Option<[CudaView<'a, u64>; 3]>,
    groups: usize,
    tiles: usize,
}

/// Tiles of [`launch::FP8_LINEAR_ROWS`] rows: the grid rows an in-place grouped launch needs
/// for `rows` rows.
fn row_tiles(rows: usize) -> usize {
    rows.div_ceil(launch::FP8_LINEAR_ROWS as usize)
}

/// The most tiles `pairs` pairs over `experts` groups can take, however they fall: the grid
/// rows of a layer routed on the device. Each group with rows wastes less than a tile.
fn most_tiles(pairs: usize, experts: usize) -> usize {
    row_tiles(pairs) + experts.min(pairs)
}

/// A MoE layer's index lists on the device, copied in one upload ([`Cuda::expert_lists`]).
struct ExpertLists {
    packed: Packed,
    /// The pairs' rows of x, and their weights, in expert order.
    rows: Part<i32>,
    weights: Part<f32>,
    /// `combine_rows`' lists: each row's first pair (out's rows + 1 entries) and the pairs by
    /// row ([`pairs_by_row`]).
    by_row: (Part<i32>, Part<i32>),
    /// The in-place grouped kernels' lists, when they apply.
    in_place: Option<InPlaceLists>,
}

/// The in-place grouped kernels' lists ([`GroupedTables`]): each active expert's first pair
/// and first tile (experts + 1 entries each), and, for gate, up and down in that order, each
/// active expert's weight and (fp8) row scales as addresses.
struct InPlaceLists {
    offsets: Part<i32>,
    tile_offsets: Part<i32>,
    tiles: usize,
    weights: [Part<u64>; 3],
    scales: Option<[Part<u64>; 3]>,
}

impl ExpertLists {
    fn view<T: cudarc::driver::DeviceRepr>(&self, part: Part<T>) -> CudaView<'_, T> {
        self.packed.view(part)
    }
}

/// The CUDA backend: a *lane* (a stream on one device, with its cuBLAS handle and kernels)
/// that runs the model, and, with expert parallelism across devices, one lane per expert shard
/// that runs the routed experts it holds. Clones share all of them.
#[derive(Clone)]
pub struct Cuda {
    ordinal: usize,
    device_name: String,
    /// 0 for the main lane, `1 + s` for expert shard `s`'s.
    lane: usize,
    dtype: Dtype,
    stream: Arc<CudaStream>,
    blas: Arc<Blas>,
    k: Arc<Kernels>,
    /// The expert shards' lanes (`--device cuda:N,M,…`); none with one device.
    shards: Arc<Vec<Cuda>>,
    /// Bytes of the largest bf16 copy a product dequantises from an fp8 weight on this lane's
    /// GPU (shared by its lanes): memory a step needs for a moment, kept out of the KV cache's
    /// share.
    fp8_scratch: Arc<std::sync::atomic::AtomicUsize>,
    /// Set when the routed experts run expert by expert, one product each, instead of as grouped
    /// products (see [`Cuda::grouped_experts`]): by [`Cuda::experts_one_by_one`], or once cuBLAS
    /// has refused a grouped product.
    one_by_one: Arc<std::sync::atomic::AtomicBool>,
    /// Set by [`Cuda::refuse_next_grouped_product`]: the next cuBLAS grouped product fails as
    /// one cuBLAS refuses.
    refuse_grouped: Arc<std::sync::atomic::AtomicBool>,
    /// MoE layers (or shards' parts of them) whose routed experts ran as grouped products.
    grouped_layers: Arc<std::sync::atomic::AtomicU64>,
    /// Whether attention and the indexer's scores run on the tensor cores
    /// (`mla_latent_attention_tc_*`, `indexer_scores_tc_store_*`: queries, keys and
    /// probabilities rounded to bf16) where their widths allow, rather than in float32: on with
    /// `--dtype bfloat16`, or by [`Cuda::attention_on_tensor_cores`].
    tensor_cores: Arc<std::sync::atomic::AtomicBool>,
    /// Attention and indexer launches that ran on the tensor cores.
    tensor_core_launches: Arc<std::sync::atomic::AtomicU64>,
    /// The indexer's scores launches, on the tensor cores or not.
    indexer_launches: Arc<std::sync::atomic::AtomicU64>,
    /// Parts of each row the indexer's top-k splits into, as [`Cuda::indexer_top_k_parts`]
    /// set; 0: chosen per launch ([`launch::topk_parts`]).
    topk_parts: Arc<std::sync::atomic::AtomicU32>,
    /// The indexer's top-k launches that split their rows (`topk_parts_f32`, then
    /// `topk_merge_f32`).
    split_topk_launches: Arc<std::sync::atomic::AtomicU64>,
    /// Groups of 16 heads a block of the tensor-core attention, as set by
    /// [`Cuda::attention_head_groups`]; 0: chosen per launch ([`launch::mla_tc_groups`]).
    head_groups: Arc<std::sync::atomic::AtomicU32>,
    /// Splits of each row's keys in the attention, as [`Cuda::attention_key_splits`] set; 0:
    /// chosen per launch ([`launch::mla_split_keys`]).
    key_splits: Arc<std::sync::atomic::AtomicU32>,
    /// Attention launches whose keys were split (each followed by `mla_combine_splits_f32`).
    split_launches: Arc<std::sync::atomic::AtomicU64>,
    /// Whether the indexer keeps its picks on the device for the attention
    /// ([`Backend::indexer_keep_paged`]); see [`Cuda::keep_picks`].
    keep_picks: Arc<std::sync::atomic::AtomicBool>,
    /// Attention launches that read kept picks.
    kept_launches: Arc<std::sync::atomic::AtomicU64>,
    /// Whether MoE layers route on the device when they can ([`Backend::moe_routed`]); see
    /// [`Cuda::route_on_device`].
    route_on_device: Arc<std::sync::atomic::AtomicBool>,
    /// MoE layers routed on the device.
    routed_layers: Arc<std::sync::atomic::AtomicU64>,
    /// Device-to-host copies (`to_host`, the indexer's picks, expert offsets read back): each
    /// waits for the stream.
    host_reads: Arc<std::sync::atomic::AtomicU64>,
    /// The most rows of x a product with an fp8 or bf16 weight has for it to read the weight in
    /// place (`fp8_linear_tc`, `bf16_linear_tc`) rather than run on cuBLAS; see
    /// [`Cuda::in_place_rows`].
    in_place_rows: Arc<std::sync::atomic::AtomicUsize>,
    /// Launches that read an fp8 weight in place (`fp8_linear_tc`, `fp8_grouped_tc`) and a
    /// bf16 one (`bf16_linear_tc`, `bf16_grouped_tc`).
    in_place_launches: Arc<[std::sync::atomic::AtomicU64; 2]>,
    /// `bf16_grouped_tc` launches (bf16 experts' grouped products read in place).
    bf16_grouped_launches: Arc<std::sync::atomic::AtomicU64>,
    /// The device's multiprocessors (streaming multiprocessors, SMs).
    multiprocessors: u32,
    /// The most shared memory a block may take on the device (its opt-in limit), in bytes.
    smem_per_block: u32,
    /// Read-only arrays this lane uploaded lately, reused while their contents repeat (see
    /// [`uploads`]), and its count of copies.
    recent_i32: Arc<Recent<i32>>,
    recent_f32: Arc<Recent<f32>>,
    /// The routed experts' weight addresses, a table a MoE layer ([`Cuda::expert_tables`]).
    tables: Arc<Tables>,
    uploads: Arc<UploadCounts>,
    /// Graphs of the MLP blocks at small batches ([`Cuda::graph_rows`]).
    graphs: Arc<graphs::Graphs>,
}

impl std::fmt::Debug for Cuda {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cuda({})", self.name())
    }
}

/// A device opened once for all the lanes on it: its context and kernels.
struct OpenDevice {
    ordinal: usize,
    name: String,
    multiprocessors: u32,
    smem_per_block: u32,
    ctx: Arc<CudaContext>,
    k: Arc<Kernels>,
    fp8_scratch: Arc<std::sync::atomic::AtomicUsize>,
}

/// Indices as the kernels take them.
fn int32(values: impl Iterator<Item = usize>) -> Vec<i32> {
    values
        .map(|x| i32::try_from(x).expect("index fits in int32"))
        .collect()
}

fn device_error(what: impl std::fmt::Display) -> EngineError {
    EngineError::Device(what.to_string())
}

/// Whether experts of these widths can run on cuBLAS's grouped products: each group's rows
/// start at a multiple of the widths, and multiples of 8 keep every start 16-byte aligned, which
/// cuBLAS cannot check in pointer arrays on the device.
fn cublas_widths(hidden: usize, inter: usize) -> bool {
    hidden.is_multiple_of(8) && inter.is_multiple_of(8)
}

/// Whether the loaded cuBLAS has `cublasGemmGroupedBatchedEx` (cuBLAS 12.5 and later). cudarc
/// resolves each symbol on its first call and panics on a missing one, so the grouped expert
/// products are turned off up front where it is absent.
fn grouped_gemm_present() -> bool {
    // SAFETY: looks a symbol up in the already-loaded library; nothing is called.
    let present =
        unsafe { cudarc::cublas::sys::culib().get::<*const ()>(b"cublasGemmGroupedBatchedEx") }
            .is_ok();
    static SAID: std::sync::Once = std::sync::Once::new();
    if !present {
        SAID.call_once(|| {
            eprintln!(
                "sparsemoe-engine: this cuBLAS has no cublasGemmGroupedBatchedEx (it came in \
                 cuBLAS 12.5); routed experts run one product each"
            )
        });
    }
    present
}

/// Keys listed per attention launch (4 bytes each on the device).
const KEYS_PER_LAUNCH: usize = 1 << 24;

/// Whether the attention kernel `tensor_cores` chooses for `dims` (the tensor-core one with a
/// single group of 16 heads where its widths fit, else the float32 one) fits a GPU allowing
/// `smem_limit` bytes of shared memory a block: sm_80 and sm_90 allow 163 and 227 KB, but
/// sm_86, sm_89 and sm_120 only 99, less than the float32 kernel takes at DeepSeek's widths
/// (108 KB at 512 + 64). Checked when a model loads, so a launch never fails mid-step.
fn check_attention_smem(dims: MlaDims, smem_limit: u32, tensor_cores: bool) -> Result<()> {
    let latent_max = launch::MLA_F32_MAX_LATENT as usize;
    let (latent, rope) = (dims.latent as u32, dims.rope as u32);
    let (kernel, smem) = if tensor_cores && launch::mla_tc_fits(latent, rope) {
        ("tensor-core", launch::mla_tc_smem_bytes(latent, rope, 1))
    } else {
        ("float32", launch::mla_f32_smem_bytes(latent, rope))
    };
    if dims.latent > latent_max || smem > smem_limit {
        return Err(EngineError::Device(format!(
            "the CUDA backend's {kernel} attention takes a latent width (kv_lora_rank) of at \
             most {latent_max} with its RoPE width within the GPU's {} KB of shared memory a \
             block; this model has {} + {} ({} KB){}",
            smem_limit / 1024,
            dims.latent,
            dims.rope,
            smem.div_ceil(1024),
            if tensor_cores {
                ""
            } else {
                " (--dtype bfloat16 runs it on the tensor cores, in less)"
            }
        )));
    }
    Ok(())
}

/// Whether every kernel that may score the indexer's keys for `heads` heads of `dim` values
/// (whatever the pool's dtype: [`Cuda::indexer_scores_on`], [`Cuda::indexer_in_place`]) fits a
/// GPU allowing `smem_limit` bytes of shared memory a block: the float32 kernels keep a row's
/// queries (`heads · dim` floats), the tensor-core ones a tile of keys beside them. DeepSeek's
/// 64 heads of 128 take 33 KB at most; a config with much wider heads is refused at load
/// rather than failing a launch mid-step.
fn check_indexer_smem(heads: usize, dim: usize, smem_limit: u32, tensor_cores: bool) -> Result<()> {
    let (h, d) = (
        u32::try_from(heads).unwrap_or(u32::MAX),
        u32::try_from(dim).unwrap_or(u32::MAX),
    );
    let float32 = ("float32", launch::indexer_f32_smem_bytes(h, d));
    let mut needed = Vec::new();
    if tensor_cores {
        // A float32 or bf16 pool's keys (and gathered ones) on the bf16 tensor cores where the
        // width is even; an fp8 pool's on the fp8 ones where the width fits, else in float32
        // in place (few enough heads) or gathered.
        needed.push(match d.is_multiple_of(2) {
            true => ("bf16 tensor-core", launch::indexer_tc_smem_bytes(h, d)),
            false => float32,
        });
        if launch::indexer_fp8_tc_fits(d) {
            needed.push(("fp8 tensor-core", launch::indexer_fp8_tc_smem_bytes(h, d)));
        } else if h <= launch::INDEXER_STORE_MAX_HEADS {
            needed.push(float32);
        }
    } else {
        needed.push(float32);
    }
    match needed.into_iter().find(|&(_, smem)| smem > smem_limit) {
        Some((kernel, smem)) => Err(EngineError::Device(format!(
            "the CUDA backend's {kernel} indexer scores {heads} heads of {dim} values \
             (index_n_heads × index_head_dim) in {} KB of shared memory a block; the GPU allows \
             {} KB",
            smem.div_ceil(1024),
            smem_limit / 1024
        ))),
        None => Ok(()),
    }
}

/// Groups of 16 heads a block of the tensor-core attention takes: `groups`, or fewer while the
/// block's shared memory would pass `smem_limit` bytes (one group always fits: see
/// [`check_attention_smem`]).
fn head_groups_within(dims: MlaDims, mut groups: u32, smem_limit: u32) -> u32 {
    while groups > 1
        && launch::mla_tc_smem_bytes(dims.latent as u32, dims.rope as u32, groups) > smem_limit
    {
        groups /= 2;
    }
    groups
}

/// Whether two sequences' cached rows are the same buffers (a paged pool's stores, or the same
/// tensors), so one attention launch can read both.
fn same_cached_rows(
    a: CachedRows<'_, CudaTensor, CudaStore>,
    b: CachedRows<'_, CudaTensor, CudaStore>,
) -> bool {
    match (a, b) {
        (
            CachedRows::Tensors { latent, k_pe },
            CachedRows::Tensors {
                latent: latent_b,
                k_pe: k_pe_b,
            },
        ) => std::ptr::eq(latent, latent_b) && std::ptr::eq(k_pe, k_pe_b),
        (
            CachedRows::Stores { latent, k_pe },
            CachedRows::Stores {
                latent: latent_b,
                k_pe: k_pe_b,
            },
        ) => std::ptr::eq(latent, latent_b) && std::ptr::eq(k_pe, k_pe_b),
        _ => false,
    }
}

/// Query rows per indexer launch are bounded so their scores (`rows · keys` floats) stay within
/// this many.
const SCORES_PER_LAUNCH: usize = 1 << 26;

/// The value of a device call inside a compute method, which cannot return an error.
fn ok<T, E: std::fmt::Debug>(result: std::result::Result<T, E>, what: &str) -> T {
    result.unwrap_or_else(|e| panic!("CUDA {what}: {e:?}"))
}

/// The source of `file` with the headers it includes pasted in (NVRTC gets no include path).
fn inline_headers(file: &str) -> Result<String> {
    let mut text = String::new();
    paste(file, &mut Vec::new(), &mut text)?;
    Ok(text)
}

/// Appends `file` to `text` with its `#include "…"` lines replaced by the headers themselves,
/// each pasted once (at its first include, as `#pragma once` would), headers within headers too.
fn paste(file: &str, pasted: &mut Vec<String>, text: &mut String) -> Result<()> {
    let source = sparsemoe_kernels::source(file)
        .ok_or_else(|| device_error(format!("kernel source {file} is missing from the build")))?;
    pasted.push(file.to_string());
    for line in source.text.lines() {
        match line
            .strip_prefix("#include \"")
            .and_then(|rest| rest.strip_suffix('"'))
        {
            Some(header) if pasted.iter().any(|p| p == header) => {}
            Some(header) => {
                if sparsemoe_kernels::source(header).is_none() {
                    return Err(device_error(format!(
                        "{file} includes {header}, which is not in the build"
                    )));
                }
                paste(header, pasted, text)?;
            }
            None => text.push_str(line),
        }
        text.push('\n');
    }
    Ok(())
}

/// The oldest GPU the engine's kernels run on (compute capability × 10): their tensor-core
/// products are `mma.sync` on bf16, which sm_80 brought.
pub const MIN_COMPUTE_CAPABILITY: u32 = 80;

/// The virtual architecture to compile the kernels for on a device of compute capability
/// `device` (× 10), among the ones NVRTC supports (`supported`): the newest that is not newer
/// than the device (the driver compiles its PTX for the device), so the kernels take the
/// device's instructions where they test `__CUDA_ARCH__` (fp8 tensor cores from 89). `None`
/// when NVRTC supports none of them.
pub fn kernel_arch(device: u32, supported: &[u32]) -> Option<u32> {
    supported
        .iter()
        .copied()
        .filter(|&a| (MIN_COMPUTE_CAPABILITY..=device).contains(&a))
        .max()
}

/// The virtual architectures NVRTC compiles for (compute capability × 10).
fn nvrtc_archs() -> Result<Vec<u32>> {
    use cudarc::nvrtc::sys;
    let mut n = 0;
    // SAFETY: NVRTC writes the count, then that many ints into a buffer of that size.
    let archs = unsafe {
        let counted = sys::nvrtcGetNumSupportedArchs(&mut n);
        if counted != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(device_error(format!(
                "asking NVRTC its architectures: {counted:?}"
            )));
        }
        let mut archs = vec![0; n.max(0) as usize];
        let listed = sys::nvrtcGetSupportedArchs(archs.as_mut_ptr());
        if listed != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(device_error(format!(
                "asking NVRTC its architectures: {listed:?}"
            )));
        }
        archs
    };
    Ok(archs.into_iter().map(|a| a.max(0) as u32).collect())
}

/// What NVRTC builds the kernels as for a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelTarget {
    /// Machine code (CUBIN) for `sm_XX`: a device NVRTC knows by its own compute capability.
    /// The driver loads it as it is, with no compile of its own: a driver older than NVRTC
    /// (CUDA 13.0 on the node, 13.x in the image) loads it where it would refuse NVRTC's newer
    /// PTX, and a start-up does not wait for the driver's compile.
    Sm(u32),
    /// PTX for virtual architecture `compute_XX`, which the driver compiles for the device at
    /// load: a device newer than NVRTC knows.
    Compute(u32),
}

impl KernelTarget {
    /// The architecture, compute capability × 10.
    pub fn arch(self) -> u32 {
        match self {
            Self::Sm(arch) | Self::Compute(arch) => arch,
        }
    }
}

impl std::fmt::Display for KernelTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sm(arch) => write!(f, "sm_{arch}"),
            Self::Compute(arch) => write!(f, "compute_{arch}"),
        }
    }
}

/// How to build the kernels for a device of compute capability `device` (× 10) with an NVRTC
/// that supports `supported`: machine code for the device where NVRTC has its architecture,
/// else PTX for [`kernel_arch`]'s. `None` where NVRTC has nothing the device runs.
pub fn kernel_target(device: u32, supported: &[u32]) -> Option<KernelTarget> {
    if device >= MIN_COMPUTE_CAPABILITY && supported.contains(&device) {
        return Some(KernelTarget::Sm(device));
    }
    kernel_arch(device, supported).map(KernelTarget::Compute)
}

/// One kernel source file as NVRTC compiled it.
#[derive(Clone)]
pub struct CompiledKernels {
    /// The file under `kernels/cuda`.
    pub file: &'static str,
    /// The PTX (also for an `sm_XX` target, where it is the step before the machine code).
    pub ptx: String,
    /// The machine code (ELF) for an `sm_XX` target.
    pub cubin: Option<Vec<u8>>,
    /// Whether it came from the kernel cache on disk ([`kernel_cache`]), not from NVRTC.
    pub cached: bool,
}

impl std::fmt::Debug for CompiledKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledKernels")
            .field("file", &self.file)
            .field("ptx_bytes", &self.ptx.len())
            .field("cubin_bytes", &self.cubin.as_ref().map(Vec::len))
            .field("cached", &self.cached)
            .finish()
    }
}

impl CompiledKernels {
    /// What the driver loads: the machine code where there is some, else the PTX.
    fn image(&self) -> cudarc::nvrtc::Ptx {
        match &self.cubin {
            Some(cubin) => cudarc::nvrtc::Ptx::from_binary(cubin.clone()),
            None => cudarc::nvrtc::Ptx::from_src(self.ptx.clone()),
        }
    }
}

/// Compiles the engine's kernels with NVRTC for `target`: one [`CompiledKernels`] a source
/// file. Compiled once per process and target, and kept between processes in the kernel cache
/// the environment names ([`kernel_cache::location`]).
pub fn compile_kernels(target: KernelTarget) -> Result<Vec<CompiledKernels>> {
    type Compiled = std::collections::HashMap<KernelTarget, Vec<CompiledKernels>>;
    static COMPILED: std::sync::Mutex<Option<Compiled>> = std::sync::Mutex::new(None);
    let mut compiled = COMPILED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let compiled = compiled.get_or_insert_with(Compiled::new);
    if let Some(kernels) = compiled.get(&target) {
        return Ok(kernels.clone());
    }
    let kernels = compile_kernels_with(target, kernel_cache::KernelCache::from_env().as_ref())?;
    compiled.insert(target, kernels.clone());
    Ok(kernels)
}

/// [`compile_kernels`] with the kernel cache `cache` (or none), every call: each source file's
/// entry where the cache has a whole one for this NVRTC, else NVRTC's compile, then written to
/// the cache. A damaged entry, or a cache that cannot be written, is reported on stderr and
/// costs only the compile.
pub fn compile_kernels_with(
    target: KernelTarget,
    cache: Option<&kernel_cache::KernelCache>,
) -> Result<Vec<CompiledKernels>> {
    use kernel_cache::{EntryKey, Image};
    nvrtc_present()?;
    // Without NVRTC's version an entry could be another NVRTC's: no cache then.
    let version = nvrtc_version();
    let cache = cache.zip(version.as_deref());
    sparsemoe_kernels::ENGINE_SOURCES
        .iter()
        .map(|&file| {
            let options = [
                sparsemoe_kernels::RTC_DEFINE.to_string(),
                "-std=c++17".to_string(),
                format!("--gpu-architecture={target}"),
            ];
            let source = inline_headers(file)?;
            let entry = cache.map(|(cache, version)| {
                let key = EntryKey::new(file, &source, &options, &target.to_string(), version);
                (cache, key)
            });
            if let Some((cache, key)) = &entry {
                match cache.load(key, matches!(target, KernelTarget::Sm(_))) {
                    Ok(Some(Image { ptx, cubin })) => {
                        return Ok(CompiledKernels {
                            file,
                            ptx,
                            cubin,
                            cached: true,
                        });
                    }
                    Ok(None) => {}
                    Err(why) => eprintln!(
                        "sparsemoe-engine: kernel cache: compiling kernels/cuda/{file} again: {why}"
                    ),
                }
            }
            let kernels = nvrtc_compile(file, &source, &options, target).map_err(|e| {
                device_error(format!("compiling kernels/cuda/{file} for {target}: {e}"))
            })?;
            if let Some((cache, key)) = &entry {
                static WARNED: std::sync::Once = std::sync::Once::new();
                if let Err(e) = cache.store(key, &kernels.ptx, kernels.cubin.as_deref()) {
                    WARNED.call_once(|| {
                        eprintln!(
                            "sparsemoe-engine: kernel cache: could not keep the compiled \
                             kernels in {}: {e}; they are compiled at every start (set \
                             SPARSEMOE_KERNEL_CACHE to a writable directory, or to off)",
                            cache.dir().display()
                        )
                    });
                }
            }
            Ok(kernels)
        })
        .collect()
}

/// One NVRTC compile of `source` (named `file`) with `options`: its PTX, and for an `sm_XX`
/// target its machine code; an error carries NVRTC's log.
fn nvrtc_compile(
    file: &'static str,
    source: &str,
    options: &[String],
    target: KernelTarget,
) -> std::result::Result<CompiledKernels, String> {
    use cudarc::nvrtc::{result, sys};
    let text = |chars: Vec<std::ffi::c_char>| {
        let bytes: Vec<u8> = chars.into_iter().map(|c| c as u8).collect();
        String::from_utf8_lossy(bytes.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
    };
    let source =
        std::ffi::CString::new(source).map_err(|_| "a NUL byte in the source".to_string())?;
    let name = std::ffi::CString::new(file).map_err(|_| "a NUL byte in the name".to_string())?;
    let program = result::create_program(&source, Some(&name)).map_err(|e| format!("{e:?}"))?;
    /// Destroys the program however the compile ends.
    struct Program(sys::nvrtcProgram);
    impl Drop for Program {
        fn drop(&mut self) {
            // SAFETY: created above, destroyed only here.
            let _ = unsafe { result::destroy_program(self.0) };
        }
    }
    let program = Program(program);
    // SAFETY: `program` is live until the end of this function, and `source` and `name`
    // outlive it.
    unsafe {
        if let Err(e) = result::compile_program(program.0, options) {
            let log = result::get_program_log(program.0)
                .map(text)
                .unwrap_or_default();
            return Err(format!("{e:?}: {}", log.trim()));
        }
        let ptx = text(result::get_ptx(program.0).map_err(|e| format!("{e:?}"))?);
        let cubin = match target {
            KernelTarget::Compute(_) => None,
            KernelTarget::Sm(_) => {
                let mut size = 0usize;
                sys::nvrtcGetCUBINSize(program.0, &mut size)
                    .result()
                    .map_err(|e| format!("the machine code's size: {e:?}"))?;
                let mut cubin = vec![0u8; size];
                sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr().cast())
                    .result()
                    .map_err(|e| format!("the machine code: {e:?}"))?;
                Some(cubin)
            }
        };
        Ok(CompiledKernels {
            file,
            ptx,
            cubin,
            cached: false,
        })
    }
}

/// An error that says so unless NVRTC can be loaded.
fn nvrtc_present() -> Result<()> {
    // SAFETY: only tries to open the library; nothing is called through it.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Ok(());
    }
    Err(device_error(
        "NVRTC (libnvrtc.so, CUDA 13) could not be loaded: the CUDA backend compiles its \
         kernels at start-up; install the CUDA runtime compiler or add its directory to \
         LD_LIBRARY_PATH",
    ))
}

/// NVRTC's version, as `13.0`; `None` where NVRTC does not say.
fn nvrtc_version() -> Option<String> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: writes the two ints it is given.
    let ok = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS;
    ok.then(|| format!("{major}.{minor}"))
}

/// The CUDA driver's and NVRTC's versions, as `driver 13.0, NVRTC 13.0` (what a PTX that does
/// not load is most likely about: an NVRTC newer than the driver).
fn cuda_versions() -> String {
    let mut driver = 0;
    // SAFETY: writes the int it is given.
    let driver_ok = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) }
        == cudarc::driver::sys::CUresult::CUDA_SUCCESS;
    let driver = match driver_ok {
        true => format!("{}.{}", driver / 1000, driver % 1000 / 10),
        false => "unknown".into(),
    };
    let nvrtc = nvrtc_version().unwrap_or_else(|| "unknown".into());
    format!("driver {driver}, NVRTC {nvrtc}")
}

/// The kernels for the device of `ctx` (named `name`, as cuda:`ordinal`): machine code for the
/// device, or PTX for the newest architecture NVRTC has that the device runs where NVRTC does
/// not know the device ([`kernel_target`]); a device older than [`MIN_COMPUTE_CAPABILITY`] is
/// an error that says so.
fn kernels_for(
    ctx: &CudaContext,
    ordinal: usize,
    name: &str,
) -> Result<(KernelTarget, Vec<CompiledKernels>)> {
    let (major, minor) = ctx.compute_capability().map_err(|e| {
        device_error(format!(
            "asking cuda:{ordinal} its compute capability: {e:?}"
        ))
    })?;
    let device = (major.max(0) * 10 + minor.max(0)) as u32;
    if device < MIN_COMPUTE_CAPABILITY {
        return Err(device_error(format!(
            "cuda:{ordinal} ({name}) has compute capability {major}.{minor}; the CUDA backend \
             needs {}.{} or later (its tensor-core kernels are bf16 mma.sync)",
            MIN_COMPUTE_CAPABILITY / 10,
            MIN_COMPUTE_CAPABILITY % 10
        )));
    }
    nvrtc_present()?;
    let supported = nvrtc_archs()?;
    let target = kernel_target(device, &supported).ok_or_else(|| {
        device_error(format!(
            "NVRTC compiles for none of the architectures from compute_{MIN_COMPUTE_CAPABILITY} \
             to cuda:{ordinal}'s compute_{device} (it has {supported:?})"
        ))
    })?;
    Ok((target, compile_kernels(target)?))
}

/// The default memory pool of the device of `ctx`, where cudarc's stream-ordered allocations
/// come from; `None` where the device has no memory pools (cudarc then allocates directly).
fn default_pool(ctx: &CudaContext) -> Result<Option<cudarc::driver::sys::CUmemoryPool>> {
    use cudarc::driver::sys;
    let pools = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)
        .map_err(|e| device_error(format!("asking whether the GPU has memory pools: {e:?}")))?;
    if pools == 0 {
        return Ok(None);
    }
    let mut pool = std::ptr::null_mut();
    // SAFETY: writes the device's default pool handle.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(|e| device_error(format!("finding the GPU's memory pool: {e:?}")))?;
    Ok(Some(pool))
}

/// Has the device's memory pool keep what is freed, for the next allocations: its default
/// release threshold, 0, hands every freed byte back to the driver at each synchronisation
/// (every step's read of its logits), and the next step maps it all again.
fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    use cudarc::driver::sys;
    let Some(pool) = default_pool(ctx)? else {
        return Ok(());
    };
    let mut keep = u64::MAX;
    // SAFETY: the release threshold is a cuuint64_t, read from `keep`.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut keep as *mut u64).cast(),
        )
    }
    .result()
    .map_err(|e| {
        device_error(format!(
            "setting the memory pool's release threshold: {e:?}"
        ))
    })
}

/// Opens GPU `ordinal` and loads the kernels compiled for it.
fn open_device(ordinal: usize) -> Result<OpenDevice> {
    let ctx = CudaContext::new(ordinal)
        .map_err(|e| device_error(format!("opening cuda:{ordinal}: {e:?}")))?;
    let name = ctx.name().unwrap_or_else(|_| "unknown device".into());
    let multiprocessors = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .map_err(|e| device_error(format!("asking cuda:{ordinal} its multiprocessors: {e:?}")))?
        .max(1) as u32;
    let smem_per_block = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )
        .map_err(|e| device_error(format!("asking cuda:{ordinal} its shared memory: {e:?}")))?
        .max(0) as u32;
    // Streams are ordered by explicit events where they meet (expert shards); cudarc's
    // per-buffer events would be pure cost.
    // SAFETY: nothing has been allocated on this context by us yet, and buffers are shared
    // across streams only after an event the reading stream waits on.
    unsafe { ctx.disable_event_tracking() };
    keep_freed_memory(&ctx).map_err(|e| match e {
        EngineError::Device(why) => device_error(format!("cuda:{ordinal}: {why}")),
        other => other,
    })?;
    let (target, compiled) = kernels_for(&ctx, ordinal, &name)?;
    let name = format!("{name}, kernels for {target}");
    let mut modules = Vec::new();
    for kernels in &compiled {
        let module = ctx.load_module(kernels.image()).map_err(|e| {
            device_error(format!(
                "loading kernels/cuda/{} ({} for {target}) on cuda:{ordinal}: {e:?} ({})",
                kernels.file,
                if kernels.cubin.is_some() {
                    "machine code"
                } else {
                    "PTX"
                },
                cuda_versions()
            ))
        })?;
        modules.push((kernels.file, module));
    }
    let function = |name: &str| -> Result<CudaFunction> {
        let kernel = sparsemoe_kernels::kernel(name)
            .ok_or_else(|| device_error(format!("kernel {name} is not listed")))?;
        let (_, module) = modules
            .iter()
            .find(|(file, _)| *file == kernel.file)
            .ok_or_else(|| device_error(format!("{} is not compiled", kernel.file)))?;
        module
            .load_function(name)
            .map_err(|e| device_error(format!("loading kernel {name}: {e:?}")))
    };
    let k = Arc::new(Kernels {
        gather_rows: function("gather_rows_f32")?,
        gather_rows_bf16: function("gather_rows_bf16_bits_f32")?,
        f32_to_bf16_bits: function("f32_to_bf16_bits")?,
        fp8_dequant_bf16: function("fp8_dequant_bf16_bits")?,
        fp8_linear: function("fp8_linear_tc")?,
        bf16_linear: function("bf16_linear_tc")?,
        sum_splits: function("sum_splits_f32")?,
        fp8_grouped: function("fp8_grouped_tc")?,
        bf16_grouped: function("bf16_grouped_tc")?,
        scatter_rows: function("scatter_rows_f32")?,
        scatter_rows_bf16: function("scatter_rows_f32_to_bf16_bits")?,
        scatter_rows_fp8: function("scatter_rows_f32_to_fp8")?,
        gather_rows_fp8: function("gather_rows_fp8_f32")?,
        scatter_add_rows: function("scatter_add_rows_f32")?,
        combine_rows: function("combine_rows_f32")?,
        combine_rows_bf16: function("combine_rows_bf16_bits_f32")?,
        silu_mul_bf16: function("silu_mul_bf16_bits")?,
        copy_columns: function("copy_columns_f32")?,
        rms_norm: function("rms_norm_f32")?,
        layer_norm: function("layer_norm_f32")?,
        add: function("add_f32")?,
        silu_mul: function("silu_mul_f32")?,
        rope: function("rope_f32")?,
        hadamard: function("hadamard_f32")?,
        indexer_scores: function("indexer_scores_f32")?,
        indexer_scores_store: function("indexer_scores_store_f32")?,
        indexer_scores_store_bf16: function("indexer_scores_store_bf16_bits")?,
        indexer_scores_store_fp8: function("indexer_scores_store_fp8")?,
        indexer_scores_tc_store: function("indexer_scores_tc_store_f32")?,
        indexer_scores_tc_store_bf16: function("indexer_scores_tc_store_bf16_bits")?,
        indexer_scores_tc_store_fp8: function("indexer_scores_tc_store_fp8")?,
        mla_latent_attention: function("mla_latent_attention_f32")?,
        mla_latent_attention_bf16: function("mla_latent_attention_bf16_bits")?,
        mla_latent_attention_fp8: function("mla_latent_attention_fp8")?,
        mla_latent_attention_tc: function("mla_latent_attention_tc_f32")?,
        mla_latent_attention_tc_bf16: function("mla_latent_attention_tc_bf16_bits")?,
        mla_latent_attention_tc_fp8: function("mla_latent_attention_tc_fp8")?,
        mla_combine_splits: function("mla_combine_splits_f32")?,
        topk_rows: function("topk_rows_f32")?,
        topk_parts: function("topk_parts_f32")?,
        topk_merge: function("topk_merge_f32")?,
        picks_to_pool_rows: function("picks_to_pool_rows")?,
        moe_route: function("moe_route_f32")?,
        moe_expert_slots: function("moe_expert_slots")?,
        moe_shard_pairs: function("moe_shard_pairs")?,
    });
    Ok(OpenDevice {
        ordinal,
        name,
        multiprocessors,
        smem_per_block,
        ctx,
        k,
        fp8_scratch: Arc::default(),
    })
}

/// Lets every pair of distinct GPUs reach each other's memory where the hardware allows, so the
/// expert shards' copies go straight between them: peer access between the contexts, and
/// access to each GPU's default memory pool, which cudarc allocates from (`cuMemAllocAsync`)
/// and which context peer access does not cover. Without it the driver stages peer copies
/// through the host: slower, equally correct.
fn enable_peer_access(devices: &[OpenDevice]) {
    use cudarc::driver::sys;
    for a in devices {
        for b in devices.iter().filter(|b| b.ordinal != a.ordinal) {
            let mut can = 0;
            // SAFETY: both devices are open; `can` outlives the call.
            let query = unsafe {
                sys::cuDeviceCanAccessPeer(&mut can, b.ctx.cu_device(), a.ctx.cu_device())
            };
            if query != sys::CUresult::CUDA_SUCCESS || can == 0 || b.ctx.bind_to_thread().is_err() {
                continue;
            }
            // b reads and writes a's memory. Failures (already enabled, out of peer mappings)
            // leave staged copies.
            // SAFETY: b's context is current and a's is live.
            let _ = unsafe { sys::cuCtxEnablePeerAccess(a.ctx.cu_ctx(), 0) };
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            // SAFETY: `pool` outlives the call; a's device is open.
            if unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, a.ctx.cu_device()) }
                == sys::CUresult::CUDA_SUCCESS
            {
                let access = sys::CUmemAccessDesc {
                    location: sys::CUmemLocation {
                        type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                        id: b.ordinal as i32,
                    },
                    flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
                };
                // SAFETY: a live pool and one access descriptor.
                let _ = unsafe { sys::cuMemPoolSetAccess(pool, &access, 1) };
            }
        }
    }
}

impl Cuda {
    /// Opens the GPUs `ordinals` (`--device cuda:N,M,…`): the model runs on the first; with
    /// several, expert shard `s` runs on `ordinals[s]` (an index may repeat: several shards on
    /// one GPU, each on its own stream). Compiles the kernels once and loads them on each GPU.
    pub fn new(ordinals: &[usize], dtype: Dtype) -> Result<Self> {
        let listed = ordinals
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let Some(&first) = ordinals.first() else {
            return Err(device_error("--device cuda: lists no GPU"));
        };
        // SAFETY: only tries to open the library; nothing is called through it.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(device_error(format!(
                "--device cuda:{listed}: the CUDA driver (libcuda.so) could not be loaded; is \
                 the NVIDIA driver installed, and the container started with the GPU runtime?"
            )));
        }
        // SAFETY: as above.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(device_error(format!(
                "--device cuda:{listed}: cuBLAS (libcublas.so.13) could not be loaded; install \
                 the CUDA 13 math libraries or add their directory to LD_LIBRARY_PATH"
            )));
        }
        let count = CudaContext::device_count().map_err(|e| {
            device_error(format!(
                "--device cuda:{listed}: counting CUDA devices: {e:?}"
            ))
        })?;
        if let Some(missing) = ordinals.iter().find(|&&o| o >= count.max(0) as usize) {
            return Err(device_error(format!(
                "--device cuda:{listed}: there is no GPU {missing}; this machine has {count} \
                 CUDA device(s)"
            )));
        }
        let listed_first = |e| match e {
            EngineError::Device(why) => device_error(format!("--device cuda:{listed}: {why}")),
            other => other,
        };
        let mut devices = Vec::new();
        let mut main = Self::lane(first, 0, dtype, &mut devices).map_err(listed_first)?;
        if ordinals.len() > 1 {
            let shards = ordinals
                .iter()
                .enumerate()
                .map(|(s, &o)| Self::lane(o, 1 + s, dtype, &mut devices))
                .collect::<Result<Vec<_>>>()
                .map_err(listed_first)?;
            enable_peer_access(&devices);
            main.shards = Arc::new(shards);
        }
        Ok(main)
    }

    /// A lane on GPU `ordinal`, opening the GPU if no earlier lane did.
    fn lane(
        ordinal: usize,
        lane: usize,
        dtype: Dtype,
        devices: &mut Vec<OpenDevice>,
    ) -> Result<Self> {
        let at = match devices.iter().position(|d| d.ordinal == ordinal) {
            Some(at) => at,
            None => {
                devices.push(open_device(ordinal)?);
                devices.len() - 1
            }
        };
        let device = &devices[at];
        // Every lane has a stream of its own (non-blocking, ordered against the others only by
        // the events moe_experts_sharded records), so shards on one GPU run side by side.
        let stream = device
            .ctx
            .new_stream()
            .map_err(|e| device_error(format!("creating a stream on cuda:{ordinal}: {e:?}")))?;
        let handle = CudaBlas::new(stream.clone())
            .map_err(|e| device_error(format!("creating a cuBLAS handle: {e:?}")))?;
        let workspace = stream
            .alloc_zeros::<u8>(BLAS_WORKSPACE)
            .map_err(|e| device_error(format!("allocating cuBLAS's workspace: {e:?}")))?;
        {
            use cudarc::driver::DevicePtr;
            let (ptr, _) = workspace.device_ptr(&stream);
            // SAFETY: the workspace outlives the handle (both are the Blas's; the handle is
            // destroyed first, in its drop), and is used only on the handle's stream.
            let set = unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *handle.handle(),
                    ptr as *mut std::ffi::c_void,
                    BLAS_WORKSPACE,
                )
            };
            if set != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(device_error(format!(
                    "giving cuBLAS its workspace: {set:?}"
                )));
            }
        }
        let blas = Arc::new(Blas {
            ctx: device.ctx.clone(),
            handle: std::mem::ManuallyDrop::new(handle),
            _workspace: workspace,
        });
        Ok(Self {
            ordinal,
            device_name: device.name.clone(),
            lane,
            dtype,
            stream,
            blas,
            k: device.k.clone(),
            shards: Arc::new(Vec::new()),
            fp8_scratch: device.fp8_scratch.clone(),
            one_by_one: Arc::new(std::sync::atomic::AtomicBool::new(!grouped_gemm_present())),
            refuse_grouped: Arc::default(),
            grouped_layers: Arc::default(),
            tensor_cores: Arc::new(std::sync::atomic::AtomicBool::new(dtype == Dtype::Bfloat16)),
            tensor_core_launches: Arc::default(),
            indexer_launches: Arc::default(),
            topk_parts: Arc::default(),
            split_topk_launches: Arc::default(),
            head_groups: Arc::default(),
            key_splits: Arc::default(),
            split_launches: Arc::default(),
            keep_picks: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            kept_launches: Arc::default(),
            route_on_device: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            routed_layers: Arc::default(),
            host_reads: Arc::default(),
            in_place_rows: Arc::new(std::sync::atomic::AtomicUsize::new(
                launch::FP8_LINEAR_ROWS as usize,
            )),
            in_place_launches: Arc::default(),
            bf16_grouped_launches: Arc::default(),
            multiprocessors: device.multiprocessors,
            smem_per_block: device.smem_per_block,
            recent_i32: Arc::default(),
            recent_f32: Arc::default(),
            tables: Arc::default(),
            uploads: Arc::default(),
            graphs: Arc::default(),
        })
    }

    /// This lane and the expert shards' lanes.
    fn lanes(&self) -> impl Iterator<Item = &Cuda> {
        std::iter::once(self).chain(self.shards.iter())
    }

    /// Runs the routed experts expert by expert (a gather, three products and a scatter-add
    /// each) instead of as grouped products, on every lane: the numbers of a float32 model do
    /// not change; a bf16 model's experts then keep their products' float32 outputs.
    pub fn experts_one_by_one(&self) {
        for lane in self.lanes() {
            lane.one_by_one
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.graphs.clear(); // recorded with the other choice
    }

    /// Makes the main lane's next cuBLAS grouped product fail as one cuBLAS refuses (for tests
    /// of what follows: that layer's experts run one product at a time, and so do every later
    /// layer's, as after a real refusal).
    pub fn refuse_next_grouped_product(&self) {
        self.refuse_grouped
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many MoE layers (a shard's part of one counting once) ran their routed experts as
    /// grouped products, on every lane.
    pub fn grouped_expert_layers(&self) -> u64 {
        self.lanes()
            .map(|lane| {
                lane.grouped_layers
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum()
    }

    /// Whether the routed experts run as grouped products (false after
    /// [`Cuda::experts_one_by_one`], or once cuBLAS refused a grouped product on any lane).
    pub fn experts_grouped(&self) -> bool {
        self.lanes()
            .all(|lane| !lane.one_by_one.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Runs attention and the indexer's scores on the tensor cores (`on`: bf16 queries, keys
    /// and probabilities, float32 sums; where the widths allow: `launch::mla_tc_fits`, an even
    /// indexer width) or in float32 (the CPU backend's numbers). The default follows the dtype:
    /// tensor cores with `--dtype bfloat16`.
    pub fn attention_on_tensor_cores(&self, on: bool) {
        self.tensor_cores
            .store(on, std::sync::atomic::Ordering::Relaxed);
        self.graphs.clear(); // recorded with the other choice
    }

    /// Which kernels score the indexer's keys: with the tensor cores on, an fp8 pool's keys of
    /// a width the fp8 kernel takes on the fp8 tensor cores, other keys of an even width on the
    /// bf16 ones; the rest in float32.
    fn indexer_scores_on(&self, keys: IndexerKeys<'_>) -> IndexerScores {
        let on = self.tensor_cores.load(std::sync::atomic::Ordering::Relaxed);
        match keys {
            IndexerKeys::Store(CudaStore::Fp8 { cols, .. }) => {
                if on && launch::indexer_fp8_tc_fits(*cols as u32) {
                    IndexerScores::Fp8TensorCores
                } else {
                    IndexerScores::Float32
                }
            }
            IndexerKeys::Store(CudaStore::F32(CudaTensor { cols, .. }))
            | IndexerKeys::Store(CudaStore::Bf16 { cols, .. })
            | IndexerKeys::Rows(CudaTensor { cols, .. }) => {
                if on && cols.is_multiple_of(2) {
                    IndexerScores::TensorCores
                } else {
                    IndexerScores::Float32
                }
            }
        }
    }

    /// Whether the indexer scores a store's keys where they are: the float32 kernels keep
    /// running sums for at most `INDEXER_STORE_MAX_HEADS` heads, the tensor-core ones any.
    fn indexer_in_place(&self, heads: usize, keys: &CudaStore) -> bool {
        heads <= launch::INDEXER_STORE_MAX_HEADS as usize
            || self.indexer_scores_on(IndexerKeys::Store(keys)) != IndexerScores::Float32
    }

    /// Sets how many groups of 16 heads a block of the tensor-core attention takes: 1, 2 or 4
    /// (fewer when its shared memory would pass what the GPU allows), or, with `None` (the default), the
    /// most that still gives every multiprocessor a block ([`launch::mla_tc_groups`]). More
    /// heads a block read each key fewer times.
    pub fn attention_head_groups(&self, groups: Option<u32>) -> Result<()> {
        let groups = match groups {
            None => 0,
            Some(g @ (1 | 2 | 4)) => g,
            Some(g) => {
                return Err(EngineError::Device(format!(
                    "attention head groups: {g}; a block takes 1, 2 or 4 groups of 16 heads"
                )));
            }
        };
        self.head_groups
            .store(groups, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Sets how many parts the attention splits each row's keys into (flash decoding: the
    /// parts run in blocks of their own and `mla_combine_splits_f32` weighs their contexts by
    /// their log-sum-exps): `Some(1)` never splits, `Some(n)` splits the longest list of every
    /// launch into `n` parts of whole 32-key tiles (fewer when it is short), up to
    /// `launch::MLA_MAX_SPLITS`; `None` (the default) splits only while a launch's blocks
    /// would leave multiprocessors idle ([`launch::mla_split_keys`]).
    pub fn attention_key_splits(&self, splits: Option<u32>) -> Result<()> {
        let splits = match splits {
            None => 0,
            Some(n @ 1..=launch::MLA_MAX_SPLITS) => n,
            Some(n) => {
                return Err(EngineError::Device(format!(
                    "attention key splits: {n}; from 1 to {}",
                    launch::MLA_MAX_SPLITS
                )));
            }
        };
        self.key_splits
            .store(splits, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Sets how many parts the indexer's top-k splits each row's scores into (the parts' top k
    /// in blocks of their own, `topk_parts_f32`, then each row's top k of theirs,
    /// `topk_merge_f32`; the same picks): `Some(1)` never splits, `Some(n)` splits every
    /// launch's rows into `n` parts, up to `launch::TOPK_MAX_PARTS` (fewer where parts of the
    /// launch's longest row would be shorter than k, none where that leaves one part:
    /// [`launch::topk_split`]); `None` (the default)
    /// splits only while a launch's rows would leave multiprocessors idle
    /// ([`launch::topk_parts`]).
    pub fn indexer_top_k_parts(&self, parts: Option<u32>) -> Result<()> {
        let parts = match parts {
            None => 0,
            Some(n @ 1..=launch::TOPK_MAX_PARTS) => n,
            Some(n) => {
                return Err(EngineError::Device(format!(
                    "indexer top-k parts: {n}; from 1 to {}",
                    launch::TOPK_MAX_PARTS
                )));
            }
        };
        self.topk_parts
            .store(parts, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// How many of the indexer's top-k launches split their rows.
    pub fn split_top_k_launches(&self) -> u64 {
        self.split_topk_launches
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many attention launches split their rows' keys.
    pub fn split_attention_launches(&self) -> u64 {
        self.split_launches
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets the most rows a product with an fp8 or bf16 weight may have for it to read the
    /// weight in place on every lane (`fp8_linear_tc`: a byte a value read once, the decode
    /// step's case; `bf16_linear_tc`: one launch, with x rounded to bf16 as it is read, where
    /// cuBLAS takes a conversion of x and a call); a product of more rows (a prefill's) runs on
    /// cuBLAS, whose tiles reuse each value across many rows, an fp8 weight dequantised to bf16
    /// for it. 0 always takes cuBLAS. The default is `launch::FP8_LINEAR_ROWS` (64), one
    /// block's rows. The same bound picks bf16 experts' grouped products: while no expert has
    /// more rows, they run as `bf16_grouped_tc` (each weight read once, float32 outputs);
    /// beyond it, as cuBLAS's grouped products, and a MoE layer of more rows than the bound
    /// routed on the device reads its experts' counts back to choose
    /// ([`Cuda::route_on_device`]). fp8 experts run as `fp8_grouped_tc` at any rows (see
    /// `Cuda::grouped_in_place_fits`).
    pub fn in_place_rows(&self, rows: usize) {
        for lane in self.lanes() {
            lane.in_place_rows
                .store(rows, std::sync::atomic::Ordering::Relaxed);
        }
        self.graphs.clear(); // recorded with the other choice
    }

    /// How many launches read a weight in place, by the weight's dtype, on every lane.
    pub fn in_place_products(&self) -> InPlaceLaunches {
        let count = |dtype: usize| {
            self.lanes()
                .map(|lane| {
                    lane.in_place_launches[dtype].load(std::sync::atomic::Ordering::Relaxed)
                })
                .sum()
        };
        InPlaceLaunches {
            fp8: count(FP8),
            bf16: count(BF16),
        }
    }

    /// How many grouped products of bf16 experts read their weights in place
    /// (`bf16_grouped_tc`), on every lane.
    pub fn bf16_grouped_products(&self) -> u64 {
        self.lanes()
            .map(|lane| {
                lane.bf16_grouped_launches
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum()
    }

    /// How many attention and indexer launches ran on the tensor cores.
    pub fn tensor_core_launches(&self) -> u64 {
        self.tensor_core_launches
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many scores launches the indexer made (a batch's rows take one, or one a chunk
    /// when their scores pass `SCORES_PER_LAUNCH`).
    pub fn indexer_launches(&self) -> u64 {
        self.indexer_launches
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the indexer's picks stay on the device, as the pool rows the attention reads
    /// (on by default): a step's layer then copies neither its picks to the host nor its
    /// attention's key lists back ([`Backend::indexer_keep_paged`]). Off, they make the round
    /// trip, as for a trace.
    pub fn keep_picks(&self, on: bool) {
        self.keep_picks
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many attention launches read the indexer's picks where it kept them.
    pub fn kept_pick_launches(&self) -> u64 {
        self.kept_launches
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether a MoE layer with fp8 or bf16 experts routes on the device (on by default):
    /// `moe_route_f32` and `moe_expert_slots` build the grouped products' lists there, so the
    /// layer copies neither its router logits to the host nor its lists back
    /// ([`Backend::moe_routed`]; bf16 experts past [`Cuda::in_place_rows`] rows copy their
    /// expert offsets back), with expert shards too. Off, every layer routes on the host.
    pub fn route_on_device(&self, on: bool) {
        self.route_on_device
            .store(on, std::sync::atomic::Ordering::Relaxed);
        self.graphs.clear(); // recorded with the other choice
    }

    /// How many MoE layers routed on the device.
    pub fn routed_on_device(&self) -> u64 {
        self.routed_layers
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many copies to the host the lanes made (tensors, the indexer's picks, expert
    /// counts): each waits for everything queued before it on its lane's stream.
    pub fn host_reads(&self) -> u64 {
        self.lanes()
            .map(|lane| lane.host_reads.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    /// The most rows of a step for which each layer's MLP block runs as a CUDA graph, captured
    /// the second time its (layer, rows) comes and replayed after that (see [`graphs`]); 0
    /// (the default) for none. Setting it forgets the graphs made so far, as do the setters
    /// that change what a block launches (`route_on_device`, `in_place_rows`,
    /// `experts_one_by_one`, `attention_on_tensor_cores`).
    pub fn graph_rows(&self, rows: usize) {
        self.graphs
            .rows
            .store(rows, std::sync::atomic::Ordering::Relaxed);
        self.graphs.clear();
    }

    /// What the MLP blocks' graphs did: blocks captured, graph launches, and blocks left to run
    /// without a graph for good.
    pub fn graph_counts(&self) -> GraphCounts {
        self.graphs.counts()
    }

    /// Why [`Cuda::graph_rows`] captures nothing on this backend whatever its setting, if it
    /// cannot.
    pub fn graphs_unavailable(&self) -> Option<&'static str> {
        if !self.shards.is_empty() {
            Some(
                "expert shards run on lanes of their own, and a capture across streams is not built",
            )
        } else if !self.stream.context().has_async_alloc() {
            Some(
                "the driver has no stream-ordered allocations (cuMemAllocAsync), which a captured block's buffers need",
            )
        } else {
            None
        }
    }

    /// Whether the lanes reuse a device copy of a read-only array (RoPE angles, cache slots,
    /// block tables, attention keys and offsets) they uploaded lately with the same contents
    /// (on by default; see [`uploads`]); off, every such array is copied again.
    pub fn reuse_uploads(&self, on: bool) {
        for lane in self.lanes() {
            lane.uploads
                .off
                .store(!on, std::sync::atomic::Ordering::Relaxed);
            if !on {
                lane.recent_i32.clear();
                lane.recent_f32.clear();
            }
        }
    }

    /// Forgets every array and address table the lanes keep, as if all had been evicted (for
    /// tests: the next uploads are copies again, and a graph captured meanwhile is spoiled).
    pub fn forget_uploads(&self) {
        for lane in self.lanes() {
            lane.recent_i32.clear();
            lane.recent_f32.clear();
            lane.tables.clear();
        }
    }

    /// Host-to-device copies of step data the lanes made (weights at load time not counted),
    /// and arrays they answered with a copy already on the device.
    pub fn upload_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.lanes().fold((0, 0), |(copies, reused), lane| {
            (
                copies + lane.uploads.copies.load(Relaxed),
                reused + lane.uploads.reused.load(Relaxed),
            )
        })
    }

    /// Makes this lane's context current on the calling thread (cuBLAS calls need it).
    fn bind(&self) {
        ok(
            self.stream.context().bind_to_thread(),
            "binding the context",
        );
    }

    /// The copy of `w` this lane computes with.
    fn weight<'w>(&self, w: &'w CudaWeight) -> &'w WeightData {
        w.on(self.lane)
    }

    /// Copies a weight's host data to a new buffer on this lane's device.
    fn upload_copy(&self, data: &HostWeight, rows: usize, cols: usize) -> Result<WeightData> {
        match data {
            HostWeight::F32(v) => self.try_upload(v).map(WeightData::F32),
            HostWeight::Bf16(v) => self.try_upload(v).map(WeightData::Bf16),
            HostWeight::Fp8 { codes, row_scales } => self.try_upload(codes).and_then(|codes| {
                let bf16_bytes = codes.len() * 2;
                self.fp8_scratch
                    .fetch_max(bf16_bytes, std::sync::atomic::Ordering::Relaxed);
                Ok(WeightData::Fp8 {
                    codes,
                    row_scales: self.try_upload(row_scales)?,
                })
            }),
        }
        .map_err(|e| {
            device_error(format!(
                "uploading a [{rows}, {cols}] weight ({} MiB) to cuda:{}: {e:?}",
                data.bytes() >> 20,
                self.ordinal
            ))
        })
    }

    /// Copies `src` into `dst` on this lane's stream: within one GPU a device copy, between two
    /// a peer copy (cudarc picks the peer path only when the source is in another context than
    /// the stream, so both directions are done here).
    fn copy<T: cudarc::driver::DeviceRepr>(
        &self,
        src: &CudaView<'_, T>,
        dst: &mut CudaViewMut<'_, T>,
        what: &str,
    ) {
        use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceSlice};
        assert_eq!(src.len(), dst.len(), "{what}: lengths differ");
        self.bind();
        let (src_ctx, dst_ctx) = (
            src.stream().context().clone(),
            dst.stream().context().clone(),
        );
        let bytes = src.len() * std::mem::size_of::<T>();
        let (src_ptr, _src) = src.device_ptr(&self.stream);
        let (dst_ptr, _dst) = dst.device_ptr_mut(&self.stream);
        // SAFETY: both views hold `bytes` bytes; the callers order the streams with events.
        let copied = unsafe {
            if src_ctx.cu_ctx() == dst_ctx.cu_ctx() {
                cudarc::driver::result::memcpy_dtod_async(
                    dst_ptr,
                    src_ptr,
                    bytes,
                    self.stream.cu_stream(),
                )
            } else {
                cudarc::driver::result::memcpy_peer_async(
                    dst_ctx.cu_ctx(),
                    dst_ptr,
                    src_ctx.cu_ctx(),
                    src_ptr,
                    bytes,
                    self.stream.cu_stream(),
                )
            }
        };
        ok(copied, what);
    }

    /// `x` (its first `n` values) rounded to bf16, as the input of a product with a bf16 weight.
    fn bf16_bits(&self, x: &CudaView<'_, f32>, n: usize) -> CudaSlice<u16> {
        // SAFETY: the kernel below writes all n values before any product reads them.
        let mut out = ok(unsafe { self.stream.alloc::<u16>(n.max(1)) }, "allocating");
        if n > 0 {
            let len = n as i64;
            let mut b = self.stream.launch_builder(&self.k.f32_to_bf16_bits);
            b.arg(&mut out).arg(x).arg(&len);
            // SAFETY: out holds n values and x at least n.
            ok(
                unsafe { b.launch(Self::flat_config(n)) },
                "f32_to_bf16_bits",
            );
        }
        out
    }

    /// Weight `w`'s copy on this lane as a product reads it: an fp8 weight is dequantised to
    /// bf16 into a new buffer, the others are used as stored.
    fn operand<'w>(&self, w: &'w CudaWeight) -> Operand<'w> {
        let (codes, row_scales) = match self.weight(w) {
            WeightData::F32(buf) => return Operand::F32(buf),
            WeightData::Bf16(buf) => return Operand::Bf16(buf),
            WeightData::Fp8 { codes, row_scales } => (codes, row_scales),
        };
        let n = w.rows * w.cols;
        // SAFETY: every element is written below before any product reads it.
        let mut out = ok(unsafe { self.stream.alloc::<u16>(n.max(1)) }, "allocating");
        if n > 0 {
            let (len, cols) = (n as i64, w.cols as i32);
            let scale_cols = w.cols.div_ceil(128) as i32;
            let mut b = self.stream.launch_builder(&self.k.fp8_dequant_bf16);
            b.arg(&mut out)
                .arg(codes)
                .arg(row_scales)
                .arg(&len)
                .arg(&cols)
                .arg(&scale_cols);
            // SAFETY: out and codes hold rows·cols values, row_scales rows·scale_cols.
            ok(
                unsafe { b.launch(Self::flat_config(n)) },
                "fp8_dequant_bf16_bits",
            );
        }
        Operand::Dequantised(out)
    }

    /// Products of a weight read in place (`fp8_linear_tc` for fp8 codes, `bf16_linear_tc` for
    /// bf16 values): for `b < p.batch`, `y_b = x_b · W_bᵀ`, where x_b is `[m, k]` (rows `ldx`
    /// apart) from `x[b · batch_x]`, W_b the weight's rows `first_row + b · batch_rows ..` (`n`
    /// of them, `k` columns; an fp8 weight's with a scale per row and 128 columns), and y_b
    /// `[m, n]` (rows `ldy` apart) from `y[b · batch_y]`. k is split over blocks when the
    /// products' blocks alone would leave multiprocessors idle
    /// ([`launch::fp8_linear_split_steps`]; `sum_splits_f32` then adds the parts, so y must be
    /// dense: `m · ldy` values, every one written by some product).
    fn products_in_place(
        &self,
        y: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        w: InPlace<'_>,
        p: InPlaceProducts,
    ) {
        let InPlaceProducts { m, n, k, .. } = p;
        assert_eq!(k, w.cols, "in-place products: k is not the weight's width");
        if m == 0 || n == 0 || p.batch == 0 {
            return; // nothing to write
        }
        if k == 0 {
            // Empty sums: y's products are zeros (y is dense, as below).
            let mut all = y.slice_mut(..m * p.ldy);
            ok(self.stream.memset_zeros(&mut all), "zeroing");
            return;
        }
        let int = |v: usize, what: &str| {
            i32::try_from(v)
                .unwrap_or_else(|_| panic!("in-place product: {what} {v} exceeds int32"))
        };
        let scale_cols = k.div_ceil(launch::FP8_LINEAR_K as usize);
        let grid = (
            n.div_ceil(launch::FP8_LINEAR_COLS as usize) as u32,
            m.div_ceil(launch::FP8_LINEAR_ROWS as usize) as u32,
        );
        let batch = u32::try_from(p.batch).expect("in-place products: batch fits in u32");
        let split_steps = launch::fp8_linear_split_steps(
            grid.0.saturating_mul(grid.1).saturating_mul(batch),
            k.try_into().unwrap_or(u32::MAX),
            self.multiprocessors,
        );
        let splits = (scale_cols.max(1) as u32).div_ceil(split_steps);
        let config = LaunchConfig {
            grid_dim: (grid.0, grid.1, batch * splits),
            block_dim: (launch::FP8_LINEAR_WARPS * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (m_i, n_i, k_i) = (int(m, "rows"), int(n, "weight rows"), int(k, "columns"));
        let tail = [
            split_steps as i32,
            int(p.ldx, "x's row stride"),
            int(p.ldy, "y's row stride"),
        ];
        let (batch_x, batch_rows, batch_y) = (
            p.batch_x as i64,
            int(p.batch_rows, "weight rows between products"),
            p.batch_y as i64,
        );
        let (kernel, name, dtype) = match w.data {
            InPlaceData::Fp8 { .. } => (&self.k.fp8_linear, "fp8_linear_tc", FP8),
            InPlaceData::Bf16(_) => (&self.k.bf16_linear, "bf16_linear_tc", BF16),
        };
        let launch = |out: &mut CudaSlice<f32>| {
            let mut b = self.stream.launch_builder(kernel);
            b.arg(out).arg(x);
            // Views of the products' weight rows, from first_row on.
            let (codes, row_scales, values);
            let scale_cols_i = scale_cols as i32;
            match w.data {
                InPlaceData::Fp8 {
                    codes: c,
                    row_scales: r,
                } => {
                    codes = c.slice(p.first_row * k..);
                    row_scales = r.slice(p.first_row * scale_cols..);
                    b.arg(&codes).arg(&row_scales);
                    b.arg(&m_i).arg(&n_i).arg(&k_i).arg(&scale_cols_i);
                }
                InPlaceData::Bf16(v) => {
                    values = v.slice(p.first_row * k..);
                    b.arg(&values);
                    b.arg(&m_i).arg(&n_i).arg(&k_i);
                }
            }
            for v in &tail {
                b.arg(v);
            }
            b.arg(&batch_x).arg(&batch_rows).arg(&batch_y);
            // SAFETY: the caller's: x holds every x_b, the weight every W_b, and out (y, or
            // the splits' parts) splits · m · ldy values.
            ok(unsafe { b.launch(config) }, name);
        };
        if splits == 1 {
            launch(y);
        } else {
            let len = m * p.ldy;
            // SAFETY: the launch writes every value of every part (y is dense).
            let mut parts = ok(
                unsafe { self.stream.alloc::<f32>(splits as usize * len) },
                "allocating",
            );
            launch(&mut parts);
            let (len_i, parts_i) = (len as i64, splits as i32);
            let mut b = self.stream.launch_builder(&self.k.sum_splits);
            b.arg(y).arg(&parts).arg(&parts_i).arg(&len_i);
            // SAFETY: y holds len values, parts splits · len.
            ok(
                unsafe { b.launch(Self::flat_config(len)) },
                "sum_splits_f32",
            );
        }
        self.in_place_launches[dtype].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// `w` on this lane as a product of `rows` rows reads it in place (see
    /// [`Cuda::in_place_rows`]): fp8 codes and row scales, or bf16 values; `None` for a float32
    /// weight or more rows.
    fn in_place<'w>(&self, w: &'w CudaWeight, rows: usize) -> Option<InPlace<'w>> {
        if rows > self.in_place_limit() {
            return None;
        }
        let data = InPlaceData::of(self.weight(w))?;
        Some(InPlace { data, cols: w.cols })
    }

    /// The most rows of x a product reads its weight in place for: as
    /// [`Cuda::in_place_rows`] set, and never more than the launches' grid holds (a block
    /// of 64 rows a grid row, 65,535 grid rows).
    fn in_place_limit(&self) -> usize {
        let set = self
            .in_place_rows
            .load(std::sync::atomic::Ordering::Relaxed);
        set.min(launch::FP8_LINEAR_ROWS as usize * launch::MAX_GRID_ROWS as usize)
    }

    /// cuBLAS's column-major `C = op(A)·B` (`batch`: strided-batched `(count, stride_a,
    /// stride_b, stride_c)`) with A a bf16 weight, B bf16 bits and C float32, summed in float32
    /// on the tensor cores. `cfg`'s `alpha` and `beta` are ignored (1 and 0).
    ///
    /// # Safety
    /// The views must hold the elements `cfg` and `batch` address.
    unsafe fn gemm_bf16(
        &self,
        cfg: GemmConfig<f32>,
        batch: Option<(i32, i64, i64, i64)>,
        a: &CudaView<'_, u16>,
        b: &CudaView<'_, u16>,
        c: &mut CudaViewMut<'_, f32>,
    ) -> std::result::Result<(), cudarc::cublas::result::CublasError> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        self.bind();
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (a_ptr, _a) = a.device_ptr(&self.stream);
        let (b_ptr, _b) = b.device_ptr(&self.stream);
        let (c_ptr, _c) = c.device_ptr_mut(&self.stream);
        let handle = *self.blas.handle.handle();
        let bf16 = cudaDataType::CUDA_R_16BF;
        let f32 = cudaDataType::CUDA_R_32F;
        let compute = cublasComputeType_t::CUBLAS_COMPUTE_32F;
        let algo = cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
        let alpha = (&alpha as *const f32).cast();
        let beta = (&beta as *const f32).cast();
        // One product is a batch of one.
        let (count, sa, sb, sc) = batch.unwrap_or((1, 0, 0, 0));
        // SAFETY: the caller's; the pointers stay valid while the guards above live.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                handle,
                cfg.transa,
                cfg.transb,
                cfg.m,
                cfg.n,
                cfg.k,
                alpha,
                a_ptr as *const _,
                bf16,
                cfg.lda,
                sa,
                b_ptr as *const _,
                bf16,
                cfg.ldb,
                sb,
                beta,
                c_ptr as *mut _,
                f32,
                cfg.ldc,
                sc,
                count,
                compute,
                algo,
            )
        }
    }

    fn upload_i32(&self, values: impl Iterator<Item = usize>) -> CudaSlice<i32> {
        self.upload_slice(&int32(values))
    }

    fn upload_slice<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        v: &[T],
    ) -> CudaSlice<T> {
        self.uploads
            .copies
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ok(self.try_upload(v), "copying to the device")
    }

    /// `values` as int32 on the device for kernels that only read them: a buffer this lane
    /// uploaded earlier with the same values, or a new copy (see [`uploads`]).
    fn shared_i32(&self, values: impl Iterator<Item = usize>) -> Arc<CudaSlice<i32>> {
        self.shared(&int32(values))
    }

    /// [`Cuda::shared_i32`] for values already int32.
    fn shared(&self, v: &[i32]) -> Arc<CudaSlice<i32>> {
        let got = self
            .recent_i32
            .get(v, &self.uploads, |v| self.try_upload(v));
        ok(got, "copying to the device")
    }

    /// [`Cuda::shared_i32`] for float32 values.
    fn shared_f32(&self, v: &[f32]) -> Arc<CudaSlice<f32>> {
        let got = self
            .recent_f32
            .get(v, &self.uploads, |v| self.try_upload(v));
        ok(got, "copying to the device")
    }

    /// `v` in a new device buffer (one zero element for an empty `v`: a zero-length
    /// allocation is not a valid device pointer).
    fn try_upload<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        v: &[T],
    ) -> std::result::Result<CudaSlice<T>, DriverError> {
        if !self.uploads.may_copy() {
            // A graph being captured would copy these bytes again at every launch: the capture
            // is spoiled and never launched, so what this buffer holds is never read.
            return self.stream.alloc_zeros::<T>(v.len().max(1));
        }
        if v.is_empty() {
            self.stream.alloc_zeros::<T>(1)
        } else {
            self.stream.clone_htod(v)
        }
    }

    /// `src` copied to the host (once the stream's work so far is done). While a graph is
    /// captured, nothing is copied (the capture is spoiled, see [`uploads`]) and the values are
    /// zeros.
    fn read_back<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        src: &CudaView<'_, T>,
    ) -> Vec<T> {
        if !self.uploads.may_copy() {
            return vec![T::default(); src.len()];
        }
        self.host_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ok(self.stream.clone_dtoh(src), "copying to the host")
    }

    /// `rows` rows per block-row kernel launch of ENGINE_THREADS threads.
    fn row_config(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (launch::ENGINE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn flat_config(n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (n.div_ceil(launch::ENGINE_THREADS as usize) as u32, 1, 1),
            block_dim: (launch::ENGINE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A `[rows, cols]` tensor whose values are whatever the allocation held: for an output
    /// that a kernel, copy or product writes whole, which then costs no memset.
    ///
    /// # Safety
    /// Every value must be written before any is read.
    unsafe fn uninit(&self, rows: usize, cols: usize) -> CudaTensor {
        // One element at least: a zero-length allocation is not a valid device pointer.
        // SAFETY: the caller's.
        let buf = ok(
            unsafe { self.stream.alloc::<f32>((rows * cols).max(1)) },
            "allocating",
        );
        CudaTensor { buf, rows, cols }
    }

    /// A `[rows, cols]` tensor of zeros.
    fn zeros(&self, rows: usize, cols: usize) -> CudaTensor {
        // One element at least: a zero-length allocation is not a valid device pointer.
        let buf = ok(
            self.stream.alloc_zeros::<f32>((rows * cols).max(1)),
            "allocating",
        );
        CudaTensor { buf, rows, cols }
    }

    /// Rows `slots` of `src` (`[_, cols]`), stacked.
    fn gather(&self, src: &CudaSlice<f32>, cols: usize, slots: &[usize]) -> CudaTensor {
        if slots.is_empty() {
            return self.zeros(0, cols);
        }
        let idx = self.shared_i32(slots.iter().copied());
        self.gather_indexed(src, cols, &idx.as_view())
    }

    /// Rows `slots` of the bf16 bits `src` (`[_, cols]`) as float32, stacked.
    fn gather_bf16_bits(
        &self,
        src: &CudaView<'_, u16>,
        cols: usize,
        slots: &[usize],
    ) -> CudaTensor {
        // SAFETY: the launch below writes every row.
        let mut out = unsafe { self.uninit(slots.len(), cols) };
        if slots.is_empty() {
            return out;
        }
        let idx = self.shared_i32(slots.iter().copied());
        let c = cols as i32;
        let mut b = self.stream.launch_builder(&self.k.gather_rows_bf16);
        b.arg(&mut out.buf).arg(src).arg(&*idx).arg(&c);
        // SAFETY: out has slots.len()·cols elements; every slot is a row of src (callers check
        // tokens against the table, cache slots against the pool).
        ok(
            unsafe { b.launch(Self::row_config(slots.len())) },
            "gather_rows_bf16_bits_f32",
        );
        out
    }

    /// Rows `idx[0], idx[1], …` (already on the device) of `src` (`[_, cols]`), stacked.
    fn gather_indexed(
        &self,
        src: &CudaSlice<f32>,
        cols: usize,
        idx: &CudaView<'_, i32>,
    ) -> CudaTensor {
        // SAFETY: the launch below writes every row.
        let mut out = unsafe { self.uninit(idx.len(), cols) };
        let c = cols as i32;
        let mut b = self.stream.launch_builder(&self.k.gather_rows);
        b.arg(&mut out.buf).arg(src).arg(idx).arg(&c);
        // SAFETY: out has idx.len()·cols elements; every index is a row of src (callers pass
        // tokens below the vocabulary, cache slots below the pool's rows, rows of x).
        ok(
            unsafe { b.launch(Self::row_config(idx.len())) },
            "gather_rows",
        );
        out
    }

    /// `out[row] += weight · expert(x[row])` for each expert's (row, weight) pairs.
    fn add_experts(
        &self,
        x: &CudaTensor,
        out: &mut CudaTensor,
        groups: &[(usize, Vec<(usize, f32)>)],
        experts: &[Expert<CudaWeight>],
    ) {
        // Every expert's rows and weights, and the lists the grouped path reads, in one upload;
        // each expert reads its range.
        let rows: Vec<usize> = groups
            .iter()
            .flat_map(|(_, r)| r.iter().map(|p| p.0))
            .collect();
        let weights: Vec<f32> = groups
            .iter()
            .flat_map(|(_, r)| r.iter().map(|p| p.1))
            .collect();
        if rows.is_empty() {
            return;
        }
        let lists = self.expert_lists(groups, experts, &rows, &weights, out.rows);
        if self.grouped_experts(x, out, groups, experts, &lists) {
            return;
        }
        let (rows_d, weights_d) = (lists.view(lists.rows), lists.view(lists.weights));
        let c = x.cols as i32;
        let mut at = 0;
        for (e, pairs) in groups {
            let range = at..at + pairs.len();
            at += pairs.len();
            let (idx, wts) = (rows_d.slice(range.clone()), weights_d.slice(range));
            let ye = self.swiglu(&self.gather_indexed(&x.buf, x.cols, &idx), &experts[*e]);
            let mut b = self.stream.launch_builder(&self.k.scatter_add_rows);
            b.arg(&mut out.buf).arg(&ye.buf).arg(&idx).arg(&wts).arg(&c);
            // SAFETY: ye is [pairs.len(), cols]; the rows index out's rows and are distinct
            // within one expert (experts add one launch after another).
            ok(
                unsafe { b.launch(Self::row_config(pairs.len())) },
                "scatter_add_rows",
            );
        }
    }

    /// The routed experts of `groups` as three grouped products (`cublasGemmGroupedBatchedEx`,
    /// one group per expert) over `x`'s rows gathered in expert order (`rows`, on the device as
    /// `rows_d`), SiLU-and-mul between them, and one launch adding each row's weighted outputs
    /// in expert order, as the expert-by-expert path adds them: about ten launches a layer
    /// instead of about ten per expert. Float32 weights give that path's numbers. fp8
    /// weights, and bf16 ones while no expert has more rows than [`Cuda::in_place_rows`], are
    /// read in place by `fp8_grouped_tc` / `bf16_grouped_tc` instead of cuBLAS, with float32
    /// outputs (the expert-by-expert path's numbers; see [`Cuda::grouped_in_place`]); past it,
    /// bf16 weights run on cuBLAS's tensor cores with bf16 outputs (its grouped products write
    /// their inputs' type), so the gate, up and down outputs are rounded to bf16 once more
    /// than there.
    ///
    /// Returns false, having written nothing to `out`, when the experts' shapes or dtypes
    /// differ, when fp8 experts would need more grid rows than a launch has (they then
    /// dequantise per product, expert by expert), or when cuBLAS refuses the grouped call,
    /// which turns this path off for the process (logged once).
    fn grouped_experts(
        &self,
        x: &CudaTensor,
        out: &mut CudaTensor,
        groups: &[(usize, Vec<(usize, f32)>)],
        experts: &[Expert<CudaWeight>],
        lists: &ExpertLists,
    ) -> bool {
        use std::sync::atomic::Ordering;

        if self.one_by_one.load(Ordering::Relaxed) {
            return false;
        }
        let (hidden, inter) = (x.cols, experts[groups[0].0].gate.rows);
        let shaped = |w: &CudaWeight, r: usize, c: usize| w.rows == r && w.cols == c;
        let shapes_agree = groups.iter().all(|(e, _)| {
            let ex = &experts[*e];
            shaped(&ex.gate, inter, hidden)
                && shaped(&ex.up, inter, hidden)
                && shaped(&ex.down, hidden, inter)
        });
        if !shapes_agree || inter == 0 || hidden == 0 {
            return false;
        }
        if let Some(y) = self.grouped_in_place(x, groups, lists, hidden, inter) {
            self.combine_pairs(out, &Rows::F32(y), lists);
            self.grouped_layers.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        if !cublas_widths(hidden, inter) {
            return false;
        }
        let Some(addresses) = self.cublas_addresses(groups.iter().map(|(e, _)| &experts[*e]))
        else {
            return false;
        };
        // The pairs' rows of x in expert order.
        let xp = self.gather_indexed(&x.buf, hidden, &lists.view(lists.rows));
        let sizes: Vec<usize> = groups.iter().map(|(_, r)| r.len()).collect();
        let Some(y) = self.cublas_grouped(&xp, &sizes, &addresses, hidden, inter) else {
            return false;
        };
        self.combine_pairs(out, &y, lists);
        self.grouped_layers.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Each of `experts`' gate, up and down weights on this lane as device addresses, a list a
    /// weight and an entry an expert, for cuBLAS's grouped products, and whether they are bf16
    /// (else float32): `None` for fp8 weights or a mix of dtypes.
    fn cublas_addresses<'e>(
        &self,
        experts: impl Iterator<Item = &'e Expert<CudaWeight>>,
    ) -> Option<(bool, [Vec<u64>; 3])> {
        use cudarc::driver::DevicePtr;
        let mut bf16 = None;
        let mut weights = [Vec::new(), Vec::new(), Vec::new()];
        for ex in experts {
            for (list, w) in weights.iter_mut().zip([&ex.gate, &ex.up, &ex.down]) {
                let (is_bf16, address) = match self.weight(w) {
                    WeightData::F32(buf) => (false, buf.device_ptr(&self.stream).0),
                    WeightData::Bf16(buf) => (true, buf.device_ptr(&self.stream).0),
                    WeightData::Fp8 { .. } => return None,
                };
                if *bf16.get_or_insert(is_bf16) != is_bf16 {
                    return None;
                }
                list.push(address);
            }
        }
        Some((bf16?, weights))
    }

    /// The routed experts' outputs before their weights (a row a pair, in expert order) as
    /// three cuBLAS grouped products (`cublasGemmGroupedBatchedEx`, a group an expert) and
    /// SiLU-and-mul between them: `xp` holds x's rows in expert order, `sizes[g]` of them for
    /// the g-th expert of `addresses` ([`Cuda::cublas_addresses`]), every size above 0, and the
    /// widths suit cuBLAS ([`cublas_widths`]). Float32 outputs for float32 weights; bf16 ones for
    /// bf16 weights (cuBLAS's grouped products write their inputs' type). `None` when cuBLAS
    /// refuses a product, which turns the grouped expert products off for the process (logged
    /// once).
    fn cublas_grouped(
        &self,
        xp: &CudaTensor,
        sizes: &[usize],
        addresses: &(bool, [Vec<u64>; 3]),
        hidden: usize,
        inter: usize,
    ) -> Option<Rows> {
        use cudarc::cublas::sys::cudaDataType;
        use cudarc::driver::DevicePtr;
        use std::sync::atomic::Ordering;

        let (bf16, weights) = (addresses.0, &addresses.1);
        let (elem, dtype) = if bf16 {
            (2, cudaDataType::CUDA_R_16BF)
        } else {
            (4, cudaDataType::CUDA_R_32F)
        };
        let n: Vec<i32> = sizes.iter().map(|&rows| rows as i32).collect();
        let p: usize = sizes.iter().sum();
        // Every value of these buffers is written before it is read (the products, with beta 0,
        // write all of theirs; SiLU-and-mul all of act's), so none is zeroed first.
        let alloc = |len: usize| {
            let len = len.max(1);
            // SAFETY: see above.
            unsafe {
                if bf16 {
                    Rows::Bf16(ok(self.stream.alloc::<u16>(len), "allocating"))
                } else {
                    Rows::F32(ok(self.stream.alloc::<f32>(len), "allocating"))
                }
            }
        };

        // The rows rounded to bf16 for bf16 weights.
        let xp_bits = bf16.then(|| self.bf16_bits(&xp.buf.as_view(), p * hidden));
        let input = match &xp_bits {
            Some(bits) => bits.device_ptr(&self.stream).0,
            None => xp.buf.device_ptr(&self.stream).0,
        };
        let (gate, up, y) = (alloc(p * inter), alloc(p * inter), alloc(p * hidden));
        // SiLU-and-mul writes in place on float32 gate outputs, into a bf16 buffer otherwise.
        let act = bf16.then(|| alloc(p * inter));
        // Group g's rows start at row `starts[g]` of each buffer.
        let starts: Vec<u64> = n
            .iter()
            .scan(0u64, |at, &count| {
                let here = *at;
                *at += count as u64;
                Some(here)
            })
            .collect();
        let at = |base: u64, width: usize| -> Vec<u64> {
            starts
                .iter()
                .map(|&s| base + s * (width * elem) as u64)
                .collect()
        };
        let refused = |e: cudarc::cublas::result::CublasError| {
            if !self.one_by_one.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "sparsemoe-engine: cuBLAS refused a grouped expert product ({e:?}); routed \
                     experts run one product each from now on"
                );
                // Later MoE layers route on the host: graphs recorded routing on the device go.
                self.graphs.clear();
            }
        };
        let address = |rows: &Rows| rows.address(&self.stream);
        // The three products' pointer arrays (weights, inputs, outputs: a group an entry),
        // which cuBLAS reads from device memory, in one upload: gate, up, then down, which
        // reads SiLU-and-mul's output (act, or gate in place).
        let x_at = at(input, hidden);
        let down_input = act.as_ref().unwrap_or(&gate);
        let products = [
            [&weights[0], &x_at, &at(address(&gate), inter)],
            [&weights[1], &x_at, &at(address(&up), inter)],
            [
                &weights[2],
                &at(address(down_input), inter),
                &at(address(&y), hidden),
            ],
        ];
        let pointers: Vec<u64> = products.into_iter().flatten().flatten().copied().collect();
        let pointers_d = self.upload_slice(&pointers);
        let per_product = 3 * sizes.len();
        let arrays = |i: usize| pointers_d.slice(i * per_product..(i + 1) * per_product);
        if self.refuse_grouped.swap(false, Ordering::Relaxed) {
            use cudarc::cublas::{result::CublasError, sys::cublasStatus_t};
            refused(CublasError(cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED));
            return None;
        }
        for (i, m) in [(0, inter), (1, inter)] {
            // SAFETY: each group's weight is [inter, hidden], its n[g] input rows lie in the
            // gathered rows from x_at[g], and its outputs in gate (up) from the matching row.
            let done = unsafe { self.grouped_gemm(dtype, &arrays(i), m, hidden, &n) };
            if let Err(e) = done {
                refused(e);
                return None;
            }
        }
        let len = (p * inter) as i64;
        match (&gate, &up, &act) {
            (Rows::Bf16(g), Rows::Bf16(u), Some(Rows::Bf16(a))) => {
                let mut b = self.stream.launch_builder(&self.k.silu_mul_bf16);
                b.arg(a).arg(g).arg(u).arg(&len);
                // SAFETY: gate, up and act each hold p·inter values.
                ok(
                    unsafe { b.launch(Self::flat_config(p * inter)) },
                    "silu_mul_bf16_bits",
                );
            }
            (Rows::F32(g), Rows::F32(u), None) => {
                let mut b = self.stream.launch_builder(&self.k.silu_mul);
                b.arg(g).arg(u).arg(&len);
                // SAFETY: gate and up each hold p·inter values.
                ok(
                    unsafe { b.launch(Self::flat_config(p * inter)) },
                    "silu_mul",
                );
            }
            _ => unreachable!("the grouped buffers share one dtype"),
        }
        // SAFETY: each group's down weight is [hidden, inter]; its inputs are its rows of
        // down_input, its outputs its rows of y.
        let done = unsafe { self.grouped_gemm(dtype, &arrays(2), hidden, inter, &n) };
        if let Err(e) = done {
            refused(e);
            return None;
        }
        Some(y)
    }

    /// The experts' outputs before their weights (a row a pair, in expert order) for a MoE
    /// layer routed on the device: `xp` holds x's rows in expert order, `tables` the routing's
    /// lists, and `expert(i)` the expert they number i (a shard's lane: the i-th it holds).
    /// `in_place`: the in-place grouped launches, sized for the most rows an expert could
    /// have. Otherwise (bf16 experts and more rows than [`Cuda::in_place_rows`]) each expert's
    /// count of rows comes back to the host (one copy of its group offsets, which waits for the
    /// routing: cuBLAS's grouped products take their sizes from the host, and this is all the
    /// host reads, not the router's logits). The experts then run as a step routed on the host
    /// would run them: all in place while no expert has more than `in_place_rows` rows, else
    /// all on cuBLAS's grouped products, or, where cuBLAS refuses one, each expert's products
    /// one at a time.
    fn routed_products<'e>(
        &self,
        xp: &CudaTensor,
        mut tables: GroupedTables<'_>,
        expert: impl Fn(usize) -> &'e Expert<CudaWeight>,
        in_place: bool,
        (hidden, inter): (usize, usize),
    ) -> Rows {
        use std::sync::atomic::Ordering::Relaxed;
        if in_place {
            return Rows::F32(self.expert_products_in_place(xp, &tables, hidden, inter));
        }
        let offsets = self.read_back(&tables.offsets);
        let active = super::experts_with_rows(&offsets);
        let most = active.iter().map(|a| a.2).max().unwrap_or(0);
        // The grid's rows are the experts' own tiles now that their counts are known (one at
        // least, which ends at once, for a shard dealt no pairs).
        tables.tiles = active.iter().map(|a| row_tiles(a.2)).sum::<usize>().max(1);
        if self.grouped_in_place_fits(false, most, tables.tiles) {
            return Rows::F32(self.expert_products_in_place(xp, &tables, hidden, inter));
        }
        let sizes: Vec<usize> = active.iter().map(|a| a.2).collect();
        let addresses = self.cublas_addresses(active.iter().map(|a| expert(a.0)));
        if let (Some(addresses), false) = (addresses, self.one_by_one.load(Relaxed))
            && let Some(y) = self.cublas_grouped(xp, &sizes, &addresses, hidden, inter)
        {
            return y;
        }
        // cuBLAS refused: each expert's rows through its three products, into their place.
        let p = xp.rows;
        // SAFETY: the experts' rows, each written below, are rows 0.. of the last offset; on a
        // shard's lane the pairs dealt to other shards leave rows past it, which combine_rows
        // never reads (their slots are -1).
        let mut y = ok(
            unsafe { self.stream.alloc::<f32>((p * hidden).max(1)) },
            "allocating",
        );
        for &(e, first, rows) in &active {
            let ye = self.swiglu(&self.rows(xp, first, rows), expert(e));
            let at = first * hidden..(first + rows) * hidden;
            self.copy(
                &ye.buf.slice(..rows * hidden),
                &mut y.slice_mut(at),
                "copying an expert's outputs",
            );
        }
        Rows::F32(y)
    }

    /// Adds to each row of `out` its pairs' outputs (`y`: a row a pair, in expert order, the
    /// pair of row `lists.rows[j]` at row j) times their weights, experts ascending (the pairs'
    /// order): one `combine_rows` launch.
    fn combine_pairs(&self, out: &mut CudaTensor, y: &Rows, lists: &ExpertLists) {
        let by_row = (lists.view(lists.by_row.0), lists.view(lists.by_row.1));
        self.combine(out, y, by_row, &lists.view(lists.weights), true);
    }

    /// Adds to each row `r` of `out` (`accumulate`; else sets it to) the rows `pairs[j]` of `y`
    /// times `weights[pairs[j]]`, for `j` from `offsets[r]` to `offsets[r + 1]` in order (a
    /// negative `pairs[j]` skipped): one `combine_rows` launch.
    fn combine(
        &self,
        out: &mut CudaTensor,
        y: &Rows,
        (offsets_d, pairs_d): (CudaView<'_, i32>, CudaView<'_, i32>),
        weights_d: &CudaView<'_, f32>,
        accumulate: bool,
    ) {
        let c = out.cols as i32;
        let mut b = match &y {
            Rows::F32(_) => self.stream.launch_builder(&self.k.combine_rows),
            Rows::Bf16(_) => self.stream.launch_builder(&self.k.combine_rows_bf16),
        };
        b.arg(&mut out.buf);
        match &y {
            Rows::F32(s) => b.arg(s),
            Rows::Bf16(s) => b.arg(s),
        };
        let accumulate = i32::from(accumulate);
        b.arg(&offsets_d)
            .arg(&pairs_d)
            .arg(weights_d)
            .arg(&c)
            .arg(&accumulate);
        // SAFETY: out has out.rows rows of hidden (the rows the lists were made for); offsets
        // has out.rows + 1 entries, pairs and weights p, y p rows of hidden, and every pair
        // is below p (a negative one is skipped).
        ok(
            unsafe { b.launch(Self::row_config(out.rows)) },
            "combine_rows",
        );
    }

    /// A MoE layer's index lists on the device in one upload ([`Pack`]): the pairs' rows and
    /// weights in expert order (`rows`, `weights`: every path reads them), the pairs by row
    /// for `combine_rows` (`pairs_by_row` over the `out_rows` rows), and, when the active
    /// experts can run as `fp8_grouped_tc` or `bf16_grouped_tc` (every weight fp8, or every
    /// one bf16 and no expert with more rows than [`Cuda::in_place_rows`]), the groups'
    /// offsets, their tiles' offsets and the address tables.
    fn expert_lists(
        &self,
        groups: &[(usize, Vec<(usize, f32)>)],
        experts: &[Expert<CudaWeight>],
        rows: &[usize],
        weights: &[f32],
        out_rows: usize,
    ) -> ExpertLists {
        let (offsets, pairs) = pairs_by_row(rows, out_rows);
        let mut pack = Pack::default();
        let rows_part = pack.push(&int32(rows.iter().copied()));
        let weights_part = pack.push(weights);
        let by_row = (
            pack.push(&int32(offsets.into_iter())),
            pack.push(&int32(pairs.into_iter())),
        );
        let in_place = self
            .in_place_tables(groups, experts)
            .map(|(weights, scales)| {
                let prefix = |size: fn(usize) -> usize| {
                    let mut at = 0;
                    int32(std::iter::once(0).chain(groups.iter().map(|(_, r)| {
                        at += size(r.len());
                        at
                    })))
                };
                let tile_offsets = prefix(row_tiles);
                InPlaceLists {
                    tiles: tile_offsets.last().map_or(0, |&t| t as usize),
                    offsets: pack.push(&prefix(|rows| rows)),
                    tile_offsets: pack.push(&tile_offsets),
                    weights: weights.map(|table| pack.push(&table)),
                    scales: scales.map(|tables| tables.map(|table| pack.push(&table))),
                }
            });
        self.uploads
            .copies
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ExpertLists {
            packed: Packed(ok(self.try_upload(pack.bytes()), "copying to the device")),
            rows: rows_part,
            weights: weights_part,
            by_row,
            in_place,
        }
    }

    /// Each active expert's gate, up and down weights as device addresses ([`AddressTables`]),
    /// when every one is fp8, or every one bf16 and no expert has more rows than
    /// [`Cuda::in_place_rows`]: what `fp8_grouped_tc` or `bf16_grouped_tc` reads. fp8 experts
    /// run in place at any rows (see [`Cuda::grouped_in_place_fits`]).
    fn in_place_tables(
        &self,
        groups: &[(usize, Vec<(usize, f32)>)],
        experts: &[Expert<CudaWeight>],
    ) -> Option<AddressTables> {
        let most = groups.iter().map(|(_, r)| r.len()).max()?;
        let tiles = groups.iter().map(|(_, r)| row_tiles(r.len())).sum();
        // The first expert's dtype stands for all: `address_tables` refuses a mix.
        let fp8 = experts[groups[0].0].gate.is_fp8();
        if !self.grouped_in_place_fits(fp8, most, tiles) {
            return None;
        }
        self.address_tables(groups.iter().map(|(e, _)| &experts[*e]))
    }

    /// Whether a MoE layer's routed experts run as in-place grouped launches
    /// (`fp8_grouped_tc`, `bf16_grouped_tc`) when no expert has more than `most` rows and the
    /// grid needs `tiles` rows. fp8 experts: at any rows, since the other way dequantises each
    /// expert's weights to a bf16 copy and runs a cuBLAS product per expert, some 1,500
    /// launches a layer of 256 experts; bf16 experts: up to [`Cuda::in_place_rows`] rows, past
    /// which cuBLAS's grouped products (three launches too) take them. Neither choice is timed
    /// yet on a GPU (issue 5's GPU run).
    fn grouped_in_place_fits(&self, fp8: bool, most: usize, tiles: usize) -> bool {
        tiles <= launch::MAX_GRID_ROWS as usize && (fp8 || most <= self.in_place_limit())
    }

    /// The gate, up and down weights of `experts` on this lane as device addresses, a table a
    /// weight and an entry an expert, with their row scales' tables when the weights are fp8:
    /// `None` unless every one is fp8 or every one bf16 (and there is one expert at least).
    fn address_tables<'e>(
        &self,
        experts: impl Iterator<Item = &'e Expert<CudaWeight>>,
    ) -> Option<AddressTables> {
        let mut weights: [Vec<u64>; 3] = Default::default();
        let mut scales: [Vec<u64>; 3] = Default::default();
        let mut fp8 = None;
        for ex in experts {
            let (w, s) = self.in_place_addresses(ex)?;
            if *fp8.get_or_insert(s.is_some()) != s.is_some() {
                return None; // fp8 and bf16 experts mixed
            }
            weights.iter_mut().zip(w).for_each(|(t, a)| t.push(a));
            if let Some(s) = s {
                scales.iter_mut().zip(s).for_each(|(t, a)| t.push(a));
            }
        }
        Some((weights, fp8?.then_some(scales)))
    }

    /// An expert's gate, up and down weights on this lane as device addresses for the in-place
    /// grouped kernels, when all three are fp8 (codes, then their row scales) or all three bf16
    /// (values, no scales).
    fn in_place_addresses(&self, ex: &Expert<CudaWeight>) -> Option<([u64; 3], Option<[u64; 3]>)> {
        use cudarc::driver::DevicePtr;
        let address = |w: &CudaWeight| {
            Some(match InPlaceData::of(self.weight(w))? {
                InPlaceData::Fp8 { codes, row_scales } => (
                    codes.device_ptr(&self.stream).0,
                    Some(row_scales.device_ptr(&self.stream).0),
                ),
                InPlaceData::Bf16(values) => (values.device_ptr(&self.stream).0, None),
            })
        };
        let [(g, gs), (u, us), (d, ds)] =
            [address(&ex.gate)?, address(&ex.up)?, address(&ex.down)?];
        match (gs, us, ds) {
            (Some(gs), Some(us), Some(ds)) => Some(([g, u, d], Some([gs, us, ds]))),
            (None, None, None) => Some(([g, u, d], None)),
            _ => None,
        }
    }

    /// The gate, up and down weights of `experts` on this lane, then (fp8) their row scales,
    /// as device addresses in one table (an entry an expert each), followed by `extra`; the
    /// experts' width, and whether they are fp8, when the experts are all fp8 or all bf16 with
    /// gate and up `[inter, hidden]` and down `[hidden, inter]`: what `fp8_grouped_tc` or
    /// `bf16_grouped_tc` reads for a layer routed on the device. A layer's table is copied once
    /// and kept ([`Tables`]).
    fn expert_tables<'e>(
        &self,
        experts: impl Iterator<Item = &'e Expert<CudaWeight>> + Clone,
        hidden: usize,
        extra: &[u64],
    ) -> Option<(Arc<CudaSlice<u64>>, usize, bool)> {
        let inter = experts.clone().next()?.gate.rows;
        if inter == 0 || hidden == 0 {
            return None;
        }
        let shaped = |w: &CudaWeight, r: usize, c: usize| w.rows == r && w.cols == c;
        let shapes_agree = experts.clone().all(|ex| {
            shaped(&ex.gate, inter, hidden)
                && shaped(&ex.up, inter, hidden)
                && shaped(&ex.down, hidden, inter)
        });
        if !shapes_agree {
            return None;
        }
        let (weights, scales) = self.address_tables(experts)?;
        let fp8 = scales.is_some();
        let table: Vec<u64> = weights
            .into_iter()
            .chain(scales.into_iter().flatten())
            .flatten()
            .chain(extra.iter().copied())
            .collect();
        let got = self
            .tables
            .get(&table, &self.uploads, |v| self.try_upload(v));
        Some((ok(got, "copying to the device"), inter, fp8))
    }

    /// The routed experts' outputs before their weights (`[pairs, hidden]`, a row a pair in
    /// expert order) when `lists` has the in-place grouped kernels' tables (see
    /// [`Cuda::expert_lists`]): three `fp8_grouped_tc` or `bf16_grouped_tc` launches, each
    /// reading every active expert's weight in place, with SiLU-and-mul between them. `None`
    /// otherwise, having launched nothing.
    fn grouped_in_place(
        &self,
        x: &CudaTensor,
        groups: &[(usize, Vec<(usize, f32)>)],
        lists: &ExpertLists,
        hidden: usize,
        inter: usize,
    ) -> Option<CudaSlice<f32>> {
        let in_place = lists.in_place.as_ref()?;
        let xp = self.gather_indexed(&x.buf, hidden, &lists.view(lists.rows));
        let tables = GroupedTables {
            offsets: lists.view(in_place.offsets),
            tile_offsets: lists.view(in_place.tile_offsets),
            weights: in_place.weights.map(|part| lists.view(part)),
            scales: in_place
                .scales
                .map(|parts| parts.map(|part| lists.view(part))),
            groups: groups.len(),
            tiles: in_place.tiles,
        };
        Some(self.expert_products_in_place(&xp, &tables, hidden, inter))
    }

    /// The routed experts' outputs before their weights (`[pairs, hidden]`) for `xp`, the
    /// pairs' rows in expert order (`[pairs, hidden]`), grouped as `tables` says: three
    /// `fp8_grouped_tc` launches (fp8 experts) or `bf16_grouped_tc` launches (bf16), each
    /// reading every group's weight in place, with SiLU-and-mul between them.
    fn expert_products_in_place(
        &self,
        xp: &CudaTensor,
        tables: &GroupedTables<'_>,
        hidden: usize,
        inter: usize,
    ) -> CudaSlice<f32> {
        use std::sync::atomic::Ordering::Relaxed;
        let p = xp.rows;
        let product = |y: &mut CudaSlice<f32>, x: &CudaSlice<f32>, w: usize, n: usize, k: usize| {
            let (ni, ki) = (n as i32, k as i32);
            let scale_cols = k.div_ceil(launch::FP8_LINEAR_K as usize) as i32;
            let groups = tables.groups as i32;
            let config = LaunchConfig {
                grid_dim: (
                    n.div_ceil(launch::FP8_LINEAR_COLS as usize) as u32,
                    tables.tiles as u32,
                    1,
                ),
                block_dim: (launch::FP8_LINEAR_WARPS * 32, 1, 1),
                shared_mem_bytes: 0,
            };
            let weights = &tables.weights[w];
            match &tables.scales {
                Some(scales) => {
                    let mut b = self.stream.launch_builder(&self.k.fp8_grouped);
                    b.arg(y)
                        .arg(x)
                        .arg(weights)
                        .arg(&scales[w])
                        .arg(&tables.offsets)
                        .arg(&tables.tile_offsets)
                        .arg(&groups)
                        .arg(&ni)
                        .arg(&ki)
                        .arg(&scale_cols);
                    // SAFETY: x holds p rows of k and y p rows of n; group g's rows are
                    // offsets[g]..offsets[g + 1] and its tiles tile_offsets[g]..[g + 1] (those
                    // rows' tiles, `groups` + 1 entries each), its weight n × k codes and
                    // n × scale_cols scales at the addresses of the tables' entry g, which
                    // outlive the launch (the experts').
                    ok(unsafe { b.launch(config) }, "fp8_grouped_tc");
                    self.in_place_launches[FP8].fetch_add(1, Relaxed);
                }
                None => {
                    let mut b = self.stream.launch_builder(&self.k.bf16_grouped);
                    b.arg(y)
                        .arg(x)
                        .arg(weights)
                        .arg(&tables.offsets)
                        .arg(&tables.tile_offsets)
                        .arg(&groups)
                        .arg(&ni)
                        .arg(&ki);
                    // SAFETY: as above, with n × k bf16 values at entry g's address.
                    ok(unsafe { b.launch(config) }, "bf16_grouped_tc");
                    self.in_place_launches[BF16].fetch_add(1, Relaxed);
                    self.bf16_grouped_launches.fetch_add(1, Relaxed);
                }
            }
        };
        // SAFETY (all three): the grouped products write every row of their outputs that the
        // groups cover (all p rows, but for an expert shard's, whose rows past its own pairs
        // are never written and never combined: SiLU-and-mul reads them, whatever they hold,
        // and combine_rows skips them), and SiLU-and-mul writes gate in place.
        let (mut gate, mut up, mut y) = unsafe {
            (
                ok(self.stream.alloc::<f32>(p * inter), "allocating"),
                ok(self.stream.alloc::<f32>(p * inter), "allocating"),
                ok(self.stream.alloc::<f32>(p * hidden), "allocating"),
            )
        };
        product(&mut gate, &xp.buf, 0, inter, hidden);
        product(&mut up, &xp.buf, 1, inter, hidden);
        let len = (p * inter) as i64;
        let mut b = self.stream.launch_builder(&self.k.silu_mul);
        b.arg(&mut gate).arg(&up).arg(&len);
        // SAFETY: gate and up each hold p·inter values.
        ok(
            unsafe { b.launch(Self::flat_config(p * inter)) },
            "silu_mul",
        );
        product(&mut y, &gate, 2, hidden, inter);
        y
    }

    /// The indexer's scores and top-k on the device for the query rows of `seqs` (sequence `i`'s
    /// key `s` is row `seqs[i].table.row(s)` of `keys`), one scores launch and one top-k launch
    /// for the whole batch (a chunk of rows at a time when their scores would pass
    /// `SCORES_PER_LAUNCH`): each row reads its own sequence's block table. The selections come
    /// back to the host, each row's ascending (as `topk_rows` writes them), a list a sequence. A
    /// row with at most `k` visible keys keeps them all, answered here without a launch.
    ///
    /// With `keep` (a store's keys, `k` > 0), the picks stay on the device instead, as the
    /// pool rows that hold them (`picks_to_pool_rows`), every row of the batch's from the
    /// launches (rows with at most `k` keys too): [`Picked::Kept`], or `None` for a batch with
    /// no rows.
    #[allow(clippy::too_many_arguments)]
    fn indexer_topk(
        &self,
        q: &CudaTensor,
        w: &CudaTensor,
        keys: IndexerKeys<'_>,
        seqs: &[IndexerSeq<'_>],
        k: usize,
        scale: f32,
        keep: bool,
    ) -> Option<Picked> {
        assert!(
            !keep || (k > 0 && matches!(keys, IndexerKeys::Store(_))),
            "indexer: picks are kept for a store's keys, k > 0"
        );
        let (dim, key_rows) = match keys {
            IndexerKeys::Rows(t) => (t.cols, t.rows),
            IndexerKeys::Store(store) => (store.cols(), store.rows()),
        };
        let heads = w.cols;
        assert_eq!(q.cols, heads * dim, "indexer: q is not [rows, heads·dim]");
        assert_eq!(w.rows, q.rows, "indexer: one weight row a query row");
        // Each row's answer: every visible key when it has at most k (or none when k is 0),
        // else what the launches below pick.
        let mut selected: Vec<Vec<Vec<u32>>> = seqs
            .iter()
            .map(|seq| {
                seq.positions
                    .iter()
                    .map(|&p| match k {
                        0 => Vec::new(),
                        _ if p < k => (0..=p as u32).collect(),
                        _ => Vec::new(),
                    })
                    .collect()
            })
            .collect();
        // The batch rows the launches cover, each row's visible keys (0: answered above) and
        // where its sequence's block table starts in the uploaded tables.
        let Some(lo) = seqs
            .iter()
            .filter(|s| !s.positions.is_empty())
            .map(|s| s.first)
            .min()
        else {
            return (!keep).then_some(Picked::Host(selected));
        };
        let hi = seqs
            .iter()
            .map(|s| s.first + s.positions.len())
            .max()
            .unwrap_or(lo);
        assert!(
            hi <= q.rows,
            "indexer: rows {lo}..{hi} of a batch of {}",
            q.rows
        );
        let block_size = seqs[0].table.block_size();
        let mut visible = vec![0usize; hi - lo];
        let mut row_tables = vec![0usize; hi - lo];
        let mut owner = vec![None; hi - lo];
        let mut tables: Vec<u32> = Vec::new();
        for (i, seq) in seqs.iter().enumerate() {
            let Some(last) = seq.positions.iter().max() else {
                continue;
            };
            assert!(
                *last < seq.table.tokens(),
                "indexer: position {last} beyond the sequence's {} keys",
                seq.table.tokens()
            );
            assert_eq!(
                seq.table.block_size(),
                block_size,
                "indexer: one block size for a store"
            );
            let used = &seq.table.blocks()[..(last + 1).div_ceil(block_size)];
            // The kernels read whole blocks' rows: each must lie in the keys.
            assert!(
                used.iter()
                    .all(|&b| (b as usize + 1) * block_size <= key_rows),
                "indexer: a block beyond the keys' {key_rows} rows"
            );
            let table_at = tables.len();
            tables.extend_from_slice(used);
            for (j, &p) in seq.positions.iter().enumerate() {
                let r = seq.first + j - lo;
                assert!(
                    owner[r].is_none(),
                    "indexer: batch row {} in two sequences",
                    r + lo
                );
                owner[r] = Some((i, j));
                row_tables[r] = table_at;
                if k > 0 && (keep || p >= k) {
                    visible[r] = p + 1;
                }
            }
        }
        let n_keys = visible.iter().copied().max().unwrap_or(0);
        if n_keys == 0 {
            return (!keep).then_some(Picked::Host(selected));
        }
        // Kept: every row's picks, written by the top-k launches (a row no sequence names gets
        // none: -1s).
        let mut kept = keep.then(|| {
            // SAFETY: the chunks below cover every row, and top-k writes all k of each.
            ok(
                unsafe { self.stream.alloc::<i32>((hi - lo) * k) },
                "allocating",
            )
        });

        let on = self.indexer_scores_on(keys);
        let tensor_cores = on != IndexerScores::Float32;
        let k_ = &self.k;
        let pick = |simt, tc| if tensor_cores { tc } else { simt };
        let function = match keys {
            // A tensor's rows are a store's with one block of all its rows.
            IndexerKeys::Rows(_) if tensor_cores => &k_.indexer_scores_tc_store,
            IndexerKeys::Rows(_) => &k_.indexer_scores,
            IndexerKeys::Store(CudaStore::F32(_)) => {
                pick(&k_.indexer_scores_store, &k_.indexer_scores_tc_store)
            }
            IndexerKeys::Store(CudaStore::Bf16 { .. }) => pick(
                &k_.indexer_scores_store_bf16,
                &k_.indexer_scores_tc_store_bf16,
            ),
            IndexerKeys::Store(CudaStore::Fp8 { .. }) => pick(
                &k_.indexer_scores_store_fp8,
                &k_.indexer_scores_tc_store_fp8,
            ),
        };
        // The float32 kernels take the row's q and weights in shared memory, a key a thread;
        // the tensor-core ones tiles of 64 keys too, `tiles` of them a block.
        let (smem, threads, keys_per_tile) = match on {
            IndexerScores::Float32 => (
                launch::indexer_f32_smem_bytes(heads as u32, dim as u32),
                launch::INDEXER_F32_KEYS,
                launch::INDEXER_F32_KEYS,
            ),
            IndexerScores::TensorCores => (
                launch::indexer_tc_smem_bytes(heads as u32, dim as u32),
                launch::INDEXER_TC_WARPS * 32,
                launch::INDEXER_TC_KEYS,
            ),
            IndexerScores::Fp8TensorCores => (
                launch::indexer_fp8_tc_smem_bytes(heads as u32, dim as u32),
                launch::INDEXER_TC_WARPS * 32,
                launch::INDEXER_TC_KEYS,
            ),
        };
        if smem > 48 * 1024 {
            ok(
                function.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                ),
                "raising the indexer's shared memory",
            );
        }
        // The same every layer of a step: copied once a step.
        let visible_d = self.shared_i32(visible.iter().copied());
        let (tables_d, row_tables_d) = (
            self.shared_i32(tables.iter().map(|&b| b as usize)),
            self.shared_i32(row_tables.into_iter()),
        );
        let block_size = match keys {
            IndexerKeys::Rows(_) => key_rows as i32,
            IndexerKeys::Store(_) => block_size as i32,
        };
        // Rows a chunk at a time, so their scores stay within SCORES_PER_LAUNCH floats.
        let per_chunk = (SCORES_PER_LAUNCH / n_keys).max(1);
        for first in (0..hi - lo).step_by(per_chunk) {
            let rows = per_chunk.min(hi - lo - first);
            if !keep && visible[first..first + rows].iter().all(|&v| v == 0) {
                continue;
            }
            // SAFETY: every variant of the launch below writes each row's n_keys scores (-inf
            // past the row's visible keys).
            let mut scores = unsafe { self.uninit(rows, n_keys) };
            // The tensor-core kernels take several tiles of keys a block while the launch still
            // fills the device: a row's query is then staged once for them all.
            let tiles = if tensor_cores {
                launch::indexer_tc_tiles(rows as u32, n_keys as u32, self.multiprocessors)
            } else {
                1
            };
            let cfg = LaunchConfig {
                grid_dim: (
                    rows as u32,
                    n_keys.div_ceil((keys_per_tile * tiles) as usize) as u32,
                    1,
                ),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: smem,
            };
            let (nk, h, dm) = (n_keys as i32, heads as i32, dim as i32);
            let q_rows = q.buf.slice((lo + first) * q.cols..);
            let w_rows = w.buf.slice((lo + first) * heads..);
            let visible_rows = visible_d.slice(first..first + rows);
            let tables_rows = row_tables_d.slice(first..first + rows);
            let mut b = self.stream.launch_builder(function);
            b.arg(&mut scores.buf).arg(&q_rows).arg(&w_rows);
            match keys {
                IndexerKeys::Rows(t) if !tensor_cores => b.arg(&t.buf),
                IndexerKeys::Rows(t) | IndexerKeys::Store(CudaStore::F32(t)) => b
                    .arg(&t.buf)
                    .arg(&*tables_d)
                    .arg(&tables_rows)
                    .arg(&block_size),
                IndexerKeys::Store(CudaStore::Bf16 { buf, .. }) => b
                    .arg(buf)
                    .arg(&*tables_d)
                    .arg(&tables_rows)
                    .arg(&block_size),
                IndexerKeys::Store(CudaStore::Fp8 { codes, scales, .. }) => b
                    .arg(codes)
                    .arg(scales)
                    .arg(&*tables_d)
                    .arg(&tables_rows)
                    .arg(&block_size),
            };
            b.arg(&visible_rows).arg(&nk).arg(&h).arg(&dm).arg(&scale);
            let tiles_arg = tiles as i32;
            if tensor_cores {
                b.arg(&tiles_arg);
            }
            // The fp8 kernels round the queries as the pool rounds its keys.
            let ue8m0 = match keys {
                IndexerKeys::Store(CudaStore::Fp8 { ue8m0, .. }) => Some(i32::from(*ue8m0)),
                _ => None,
            };
            if let Some(ue8m0) = &ue8m0 {
                b.arg(ue8m0);
            }
            // SAFETY: scores is [rows, n_keys]; q and w hold rows rows of heads·dim and heads
            // from `lo + first`; a row with visible keys reads only the blocks of its own table
            // that hold them (uploaded above, each checked to lie in the keys), and a tensor's
            // keys are one block of all its rows; heads ≤ INDEXER_STORE_MAX_HEADS for the
            // float32 store kernels (indexer_select_paged), dim even for the bf16 tensor-core
            // ones and within indexer_fp8_tc_fits (≤ 128, a multiple of 4: whole code words
            // from 4-byte aligned rows) for the fp8 one (indexer_scores_on); key blocks ≤ 65535
            // (the grid's y limit) up to 8M keys (4M on the tensor cores).
            ok(unsafe { b.launch(cfg) }, "indexer_scores");
            self.indexer_launches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if tensor_cores {
                self.tensor_core_launches
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }

            let (kk, stride) = (k as i32, n_keys as i64);
            // A block a row, unless so few rows would leave multiprocessors idle: then each
            // row's top k of its parts' top k.
            let parts = match self.topk_parts.load(std::sync::atomic::Ordering::Relaxed) {
                0 => launch::topk_parts(rows as u32, n_keys as u32, k as u32, self.multiprocessors),
                n => n,
            };
            let split = launch::topk_split(n_keys as u32, k as u32, parts);
            let blocks = |parts: u32| LaunchConfig {
                grid_dim: (rows as u32, parts, 1),
                block_dim: (launch::TOPK_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let topk = |chosen: &mut CudaViewMut<'_, i32>| {
                let Some((parts, part_len)) = split else {
                    let mut b = self.stream.launch_builder(&self.k.topk_rows);
                    b.arg(chosen)
                        .arg(&scores.buf)
                        .arg(&visible_rows)
                        .arg(&kk)
                        .arg(&stride);
                    // SAFETY: chosen is [rows, k]; each row's n_valid ≤ n_keys, the scores'
                    // row stride.
                    ok(unsafe { b.launch(blocks(1)) }, "topk_rows");
                    return;
                };
                let slots = rows * parts as usize * k;
                // SAFETY (both): topk_parts_f32 writes all k slots of every part of every row
                // (a part past a row's scores, -1s).
                let mut cand_idx = ok(unsafe { self.stream.alloc::<i32>(slots) }, "allocating");
                let mut cand_scores = ok(unsafe { self.stream.alloc::<f32>(slots) }, "allocating");
                let (part_len, parts_) = (part_len as i32, parts as i32);
                let mut b = self.stream.launch_builder(&self.k.topk_parts);
                b.arg(&mut cand_idx)
                    .arg(&mut cand_scores)
                    .arg(&scores.buf)
                    .arg(&visible_rows)
                    .arg(&kk)
                    .arg(&stride)
                    .arg(&part_len);
                // SAFETY: the candidates are [rows, parts · k]; each row's n_valid ≤ n_keys
                // (the scores' row stride) ≤ parts · part_len, and part_len ≥ k
                // (launch::topk_split).
                ok(unsafe { b.launch(blocks(parts)) }, "topk_parts");
                let mut b = self.stream.launch_builder(&self.k.topk_merge);
                b.arg(chosen)
                    .arg(&cand_idx)
                    .arg(&cand_scores)
                    .arg(&visible_rows)
                    .arg(&kk)
                    .arg(&part_len)
                    .arg(&parts_);
                // SAFETY: chosen is [rows, k]; the candidates as written above.
                ok(unsafe { b.launch(blocks(1)) }, "topk_merge");
                self.split_topk_launches
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            };
            if let Some(kept) = &mut kept {
                topk(&mut kept.slice_mut(first * k..(first + rows) * k));
                continue;
            }
            let mut chosen = ok(self.stream.alloc_zeros::<i32>(rows * k), "allocating");
            topk(&mut chosen.as_view_mut());
            let chosen = ok(self.stream.clone_dtoh(&chosen), "copying to the host");
            self.host_reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Each row's picks come in ascending order (topk_rows writes them so): no sort here.
            for (r, row) in (first..first + rows).zip(chosen.chunks_exact(k)) {
                if let (Some((i, j)), true) = (owner[r], visible[r] > 0) {
                    let keep = &mut selected[i][j];
                    keep.extend(row.iter().filter(|&&s| s >= 0).map(|&s| s as u32));
                    debug_assert!(keep.is_sorted(), "topk_rows: picks out of order");
                }
            }
        }
        let Some(mut kept) = kept else {
            return Some(Picked::Host(selected));
        };
        // Each pick as the pool row that holds it, through its row's block table.
        let n = kept.len();
        let (block_size, width, n_i) = (block_size, k as i32, n as i64);
        let mut b = self.stream.launch_builder(&self.k.picks_to_pool_rows);
        b.arg(&mut kept)
            .arg(&*tables_d)
            .arg(&*row_tables_d)
            .arg(&block_size)
            .arg(&width)
            .arg(&n_i);
        // SAFETY: kept is [hi - lo, k], and row_tables has hi - lo entries; every pick of a row
        // is a key it scored (below its visible count), so its block is one of its table's
        // uploaded blocks.
        ok(
            unsafe { b.launch(Self::flat_config(n)) },
            "picks_to_pool_rows",
        );
        Some(Picked::Kept(KeptPicks {
            rows: kept,
            width: k,
            // An empty sequence's rows start anywhere: it has none to read.
            seqs: seqs
                .iter()
                .map(|s| (s.first.saturating_sub(lo), s.positions.len()))
                .collect(),
            pool_rows: key_rows,
            stream: self.stream.clone(),
        }))
    }

    /// Row-major `C_g = B_g · A_gᵀ` for every group `g` of `n.len()`: `A_g` a weight `[m, k]`
    /// at address `pointers[g]`, `B_g` its `n[g]` input rows of `k` at `pointers[G + g]`, `C_g`
    /// `n[g]` rows of `m` at `pointers[2G + g]` (G groups), all of `dtype` and summed in
    /// float32 (`cublasGemmGroupedBatchedEx`, one product a group). cuBLAS reads the pointer
    /// arrays from device memory; the sizes, leading dimensions and scalars from the host,
    /// during the call.
    ///
    /// # Safety
    /// Every address must hold its matrix, on this lane's device, until the products are done.
    unsafe fn grouped_gemm(
        &self,
        dtype: cudarc::cublas::sys::cudaDataType,
        pointers: &CudaView<'_, u64>,
        m: usize,
        k: usize,
        n: &[i32],
    ) -> std::result::Result<(), cudarc::cublas::result::CublasError> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmGroupedBatchedEx};
        use cudarc::driver::DevicePtr;
        use std::ffi::c_void;
        self.bind();
        let groups = n.len();
        assert_eq!(
            pointers.len(),
            3 * groups,
            "grouped_gemm: 3 addresses a group"
        );
        let (base, _read) = pointers.device_ptr(&self.stream);
        let array = |i: u64| base + i * (groups * std::mem::size_of::<u64>()) as u64;
        let (m, k) = (m as i32, k as i32);
        let transa = vec![CUBLAS_OP_T; groups];
        let transb = vec![CUBLAS_OP_N; groups];
        let (ms, ks, ldc) = (vec![m; groups], vec![k; groups], vec![m; groups]);
        let (alpha, beta, size) = (vec![1f32; groups], vec![0f32; groups], vec![1i32; groups]);
        // SAFETY: the caller's for the matrices; every array above has `groups` entries, and
        // the pointers live until their free, ordered after the products on this stream.
        unsafe {
            cublasGemmGroupedBatchedEx(
                *self.blas.handle.handle(),
                transa.as_ptr(),
                transb.as_ptr(),
                ms.as_ptr(),
                n.as_ptr(),
                ks.as_ptr(),
                alpha.as_ptr().cast(),
                array(0) as *const *const c_void,
                dtype,
                ks.as_ptr(),
                array(1) as *const *const c_void,
                dtype,
                ks.as_ptr(),
                beta.as_ptr().cast(),
                array(2) as *const *mut c_void,
                dtype,
                ldc.as_ptr(),
                groups as i32,
                size.as_ptr(),
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
            )
        }
        .result()
    }

    /// Stage 2 of [`Backend::mla_attention`] for the `offsets.len() - 1` rows of the batch from
    /// `first_row`, all reading `cached`: row `first_row + i` attends to its rows
    /// `keys[offsets[i]..offsets[i + 1]]`. One launch.
    #[allow(clippy::too_many_arguments)]
    fn latent_attention(
        &self,
        q_lat: &CudaTensor,
        q: &CudaTensor,
        cached: CachedRows<'_, CudaTensor, CudaStore>,
        first_row: usize,
        keys: Keys<'_>,
        offsets: &[usize],
        d: MlaDims,
        scale: f32,
        ctx: &mut CudaTensor,
    ) {
        let rows = offsets.len() - 1;
        let listed = match &keys {
            Keys::Dense(list) | Keys::Selected(list) => list.len(),
            Keys::Kept { rows, .. } => rows.len(),
        };
        if rows == 0 || listed == 0 {
            return; // contexts stay zero, as the CPU's for rows with no key
        }
        // A key past the cache would read beyond its buffers on the device (the CPU backend's
        // slices panic instead): checked here, on the host, where the keys are, or, for kept
        // picks, against the rows they were picked in.
        let cache_rows = match cached {
            CachedRows::Tensors { latent, k_pe } => latent.rows.min(k_pe.rows),
            CachedRows::Stores { latent, k_pe } => latent.rows().min(k_pe.rows()),
        };
        let fits = match &keys {
            Keys::Dense(list) | Keys::Selected(list) => {
                list.iter().all(|&k| (k as usize) < cache_rows)
            }
            Keys::Kept { below, .. } => *below <= cache_rows,
        };
        assert!(
            fits,
            "mla_attention: a key beyond the {cache_rows} cached rows it reads"
        );
        let width = d.heads * d.latent;
        // The offsets are the same every layer of a step, and so are dense rows' keys; the
        // indexer's picks are not, and are copied without being kept, unless they are on the
        // device already.
        let copied;
        let keys_d = match keys {
            Keys::Dense(list) => {
                copied = self.shared(list);
                copied.as_view()
            }
            Keys::Selected(list) => {
                copied = Arc::new(self.upload_slice(list));
                copied.as_view()
            }
            Keys::Kept { rows, .. } => rows,
        };
        let offsets_d = self.shared_i32(offsets.iter().copied());
        let q_lat_rows = q_lat.buf.slice(first_row * width..);
        let q_pe = q.buf.slice(first_row * q.cols + d.nope..);
        let mut ctx_rows = ctx.buf.slice_mut(first_row * width..);
        let (heads, latent, rope) = (d.heads as i32, d.latent as i32, d.rope as i32);
        let (q_pe_row, q_pe_head) = (q.cols as i32, (d.nope + d.rope) as i32);
        // Both kernels take a row and a block's heads a block, with the same parameters: the
        // float32 one 16 heads, the tensor-core one 16 a group.
        let tensor_cores = self.tensor_cores.load(std::sync::atomic::Ordering::Relaxed)
            && launch::mla_tc_fits(d.latent as u32, d.rope as u32);
        let (threads, smem, block_heads) = if tensor_cores {
            let groups = self.attention_groups(d, rows);
            (
                groups * launch::MLA_TC_WARPS * 32,
                launch::mla_tc_smem_bytes(d.latent as u32, d.rope as u32, groups),
                groups * launch::MLA_TC_HEADS,
            )
        } else {
            (
                launch::MLA_F32_THREADS,
                launch::mla_f32_smem_bytes(d.latent as u32, d.rope as u32),
                launch::MLA_F32_HEADS,
            )
        };
        let head_blocks = d.heads.div_ceil(block_heads as usize) as u32;
        // Split keys (flash decoding) when few rows would leave multiprocessors idle: each
        // split's context goes to `partial`, its log-sum-exp to `lse`, and a second launch
        // weighs them into ctx.
        let longest = offsets.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
        let longest = u32::try_from(longest).unwrap_or(u32::MAX);
        let split_keys = match self.key_splits.load(std::sync::atomic::Ordering::Relaxed) {
            0 => launch::mla_split_keys(
                (rows as u32).saturating_mul(head_blocks),
                longest,
                self.multiprocessors,
            ),
            1 => 0,
            n => longest.div_ceil(n).next_multiple_of(launch::MLA_F32_TILE),
        };
        let splits = if split_keys > 0 {
            longest.div_ceil(split_keys)
        } else {
            1
        };
        let parts = splits as usize * rows * d.heads;
        // SAFETY (both): every split of every row and head writes its context and
        // log-sum-exp, a split with no keys zeros and -inf.
        let mut partial = (splits > 1).then(|| unsafe { self.uninit(parts, d.latent) });
        let mut lse =
            (splits > 1).then(|| ok(unsafe { self.stream.alloc::<f32>(parts) }, "allocating"));
        let split_keys = if splits > 1 { split_keys as i32 } else { 0 };
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, head_blocks, splits),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem,
        };
        // The cached rows where they are, in their dtype, and the kernel that reads them.
        enum Rows<'r> {
            F32(&'r CudaSlice<f32>, &'r CudaSlice<f32>),
            Bf16(&'r CudaSlice<u16>, &'r CudaSlice<u16>),
            Fp8(&'r CudaSlice<u8>, &'r CudaSlice<f32>, &'r CudaSlice<u16>),
        }
        let k = &self.k;
        let pick = |simt, tc| if tensor_cores { tc } else { simt };
        let (kernel, rows_d) = match cached {
            CachedRows::Tensors { latent, k_pe }
            | CachedRows::Stores {
                latent: CudaStore::F32(latent),
                k_pe: CudaStore::F32(k_pe),
            } => (
                pick(&k.mla_latent_attention, &k.mla_latent_attention_tc),
                Rows::F32(&latent.buf, &k_pe.buf),
            ),
            CachedRows::Stores {
                latent: CudaStore::Bf16 { buf: latent, .. },
                k_pe: CudaStore::Bf16 { buf: k_pe, .. },
            } => (
                pick(
                    &k.mla_latent_attention_bf16,
                    &k.mla_latent_attention_tc_bf16,
                ),
                Rows::Bf16(latent, k_pe),
            ),
            CachedRows::Stores {
                latent: CudaStore::Fp8 { codes, scales, .. },
                k_pe: CudaStore::Bf16 { buf: k_pe, .. },
            } => (
                pick(&k.mla_latent_attention_fp8, &k.mla_latent_attention_tc_fp8),
                Rows::Fp8(codes, scales, k_pe),
            ),
            CachedRows::Stores { latent, k_pe } => panic!(
                "mla_attention: latent rows in {latent:?} with RoPE keys in {k_pe:?}: a pool \
                 keeps both in the same dtype, or (fp8) its RoPE keys in bf16"
            ),
        };
        if cfg.shared_mem_bytes > 48 * 1024 {
            ok(
                kernel.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    cfg.shared_mem_bytes as i32,
                ),
                "raising the attention's shared memory",
            );
        }
        let mut b = self.stream.launch_builder(kernel);
        match &mut partial {
            Some(partial) => b.arg(&mut partial.buf),
            None => b.arg(&mut ctx_rows),
        };
        b.arg(&q_lat_rows).arg(&q_pe);
        match rows_d {
            Rows::F32(latent, k_pe) => b.arg(latent).arg(k_pe),
            Rows::Bf16(latent, k_pe) => b.arg(latent).arg(k_pe),
            Rows::Fp8(codes, scales, k_pe) => b.arg(codes).arg(scales).arg(k_pe),
        };
        b.arg(&keys_d)
            .arg(&*offsets_d)
            .arg(&heads)
            .arg(&latent)
            .arg(&rope)
            .arg(&q_pe_row)
            .arg(&q_pe_head)
            .arg(&scale);
        // No log-sum-exp without splits: a null pointer, which the kernels skip.
        let no_lse: u64 = 0;
        match &mut lse {
            Some(lse) => b.arg(lse),
            None => b.arg(&no_lse),
        };
        b.arg(&split_keys);
        // SAFETY: every key indexes a row of the sequence's latent and k_pe rows (checked
        // above), whose buffers the kernel reads in their dtype (an fp8 store's scales hold
        // ceil(cols / KV_FP8_BLOCK) per row, as scatter_rows_f32_to_fp8 writes them);
        // latent ≤ MLA_F32_MAX_LATENT (checked by mla_attention), and for the tensor cores both
        // widths even with the padded latent ≤ MLA_TC_MAX_LATENT (mla_tc_fits); rows ≤ the
        // grid's x limit; head groups ≤ its y limit (65535), splits ≤ MLA_MAX_SPLITS; with
        // splits, partial holds splits · rows · heads rows of latent and lse splits · rows ·
        // heads values (split_keys · splits covers the longest list); the shared memory the
        // launch asks for is allowed (raised above).
        ok(unsafe { b.launch(cfg) }, "mla_latent_attention");
        if tensor_cores {
            self.tensor_core_launches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if let (Some(partial), Some(lse)) = (&partial, &lse) {
            let (splits, heads) = (splits as i32, d.heads as i32);
            let mut b = self.stream.launch_builder(&self.k.mla_combine_splits);
            b.arg(&mut ctx_rows)
                .arg(&partial.buf)
                .arg(lse)
                .arg(&splits)
                .arg(&heads)
                .arg(&latent);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, d.heads as u32, 1),
                block_dim: (launch::MLA_COMBINE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: ctx_rows holds rows · heads · latent values from first_row; partial and
            // lse hold the splits' parts as the attention wrote them (above).
            ok(unsafe { b.launch(cfg) }, "mla_combine_splits");
            self.split_launches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Groups of 16 heads a block of the tensor-core attention over `rows` rows: as
    /// [`Cuda::attention_head_groups`] set, else [`launch::mla_tc_groups`] for this GPU; fewer
    /// while the block's shared memory would pass what this GPU allows ([`head_groups_within`]).
    fn attention_groups(&self, d: MlaDims, rows: usize) -> u32 {
        let forced = self.head_groups.load(std::sync::atomic::Ordering::Relaxed);
        let groups = if forced > 0 {
            forced
        } else {
            launch::mla_tc_groups(
                d.heads.try_into().unwrap_or(u32::MAX),
                rows.try_into().unwrap_or(u32::MAX),
                self.multiprocessors,
            )
        };
        head_groups_within(d, groups, self.smem_per_block)
    }

    /// Stage 1 of [`Backend::mla_attention`] for every row of the batch: `q_lat[r, h] =
    /// q_nope[r, h] · W_UK,h` (`W_UK,hᵀ` is `uk_t`'s rows `h·latent..`), one batch of products
    /// over the heads: read in place for an fp8 or bf16 weight and a decode step's rows, one
    /// strided-batched cuBLAS call otherwise.
    fn query_latent(&self, q: &CudaTensor, uk_t: &CudaWeight, d: MlaDims) -> CudaTensor {
        let n = q.rows;
        // SAFETY: the products below write every value (in place: every head's columns of
        // every row; cuBLAS: beta 0, so C is written, never read).
        let mut q_lat = unsafe { self.uninit(n, d.heads * d.latent) };
        if n == 0 {
            return q_lat;
        }
        if let Some(w) = self.in_place(uk_t, n) {
            // Head h: q's [n, nope] from column h·(nope + rope), times W_UK,h (uk_t's rows from
            // h·latent), into q_lat's columns from h·latent.
            let heads = InPlaceProducts {
                m: n,
                n: d.latent,
                k: d.nope,
                ldx: q.cols,
                ldy: d.heads * d.latent,
                batch: d.heads,
                batch_x: d.nope + d.rope,
                first_row: 0,
                batch_rows: d.latent,
                batch_y: d.latent,
            };
            self.products_in_place(&mut q_lat.buf, &q.buf, w, heads);
            return q_lat;
        }
        let uk_t = &self.operand(uk_t);
        let cfg = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: CUBLAS_OP_T,
                transb: CUBLAS_OP_N,
                m: d.latent as i32,
                n: n as i32,
                k: d.nope as i32,
                alpha: 1.0f32,
                lda: d.nope as i32,
                ldb: q.cols as i32,
                beta: 0.0f32,
                ldc: (d.heads * d.latent) as i32,
            },
            batch_size: d.heads as i32,
            stride_a: (d.latent * d.nope) as i64,
            stride_b: (d.nope + d.rope) as i64,
            stride_c: d.latent as i64,
        };
        // SAFETY: uk_t is [heads·latent, nope]; q holds n rows of heads·(nope + rope); q_lat is
        // [n, heads·latent].
        unsafe {
            self.product(
                cfg.gemm,
                Some((cfg.batch_size, cfg.stride_a, cfg.stride_b, cfg.stride_c)),
                uk_t,
                0,
                &q.buf.as_view(),
                n * q.cols,
                &mut q_lat.buf.as_view_mut(),
                "query into the latent space",
            )
        };
        q_lat
    }

    /// Stage 2 of [`Backend::mla_attention`]: `ctx[r, h]` of every row a sequence names, over
    /// its keys. Sequences that follow one another in the batch and read the same cached rows
    /// (a paged pool's, each through its own block table) share launches: a decode step's
    /// rows, one a sequence, are one launch. A launch's key lists (a dense prefill's grow with
    /// the square of its rows) stay within `KEYS_PER_LAUNCH`; rows between its sequences that
    /// none names get no keys, and their contexts stay zero. Sequences whose keys are picks the
    /// indexer kept ([`Selection::Kept`]) take launches of their own, whose key lists are the
    /// kept rows themselves (`width` a row, -1s skipped), while their rows follow one another
    /// in the batch and among the picks: a decode step's are one launch.
    fn attend(
        &self,
        q_lat: &CudaTensor,
        q: &CudaTensor,
        seqs: &[MlaSeq<'_, CudaTensor, CudaStore, KeptPicks>],
        d: MlaDims,
        scale: f32,
        ctx: &mut CudaTensor,
    ) {
        /// Rows `first ..` of the batch, all reading `cached`, with their keys so far, and
        /// whether the indexer chose any of them (such keys differ from layer to layer); or
        /// rows whose keys are kept picks, rows `from ..` of `picks`.
        struct Launch<'s> {
            cached: CachedRows<'s, CudaTensor, CudaStore>,
            first: usize,
            keys: Listed<'s>,
            offsets: Vec<usize>,
        }
        enum Listed<'s> {
            Host { keys: Vec<i32>, selected: bool },
            Kept { picks: &'s KeptPicks, from: usize },
        }
        impl Launch<'_> {
            fn end(&self) -> usize {
                self.first + self.offsets.len() - 1
            }
            fn rows(&self) -> usize {
                self.offsets.len() - 1
            }
        }
        let flush = |launch: Launch<'_>, ctx: &mut CudaTensor| {
            let Launch {
                cached,
                first,
                keys,
                offsets,
            } = launch;
            let keys = match &keys {
                Listed::Host {
                    keys,
                    selected: true,
                } => Keys::Selected(keys),
                Listed::Host { keys, .. } => Keys::Dense(keys),
                Listed::Kept { picks, from } => {
                    self.kept_launches
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    Keys::Kept {
                        rows: picks.view(*from, offsets.len() - 1),
                        below: picks.pool_rows,
                    }
                }
            };
            self.latent_attention(q_lat, q, cached, first, keys, &offsets, d, scale, ctx);
        };
        let mut pending: Option<Launch<'_>> = None;
        for seq in seqs {
            if let Some(launch) =
                pending.take_if(|l| !same_cached_rows(l.cached, seq.cached) || seq.first < l.end())
            {
                flush(launch, ctx);
            }
            if let Some(Selection::Kept { picks, seq: at }) = seq.selection {
                assert!(
                    matches!(seq.cached, CachedRows::Stores { .. }) && seq.rows.is_some(),
                    "mla_attention: kept picks are rows of a pool read in place"
                );
                let n = seq.positions.len();
                if n == 0 {
                    continue; // no rows, no keys
                }
                let from = picks.row(at, 0);
                // One launch while the rows follow one another here and among the picks.
                let joins = |l: &Launch<'_>| match l.keys {
                    Listed::Kept { picks: p, from: f } => {
                        std::ptr::eq(p, picks)
                            && seq.first == l.end()
                            && from == f + l.rows()
                            && (l.rows() + n) * picks.width <= KEYS_PER_LAUNCH
                    }
                    Listed::Host { .. } => false,
                };
                if let Some(launch) = pending.take_if(|l| !joins(l)) {
                    flush(launch, ctx);
                }
                let launch = pending.get_or_insert_with(|| Launch {
                    cached: seq.cached,
                    first: seq.first,
                    keys: Listed::Kept { picks, from },
                    offsets: vec![0],
                });
                for _ in 0..n {
                    let next = launch.offsets[launch.rows()] + picks.width;
                    launch.offsets.push(next);
                }
                continue;
            }
            for i in 0..seq.positions.len() {
                let row = seq.first + i;
                // At most this many keys (a selection's keys past the position are dropped).
                let listed = seq.listed_keys(i);
                if let Some(launch) = pending.take_if(|l| match &l.keys {
                    Listed::Host { keys, .. } => {
                        l.offsets.len() > 1 && keys.len() + listed > KEYS_PER_LAUNCH
                    }
                    Listed::Kept { .. } => true,
                }) {
                    flush(launch, ctx);
                }
                let launch = pending.get_or_insert_with(|| Launch {
                    cached: seq.cached,
                    first: row,
                    keys: Listed::Host {
                        keys: Vec::new(),
                        selected: false,
                    },
                    offsets: vec![0],
                });
                let Listed::Host { keys, selected } = &mut launch.keys else {
                    unreachable!("a launch of kept picks was flushed above");
                };
                *selected |= seq.selection.is_some();
                // Rows in between that no sequence names: no keys.
                let before = keys.len();
                launch.offsets.resize(row - launch.first + 1, before);
                // Rows of the cached rows (the pool's own rows when it is read in place), as
                // the kernels take them.
                keys.extend(
                    seq.key_rows_iter(i)
                        .map(|r| i32::try_from(r).expect("a cache row fits in int32")),
                );
                launch.offsets.push(keys.len());
            }
        }
        if let Some(launch) = pending {
            flush(launch, ctx);
        }
    }

    /// Stage 3 of [`Backend::mla_attention`] for every row of the batch: `out[r, h] = ctx[r, h] ·
    /// W_UV,hᵀ` (`W_UV,h` is `kv_b`'s rows `h·(nope + v) + nope..`).
    fn context_out(&self, ctx: &CudaTensor, kv_b: &CudaWeight, d: MlaDims, out: &mut CudaTensor) {
        let n = ctx.rows;
        let width = d.heads * d.v;
        if let Some(w) = self.in_place(kv_b, n) {
            // Head h: ctx's [n, latent] from column h·latent, times W_UV,hᵀ (kv_b's rows from
            // h·(nope+v) + nope), into out's columns from h·v.
            let heads = InPlaceProducts {
                m: n,
                n: d.v,
                k: d.latent,
                ldx: d.heads * d.latent,
                ldy: width,
                batch: d.heads,
                batch_x: d.latent,
                first_row: d.nope,
                batch_rows: d.nope + d.v,
                batch_y: d.v,
            };
            self.products_in_place(&mut out.buf, &ctx.buf, w, heads);
            return;
        }
        let kv_b = &self.operand(kv_b);
        let cfg = StridedBatchedConfig {
            gemm: GemmConfig {
                transa: CUBLAS_OP_T,
                transb: CUBLAS_OP_N,
                m: d.v as i32,
                n: n as i32,
                k: d.latent as i32,
                alpha: 1.0f32,
                lda: d.latent as i32,
                ldb: (d.heads * d.latent) as i32,
                beta: 0.0f32,
                ldc: width as i32,
            },
            batch_size: d.heads as i32,
            stride_a: ((d.nope + d.v) * d.latent) as i64,
            stride_b: d.latent as i64,
            stride_c: d.v as i64,
        };
        // SAFETY: kv_b is [heads·(nope+v), latent], W_UV,0 from element nope·latent; ctx is
        // [n, heads·latent]; out is [n, heads·v].
        unsafe {
            self.product(
                cfg.gemm,
                Some((cfg.batch_size, cfg.stride_a, cfg.stride_b, cfg.stride_c)),
                kv_b,
                d.nope * d.latent,
                &ctx.buf.as_view(),
                n * d.heads * d.latent,
                &mut out.buf.as_view_mut(),
                "context out of the latent space",
            )
        };
    }

    /// cuBLAS's column-major `C = op(A)·B`, strided-batched with `batch` = `(count, stride_a,
    /// stride_b, stride_c)`, where A is weight `w` from element `w_from` and B the first `b_len`
    /// values of `b`: `Sgemm` for a float32 weight; for bf16 bits, B rounded to bf16 and the
    /// product on the tensor cores.
    ///
    /// # Safety
    /// The buffers must hold the elements `cfg` and `batch` address.
    #[allow(clippy::too_many_arguments)]
    unsafe fn product(
        &self,
        cfg: GemmConfig<f32>,
        batch: Option<(i32, i64, i64, i64)>,
        w: &Operand<'_>,
        w_from: usize,
        b: &CudaView<'_, f32>,
        b_len: usize,
        c: &mut CudaViewMut<'_, f32>,
        what: &str,
    ) {
        let result = match w {
            Operand::F32(a) => {
                self.bind();
                let a = a.slice(w_from..);
                // SAFETY: the caller's.
                unsafe {
                    match batch {
                        None => self.blas.handle.gemm(cfg, &a, b, c),
                        Some((batch_size, stride_a, stride_b, stride_c)) => {
                            let cfg = StridedBatchedConfig {
                                gemm: cfg,
                                batch_size,
                                stride_a,
                                stride_b,
                                stride_c,
                            };
                            self.blas.handle.gemm_strided_batched(cfg, &a, b, c)
                        }
                    }
                }
            }
            bf16 => {
                let a = bf16.bits(w_from).expect("a bf16 operand");
                let bb = self.bf16_bits(b, b_len);
                // SAFETY: the caller's, with B rounded into bb (b_len values, as B's).
                unsafe { self.gemm_bf16(cfg, batch, &a, &bb.as_view(), c) }
            }
        };
        ok(result, &format!("cuBLAS product ({what})"));
    }
}

impl Backend for Cuda {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type Store = CudaStore;
    type Picks = KeptPicks;

    fn name(&self) -> String {
        let mut main = format!("cuda:{} ({})", self.ordinal, self.device_name);
        if self.dtype == Dtype::Bfloat16 {
            main.push_str(", bf16 weights");
        }
        if self.shards.is_empty() {
            return main;
        }
        let shards: Vec<String> = self.shards.iter().map(|s| s.ordinal.to_string()).collect();
        format!("{main}, routed experts on cuda:{}", shards.join(","))
    }

    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        // cuBLAS calls use the calling thread's current context.
        ok(
            self.stream.context().bind_to_thread(),
            "binding the context",
        );
        f()
    }

    fn device_memory_available(&self) -> Option<u64> {
        // What the memory pool keeps of freed allocations (keep_freed_memory) is free to it
        // but not to the driver's count: hand it back first.
        self.stream.synchronize().ok()?;
        if let Some(pool) = default_pool(self.stream.context()).ok()? {
            // SAFETY: trims only memory no allocation holds.
            unsafe { cudarc::driver::sys::cuMemPoolTrimTo(pool, 0) }
                .result()
                .ok()?;
        }
        let (free, _) = self.stream.context().mem_get_info().ok()?;
        // Less the room a product needs to dequantise the largest fp8 weight, and the most the
        // main lane's reused uploads keep (two element types).
        let scratch = self.fp8_scratch.load(std::sync::atomic::Ordering::Relaxed);
        Some(free.saturating_sub(scratch + 2 * uploads::BYTES) as u64)
    }

    fn upload(&self, matrix: Matrix) -> Result<CudaWeight> {
        let (rows, cols) = (matrix.rows, matrix.cols);
        let data = self.upload_copy(&HostWeight::new(&matrix, self.dtype), rows, cols)?;
        Ok(CudaWeight {
            rows,
            cols,
            copies: vec![(self.lane, data)],
        })
    }

    fn upload_expert(&self, matrix: Matrix, holders: &[usize]) -> Result<CudaWeight> {
        if self.shards.is_empty() || holders.is_empty() {
            return self.upload(matrix);
        }
        let (rows, cols) = (matrix.rows, matrix.cols);
        let data = HostWeight::new(&matrix, self.dtype);
        let copies = holders
            .iter()
            .map(|&s| {
                let shard = self.shards.get(s).ok_or_else(|| {
                    device_error(format!(
                        "expert shard {s} has no GPU: --device lists {}",
                        self.shards.len()
                    ))
                })?;
                Ok((shard.lane, shard.upload_copy(&data, rows, cols)?))
            })
            .collect::<Result<_>>()?;
        Ok(CudaWeight { rows, cols, copies })
    }

    fn tensor(&self, rows: usize, cols: usize, data: Vec<f32>) -> CudaTensor {
        assert_eq!(
            data.len(),
            rows * cols,
            "tensor data is not [{rows}, {cols}]"
        );
        CudaTensor {
            buf: self.upload_slice(&data),
            rows,
            cols,
        }
    }

    fn to_host(&self, x: &CudaTensor) -> Vec<f32> {
        let n = x.rows * x.cols;
        if n == 0 {
            return Vec::new();
        }
        self.read_back(&x.buf.slice(..n))
    }

    fn shape(&self, x: &CudaTensor) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn embed(&self, table: &CudaWeight, tokens: &[u32]) -> CudaTensor {
        let slots: Vec<usize> = tokens.iter().map(|&t| t as usize).collect();
        assert!(
            slots.iter().all(|&t| t < table.rows),
            "embed: token id beyond the table"
        );
        // (An fp8 table, which DeepSeek's checkpoints do not have, is dequantised whole.)
        let operand = self.operand(table);
        if let Operand::F32(buf) = operand {
            return self.gather(buf, table.cols, &slots);
        }
        let table_bits = operand.bits(0).expect("a bf16 operand");
        self.gather_bf16_bits(&table_bits, table.cols, &slots)
    }

    fn linear(&self, x: &CudaTensor, w: &CudaWeight) -> CudaTensor {
        assert_eq!(
            x.cols, w.cols,
            "linear: x has {} columns, w {}",
            x.cols, w.cols
        );
        let (m, n, k) = (x.rows, w.rows, w.cols);
        if k == 0 {
            return self.zeros(m, n); // empty sums
        }
        // SAFETY: the product below writes every value (cuBLAS: beta 0, so y is written, never
        // read); with no rows or columns there is none.
        let mut y = unsafe { self.uninit(m, n) };
        if m == 0 || n == 0 {
            return y;
        }
        if let Some(w) = self.in_place(w, m) {
            self.products_in_place(&mut y.buf, &x.buf, w, InPlaceProducts::one(m, n, k));
            return y;
        }
        // Row-major y = x·wᵀ is column-major yᵀ = w·xᵀ: w's storage read transposed.
        let cfg = GemmConfig {
            transa: CUBLAS_OP_T,
            transb: CUBLAS_OP_N,
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: 1.0f32,
            lda: k as i32,
            ldb: k as i32,
            beta: 0.0f32,
            ldc: n as i32,
        };
        // SAFETY: x is [m, k], w [n, k] (checked above), y [m, n].
        unsafe {
            self.product(
                cfg,
                None,
                &self.operand(w),
                0,
                &x.buf.as_view(),
                m * k,
                &mut y.buf.as_view_mut(),
                "linear",
            )
        };
        y
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaTensor, eps: f32) -> CudaTensor {
        // SAFETY: the launch below writes every row.
        let mut out = unsafe { self.uninit(x.rows, x.cols) };
        if x.rows > 0 {
            let c = x.cols as i32;
            let mut b = self.stream.launch_builder(&self.k.rms_norm);
            b.arg(&mut out.buf)
                .arg(&x.buf)
                .arg(&w.buf)
                .arg(&c)
                .arg(&eps);
            // SAFETY: out and x are [rows, cols]; w has cols values.
            ok(unsafe { b.launch(Self::row_config(x.rows)) }, "rms_norm");
        }
        out
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        bias: &CudaTensor,
        eps: f32,
    ) -> CudaTensor {
        // SAFETY: the launch below writes every row.
        let mut out = unsafe { self.uninit(x.rows, x.cols) };
        if x.rows > 0 {
            let c = x.cols as i32;
            let mut b = self.stream.launch_builder(&self.k.layer_norm);
            b.arg(&mut out.buf)
                .arg(&x.buf)
                .arg(&w.buf)
                .arg(&bias.buf)
                .arg(&c)
                .arg(&eps);
            // SAFETY: out and x are [rows, cols]; w and bias have cols values.
            ok(unsafe { b.launch(Self::row_config(x.rows)) }, "layer_norm");
        }
        out
    }

    fn add(&self, x: &mut CudaTensor, y: &CudaTensor) {
        assert_eq!((x.rows, x.cols), (y.rows, y.cols), "add: shapes differ");
        let n = x.rows * x.cols;
        if n == 0 {
            return;
        }
        let len = n as i64;
        let mut b = self.stream.launch_builder(&self.k.add);
        b.arg(&mut x.buf).arg(&y.buf).arg(&len);
        // SAFETY: both hold n elements.
        ok(unsafe { b.launch(Self::flat_config(n)) }, "add");
    }

    fn columns(&self, x: &CudaTensor, start: usize, len: usize) -> CudaTensor {
        assert!(start + len <= x.cols, "columns: beyond the row");
        // SAFETY: the launch below writes every row's len values.
        let mut out = unsafe { self.uninit(x.rows, len) };
        if x.rows > 0 && len > 0 {
            let (sc, st, ln) = (x.cols as i32, start as i32, len as i32);
            let mut b = self.stream.launch_builder(&self.k.copy_columns);
            b.arg(&mut out.buf).arg(&x.buf).arg(&sc).arg(&st).arg(&ln);
            // SAFETY: out is [rows, len]; start + len ≤ cols.
            ok(
                unsafe { b.launch(Self::row_config(x.rows)) },
                "copy_columns",
            );
        }
        out
    }

    fn rows(&self, x: &CudaTensor, start: usize, len: usize) -> CudaTensor {
        assert!(start + len <= x.rows, "rows: beyond the tensor");
        // SAFETY: the copy below writes every value.
        let mut out = unsafe { self.uninit(len, x.cols) };
        if len > 0 && x.cols > 0 {
            let src = x.buf.slice(start * x.cols..(start + len) * x.cols);
            ok(self.stream.memcpy_dtod(&src, &mut out.buf), "copying rows");
        }
        out
    }

    fn concat_rows(&self, parts: &[&CudaTensor]) -> CudaTensor {
        let cols = parts.first().map_or(0, |p| p.cols);
        let rows: usize = parts.iter().map(|p| p.rows).sum();
        assert!(
            parts.iter().all(|p| p.cols == cols),
            "concat_rows: column counts differ"
        );
        // SAFETY: the parts' copies below write every value (all have cols columns).
        let mut out = unsafe { self.uninit(rows, cols) };
        let mut at = 0;
        for p in parts {
            let n = p.rows * cols;
            if n > 0 {
                let mut dst = out.buf.slice_mut(at..at + n);
                ok(
                    self.stream.memcpy_dtod(&p.buf.slice(..n), &mut dst),
                    "copying rows",
                );
            }
            at += n;
        }
        out
    }

    /// One `gather_rows_f32` launch (the row list copied once and reused while it repeats, as a
    /// decode step's is).
    fn select_rows(&self, x: &CudaTensor, rows: &[usize]) -> CudaTensor {
        if rows.is_empty() {
            return self.zeros(0, x.cols);
        }
        assert!(
            rows.iter().all(|&r| r < x.rows),
            "select_rows: a row past the tensor's {}",
            x.rows
        );
        let idx = self.shared_i32(rows.iter().copied());
        self.gather_indexed(&x.buf, x.cols, &idx.as_view())
    }

    fn append_rows(&self, cache: &mut CudaTensor, rows: &CudaTensor) {
        assert_eq!(cache.cols, rows.cols, "append_rows: column counts differ");
        let (old, add) = (cache.rows * cache.cols, rows.rows * rows.cols);
        if add == 0 {
            return;
        }
        if old + add > cache.buf.len() {
            // Room for twice the rows, so a growing cache is copied O(log n) times.
            let capacity = ((old + add) * 2).max(1);
            let mut grown = ok(self.stream.alloc_zeros::<f32>(capacity), "allocating");
            if old > 0 {
                let mut dst = grown.slice_mut(..old);
                ok(
                    self.stream.memcpy_dtod(&cache.buf.slice(..old), &mut dst),
                    "copying rows",
                );
            }
            cache.buf = grown;
        }
        let mut dst = cache.buf.slice_mut(old..old + add);
        ok(
            self.stream.memcpy_dtod(&rows.buf.slice(..add), &mut dst),
            "copying rows",
        );
        cache.rows += rows.rows;
    }

    fn kv_store(&self, rows: usize, cols: usize, dtype: KvDtype) -> Result<CudaStore> {
        self.bind();
        // One element at least: a zero-length allocation is not a valid device pointer.
        let n = rows.saturating_mul(cols).max(1);
        let failed = |e: DriverError| {
            device_error(format!(
                "allocating a KV store of {rows} rows of {cols} {} values on {}: {e:?}",
                dtype.as_str(),
                self.name()
            ))
        };
        Ok(match dtype {
            KvDtype::Float32 => CudaStore::F32(CudaTensor {
                buf: self.stream.alloc_zeros::<f32>(n).map_err(failed)?,
                rows,
                cols,
            }),
            KvDtype::Bfloat16 => CudaStore::Bf16 {
                buf: self.stream.alloc_zeros::<u16>(n).map_err(failed)?,
                rows,
                cols,
            },
            KvDtype::Fp8 | KvDtype::Fp8Ue8m0 => CudaStore::Fp8 {
                codes: self.stream.alloc_zeros::<u8>(n).map_err(failed)?,
                scales: self
                    .stream
                    .alloc_zeros::<f32>((rows * cols.div_ceil(FP8_BLOCK)).max(1))
                    .map_err(failed)?,
                rows,
                cols,
                ue8m0: dtype == KvDtype::Fp8Ue8m0,
            },
        })
    }

    fn write_rows(&self, dst: &mut CudaStore, slots: &[usize], rows: &CudaTensor) {
        let (dst_rows, dst_cols) = match dst {
            CudaStore::F32(t) => (t.rows, t.cols),
            CudaStore::Bf16 { rows, cols, .. } | CudaStore::Fp8 { rows, cols, .. } => {
                (*rows, *cols)
            }
        };
        assert_eq!(dst_cols, rows.cols, "write_rows: column counts differ");
        assert_eq!(rows.rows, slots.len(), "write_rows: one slot per row");
        assert!(
            slots.iter().all(|&s| s < dst_rows),
            "write_rows: slot beyond the pool"
        );
        if slots.is_empty() {
            return;
        }
        // The same slots for every store of every layer in a step.
        let idx = self.shared_i32(slots.iter().copied());
        let c = dst_cols as i32;
        // The fp8 kernel last takes its scale format.
        let (mut b, name, ue8m0) = match dst {
            CudaStore::F32(t) => {
                let mut b = self.stream.launch_builder(&self.k.scatter_rows);
                b.arg(&mut t.buf);
                (b, "scatter_rows_f32", None)
            }
            CudaStore::Bf16 { buf, .. } => {
                let mut b = self.stream.launch_builder(&self.k.scatter_rows_bf16);
                b.arg(buf);
                (b, "scatter_rows_f32_to_bf16_bits", None)
            }
            CudaStore::Fp8 {
                codes,
                scales,
                ue8m0,
                ..
            } => {
                let mut b = self.stream.launch_builder(&self.k.scatter_rows_fp8);
                b.arg(codes).arg(scales);
                (b, "scatter_rows_f32_to_fp8", Some(i32::from(*ue8m0)))
            }
        };
        b.arg(&rows.buf).arg(&*idx).arg(&c);
        if let Some(ue8m0) = &ue8m0 {
            b.arg(ue8m0);
        }
        // SAFETY: every slot is a row of dst (checked above); rows has slots.len() rows of
        // dst's width (and the fp8 kernel its scale format).
        ok(unsafe { b.launch(Self::row_config(slots.len())) }, name);
    }

    fn gather_rows(&self, src: &CudaStore, slots: &[usize]) -> CudaTensor {
        assert!(
            slots.iter().all(|&s| s < src.rows()),
            "gather_rows: slot beyond the pool"
        );
        match src {
            CudaStore::F32(t) => self.gather(&t.buf, t.cols, slots),
            CudaStore::Bf16 { buf, cols, .. } => {
                self.gather_bf16_bits(&buf.as_view(), *cols, slots)
            }
            CudaStore::Fp8 {
                codes,
                scales,
                cols,
                ..
            } => {
                // SAFETY: the launch below writes every row.
                let mut out = unsafe { self.uninit(slots.len(), *cols) };
                if slots.is_empty() {
                    return out;
                }
                let idx = self.shared_i32(slots.iter().copied());
                let c = *cols as i32;
                let mut b = self.stream.launch_builder(&self.k.gather_rows_fp8);
                b.arg(&mut out.buf)
                    .arg(codes)
                    .arg(scales)
                    .arg(&*idx)
                    .arg(&c);
                // SAFETY: out has slots.len()·cols elements; every slot is a row of src
                // (checked above), with its codes and scales.
                ok(
                    unsafe { b.launch(Self::row_config(slots.len())) },
                    "gather_rows_fp8_f32",
                );
                out
            }
        }
    }

    fn rope(
        &self,
        x: &mut CudaTensor,
        heads: usize,
        head_width: usize,
        offset: usize,
        positions: &[usize],
        rope: &Rope,
        layout: RopeLayout,
    ) {
        let half = rope.dim() / 2;
        assert_eq!(positions.len(), x.rows, "rope: one position per row");
        if x.rows == 0 || half == 0 || heads == 0 {
            return;
        }
        assert!(
            (heads - 1) * head_width + offset + rope.dim() <= x.cols,
            "rope: beyond the row"
        );
        // The angles on the host, exactly as the CPU backend computes them.
        let mut cos = vec![0f32; x.rows * half];
        let mut sin = vec![0f32; x.rows * half];
        for (i, &p) in positions.iter().enumerate() {
            rope.cos_sin(
                p,
                &mut cos[i * half..(i + 1) * half],
                &mut sin[i * half..(i + 1) * half],
            );
        }
        // The same positions' angles in every layer of a step: copied once a step.
        let (cos, sin) = (self.shared_f32(&cos), self.shared_f32(&sin));
        let args = [
            x.cols as i32,
            head_width as i32,
            offset as i32,
            half as i32,
            i32::from(layout == RopeLayout::Interleaved),
        ];
        let mut b = self.stream.launch_builder(&self.k.rope);
        b.arg(&mut x.buf).arg(&*cos).arg(&*sin);
        for a in &args {
            b.arg(a);
        }
        let cfg = LaunchConfig {
            grid_dim: (x.rows as u32, heads as u32, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every head's rotated span lies inside the row (checked above); cos and sin
        // are [rows, half].
        ok(unsafe { b.launch(cfg) }, "rope");
    }

    fn hadamard(&self, x: &mut CudaTensor, dim: usize) {
        assert!(
            dim.is_power_of_two() && x.cols.is_multiple_of(dim),
            "hadamard: {dim} does not divide rows of {}",
            x.cols
        );
        let vectors = x.rows * (x.cols / dim);
        if vectors == 0 {
            return;
        }
        let (dim_arg, scale) = (dim as i32, (dim as f32).sqrt().recip());
        let mut b = self.stream.launch_builder(&self.k.hadamard);
        b.arg(&mut x.buf).arg(&dim_arg).arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (vectors as u32, 1, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: (dim * std::mem::size_of::<f32>()) as u32,
        };
        // SAFETY: the vectors tile the tensor (checked above); each block reads and writes its
        // own `dim` values and stages them in `dim` floats of shared memory.
        ok(unsafe { b.launch(cfg) }, "hadamard");
    }

    fn indexer_select(
        &self,
        q: &CudaTensor,
        w: &CudaTensor,
        keys: &CudaTensor,
        positions: &[usize],
        k: usize,
        scale: f32,
    ) -> Vec<Vec<u32>> {
        // One sequence whose keys are the tensor's rows: a table of one block of all of them.
        let block = [0];
        let seq = IndexerSeq {
            first: 0,
            positions,
            table: PagedRows::new(&block, keys.rows.max(1), keys.rows),
        };
        assert_eq!(positions.len(), q.rows, "indexer: one position per row");
        let Some(Picked::Host(mut picked)) =
            self.indexer_topk(q, w, IndexerKeys::Rows(keys), &[seq], k, scale, false)
        else {
            unreachable!("indexer_topk: host picks unless kept");
        };
        picked.pop().unwrap_or_default()
    }

    fn check_attention(&self, dims: MlaDims) -> Result<()> {
        // With more groups of heads the tensor-core kernel takes fewer groups rather than more
        // memory (head_groups_within).
        check_attention_smem(
            dims,
            self.smem_per_block,
            self.tensor_cores.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    fn check_indexer(&self, heads: usize, dim: usize) -> Result<()> {
        check_indexer_smem(
            heads,
            dim,
            self.smem_per_block,
            self.tensor_cores.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    fn kv_dtype(&self, store: &CudaStore) -> KvDtype {
        match store {
            CudaStore::F32(_) => KvDtype::Float32,
            CudaStore::Bf16 { .. } => KvDtype::Bfloat16,
            CudaStore::Fp8 { ue8m0: false, .. } => KvDtype::Fp8,
            CudaStore::Fp8 { ue8m0: true, .. } => KvDtype::Fp8Ue8m0,
        }
    }

    fn reads_in_place(&self, _store: &CudaStore) -> bool {
        true // mla_latent_attention_{f32, bf16_bits, fp8}
    }

    fn indexer_select_paged(
        &self,
        q: &CudaTensor,
        w: &CudaTensor,
        keys: &CudaStore,
        seqs: &[IndexerSeq<'_>],
        k: usize,
        scale: f32,
    ) -> Vec<Vec<Vec<u32>>> {
        if !self.indexer_in_place(w.cols, keys) {
            // More heads than the in-place kernel keeps sums for: score gathered copies.
            return indexer_select_gathered(self, q, w, keys, seqs, k, scale);
        }
        match self.indexer_topk(q, w, IndexerKeys::Store(keys), seqs, k, scale, false) {
            Some(Picked::Host(picked)) => picked,
            _ => unreachable!("indexer_topk: host picks unless kept"),
        }
    }

    fn indexer_keep_paged(
        &self,
        q: &CudaTensor,
        w: &CudaTensor,
        keys: &CudaStore,
        seqs: &[IndexerSeq<'_>],
        k: usize,
        scale: f32,
    ) -> Option<KeptPicks> {
        let in_place = self.indexer_in_place(w.cols, keys);
        // Kept picks take `k` values a batch row on the device until the attention has read
        // them: a batch of at most KEYS_PER_LAUNCH of them (a decode step's), or the host's
        // lists, a launch's worth at a time.
        let named = seqs.iter().filter(|s| !s.positions.is_empty());
        let lo = named.clone().map(|s| s.first).min()?;
        let hi = named.map(|s| s.first + s.positions.len()).max()?;
        if !self.keep_picks.load(std::sync::atomic::Ordering::Relaxed)
            || !in_place
            || k == 0
            || (hi - lo).saturating_mul(k) > KEYS_PER_LAUNCH
        {
            return None;
        }
        match self.indexer_topk(q, w, IndexerKeys::Store(keys), seqs, k, scale, true)? {
            Picked::Kept(picks) => Some(picks),
            Picked::Host(_) => unreachable!("indexer_topk: kept picks when asked"),
        }
    }

    fn mla_attention(
        &self,
        q: &CudaTensor,
        seqs: &[MlaSeq<'_, CudaTensor, CudaStore, KeptPicks>],
        weights: MlaWeights<'_, CudaWeight>,
        dims: MlaDims,
        scale: f32,
    ) -> CudaTensor {
        assert!(
            dims.latent <= launch::MLA_F32_MAX_LATENT as usize,
            "mla_attention: latent width {} above {}",
            dims.latent,
            launch::MLA_F32_MAX_LATENT
        );
        assert_eq!(
            q.cols,
            dims.heads * (dims.nope + dims.rope),
            "mla_attention: q width"
        );
        for seq in seqs {
            assert!(
                seq.first + seq.positions.len() <= q.rows,
                "mla_attention: rows {}..{} of a batch of {}",
                seq.first,
                seq.first + seq.positions.len(),
                q.rows
            );
        }
        if seqs.iter().all(|seq| seq.positions.is_empty()) {
            return self.zeros(q.rows, dims.heads * dims.v);
        }
        // The whole batch at once: an fp8 weight is read in place or dequantised once, each
        // product is one call over every row, and a decode step's attention is one launch (see Cuda::attend).
        let q_lat = self.query_latent(q, weights.uk_t, dims);
        // The attention writes every row a sequence names (one with no keys as zeros); rows
        // none names must read as zeros.
        let mut named = vec![false; q.rows];
        for seq in seqs {
            named[seq.first..seq.first + seq.positions.len()].fill(true);
        }
        let mut ctx = if named.iter().all(|&n| n) {
            // SAFETY: as said above, every row is written.
            unsafe { self.uninit(q.rows, dims.heads * dims.latent) }
        } else {
            self.zeros(q.rows, dims.heads * dims.latent)
        };
        self.attend(&q_lat, q, seqs, dims, scale, &mut ctx);
        // SAFETY: context_out's products write every row and head (cuBLAS: beta 0).
        let mut out = unsafe { self.uninit(q.rows, dims.heads * dims.v) };
        self.context_out(&ctx, weights.kv_b, dims, &mut out);
        out
    }

    fn mlp_block(
        &self,
        id: BlockId,
        h: &mut CudaTensor,
        load: &mut Option<CudaTensor>,
        block: &mut MlpBlock<'_, CudaTensor>,
    ) {
        self.graphed_block(id, h, load, block)
    }

    fn forget_blocks(&self, model: u64) {
        self.graphs.forget(model);
    }

    fn graph_counts_source(&self) -> Option<GraphCountsSource> {
        let graphs = self.graphs.clone();
        Some(Arc::new(move || graphs.counts()))
    }

    fn swiglu(&self, x: &CudaTensor, expert: &Expert<CudaWeight>) -> CudaTensor {
        let mut gate = self.linear(x, &expert.gate);
        let up = self.linear(x, &expert.up);
        let n = gate.rows * gate.cols;
        if n > 0 {
            let len = n as i64;
            let mut b = self.stream.launch_builder(&self.k.silu_mul);
            b.arg(&mut gate.buf).arg(&up.buf).arg(&len);
            // SAFETY: gate and up are both [rows, intermediate].
            ok(unsafe { b.launch(Self::flat_config(n)) }, "silu_mul");
        }
        self.linear(&gate, &expert.down)
    }

    fn moe_experts(
        &self,
        x: &CudaTensor,
        routing: &Routing,
        experts: &[Expert<CudaWeight>],
    ) -> CudaTensor {
        let groups = by_expert(routing.pairs(), experts.len());
        let mut out = self.zeros(x.rows, x.cols);
        self.add_experts(x, &mut out, &groups, experts);
        out
    }

    /// On the device while the routed experts are all fp8, or all bf16, with one shape:
    /// `moe_route_f32` routes, `moe_expert_slots` lists the pairs in expert order (as the
    /// host's lists have them) and each expert's tiles of 64 rows and adds the counts to
    /// `load`, the rows are gathered, three `fp8_grouped_tc` (or `bf16_grouped_tc`) launches
    /// run every tile (a grid sized for the most tiles the pairs could take; the rest end at
    /// once) with SiLU-and-mul between them, and `combine_rows` sums each row's weighted
    /// outputs: eight launches and no memset, nothing copied either way (the experts' address
    /// tables are copied once per layer and kept). The products and sums are those of the host
    /// routing's grouped path, so only the routing's own float32 roundings (the device's
    /// `expf`) can differ.
    ///
    /// bf16 experts in a layer of more than [`Cuda::in_place_rows`] rows (where cuBLAS may take
    /// them, and their widths are multiples of 8) copy one thing to the host, the experts'
    /// group offsets, and then run as the host routing's grouped path would: all in place while
    /// no expert has more than `in_place_rows` rows, else all on cuBLAS's grouped products
    /// (`Cuda::routed_products`); with expert shards on lanes of their own, each shard's
    /// lane reads its own experts' offsets back and chooses so for them.
    ///
    /// With expert shards on lanes of their own, the main lane routes and lists as above, and
    /// each shard's lane, side by side, copies in the rows and the lists, keeps the pairs
    /// [`ExpertShards::dispatch`]'s rule deals it (`moe_shard_pairs`), lists them over its own
    /// experts (`moe_expert_slots` again), runs them as above and copies its sums back, which
    /// the main lane adds up: no copy to the host (but each lane's expert offsets, for bf16
    /// experts past `in_place_rows`), where the host's routing would wait for the step's work
    /// so far at every MoE layer. (With shards on one lane, every expert is there: the layer
    /// runs as without shards.)
    fn moe_routed(
        &self,
        x: &CudaTensor,
        logits: &CudaTensor,
        bias: &CudaTensor,
        router: &crate::moe::RouterConfig,
        experts: &[Expert<CudaWeight>],
        load: &mut Option<CudaTensor>,
        (layer, layers): (usize, usize),
        shards: Option<&ExpertShards>,
    ) -> Option<CudaTensor> {
        use std::sync::atomic::Ordering::Relaxed;
        let (n, e, k, hidden) = (x.rows, router.n_experts, router.top_k, x.cols);
        let groups_fit = router.n_group <= 1
            || (router.n_group <= launch::ROUTE_MAX_GROUPS as usize
                && e % router.n_group == 0
                && e / router.n_group >= 2
                && (1..=router.n_group).contains(&router.topk_group));
        // Once cuBLAS refused a grouped product on any lane, layers route on the host, which
        // then runs every lane's experts one by one.
        let routable = self.route_on_device.load(Relaxed)
            && !self.lanes().any(|lane| lane.one_by_one.load(Relaxed))
            && n > 0
            && e == experts.len()
            && (1..=launch::ROUTE_MAX_EXPERTS as usize).contains(&e)
            && (1..=e.min(launch::ROUTE_MAX_TOP_K as usize)).contains(&k)
            && groups_fit
            && (logits.rows, logits.cols) == (n, e)
            && bias.rows * bias.cols == e
            && layer < layers
            && load
                .as_ref()
                .is_none_or(|load| (load.rows, load.cols) == (layers, e));
        // The experts run as in-place grouped launches of up to n rows an expert. The first
        // expert's dtype stands for all (the tables below refuse a mix); a shard lane's grid,
        // over fewer experts, is no larger, and every lane has the same in_place_rows. Past
        // in_place_rows, bf16 experts run as their counts come out, each lane reading its own
        // (see `routed_products`).
        let p = n * k;
        let fp8 = experts.first().is_some_and(|ex| ex.gate.is_fp8());
        if !routable {
            return None;
        }
        let in_place = self.grouped_in_place_fits(fp8, n, most_tiles(p, e));
        let sharded = shards.filter(|_| !self.shards.is_empty());
        let widths = experts
            .first()
            .is_some_and(|ex| cublas_widths(hidden, ex.gate.rows));
        if !in_place && (fp8 || !widths || !grouped_gemm_present()) {
            return None;
        }
        // Where the experts run, settled before anything is launched (tables may be copied).
        let run = match sharded {
            None => Run::Here(self.expert_tables(experts.iter(), hidden, &[])?),
            Some(shards) => Run::Shards(self.shard_tables(shards, layer, experts, hidden)?),
        };
        let load = load.get_or_insert_with(|| self.zeros(layers, e));
        // The layer's lists in two allocations: ints = ids [p] | slot_rows [p] | slot_of [p] |
        // group_offsets [e + 1] | tile_offsets [e + 1] | row_offsets [n + 1], floats =
        // weights [p] | slot_weights [p].
        let (slots_at, of_at, groups_at) = (p, 2 * p, 3 * p);
        let (tiles_at, rows_at) = (groups_at + e + 1, groups_at + 2 * (e + 1));
        // SAFETY: moe_route_f32 writes each token's k ids and weights, and moe_expert_slots
        // every entry of its lists (the experts' slots cover the p pairs).
        let (mut ints, mut floats) = unsafe {
            (
                ok(self.stream.alloc::<i32>(rows_at + n + 1), "allocating"),
                ok(self.stream.alloc::<f32>(2 * p), "allocating"),
            )
        };
        let (ni, ei, ki) = (n as i32, e as i32, k as i32);
        let (n_group, topk_group) = (router.n_group as i32, router.topk_group as i32);
        let norm = i32::from(router.norm_topk_prob);
        let (mut ids, mut lists) = ints.split_at_mut(slots_at);
        let (mut weights, mut slot_weights) = floats.split_at_mut(p);
        let mut b = self.stream.launch_builder(&self.k.moe_route);
        b.arg(&mut ids)
            .arg(&mut weights)
            .arg(&logits.buf)
            .arg(&bias.buf)
            .arg(&ni)
            .arg(&ei)
            .arg(&ki)
            .arg(&n_group)
            .arg(&topk_group)
            .arg(&norm)
            .arg(&router.routed_scaling_factor);
        let tokens_per_block = launch::ROUTE_TOKENS_PER_BLOCK;
        let config = LaunchConfig {
            grid_dim: (n.div_ceil(tokens_per_block as usize) as u32, 1, 1),
            block_dim: (tokens_per_block * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: logits is [n, e], bias e values, ids and weights [n, k]; e, k and the
        // groups are within the kernel's limits (checked above).
        ok(unsafe { b.launch(config) }, "moe_route_f32");
        drop(b);
        let mut load_row = load.buf.slice_mut(layer * e..(layer + 1) * e);
        self.expert_slots(
            &mut lists,
            &mut slot_weights,
            Some(&mut load_row),
            (&ids.slice(..), &weights.slice(..)),
            (n, k, e),
        );
        let out = match run {
            Run::Here((table, inter, fp8)) => {
                let slot_rows = ints.slice(slots_at..of_at);
                let xp = self.gather_indexed(&x.buf, hidden, &slot_rows);
                let tables = GroupedTables {
                    offsets: ints.slice(groups_at..tiles_at),
                    tile_offsets: ints.slice(tiles_at..rows_at),
                    weights: [0, 1, 2].map(|w| table.slice(w * e..(w + 1) * e)),
                    scales: fp8.then(|| [3, 4, 5].map(|w| table.slice(w * e..(w + 1) * e))),
                    groups: e,
                    tiles: most_tiles(p, e),
                };
                let y =
                    self.routed_products(&xp, tables, |i| &experts[i], in_place, (hidden, inter));
                // SAFETY: combine_rows sets every row (a row's sum of no pairs is 0).
                let mut out = unsafe { self.uninit(n, hidden) };
                let by_row = (ints.slice(rows_at..), ints.slice(of_at..groups_at));
                self.combine(&mut out, &y, by_row, &floats.slice(p..), false);
                self.grouped_layers.fetch_add(1, Relaxed);
                out
            }
            Run::Shards(tables) => {
                let routed = Routed {
                    lists: &ints,
                    weights: floats.slice(..p),
                    tokens: n,
                    top_k: k,
                    experts: e,
                };
                self.run_shards(x, &routed, &tables, experts, in_place)
            }
        };
        self.routed_layers.fetch_add(1, Relaxed);
        Some(out)
    }

    fn moe_experts_sharded(
        &self,
        x: &CudaTensor,
        work: &[Vec<Pair>],
        experts: &[Expert<CudaWeight>],
    ) -> CudaTensor {
        let mut out = self.zeros(x.rows, x.cols);
        if self.shards.is_empty() {
            // One GPU: the shards' experts run one after another on its stream.
            for shard in work {
                let groups = by_expert(shard.iter().copied(), experts.len());
                self.add_experts(x, &mut out, &groups, experts);
            }
            return out;
        }
        assert_eq!(
            work.len(),
            self.shards.len(),
            "moe_experts_sharded: one work list per shard"
        );
        // On the main GPU: each shard's distinct rows of x, and room for its results.
        let mut staged: Vec<Staged> = work
            .iter()
            .enumerate()
            .filter(|(_, pairs)| !pairs.is_empty())
            .map(|(shard, pairs)| self.stage(x, shard, pairs, experts.len()))
            .collect();
        let ready = ok(self.stream.record_event(None), "recording an event");
        // On each shard's lane, side by side: copy the rows in, run its experts (weighted by
        // the router), copy the sums back.
        let done: Vec<CudaEvent> = staged
            .iter_mut()
            .map(|st| {
                let lane = &self.shards[st.shard];
                ok(lane.stream.wait(&ready), "waiting for an event");
                let n = st.x.rows * st.x.cols;
                let mut x_here = lane.zeros(st.x.rows, st.x.cols);
                lane.copy(
                    &st.x.buf.slice(..n),
                    &mut x_here.buf.slice_mut(..n),
                    "copying rows to an expert shard",
                );
                let mut y_here = lane.zeros(st.x.rows, st.x.cols);
                lane.add_experts(&x_here, &mut y_here, &st.groups, experts);
                // st.y was allocated on the main stream before `ready`, which this lane waited
                // on; the main stream waits on `done` below before it reads st.y or frees any
                // staged buffer.
                lane.copy(
                    &y_here.buf.slice(..n),
                    &mut st.y.buf.slice_mut(..n),
                    "copying an expert shard's results back",
                );
                ok(lane.stream.record_event(None), "recording an event")
            })
            .collect();
        // Back on the main GPU: add each shard's sums into its rows, one shard at a time.
        for event in &done {
            ok(self.stream.wait(event), "waiting for an event");
        }
        let c = x.cols as i32;
        for st in &staged {
            let mut b = self.stream.launch_builder(&self.k.scatter_add_rows);
            b.arg(&mut out.buf)
                .arg(&st.y.buf)
                .arg(&st.rows)
                .arg(&*st.ones)
                .arg(&c);
            // SAFETY: st.y is [rows, cols] and st.rows holds that many distinct rows of out.
            ok(
                unsafe { b.launch(Self::row_config(st.x.rows)) },
                "scatter_add_rows",
            );
        }
        out
    }
}

/// Where a MoE layer routed on the device runs its experts ([`Backend::moe_routed`]): on this
/// lane (the address table of every expert, their width, whether fp8), or on the expert shards'.
enum Run {
    Here((Arc<CudaSlice<u64>>, usize, bool)),
    Shards(Vec<ShardTable>),
}

/// What an expert shard's lane reads to run its part of a MoE layer routed on the device: the
/// addresses of the experts it holds (as [`Cuda::expert_tables`] lays them out), then its
/// `moe_shard_pairs` table (three arrays of the layer's `experts` i32 values, two to a u64,
/// low half first).
struct ShardTable {
    shard: usize,
    /// The experts it holds (its numbers for them run from 0, in this order).
    held: Vec<usize>,
    table: Arc<CudaSlice<u64>>,
    inter: usize,
    fp8: bool,
}

/// A MoE layer's routing on the main lane, as `moe_route_f32` and `moe_expert_slots` left it:
/// `lists` = ids [p] | slot_rows [p] | slot_of [p] | group_offsets [experts + 1] |
/// tile_offsets [experts + 1] | row_offsets [tokens + 1] (p = tokens · top_k), `weights` the
/// pairs' weights [p].
struct Routed<'a> {
    lists: &'a CudaSlice<i32>,
    weights: CudaView<'a, f32>,
    tokens: usize,
    top_k: usize,
    experts: usize,
}

impl Cuda {
    /// `moe_expert_slots` over `ids` (`[tokens, top_k]`, each below `experts`, or negative to
    /// take no slot) and their `weights`: `lists` = slot_rows [p] | slot_of [p] |
    /// group_offsets [experts + 1] | tile_offsets [experts + 1] | row_offsets [tokens + 1] and
    /// `slot_weights` [p] (p = tokens · top_k) written whole, and each expert's pairs added to
    /// `load` (`experts` values) where given.
    fn expert_slots(
        &self,
        lists: &mut CudaViewMut<'_, i32>,
        slot_weights: &mut CudaViewMut<'_, f32>,
        load: Option<&mut CudaViewMut<'_, f32>>,
        (ids, weights): (&CudaView<'_, i32>, &CudaView<'_, f32>),
        (tokens, top_k, experts): (usize, usize, usize),
    ) {
        let p = tokens * top_k;
        let (mut slot_rows, mut rest) = lists.split_at_mut(p);
        let (mut slot_of, mut rest) = rest.split_at_mut(p);
        let (mut group_offsets, mut rest) = rest.split_at_mut(experts + 1);
        let (mut tile_offsets, mut row_offsets) = rest.split_at_mut(experts + 1);
        let (ti, ki, ei) = (tokens as i32, top_k as i32, experts as i32);
        let no_load: u64 = 0;
        let mut b = self.stream.launch_builder(&self.k.moe_expert_slots);
        b.arg(&mut group_offsets)
            .arg(&mut tile_offsets)
            .arg(&mut row_offsets)
            .arg(&mut slot_rows)
            .arg(slot_weights)
            .arg(&mut slot_of);
        match load {
            Some(load) => b.arg(load),
            None => b.arg(&no_load),
        };
        b.arg(ids).arg(weights).arg(&ti).arg(&ki).arg(&ei);
        let config = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (launch::ROUTE_SLOT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the callers' lists have the lengths above, `load` holds `experts` values or
        // is null, and every id is below `experts` or negative (no slot).
        ok(unsafe { b.launch(config) }, "moe_expert_slots");
    }

    /// Each expert shard's [`ShardTable`] for decoder layer `layer` (shards that hold none of
    /// its experts have nothing to do and none), copied once and kept by the shard's lane;
    /// `None`, having launched nothing, when `shards` does not fit this backend's lanes and
    /// `experts` (as many shards as lanes, as many experts as the plan places, each expert a
    /// shard holds uploaded to its lane) or some shard's experts cannot run in place (see
    /// [`Cuda::expert_tables`]).
    fn shard_tables(
        &self,
        shards: &ExpertShards,
        layer: usize,
        experts: &[Expert<CudaWeight>],
        hidden: usize,
    ) -> Option<Vec<ShardTable>> {
        if shards.shards() != self.shards.len() {
            return None;
        }
        let mut tables = Vec::new();
        for (shard, lane) in self.shards.iter().enumerate() {
            let (held, dispatch) = shards.shard_table(layer, shard);
            if dispatch.len() != 3 * experts.len() {
                return None;
            }
            if held.is_empty() {
                continue;
            }
            let packed: Vec<u64> = dispatch
                .chunks(2)
                .map(|two| {
                    let low = two[0] as u32;
                    let high = two.get(1).map_or(0, |&v| v as u32);
                    u64::from(low) | (u64::from(high) << 32)
                })
                .collect();
            let here = |w: &CudaWeight| w.copies.iter().any(|(l, _)| *l == lane.lane);
            let mine = held.iter().map(|&expert| &experts[expert]);
            if !mine
                .clone()
                .all(|ex| here(&ex.gate) && here(&ex.up) && here(&ex.down))
            {
                return None;
            }
            let (table, inter, fp8) = lane.expert_tables(mine, hidden, &packed)?;
            tables.push(ShardTable {
                shard,
                held,
                table,
                inter,
                fp8,
            });
        }
        Some(tables)
    }

    /// The routed experts' sums for `x`, routed as `routed` says, from the expert shards'
    /// lanes, side by side: each copies in x and the lists, runs the pairs it is dealt and
    /// copies its sums back; this (main) lane adds them up.
    /// `in_place`: whether every shard's experts run in place; else each lane reads its counts
    /// back (`Cuda::routed_products`).
    fn run_shards(
        &self,
        x: &CudaTensor,
        routed: &Routed<'_>,
        tables: &[ShardTable],
        experts: &[Expert<CudaWeight>],
        in_place: bool,
    ) -> CudaTensor {
        let (n, hidden) = (x.rows, x.cols);
        // Room here for each shard's sums, allocated before the shards wait on `ready`.
        // SAFETY: each shard's copy back writes all of its part.
        let mut parts: Vec<CudaTensor> = tables
            .iter()
            .map(|_| unsafe { self.uninit(n, hidden) })
            .collect();
        let ready = ok(self.stream.record_event(None), "recording an event");
        // Every lane's copies and lists are queued before any lane's sums, so a lane that reads
        // its experts' offsets back (bf16 experts past in_place_rows) waits only for its own
        // work while the others' runs.
        let lists: Vec<ShardLists> = tables
            .iter()
            .map(|table| {
                let lane = &self.shards[table.shard];
                ok(lane.stream.wait(&ready), "waiting for an event");
                lane.shard_lists(x, routed, table)
            })
            .collect();
        let done: Vec<CudaEvent> = tables
            .iter()
            .zip(lists)
            .zip(&mut parts)
            .map(|((table, lists), part)| {
                let lane = &self.shards[table.shard];
                lane.shard_sums(lists, table, part, (experts, in_place));
                ok(lane.stream.record_event(None), "recording an event")
            })
            .collect();
        // This stream waits for every shard before it reads a part or frees what they read (x,
        // the lists).
        for event in &done {
            ok(self.stream.wait(event), "waiting for an event");
        }
        let mut parts = parts.into_iter();
        let Some(mut out) = parts.next() else {
            return self.zeros(n, hidden);
        };
        for part in parts {
            self.add(&mut out, &part);
        }
        out
    }

    /// On an expert shard's lane, the first half of its part of a MoE layer routed on the main
    /// lane (see [`Cuda::run_shards`]): x and the routing copied in, the pairs it is dealt
    /// listed over its own experts, and their rows of x gathered in that order.
    fn shard_lists(&self, x: &CudaTensor, routed: &Routed<'_>, t: &ShardTable) -> ShardLists {
        let (n, k, e, es) = (routed.tokens, routed.top_k, routed.experts, t.held.len());
        let (hidden, p) = (x.cols, n * k);
        let nx = n * hidden;
        // SAFETY: the three copies below write every value.
        let (mut x_here, mut lists, mut weights) = unsafe {
            (
                self.uninit(n, hidden),
                ok(self.stream.alloc::<i32>(routed.lists.len()), "allocating"),
                ok(self.stream.alloc::<f32>(p), "allocating"),
            )
        };
        let into = "copying a MoE layer's rows and routing to an expert shard";
        self.copy(&x.buf.slice(..nx), &mut x_here.buf.slice_mut(..nx), into);
        self.copy(&routed.lists.slice(..), &mut lists.slice_mut(..), into);
        self.copy(&routed.weights, &mut weights.slice_mut(..), into);

        // The shard's own lists, in two allocations (laid out as `ShardLists` says).
        let (slots_at, of_at) = (p, 2 * p);
        let rows_at = 3 * p + 2 * (es + 1);
        // SAFETY: moe_shard_pairs writes every local id, and moe_expert_slots every entry of
        // its lists (the slots it leaves free too).
        let (mut ints, mut slot_weights) = unsafe {
            (
                ok(self.stream.alloc::<i32>(rows_at + n + 1), "allocating"),
                ok(self.stream.alloc::<f32>(p), "allocating"),
            )
        };
        let dispatch_at = if t.fp8 { 6 } else { 3 } * es;
        let dispatch = t
            .table
            .slice(dispatch_at..dispatch_at + (3 * e).div_ceil(2));
        // SAFETY: those u64 values hold the table's 3·e i32 values, two to one, low half first:
        // the order a little-endian device reads them in.
        let dispatch = unsafe { dispatch.transmute::<i32>(3 * e) }
            .expect("a shard's table holds its dispatch values");
        let (pi, ei) = (p as i32, e as i32);
        let (mut local_ids, mut rest) = ints.split_at_mut(slots_at);
        let (ids, slot_of_all, groups_all) = (
            lists.slice(..p),
            lists.slice(2 * p..3 * p),
            lists.slice(3 * p..3 * p + e + 1),
        );
        let mut b = self.stream.launch_builder(&self.k.moe_shard_pairs);
        b.arg(&mut local_ids)
            .arg(&ids)
            .arg(&slot_of_all)
            .arg(&groups_all)
            .arg(&dispatch)
            .arg(&pi)
            .arg(&ei);
        // SAFETY: the routing's ids are below e, each pair's slot lies in its expert's group,
        // and the dispatch table has 3·e values.
        ok(unsafe { b.launch(Self::flat_config(p)) }, "moe_shard_pairs");
        drop(b);
        // No load: the main lane counted the layer's pairs.
        self.expert_slots(
            &mut rest,
            &mut slot_weights.slice_mut(..),
            None,
            (&local_ids.slice(..), &weights.slice(..)),
            (n, k, es),
        );

        let xp = self.gather_indexed(&x_here.buf, hidden, &ints.slice(slots_at..of_at));
        ShardLists {
            ints,
            slot_weights,
            xp,
            tokens: n,
            pairs: p,
        }
    }

    /// The second half, after [`Cuda::shard_lists`]: the shard's experts on its rows (in place,
    /// or as their counts say: `in_place`), and the weighted sums of its pairs, copied into
    /// `part` (`[tokens, hidden]` on the main lane; rows it has no pair for are zeros).
    fn shard_sums(
        &self,
        lists: ShardLists,
        t: &ShardTable,
        part: &mut CudaTensor,
        (experts, in_place): (&[Expert<CudaWeight>], bool),
    ) {
        let ShardLists {
            ints,
            slot_weights,
            xp,
            tokens: n,
            pairs: p,
        } = lists;
        let (hidden, es) = (xp.cols, t.held.len());
        let nx = n * hidden;
        let (of_at, groups_at) = (2 * p, 3 * p);
        let (tiles_at, rows_at) = (groups_at + es + 1, groups_at + 2 * (es + 1));
        let tables = GroupedTables {
            offsets: ints.slice(groups_at..tiles_at),
            tile_offsets: ints.slice(tiles_at..rows_at),
            weights: [0, 1, 2].map(|w| t.table.slice(w * es..(w + 1) * es)),
            scales: t
                .fp8
                .then(|| [3, 4, 5].map(|w| t.table.slice(w * es..(w + 1) * es))),
            groups: es,
            tiles: most_tiles(p, es),
        };
        let mine = |i: usize| &experts[t.held[i]];
        let y = self.routed_products(&xp, tables, mine, in_place, (hidden, t.inter));
        // SAFETY: combine_rows sets every row (a row with none of this shard's pairs to 0).
        let mut sums = unsafe { self.uninit(n, hidden) };
        let by_row = (ints.slice(rows_at..), ints.slice(of_at..groups_at));
        self.combine(&mut sums, &y, by_row, &slot_weights.slice(..), false);
        self.grouped_layers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let back = "copying an expert shard's sums back";
        self.copy(&sums.buf.slice(..nx), &mut part.buf.slice_mut(..nx), back);
    }
}

/// An expert shard's lists for a MoE layer routed on the device, on its lane
/// ([`Cuda::shard_lists`]): `ints` = local ids [pairs] | slot_rows [pairs] | slot_of [pairs] |
/// group_offsets [held + 1] | tile_offsets [held + 1] | row_offsets [tokens + 1], the slots'
/// weights, and the slots' rows of x.
struct ShardLists {
    ints: CudaSlice<i32>,
    slot_weights: CudaSlice<f32>,
    xp: CudaTensor,
    tokens: usize,
    pairs: usize,
}

/// One expert shard's part of a step, staged on the main GPU.
struct Staged {
    /// The main GPU's context, current while the staged buffers are freed.
    main: Arc<CudaContext>,
    shard: usize,
    /// The distinct rows of x its pairs name, as indices on the main GPU.
    rows: CudaSlice<i32>,
    /// A weight of 1 per row (its sums come back weighted already).
    ones: Arc<CudaSlice<f32>>,
    /// Those rows of x.
    x: CudaTensor,
    /// Its weighted sums per row, copied back.
    y: CudaTensor,
    /// Its pairs by expert, rows numbered within `x`.
    groups: Vec<super::ExpertRows>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        // The fields are freed next, on the main stream, which must be in the current context.
        let _ = self.main.bind_to_thread();
    }
}

impl Cuda {
    /// Gathers, on this (main) lane, the rows of `x` that `pairs` name for shard `shard`.
    fn stage(&self, x: &CudaTensor, shard: usize, pairs: &[Pair], num_experts: usize) -> Staged {
        let (rows, local) = compact_rows(pairs, x.rows);
        let groups = by_expert(local.into_iter(), num_experts);
        let rows_d = self.upload_i32(rows.iter().copied());
        Staged {
            main: self.stream.context().clone(),
            shard,
            // Read only, and the same whenever a shard has as many rows again.
            ones: self.shared_f32(&vec![1.0f32; rows.len()]),
            x: self.gather_indexed(&x.buf, x.cols, &rows_d.as_view()),
            y: self.zeros(rows.len(), x.cols),
            rows: rows_d,
            groups,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At DeepSeek's widths (latent 512 + RoPE 64) the float32 attention needs 108 KB a block:
    /// sm_80 and sm_90 (163, 227 KB) take it, sm_89's 99 KB do not, and say so at load, where
    /// the tensor-core kernel with one group of heads fits; the tensor-core blocks take fewer
    /// groups of heads where more would not fit, down to one. A latent past the kernels'
    /// largest is refused whatever the memory.
    #[test]
    fn attention_fits_each_gpus_shared_memory_or_is_refused_at_load() {
        let deepseek = MlaDims {
            heads: 128,
            nope: 128,
            rope: 64,
            v: 128,
            latent: 512,
        };
        let (sm80, sm89, sm90) = (163 * 1024, 99 * 1024, 227 * 1024);
        for limit in [sm80, sm90] {
            check_attention_smem(deepseek, limit, false).unwrap();
        }
        let err = check_attention_smem(deepseek, sm89, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("float32 attention") && err.contains("99 KB") && err.contains("512 + 64"),
            "{err}"
        );
        check_attention_smem(deepseek, sm89, true).unwrap();
        let groups = |limit| head_groups_within(deepseek, 4, limit);
        assert_eq!(groups(sm90), 4);
        let fitted = groups(sm89);
        assert!(fitted < 4, "4 groups take more than 99 KB");
        assert!(launch::mla_tc_smem_bytes(512, 64, fitted) <= sm89);
        assert_eq!(head_groups_within(deepseek, 4, 1024), 1);
        let wide = MlaDims {
            latent: launch::MLA_F32_MAX_LATENT as usize + 16,
            ..deepseek
        };
        assert!(check_attention_smem(wide, u32::MAX, true).is_err());
    }

    /// DeepSeek's indexer (64 heads of 128) fits every GPU in either mode; heads of 1024
    /// values do not fit even sm_90's 227 KB, in float32 or on the tensor cores, and are
    /// refused naming the kernel, the config fields and both sizes; an odd width on the tensor
    /// cores is checked as the float32 kernel it runs on.
    #[test]
    fn the_indexer_fits_each_gpus_shared_memory_or_is_refused_at_load() {
        let (sm89, sm90) = (99 * 1024, 227 * 1024);
        for tensor_cores in [false, true] {
            check_indexer_smem(64, 128, sm89, tensor_cores).unwrap();
            let err = check_indexer_smem(64, 1024, sm90, tensor_cores)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("64 heads of 1024")
                    && err.contains("index_head_dim")
                    && err.contains("227 KB"),
                "{err}"
            );
        }
        let odd = check_indexer_smem(64, 1023, sm90, true)
            .unwrap_err()
            .to_string();
        assert!(odd.contains("float32 indexer"), "{odd}");
        check_indexer_smem(64, 255, sm90, true).unwrap();
    }

    /// The kernels compile for the newest architecture NVRTC has that the device runs, never
    /// one below sm_80 (their bf16 `mma.sync`) nor one newer than the device.
    #[test]
    fn kernels_compile_for_the_newest_architecture_the_device_runs() {
        // CUDA 13.0's NVRTC.
        let nvrtc = [75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121];
        assert_eq!(kernel_arch(90, &nvrtc), Some(90));
        assert_eq!(kernel_arch(89, &nvrtc), Some(89));
        assert_eq!(kernel_arch(80, &nvrtc), Some(80));
        // A device newer than NVRTC knows: its newest, which the driver compiles up.
        assert_eq!(kernel_arch(130, &nvrtc), Some(121));
        // Between listed ones: the one below.
        assert_eq!(kernel_arch(101, &nvrtc), Some(100));
        // Too old for the kernels, or an NVRTC without a usable architecture.
        assert_eq!(kernel_arch(75, &nvrtc), None);
        assert_eq!(kernel_arch(90, &[75]), None);
        assert_eq!(kernel_arch(90, &[]), None);
    }

    /// Machine code for a device NVRTC knows, PTX (which the driver compiles up) for one it
    /// does not, nothing for one too old.
    #[test]
    fn kernels_are_machine_code_for_a_device_nvrtc_knows() {
        let nvrtc = [75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121];
        assert_eq!(kernel_target(90, &nvrtc), Some(KernelTarget::Sm(90)));
        assert_eq!(kernel_target(80, &nvrtc), Some(KernelTarget::Sm(80)));
        assert_eq!(kernel_target(130, &nvrtc), Some(KernelTarget::Compute(121)));
        assert_eq!(kernel_target(101, &nvrtc), Some(KernelTarget::Compute(100)));
        assert_eq!(
            kernel_target(90, &[80, 89]),
            Some(KernelTarget::Compute(89))
        );
        assert_eq!(kernel_target(75, &nvrtc), None);
        assert_eq!(KernelTarget::Sm(90).to_string(), "sm_90");
        assert_eq!(KernelTarget::Compute(121).to_string(), "compute_121");
    }
}
