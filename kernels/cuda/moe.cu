// The token permutation around the expert GEMMs, for bf16 activations. The routing itself
// (moe_route_f32) is in engine.cu, which the engine compiles. Reference:
// engine/src/backend/cpu.rs `moe_experts`.
#include "common.cuh"

// counts[e] += number of (token, choice) pairs routed to e. counts must be zeroed first.
// Launch: grid = ceil(n_pairs / 256), block = 256.
extern "C" __global__ void moe_count_experts(int* __restrict__ counts, const int* __restrict__ ids,
                                             int n_pairs) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n_pairs) atomicAdd(&counts[ids[i]], 1);
}

// offsets[0..experts] = exclusive prefix sum of counts (offsets[experts] = total); cursor = 0.
// Launch: grid = 1, block = 32 (experts is small; one thread scans).
extern "C" __global__ void moe_expert_offsets(int* __restrict__ offsets, int* __restrict__ cursor,
                                              const int* __restrict__ counts, int experts) {
    for (int e = threadIdx.x; e < experts; e += blockDim.x) cursor[e] = 0;
    if (threadIdx.x == 0) {
        int total = 0;
        for (int e = 0; e < experts; ++e) {
            offsets[e] = total;
            total += counts[e];
        }
        offsets[experts] = total;
    }
}

// Copies token rows into expert-contiguous order: pair p = t * top_k + j goes to row
// slot_of[p] = offsets[ids[p]] + (its arrival order at that expert). Rows of one expert are
// contiguous; their order inside the expert is not fixed (the combine reads slot_of).
// Launch: grid = n_pairs, block = 128.
extern "C" __global__ void moe_permute_bf16(__nv_bfloat16* __restrict__ x_perm,
                                            int* __restrict__ slot_of,
                                            const __nv_bfloat16* __restrict__ x,
                                            const int* __restrict__ ids,
                                            const int* __restrict__ offsets,
                                            int* __restrict__ cursor, int top_k, int hidden) {
    __shared__ int slot;
    const int p = blockIdx.x;
    if (threadIdx.x == 0) {
        const int e = ids[p];
        slot = offsets[e] + atomicAdd(&cursor[e], 1);
        slot_of[p] = slot;
    }
    __syncthreads();
    const __nv_bfloat16* src = x + (size_t)(p / top_k) * hidden;
    __nv_bfloat16* dst = x_perm + (size_t)slot * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) dst[c] = src[c];
}

// out[t] = sum_j weights[t, j] * y[slot_of[t * top_k + j]] (+ out[t] when accumulate != 0, for
// adding onto the shared experts' output). Fixed summation order j = 0 .. top_k-1: deterministic.
// Launch: grid = (ceil(hidden / 256), tokens), block = 256.
extern "C" __global__ void moe_unpermute_combine_bf16(__nv_bfloat16* __restrict__ out,
                                                      const float* __restrict__ y,
                                                      const int* __restrict__ slot_of,
                                                      const float* __restrict__ weights,
                                                      int top_k, int hidden, int accumulate) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= hidden) return;
    const size_t t = blockIdx.y;
    float acc = accumulate ? bf16_to_f32(out[t * hidden + c]) : 0.f;
    for (int j = 0; j < top_k; ++j) {
        const size_t p = t * top_k + j;
        acc = fmaf(weights[p], y[(size_t)slot_of[p] * hidden + c], acc);
    }
    out[t * hidden + c] = f32_to_bf16(acc);
}
