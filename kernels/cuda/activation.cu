// SwiGLU activation. Reference: engine/src/backend/cpu.rs `swiglu` (silu(gate) * up).
#include "common.cuh"

// x is [rows, 2*cols] with the gate in [0, cols) and up in [cols, 2*cols) (the fused
// gate_up_proj layout); out[r, c] = silu(gate) * up. Launch: grid = (ceil(cols / 256), rows), block = 256.
extern "C" __global__ void silu_and_mul_bf16(__nv_bfloat16* __restrict__ out,
                                             const __nv_bfloat16* __restrict__ x, int cols) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const size_t r = blockIdx.y;
    const float g = bf16_to_f32(x[r * 2 * cols + c]);
    const float u = bf16_to_f32(x[r * 2 * cols + cols + c]);
    out[r * cols + c] = f32_to_bf16(siluf(g) * u);
}

// The same over f32 GEMM output (the grouped GEMM fallback writes f32).
extern "C" __global__ void silu_and_mul_f32(__nv_bfloat16* __restrict__ out,
                                            const float* __restrict__ x, int cols) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const size_t r = blockIdx.y;
    const float g = x[r * 2 * cols + c];
    const float u = x[r * 2 * cols + cols + c];
    out[r * cols + c] = f32_to_bf16(siluf(g) * u);
}
