// The block runtime's own types, shared by block.cpp (fibers, barriers, warp operations) and
// sanitize.cpp (the memory checks of instrumented images). Internal to a kernel image.
#pragma once

#include <stdint.h>

#include <vector>

#include "cuda_emu.h"
#include "tulu_emu_abi.h"

namespace tulu_emu {

enum State : uint8_t { READY, AT_BARRIER, AT_WARP, EXITED };

struct Block;
struct Sanitizer;

struct Fiber {
    ThreadCoords self;  // first: tulu_emu_self points here
    Block* block;
    void* sp;  // saved stack pointer while switched out
    unsigned linear;
    State state;
    // A posted warp operation.
    int op;
    unsigned mask;
    int arg, width;
    unsigned long long value, result;
};

struct Block {
    BlockCoords coords;
    tulu_emu_block* job;
    std::vector<Fiber> fibers;
    std::vector<unsigned> order;
    unsigned n;       // threads
    unsigned cursor;  // position in `order` of the running fiber, this pass
    unsigned arrived[32];  // per warp: lanes waiting at a warp operation
    unsigned exited[32];   // per warp: lanes that have returned
    void* sched_sp;
    bool failed;
    unsigned long long rng;
    Sanitizer* san;  // this OS thread's checker state when the launch is sanitized, else null
};

// The running fiber, from the register that holds its coordinates.
inline Fiber* self() { return (Fiber*)tulu_emu_self; }

/// Ends the block now, from inside one of its fibers, as a fatal error ends a kernel on a GPU:
/// the block fails and no fiber of it runs again (block.cpp).
[[noreturn]] void stop_block();

}  // namespace tulu_emu
