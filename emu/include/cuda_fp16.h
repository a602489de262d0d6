// Stand-in for CUDA's <cuda_fp16.h> under the emulator (no kernel uses half yet).
#pragma once
#include "cuda_emu.h"
