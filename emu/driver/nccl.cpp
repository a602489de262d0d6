// NCCL: communicators of ranks in one process (ncclCommInitAll) or in several
// (ncclCommInitRank with the unique id), all-reduce and all-gather, and an abort that wakes
// every blocked peer.
//
// A group lives in a POSIX shared memory segment named by the unique id: a header (join count,
// abort flag, a barrier, each rank's device and posted collective) and one staging slot per
// rank. A collective is a stream op (queued like a kernel, so ncclAllReduce returns at once, as
// real NCCL does — a caller holding a lock across the call cannot deadlock an abort); when it
// runs, each rank copies its chunk into its slot, meets the others at the barrier, and reduces
// the slots in rank order: every rank computes the same bits. bf16 and f16 sums are rounded
// after each rank's addition, as a ring all-reduce does.
#include <fcntl.h>
#include <linux/futex.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "emu.h"
#include "numeric.h"

namespace {

using namespace emu;

enum : int {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
};
enum : int { nccl_i8, nccl_u8, nccl_i32, nccl_u32, nccl_i64, nccl_u64, nccl_f16, nccl_f32, nccl_f64, nccl_bf16 };
enum : int { nccl_sum, nccl_prod, nccl_max, nccl_min, nccl_avg };

constexpr int kMaxRanks = 64;
constexpr size_t kSlot = 4 << 20;
constexpr uint32_t kMagic = 0x7475656d;  // "tuem"
constexpr char kIdMagic[] = "tulu-emu-nccl-id";

struct Post {
    uint64_t seq;
    int kind;  // 1 all-reduce, 2 all-gather
    int dtype, op;
    uint64_t count;
};

struct Header {
    uint32_t magic;
    uint32_t nranks;
    std::atomic<uint32_t> joined;
    std::atomic<uint32_t> aborted;
    std::atomic<uint32_t> barrier_count;
    std::atomic<uint32_t> barrier_gen;
    std::atomic<uint32_t> claimed[kMaxRanks];
    int32_t device[kMaxRanks];
    uint64_t host[kMaxRanks];
    Post post[kMaxRanks];
};

size_t header_bytes() { return (sizeof(Header) + 4095) / 4096 * 4096; }

// One rank's view of a group. Queued collectives hold a reference, so the mapping outlives an
// abort until the last of them has run (in lazy mode some may never run: they keep it).
struct Comm {
    Header* h;
    size_t map_len;
    int rank, nranks, device;
    uint64_t seq = 0;
    std::atomic<bool> aborted{false};
    char* slot(int r) { return (char*)h + header_bytes() + (size_t)r * kSlot; }
    ~Comm() { munmap(h, map_len); }
};

// The handle NCCL's API hands out: ncclComm_t.
struct Handle {
    std::shared_ptr<Comm> c;
};

long futex(std::atomic<uint32_t>* addr, int op, uint32_t val, const timespec* t) {
    return syscall(SYS_futex, (uint32_t*)addr, op, val, t, nullptr, 0);
}

uint64_t host_hash() {
    char name[256] = "";
    gethostname(name, sizeof name - 1);
    uint64_t x = 1469598103934665603ull;
    for (char* p = name; *p; p++) x = (x ^ (unsigned char)*p) * 1099511628211ull;
    return x;
}

// Meets every rank; false when the group was aborted.
bool barrier(Comm* c) {
    Header* h = c->h;
    const uint32_t gen = h->barrier_gen.load(std::memory_order_acquire);
    if (h->aborted.load()) return false;
    if (h->barrier_count.fetch_add(1) + 1 == (uint32_t)c->nranks) {
        h->barrier_count.store(0);
        h->barrier_gen.fetch_add(1, std::memory_order_release);
        futex(&h->barrier_gen, FUTEX_WAKE, INT32_MAX, nullptr);
        return !h->aborted.load();
    }
    const timespec tick{0, 100 * 1000 * 1000};
    while (h->barrier_gen.load(std::memory_order_acquire) == gen) {
        if (h->aborted.load()) return false;
        futex(&h->barrier_gen, FUTEX_WAIT, gen, &tick);
    }
    return !h->aborted.load();
}

std::string segment_name(const char* id) {
    std::string hex;
    char b[3];
    for (int i = 16; i < 48; i++) {
        snprintf(b, sizeof b, "%02x", (unsigned char)id[i]);
        hex += b;
    }
    return "/tulu-emu-nccl-" + hex;
}

// Maps the group named by `id` and claims `rank` on `device`; waits for the others only if
// `wait` (ncclCommInitAll joins every rank first, then checks).
int join(const char* id, int nranks, int rank, int device, Comm** out) {
    if (memcmp(id, kIdMagic, sizeof kIdMagic - 1) != 0) {
        report("ncclCommInitRank: the unique id does not come from this emulator's ncclGetUniqueId");
        return ncclInvalidArgument;
    }
    if (nranks < 1 || nranks > kMaxRanks || rank < 0 || rank >= nranks) {
        report("ncclCommInitRank: rank %d of %d (the emulator allows up to %d ranks)", rank, nranks, kMaxRanks);
        return ncclInvalidArgument;
    }
    const std::string name = segment_name(id);
    int fd = shm_open(name.c_str(), O_CREAT | O_RDWR, 0600);
    if (fd < 0) return ncclSystemError;
    const size_t len = header_bytes() + (size_t)nranks * kSlot;
    if (ftruncate(fd, (off_t)len) != 0) {
        close(fd);
        return ncclSystemError;
    }
    void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (m == MAP_FAILED) return ncclSystemError;
    Header* h = (Header*)m;
    uint32_t zero = 0;
    __atomic_compare_exchange_n(&h->magic, &zero, kMagic, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    __atomic_compare_exchange_n(&h->nranks, &zero, (uint32_t)nranks, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&h->nranks, __ATOMIC_SEQ_CST) != (uint32_t)nranks) {
        report("ncclCommInitRank: rank %d says %d ranks, an earlier rank said %u", rank, nranks, h->nranks);
        munmap(m, len);
        return ncclInvalidUsage;
    }
    if (h->claimed[rank].exchange(1) != 0) {
        report("ncclCommInitRank: rank %d joined twice", rank);
        munmap(m, len);
        return ncclInvalidUsage;
    }
    h->device[rank] = device;
    h->host[rank] = host_hash();
    h->joined.fetch_add(1);
    futex(&h->joined, FUTEX_WAKE, INT32_MAX, nullptr);
    Comm* c = new Comm();
    c->h = h;
    c->map_len = len;
    c->rank = rank;
    c->nranks = nranks;
    c->device = device;
    *out = c;
    return ncclSuccess;
}

// Waits until every rank joined, then checks that no two ranks share a GPU (NCCL refuses it).
int await_group(Comm* c, const std::string& name) {
    Header* h = c->h;
    const timespec tick{0, 100 * 1000 * 1000};
    for (int waited = 0;; waited++) {
        const uint32_t j = h->joined.load();
        if (j == (uint32_t)c->nranks) break;
        if (h->aborted.load()) return ncclRemoteError;
        if (waited > 6000) {
            report("ncclCommInitRank: rank %d waited 10 minutes for %u more ranks", c->rank, c->nranks - j);
            return ncclSystemError;
        }
        futex(&h->joined, FUTEX_WAIT, j, &tick);
    }
    if (c->rank == 0) shm_unlink(name.c_str());  // every rank has it mapped: the name can go
    for (int a = 0; a < c->nranks; a++)
        for (int b = a + 1; b < c->nranks; b++)
            if (h->device[a] == h->device[b] && h->host[a] == h->host[b]) {
                report("NCCL: duplicate GPU detected: rank %d and rank %d both use cuda:%d", a, b, h->device[a]);
                return ncclInvalidUsage;
            }
    return ncclSuccess;
}

size_t dtype_size(int t) {
    switch (t) {
        case nccl_i8: case nccl_u8: return 1;
        case nccl_f16: case nccl_bf16: return 2;
        case nccl_i32: case nccl_u32: case nccl_f32: return 4;
        case nccl_i64: case nccl_u64: case nccl_f64: return 8;
        default: return 0;
    }
}

template <class T>
T combine(T a, T b, int op) {
    switch (op) {
        case nccl_sum: return a + b;
        case nccl_prod: return a * b;
        case nccl_max: return a > b ? a : b;
        default: return a < b ? a : b;
    }
}

template <class T>
void reduce_typed(Comm* c, size_t off, size_t n, int op, T* out) {
    const T* s0 = (const T*)(c->slot(0) + off);
    for (size_t i = 0; i < n; i++) {
        T acc = s0[i];
        for (int r = 1; r < c->nranks; r++) acc = combine(acc, ((const T*)(c->slot(r) + off))[i], op);
        out[i] = acc;
    }
}

template <float (*Load)(uint16_t), uint16_t (*Store)(float)>
void reduce_half(Comm* c, size_t off, size_t n, int op, uint16_t* out) {
    for (size_t i = 0; i < n; i++) {
        float acc = Load(((const uint16_t*)(c->slot(0) + off))[i]);
        for (int r = 1; r < c->nranks; r++)
            acc = Load(Store(combine(acc, Load(((const uint16_t*)(c->slot(r) + off))[i]), op)));
        out[i] = Store(acc);
    }
}

void reduce(Comm* c, size_t bytes, int dtype, int op, void* out) {
    const size_t n = bytes / dtype_size(dtype);
    switch (dtype) {
        case nccl_bf16: reduce_half<bf16_to_f32, f32_to_bf16>(c, 0, n, op, (uint16_t*)out); break;
        case nccl_f16: reduce_half<f16_to_f32, f32_to_f16>(c, 0, n, op, (uint16_t*)out); break;
        case nccl_f32: reduce_typed(c, 0, n, op, (float*)out); break;
        case nccl_f64: reduce_typed(c, 0, n, op, (double*)out); break;
        case nccl_i32: reduce_typed(c, 0, n, op, (int32_t*)out); break;
        case nccl_u32: reduce_typed(c, 0, n, op, (uint32_t*)out); break;
        case nccl_i64: reduce_typed(c, 0, n, op, (int64_t*)out); break;
        case nccl_u64: reduce_typed(c, 0, n, op, (uint64_t*)out); break;
        case nccl_i8: reduce_typed(c, 0, n, op, (int8_t*)out); break;
        default: reduce_typed(c, 0, n, op, (uint8_t*)out); break;
    }
}

// Posts this rank's collective and checks, after the barrier, that every rank posted the same.
bool agree(Comm* c, const Post& p, const char* what) {
    c->h->post[c->rank] = p;
    if (!barrier(c)) return false;
    for (int r = 0; r < c->nranks; r++) {
        const Post& q = c->h->post[r];
        if (q.seq != p.seq || q.kind != p.kind || q.dtype != p.dtype || q.op != p.op || q.count != p.count) {
            report("NCCL %s #%llu: rank %d called a different collective (kind %d, %llu elements of type %d) than "
                   "rank %d (kind %d, %llu of type %d) — on GPUs this hangs or corrupts data",
                   what, (unsigned long long)p.seq, r, q.kind, (unsigned long long)q.count, q.dtype, c->rank, p.kind,
                   (unsigned long long)p.count, p.dtype);
            return false;
        }
    }
    return true;
}

void all_reduce(Comm* c, const char* send, char* recv, size_t count, int dtype, int op, uint64_t seq) {
    Running& r = running();
    r.what = "ncclAllReduce";
    const size_t es = dtype_size(dtype), total = count * es, chunk = kSlot / es * es;
    if (agree(c, Post{seq, 1, dtype, op, count}, "all-reduce")) {
        if (total == 0) barrier(c);  // keep the posts until every rank has read them
        for (size_t off = 0; off < total; off += chunk) {
            const size_t len = std::min(chunk, total - off);
            memcpy(c->slot(c->rank), send + off, len);
            if (!barrier(c)) break;
            reduce(c, len, dtype, op, recv + off);
            if (!barrier(c)) break;
        }
    }
    r.what = nullptr;
}

void all_gather(Comm* c, const char* send, char* recv, size_t count, int dtype, uint64_t seq) {
    Running& r = running();
    r.what = "ncclAllGather";
    const size_t total = count * dtype_size(dtype);
    if (agree(c, Post{seq, 2, dtype, 0, count}, "all-gather")) {
        if (total == 0) barrier(c);
        for (size_t off = 0; off < total; off += kSlot) {
            const size_t len = std::min(kSlot, total - off);
            memcpy(c->slot(c->rank), send + off, len);
            if (!barrier(c)) break;
            for (int k = 0; k < c->nranks; k++) memcpy(recv + (size_t)k * total + off, c->slot(k), len);
            if (!barrier(c)) break;
        }
    }
    r.what = nullptr;
}

// Checks a collective's buffers and stream, then queues it on the stream.
int enqueue(const std::shared_ptr<Comm>& c, const void* send, void* recv, size_t send_bytes, size_t recv_bytes,
            void* stream, const char* what, std::function<void()> body) {
    if (c->aborted.load() || c->h->aborted.load()) return ncclRemoteError;
    Stream* s = resolve_stream(stream);
    if (!s) return ncclInvalidUsage;
    if (s->ctx->device != c->device) {
        report("%s: rank %d's communicator is on cuda:%d but the stream is cuda:%d's", what, c->rank, c->device,
               s->ctx->device);
        return ncclInvalidUsage;
    }
    if (send_bytes && device_of_range((CUdeviceptr)send, send_bytes) != c->device) {
        report("%s: the send buffer is not %zu bytes of cuda:%d memory", what, send_bytes, c->device);
        return ncclInvalidArgument;
    }
    if (recv_bytes && device_of_range((CUdeviceptr)recv, recv_bytes) != c->device) {
        report("%s: the receive buffer is not %zu bytes of cuda:%d memory", what, recv_bytes, c->device);
        return ncclInvalidArgument;
    }
    Op op;
    op.what = what;
    op.collective = true;
    op.run = [c, body = std::move(body), send, recv] {
        if (c->aborted.load() || c->h->aborted.load()) return;  // the group is gone: do nothing
        touch((CUdeviceptr)send);
        touch((CUdeviceptr)recv);
        body();
    };
    return submit(s, std::move(op)) == CUDA_SUCCESS ? ncclSuccess : ncclUnhandledCudaError;
}

}  // namespace

EMU_EXPORT int ncclGetVersion(int* version) {
    if (!version) return ncclInvalidArgument;
    *version = 22700;
    return ncclSuccess;
}

EMU_EXPORT int ncclGetUniqueId(char* id) {
    if (!id) return ncclInvalidArgument;
    memset(id, 0, 128);
    memcpy(id, kIdMagic, sizeof kIdMagic - 1);
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    bool ok = fd >= 0 && read(fd, id + 16, 32) == 32;
    if (fd >= 0) close(fd);
    if (!ok) return ncclSystemError;
    return ncclSuccess;
}

// ncclUniqueId is passed by value (a 128-byte struct); declaring it so lets the compiler follow
// the platform's ABI for it.
struct UniqueId {
    char internal[128];
};

EMU_EXPORT int ncclCommInitRank(Handle** comm, int nranks, UniqueId id, int rank) {
    if (!comm) return ncclInvalidArgument;
    Context* ctx = current_context();
    const int device = ctx ? ctx->device : 0;
    if (device >= config().devices) return ncclUnhandledCudaError;
    Comm* c = nullptr;
    if (int e = join(id.internal, nranks, rank, device, &c)) return e;
    std::shared_ptr<Comm> owned(c);
    if (int e = await_group(c, segment_name(id.internal))) {
        c->h->aborted.store(1);
        futex(&c->h->barrier_gen, FUTEX_WAKE, INT32_MAX, nullptr);
        return e;
    }
    *comm = new Handle{owned};
    return ncclSuccess;
}

EMU_EXPORT int ncclCommInitAll(Handle** comms, int ndev, const int* devlist) {
    if (!comms || ndev < 1) return ncclInvalidArgument;
    UniqueId id;
    if (int e = ncclGetUniqueId(id.internal)) return e;
    std::vector<std::shared_ptr<Comm>> made;
    for (int r = 0; r < ndev; r++) {
        const int device = devlist ? devlist[r] : r;
        if (device < 0 || device >= config().devices) {
            report("ncclCommInitAll: rank %d on cuda:%d, which does not exist", r, device);
            return ncclInvalidArgument;
        }
        Comm* c = nullptr;
        if (int e = join(id.internal, ndev, r, device, &c)) return e;
        made.emplace_back(c);
    }
    for (auto& c : made)
        if (int e = await_group(c.get(), segment_name(id.internal))) return e;
    for (int r = 0; r < ndev; r++) comms[r] = new Handle{made[r]};
    return ncclSuccess;
}

// Aborts the group for every rank: peers blocked in a collective return at once, queued and
// later collectives do nothing, and the API refuses new ones.
EMU_EXPORT int ncclCommAbort(Handle* handle) {
    if (!handle) return ncclSuccess;
    Comm* c = handle->c.get();
    c->aborted.store(true);
    c->h->aborted.store(1);
    futex(&c->h->barrier_gen, FUTEX_WAKE, INT32_MAX, nullptr);
    futex(&c->h->joined, FUTEX_WAKE, INT32_MAX, nullptr);
    delete handle;
    return ncclSuccess;
}

EMU_EXPORT int ncclCommDestroy(Handle* handle) {
    if (!handle) return ncclSuccess;
    delete handle;  // queued collectives keep what they need
    return ncclSuccess;
}

EMU_EXPORT int ncclCommFinalize(Handle* c) { return c ? ncclSuccess : ncclInvalidArgument; }

EMU_EXPORT int ncclCommCount(const Handle* c, int* count) {
    if (!c || !count) return ncclInvalidArgument;
    *count = c->c->nranks;
    return ncclSuccess;
}

EMU_EXPORT int ncclCommCuDevice(const Handle* c, int* device) {
    if (!c || !device) return ncclInvalidArgument;
    *device = c->c->device;
    return ncclSuccess;
}

EMU_EXPORT int ncclCommUserRank(const Handle* c, int* rank) {
    if (!c || !rank) return ncclInvalidArgument;
    *rank = c->c->rank;
    return ncclSuccess;
}

EMU_EXPORT int ncclCommGetAsyncError(Handle* c, int* error) {
    if (!c || !error) return ncclInvalidArgument;
    *error = c->c->h->aborted.load() ? ncclRemoteError : ncclSuccess;
    return ncclSuccess;
}

EMU_EXPORT int ncclGroupStart() { return ncclSuccess; }
EMU_EXPORT int ncclGroupEnd() { return ncclSuccess; }

EMU_EXPORT const char* ncclGetErrorString(int result) {
    switch (result) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error";
        case ncclSystemError: return "unhandled system error";
        case ncclInternalError: return "internal error";
        case ncclInvalidArgument: return "invalid argument";
        case ncclInvalidUsage: return "invalid usage";
        case ncclRemoteError: return "remote process exited or there was a network error (or the group was aborted)";
        default: return "unknown result code";
    }
}

EMU_EXPORT int ncclAllReduce(const void* send, void* recv, size_t count, int dtype, int op, Handle* handle,
                             void* stream) {
    const size_t es = dtype_size(dtype);
    if (!es || op < nccl_sum || op > nccl_min) {
        report("ncclAllReduce: data type %d / reduction %d not emulated", dtype, op);
        return ncclInvalidArgument;
    }
    if (!handle) return ncclInvalidArgument;
    std::shared_ptr<Comm> c = handle->c;
    const uint64_t seq = ++c->seq;
    Comm* raw = c.get();
    return enqueue(c, send, recv, count * es, count * es, stream, "ncclAllReduce",
                   [=] { all_reduce(raw, (const char*)send, (char*)recv, count, dtype, op, seq); });
}

EMU_EXPORT int ncclAllGather(const void* send, void* recv, size_t count, int dtype, Handle* handle, void* stream) {
    const size_t es = dtype_size(dtype);
    if (!es || !handle) return ncclInvalidArgument;
    std::shared_ptr<Comm> c = handle->c;
    const uint64_t seq = ++c->seq;
    Comm* raw = c.get();
    return enqueue(c, send, recv, count * es, count * es * (size_t)c->nranks, stream, "ncclAllGather",
                   [=] { all_gather(raw, (const char*)send, (char*)recv, count, dtype, seq); });
}
