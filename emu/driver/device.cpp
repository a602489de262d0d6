// The emulated driver's devices and contexts: cuInit, cuDevice*, cuDevicePrimaryCtx*, cuCtx*,
// cuGetErrorString. Devices exist only when TULU_EMU_DEVICES says so.
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <map>

#include "emu.h"
#include "tulu_emu_abi.h"

namespace emu {

namespace {

size_t parse_bytes(const char* s, size_t fallback) {
    if (!s || !*s) return fallback;
    char* end = nullptr;
    double v = strtod(s, &end);
    std::string unit(end ? end : "");
    double mul = 1;
    if (unit == "K" || unit == "KiB") mul = 1024.0;
    else if (unit == "M" || unit == "MiB") mul = 1024.0 * 1024;
    else if (unit == "G" || unit == "GiB") mul = 1024.0 * 1024 * 1024;
    else if (unit == "KB") mul = 1e3;
    else if (unit == "MB") mul = 1e6;
    else if (unit == "GB") mul = 1e9;
    else if (!unit.empty()) {
        report("TULU_EMU_MEMORY=%s: unknown unit '%s' (use bytes, MiB, GiB, MB or GB)", s, unit.c_str());
        return fallback;
    }
    return (size_t)(v * mul);
}

Config read_config() {
    Config c;
    if (const char* d = getenv("TULU_EMU_DEVICES")) c.devices = atoi(d);
    if (c.devices < 0) c.devices = 0;
    c.memory = parse_bytes(getenv("TULU_EMU_MEMORY"), (size_t)8 << 30);
    if (const char* s = getenv("TULU_EMU_SMS")) c.sms = atoi(s) > 0 ? atoi(s) : c.sms;
    if (const char* s = getenv("TULU_EMU_CC")) {
        int major = 0, minor = 0;
        if (sscanf(s, "%d.%d", &major, &minor) == 2 && major > 0) {
            c.cc_major = major;
            c.cc_minor = minor;
        } else {
            report("TULU_EMU_CC=%s: expected MAJOR.MINOR, e.g. 9.0", s);
        }
    }
    if (const char* s = getenv("TULU_EMU_SCHEDULE")) {
        if (!strcmp(s, "forward")) c.schedule = TULU_EMU_FORWARD;
        else if (!strcmp(s, "reverse")) c.schedule = TULU_EMU_REVERSE;
        else if (!strncmp(s, "random:", 7)) {
            c.schedule = TULU_EMU_RANDOM;
            c.seed = strtoull(s + 7, nullptr, 0);
        } else if (!strcmp(s, "random")) {
            c.schedule = TULU_EMU_RANDOM;
        } else {
            report("TULU_EMU_SCHEDULE=%s: expected forward, reverse or random:SEED", s);
        }
    }
    if (const char* s = getenv("TULU_EMU_STREAMS")) {
        if (!strcmp(s, "async")) c.async = true;
        else if (strcmp(s, "sync")) report("TULU_EMU_STREAMS=%s: expected sync or async", s);
    }
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    c.threads = cpus > 0 ? (int)cpus : 1;
    if (const char* s = getenv("TULU_EMU_THREADS")) c.threads = atoi(s) > 0 ? atoi(s) : c.threads;
    if (const char* s = getenv("TULU_EMU_MEMORY_POOLS")) c.memory_pools = strcmp(s, "0") != 0;
    if (const char* s = getenv("TULU_EMU_SANITIZE")) {
        if (!strcmp(s, "memcheck")) c.sanitize = TULU_EMU_MEMCHECK;
        else if (!strcmp(s, "racecheck")) c.sanitize = TULU_EMU_RACECHECK;
        else if (!strcmp(s, "all")) c.sanitize = TULU_EMU_MEMCHECK | TULU_EMU_RACECHECK;
        else if (!strcmp(s, "strict")) {
            // `all`, and two blocks writing the same global bytes is a race even with equal values.
            c.sanitize = TULU_EMU_MEMCHECK | TULU_EMU_RACECHECK;
            c.strict_global_race = true;
        }
        else if (*s && strcmp(s, "0") && strcmp(s, "none")) {
            report("TULU_EMU_SANITIZE=%s: expected memcheck, racecheck, all or strict", s);
            exit(2);  // a check asked for and silently not made would pass everything
        }
    }
    if (const char* s = getenv("TULU_EMU_SANITIZE_IMAGES")) c.sanitize_images = s;
    if (const char* s = getenv("TULU_EMU_PROFILE"); s && *s) {
        // Counting runs in the instrumented images, like the checks.
        c.profile_path = s;
        c.sanitize |= TULU_EMU_PROFILE;
    }
    if (const char* s = getenv("TULU_EMU_PROFILE_LAUNCHES")) c.profile_launches = !strcmp(s, "1");
    if (const char* s = getenv("TULU_EMU_PROFILE_SKIP")) {
        // Comma-separated kernel name prefixes (e.g. `random_` for weight initialization).
        std::string list = s;
        for (size_t at = 0; at < list.size();) {
            size_t end = list.find(',', at);
            if (end == std::string::npos) end = list.size();
            if (end > at) c.profile_skip.push_back(list.substr(at, end - at));
            at = end + 1;
        }
    }
    return c;
}

bool initialized = false;
std::mutex& contexts_mu = *new std::mutex;
std::map<int, Context*>& primaries = *new std::map<int, Context*>;
thread_local Context* current = nullptr;

const char* error_name(int code) {
    switch (code) {
        case 0: return "CUDA_SUCCESS";
        case 1: return "CUDA_ERROR_INVALID_VALUE";
        case 2: return "CUDA_ERROR_OUT_OF_MEMORY";
        case 3: return "CUDA_ERROR_NOT_INITIALIZED";
        case 100: return "CUDA_ERROR_NO_DEVICE";
        case 101: return "CUDA_ERROR_INVALID_DEVICE";
        case 200: return "CUDA_ERROR_INVALID_IMAGE";
        case 201: return "CUDA_ERROR_INVALID_CONTEXT";
        case 218: return "CUDA_ERROR_INVALID_PTX";
        case 400: return "CUDA_ERROR_INVALID_HANDLE";
        case 500: return "CUDA_ERROR_NOT_FOUND";
        case 600: return "CUDA_ERROR_NOT_READY";
        case 700: return "CUDA_ERROR_ILLEGAL_ADDRESS";
        case 701: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
        case 719: return "CUDA_ERROR_LAUNCH_FAILED";
        case 801: return "CUDA_ERROR_NOT_SUPPORTED";
        case 900: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
        case 901: return "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED";
        case 903: return "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED";
        case 908: return "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD";
        default: return nullptr;
    }
}

const char* error_text(int code) {
    switch (code) {
        case 0: return "no error";
        case 1: return "invalid argument";
        case 2: return "out of memory";
        case 3: return "initialization error";
        case 100: return "no CUDA-capable device is detected";
        case 101: return "invalid device ordinal";
        case 200: return "device kernel image is invalid";
        case 201: return "invalid device context";
        case 218: return "a PTX JIT compilation failed";
        case 400: return "invalid resource handle";
        case 500: return "named symbol not found";
        case 600: return "device not ready";
        case 700: return "an illegal memory access was encountered";
        case 701: return "too many resources requested for launch";
        case 719: return "unspecified launch failure";
        case 801: return "operation not supported";
        case 900: return "operation not permitted when stream is capturing";
        case 901: return "operation failed due to a previous error during capture";
        case 903: return "capture was not initiated in this stream";
        case 908: return "attempt to terminate a thread-local capture sequence from another thread";
        default: return nullptr;
    }
}

}  // namespace

const Config& config() {
    static const Config c = read_config();
    return c;
}

void report(const char* fmt, ...) {
    char buf[2048];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buf, sizeof buf, fmt, args);
    va_end(args);
    fprintf(stderr, "tulu-cuda-emu: %s\n", buf);
}

Context* primary_context(int device) {
    std::lock_guard<std::mutex> g(contexts_mu);
    auto it = primaries.find(device);
    if (it != primaries.end()) return it->second;
    Context* c = new Context();
    c->device = device;
    primaries[device] = c;
    c->null_stream = new_stream(c, 0);
    c->streams.push_back(c->null_stream);
    return c;
}

Context* current_context() { return current; }

void poison_context(Context* c, CUresult code, const std::string& why) {
    int expected = CUDA_SUCCESS;
    if (c->sticky.compare_exchange_strong(expected, code)) {
        report("cuda:%d: %s — the context is now unusable (%s), as on a GPU", c->device, why.c_str(),
               error_name(code));
    }
}

}  // namespace emu

using namespace emu;

namespace {

bool valid_device(CUdevice d) { return d >= 0 && d < config().devices; }

}  // namespace

EMU_EXPORT CUresult cuInit(unsigned flags) {
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    initialized = true;
    if (config().devices > 0) install_fault_handler();
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuDriverGetVersion(int* version) {
    if (!version) return CUDA_ERROR_INVALID_VALUE;
    *version = 13000;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuDeviceGetCount(int* count) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!count) return CUDA_ERROR_INVALID_VALUE;
    *count = config().devices;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuDeviceGet(CUdevice* device, int ordinal) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!device) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(ordinal)) return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice device) {
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(device)) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "tulu CUDA emulator on the CPU (%d SMs)", config().sms);
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuDeviceGetUuid(unsigned char* uuid, CUdevice device) {
    if (!uuid) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(device)) return CUDA_ERROR_INVALID_DEVICE;
    memset(uuid, 0, 16);
    memcpy(uuid, "tulu-emu", 8);
    uuid[15] = (unsigned char)device;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice device) { return cuDeviceGetUuid(uuid, device); }

EMU_EXPORT CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice device) {
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(device)) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = config().memory;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuDeviceGetAttribute(int* value, int attribute, CUdevice device) {
    if (!value) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(device)) return CUDA_ERROR_INVALID_DEVICE;
    const Config& c = config();
    switch (attribute) {
        case 1: *value = 1024; break;                          // MAX_THREADS_PER_BLOCK
        case 2: case 3: *value = 1024; break;                  // MAX_BLOCK_DIM_X/Y
        case 4: *value = 64; break;                            // MAX_BLOCK_DIM_Z
        case 5: *value = 2147483647; break;                    // MAX_GRID_DIM_X
        case 6: case 7: *value = 65535; break;                 // MAX_GRID_DIM_Y/Z
        case 8: *value = 49152; break;                         // MAX_SHARED_MEMORY_PER_BLOCK
        case 9: *value = 65536; break;                         // TOTAL_CONSTANT_MEMORY
        case 10: *value = 32; break;                           // WARP_SIZE
        case 12: *value = 65536; break;                        // MAX_REGISTERS_PER_BLOCK
        case 13: *value = 1980000; break;                      // CLOCK_RATE (kHz)
        case 16: *value = c.sms; break;                        // MULTIPROCESSOR_COUNT
        case 33: *value = device + 1; break;                   // PCI_BUS_ID
        case 36: *value = 2619000; break;                      // MEMORY_CLOCK_RATE (kHz)
        case 37: *value = 5120; break;                         // GLOBAL_MEMORY_BUS_WIDTH
        case 38: *value = 50 << 20; break;                     // L2_CACHE_SIZE
        case 39: *value = 2048; break;                         // MAX_THREADS_PER_MULTIPROCESSOR
        case 41: *value = 1; break;                            // UNIFIED_ADDRESSING
        case 75: *value = c.cc_major; break;                   // COMPUTE_CAPABILITY_MAJOR
        case 76: *value = c.cc_minor; break;                   // COMPUTE_CAPABILITY_MINOR
        case 81: *value = 233472; break;                       // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        case 82: *value = 65536; break;                        // MAX_REGISTERS_PER_MULTIPROCESSOR
        case 97: *value = TULU_EMU_DYNAMIC_SMEM_MAX; break;    // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 115: *value = c.memory_pools ? 1 : 0; break;      // MEMORY_POOLS_SUPPORTED
        default: *value = 0; break;
    }
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice device) {
    if (!initialized) return CUDA_ERROR_NOT_INITIALIZED;
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    if (!valid_device(device)) return CUDA_ERROR_INVALID_DEVICE;
    Context* c = primary_context(device);
    c->refs++;
    *ctx = c;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device) {
    if (!valid_device(device)) return CUDA_ERROR_INVALID_DEVICE;
    Context* c = primary_context(device);
    if (c->refs.load() <= 0) return CUDA_ERROR_INVALID_CONTEXT;
    if (--c->refs == 0) {
        // As on a GPU, the last release destroys the context: its work finishes, its memory
        // goes, its error (if any) is forgotten by the next retain.
        drain_context(c);
        free_device_memory(device);
        c->sticky = CUDA_SUCCESS;
    }
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuDevicePrimaryCtxRelease(CUdevice device) { return cuDevicePrimaryCtxRelease_v2(device); }

EMU_EXPORT CUresult cuCtxGetCurrent(void** ctx) {
    if (!ctx) return CUDA_ERROR_INVALID_VALUE;
    *ctx = current;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuCtxSetCurrent(void* ctx) {
    current = (Context*)ctx;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuCtxGetDevice(CUdevice* device) {
    if (!device) return CUDA_ERROR_INVALID_VALUE;
    if (!current) return CUDA_ERROR_INVALID_CONTEXT;
    *device = current->device;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuCtxSynchronize() {
    if (!current) return CUDA_ERROR_INVALID_CONTEXT;
    drain_context(current);
    return sticky(current);
}

EMU_EXPORT CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = -5;
    return CUDA_SUCCESS;
}

EMU_EXPORT CUresult cuCtxSetFlags(unsigned) { return CUDA_SUCCESS; }
EMU_EXPORT CUresult cuCtxGetLimit(size_t* value, int) {
    if (!value) return CUDA_ERROR_INVALID_VALUE;
    *value = 0;
    return CUDA_SUCCESS;
}
EMU_EXPORT CUresult cuCtxSetLimit(int, size_t) { return CUDA_SUCCESS; }
EMU_EXPORT CUresult cuCtxGetCacheConfig(int* config) {
    if (config) *config = 0;
    return CUDA_SUCCESS;
}
EMU_EXPORT CUresult cuCtxSetCacheConfig(int) { return CUDA_SUCCESS; }

EMU_EXPORT CUresult cuGetErrorString(int code, const char** text) {
    if (!text) return CUDA_ERROR_INVALID_VALUE;
    *text = error_text(code);
    return *text ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

EMU_EXPORT CUresult cuGetErrorName(int code, const char** name) {
    if (!name) return CUDA_ERROR_INVALID_VALUE;
    *name = error_name(code);
    return *name ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

/// Lets tulu (and tests) tell the emulator from a real driver.
EMU_EXPORT const char* tulu_emu_describe() {
    static std::string s = [] {
        const Config& c = config();
        const char* sched[] = {"forward", "reverse", "random"};
        char buf[256];
        snprintf(buf, sizeof buf, "tulu CUDA emulator: %d device(s), %d SMs, sm_%d%d, %s streams, %s schedule", c.devices,
                 c.sms, c.cc_major, c.cc_minor, c.async ? "async" : "sync", sched[c.schedule]);
        return std::string(buf);
    }();
    return s.c_str();
}
