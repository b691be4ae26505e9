// Top-k per row by radix selection, for long rows (the indexer's 128K+ keys).
// Reference: engine/src/backend/cpu.rs `top_k` / `indexer_select` (as a set): out[r] holds the
// indices of the k largest of scores[r, 0 .. n_valid[r]), in ascending order (so the engine
// need not sort them, and the attention that reads them sums its keys in one order). When
// n_valid[r] <= k every valid index is returned (0 .. n_valid-1) and the remaining slots are -1,
// as the engine does for early rows. Ties at the k-th value: the lowest indices, as the engine
// breaks them.
//
// Launch: grid = rows, block = TOPK_THREADS (1024), no dynamic shared memory.
// Four passes of 8-bit digits over the order-preserving uint32 image of each score narrow the
// k-th largest value down to one exact bit pattern; a fifth pass, tile by tile in index order,
// writes the winners in index order.
#include "common.cuh"

#define TOPK_THREADS 1024
#define TOPK_BINS 256

extern "C" __global__ void __launch_bounds__(TOPK_THREADS)
topk_rows_f32(int* __restrict__ out, const float* __restrict__ scores,
              const int* __restrict__ n_valid, int k, long long scores_stride) {
    __shared__ unsigned int hist[TOPK_BINS];
    __shared__ uint32_t prefix_s, mask_s;
    __shared__ int want_s;  // how many entries equal to the threshold still belong in the top k

    const int row = blockIdx.x;
    const int n = n_valid[row];
    const float* x = scores + (size_t)row * scores_stride;
    int* o = out + (size_t)row * k;

    if (n <= k) {
        for (int j = threadIdx.x; j < k; j += blockDim.x) o[j] = j < n ? j : -1;
        return;
    }

    if (threadIdx.x == 0) {
        prefix_s = 0;
        mask_s = 0;
        want_s = k;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < TOPK_BINS; b += blockDim.x) hist[b] = 0;
        __syncthreads();
        const uint32_t prefix = prefix_s, mask = mask_s;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const uint32_t u = float_to_ordered(x[i]);
            if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 0xffu], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            // Walk the digits from the largest: the k-th largest lies in the first bin where
            // the running count reaches `want`.
            int want = want_s;
            int digit = TOPK_BINS - 1;
            for (; digit > 0; --digit) {
                const int c = (int)hist[digit];
                if (c >= want) break;
                want -= c;
            }
            want_s = want;
            prefix_s = prefix | ((uint32_t)digit << shift);
            mask_s = mask | (0xffu << shift);
        }
        __syncthreads();
    }

    const uint32_t threshold = prefix_s;
    const int want = want_s;  // entries equal to the threshold to take; k - want are above it
    // The winners: every entry above the threshold, and of those equal to it the `want` lowest
    // indices, as the CPU breaks ties, so the result does not depend on thread timing. Tiles of
    // the row are walked in index order; within a tile an entry's rank among the equal entries,
    // and its slot among the winners, are those before it (earlier tiles, earlier warps, lower
    // lanes), counted by ballots.
    __shared__ int warp_equal[TOPK_THREADS / 32], warp_won[TOPK_THREADS / 32];
    __shared__ int taken_s, won_s;  // equal entries and winners in the tiles before this one
    if (threadIdx.x == 0) taken_s = won_s = 0;
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const unsigned int below_lane = (1u << lane) - 1u;
    for (int base = 0; base < n; base += blockDim.x) {
        const int i = base + threadIdx.x;
        const uint32_t u = i < n ? float_to_ordered(x[i]) : 0u;
        const bool equal = i < n && u == threshold;
        const unsigned int equals = __ballot_sync(0xffffffffu, equal);
        if (lane == 0) warp_equal[warp] = __popc(equals);
        __syncthreads();
        int rank = taken_s + __popc(equals & below_lane);
        for (int w = 0; w < warp; ++w) rank += warp_equal[w];
        const bool won = (i < n && u > threshold) || (equal && rank < want);
        const unsigned int wins = __ballot_sync(0xffffffffu, won);
        if (lane == 0) warp_won[warp] = __popc(wins);
        __syncthreads();
        if (won) {
            int slot = won_s + __popc(wins & below_lane);
            for (int w = 0; w < warp; ++w) slot += warp_won[w];
            o[slot] = i;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int equal_tile = 0, won_tile = 0;
            for (int w = 0; w < warps; ++w) {
                equal_tile += warp_equal[w];
                won_tile += warp_won[w];
            }
            taken_s += equal_tile;
            won_s += won_tile;
        }
        __syncthreads();
    }
}
