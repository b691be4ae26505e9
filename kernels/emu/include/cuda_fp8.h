// The part of cuda_fp8.h the kernels use, for the CPU emulator (kernels/emu): e4m3 codes to
// half and back. The half types here carry their value as a float (every e4m3 value is exact in
// half precision, and the kernels never keep halves in memory), so only the conversions matter:
// float to e4m3 rounds to nearest, ties to even, and with __NV_SATFINITE clamps to ±448.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "cuda_bf16.h"

typedef unsigned char __nv_fp8_storage_t;
typedef unsigned short __nv_fp8x2_storage_t;
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };
enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };

struct __half_raw {
    float value;
};
struct __half2_raw {
    float x, y;
};
struct __half {
    float value;
    __half() = default;
    explicit __half(__half_raw r) : value(r.value) {}
};
struct __half2 {
    float x, y;
    explicit __half2(__half2_raw r) : x(r.x), y(r.y) {}
};

inline float __half2float(__half h) { return h.value; }
inline float2 __half22float2(__half2 h) { return float2{h.x, h.y}; }

// smoe_emu::e4m3_value (simt.h): the value of an e4m3 code.

namespace smoe_emu {
inline void e4m3_only(__nv_fp8_interpretation_t interpretation) {
    if (interpretation != __NV_E4M3) {
        std::fprintf(stderr, "sparsemoe CUDA emulator: only e4m3 fp8 is emulated\n");
        std::abort();
    }
}
}  // namespace smoe_emu

inline __half_raw __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t code, __nv_fp8_interpretation_t interpretation) {
    smoe_emu::e4m3_only(interpretation);
    return __half_raw{smoe_emu::e4m3_value(code)};
}

inline __half2_raw __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t pair, __nv_fp8_interpretation_t interpretation) {
    smoe_emu::e4m3_only(interpretation);
    return __half2_raw{smoe_emu::e4m3_value(pair & 0xffu), smoe_emu::e4m3_value(pair >> 8)};
}

inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float x, __nv_saturation_t saturation,
                                                __nv_fp8_interpretation_t interpretation) {
    smoe_emu::e4m3_only(interpretation);
    if (std::isnan(x)) return 0x7f;
    const unsigned int sign = std::signbit(x) ? 0x80u : 0u;
    const float a = std::fabs(x);
    // The nearest of the 127 finite magnitudes (codes 0..126 ascend), ties to the even code.
    unsigned int best = 0;
    for (unsigned int c = 1; c < 127; ++c) {
        const float d = std::fabs(smoe_emu::e4m3_value(c) - a), b = std::fabs(smoe_emu::e4m3_value(best) - a);
        if (d < b || (d == b && (c & 1u) == 0)) best = c;
    }
    // Past the largest finite value: 448 saturated, else NaN beyond the rounding midpoint (464,
    // which rounds to even: 448).
    if (saturation == __NV_NOSAT && a > 464.f) return (__nv_fp8_storage_t)(sign | 0x7fu);
    return (__nv_fp8_storage_t)(sign | best);
}
