// The profiler's driver side (TULU_EMU_PROFILE=FILE, docs/cuda-emu.md): gathers the counts each
// block of an instrumented image hands over (emu/runtime/profile.cpp), counts each launch's DRAM
// traffic as the distinct 32-byte sectors its blocks touched (each once per launch: the first
// touch goes to DRAM, later ones hit L2 — H100's 50 MB L2 holds any one launch's reuse for the
// shapes tulu runs), and writes one line per launch (TULU_EMU_PROFILE_LAUNCHES=1) as it ends and
// a table per kernel and per instruction when the process exits.
//
// The predicted H100 time of a launch is a *prediction*, not a measurement: its DRAM bytes at
// 3.1 TB/s (the read bandwidth measured on an H100 SXM; 3.35 TB/s is the datasheet figure) plus a
// launch cost — 4.7 us for an eager launch (measured with tulu's own decode step on an H100) and
// 1.5 us for a kernel node of a replayed CUDA graph (an assumption until `scripts/gpu-checks`
// calibrates it). Compute time is not modelled for tulu's kernels: decode kernels are bound by
// memory. cuBLASLt calls (prefill's GEMMs, which no instrumented image runs) are lines too: the
// bytes their operands span at 3.1 TB/s or their FLOPs at 796 TFLOP/s (bf16 8192^3 through
// cuBLASLt, measured on an H100; FP8 is predicted at the same rate, conservatively), whichever
// is longer, plus the launch cost.
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "emu.h"

namespace emu {

namespace {

constexpr double kDramBytesPerUs = 3.1e6;  // 3.1 TB/s
constexpr double kEagerLaunchUs = 4.7;
constexpr double kGraphLaunchUs = 1.5;
constexpr double kGemmFlopsPerUs = 796e6;  // 796 TFLOP/s

// A set of sectors as bitmaps of 2 MiB pages (65,536 sectors each): cheap for a launch that
// reads gigabytes of weights.
struct SectorSet {
    std::unordered_map<unsigned long, std::unique_ptr<uint64_t[]>> pages;
    unsigned long long count = 0;
    void add(const unsigned long* s, size_t n) {
        for (size_t i = 0; i < n; i++) {
            auto& page = pages[s[i] >> 16];
            if (!page) page.reset(new uint64_t[1024]());
            const unsigned bit = s[i] & 0xffff;
            uint64_t& word = page[bit >> 6];
            const uint64_t m = 1ull << (bit & 63);
            if (!(word & m)) {
                word |= m;
                count++;
            }
        }
    }
};

struct Counts {
    tulu_emu_profile_counts c[4] = {};  // per tulu_emu_access_kind
    void add(int kind, const tulu_emu_profile_counts& x) {
        tulu_emu_profile_counts& t = c[kind & 3];
        t.requests += x.requests;
        t.units += x.units;
        t.ideal += x.ideal;
        t.bytes += x.bytes;
    }
};

struct KernelTotals {
    Counts counts;
    unsigned long long launches = 0, dram_read = 0, dram_written = 0;
    double predicted_us = 0;
    std::string image;  // the instrumented image's path (addr2line)
    std::map<std::pair<unsigned long, int>, tulu_emu_profile_counts> pcs;
};

std::mutex& totals_mu = *new std::mutex;
std::map<std::string, KernelTotals>& totals = *new std::map<std::string, KernelTotals>;
thread_local bool graph_replay = false;

const char* kind_name(int k) {
    switch (k) {
        case TULU_EMU_KIND_LOAD: return "global_load";
        case TULU_EMU_KIND_STORE: return "global_store";
        case TULU_EMU_KIND_SHARED: return "shared";
        default: return "atomic";
    }
}

// "file.cu:LINE" of an instruction of an image (addr2line, innermost frame).
std::string line_of(const std::string& image, unsigned long pc) {
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "addr2line -s -e '%s' 0x%lx 2>/dev/null", image.c_str(), pc);
    std::string out = "?";
    if (FILE* p = popen(cmd, "r")) {
        char line[512];
        if (fgets(line, sizeof line, p)) {
            line[strcspn(line, "\n")] = 0;
            out = line;
            out = out.substr(0, out.find(" (discriminator"));
        }
        pclose(p);
    }
    return out;
}

void print_counts(FILE* f, const Counts& c) {
    for (int k = 0; k < 4; k++)
        fprintf(f, "\t%llu\t%llu\t%llu\t%llu", c.c[k].requests, c.c[k].units, c.c[k].ideal, c.c[k].bytes);
}

const char* kCountsHeader =
    "ld_requests\tld_sectors\tld_ideal\tld_bytes\tst_requests\tst_sectors\tst_ideal\tst_bytes\t"
    "sh_requests\tsh_wavefronts\tsh_ideal\tsh_bytes\tatomics\tatomic_units\tatomic_ideal\tatomic_bytes";

FILE* open_profile() {
    FILE* f = fopen(config().profile_path.c_str(), "a");
    if (!f) report("TULU_EMU_PROFILE=%s: cannot open it for appending", config().profile_path.c_str());
    return f;
}

// One `launch` line (TULU_EMU_PROFILE_LAUNCHES=1), its header before the first; totals_mu held.
void write_launch_line(const char* kernel, uint64_t seq, const char* grid, const char* block, bool graph,
                       const Counts& c, unsigned long long rd, unsigned long long wr, double us) {
    if (!config().profile_launches) return;
    FILE* f = open_profile();
    if (!f) return;
    static bool header = false;
    if (!header)
        fprintf(f, "# launch\tseq\tkernel\tgrid\tblock\tgraph\t%s\tdram_read_bytes\tdram_write_bytes\t"
                   "predicted_h100_us\n", kCountsHeader);
    header = true;
    fprintf(f, "launch\t%llu\t%s\t%s\t%s\t%d", (unsigned long long)seq, kernel, grid, block, graph ? 1 : 0);
    print_counts(f, c);
    fprintf(f, "\t%llu\t%llu\t%.3f\n", rd, wr, us);
    fclose(f);
}

// At exit: the per-kernel and per-instruction tables.
void write_summary() {
    std::lock_guard<std::mutex> g(totals_mu);
    if (totals.empty()) return;
    FILE* f = open_profile();
    if (!f) return;
    fprintf(f, "# kernel\tname\tlaunches\t%s\tdram_read_bytes\tdram_write_bytes\tpredicted_h100_us\n", kCountsHeader);
    for (const auto& [name, t] : totals) {
        fprintf(f, "kernel\t%s\t%llu", name.c_str(), t.launches);
        print_counts(f, t.counts);
        fprintf(f, "\t%llu\t%llu\t%.3f\n", t.dram_read, t.dram_written, t.predicted_us);
    }
    fprintf(f, "# instr\tkernel\tkind\tsource\trequests\tunits\tideal\tbytes\n");
    for (const auto& [name, t] : totals)
        for (const auto& [key, c] : t.pcs)
            fprintf(f, "instr\t%s\t%s\t%s\t%llu\t%llu\t%llu\t%llu\n", name.c_str(), kind_name(key.second),
                    line_of(t.image, key.first).c_str(), c.requests, c.units, c.ideal, c.bytes);
    fclose(f);
}

}  // namespace

struct LaunchProfile {
    std::mutex mu;
    std::map<std::pair<unsigned long, int>, tulu_emu_profile_counts> pcs;
    SectorSet read, written;
};

bool& in_graph_replay() { return graph_replay; }

unsigned launch_checks(const char* kernel) {
    const Config& c = config();
    for (const std::string& prefix : c.profile_skip)
        if (!strncmp(kernel, prefix.c_str(), prefix.size())) return c.sanitize & ~TULU_EMU_PROFILE;
    return c.sanitize;
}

LaunchProfile* profile_begin(const char* kernel) {
    return (launch_checks(kernel) & TULU_EMU_PROFILE) ? new LaunchProfile : nullptr;
}

void profile_block(void* launch, const tulu_emu_profile_pc* pcs, size_t npcs, const unsigned long* read,
                   size_t nread, const unsigned long* written, size_t nwritten) {
    LaunchProfile* p = (LaunchProfile*)launch;
    std::lock_guard<std::mutex> g(p->mu);
    for (size_t i = 0; i < npcs; i++) {
        tulu_emu_profile_counts& t = p->pcs[{pcs[i].pc, pcs[i].kind}];
        t.requests += pcs[i].c.requests;
        t.units += pcs[i].c.units;
        t.ideal += pcs[i].c.ideal;
        t.bytes += pcs[i].c.bytes;
    }
    p->read.add(read, nread);
    p->written.add(written, nwritten);
}

void profile_end(LaunchProfile* p, const tulu_emu_kernel* k, uint64_t seq, tulu_emu_dim3 grid, tulu_emu_dim3 block) {
    if (!p) return;
    std::unique_ptr<LaunchProfile> owned(p);
    Counts c;
    for (const auto& [key, x] : p->pcs) c.add(key.second, x);
    const unsigned long long rd = p->read.count * 32, wr = p->written.count * 32;
    const bool graph = graph_replay;
    const double us = (graph ? kGraphLaunchUs : kEagerLaunchUs) + (double)(rd + wr) / kDramBytesPerUs;
    static std::once_flag once;
    std::call_once(once, [] { atexit(write_summary); });
    std::lock_guard<std::mutex> g(totals_mu);
    char g_dims[64], b_dims[64];
    snprintf(g_dims, sizeof g_dims, "%u,%u,%u", grid.x, grid.y, grid.z);
    snprintf(b_dims, sizeof b_dims, "%u,%u,%u", block.x, block.y, block.z);
    write_launch_line(k->name, seq, g_dims, b_dims, graph, c, rd, wr, us);
    KernelTotals& t = totals[k->name];
    if (t.image.empty()) {
        Dl_info d{};
        if (dladdr((void*)k->call, &d) && d.dli_fname) t.image = d.dli_fname;
    }
    t.launches++;
    for (int i = 0; i < 4; i++) t.counts.add(i, c.c[i]);
    t.dram_read += rd;
    t.dram_written += wr;
    t.predicted_us += us;
    for (const auto& [key, x] : p->pcs) {
        tulu_emu_profile_counts& y = t.pcs[key];
        y.requests += x.requests;
        y.units += x.units;
        y.ideal += x.ideal;
        y.bytes += x.bytes;
    }
}

void profile_library_call(const char* name, uint64_t m, uint64_t n, uint64_t k, unsigned long long read_bytes,
                          unsigned long long written_bytes, double flops) {
    if (!(config().sanitize & TULU_EMU_PROFILE)) return;
    const bool graph = graph_replay;
    const double memory_us = (double)(read_bytes + written_bytes) / kDramBytesPerUs;
    const double us = (graph ? kGraphLaunchUs : kEagerLaunchUs) + std::max(memory_us, flops / kGemmFlopsPerUs);
    static std::once_flag once;
    std::call_once(once, [] { atexit(write_summary); });
    std::lock_guard<std::mutex> g(totals_mu);
    char mnk[96];
    snprintf(mnk, sizeof mnk, "%llu,%llu,%llu", (unsigned long long)m, (unsigned long long)n, (unsigned long long)k);
    write_launch_line(name, 0, mnk, "0,0,0", graph, Counts{}, read_bytes, written_bytes, us);
    KernelTotals& t = totals[name];
    t.launches++;
    t.dram_read += read_bytes;
    t.dram_written += written_bytes;
    t.predicted_us += us;
}

}  // namespace emu
