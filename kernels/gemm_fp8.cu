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
// f32 → e4m3 is round to nearest even, saturating at ±448 (CUDA's __NV_SATFINITE), NaN to 0x7F:
// bit for bit what the CPU's `quant::e4m3::from_f32` (the float8 crate) gives, with integer
// operations so that any GPU and the CPU emulator run the same code.
#include "common.cuh"

#define QUANT_THREADS 256

__device__ __forceinline__ unsigned f32_to_e4m3(float x) {
    const unsigned bits = __float_as_uint(x);
    const unsigned sign = (bits >> 24) & 0x80u;
    if (isnan(x)) return sign | 0x7Fu;
    const float a = fabsf(x);
    if (a < 0.015625f) return sign | (unsigned)rintf(a * 512.f);  // subnormal: multiples of 2^-9
    // Normal: round the f32 mantissa to 3 bits (ties to even, a carry moves into the exponent),
    // then rebias the exponent (127 → 7); past 448 saturates.
    unsigned u = bits & 0x7FFFFFFFu;
    u = (u + 0x7FFFFu + ((u >> 20) & 1u)) >> 20;
    const unsigned code = u - (120u << 3);
    return sign | (code > 0x7Eu ? 0x7Eu : code);
}

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
