// Pseudo-random weights generated on the device, and the read-bandwidth probe benchmarks
// report decode against. Launchers: src/backend/cuda/random.rs.
//
// random_fill_bf16 computes exactly `src/weights/random.rs`: element (r, c) of a slice is
// bf16(offset + scale * u(seed, (row0 + r) * total_cols + col0 + c)), u from splitmix64's
// finaliser; the multiply and add are rounded separately (no FMA contraction) so that the CPU
// backend and this kernel produce the same bits.
#include "common.cuh"

__device__ __forceinline__ float uniform_hash(unsigned long long seed, unsigned long long index) {
    unsigned long long z = seed + index * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return __fsub_rn(__fmul_rn((float)(z >> 40), 2.0f / 16777216.0f), 1.0f);
}

// out: rows × cols (row-major, contiguous). Grid-stride over the elements.
extern "C" __global__ void random_fill_bf16(bf16* __restrict__ out, int rows, int cols, unsigned long long seed,
                                            unsigned long long total_cols, unsigned long long row0,
                                            unsigned long long col0, float scale, float offset) {
    const size_t n = (size_t)rows * cols;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const size_t r = i / cols, c = i % cols;
        const float u = uniform_hash(seed, (row0 + r) * total_cols + col0 + c);
        out[i] = f2bf(__fadd_rn(offset, __fmul_rn(scale, u)));
    }
}

// Reads n 16-byte words (four independent loads in flight per thread per iteration) and folds
// them into *out, so the loads cannot be removed. Timed by the host: bytes / seconds.
extern "C" __global__ void read_probe(const uint4* __restrict__ p, unsigned long long n, unsigned int* __restrict__ out) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned int acc = 0;
    for (; i + 3 * stride < n; i += 4 * stride) {
        const uint4 a = __ldg(p + i), b = __ldg(p + i + stride), c = __ldg(p + i + 2 * stride),
                    d = __ldg(p + i + 3 * stride);
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n; i += stride) {
        const uint4 a = __ldg(p + i);
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    atomicXor(out, acc);
}
