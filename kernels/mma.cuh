// Tensor-core building blocks for sm_80 and up: one device function per PTX instruction the
// mma kernels use, so that the instruction, its operands and its fragment layout live in one place.
//
//   mma_m16n8k16_bf16(d, a, b)   d += a · b   mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
//   ldmatrix_x4(r, row)          four 8×8 b16 matrices from shared memory  ldmatrix...x4.shared.b16
//   ldmatrix_x4_trans(r, row)    the same, each matrix transposed          ldmatrix...x4.trans...
//   cp_async_16(dst, src, ok)    16 bytes global -> shared (zeros when !ok)  cp.async.cg.shared.global
//   cp_async_commit(), cp_async_wait<N>()   close a group; wait until at most N groups are pending
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4,
// each 32-bit register holding two bf16 with the lower column (or row, for B) in the low half:
//   A 16×16 row-major: a[0] (g, 2t..2t+1), a[1] (g+8, 2t..), a[2] (g, 2t+8..), a[3] (g+8, 2t+8..)
//   B 16×8 (k × n):    b[0] (k 2t..2t+1, n g), b[1] (k 2t+8..2t+9, n g)
//   C/D 16×8 f32:      d[0], d[1] (g, 2t, 2t+1), d[2], d[3] (g+8, 2t, 2t+1)
// ldmatrix .x4: lane 8m + r gives the shared address of row r of matrix m (16 bytes, 16-byte
// aligned); register m of lane l gets matrix m's (row l/4, cols 2(l%4), 2(l%4)+1), or with .trans
// (rows 2(l%4), 2(l%4)+1, col l/4). Loading K (keys × dims) plainly gives B fragments of Kᵀ;
// loading V (keys × dims) transposed gives B fragments of V.
//
// Under the CUDA emulator (TULU_CUDA_EMU) each function is a warp-collective twin in
// emu/include/cuda_emu_mma.h that implements the same tables lane by lane; on a GPU it is the
// instruction itself. All 32 lanes of the warp must call mma and ldmatrix together.
#pragma once

#include <cuda_bf16.h>

#if !defined(TULU_CUDA_EMU) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "kernels/mma.cuh needs sm_80 or later (bf16 mma.sync, cp.async)"
#endif

__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2]) {
#ifdef TULU_CUDA_EMU
    tulu_emu::mma_m16n8k16_bf16(d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const void* row) {
#ifdef TULU_CUDA_EMU
    tulu_emu::ldmatrix_x4(r, row, false);
#else
    const unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const void* row) {
#ifdef TULU_CUDA_EMU
    tulu_emu::ldmatrix_x4(r, row, true);
#else
    const unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
#endif
}

// `ok` false: the 16 destination bytes become zeros and `src` is not read (it may be any address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool ok) {
#ifdef TULU_CUDA_EMU
    tulu_emu::cp_async_16(dst, src, ok ? 16u : 0u);
#else
    const unsigned addr = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src), "r"(ok ? 16 : 0)
                 : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifndef TULU_CUDA_EMU
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight (its own copies
// only: a __syncthreads must follow before other threads read them).
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifndef TULU_CUDA_EMU
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Two floats as one register of two bf16 (round to nearest even), `lo` in the low half: the
// A-fragment form of a pair of adjacent columns.
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    const __nv_bfloat16 l = __float2bfloat16(lo), h = __float2bfloat16(hi);
    unsigned short lb, hb;
    memcpy(&lb, &l, 2);
    memcpy(&hb, &h, 2);
    return (unsigned)lb | (unsigned)hb << 16;
}
