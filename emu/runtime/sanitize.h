// The checks an instrumented image makes (TULU_EMU_SANITIZE; emu/runtime/sanitize.cpp): the
// block runtime calls these at a block's start and end and when a barrier opens; the
// per-access hooks (__asan_{load,store}N_noabort) live in sanitize.cpp.
#pragma once

#include "block.h"

namespace tulu_emu {

/// Sets up the checks the job asks for (bl->san stays null when it asks for none).
void san_begin(Block* bl);
/// A __syncthreads opened: every access before it is ordered before every access after it.
void san_barrier(Block* bl);
/// A __syncwarp over `mask` of warp `warp` completed: orders the accesses of those lanes.
void san_syncwarp(Block* bl, unsigned warp, unsigned mask);
/// Hands the block's global writes to the driver (racecheck between blocks) and turns the
/// first finding into the block's error.
void san_end(Block* bl);

}  // namespace tulu_emu
