// MLA attention in the absorbed form, shared by the sparse (DSA top-k) and dense kernels.
//
// Per query row qr and head h (q already absorbed: q_lat = W_UK,h^T q_nope, then q_pe):
//   score_j = scale * (q[qr, h, :] . kv[slot_j, :])      over latent + rope dims
//   out[qr, h, :] = sum_j softmax(score)_j * kv[slot_j, 0 : latent]     (latent context)
//   lse[qr, h] = max + log(sum exp(score - max))         (-inf when no key is visible; out is 0)
// The caller applies W_UV,h to the latent context. Reference: engine/src/backend/cpu.rs
// `mla_absorbed`. Keys are cache slots (rows of kv, latent then rope, bf16).
//
// Block: MLA_WARPS warps; each warp owns MLA_HEADS_PER_WARP heads of one query row. Keys come in
// tiles of 32 (lane = key while scoring), staged in shared memory once for all the block's heads;
// an online softmax keeps one running max / sum per head; lane l accumulates latent dims l + 32 j.
#pragma once
#include "common.cuh"

#define MLA_WARPS 8
#define MLA_HEADS_PER_WARP 2
#define MLA_HEADS_PER_BLOCK (MLA_WARPS * MLA_HEADS_PER_WARP)
#define MLA_TILE 32
#define MLA_MAX_LATENT 512
#define MLA_MAX_ACC (MLA_MAX_LATENT / 32)

// Dynamic shared memory: MLA_HEADS_PER_BLOCK * dqk * 2 + MLA_TILE * (dqk + 2) * 2 + MLA_TILE * 4
// bytes (55.5 KB at dqk = 576: above the default 48 KB, so raise the kernel's
// MaxDynamicSharedMemorySize attribute before launching).

template <class KeySlots>
SMOE_DEVICE void mla_attend(__nv_bfloat16* __restrict__ out, float* __restrict__ lse,
                            const __nv_bfloat16* __restrict__ q,
                            const __nv_bfloat16* __restrict__ kv, const KeySlots& keys,
                            int heads, int latent, int rope, float scale) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int dqk = latent + rope;
    const int kstride = dqk + 2;  // odd number of 4-byte words per row when dqk % 4 == 0
    __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    __nv_bfloat16* k_s = q_s + MLA_HEADS_PER_BLOCK * dqk;
    int* slot_s = reinterpret_cast<int*>(k_s + MLA_TILE * kstride);

    const int qr = blockIdx.y;
    const int head0 = blockIdx.x * MLA_HEADS_PER_BLOCK;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    for (int i = threadIdx.x; i < MLA_HEADS_PER_BLOCK * dqk; i += blockDim.x) {
        const int h = head0 + i / dqk;
        q_s[i] = h < heads ? q[((size_t)qr * heads + h) * dqk + i % dqk] : f32_to_bf16(0.f);
    }

    float m[MLA_HEADS_PER_WARP], l[MLA_HEADS_PER_WARP];
    float acc[MLA_HEADS_PER_WARP][MLA_MAX_ACC];
#pragma unroll
    for (int hh = 0; hh < MLA_HEADS_PER_WARP; ++hh) {
        m[hh] = -INFINITY;
        l[hh] = 0.f;
#pragma unroll
        for (int j = 0; j < MLA_MAX_ACC; ++j) acc[hh][j] = 0.f;
    }

    const int count = keys.count(qr);
    const int words = dqk / 2;
    for (int tile = 0; tile < count; tile += MLA_TILE) {
        __syncthreads();  // previous tile fully consumed (and q_s written on the first pass)
        if (threadIdx.x < MLA_TILE) {
            const int j = tile + threadIdx.x;
            slot_s[threadIdx.x] = j < count ? keys.slot(qr, j) : -1;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < MLA_TILE * words; i += blockDim.x) {
            const int r = i / words, c = i % words;
            const int slot = slot_s[r];
            __nv_bfloat162 v = __floats2bfloat162_rn(0.f, 0.f);
            if (slot >= 0) v = reinterpret_cast<const __nv_bfloat162*>(kv + (size_t)slot * dqk)[c];
            reinterpret_cast<__nv_bfloat162*>(k_s + r * kstride)[c] = v;
        }
        __syncthreads();

        const bool key_ok = slot_s[lane] >= 0;
#pragma unroll
        for (int hh = 0; hh < MLA_HEADS_PER_WARP; ++hh) {
            const int hl = warp * MLA_HEADS_PER_WARP + hh;
            if (head0 + hl >= heads) continue;  // warp-uniform
            const __nv_bfloat162* q2 = reinterpret_cast<const __nv_bfloat162*>(q_s + hl * dqk);
            const __nv_bfloat162* k2 = reinterpret_cast<const __nv_bfloat162*>(k_s + lane * kstride);
            float dot = 0.f;
            for (int d = 0; d < words; ++d) {
                const float2 a = __bfloat1622float2(q2[d]);
                const float2 b = __bfloat1622float2(k2[d]);
                dot = fmaf(a.x, b.x, dot);
                dot = fmaf(a.y, b.y, dot);
            }
            const float score = key_ok ? dot * scale : -INFINITY;
            const float m_new = fmaxf(m[hh], warp_max(score));
            if (m_new == -INFINITY) continue;  // nothing visible yet for this head (warp-uniform)
            const float correction = __expf(m[hh] - m_new);  // 0 when m was -inf
            const float p = key_ok ? __expf(score - m_new) : 0.f;
            l[hh] = l[hh] * correction + warp_sum(p);
            m[hh] = m_new;
#pragma unroll
            for (int j = 0; j < MLA_MAX_ACC; ++j) acc[hh][j] *= correction;
            for (int key = 0; key < MLA_TILE; ++key) {
                const float pk = __shfl_sync(0xffffffffu, p, key);
                if (pk == 0.f) continue;  // warp-uniform: invalid key or underflow
                const __nv_bfloat16* row = k_s + key * kstride;
#pragma unroll
                for (int j = 0; j < MLA_MAX_ACC; ++j) {
                    const int d = lane + 32 * j;
                    if (d < latent) acc[hh][j] = fmaf(pk, bf16_to_f32(row[d]), acc[hh][j]);
                }
            }
        }
    }

#pragma unroll
    for (int hh = 0; hh < MLA_HEADS_PER_WARP; ++hh) {
        const int h = head0 + warp * MLA_HEADS_PER_WARP + hh;
        if (h >= heads) continue;
        const float inv = l[hh] > 0.f ? 1.f / l[hh] : 0.f;
        __nv_bfloat16* o = out + ((size_t)qr * heads + h) * latent;
#pragma unroll
        for (int j = 0; j < MLA_MAX_ACC; ++j) {
            const int d = lane + 32 * j;
            if (d < latent) o[d] = f32_to_bf16(acc[hh][j] * inv);
        }
        if (lane == 0) lse[(size_t)qr * heads + h] = l[hh] > 0.f ? m[hh] + logf(l[hh]) : -INFINITY;
    }
}
