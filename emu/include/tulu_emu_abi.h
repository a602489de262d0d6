// The contract between the emulated driver (emu/driver, libtulu_cuda_emu.so) and a CPU kernel
// image (a kernels/*.cu compiled by the system C++ compiler against cuda_emu.h, linked with
// emu/runtime/block.cpp). Plain C so both sides agree on the layout.
//
// An image exports:
//   tulu_emu_abi_version   == TULU_EMU_ABI
//   tulu_emu_kernels[]     every `extern "C" __global__` entry point, ended by a NULL name
//   tulu_emu_run_block()   runs one thread block to completion on the calling OS thread
#pragma once

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TULU_EMU_ABI 3

// Largest dynamic shared memory a block may ask for (an H100's opt-in limit, 227 KiB).
#define TULU_EMU_DYNAMIC_SMEM_MAX 232448

// One kernel entry point: `call` unpacks `params[i]` (a pointer to argument i's value, as in
// cuLaunchKernel) into a call of the kernel function.
typedef struct tulu_emu_kernel {
    const char* name;
    void (*call)(void** params);
    int nparams;
    const unsigned short* sizes;   // bytes of each parameter
    const unsigned short* aligns;  // alignment of each parameter
    unsigned static_smem;          // bytes of `__shared__` variables it may use (emu/image.sh)
} tulu_emu_kernel;

typedef struct tulu_emu_dim3 {
    unsigned x, y, z;
} tulu_emu_dim3;

enum tulu_emu_schedule { TULU_EMU_FORWARD = 0, TULU_EMU_REVERSE = 1, TULU_EMU_RANDOM = 2 };

// Checks an instrumented image makes (TULU_EMU_SANITIZE); a plain image ignores them.
// TULU_EMU_PROFILE counts accesses (emu/runtime/profile.cpp) and checks nothing.
enum tulu_emu_sanitize { TULU_EMU_MEMCHECK = 1, TULU_EMU_RACECHECK = 2, TULU_EMU_PROFILE = 4 };

// One run of global bytes [lo, hi) a block wrote (racecheck), and the image offset of the
// instruction that first wrote them.
typedef struct tulu_emu_write_range {
    unsigned long lo, hi, pc;
} tulu_emu_write_range;

// The driver's record of a launch's global writes: takes a block's write ranges (sorted,
// disjoint) and returns 0, or 1 with *other set to a range another block of the launch wrote
// that overlaps one of them (and *other_block to that block's linear index, *mine to ours).
typedef int (*tulu_emu_global_writes_fn)(void* launch, unsigned block, const tulu_emu_write_range* ranges,
                                         size_t n, tulu_emu_write_range* mine, tulu_emu_write_range* other,
                                         unsigned* other_block);

// The profiler's counts (TULU_EMU_PROFILE, emu/runtime/profile.cpp). A request is one warp-wide
// memory instruction: the accesses of the lanes of one warp at one static instruction, the n-th
// time each lane executes it since the last __syncthreads. `units` are 32-byte sectors (global)
// or shared-memory wavefronts (the most distinct 4-byte words any one of the 32 banks serves);
// `ideal` is the least the request's distinct bytes need (bytes / 32 for sectors, / 128 for
// wavefronts, at least 1).
enum tulu_emu_access_kind { TULU_EMU_KIND_LOAD = 0, TULU_EMU_KIND_STORE = 1, TULU_EMU_KIND_SHARED = 2, TULU_EMU_KIND_ATOMIC = 3 };
typedef struct tulu_emu_profile_counts {
    unsigned long long requests, units, ideal, bytes;
} tulu_emu_profile_counts;

// One static instruction's counts in one block (`pc`: an offset in the image).
typedef struct tulu_emu_profile_pc {
    unsigned long pc;
    int kind;  // tulu_emu_access_kind
    tulu_emu_profile_counts c;
} tulu_emu_profile_pc;

// A block's profile for the driver: counts per instruction, and the distinct 32-byte global
// sectors it read and wrote (address / 32, sorted), from which the driver counts the launch's
// DRAM traffic (each sector once per launch: its first touch).
typedef void (*tulu_emu_profile_fn)(void* launch, const tulu_emu_profile_pc* pcs, size_t npcs,
                                    const unsigned long* read, size_t nread, const unsigned long* written,
                                    size_t nwritten);

// One block to run. The driver owns the fiber stacks (one pool per OS thread).
typedef struct tulu_emu_block {
    const tulu_emu_kernel* kernel;
    void** params;
    tulu_emu_dim3 grid, block, block_idx;
    unsigned dynamic_smem;          // bytes of `extern __shared__` memory (poisoned with 0xFF)
    int schedule;                   // tulu_emu_schedule
    unsigned long long seed;        // random schedule's seed for this block
    char* stacks;                   // `stack_count` stacks of `stack_size` bytes, `stack_stride` apart
    size_t stack_size, stack_stride;
    int stack_count;
    volatile unsigned* current_thread;  // the runtime stores the running thread's linear index here
    char* error;                    // a message on failure, NUL-terminated
    size_t error_len;
    unsigned sanitize;              // tulu_emu_sanitize bits (instrumented images only)
    void* launch;                   // the driver's per-launch record, for `global_writes`
    tulu_emu_global_writes_fn global_writes;
    void* profile_launch;           // the driver's per-launch profile, for `profile`
    tulu_emu_profile_fn profile;
} tulu_emu_block;

typedef int (*tulu_emu_run_block_fn)(tulu_emu_block* block);

#ifdef __cplusplus
}
#endif
