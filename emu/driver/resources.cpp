// Launch resources of tulu's kernels as nvcc compiled them for a GPU: build.rs writes what
// ptxas reports for every kernel and architecture (registers, static shared memory, spills)
// and the PTX's launch bounds to <target dir>/kernel-resources.tsv; TULU_EMU_RESOURCES names
// that file (scripts/cuda-emu sets it). The emulator holds launches to those figures, for the
// architecture of the emulated compute capability, as the driver holds a real launch.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <map>

#include "emu.h"

namespace emu {

namespace {

// The SASS architecture nvcc built for a compute capability (build.rs's GENCODE).
const char* arch_of(int major, int minor) {
    if (major >= 9) return "sm_90a";
    if (major == 8 && minor >= 9) return "sm_89";
    return "sm_80";
}

std::map<std::string, KernelResources> read_table() {
    std::map<std::string, KernelResources> table;
    const char* path = getenv("TULU_EMU_RESOURCES");
    if (!path || !*path) return table;
    FILE* f = fopen(path, "r");
    if (!f) return table;  // no cuda build yet: nothing to hold launches to
    const std::string arch = arch_of(config().cc_major, config().cc_minor);
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '#') continue;
        char file[256], kernel[512], a[32];
        KernelResources r;
        if (sscanf(line, "%255s %511s %31s %u %u %u %u %u %u", file, kernel, a, &r.registers, &r.static_smem,
                   &r.spill_stores, &r.spill_loads, &r.max_threads, &r.min_blocks) == 9 &&
            arch == a)
            table[kernel] = r;
    }
    fclose(f);
    return table;
}

}  // namespace

const KernelResources* kernel_resources(const char* kernel) {
    static const std::map<std::string, KernelResources> table = read_table();
    auto it = table.find(kernel);
    return it == table.end() ? nullptr : &it->second;
}

unsigned max_threads_for(const KernelResources& r) {
    // Registers are allocated per warp in units of 256; an SM has 65,536 for a block.
    const unsigned per_warp = (r.registers * 32 + 255) / 256 * 256;
    unsigned by_registers = per_warp ? 65536 / per_warp * 32 : 1024;
    if (by_registers > 1024) by_registers = 1024;
    return r.max_threads && r.max_threads < by_registers ? r.max_threads : by_registers;
}

}  // namespace emu
