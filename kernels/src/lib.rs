//! sparsemoe's CUDA kernels, as sources.
//!
//! The `.cu` files under `kernels/cuda/` are compiled ahead of time with `nvcc` (PTX + SASS for
//! `sm_90a` and `sm_80`) or at start-up with NVRTC by the CUDA backend, which loads each entry
//! point by the name listed in [`KERNELS`]. This crate has no CUDA dependency: it builds and its
//! tests run anywhere; the compile check (`tests/compile.rs`) needs `nvcc` (see [`toolchain`]).

pub mod toolchain;

/// One CUDA source file: its file name under `kernels/cuda/` and its text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Source {
    pub file: &'static str,
    pub text: &'static str,
}

macro_rules! sources {
    ($($file:literal),* $(,)?) => {
        &[$(Source { file: $file, text: include_str!(concat!("../cuda/", $file)) }),*]
    };
}

/// Headers the `.cu` files include (NVRTC needs them by name).
pub const HEADERS: &[Source] = sources![
    "common.cuh",
    "mla.cuh",
    "mma.cuh",
    "mla_tc.cuh",
    "indexer_tc.cuh"
];

/// Every compilation unit, one per op group.
pub const SOURCES: &[Source] = sources![
    "norm.cu",
    "rope.cu",
    "activation.cu",
    "indexer.cu",
    "topk.cu",
    "mla_sparse.cu",
    "mla_dense.cu",
    "moe.cu",
    "fp8.cu",
    "grouped_gemm.cu",
    "engine.cu",
];

/// What the engine's CUDA backend compiles at start-up with NVRTC (with [`RTC_DEFINE`]): its
/// float32 row operations and the top-k selection.
pub const ENGINE_SOURCES: &[&str] = &["engine.cu", "topk.cu"];

/// The define that makes `common.cuh` compile without system headers (NVRTC).
pub const RTC_DEFINE: &str = "-DSMOE_RTC";

/// A kernel parameter's type, as the launcher must pass it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    /// `__nv_bfloat16*` (written) / `const __nv_bfloat16*`.
    Bf16Mut,
    Bf16,
    /// `unsigned short*` / `const unsigned short*`: bf16 values as their bits, for the
    /// kernels NVRTC compiles without `cuda_bf16.h`.
    Bf16BitsMut,
    Bf16Bits,
    /// `float*` / `const float*`.
    F32Mut,
    F32,
    /// `int*` / `const int*` (int32 indices, -1 = none).
    I32Mut,
    I32,
    /// `uint8_t*` (written) / `const uint8_t*`: fp8 e4m3 codes.
    U8Mut,
    U8,
    /// `const unsigned long long*`: device addresses, one a group (a grouped product's
    /// weights).
    Addresses,
    /// Scalars.
    Int,
    Long,
    Float,
}

/// An entry point: its `extern "C"` name, the file that defines it, and its parameters in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernel {
    pub name: &'static str,
    pub file: &'static str,
    pub params: &'static [(&'static str, Param)],
}

use Param::*;

macro_rules! kernel {
    ($name:literal in $file:literal: $($p:ident: $t:ident),* $(,)?) => {
        Kernel { name: $name, file: $file, params: &[$((stringify!($p), $t)),*] }
    };
}

/// Every entry point. `tests/entry_points.rs` checks this list against the sources' signatures.
/// Launch shapes and shared-memory sizes are documented above each kernel and in the README.
pub const KERNELS: &[Kernel] = &[
    kernel!("rms_norm_bf16" in "norm.cu": out: Bf16Mut, x: Bf16, weight: Bf16, cols: Int, eps: Float),
    kernel!("fused_add_rms_norm_bf16" in "norm.cu":
        out: Bf16Mut, residual: F32Mut, x: Bf16, weight: Bf16, cols: Int, eps: Float),
    kernel!("rope_cos_sin_f32" in "rope.cu":
        cos_out: F32Mut, sin_out: F32Mut, positions: I32, inv_freq: F32, n: Int, half: Int,
        attention_factor: Float),
    kernel!("rope_apply_bf16" in "rope.cu":
        x: Bf16Mut, cos_t: F32, sin_t: F32, half: Int, row_stride: Long, head_stride: Int,
        offset: Int, interleaved: Int),
    kernel!("silu_and_mul_bf16" in "activation.cu": out: Bf16Mut, x: Bf16, cols: Int),
    kernel!("silu_and_mul_f32" in "activation.cu": out: Bf16Mut, x: F32, cols: Int),
    kernel!("indexer_scores_bf16" in "indexer.cu":
        scores: F32Mut, q: Bf16, keys: Bf16, w: F32, key_start: I32, n_visible: I32,
        n_keys: Int, heads: Int, dim: Int, scale: Float, scores_stride: Long),
    kernel!("indexer_scores_bf16_tc" in "indexer.cu":
        scores: F32Mut, q: Bf16, keys: Bf16, w: F32, key_start: I32, n_visible: I32,
        n_keys: Int, heads: Int, dim: Int, scale: Float, scores_stride: Long,
        tiles: Int),
    kernel!("indexer_quant_fp8" in "indexer.cu":
        codes: U8Mut, scales: F32Mut, x: Bf16, dim: Int, pow2_scale: Int),
    kernel!("indexer_scores_fp8" in "indexer.cu":
        scores: F32Mut, q: U8, q_scale: F32, keys: U8, k_scale: F32, w: F32, key_start: I32,
        n_visible: I32, n_keys: Int, heads: Int, dim: Int, scale: Float, scores_stride: Long),
    kernel!("indexer_scores_fp8_tc" in "indexer.cu":
        scores: F32Mut, q: U8, q_scale: F32, keys: U8, k_scale: F32, w: F32, key_start: I32,
        n_visible: I32, n_keys: Int, heads: Int, dim: Int, scale: Float, scores_stride: Long,
        tiles: Int),
    kernel!("indexer_scores_fp8_tc_widened" in "indexer.cu":
        scores: F32Mut, q: U8, q_scale: F32, keys: U8, k_scale: F32, w: F32, key_start: I32,
        n_visible: I32, n_keys: Int, heads: Int, dim: Int, scale: Float, scores_stride: Long,
        tiles: Int),
    kernel!("topk_rows_f32" in "topk.cu":
        out: I32Mut, scores: F32, n_valid: I32, k: Int, scores_stride: Long),
    kernel!("topk_parts_f32" in "topk.cu":
        cand_idx: I32Mut, cand_scores: F32Mut, scores: F32, n_valid: I32, k: Int,
        scores_stride: Long, part_len: Int),
    kernel!("topk_merge_f32" in "topk.cu":
        out: I32Mut, cand_idx: I32, cand_scores: F32, n_valid: I32, k: Int, part_len: Int,
        parts: Int),
    kernel!("sparse_mla_attention_bf16" in "mla_sparse.cu":
        out: Bf16Mut, lse: F32Mut, q: Bf16, kv: Bf16, indices: I32, topk: Int, heads: Int,
        latent: Int, rope: Int, scale: Float),
    kernel!("sparse_mla_attention_bf16_tc" in "mla_sparse.cu":
        out: Bf16Mut, lse: F32Mut, q: Bf16, kv: Bf16, indices: I32, topk: Int, heads: Int,
        latent: Int, rope: Int, scale: Float),
    kernel!("dense_mla_attention_bf16" in "mla_dense.cu":
        out: Bf16Mut, lse: F32Mut, q: Bf16, kv: Bf16, kv_start: I32, kv_len: I32, heads: Int,
        latent: Int, rope: Int, scale: Float),
    kernel!("moe_route_f32" in "engine.cu":
        ids: I32Mut, weights: F32Mut, logits: F32, bias: F32, tokens: Int, experts: Int,
        top_k: Int, n_group: Int, topk_group: Int, norm_topk_prob: Int,
        routed_scaling_factor: Float),
    kernel!("moe_expert_slots" in "engine.cu":
        group_offsets: I32Mut, tile_offsets: I32Mut, row_offsets: I32Mut, slot_rows: I32Mut,
        slot_weights: F32Mut, slot_of: I32Mut, load: F32Mut, ids: I32, weights: F32, tokens: Int,
        top_k: Int, experts: Int),
    kernel!("moe_shard_pairs" in "engine.cu":
        local_ids: I32Mut, ids: I32, slot_of: I32, group_offsets: I32, dispatch: I32, pairs: Int,
        experts: Int),
    kernel!("moe_count_experts" in "moe.cu": counts: I32Mut, ids: I32, n_pairs: Int),
    kernel!("moe_expert_offsets" in "moe.cu":
        offsets: I32Mut, cursor: I32Mut, counts: I32, experts: Int),
    kernel!("moe_permute_bf16" in "moe.cu":
        x_perm: Bf16Mut, slot_of: I32Mut, x: Bf16, ids: I32, offsets: I32, cursor: I32Mut,
        top_k: Int, hidden: Int),
    kernel!("moe_unpermute_combine_bf16" in "moe.cu":
        out: Bf16Mut, y: F32, slot_of: I32, weights: F32, top_k: Int, hidden: Int,
        accumulate: Int),
    kernel!("fp8_block_dequant_bf16" in "fp8.cu":
        out: Bf16Mut, q: U8, scale_inv: F32, rows: Int, cols: Int),
    kernel!("fp8_block_dequant_f32" in "fp8.cu":
        out: F32Mut, q: U8, scale_inv: F32, rows: Int, cols: Int),
    kernel!("grouped_gemm_bf16_f32" in "grouped_gemm.cu":
        y: F32Mut, x: Bf16, w: Bf16, offsets: I32, n: Int, k: Int),
    kernel!("gather_rows_f32" in "engine.cu": out: F32Mut, src: F32, slots: I32, cols: Int),
    kernel!("gather_rows_bf16_bits_f32" in "engine.cu":
        out: F32Mut, src: Bf16Bits, slots: I32, cols: Int),
    kernel!("fp8_linear_tc" in "engine.cu":
        y: F32Mut, x: F32, codes: U8, row_scales: F32, m: Int, n: Int, k: Int, scale_cols: Int,
        split_steps: Int, ldx: Int, ldy: Int, batch_x: Long, batch_rows: Int, batch_y: Long),
    kernel!("bf16_linear_tc" in "engine.cu":
        y: F32Mut, x: F32, values: Bf16Bits, m: Int, n: Int, k: Int, split_steps: Int, ldx: Int,
        ldy: Int, batch_x: Long, batch_rows: Int, batch_y: Long),
    kernel!("fp8_grouped_tc" in "engine.cu":
        y: F32Mut, x: F32, codes: Addresses, row_scales: Addresses, offsets: I32,
        tile_offsets: I32, groups: Int, n: Int, k: Int, scale_cols: Int),
    kernel!("bf16_grouped_tc" in "engine.cu":
        y: F32Mut, x: F32, weights: Addresses, offsets: I32, tile_offsets: I32, groups: Int,
        n: Int, k: Int),
    kernel!("sum_splits_f32" in "engine.cu": y: F32Mut, partial: F32, splits: Int, len: Long),
    kernel!("f32_to_bf16_bits" in "engine.cu": out: Bf16BitsMut, x: F32, n: Long),
    kernel!("fp8_dequant_bf16_bits" in "engine.cu":
        out: Bf16BitsMut, q: U8, row_scales: F32, n: Long, cols: Int, scale_cols: Int),
    kernel!("scatter_rows_f32" in "engine.cu": dst: F32Mut, rows: F32, slots: I32, cols: Int),
    kernel!("scatter_rows_f32_to_bf16_bits" in "engine.cu":
        dst: Bf16BitsMut, rows: F32, slots: I32, cols: Int),
    kernel!("scatter_rows_f32_to_fp8" in "engine.cu":
        codes: U8Mut, scales: F32Mut, rows: F32, slots: I32, cols: Int, ue8m0: Int),
    kernel!("gather_rows_fp8_f32" in "engine.cu":
        out: F32Mut, codes: U8, scales: F32, slots: I32, cols: Int),
    kernel!("scatter_add_rows_f32" in "engine.cu":
        out: F32Mut, y: F32, rows: I32, weights: F32, cols: Int),
    kernel!("combine_rows_f32" in "engine.cu":
        out: F32Mut, y: F32, offsets: I32, pairs: I32, weights: F32, cols: Int, accumulate: Int),
    kernel!("combine_rows_bf16_bits_f32" in "engine.cu":
        out: F32Mut, y: Bf16Bits, offsets: I32, pairs: I32, weights: F32, cols: Int,
        accumulate: Int),
    kernel!("copy_columns_f32" in "engine.cu":
        out: F32Mut, x: F32, src_cols: Int, start: Int, len: Int),
    kernel!("rms_norm_f32" in "engine.cu": out: F32Mut, x: F32, w: F32, cols: Int, eps: Float),
    kernel!("layer_norm_f32" in "engine.cu":
        out: F32Mut, x: F32, w: F32, b: F32, cols: Int, eps: Float),
    kernel!("add_f32" in "engine.cu": x: F32Mut, y: F32, n: Long),
    kernel!("silu_mul_f32" in "engine.cu": gate: F32Mut, up: F32, n: Long),
    kernel!("silu_mul_bf16_bits" in "engine.cu":
        out: Bf16BitsMut, gate: Bf16Bits, up: Bf16Bits, n: Long),
    kernel!("rope_f32" in "engine.cu":
        x: F32Mut, cos_t: F32, sin_t: F32, cols: Int, head_width: Int, offset: Int, half: Int,
        interleaved: Int),
    kernel!("hadamard_f32" in "engine.cu": x: F32Mut, dim: Int, rsqrt_dim: Float),
    kernel!("indexer_scores_f32" in "engine.cu":
        scores: F32Mut, q: F32, w: F32, keys: F32, n_visible: I32, n_keys: Int, heads: Int,
        dim: Int, scale: Float),
    kernel!("picks_to_pool_rows" in "engine.cu":
        picks: I32Mut, blocks: I32, row_tables: I32, block_size: Int, width: Int, n: Long),
    kernel!("indexer_scores_store_f32" in "engine.cu":
        scores: F32Mut, q: F32, w: F32, keys: F32, blocks: I32, row_tables: I32,
        block_size: Int, n_visible: I32, n_keys: Int, heads: Int, dim: Int, scale: Float),
    kernel!("indexer_scores_store_bf16_bits" in "engine.cu":
        scores: F32Mut, q: F32, w: F32, keys: Bf16Bits, blocks: I32, row_tables: I32,
        block_size: Int, n_visible: I32, n_keys: Int, heads: Int, dim: Int, scale: Float),
    kernel!("indexer_scores_store_fp8" in "engine.cu":
        scores: F32Mut, q: F32, w: F32, codes: U8, key_scales: F32, blocks: I32,
        row_tables: I32, block_size: Int, n_visible: I32, n_keys: Int, heads: Int, dim: Int,
        scale: Float, ue8m0: Int),
    kernel!("indexer_scores_tc_store_f32" in "engine.cu":
        scores: F32Mut, q: F32, w: F32, keys: F32, blocks: I32, row_tables: I32,
        block_size: Int, n_visible: I32, n_keys: Int, heads: Int, dim: Int, scale: Float,
        tiles: Int),
    kernel!("indexer_scores_tc_store_bf16_bits" in "engine.cu":
        scores: F32Mut, q: F32, w: F32, keys: Bf16Bits, blocks: I32, row_tables: I32,
        block_size: Int, n_visible: I32, n_keys: Int, heads: Int, dim: Int, scale: Float,
        tiles: Int),
    kernel!("indexer_scores_tc_store_fp8" in "engine.cu":
        scores: F32Mut, q: F32, w: F32, codes: U8, key_scales: F32, blocks: I32,
        row_tables: I32, block_size: Int, n_visible: I32, n_keys: Int, heads: Int, dim: Int,
        scale: Float, tiles: Int, ue8m0: Int),
    kernel!("mla_latent_attention_f32" in "engine.cu":
        ctx: F32Mut, q_lat: F32, q_pe: F32, latent: F32, k_pe: F32, keys: I32, key_offsets: I32,
        heads: Int, latent_dim: Int, rope_dim: Int, q_pe_row: Int, q_pe_head: Int, scale: Float,
        lse: F32Mut, split_keys: Int),
    kernel!("mla_latent_attention_bf16_bits" in "engine.cu":
        ctx: F32Mut, q_lat: F32, q_pe: F32, latent: Bf16Bits, k_pe: Bf16Bits, keys: I32,
        key_offsets: I32, heads: Int, latent_dim: Int, rope_dim: Int, q_pe_row: Int, q_pe_head: Int,
        scale: Float,
        lse: F32Mut, split_keys: Int),
    kernel!("mla_latent_attention_fp8" in "engine.cu":
        ctx: F32Mut, q_lat: F32, q_pe: F32, latent_codes: U8, latent_scales: F32, k_pe: Bf16Bits,
        keys: I32, key_offsets: I32, heads: Int, latent_dim: Int, rope_dim: Int, q_pe_row: Int,
        q_pe_head: Int, scale: Float,
        lse: F32Mut, split_keys: Int),
    kernel!("mla_latent_attention_tc_f32" in "engine.cu":
        ctx: F32Mut, q_lat: F32, q_pe: F32, latent: F32, k_pe: F32, keys: I32, key_offsets: I32,
        heads: Int, latent_dim: Int, rope_dim: Int, q_pe_row: Int, q_pe_head: Int, scale: Float,
        lse: F32Mut, split_keys: Int),
    kernel!("mla_latent_attention_tc_bf16_bits" in "engine.cu":
        ctx: F32Mut, q_lat: F32, q_pe: F32, latent: Bf16Bits, k_pe: Bf16Bits, keys: I32,
        key_offsets: I32, heads: Int, latent_dim: Int, rope_dim: Int, q_pe_row: Int, q_pe_head: Int,
        scale: Float,
        lse: F32Mut, split_keys: Int),
    kernel!("mla_latent_attention_tc_fp8" in "engine.cu":
        ctx: F32Mut, q_lat: F32, q_pe: F32, latent_codes: U8, latent_scales: F32, k_pe: Bf16Bits,
        keys: I32, key_offsets: I32, heads: Int, latent_dim: Int, rope_dim: Int, q_pe_row: Int,
        q_pe_head: Int, scale: Float,
        lse: F32Mut, split_keys: Int),
    kernel!("mla_combine_splits_f32" in "engine.cu":
        ctx: F32Mut, partial: F32, lse: F32, splits: Int, heads: Int, latent_dim: Int),
];

/// Tiles and limits the launcher must match (the `#define`s of the sources).
pub mod launch {
    /// Keys per indexer block; the block has twice as many threads.
    pub const INDEXER_KEYS: u32 = 64;
    /// The tensor-core indexer (`indexer_scores_bf16_tc`): keys per tile (a block takes
    /// `tiles` of them, [`indexer_tc_tiles`]), warps, row padding.
    pub const INDEXER_TC_KEYS: u32 = 64;
    pub const INDEXER_TC_WARPS: u32 = 4;
    pub const INDEXER_TC_PAD: u32 = 8;
    /// The most key tiles a tensor-core indexer block takes ([`indexer_tc_tiles`]), and the
    /// blocks a multiprocessor it leaves at least.
    pub const INDEXER_TC_MAX_TILES: u32 = 8;
    pub const INDEXER_TC_BLOCKS_PER_SM: u32 = 4;
    /// The fp8 tensor-core indexer (`indexer_scores_fp8_tc`, `indexer_scores_tc_store_fp8`):
    /// the widest row it takes (one fp8 scale block), and its rows' padding in bytes.
    pub const INDEXER_FP8_TC_MAX_DIM: u32 = 128;
    pub const INDEXER_FP8_TC_PAD: u32 = 16;
    /// Threads per top-k block (a row, or a part of one: [`topk_split`]).
    pub const TOPK_THREADS: u32 = 1024;
    /// The most parts `topk_parts_f32` splits a row into.
    pub const TOPK_MAX_PARTS: u32 = 16;
    /// Heads per MLA attention block (8 warps of 2 heads), keys per tile.
    pub const MLA_HEADS_PER_BLOCK: u32 = 16;
    pub const MLA_THREADS: u32 = 256;
    pub const MLA_TILE: u32 = 32;
    pub const MLA_MAX_LATENT: u32 = 512;
    /// The tensor-core MLA attention (`mla_tc.cuh`): a block takes one row and 1 to
    /// `MLA_TC_MAX_GROUPS` groups of `MLA_TC_HEADS` heads, `MLA_TC_WARPS` warps a group (see
    /// [`mla_tc_groups`]); keys per tile, the largest latent width, and the padding of its
    /// shared-memory rows.
    pub const MLA_TC_WARPS: u32 = 4;
    pub const MLA_TC_HEADS: u32 = 16;
    pub const MLA_TC_MAX_GROUPS: u32 = 4;
    pub const MLA_TC_TILE: u32 = 32;
    pub const MLA_TC_MAX_LATENT: u32 = 512;
    pub const MLA_TC_PAD: u32 = 8;
    /// Tokens per routing block (one warp each), the largest expert count, and the threads of
    /// `moe_expert_slots`' one block.
    pub const ROUTE_TOKENS_PER_BLOCK: u32 = 4;
    pub const ROUTE_MAX_EXPERTS: u32 = 512;
    pub const ROUTE_SLOT_THREADS: u32 = 256;
    /// The most routing choices a token has (`moe_route_f32`) and the most expert groups.
    pub const ROUTE_MAX_TOP_K: u32 = 32;
    pub const ROUTE_MAX_GROUPS: u32 = 32;
    /// Output tile edge of the grouped GEMM fallback.
    pub const GROUPED_GEMM_TILE: u32 = 64;

    /// Threads of the engine's row kernels (one block per row).
    pub const ENGINE_THREADS: u32 = 256;
    /// Values per scale of an fp8 KV row (`scatter_rows_f32_to_fp8`).
    pub const KV_FP8_BLOCK: u32 = 128;
    /// The engine's float32 MLA attention: warps per block and heads per warp (a block takes
    /// one row and `MLA_F32_HEADS` heads), keys per tile, and the largest latent width.
    pub const MLA_F32_WARPS: u32 = 8;
    pub const MLA_F32_HEADS_PER_WARP: u32 = 2;
    pub const MLA_F32_HEADS: u32 = MLA_F32_WARPS * MLA_F32_HEADS_PER_WARP;
    pub const MLA_F32_THREADS: u32 = MLA_F32_WARPS * 32;
    pub const MLA_F32_TILE: u32 = 32;
    pub const MLA_F32_MAX_LATENT: u32 = 512;
    /// Threads of `mla_combine_splits_f32`.
    pub const MLA_COMBINE_THREADS: u32 = 128;
    /// Fewest keys a split of the engine's MLA attention takes: below it the partial contexts'
    /// writes and the combine cost more than the parallelism gains.
    pub const MLA_SPLIT_MIN_KEYS: u32 = 256;
    /// Most splits of a row's keys.
    pub const MLA_MAX_SPLITS: u32 = 32;
    /// Keys per block of the engine's float32 indexer scores (a key per thread).
    pub const INDEXER_F32_KEYS: u32 = 128;
    /// The most indexer heads `indexer_scores_store_*` keep running sums for.
    pub const INDEXER_STORE_MAX_HEADS: u32 = 64;

    /// `fp8_linear_tc`: warps a block, weight rows a block (16 a warp), rows of x a block,
    /// columns a k-step (one fp8 scale block).
    pub const FP8_LINEAR_WARPS: u32 = 4;
    pub const FP8_LINEAR_COLS: u32 = FP8_LINEAR_WARPS * 16;
    pub const FP8_LINEAR_ROWS: u32 = 64;
    pub const FP8_LINEAR_K: u32 = 128;
    /// The most rows (y) and layers (z) a launch's grid may have.
    pub const MAX_GRID_ROWS: u32 = 65_535;
    /// Most split-K parts of an `fp8_linear_tc` launch.
    pub const FP8_LINEAR_MAX_SPLITS: u32 = 16;
    /// Fewest k-steps a split takes.
    pub const FP8_LINEAR_MIN_SPLIT_STEPS: u32 = 2;
    /// Blocks an `fp8_linear_tc` launch aims for, per multiprocessor: its products read each
    /// code once, so they are bound by memory, and each block keeps one step's codes (8 KB) in
    /// flight; four fit an SM by registers (`__launch_bounds__` asks for them:
    /// `FP8_LINEAR_MIN_BLOCKS`).
    pub const FP8_LINEAR_BLOCKS_PER_SM: u32 = 4;

    /// k-steps a split of `fp8_linear_tc` takes (`split_steps`) for a product of `k` columns
    /// whose grid has `blocks` blocks a split, on a device of `sms` multiprocessors: all of them
    /// (one split) once the blocks reach `FP8_LINEAR_BLOCKS_PER_SM` an SM; otherwise k is split
    /// until they do, into parts of at least `FP8_LINEAR_MIN_SPLIT_STEPS` steps, at most
    /// `FP8_LINEAR_MAX_SPLITS` of them. A decode step's expert products (n = 2048 weight rows
    /// at k = 7168: 32 blocks) would otherwise use a quarter of an H200's multiprocessors.
    pub fn fp8_linear_split_steps(blocks: u32, k: u32, sms: u32) -> u32 {
        let steps = k.div_ceil(FP8_LINEAR_K).max(1);
        let target = u64::from(sms) * u64::from(FP8_LINEAR_BLOCKS_PER_SM);
        let want = target.div_ceil(u64::from(blocks.max(1)));
        let splits = want
            .min(u64::from(steps / FP8_LINEAR_MIN_SPLIT_STEPS))
            .min(u64::from(FP8_LINEAR_MAX_SPLITS))
            .max(1) as u32;
        steps.div_ceil(splits)
    }

    /// Dynamic shared memory of `indexer_scores_f32`.
    pub fn indexer_f32_smem_bytes(heads: u32, dim: u32) -> u32 {
        (heads * dim + heads) * 4
    }

    /// Dynamic shared memory of `mla_latent_attention_*`: the block's queries, a tile of keys
    /// widened to float32 (rows padded by one word), and the tile's rows.
    pub fn mla_f32_smem_bytes(latent: u32, rope: u32) -> u32 {
        let dqk = latent + rope;
        (MLA_F32_HEADS * dqk + MLA_F32_TILE * (dqk + 1) + MLA_F32_TILE) * 4
    }

    /// Threads of `indexer_quant_fp8` (one block per row).
    pub const INDEXER_QUANT_THREADS: u32 = 128;

    /// Dynamic shared memory of `indexer_scores_fp8` (`dim` a multiple of 4).
    pub fn indexer_fp8_smem_bytes(heads: u32, dim: u32) -> u32 {
        heads * dim + heads * 4 + INDEXER_KEYS * (dim + 4) + INDEXER_KEYS * 4
    }

    /// Dynamic shared memory of `indexer_scores_bf16`.
    pub fn indexer_smem_bytes(heads: u32, dim: u32) -> u32 {
        heads * dim * 2 + INDEXER_KEYS * (dim + 2) * 2 + INDEXER_KEYS * 4
    }

    /// Dynamic shared memory of the MLA attention kernels (raise the kernel's limit above 48 KB).
    pub fn mla_smem_bytes(latent: u32, rope: u32) -> u32 {
        let dqk = latent + rope;
        MLA_HEADS_PER_BLOCK * dqk * 2 + MLA_TILE * (dqk + 2) * 2 + MLA_TILE * 4
    }

    /// Dynamic shared memory of the tensor-core indexer (`indexer_tc.cuh`:
    /// `indexer_scores_bf16_tc`, `indexer_scores_tc_store_*`): the query's heads (rounded up to
    /// 16) and the key tile as bf16 rows of `dim` rounded up to 16 and padded, the heads'
    /// weights, the warps' per-key sums.
    pub fn indexer_tc_smem_bytes(heads: u32, dim: u32) -> u32 {
        let rows = heads.div_ceil(16) * 16;
        (rows + INDEXER_TC_KEYS) * (dim.div_ceil(16) * 16 + INDEXER_TC_PAD) * 2
            + rows * 4
            + INDEXER_TC_WARPS * INDEXER_TC_KEYS * 4
    }

    /// Key tiles (of `INDEXER_TC_KEYS`) per block of the tensor-core indexers
    /// (`indexer_tc.cuh`'s `tiles`) for `rows` query rows of up to `n_keys` keys on a device of
    /// `sms` multiprocessors: the most, of 8, 4, 2 and 1 (powers of two up to
    /// `INDEXER_TC_MAX_TILES`), that still gives every multiprocessor
    /// `INDEXER_TC_BLOCKS_PER_SM` blocks. A block stages its row's query once for all its tiles,
    /// so more tiles a block is less query traffic (the engine's float32 query of 64 heads × 128
    /// is 32 KB, read once a tile of 64 bf16 keys, 16 KB, at 1 tile a block); but few rows of
    /// short contexts at many tiles a block would leave multiprocessors idle.
    pub fn indexer_tc_tiles(rows: u32, n_keys: u32, sms: u32) -> u32 {
        let key_tiles = u64::from(n_keys.div_ceil(INDEXER_TC_KEYS));
        let wanted = u64::from(sms) * u64::from(INDEXER_TC_BLOCKS_PER_SM);
        (1..=INDEXER_TC_MAX_TILES.ilog2())
            .rev()
            .map(|e| 1 << e)
            .find(|&t| u64::from(rows) * key_tiles.div_ceil(u64::from(t)) >= wanted)
            .unwrap_or(1)
    }

    /// Parts to split each of `rows` rows of up to `n_keys` scores into for their top `k`
    /// (`topk_parts_f32`, then `topk_merge_f32`), on a device of `sms` multiprocessors: 1 (no
    /// split: `topk_rows_f32`, a block a row) once the rows give every multiprocessor a block.
    /// Fewer rows leave multiprocessors idle (a block reads its row five times, one load
    /// after another, so a decode step of 8 rows would use 8 of an H200's 132): their rows
    /// are split into enough parts to fill them, up to `TOPK_MAX_PARTS`, and no more than
    /// √(n_keys / k), as a block's reads of its part (n_keys / parts) and the merge's of the
    /// candidates (parts · k) then weigh the same. That bound also keeps parts at least k
    /// long, as the merge needs ([`topk_split`]).
    pub fn topk_parts(rows: u32, n_keys: u32, k: u32, sms: u32) -> u32 {
        if k == 0 || rows >= sms {
            return 1;
        }
        (sms / rows.max(1))
            .min((n_keys / k).isqrt())
            .clamp(1, TOPK_MAX_PARTS)
    }

    /// `parts` (or fewer) parts of a row of `n_keys` scores for a top `k`, and the scores a part
    /// takes (`part_len`, whole 32-score chunks): `None` when that is one part, so no split.
    /// Parts are at least k long (`topk_parts_f32`'s candidates of a row are then a
    /// contiguous prefix), so at most `n_keys / k` of them.
    pub fn topk_split(n_keys: u32, k: u32, parts: u32) -> Option<(u32, u32)> {
        if k == 0 {
            return None;
        }
        let parts = parts.min(n_keys / k).min(TOPK_MAX_PARTS);
        if parts <= 1 {
            return None;
        }
        let part_len = n_keys.div_ceil(parts).next_multiple_of(32);
        let parts = n_keys.div_ceil(part_len);
        (parts > 1).then_some((parts, part_len))
    }

    /// Whether the fp8 tensor-core indexer takes rows of `dim`: at most
    /// `INDEXER_FP8_TC_MAX_DIM` (a query head and a key one scale each), whole 4-byte words.
    pub fn indexer_fp8_tc_fits(dim: u32) -> bool {
        dim > 0 && dim <= INDEXER_FP8_TC_MAX_DIM && dim.is_multiple_of(4)
    }

    /// Dynamic shared memory of the fp8 tensor-core indexer (`indexer_tc.cuh`:
    /// `indexer_scores_fp8_tc`, `indexer_scores_tc_store_fp8`): the query's heads (rounded up
    /// to 16) and the key tile as e4m3 rows of `dim` rounded up to 32 and padded, the heads'
    /// weights times their scales, the keys' scales, the warps' per-key sums.
    pub fn indexer_fp8_tc_smem_bytes(heads: u32, dim: u32) -> u32 {
        let rows = heads.div_ceil(16) * 16;
        (rows + INDEXER_TC_KEYS) * (dim.div_ceil(32) * 32 + INDEXER_FP8_TC_PAD)
            + rows * 4
            + INDEXER_TC_KEYS * 4
            + INDEXER_TC_WARPS * INDEXER_TC_KEYS * 4
    }

    /// The width of a query or key row in the tensor-core MLA attention's shared memory
    /// (`mla_tc.cuh`): the latent part padded to a multiple of `MLA_TC_WARPS · 8`, then the RoPE
    /// part, padded to a multiple of 16.
    pub fn mla_tc_row_width(latent: u32, rope: u32) -> u32 {
        (latent.div_ceil(MLA_TC_WARPS * 8) * MLA_TC_WARPS * 8 + rope).div_ceil(16) * 16
    }

    /// Whether the tensor-core MLA attention takes these widths: both even (bf16 pairs), the
    /// padded latent within `MLA_TC_MAX_LATENT`.
    pub fn mla_tc_fits(latent: u32, rope: u32) -> bool {
        latent.is_multiple_of(2)
            && rope.is_multiple_of(2)
            && latent.div_ceil(MLA_TC_WARPS * 8) * MLA_TC_WARPS * 8 <= MLA_TC_MAX_LATENT
    }

    /// Dynamic shared memory of the tensor-core MLA attention (`mla_tc.cuh`:
    /// `sparse_mla_attention_bf16_tc`, `mla_latent_attention_tc_*`) with `groups` groups of heads
    /// a block: the block's queries and a tile of keys (bf16 rows of [`mla_tc_row_width`] padded
    /// by `MLA_TC_PAD`), P, the warps' maxima and sums, slots.
    pub fn mla_tc_smem_bytes(latent: u32, rope: u32, groups: u32) -> u32 {
        let stride = mla_tc_row_width(latent, rope) + MLA_TC_PAD;
        let heads = groups * MLA_TC_HEADS;
        (heads + MLA_TC_TILE) * stride * 2
            + heads * (MLA_TC_TILE + MLA_TC_PAD) * 2
            + 2 * MLA_TC_WARPS * heads * 4
            + MLA_TC_TILE * 4
    }

    /// Keys a split takes (`split_keys` of `mla_latent_attention_*`; 0: no split) when
    /// `blocks` blocks (rows × blocks of heads) attend to at most `longest` keys each on a
    /// device of `sms` multiprocessors. Flash decoding: a block reads its row's keys one tile
    /// at a time, so a decode step of a few rows (a single long request: 8 blocks at 128 heads)
    /// would leave most multiprocessors idle; its keys are split so that the blocks reach one
    /// a multiprocessor, in splits of at least `MLA_SPLIT_MIN_KEYS` keys (a multiple of the
    /// tile, 32), at most `MLA_MAX_SPLITS`. None once the blocks fill the device.
    pub fn mla_split_keys(blocks: u32, longest: u32, sms: u32) -> u32 {
        if blocks >= sms {
            return 0;
        }
        let splits = sms
            .div_ceil(blocks.max(1))
            .min(longest / MLA_SPLIT_MIN_KEYS)
            .min(MLA_MAX_SPLITS);
        if splits <= 1 {
            return 0;
        }
        longest.div_ceil(splits).next_multiple_of(MLA_F32_TILE)
    }

    /// Groups of `MLA_TC_HEADS` heads per block of the tensor-core MLA attention (its block is
    /// `groups · MLA_TC_WARPS · 32` threads) for `rows` query rows of `heads` heads on a device
    /// of `sms` multiprocessors: the most, of 4, 2 and 1, that divides the rows' head groups and
    /// still gives every multiprocessor a block. A block reads each of its row's keys once for
    /// all its heads, so more heads a block is less traffic (at 128 heads, 4 groups read a
    /// row's keys twice, 1 group eight times); but few rows with many heads a block would leave
    /// multiprocessors idle, and then blocks of one group are the better trade.
    pub fn mla_tc_groups(heads: u32, rows: u32, sms: u32) -> u32 {
        let head_groups = heads.div_ceil(MLA_TC_HEADS);
        [MLA_TC_MAX_GROUPS, 2]
            .into_iter()
            .find(|&g| {
                head_groups.is_multiple_of(g)
                    && u64::from(rows) * u64::from(head_groups / g) >= u64::from(sms)
            })
            .unwrap_or(1)
    }
}

/// The kernel named `name`.
pub fn kernel(name: &str) -> Option<&'static Kernel> {
    KERNELS.iter().find(|k| k.name == name)
}

/// The source file named `file` (a `.cu` or a header).
pub fn source(file: &str) -> Option<&'static Source> {
    SOURCES.iter().chain(HEADERS).find(|s| s.file == file)
}
