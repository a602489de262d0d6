// Decode GEMV: y[M, N] = x[M, K] · W[N, K]ᵀ for M ≤ 8 token rows, the shape of every matmul of
// batch-1 to batch-8 decode, where cuBLASLt leaves 10-25% of the read bandwidth unused on the
// skinny shapes (issue 4). Launcher: src/backend/cuda/gemv.rs, which also decides per shape,
// by timing both on first use, whether this kernel or cuBLASLt runs.
//
// Contract (checked by the launcher): K % 8 == 0 (16-byte rows), 1 ≤ M ≤ 8, N ≥ 1; x and W
// 16-byte aligned. One warp per output column n (a row of W): each lane streams 16-byte chunks
// of that row with several loads in flight (non-coherent, not kept in L1: each weight byte is
// read once per step), and keeps M f32 sums against x, which stays in L1/L2 (M·K·2 bytes, read
// by every warp). A warp-shuffle sum finishes each output. f32 accumulation, bf16 output.
// gemv_silu_decode_bf16_{M}: the same over the fused gate/up weight, SiLU·mul in the epilogue.
// gemv_rope_decode_bf16_{M}: the same over the fused qkv weight, with rope_write_kv_bf16's work
// (RoPE on q and k, k and v written to their cache slots) in the epilogue;
// gemv_rope_decode_bf16_kv8_{M} writes an e4m3 cache (rope_write_kv_bf16_kv8's work).
#include "common.cuh"
#include "gemv_epilogue.cuh"

__device__ __forceinline__ Pack8 load8_stream(const bf16* p) {
    Pack8 r;
    *reinterpret_cast<uint4*>(&r) = __ldcs(reinterpret_cast<const uint4*>(p));
    return r;
}

// The M dot products of W's row `wr` with x's rows, summed over the warp (every lane gets them).
template <int M>
__device__ __forceinline__ void gemv_row(const bf16* __restrict__ x, const bf16* __restrict__ wr, int k,
                                         float (&acc)[M]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    const int chunks = k >> 3;
    int c = lane;
    // Four chunks per lane per iteration: four independent 16-byte loads in flight.
    for (; c + 96 < chunks; c += 128) {
        Pack8 wv[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) wv[u] = load8_stream(wr + (size_t)(c + 32 * u) * 8);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const Pack8 xv = load8(x + (size_t)m * k + (size_t)(c + 32 * u) * 8);
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[m] = fmaf(bf2f(wv[u].v[j]), bf2f(xv.v[j]), acc[m]);
            }
        }
    }
    for (; c < chunks; c += 32) {
        const Pack8 wv = load8_stream(wr + (size_t)c * 8);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const Pack8 xv = load8(x + (size_t)m * k + (size_t)c * 8);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[m] = fmaf(bf2f(wv.v[j]), bf2f(xv.v[j]), acc[m]);
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = warp_sum(acc[m]);
}

template <int M>
__device__ __forceinline__ void gemv_body(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                          bf16* __restrict__ y, int n, int k) {
    const int col = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (col >= n) return;
    float acc[M];
    gemv_row<M>(x, w + (size_t)col * k, k, acc);
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
        for (int m = 0; m < M; ++m) y[(size_t)m * n + col] = f2bf(acc[m]);
    }
}

// The row policy of gemv_epilogue.cuh's fused kernels: row r of a bf16 W.
struct Bf16Rows {
    const bf16* __restrict__ x;
    const bf16* __restrict__ w;
    int k;
    template <int M>
    __device__ __forceinline__ void dot(int r, float (&acc)[M]) const {
        gemv_row<M>(x, w + (size_t)r * k, k, acc);
    }
};

// One entry point per row count, so that each keeps exactly M accumulators in registers.
#define GEMV(M)                                                                                          \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                      \
        gemv_decode_bf16_##M(const bf16* __restrict__ x, const bf16* __restrict__ w, bf16* __restrict__ y, \
                             int n, int k) {                                                             \
        gemv_body<M>(x, w, y, n, k);                                                                     \
    }
GEMV(1)
GEMV(2)
GEMV(3)
GEMV(4)
GEMV(5)
GEMV(6)
GEMV(7)
GEMV(8)

// An explicit minimum of one block per SM: left to itself ptxas capped the 7-row version at 64
// registers on sm_90a and spilled (and asked for two blocks per SM, the 8-row one spilled on sm_80).
#define GEMV_SILU(M)                                                                                    \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, 1)                                   \
        gemv_silu_decode_bf16_##M(const bf16* __restrict__ x, const bf16* __restrict__ w,               \
                                  bf16* __restrict__ y, int inter, int k) {                             \
        gemv_silu_body<M>(Bf16Rows{x, w, k}, y, inter);                                                           \
    }
GEMV_SILU(1)
GEMV_SILU(2)
GEMV_SILU(3)
GEMV_SILU(4)
GEMV_SILU(5)
GEMV_SILU(6)
GEMV_SILU(7)
GEMV_SILU(8)

#define GEMV_ROPE_KV(M, NAME, KV)                                                                        \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, 1) NAME(                                \
        const bf16* __restrict__ x, const bf16* __restrict__ w, const float* __restrict__ cos_t,         \
        const float* __restrict__ sin_t, const unsigned* __restrict__ positions,                         \
        const unsigned* __restrict__ slots, bf16* __restrict__ q_out, KV* __restrict__ k_cache,          \
        KV* __restrict__ v_cache, int heads, int kv_heads, int hd, int k, float k_scale, float v_scale) { \
        gemv_rope_body<M>(Bf16Rows{x, w, k}, cos_t, sin_t, positions, slots, q_out, k_cache, v_cache, heads,  \
                          kv_heads, hd, k_scale, v_scale);                                               \
    }
// A bf16 cache (scales ignored) and an e4m3 one.
#define GEMV_ROPE(M)                                             \
    GEMV_ROPE_KV(M, gemv_rope_decode_bf16_##M, bf16)             \
    GEMV_ROPE_KV(M, gemv_rope_decode_bf16_kv8_##M, uint8_t)
GEMV_ROPE(1)
GEMV_ROPE(2)
GEMV_ROPE(3)
GEMV_ROPE(4)
GEMV_ROPE(5)
GEMV_ROPE(6)
GEMV_ROPE(7)
GEMV_ROPE(8)
