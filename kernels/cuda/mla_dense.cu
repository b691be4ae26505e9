// Dense (causal) MLA attention, flash-style, absorbed form: query row r attends to the contiguous
// cache slots kv_start[r] .. kv_start[r] + kv_len[r) (its sequence's keys up to its position).
// The `dense` attention mode and the baseline the sparse kernel is compared with.
// Launch: grid = (ceil(heads / 16), n_rows), block = 256, dynamic shared memory as in mla.cuh.
#include "mla.cuh"

struct ContiguousSlots {
    const int* start;
    const int* len;
    SMOE_DEVICE int count(int row) const { return len[row]; }
    SMOE_DEVICE int slot(int row, int j) const { return start[row] + j; }
};

extern "C" __global__ void __launch_bounds__(MLA_WARPS * 32)
dense_mla_attention_bf16(__nv_bfloat16* __restrict__ out, float* __restrict__ lse,
                         const __nv_bfloat16* __restrict__ q,
                         const __nv_bfloat16* __restrict__ kv, const int* __restrict__ kv_start,
                         const int* __restrict__ kv_len, int heads, int latent, int rope,
                         float scale) {
    mla_attend(out, lse, q, kv, ContiguousSlots{kv_start, kv_len}, heads, latent, rope, scale);
}
