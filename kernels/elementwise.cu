// Element-wise kernels of the forward pass: SiLU·mul of the fused gate/up activation and the
// gather of a step's output rows (residual adds are fused into add_rmsnorm_bf16).
//
// Contract (checked by src/backend/contract.rs before launch):
//   silu_mul_bf16(gate_up[rows, 2*inter]) -> out[rows, inter]
//       out[r, i] = silu(g) * u with g = gate_up[r, i], u = gate_up[r, inter + i],
//       silu(g) = g / (1 + exp(-g)), in f32 from the bf16 inputs, rounded once.
//   gather_rows_bf16(x[*, cols], rows[n] u32) -> out[n, cols]: out[i] = x[rows[i]]
//       (the host checks every index is in range).
//   Grid-stride loops: any grid and block size is correct; the launcher sizes them.
// Versions: 1 (this) — scalar accesses. Decode GEMVs fuse silu_mul into their epilogue
//   (gemv_silu_decode_bf16_{M}, kernels/gemv.cu); this is the version every other matmul uses.
#include "common.cuh"

extern "C" __global__ void silu_mul_bf16(const bf16* __restrict__ gate_up, bf16* __restrict__ out, int rows,
                                         int inter) {
    const size_t n = (size_t)rows * inter;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (size_t)gridDim.x * blockDim.x) {
        const size_t r = idx / inter, i = idx - r * inter;
        const bf16* row = gate_up + r * 2 * inter;
        const float g = bf2f(row[i]), u = bf2f(row[inter + i]);
        out[idx] = f2bf(g / (1.f + expf(-g)) * u);
    }
}

extern "C" __global__ void gather_rows_bf16(const bf16* __restrict__ x, const unsigned* __restrict__ rows,
                                            bf16* __restrict__ out, int cols) {
    const bf16* src = x + (size_t)rows[blockIdx.x] * cols;
    bf16* dst = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}
