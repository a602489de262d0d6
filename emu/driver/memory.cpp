// Device and pinned host memory, copies and memsets, and the fault handler.
//
// Device memory is host memory: each allocation is its own mapping, 256-byte aligned, with a
// PROT_NONE guard page right after its last 256-byte granule and one before it, so a kernel
// that reads or writes past its buffer faults and the handler names the kernel, the block, the
// thread and the allocation. A fresh allocation is filled with 0xFF bytes (NaN in bf16, f16 and
// f32) before its first use, unless its first use sets it whole (cuMemsetD8 of zero only drops
// the pages, so a multi-GB KV cache costs nothing until written).
#include <dlfcn.h>
#include <signal.h>
#include <ucontext.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <map>

#include "emu.h"

namespace emu {

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kAlign = 256;

// Never destroyed: stream executors may still free memory while the process exits.
std::mutex& mem_mu = *new std::mutex;
std::map<uintptr_t, Allocation>& device_allocs = *new std::map<uintptr_t, Allocation>;  // by base
std::map<uintptr_t, Allocation>& host_allocs = *new std::map<uintptr_t, Allocation>;
size_t used[64];
// Mappings of freed allocations, by length, reused by later allocations of the same length:
// the forward pass frees and allocates the same activation sizes every step, and an mmap,
// two mprotects and a munmap per op would dominate small steps. Bounded in total.
std::multimap<size_t, void*>& free_maps = *new std::multimap<size_t, void*>;
size_t free_bytes = 0;
constexpr size_t kFreeCap = 256 << 20;

size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// The allocation holding p in `m` (caller holds mem_mu), or null.
Allocation* find(std::map<uintptr_t, Allocation>& m, uintptr_t p) {
    auto it = m.upper_bound(p);
    if (it == m.begin()) return nullptr;
    --it;
    Allocation& a = it->second;
    return p >= a.base && p < a.base + std::max<size_t>(a.size, 1) ? &a : nullptr;
}

void poison(Allocation& a) {
    if (!a.pending_poison) return;
    a.pending_poison = false;
    // The whole last granule too: reads between the end and the guard page see NaN.
    memset((void*)a.base, 0xff, round_up(a.size, kAlign));
}

struct sigaction old_segv, old_bus;
thread_local Running running_now;

void fault_handler(int sig, siginfo_t* info, void* uctx) {
    const uintptr_t addr = (uintptr_t)info->si_addr;
    Running& r = running_now;
    char msg[1024];
    int len = 0;
    // The allocation whose guard page was hit, if the table can be read without waiting.
    bool found = false;
    if (mem_mu.try_lock()) {
        for (auto& kv : device_allocs) {
            const Allocation& a = kv.second;
            const uintptr_t map = (uintptr_t)a.map, end = map + a.map_len;
            if (addr >= map && addr < end) {
                const long off = (long)(addr - a.base);
                len = snprintf(msg, sizeof msg, "access %ld bytes %s a %zu-byte allocation of cuda:%d at 0x%lx (fault at 0x%lx)",
                               off < 0 ? -off : off - (long)a.size,
                               off < 0 ? "before the start of" : "past the end of", a.size, a.device,
                               (unsigned long)a.base, (unsigned long)addr);
                found = true;
                break;
            }
        }
        mem_mu.unlock();
    }
    if (!found) len = snprintf(msg, sizeof msg, "illegal address 0x%lx", (unsigned long)addr);
    // Where: the faulting instruction's symbol and its offset in the image, for addr2line.
#if defined(__x86_64__)
    const uintptr_t pc = (uintptr_t)((ucontext_t*)uctx)->uc_mcontext.gregs[REG_RIP];
#elif defined(__aarch64__)
    const uintptr_t pc = (uintptr_t)((ucontext_t*)uctx)->uc_mcontext.pc;
#endif
    Dl_info di{};
    if (len < (int)sizeof msg && dladdr((void*)pc, &di) && di.dli_fbase) {
        const char* image = "";
        if (void* h = dlopen(di.dli_fname, RTLD_NOLOAD | RTLD_LAZY)) {
            if (auto n = (const char*)dlsym(h, "tulu_emu_image_name")) image = n;
            dlclose(h);
        }
        len += snprintf(msg + len, sizeof msg - (size_t)len, "; at %s+0x%lx (%s%s offset 0x%lx)",
                        di.dli_sname ? di.dli_sname : "?", (unsigned long)(pc - (uintptr_t)di.dli_saddr),
                        *image ? image : di.dli_fname, *image ? ".so" : "", (unsigned long)(pc - (uintptr_t)di.dli_fbase));
    }
    if (r.kernel) {
        fprintf(stderr,
                "tulu-cuda-emu: kernel `%s` block (%u,%u,%u) thread %u: %s — on a GPU this is "
                "CUDA_ERROR_ILLEGAL_ADDRESS (%s)\n",
                r.kernel, r.block[0], r.block[1], r.block[2], r.thread, msg, sig == SIGBUS ? "SIGBUS" : "SIGSEGV");
    } else if (r.what) {
        fprintf(stderr, "tulu-cuda-emu: %s: %s\n", r.what, msg);
    } else if (!found) {
        // Not ours: hand it to whoever handled it before (Rust's stack-overflow check, or the
        // default action).
        struct sigaction& old = sig == SIGBUS ? old_bus : old_segv;
        if (old.sa_flags & SA_SIGINFO && old.sa_sigaction) {
            old.sa_sigaction(sig, info, uctx);
            return;
        }
        sigaction(sig, &old, nullptr);
        return;
    } else {
        fprintf(stderr, "tulu-cuda-emu: host code touched device memory: %s\n", msg);
    }
    (void)len;
    fflush(stderr);
    // Die of the signal: returning re-executes the access under the default action.
    signal(sig, SIG_DFL);
}

}  // namespace

Running& running() { return running_now; }

void ensure_signal_stack() {
    static thread_local bool done = false;
    if (done) return;
    done = true;
    stack_t cur;
    if (sigaltstack(nullptr, &cur) == 0 && !(cur.ss_flags & SS_DISABLE) && cur.ss_size >= 32768) return;
    const size_t size = 65536;
    void* mem = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return;
    stack_t ss{};
    ss.ss_sp = mem;
    ss.ss_size = size;
    sigaltstack(&ss, nullptr);
}

void install_fault_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa {};
        sa.sa_sigaction = fault_handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &old_segv);
        sigaction(SIGBUS, &sa, &old_bus);
    });
}

CUresult device_alloc(int device, size_t size, CUdeviceptr* out) {
    if (size == 0 || !out) return CUDA_ERROR_INVALID_VALUE;
    const size_t granules = round_up(size, kAlign);
    const size_t data = round_up(granules, kPage);
    {
        std::lock_guard<std::mutex> g(mem_mu);
        if (used[device] + granules > config().memory) return CUDA_ERROR_OUT_OF_MEMORY;
        used[device] += granules;
    }
    const size_t map_len = data + 2 * kPage;
    void* map = nullptr;
    {
        std::lock_guard<std::mutex> g(mem_mu);
        auto it = free_maps.find(map_len);
        if (it != free_maps.end()) {
            map = it->second;
            free_bytes -= map_len;
            free_maps.erase(it);
        }
    }
    if (!map) {
        map = mmap(nullptr, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (map == MAP_FAILED) {
            std::lock_guard<std::mutex> g(mem_mu);
            used[device] -= granules;
            return CUDA_ERROR_OUT_OF_MEMORY;
        }
        mprotect(map, kPage, PROT_NONE);
        mprotect((char*)map + kPage + data, kPage, PROT_NONE);
    }
    char* guard = (char*)map + kPage + data;
    Allocation a{(uintptr_t)(guard - granules), size, map, map_len, device, true};
    std::lock_guard<std::mutex> g(mem_mu);
    device_allocs[a.base] = a;
    *out = a.base;
    return CUDA_SUCCESS;
}

CUresult device_free(CUdeviceptr p) {
    Allocation a;
    {
        std::lock_guard<std::mutex> g(mem_mu);
        auto it = device_allocs.find((uintptr_t)p);
        if (it == device_allocs.end()) return CUDA_ERROR_INVALID_VALUE;
        a = it->second;
        device_allocs.erase(it);
        used[a.device] -= round_up(a.size, kAlign);
        if (free_bytes + a.map_len <= kFreeCap) {
            free_maps.emplace(a.map_len, a.map);
            free_bytes += a.map_len;
            return CUDA_SUCCESS;
        }
    }
    munmap(a.map, a.map_len);
    return CUDA_SUCCESS;
}

void free_device_memory(int device) {
    std::vector<Allocation> gone;
    {
        std::lock_guard<std::mutex> g(mem_mu);
        for (auto it = device_allocs.begin(); it != device_allocs.end();) {
            if (it->second.device == device) {
                gone.push_back(it->second);
                it = device_allocs.erase(it);
            } else {
                ++it;
            }
        }
        used[device] = 0;
    }
    for (auto& a : gone) munmap(a.map, a.map_len);
}

CUresult host_alloc(size_t size, void** out) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    const size_t len = round_up(std::max<size_t>(size, 1), kPage);
    void* map = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    std::lock_guard<std::mutex> g(mem_mu);
    host_allocs[(uintptr_t)map] = Allocation{(uintptr_t)map, size, map, len, -1, false};
    *out = map;
    return CUDA_SUCCESS;
}

CUresult host_free(void* p) {
    Allocation a;
    {
        std::lock_guard<std::mutex> g(mem_mu);
        auto it = host_allocs.find((uintptr_t)p);
        if (it == host_allocs.end()) return CUDA_ERROR_INVALID_VALUE;
        a = it->second;
        host_allocs.erase(it);
    }
    munmap(a.map, a.map_len);
    return CUDA_SUCCESS;
}

bool is_pinned(const void* p, size_t n) {
    std::lock_guard<std::mutex> g(mem_mu);
    Allocation* a = find(host_allocs, (uintptr_t)p);
    return a && (uintptr_t)p + n <= a->base + a->size;
}

int device_of_range(CUdeviceptr p, size_t n) {
    std::lock_guard<std::mutex> g(mem_mu);
    Allocation* a = find(device_allocs, (uintptr_t)p);
    if (!a || (uintptr_t)p + n > a->base + a->size) return -1;
    return a->device;
}

int device_of(CUdeviceptr p) {
    std::lock_guard<std::mutex> g(mem_mu);
    Allocation* a = find(device_allocs, (uintptr_t)p);
    return a ? a->device : -1;
}

void touch(CUdeviceptr p) {
    std::lock_guard<std::mutex> g(mem_mu);
    if (Allocation* a = find(device_allocs, (uintptr_t)p)) poison(*a);
}

size_t used_bytes(int device) {
    std::lock_guard<std::mutex> g(mem_mu);
    return used[device];
}

void device_memset(CUdeviceptr p, unsigned char value, size_t n) {
    if (n == 0) return;
    {
        std::lock_guard<std::mutex> g(mem_mu);
        if (Allocation* a = find(device_allocs, (uintptr_t)p)) {
            if ((uintptr_t)p == a->base && n >= a->size) {
                // Set whole: poisoning it first would be wasted work; and poisoning it whole is
                // what a fresh allocation already has pending.
                if (value == 0xff) {
                    a->pending_poison = true;
                    return;
                }
                a->pending_poison = false;
            } else {
                poison(*a);
            }
        }
    }
    char* d = (char*)p;
    if (value == 0 && n >= 4 * kPage) {
        // Whole pages become fresh zero pages; only the ragged ends are written.
        char* first = (char*)round_up((uintptr_t)d, kPage);
        char* last = (char*)(((uintptr_t)(d + n)) & ~(uintptr_t)(kPage - 1));
        memset(d, 0, (size_t)(first - d));
        madvise(first, (size_t)(last - first), MADV_DONTNEED);
        memset(last, 0, (size_t)(d + n - last));
        return;
    }
    memset(d, value, n);
}

}  // namespace emu

// ---------------------------------------------------------------------------------------------
// Entry points.

using namespace emu;

namespace {

Context* need_context() { return current_context(); }

// Checks that [p, p + n) is device memory; reports the caller's mistake.
bool device_range(CUdeviceptr p, size_t n, const char* what) {
    if (n == 0) return true;
    if (device_of_range(p, n) < 0) {
        report("%s: [0x%llx, +%zu) is not inside one device allocation", what, p, n);
        return false;
    }
    return true;
}

struct Copy2D {
    size_t srcXInBytes, srcY;
    int srcMemoryType;
    const void* srcHost;
    CUdeviceptr srcDevice;
    void* srcArray;
    size_t srcPitch;
    size_t dstXInBytes, dstY;
    int dstMemoryType;
    void* dstHost;
    CUdeviceptr dstDevice;
    void* dstArray;
    size_t dstPitch;
    size_t WidthInBytes, Height;
};

}  // namespace

EMU_EXPORT CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    Context* c = need_context();
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    const size_t u = used_bytes(c->device), t = config().memory;
    if (free_bytes) *free_bytes = u < t ? t - u : 0;
    if (total) *total = t;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t size) {
    Context* c = need_context();
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    if (CUresult e = sticky(c)) return e;
    return device_alloc(c->device, size, p);
}

EMU_EXPORT CUresult cuMemAllocAsync(CUdeviceptr* p, size_t size, void* stream) {
    Stream* s = resolve_stream(stream);
    if (!s) return CUDA_ERROR_INVALID_CONTEXT;
    if (CUresult e = sticky(s->ctx)) return e;
    if (capturing(s)) return refuse_in_capture(s, "cuMemAllocAsync (the emulator does not model graph-owned memory)");
    return device_alloc(s->ctx->device, size, p);
}

EMU_EXPORT CUresult cuMemFree_v2(CUdeviceptr p) {
    if (p == 0) return CUDA_SUCCESS;
    // Synchronous free: like CUDA, wait for the device before the memory goes.
    const int dev = device_of(p);
    if (dev < 0) return CUDA_ERROR_INVALID_VALUE;
    drain_context(primary_context(dev));
    return device_free(p);
}

EMU_EXPORT CUresult cuMemFreeAsync(CUdeviceptr p, void* stream) {
    if (p == 0) return CUDA_SUCCESS;
    Stream* s = resolve_stream(stream);
    if (!s) return CUDA_ERROR_INVALID_CONTEXT;
    if (device_of(p) < 0) return CUDA_ERROR_INVALID_VALUE;
    if (capturing(s)) return refuse_in_capture(s, "cuMemFreeAsync (the emulator does not model graph-owned memory)");
    Op op;
    op.what = "cuMemFreeAsync";
    op.run = [p] { device_free(p); };
    return submit(s, std::move(op));
}

EMU_EXPORT CUresult cuMemHostAlloc(void** p, size_t size, unsigned) { return host_alloc(size, p); }
EMU_EXPORT CUresult cuMemAllocHost_v2(void** p, size_t size) { return host_alloc(size, p); }
EMU_EXPORT CUresult cuMemFreeHost(void* p) { return host_free(p); }

EMU_EXPORT CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char value, size_t n, void* stream) {
    Stream* s = resolve_stream(stream);
    if (!s) return CUDA_ERROR_INVALID_CONTEXT;
    if (!device_range(p, n, "cuMemsetD8Async")) return CUDA_ERROR_INVALID_VALUE;
    Op op;
    op.what = "cuMemsetD8Async";
    op.run = [p, value, n] { device_memset(p, value, n); };
    return submit(s, std::move(op));
}

EMU_EXPORT CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char value, size_t n) {
    CUresult e = cuMemsetD8Async(p, value, n, nullptr);
    if (e) return e;
    drain(resolve_stream(nullptr));
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuMemsetD32Async(CUdeviceptr p, unsigned value, size_t n, void* stream) {
    Stream* s = resolve_stream(stream);
    if (!s) return CUDA_ERROR_INVALID_CONTEXT;
    if (!device_range(p, n * 4, "cuMemsetD32Async")) return CUDA_ERROR_INVALID_VALUE;
    Op op;
    op.what = "cuMemsetD32Async";
    op.run = [p, value, n] {
        touch(p);
        unsigned* d = (unsigned*)p;
        for (size_t i = 0; i < n; i++) d[i] = value;
    };
    return submit(s, std::move(op));
}

EMU_EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* stream) {
    Stream* s = resolve_stream(stream);
    if (!s) return CUDA_ERROR_INVALID_CONTEXT;
    if (!device_range(dst, n, "cuMemcpyHtoDAsync")) return CUDA_ERROR_INVALID_VALUE;
    if (n == 0) return CUDA_SUCCESS;
    Op op;
    op.what = "cuMemcpyHtoDAsync";
    if (is_pinned(src, n)) {
        // Pinned: the copy reads the host buffer when it runs, as DMA does.
        op.run = [dst, src, n] {
            touch(dst);
            memcpy((void*)dst, src, n);
        };
    } else {
        // Pageable: CUDA stages the bytes before returning, so the caller may reuse them.
        if (capturing(s)) return refuse_in_capture(s, "cuMemcpyHtoDAsync from pageable host memory");
        auto staged = std::make_shared<std::vector<char>>((const char*)src, (const char*)src + n);
        op.run = [dst, staged] {
            touch(dst);
            memcpy((void*)dst, staged->data(), staged->size());
        };
    }
    return submit(s, std::move(op));
}

EMU_EXPORT CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* stream) {
    Stream* s = resolve_stream(stream);
    if (!s) return CUDA_ERROR_INVALID_CONTEXT;
    if (!device_range(src, n, "cuMemcpyDtoHAsync")) return CUDA_ERROR_INVALID_VALUE;
    if (n == 0) return CUDA_SUCCESS;
    if (is_pinned(dst, n)) {
        Op op;
        op.what = "cuMemcpyDtoHAsync";
        op.run = [dst, src, n] {
            touch(src);
            memcpy(dst, (const void*)src, n);
        };
        return submit(s, std::move(op));
    }
    // Pageable: CUDA returns only once the copy is done, i.e. after the stream's earlier work.
    if (capturing(s)) return refuse_in_capture(s, "cuMemcpyDtoHAsync to pageable host memory");
    drain(s);
    touch(src);
    memcpy(dst, (const void*)src, n);
    return sticky(s->ctx);
}

EMU_EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* stream) {
    Stream* s = resolve_stream(stream);
    if (!s) return CUDA_ERROR_INVALID_CONTEXT;
    if (!device_range(dst, n, "cuMemcpyDtoDAsync (destination)") ||
        !device_range(src, n, "cuMemcpyDtoDAsync (source)"))
        return CUDA_ERROR_INVALID_VALUE;
    if (n == 0) return CUDA_SUCCESS;
    Op op;
    op.what = "cuMemcpyDtoDAsync";
    op.run = [dst, src, n] {
        touch(src);
        touch(dst);
        memmove((void*)dst, (const void*)src, n);
    };
    return submit(s, std::move(op));
}

EMU_EXPORT CUresult cuMemcpyPeerAsync(CUdeviceptr dst, void*, CUdeviceptr src, void*, size_t n, void* stream) {
    return cuMemcpyDtoDAsync_v2(dst, src, n, stream);
}

EMU_EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    CUresult e = cuMemcpyHtoDAsync_v2(dst, src, n, nullptr);
    if (e) return e;
    drain(resolve_stream(nullptr));
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    Stream* s = resolve_stream(nullptr);
    if (!s) return CUDA_ERROR_INVALID_CONTEXT;
    drain_context(s->ctx);
    return cuMemcpyDtoHAsync_v2(dst, src, n, nullptr);
}

EMU_EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    CUresult e = cuMemcpyDtoDAsync_v2(dst, src, n, nullptr);
    if (e) return e;
    drain(resolve_stream(nullptr));
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuMemcpy2DAsync_v2(const Copy2D* c, void* stream) {
    Stream* s = resolve_stream(stream);
    if (!s) return CUDA_ERROR_INVALID_CONTEXT;
    if (!c) return CUDA_ERROR_INVALID_VALUE;
    const int host = 1, device = 2;
    if ((c->srcMemoryType != host && c->srcMemoryType != device) ||
        (c->dstMemoryType != host && c->dstMemoryType != device)) {
        report("cuMemcpy2DAsync: only host and device memory are emulated (memory types %d -> %d)", c->srcMemoryType,
               c->dstMemoryType);
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if (c->Height == 0 || c->WidthInBytes == 0) return CUDA_SUCCESS;
    if (c->srcPitch < c->WidthInBytes || c->dstPitch < c->WidthInBytes) return CUDA_ERROR_INVALID_VALUE;
    const char* src = c->srcMemoryType == device ? (const char*)c->srcDevice : (const char*)c->srcHost;
    char* dst = c->dstMemoryType == device ? (char*)c->dstDevice : (char*)c->dstHost;
    src += c->srcY * c->srcPitch + c->srcXInBytes;
    dst += c->dstY * c->dstPitch + c->dstXInBytes;
    const size_t src_span = (c->Height - 1) * c->srcPitch + c->WidthInBytes;
    const size_t dst_span = (c->Height - 1) * c->dstPitch + c->WidthInBytes;
    if (c->srcMemoryType == device && !device_range((CUdeviceptr)src, src_span, "cuMemcpy2DAsync (source)"))
        return CUDA_ERROR_INVALID_VALUE;
    if (c->dstMemoryType == device && !device_range((CUdeviceptr)dst, dst_span, "cuMemcpy2DAsync (destination)"))
        return CUDA_ERROR_INVALID_VALUE;
    if ((c->srcMemoryType == host && !is_pinned(src, src_span)) ||
        (c->dstMemoryType == host && !is_pinned(dst, dst_span))) {
        report("cuMemcpy2DAsync: pageable host memory is not emulated here; use pinned memory");
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    const size_t w = c->WidthInBytes, h = c->Height, sp = c->srcPitch, dp = c->dstPitch;
    const bool src_dev = c->srcMemoryType == device, dst_dev = c->dstMemoryType == device;
    Op op;
    op.what = "cuMemcpy2DAsync";
    op.run = [=] {
        if (src_dev) touch((CUdeviceptr)src);
        if (dst_dev) touch((CUdeviceptr)dst);
        for (size_t r = 0; r < h; r++) memmove(dst + r * dp, src + r * sp, w);
    };
    return submit(s, std::move(op));
}
