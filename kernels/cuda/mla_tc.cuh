// MLA attention in the absorbed form on the tensor cores: what mla.cuh's mla_attend computes,
// with both products on mma.sync (bf16 in, float32 sums). Shared by sparse_mla_attention_bf16_tc
// (mla_sparse.cu: bf16 queries, a bf16 [slot, latent + rope] cache) and the engine's
// mla_latent_attention_tc_* (engine.cu: float32 queries, a paged pool read in its dtype), which
// bring their inputs and outputs as policies:
//   q.at(qr, h, d)        query row qr, head h, dim d as bf16 bits (d < latent: the latent part;
//                         latent + i: RoPE dim i)
//   keys.count(qr), keys.slot(qr, j)   row qr's keys (a slot < 0 is none)
//   kv.row(slot)          a key, with .latent_pair(i) and .rope_pair(i): dims 2i, 2i + 1 of its
//                         latent or RoPE part as two bf16 (the first in the low 16 bits)
//   out.write(qr, h, d, v)  output dim d of head h; out.lse_of(qr, h, v) its log-sum-exp
//
// Block: one query row and 1 to MLA_TC_MAX_GROUPS groups of MLA_TC_HEADS heads (the M = 16 rows of
// every product), MLA_TC_WARPS warps a group: blockDim.x = groups · MLA_TC_WARPS · 32, and the
// block's heads are head0 .. head0 + groups · 16 (mla_tc_block_heads()). More groups share each
// key tile among more heads: at 128 heads, 4 groups read a row's keys twice where 1 group reads
// them eight times. In shared memory a query or key row is its latent part padded with zeros to a
// multiple of MLA_TC_WARPS · 8 (each warp's share of the output dims is whole 8-dim tiles), then
// its RoPE part, padded to a multiple of 16 (the products' K): zeros add nothing to a score.
// Each tile of MLA_TC_TILE keys is copied into shared memory once. Warp w of a group scores the
// group's 16 heads against keys 8w .. 8w+7 (S = Q·Kᵀ); each group combines the tile's per-head
// maxima and sums through shared memory (an online softmax, a running max and sum per head); P
// goes to shared memory as bf16; and warp w adds P·V to its quarter of the latent dims, its
// accumulators rescaled row by row as the max moves.
// Needs latent and rope even, and the padded latent ≤ MLA_TC_MAX_LATENT.
#pragma once
#include "mma.cuh"

#define MLA_TC_WARPS 4
#define MLA_TC_HEADS 16
#define MLA_TC_MAX_GROUPS 4
#define MLA_TC_MAX_THREADS (MLA_TC_MAX_GROUPS * MLA_TC_WARPS * 32)
#define MLA_TC_TILE 32
#define MLA_TC_MAX_LATENT 512
#define MLA_TC_PAD 8

// Warp w scores keys 8w .. 8w+7 of a tile, and P·V takes the tile's keys 16 at a time.
static_assert(MLA_TC_WARPS * 8 == MLA_TC_TILE && MLA_TC_TILE % 16 == 0, "a tile is 8 keys a warp");
static_assert(MLA_TC_MAX_LATENT % (MLA_TC_WARPS * 8) == 0, "each warp's dims are whole 8-dim tiles");

// The latent part's width in shared memory, and the whole row's (launch::mla_tc_dims).
SMOE_DEVICE int mla_tc_latent_padded(int latent) {
    return (latent + MLA_TC_WARPS * 8 - 1) / (MLA_TC_WARPS * 8) * (MLA_TC_WARPS * 8);
}
SMOE_DEVICE int mla_tc_row_padded(int latent, int rope) { return (mla_tc_latent_padded(latent) + rope + 15) / 16 * 16; }
// The block's heads: MLA_TC_HEADS a group of MLA_TC_WARPS warps.
SMOE_DEVICE int mla_tc_block_heads() { return blockDim.x / (MLA_TC_WARPS * 32) * MLA_TC_HEADS; }

// Dynamic shared memory, with H = the block's heads (16 a group): (H + MLA_TC_TILE) ·
// (row + MLA_TC_PAD) · 2 (queries and keys) + H · (MLA_TC_TILE + MLA_TC_PAD) · 2 (P) +
// 2 · MLA_TC_WARPS · H · 4 (the warps' maxima and sums) + MLA_TC_TILE · 4 (slots) bytes, row the
// padded width: at 512 + 64, 56.6 KB for one group and 119.5 KB for four, so raise the kernel's
// MaxDynamicSharedMemorySize attribute before launching.

template <class Queries, class Keys, class KvRows, class Out>
SMOE_DEVICE void mla_attend_tc(const Queries& q, const Keys& keys, const KvRows& kv, const Out& out, int qr,
                               int head0, int heads, int latent, int rope, float scale) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int lat_p = mla_tc_latent_padded(latent);
    const int dqk = mla_tc_row_padded(latent, rope);
    const int stride = dqk + MLA_TC_PAD;  // a multiple of 8: every fragment register is 4-byte aligned
    const int p_stride = MLA_TC_TILE + MLA_TC_PAD;
    const int bh = mla_tc_block_heads();
    unsigned short* q_s = reinterpret_cast<unsigned short*>(smem_raw);  // [bh][stride]
    unsigned short* k_s = q_s + bh * stride;                             // [MLA_TC_TILE][stride]
    unsigned short* p_s = k_s + MLA_TC_TILE * stride;                    // [bh][p_stride]
    float* max_s = reinterpret_cast<float*>(p_s + bh * p_stride);        // [MLA_TC_WARPS][bh]
    float* sum_s = max_s + MLA_TC_WARPS * bh;                            // [MLA_TC_WARPS][bh]
    int* slot_s = reinterpret_cast<int*>(sum_s + MLA_TC_WARPS * bh);

    // This thread is in warp `warp` of its group; the group's heads are the block's rows hr .. hr + 15.
    const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) % MLA_TC_WARPS;
    const int hr = (threadIdx.x >> 5) / MLA_TC_WARPS * MLA_TC_HEADS;
    const int g = lane >> 2, t = lane & 3;

    for (int i = threadIdx.x; i < bh * dqk; i += blockDim.x) {
        const int hl = i / dqk, p = i % dqk, h = head0 + hl;
        unsigned short v = 0;  // +0.0
        if (h < heads) {
            if (p < latent) v = q.at(qr, h, p);
            else if (p >= lat_p && p - lat_p < rope) v = q.at(qr, h, latent + (p - lat_p));
        }
        q_s[hl * stride + p] = v;
    }

    // This lane's rows are heads hr + g and hr + g + 8: their running max and sum (the lanes of a group
    // of four keep the same), and its share of their output, dims dim0 + 8j + 2t, + 1.
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    constexpr int N_TILES = MLA_TC_MAX_LATENT / MLA_TC_WARPS / 8;
    const int my_tiles = lat_p / MLA_TC_WARPS / 8;
    const int dim0 = warp * (lat_p / MLA_TC_WARPS);
    float o[N_TILES][4];
#pragma unroll
    for (int j = 0; j < N_TILES; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

    const int count = keys.count(qr);
    const int words = dqk / 2, lat_words = latent / 2, lat_p_words = lat_p / 2, rope_words = rope / 2;
    for (int tile = 0; tile < count; tile += MLA_TC_TILE) {
        __syncthreads();  // the previous tile is consumed (and q_s written, on the first pass)
        if (threadIdx.x < MLA_TC_TILE) {
            const int j = tile + threadIdx.x;
            slot_s[threadIdx.x] = j < count ? keys.slot(qr, j) : -1;
        }
        __syncthreads();
        // A warp a key (of all the block's warps): its row is found once.
        for (int r = threadIdx.x >> 5; r < MLA_TC_TILE; r += blockDim.x >> 5) {
            const int slot = slot_s[r];
            uint32_t* dst = reinterpret_cast<uint32_t*>(k_s + r * stride);
            if (slot < 0) {  // a missing key's row is zero (its scores are masked below)
                for (int c = lane; c < words; c += 32) dst[c] = 0u;
                continue;
            }
            const auto row = kv.row(slot);
            for (int c = lane; c < words; c += 32) {
                uint32_t v = 0u;  // padding
                if (c < lat_words) v = row.latent_pair(c);
                else if (c >= lat_p_words && c - lat_p_words < rope_words) v = row.rope_pair(c - lat_p_words);
                dst[c] = v;
            }
        }
        __syncthreads();

        // Scores of heads hr + g, hr + g + 8 against keys key0, key0 + 1 (B's column g is key
        // 8w + g).
        float s[4] = {0.f, 0.f, 0.f, 0.f};
        const unsigned short* k_row = k_s + (warp * 8 + g) * stride;
        const unsigned short* q0 = q_s + (hr + g) * stride;
        const unsigned short* q8 = q0 + 8 * stride;
        for (int k0 = 0; k0 < dqk; k0 += 16) {
            const uint32_t a[4] = {load_bf16x2(q0 + k0 + 2 * t), load_bf16x2(q8 + k0 + 2 * t),
                                   load_bf16x2(q0 + k0 + 2 * t + 8), load_bf16x2(q8 + k0 + 2 * t + 8)};
            const uint32_t b[2] = {load_bf16x2(k_row + k0 + 2 * t), load_bf16x2(k_row + k0 + 2 * t + 8)};
            mma_bf16_16816(s, a, b);
        }
        const int key0 = warp * 8 + 2 * t;
        const bool ok0 = slot_s[key0] >= 0, ok1 = slot_s[key0 + 1] >= 0;
        s[0] = ok0 ? s[0] * scale : -INFINITY;
        s[1] = ok1 ? s[1] * scale : -INFINITY;
        s[2] = ok0 ? s[2] * scale : -INFINITY;
        s[3] = ok1 ? s[3] * scale : -INFINITY;

        // The tile's max per head: over the four lanes of g, then over the group's warps.
        float mx[2] = {fmaxf(s[0], s[1]), fmaxf(s[2], s[3])};
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            mx[0] = fmaxf(mx[0], __shfl_xor_sync(0xffffffffu, mx[0], off));
            mx[1] = fmaxf(mx[1], __shfl_xor_sync(0xffffffffu, mx[1], off));
        }
        if (t == 0) {
            max_s[warp * bh + hr + g] = mx[0];
            max_s[warp * bh + hr + g + 8] = mx[1];
        }
        __syncthreads();
        float m_new[2], corr[2];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            float tile_max = -INFINITY;
            for (int w = 0; w < MLA_TC_WARPS; ++w) tile_max = fmaxf(tile_max, max_s[w * bh + hr + g + 8 * hh]);
            m_new[hh] = fmaxf(m[hh], tile_max);
            // exp(-inf) = 0 rescales nothing-yet to zero; no visible key at all leaves it as it is.
            corr[hh] = m_new[hh] == -INFINITY ? 1.f : __expf(m[hh] - m_new[hh]);
        }
        // P as bf16, the A of the second product; the sums are of the rounded values it uses.
        unsigned short pb[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float mn = m_new[i >> 1];
            pb[i] = bf16_bits_rn(mn == -INFINITY ? 0.f : __expf(s[i] - mn));
        }
        unsigned short* p0 = p_s + (hr + g) * p_stride;
        unsigned short* p8 = p0 + 8 * p_stride;
        p0[key0] = pb[0];
        p0[key0 + 1] = pb[1];
        p8[key0] = pb[2];
        p8[key0 + 1] = pb[3];
        float sm[2] = {bf16_bits_to_f32(pb[0]) + bf16_bits_to_f32(pb[1]),
                       bf16_bits_to_f32(pb[2]) + bf16_bits_to_f32(pb[3])};
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            sm[0] += __shfl_xor_sync(0xffffffffu, sm[0], off);
            sm[1] += __shfl_xor_sync(0xffffffffu, sm[1], off);
        }
        if (t == 0) {
            sum_s[warp * bh + hr + g] = sm[0];
            sum_s[warp * bh + hr + g + 8] = sm[1];
        }
        __syncthreads();  // P and the sums are written
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            float tile_sum = 0.f;
            for (int w = 0; w < MLA_TC_WARPS; ++w) tile_sum += sum_s[w * bh + hr + g + 8 * hh];
            l[hh] = l[hh] * corr[hh] + tile_sum;
            m[hh] = m_new[hh];
        }
#pragma unroll
        for (int j = 0; j < N_TILES; ++j) {
            o[j][0] *= corr[0];
            o[j][1] *= corr[0];
            o[j][2] *= corr[1];
            o[j][3] *= corr[1];
        }

        // O += P·V over this warp's dims: V is the keys' latent part (B[k][n] = k_s[k][n]).
        for (int k0 = 0; k0 < MLA_TC_TILE; k0 += 16) {
            const unsigned short* p0 = p_s + (hr + g) * p_stride;
            const unsigned short* p8 = p0 + 8 * p_stride;
            const uint32_t a[4] = {load_bf16x2(p0 + k0 + 2 * t), load_bf16x2(p8 + k0 + 2 * t),
                                   load_bf16x2(p0 + k0 + 2 * t + 8), load_bf16x2(p8 + k0 + 2 * t + 8)};
            const unsigned short* v0 = k_s + (k0 + 2 * t) * stride;
            const unsigned short* v8 = k_s + (k0 + 2 * t + 8) * stride;
#pragma unroll
            for (int j = 0; j < N_TILES; ++j) {
                if (j >= my_tiles) break;  // warp-uniform
                const int n = dim0 + 8 * j + g;
                const uint32_t b[2] = {pack_bf16x2(v0[n], v0[stride + n]), pack_bf16x2(v8[n], v8[stride + n])};
                mma_bf16_16816(o[j], a, b);
            }
        }
    }

#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int h = head0 + hr + g + 8 * hh;
        if (h >= heads) continue;
        const float inv = l[hh] > 0.f ? 1.f / l[hh] : 0.f;
#pragma unroll
        for (int j = 0; j < N_TILES; ++j) {
            if (j >= my_tiles) break;
            const int d = dim0 + 8 * j + 2 * t;
            if (d >= latent) break;  // padding from here on (latent is even, so d + 1 < latent)
            out.write(qr, h, d, o[j][2 * hh] * inv);
            out.write(qr, h, d + 1, o[j][2 * hh + 1] * inv);
        }
        if (warp == 0 && t == 0) out.lse_of(qr, h, l[hh] > 0.f ? m[hh] + logf(l[hh]) : -INFINITY);
    }
}
