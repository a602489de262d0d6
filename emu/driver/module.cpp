// Modules and launches: cuModuleLoadData takes a CPU kernel image (an ELF shared object for this
// machine, built from kernels/*.cu by scripts/cuda-emu) and refuses real GPU code (cubin,
// fatbin, PTX) with CUDA_ERROR_INVALID_IMAGE; cuLaunchKernel copies the parameters (as CUDA
// does at launch time, so a captured graph keeps the values of its capture) and, when the op
// runs, spreads the grid's blocks over the worker pool, each block's threads being fibers
// (emu/runtime/block.cpp).
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <map>

#include "emu.h"
#include "tulu_emu_abi.h"

namespace {

using namespace emu;

struct Image {
    void* handle;
    const tulu_emu_kernel* kernels;
    tulu_emu_run_block_fn run_block;
};

struct Module {
    Image* image;
    Context* ctx;
};

// Shared memory a block may have without opting in, and with (an H100's figures).
constexpr int kSmemDefault = 48 * 1024;
constexpr int kSmemOptIn = TULU_EMU_DYNAMIC_SMEM_MAX;

struct Function {
    Module* module;
    const tulu_emu_kernel* kernel;
    // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: what is left of 48 KiB after the static
    // `__shared__` bytes, until raised (up to what is left of 227 KiB).
    int max_dynamic_smem;
    // nvcc's figures for the kernel (build.rs), when TULU_EMU_RESOURCES has them.
    const KernelResources* res;
    // Static `__shared__` bytes: ptxas's count when known, else emu/image.sh's upper bound.
    unsigned static_smem;
};

constexpr size_t kStackSize = 128 * 1024;
constexpr size_t kStackStride = kStackSize;
constexpr int kMaxThreads = 1024;
constexpr uint64_t kCanary = 0x7475'6c75'2d65'6d75ull;  // "tulu-emu"
constexpr int kCanaryWords = 8;

// This OS thread's fiber stacks (reused by every block it runs): one mapping, so that threads
// do not use up the process's mappings (a guard page per stack would be 2048 per thread). The
// lowest words of each stack hold a canary, checked after every block instead.
char* thread_stacks() {
    static thread_local char* stacks = nullptr;
    if (!stacks) {
        void* m = mmap(nullptr, kStackStride * kMaxThreads + 4096, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) return nullptr;
        mprotect(m, 4096, PROT_NONE);  // below the lowest stack
        stacks = (char*)m + 4096;
        for (int i = 0; i < kMaxThreads; i++)
            for (int w = 0; w < kCanaryWords; w++) ((uint64_t*)(stacks + i * kStackStride))[w] = kCanary;
    }
    return stacks;
}

// The first of the block's `n` fibers whose stack overflowed into the canary, or -1.
int overflowed_stack(const char* stacks, unsigned n) {
    for (unsigned i = 0; i < n; i++)
        for (int w = 0; w < kCanaryWords; w++)
            if (((const uint64_t*)(stacks + i * kStackStride))[w] != kCanary) return (int)i;
    return -1;
}

std::mutex& images_mu = *new std::mutex;
std::map<std::string, Image*>& images = *new std::map<std::string, Image*>;  // by content, never unloaded

// The byte length of an ELF image: where its section header table ends (GNU ld puts it last).
size_t elf_size(const unsigned char* p) {
    uint64_t shoff;
    uint16_t shentsize, shnum;
    memcpy(&shoff, p + 0x28, 8);
    memcpy(&shentsize, p + 0x3a, 2);
    memcpy(&shnum, p + 0x3c, 2);
    return shoff + (uint64_t)shentsize * shnum;
}

// TULU_EMU_SANITIZE: the instrumented image of the same kernel file (emu/image.sh `sanitize`),
// NAME.so in one of TULU_EMU_SANITIZE_IMAGES' directories, runs in place of the plain one. It is
// loaded from its own path, which addr2line reads for the reports' file:line.
CUresult load_instrumented(const std::string& name, Image* image) {
    const std::string& dirs = config().sanitize_images;
    for (size_t at = 0; at <= dirs.size();) {
        size_t end = dirs.find(':', at);
        if (end == std::string::npos) end = dirs.size();
        const std::string path = dirs.substr(at, end - at) + "/" + name + ".so";
        at = end + 1;
        if (access(path.c_str(), R_OK) != 0) continue;
        void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        const int* abi = h ? (const int*)dlsym(h, "tulu_emu_abi_version") : nullptr;
        auto kernels = h ? (const tulu_emu_kernel*)dlsym(h, "tulu_emu_kernels") : nullptr;
        auto run = h ? (tulu_emu_run_block_fn)dlsym(h, "tulu_emu_run_block") : nullptr;
        if (!abi || *abi != TULU_EMU_ABI || !kernels || !run) {
            report("cuModuleLoadData: %s is not an instrumented image of ABI %d (%s)", path.c_str(), TULU_EMU_ABI,
                   h ? "rebuild with scripts/cuda-emu" : dlerror());
            return CUDA_ERROR_INVALID_IMAGE;
        }
        image->kernels = kernels;
        image->run_block = run;
        return CUDA_SUCCESS;
    }
    report("cuModuleLoadData: TULU_EMU_SANITIZE is set but no instrumented image %s.so is in "
           "TULU_EMU_SANITIZE_IMAGES=%s (scripts/cuda-emu builds and sets them)",
           name.c_str(), dirs.c_str());
    return CUDA_ERROR_INVALID_IMAGE;
}

CUresult load_image(const void* data, Image** out) {
    const unsigned char* p = (const unsigned char*)data;
    uint32_t magic;
    memcpy(&magic, p, 4);
    if (magic == 0xba55ed50u) {
        report("cuModuleLoadData: a real fatbin (nvcc output) cannot run on the emulator; "
               "point TULU_KERNELS at CPU images (scripts/cuda-emu builds them)");
        return CUDA_ERROR_INVALID_IMAGE;
    }
    if (memcmp(p, "\x7f" "ELF", 4) != 0) {
        report("cuModuleLoadData: not a CPU kernel image (PTX or an unknown format); "
               "point TULU_KERNELS at CPU images (scripts/cuda-emu builds them)");
        return CUDA_ERROR_INVALID_IMAGE;
    }
    uint16_t machine;
    memcpy(&machine, p + 0x12, 2);
#if defined(__x86_64__)
    const uint16_t host_machine = 62;
#else
    const uint16_t host_machine = 183;
#endif
    if (machine != host_machine || p[4] != 2 /* ELFCLASS64 */) {
        report("cuModuleLoadData: an ELF image for machine %u (%s), not this CPU; real GPU code cannot run on "
               "the emulator",
               machine, machine == 190 ? "a CUDA cubin" : "another architecture");
        return CUDA_ERROR_INVALID_IMAGE;
    }
    const size_t size = elf_size(p);
    std::string key((const char*)p, size);
    std::lock_guard<std::mutex> g(images_mu);
    auto it = images.find(key);
    if (it != images.end()) {
        *out = it->second;
        return CUDA_SUCCESS;
    }
    // Written to a file of its own (a unique path: glibc's dlopen matches loaded objects by
    // path) and unlinked once loaded, unless TULU_EMU_KEEP_IMAGES=1 keeps it for perf or gdb.
    static std::atomic<int> counter{0};
    const char* tmp = getenv("TMPDIR");
    char path[512];
    snprintf(path, sizeof path, "%s/tulu-emu-%d-%d.so", tmp && *tmp ? tmp : "/tmp", (int)getpid(), counter++);
    FILE* f = fopen(path, "wb");
    if (!f || fwrite(p, 1, size, f) != size) {
        if (f) fclose(f);
        report("cuModuleLoadData: cannot write the CPU image to %s", path);
        return CUDA_ERROR_UNKNOWN;
    }
    fclose(f);
    void* handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    const char* keep = getenv("TULU_EMU_KEEP_IMAGES");
    if (!keep || strcmp(keep, "1") != 0) unlink(path);
    if (!handle) {
        report("cuModuleLoadData: the CPU image does not load: %s", dlerror());
        return CUDA_ERROR_INVALID_IMAGE;
    }
    const int* abi = (const int*)dlsym(handle, "tulu_emu_abi_version");
    auto kernels = (const tulu_emu_kernel*)dlsym(handle, "tulu_emu_kernels");
    auto run = (tulu_emu_run_block_fn)dlsym(handle, "tulu_emu_run_block");
    if (!abi || *abi != TULU_EMU_ABI || !kernels || !run) {
        report("cuModuleLoadData: the shared object is not a tulu CPU kernel image of ABI %d (rebuild with "
               "scripts/cuda-emu build)",
               TULU_EMU_ABI);
        dlclose(handle);
        return CUDA_ERROR_INVALID_IMAGE;
    }
    Image* image = new Image{handle, kernels, run};
    if (config().sanitize) {
        const char* name = (const char*)dlsym(handle, "tulu_emu_image_name");
        if (CUresult e = load_instrumented(name ? name : "?", image)) return e;
    }
    images.emplace(std::move(key), image);
    *out = image;
    return CUDA_SUCCESS;
}

struct Launch {
    Function* f;
    Context* ctx;
    tulu_emu_dim3 grid, block;
    unsigned smem;
    std::vector<unsigned char> params;  // each parameter's value, at its offset
    std::vector<size_t> offsets;
};

// Racecheck between blocks: the global bytes each block of one launch wrote (emu/runtime/sanitize.cpp
// hands them over at the block's end), by start address, with the values the block left there.
// Two blocks writing the same bytes is a race; when the second leaves the values the first
// left, nothing depends on the order (the decode warm-up's dummy rows all write one KV slot
// with one value), and it is not reported.
struct LaunchWrites {
    struct Range {
        unsigned long hi, pc;
        unsigned block;
        std::vector<unsigned char> bytes;  // [lo, hi) as the block left it
    };
    std::mutex mu;
    std::map<unsigned long, Range> written;
};

int record_writes(void* launch, unsigned block, const tulu_emu_write_range* r, size_t n, tulu_emu_write_range* mine,
                  tulu_emu_write_range* other, unsigned* other_block) {
    LaunchWrites* w = (LaunchWrites*)launch;
    std::lock_guard<std::mutex> g(w->mu);
    for (size_t i = 0; i < n; i++) {
        auto it = w->written.upper_bound(r[i].lo);
        if (it != w->written.begin()) --it;
        for (; it != w->written.end() && it->first < r[i].hi; ++it) {
            const LaunchWrites::Range& o = it->second;
            if (o.hi <= r[i].lo || o.block == block) continue;
            const unsigned long lo = std::max(r[i].lo, it->first), hi = std::min(r[i].hi, o.hi);
            if (!config().strict_global_race && !memcmp(o.bytes.data() + (lo - it->first), (const void*)lo, hi - lo))
                continue;  // same values
            *mine = r[i];
            *other = tulu_emu_write_range{it->first, o.hi, o.pc};
            *other_block = o.block;
            return 1;
        }
    }
    for (size_t i = 0; i < n; i++) {
        const unsigned char* p = (const unsigned char*)r[i].lo;
        w->written.emplace(r[i].lo, LaunchWrites::Range{r[i].hi, r[i].pc, block, {p, p + (r[i].hi - r[i].lo)}});
    }
    return 0;
}

void run_launch(const Launch& L) {
    const tulu_emu_kernel* k = L.f->kernel;
    if (sticky(L.ctx)) return;  // a failed context runs nothing more
    std::vector<void*> ptrs(L.offsets.size());
    for (size_t i = 0; i < ptrs.size(); i++) ptrs[i] = (void*)(L.params.data() + L.offsets[i]);
    // Pointer parameters: poison fresh buffers before first use, and refuse another device's
    // memory (a GPU would fault or read the wrong memory).
    for (size_t i = 0; i < ptrs.size(); i++) {
        if (k->sizes[i] != 8) continue;
        CUdeviceptr v;
        memcpy(&v, ptrs[i], 8);
        const int dev = device_of(v);
        if (dev < 0) continue;
        if (dev != L.ctx->device) {
            poison_context(L.ctx, CUDA_ERROR_ILLEGAL_ADDRESS,
                           "kernel `" + std::string(k->name) + "` parameter " + std::to_string(i) +
                               " points into cuda:" + std::to_string(dev) + "'s memory");
            return;
        }
        touch(v);
    }
    const uint64_t seq = L.ctx->launches++;
    const size_t total = (size_t)L.grid.x * L.grid.y * L.grid.z;
    std::mutex err_mu;
    std::string error;
    std::atomic<bool> failed{false};
    LaunchWrites writes;
    LaunchProfile* profile = profile_begin(k->name);
    const unsigned checks = launch_checks(k->name);
    parallel_for(total, [&](size_t b) {
        if (failed.load(std::memory_order_relaxed)) return;
        char* stacks = thread_stacks();
        ensure_signal_stack();
        char msg[2048] = "";
        tulu_emu_block job{};
        job.kernel = k;
        job.params = ptrs.data();
        job.grid = L.grid;
        job.block = L.block;
        job.block_idx = tulu_emu_dim3{(unsigned)(b % L.grid.x), (unsigned)(b / L.grid.x % L.grid.y),
                                      (unsigned)(b / ((size_t)L.grid.x * L.grid.y))};
        job.dynamic_smem = L.smem;
        job.schedule = config().schedule;
        job.seed = config().seed ^ (seq * 0x9E3779B97F4A7C15ull) ^ (b * 0xD1B54A32D192ED03ull);
        job.stacks = stacks;
        job.stack_size = kStackSize;
        job.stack_stride = kStackStride;
        job.stack_count = stacks ? kMaxThreads : 0;
        Running& r = running();
        job.current_thread = &r.thread;
        job.error = msg;
        job.error_len = sizeof msg;
        job.sanitize = checks;
        job.launch = &writes;
        job.global_writes = record_writes;
        job.profile_launch = profile;
        job.profile = profile ? profile_block : nullptr;
        r.kernel = k->name;
        r.block[0] = job.block_idx.x;
        r.block[1] = job.block_idx.y;
        r.block[2] = job.block_idx.z;
        int rc = L.f->module->image->run_block(&job);
        r.kernel = nullptr;
        const int overflow = stacks ? overflowed_stack(stacks, L.block.x * L.block.y * L.block.z) : -1;
        if (overflow >= 0) {
            snprintf(msg, sizeof msg, "thread %d overflowed its %zu KiB stack", overflow, kStackSize / 1024);
            rc = 1;
        }
        if (rc != 0 && !failed.exchange(true)) {
            std::lock_guard<std::mutex> g(err_mu);
            char where[128];
            snprintf(where, sizeof where, " block (%u,%u,%u): ", job.block_idx.x, job.block_idx.y, job.block_idx.z);
            error = std::string("kernel `") + k->name + "`" + where + msg;
        }
    });
    profile_end(profile, k, seq, L.grid, L.block);
    if (failed) poison_context(L.ctx, CUDA_ERROR_LAUNCH_FAILED, error);
}

}  // namespace

using namespace emu;

EMU_EXPORT CUresult cuModuleLoadData(void** module, const void* image) {
    Context* c = current_context();
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    if (!module || !image) return CUDA_ERROR_INVALID_VALUE;
    Image* img;
    if (CUresult e = load_image(image, &img)) return e;
    *module = new Module{img, c};
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuModuleLoad(void** module, const char* path) {
    FILE* f = fopen(path, "rb");
    if (!f) return CUDA_ERROR_NOT_FOUND;
    std::vector<unsigned char> bytes;
    unsigned char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) bytes.insert(bytes.end(), buf, buf + n);
    fclose(f);
    bytes.resize(bytes.size() + 64, 0);
    return cuModuleLoadData(module, bytes.data());
}

EMU_EXPORT CUresult cuModuleUnload(void* module) {
    if (!module) return CUDA_ERROR_INVALID_HANDLE;
    // Functions may outlive the handle in user code; the image stays loaded (it is shared).
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuModuleGetFunction(void** function, void* module, const char* name) {
    if (!function || !module || !name) return CUDA_ERROR_INVALID_VALUE;
    Module* m = (Module*)module;
    for (const tulu_emu_kernel* k = m->image->kernels; k->name; k++) {
        if (!strcmp(k->name, name)) {
            const KernelResources* res = kernel_resources(name);
            const unsigned smem = res ? res->static_smem : k->static_smem;
            *function = new Function{m, k, std::max(0, kSmemDefault - (int)smem), res, smem};
            return CUDA_SUCCESS;
        }
    }
    return CUDA_ERROR_NOT_FOUND;
}

EMU_EXPORT CUresult cuFuncGetAttribute(int* value, int attribute, void* function) {
    if (!value || !function) return CUDA_ERROR_INVALID_VALUE;
    Function* f = (Function*)function;
    switch (attribute) {
        case 0: *value = f->res ? (int)max_threads_for(*f->res) : kMaxThreads; break;  // MAX_THREADS_PER_BLOCK
        case 1: *value = (int)f->static_smem; break;                                  // SHARED_SIZE_BYTES
        case 4: *value = f->res ? (int)f->res->registers : 32; break;                 // NUM_REGS
        case 8: *value = f->max_dynamic_smem; break;     // MAX_DYNAMIC_SHARED_SIZE_BYTES
        default: *value = 0; break;
    }
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuFuncSetAttribute(void* function, int attribute, int value) {
    if (!function) return CUDA_ERROR_INVALID_VALUE;
    Function* f = (Function*)function;
    if (attribute == 8) {
        // Static and dynamic shared memory together stay within the opt-in limit.
        if (value < 0 || value + (long long)f->static_smem > kSmemOptIn) {
            report("cuFuncSetAttribute `%s`: %d bytes of dynamic shared memory and %u static exceed the %d a block "
                   "may have",
                   f->kernel->name, value, f->static_smem, kSmemOptIn);
            return CUDA_ERROR_INVALID_VALUE;
        }
        f->max_dynamic_smem = value;
    }
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuFuncSetCacheConfig(void* function, int) { return function ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE; }

EMU_EXPORT CUresult cuLaunchKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                   unsigned bz, unsigned smem, void* stream, void** params, void** extra) {
    if (!function) return CUDA_ERROR_INVALID_HANDLE;
    Function* f = (Function*)function;
    Stream* s = resolve_stream(stream);
    if (!s) return CUDA_ERROR_INVALID_CONTEXT;
    if (CUresult e = sticky(s->ctx)) return e;
    const tulu_emu_kernel* k = f->kernel;
    if (extra) {
        report("cuLaunchKernel `%s`: `extra` parameter packing is not emulated", k->name);
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if (f->module->ctx != s->ctx) {
        report("cuLaunchKernel `%s`: the function was loaded in cuda:%d's context but launched on a cuda:%d stream",
               k->name, f->module->ctx->device, s->ctx->device);
        return CUDA_ERROR_INVALID_HANDLE;
    }
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (gx == 0 || gy == 0 || gz == 0 || gx > 2147483647u || gy > 65535 || gz > 65535 || threads == 0 ||
        threads > (unsigned)kMaxThreads || bx > 1024 || by > 1024 || bz > 64) {
        report("cuLaunchKernel `%s`: invalid grid (%u,%u,%u) or block (%u,%u,%u)", k->name, gx, gy, gz, bx, by, bz);
        return CUDA_ERROR_INVALID_VALUE;
    }
    if ((long long)smem > f->max_dynamic_smem) {
        report("cuLaunchKernel `%s`: %u bytes of dynamic shared memory and %u static exceed the function's limit "
               "of %d dynamic (%s)",
               k->name, smem, f->static_smem, f->max_dynamic_smem,
               f->max_dynamic_smem + (long long)f->static_smem <= kSmemDefault
                   ? "48 KiB in all without opting in: raise it with cuFuncSetAttribute"
                   : "227 KiB in all");
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (f->res && threads > max_threads_for(*f->res)) {
        const KernelResources& r = *f->res;
        if (r.max_threads && threads > r.max_threads)
            report("cuLaunchKernel `%s`: a block of %llu threads exceeds the kernel's __launch_bounds__ of %u",
                   k->name, threads, r.max_threads);
        else
            report("cuLaunchKernel `%s`: a block of %llu threads at %u registers each (ptxas) needs more than the "
                   "65,536 registers of an SM",
                   k->name, threads, r.registers);
        return CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES;
    }
    if (k->nparams > 0 && !params) return CUDA_ERROR_INVALID_VALUE;
    auto L = std::make_shared<Launch>();
    L->f = f;
    L->ctx = s->ctx;
    L->grid = tulu_emu_dim3{gx, gy, gz};
    L->block = tulu_emu_dim3{bx, by, bz};
    L->smem = smem;
    size_t off = 0;
    for (int i = 0; i < k->nparams; i++) {
        off = (off + k->aligns[i] - 1) / k->aligns[i] * k->aligns[i];
        L->offsets.push_back(off);
        off += k->sizes[i];
    }
    L->params.resize(off + 16);
    for (int i = 0; i < k->nparams; i++) memcpy(L->params.data() + L->offsets[i], params[i], k->sizes[i]);
    Op op;
    op.what = k->name;
    op.run = [L] { run_launch(*L); };
    return submit(s, std::move(op));
}

EMU_EXPORT CUresult cuLaunchCooperativeKernel(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                              unsigned, void*, void**) {
    report("cuLaunchCooperativeKernel is not emulated");
    return CUDA_ERROR_NOT_SUPPORTED;
}
