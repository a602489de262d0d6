// Streams, events and graphs.
//
// Every stream is a FIFO of ops drained by one executor at a time. In the default synchronous
// mode a call returns after its op ran (run inline on the caller when the stream is idle) —
// except NCCL collectives, which, as with real NCCL, are only queued: they wait for their peers
// on the stream's executor thread, never inside the API call. In asynchronous mode
// (TULU_EMU_STREAMS=async) ops run only when something waits for them (a stream or event
// synchronize, a copy to pageable memory, another stream waiting on an event): the laziest
// legal GPU, so a host read that skips a synchronization sees stale data every time.
//
// Stream capture records ops (kernel parameters were copied when the launch was made, as CUDA
// does) into a graph; launching the instantiated graph queues a copy of each node.
#include <string.h>
#include <time.h>

#include "emu.h"

namespace emu {

namespace {

void executor_loop(Stream* s) {
    std::unique_lock<std::mutex> g(s->mu);
    for (;;) {
        s->cv.wait(g, [s] {
            if (s->stop && s->queue.empty()) return true;
            if (s->busy || s->queue.empty()) return false;
            return !config().async || s->flush_to >= s->queue.front().first;
        });
        if (s->queue.empty()) return;  // stopping
        auto item = std::move(s->queue.front());
        s->queue.pop_front();
        s->busy = true;
        g.unlock();
        item.second.run();
        g.lock();
        s->busy = false;
        s->completed = item.first;
        s->cv.notify_all();
    }
}

}  // namespace

Stream* new_stream(Context* ctx, unsigned flags) {
    Stream* s = new Stream();
    s->ctx = ctx;
    s->flags = flags;
    s->executor = std::thread(executor_loop, s);
    return s;
}

void destroy_stream(Stream* s) {
    drain(s);
    {
        std::lock_guard<std::mutex> g(s->mu);
        s->stop = true;
    }
    s->cv.notify_all();
    s->executor.join();
    delete s;
}

Stream* resolve_stream(void* handle) {
    if (handle) return (Stream*)handle;
    Context* c = current_context();
    return c ? c->null_stream : nullptr;
}

bool capturing(Stream* s) {
    std::lock_guard<std::mutex> g(s->mu);
    return s->capture != nullptr;
}

CUresult refuse_in_capture(Stream* s, const char* what) {
    std::lock_guard<std::mutex> g(s->mu);
    if (s->capture && !s->capture_invalid) {
        report("stream capture: %s is not allowed while capturing; the capture is invalidated", what);
        s->capture_invalid = true;
    }
    return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
}

CUresult submit(Stream* s, Op op, uint64_t* id_out) {
    std::unique_lock<std::mutex> g(s->mu);
    if (s->capture) {
        if (s->capture_invalid) return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
        s->capture->nodes.push_back(std::move(op));
        if (id_out) *id_out = 0;
        return CUDA_SUCCESS;
    }
    const uint64_t id = s->next_id++;
    if (id_out) *id_out = id;
    const bool sync = !config().async;
    if (sync && !op.collective && s->queue.empty() && !s->busy) {
        // Idle stream: run here, on the caller's thread.
        s->busy = true;
        g.unlock();
        op.run();
        g.lock();
        s->busy = false;
        s->completed = id;
        s->cv.notify_all();
        return sticky(s->ctx);
    }
    const bool collective = op.collective;
    s->queue.emplace_back(id, std::move(op));
    // A collective needs its peers' collectives to run, and theirs need it: even a lazy stream
    // runs up to and including a collective (as a GPU would, eventually), or a rank whose host
    // never waits on its stream would hang the others.
    if (collective && id > s->flush_to) s->flush_to = id;
    s->cv.notify_all();
    if (sync && !collective) {
        s->cv.wait(g, [s, id] { return s->completed >= id; });
        return sticky(s->ctx);
    }
    return CUDA_SUCCESS;
}

void wait_for(Stream* s, uint64_t id) {
    std::unique_lock<std::mutex> g(s->mu);
    if (id > s->flush_to) {
        s->flush_to = id;
        s->cv.notify_all();
    }
    s->cv.wait(g, [s, id] { return s->completed >= id; });
}

void drain(Stream* s) {
    uint64_t last;
    {
        std::lock_guard<std::mutex> g(s->mu);
        last = s->next_id - 1;
    }
    wait_for(s, last);
}

void drain_context(Context* ctx) {
    std::vector<Stream*> streams;
    {
        std::lock_guard<std::mutex> g(ctx->mu);
        streams = ctx->streams;
    }
    for (Stream* s : streams) drain(s);
}

}  // namespace emu

// ---------------------------------------------------------------------------------------------
// Entry points.

using namespace emu;

namespace {

double now_ms() {
    timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

struct Event {
    unsigned flags = 0;
    std::mutex mu;
    Stream* stream = nullptr;  // of the latest record
    uint64_t id = 0;           // the latest record's op
    uint64_t generation = 0;
    bool done = false;
    double time_ms = 0;
    bool captured = false;
};

struct GraphExec {
    std::vector<Op> nodes;
};

// Whether the event's latest record has run (requesting it in lazy mode when `force`).
void event_wait(Event* e) {
    Stream* s;
    uint64_t id;
    {
        std::lock_guard<std::mutex> g(e->mu);
        s = e->stream;
        id = e->id;
    }
    if (s) wait_for(s, id);
}

}  // namespace

EMU_EXPORT CUresult cuStreamCreate(void** out, unsigned flags) {
    Context* c = current_context();
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    Stream* s = new_stream(c, flags);
    {
        std::lock_guard<std::mutex> g(c->mu);
        c->streams.push_back(s);
    }
    *out = s;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuStreamCreateWithPriority(void** out, unsigned flags, int) { return cuStreamCreate(out, flags); }

EMU_EXPORT CUresult cuStreamDestroy_v2(void* handle) {
    if (!handle) return CUDA_ERROR_INVALID_HANDLE;
    Stream* s = (Stream*)handle;
    Context* c = s->ctx;
    {
        std::lock_guard<std::mutex> g(c->mu);
        auto& v = c->streams;
        for (size_t i = 1; i < v.size(); i++)
            if (v[i] == s) {
                v.erase(v.begin() + (long)i);
                break;
            }
    }
    destroy_stream(s);
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuStreamSynchronize(void* handle) {
    Stream* s = resolve_stream(handle);
    if (!s) return CUDA_ERROR_INVALID_CONTEXT;
    if (capturing(s)) return refuse_in_capture(s, "cuStreamSynchronize");
    drain(s);
    return sticky(s->ctx);
}

EMU_EXPORT CUresult cuStreamQuery(void* handle) {
    Stream* s = resolve_stream(handle);
    if (!s) return CUDA_ERROR_INVALID_CONTEXT;
    std::lock_guard<std::mutex> g(s->mu);
    if (s->completed + 1 >= s->next_id) return CUDA_SUCCESS;
    s->flush_to = s->next_id - 1;  // a GPU would get there by itself
    s->cv.notify_all();
    return CUDA_ERROR_NOT_READY;
}

EMU_EXPORT CUresult cuEventCreate(void** out, unsigned flags) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    Event* e = new Event();
    e->flags = flags;
    *out = e;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuEventDestroy_v2(void* handle) {
    if (!handle) return CUDA_ERROR_INVALID_HANDLE;
    // A record still queued refers to the event: let it run first.
    event_wait((Event*)handle);
    delete (Event*)handle;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuEventRecord(void* handle, void* stream) {
    if (!handle) return CUDA_ERROR_INVALID_HANDLE;
    Event* e = (Event*)handle;
    Stream* s = resolve_stream(stream);
    if (!s) return CUDA_ERROR_INVALID_CONTEXT;
    uint64_t gen;
    {
        std::lock_guard<std::mutex> g(e->mu);
        gen = ++e->generation;
        e->done = false;
    }
    Op op;
    op.what = "cuEventRecord";
    op.run = [e, gen] {
        std::lock_guard<std::mutex> g(e->mu);
        if (e->generation == gen) {
            e->done = true;
            e->time_ms = now_ms();
        }
    };
    uint64_t id = 0;
    const bool captured = capturing(s);
    CUresult r = submit(s, std::move(op), &id);
    std::lock_guard<std::mutex> g(e->mu);
    e->captured = captured;
    e->stream = captured ? nullptr : s;
    e->id = id;
    return r;
}

EMU_EXPORT CUresult cuEventRecordWithFlags(void* handle, void* stream, unsigned) { return cuEventRecord(handle, stream); }

EMU_EXPORT CUresult cuEventSynchronize(void* handle) {
    if (!handle) return CUDA_ERROR_INVALID_HANDLE;
    event_wait((Event*)handle);
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuEventQuery(void* handle) {
    if (!handle) return CUDA_ERROR_INVALID_HANDLE;
    Event* e = (Event*)handle;
    Stream* s;
    uint64_t id;
    {
        std::lock_guard<std::mutex> g(e->mu);
        s = e->stream;
        id = e->id;
    }
    if (!s) return CUDA_SUCCESS;
    std::lock_guard<std::mutex> g(s->mu);
    if (s->completed >= id) return CUDA_SUCCESS;
    if (id > s->flush_to) {
        s->flush_to = id;
        s->cv.notify_all();
    }
    return CUDA_ERROR_NOT_READY;
}

EMU_EXPORT CUresult cuEventElapsedTime(float* ms, void* start, void* end) {
    if (!ms || !start || !end) return CUDA_ERROR_INVALID_VALUE;
    Event* a = (Event*)start;
    Event* b = (Event*)end;
    if ((a->flags | b->flags) & 2) return CUDA_ERROR_INVALID_HANDLE;  // CU_EVENT_DISABLE_TIMING
    std::lock_guard<std::mutex> ga(a->mu);
    std::unique_lock<std::mutex> gb(b->mu, std::defer_lock);
    if (a != b) gb.lock();
    if (a->generation == 0 || b->generation == 0) return CUDA_ERROR_INVALID_HANDLE;
    if (!a->done || !b->done) return CUDA_ERROR_NOT_READY;
    *ms = (float)(b->time_ms - a->time_ms);
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) { return cuEventElapsedTime(ms, start, end); }

EMU_EXPORT CUresult cuStreamWaitEvent(void* stream, void* event, unsigned) {
    if (!event) return CUDA_ERROR_INVALID_HANDLE;
    Stream* s = resolve_stream(stream);
    if (!s) return CUDA_ERROR_INVALID_CONTEXT;
    Event* e = (Event*)event;
    Stream* other;
    uint64_t id;
    bool captured;
    {
        std::lock_guard<std::mutex> g(e->mu);
        other = e->stream;
        id = e->id;
        captured = e->captured;
    }
    if (captured) {
        report("cuStreamWaitEvent on an event recorded during capture: multi-stream capture is not emulated");
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if (!other || other == s) return CUDA_SUCCESS;  // never recorded, or already ordered
    if (capturing(s)) {
        // Waiting on work outside the capture: it finished or will, before replay matters.
        Op op;
        op.what = "cuStreamWaitEvent";
        op.run = [] {};
        return submit(s, std::move(op));
    }
    Op op;
    op.what = "cuStreamWaitEvent";
    op.run = [other, id] { wait_for(other, id); };
    return submit(s, std::move(op));
}

EMU_EXPORT CUresult cuStreamBeginCapture_v2(void* stream, int mode) {
    Stream* s = resolve_stream(stream);
    if (!s || !stream) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;  // the legacy NULL stream cannot capture
    drain(s);
    std::lock_guard<std::mutex> g(s->mu);
    if (s->capture) return CUDA_ERROR_INVALID_VALUE;
    s->capture = new Graph();
    s->capture_mode = mode;
    s->capture_invalid = false;
    s->capture_thread = std::this_thread::get_id();
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuStreamBeginCapture(void* stream, int mode) { return cuStreamBeginCapture_v2(stream, mode); }

EMU_EXPORT CUresult cuStreamEndCapture(void* stream, void** graph) {
    Stream* s = resolve_stream(stream);
    if (!s || !graph) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(s->mu);
    if (!s->capture) return CUDA_ERROR_STREAM_CAPTURE_UNMATCHED;
    const int thread_local_mode = 1;
    if (s->capture_mode == thread_local_mode && s->capture_thread != std::this_thread::get_id())
        return CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD;
    Graph* captured = s->capture;
    s->capture = nullptr;
    if (s->capture_invalid) {
        delete captured;
        *graph = nullptr;
        return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    }
    *graph = captured;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuStreamIsCapturing(void* stream, int* status) {
    Stream* s = resolve_stream(stream);
    if (!s || !status) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> g(s->mu);
    // CU_STREAM_CAPTURE_STATUS_NONE = 0, ACTIVE = 1, INVALIDATED = 2
    *status = !s->capture ? 0 : s->capture_invalid ? 2 : 1;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    if (!exec || !graph) return CUDA_ERROR_INVALID_VALUE;
    GraphExec* x = new GraphExec();
    x->nodes = ((Graph*)graph)->nodes;  // an executable graph is a snapshot of its graph
    *exec = x;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuGraphLaunch(void* exec, void* stream) {
    if (!exec) return CUDA_ERROR_INVALID_VALUE;
    Stream* s = resolve_stream(stream);
    if (!s) return CUDA_ERROR_INVALID_CONTEXT;
    for (const Op& node : ((GraphExec*)exec)->nodes) {
        Op op = node;
        // The profiler's predicted launch cost is a graph node's, not an eager launch's.
        op.run = [run = node.run] {
            in_graph_replay() = true;
            run();
            in_graph_replay() = false;
        };
        if (CUresult e = submit(s, std::move(op))) return e;
    }
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuGraphUpload(void* exec, void*) { return exec ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE; }

EMU_EXPORT CUresult cuGraphExecDestroy(void* exec) {
    delete (GraphExec*)exec;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuGraphDestroy(void* graph) {
    delete (Graph*)graph;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuLaunchHostFunc(void* stream, void (*fn)(void*), void* data) {
    Stream* s = resolve_stream(stream);
    if (!s || !fn) return CUDA_ERROR_INVALID_VALUE;
    Op op;
    op.what = "cuLaunchHostFunc";
    op.run = [fn, data] { fn(data); };
    return submit(s, std::move(op));
}
