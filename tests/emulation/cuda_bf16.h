// Stands in for the CUDA toolkit's header when kernels run on the CPU (cuda_on_cpu.h).
#pragma once
#include <cstring>

struct __nv_bfloat16 {
    unsigned short bits;
};

inline float __bfloat162float(__nv_bfloat16 v) {
    const unsigned u = (unsigned)v.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Round to nearest even, as the device does; NaN stays NaN.
inline __nv_bfloat16 __float2bfloat16(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(unsigned short)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(unsigned short)(u >> 16)};
}
