// DSA lightning indexer scores: bf16 inputs (indexer_scores_bf16), or fp8 e4m3 with per-row
// scales (indexer_quant_fp8 + indexer_scores_fp8, DeepSeek's FP8 indexer); float32 accumulation.
// Reference: engine/src/backend/cpu.rs `indexer_select` and engine/tests/fixtures/README.md:
//   I[t, s] = sum_h w[t, h] * ReLU(scale * q[t, h] . k[key_start[t] + s])   for s < n_visible[t]
//   I[t, s] = -FLT_MAX (float32 min, as the reference's additive mask)        otherwise
// `w` already carries Hi^-0.5 (the reference folds it into weights_proj's output); `scale` is Di^-0.5.
// Every entry of scores[t, 0 .. n_keys) is written.
//
// Launch: grid = (ceil(n_keys / INDEXER_KEYS), n_queries), block = 2 * INDEXER_KEYS = 128,
// dynamic shared memory = indexer_smem_bytes(heads, dim) below (33 KB at 64 heads x 128).
// Each thread scores one key over half the heads; the key tile and the query sit in shared memory.
#include "common.cuh"
#include "indexer_tc.cuh"
#include <cuda_fp8.h>

#define INDEXER_KEYS 64
#define INDEXER_QUANT_THREADS 128
#define FP8_E4M3_MAX 448.f

// Shared memory the launch needs: the query (heads x dim bf16), the key tile (INDEXER_KEYS rows
// of dim + 2 bf16: the padding makes the row stride an odd number of words, so no bank conflicts
// when dim % 4 == 0), and the partial sums of the second half of the heads.
// = heads * dim * 2 + INDEXER_KEYS * (dim + 2) * 2 + INDEXER_KEYS * 4 bytes.

extern "C" __global__ void __launch_bounds__(2 * INDEXER_KEYS)
indexer_scores_bf16(float* __restrict__ scores, const __nv_bfloat16* __restrict__ q,
                    const __nv_bfloat16* __restrict__ keys, const float* __restrict__ w,
                    const int* __restrict__ key_start, const int* __restrict__ n_visible,
                    int n_keys, int heads, int dim, float scale, long long scores_stride) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int t = blockIdx.y;
    const int tile0 = blockIdx.x * INDEXER_KEYS;
    const int visible = min(n_visible[t], n_keys);
    const int key_row = threadIdx.x % INDEXER_KEYS;
    const int half_id = threadIdx.x / INDEXER_KEYS;
    const int s = tile0 + key_row;
    float* out_row = scores + (size_t)t * scores_stride;

    if (tile0 >= visible) {  // the whole tile is masked: write the mask and leave
        if (half_id == 0 && s < n_keys) out_row[s] = -3.402823466e38f;
        return;
    }

    const int kstride = dim + 2;  // bf16 elements per key row in shared memory
    __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    __nv_bfloat16* k_s = q_s + heads * dim;
    float* partial = reinterpret_cast<float*>(k_s + INDEXER_KEYS * kstride);

    const __nv_bfloat16* q_t = q + (size_t)t * heads * dim;
    for (int i = threadIdx.x; i < heads * dim; i += blockDim.x) q_s[i] = q_t[i];
    const __nv_bfloat16* k_base = keys + (size_t)key_start[t] * dim;
    for (int i = threadIdx.x; i < INDEXER_KEYS * dim; i += blockDim.x) {
        const int r = i / dim, c = i % dim;
        const int key = tile0 + r;
        k_s[r * kstride + c] = key < visible ? k_base[(size_t)key * dim + c] : f32_to_bf16(0.f);
    }
    __syncthreads();

    float total = 0.f;
    if (s < visible) {
        const float* w_t = w + (size_t)t * heads;
        const int h_half = (heads + 1) / 2;
        const int h_begin = half_id * h_half;
        const int h_end = min(heads, h_begin + h_half);
        const __nv_bfloat162* k2 = reinterpret_cast<const __nv_bfloat162*>(k_s + key_row * kstride);
        for (int h = h_begin; h < h_end; ++h) {
            const __nv_bfloat162* q2 = reinterpret_cast<const __nv_bfloat162*>(q_s + h * dim);
            float dot = 0.f;
            for (int d = 0; d < dim / 2; ++d) {
                const float2 a = __bfloat1622float2(q2[d]);
                const float2 b = __bfloat1622float2(k2[d]);
                dot = fmaf(a.x, b.x, dot);
                dot = fmaf(a.y, b.y, dot);
            }
            total = fmaf(w_t[h], fmaxf(scale * dot, 0.f), total);
        }
    }
    if (half_id == 1) partial[key_row] = total;
    __syncthreads();
    if (half_id == 0 && s < n_keys)
        out_row[s] = s < visible ? total + partial[key_row] : -3.402823466e38f;
}

// ------------------------------------------------------------------------------ tensor cores
// indexer_scores_bf16 with q·kᵀ on the tensor cores (indexer_tc.cuh): the same parameters and
// results, and `tiles` (≥ 1): the tiles of INDEXER_TC_KEYS keys a block scores, its query staged
// once for them all. dim even. Launch: grid = (ceil(n_keys / (tiles · INDEXER_TC_KEYS)),
// n_queries), block = 128, dynamic shared memory = indexer_tc_smem_bytes(heads, dim) (35.3 KB at
// 64 heads x 128).
struct Bf16IndexerQueries {
    const unsigned short* q;  // [T, heads, dim]
    int heads, dim;
    SMOE_DEVICE unsigned short at(int t, int h, int c) const { return q[((size_t)t * heads + h) * dim + c]; }
};
struct Bf16IndexerKeys {
    const unsigned short* base;  // row t's key 0
    int dim;
    struct Row {
        const unsigned short* p;
        SMOE_DEVICE uint32_t bf16_pair(int i) const { return load_bf16x2(p + 2 * i); }
    };
    SMOE_DEVICE Row row(int s) const { return Row{base + (size_t)s * dim}; }
};

// One block an SM at least (not ptxas's default occupancy target, which spills on sm_90a).
extern "C" __global__ void __launch_bounds__(INDEXER_TC_WARPS * 32, 1)
indexer_scores_bf16_tc(float* __restrict__ scores, const __nv_bfloat16* __restrict__ q,
                       const __nv_bfloat16* __restrict__ keys, const float* __restrict__ w,
                       const int* __restrict__ key_start, const int* __restrict__ n_visible,
                       int n_keys, int heads, int dim, float scale, long long scores_stride, int tiles) {
    const int t = blockIdx.y;
    const unsigned short* k_bits = reinterpret_cast<const unsigned short*>(keys);
    indexer_scores_tc(scores + (size_t)t * scores_stride,
                      Bf16IndexerQueries{reinterpret_cast<const unsigned short*>(q), heads, dim},
                      IndexerWeights{w, heads}, Bf16IndexerKeys{k_bits + (size_t)key_start[t] * dim, dim}, t,
                      blockIdx.x * tiles * INDEXER_TC_KEYS, tiles, min(n_visible[t], n_keys), n_keys, heads, dim,
                      scale, -3.402823466e38f);
}

// ---------------------------------------------------------------------------------------- fp8
// DeepSeek-V3.2's FP8 indexer (its inference code's act_quant + fp8_index; DeepGEMM's
// fp8_mqa_logits): keys and queries are cast to e4m3 with one float32 scale per row of `dim`
// values (a key, or one head of a query), and
//   I[t, s] = k_scale[s] * sum_h w[t, h] * ReLU(scale * q_scale[t, h] * (q8[t, h] . k8[s]))
// which, the scales being positive, is the bf16 score of the dequantised values.

// The e4m3 code nearest x, ties to even, saturating at +-448 (NaN stays NaN).
SMOE_DEVICE uint8_t f32_to_e4m3(float x) {
    return (uint8_t)__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
}

// Two e4m3 codes (the low byte first) as floats.
SMOE_DEVICE float2 e4m3x2_to_f32(uint32_t pair) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(pair & 0xffffu), __NV_E4M3);
    return __half22float2(__half2(h));
}

// Per row r of x (`dim` bf16 values): scale = max(max_c |x[r, c]|, 1e-4) / 448, rounded up to a
// power of two when pow2_scale (UE8M0 scales); codes[r, c] = e4m3(x[r, c] / scale).
// Launch: grid rows, block INDEXER_QUANT_THREADS.
extern "C" __global__ void __launch_bounds__(INDEXER_QUANT_THREADS)
indexer_quant_fp8(uint8_t* __restrict__ codes, float* __restrict__ scales, const __nv_bfloat16* __restrict__ x,
                  int dim, int pow2_scale) {
    __shared__ float scratch[32];
    const __nv_bfloat16* xr = x + (size_t)blockIdx.x * dim;
    float amax = 0.f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) amax = fmaxf(amax, fabsf(bf16_to_f32(xr[c])));
    amax = block_max(amax, scratch);
    float scale = fmaxf(amax, 1e-4f) / FP8_E4M3_MAX;
    if (pow2_scale) scale = pow2_at_or_above(scale);
    uint8_t* cr = codes + (size_t)blockIdx.x * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) cr[c] = f32_to_e4m3(bf16_to_f32(xr[c]) / scale);
    if (threadIdx.x == 0) scales[blockIdx.x] = scale;
}

// Shared memory of indexer_scores_fp8: the query's codes (heads x dim bytes), its per-head
// weights w * q_scale * scale (heads floats), the key tile (INDEXER_KEYS rows of dim + 4 bytes:
// an odd number of words per row, so no bank conflicts) and the second half's partial sums.
// = heads * dim + heads * 4 + INDEXER_KEYS * (dim + 4) + INDEXER_KEYS * 4 bytes (17 KB at 64 x 128).
//
// Scores as indexer_scores_bf16 (masking and launch alike) from fp8 codes: q [T, heads, dim]
// with q_scale [T, heads], keys [*, dim] with k_scale [*] (row key_start[t] + s for key s).
// dim must be a multiple of 4. Launch: grid (ceil(n_keys / INDEXER_KEYS), n_queries),
// block 2 * INDEXER_KEYS.
extern "C" __global__ void __launch_bounds__(2 * INDEXER_KEYS)
indexer_scores_fp8(float* __restrict__ scores, const uint8_t* __restrict__ q, const float* __restrict__ q_scale,
                   const uint8_t* __restrict__ keys, const float* __restrict__ k_scale, const float* __restrict__ w,
                   const int* __restrict__ key_start, const int* __restrict__ n_visible, int n_keys, int heads,
                   int dim, float scale, long long scores_stride) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int t = blockIdx.y;
    const int tile0 = blockIdx.x * INDEXER_KEYS;
    const int visible = min(n_visible[t], n_keys);
    const int key_row = threadIdx.x % INDEXER_KEYS;
    const int half_id = threadIdx.x / INDEXER_KEYS;
    const int s = tile0 + key_row;
    float* out_row = scores + (size_t)t * scores_stride;

    if (tile0 >= visible) {
        if (half_id == 0 && s < n_keys) out_row[s] = -3.402823466e38f;
        return;
    }

    const int words = dim / 4;      // 4 codes per 32-bit word
    const int kstride = words + 1;  // words per key row in shared memory
    uint32_t* q_s = reinterpret_cast<uint32_t*>(smem_raw);
    float* wq_s = reinterpret_cast<float*>(q_s + heads * words);
    uint32_t* k_s = reinterpret_cast<uint32_t*>(wq_s + heads);
    float* partial = reinterpret_cast<float*>(k_s + INDEXER_KEYS * kstride);

    const uint32_t* q_t = reinterpret_cast<const uint32_t*>(q + (size_t)t * heads * dim);
    for (int i = threadIdx.x; i < heads * words; i += blockDim.x) q_s[i] = q_t[i];
    for (int h = threadIdx.x; h < heads; h += blockDim.x)
        wq_s[h] = w[(size_t)t * heads + h] * q_scale[(size_t)t * heads + h] * scale;
    const size_t base = (size_t)key_start[t];
    const uint32_t* k_base = reinterpret_cast<const uint32_t*>(keys + base * dim);
    for (int i = threadIdx.x; i < INDEXER_KEYS * words; i += blockDim.x) {
        const int r = i / words, c = i % words;
        const int key = tile0 + r;
        k_s[r * kstride + c] = key < visible ? k_base[(size_t)key * words + c] : 0u;
    }
    __syncthreads();

    float total = 0.f;
    if (s < visible) {
        const int h_half = (heads + 1) / 2;
        const int h_begin = half_id * h_half;
        const int h_end = min(heads, h_begin + h_half);
        const uint32_t* k4 = k_s + key_row * kstride;
        for (int h = h_begin; h < h_end; ++h) {
            const uint32_t* q4 = q_s + h * words;
            float dot = 0.f;
            for (int d = 0; d < words; ++d) {
                const uint32_t a = q4[d], b = k4[d];
                const float2 a01 = e4m3x2_to_f32(a), a23 = e4m3x2_to_f32(a >> 16);
                const float2 b01 = e4m3x2_to_f32(b), b23 = e4m3x2_to_f32(b >> 16);
                dot = fmaf(a01.x, b01.x, dot);
                dot = fmaf(a01.y, b01.y, dot);
                dot = fmaf(a23.x, b23.x, dot);
                dot = fmaf(a23.y, b23.y, dot);
            }
            total = fmaf(wq_s[h], fmaxf(dot, 0.f), total);
        }
    }
    if (half_id == 1) partial[key_row] = total;
    __syncthreads();
    if (half_id == 0 && s < n_keys)
        out_row[s] = s < visible ? k_scale[base + s] * (total + partial[key_row]) : -3.402823466e38f;
}

// indexer_scores_fp8 on the fp8 tensor cores (indexer_scores_e4m3_tc, indexer_tc.cuh: mma.sync
// m16n8k32 e4m3 on sm_89 and later, the codes widened to bf16 before that): the same parameters
// and, up to the order of the float32 sums, the same scores (every product of codes is exact).
// dim ≤ INDEXER_FP8_TC_MAX_DIM (one scale a row), a multiple of 4. The _widened kernel runs the
// bf16 products on any device (what sm_80 runs), so the check compares the two. `tiles` as
// indexer_scores_bf16_tc's.
// Launch: grid (ceil(n_keys / (tiles · INDEXER_TC_KEYS)), n_queries), block INDEXER_TC_WARPS · 32,
// dynamic shared memory indexer_fp8_tc_smem_bytes(heads, dim) (19.5 KB at 64 heads × 128).
struct Fp8IndexerQueries {
    const uint8_t* q;      // [T, heads, dim] codes
    const float* q_scale;  // [T, heads]
    int heads;
    SMOE_DEVICE float stage_head(uint8_t* dst, int t, int h, int dim, int dim_p, int lane) const {
        const uint8_t* row = q + ((size_t)t * heads + h) * dim;
        for (int c = lane; c < dim_p; c += 32) dst[c] = c < dim ? row[c] : (uint8_t)0;
        return q_scale[(size_t)t * heads + h];
    }
};
struct Fp8IndexerKeys {
    const uint8_t* codes;  // row t's key 0
    const float* scales;
    int dim;
    struct Row {
        const uint8_t* p;
        float s;
        SMOE_DEVICE uint32_t code_word(int i) const { return load_u32(p + 4 * i); }
        SMOE_DEVICE float scale() const { return s; }
    };
    SMOE_DEVICE Row row(int s) const { return Row{codes + (size_t)s * dim, scales[s]}; }
};

template <bool kWidened>
SMOE_DEVICE void indexer_scores_fp8_tc_launch(float* scores, const uint8_t* q, const float* q_scale,
                                              const uint8_t* keys, const float* k_scale, const float* w,
                                              const int* key_start, const int* n_visible, int n_keys, int heads,
                                              int dim, float scale, long long scores_stride, int tiles) {
    const int t = blockIdx.y;
    const size_t base = (size_t)key_start[t];
    indexer_scores_e4m3_tc<kWidened>(scores + (size_t)t * scores_stride, Fp8IndexerQueries{q, q_scale, heads},
                                    IndexerWeights{w, heads}, Fp8IndexerKeys{keys + base * dim, k_scale + base, dim}, t,
                                    blockIdx.x * tiles * INDEXER_TC_KEYS, tiles, min(n_visible[t], n_keys), n_keys,
                                    heads, dim, scale, -3.402823466e38f);
}

extern "C" __global__ void __launch_bounds__(INDEXER_TC_WARPS * 32)
indexer_scores_fp8_tc(float* __restrict__ scores, const uint8_t* __restrict__ q, const float* __restrict__ q_scale,
                      const uint8_t* __restrict__ keys, const float* __restrict__ k_scale, const float* __restrict__ w,
                      const int* __restrict__ key_start, const int* __restrict__ n_visible, int n_keys, int heads,
                      int dim, float scale, long long scores_stride, int tiles) {
    indexer_scores_fp8_tc_launch<false>(scores, q, q_scale, keys, k_scale, w, key_start, n_visible, n_keys, heads, dim,
                                        scale, scores_stride, tiles);
}

extern "C" __global__ void __launch_bounds__(INDEXER_TC_WARPS * 32)
indexer_scores_fp8_tc_widened(float* __restrict__ scores, const uint8_t* __restrict__ q,
                              const float* __restrict__ q_scale, const uint8_t* __restrict__ keys,
                              const float* __restrict__ k_scale, const float* __restrict__ w,
                              const int* __restrict__ key_start, const int* __restrict__ n_visible, int n_keys,
                              int heads, int dim, float scale, long long scores_stride, int tiles) {
    indexer_scores_fp8_tc_launch<true>(scores, q, q_scale, keys, k_scale, w, key_start, n_visible, n_keys, heads, dim,
                                       scale, scores_stride, tiles);
}
