// The tensor-core building blocks of kernels/mma.cuh on one warp (tests/cuda_emu/mma.rs): each
// lane's fragments as ldmatrix and cp.async deliver them, and mma products. Plain CUDA: nvcc
// compiles it for sm_80 and up too.
#include "../../kernels/mma.cuh"

// One warp. a: 16×16 bf16 row-major, b: 16×16 bf16 (k × n, row-major: two 16×8 B operands, n
// 0..7 and 8..15), c: 16×16 f32. Both matrices go to shared memory through cp.async (rows padded
// to 24 elements, as kernels pad them), then every lane writes out[lane * 16 + j]:
//   j = 0..3    ldmatrix_x4 of a (matrices: rows 0-7/8-15 × cols 0-7, then × cols 8-15): A fragment
//   j = 4..7    ldmatrix_x4_trans of b (k 0-7/8-15 × n 0-7, then × n 8-15): B fragments, n-tile 0, 1
//   j = 8..15   d = c + a · b, the two n-tiles' C/D fragments (f32 bits), c read in the D layout
extern "C" __global__ void mma_fragments(const unsigned short* a, const unsigned short* b, const float* c,
                                         unsigned* out) {
    __shared__ __align__(16) unsigned short as[16 * 24], bs[16 * 24];
    const unsigned lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    // 16 rows × 2 chunks of 16 bytes per matrix: one chunk of each per lane.
    const unsigned row = lane >> 1, half = lane & 1;
    cp_async_16(as + row * 24 + half * 8, a + row * 16 + half * 8, true);
    cp_async_16(bs + row * 24 + half * 8, b + row * 16 + half * 8, true);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    unsigned fa[4], fb[4];
    ldmatrix_x4(fa, as + (lane % 16) * 24 + (lane / 16) * 8);
    ldmatrix_x4_trans(fb, bs + (lane % 16) * 24 + (lane / 16) * 8);
    unsigned* o = out + lane * 16;
    for (int i = 0; i < 4; i++) o[i] = fa[i], o[4 + i] = fb[i];
    for (int n = 0; n < 2; n++) {
        float d[4];
        for (int i = 0; i < 4; i++) d[i] = c[(g + 8 * (i >> 1)) * 16 + 8 * n + 2 * t + (i & 1)];
        mma_m16n8k16_bf16(d, fa, fb + 2 * n);
        for (int i = 0; i < 4; i++) memcpy(&o[8 + 4 * n + i], &d[i], 4);
    }
}
