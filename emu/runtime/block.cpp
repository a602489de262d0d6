// Runs one thread block of an emulated kernel on the calling OS thread: each CUDA thread is a
// fiber with its own stack (taken from the pool the driver passes in), switched by hand at
// every barrier and warp operation. Linked into every CPU kernel image.
//
// Scheduling. Fibers run in the block's schedule order (forward, reverse, or a random
// permutation drawn anew at every barrier); each runs until it blocks — at __syncthreads, at a
// warp operation, or by returning. A warp operation completes when every lane of its mask has
// arrived (the last to arrive computes every lane's result); a barrier opens when every thread
// that has not exited has arrived (exited threads count as arrived). Anything else — lanes
// waiting on a lane that exited or sits at the block barrier, lanes meeting at different warp
// operations — is a deadlock or divergence the GPU would not survive either: the block fails
// with a message naming the threads, and the driver reports it as the kernel's error.
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "block.h"
#include "sanitize.h"


// ---------------------------------------------------------------------------------------------
// Context switch: saves the callee-saved registers on the current stack, stores the stack
// pointer in *save, loads `load` and pops the registers saved there.
extern "C" void tulu_emu_switch(void** save, void* load);

#if defined(__x86_64__)
__asm__(
    ".text\n"
    ".globl tulu_emu_switch\n"
    ".hidden tulu_emu_switch\n"
    ".type tulu_emu_switch,@function\n"
    "tulu_emu_switch:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size tulu_emu_switch, .-tulu_emu_switch\n");
// (Kernels never change the floating-point control registers, so they are not switched.)
#elif defined(__aarch64__)
__asm__(
    ".text\n"
    ".globl tulu_emu_switch\n"
    ".hidden tulu_emu_switch\n"
    ".type tulu_emu_switch,%function\n"
    "tulu_emu_switch:\n"
    "  sub sp, sp, #176\n"
    "  stp x19, x20, [sp, #0]\n"
    "  stp x21, x22, [sp, #16]\n"
    "  stp x23, x24, [sp, #32]\n"
    "  stp x25, x26, [sp, #48]\n"
    "  stp x27, x28, [sp, #64]\n"
    "  stp x29, x30, [sp, #80]\n"
    "  stp d8, d9, [sp, #96]\n"
    "  stp d10, d11, [sp, #112]\n"
    "  stp d12, d13, [sp, #128]\n"
    "  stp d14, d15, [sp, #144]\n"
    "  mov x2, sp\n"
    "  str x2, [x0]\n"
    "  mov sp, x1\n"
    "  ldp x19, x20, [sp, #0]\n"
    "  ldp x21, x22, [sp, #16]\n"
    "  ldp x23, x24, [sp, #32]\n"
    "  ldp x25, x26, [sp, #48]\n"
    "  ldp x27, x28, [sp, #64]\n"
    "  ldp x29, x30, [sp, #80]\n"
    "  ldp d8, d9, [sp, #96]\n"
    "  ldp d10, d11, [sp, #112]\n"
    "  ldp d12, d13, [sp, #128]\n"
    "  ldp d14, d15, [sp, #144]\n"
    "  add sp, sp, #176\n"
    "  ret\n"
    ".size tulu_emu_switch, .-tulu_emu_switch\n");
#else
#error "the CUDA emulator's fibers need x86_64 or aarch64"
#endif

namespace tulu_emu {
namespace {

[[noreturn]] void fiber_main();

// A fresh fiber's stack: a frame that tulu_emu_switch "returns" into fiber_main with.
void* fresh_stack(char* base, size_t size, const ThreadCoords* coords) {
    uintptr_t top = ((uintptr_t)(base + size)) & ~(uintptr_t)15;
#if defined(__x86_64__)
    uint64_t* sp = (uint64_t*)top;
    *--sp = 0;                        // fiber_main's (never used) return address
    *--sp = (uint64_t)&fiber_main;    // popped by `ret`
    for (int i = 0; i < 5; i++) *--sp = 0;  // rbp, rbx, r12-r14
    *--sp = (uint64_t)coords;         // r15: tulu_emu_self
    return sp;
#else
    uint64_t* sp = (uint64_t*)(top - 176);
    memset(sp, 0, 176);
    sp[9] = (uint64_t)coords;         // x28: tulu_emu_self
    sp[11] = (uint64_t)&fiber_main;   // x30 (lr)
    return sp;
#endif
}

__attribute__((format(printf, 2, 3))) void fail(Block* bl, const char* fmt, ...) {
    if (!bl->failed) {
        va_list args;
        va_start(args, fmt);
        vsnprintf(bl->job->error, bl->job->error_len, fmt, args);
        va_end(args);
        bl->failed = true;
    }
}

// Leaves the running fiber (blocked, or exited): switches straight to the next ready fiber in
// this pass's schedule order, or back to the scheduler when the pass is over.
void to_scheduler() {
    Fiber* f = self();
    Block* bl = f->block;
    if (!bl->failed) {
        for (unsigned k = bl->cursor + 1; k < bl->n; k++) {
            Fiber* g = &bl->fibers[bl->order[k]];
            if (g->state == READY) {
                bl->cursor = k;
                *bl->job->current_thread = g->linear;
                tulu_emu_switch(&f->sp, g->sp);
                return;
            }
        }
    }
    tulu_emu_switch(&f->sp, bl->sched_sp);
}

unsigned long long next_random(unsigned long long& s) {
    // splitmix64
    unsigned long long z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

void shuffle_order(Block* bl) {
    if (bl->job->schedule != TULU_EMU_RANDOM) return;
    auto& o = bl->order;
    for (size_t i = o.size(); i > 1; --i) std::swap(o[i - 1], o[next_random(bl->rng) % i]);
}

const char* op_name(int op) {
    static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                  "__ballot_sync", "__any_sync", "__all_sync", "__syncwarp"};
    return op >= 0 && op < 8 ? names[op] : "a warp operation";
}

// Completes the warp operation of warp `w` if every lane of the mask has arrived.
void try_complete(Block* bl, unsigned w, unsigned mask);

void to_scheduler();

[[noreturn]] void fiber_main() {
    Block* bl = self()->block;
    bl->job->kernel->call(bl->job->params);
    Fiber* f = self();
    f->state = EXITED;
    bl->exited[f->linear >> 5] |= 1u << (f->linear & 31);
    // Lanes waiting for this one at a warp operation would wait forever: say so precisely.
    const unsigned w = f->linear >> 5;
    for (unsigned l = 0; l < 32 && w * 32 + l < bl->n; l++) {
        const Fiber& g = bl->fibers[w * 32 + l];
        if (g.state == AT_WARP && (g.mask >> (f->linear & 31) & 1u)) {
            try_complete(bl, w, g.mask);
            break;
        }
    }
    to_scheduler();
    __builtin_unreachable();
}

// Completes warp `w`'s operation over `mask` (the mask of a lane that just arrived, or of a lane
// waiting for one that just exited) if every lane of the mask is there.
void try_complete(Block* bl, unsigned w, unsigned mask) {
    if ((bl->arrived[w] & mask) != mask) {
        // Someone is missing; a lane that has exited never comes.
        if (const unsigned gone = bl->exited[w] & mask)
            return fail(bl, "%s: lane %u of warp %u has exited but is in the mask",
                        op_name(bl->fibers[w * 32 + __builtin_ctz(bl->arrived[w] & mask)].op),
                        (unsigned)__builtin_ctz(gone), w);
        return;
    }
    Fiber* lanes = &bl->fibers[w * 32];
    const unsigned n = std::min<unsigned>(32, bl->n - w * 32);
    const unsigned first = __builtin_ctz(mask);
    const int op = lanes[first].op;
    if (32u - (unsigned)__builtin_clz(mask) > n)
        return fail(bl, "%s: mask %08x names lanes of warp %u that do not exist", op_name(op), mask, w);
    for (unsigned l = 0; l < 32; l++) {
        if (!(mask >> l & 1u)) continue;
        if (lanes[l].op != op || lanes[l].mask != mask)
            return fail(bl, "divergent warp %u: lane %u is at %s, lane %u at %s", w, first, op_name(op), l,
                        op_name(lanes[l].op));
    }
    unsigned ballot = 0;
    for (unsigned l = 0; l < 32; l++)
        if (mask >> l & 1u && lanes[l].value) ballot |= 1u << l;
    for (unsigned l = 0; l < 32; l++) {
        if (!(mask >> l & 1u)) continue;
        Fiber& f = lanes[l];
        const unsigned width = (unsigned)f.width;
        if (op <= SHFL_XOR && (width == 0 || width > 32 || (width & (width - 1)))) {
            return fail(bl, "%s: width %u is not a power of two up to 32 (lane %u)", op_name(op), width, l);
        }
        const unsigned seg = l & ~(width - 1);
        unsigned src = l;
        switch (op) {
            case SHFL_IDX: src = seg + ((unsigned)f.arg & (width - 1)); break;
            case SHFL_UP: src = l - (unsigned)f.arg >= seg && (unsigned)f.arg <= l ? l - (unsigned)f.arg : l; break;
            case SHFL_DOWN: src = l + (unsigned)f.arg < seg + width ? l + (unsigned)f.arg : l; break;
            case SHFL_XOR: src = (l ^ (unsigned)f.arg) < seg + width ? l ^ (unsigned)f.arg : l; break;
            default: break;
        }
        if (op <= SHFL_XOR) {
            if (src >= 32 || !(mask >> src & 1u))
                return fail(bl, "%s: lane %u reads lane %u, which is not in the mask", op_name(op), l, src);
            f.result = lanes[src].value;
        } else if (op == BALLOT) {
            f.result = ballot;
        } else if (op == ANY) {
            f.result = ballot != 0;
        } else if (op == ALL) {
            f.result = ballot == mask;
        } else {
            f.result = 0;
        }
    }
    if (op == SYNCWARP) san_syncwarp(bl, w, mask);
    for (unsigned l = 0; l < 32; l++)
        if (mask >> l & 1u) lanes[l].state = READY;
    bl->arrived[w] &= ~mask;
}

// Runs a pass from position k of the order: the fibers hand over to each other and the last
// one of the pass switches back here.
void run_pass(Block* bl, unsigned k) {
    Fiber* f = &bl->fibers[bl->order[k]];
    bl->cursor = k;
    *bl->job->current_thread = f->linear;
    tulu_emu_switch(&bl->sched_sp, f->sp);
}

// What every thread is waiting for, for a deadlock report.
void describe_deadlock(Block* bl) {
    char* out = bl->job->error;
    size_t len = bl->job->error_len, used = 0;
    used += snprintf(out + used, len - used, "deadlock: no thread can proceed;");
    for (size_t i = 0; i < bl->fibers.size() && used < len; i++) {
        const Fiber& f = bl->fibers[i];
        if (f.state == AT_WARP)
            used += snprintf(out + used, len - used, " thread %u waits at %s (mask %08x);", f.linear, op_name(f.op),
                             f.mask);
    }
    size_t barrier = 0, exited = 0;
    for (const Fiber& f : bl->fibers) {
        barrier += f.state == AT_BARRIER;
        exited += f.state == EXITED;
    }
    if (used < len)
        snprintf(out + used, len - used, " %zu at __syncthreads, %zu exited", barrier, exited);
    bl->failed = true;
}

}  // namespace

void stop_block() {
    self()->block->failed = true;
    to_scheduler();  // with the block failed, straight back to the scheduler, never to return
    __builtin_unreachable();
}

void syncthreads() {
    self()->state = AT_BARRIER;
    to_scheduler();
}

unsigned long long warp_op(int op, unsigned mask, unsigned long long value, int arg, int width) {
    Fiber* f = self();
    Block* bl = f->block;
    const unsigned lane = f->linear & 31, w = f->linear >> 5;
    if (!(mask >> lane & 1u)) {
        fail(bl, "%s: the calling lane %u (warp %u) is not in its own mask", op_name(op), lane, w);
        to_scheduler();
    }
    f->op = op;
    f->mask = mask;
    f->value = value;
    f->arg = arg;
    f->width = width;
    f->state = AT_WARP;
    bl->arrived[w] |= 1u << lane;
    try_complete(bl, w, mask);
    if (f->state != READY || bl->failed) to_scheduler();
    return f->result;
}

}  // namespace tulu_emu

using namespace tulu_emu;

extern "C" __attribute__((visibility("default"))) void* tulu_emu_dynamic_smem();

extern "C" __attribute__((visibility("default"))) int tulu_emu_run_block(tulu_emu_block* job) {
    const unsigned n = job->block.x * job->block.y * job->block.z;
    if (n == 0 || n > (unsigned)job->stack_count) {
        snprintf(job->error, job->error_len, "block of %u threads (at most %d)", n, job->stack_count);
        return 1;
    }
    static thread_local Block bl;
    bl.coords.idx = uint3{job->block_idx.x, job->block_idx.y, job->block_idx.z};
    bl.coords.dim = dim3{job->block.x, job->block.y, job->block.z};
    bl.coords.grid = dim3{job->grid.x, job->grid.y, job->grid.z};
    bl.job = job;
    bl.failed = false;
    bl.rng = job->seed;
    bl.n = n;
    bl.fibers.resize(n);
    bl.order.resize(n);
    memset(bl.arrived, 0, sizeof bl.arrived);
    memset(bl.exited, 0, sizeof bl.exited);
    for (unsigned i = 0; i < n; i++) {
        Fiber& f = bl.fibers[i];
        f.linear = i;
        f.self.tid = uint3{i % job->block.x, (i / job->block.x) % job->block.y, i / (job->block.x * job->block.y)};
        f.self.block = &bl.coords;
        f.block = &bl;
        f.state = READY;
        f.sp = fresh_stack(job->stacks + (size_t)i * job->stack_stride, job->stack_size, &f.self);
        bl.order[i] = job->schedule == TULU_EMU_REVERSE ? n - 1 - i : i;
    }
    if (job->dynamic_smem) {
        void* smem = tulu_emu_dynamic_smem();
        if (!smem) {
            snprintf(job->error, job->error_len, "%u bytes of dynamic shared memory, but the kernel declares none",
                     job->dynamic_smem);
            return 1;
        }
        memset(smem, 0xff, job->dynamic_smem);  // NaN in every float type: unwritten reads show
    }
    san_begin(&bl);
    if (bl.failed) return 1;
    shuffle_order(&bl);
    for (;;) {
        for (unsigned k = 0; k < n; k++)
            if (bl.fibers[bl.order[k]].state == READY) {
                run_pass(&bl, k);
                break;
            }
        if (bl.failed) break;
        unsigned exited = 0, waiting = 0, ready = 0;
        for (const Fiber& f : bl.fibers) {
            exited += f.state == EXITED;
            waiting += f.state == AT_WARP;
            ready += f.state == READY;
        }
        if (exited == n) break;
        if (ready) continue;  // made ready by a warp operation after the pass went by
        if (waiting == 0) {
            // Every live thread is at the barrier: open it.
            for (Fiber& f : bl.fibers)
                if (f.state == AT_BARRIER) f.state = READY;
            san_barrier(&bl);
            shuffle_order(&bl);
            continue;
        }
        describe_deadlock(&bl);
        break;
    }
    san_end(&bl);
    return bl.failed ? 1 : 0;
}
