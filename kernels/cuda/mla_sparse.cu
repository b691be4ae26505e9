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

// The same on the tensor cores (mla_tc.cuh): dqk % 16 == 0, latent % 32 == 0, latent ≤ 512.
// Launch: grid = (ceil(heads / 16), n_rows), block = 128, dynamic shared memory as in mla_tc.cuh.
extern "C" __global__ void __launch_bounds__(MLA_TC_WARPS * 32)
sparse_mla_attention_bf16_tc(__nv_bfloat16* __restrict__ out, float* __restrict__ lse,
                             const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ kv,
                             const int* __restrict__ indices, int topk, int heads, int latent, int rope,
                             float scale) {
    mla_attend_tc(out, lse, q, kv, TopkSlots{indices, topk}, heads, latent, rope, scale);
}
