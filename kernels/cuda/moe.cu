// MoE routing (DeepSeek "noaux_tc") and the token permutation around the expert GEMMs.
// Reference: engine/src/moe.rs `route` and engine/src/backend/cpu.rs `moe_experts`.
#include "common.cuh"

#define ROUTE_WARPS 4
#define ROUTE_MAX_EXPERTS 512

// Warp-wide argmax of (value, index): larger value wins, the lower index on ties.
SMOE_DEVICE void warp_argmax(float& v, int& idx) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, offset);
        const int oi = __shfl_xor_sync(0xffffffffu, idx, offset);
        if (ov > v || (ov == v && oi < idx)) {
            v = ov;
            idx = oi;
        }
    }
}

// One warp per token. s = sigmoid(logits); b = s + bias picks the experts: groups scored by the
// sum of their two largest b, the topk_group best groups kept, then the top_k largest b among
// them. Weights are the unbiased s of the chosen experts, normalised (sum + 1e-20) when
// norm_topk_prob, times routed_scaling_factor. ids come out sorted ascending, weights aligned.
// Limits: experts <= 512, n_group <= 32, top_k <= 32, experts / n_group >= 2.
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
        float gscore = -INFINITY;
        if (lane < n_group) {
            float first = -INFINITY, second = -INFINITY;
            for (int e = lane * size; e < (lane + 1) * size; ++e) {
                const float v = b[e];
                if (v > first) {
                    second = first;
                    first = v;
                } else if (v > second) {
                    second = v;
                }
            }
            gscore = first + second;
        }
        bool keep = false;
        float candidate = lane < n_group ? gscore : -INFINITY;
        for (int r = 0; r < topk_group; ++r) {
            float v = candidate;
            int g = lane < n_group && !keep ? lane : 0x7fffffff;
            if (keep || lane >= n_group) v = -INFINITY;
            warp_argmax(v, g);
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
        float v = -INFINITY;
        int idx = 0x7fffffff;
        for (int j = 0; lane + 32 * j < experts; ++j) {
            const int e = lane + 32 * j;
            if (taken & (1u << j)) continue;
            const float be = b[e];
            if (idx == 0x7fffffff || be > v) {  // first untaken, then strictly larger (lower e wins ties)
                v = be;
                idx = e;
            }
        }
        warp_argmax(v, idx);
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
        const float norm = norm_topk_prob ? 1.f / (sum + 1e-20f) : 1.f;
        for (int i = 0; i < top_k; ++i) {
            ids[(size_t)t * top_k + i] = c[i];
            weights[(size_t)t * top_k + i] = sc[c[i]] * norm * routed_scaling_factor;
        }
    }
}

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
