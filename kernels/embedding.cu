// Embedding lookup: the rows of the token ids of a step.
//
// Contract (checked by src/backend/cuda/embedding.rs before launch):
//   embedding_bf16(table[vocab, cols], ids[n] u32) -> out[n, cols]:
//       out[i] = table[ids[i]] when ids[i] < vocab, else a zero row (a vocab-parallel rank holds
//       only its shard of the table; the model shifts ids into it and sums the ranks' rows).
//   One block per id.
// Versions: 1 (this) — scalar copy; a row is a few KiB and n is the step's token count.
#include "common.cuh"

extern "C" __global__ void embedding_bf16(const bf16* __restrict__ table, const unsigned* __restrict__ ids,
                                          bf16* __restrict__ out, int cols, unsigned vocab) {
    const unsigned id = ids[blockIdx.x];
    bf16* dst = out + (size_t)blockIdx.x * cols;
    if (id >= vocab) {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = f2bf(0.f);
        return;
    }
    const bf16* src = table + (size_t)id * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}
