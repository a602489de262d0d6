// Memcheck and racecheck for instrumented kernel images (TULU_EMU_SANITIZE, docs/cuda-emu.md).
//
// emu/image.sh compiles an instrumented image with GCC's kernel-address instrumentation, which
// turns every load and store of kernel code into a call of __asan_{load,store}N_noabort(addr).
// Those hooks, defined here, know the running fiber (its register, as everywhere in kernel
// code) and classify the address: the fiber stacks (locals: ignored), the image's thread-local
// block (shared memory: static `__shared__` variables and the `extern __shared__` buffer), or
// anything else (global memory; kernel parameters and constants are only ever read).
//
// Memcheck: an N-byte access (N a power of two) at an address not a multiple of N faults on a
// GPU, so it is an error here; so is an access to dynamic shared memory past the bytes the
// launch requested.
//
// Racecheck, shared memory: every byte keeps its last write and two of its reads since, each
// with the thread and the block's event count at the access. Events are the barriers and
// warp synchronizations: two accesses of different threads, one a write, are a hazard unless
// a __syncthreads opened between them, or a __syncwarp whose mask holds both lanes of one warp
// completed between them. Shuffles, ballots and votes exchange registers and order no memory
// (CUDA's memory model; lanes are scheduled independently since Volta), so they count for
// nothing. Global memory: each block's written bytes go to the driver, which reports two
// blocks of one launch writing the same bytes with different values, or whatever the values
// under TULU_EMU_SANITIZE=strict (atomics excepted: they are not instrumented).
#include "sanitize.h"

#include "profile.h"

#include <dlfcn.h>
#include <link.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include <algorithm>
#include <string>

extern "C" void* tulu_emu_dynamic_smem();

namespace tulu_emu {

namespace {

enum Kind : uint8_t { NONE, MISALIGNED, SMEM_BOUNDS, RACE_RAW, RACE_WAR, RACE_WAW, GLOBAL_RACE };

// One access of a shared byte: the block's event count when it happened (0: none), the
// thread, the instruction (an offset in the image).
struct Slot {
    uint32_t e;
    uint16_t tid;
    uint32_t pc;
};
struct Cell {
    Slot w, r[2];
};

struct Finding {
    Kind kind = NONE;
    bool write = false;
    unsigned size = 0, tid = 0, other_tid = 0, other_block = 0;
    uintptr_t addr = 0, hi = 0;
    uint32_t pc = 0, other_pc = 0;
};

struct GlobalWrite {
    uintptr_t addr;
    uint32_t pc;
    uint32_t size;
};

}  // namespace

// Per OS thread (blocks of one thread run one after another): ranges, shadow, findings.
struct Sanitizer {
    uintptr_t base = 0;                  // the image's load address (pc offsets)
    uintptr_t tls_lo = 0, tls_span = 0;  // this thread's instance of the image's thread-locals
    uintptr_t dyn_lo = 0;                // the extern __shared__ buffer (0: none)
    Cell* shadow = nullptr;              // one per byte of the thread-local block
    uint32_t* pairsync = nullptr;        // [thread][lane]: event of the last __syncwarp holding both
    uint32_t E = 0;                      // events so far (block starts, barriers, warp syncs)
    uint32_t start = 0, B = 0;           // this block's first event, the last barrier's
    // This block.
    unsigned mode = 0, dyn_bytes = 0;
    uintptr_t stack_lo = 0, stack_span = 0;
    Finding first;
    unsigned long findings = 0;
    std::vector<GlobalWrite> writes;
    Profile* prof = nullptr;  // TULU_EMU_PROFILE: this block's counts (profile.cpp), else null
    // What the profiler does not count: the fibers (their coordinates), the parameters' values
    // and the array of pointers to them.
    uintptr_t fibers_lo = 0, fibers_span = 0, params_lo = 0, params_span = 0, param_ptrs_lo = 0, param_ptrs_span = 0;
};

namespace {

constexpr unsigned kMaxThreads = 1024;

struct TlsSearch {
    uintptr_t base;
    uintptr_t lo, span;
};

int find_tls(struct dl_phdr_info* info, size_t, void* arg) {
    TlsSearch* s = (TlsSearch*)arg;
    if (info->dlpi_addr != s->base) return 0;
    for (int i = 0; i < info->dlpi_phnum; i++)
        if (info->dlpi_phdr[i].p_type == PT_TLS) {
            s->lo = (uintptr_t)info->dlpi_tls_data;
            s->span = info->dlpi_phdr[i].p_memsz;
        }
    return 1;
}

void* map_zeroed(size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
}

// This OS thread's checker for this image (the thread-local block exists: the runtime's
// own thread-locals were touched before).
Sanitizer* thread_sanitizer(char* error, size_t error_len) {
    static thread_local Sanitizer* s = nullptr;
    if (s) return s;
    Dl_info d{};
    if (!dladdr((void*)&san_begin, &d)) {
        snprintf(error, error_len, "sanitizer: cannot find the kernel image in memory");
        return nullptr;
    }
    TlsSearch search{(uintptr_t)d.dli_fbase, 0, 0};
    dl_iterate_phdr(find_tls, &search);
    if (!search.lo || !search.span) {
        snprintf(error, error_len, "sanitizer: the kernel image has no thread-local (shared memory) block");
        return nullptr;
    }
    Sanitizer* n = new Sanitizer;
    n->base = (uintptr_t)d.dli_fbase;
    n->tls_lo = search.lo;
    n->tls_span = search.span;
    n->dyn_lo = (uintptr_t)tulu_emu_dynamic_smem();
    n->shadow = (Cell*)map_zeroed(search.span * sizeof(Cell));
    n->pairsync = (uint32_t*)map_zeroed(kMaxThreads * 32 * sizeof(uint32_t));
    if (!n->shadow || !n->pairsync) {
        snprintf(error, error_len, "sanitizer: no memory for the shadow of %zu bytes of shared memory",
                 (size_t)search.span);
        return nullptr;
    }
    return s = n;
}

void found(Sanitizer* s, const Finding& f) {
    if (s->findings++ == 0) s->first = f;
}

// Whether an earlier access `x` is ordered before an access by thread `t` now.
inline bool ordered(const Sanitizer* s, const Slot& x, unsigned t) {
    return x.e < s->start || x.tid == t || s->B > x.e ||
           ((x.tid >> 5) == (t >> 5) && s->pairsync[t * 32 + (x.tid & 31)] > x.e);
}

void shared_access(Sanitizer* s, unsigned t, uintptr_t a, unsigned size, bool write, uint32_t pc) {
    Cell* c = s->shadow + (a - s->tls_lo);
    bool reported = false;
    auto hazard = [&](Kind k, const Slot& other) {
        if (reported) return;
        reported = true;
        Finding f;
        f.kind = k;
        f.write = write;
        f.size = size;
        f.tid = t;
        f.addr = a;
        f.pc = pc;
        f.other_tid = other.tid;
        f.other_pc = other.pc;
        found(s, f);
    };
    const Slot now{s->E, (uint16_t)t, pc};
    for (unsigned i = 0; i < size && a + i < s->tls_lo + s->tls_span; i++, c++) {
        if (!ordered(s, c->w, t)) hazard(write ? RACE_WAW : RACE_RAW, c->w);
        if (write) {
            for (const Slot& r : c->r)
                if (!ordered(s, r, t)) hazard(RACE_WAR, r);
            c->w = now;
            c->r[0].e = c->r[1].e = 0;
        } else if (c->r[0].tid == t || c->r[0].e < s->start) {
            c->r[0] = now;
        } else if (c->r[1].tid == t || c->r[1].e < s->start || c->r[1].e < c->r[0].e) {
            c->r[1] = now;
        } else {
            c->r[0] = now;
        }
    }
}

// Memcheck of one access outside the fiber stacks; whether it is in shared memory.
inline bool memcheck(Sanitizer* s, unsigned t, uintptr_t a, unsigned size, bool write, uint32_t pc) {
    const bool shared = a - s->tls_lo < s->tls_span;
    if (!(s->mode & TULU_EMU_MEMCHECK)) return shared;
    Finding f;
    f.write = write;
    f.size = size;
    f.tid = t;
    f.addr = a;
    f.pc = pc;
    if ((size & (size - 1)) == 0 && (a & (size - 1)))
        f.kind = MISALIGNED;
    else if (shared && s->dyn_lo && a - s->dyn_lo < TULU_EMU_DYNAMIC_SMEM_MAX && a - s->dyn_lo + size > s->dyn_bytes)
        f.kind = SMEM_BOUNDS;
    else
        return shared;
    // Fatal on a GPU (a misaligned or out-of-range address ends the kernel), and the access
    // may fault here (an aligned-only vector instruction): the block ends before it is made.
    found(s, f);
    stop_block();
}

__attribute__((always_inline)) inline void on_access(uintptr_t a, unsigned size, bool write, void* ret) {
    Fiber* f = self();
    Sanitizer* s = f->block->san;
    if (!s || a - s->stack_lo < s->stack_span) return;  // not checking, or the fiber's locals
    const uint32_t pc = (uint32_t)((uintptr_t)ret - 1 - s->base);
    if (s->prof) {
        // The emulator's own memory that kernel code reads: the block's and the fiber's
        // coordinates (blockIdx, threadIdx, ...) and the launch's parameters. Not GPU traffic.
        if (a - (uintptr_t)&f->block->coords < sizeof(BlockCoords) || a - s->fibers_lo < s->fibers_span ||
            a - s->params_lo < s->params_span || a - s->param_ptrs_lo < s->param_ptrs_span)
            return;
        const bool sh = a - s->tls_lo < s->tls_span;
        prof_access(s->prof, f->linear, a, size,
                    sh ? TULU_EMU_KIND_SHARED : write ? TULU_EMU_KIND_STORE : TULU_EMU_KIND_LOAD, pc);
        if (!(s->mode & (TULU_EMU_MEMCHECK | TULU_EMU_RACECHECK))) return;
    }
    const bool shared = memcheck(s, f->linear, a, size, write, pc);
    if (!(s->mode & TULU_EMU_RACECHECK)) return;
    if (shared)
        shared_access(s, f->linear, a, size, write, pc);
    else if (write)
        s->writes.push_back(GlobalWrite{a, pc, size});
}

// "file.cu:LINE" of an instruction of this image (addr2line; only when reporting).
std::string where(uint32_t pc) {
    Dl_info d{};
    if (!dladdr((void*)&san_begin, &d) || !d.dli_fname) return "?";
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "addr2line -i -s -e '%s' 0x%x 2>/dev/null", d.dli_fname, pc);
    std::string out;
    if (FILE* p = popen(cmd, "r")) {
        char line[512];
        std::vector<std::string> lines;
        while (fgets(line, sizeof line, p)) {
            line[strcspn(line, "\n")] = 0;
            lines.push_back(line);
        }
        pclose(p);
        // Innermost frame first; the emulator's own headers (the entry trampoline) say nothing.
        for (std::string& l : lines) l = l.substr(0, l.find(" (discriminator"));
        while (!lines.empty() && (lines.back().find("cuda_emu") == 0 || lines.back().find("?") == 0))
            lines.pop_back();
        if (!lines.empty()) {
            out = lines.front();
            if (lines.size() > 1) out += " (inlined into " + lines.back() + ")";
        }
    }
    if (!out.empty()) return out;
    char off[64];
    snprintf(off, sizeof off, "image offset 0x%x (addr2line found no line)", pc);
    return off;
}

std::string thread_name(const Block* bl, unsigned t) {
    const tulu_emu_dim3 b = bl->job->block;
    char buf[96];
    snprintf(buf, sizeof buf, "thread (%u,%u,%u) [warp %u lane %u]", t % b.x, t / b.x % b.y, t / (b.x * b.y), t >> 5,
             t & 31);
    return buf;
}

std::string shared_place(const Sanitizer* s, uintptr_t a) {
    char buf[128];
    if (s->dyn_lo && a - s->dyn_lo < TULU_EMU_DYNAMIC_SMEM_MAX)
        snprintf(buf, sizeof buf, "byte %zu of dynamic shared memory", (size_t)(a - s->dyn_lo));
    else
        snprintf(buf, sizeof buf, "static __shared__ memory (0x%zx)", (size_t)a);
    return buf;
}

std::string describe(const Block* bl, const Sanitizer* s) {
    const Finding& f = s->first;
    const char* access = f.write ? "store" : "load";
    const std::string me = thread_name(bl, f.tid), at = where(f.pc);
    char buf[1536];
    switch (f.kind) {
        case MISALIGNED:
            snprintf(buf, sizeof buf, "memcheck: misaligned %u-byte %s at 0x%zx (not a multiple of %u) by %s at %s",
                     f.size, access, (size_t)f.addr, f.size, me.c_str(), at.c_str());
            break;
        case SMEM_BOUNDS:
            snprintf(buf, sizeof buf,
                     "memcheck: %u-byte %s at byte %zu of dynamic shared memory, past the %u bytes the launch "
                     "requested, by %s at %s",
                     f.size, access, (size_t)(f.addr - s->dyn_lo), s->dyn_bytes, me.c_str(), at.c_str());
            break;
        case RACE_RAW:
        case RACE_WAR:
        case RACE_WAW: {
            const char* what = f.kind == RACE_RAW ? "read after write" : f.kind == RACE_WAR ? "write after read"
                                                                                            : "write after write";
            const char* other = f.kind == RACE_WAR ? "read" : "wrote";
            snprintf(buf, sizeof buf,
                     "racecheck: shared memory hazard (%s) at %s: %s %s it at %s; %s %s it at %s, with no "
                     "__syncthreads (nor a __syncwarp holding both lanes) between",
                     what, shared_place(s, f.addr).c_str(), me.c_str(), f.write ? "writes" : "reads", at.c_str(),
                     thread_name(bl, f.other_tid).c_str(), other, where(f.other_pc).c_str());
            break;
        }
        case GLOBAL_RACE: {
            const tulu_emu_dim3 g = bl->job->grid;
            const unsigned o = f.other_block;
            snprintf(buf, sizeof buf,
                     "racecheck: this block and block (%u,%u,%u) of the launch both write global bytes "
                     "[0x%zx, 0x%zx) without atomics: this block at %s, the other at %s",
                     o % g.x, o / g.x % g.y, o / (g.x * g.y), (size_t)f.addr, (size_t)f.hi, at.c_str(),
                     where(f.other_pc).c_str());
            break;
        }
        default: snprintf(buf, sizeof buf, "sanitizer finding"); break;
    }
    std::string msg = buf;
    if (s->findings > 1) msg += "; " + std::to_string(s->findings - 1) + " more finding(s) in this block";
    return msg;
}

// The block's global writes as sorted disjoint ranges, each with the pc of its lowest byte.
std::vector<tulu_emu_write_range> write_ranges(std::vector<GlobalWrite>& w) {
    std::sort(w.begin(), w.end(), [](const GlobalWrite& a, const GlobalWrite& b) { return a.addr < b.addr; });
    std::vector<tulu_emu_write_range> out;
    for (const GlobalWrite& g : w) {
        if (!out.empty() && g.addr <= out.back().hi)
            out.back().hi = std::max<unsigned long>(out.back().hi, g.addr + g.size);
        else
            out.push_back(tulu_emu_write_range{g.addr, g.addr + g.size, g.pc});
    }
    return out;
}

}  // namespace

void san_begin(Block* bl) {
    tulu_emu_block* job = bl->job;
    bl->san = nullptr;
    if (!job->sanitize) return;
    Sanitizer* s = thread_sanitizer(job->error, job->error_len);
    if (!s) {
        bl->failed = true;
        return;
    }
    if (s->E > 0x7fffffffu) {  // event counts wrap: forget everything (no block is running)
        madvise(s->shadow, s->tls_span * sizeof(Cell), MADV_DONTNEED);
        madvise(s->pairsync, kMaxThreads * 32 * sizeof(uint32_t), MADV_DONTNEED);
        s->E = 0;
    }
    s->start = ++s->E;
    s->B = 0;
    s->mode = job->sanitize;
    s->dyn_bytes = job->dynamic_smem;
    s->stack_lo = (uintptr_t)job->stacks;
    s->stack_span = job->stack_stride * (size_t)job->stack_count;
    s->findings = 0;
    s->first = Finding{};
    s->writes.clear();
    s->prof = (s->mode & TULU_EMU_PROFILE) ? prof_begin() : nullptr;
    s->fibers_lo = (uintptr_t)bl->fibers.data();
    s->fibers_span = bl->fibers.size() * sizeof(Fiber);
    const int np = job->kernel->nparams;
    s->param_ptrs_lo = (uintptr_t)job->params;
    s->param_ptrs_span = np > 0 ? np * sizeof(void*) : 0;
    s->params_lo = s->params_span = 0;
    if (np > 0) {
        // The driver keeps the values in one buffer, in order (module.cpp).
        s->params_lo = (uintptr_t)job->params[0];
        s->params_span = (uintptr_t)job->params[np - 1] + job->kernel->sizes[np - 1] - s->params_lo;
    }
    bl->san = s;
}

void san_barrier(Block* bl) {
    if (Sanitizer* s = bl->san) {
        s->B = ++s->E;
        if (s->prof) prof_barrier(s->prof);
    }
}

void san_syncwarp(Block* bl, unsigned warp, unsigned mask) {
    Sanitizer* s = bl->san;
    if (!s) return;
    const uint32_t e = ++s->E;
    for (unsigned l = 0; l < 32; l++) {
        if (!(mask >> l & 1u)) continue;
        uint32_t* row = s->pairsync + (warp * 32 + l) * 32;
        for (unsigned k = 0; k < 32; k++)
            if (mask >> k & 1u) row[k] = e;
    }
}

void san_end(Block* bl) {
    Sanitizer* s = bl->san;
    if (!s) return;
    tulu_emu_block* job = bl->job;
    if ((s->mode & TULU_EMU_RACECHECK) && !s->writes.empty() && job->global_writes) {
        const std::vector<tulu_emu_write_range> ranges = write_ranges(s->writes);
        const tulu_emu_dim3 g = job->grid, i = job->block_idx;
        const unsigned me = i.x + g.x * (i.y + g.y * i.z);
        tulu_emu_write_range mine{}, other{};
        unsigned other_block = 0;
        if (job->global_writes(job->launch, me, ranges.data(), ranges.size(), &mine, &other, &other_block)) {
            Finding f;
            f.kind = GLOBAL_RACE;
            f.write = true;
            f.addr = std::max(mine.lo, other.lo);
            f.hi = std::min(mine.hi, other.hi);
            f.pc = (uint32_t)mine.pc;
            f.other_pc = (uint32_t)other.pc;
            f.other_block = other_block;
            found(s, f);
        }
    }
    s->writes.clear();
    if (s->prof && !bl->failed) prof_end(s->prof, job);
    // A memcheck finding stopped the block (bl->failed, no message yet); any other failure's
    // message (a deadlock, a divergence) comes first.
    if (s->findings && !job->error[0]) {
        const std::string msg = describe(bl, s);
        snprintf(job->error, job->error_len, "%s", msg.c_str());
        bl->failed = true;
    }
    bl->san = nullptr;
}

void atomic_access(const void* p, unsigned size, void* pc) {
    Fiber* f = self();
    Sanitizer* s = f->block->san;
    if (!s || (uintptr_t)p - s->stack_lo < s->stack_span) return;
    const uint32_t at = (uint32_t)((uintptr_t)pc - 1 - s->base);
    if (s->prof)
        prof_access(s->prof, f->linear, (uintptr_t)p, size,
                    (uintptr_t)p - s->tls_lo < s->tls_span ? TULU_EMU_KIND_SHARED : TULU_EMU_KIND_ATOMIC, at);
    memcheck(s, f->linear, (uintptr_t)p, size, true, at);
}

}  // namespace tulu_emu

// The instrumentation's hooks (GCC -fsanitize=kernel-address with
// asan-instrumentation-with-call-threshold=0 calls these for every load and store).
#define TULU_EMU_HOOKS(N)                                                                                \
    extern "C" void __asan_load##N##_noabort(uintptr_t a) {                                             \
        tulu_emu::on_access(a, N, false, __builtin_return_address(0));                                   \
    }                                                                                                    \
    extern "C" void __asan_store##N##_noabort(uintptr_t a) {                                            \
        tulu_emu::on_access(a, N, true, __builtin_return_address(0));                                    \
    }
TULU_EMU_HOOKS(1)
TULU_EMU_HOOKS(2)
TULU_EMU_HOOKS(4)
TULU_EMU_HOOKS(8)
TULU_EMU_HOOKS(16)
extern "C" void __asan_loadN_noabort(uintptr_t a, size_t n) {
    tulu_emu::on_access(a, (unsigned)n, false, __builtin_return_address(0));
}
extern "C" void __asan_storeN_noabort(uintptr_t a, size_t n) {
    tulu_emu::on_access(a, (unsigned)n, true, __builtin_return_address(0));
}
