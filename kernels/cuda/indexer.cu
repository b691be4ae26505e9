// DSA lightning indexer scores, bf16 inputs, float32 accumulation.
// Reference: engine/src/backend/cpu.rs `indexer_select` and engine/tests/fixtures/README.md:
//   I[t, s] = sum_h w[t, h] * ReLU(scale * q[t, h] . k[key_start[t] + s])   for s < n_visible[t]
//   I[t, s] = -FLT_MAX (float32 min, as the reference's additive mask)        otherwise
// `w` already carries Hi^-0.5 (the reference folds it into weights_proj's output); `scale` is Di^-0.5.
// Every entry of scores[t, 0 .. n_keys) is written.
//
// Launch: grid = (ceil(n_keys / INDEXER_KEYS), n_queries), block = 2 * INDEXER_KEYS = 128,
// dynamic shared memory = indexer_smem_bytes(heads, dim) below (33 KB at 64 heads x 128).
// Each thread scores one key over half the heads; the key tile and the query sit in shared memory.
#include "common.cuh"

#define INDEXER_KEYS 64

// Shared memory the launch needs: the query (heads x dim bf16), the key tile (INDEXER_KEYS rows
// of dim + 2 bf16: the padding makes the row stride an odd number of words, so no bank conflicts
// when dim % 4 == 0), and the partial sums of the second half of the heads.
// = heads * dim * 2 + INDEXER_KEYS * (dim + 2) * 2 + INDEXER_KEYS * 4 bytes.

extern "C" __global__ void __launch_bounds__(2 * INDEXER_KEYS)
indexer_scores_bf16(float* __restrict__ scores, const __nv_bfloat16* __restrict__ q,
                    const __nv_bfloat16* __restrict__ keys, const float* __restrict__ w,
                    const int* __restrict__ key_start, const int* __restrict__ n_visible,
                    int n_keys, int heads, int dim, float scale, long long scores_stride) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int t = blockIdx.y;
    const int tile0 = blockIdx.x * INDEXER_KEYS;
    const int visible = min(n_visible[t], n_keys);
    const int key_row = threadIdx.x % INDEXER_KEYS;
    const int half_id = threadIdx.x / INDEXER_KEYS;
    const int s = tile0 + key_row;
    float* out_row = scores + (size_t)t * scores_stride;

    if (tile0 >= visible) {  // the whole tile is masked: write the mask and leave
        if (half_id == 0 && s < n_keys) out_row[s] = -3.402823466e38f;
        return;
    }

    const int kstride = dim + 2;  // bf16 elements per key row in shared memory
    __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(smem_raw);
    __nv_bfloat16* k_s = q_s + heads * dim;
    float* partial = reinterpret_cast<float*>(k_s + INDEXER_KEYS * kstride);

    const __nv_bfloat16* q_t = q + (size_t)t * heads * dim;
    for (int i = threadIdx.x; i < heads * dim; i += blockDim.x) q_s[i] = q_t[i];
    const __nv_bfloat16* k_base = keys + (size_t)key_start[t] * dim;
    for (int i = threadIdx.x; i < INDEXER_KEYS * dim; i += blockDim.x) {
        const int r = i / dim, c = i % dim;
        const int key = tile0 + r;
        k_s[r * kstride + c] = key < visible ? k_base[(size_t)key * dim + c] : f32_to_bf16(0.f);
    }
    __syncthreads();

    float total = 0.f;
    if (s < visible) {
        const float* w_t = w + (size_t)t * heads;
        const int h_half = (heads + 1) / 2;
        const int h_begin = half_id * h_half;
        const int h_end = min(heads, h_begin + h_half);
        const __nv_bfloat162* k2 = reinterpret_cast<const __nv_bfloat162*>(k_s + key_row * kstride);
        for (int h = h_begin; h < h_end; ++h) {
            const __nv_bfloat162* q2 = reinterpret_cast<const __nv_bfloat162*>(q_s + h * dim);
            float dot = 0.f;
            for (int d = 0; d < dim / 2; ++d) {
                const float2 a = __bfloat1622float2(q2[d]);
                const float2 b = __bfloat1622float2(k2[d]);
                dot = fmaf(a.x, b.x, dot);
                dot = fmaf(a.y, b.y, dot);
            }
            total = fmaf(w_t[h], fmaxf(scale * dot, 0.f), total);
        }
    }
    if (half_id == 1) partial[key_row] = total;
    __syncthreads();
    if (half_id == 0 && s < n_keys)
        out_row[s] = s < visible ? total + partial[key_row] : -3.402823466e38f;
}
