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
