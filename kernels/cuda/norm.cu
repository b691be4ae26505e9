// RMSNorm, optionally fused with the residual add that precedes it in a decoder layer.
// Reference: engine/src/backend/cpu.rs `rms_norm`; y = w * x / sqrt(mean(x^2) + eps), float32.
// Launch: grid = rows, block = 256 (any multiple of 32 up to 1024); no dynamic shared memory.
#include "common.cuh"

// out[r] = RMSNorm(x[r]) * w.
extern "C" __global__ void rms_norm_bf16(__nv_bfloat16* __restrict__ out,
                                         const __nv_bfloat16* __restrict__ x,
                                         const __nv_bfloat16* __restrict__ weight, int cols,
                                         float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const __nv_bfloat16* xr = x + row * cols;
    float ss = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = bf16_to_f32(xr[c]);
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        out[row * cols + c] = f32_to_bf16(bf16_to_f32(xr[c]) * inv * bf16_to_f32(weight[c]));
}

// residual[r] += x[r] (kept in f32, the residual stream's precision); out[r] = RMSNorm(residual[r]) * w.
// The sum is normalised exactly as stored, so the next layer sees the same residual.
extern "C" __global__ void fused_add_rms_norm_bf16(__nv_bfloat16* __restrict__ out,
                                                   float* __restrict__ residual,
                                                   const __nv_bfloat16* __restrict__ x,
                                                   const __nv_bfloat16* __restrict__ weight,
                                                   int cols, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    float* rr = residual + row * cols;
    const __nv_bfloat16* xr = x + row * cols;
    float ss = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = rr[c] + bf16_to_f32(xr[c]);
        rr[c] = v;
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        out[row * cols + c] = f32_to_bf16(rr[c] * inv * bf16_to_f32(weight[c]));
}
