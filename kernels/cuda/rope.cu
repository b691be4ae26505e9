// Rotary embeddings: the cos/sin table (YaRN attention factor folded in) and its application
// in the two layouts the model uses. Reference: engine/src/rope.rs (`Rope::cos_sin`, `Rope::apply`).
#include "common.cuh"

// cos[p, i] = cos(pos[p] * inv_freq[i]) * attention_factor, sin likewise; tables are [n, half].
// The angle is formed in float32 exactly as the reference does (position * inv_freq, rounded).
// Launch: grid = ceil(n * half / 256), block = 256.
extern "C" __global__ void rope_cos_sin_f32(float* __restrict__ cos_out, float* __restrict__ sin_out,
                                            const int* __restrict__ positions,
                                            const float* __restrict__ inv_freq, int n, int half,
                                            float attention_factor) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n * half) return;
    const int p = idx / half, i = idx % half;
    const float angle = (float)positions[p] * inv_freq[i];
    float s, c;
    sincosf(angle, &s, &c);
    cos_out[idx] = c * attention_factor;
    sin_out[idx] = s * attention_factor;
}

// Rotates x[t, h, offset .. offset + 2*half) in place for every token t and head h.
// interleaved != 0: pairs (2i, 2i+1) (MLA); else pairs (i, i + half) (indexer, NeoX).
// x rows are `row_stride` elements apart, heads `head_stride` apart.
// Launch: grid = (n, heads), block = 64 (one thread per pair; loops when half > blockDim).
extern "C" __global__ void rope_apply_bf16(__nv_bfloat16* __restrict__ x,
                                           const float* __restrict__ cos_t,
                                           const float* __restrict__ sin_t, int half,
                                           long long row_stride, int head_stride, int offset,
                                           int interleaved) {
    const int t = blockIdx.x;
    __nv_bfloat16* v = x + (size_t)t * row_stride + (size_t)blockIdx.y * head_stride + offset;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const int a = interleaved ? 2 * i : i;
        const int b = interleaved ? 2 * i + 1 : i + half;
        const float c = cos_t[(size_t)t * half + i], s = sin_t[(size_t)t * half + i];
        const float xa = bf16_to_f32(v[a]), xb = bf16_to_f32(v[b]);
        v[a] = f32_to_bf16(xa * c - xb * s);
        v[b] = f32_to_bf16(xb * c + xa * s);
    }
}
