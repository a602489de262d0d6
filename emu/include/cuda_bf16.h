// Stand-in for CUDA's <cuda_bf16.h> under the emulator: cuda_emu.h (force-included) defines it all.
#pragma once
#include "cuda_emu.h"
