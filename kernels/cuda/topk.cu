// Top-k per row by radix selection, for long rows (the indexer's 128K+ keys).
// Reference: engine/src/backend/cpu.rs `top_k` / `indexer_select` (as a set): out[r] holds the
// indices of the k largest of scores[r, 0 .. n_valid[r]), in ascending order (so the engine
// need not sort them, and the attention that reads them sums its keys in one order). When
// n_valid[r] <= k every valid index is returned (0 .. n_valid-1) and the remaining slots are -1,
// as the engine does for early rows. Ties at the k-th value: the lowest indices, as the engine
// breaks them.
//
// Two ways to the same result:
// - `topk_rows_f32`: grid = rows, one block a row.
// - For few long rows (a decode step's: 8 rows would leave all but 8 of an H200's 132
//   multiprocessors idle), `topk_parts_f32` then `topk_merge_f32`. The first splits each row
//   into `parts` parts of `part_len` scores (grid = rows x parts) and writes each part's top k,
//   indices and scores, to its k slots of the row's candidates; the second picks each row's
//   top k of its candidates (grid = rows). Every winner of the row is a winner of its part
//   (fewer than k scores of the row beat it, so fewer than k of its part do), so the row's
//   top k are among the candidates. With part_len >= k every part before a row's last
//   non-empty one fills its k slots, so a row's candidates are a contiguous prefix, in index
//   order: the merge's ties at the k-th value go to the lowest indices too.
//
// Block = TOPK_THREADS (1024), no dynamic shared memory (33.3 KB static); one block an SM
// (`__launch_bounds__(1024, 1)`: about 50 registers a thread, where two blocks would spill).
// Radix selection of 8-bit digits over the order-preserving uint32 image of each score narrows
// the k-th largest value down to one exact bit pattern; after each digit's histogram one warp
// scans the 256 bins to find the digit. The first digit's pass strides over the row; the
// second's goes over it as one contiguous segment a warp, with a histogram a warp, so that each
// warp then knows how many of its entries are above the 16-bit prefix and how many equal it.
// - Usually (continuous scores: k plus a few hundred, so for k up to about 3800) those number
//   at most TOPK_COLLECT (4096): a third pass copies them, in row order, into shared memory,
//   and the last two digits and the winners are found there (one warp writes the winners:
//   k / 32 steps). Three reads of the row.
// - Otherwise (heavy ties): the third digit strides over the row, the fourth goes a segment a
//   warp, and a fifth pass writes each warp's winners from its segment's place in the row, in
//   index order, ranked by ballots. Five reads.
// No block barrier inside a pass; every pass loads TOPK_LOADS scores a thread before it uses
// them.
#include "common.cuh"

#define TOPK_THREADS 1024
#define TOPK_BINS 256
#define TOPK_WARPS (TOPK_THREADS / 32)
#define TOPK_BINS_PER_LANE (TOPK_BINS / 32)
// Scores a thread (or a lane, 32-score chunks a warp) loads before it uses the first: a loop
// of one load then its use would keep one load a warp in flight, and the passes are bound by
// the latency of reading the row (from L2: 64K scores do not fit in L1).
#define TOPK_LOADS 8
// Entries (a score and its position) the third pass collects at most: they take the shared
// memory of the warps' histograms.
#define TOPK_COLLECT (TOPK_WARPS * TOPK_BINS / 2)

// Warp-wide inclusive prefix sum of v over lanes 0 .. lane.
SMOE_DEVICE int warp_inclusive_sum(int v, int lane) {
    for (int d = 1; d < 32; d *= 2) {
        const int other = __shfl_up_sync(0xffffffffu, v, d);
        if (lane >= d) v += other;
    }
    return v;
}

// A lane's scores of the TOPK_LOADS 32-score chunks from `base` (0 past `end`), all loaded
// before any is used.
SMOE_DEVICE void load_chunks(float (&v)[TOPK_LOADS], const float* __restrict__ x, int base,
                             int lane, int end) {
#pragma unroll
    for (int c = 0; c < TOPK_LOADS; ++c) {
        const int i = base + c * 32 + lane;
        v[c] = i < end ? x[i] : 0.f;
    }
}

// Warp 0, after a radix pass's histogram: the k-th largest lies in the first digit, from the
// largest down, where the running count reaches `want`. Lane l holds digits 255 - 8l down to
// 248 - 8l; a prefix sum over the lanes finds the lane whose digits reach it, which walks them
// and narrows the prefix, its mask and `want` to that digit.
SMOE_DEVICE void choose_digit(const unsigned int* hist, int shift, int lane, uint32_t* prefix_s,
                              uint32_t* mask_s, int* want_s) {
    const int want = *want_s;
    const int top = TOPK_BINS - 1 - lane * TOPK_BINS_PER_LANE;
    int mine = 0;
    for (int j = 0; j < TOPK_BINS_PER_LANE; ++j) mine += (int)hist[top - j];
    const int through = warp_inclusive_sum(mine, lane);
    const unsigned int reached = __ballot_sync(0xffffffffu, through >= want);
    // The bins always hold `want` matching entries; were they short, digit 0 and what is left
    // of `want`, as a walk to the bottom would end.
    const int at = reached ? __ffs(reached) - 1 : 31;
    if (lane == at) {
        int left = want - (through - mine);
        int digit = top;
        for (int j = 0; j < TOPK_BINS_PER_LANE - 1; ++j, --digit) {
            const int c = (int)hist[digit];
            if (c >= left) break;
            left -= c;
        }
        *want_s = left;
        *prefix_s |= (uint32_t)digit << shift;
        *mask_s |= 0xffu << shift;
    }
}

// Shared memory the passes take in turn: each warp's histogram of a digit of its segment of
// the row, then (when few enough entries match the first two digits) those entries, score and
// position, in row order.
union TopkScratch {
    unsigned int warp_hist[TOPK_WARPS][TOPK_BINS];
    struct {
        float score[TOPK_COLLECT];
        int pos[TOPK_COLLECT];
    } c;
};

// The block's histogram (zeroed by the caller) of digit `shift` of the entries of x[0 .. n)
// that match `prefix` under `mask`, the threads striding over them.
SMOE_DEVICE void strided_pass(unsigned int* hist, const float* __restrict__ x, int n,
                              uint32_t prefix, uint32_t mask, int shift) {
    for (int base = threadIdx.x; base < n; base += TOPK_LOADS * blockDim.x) {
        float v[TOPK_LOADS];
#pragma unroll
        for (int c = 0; c < TOPK_LOADS; ++c) {
            const int i = base + c * blockDim.x;
            v[c] = i < n ? x[i] : 0.f;
        }
#pragma unroll
        for (int c = 0; c < TOPK_LOADS; ++c) {
            const uint32_t u = float_to_ordered(v[c]);
            if (base + c * (int)blockDim.x < n && (u & mask) == prefix)
                atomicAdd(&hist[(u >> shift) & 0xffu], 1u);
        }
    }
}

// This warp's histogram of digit `shift` of its entries x[begin .. end) that match `prefix`
// under `mask`; returns, to every lane, how many of them are above the prefix.
SMOE_DEVICE int segment_pass(unsigned int* my_hist, const float* __restrict__ x, int begin,
                             int end, int lane, uint32_t prefix, uint32_t mask, int shift) {
    for (int b = lane; b < TOPK_BINS; b += 32) my_hist[b] = 0;
    __syncwarp();
    int above = 0;
    for (int base = begin; base < end; base += TOPK_LOADS * 32) {
        float v[TOPK_LOADS];
        load_chunks(v, x, base, lane, end);
#pragma unroll
        for (int c = 0; c < TOPK_LOADS; ++c) {
            const bool in = base + c * 32 + lane < end;
            const uint32_t u = float_to_ordered(v[c]);
            if (in && (u & mask) == prefix) atomicAdd(&my_hist[(u >> shift) & 0xffu], 1u);
            above += __popc(__ballot_sync(0xffffffffu, in && (u & mask) > prefix));
        }
    }
    return above;
}

// After every warp's segment_pass at `shift`: the block's histogram, the digit (narrowing the
// prefix, its mask and `want`), and each warp's count of entries above the narrowed prefix
// (`above`: its count above the old one, plus its bins above the digit) and equal to it.
SMOE_DEVICE void segment_counts(unsigned int* hist, const unsigned int (*warp_hist)[TOPK_BINS],
                                int shift, int above, int lane, int warp, uint32_t* prefix_s,
                                uint32_t* mask_s, int* want_s, int* warp_above, int* warp_equal) {
    const int warps = blockDim.x >> 5;
    __syncthreads();
    for (int b = threadIdx.x; b < TOPK_BINS; b += blockDim.x) {
        unsigned int sum = 0;
        for (int w = 0; w < warps; ++w) sum += warp_hist[w][b];
        hist[b] = sum;
    }
    __syncthreads();
    if (warp == 0) choose_digit(hist, shift, lane, prefix_s, mask_s, want_s);
    __syncthreads();
    const int digit = (int)((*prefix_s >> shift) & 0xffu);
    int mine = 0;  // this lane's bins above the digit
    for (int j = 0; j < TOPK_BINS_PER_LANE; ++j) {
        const int b = lane * TOPK_BINS_PER_LANE + j;
        if (b > digit) mine += (int)warp_hist[warp][b];
    }
    above += warp_sum(mine);
    if (lane == 0) {
        warp_above[warp] = above;
        warp_equal[warp] = (int)warp_hist[warp][digit];
    }
    __syncthreads();
}

// One 32-entry chunk of a warp's winners, in row order: lane's entry (score v at row position
// i, `in` the row) wins if above the threshold, or equal to it and among the `want` first
// equal ones (equal_rank of them came before this chunk); winners go to slots from `slot`.
SMOE_DEVICE void write_winners(int* __restrict__ o, float* __restrict__ o_scores,
                               const int* __restrict__ map, int first, float v, int i, bool in,
                               uint32_t threshold, int want, unsigned int below_lane,
                               int& equal_rank, int& slot) {
    const uint32_t u = float_to_ordered(v);
    const bool is_equal = in && u == threshold;
    const unsigned int equals = __ballot_sync(0xffffffffu, is_equal);
    const bool won =
        (in && u > threshold) || (is_equal && equal_rank + __popc(equals & below_lane) < want);
    const unsigned int wins = __ballot_sync(0xffffffffu, won);
    if (won) {
        const int at = slot + __popc(wins & below_lane);
        o[at] = map ? map[i] : first + i;
        if (o_scores) o_scores[at] = v;
    }
    equal_rank += __popc(equals);
    slot += __popc(wins);
}

// One block's top k of x[0 .. n) into o[0 .. k): as index `first + i`, or `map[i]` where map is
// given; with `o_scores`, each winner's score too (in the same slot).
SMOE_DEVICE void topk_block(int* __restrict__ o, float* __restrict__ o_scores,
                            const float* __restrict__ x, const int* __restrict__ map, int n, int k,
                            int first) {
    __shared__ unsigned int hist[TOPK_BINS];
    __shared__ TopkScratch scratch;
    __shared__ uint32_t prefix_s, mask_s;
    __shared__ int want_s;  // how many entries equal to the threshold still belong in the top k
    __shared__ int warp_above[TOPK_WARPS], warp_equal[TOPK_WARPS];

    if (n <= k) {
        for (int j = threadIdx.x; j < k; j += blockDim.x) {
            o[j] = j < n ? (map ? map[j] : first + j) : -1;
            if (o_scores) o_scores[j] = j < n ? x[j] : 0.f;
        }
        return;
    }

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const unsigned int below_lane = (1u << lane) - 1u;
    if (threadIdx.x == 0) {
        prefix_s = 0;
        mask_s = 0;
        want_s = k;
    }
    // The first digit: the block's threads stride over the row.
    for (int b = threadIdx.x; b < TOPK_BINS; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    strided_pass(hist, x, n, 0, 0, 24);
    __syncthreads();
    if (warp == 0) choose_digit(hist, 24, lane, &prefix_s, &mask_s, &want_s);
    __syncthreads();

    // The second, a contiguous segment of the row a warp: warp w owns entries [w * seg,
    // (w + 1) * seg), a whole number of 32-entry chunks, and keeps its own histogram, so that
    // once the digit is known each warp knows how many of its entries are above the 16-bit
    // prefix and how many equal it, with no pass over the row to count them.
    const int seg = (n + warps * 32 - 1) / (warps * 32) * 32;
    const int begin = warp * seg, end = min(n, begin + seg);
    unsigned int* my_hist = scratch.warp_hist[warp];
    int above = segment_pass(my_hist, x, begin, end, lane, prefix_s, mask_s, 16);
    segment_counts(hist, scratch.warp_hist, 16, above, lane, warp, &prefix_s, &mask_s, &want_s,
                   warp_above, warp_equal);

    // Few enough entries at or above the 16-bit prefix (for continuous scores a few hundred past
    // k): a third pass collects them, in row order, where the histograms were; the last two
    // digits and the winners are found among them, with no more reads of the row.
    const int collected = warp_sum(lane < warps ? warp_above[lane] + warp_equal[lane] : 0);
    if (collected <= TOPK_COLLECT) {
        const uint32_t prefix = prefix_s, mask = mask_s;
        int slot = warp_sum(lane < warp ? warp_above[lane] + warp_equal[lane] : 0);
        for (int base = begin; base < end; base += TOPK_LOADS * 32) {
            float v[TOPK_LOADS];
            load_chunks(v, x, base, lane, end);
#pragma unroll
            for (int c = 0; c < TOPK_LOADS; ++c) {
                const int i = base + c * 32 + lane;
                const bool keep = i < end && (float_to_ordered(v[c]) & mask) >= prefix;
                const unsigned int keeps = __ballot_sync(0xffffffffu, keep);
                if (keep) {
                    const int at = slot + __popc(keeps & below_lane);
                    scratch.c.score[at] = v[c];
                    scratch.c.pos[at] = i;
                }
                slot += __popc(keeps);
            }
        }
        for (int shift = 8; shift >= 0; shift -= 8) {
            for (int b = threadIdx.x; b < TOPK_BINS; b += blockDim.x) hist[b] = 0;
            __syncthreads();
            strided_pass(hist, scratch.c.score, collected, prefix_s, mask_s, shift);
            __syncthreads();
            if (warp == 0) choose_digit(hist, shift, lane, &prefix_s, &mask_s, &want_s);
            __syncthreads();
        }
        if (warp != 0) return;
        // One warp writes the winners in row order: every entry above the threshold, and of
        // those equal to it the `want` first, as the CPU breaks ties.
        const uint32_t threshold = prefix_s;
        const int want = want_s;
        int equal_rank = 0;
        slot = 0;
        for (int base = 0; base < collected; base += 32) {
            const int j = base + lane;
            const bool in = j < collected;
            write_winners(o, o_scores, map, first, in ? scratch.c.score[j] : 0.f,
                          in ? scratch.c.pos[j] : 0, in, threshold, want, below_lane, equal_rank,
                          slot);
        }
        return;
    }

    // Too many to collect (heavy ties, or scores bunched at the k-th value): the third digit
    // with the threads striding over the row again, the fourth a segment a warp.
    for (int b = threadIdx.x; b < TOPK_BINS; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    strided_pass(hist, x, n, prefix_s, mask_s, 8);
    __syncthreads();
    if (warp == 0) choose_digit(hist, 8, lane, &prefix_s, &mask_s, &want_s);
    __syncthreads();
    above = segment_pass(my_hist, x, begin, end, lane, prefix_s, mask_s, 0);
    segment_counts(hist, scratch.warp_hist, 0, above, lane, warp, &prefix_s, &mask_s, &want_s,
                   warp_above, warp_equal);

    // The winners: every entry above the threshold, and of those equal to it the `want` lowest
    // indices, as the CPU breaks ties, so the result does not depend on thread timing. This
    // warp's first slot, and the rank of its first equal entry among the row's:
    const uint32_t threshold = prefix_s;
    const int want = want_s;  // entries equal to the threshold to take; k - want are above it
    const int before = lane < warp ? lane : -1;
    int equal_rank = warp_sum(before >= 0 ? warp_equal[before] : 0);
    int slot = warp_sum(before >= 0 ? warp_above[before] : 0) + min(equal_rank, want);
    for (int base = begin; base < end; base += TOPK_LOADS * 32) {
        float v[TOPK_LOADS];
        load_chunks(v, x, base, lane, end);
#pragma unroll
        for (int c = 0; c < TOPK_LOADS; ++c) {
            const int i = base + c * 32 + lane;
            write_winners(o, o_scores, map, first, v[c], i, i < end, threshold, want, below_lane,
                          equal_rank, slot);
        }
    }
}

extern "C" __global__ void __launch_bounds__(TOPK_THREADS, 1)
topk_rows_f32(int* __restrict__ out, const float* __restrict__ scores,
              const int* __restrict__ n_valid, int k, long long scores_stride) {
    const int row = blockIdx.x;
    topk_block(out + (size_t)row * k, nullptr, scores + (size_t)row * scores_stride, nullptr,
               n_valid[row], k, 0);
}

// Block (row, p): the top k of part p, scores[row, p * part_len .. min(n_valid[row], (p + 1) *
// part_len)), to slots [p * k, (p + 1) * k) of the row's candidates: indices into the row in
// cand_idx, their scores in cand_scores (both [rows, gridDim.y * k]). A part past the row's
// valid scores writes -1s. part_len >= k (see the top of the file).
extern "C" __global__ void __launch_bounds__(TOPK_THREADS, 1)
topk_parts_f32(int* __restrict__ cand_idx, float* __restrict__ cand_scores,
               const float* __restrict__ scores, const int* __restrict__ n_valid, int k,
               long long scores_stride, int part_len) {
    const int row = blockIdx.x, part = blockIdx.y;
    const size_t slots = (size_t)row * gridDim.y * k + (size_t)part * k;
    const int first = part * part_len;
    const int n = max(0, min(n_valid[row] - first, part_len));
    topk_block(cand_idx + slots, cand_scores + slots,
               scores + (size_t)row * scores_stride + first, nullptr, n, k, first);
}

// Block row: the top k of the row's candidates from `topk_parts_f32` (`parts` parts of
// part_len), as indices into the row, to out[row].
extern "C" __global__ void __launch_bounds__(TOPK_THREADS, 1)
topk_merge_f32(int* __restrict__ out, const int* __restrict__ cand_idx,
               const float* __restrict__ cand_scores, const int* __restrict__ n_valid, int k,
               int part_len, int parts) {
    const int row = blockIdx.x;
    // The valid candidates: k from every full part, then the rest of the row (at most k).
    const int n_row = n_valid[row];
    int n = 0;
    for (int p = 0; p < parts; ++p) n += max(0, min(min(n_row - p * part_len, part_len), k));
    const size_t from = (size_t)row * parts * k;
    topk_block(out + (size_t)row * k, nullptr, cand_scores + from, cand_idx + from, n, k, 0);
}
