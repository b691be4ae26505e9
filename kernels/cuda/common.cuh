// Shared helpers for every sparsemoe kernel: bf16 conversion, warp and block reductions,
// an order-preserving float→uint map for radix selection.
//
// Conventions (every kernel): activations are bf16 in device memory unless a name says f32,
// all arithmetic is float32, row-major tensors, int32 indices with -1 meaning "no entry".
#pragma once

#define SMOE_DEVICE __device__ __forceinline__

#ifdef SMOE_RTC
// The engine compiles its float32 kernels (engine.cu, topk.cu) at start-up with NVRTC, which has
// no system or toolkit headers without an include path: the fixed-width types by hand, no bf16.
typedef unsigned char uint8_t;
typedef unsigned int uint32_t;
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
#else
#include <cuda_bf16.h>
#include <stdint.h>

SMOE_DEVICE float bf16_to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
SMOE_DEVICE __nv_bfloat16 f32_to_bf16(float x) { return __float2bfloat16_rn(x); }
#endif

// The bf16 nearest to x, ties to even, as its bits (a NaN stays a quiet NaN), and back: bf16
// as raw 16-bit values, which NVRTC compiles without cuda_bf16.h.
SMOE_DEVICE unsigned short bf16_bits_rn(float x) {
    const unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
SMOE_DEVICE float bf16_bits_to_f32(unsigned short bits) { return __uint_as_float((unsigned int)bits << 16); }

// The value of an fp8 e4m3 code (no infinities; S.1111.111 is NaN), without cuda_fp8.h.
SMOE_DEVICE float fp8_e4m3_value(unsigned int code) {
    const unsigned int e = (code >> 3) & 15u, m = code & 7u;
    float v;
    if (e == 15u && m == 7u) v = __int_as_float(0x7fc00000);
    else if (e == 0u) v = (float)m * 0.001953125f;               // m/8 · 2^-6
    else v = __uint_as_float(((e + 120u) << 23) | (m << 20));   // (1 + m/8) · 2^(e-7)
    return (code & 0x80u) ? -v : v;
}

// The sum of v over the warp's 32 lanes (float or int), in every lane.
template <typename T>
SMOE_DEVICE T warp_sum(T v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

SMOE_DEVICE float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over the whole block; every thread gets the result. `scratch` holds >= 32 floats and
// may be reused only after the call returns (the trailing barrier protects it).
SMOE_DEVICE float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < warps; ++w) total += scratch[w];
    __syncthreads();
    return total;
}

// Maximum over the whole block; every thread gets the result (same contract as block_sum).
SMOE_DEVICE float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = scratch[0];
    for (int w = 1; w < warps; ++w) m = fmaxf(m, scratch[w]);
    __syncthreads();
    return m;
}

// Maps a float to a uint32 whose unsigned order is the float order (-inf < ... < +inf);
// NaN sorts above +inf. Used by radix selection.
SMOE_DEVICE uint32_t float_to_ordered(float f) {
    uint32_t bits = __float_as_uint(f);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The smallest power of two at or above s (a positive normal float): how DeepSeek rounds an fp8
// block's scale to UE8M0, a scale with an exponent and no mantissa, so dividing by it is exact.
SMOE_DEVICE float pow2_at_or_above(float s) {
    const uint32_t bits = __float_as_uint(s);
    return bits & 0x007fffffu ? __uint_as_float((bits + 0x00800000u) & 0x7f800000u) : s;
}

SMOE_DEVICE float sigmoidf(float x) { return 1.f / (1.f + expf(-x)); }
SMOE_DEVICE float siluf(float x) { return x / (1.f + expf(-x)); }
