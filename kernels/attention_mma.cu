// Causal attention over the paged KV cache on tensor cores (FlashAttention-2 style): prefill and
// mixed steps at head dims 64 and 128. Same contract, work items, splits and partial-output
// format as attention_prefill_bf16 in attention.cu (read its header); attention_combine_bf16
// merges the splits of both. Differences of contract: hd is the template's (64 or 128), the
// block is 128 threads, nq_max <= 64 and tk == MMA_BK (the host passes them; they are checked
// here only as the launcher's promise), and the dynamic shared memory is `mma_smem_bytes`.
//
// How: a block takes the G query heads of kv head g for the n_rows rows of its work item,
//   nq = n_rows * G <= 64 query vectors (qi = row_in_tile * G + head_in_group, as attention.cu).
//   Warp w holds query vectors 16w..16w+15 as mma A fragments in registers for the whole key
//   loop (staged once through shared memory, taken by ldmatrix), scores S = Q·Kᵀ and output O
//   as f32 accumulator fragments. K and V tiles of MMA_BK keys stream through shared memory in
//   two stages: the cp.async copies of tile i+1 are in flight while tile i is computed.
//   ldmatrix turns a K tile into B fragments of Kᵀ and (transposed) a V tile into B fragments of
//   V; the probabilities P go from S's accumulator fragments to A fragments (bf16) without
//   leaving registers. Online softmax in base 2 on the fragments: a
//   lane holds two rows (g and g+8 of its warp's 16), and a row's max and sum are reduced over
//   the four lanes that share it. Shared-memory rows are padded by 16 bytes so that the eight
//   rows one ldmatrix reads fall in different banks.
// Non-finite values: a masked score is replaced (not multiplied) by -inf, so a NaN key reaches
//   only the rows that attend to it. P·V on tensor cores multiplies every P entry by every V row
//   of the tile, and 0 · NaN is NaN, so each thread checks the V chunks it copied, zeroes a
//   non-finite one and marks the key in the tile's `bad` mask; a row that attends to a marked
//   key is made NaN at the end (the CPU's result for it), the others never see it.
// FP8 KV cache (`_kv8`, e4m3 with a per-layer k and v scale): cp.async copies bytes and cannot
//   convert, and mma.sync wants bf16 operands, so the e4m3 bytes land in byte tiles (cp.async,
//   as the bf16 tiles do) and each thread decodes the chunks it copied into a bf16 tile before
//   the barrier that publishes the tile — where the bf16 path screens V. e4m3 → bf16 is exact, so
//   the tensor cores see the stored values themselves; the scales are applied once, in f32:
//   k_scale to the scores (with scale·log2e) and v_scale to the normalised output. One bf16
//   stage suffices: the byte tile of tile i+1 is in flight during tile i's mma work (the
//   overlap the second bf16 stage buys), and the decode pass into the single bf16 stage waits
//   for that work's closing barrier. Shared memory: 17.4 + 8 KiB at hd 128 (bf16: 34 KiB).
//   A register-path load (global → registers → decode → shared) was the alternative: it keeps
//   the next tile live in 16 more registers per thread across the mma work, in a kernel already
//   at 165 (ptxas, sm_90a, hd 128) with o alone 64 floats; the byte tiles cost 8 KiB of shared
//   memory instead and keep the bf16 path's cp.async structure (same registers: 165).
// Versions: 1 (this). sm_80 and up (bf16 mma.sync, cp.async); under the CUDA emulator the mma
//   building blocks are warp-collective twins with the ISA's fragment layouts (kernels/mma.cuh).
#include "common.cuh"
#include "mma.cuh"

#include <math_constants.h>

#define MMA_BK 32       // keys per tile
#define MMA_WARPS 4     // warps per block, 16 query vectors each
#define MMA_THREADS (32 * MMA_WARPS)

// Shared memory: k_s, v_s bf16 [2 stages][MMA_BK][HD + 8], then bad u32 [2 stages] padded to 16
// bytes; an e4m3 cache has one bf16 stage and then the byte tiles k8, v8 [MMA_BK][HD]
// (src/backend/cuda/attention.rs `mma_smem_bytes` computes the same sizes).

// One tile's K and V rows (keys key0.., those at or past k_end zero-filled) into `stage`.
template <int HD>
__device__ __forceinline__ void mma_load_tile(bf16* k_s, bf16* v_s, const bf16* __restrict__ k_cache,
                                              const bf16* __restrict__ v_cache, const unsigned* __restrict__ table,
                                              int block_size, int kv_dim, int g, int key0, int k_end) {
    constexpr int KS = HD + 8, CH = HD / 8;
    for (int idx = threadIdx.x; idx < MMA_BK * CH; idx += MMA_THREADS) {
        const int j = idx / CH, c = idx - j * CH, p = key0 + j;
        const bool ok = p < k_end;
        const size_t slot = ok ? (size_t)table[p / block_size] * block_size + p % block_size : 0;
        const size_t src = slot * kv_dim + (size_t)g * HD + c * 8;
        cp_async_16(k_s + j * KS + c * 8, k_cache + src, ok);
        cp_async_16(v_s + j * KS + c * 8, v_cache + src, ok);
    }
}

// After this thread's copies of a tile landed: zero its non-finite V chunks and mark their keys.
template <int HD>
__device__ __forceinline__ void mma_screen_values(bf16* v_s, unsigned* bad) {
    constexpr int KS = HD + 8, CH = HD / 8;
    for (int idx = threadIdx.x; idx < MMA_BK * CH; idx += MMA_THREADS) {
        const int j = idx / CH, c = idx - j * CH;
        uint4* chunk = reinterpret_cast<uint4*>(v_s + j * KS + c * 8);
        const uint4 v = *chunk;
        const unsigned words[4] = {v.x, v.y, v.z, v.w};
        bool finite = true;
        for (int i = 0; i < 4; i++)
            finite = finite && (words[i] & 0x7f80u) != 0x7f80u && (words[i] & 0x7f800000u) != 0x7f800000u;
        if (!finite) {
            *chunk = make_uint4(0, 0, 0, 0);
            atomicOr(bad, 1u << j);
        }
    }
}

// e4m3 cache (the `_kv8` kernels): one tile's raw K and V bytes (16 keys' elements per cp.async,
// keys at or past k_end zero-filled) into the byte tiles k8, v8 [MMA_BK][HD].
template <int HD>
__device__ __forceinline__ void mma_load_raw(uint8_t* k8, uint8_t* v8, const uint8_t* __restrict__ k_cache,
                                             const uint8_t* __restrict__ v_cache, const unsigned* __restrict__ table,
                                             int block_size, int kv_dim, int g, int key0, int k_end) {
    constexpr int CH = HD / 16;
    for (int idx = threadIdx.x; idx < MMA_BK * CH; idx += MMA_THREADS) {
        const int j = idx / CH, c = idx - j * CH, p = key0 + j;
        const bool ok = p < k_end;
        const size_t slot = ok ? (size_t)table[p / block_size] * block_size + p % block_size : 0;
        const size_t src = slot * kv_dim + (size_t)g * HD + c * 16;
        cp_async_16(k8 + j * HD + c * 16, k_cache + src, ok);
        cp_async_16(v8 + j * HD + c * 16, v_cache + src, ok);
    }
}

// After this thread's raw copies landed: its chunks of k8, v8 decoded to bf16 (exact, unscaled)
// into the bf16 tiles the mma loop reads, V screened as mma_screen_values does (an e4m3 NaN is
// 0x7F / 0xFF; e4m3 has no infinities). Each thread converts exactly the chunks it copied, so no
// barrier is needed between its copy landing and its conversion, nor before its next copy.
template <int HD>
__device__ __forceinline__ void mma_convert_tile(const uint8_t* k8, const uint8_t* v8, bf16* k_s, bf16* v_s,
                                                 unsigned* bad) {
    constexpr int KS = HD + 8, CH = HD / 16;
    for (int idx = threadIdx.x; idx < MMA_BK * CH; idx += MMA_THREADS) {
        const int j = idx / CH, c = idx - j * CH;
        const uint4 kb = *reinterpret_cast<const uint4*>(k8 + j * HD + c * 16);
        const uint4 vb = *reinterpret_cast<const uint4*>(v8 + j * HD + c * 16);
        uint4* kd = reinterpret_cast<uint4*>(k_s + j * KS + c * 16);
        uint4* vd = reinterpret_cast<uint4*>(v_s + j * KS + c * 16);
        kd[0] = e4m3x8_to_bf16x8(make_uint2(kb.x, kb.y));
        kd[1] = e4m3x8_to_bf16x8(make_uint2(kb.z, kb.w));
        const unsigned words[4] = {vb.x, vb.y, vb.z, vb.w};
        bool finite = true;
        for (int i = 0; i < 4; i++)
            for (int b = 0; b < 4; b++) finite = finite && ((words[i] >> (8 * b)) & 0x7Fu) != 0x7Fu;
        if (finite) {
            vd[0] = e4m3x8_to_bf16x8(make_uint2(vb.x, vb.y));
            vd[1] = e4m3x8_to_bf16x8(make_uint2(vb.z, vb.w));
        } else {
            vd[0] = vd[1] = make_uint4(0, 0, 0, 0);
            atomicOr(bad, 1u << j);
        }
    }
}

template <int HD, class KV>
__device__ __forceinline__ void attention_mma(const bf16* __restrict__ q, const KV* __restrict__ k_cache,
                                              const KV* __restrict__ v_cache, const unsigned* __restrict__ positions,
                                              const unsigned* __restrict__ block_tables,
                                              const unsigned* __restrict__ work, bf16* __restrict__ out,
                                              float* __restrict__ o_part, float2* __restrict__ ml_part, int heads,
                                              int kv_heads, int block_size, int split_len, float scale_log2,
                                              float k_scale, float v_scale) {
    // An e4m3 cache: one bf16 stage, fed by a conversion pass from one byte stage (see above).
    constexpr bool F8 = sizeof(KV) == 1;
    constexpr int KS = HD + 8, TILE = MMA_BK * KS, STAGES = F8 ? 1 : 2;
    extern __shared__ __align__(16) unsigned char smem[];
    bf16* k_s = reinterpret_cast<bf16*>(smem);
    bf16* v_s = k_s + STAGES * TILE;
    unsigned* bad_s = reinterpret_cast<unsigned*>(v_s + STAGES * TILE);
    uint8_t* k8 = reinterpret_cast<uint8_t*>(bad_s + 4);  // 16 bytes past bad_s: stays 16-byte aligned
    uint8_t* v8 = k8 + MMA_BK * HD;
    const float score_scale = scale_log2 * k_scale;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, t = lane & 3;
    const int G = heads / kv_heads, g = blockIdx.y, split = blockIdx.z, num_splits = gridDim.z;
    const int q_dim = heads * HD, kv_dim = kv_heads * HD;
    const unsigned* w = work + 4 * (size_t)blockIdx.x;
    const int row_start = (int)w[0], n_rows = (int)w[1], kmax = (int)w[3];
    const unsigned* table = block_tables + w[2];
    const int nq = n_rows * G;
    const int len =
        split_len > 0 ? split_len : max(MMA_BK, (kmax + num_splits - 1) / num_splits + MMA_BK - 1) / MMA_BK * MMA_BK;
    const int k_begin = split * len, k_end = min(kmax, k_begin + len);

    // This lane's two rows of its warp's 16: query vectors warp*16 + gq (h = 0) and + 8 (h = 1).
    bool valid[2];
    int pos[2];
    size_t qoff[2];  // offset of the query vector's head in q (and out)
    for (int h = 0; h < 2; h++) {
        const int qi = warp * 16 + gq + 8 * h;
        valid[h] = qi < nq;
        const int row = row_start + (valid[h] ? qi / G : 0), head = g * G + (valid[h] ? qi % G : 0);
        pos[h] = valid[h] ? (int)positions[row] : -1;  // -1: attends to nothing
        qoff[h] = (size_t)row * q_dim + (size_t)head * HD;
    }
    // Q through shared memory: the block's 64 query vectors (zeros past nq) land in rows of KS
    // with 16-byte loads that read whole rows (a query vector is HD contiguous bf16), then each
    // warp takes its 16 rows' A fragments by ldmatrix (padded rows: conflict-free). Loaded
    // straight into fragments, a warp request would read 8 rows × 16 bytes, half of each sector.
    // The space is the first 64 tile rows (both K stages, or K and V of an e4m3 cache's single
    // stage), free until tile 0's copies, which start after the second barrier.
    unsigned qa[HD / 16][4];
    {
        bf16* q_s = k_s;
        constexpr int CH = HD / 8;
        for (int idx = tid; idx < 16 * MMA_WARPS * CH; idx += MMA_THREADS) {
            const int qi = idx / CH, c = idx - qi * CH;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (qi < nq) {
                const int row = row_start + qi / G, head = g * G + qi % G;
                v = *reinterpret_cast<const uint4*>(q + (size_t)row * q_dim + (size_t)head * HD + c * 8);
            }
            *reinterpret_cast<uint4*>(q_s + qi * KS + c * 8) = v;
        }
        if (tid == 0) bad_s[0] = 0;
        __syncthreads();  // Q staged, and bad_s[0] clear before any thread marks tile 0
#pragma unroll
        for (int c = 0; c < HD / 16; c++)
            ldmatrix_x4(qa[c], q_s + (warp * 16 + (lane & 15)) * KS + 16 * c + (lane >> 4) * 8);
        __syncthreads();  // every warp has its fragments before tile 0's copies overwrite them
    }
    float o[HD / 8][4];
#pragma unroll
    for (int d = 0; d < HD / 8; d++)
#pragma unroll
        for (int i = 0; i < 4; i++) o[d][i] = 0.f;
    float m[2] = {-CUDART_INF_F, -CUDART_INF_F}, l[2] = {0.f, 0.f};
    bool poison[2] = {false, false};

    const int ntiles = k_end > k_begin ? (k_end - k_begin + MMA_BK - 1) / MMA_BK : 0;
    if (ntiles > 0) {
        if constexpr (F8)
            mma_load_raw<HD>(k8, v8, k_cache, v_cache, table, block_size, kv_dim, g, k_begin, k_end);
        else
            mma_load_tile<HD>(k_s, v_s, k_cache, v_cache, table, block_size, kv_dim, g, k_begin, k_end);
    }
    cp_async_commit();
    for (int it = 0; it < ntiles; it++) {
        const int stage = it & 1, key0 = k_begin + it * MMA_BK;
        // The other stage's mask was last read in iteration it - 1, which ended with a barrier.
        if (it + 1 < ntiles && tid == 0) bad_s[stage ^ 1] = 0;
        if constexpr (F8) {
            // Tile `it`'s bytes landed: decode them into the one bf16 stage (its last readers
            // passed the barrier ending iteration it - 1), then start tile it + 1's bytes, which
            // overlap this tile's mma work as the bf16 cache's second stage does.
            cp_async_wait<0>();
            mma_convert_tile<HD>(k8, v8, k_s, v_s, bad_s + stage);
            if (it + 1 < ntiles)
                mma_load_raw<HD>(k8, v8, k_cache, v_cache, table, block_size, kv_dim, g, key0 + MMA_BK, k_end);
            cp_async_commit();
        } else {
            if (it + 1 < ntiles)
                mma_load_tile<HD>(k_s + (stage ^ 1) * TILE, v_s + (stage ^ 1) * TILE, k_cache, v_cache, table,
                                  block_size, kv_dim, g, key0 + MMA_BK, k_end);
            cp_async_commit();
            cp_async_wait<1>();  // this thread's copies of tile `it` have landed
            mma_screen_values<HD>(v_s + stage * TILE, bad_s + stage);
        }
        __syncthreads();  // everyone's copies of tile `it`, screened (and decoded)
        const bf16* ks = k_s + (F8 ? 0 : stage) * TILE;
        const bf16* vs = v_s + (F8 ? 0 : stage) * TILE;
        const unsigned bad = bad_s[stage];

        // S = Q·Kᵀ: MMA_BK / 8 n-tiles of keys; one ldmatrix gives two n-tiles' B fragments.
        float s[MMA_BK / 8][4];
#pragma unroll
        for (int j = 0; j < MMA_BK / 8; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) s[j][i] = 0.f;
#pragma unroll
        for (int c = 0; c < HD / 16; c++)
#pragma unroll
            for (int jp = 0; jp < MMA_BK / 16; jp++) {
                unsigned kb[4];
                ldmatrix_x4(kb, ks + (16 * jp + (lane >> 4) * 8 + (lane & 7)) * KS + 16 * c + ((lane >> 3) & 1) * 8);
                mma_m16n8k16_bf16(s[2 * jp], qa[c], kb);
                mma_m16n8k16_bf16(s[2 * jp + 1], qa[c], kb + 2);
            }

        // Online softmax on the fragments: s[j][i] is (row h = i >> 1, key 8j + 2t + (i & 1)).
        float mx[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
        for (int j = 0; j < MMA_BK / 8; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int h = i >> 1, kj = 8 * j + 2 * t + (i & 1), key = key0 + kj;
                const bool attends = key < k_end && key <= pos[h];
                const float x = attends ? s[j][i] * score_scale : -CUDART_INF_F;
                s[j][i] = x;
                mx[h] = fmaxf(mx[h], x);
                if (attends && (bad >> kj & 1u)) poison[h] = true;
            }
#pragma unroll
        for (int h = 0; h < 2; h++) {
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
            const float m_new = fmaxf(m[h], mx[h]);
            // Every key so far masked for this row: nothing to rescale (exp2f(-inf - -inf) is NaN).
            const float alpha = m_new == -CUDART_INF_F ? 1.f : exp2f(m[h] - m_new);
            m[h] = m_new;
            l[h] *= alpha;
#pragma unroll
            for (int d = 0; d < HD / 8; d++) o[d][2 * h] *= alpha, o[d][2 * h + 1] *= alpha;
        }
#pragma unroll
        for (int j = 0; j < MMA_BK / 8; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int h = i >> 1;
                const float p = m[h] == -CUDART_INF_F ? 0.f : exp2f(s[j][i] - m[h]);  // 0 where masked
                s[j][i] = p;
                l[h] += p;  // this lane's part of the row sum; the four lanes add up at the end
            }

        // O += P·V: P's accumulator fragments of keys 16c..16c+15 are the A fragment of chunk c.
#pragma unroll
        for (int c = 0; c < MMA_BK / 16; c++) {
            const unsigned pa[4] = {pack_bf16x2(s[2 * c][0], s[2 * c][1]), pack_bf16x2(s[2 * c][2], s[2 * c][3]),
                                    pack_bf16x2(s[2 * c + 1][0], s[2 * c + 1][1]),
                                    pack_bf16x2(s[2 * c + 1][2], s[2 * c + 1][3])};
#pragma unroll
            for (int dp = 0; dp < HD / 16; dp++) {
                unsigned vb[4];
                ldmatrix_x4_trans(vb, vs + (16 * c + ((lane >> 3) & 1) * 8 + (lane & 7)) * KS + 16 * dp + (lane >> 4) * 8);
                mma_m16n8k16_bf16(o[2 * dp], pa, vb);
                mma_m16n8k16_bf16(o[2 * dp + 1], pa, vb + 2);
            }
        }
        __syncthreads();  // the next iteration's copies overwrite this stage
    }

#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        if (poison[h]) l[h] = CUDART_NAN_F;  // attended to a non-finite value: the row is NaN
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
        if (!valid[h]) continue;
        // l is 0 when no key of this split reaches the row; NaN must propagate, not become 0.
        const float inv = l[h] != 0.f ? 1.f / l[h] : 0.f;
        const int qi = warp * 16 + gq + 8 * h, row = row_start + qi / G, head = g * G + qi % G;
#pragma unroll
        for (int d = 0; d < HD / 8; d++) {
            const int col = 8 * d + 2 * t;
            const float v0 = l[h] != 0.f ? o[d][2 * h] * inv * v_scale : 0.f;
            const float v1 = l[h] != 0.f ? o[d][2 * h + 1] * inv * v_scale : 0.f;
            if (num_splits == 1) {
                out[qoff[h] + col] = f2bf(v0);
                out[qoff[h] + col + 1] = f2bf(v1);
            } else {
                float* dst = o_part + (((size_t)row * heads + head) * num_splits + split) * HD + col;
                dst[0] = v0;
                dst[1] = v1;
            }
        }
        if (num_splits > 1 && t == 0)
            ml_part[((size_t)row * heads + head) * num_splits + split] = make_float2(m[h], l[h]);
    }
}

#define ATTENTION_MMA_ARGS(KV)                                                                                      \
    const bf16 *__restrict__ q, const KV *__restrict__ k_cache, const KV *__restrict__ v_cache,                     \
        const unsigned *__restrict__ positions, const unsigned *__restrict__ block_tables,                           \
        const unsigned *__restrict__ work, bf16 *__restrict__ out, float *__restrict__ o_part,                       \
        float2 *__restrict__ ml_part, int heads, int kv_heads, int hd, int block_size, int nq_max, int tk,          \
        int split_len, float scale_log2, float k_scale, float v_scale
#define ATTENTION_MMA_PASS                                                                                          \
    q, k_cache, v_cache, positions, block_tables, work, out, o_part, ml_part, heads, kv_heads, block_size,         \
        split_len, scale_log2, k_scale, v_scale

// The launcher's promises (hd matches the instantiation, the tile sizes are this file's); a
// broken promise writes nothing, and the test against the CPU fails on the poisoned output.
#define ATTENTION_MMA_GUARD(HD) \
    if (hd != HD || tk != MMA_BK || nq_max > 16 * MMA_WARPS || blockDim.x != MMA_THREADS) return;

// A bf16 cache (scales 1) and an e4m3 one (`_kv8`), at head dims 64 and 128.
#define ATTENTION_MMA_KERNEL(NAME, HD, KV)                                                      \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS) NAME(ATTENTION_MMA_ARGS(KV)) { \
        ATTENTION_MMA_GUARD(HD)                                                                 \
        attention_mma<HD>(ATTENTION_MMA_PASS);                                                  \
    }
ATTENTION_MMA_KERNEL(attention_prefill_mma_bf16_64, 64, bf16)
ATTENTION_MMA_KERNEL(attention_prefill_mma_bf16_128, 128, bf16)
ATTENTION_MMA_KERNEL(attention_prefill_mma_bf16_kv8_64, 64, uint8_t)
ATTENTION_MMA_KERNEL(attention_prefill_mma_bf16_kv8_128, 128, uint8_t)
