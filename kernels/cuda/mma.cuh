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

// Two bf16 values (their bits) as one fragment register, `lo` in the low 16 bits.
SMOE_DEVICE uint32_t pack_bf16x2(unsigned short lo, unsigned short hi) {
    return (uint32_t)lo | ((uint32_t)hi << 16);
}
