// Kernels that test the CUDA emulator itself (tests/cuda_emu.rs): the bf16 conversions, the
// warp operations on every lane, and deliberately broken kernels the emulator must catch.
// Plain CUDA: nvcc compiles this file too.
#include <cuda_bf16.h>

// bf16 -> f32 of every pattern in `bits`, and f32 -> bf16 (round to nearest even) of `floats`.
extern "C" __global__ void bf16_conversions(const unsigned short* bits, float* as_float, int n_bits,
                                            const float* floats, unsigned short* as_bf16, int n_floats) {
    const int stride = gridDim.x * blockDim.x;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_bits; i += stride) {
        __nv_bfloat16 b;
        memcpy(&b, &bits[i], 2);
        as_float[i] = __bfloat162float(b);
    }
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_floats; i += stride) {
        const __nv_bfloat16 b = __float2bfloat16(floats[i]);
        memcpy(&as_bf16[i], &b, 2);
    }
}

// Every lane of one warp records, into out[lane * 64 + j]:
//   j = 0..4    __shfl_xor_sync(v, 1 << j)          j = 5..9    __shfl_up_sync(v, 1 << (j-5))
//   j = 10..14  __shfl_down_sync(v, 1 << (j-10))    j = 15      __shfl_sync(v, (lane * 7 + 3) % 32)
//   j = 16      __shfl_xor_sync(v, 5, width 8)      j = 17      __shfl_up_sync(v, 3, width 16)
//   j = 18      __shfl_sync(v, 37, width 16)        j = 19      __ballot_sync(v & 1)
//   j = 20      __ffs(v)                            j = 21      __ffs(0)
//   j = 22      __any_sync(lane == 5)               j = 23      __all_sync(lane < 32)
//   j = 24      u64 __shfl_xor_sync((v << 32) | lane, 16) >> 32
//   j = 25      float __shfl_down_sync(lane + 0.5, 1) * 2
//   j = 26      __ballot_sync over lanes 0..15 only (mask 0xffff; lanes 16..31 write 0)
// where v = vals[lane].
extern "C" __global__ void warp_ops(const unsigned* vals, unsigned* out) {
    const unsigned lane = threadIdx.x & 31, full = 0xffffffffu;
    const unsigned v = vals[lane];
    unsigned* o = out + lane * 64;
    for (int j = 0; j < 5; j++) o[j] = __shfl_xor_sync(full, v, 1 << j);
    for (int j = 0; j < 5; j++) o[5 + j] = __shfl_up_sync(full, v, 1u << j);
    for (int j = 0; j < 5; j++) o[10 + j] = __shfl_down_sync(full, v, 1u << j);
    o[15] = __shfl_sync(full, v, (int)((lane * 7 + 3) % 32));
    o[16] = __shfl_xor_sync(full, v, 5, 8);
    o[17] = __shfl_up_sync(full, v, 3, 16);
    o[18] = __shfl_sync(full, v, 37, 16);
    o[19] = __ballot_sync(full, v & 1);
    o[20] = (unsigned)__ffs((int)v);
    o[21] = (unsigned)__ffs(0);
    o[22] = (unsigned)__any_sync(full, lane == 5);
    o[23] = (unsigned)__all_sync(full, lane < 32);
    const unsigned long long wide = ((unsigned long long)v << 32) | lane;
    o[24] = (unsigned)(__shfl_xor_sync(full, wide, 16) >> 32);
    o[25] = (unsigned)(__shfl_down_sync(full, (float)lane + 0.5f, 1) * 2.0f);
    o[26] = lane < 16 ? __ballot_sync(0xffffu, v & 1) : 0u;
}

// out[t] = in[t - 1] (in[n - 1] for t = 0) read through shared memory. Without the barrier
// thread t may read s[t - 1] before thread t - 1 wrote it: a race that the forward schedule
// happens to hide (thread t - 1 runs first) and the reverse schedule exposes.
extern "C" __global__ void predecessor(const float* in, float* out, int with_barrier) {
    extern __shared__ float s[];
    const int t = threadIdx.x, n = blockDim.x;
    s[t] = in[blockIdx.x * n + t];
    if (with_barrier) __syncthreads();
    out[blockIdx.x * n + t] = s[(t + n - 1) % n];
}

// out[i] = in[i + 1]: reads one element past `in` (n elements).
extern "C" __global__ void read_past(const float* in, float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = in[i + 1];
}

// out[i] = value for i < n.
extern "C" __global__ void fill(float* out, int n, float value) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) out[i] = value;
}

// Lanes 0..15 wait at a shuffle for lanes 16..31, which wait at __syncthreads: a deadlock
// on a GPU, a clear error on the emulator.
extern "C" __global__ void divergent_deadlock(unsigned* out) {
    const unsigned lane = threadIdx.x & 31;
    if (lane < 16) {
        out[lane] = __shfl_xor_sync(0xffffffffu, lane, 1);
    } else {
        __syncthreads();
        out[lane] = lane;
    }
}

// Block sums through shared-memory atomics, then one global atomic per block: out[0] gets
// the sum of 0..n-1 over the grid.
extern "C" __global__ void atomic_sum(unsigned long long* out, int n) {
    __shared__ unsigned long long acc;
    if (threadIdx.x == 0) acc = 0;
    __syncthreads();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        atomicAdd(&acc, (unsigned long long)i);
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd(out, acc);
}

// ---------------------------------------------------------------------------------------------
// Planted bugs for the sanitizer (TULU_EMU_SANITIZE; tests/cuda_emu.rs), each with a switch that
// removes it.

// Attention's running-max exchange in small: lane 0 of each warp publishes a value in shared
// memory, every lane reads it, then lane 0 overwrites it. Without the second __syncwarp, lane
// 0's overwrite races with the other lanes' reads (write after read): the shuffle between them
// exchanges registers but orders no memory.
extern "C" __global__ void warp_publish(const float* in, float* out, int with_syncwarp) {
    __shared__ float m[32];
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) m[warp] = in[warp];
    __syncwarp();
    const float old = m[warp];
    const float partner = __shfl_xor_sync(0xffffffffu, old, 1);
    if (with_syncwarp) __syncwarp();
    if (lane == 0) m[warp] = old + partner;
    __syncwarp();
    out[threadIdx.x] = m[warp];
}

// out[offset .. offset + 4) = {1, 2, 3, 4} as one 16-byte store: misaligned unless offset is a
// multiple of 4 (a GPU faults; x86 may not).
extern "C" __global__ void store_vec4(float* out, int offset) {
    if (threadIdx.x == 0) *reinterpret_cast<float4*>(out + offset) = make_float4(1.f, 2.f, 3.f, 4.f);
}

// Thread t writes s[t] and reads it back: the launch must ask for blockDim.x floats of dynamic
// shared memory.
extern "C" __global__ void fill_dynamic(float* out) {
    extern __shared__ float s[];
    s[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x];
}

// Block b writes out[i], i = b * (blockDim.x - 1) + t when `overlap` (each block's last element is
// the next block's first: two blocks writing the same bytes without atomics), else
// b * blockDim.x + t. The value is the block's index, or i itself when overlap is 2 (the two
// blocks write the same value: nothing depends on their order).
extern "C" __global__ void overlapping_rows(float* out, int overlap) {
    const unsigned i = blockIdx.x * (blockDim.x - (overlap ? 1 : 0)) + threadIdx.x;
    out[i] = overlap == 2 ? (float)i : (float)blockIdx.x;
}

// 40 KiB of static shared memory plus the launch's dynamic bytes: past 48 KiB in all only after
// opting in (cuFuncSetAttribute), never past 227 KiB.
extern "C" __global__ void big_static(float* out) {
    __shared__ float big[10240];
    extern __shared__ float s[];
    big[threadIdx.x] = 1.f;
    s[threadIdx.x] = 2.f;
    __syncthreads();
    out[threadIdx.x] = big[threadIdx.x] + s[threadIdx.x];
}

// ---------------------------------------------------------------------------------------------
// Access patterns for the profiler (TULU_EMU_PROFILE; tests/cuda_emu/profiler.rs).

// Thread i reads in[i * stride] and the same thread's of the next block, in[j * stride] (which
// that block reads too: the launch's second touch of a sector is L2's, the first DRAM's), and
// writes out[i]: stride 1 is coalesced (4 sectors per warp request of 4-byte loads), stride 8 puts
// each lane in a sector of its own (32 per request).
extern "C" __global__ void strided_copy(const float* in, float* out, int stride) {
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    const float a = in[i * stride];
    const unsigned j = (i + blockDim.x) % (blockDim.x * gridDim.x);
    const float b = in[j * stride];
    out[i] = a + b;
}

// A warp reads one column of a 32 x (32 + pad) float tile in shared memory, lane l row l: with
// pad 0 every lane hits one bank (32 wavefronts per request), with pad 1 each its own (1). The
// atomicAdd at the end is one atomic per thread.
extern "C" __global__ void column_read(float* out, int pad) {
    __shared__ float tile[32 * 33];
    const unsigned lane = threadIdx.x & 31;
    for (unsigned c = 0; c < 32; c++) tile[lane * (32 + pad) + c] = (float)(lane + c);
    __syncwarp();
    const float v = tile[lane * (32 + pad)];
    atomicAdd(out, v);
}
