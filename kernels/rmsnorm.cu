// RMSNorm, and RMSNorm fused with the residual add that precedes it in every Llama block.
//
// Contract (checked by src/backend/cuda/rmsnorm.rs before launch):
//   rmsnorm_bf16     (x[rows, cols], w[cols]) -> out[rows, cols]
//       out = x * rsqrt(mean(x^2) + eps) * w
//   add_rmsnorm_bf16 (x[rows, cols] in/out, residual[rows, cols], w[cols]) -> out[rows, cols]
//       x  <- bf16(x + residual)              (the residual stream, updated in place)
//       out = x * rsqrt(mean(x^2) + eps) * w  (computed from the rounded bf16 x, so the
//                                              normalised value is exactly that of the stored x)
//   bf16 storage, f32 accumulation. One block per row, any blockDim that is a multiple of 32
//   (the launcher uses 256); `vec8` != 0 selects 16-byte accesses and needs cols % 8 == 0.
//   x and out must not alias (out is a fresh buffer); residual may not alias x.
// Versions: 1 (this) — one pass for the sum of squares, one for the output; the row is re-read
//   from L1/L2, not kept in registers, so that any width works with no spills.
#include "common.cuh"

template <bool ADD>
__device__ __forceinline__ void rmsnorm_row(bf16* __restrict__ x, const bf16* __restrict__ residual,
                                            const bf16* __restrict__ w, bf16* __restrict__ out, int cols,
                                            float eps, bool vec8) {
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * cols;
    bf16* xr = x + base;
    float ss = 0.f;
    if (vec8) {
        for (int c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
            Pack8 a = load8(xr + c);
            if (ADD) {
                const Pack8 b = load8(residual + base + c);
#pragma unroll
                for (int i = 0; i < 8; i++) a.v[i] = f2bf(bf2f(a.v[i]) + bf2f(b.v[i]));
                store8(xr + c, a);
            }
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const float f = bf2f(a.v[i]);
                ss += f * f;
            }
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            bf16 a = xr[c];
            if (ADD) {
                a = f2bf(bf2f(a) + bf2f(residual[base + c]));
                xr[c] = a;
            }
            const float f = bf2f(a);
            ss += f * f;
        }
    }
    ss = block_sum(ss, scratch);
    const float scale = rsqrtf(ss / (float)cols + eps);
    // Each thread re-reads exactly the elements it wrote above, so no barrier is needed.
    if (vec8) {
        for (int c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
            const Pack8 a = load8(xr + c), g = load8(w + c);
            Pack8 o;
#pragma unroll
            for (int i = 0; i < 8; i++) o.v[i] = f2bf(bf2f(a.v[i]) * scale * bf2f(g.v[i]));
            store8(out + base + c, o);
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) out[base + c] = f2bf(bf2f(xr[c]) * scale * bf2f(w[c]));
    }
}

extern "C" __global__ void rmsnorm_bf16(const bf16* __restrict__ x, const bf16* __restrict__ w, bf16* __restrict__ out,
                                        int cols, float eps, int vec8) {
    rmsnorm_row<false>(const_cast<bf16*>(x), nullptr, w, out, cols, eps, vec8 != 0);
}

extern "C" __global__ void add_rmsnorm_bf16(bf16* __restrict__ x, const bf16* __restrict__ residual,
                                            const bf16* __restrict__ w, bf16* __restrict__ out, int cols, float eps,
                                            int vec8) {
    rmsnorm_row<true>(x, residual, w, out, cols, eps, vec8 != 0);
}
