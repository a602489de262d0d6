// Conversions between the storage types the emulated libraries handle and f32, rounded to
// nearest even as CUDA does (bf16 NaN -> 0x7FFF like __float2bfloat16; f16 keeps NaN).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

namespace emu {

inline float bf16_to_f32(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else {
            // Subnormal: normalise.
            int e = -1;
            do {
                man <<= 1;
                e++;
            } while (!(man & 0x400));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00;  // NaN
    if (a >= 0x477ff000u) return sign | 0x7c00;  // rounds to infinity
    if (a < 0x38800000u) {
        // Subnormal or zero in f16: round (a as a value) / 2^-24 to an integer, ties to even.
        if (a < 0x33000000u) return sign;  // below half the smallest subnormal
        const uint32_t exp = a >> 23, man = (a & 0x7fffff) | 0x800000;
        const int shift = 126 - (int)exp;  // 2^-24 units: value = man * 2^(exp-150)
        const uint32_t q = man >> (shift), rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        const uint32_t r = q + (rem > half || (rem == half && (q & 1)));
        return sign | (uint16_t)r;
    }
    const uint32_t rounded = a + 0xfffu + ((a >> 13) & 1u);
    return sign | (uint16_t)((rounded - 0x38000000u) >> 13);
}

// e4m3 (float8_e4m3fn): 4 exponent bits (bias 7), 3 mantissa bits, no infinities, S.1111.111
// is NaN. Decoded from its definition (the kernels decode it with integer tricks instead).
inline float e4m3_to_f32(uint8_t b) {
    const int e = (b >> 3) & 0xF, m = b & 7;
    float v;
    if (e == 15 && m == 7) v = NAN;
    else if (e == 0) v = ldexpf((float)m, -9);
    else v = ldexpf(1.f + (float)m / 8.f, e - 7);
    return (b & 0x80) ? -v : v;
}

}  // namespace emu
