// The profiler of instrumented images (TULU_EMU_PROFILE; emu/runtime/profile.cpp): counts each
// kernel's memory requests from the same per-access hooks as the sanitizer, and checks nothing.
#pragma once

#include <stdint.h>

#include "tulu_emu_abi.h"

namespace tulu_emu {

struct Profile;

/// This OS thread's profile, emptied for a new block.
Profile* prof_begin();
/// One access by thread `tid` of the block (`kind`: a tulu_emu_access_kind; shared accesses
/// are TULU_EMU_KIND_SHARED for loads and stores alike).
void prof_access(Profile* p, unsigned tid, uintptr_t addr, unsigned size, int kind, uint32_t pc);
/// A __syncthreads opened: every request before it is complete.
void prof_barrier(Profile* p);
/// The block ended: counts its last requests and hands the block's profile to the driver.
void prof_end(Profile* p, tulu_emu_block* job);

}  // namespace tulu_emu
