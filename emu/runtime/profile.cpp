// The profiler (TULU_EMU_PROFILE, docs/cuda-emu.md): what Nsight Compute's memory tables count,
// from the hooks an instrumented image calls for every load and store (emu/runtime/sanitize.cpp).
//
// A GPU issues a memory instruction once per warp: its 32 lanes' addresses make one *request*,
// served in 32-byte sectors (global memory) or in wavefronts of the 32 shared-memory banks (one
// 4-byte word per bank per wavefront; lanes reading the same word share it). The fibers run the
// lanes of a warp one after another between barriers and warp operations, so lanes' accesses do
// not arrive together. They are grouped afterwards: the n-th execution of one static
// instruction (its return address) by each lane of one warp since the last __syncthreads is one
// request — what lockstep execution of converged lanes would issue together. A hook only
// appends the access to the block's list; the grouping and counting happen when a barrier
// opens and when the block ends (sorting the accesses by warp, instruction and occurrence).
#include "profile.h"

#include <string.h>

#include <algorithm>
#include <unordered_map>
#include <vector>

namespace tulu_emu {

namespace {

struct Access {
    uintptr_t addr;
    uint32_t pc;
    uint16_t tid;
    uint8_t size, kind;
};

// (kind, warp, pc, occurrence) in one word, sorted by it: one request's accesses are adjacent.
struct Keyed {
    uint64_t key;
    uintptr_t addr;
    unsigned size;
};

}  // namespace

struct Profile {
    std::vector<Access> pending;  // accesses since the last barrier
    std::unordered_map<uint64_t, uint32_t> occurrences;
    std::vector<Keyed> keyed;
    std::unordered_map<uint64_t, tulu_emu_profile_pc> pcs;  // (pc, kind) -> counts
    std::vector<unsigned long> read, written;                // sectors (address / 32)
};

namespace {

void count(Profile* p, uint32_t pc, int kind, unsigned long long units, unsigned long long ideal,
           unsigned long long bytes) {
    tulu_emu_profile_pc& r = p->pcs[(uint64_t)pc << 2 | (unsigned)kind];
    r.pc = pc;
    r.kind = kind;
    r.c.requests++;
    r.c.units += units;
    r.c.ideal += ideal;
    r.c.bytes += bytes;
}

// One request: accesses [b, e) of p->keyed, sorted by address.
void request(Profile* p, const Keyed* b, const Keyed* e) {
    const int kind = (int)(b->key >> 62);
    const uint32_t pc = (uint32_t)(b->key >> 25);
    unsigned long long bytes = 0;
    uintptr_t last_addr = ~(uintptr_t)0;
    if (kind == TULU_EMU_KIND_SHARED) {
        unsigned words[32] = {0};
        uintptr_t last_word[32];
        memset(last_word, 0xff, sizeof last_word);
        for (const Keyed* k = b; k < e; k++) {
            if (k->addr != last_addr) bytes += k->size;
            last_addr = k->addr;
            for (uintptr_t w = k->addr >> 2; w <= (k->addr + k->size - 1) >> 2; w++) {
                const unsigned bank = w & 31;
                if (last_word[bank] != w) words[bank]++;  // sorted: a repeat is the last one seen
                last_word[bank] = w;
            }
        }
        const unsigned wavefronts = std::max(1u, *std::max_element(words, words + 32));
        count(p, pc, kind, wavefronts, std::max<unsigned long long>(1, (bytes + 127) / 128), bytes);
        return;
    }
    std::vector<unsigned long>& sectors = kind == TULU_EMU_KIND_LOAD ? p->read : p->written;
    unsigned long long n = 0;
    unsigned long last = ~0ul;
    for (const Keyed* k = b; k < e; k++) {
        if (k->addr != last_addr) bytes += k->size;
        last_addr = k->addr;
        for (unsigned long s = k->addr >> 5; s <= (k->addr + k->size - 1) >> 5; s++)
            if (s != last) {
                n++;
                last = s;
                sectors.push_back(s);
            }
    }
    count(p, pc, kind, n, std::max<unsigned long long>(1, (bytes + 31) / 32), bytes);
}

void flush(Profile* p) {
    if (p->pending.empty()) return;
    p->occurrences.clear();
    p->keyed.clear();
    p->keyed.reserve(p->pending.size());
    for (const Access& a : p->pending) {
        // Atomics are counted one per access (each is its own read-modify-write in L2).
        if (a.kind == TULU_EMU_KIND_ATOMIC) {
            count(p, a.pc, TULU_EMU_KIND_ATOMIC, 1, 1, a.size);
            p->written.push_back(a.addr >> 5);
            continue;
        }
        const uint32_t occ = p->occurrences[(uint64_t)a.tid << 32 | a.pc]++;
        const uint64_t key = (uint64_t)(a.kind & 3) << 62 | (uint64_t)(a.tid >> 5 & 31) << 57 |
                             (uint64_t)a.pc << 25 | (occ & 0x1ffffffu);
        p->keyed.push_back(Keyed{key, a.addr, a.size});
    }
    p->pending.clear();
    std::sort(p->keyed.begin(), p->keyed.end(),
              [](const Keyed& x, const Keyed& y) { return x.key != y.key ? x.key < y.key : x.addr < y.addr; });
    for (size_t i = 0; i < p->keyed.size();) {
        size_t j = i + 1;
        while (j < p->keyed.size() && p->keyed[j].key == p->keyed[i].key) j++;
        request(p, p->keyed.data() + i, p->keyed.data() + j);
        i = j;
    }
}

void sort_unique(std::vector<unsigned long>& v) {
    std::sort(v.begin(), v.end());
    v.erase(std::unique(v.begin(), v.end()), v.end());
}

}  // namespace

Profile* prof_begin() {
    static thread_local Profile* p = nullptr;
    if (!p) p = new Profile;
    p->pending.clear();
    p->pcs.clear();
    p->read.clear();
    p->written.clear();
    return p;
}

void prof_access(Profile* p, unsigned tid, uintptr_t addr, unsigned size, int kind, uint32_t pc) {
    if (size == 0) return;
    p->pending.push_back(Access{addr, pc, (uint16_t)tid, (uint8_t)std::min(size, 255u), (uint8_t)kind});
}

void prof_barrier(Profile* p) { flush(p); }

void prof_end(Profile* p, tulu_emu_block* job) {
    flush(p);
    if (!job->profile) return;
    sort_unique(p->read);
    sort_unique(p->written);
    std::vector<tulu_emu_profile_pc> pcs;
    pcs.reserve(p->pcs.size());
    for (const auto& kv : p->pcs) pcs.push_back(kv.second);
    job->profile(job->profile_launch, pcs.data(), pcs.size(), p->read.data(), p->read.size(), p->written.data(),
                 p->written.size());
}

}  // namespace tulu_emu
