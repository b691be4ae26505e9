// Sparse MLA attention (DSA): each query row attends to the cache slots its top-k list names.
// Decode: one row per sequence, the list from the indexer's top-k over that sequence's cache.
// Prefill: one row per prompt token, each with its own list (slots > the token's position must
// already be -1: the causal mask is the list). -1 entries are skipped.
// Launch: grid = (ceil(heads / 16), n_rows), block = 256, dynamic shared memory as in mla.cuh.
#include "mla.cuh"
#include "mla_tc.cuh"

struct TopkSlots {
    const int* indices;  // [n_rows, topk] cache slots, -1 = none
    int topk;
    SMOE_DEVICE int count(int) const { return topk; }
    SMOE_DEVICE int slot(int row, int j) const { return indices[(size_t)row * topk + j]; }
};

extern "C" __global__ void __launch_bounds__(MLA_WARPS * 32)
sparse_mla_attention_bf16(__nv_bfloat16* __restrict__ out, float* __restrict__ lse,
                          const __nv_bfloat16* __restrict__ q,
                          const __nv_bfloat16* __restrict__ kv, const int* __restrict__ indices,
                          int topk, int heads, int latent, int rope, float scale) {
    mla_attend(out, lse, q, kv, TopkSlots{indices, topk}, heads, latent, rope, scale);
}

// mla_tc.cuh's inputs and outputs here: bf16 queries [rows, heads, latent + rope], a bf16 cache
// [slot, latent + rope], a bf16 output and float32 log-sum-exps.
struct Bf16Queries {
    const unsigned short* q;
    int heads, dqk;
    SMOE_DEVICE unsigned short at(int qr, int h, int d) const { return q[((size_t)qr * heads + h) * dqk + d]; }
};
struct Bf16CacheRows {
    const unsigned short* kv;
    int dqk, latent;
    struct Row {
        const unsigned short* p;
        int latent;
        SMOE_DEVICE uint32_t latent_pair(int i) const { return load_bf16x2(p + 2 * i); }
        SMOE_DEVICE uint32_t rope_pair(int i) const { return load_bf16x2(p + latent + 2 * i); }
    };
    SMOE_DEVICE Row row(int slot) const { return Row{kv + (size_t)slot * dqk, latent}; }
};
struct Bf16Output {
    unsigned short* out;
    float* lse;
    int heads, latent;
    SMOE_DEVICE void write(int qr, int h, int d, float v) const {
        out[((size_t)qr * heads + h) * latent + d] = bf16_bits_rn(v);
    }
    SMOE_DEVICE void lse_of(int qr, int h, float v) const { lse[(size_t)qr * heads + h] = v; }
};

// The same on the tensor cores (mla_tc.cuh): latent and rope even (the cache's rows then start
// 4-byte aligned), latent ≤ 512.
// Launch: block = 128 · groups (1 to 4 groups of 16 heads), grid = (ceil(heads / (16 · groups)),
// n_rows), dynamic shared memory as in mla_tc.cuh.
extern "C" __global__ void __launch_bounds__(MLA_TC_MAX_THREADS)
sparse_mla_attention_bf16_tc(__nv_bfloat16* __restrict__ out, float* __restrict__ lse,
                             const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kv,
                             const int* __restrict__ indices, int topk, int heads, int latent, int rope,
                             float scale) {
    const int dqk = latent + rope;
    mla_attend_tc(Bf16Queries{reinterpret_cast<const unsigned short*>(q), heads, dqk}, TopkSlots{indices, topk},
                  Bf16CacheRows{reinterpret_cast<const unsigned short*>(kv), dqk, latent},
                  Bf16Output{reinterpret_cast<unsigned short*>(out), lse, heads, latent}, blockIdx.y,
                  blockIdx.x * mla_tc_block_heads(), heads, latent, rope, scale);
}
