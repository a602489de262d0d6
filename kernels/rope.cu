// RoPE (rotate-half, HF layout) on q and k of a fused qkv activation, fused with the write of
// k and v into the paged KV cache.
//
// Contract (checked by src/backend/cuda/rope.rs before launch):
//   rope_write_kv_bf16(qkv[rows, (heads + 2*kv_heads) * hd], cos[max_pos, hd/2] f32,
//                      sin[max_pos, hd/2] f32, positions[rows] u32, slots[rows] u32, ..., k_scale, v_scale)
//       -> q_out[rows, heads*hd], k_cache[slot, kv_heads*hd], v_cache[slot, kv_heads*hd]
//   rope_write_kv_bf16_kv8: the same into an e4m3 cache (FP8 KV cache): k and v are stored as
//   e4m3(x / k_scale) and e4m3(x / v_scale) (common.cuh's f32_to_e4m3: nearest even, saturating
//   at ±448), rounded once from the f32 result, bit for bit the CPU backend's cache.
//   For each row r at position p = positions[r] and each head, pairs (x[i], x[i + hd/2]) turn by
//   the angle of frequency i: (x1*cos - x2*sin, x2*cos + x1*sin), with cos/sin = tables[p][i]
//   (precomputed on the host with the llama3 frequency scaling, kept f32 so that large positions
//   keep their precision). Rotated q goes to q_out; rotated k and unrotated v go to cache slot
//   slots[r]. One block per row; the host guarantees p < max_pos, slots in range and distinct,
//   except the slot 0xFFFFFFFF of a padding row of a graph's bucket, whose k and v are not written.
//   bf16 in, f32 arithmetic, one rounding per output; the bf16 cache ignores the scales.
// Versions: 1 (this) — scalar accesses; a row is a few KiB, so this is launch-bound. Decode GEMVs
//   do this work in their epilogue (gemv_rope_decode_bf16_{M}, kernels/gemv.cu), same bits.
#include "common.cuh"

template <class KV>
__device__ __forceinline__ void rope_write_kv(const bf16* __restrict__ qkv, const float* __restrict__ cos_t,
                                              const float* __restrict__ sin_t, const unsigned* __restrict__ positions,
                                              const unsigned* __restrict__ slots, bf16* __restrict__ q_out,
                                              KV* __restrict__ k_cache, KV* __restrict__ v_cache, int heads,
                                              int kv_heads, int hd, float k_scale, float v_scale) {
    const int r = blockIdx.x;
    const int half = hd / 2, q_dim = heads * hd, kv_dim = kv_heads * hd;
    const bf16* row = qkv + (size_t)r * (q_dim + 2 * kv_dim);
    const size_t pos = positions[r], slot = slots[r];
    const float* c = cos_t + pos * half;
    const float* s = sin_t + pos * half;
    const bool write = slots[r] != 0xFFFFFFFFu;
    KV* k_dst = k_cache + (write ? slot * kv_dim : 0);
    KV* v_dst = v_cache + (write ? slot * kv_dim : 0);
    // q heads then k heads: both live at `head * hd` of the row, q's output is q_out, k's the cache.
    for (int idx = threadIdx.x; idx < (heads + kv_heads) * half; idx += blockDim.x) {
        const int head = idx / half, i = idx - head * half;
        const bf16* src = row + head * hd;
        const float x1 = bf2f(src[i]), x2 = bf2f(src[i + half]);
        const float ci = c[i], si = s[i];
        if (head >= heads && !write) continue;
        float o1, o2;
        rope_rotate(x1, x2, ci, si, o1, o2);
        if (head < heads) {
            bf16* dst = q_out + (size_t)r * q_dim + head * hd;
            dst[i] = f2bf(o1);
            dst[i + half] = f2bf(o2);
        } else {
            // One rounding from the rotated f32 (never bf16 first), as the CPU's cache write.
            KV* dst = k_dst + (head - heads) * hd;
            kv_store(dst + i, o1, k_scale);
            kv_store(dst + i + half, o2, k_scale);
        }
    }
    const bf16* v_src = row + q_dim + kv_dim;
    if (write)
        for (int i = threadIdx.x; i < kv_dim; i += blockDim.x) kv_copy(v_dst + i, v_src[i], v_scale);
}

#define ROPE_ARGS(KV)                                                                                              \
    const bf16 *__restrict__ qkv, const float *__restrict__ cos_t, const float *__restrict__ sin_t,                 \
        const unsigned *__restrict__ positions, const unsigned *__restrict__ slots, bf16 *__restrict__ q_out,       \
        KV *__restrict__ k_cache, KV *__restrict__ v_cache, int heads, int kv_heads, int hd, float k_scale,          \
        float v_scale
#define ROPE_PASS qkv, cos_t, sin_t, positions, slots, q_out, k_cache, v_cache, heads, kv_heads, hd, k_scale, v_scale

// A bf16 cache (the scales are ignored) and an e4m3 one.
extern "C" __global__ void rope_write_kv_bf16(ROPE_ARGS(bf16)) { rope_write_kv(ROPE_PASS); }
extern "C" __global__ void rope_write_kv_bf16_kv8(ROPE_ARGS(uint8_t)) { rope_write_kv(ROPE_PASS); }
