// Decode GEMVs with an epilogue fused in, shared by the bf16 (gemv.cu) and FP8 (gemv_fp8.cu)
// GEMVs. `Rows` is the weight: `rows.dot<M>(r, acc)` leaves in every lane of the calling warp the
// M outputs of W's row r (scaled, for FP8), computed exactly as the plain GEMV computes them, so a
// fused kernel equals its GEMV followed by the unfused op, bit for bit.
//
// Blocks are GEMV_WARPS warps: the first half computes rows i, the second half the rows each is
// paired with (up for gate, i + hd/2 for i), and they meet in shared memory.
#pragma once

#include "common.cuh"

// Warps per block of the bf16 GEMVs and of every fused kernel (the launchers' WARPS and
// PAIRS_PER_BLOCK = GEMV_WARPS / 2).
#define GEMV_WARPS 8

// The gate/up GEMV with SiLU·mul as its epilogue: W is [gate; up] (2·inter rows), y[M, inter] =
// silu(x·gateᵀ) · (x·upᵀ). A block's first half of warps computes gate rows i, the second half
// the same up rows, and they meet in shared memory: each warp does exactly the plain GEMV's work.
// g and u are rounded to bf16 first, then combined as silu_mul_bf16 does, so the result is bit for
// bit that of the unfused pair (one launch and the 2·inter-wide round trip saved).
template <int M, class Rows>
__device__ __forceinline__ void gemv_silu_body(const Rows& rows, bf16* __restrict__ y, int inter) {
    constexpr int HALF = GEMV_WARPS / 2;
    __shared__ float up[HALF][M];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const bool is_up = warp >= HALF;
    const int i = blockIdx.x * HALF + (warp % HALF);
    // Past the last row a warp recomputes the last one (no divergent call; nothing is stored).
    const int row = min(i, inter - 1) + (is_up ? inter : 0);
    float acc[M];
    rows.template dot<M>(row, acc);
    if (is_up && lane == 0 && i < inter) {
#pragma unroll
        for (int m = 0; m < M; ++m) up[warp - HALF][m] = bf2f(f2bf(acc[m]));
    }
    __syncthreads();
    if (!is_up && lane == 0 && i < inter) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const float g = bf2f(f2bf(acc[m]));
            y[(size_t)m * inter + i] = f2bf(g / (1.f + expf(-g)) * up[warp][m]);
        }
    }
}

// The qkv GEMV with RoPE and the KV cache write as its epilogue (rope.cu's contract): a block's
// first half of warps computes rows i of four (head, i) pairs, the second half their partners
// i + hd/2, and they meet in shared memory. Each output is rounded to bf16, then rotated with
// rope_rotate as rope_write_kv_bf16 does, so q, k and v are bit for bit those of the unfused pair;
// rows of padding (slot 0xFFFFFFFF) write no k or v. KV is the cache's element: bf16, or uint8_t
// for an e4m3 cache, whose k and v are stored as e4m3(x / k_scale) and e4m3(x / v_scale), again
// the unfused rope_write_kv_bf16_kv8's bits.
template <int M, class Rows, class KV>
__device__ __forceinline__ void gemv_rope_body(const Rows& rows, const float* __restrict__ cos_t,
                                               const float* __restrict__ sin_t,
                                               const unsigned* __restrict__ positions,
                                               const unsigned* __restrict__ slots, bf16* __restrict__ q_out,
                                               KV* __restrict__ k_cache, KV* __restrict__ v_cache, int heads,
                                               int kv_heads, int hd, float k_scale, float v_scale) {
    constexpr int HALF = GEMV_WARPS / 2;
    __shared__ float partner[HALF][M];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const bool second = warp >= HALF;
    const int half = hd / 2, pairs = (heads + 2 * kv_heads) * half;
    const int p = blockIdx.x * HALF + (warp % HALF);
    // Past the last pair a warp recomputes the last one (no divergent call; nothing is stored).
    const int head = min(p, pairs - 1) / half, i = min(p, pairs - 1) - head * half;
    float acc[M];
    rows.template dot<M>(head * hd + i + (second ? half : 0), acc);
    if (second && lane == 0) {
#pragma unroll
        for (int m = 0; m < M; ++m) partner[warp - HALF][m] = bf2f(f2bf(acc[m]));
    }
    __syncthreads();
    if (second || lane != 0 || p >= pairs) return;
    const size_t q_dim = (size_t)heads * hd, kv_dim = (size_t)kv_heads * hd;
    for (int m = 0; m < M; ++m) {
        const float x1 = bf2f(f2bf(acc[m])), x2 = partner[warp][m];
        float o1 = x1, o2 = x2;
        if (head < heads + kv_heads) {
            const size_t at = (size_t)positions[m] * half + i;
            rope_rotate(x1, x2, cos_t[at], sin_t[at], o1, o2);
        }
        if (head < heads) {
            bf16* dst = q_out + m * q_dim + (size_t)head * hd;
            dst[i] = f2bf(o1);
            dst[i + half] = f2bf(o2);
        } else if (slots[m] != 0xFFFFFFFFu) {
            // k rotated, v as computed (x = its bf16 rounding, as the unfused pair's qkv holds
            // it), each stored with one rounding (kv_store: bf16, or e4m3 of x / scale).
            const bool is_k = head < heads + kv_heads;
            const int kv_head = head - heads - (is_k ? 0 : kv_heads);
            KV* dst = (is_k ? k_cache : v_cache) + slots[m] * kv_dim + (size_t)kv_head * hd;
            const float scale = is_k ? k_scale : v_scale;
            kv_store(dst + i, o1, scale);
            kv_store(dst + i + half, o2, scale);
        }
    }
}
