// Tensor-core products through mma.sync (sm_80 and later), shared by the tensor-core kernels.
#pragma once
#include "common.cuh"

// d += a · b on the warp's tensor cores: A 16×16 and B 16×8 in bf16, D 16×8 in float32, each
// spread over the 32 lanes as the PTX ISA lays out mma.m16n8k16's fragments, with g = lane / 4
// and t = lane % 4 (a register's lower-numbered element in its low 16 bits):
//   a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   d[0], d[1] = D[g][2t, 2t+1]   d[2], d[3] = D[g+8][2t, 2t+1]
// Every lane of the warp must call it together. The CPU emulator (kernels/emu) runs the same
// product from the same fragments.
SMOE_DEVICE void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef SMOE_EMULATED
    smoe_emu::mma_m16n8k16_bf16(d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Two consecutive bf16 values (the first at an even element of a 4-byte aligned row) as one
// fragment register.
SMOE_DEVICE uint32_t load_bf16x2(const unsigned short* p) { return *reinterpret_cast<const uint32_t*>(p); }
#ifndef SMOE_RTC
SMOE_DEVICE uint32_t load_bf16x2(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }
#endif

// Four consecutive bytes (fp8 codes, the first in the low byte) at a 4-byte aligned address as
// one fragment register.
SMOE_DEVICE uint32_t load_u32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Two bf16 values (their bits) as one fragment register, `lo` in the low 16 bits.
SMOE_DEVICE uint32_t pack_bf16x2(unsigned short lo, unsigned short hi) {
    return (uint32_t)lo | ((uint32_t)hi << 16);
}

// The bf16 bits of two e4m3 codes (the low two bytes of `codes`, the first in the low byte) as
// one fragment register: exact, bf16 having e4m3's exponent range and more mantissa bits.
SMOE_DEVICE uint32_t e4m3x2_bf16x2(uint32_t codes) {
    return pack_bf16x2((unsigned short)(__float_as_uint(fp8_e4m3_value(codes & 0xffu)) >> 16),
                       (unsigned short)(__float_as_uint(fp8_e4m3_value((codes >> 8) & 0xffu)) >> 16));
}

// d += a · b over k = 32 with A (16×32) and B (32×8) in fp8 e4m3, four codes a register (the
// lowest-numbered element in the low byte), laid out as the PTX ISA lays out mma.m16n8k32's
// 8-bit fragments:
//   a[0] = A[g][4t .. 4t+3]   a[1] = A[g+8][4t .. 4t+3]   a[2] = A[g][4t+16 .. 4t+19]   a[3] = A[g+8][4t+16 .. 4t+19]
//   b[0] = B[4t .. 4t+3][g]   b[1] = B[4t+16 .. 4t+19][g]
//   d as mma_bf16_16816's
// as two bf16 products of the codes widened (exactly): the k of the lane's registers 4t, 4t+1
// become bf16's 2t, 2t+1 and 4t+2, 4t+3 its 2t+8, 2t+9, for A and B alike, so every product is
// summed once. What sm_80 to sm_88 run in place of the fp8 instruction; the same sums (in
// another order).
SMOE_DEVICE void mma_e4m3_16832_widened(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    const uint32_t a_lo[4] = {e4m3x2_bf16x2(a[0]), e4m3x2_bf16x2(a[1]), e4m3x2_bf16x2(a[0] >> 16),
                              e4m3x2_bf16x2(a[1] >> 16)};
    const uint32_t b_lo[2] = {e4m3x2_bf16x2(b[0]), e4m3x2_bf16x2(b[0] >> 16)};
    mma_bf16_16816(d, a_lo, b_lo);
    const uint32_t a_hi[4] = {e4m3x2_bf16x2(a[2]), e4m3x2_bf16x2(a[3]), e4m3x2_bf16x2(a[2] >> 16),
                              e4m3x2_bf16x2(a[3] >> 16)};
    const uint32_t b_hi[2] = {e4m3x2_bf16x2(b[1]), e4m3x2_bf16x2(b[1] >> 16)};
    mma_bf16_16816(d, a_hi, b_hi);
}

// mma_e4m3_16832_widened's sum as mma.sync m16n8k32 e4m3 where the device takes it (sm_89 and
// later), widened elsewhere. Only Ada (sm_89) has fp8 tensor cores for it, at twice bf16's rate:
// sm_90 takes the instruction but converts the codes to fp16 for its fp16 tensor cores (NVIDIA's
// answer in CUTLASS issue 1986), bf16's rate with hardware conversions, which still beats the
// widened path's software ones; Hopper's fp8 rate needs wgmma. Every lane of the warp
// must call it together. The callers use it only for whole dot products over k with A and B
// packed alike, which any order of k within the instruction leaves the same.
SMOE_DEVICE void mma_e4m3_16832(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(SMOE_EMULATED)
    smoe_emu::mma_m16n8k32_e4m3(d, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    mma_e4m3_16832_widened(d, a, b);
#endif
}
