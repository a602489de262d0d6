// Shared helpers of tulu's kernels: the bf16 type, f32 conversions and warp/block reductions.
//
// Conventions every kernel file follows (see each file's header for its own contract):
// - storage is bf16 (activations, weights, KV cache); arithmetic and every reduction is f32;
// - kernels are `extern "C"` so the Rust side finds them by their plain name;
// - sizes are `int` (the host checks they fit), element offsets that can pass 2^31 are `size_t`;
// - the host launcher (src/backend/cuda/<file>.rs) checks shapes, dtypes and bounds before the
//   launch; kernels still guard their indices so a bad launch cannot write out of bounds.
// build.rs compiles without --use_fast_math: softmax uses exp2f and norms rsqrtf explicitly
// (both single MUFU instructions, 2 ulp), while everything else keeps IEEE division and expf.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float bf2f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 f2bf(float x) { return __float2bfloat16(x); }  // round to nearest even

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 floats; blockDim.x is a
// multiple of 32. Ends with a barrier so `scratch` can be reused right after.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}

// Maximum over the block (NaN-ignoring, as fmaxf); every thread gets the result. Same contract
// as block_sum.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : __int_as_float((int)0xff800000u);  // -inf
    v = warp_max(v);
    __syncthreads();
    return v;
}

// RoPE's rotation of the pair (x1, x2) by the angle with cosine c and sine s, rounded as written
// (no contraction into FMAs), so that every kernel applying it gets the same bits.
__device__ __forceinline__ void rope_rotate(float x1, float x2, float c, float s, float& o1, float& o2) {
    o1 = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
    o2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
}

// e4m3 (float8_e4m3fn) in integer operations rather than cuda_fp8.h, so that any sm_80+ GPU and
// the CPU emulator run the same code, bit for bit the CPU's conversions (src/quant/e4m3.rs, the
// `float8` crate, itself a port of cuda_fp8.hpp).
//
// Decode: the 4-bit exponent and 3-bit mantissa are placed in an f32 whose exponent bias differs
// by 120; subnormals (exponent 0) are fixed up as 2·f − 2⁻⁶ and 0x7F is NaN. No f32 subnormal is
// involved, so flush-to-zero cannot change a value. Every e4m3 value is exactly a bf16 too.
__device__ __forceinline__ float e4m3_to_f32(unsigned b) {
    const unsigned mag = b & 0x7Fu;
    float f = __int_as_float((int)((mag << 20) + (120u << 23)));
    f = (mag < 0x08u) ? 2.f * f - 0.015625f : f;  // exponent 0: 2^-6 · 0.mmm
    f = (mag == 0x7Fu) ? __int_as_float(0x7FC00000) : f;
    return (b & 0x80u) ? -f : f;
}

// Encode: round to nearest even, saturating at ±448 (CUDA's __NV_SATFINITE), NaN to 0x7F with
// its sign: bit for bit what the CPU's `quant::e4m3::from_f32` (the float8 crate) gives. Used by
// the FP8 GEMM's activation quantization (gemm_fp8.cu) and the FP8 KV cache write.
__device__ __forceinline__ unsigned f32_to_e4m3(float x) {
    const unsigned bits = __float_as_uint(x);
    const unsigned sign = (bits >> 24) & 0x80u;
    if (isnan(x)) return sign | 0x7Fu;
    const float a = fabsf(x);
    if (a < 0.015625f) return sign | (unsigned)rintf(a * 512.f);  // subnormal: multiples of 2^-9
    // Normal: round the f32 mantissa to 3 bits (ties to even, a carry moves into the exponent),
    // then rebias the exponent (127 → 7); past 448 saturates.
    unsigned u = bits & 0x7FFFFFFFu;
    u = (u + 0x7FFFFu + ((u >> 20) & 1u)) >> 20;
    const unsigned code = u - (120u << 3);
    return sign | (code > 0x7Eu ? 0x7Eu : code);
}

// Storing and loading one KV cache element of either cache type (KV = bf16 or uint8_t e4m3):
// the e4m3 cache stores x / scale (a stored q means q · scale, src/quant/kv.rs); bf16 ignores
// the scale. Kernels templated on KV run the same code for both caches.
__device__ __forceinline__ void kv_store(bf16* p, float x, float) { *p = f2bf(x); }
__device__ __forceinline__ void kv_store(uint8_t* p, float x, float scale) { *p = (uint8_t)f32_to_e4m3(x / scale); }
// A bf16 value as it stands (bf16: copied, NaN payloads included).
__device__ __forceinline__ void kv_copy(bf16* p, bf16 x, float) { *p = x; }
__device__ __forceinline__ void kv_copy(uint8_t* p, bf16 x, float scale) { kv_store(p, bf2f(x), scale); }

// Eight e4m3 values (8 bytes) as the eight bf16 they are exactly, as the four words of a uint4
// (the layout of eight bf16 in memory): e4m3_to_f32's result has at most 4 significant bits, so
// its upper 16 bits are the bf16 (NaN included: 0x7FC0).
__device__ __forceinline__ uint4 e4m3x8_to_bf16x8(uint2 b) {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const unsigned word = i < 2 ? b.x : b.y, sh = 16 * (i & 1);
        const unsigned lo = (unsigned)__float_as_int(e4m3_to_f32((word >> sh) & 0xFFu)) >> 16;
        const unsigned hi = (unsigned)__float_as_int(e4m3_to_f32((word >> (sh + 8)) & 0xFFu)) >> 16;
        w[i] = lo | (hi << 16);
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Eight KV cache elements at p (16-byte aligned for bf16, 8-byte for e4m3) as eight bf16, unscaled:
// attention kernels apply an e4m3 cache's scales to the scores and outputs in f32 instead, once.
__device__ __forceinline__ uint4 load8_kv(const bf16* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ uint4 load8_kv(const uint8_t* p) {
    return e4m3x8_to_bf16x8(*reinterpret_cast<const uint2*>(p));
}

// Eight bf16 values moved as one 16-byte access; callers guarantee 16-byte alignment.
struct __align__(16) Pack8 {
    bf16 v[8];
};

__device__ __forceinline__ Pack8 load8(const bf16* p) {
    Pack8 r;
    *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p);
    return r;
}

__device__ __forceinline__ void store8(bf16* p, const Pack8& r) {
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r);
}
