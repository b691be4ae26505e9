// Grouped expert GEMM, the tensor-core-free fallback (the fast path is cuBLAS grouped GEMM from
// the Rust backend). Rows of x are in expert-contiguous order (moe_permute_bf16); expert e owns
// rows offsets[e] .. offsets[e+1] and computes y[r, :] = x[r, :] . w[e]^T, with w[e] the
// [n, k] weight of expert e (row-major, as checkpoints store Linear weights). f32 accumulate/out.
// Reference: engine/src/backend/cpu.rs `moe_experts` (one product per expert over its tokens).
//
// Launch: grid = (ceil(n / 64), ceil(max_rows_per_expert / 64), experts), block = 256; a block
// past its expert's rows returns at once. 64 x 64 tiles, k in steps of 16, 4 x 4 outputs per thread.
#include "common.cuh"

#define GG_TILE 64
#define GG_K 16

extern "C" __global__ void __launch_bounds__(256)
grouped_gemm_bf16_f32(float* __restrict__ y, const __nv_bfloat16* __restrict__ x,
                      const __nv_bfloat16* __restrict__ w, const int* __restrict__ offsets,
                      int n, int k) {
    __shared__ float a_s[GG_K][GG_TILE + 1];
    __shared__ float b_s[GG_K][GG_TILE + 1];
    const int e = blockIdx.z;
    const int row_begin = offsets[e], row_end = offsets[e + 1];
    const int row0 = row_begin + blockIdx.y * GG_TILE;
    if (row0 >= row_end) return;  // block-uniform, before any barrier
    const int col0 = blockIdx.x * GG_TILE;
    const __nv_bfloat16* we = w + (size_t)e * n * k;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

    float acc[4][4] = {};
    for (int k0 = 0; k0 < k; k0 += GG_K) {
        for (int i = threadIdx.x; i < GG_TILE * GG_K; i += blockDim.x) {
            const int r = i / GG_K, kk = i % GG_K;
            const int kg = k0 + kk;
            const int xr = row0 + r, wc = col0 + r;
            a_s[kk][r] = (xr < row_end && kg < k) ? bf16_to_f32(x[(size_t)xr * k + kg]) : 0.f;
            b_s[kk][r] = (wc < n && kg < k) ? bf16_to_f32(we[(size_t)wc * k + kg]) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GG_K; ++kk) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = a_s[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = b_s[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = row0 + ty + 16 * i;
        if (r >= row_end) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int c = col0 + tx + 16 * j;
            if (c < n) y[(size_t)r * n + c] = acc[i][j];
        }
    }
}
