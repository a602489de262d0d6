// Causal attention over the paged KV cache: tiled online softmax (flash-attention style), GQA,
// split along the keys with a combine step.
//
// Contract (checked by src/backend/cuda/attention.rs before launch):
//   q[rows, heads*hd] bf16, k_cache/v_cache[slot, kv_heads*hd] bf16 of one layer,
//   positions[rows] u32, block_tables (every sequence's table, concatenated) u32,
//   work[n_work][4] u32 = {row_start, n_rows, table_offset, kmax}: a tile of n_rows consecutive
//   rows of one sequence whose block table starts at block_tables[table_offset]; kmax = the
//   largest position of those rows + 1.
//   -> out[rows, heads*hd] bf16: for row r at position p and head h (kv head g = h / G,
//      G = heads / kv_heads): softmax_j(q·k_j * scale) · v_j over positions j = 0..=p, key j read
//      from slot block_tables[table_offset + j / block_size] * block_size + j % block_size.
//   Grid (n_work, kv_heads, num_splits); split s covers keys [s*len, (s+1)*len), len = split_len,
//   or, when split_len is 0, each work item's own ceil(kmax / num_splits) rounded up to tk (a
//   launch captured in a CUDA graph must not depend on the context lengths of the step it was
//   captured in). A work item of zero rows (a padding row of a graph's bucket) writes nothing.
//   With num_splits == 1 the block writes `out` directly; otherwise it writes its normalised
//   partial output o_part[(r*heads + h)*num_splits + s][hd] f32 and (max, sum) to
//   ml_part[(r*heads + h)*num_splits + s] (max in log2 units, -inf and 0 when the split had no
//   key for that row), and attention_combine_bf16 merges the splits into `out`.
//   The `_kv8` kernels read an e4m3 cache (FP8 KV cache, 1 byte an element): a stored key q means
//   q · k_scale, a value q · v_scale. The tile load turns eight e4m3 into eight bf16 (exact, no
//   scale: every e4m3 value is a bf16), so the tiles in shared memory and everything after are
//   the bf16 kernel's; k_scale joins the query's pre-scaling (q · (scale·log2e·k_scale), once per
//   query element) and v_scale the final normalisation (acc / l · v_scale), so each scale is
//   applied once, in f32, and never per key. The bf16 kernels get 1.0 for both (exact no-ops).
//   Requirements (host-checked): hd % 8 == 0 (16-byte loads; 8-byte for e4m3); n_rows * G * hd <= 16 * blockDim;
//   the dynamic shared memory holds the layout of `Smem` below.
//
// How: a block takes the G query heads that share kv head g, for the n_rows rows of its tile
//   (nq = n_rows * G query vectors), and streams the keys of its split in tiles of `tk`: K and V
//   tiles are loaded once into shared memory and used by all nq queries (GQA heads share K/V
//   loads; prefill rows share them too), scores of one tile live in shared memory only (the
//   score matrix is never materialised), and the running max/sum rescale the accumulators held
//   in registers. Softmax runs in base 2 (scores pre-multiplied by scale*log2(e), exp2f) in f32.
//   The same code serves decode (one row per sequence, 128 threads, many splits for long
//   contexts) and prefill (tiles of rows, 256 threads, usually one split); both entry points
//   below are instantiations of attention_tile.
// Versions: 1 (this) — CUDA cores, synchronous tile loads. Tensor-core (mma) scores and
//   cp.async double buffering are the next versions; this one is the correctness reference.
#include "common.cuh"

#include <math_constants.h>

// Accumulators per thread: nq * hd <= ACC * blockDim outputs per block.
#define ACC 16

// Shared memory layout, in this order, each part starting at a 16-byte boundary (the host
// computes the same size in attention.rs `smem_bytes`):
//   q_s   f32 [nq_max][hd]          the block's queries, pre-scaled by scale*log2(e)
//   k_s   bf16 [tk][hd + 2]         key tile; +2 pads rows so that threads reading different
//                                   keys at the same dim hit different banks
//   v_s   bf16 [tk][hd]             value tile
//   p_s   f32 [nq_max][tk]          scores, then probabilities, of the tile
//   m_s, l_s, a_s  f32 [nq_max]     running max, running sum, this tile's rescale factor
//   pos_s int [nq_max]              position of each query vector's row
__host__ __device__ __forceinline__ size_t align16(size_t x) { return (x + 15) & ~(size_t)15; }

template <int NT, class KV>
__device__ __forceinline__ void attention_tile(const bf16* __restrict__ q, const KV* __restrict__ k_cache,
                                               const KV* __restrict__ v_cache,
                                               const unsigned* __restrict__ positions,
                                               const unsigned* __restrict__ block_tables,
                                               const unsigned* __restrict__ work, bf16* __restrict__ out,
                                               float* __restrict__ o_part, float2* __restrict__ ml_part, int heads,
                                               int kv_heads, int hd, int block_size, int nq_max, int tk,
                                               int split_len, float scale_log2, float k_scale,
                                               float v_scale) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    constexpr int NW = NT / 32;
    const int G = heads / kv_heads, g = blockIdx.y, split = blockIdx.z, num_splits = gridDim.z;
    const int q_dim = heads * hd, kv_dim = kv_heads * hd, ks = hd + 2;

    size_t off = 0;
    float* q_s = reinterpret_cast<float*>(smem + off);
    off = align16(off + sizeof(float) * nq_max * hd);
    bf16* k_s = reinterpret_cast<bf16*>(smem + off);
    off = align16(off + sizeof(bf16) * tk * ks);
    bf16* v_s = reinterpret_cast<bf16*>(smem + off);
    off = align16(off + sizeof(bf16) * tk * hd);
    float* p_s = reinterpret_cast<float*>(smem + off);
    off = align16(off + sizeof(float) * nq_max * tk);
    float* m_s = reinterpret_cast<float*>(smem + off);
    off = align16(off + sizeof(float) * nq_max);
    float* l_s = reinterpret_cast<float*>(smem + off);
    off = align16(off + sizeof(float) * nq_max);
    float* a_s = reinterpret_cast<float*>(smem + off);
    off = align16(off + sizeof(float) * nq_max);
    int* pos_s = reinterpret_cast<int*>(smem + off);

    const unsigned* w = work + 4 * (size_t)blockIdx.x;
    const int row_start = (int)w[0], n_rows = (int)w[1], kmax = (int)w[3];
    const unsigned* table = block_tables + w[2];
    const int nq = n_rows * G;  // query vector qi = row_in_tile * G + head_in_group
    const int len = split_len > 0 ? split_len : max(tk, (kmax + num_splits - 1) / num_splits + tk - 1) / tk * tk;
    const int k_begin = split * len;
    const int k_end = min(kmax, k_begin + len);

    // Queries: consecutive qi of one row are consecutive heads, contiguous in q.
    for (int idx = tid; idx < nq * hd; idx += NT) {
        const int qi = idx / hd, d = idx - qi * hd;
        const int row = row_start + qi / G, head = g * G + qi % G;
        q_s[idx] = bf2f(q[(size_t)row * q_dim + head * hd + d]) * (scale_log2 * k_scale);
    }
    for (int qi = tid; qi < nq; qi += NT) {
        m_s[qi] = -CUDART_INF_F;
        l_s[qi] = 0.f;
        pos_s[qi] = (int)positions[row_start + qi / G];
    }
    float acc[ACC];
#pragma unroll
    for (int i = 0; i < ACC; i++) acc[i] = 0.f;
    __syncthreads();

    const int vecs = hd / 8;  // 16-byte vectors per key
    for (int key0 = k_begin; key0 < k_end; key0 += tk) {
        const int jn = min(tk, k_end - key0);  // valid keys of this tile, the same for the block
        // Load the K and V tiles through the block table.
        for (int idx = tid; idx < jn * vecs; idx += NT) {
            const int j = idx / vecs, c = idx - j * vecs;
            const int p = key0 + j;
            const size_t slot = (size_t)table[p / block_size] * block_size + p % block_size;
            const size_t src = slot * kv_dim + (size_t)g * hd + c * 8;
            const uint4 kv = load8_kv(k_cache + src);
            // k_s rows are hd + 2 elements long, so only 4-byte aligned: store as four words.
            unsigned* kd = reinterpret_cast<unsigned*>(k_s + j * ks + c * 8);
            kd[0] = kv.x;
            kd[1] = kv.y;
            kd[2] = kv.z;
            kd[3] = kv.w;
            *reinterpret_cast<uint4*>(v_s + j * hd + c * 8) = load8_kv(v_cache + src);
        }
        __syncthreads();
        // Scores (already in log2 units), -inf where causality masks the key.
        for (int idx = tid; idx < nq * tk; idx += NT) {
            const int qi = idx / tk, j = idx - qi * tk;
            float s = -CUDART_INF_F;
            if (j < jn && key0 + j <= pos_s[qi]) {
                const float2* qv = reinterpret_cast<const float2*>(q_s + qi * hd);
                const __nv_bfloat162* kv = reinterpret_cast<const __nv_bfloat162*>(k_s + j * ks);
                float dot = 0.f;
                for (int d2 = 0; d2 < hd / 2; d2++) {
                    const float2 kf = __bfloat1622float2(kv[d2]);
                    const float2 qf = qv[d2];
                    dot = fmaf(qf.x, kf.x, dot);
                    dot = fmaf(qf.y, kf.y, dot);
                }
                s = dot;
            }
            p_s[idx] = s;
        }
        __syncthreads();
        // Online softmax, one warp per query vector.
        for (int qi = warp; qi < nq; qi += NW) {
            float* p = p_s + qi * tk;
            float mx = -CUDART_INF_F;
            for (int j = lane; j < jn; j += 32) mx = fmaxf(mx, p[j]);
            mx = warp_max(mx);
            const float m_old = m_s[qi];
            const float m_new = fmaxf(m_old, mx);
            float sum = 0.f, alpha = 1.f;
            if (m_new == -CUDART_INF_F) {
                // Every key so far is masked for this query: nothing to add, nothing to rescale.
                for (int j = lane; j < jn; j += 32) p[j] = 0.f;
            } else {
                for (int j = lane; j < jn; j += 32) {
                    const float e = exp2f(p[j] - m_new);  // exp2f(-inf) == 0 for masked keys
                    p[j] = e;
                    sum += e;
                }
                alpha = exp2f(m_old - m_new);  // 0 when m_old is -inf
            }
            sum = warp_sum(sum);
            __syncwarp();  // every lane has read m_s[qi] before lane 0 overwrites it
            if (lane == 0) {
                m_s[qi] = m_new;
                l_s[qi] = l_s[qi] * alpha + sum;
                a_s[qi] = alpha;
            }
        }
        __syncthreads();
        // Rescale and accumulate P·V; thread owns outputs o = tid + i*NT, (qi, d) = divmod(o, hd).
#pragma unroll
        for (int i = 0; i < ACC; i++) {
            const int o = tid + i * NT;
            if (o < nq * hd) {
                const int qi = o / hd, d = o - qi * hd;
                const float* p = p_s + qi * tk;
                float a = acc[i] * a_s[qi];
                // Only the keys this query attends to: a masked key's weight is 0, but 0 · NaN is
                // NaN, and a non-finite value must not reach rows that never attend to it.
                const int jq = min(jn, pos_s[qi] - key0 + 1);
                for (int j = 0; j < jq; j++) a = fmaf(p[j], bf2f(v_s[j * hd + d]), a);
                acc[i] = a;
            }
        }
        __syncthreads();  // the next tile overwrites k_s, v_s and p_s
    }

#pragma unroll
    for (int i = 0; i < ACC; i++) {
        const int o = tid + i * NT;
        if (o < nq * hd) {
            const int qi = o / hd, d = o - qi * hd;
            const int row = row_start + qi / G, head = g * G + qi % G;
            const float l = l_s[qi];
            // l is 0 when no key of this split reaches the row; NaN (a non-finite key it attends
            // to) must propagate, not become 0.
            const float v = l != 0.f ? acc[i] / l * v_scale : 0.f;
            if (num_splits == 1)
                out[(size_t)row * q_dim + head * hd + d] = f2bf(v);
            else
                o_part[((size_t)row * heads + head) * num_splits * hd + (size_t)split * hd + d] = v;
        }
    }
    if (num_splits > 1) {
        for (int qi = tid; qi < nq; qi += NT) {
            const int row = row_start + qi / G, head = g * G + qi % G;
            ml_part[((size_t)row * heads + head) * num_splits + split] = make_float2(m_s[qi], l_s[qi]);
        }
    }
}

#define ATTENTION_ARGS(KV)                                                                                          \
    const bf16 *__restrict__ q, const KV *__restrict__ k_cache, const KV *__restrict__ v_cache,                     \
        const unsigned *__restrict__ positions, const unsigned *__restrict__ block_tables,                           \
        const unsigned *__restrict__ work, bf16 *__restrict__ out, float *__restrict__ o_part,                       \
        float2 *__restrict__ ml_part, int heads, int kv_heads, int hd, int block_size, int nq_max, int tk,          \
        int split_len, float scale_log2, float k_scale, float v_scale
#define ATTENTION_PASS                                                                                              \
    q, k_cache, v_cache, positions, block_tables, work, out, o_part, ml_part, heads, kv_heads, hd, block_size,     \
        nq_max, tk, split_len, scale_log2, k_scale, v_scale

// Decode: one row per work item, the G heads of a kv head; build.rs fails on any spill here.
// The minimum of 4 blocks per SM matters: with the bare bound ptxas for sm_90a picked 72
// registers and spilled; asking for 4 blocks (98 registers, 4 x 39 KiB of shared memory at
// hd = 128, G = 8) compiles without spills on sm_80/89/90a.
extern "C" __global__ void __launch_bounds__(128, 4) attention_decode_bf16(ATTENTION_ARGS(bf16)) {
    attention_tile<128>(ATTENTION_PASS);
}
extern "C" __global__ void __launch_bounds__(128, 4) attention_decode_bf16_kv8(ATTENTION_ARGS(uint8_t)) {
    attention_tile<128>(ATTENTION_PASS);
}

// Prefill: tiles of rows of one sequence.
extern "C" __global__ void __launch_bounds__(256) attention_prefill_bf16(ATTENTION_ARGS(bf16)) {
    attention_tile<256>(ATTENTION_PASS);
}
extern "C" __global__ void __launch_bounds__(256) attention_prefill_bf16_kv8(ATTENTION_ARGS(uint8_t)) {
    attention_tile<256>(ATTENTION_PASS);
}

// Merges the splits: out = sum_s 2^(m_s - M) * l_s * o_s / sum_s 2^(m_s - M) * l_s, M = max_s m_s.
// One block per (row, head); o_part rows are normalised by their own l_s, hence the l_s weights.
extern "C" __global__ void attention_combine_bf16(const float* __restrict__ o_part, const float2* __restrict__ ml_part,
                                                  bf16* __restrict__ out, int hd, int num_splits) {
    const size_t rh = blockIdx.x;  // row * heads + head; out[row, head*hd] is out + rh*hd
    const float2* ml = ml_part + rh * num_splits;
    float mx = -CUDART_INF_F;
    for (int s = 0; s < num_splits; s++) mx = fmaxf(mx, ml[s].x);
    float total = 0.f;
    // `!= 0`, not `> 0`: a split whose sum is NaN must make the row NaN, not drop out.
    for (int s = 0; s < num_splits; s++)
        if (ml[s].y != 0.f) total += exp2f(ml[s].x - mx) * ml[s].y;
    const float inv = total != 0.f ? 1.f / total : 0.f;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < num_splits; s++)
            if (ml[s].y != 0.f) acc += exp2f(ml[s].x - mx) * ml[s].y * o_part[(rh * num_splits + s) * hd + d];
        out[rh * hd + d] = f2bf(acc * inv);
    }
}
