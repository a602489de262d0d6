// FP8 prefill: the two kernels around cuBLASLt's FP8 GEMM.
// Launcher: src/backend/cuda/gemm_fp8.rs (shape checks next to the launches).
//
// A prefill-sized matmul with e4m3 weights (per-row f32 scales) runs as
//   1. quantize_fp8_rows_bf16: each token row of x (bf16) becomes e4m3 with one f32 scale per
//      token, amax / 448 (amax over the row's finite values, clamped by `bound` when positive —
//      fbgemm's activation_scale_ub — and 1 for a row of zeros), so that nothing saturates
//      unless the bound says so;
//   2. cuBLASLt: d[M, N] = xq · wqᵀ in f32 (products of two e4m3 values are exact in f32, the
//      sums are f32);
//   3. scale_fp8_gemm_bf16: y[m, n] = bf16(d[m, n] · xscale[m] · wscale[n]).
// Per-token and per-row scales cannot be cuBLASLt's scalar scales, so they are applied in step 3.
//
// f32 → e4m3 is common.cuh's f32_to_e4m3 (shared with the FP8 KV cache write).
#include "common.cuh"

#define QUANT_THREADS 256

// One block per token row.
extern "C" __global__ void __launch_bounds__(QUANT_THREADS)
    quantize_fp8_rows_bf16(const bf16* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scale, int k,
                           float bound) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const bf16* xr = x + row * k;
    float amax = 0.f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        const float v = fabsf(bf2f(xr[i]));
        if (v <= 3.402823466e38f) amax = fmaxf(amax, v);  // finite values only (NaN, ∞ fail <=)
    }
    amax = block_max(amax, scratch);
    if (bound > 0.f) amax = fminf(amax, bound);
    const float s = amax > 0.f ? amax / 448.f : 1.f;
    uint8_t* qr = q + row * k;
    for (int i = threadIdx.x; i < k; i += blockDim.x) qr[i] = (uint8_t)f32_to_e4m3(bf2f(xr[i]) / s);
    if (threadIdx.x == 0) scale[row] = s;
}

// y[m, n] = bf16(d[m, n] · xscale[m] · wscale[n]), one thread per element.
extern "C" __global__ void scale_fp8_gemm_bf16(const float* __restrict__ d, const float* __restrict__ xscale,
                                              const float* __restrict__ wscale, bf16* __restrict__ y, int m, int n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)m * n) return;
    const size_t r = i / n, c = i % n;
    y[i] = f2bf(d[i] * xscale[r] * wscale[c]);
}
