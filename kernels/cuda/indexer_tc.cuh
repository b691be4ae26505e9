// The DSA indexer's scores with q·kᵀ on the tensor cores (mma.sync m16n8k16, mma.cuh):
//   scores[s] = Σ_h w[t, h] · ReLU(scale · q[t, h] · k[s])   for s < visible, `mask` after.
// Shared by indexer_scores_bf16_tc (indexer.cu: bf16 queries and keys) and the engine's
// indexer_scores_tc_store_* (engine.cu: float32 queries, keys read in place from a paged pool
// in its dtype), which bring their inputs as policies:
//   q.at(t, h, c)     query row t, head h, dim c as bf16 bits
//   w.at(t, h)        the head's weight (float32)
//   keys.row(s)       row t's key s, with .bf16_pair(i): its dims 2i, 2i + 1 as two bf16 (the
//                     first in the low bits)
//
// A block scores one query row against `tiles` consecutive tiles of INDEXER_TC_KEYS keys, from
// key tile0: it stages the query once, then for each tile its keys, and warp w takes the heads'
// 16-row tiles w, w + 4, …, and for each the products of its 16 heads with the tile's 64 keys (8
// blocks of 8 keys, dim / 16 products each); each lane folds its heads' w · ReLU(scale · dot)
// into per-key sums, the warp adds them over its lanes and the block over its warps. More tiles
// a block read the query fewer times (the engine's float32 query of 64 heads × 128 is 32 KB, a
// tile of bf16 keys 16 KB), fewer leave more blocks to fill the device (launch::indexer_tc_tiles
// picks). Rows are padded with zeros in shared memory to a multiple of 16 dims (dim must be
// even).
// Shared memory: the query's heads rounded up to 16 and the key tile, bf16 rows of
// ceil16(dim) + INDEXER_TC_PAD; the heads' weights (rounded up to 16); the warps' per-key sums
// = (ceil16(heads) + INDEXER_TC_KEYS) · (ceil16(dim) + 8) · 2 + ceil16(heads) · 4 + 4 · INDEXER_TC_KEYS · 4
// bytes (35.3 KB at 64 heads × 128).
#pragma once
#include "mma.cuh"

#define INDEXER_TC_KEYS 64
#define INDEXER_TC_WARPS 4
#define INDEXER_TC_PAD 8
static_assert(INDEXER_TC_KEYS % 8 == 0 && INDEXER_TC_PAD % 2 == 0, "keys in blocks of 8; rows 4-byte aligned");

// The weights policy every user has: float32 [T, heads].
struct IndexerWeights {
    const float* w;
    int heads;
    SMOE_DEVICE float at(int t, int h) const { return w[(size_t)t * heads + h]; }
};

// `tiles` tiles of keys from key0 all past the row's visible ones: writes the mask over them (none
// past n_keys) and says so, for the block to leave.
SMOE_DEVICE bool indexer_tc_masked_tiles(float* out_row, int key0, int tiles, int visible, int n_keys, float mask) {
    if (key0 < visible) return false;
    for (int i = threadIdx.x; i < tiles * INDEXER_TC_KEYS; i += blockDim.x)
        if (key0 + i < n_keys) out_row[key0 + i] = mask;
    return true;
}

// The block's per-key sums, each lane's acc[n][e] its heads' part of key 8n + 2tg + e of the tile:
// added over the eight lanes that share tg (their heads), then over the warps (through
// `partial`, INDEXER_TC_WARPS · INDEXER_TC_KEYS floats of shared memory), and written to
// out_row[tile0 ..], times key_scales[i] when there are any; `mask` past the visible keys, none
// past n_keys. Every thread of the block calls it.
SMOE_DEVICE void indexer_tc_write(float (&acc)[INDEXER_TC_KEYS / 8][2], float* partial, const float* key_scales,
                                  float* out_row, int tile0, int visible, int n_keys, float mask) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tg = lane & 3;
#pragma unroll
    for (int n = 0; n < INDEXER_TC_KEYS / 8; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
            float v = acc[n][e];
            for (int off = 4; off < 32; off <<= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            if (g == 0) partial[warp * INDEXER_TC_KEYS + n * 8 + 2 * tg + e] = v;
        }
    __syncthreads();
    for (int i = threadIdx.x; i < INDEXER_TC_KEYS; i += blockDim.x) {
        const int s = tile0 + i;
        if (s >= n_keys) continue;
        float total = 0.f;
        for (int w_ = 0; w_ < INDEXER_TC_WARPS; ++w_) total += partial[w_ * INDEXER_TC_KEYS + i];
        out_row[s] = s < visible ? (key_scales != nullptr ? key_scales[i] * total : total) : mask;
    }
}

template <class Queries, class Weights, class Keys>
SMOE_DEVICE void indexer_scores_tc(float* __restrict__ out_row, const Queries& q, const Weights& w, const Keys& keys,
                                   int t, int tile0, int tiles, int visible, int n_keys, int heads, int dim,
                                   float scale, float mask) {
    extern __shared__ __align__(16) unsigned char indexer_tc_smem[];
    if (indexer_tc_masked_tiles(out_row, tile0, tiles, visible, n_keys, mask)) return;

    const int m_tiles = (heads + 15) / 16;
    const int dim_p = (dim + 15) / 16 * 16, words = dim_p / 2, dim_words = dim / 2;
    const int stride = dim_p + INDEXER_TC_PAD;  // a multiple of 8: fragment registers stay 4-byte aligned
    unsigned short* q_s = reinterpret_cast<unsigned short*>(indexer_tc_smem);  // [16 m_tiles][stride]
    unsigned short* k_s = q_s + m_tiles * 16 * stride;                   // [INDEXER_TC_KEYS][stride]
    float* w_s = reinterpret_cast<float*>(k_s + INDEXER_TC_KEYS * stride);  // [16 m_tiles]
    float* partial = w_s + m_tiles * 16;                                    // [warps][keys]

    for (int i = threadIdx.x; i < m_tiles * 16 * dim_p; i += blockDim.x) {
        const int h = i / dim_p, c = i % dim_p;
        q_s[h * stride + c] = h < heads && c < dim ? q.at(t, h, c) : (unsigned short)0;
    }
    for (int h = threadIdx.x; h < m_tiles * 16; h += blockDim.x) w_s[h] = h < heads ? w.at(t, h) : 0.f;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tg = lane & 3;
    for (int tile = 0; tile < tiles; ++tile) {  // block-uniform
        const int key0 = tile0 + tile * INDEXER_TC_KEYS;
        if (indexer_tc_masked_tiles(out_row, key0, tiles - tile, visible, n_keys, mask)) return;  // visible ≤ n_keys
        if (tile > 0) __syncthreads();  // the last tile's keys and sums read
        for (int r = warp; r < INDEXER_TC_KEYS; r += INDEXER_TC_WARPS) {  // a warp a key: its row found once
            const int key = key0 + r;
            uint32_t* dst = reinterpret_cast<uint32_t*>(k_s + r * stride);
            if (key >= visible) {
                for (int c = lane; c < words; c += 32) dst[c] = 0u;
                continue;
            }
            const auto row = keys.row(key);
            for (int c = lane; c < words; c += 32) dst[c] = c < dim_words ? row.bf16_pair(c) : 0u;
        }
        __syncthreads();

        // This lane's per-key sums: keys 8n + 2tg and 8n + 2tg + 1 of the tile.
        float acc[INDEXER_TC_KEYS / 8][2];
#pragma unroll
        for (int n = 0; n < INDEXER_TC_KEYS / 8; ++n) acc[n][0] = acc[n][1] = 0.f;
        for (int mt = warp; mt < m_tiles; mt += INDEXER_TC_WARPS) {  // warp-uniform
            const unsigned short* q0 = q_s + (mt * 16 + g) * stride;
            const unsigned short* q8 = q0 + 8 * stride;
            const float w0 = w_s[mt * 16 + g], w8 = w_s[mt * 16 + g + 8];
#pragma unroll
            for (int n = 0; n < INDEXER_TC_KEYS / 8; ++n) {
                const unsigned short* k_row = k_s + (n * 8 + g) * stride;  // B's column g: key 8n + g
                float d[4] = {0.f, 0.f, 0.f, 0.f};
                for (int k0 = 0; k0 < dim_p; k0 += 16) {
                    const uint32_t a[4] = {load_bf16x2(q0 + k0 + 2 * tg), load_bf16x2(q8 + k0 + 2 * tg),
                                           load_bf16x2(q0 + k0 + 2 * tg + 8), load_bf16x2(q8 + k0 + 2 * tg + 8)};
                    const uint32_t b[2] = {load_bf16x2(k_row + k0 + 2 * tg), load_bf16x2(k_row + k0 + 2 * tg + 8)};
                    mma_bf16_16816(d, a, b);
                }
                // d[0], d[1]: head 16mt + g against keys 8n + 2tg, + 1; d[2], d[3]: head 16mt + g + 8.
                acc[n][0] += w0 * fmaxf(scale * d[0], 0.f) + w8 * fmaxf(scale * d[2], 0.f);
                acc[n][1] += w0 * fmaxf(scale * d[1], 0.f) + w8 * fmaxf(scale * d[3], 0.f);
            }
        }
        indexer_tc_write(acc, partial, nullptr, out_row, key0, visible, n_keys, mask);
    }
}

// ------------------------------------------------------------------------------------------- fp8
// DeepSeek's fp8 indexer as fp8 tensor-core products (mma_e4m3_16832; on Hopper run as fp16 ones): each head's query and each key
// as e4m3 codes with one float32 scale (dim ≤ INDEXER_FP8_TC_MAX_DIM, one fp8 block), so
//   scores[s] = k_scale[s] · Σ_h w[t, h] · q_scale[t, h] · ReLU(scale · q8[t, h] · k8[s])
// for s < visible, `mask` after: the scores of the dequantised values (the scales are positive),
// each product of codes exact. Policies, as indexer_scores_tc's:
//   q.stage_head(dst, t, h, dim, dim_p, lane)   (every lane of a warp together) writes head h's
//       codes to dst[0 .. dim_p) (zeros past dim) and returns its scale
//   keys.row(s)   key s, with .code_word(i) (its codes 4i .. 4i+3, the first in the low byte;
//       dim a multiple of 4) and .scale()
// A block scores one query row against `tiles` tiles of INDEXER_TC_KEYS keys, its query's codes
// staged once (the engine's queries rounded to e4m3 once a block), warp w taking the heads' 16-row
// tiles w, w + 4, …, as indexer_scores_tc; each instruction's k = 32 sums start from zero and are added
// in float32 (DeepSeek-V3's report found Hopper's fp8 wgmma accumulation keeps about 14
// bits, so it promotes partial sums every 128 values; this does every 32). kWidened runs the
// products as bf16 (mma_e4m3_16832_widened, what sm_80 runs) on any device, for the checks.
// Shared memory: the query's codes (heads rounded up to 16) and the key tile's, rows of
// ceil32(dim) + INDEXER_FP8_TC_PAD bytes; the heads' weights times their scales; the keys'
// scales; the warps' per-key sums
// = (ceil16(heads) + INDEXER_TC_KEYS) · (ceil32(dim) + 16) + ceil16(heads) · 4 + INDEXER_TC_KEYS · 4
//   + INDEXER_TC_WARPS · INDEXER_TC_KEYS · 4 bytes (19.5 KB at 64 heads × 128).
#define INDEXER_FP8_TC_MAX_DIM 128
#define INDEXER_FP8_TC_PAD 16
static_assert(INDEXER_FP8_TC_PAD % 16 == 0, "rows 16-byte aligned; 4 + 4g + t distinct banks");

template <bool kWidened, class Queries, class Weights, class Keys>
SMOE_DEVICE void indexer_scores_e4m3_tc(float* __restrict__ out_row, const Queries& q, const Weights& w,
                                       const Keys& keys, int t, int tile0, int tiles, int visible, int n_keys,
                                       int heads, int dim, float scale, float mask) {
    extern __shared__ __align__(16) unsigned char indexer_tc_smem[];
    if (indexer_tc_masked_tiles(out_row, tile0, tiles, visible, n_keys, mask)) return;

    const int m_tiles = (heads + 15) / 16;
    const int dim_p = (dim + 31) / 32 * 32, words = dim_p / 4, dim_words = dim / 4;
    const int stride = dim_p + INDEXER_FP8_TC_PAD;  // bytes
    uint8_t* q_s = indexer_tc_smem;                         // [16 m_tiles][stride]
    uint8_t* k_s = q_s + m_tiles * 16 * stride;             // [INDEXER_TC_KEYS][stride]
    float* qw_s = reinterpret_cast<float*>(k_s + INDEXER_TC_KEYS * stride);  // [16 m_tiles]
    float* ks_s = qw_s + m_tiles * 16;                                       // [INDEXER_TC_KEYS]
    float* partial = ks_s + INDEXER_TC_KEYS;                                 // [warps][keys]

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tg = lane & 3;
    for (int h = warp; h < m_tiles * 16; h += INDEXER_TC_WARPS) {  // a warp a head
        uint8_t* dst = q_s + h * stride;
        if (h < heads) {
            const float q_scale = q.stage_head(dst, t, h, dim, dim_p, lane);
            if (lane == 0) qw_s[h] = w.at(t, h) * q_scale;
        } else {
            for (int c = lane; c < words; c += 32) reinterpret_cast<uint32_t*>(dst)[c] = 0u;
            if (lane == 0) qw_s[h] = 0.f;
        }
    }
    for (int tile = 0; tile < tiles; ++tile) {  // block-uniform
        const int key0 = tile0 + tile * INDEXER_TC_KEYS;
        if (indexer_tc_masked_tiles(out_row, key0, tiles - tile, visible, n_keys, mask)) return;  // visible ≤ n_keys
        if (tile > 0) __syncthreads();  // the last tile's keys, their scales and sums read
        for (int r = warp; r < INDEXER_TC_KEYS; r += INDEXER_TC_WARPS) {  // a warp a key: its row found once
            const int key = key0 + r;
            uint32_t* dst = reinterpret_cast<uint32_t*>(k_s + r * stride);
            if (key >= visible) {
                for (int c = lane; c < words; c += 32) dst[c] = 0u;
                if (lane == 0) ks_s[r] = 0.f;
                continue;
            }
            const auto row = keys.row(key);
            for (int c = lane; c < words; c += 32) dst[c] = c < dim_words ? row.code_word(c) : 0u;
            if (lane == 0) ks_s[r] = row.scale();
        }
        __syncthreads();

        // This lane's per-key sums: keys 8n + 2tg and 8n + 2tg + 1 of the tile.
        float acc[INDEXER_TC_KEYS / 8][2];
#pragma unroll
        for (int n = 0; n < INDEXER_TC_KEYS / 8; ++n) acc[n][0] = acc[n][1] = 0.f;
        for (int mt = warp; mt < m_tiles; mt += INDEXER_TC_WARPS) {  // warp-uniform
            const uint8_t* q0 = q_s + (mt * 16 + g) * stride + 4 * tg;
            const uint8_t* q8 = q0 + 8 * stride;
            const float w0 = qw_s[mt * 16 + g], w8 = qw_s[mt * 16 + g + 8];
#pragma unroll
            for (int n = 0; n < INDEXER_TC_KEYS / 8; ++n) {
                const uint8_t* k_row = k_s + (n * 8 + g) * stride + 4 * tg;  // B's column g: key 8n + g
                float dot[4] = {0.f, 0.f, 0.f, 0.f};
                for (int k0 = 0; k0 < dim_p; k0 += 32) {
                    const uint32_t a[4] = {load_u32(q0 + k0), load_u32(q8 + k0), load_u32(q0 + k0 + 16),
                                           load_u32(q8 + k0 + 16)};
                    const uint32_t b[2] = {load_u32(k_row + k0), load_u32(k_row + k0 + 16)};
                    float d[4] = {0.f, 0.f, 0.f, 0.f};
                    if (kWidened) mma_e4m3_16832_widened(d, a, b);
                    else mma_e4m3_16832(d, a, b);
#pragma unroll
                    for (int i = 0; i < 4; ++i) dot[i] += d[i];
                }
                // dot[0], dot[1]: head 16mt + g against keys 8n + 2tg, + 1; dot[2], dot[3]: head 16mt + g + 8.
                acc[n][0] += w0 * fmaxf(scale * dot[0], 0.f) + w8 * fmaxf(scale * dot[2], 0.f);
                acc[n][1] += w0 * fmaxf(scale * dot[1], 0.f) + w8 * fmaxf(scale * dot[3], 0.f);
            }
        }
        indexer_tc_write(acc, partial, ks_s, out_row, key0, visible, n_keys, mask);
    }
}
