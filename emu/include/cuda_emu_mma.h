// Warp-collective twins of the tensor-core PTX that kernels/mma.cuh wraps: `mma.sync` m16n8k16
// (bf16 in, f32 accumulate), `ldmatrix` m8n8 .x4 (.trans) and `cp.async` 16 bytes. Each follows
// the PTX ISA's fragment tables ("Matrix Fragments for mma.m16n8k16", "ldmatrix") lane by lane,
// so that a kernel indexing a fragment wrongly computes a wrong result here, as on a GPU. The
// lanes exchange their registers with the emulator's shuffles: every twin is a warp collective
// that all 32 lanes must reach together (the `.sync.aligned` contract), and a lane missing one is
// the emulator's divergence error. Included by cuda_emu.h; kernels call mma.cuh, never these.
#pragma once

namespace tulu_emu {

// The lane within the warp, from the linear thread index (the emulator's warp grouping).
__forceinline__ unsigned mma_lane() {
    const unsigned linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    return linear & 31u;
}

__forceinline__ float bf16_bits_to_float(unsigned bits16) { return __uint_as_float((bits16 & 0xffffu) << 16); }

// d = a · b + d for one 16×16 (row-major A) by 16×8 (column-major B) bf16 product, f32 sums.
// ISA layout, with g = lane / 4 and t = lane % 4:
//   A: a[0] = (row g, cols 2t, 2t+1), a[1] = (row g+8, cols 2t, 2t+1),
//      a[2] = (row g, cols 2t+8, 2t+9), a[3] = (row g+8, cols 2t+8, 2t+9); low half = lower col.
//   B: b[0] = (rows k = 2t, 2t+1, col n = g), b[1] = (rows k = 2t+8, 2t+9, col g).
//   C/D: d[0], d[1] = (row g, cols 2t, 2t+1), d[2], d[3] = (row g+8, cols 2t, 2t+1).
// Each lane gathers the A rows it needs from the four lanes of its group and the B columns from
// the eight lanes that hold them; products of two bf16 are exact in f32, summed in k order.
inline void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2]) {
    const unsigned lane = mma_lane(), g = lane >> 2, t = lane & 3, full = 0xffffffffu;
    const unsigned long long a01 = a[0] | (unsigned long long)a[1] << 32;
    const unsigned long long a23 = a[2] | (unsigned long long)a[3] << 32;
    const unsigned long long b01 = b[0] | (unsigned long long)b[1] << 32;
    float arow[2][16], bcol[2][16];  // [row g / g+8][k], [col 2t / 2t+1][k]
    for (unsigned s = 0; s < 4; s++) {
        const unsigned long long lo = __shfl_sync(full, a01, (int)(4 * g + s));
        const unsigned long long hi = __shfl_sync(full, a23, (int)(4 * g + s));
        const unsigned r0 = (unsigned)lo, r1 = (unsigned)(lo >> 32), r2 = (unsigned)hi, r3 = (unsigned)(hi >> 32);
        arow[0][2 * s] = bf16_bits_to_float(r0), arow[0][2 * s + 1] = bf16_bits_to_float(r0 >> 16);
        arow[1][2 * s] = bf16_bits_to_float(r1), arow[1][2 * s + 1] = bf16_bits_to_float(r1 >> 16);
        arow[0][2 * s + 8] = bf16_bits_to_float(r2), arow[0][2 * s + 9] = bf16_bits_to_float(r2 >> 16);
        arow[1][2 * s + 8] = bf16_bits_to_float(r3), arow[1][2 * s + 9] = bf16_bits_to_float(r3 >> 16);
    }
    for (unsigned n = 0; n < 2; n++) {
        for (unsigned s = 0; s < 4; s++) {
            const unsigned long long v = __shfl_sync(full, b01, (int)(4 * (2 * t + n) + s));
            const unsigned r0 = (unsigned)v, r1 = (unsigned)(v >> 32);
            bcol[n][2 * s] = bf16_bits_to_float(r0), bcol[n][2 * s + 1] = bf16_bits_to_float(r0 >> 16);
            bcol[n][2 * s + 8] = bf16_bits_to_float(r1), bcol[n][2 * s + 9] = bf16_bits_to_float(r1 >> 16);
        }
    }
    for (unsigned i = 0; i < 4; i++) {
        const float* ar = arow[i >> 1];
        const float* bc = bcol[i & 1];
        float acc = d[i];
        for (unsigned k = 0; k < 16; k++) acc += ar[k] * bc[k];
        d[i] = acc;
    }
}

// ldmatrix m8n8 .x4 of b16: lane 8m + r gives the address of row r of matrix m (16 bytes);
// register m of lane l receives matrix m's (row l / 4, cols 2(l % 4), 2(l % 4) + 1), or with
// `trans` its (rows 2(l % 4), 2(l % 4) + 1, col l / 4); the lower column (row) in the low half.
inline void ldmatrix_x4(unsigned r[4], const void* row, bool trans) {
    const unsigned lane = mma_lane(), full = 0xffffffffu;
    const unsigned long long mine = (unsigned long long)(uintptr_t)row;
    for (unsigned m = 0; m < 4; m++) {
        if (!trans) {
            const auto* p = (const unsigned*)(uintptr_t)__shfl_sync(full, mine, (int)(8 * m + lane / 4));
            r[m] = p[lane % 4];
        } else {
            const auto* p0 = (const unsigned short*)(uintptr_t)__shfl_sync(full, mine, (int)(8 * m + 2 * (lane % 4)));
            const auto* p1 =
                (const unsigned short*)(uintptr_t)__shfl_sync(full, mine, (int)(8 * m + 2 * (lane % 4) + 1));
            r[m] = (unsigned)p0[lane / 4] | (unsigned)p1[lane / 4] << 16;
        }
    }
}

// cp.async.cg 16 bytes, global to shared; `src_bytes` 0 fills the destination with zeros (the
// ISA's src-size operand). The copy is made at once: a GPU may complete it any time up to the
// matching wait_group, so the emulator shows one legal order, and racecheck judges the write at
// the issue (a missing wait is not caught here; a missing __syncthreads after the wait is).
inline void cp_async_16(void* dst, const void* src, unsigned src_bytes) {
    if (src_bytes == 16)
        *(uint4*)dst = *(const uint4*)src;
    else
        *(uint4*)dst = uint4{0, 0, 0, 0};
}

}  // namespace tulu_emu
