// Token selection on the GPU, so that only token ids cross to the host.
//
// Contract (checked by src/backend/cuda/sampling.rs before launch):
//   argmax_bf16(logits[rows, cols], sample_cols) -> ids[rows] u32
//       the index of the largest of the first `sample_cols` columns of each row (columns past
//       it are vocab padding and never chosen); the first index on ties, as torch.argmax and
//       the CPU sampler; NaN never wins (a row of only NaN gives 0). One block per row,
//       blockDim a multiple of 32 and at most 1024.
// Versions: 1 (this) — greedy only. Temperature, top-k, top-p and min-p sampling on the GPU are
//   not implemented yet: the engine samples those on the host from the logits.
#include "common.cuh"

#include <math_constants.h>

__device__ __forceinline__ void better(float& best, unsigned& idx, float v, unsigned i) {
    // `v > best` is false for NaN, so NaN never replaces a number.
    if (v > best || (v == best && i < idx)) {
        best = v;
        idx = i;
    }
}

extern "C" __global__ void argmax_bf16(const bf16* __restrict__ logits, int cols, int sample_cols,
                                       unsigned* __restrict__ ids) {
    __shared__ float s_best[32];
    __shared__ unsigned s_idx[32];
    const bf16* row = logits + (size_t)blockIdx.x * cols;
    float best = -CUDART_INF_F;
    unsigned idx = 0xffffffffu;
    for (int c = threadIdx.x; c < sample_cols; c += blockDim.x) better(best, idx, bf2f(row[c]), (unsigned)c);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float b = __shfl_xor_sync(0xffffffffu, best, o);
        const unsigned i = __shfl_xor_sync(0xffffffffu, idx, o);
        better(best, idx, b, i);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        s_best[warp] = best;
        s_idx[warp] = idx;
    }
    __syncthreads();
    if (warp == 0) {
        const int nwarps = blockDim.x >> 5;
        best = lane < nwarps ? s_best[lane] : -CUDART_INF_F;
        idx = lane < nwarps ? s_idx[lane] : 0xffffffffu;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float b = __shfl_xor_sync(0xffffffffu, best, o);
            const unsigned i = __shfl_xor_sync(0xffffffffu, idx, o);
            better(best, idx, b, i);
        }
        // Every value -inf or NaN: no index was taken; answer 0 like the CPU sampler.
        if (lane == 0) ids[blockIdx.x] = idx == 0xffffffffu ? 0u : idx;
    }
}
