// Token selection on the GPU, so that only token ids cross to the host.
//
// Contract (checked by src/backend/cuda/sampling.rs before launch):
//   argmax_bf16(logits[rows, cols], sample_cols, mask[rows, words]) -> ids[rows] u32
//       the index of the largest of the first `sample_cols` columns of each row (columns past
//       it are vocab padding and never chosen); the first index on ties, as torch.argmax and
//       the CPU sampler. A row with a NaN or ±inf among those columns gets 0xffffffff
//       (runtime::sampler::NON_FINITE) instead of a token. One block per row, blockDim a
//       multiple of 32 and at most 1024.
//       With words > 0, a row takes only the columns its mask allows (bit c % 32 of word
//       c / 32; structured outputs): the others are neither chosen nor checked. words = 0: no
//       mask (`mask` is then a placeholder).
//   sample_bf16(logits[rows, cols], valid, meta[rows, 8], penalized[], mask[rows, words],
//               scratch[rows, valid] f32)
//       -> ids[rows] u32
//       the token `src/runtime/sampler.rs::sample_row` picks, with each row's parameters in
//       `meta` (temperature, top_k, top_p, min_p, repetition penalty, uniform draw as f32 bits;
//       start and count of its penalised ids in `penalized`), or 0xffffffff for a row whose
//       first `valid` logits are not all finite. One block of 1024 threads per row; `scratch`
//       holds the row's penalised logits, then its probabilities. A column the row's mask
//       disallows (as argmax_bf16) is a -inf logit, probability 0, and is not checked.
// Versions: 4 (this) — greedy, and sampling with every filter; non-finite rows flagged; token
// masks.
//
// How sample_bf16 finds the thresholds without sorting: probabilities are non-negative floats,
// whose bit patterns order like their values, so "the largest t such that the values ≥ t weigh
// at least W" is a radix select over the bits: three passes (11, 11 and 10 bits) each build a
// 2048-bin histogram of the values still matching the prefix, and one warp scans it from the
// top for the bin where the weight is reached. Weights are counts (top-k) or fixed-point masses
// (top-p; p · 2^40 as u64, so sums are exact and independent of the order atomics land in).
#include "common.cuh"

#include <math_constants.h>

// Whether the row's mask (`words` words, none when 0) allows column c.
__device__ __forceinline__ bool allowed(const unsigned* __restrict__ mask, int words, int c) {
    return words == 0 || ((mask[c >> 5] >> (c & 31)) & 1u);
}

__device__ __forceinline__ void better(float& best, unsigned& idx, float v, unsigned i) {
    // `v > best` is false for NaN, so NaN never replaces a number.
    if (v > best || (v == best && i < idx)) {
        best = v;
        idx = i;
    }
}

// The block's largest value and its index (first on ties), for every thread; `s_best` and
// `s_idx` hold 32 entries. An index of 0xffffffff means every value was -inf or NaN.
__device__ __forceinline__ void block_argmax(float& best, unsigned& idx, float* s_best, unsigned* s_idx) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float b = __shfl_xor_sync(0xffffffffu, best, o);
        const unsigned i = __shfl_xor_sync(0xffffffffu, idx, o);
        better(best, idx, b, i);
    }
    if (lane == 0) {
        s_best[warp] = best;
        s_idx[warp] = idx;
    }
    __syncthreads();
    best = lane < nwarps ? s_best[lane] : -CUDART_INF_F;
    idx = lane < nwarps ? s_idx[lane] : 0xffffffffu;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float b = __shfl_xor_sync(0xffffffffu, best, o);
        const unsigned i = __shfl_xor_sync(0xffffffffu, idx, o);
        better(best, idx, b, i);
    }
}

extern "C" __global__ void argmax_bf16(const bf16* __restrict__ logits, int cols, int sample_cols,
                                       const unsigned* __restrict__ mask_all, int words,
                                       unsigned* __restrict__ ids) {
    __shared__ float s_best[32];
    __shared__ unsigned s_idx[32];
    __shared__ int s_bad;
    const bf16* row = logits + (size_t)blockIdx.x * cols;
    const unsigned* mask = mask_all + (size_t)blockIdx.x * words;
    float best = -CUDART_INF_F;
    unsigned idx = 0xffffffffu;
    if (threadIdx.x == 0) s_bad = 0;
    __syncthreads();
    for (int c = threadIdx.x; c < sample_cols; c += blockDim.x) {
        if (!allowed(mask, words, c)) continue;
        const float v = bf2f(row[c]);
        if (!isfinite(v)) s_bad = 1;  // every writer stores the same value
        better(best, idx, v, (unsigned)c);
    }
    __syncthreads();
    block_argmax(best, idx, s_best, s_idx);
    // A non-finite logit flags the row (the host fails its request instead of emitting a token).
    if (threadIdx.x == 0) ids[blockIdx.x] = s_bad ? 0xffffffffu : idx;
}

// ---------------------------------------------------------------------------------------------
// Sampling (sample_bf16).

#define SAMPLE_THREADS 1024
#define MASS_SCALE 1099511627776.0f  // 2^40, as src/runtime/sampler.rs::MASS_SCALE

__device__ __forceinline__ unsigned long long mass_of(float p) { return (unsigned long long)(p * MASS_SCALE); }

// Sum over the block, for every thread; `scratch` holds 32 values. Ends with a barrier.
__device__ __forceinline__ unsigned long long block_sum_u64(unsigned long long v, unsigned long long* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0ull;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    return v;
}

// The largest bit pattern u such that the values v ≥ floor_v of p[0, n) with bits(v) ≥ u weigh
// at least `goal` (count, or fixed-point mass when by_mass). Every thread of the block calls it;
// every thread gets the answer.
__device__ unsigned radix_select(const float* p, int n, float floor_v, bool by_mass, unsigned long long goal,
                                 unsigned long long* hist, unsigned* s_digit, unsigned long long* s_above) {
    unsigned prefix = 0, mask = 0;
    unsigned long long above = 0;
    for (int pass = 0; pass < 3; ++pass) {
        const int shift = pass == 0 ? 21 : pass == 1 ? 10 : 0;
        const int nb = pass == 2 ? 1024 : 2048;
        for (int b = threadIdx.x; b < nb; b += blockDim.x) hist[b] = 0ull;
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const float v = p[i];
            if (!(v >= floor_v)) continue;
            const unsigned u = __float_as_uint(v);
            if ((u & mask) != prefix) continue;
            atomicAdd(&hist[(u >> shift) & (nb - 1)], by_mass ? mass_of(v) : 1ull);
        }
        __syncthreads();
        if (threadIdx.x < 32) {
            // Lane 0 takes the highest bins, lane 31 the lowest.
            const int lane = threadIdx.x, per = nb / 32, top = nb - lane * per;
            unsigned long long mine = 0;
            for (int b = top - 1; b >= top - per; --b) mine += hist[b];
            unsigned long long incl = mine;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const unsigned long long t = __shfl_up_sync(0xffffffffu, incl, o);
                if (lane >= o) incl += t;
            }
            const unsigned hit = __ballot_sync(0xffffffffu, above + incl >= goal);
            // No lane reaching the goal cannot happen (goal ≤ the total); take the lowest bins.
            const int first = hit ? __ffs(hit) - 1 : 31;
            if (lane == first) {
                unsigned long long c = above + incl - mine;
                int d = top - per;
                for (int b = top - 1; b >= top - per; --b) {
                    if (c + hist[b] >= goal) {
                        d = b;
                        break;
                    }
                    c += hist[b];
                }
                *s_digit = (unsigned)d;
                *s_above = c;
            }
        }
        __syncthreads();
        prefix |= *s_digit << shift;
        mask |= (unsigned)(nb - 1) << shift;
        above = *s_above;
        __syncthreads();
    }
    return prefix;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_bf16(const bf16* __restrict__ logits, int cols, int valid, const unsigned* __restrict__ meta,
                const unsigned* __restrict__ penalized, const unsigned* __restrict__ mask_all, int words,
                float* __restrict__ scratch, unsigned* __restrict__ ids) {
    __shared__ unsigned long long hist[2048];
    __shared__ unsigned long long s_sum[32];
    __shared__ float s_best[32];
    __shared__ unsigned s_idx[32];
    __shared__ unsigned s_digit;
    __shared__ unsigned long long s_above;
    __shared__ unsigned s_pick;
    __shared__ int s_bad;

    const unsigned* m = meta + 8 * (size_t)blockIdx.x;
    const float temperature = __uint_as_float(m[0]), top_p = __uint_as_float(m[2]), min_p = __uint_as_float(m[3]);
    const float penalty = __uint_as_float(m[4]), uniform = __uint_as_float(m[5]);
    const int top_k = (int)m[1];
    const unsigned pen_start = m[6], pen_count = m[7];
    const bf16* row = logits + (size_t)blockIdx.x * cols;
    float* p = scratch + (size_t)blockIdx.x * valid;
    const unsigned* mask = mask_all + (size_t)blockIdx.x * words;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;

    if (tid == 0) s_bad = 0;
    __syncthreads();
    for (int i = tid; i < valid; i += blockDim.x) {
        if (!allowed(mask, words, i)) {
            p[i] = -CUDART_INF_F;  // not a candidate: probability 0 below
            continue;
        }
        p[i] = bf2f(row[i]);
        if (!isfinite(p[i])) s_bad = 1;  // every writer stores the same value
    }
    __syncthreads();
    // A non-finite logit flags the row; every thread reads the same flag, so the whole block
    // returns together.
    if (s_bad) {
        if (tid == 0) ids[blockIdx.x] = 0xffffffffu;
        return;
    }
    if (penalty != 1.f) {
        // The ids are distinct (the host dedups them), so no two threads touch one logit.
        for (unsigned j = tid; j < pen_count; j += blockDim.x) {
            const unsigned t = penalized[pen_start + j];
            if (t < (unsigned)valid) {
                const float v = p[t];
                p[t] = v > 0.f ? v / penalty : v * penalty;
            }
        }
    }
    __syncthreads();

    // The likeliest token (first on ties; NaN never wins).
    float best = -CUDART_INF_F;
    unsigned idx = 0xffffffffu;
    for (int i = tid; i < valid; i += blockDim.x) better(best, idx, p[i], (unsigned)i);
    block_argmax(best, idx, s_best, s_idx);
    if (idx == 0xffffffffu) idx = 0;
    if (temperature == 0.f || !isfinite(best)) {
        if (tid == 0) ids[blockIdx.x] = idx;
        return;
    }

    // Unnormalised probabilities: the likeliest is exactly 1.
    for (int i = tid; i < valid; i += blockDim.x) {
        const float v = expf((p[i] - best) / temperature);
        p[i] = isnan(v) ? 0.f : v;
    }
    __syncthreads();

    float threshold = 0.f;
    if (top_k > 0 && top_k < valid) {
        threshold = __uint_as_float(radix_select(p, valid, 0.f, false, (unsigned long long)top_k, hist, &s_digit, &s_above));
    }
    if (top_p < 1.f) {
        unsigned long long kept = 0;
        for (int i = tid; i < valid; i += blockDim.x)
            if (p[i] >= threshold) kept += mass_of(p[i]);
        kept = block_sum_u64(kept, s_sum);
        unsigned long long goal = (unsigned long long)ceil((double)top_p * (double)kept);
        goal = goal < kept ? goal : kept;
        threshold = fmaxf(threshold, __uint_as_float(radix_select(p, valid, threshold, true, goal, hist, &s_digit, &s_above)));
    }
    if (min_p > 0.f) threshold = fmaxf(threshold, min_p);

    // The first token, in vocabulary order, where the running kept mass passes the target:
    // each thread owns a contiguous chunk; a block scan gives each chunk's starting mass.
    const int chunk = (valid + blockDim.x - 1) / blockDim.x;
    const int lo = min(valid, tid * chunk), hi = min(valid, lo + chunk);
    unsigned long long mine = 0;
    for (int i = lo; i < hi; ++i)
        if (p[i] >= threshold) mine += mass_of(p[i]);
    unsigned long long incl = mine;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned long long t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
    }
    if (lane == 31) s_sum[warp] = incl;
    if (tid == 0) s_pick = 0xffffffffu;
    __syncthreads();
    unsigned long long before = 0, total = 0;
    for (int w = 0; w < nwarps; ++w) {
        if (w < warp) before += s_sum[w];
        total += s_sum[w];
    }
    const unsigned long long excl = before + incl - mine;
    unsigned long long target = (unsigned long long)((double)uniform * (double)total);
    if (total > 0 && target > total - 1) target = total - 1;
    if (mine > 0 && excl <= target && target < excl + mine) {
        unsigned long long c = excl;
        for (int i = lo; i < hi; ++i) {
            if (p[i] >= threshold) {
                c += mass_of(p[i]);
                if (target < c) {
                    s_pick = (unsigned)i;
                    break;
                }
            }
        }
    }
    __syncthreads();
    if (tid == 0) ids[blockIdx.x] = s_pick == 0xffffffffu ? idx : s_pick;
}
