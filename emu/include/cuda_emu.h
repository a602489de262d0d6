// What nvcc provides to device code, for compiling tulu's kernels with the system C++ compiler
// into a CPU image the emulated driver runs (see docs/cuda-emu.md). Force-included
// (`-include cuda_emu.h`) before each kernels/*.cu, whose source stays what nvcc compiles.
//
// - Qualifiers (__global__, __device__, ...) are defined away; `__shared__` is `thread_local`:
//   a block runs on one OS thread (its threads are fibers), so a thread-local variable is one
//   copy per block in flight, shared by the block's threads — what shared memory is.
// - threadIdx/blockIdx/blockDim/gridDim read the running fiber's and block's coordinates.
// - __syncthreads and the warp operations (shuffles, ballot, __syncwarp) switch fibers: they are
//   real barriers, so a missing one shows up as a wrong result under some fiber schedule.
// - bf16 is a 16-bit struct with CUDA's conversions (round to nearest even, NaN -> 0x7FFF).
// - Atomics are real atomics (blocks of one launch run on several OS threads at once).
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmath>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __noinline__ __attribute__((noinline))
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ thread_local
#define __constant__ const
#define __managed__
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __CUDACC__ 1
#define __CUDA_ARCH__ 900
#define TULU_CUDA_EMU 1

using std::isfinite;
using std::isinf;
using std::isnan;

// ---------------------------------------------------------------------------------------------
// Vector types.

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};
struct __attribute__((aligned(8))) float2 {
    float x, y;
};
struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};
struct __attribute__((aligned(8))) uint2 {
    unsigned x, y;
};
struct __attribute__((aligned(16))) uint4 {
    unsigned x, y, z, w;
};
struct __attribute__((aligned(8))) int2 {
    int x, y;
};
struct __attribute__((aligned(16))) int4 {
    int x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline int2 make_int2(int x, int y) { return int2{x, y}; }

// ---------------------------------------------------------------------------------------------
// The running thread and block (emu/runtime/block.cpp sets them at every fiber switch).

namespace tulu_emu {
struct BlockCoords {
    uint3 idx;
    dim3 dim, grid;
};
// What a running CUDA thread knows about itself. Each fiber keeps a pointer to its own in a
// callee-saved register that kernel code never allocates (-ffixed-r15 / -ffixed-x28): the
// fiber switch saves and restores it with the other callee-saved registers, so threadIdx is one
// load — no thread-local lookup, no reload after every store.
struct ThreadCoords {
    uint3 tid;
    const BlockCoords* block;
};
}  // namespace tulu_emu
#if defined(__x86_64__)
register const tulu_emu::ThreadCoords* tulu_emu_self asm("r15");
#elif defined(__aarch64__)
register const tulu_emu::ThreadCoords* tulu_emu_self asm("x28");
#else
#error "the CUDA emulator needs x86_64 or aarch64"
#endif
namespace tulu_emu {

void syncthreads();
unsigned long long warp_op(int op, unsigned mask, unsigned long long value, int arg, int width);
enum WarpOp { SHFL_IDX = 0, SHFL_UP, SHFL_DOWN, SHFL_XOR, BALLOT, ANY, ALL, SYNCWARP };

template <class T>
__forceinline__ unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp operations move at most 8 bytes");
    unsigned long long b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T>
__forceinline__ T from_bits(unsigned long long b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}
}  // namespace tulu_emu

#define threadIdx (tulu_emu_self->tid)
#define blockIdx (tulu_emu_self->block->idx)
#define blockDim (tulu_emu_self->block->dim)
#define gridDim (tulu_emu_self->block->grid)
#define warpSize 32

inline void __syncthreads() { tulu_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { tulu_emu::warp_op(tulu_emu::SYNCWARP, mask, 0, 0, 32); }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return tulu_emu::from_bits<T>(tulu_emu::warp_op(tulu_emu::SHFL_IDX, mask, tulu_emu::to_bits(v), src, width));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return tulu_emu::from_bits<T>(
        tulu_emu::warp_op(tulu_emu::SHFL_UP, mask, tulu_emu::to_bits(v), (int)delta, width));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return tulu_emu::from_bits<T>(
        tulu_emu::warp_op(tulu_emu::SHFL_DOWN, mask, tulu_emu::to_bits(v), (int)delta, width));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return tulu_emu::from_bits<T>(tulu_emu::warp_op(tulu_emu::SHFL_XOR, mask, tulu_emu::to_bits(v), lane_mask, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    return (unsigned)tulu_emu::warp_op(tulu_emu::BALLOT, mask, pred != 0, 0, 32);
}
inline int __any_sync(unsigned mask, int pred) { return (int)tulu_emu::warp_op(tulu_emu::ANY, mask, pred != 0, 0, 32); }
inline int __all_sync(unsigned mask, int pred) { return (int)tulu_emu::warp_op(tulu_emu::ALL, mask, pred != 0, 0, 32); }

// ---------------------------------------------------------------------------------------------
// Integer and float intrinsics.

inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; i++) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline float __uint_as_float(unsigned x) { return tulu_emu::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return (unsigned)tulu_emu::to_bits(x); }
inline float __int_as_float(int x) { return tulu_emu::from_bits<float>((unsigned)x); }
inline int __float_as_int(float x) { return (int)(unsigned)tulu_emu::to_bits(x); }
inline double __longlong_as_double(long long x) { return tulu_emu::from_bits<double>((unsigned long long)x); }
inline long long __double_as_longlong(double x) { return (long long)tulu_emu::to_bits(x); }

// Kernels are compiled with -ffp-contract=off: every product and sum is rounded on its own,
// as the _rn intrinsics demand; fmaf is a real fused multiply-add.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : (x == x ? x : 0.f)); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __exp2f(float x) { return exp2f(x); }
inline float __fdividef(float a, float b) { return a / b; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// Loads through the read-only / streaming caches are plain loads here.
template <class T>
inline T __ldg(const T* p) {
    return *p;
}
template <class T>
inline T __ldcs(const T* p) {
    return *p;
}
template <class T>
inline T __ldcg(const T* p) {
    return *p;
}
template <class T>
inline T __ldlu(const T* p) {
    return *p;
}
template <class T>
inline void __stcs(T* p, T v) {
    *p = v;
}
template <class T>
inline void __stcg(T* p, T v) {
    *p = v;
}

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) {}
inline void __trap() { __builtin_trap(); }

// ---------------------------------------------------------------------------------------------
// Atomics: relaxed read-modify-writes, as on the GPU. In an instrumented image
// (TULU_EMU_SANITIZE) they are not instrumented — atomics never race with each other — and
// report themselves to memcheck instead (alignment, shared-memory bounds).

#ifdef TULU_EMU_SANITIZE
namespace tulu_emu {
void atomic_access(const void* p, unsigned size, void* pc);
}
#define TULU_EMU_ATOMIC __attribute__((no_sanitize_address, noinline))
#define TULU_EMU_ATOMIC_CHECK(p) tulu_emu::atomic_access(p, sizeof(*(p)), __builtin_return_address(0))
#else
#define TULU_EMU_ATOMIC inline
#define TULU_EMU_ATOMIC_CHECK(p) ((void)0)
#endif

template <class T>
TULU_EMU_ATOMIC T atomicAdd(T* p, T v) {
    TULU_EMU_ATOMIC_CHECK(p);
    if constexpr (std::is_floating_point<T>::value) {
        T old, desired;
        __atomic_load(p, &old, __ATOMIC_RELAXED);
        do {
            desired = old + v;
        } while (!__atomic_compare_exchange(p, &old, &desired, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
        return old;
    } else {
        return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
    }
}
template <class T>
TULU_EMU_ATOMIC T atomicSub(T* p, T v) {
    TULU_EMU_ATOMIC_CHECK(p);
    return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED);
}
template <class T>
TULU_EMU_ATOMIC T atomicXor(T* p, T v) {
    TULU_EMU_ATOMIC_CHECK(p);
    return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED);
}
template <class T>
TULU_EMU_ATOMIC T atomicOr(T* p, T v) {
    TULU_EMU_ATOMIC_CHECK(p);
    return __atomic_fetch_or(p, v, __ATOMIC_RELAXED);
}
template <class T>
TULU_EMU_ATOMIC T atomicAnd(T* p, T v) {
    TULU_EMU_ATOMIC_CHECK(p);
    return __atomic_fetch_and(p, v, __ATOMIC_RELAXED);
}
template <class T>
TULU_EMU_ATOMIC T atomicExch(T* p, T v) {
    TULU_EMU_ATOMIC_CHECK(p);
    return __atomic_exchange_n(p, v, __ATOMIC_RELAXED);
}
template <class T>
TULU_EMU_ATOMIC T atomicCAS(T* p, T compare, T v) {
    TULU_EMU_ATOMIC_CHECK(p);
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return compare;
}
template <class T>
TULU_EMU_ATOMIC T atomicMax(T* p, T v) {
    TULU_EMU_ATOMIC_CHECK(p);
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
template <class T>
TULU_EMU_ATOMIC T atomicMin(T* p, T v) {
    TULU_EMU_ATOMIC_CHECK(p);
    T old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}

#include "cuda_emu_bf16.h"
#include "cuda_emu_mma.h"
