// Stand-in for CUDA's <cuda_runtime.h> under the emulator.
#pragma once
#include "cuda_emu.h"
