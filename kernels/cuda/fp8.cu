// fp8 e4m3 (the "fn" variant: no infinities, S.1111.111 is NaN) weights with DeepSeek's 128 x 128
// block scales: w[r, c] = e4m3(q[r, c]) * scale_inv[r / 128, c / 128].
// Reference: engine/src/weights.rs `fp8_e4m3_to_f32` and `Matrix::rows_f32`.
// Launch: grid = (ceil(cols / 256), min(rows, 65535)), block = 256; rows beyond grid.y loop.
#include "common.cuh"
#include <cuda_fp8.h>

#define FP8_BLOCK 128

SMOE_DEVICE float fp8_block_value(const uint8_t* q, const float* scale_inv, int rows, int cols,
                                  size_t r, int c) {
    (void)rows;
    const int scale_cols = (cols + FP8_BLOCK - 1) / FP8_BLOCK;
    const __half h = __half(__nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)q[r * cols + c], __NV_E4M3));
    return __half2float(h) * scale_inv[(r / FP8_BLOCK) * scale_cols + c / FP8_BLOCK];
}

extern "C" __global__ void fp8_block_dequant_bf16(__nv_bfloat16* __restrict__ out,
                                                  const uint8_t* __restrict__ q,
                                                  const float* __restrict__ scale_inv, int rows,
                                                  int cols) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    for (size_t r = blockIdx.y; r < (size_t)rows; r += gridDim.y)
        out[r * cols + c] = f32_to_bf16(fp8_block_value(q, scale_inv, rows, cols, r, c));
}

extern "C" __global__ void fp8_block_dequant_f32(float* __restrict__ out,
                                                 const uint8_t* __restrict__ q,
                                                 const float* __restrict__ scale_inv, int rows,
                                                 int cols) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    for (size_t r = blockIdx.y; r < (size_t)rows; r += gridDim.y)
        out[r * cols + c] = fp8_block_value(q, scale_inv, rows, cols, r, c);
}
