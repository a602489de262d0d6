// FP8 weights: the decode GEMV reading e4m3 weights with one f32 scale per row, and the
// dequantization to bf16 that prefill-sized matmuls run through cuBLASLt's bf16 GEMM.
// Launcher: src/backend/cuda/gemv_fp8.rs (shape checks next to the launches).
//
// gemv_fp8_bf16_{M}: y[M, N] = x[M, K] · (W[N, K] · scale[N])ᵀ for 1 ≤ M ≤ 8. Contract (checked
// by the launcher): K % 16 == 0 (16-byte rows of e4m3), x and W 16-byte aligned. The bf16
// GEMV's layout (kernels/gemv.cu): one warp per output row n, each lane streaming 16-byte
// chunks (16 weights) of that row with four loads in flight, non-coherent and not kept in L1,
// and keeping M f32 sums against x (in L1/L2, read by every warp); a warp-shuffle sum, then
// the row's scale once. f32 accumulation, bf16 output. Half the weight bytes of the bf16 GEMV.
//
// gemv_fp8_silu_decode_bf16_{M}, gemv_fp8_rope_decode_bf16_{M}: the same with SiLU·mul, or RoPE
// and the KV cache write, in the epilogue (gemv_epilogue.cuh); gemv_fp8_rope_decode_bf16_kv8_{M}
// writes an e4m3 KV cache.
//
// dequant_fp8_bf16: out[n, k] = bf16(e4m3(W[n, k]) · scale[n]), eight elements per thread.
//
// e4m3 is decoded by common.cuh's e4m3_to_f32 (integer operations, no cuda_fp8.h).
#include "common.cuh"
#include "gemv_epilogue.cuh"

#define GEMV_FP8_WARPS 8

// Sixteen e4m3 weights as one 16-byte streaming load.
__device__ __forceinline__ uint4 load16_stream(const uint8_t* p) { return __ldcs(reinterpret_cast<const uint4*>(p)); }

// Eight weights at a time (two 32-bit words), so that only eight decoded floats are live: with
// sixteen, the 8-row version spilled.
template <int M>
__device__ __forceinline__ void accumulate16(const uint4 wv, const bf16* __restrict__ x, int k, size_t at,
                                             float (&acc)[M]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const unsigned lo = h == 0 ? wv.x : wv.z, hi = h == 0 ? wv.y : wv.w;
        float w[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) w[j] = e4m3_to_f32(((j < 4 ? lo : hi) >> (8 * (j & 3))) & 0xFFu);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const Pack8 xv = load8(x + (size_t)m * k + at + 8 * h);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[m] = fmaf(w[j], bf2f(xv.v[j]), acc[m]);
        }
    }
}

// The M dot products of W's row `wr` with x's rows (unscaled), summed over the warp.
template <int M>
__device__ __forceinline__ void gemv_fp8_row(const bf16* __restrict__ x, const uint8_t* __restrict__ wr, int k,
                                             float (&acc)[M]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    const int chunks = k >> 4;
    int c = lane;
    // Four chunks per lane per iteration: four independent 16-byte loads in flight.
    for (; c + 96 < chunks; c += 128) {
        uint4 wv[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) wv[u] = load16_stream(wr + (size_t)(c + 32 * u) * 16);
#pragma unroll
        for (int u = 0; u < 4; ++u) accumulate16<M>(wv[u], x, k, (size_t)(c + 32 * u) * 16, acc);
    }
    for (; c < chunks; c += 32) accumulate16<M>(load16_stream(wr + (size_t)c * 16), x, k, (size_t)c * 16, acc);
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = warp_sum(acc[m]);
}

template <int M>
__device__ __forceinline__ void gemv_fp8_body(const bf16* __restrict__ x, const uint8_t* __restrict__ w,
                                              const float* __restrict__ scale, bf16* __restrict__ y, int n, int k) {
    const int row = blockIdx.x * GEMV_FP8_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;
    float acc[M];
    gemv_fp8_row<M>(x, w + (size_t)row * k, k, acc);
    const float s = scale[row];
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int m = 0; m < M; ++m) y[(size_t)m * n + row] = f2bf(acc[m] * s);
    }
}

// The row policy of gemv_epilogue.cuh's fused kernels: row r of an e4m3 W, scaled.
struct Fp8Rows {
    const bf16* __restrict__ x;
    const uint8_t* __restrict__ w;
    const float* __restrict__ scale;
    int k;
    template <int M>
    __device__ __forceinline__ void dot(int r, float (&acc)[M]) const {
        gemv_fp8_row<M>(x, w + (size_t)r * k, k, acc);
        const float s = scale[r];
#pragma unroll
        for (int m = 0; m < M; ++m) acc[m] *= s;
    }
};

// One entry point per row count, so that each keeps exactly M accumulators in registers. At least
// two blocks per SM lets ptxas use up to 128 registers: left to itself it capped the 8-row version
// at 64 and spilled. Sixteen warps an SM, each lane with four 16-byte loads in flight, still keep
// more bytes in flight than HBM's latency-bandwidth product per SM.
#define GEMV_FP8(M)                                                                                   \
    extern "C" __global__ void __launch_bounds__(GEMV_FP8_WARPS * 32, 2)                              \
        gemv_fp8_decode_bf16_##M(const bf16* __restrict__ x, const uint8_t* __restrict__ w,           \
                                 const float* __restrict__ scale, bf16* __restrict__ y, int n, int k) { \
        gemv_fp8_body<M>(x, w, scale, y, n, k);                                                       \
    }
GEMV_FP8(1)
GEMV_FP8(2)
GEMV_FP8(3)
GEMV_FP8(4)
GEMV_FP8(5)
GEMV_FP8(6)
GEMV_FP8(7)
GEMV_FP8(8)

// The fused kernels (gemv_epilogue.cuh) over e4m3 weights; one block per SM at least, as the bf16
// ones, so that ptxas may use the registers the 8-row versions need.
// The qkv GEMV with RoPE and the KV write into a bf16 cache (scales ignored) or an e4m3 one.
#define GEMV_FP8_ROPE(M, NAME, KV)                                                                             \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, 1) NAME(                                      \
        const bf16* __restrict__ x, const uint8_t* __restrict__ w, const float* __restrict__ scale,            \
        const float* __restrict__ cos_t, const float* __restrict__ sin_t, const unsigned* __restrict__ positions, \
        const unsigned* __restrict__ slots, bf16* __restrict__ q_out, KV* __restrict__ k_cache,                \
        KV* __restrict__ v_cache, int heads, int kv_heads, int hd, int k, float k_scale, float v_scale) {       \
        gemv_rope_body<M>(Fp8Rows{x, w, scale, k}, cos_t, sin_t, positions, slots, q_out, k_cache, v_cache,    \
                          heads, kv_heads, hd, k_scale, v_scale);                                              \
    }
#define GEMV_FP8_FUSED(M)                                                                                \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, 1) gemv_fp8_silu_decode_bf16_##M(      \
        const bf16* __restrict__ x, const uint8_t* __restrict__ w, const float* __restrict__ scale,      \
        bf16* __restrict__ y, int inter, int k) {                                                        \
        gemv_silu_body<M>(Fp8Rows{x, w, scale, k}, y, inter);                                            \
    }                                                                                                    \
    GEMV_FP8_ROPE(M, gemv_fp8_rope_decode_bf16_##M, bf16)                                                  \
    GEMV_FP8_ROPE(M, gemv_fp8_rope_decode_bf16_kv8_##M, uint8_t)
GEMV_FP8_FUSED(1)
GEMV_FP8_FUSED(2)
GEMV_FP8_FUSED(3)
GEMV_FP8_FUSED(4)
GEMV_FP8_FUSED(5)
GEMV_FP8_FUSED(6)
GEMV_FP8_FUSED(7)
GEMV_FP8_FUSED(8)

// out (n×k bf16) = W (n×k e4m3) · scale per row; k % 8 == 0; one thread per eight elements.
extern "C" __global__ void dequant_fp8_bf16(const uint8_t* __restrict__ w, const float* __restrict__ scale,
                                           bf16* __restrict__ out, int n, int k) {
    const size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i >= (size_t)n * k) return;
    const float s = scale[i / k];
    const uint2 b = *reinterpret_cast<const uint2*>(w + i);
    Pack8 r;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const unsigned word = j < 4 ? b.x : b.y;
        r.v[j] = f2bf(e4m3_to_f32((word >> (8 * (j & 3))) & 0xFFu) * s);
    }
    store8(out + i, r);
}
