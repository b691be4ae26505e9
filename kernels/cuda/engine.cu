// The float32 row operations of the engine's CUDA backend (engine/src/backend/cuda.rs), the
// steps between its cuBLAS products. Activations stay float32 as in the CPU reference backend
// (engine/src/backend/cpu.rs), which each kernel mirrors; tensors are row-major, indices int32.
// The engine compiles this file and topk.cu at start-up with NVRTC and -DSMOE_RTC (no system
// headers); the compile check builds it with nvcc like every other file.
#include "common.cuh"
#include "mla_tc.cuh"
#include "indexer_tc.cuh"

#define ENGINE_THREADS 256
#define MLA_F32_WARPS 8
#define MLA_F32_HEADS_PER_WARP 2
#define MLA_F32_HEADS (MLA_F32_WARPS * MLA_F32_HEADS_PER_WARP)
#define MLA_F32_THREADS (MLA_F32_WARPS * 32)
#define MLA_F32_TILE 32
#define MLA_F32_MAX_LATENT 512
#define INDEXER_F32_KEYS 128
#define INDEXER_STORE_MAX_HEADS 64

SMOE_DEVICE float neg_inf() { return __int_as_float(0xff800000); }

// out[r, :] = src[slots[r], :]: embedding lookup and reading a paged cache.
// Launch: grid rows, block ENGINE_THREADS.
extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
gather_rows_f32(float* __restrict__ out, const float* __restrict__ src, const int* __restrict__ slots, int cols) {
    const float* s = src + (size_t)slots[blockIdx.x] * cols;
    float* o = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = s[c];
}

// out[r, :] = float(src[slots[r], :]) for a bf16 table: the embedding lookup with bf16 weights,
// and reading a KV cache kept in bf16.
// Launch: grid rows, block ENGINE_THREADS.
extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
gather_rows_bf16_bits_f32(float* __restrict__ out, const unsigned short* __restrict__ src, const int* __restrict__ slots,
                          int cols) {
    const unsigned short* s = src + (size_t)slots[blockIdx.x] * cols;
    float* o = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = bf16_bits_to_f32(s[c]);
}

// out[r, c] = bf16(fp8(q[r, c]) · row_scales[r · scale_cols + c / 128]): a DeepSeek fp8 weight
// (128×128 block scales, given per row) as the bf16 input of a product.
// Launch: grid ceil(n / ENGINE_THREADS), block ENGINE_THREADS; n = rows · cols.
extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
fp8_dequant_bf16_bits(unsigned short* __restrict__ out, const uint8_t* __restrict__ q,
                      const float* __restrict__ row_scales, long long n, int cols, int scale_cols) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const long long r = i / cols;
    const int c = (int)(i - r * cols);
    out[i] = bf16_bits_rn(fp8_e4m3_value(q[i]) * row_scales[r * scale_cols + c / 128]);
}

// y = x · Wᵀ for a DeepSeek fp8 weight read as it is stored, without a bf16 copy of it: the
// product fp8_dequant_bf16_bits + a bf16 GEMM compute, fused. W is [n, k] e4m3 codes with a
// float32 scale per row and 128-column block (row_scales [n, scale_cols], scale_cols =
// ceil(k / 128)); x is [m, k] float32. Each value enters the tensor cores as the bf16 the
// dequantising kernel would write (bf16(fp8 · scale)), x rounded to bf16, sums in float32.
// Decode's products are a few rows against a large weight, so reading each code once (a byte)
// is the cost, where a dequantised copy writes and reads two bytes more per value.
//
// A block takes FP8_LINEAR_COLS weight rows (16 per warp: two n8 tiles of mma.m16n8k16) and up
// to FP8_LINEAR_ROWS rows of x (as many 16-row tiles as it has rows), and walks k in steps of
// one scale block (128 columns): the step's codes, converted to bf16 with their row's scale,
// and x's columns, rounded, go to shared memory (rows padded to FP8_LINEAR_STRIDE values, so
// a fragment's 32 lanes read 32 banks); the next step's codes are loaded into registers while
// the tensor cores work on this one.
// Rows of x are ldx values apart and rows of y ldy (k and n for one plain product). A batch of
// products (the absorbed MLA's per-head products out of the latent space) takes grid z: product
// b reads x + b · batch_x, the weight rows from b · batch_rows on, and writes y + b · batch_y.
// Launch: grid (ceil(n / FP8_LINEAR_COLS), ceil(m / FP8_LINEAR_ROWS), batch · splits), block
// FP8_LINEAR_WARPS · 32, no dynamic shared memory; splits = ceil(ceil(k / 128) / split_steps).
// Block z (product z / splits, split z % splits) takes the k-steps [split · split_steps,
// (split + 1) · split_steps) and writes y + split · m · ldy: with one split, y itself; with more,
// partial sums that sum_splits_f32 adds (split-K, for the grids of few blocks a decode step has).
#define FP8_LINEAR_WARPS 4
#define FP8_LINEAR_COLS (FP8_LINEAR_WARPS * 16)
#define FP8_LINEAR_ROWS 64
#define FP8_LINEAR_K 128
#define FP8_LINEAR_MIN_BLOCKS 4  // an SM: at most 128 registers a thread
#define FP8_LINEAR_STRIDE (FP8_LINEAR_K + 8)
#define FP8_LINEAR_WORDS (FP8_LINEAR_STRIDE / 2)
#define FP8_LINEAR_CODE_WORDS (FP8_LINEAR_COLS * FP8_LINEAR_K / 4 / (FP8_LINEAR_WARPS * 32))

// Four codes of row `row` (< n) from column c (a multiple of 4) on, as a little-endian word; those
// at or past column k are 0 (value 0). `aligned`: k is a multiple of 4, so the word is loaded whole.
SMOE_DEVICE uint32_t fp8_code_word(const uint8_t* codes, int row, int c, int k, bool aligned) {
    const uint8_t* p = codes + (size_t)row * k + c;
    if (aligned && c + 4 <= k) return *reinterpret_cast<const uint32_t*>(p);
    uint32_t w = 0;
    for (int b = 0; b < 4; ++b)
        if (c + b < k) w |= (uint32_t)p[b] << (8 * b);
    return w;
}

// Where fp8_linear_tc, bf16_linear_tc, fp8_grouped_tc and bf16_grouped_tc take a product's weight from, a
// k-step at a time: the step's FP8_LINEAR_COLS weight rows from row col0 on, FP8_LINEAR_K
// columns, as thread threadIdx.x holds them in registers (`load`, issued a step ahead) and
// then writes them to shared memory as bf16 pairs (`store`, rows FP8_LINEAR_WORDS words
// apart). A step is [FP8_LINEAR_COLS, FP8_LINEAR_K / 4] groups of four columns: thread i takes
// groups i, i + blockDim, … (rows i / 32 + 4j, group i % 32 of each: a warp reads a row's
// step whole); rows past n and columns past k are 0.
//
// Fp8Weight: DeepSeek's e4m3 codes ([n, k], a byte each) with a float32 scale per row and
// 128-column block; each value enters shared memory as bf16(fp8 · scale), what
// fp8_dequant_bf16_bits writes. A group of four codes is one register.
struct Fp8Weight {
    static constexpr int REGS = FP8_LINEAR_CODE_WORDS;
    const uint8_t* codes;
    const float* row_scales;
    int scale_cols;

    SMOE_DEVICE void load(uint32_t (&pre)[REGS], int col0, int n, int k, int step) const {
        const bool aligned = (k & 3) == 0;
#pragma unroll
        for (int j = 0; j < FP8_LINEAR_CODE_WORDS; ++j) {
            const int i = threadIdx.x + j * FP8_LINEAR_WARPS * 32, r = i >> 5, c = step * FP8_LINEAR_K + (i & 31) * 4;
            pre[j] = col0 + r < n && c < k ? fp8_code_word(codes, col0 + r, c, k, aligned) : 0u;
        }
    }

    SMOE_DEVICE void store(uint32_t* ws, const uint32_t (&pre)[REGS], int col0, int n, int step) const {
#pragma unroll
        for (int j = 0; j < FP8_LINEAR_CODE_WORDS; ++j) {
            const int i = threadIdx.x + j * FP8_LINEAR_WARPS * 32, r = i >> 5, wd = i & 31;
            const float s = col0 + r < n ? row_scales[(size_t)(col0 + r) * scale_cols + step] : 0.f;
            const uint32_t w = pre[j];
            uint32_t* dst = ws + r * FP8_LINEAR_WORDS + 2 * wd;
            dst[0] = pack_bf16x2(bf16_bits_rn(fp8_e4m3_value(w & 0xffu) * s),
                                 bf16_bits_rn(fp8_e4m3_value((w >> 8) & 0xffu) * s));
            dst[1] = pack_bf16x2(bf16_bits_rn(fp8_e4m3_value((w >> 16) & 0xffu) * s),
                                 bf16_bits_rn(fp8_e4m3_value(w >> 24) * s));
        }
    }
};

// Bf16Weight: bf16 values ([n, k], their bits), as they are. A group of four values is two
// registers, loaded as one 8-byte word when k is a multiple of 4 (every row then starts 8-byte
// aligned in an allocation), value by value otherwise.
struct Bf16Weight {
    static constexpr int REGS = 2 * FP8_LINEAR_CODE_WORDS;
    const unsigned short* values;

    SMOE_DEVICE void load(uint32_t (&pre)[REGS], int col0, int n, int k, int step) const {
        const bool aligned = (k & 3) == 0;
#pragma unroll
        for (int j = 0; j < FP8_LINEAR_CODE_WORDS; ++j) {
            const int i = threadIdx.x + j * FP8_LINEAR_WARPS * 32, r = i >> 5, c = step * FP8_LINEAR_K + (i & 31) * 4;
            uint32_t lo = 0u, hi = 0u;
            if (col0 + r < n && c < k) {
                const unsigned short* p = values + (size_t)(col0 + r) * k + c;
                if (aligned && c + 4 <= k) {
                    const unsigned long long w = *reinterpret_cast<const unsigned long long*>(p);
                    lo = (uint32_t)w;
                    hi = (uint32_t)(w >> 32);
                } else {
                    unsigned short v[4] = {0, 0, 0, 0};
                    for (int b = 0; b < 4; ++b)
                        if (c + b < k) v[b] = p[b];
                    lo = pack_bf16x2(v[0], v[1]);
                    hi = pack_bf16x2(v[2], v[3]);
                }
            }
            pre[2 * j] = lo;
            pre[2 * j + 1] = hi;
        }
    }

    SMOE_DEVICE void store(uint32_t* ws, const uint32_t (&pre)[REGS], int, int, int) const {
#pragma unroll
        for (int j = 0; j < FP8_LINEAR_CODE_WORDS; ++j) {
            const int i = threadIdx.x + j * FP8_LINEAR_WARPS * 32, r = i >> 5, wd = i & 31;
            uint32_t* dst = ws + r * FP8_LINEAR_WORDS + 2 * wd;
            dst[0] = pre[2 * j];
            dst[1] = pre[2 * j + 1];
        }
    }
};

// The block (blockIdx.x, row block row0 / FP8_LINEAR_ROWS) of one product y = x · Wᵀ over the
// k-steps [first, last), W read through `w` (Fp8Weight or Bf16Weight): the body of
// fp8_linear_tc, bf16_linear_tc, fp8_grouped_tc and bf16_grouped_tc.
template <class Weight>
SMOE_DEVICE void linear_tc_block(float* y, const float* x, const Weight& w, int m, int n, int k, int first, int last,
                                 int ldx, int ldy, int row0) {
    __shared__ uint32_t xs[FP8_LINEAR_ROWS * FP8_LINEAR_WORDS];  // bf16 pairs
    __shared__ uint32_t ws[FP8_LINEAR_COLS * FP8_LINEAR_WORDS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int col0 = blockIdx.x * FP8_LINEAR_COLS;
    const int tiles = min(FP8_LINEAR_ROWS, m - row0 + 15) / 16;  // 16-row tiles of x this block has

    uint32_t pre[Weight::REGS];
    float acc[FP8_LINEAR_ROWS / 16][2][4];
#pragma unroll
    for (int i = 0; i < FP8_LINEAR_ROWS / 16; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    if (first < last) w.load(pre, col0, n, k, first);
    for (int step = first; step < last; ++step) {
        __syncthreads();  // the previous step's tiles are consumed
        w.store(ws, pre, col0, n, step);
        const int k0 = step * FP8_LINEAR_K;
        for (int i = threadIdx.x; i < tiles * 16 * (FP8_LINEAR_K / 2); i += FP8_LINEAR_WARPS * 32) {
            const int r = i / (FP8_LINEAR_K / 2), c = k0 + 2 * (i % (FP8_LINEAR_K / 2));
            const float* xr = x + (size_t)(row0 + r) * ldx;
            const bool row_ok = row0 + r < m;
            const float a = row_ok && c < k ? xr[c] : 0.f, b = row_ok && c + 1 < k ? xr[c + 1] : 0.f;
            xs[r * FP8_LINEAR_WORDS + i % (FP8_LINEAR_K / 2)] = pack_bf16x2(bf16_bits_rn(a), bf16_bits_rn(b));
        }
        __syncthreads();
        if (step + 1 < last) w.load(pre, col0, n, k, step + 1);  // in flight while the tensor cores run

#pragma unroll
        for (int kk = 0; kk < FP8_LINEAR_K / 2; kk += 8) {  // k16 steps, in words
            uint32_t b[2][2];
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const uint32_t* wr = ws + (warp * 16 + j * 8 + g) * FP8_LINEAR_WORDS + kk + t;
                b[j][0] = wr[0];
                b[j][1] = wr[4];
            }
#pragma unroll
            for (int i = 0; i < FP8_LINEAR_ROWS / 16; ++i) {
                if (i >= tiles) break;  // block-uniform
                const uint32_t* lo = xs + (i * 16 + g) * FP8_LINEAR_WORDS + kk + t;
                const uint32_t* hi = lo + 8 * FP8_LINEAR_WORDS;
                const uint32_t a[4] = {lo[0], hi[0], lo[4], hi[4]};
                mma_bf16_16816(acc[i][0], a, b[0]);
                mma_bf16_16816(acc[i][1], a, b[1]);
            }
        }
    }

#pragma unroll
    for (int i = 0; i < FP8_LINEAR_ROWS / 16; ++i) {
        if (i >= tiles) break;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int c = col0 + warp * 16 + j * 8 + 2 * t;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = row0 + i * 16 + g + 8 * half;
                if (r >= m) continue;
                float* out = y + (size_t)r * ldy;
                if (c < n) out[c] = acc[i][j][2 * half];
                if (c + 1 < n) out[c + 1] = acc[i][j][2 * half + 1];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(FP8_LINEAR_WARPS * 32, FP8_LINEAR_MIN_BLOCKS)
fp8_linear_tc(float* __restrict__ y, const float* __restrict__ x, const uint8_t* __restrict__ codes,
              const float* __restrict__ row_scales, int m, int n, int k, int scale_cols, int split_steps, int ldx,
              int ldy, long long batch_x, int batch_rows, long long batch_y) {
    const int steps = (k + FP8_LINEAR_K - 1) / FP8_LINEAR_K;
    const int splits = (steps + split_steps - 1) / split_steps;
    const int product = blockIdx.z / splits, split = blockIdx.z % splits;
    const int first = split * split_steps;
    const Fp8Weight w = {codes + (size_t)product * batch_rows * k,
                         row_scales + (size_t)product * batch_rows * scale_cols, scale_cols};
    linear_tc_block(y + (size_t)split * m * ldy + product * batch_y, x + product * batch_x, w, m, n, k, first,
                    min(steps, first + split_steps), ldx, ldy, blockIdx.y * FP8_LINEAR_ROWS);
}

// fp8_linear_tc for a bf16 weight ([rows, k], its bits): the same products (x rounded to bf16,
// float32 sums and outputs), batches and k-splits, the weight read 8 bytes at a time where k is
// a multiple of 4. A decode step's product of a bf16 weight runs here instead of as a
// conversion of x to bf16 and a cuBLAS call: one launch, not two.
// Launch: as fp8_linear_tc.
extern "C" __global__ void __launch_bounds__(FP8_LINEAR_WARPS * 32, FP8_LINEAR_MIN_BLOCKS)
bf16_linear_tc(float* __restrict__ y, const float* __restrict__ x, const unsigned short* __restrict__ values, int m,
               int n, int k, int split_steps, int ldx, int ldy, long long batch_x, int batch_rows, long long batch_y) {
    const int steps = (k + FP8_LINEAR_K - 1) / FP8_LINEAR_K;
    const int splits = (steps + split_steps - 1) / split_steps;
    const int product = blockIdx.z / splits, split = blockIdx.z % splits;
    const int first = split * split_steps;
    const Bf16Weight w = {values + (size_t)product * batch_rows * k};
    linear_tc_block(y + (size_t)split * m * ldy + product * batch_y, x + product * batch_x, w, m, n, k, first,
                    min(steps, first + split_steps), ldx, ldy, blockIdx.y * FP8_LINEAR_ROWS);
}

// Which group and which of its row blocks grid row blockIdx.y of fp8_grouped_tc or
// bf16_grouped_tc takes: tile_offsets[g] .. tile_offsets[g + 1] are group g's tiles of
// FP8_LINEAR_ROWS rows (groups + 1 entries, as moe_expert_slots writes them), so the grid has a
// row per tile, however the rows fall over the groups, and none for a group with no rows. A grid
// row past tile_offsets[groups] (a grid sized before the routing was known) has nothing to do:
// false. Block-uniform.
SMOE_DEVICE bool grouped_tile(const int* tile_offsets, int groups, int& group, int& row0) {
    const int tile = blockIdx.y;
    if (tile >= tile_offsets[groups]) return false;
    int lo = 0, hi = groups;  // the last group whose tiles start at or before `tile`
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (tile_offsets[mid] <= tile)
            lo = mid;
        else
            hi = mid;
    }
    group = lo;
    row0 = (tile - tile_offsets[lo]) * FP8_LINEAR_ROWS;
    return true;
}

// The routed experts' products of a MoE layer in one launch, each expert's weight read in place
// as fp8_linear_tc reads one: group e multiplies rows offsets[e] .. offsets[e + 1] of x ([rows,
// k], the pairs' rows in expert order) by its weight (n × k codes at codes[e], scales at
// row_scales[e], device addresses) into the same rows of y ([rows, n]); grid row y is the tile
// grouped_tile names. No k-split: a layer's tiles give the grid its blocks. Any number of rows
// a group: a prefill chunk's as well as a decode step's.
// Launch: grid (ceil(n / FP8_LINEAR_COLS), tiles (tile_offsets[groups], or more), 1), block
// FP8_LINEAR_WARPS · 32.
extern "C" __global__ void __launch_bounds__(FP8_LINEAR_WARPS * 32, FP8_LINEAR_MIN_BLOCKS)
fp8_grouped_tc(float* __restrict__ y, const float* __restrict__ x, const unsigned long long* __restrict__ codes,
               const unsigned long long* __restrict__ row_scales, const int* __restrict__ offsets,
               const int* __restrict__ tile_offsets, int groups, int n, int k, int scale_cols) {
    int e, row0;
    if (!grouped_tile(tile_offsets, groups, e, row0)) return;  // block-uniform, before any barrier
    const int start = offsets[e], rows = offsets[e + 1] - start;
    const Fp8Weight w = {reinterpret_cast<const uint8_t*>(codes[e]), reinterpret_cast<const float*>(row_scales[e]),
                         scale_cols};
    linear_tc_block(y + (size_t)start * n, x + (size_t)start * k, w, rows, n, k, 0,
                    (k + FP8_LINEAR_K - 1) / FP8_LINEAR_K, k, n, row0);
}

// fp8_grouped_tc for bf16 experts: group e multiplies rows offsets[e] .. offsets[e + 1] of x
// ([rows, k] float32, rounded to bf16 as they enter the tensor cores) by its bf16 weight (n × k
// at weights[e], a device address) into the same rows of y ([rows, n] float32): the numbers of
// a bf16 weight's product expert by expert (x rounded to bf16, float32 sums and outputs), in one
// launch whose group sizes are read on the device.
// Launch: as fp8_grouped_tc.
extern "C" __global__ void __launch_bounds__(FP8_LINEAR_WARPS * 32, FP8_LINEAR_MIN_BLOCKS)
bf16_grouped_tc(float* __restrict__ y, const float* __restrict__ x, const unsigned long long* __restrict__ weights,
                const int* __restrict__ offsets, const int* __restrict__ tile_offsets, int groups, int n, int k) {
    int e, row0;
    if (!grouped_tile(tile_offsets, groups, e, row0)) return;  // block-uniform, before any barrier
    const int start = offsets[e], rows = offsets[e + 1] - start;
    const Bf16Weight w = {reinterpret_cast<const unsigned short*>(weights[e])};
    linear_tc_block(y + (size_t)start * n, x + (size_t)start * k, w, rows, n, k, 0,
                    (k + FP8_LINEAR_K - 1) / FP8_LINEAR_K, k, n, row0);
}

// y[i] = Σ_z partial[z · len + i] for z < splits: the split-K parts of fp8_linear_tc, added in
// order (the same sums every run).
// Launch: grid ceil(len / ENGINE_THREADS), block ENGINE_THREADS.
extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
sum_splits_f32(float* __restrict__ y, const float* __restrict__ partial, int splits, long long len) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    float s = 0.f;
    for (int z = 0; z < splits; ++z) s += partial[z * len + i];
    y[i] = s;
}

// out[i] = bf16(x[i]): the input of a product with a bf16 weight.
// Launch: grid ceil(n / ENGINE_THREADS), block ENGINE_THREADS.
extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
f32_to_bf16_bits(unsigned short* __restrict__ out, const float* __restrict__ x, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = bf16_bits_rn(x[i]);
}

// dst[slots[r], :] = rows[r, :]: writing a paged cache (slots distinct).
// Launch: grid rows, block ENGINE_THREADS.
extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
scatter_rows_f32(float* __restrict__ dst, const float* __restrict__ rows, const int* __restrict__ slots, int cols) {
    const float* s = rows + (size_t)blockIdx.x * cols;
    float* d = dst + (size_t)slots[blockIdx.x] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) d[c] = s[c];
}

// dst[slots[r], :] = bf16(rows[r, :]): writing a paged cache kept in bf16 (slots distinct);
// gather_rows_bf16_bits_f32 reads it back.
// Launch: grid rows, block ENGINE_THREADS.
extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
scatter_rows_f32_to_bf16_bits(unsigned short* __restrict__ dst, const float* __restrict__ rows,
                              const int* __restrict__ slots, int cols) {
    const float* s = rows + (size_t)blockIdx.x * cols;
    unsigned short* d = dst + (size_t)slots[blockIdx.x] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) d[c] = bf16_bits_rn(s[c]);
}

// The e4m3 ("fn") code nearest x, ties to even, saturating at +-448; NaN gives 0x7f (the
// engine's f32_to_fp8_e4m3, bit for bit).
SMOE_DEVICE unsigned int f32_to_e4m3_rn(float x) {
    if (x != x) return 0x7fu;
    const unsigned int sign = (__float_as_uint(x) >> 31) << 7;
    const float a = fminf(fabsf(x), 448.f);
    if (a < 0.015625f) return sign | (unsigned int)__float2int_rn(a * 512.f);  // subnormal steps 2^-9
    const unsigned int bits = __float_as_uint(a);
    int exp = (int)((bits >> 23) & 0xffu) - 127;
    unsigned int keep = (bits >> 20) & 7u;
    const unsigned int rest = bits & 0xfffffu;
    if (rest > 0x80000u || (rest == 0x80000u && (keep & 1u))) keep += 1u;
    if (keep == 8u) {
        keep = 0u;
        exp += 1;
    }
    const unsigned int code = ((unsigned int)(exp + 7) << 3) | keep;
    return sign | (code < 0x7eu ? code : 0x7eu);
}

#define KV_FP8_BLOCK 128

// The scale an fp8 block of largest magnitude `amax` takes (the engine's fp8_row): amax maps to
// 448, e4m3's largest, with a floor for all-zero blocks; with ue8m0 (a checkpoint whose
// quantization_config has scale_fmt "ue8m0", as DeepSeek-V3.2's) rounded up to a power of two.
// The pool's keys and, over an fp8 pool, the indexer's queries are rounded with it, so both
// sides must compute it alike.
SMOE_DEVICE float kv_fp8_scale(float amax, int ue8m0) {
    const float s = fmaxf(amax, 1e-4f) / 448.f;
    return ue8m0 ? pow2_at_or_above(s) : s;
}

// A KV cache kept in fp8 (FlashMLA's layout for the latent): row r of rows goes to slot
// slots[r] as e4m3 codes of x / scale, one scale per KV_FP8_BLOCK values, mapping the block's
// largest magnitude (at least 1e-4) to 448 (kv_fp8_scale, a power of two at or above that with
// ue8m0). scales has ceil(cols / KV_FP8_BLOCK) per row.
// Launch: grid rows, block ENGINE_THREADS (>= KV_FP8_BLOCK).
extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
scatter_rows_f32_to_fp8(uint8_t* __restrict__ codes, float* __restrict__ scales, const float* __restrict__ rows,
                        const int* __restrict__ slots, int cols, int ue8m0) {
    __shared__ float scratch[32];
    const float* s = rows + (size_t)blockIdx.x * cols;
    const size_t slot = (size_t)slots[blockIdx.x];
    const int blocks = (cols + KV_FP8_BLOCK - 1) / KV_FP8_BLOCK;
    for (int b = 0; b < blocks; ++b) {
        const int c = b * KV_FP8_BLOCK + (int)threadIdx.x;
        const bool mine = threadIdx.x < KV_FP8_BLOCK && c < cols;
        const float x = mine ? s[c] : 0.f;
        const float scale = kv_fp8_scale(block_max(fabsf(x), scratch), ue8m0);
        if (mine) codes[slot * cols + c] = (uint8_t)f32_to_e4m3_rn(x / scale);
        if (threadIdx.x == 0) scales[slot * blocks + b] = scale;
    }
}

// out[r, c] = e4m3(codes[slots[r], c]) * scales[slots[r], c / KV_FP8_BLOCK]: reading it back.
// Launch: grid rows, block ENGINE_THREADS.
extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
gather_rows_fp8_f32(float* __restrict__ out, const uint8_t* __restrict__ codes, const float* __restrict__ scales,
                    const int* __restrict__ slots, int cols) {
    const size_t slot = (size_t)slots[blockIdx.x];
    const int blocks = (cols + KV_FP8_BLOCK - 1) / KV_FP8_BLOCK;
    float* o = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        o[c] = fp8_e4m3_value(codes[slot * cols + c]) * scales[slot * blocks + c / KV_FP8_BLOCK];
}

// out[rows[j], :] += weights[j] · y[j, :]: one expert's outputs into the MoE sum (rows distinct
// within a launch; experts are added one launch after another, in a fixed order).
// Launch: grid pairs, block ENGINE_THREADS.
extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
scatter_add_rows_f32(float* __restrict__ out, const float* __restrict__ y, const int* __restrict__ rows,
                     const float* __restrict__ weights, int cols) {
    const float w = weights[blockIdx.x];
    const float* s = y + (size_t)blockIdx.x * cols;
    float* d = out + (size_t)rows[blockIdx.x] * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) d[c] += w * s[c];
}

// out[r, :] += sum_j weights[pairs[j]] · y[pairs[j], :] over j in offsets[r] .. offsets[r + 1]
// (accumulate != 0; else out[r, :] = the sum, and out is never read): the routed experts' outputs
// (a row per (token, expert) pair, grouped by expert) summed into each token's row, in the listed
// order (experts ascending), as scatter_add_rows_f32 adds them expert after expert; a negative
// entry of `pairs` (a pair another expert shard computes) adds nothing. The _bf16_bits form reads
// y as bf16 bits.
// Launch: grid rows of out, block ENGINE_THREADS.
extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
combine_rows_f32(float* __restrict__ out, const float* __restrict__ y, const int* __restrict__ offsets,
                 const int* __restrict__ pairs, const float* __restrict__ weights, int cols, int accumulate) {
    float* d = out + (size_t)blockIdx.x * cols;
    const int first = offsets[blockIdx.x], last = offsets[blockIdx.x + 1];
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float acc = accumulate ? d[c] : 0.f;
        for (int j = first; j < last; ++j)
            if (pairs[j] >= 0) acc += weights[pairs[j]] * y[(size_t)pairs[j] * cols + c];
        d[c] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
combine_rows_bf16_bits_f32(float* __restrict__ out, const unsigned short* __restrict__ y,
                           const int* __restrict__ offsets, const int* __restrict__ pairs,
                           const float* __restrict__ weights, int cols, int accumulate) {
    float* d = out + (size_t)blockIdx.x * cols;
    const int first = offsets[blockIdx.x], last = offsets[blockIdx.x + 1];
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        float acc = accumulate ? d[c] : 0.f;
        for (int j = first; j < last; ++j)
            if (pairs[j] >= 0) acc += weights[pairs[j]] * bf16_bits_to_f32(y[(size_t)pairs[j] * cols + c]);
        d[c] = acc;
    }
}

// MoE routing (DeepSeek "noaux_tc") on the device, mirroring engine/src/moe.rs `route`.
#define ROUTE_WARPS 4
#define ROUTE_MAX_EXPERTS 512
#define ROUTE_SLOT_THREADS 256

#define ROUTE_KEY_MIN (-2147483647 - 1)
#define ROUTE_NONE 0x7fffffff

// x's place in the order of Rust's f32::total_cmp, which moe.rs sorts by, as a signed integer:
// -inf < ... < -0 < +0 < ... < +inf < NaN, every NaN taken as the positive quiet NaN first (as
// moe.rs `canonical` takes it: a NaN's sign differs between the host's arithmetic and the GPU's).
// Comparing these instead of floats makes every comparison decided (a NaN too), so the lanes of
// a warp agree on each winner, as the host does.
SMOE_DEVICE int total_order_key(float x) {
    int bits = __float_as_int(x);
    if ((bits & 0x7fffffff) > 0x7f800000) bits = 0x7fc00000;  // a NaN, tested on the bits (no fast-math folding)
    return bits ^ (int)((unsigned int)(bits >> 31) >> 1);
}

// Warp-wide argmax of (key, index): the larger key wins, the lower index on ties; every lane
// ends with the winner.
SMOE_DEVICE void warp_argmax(int& key, int& idx) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const int ok = __shfl_xor_sync(0xffffffffu, key, offset);
        const int oi = __shfl_xor_sync(0xffffffffu, idx, offset);
        if (ok > key || (ok == key && oi < idx)) {
            key = ok;
            idx = oi;
        }
    }
}

// One warp per token. s = sigmoid(logits); b = s + bias picks the experts: groups scored by the
// sum of their two largest b, the topk_group best groups kept, then the top_k largest b among
// them. Weights are the unbiased s of the chosen experts, normalised (sum + 1e-20) when
// norm_topk_prob, times routed_scaling_factor. ids come out sorted ascending, weights aligned.
// Values are ranked as f32::total_cmp ranks them (total_order_key; ties to the lower index), so
// NaN logits route as on the host and every token gets top_k distinct experts.
// Limits: experts <= 512, n_group <= 32, top_k <= 32, experts / n_group >= 2 when n_group > 1.
// Launch: grid = ceil(tokens / 4), block = 128.
extern "C" __global__ void __launch_bounds__(ROUTE_WARPS * 32)
moe_route_f32(int* __restrict__ ids, float* __restrict__ weights, const float* __restrict__ logits,
              const float* __restrict__ bias, int tokens, int experts, int top_k, int n_group,
              int topk_group, int norm_topk_prob, float routed_scaling_factor) {
    __shared__ float score_s[ROUTE_WARPS][ROUTE_MAX_EXPERTS];
    __shared__ float biased_s[ROUTE_WARPS][ROUTE_MAX_EXPERTS];
    __shared__ int chosen_s[ROUTE_WARPS][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t = blockIdx.x * ROUTE_WARPS + warp;
    if (t >= tokens) return;  // warp-uniform; no block barrier below
    float* sc = score_s[warp];
    float* b = biased_s[warp];

    for (int e = lane; e < experts; e += 32) {
        const float s = sigmoidf(logits[(size_t)t * experts + e]);
        sc[e] = s;
        b[e] = s + bias[e];
    }
    __syncwarp();

    if (n_group > 1) {
        const int size = experts / n_group;
        int gkey = ROUTE_KEY_MIN;
        if (lane < n_group) {
            // The group's two largest (size >= 2), as moe.rs sorts it and adds its first two.
            float first = b[lane * size], second = b[lane * size + 1];
            if (total_order_key(second) > total_order_key(first)) {
                const float tmp = first;
                first = second;
                second = tmp;
            }
            for (int e = lane * size + 2; e < (lane + 1) * size; ++e) {
                const float v = b[e];
                if (total_order_key(v) > total_order_key(first)) {
                    second = first;
                    first = v;
                } else if (total_order_key(v) > total_order_key(second)) {
                    second = v;
                }
            }
            gkey = total_order_key(first + second);
        }
        bool keep = false;
        for (int r = 0; r < topk_group; ++r) {
            const bool racing = lane < n_group && !keep;
            int key = racing ? gkey : ROUTE_KEY_MIN;
            int g = racing ? lane : ROUTE_NONE;
            warp_argmax(key, g);
            if (lane == g) keep = true;
        }
        __syncwarp();
        if (lane < n_group && !keep)
            for (int e = lane * size; e < (lane + 1) * size; ++e) b[e] = -INFINITY;
        __syncwarp();
    }

    // top_k rounds of a warp argmax; a chosen expert leaves the race through `taken` bits.
    unsigned int taken = 0;  // bit j set: expert lane + 32 j taken (experts <= 512 -> 16 bits)
    for (int r = 0; r < top_k; ++r) {
        int key = ROUTE_KEY_MIN;
        int idx = ROUTE_NONE;  // loses every tie: a lane with nothing left never wins
        for (int j = 0; lane + 32 * j < experts; ++j) {
            const int e = lane + 32 * j;
            if (taken & (1u << j)) continue;
            const int k = total_order_key(b[e]);
            if (idx == ROUTE_NONE || k > key) {  // first untaken, then strictly larger (lower e wins ties)
                key = k;
                idx = e;
            }
        }
        warp_argmax(key, idx);
        if ((idx & 31) == lane) taken |= 1u << (idx >> 5);
        if (lane == 0) chosen_s[warp][r] = idx;
    }
    __syncwarp();

    if (lane == 0) {
        int* c = chosen_s[warp];
        for (int i = 1; i < top_k; ++i)  // insertion sort: top_k is small
            for (int j = i; j > 0 && c[j - 1] > c[j]; --j) {
                const int tmp = c[j];
                c[j] = c[j - 1];
                c[j - 1] = tmp;
            }
        float sum = 0.f;
        for (int i = 0; i < top_k; ++i) sum += sc[c[i]];
        sum += 1e-20f;
        for (int i = 0; i < top_k; ++i) {
            // As moe.rs divides, then scales: the same roundings.
            float w = sc[c[i]];
            if (norm_topk_prob) w = w / sum;
            ids[(size_t)t * top_k + i] = c[i];
            weights[(size_t)t * top_k + i] = w * routed_scaling_factor;
        }
    }
}

// The lists a MoE layer's grouped products and combine_rows_f32 read, from the routing on the
// device (moe_route_f32's ids and weights, top_k a token): pairs p = t · top_k + j in expert
// order, an expert's in token order (the order the host's lists have, so the products and sums
// are the host path's). group_offsets[e] .. group_offsets[e + 1] are expert e's slots
// (experts + 1 entries); tile_offsets[e] .. tile_offsets[e + 1] are its tiles of
// FP8_LINEAR_ROWS slots, the grid rows of fp8_grouped_tc and bf16_grouped_tc (experts + 1
// entries; tile_offsets[experts] tiles in all); slot s holds token slot_rows[s] with weight
// slot_weights[s]; pair p is at slot slot_of[p]; row_offsets[t] = t · top_k (tokens + 1
// entries: each token's pairs for combine_rows_f32, whose `pairs` is slot_of). load[e] +=
// expert e's pairs (the step's expert counters, kept on the device; null: none).
// The block counts the pairs (shared-memory atomics: a count does not depend on their order),
// then places them a block-wide tile of pairs at a time, each pair at its expert's next slot
// plus the number of earlier pairs of the tile with the same expert (lanes of its warp by
// shuffles, earlier warps by their counts in shared memory): deterministic, and linear in the
// pairs, so a prefill chunk's tens of thousands cost what a decode step's hundreds do per pair.
// A pair whose id is outside [0, experts) (an expert shard's pair that another shard computes;
// see moe_shard_pairs) takes no slot: its slot_of is -1, which combine_rows_f32 skips, and the
// slots it leaves free at the end (group_offsets[experts] .. pairs) hold row 0 with weight 0, so
// that a gather over all `pairs` slots reads only rows that exist.
// Limits: experts <= ROUTE_MAX_EXPERTS.
// Launch: grid 1, block ROUTE_SLOT_THREADS (exactly: in_warp has a row per warp of it).
extern "C" __global__ void __launch_bounds__(ROUTE_SLOT_THREADS)
moe_expert_slots(int* __restrict__ group_offsets, int* __restrict__ tile_offsets, int* __restrict__ row_offsets,
                 int* __restrict__ slot_rows, float* __restrict__ slot_weights, int* __restrict__ slot_of,
                 float* __restrict__ load, const int* __restrict__ ids, const float* __restrict__ weights, int tokens,
                 int top_k, int experts) {
    constexpr int WARPS = ROUTE_SLOT_THREADS / 32;
    __shared__ int start[ROUTE_MAX_EXPERTS + 1];  // counts, then each expert's first slot
    __shared__ int next[ROUTE_MAX_EXPERTS];        // each expert's next free slot while placing
    __shared__ int in_warp[WARPS][ROUTE_MAX_EXPERTS];  // this tile's pairs by warp and expert
    const int pairs = tokens * top_k, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int e = threadIdx.x; e <= experts; e += blockDim.x) start[e] = 0;
    for (int i = threadIdx.x; i < WARPS * ROUTE_MAX_EXPERTS; i += blockDim.x) (&in_warp[0][0])[i] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int e = ids[p];
        if (e >= 0 && e < experts)
            atomicAdd(&start[e + 1], 1);
        else
            slot_of[p] = -1;
    }
    __syncthreads();
    if (load)
        for (int e = threadIdx.x; e < experts; e += blockDim.x) load[e] += (float)start[e + 1];
    __syncthreads();
    if (threadIdx.x == 0) {
        int tiles = 0;
        tile_offsets[0] = 0;
        for (int e = 0; e < experts; ++e) {
            tiles += (start[e + 1] + FP8_LINEAR_ROWS - 1) / FP8_LINEAR_ROWS;
            tile_offsets[e + 1] = tiles;
            start[e + 1] += start[e];
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e <= experts; e += blockDim.x) {
        group_offsets[e] = start[e];
        if (e < experts) next[e] = start[e];
    }
    for (int t = threadIdx.x; t <= tokens; t += blockDim.x) row_offsets[t] = t * top_k;
    for (int s = start[experts] + threadIdx.x; s < pairs; s += blockDim.x) {
        slot_rows[s] = 0;
        slot_weights[s] = 0.f;
    }
    // Every thread runs every tile (the barriers inside), with id -1 past the pairs.
    for (int base = 0; base < pairs; base += blockDim.x) {
        const int p = base + threadIdx.x;
        const int e = p < pairs ? ids[p] : -1;
        const bool placed = e >= 0 && e < experts;
        int before = 0, after = 0;  // lanes of this warp with the same expert, below and above
        for (int j = 0; j < 32; ++j) {
            const int other = __shfl_sync(0xffffffffu, e, j);
            if (other == e) {
                before += j < lane;
                after += j > lane;
            }
        }
        if (placed && after == 0) in_warp[warp][e] = before + 1;
        __syncthreads();
        int slot = 0, later = 0;  // later: this tile's pairs of e in later warps
        if (placed) {
            slot = next[e] + before;
            for (int w = 0; w < WARPS; ++w) {
                if (w < warp) slot += in_warp[w][e];
                if (w > warp) later += in_warp[w][e];
            }
            slot_rows[slot] = p / top_k;
            slot_weights[slot] = weights[p];
            slot_of[p] = slot;
        }
        __syncthreads();  // every slot of the tile read `next`
        if (placed && after == 0) {
            if (later == 0) next[e] = slot + 1;  // the tile's last pair of e
            in_warp[warp][e] = 0;
        }
        __syncthreads();
    }
}

// Expert shard `s`'s part of a MoE layer routed on the device: local_ids[p] is the shard's own
// number for pair p's expert when this shard computes the pair, else -1; moe_expert_slots then
// lists the shard's pairs over its own experts. `dispatch` holds three arrays of `experts`
// values for this shard: local[e] (its number for expert e, or -1 where it holds no copy),
// copy[e] (which of e's copies it holds) and copies[e] (how many shards hold one). An expert's
// pairs in expert order (ids, slot_of and group_offsets are the whole layer's, from
// moe_expert_slots) are dealt to its copies in turn: the pair at rank r among its expert's goes
// to copy r mod copies[e], as ExpertShards::dispatch deals them on the host.
// Limits: ids in [0, experts).
// Launch: grid ceil(pairs / ENGINE_THREADS), block ENGINE_THREADS.
extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
moe_shard_pairs(int* __restrict__ local_ids, const int* __restrict__ ids, const int* __restrict__ slot_of,
                const int* __restrict__ group_offsets, const int* __restrict__ dispatch, int pairs, int experts) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= pairs) return;
    const int e = ids[p];
    const int local = dispatch[e], copy = dispatch[experts + e], copies = dispatch[2 * experts + e];
    const int rank = slot_of[p] - group_offsets[e];
    local_ids[p] = local >= 0 && rank % copies == copy ? local : -1;
}

// out[r, :] = x[r, start .. start + len].
// Launch: grid rows, block ENGINE_THREADS.
extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
copy_columns_f32(float* __restrict__ out, const float* __restrict__ x, int src_cols, int start, int len) {
    const float* s = x + (size_t)blockIdx.x * src_cols + start;
    float* o = out + (size_t)blockIdx.x * len;
    for (int c = threadIdx.x; c < len; c += blockDim.x) o[c] = s[c];
}

// out[r] = x[r] · w / sqrt(mean(x[r]²) + eps).
// Launch: grid rows, block ENGINE_THREADS.
extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
rms_norm_f32(float* __restrict__ out, const float* __restrict__ x, const float* __restrict__ w, int cols, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * cols;
    float* o = out + (size_t)blockIdx.x * cols;
    float sq = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) sq += xr[c] * xr[c];
    const float inv = 1.f / sqrtf(block_sum(sq, scratch) / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = xr[c] * inv * w[c];
}

// out[r] = (x[r] - mean) / sqrt(var + eps) · w + b (biased variance).
// Launch: grid rows, block ENGINE_THREADS.
extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
layer_norm_f32(float* __restrict__ out, const float* __restrict__ x, const float* __restrict__ w,
               const float* __restrict__ b, int cols, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * cols;
    float* o = out + (size_t)blockIdx.x * cols;
    float sum = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += xr[c];
    const float mean = block_sum(sum, scratch) / (float)cols;
    float dev = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dev += (xr[c] - mean) * (xr[c] - mean);
    const float inv = 1.f / sqrtf(block_sum(dev, scratch) / (float)cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = (xr[c] - mean) * inv * w[c] + b[c];
}

// x[i] += y[i].
// Launch: grid ceil(n / ENGINE_THREADS), block ENGINE_THREADS.
extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
add_f32(float* __restrict__ x, const float* __restrict__ y, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// gate[i] = silu(gate[i]) · up[i].
// Launch: grid ceil(n / ENGINE_THREADS), block ENGINE_THREADS.
extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
silu_mul_f32(float* __restrict__ gate, const float* __restrict__ up, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) gate[i] = siluf(gate[i]) * up[i];
}

// out[i] = bf16(silu(gate[i]) · up[i]) from bf16 gate and up (the grouped expert products'
// outputs), computed in float32: the bf16 input of the down product.
// Launch: grid ceil(n / ENGINE_THREADS), block ENGINE_THREADS.
extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
silu_mul_bf16_bits(unsigned short* __restrict__ out, const unsigned short* __restrict__ gate,
                   const unsigned short* __restrict__ up, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        const float g = bf16_bits_to_f32(gate[i]);
        const float u = bf16_bits_to_f32(up[i]);
        out[i] = bf16_bits_rn(siluf(g) * u);
    }
}

// Rotates x[r, h·head_width + offset ..][..2·half] of every row r and head h by the angles whose
// cos/sin (YaRN factor included) the host computed for row r's position: cos_t[r·half + i].
// Pairs (2i, 2i+1) when interleaved, else (i, i + half).
// Launch: grid (rows, heads), block 64.
extern "C" __global__ void __launch_bounds__(64)
rope_f32(float* __restrict__ x, const float* __restrict__ cos_t, const float* __restrict__ sin_t, int cols,
         int head_width, int offset, int half, int interleaved) {
    float* v = x + (size_t)blockIdx.x * cols + (size_t)blockIdx.y * head_width + offset;
    const float* c = cos_t + (size_t)blockIdx.x * half;
    const float* s = sin_t + (size_t)blockIdx.x * half;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const int a = interleaved ? 2 * i : i;
        const int b = interleaved ? 2 * i + 1 : i + half;
        const float xa = v[a], xb = v[b];
        v[a] = xa * c[i] - xb * s[i];
        v[b] = xb * c[i] + xa * s[i];
    }
}

// Rotates the dim values x[blockIdx.x · dim ..] (dim a power of two) by the orthonormal
// Walsh-Hadamard matrix H / sqrt(dim), Sylvester's order: log2(dim) passes of sums and
// differences over the vector in shared memory, then the scale (rsqrt_dim = 1 / sqrt(dim)).
// Launch: grid (vectors), block HADAMARD_THREADS, dynamic shared memory dim floats.
#define HADAMARD_THREADS 64
extern "C" __global__ void __launch_bounds__(HADAMARD_THREADS)
hadamard_f32(float* __restrict__ x, int dim, float rsqrt_dim) {
    extern __shared__ float v[];
    float* row = x + (size_t)blockIdx.x * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) v[i] = row[i];
    __syncthreads();
    for (int h = 1; h < dim; h *= 2) {
        for (int p = threadIdx.x; p < dim / 2; p += blockDim.x) {
            const int i = (p / h) * 2 * h + p % h, j = i + h;
            const float a = v[i], b = v[j];
            v[i] = a + b;
            v[j] = a - b;
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < dim; i += blockDim.x) row[i] = v[i] * rsqrt_dim;
}

// Row blockIdx.x of the indexer's queries into shared memory, as [heads, dim] or (by_dim) as
// [dim, heads], followed by its head weights; returns where the weights are.
SMOE_DEVICE const float* stage_indexer_row(float* smem, const float* q, const float* w, int heads, int dim,
                                           bool by_dim) {
    const size_t r = blockIdx.x;
    for (int i = threadIdx.x; i < heads * dim; i += blockDim.x)
        smem[by_dim ? (i % dim) * heads + i / dim : i] = q[r * heads * dim + i];
    float* ws = smem + heads * dim;
    for (int i = threadIdx.x; i < heads; i += blockDim.x) ws[i] = w[r * heads + i];
    __syncthreads();
    return ws;
}

// The lightning indexer's scores: scores[r, s] = Σ_h w[r, h] · ReLU(scale · q[r, h, :] · keys[s, :])
// for s < n_visible[r], float32 -inf for the rest of the row (n_keys columns).
// Launch: grid (rows, ceil(n_keys / INDEXER_F32_KEYS)), block INDEXER_F32_KEYS (a key per
// thread), dynamic shared memory (heads · dim + heads) floats.
extern "C" __global__ void __launch_bounds__(INDEXER_F32_KEYS)
indexer_scores_f32(float* __restrict__ scores, const float* __restrict__ q, const float* __restrict__ w,
                   const float* __restrict__ keys, const int* __restrict__ n_visible, int n_keys, int heads,
                   int dim, float scale) {
    extern __shared__ float smem[];
    const float* qs = smem;  // [heads, dim]
    const float* ws = stage_indexer_row(smem, q, w, heads, dim, false);
    const int r = blockIdx.x;
    const int s = blockIdx.y * INDEXER_F32_KEYS + threadIdx.x;
    if (s >= n_keys) return;
    float total = neg_inf();
    if (s < n_visible[r]) {
        const float* k = keys + (size_t)s * dim;
        total = 0.f;
        for (int h = 0; h < heads; ++h) {
            float dot = 0.f;
            for (int d = 0; d < dim; ++d) dot += qs[h * dim + d] * k[d];
            total += ws[h] * fmaxf(scale * dot, 0.f);
        }
    }
    scores[(size_t)r * n_keys + s] = total;
}

// Rows read where they are cached, in a paged KV store: float32, bf16 bits, or fp8 codes with a
// scale per KV_FP8_BLOCK values (the layouts scatter_rows_* write). store.row(r, cols) is row r,
// whose value c is row(c): the row's addresses are worked out once, not per value.
struct StoreF32 {
    const float* rows;
    struct Row {
        const float* p;
        SMOE_DEVICE float operator()(int c) const { return p[c]; }
        SMOE_DEVICE uint32_t bf16_pair(int i) const { return pack_bf16x2(bf16_bits_rn(p[2 * i]), bf16_bits_rn(p[2 * i + 1])); }
    };
    SMOE_DEVICE Row row(size_t r, int cols) const { return Row{rows + r * cols}; }
};
struct StoreBf16 {
    const unsigned short* rows;
    struct Row {
        const unsigned short* p;
        SMOE_DEVICE float operator()(int c) const { return bf16_bits_to_f32(p[c]); }
        SMOE_DEVICE uint32_t bf16_pair(int i) const { return load_bf16x2(p + 2 * i); }  // cols even
    };
    SMOE_DEVICE Row row(size_t r, int cols) const { return Row{rows + r * cols}; }
};
struct StoreFp8 {
    const uint8_t* codes;
    const float* scales;
    struct Row {
        const uint8_t* codes;
        const float* scales;
        SMOE_DEVICE float operator()(int c) const {
            return fp8_e4m3_value(codes[c]) * scales[(unsigned int)c / KV_FP8_BLOCK];
        }
        SMOE_DEVICE uint32_t bf16_pair(int i) const {
            return pack_bf16x2(bf16_bits_rn((*this)(2 * i)), bf16_bits_rn((*this)(2 * i + 1)));
        }
        // Codes 4i .. 4i + 3 as one word (cols a multiple of 4), and the first block's scale.
        SMOE_DEVICE uint32_t code_word(int i) const { return load_u32(codes + 4 * i); }
        SMOE_DEVICE float scale() const { return scales[0]; }
    };
    SMOE_DEVICE Row row(size_t r, int cols) const {
        return Row{codes + r * cols, scales + r * ((cols + KV_FP8_BLOCK - 1) / KV_FP8_BLOCK)};
    }
};

// Where a paged cache keeps a sequence's token s: row blocks[s / block_size] · block_size +
// s % block_size of its KV store (blocks: the sequence's block table).
SMOE_DEVICE size_t paged_row(const int* blocks, int block_size, int s) {
    return (size_t)blocks[s / block_size] * block_size + s % block_size;
}

// The staged queries ([dim, heads]) as the scores over a store's keys take them: over an fp8
// pool, DeepSeek's fp8 indexer's, each head's rounded in place as the pool rounds a key (the
// engine's fp8_row: e4m3 codes times a scale per KV_FP8_BLOCK values, power-of-two scales with
// ue8m0); over the others, as they are. Every thread of the block calls it.
template <typename Store>
SMOE_DEVICE void round_staged_queries(const Store&, float*, int, int, int) {}
SMOE_DEVICE void round_staged_queries(const StoreFp8&, float* qs, int heads, int dim, int ue8m0) {
    const int blocks = (dim + KV_FP8_BLOCK - 1) / KV_FP8_BLOCK;
    for (int i = threadIdx.x; i < heads * blocks; i += blockDim.x) {  // a thread a head's block
        const int h = i % heads, c0 = i / heads * KV_FP8_BLOCK;
        const int c1 = c0 + KV_FP8_BLOCK < dim ? c0 + KV_FP8_BLOCK : dim;
        float amax = 0.f;
        for (int c = c0; c < c1; ++c) amax = fmaxf(amax, fabsf(qs[c * heads + h]));
        const float s = kv_fp8_scale(amax, ue8m0);
        for (int c = c0; c < c1; ++c) qs[c * heads + h] = fp8_e4m3_value(f32_to_e4m3_rn(qs[c * heads + h] / s)) * s;
    }
    __syncthreads();
}

// indexer_scores_f32's scores with key s of row r read where a paged cache keeps it, row
// table[s / block_size] · block_size + s % block_size of a KV store, where table = blocks +
// row_tables[r] is the block table of row r's sequence (the host uploads the batch's tables, a
// value a block, one after another, not a row per key): no gathered copy of the keys, and the
// rows of a batch's sequences are scored in one launch (over an fp8 pool, from the queries
// round_staged_queries rounds). `smem` is the kernel's dynamic shared memory. Each thread reads its key's values once (widening bf16 or fp8
// as it goes) and keeps a running dot product per head, so heads ≤ INDEXER_STORE_MAX_HEADS.
// Launch: as indexer_scores_f32 (grid (rows, ceil(n_keys / INDEXER_F32_KEYS)), block
// INDEXER_F32_KEYS, dynamic shared memory (heads · dim + heads) floats).
template <typename Store>
SMOE_DEVICE void indexer_scores_store(float* smem, float* scores, const float* q, const float* w, Store store,
                                      const int* blocks, const int* row_tables, int block_size,
                                      const int* n_visible, int n_keys, int heads, int dim, float scale,
                                      int ue8m0) {
    const float* qs = smem;  // [dim, heads]: a key value meets every head's q at once
    const float* ws = stage_indexer_row(smem, q, w, heads, dim, true);
    round_staged_queries(store, smem, heads, dim, ue8m0);
    const int r = blockIdx.x;
    const int s = blockIdx.y * INDEXER_F32_KEYS + threadIdx.x;
    if (s >= n_keys) return;
    float total = neg_inf();
    if (s < n_visible[r]) {
        const auto key = store.row(paged_row(blocks + row_tables[r], block_size, s), dim);
        float dot[INDEXER_STORE_MAX_HEADS];
#pragma unroll
        for (int h = 0; h < INDEXER_STORE_MAX_HEADS; ++h) dot[h] = 0.f;
        for (int d = 0; d < dim; ++d) {
            const float k = key(d);
#pragma unroll
            for (int h = 0; h < INDEXER_STORE_MAX_HEADS; ++h)
                if (h < heads) dot[h] += qs[d * heads + h] * k;
        }
        total = 0.f;
#pragma unroll
        for (int h = 0; h < INDEXER_STORE_MAX_HEADS; ++h)
            if (h < heads) total += ws[h] * fmaxf(scale * dot[h], 0.f);
    }
    scores[(size_t)r * n_keys + s] = total;
}

extern "C" __global__ void __launch_bounds__(INDEXER_F32_KEYS)
indexer_scores_store_f32(float* __restrict__ scores, const float* __restrict__ q, const float* __restrict__ w,
                         const float* __restrict__ keys, const int* __restrict__ blocks,
                         const int* __restrict__ row_tables, int block_size, const int* __restrict__ n_visible,
                         int n_keys, int heads, int dim, float scale) {
    extern __shared__ float smem[];
    indexer_scores_store(smem, scores, q, w, StoreF32{keys}, blocks, row_tables, block_size, n_visible, n_keys, heads,
                         dim, scale, 0);
}

extern "C" __global__ void __launch_bounds__(INDEXER_F32_KEYS)
indexer_scores_store_bf16_bits(float* __restrict__ scores, const float* __restrict__ q, const float* __restrict__ w,
                               const unsigned short* __restrict__ keys, const int* __restrict__ blocks,
                               const int* __restrict__ row_tables, int block_size,
                               const int* __restrict__ n_visible, int n_keys, int heads, int dim, float scale) {
    extern __shared__ float smem[];
    indexer_scores_store(smem, scores, q, w, StoreBf16{keys}, blocks, row_tables, block_size, n_visible, n_keys, heads,
                         dim, scale, 0);
}

// Over an fp8 pool the queries are rounded first, as DeepSeek's fp8 indexer rounds them
// (round_staged_queries; ue8m0: power-of-two scales, as the pool's). At least one block an SM (not ptxas's default occupancy target): the
// fp8 decode needs a few registers beyond the 80 the 64 sums and the rest fit in, which the
// default would spill.
extern "C" __global__ void __launch_bounds__(INDEXER_F32_KEYS, 1)
indexer_scores_store_fp8(float* __restrict__ scores, const float* __restrict__ q, const float* __restrict__ w,
                         const uint8_t* __restrict__ codes, const float* __restrict__ key_scales,
                         const int* __restrict__ blocks, const int* __restrict__ row_tables, int block_size,
                         const int* __restrict__ n_visible, int n_keys, int heads, int dim, float scale,
                         int ue8m0) {
    extern __shared__ float smem[];
    indexer_scores_store(smem, scores, q, w, StoreFp8{codes, key_scales}, blocks, row_tables, block_size, n_visible,
                         n_keys, heads, dim, scale, ue8m0);
}

// indexer_scores_store_f32 and _bf16_bits on the bf16 tensor cores (indexer_tc.cuh): the queries
// and the keys rounded to bf16 as they enter shared memory (a bf16 pool's keys as they are),
// products summed in float32; masked entries -inf as there. Same parameters; dim even, any
// number of heads (the block's shared memory grows with them: indexer_tc_smem_bytes). An fp8
// pool's keys take the fp8 tensor cores (indexer_scores_tc_store_fp8 below).
// A table of one block as long as the keys (and row_tables all 0) reads rows 0, 1, … of a plain
// tensor. A block scores `tiles` (≥ 1) tiles of INDEXER_TC_KEYS keys, its query rounded and staged
// once for them all.
// Launch: grid (rows, ceil(n_keys / (tiles · INDEXER_TC_KEYS))), block INDEXER_TC_WARPS · 32.
struct F32IndexerQueries {
    const float* q;  // [rows, heads · dim]
    int heads, dim;
    SMOE_DEVICE unsigned short at(int t, int h, int c) const { return bf16_bits_rn(q[((size_t)t * heads + h) * dim + c]); }
};
template <typename Store>
struct PagedKeys {
    Store store;
    const int* blocks;
    int block_size, dim;
    SMOE_DEVICE typename Store::Row row(int s) const { return store.row(paged_row(blocks, block_size, s), dim); }
};
template <typename Store>
SMOE_DEVICE void indexer_scores_tc_store(float* scores, const float* q, const float* w, Store store, const int* blocks,
                                         const int* row_tables, int block_size, const int* n_visible, int n_keys,
                                         int heads, int dim, float scale, int tiles) {
    const int t = blockIdx.x;
    indexer_scores_tc(scores + (size_t)t * n_keys, F32IndexerQueries{q, heads, dim}, IndexerWeights{w, heads},
                      PagedKeys<Store>{store, blocks + row_tables[t], block_size, dim}, t,
                      blockIdx.y * tiles * INDEXER_TC_KEYS, tiles, n_visible[t] < n_keys ? n_visible[t] : n_keys,
                      n_keys, heads, dim, scale, neg_inf());
}

// One block an SM at least, as indexer_scores_bf16_tc (ptxas's default occupancy target spills
// the tile loop on sm_80); at 72 to 76 registers (ptxas -v, CUDA 13.0) and 35 KB of shared memory
// at 64 heads × 128 a block, an SM still holds 6 blocks on sm_90.
extern "C" __global__ void __launch_bounds__(INDEXER_TC_WARPS * 32, 1)
indexer_scores_tc_store_f32(float* __restrict__ scores, const float* __restrict__ q, const float* __restrict__ w,
                            const float* __restrict__ keys, const int* __restrict__ blocks,
                            const int* __restrict__ row_tables, int block_size, const int* __restrict__ n_visible,
                            int n_keys, int heads, int dim, float scale, int tiles) {
    indexer_scores_tc_store(scores, q, w, StoreF32{keys}, blocks, row_tables, block_size, n_visible, n_keys, heads,
                            dim, scale, tiles);
}

extern "C" __global__ void __launch_bounds__(INDEXER_TC_WARPS * 32, 1)
indexer_scores_tc_store_bf16_bits(float* __restrict__ scores, const float* __restrict__ q,
                                  const float* __restrict__ w, const unsigned short* __restrict__ keys,
                                  const int* __restrict__ blocks, const int* __restrict__ row_tables,
                                  int block_size, const int* __restrict__ n_visible, int n_keys, int heads, int dim,
                                  float scale, int tiles) {
    indexer_scores_tc_store(scores, q, w, StoreBf16{keys}, blocks, row_tables, block_size, n_visible, n_keys, heads,
                            dim, scale, tiles);
}

// DeepSeek's fp8 indexer over an fp8 pool, on the fp8 tensor cores (indexer_scores_e4m3_tc,
// indexer_tc.cuh): each head's query rounded to e4m3 with a scale per head as the pool rounds a
// key (fp8_row), the products of codes exact, each key's scale applied to its sum. Parameters as
// indexer_scores_tc_store_* (`tiles` too); dim ≤ INDEXER_FP8_TC_MAX_DIM, a multiple of 4.
// Launch: grid (rows, ceil(n_keys / (tiles · INDEXER_TC_KEYS))), block INDEXER_TC_WARPS · 32, dynamic shared
// memory indexer_fp8_tc_smem_bytes(heads, dim).
struct F32Fp8IndexerQueries {
    const float* q;  // [rows, heads · dim]
    int heads;
    int ue8m0;
    // As the engine's fp8_row: scale = max(amax, 1e-4) / 448 (kv_fp8_scale: a power of two at
    // or above that with ue8m0), codes e4m3(x / scale).
    SMOE_DEVICE float stage_head(uint8_t* dst, int t, int h, int dim, int dim_p, int lane) const {
        const float* x = q + ((size_t)t * heads + h) * dim;
        float v[INDEXER_FP8_TC_MAX_DIM / 32];
        float amax = 0.f;
#pragma unroll
        for (int j = 0; j < INDEXER_FP8_TC_MAX_DIM / 32; ++j) {
            const int c = lane + 32 * j;
            v[j] = c < dim ? x[c] : 0.f;
            amax = fmaxf(amax, fabsf(v[j]));
        }
        const float s = kv_fp8_scale(warp_max(amax), ue8m0);
#pragma unroll
        for (int j = 0; j < INDEXER_FP8_TC_MAX_DIM / 32; ++j) {
            const int c = lane + 32 * j;
            if (c < dim_p) dst[c] = c < dim ? (uint8_t)f32_to_e4m3_rn(v[j] / s) : (uint8_t)0;
        }
        return s;
    }
};

extern "C" __global__ void __launch_bounds__(INDEXER_TC_WARPS * 32)
indexer_scores_tc_store_fp8(float* __restrict__ scores, const float* __restrict__ q, const float* __restrict__ w,
                            const uint8_t* __restrict__ codes, const float* __restrict__ key_scales,
                            const int* __restrict__ blocks, const int* __restrict__ row_tables, int block_size,
                            const int* __restrict__ n_visible, int n_keys, int heads, int dim, float scale,
                            int tiles, int ue8m0) {
    const int t = blockIdx.x;
    indexer_scores_e4m3_tc<false>(scores + (size_t)t * n_keys, F32Fp8IndexerQueries{q, heads, ue8m0},
                                 IndexerWeights{w, heads},
                                 PagedKeys<StoreFp8>{StoreFp8{codes, key_scales}, blocks + row_tables[t], block_size, dim},
                                 t, blockIdx.y * tiles * INDEXER_TC_KEYS, tiles,
                                 n_visible[t] < n_keys ? n_visible[t] : n_keys, n_keys, heads, dim, scale, neg_inf());
}

// The indexer's picks (topk_rows_f32's out: token positions, -1 none) as the rows of a paged
// cache that hold them, in place: entry j of row r becomes paged_row(blocks + row_tables[r],
// block_size, picks[r, j]), as the scores read that key, so the attention
// (mla_latent_attention's keys) reads the picks where they are, with no trip to the host.
// Launch: grid ceil(n / ENGINE_THREADS), block ENGINE_THREADS; n = rows · width.
extern "C" __global__ void __launch_bounds__(ENGINE_THREADS)
picks_to_pool_rows(int* __restrict__ picks, const int* __restrict__ blocks, const int* __restrict__ row_tables,
                   int block_size, int width, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int s = picks[i];
    if (s >= 0) picks[i] = (int)paged_row(blocks + row_tables[i / width], block_size, s);
}

// Split keys (flash decoding), for few rows with long key lists: with split_keys > 0, block z
// (blockIdx.z) of a row takes entries z · split_keys .. (z + 1) · split_keys of its list (none
// past its end), writes its context normalised over those keys to ctx + z · rows · heads ·
// latent (rows = gridDim.x) and their log-sum-exp, -inf when none is valid, to lse + z · rows ·
// heads; mla_combine_splits_f32 then weighs the splits into the context. split_keys = 0: the
// whole list, ctx the context, lse (if not null) its log-sum-exp.
struct MlaSplit {
    int split_keys;
    const int* offsets;
    int r;
    unsigned int rows;
    int heads, latent;
    SMOE_DEVICE int total() const { return offsets[r + 1] - offsets[r]; }
    SMOE_DEVICE int begin() const { return split_keys > 0 ? min(total(), (int)blockIdx.z * split_keys) : 0; }
    SMOE_DEVICE int count() const { return split_keys > 0 ? min(total() - begin(), split_keys) : total(); }
    SMOE_DEVICE size_t part() const { return split_keys > 0 ? (size_t)blockIdx.z * rows * heads : 0; }
    SMOE_DEVICE float* context(float* ctx) const { return ctx + part() * latent; }
    SMOE_DEVICE float* lse(float* lse) const { return lse == nullptr ? lse : lse + part(); }
};

// The context of every row r and head h from `splits` split-key parts (MlaSplit): with L_z the
// parts' log-sum-exps (partial [z, r, h, :] and lse [z, r, h]) and M their max,
//   ctx[r, h, :] = Σ_z e^(L_z - M) · partial[z, r, h, :] / Σ_z e^(L_z - M),   0 when M = -inf.
// Launch: grid (rows, heads), block MLA_COMBINE_THREADS.
#define MLA_COMBINE_THREADS 128
extern "C" __global__ void __launch_bounds__(MLA_COMBINE_THREADS)
mla_combine_splits_f32(float* __restrict__ ctx, const float* __restrict__ partial, const float* __restrict__ lse,
                       int splits, int heads, int latent_dim) {
    const size_t r = blockIdx.x, h = blockIdx.y, rows = gridDim.x;
    float top = neg_inf();
    for (int z = 0; z < splits; ++z) top = fmaxf(top, lse[(z * rows + r) * heads + h]);
    float* out = ctx + (r * heads + h) * latent_dim;
    if (top == neg_inf()) {
        for (int d = threadIdx.x; d < latent_dim; d += blockDim.x) out[d] = 0.f;
        return;
    }
    float total = 0.f;
    for (int z = 0; z < splits; ++z) total += expf(lse[(z * rows + r) * heads + h] - top);
    for (int d = threadIdx.x; d < latent_dim; d += blockDim.x) {
        float acc = 0.f;
        for (int z = 0; z < splits; ++z) {
            const float weight = expf(lse[(z * rows + r) * heads + h] - top);
            if (weight > 0.f) acc = fmaf(weight, partial[((z * rows + r) * heads + h) * latent_dim + d], acc);
        }
        out[d] = acc / total;
    }
}

// Absorbed MLA attention in the latent space, for query row r and head h:
//   score_s = (q_lat[r, h] · latent[s] + q_pe[r, h] · k_pe[s]) · scale over the keys
//   s = keys[key_offsets[r] .. key_offsets[r + 1]] (-1 = none), online softmax, and
//   ctx[r, h, :] = Σ_s p_s · latent[s] (zero when no key is valid).
// The latent and RoPE-key rows are read where they are, through a store reader as the indexer's
// (float32 rows, bf16 bits, or fp8 codes with a scale per KV_FP8_BLOCK values), so a paged
// cache's rows are read in place in the dtype they are cached in; keys are their row numbers.
// q_lat is [rows, heads·latent]; q_pe row r head h starts at q_pe + r·q_pe_row + h·q_pe_head.
//
// A block takes one row and MLA_F32_HEADS heads (MLA_F32_WARPS warps of MLA_F32_HEADS_PER_WARP):
// each tile of MLA_F32_TILE keys is read from the store once, widened into shared memory, and
// scored against all of the block's heads there (lane = key while scoring; rows padded to an
// odd stride, so the 32 lanes read 32 banks); each head keeps a running max and sum, and lane l
// accumulates its heads' latent dims l, l + 32, ….
// Launch: grid (rows, ceil(heads / MLA_F32_HEADS), splits (MlaSplit; 1 without)), block
// MLA_F32_THREADS, dynamic shared memory mla_f32_smem_bytes (MLA_F32_HEADS · dqk + MLA_F32_TILE ·
// (dqk + 1) + MLA_F32_TILE words, dqk = latent + rope: 108 KB at 512 + 64, so raise the kernel's
// limit above 48 KB first); latent ≤ MLA_F32_MAX_LATENT.
template <typename LatentStore, typename RopeStore>
SMOE_DEVICE void mla_latent_attention(float* smem, float* ctx, const float* q_lat, const float* q_pe,
                                      LatentStore latent, RopeStore k_pe, const int* keys, const int* key_offsets,
                                      int heads, int latent_dim, int rope_dim, int q_pe_row, int q_pe_head,
                                      float scale, float* lse, int split_keys) {
    const int dqk = latent_dim + rope_dim, kstride = dqk + 1;
    float* q_s = smem;                          // [MLA_F32_HEADS, dqk]
    float* k_s = q_s + MLA_F32_HEADS * dqk;     // [MLA_F32_TILE, kstride]
    int* slot_s = reinterpret_cast<int*>(k_s + MLA_F32_TILE * kstride);  // [MLA_F32_TILE]
    const int r = blockIdx.x, head0 = blockIdx.y * MLA_F32_HEADS;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    for (int i = threadIdx.x; i < MLA_F32_HEADS * dqk; i += MLA_F32_THREADS) {
        const int h = head0 + i / dqk, d = i % dqk;
        float v = 0.f;
        if (h < heads)
            v = d < latent_dim ? q_lat[((size_t)r * heads + h) * latent_dim + d]
                               : q_pe[(size_t)r * q_pe_row + (size_t)h * q_pe_head + (d - latent_dim)];
        q_s[i] = v;
    }

    constexpr int ITEMS = MLA_F32_MAX_LATENT / 32;
    float m[MLA_F32_HEADS_PER_WARP], l[MLA_F32_HEADS_PER_WARP], acc[MLA_F32_HEADS_PER_WARP][ITEMS];
#pragma unroll
    for (int hh = 0; hh < MLA_F32_HEADS_PER_WARP; ++hh) {
        m[hh] = neg_inf();
        l[hh] = 0.f;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) acc[hh][i] = 0.f;
    }

    const MlaSplit split{split_keys, key_offsets, r, gridDim.x, heads, latent_dim};
    const int first = key_offsets[r] + split.begin(), count = split.count();
    ctx = split.context(ctx);
    lse = split.lse(lse);
    for (int t0 = 0; t0 < count; t0 += MLA_F32_TILE) {
        __syncthreads();  // the previous tile is consumed (and q_s written, on the first pass)
        if (threadIdx.x < MLA_F32_TILE) {
            const int j = t0 + threadIdx.x;
            slot_s[threadIdx.x] = j < count ? keys[first + j] : -1;
        }
        __syncthreads();
        for (int j = warp; j < MLA_F32_TILE; j += MLA_F32_WARPS) {  // a warp a row, widened once
            const int s = slot_s[j];
            float* row = k_s + j * kstride;
            if (s < 0) {
                for (int d = lane; d < dqk; d += 32) row[d] = 0.f;
                continue;
            }
            const auto lat = latent.row((size_t)s, latent_dim);
            const auto pe = k_pe.row((size_t)s, rope_dim);
            for (int d = lane; d < latent_dim; d += 32) row[d] = lat(d);
            for (int d = lane; d < rope_dim; d += 32) row[latent_dim + d] = pe(d);
        }
        __syncthreads();

        const bool key_ok = slot_s[lane] >= 0;
        const float* k_row = k_s + lane * kstride;
#pragma unroll
        for (int hh = 0; hh < MLA_F32_HEADS_PER_WARP; ++hh) {
            const int hl = warp * MLA_F32_HEADS_PER_WARP + hh;
            if (head0 + hl >= heads) continue;  // warp-uniform
            const float* qh = q_s + hl * dqk;
            float dot = 0.f;
            for (int d = 0; d < dqk; ++d) dot = fmaf(qh[d], k_row[d], dot);
            const float score = key_ok ? dot * scale : neg_inf();
            const float m_new = fmaxf(m[hh], warp_max(score));
            if (m_new == neg_inf()) continue;  // nothing visible yet for this head (warp-uniform)
            const float correction = expf(m[hh] - m_new);  // 0 while m is -inf
            const float p = key_ok ? expf(score - m_new) : 0.f;
            l[hh] = l[hh] * correction + warp_sum(p);
            m[hh] = m_new;
#pragma unroll
            for (int i = 0; i < ITEMS; ++i) acc[hh][i] *= correction;
            for (int key = 0; key < MLA_F32_TILE; ++key) {
                const float pk = __shfl_sync(0xffffffffu, p, key);
                if (pk == 0.f) continue;  // warp-uniform: an invalid key, or underflow
                const float* row = k_s + key * kstride;
#pragma unroll
                for (int i = 0; i < ITEMS; ++i) {
                    const int d = lane + 32 * i;
                    if (d < latent_dim) acc[hh][i] = fmaf(pk, row[d], acc[hh][i]);
                }
            }
        }
    }

#pragma unroll
    for (int hh = 0; hh < MLA_F32_HEADS_PER_WARP; ++hh) {
        const int h = head0 + warp * MLA_F32_HEADS_PER_WARP + hh;
        if (h >= heads) continue;
        const float inv = l[hh] > 0.f ? 1.f / l[hh] : 0.f;
        float* out = ctx + ((size_t)r * heads + h) * latent_dim;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            const int d = lane + 32 * i;
            if (d < latent_dim) out[d] = acc[hh][i] * inv;
        }
        if (lse != nullptr && lane == 0) lse[(size_t)r * heads + h] = l[hh] > 0.f ? m[hh] + logf(l[hh]) : neg_inf();
    }
}

extern "C" __global__ void __launch_bounds__(MLA_F32_THREADS)
mla_latent_attention_f32(float* __restrict__ ctx, const float* __restrict__ q_lat, const float* __restrict__ q_pe,
                         const float* __restrict__ latent, const float* __restrict__ k_pe,
                         const int* __restrict__ keys, const int* __restrict__ key_offsets, int heads,
                         int latent_dim, int rope_dim, int q_pe_row, int q_pe_head, float scale,
                         float* __restrict__ lse, int split_keys) {
    extern __shared__ float smem[];
    mla_latent_attention(smem, ctx, q_lat, q_pe, StoreF32{latent}, StoreF32{k_pe}, keys, key_offsets, heads,
                         latent_dim, rope_dim, q_pe_row, q_pe_head, scale, lse, split_keys);
}

// mla_latent_attention_f32 over bf16 rows (their bits): a bf16 KV pool read in place.
extern "C" __global__ void __launch_bounds__(MLA_F32_THREADS)
mla_latent_attention_bf16_bits(float* __restrict__ ctx, const float* __restrict__ q_lat,
                               const float* __restrict__ q_pe, const unsigned short* __restrict__ latent,
                               const unsigned short* __restrict__ k_pe, const int* __restrict__ keys,
                               const int* __restrict__ key_offsets, int heads, int latent_dim, int rope_dim,
                               int q_pe_row, int q_pe_head, float scale, float* __restrict__ lse,
                               int split_keys) {
    extern __shared__ float smem[];
    mla_latent_attention(smem, ctx, q_lat, q_pe, StoreBf16{latent}, StoreBf16{k_pe}, keys, key_offsets, heads,
                         latent_dim, rope_dim, q_pe_row, q_pe_head, scale, lse, split_keys);
}

// mla_latent_attention_f32 over an fp8 KV pool read in place: latent rows as fp8 e4m3 codes with
// a float32 scale per KV_FP8_BLOCK values (scatter_rows_f32_to_fp8's layout), RoPE keys as bf16
// bits (the pool keeps them bf16, as DeepSeek's cache does). Two blocks an SM at least (its
// 108 KB of shared memory allows no more), not ptxas's default target, whose 64 registers the
// fp8 decode and the split's pointers would spill past.
extern "C" __global__ void __launch_bounds__(MLA_F32_THREADS, 2)
mla_latent_attention_fp8(float* __restrict__ ctx, const float* __restrict__ q_lat, const float* __restrict__ q_pe,
                         const uint8_t* __restrict__ latent_codes, const float* __restrict__ latent_scales,
                         const unsigned short* __restrict__ k_pe, const int* __restrict__ keys,
                         const int* __restrict__ key_offsets, int heads, int latent_dim, int rope_dim, int q_pe_row,
                         int q_pe_head, float scale, float* __restrict__ lse, int split_keys) {
    extern __shared__ float smem[];
    mla_latent_attention(smem, ctx, q_lat, q_pe, StoreFp8{latent_codes, latent_scales}, StoreBf16{k_pe}, keys,
                         key_offsets, heads, latent_dim, rope_dim, q_pe_row, q_pe_head, scale, lse, split_keys);
}

// The same attention on the tensor cores (mla_tc.cuh): the queries and the cached rows rounded to
// bf16 as they enter shared memory (a bf16 pool's rows as they are; an fp8 pool's values times
// their scales), the probabilities rounded to bf16 for P·V, every sum in float32. Same
// parameters as mla_latent_attention_*; latent and rope even, latent ≤ MLA_TC_MAX_LATENT.
// Launch: block MLA_TC_WARPS · 32 · groups (1 to MLA_TC_MAX_GROUPS groups of MLA_TC_HEADS heads),
// grid (rows, ceil(heads / (MLA_TC_HEADS · groups)), splits), dynamic shared memory as mla_tc.cuh
// says (56.6 KB at 512 + 64 for one group: raise the kernel's limit above 48 KB first).
struct F32Queries {
    const float* q_lat;
    const float* q_pe;
    int heads, latent, q_pe_row, q_pe_head;
    SMOE_DEVICE unsigned short at(int r, int h, int d) const {
        return bf16_bits_rn(d < latent ? q_lat[((size_t)r * heads + h) * latent + d]
                                       : q_pe[(size_t)r * q_pe_row + (size_t)h * q_pe_head + (d - latent)]);
    }
};
// Row r's keys keys[offsets[r] ..], or with split_keys > 0 this block's part of them (MlaSplit).
struct KeyLists {
    const int* keys;
    const int* offsets;
    int split_keys;
    SMOE_DEVICE MlaSplit split(int r) const { return MlaSplit{split_keys, offsets, r, 0, 0, 0}; }
    SMOE_DEVICE int count(int r) const { return split(r).count(); }
    SMOE_DEVICE int slot(int r, int j) const { return keys[offsets[r] + split(r).begin() + j]; }
};
template <typename LatentStore, typename RopeStore>
struct PoolRows {
    LatentStore latent;
    RopeStore k_pe;
    int latent_dim, rope_dim;
    struct Row {
        typename LatentStore::Row lat;
        typename RopeStore::Row pe;
        SMOE_DEVICE uint32_t latent_pair(int i) const { return lat.bf16_pair(i); }
        SMOE_DEVICE uint32_t rope_pair(int i) const { return pe.bf16_pair(i); }
    };
    SMOE_DEVICE Row row(int s) const { return Row{latent.row((size_t)s, latent_dim), k_pe.row((size_t)s, rope_dim)}; }
};
template <typename LatentStore, typename RopeStore>
SMOE_DEVICE PoolRows<LatentStore, RopeStore> pool_rows(LatentStore latent, RopeStore k_pe, int latent_dim,
                                                       int rope_dim) {
    return PoolRows<LatentStore, RopeStore>{latent, k_pe, latent_dim, rope_dim};
}
// The context rows (this split's, with split_keys > 0) and, when lse is not null, the log-sum-exp.
struct F32Context {
    float* ctx;
    float* lse;
    int heads, latent;
    SMOE_DEVICE void write(int r, int h, int d, float v) const { ctx[((size_t)r * heads + h) * latent + d] = v; }
    SMOE_DEVICE void lse_of(int r, int h, float v) const {
        if (lse != nullptr) lse[(size_t)r * heads + h] = v;
    }
};
SMOE_DEVICE F32Context f32_context(float* ctx, float* lse, int split_keys, int heads, int latent) {
    const MlaSplit split{split_keys, nullptr, 0, gridDim.x, heads, latent};
    return F32Context{split.context(ctx), split.lse(lse), heads, latent};
}

extern "C" __global__ void __launch_bounds__(MLA_TC_MAX_THREADS)
mla_latent_attention_tc_f32(float* __restrict__ ctx, const float* __restrict__ q_lat, const float* __restrict__ q_pe,
                            const float* __restrict__ latent, const float* __restrict__ k_pe,
                            const int* __restrict__ keys, const int* __restrict__ key_offsets, int heads,
                            int latent_dim, int rope_dim, int q_pe_row, int q_pe_head, float scale,
                            float* __restrict__ lse, int split_keys) {
    mla_attend_tc(F32Queries{q_lat, q_pe, heads, latent_dim, q_pe_row, q_pe_head},
                  KeyLists{keys, key_offsets, split_keys},
                  pool_rows(StoreF32{latent}, StoreF32{k_pe}, latent_dim, rope_dim),
                  f32_context(ctx, lse, split_keys, heads, latent_dim), blockIdx.x, blockIdx.y * mla_tc_block_heads(),
                  heads, latent_dim, rope_dim, scale);
}

extern "C" __global__ void __launch_bounds__(MLA_TC_MAX_THREADS)
mla_latent_attention_tc_bf16_bits(float* __restrict__ ctx, const float* __restrict__ q_lat,
                                  const float* __restrict__ q_pe, const unsigned short* __restrict__ latent,
                                  const unsigned short* __restrict__ k_pe, const int* __restrict__ keys,
                                  const int* __restrict__ key_offsets, int heads, int latent_dim, int rope_dim,
                                  int q_pe_row, int q_pe_head, float scale, float* __restrict__ lse,
                                  int split_keys) {
    mla_attend_tc(F32Queries{q_lat, q_pe, heads, latent_dim, q_pe_row, q_pe_head},
                  KeyLists{keys, key_offsets, split_keys},
                  pool_rows(StoreBf16{latent}, StoreBf16{k_pe}, latent_dim, rope_dim),
                  f32_context(ctx, lse, split_keys, heads, latent_dim), blockIdx.x, blockIdx.y * mla_tc_block_heads(),
                  heads, latent_dim, rope_dim, scale);
}

extern "C" __global__ void __launch_bounds__(MLA_TC_MAX_THREADS)
mla_latent_attention_tc_fp8(float* __restrict__ ctx, const float* __restrict__ q_lat, const float* __restrict__ q_pe,
                            const uint8_t* __restrict__ latent_codes, const float* __restrict__ latent_scales,
                            const unsigned short* __restrict__ k_pe, const int* __restrict__ keys,
                            const int* __restrict__ key_offsets, int heads, int latent_dim, int rope_dim,
                            int q_pe_row, int q_pe_head, float scale, float* __restrict__ lse,
                            int split_keys) {
    mla_attend_tc(F32Queries{q_lat, q_pe, heads, latent_dim, q_pe_row, q_pe_head},
                  KeyLists{keys, key_offsets, split_keys},
                  pool_rows(StoreFp8{latent_codes, latent_scales}, StoreBf16{k_pe}, latent_dim, rope_dim),
                  f32_context(ctx, lse, split_keys, heads, latent_dim), blockIdx.x, blockIdx.y * mla_tc_block_heads(),
                  heads, latent_dim, rope_dim, scale);
}
