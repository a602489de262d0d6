// Internals shared by the emulated driver, cuBLASLt and NCCL (one shared object,
// libtulu_cuda_emu.so, reached under the names libcuda.so, libcublasLt.so and libnccl.so so
// that the three share one state). See docs/cuda-emu.md for what is emulated and how.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "tulu_emu_abi.h"

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

// CUresult values used here (cudarc transmutes the raw value into its enum: only values that
// enum has may be returned).
enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_PTX = 218,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
    CUDA_ERROR_STREAM_CAPTURE_UNMATCHED = 903,
    CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD = 908,
    CUDA_ERROR_UNKNOWN = 999,
};

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

namespace emu {

/// Settings, read once from the environment (TULU_EMU_*; see docs/cuda-emu.md).
struct Config {
    int devices = 0;  // 0 unless TULU_EMU_DEVICES is set: never a GPU by accident
    size_t memory = 0;
    int sms = 132;
    int cc_major = 9, cc_minor = 0;
    int schedule = 0;  // tulu_emu_schedule
    uint64_t seed = 0;
    bool async = false;  // lazy streams: work runs only when something waits for it
    int threads = 0;     // worker threads for thread blocks and GEMMs
    bool memory_pools = true;
    unsigned sanitize = 0;  // tulu_emu_sanitize bits (TULU_EMU_SANITIZE=memcheck|racecheck|all)
    std::string sanitize_images;  // TULU_EMU_SANITIZE_IMAGES: directories of instrumented images
    bool strict_global_race = false;  // TULU_EMU_SANITIZE=strict: equal values written twice race too
    std::string profile_path;     // TULU_EMU_PROFILE: the profile's file (empty: no profiling)
    bool profile_launches = false;  // TULU_EMU_PROFILE_LAUNCHES=1: a line per launch too
    std::vector<std::string> profile_skip;  // TULU_EMU_PROFILE_SKIP: kernel name prefixes not counted
};
const Config& config();

/// Prints "tulu-cuda-emu: ..." to stderr.
__attribute__((format(printf, 1, 2))) void report(const char* fmt, ...);

struct Stream;
struct Context {
    int device;
    std::atomic<int> refs{0};
    std::atomic<int> sticky{CUDA_SUCCESS};  // a failed kernel poisons the context, as on a GPU
    std::atomic<uint64_t> launches{0};
    Stream* null_stream = nullptr;  // set once, at creation
    std::mutex mu;
    std::vector<Stream*> streams;  // every live stream, the NULL stream first
};

/// The primary context of `device` (created on first use).
Context* primary_context(int device);
/// The calling thread's current context, or null.
Context* current_context();
/// The context's sticky error, or CUDA_SUCCESS.
inline CUresult sticky(Context* c) { return c ? c->sticky.load() : CUDA_SUCCESS; }
/// Marks `c` failed with `code` (first failure wins) and reports `why`.
void poison_context(Context* c, CUresult code, const std::string& why);

// ---------------------------------------------------------------------------------------------
// Memory (memory.cpp).

struct Allocation {
    uintptr_t base;
    size_t size;
    void* map;  // the mapping, ending with a PROT_NONE guard page
    size_t map_len;
    int device;  // -1 for pinned host memory
    bool pending_poison;
};

/// Device memory: 256-byte aligned, ending at a guard page, poisoned (0xFF) before first use.
CUresult device_alloc(int device, size_t size, CUdeviceptr* out);
CUresult device_free(CUdeviceptr p);
/// Pinned host memory (cuMemHostAlloc).
CUresult host_alloc(size_t size, void** out);
CUresult host_free(void* p);
/// Whether [p, p + n) lies inside one pinned host allocation.
bool is_pinned(const void* p, size_t n);
/// The device of the allocation holding [p, p + n), or -1 when no single allocation holds it.
int device_of_range(CUdeviceptr p, size_t n);
/// The device of the allocation holding `p`, or -1.
int device_of(CUdeviceptr p);
/// Poisons the allocation holding p now if its poisoning is pending (first use).
void touch(CUdeviceptr p);
/// Bytes allocated on `device`.
size_t used_bytes(int device);
/// Frees every allocation of `device` (its context was destroyed).
void free_device_memory(int device);
/// memset for device memory: drops whole zeroed pages instead of writing them.
void device_memset(CUdeviceptr p, unsigned char value, size_t n);
/// Installs the SIGSEGV/SIGBUS handler that names the kernel (once).
void install_fault_handler();

/// What the calling OS thread is running, for fault reports (set around each block).
struct Running {
    const char* kernel = nullptr;
    unsigned block[3] = {0, 0, 0};
    volatile unsigned thread = 0;
    const char* what = nullptr;  // a driver operation (memcpy, GEMM, collective) when not a kernel
};
Running& running();
/// Gives the calling thread an alternate signal stack (fibers' stacks have no room to spare).
void ensure_signal_stack();

// ---------------------------------------------------------------------------------------------
// Streams (stream.cpp).

/// One unit of stream work. `run` executes it on whichever thread drains the stream.
struct Op {
    std::function<void()> run;
    const char* what = "";
    bool collective = false;  // NCCL: may block on peers; never run inline on the caller
};

struct Graph {
    std::vector<Op> nodes;
};

struct Stream {
    Context* ctx = nullptr;
    unsigned flags = 0;
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::pair<uint64_t, Op>> queue;
    uint64_t next_id = 1;  // id of the next op
    uint64_t completed = 0;
    uint64_t flush_to = 0;  // lazy mode: ops up to here may run
    bool busy = false;
    bool stop = false;
    std::thread executor;
    // Stream capture.
    Graph* capture = nullptr;
    int capture_mode = 0;
    bool capture_invalid = false;
    std::thread::id capture_thread;
};

/// Creates a stream of `ctx` with its executor thread.
Stream* new_stream(Context* ctx, unsigned flags);
/// Drains and destroys it.
void destroy_stream(Stream* s);
/// The stream a CUstream handle names (NULL: the current context's NULL stream).
Stream* resolve_stream(void* handle);
/// Queues (or, during capture, records) `op`; returns the op's id (0 when captured).
/// Synchronous mode: returns after the op ran, unless it is a collective.
CUresult submit(Stream* s, Op op, uint64_t* id = nullptr);
/// Runs (lazy mode) and waits for every op up to `id`.
void wait_for(Stream* s, uint64_t id);
/// Waits for everything queued on `s`.
void drain(Stream* s);
/// Waits for every stream of `ctx`.
void drain_context(Context* ctx);
/// Whether `s` is capturing; ops on it are recorded, not run.
bool capturing(Stream* s);
/// Invalidates a capture that met an operation CUDA refuses during capture.
CUresult refuse_in_capture(Stream* s, const char* what);

// ---------------------------------------------------------------------------------------------
// Launch resources (resources.cpp): what ptxas reported for a kernel (build.rs).

struct KernelResources {
    unsigned registers = 0, static_smem = 0, spill_stores = 0, spill_loads = 0;
    unsigned max_threads = 0, min_blocks = 0;  // __launch_bounds__ (0: none)
};
/// The kernel's figures for the emulated architecture, or null when TULU_EMU_RESOURCES has none.
const KernelResources* kernel_resources(const char* kernel);
/// The most threads a block of the kernel may have: its launch bounds, and its registers
/// (allocated per warp in units of 256, 65,536 per block).
unsigned max_threads_for(const KernelResources& r);

// ---------------------------------------------------------------------------------------------
// The profiler (profile.cpp; TULU_EMU_PROFILE).

struct LaunchProfile;
/// A launch's profile, or null when not profiling it.
LaunchProfile* profile_begin(const char* kernel);
/// A block's counts (tulu_emu_profile_fn, called from the image at the block's end).
void profile_block(void* launch, const tulu_emu_profile_pc* pcs, size_t npcs, const unsigned long* read,
                   size_t nread, const unsigned long* written, size_t nwritten);
/// The launch ended: its totals, line and prediction (takes ownership of `p`; null: nothing).
void profile_end(LaunchProfile* p, const tulu_emu_kernel* k, uint64_t seq, tulu_emu_dim3 grid, tulu_emu_dim3 block);
/// A cuBLASLt call ended: its line and totals under the kernel name `name`, with the bytes its
/// operands span (read: A, B and C; written: D) and its FLOPs; `mnk` goes in the line's grid
/// column. Nothing when not profiling.
void profile_library_call(const char* name, uint64_t m, uint64_t n, uint64_t k, unsigned long long read_bytes,
                          unsigned long long written_bytes, double flops);
/// The tulu_emu_sanitize bits a launch of `kernel` runs with (without TULU_EMU_PROFILE for the
/// kernels TULU_EMU_PROFILE_SKIP names).
unsigned launch_checks(const char* kernel);
/// Set while this thread runs a node of a replayed graph (the launch cost the prediction adds).
bool& in_graph_replay();

// ---------------------------------------------------------------------------------------------
// Worker pool (pool.cpp): thread blocks and GEMM tiles run here, the caller taking part.

/// Calls f(i) for i in [0, n) on the pool and the calling thread; returns when all are done.
void parallel_for(size_t n, const std::function<void(size_t)>& f);

}  // namespace emu
