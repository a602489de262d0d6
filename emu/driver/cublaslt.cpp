// cuBLASLt's matmul, the subset tulu uses: D = alpha·op(A)·op(B) + beta·C with A, B, C, D of one
// type (f32, f16 or bf16), column-major, any transposes of A and B, f32 accumulation and scale,
// D rounded to nearest even, C never read when beta is 0, batched with strides. FP8 as real
// cuBLASLt has it on sm_89+: A and B e4m3, C and D f32 or bf16, CUBLAS_COMPUTE_32F, only the
// "TN" layout (A transposed, B not), k and A's and B's leading dimensions multiples of 16 (and
// NOT_SUPPORTED below compute capability 8.9 or otherwise). Anything else
// (other types, epilogues, row-major or tiled orders, device pointer mode) is
// CUBLAS_STATUS_NOT_SUPPORTED — from the heuristic, as real cuBLASLt answers for layouts it has
// no kernel for.
//
// Each output is one f32 dot product over k in a fixed order (eight interleaved partial sums,
// then summed pairwise), the same whatever the thread count.
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "emu.h"
#include "numeric.h"

namespace {

using namespace emu;

enum : int {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum : int { R_32F = 0, R_16F = 2, R_16BF = 14, R_8F_E4M3 = 28 };

struct Handle {
    int magic = 0x4c54;
};

struct Layout {
    int type;
    uint64_t rows, cols;
    int64_t ld;
    int order = 0;  // CUBLASLT_ORDER_COL
    int batch = 1;
    int64_t stride = 0;
};

struct Desc {
    int compute, scale;
    int pointer_mode = 0;  // host
    int trans[3] = {0, 0, 0};
    unsigned epilogue = 1;  // DEFAULT
    bool other = false;     // an attribute the emulator does not model was set
};

struct Pref {
    uint64_t workspace = 0;
};

size_t type_size(int t) { return t == R_32F ? 4 : t == R_8F_E4M3 ? 1 : 2; }

float load(const void* p, size_t i, int t) {
    switch (t) {
        case R_32F: return ((const float*)p)[i];
        case R_16BF: return bf16_to_f32(((const uint16_t*)p)[i]);
        case R_8F_E4M3: return e4m3_to_f32(((const uint8_t*)p)[i]);
        default: return f16_to_f32(((const uint16_t*)p)[i]);
    }
}

void store(void* p, size_t i, int t, float v) {
    switch (t) {
        case R_32F: ((float*)p)[i] = v; break;
        case R_16BF: ((uint16_t*)p)[i] = f32_to_bf16(v); break;
        default: ((uint16_t*)p)[i] = f32_to_f16(v); break;
    }
}

// Whether the emulator computes this matmul; `why` says what it lacks otherwise.
bool supported(const Desc& d, const Layout& a, const Layout& b, const Layout& c, const Layout& dl, std::string& why) {
    const int t = a.type;
    const Config& cfg = config();
    if (t == R_8F_E4M3) {
        if (cfg.cc_major * 10 + cfg.cc_minor < 89) why = "FP8 on compute capability below 8.9";
        else if (b.type != t) why = "FP8 A with a B of type " + std::to_string(b.type);
        else if (c.type != dl.type || (dl.type != R_32F && dl.type != R_16BF)) why = "FP8 with this C/D type";
        else if (d.compute != 68) why = "FP8 needs CUBLAS_COMPUTE_32F";
        else if (d.trans[0] != 1 || d.trans[1] != 0) why = "FP8 outside the TN layout";
        else if (a.rows % 16 || a.ld % 16 || b.ld % 16) why = "FP8 with k or a leading dimension not a multiple of 16";
    } else if (t != R_32F && t != R_16F && t != R_16BF) why = "A type " + std::to_string(t);
    else if (b.type != t || c.type != t || dl.type != t) why = "mixed matrix types";
    if (!why.empty()) return false;
    if (d.scale != R_32F) why = "scale type " + std::to_string(d.scale);
    else if (d.compute != 68 && d.compute != 69 && d.compute != 74 && d.compute != 75 && d.compute != 77)
        why = "compute type " + std::to_string(d.compute);
    else if (d.pointer_mode != 0) why = "device pointer mode";
    else if (d.trans[2] != 0) why = "transposed C";
    else if (d.trans[0] > 1 || d.trans[1] > 1) why = "conjugate transposes";
    else if (d.epilogue != 1) why = "epilogue " + std::to_string(d.epilogue);
    else if (d.other) why = "a matmul attribute the emulator does not model";
    else if (a.order || b.order || c.order || dl.order) why = "a non-column-major order";
    else return true;
    return false;
}

// op(A) is m×k, op(B) k×n, C and D m×n; false when the layouts disagree.
bool shapes(const Desc& d, const Layout& a, const Layout& b, const Layout& c, const Layout& dl, uint64_t& m,
            uint64_t& n, uint64_t& k) {
    m = dl.rows;
    n = dl.cols;
    const uint64_t am = d.trans[0] ? a.cols : a.rows, ak = d.trans[0] ? a.rows : a.cols;
    const uint64_t bk = d.trans[1] ? b.cols : b.rows, bn = d.trans[1] ? b.rows : b.cols;
    k = ak;
    auto ld_ok = [](const Layout& l) { return l.ld >= (int64_t)std::max<uint64_t>(l.rows, 1); };
    return am == m && bn == n && bk == k && c.rows == m && c.cols == n && ld_ok(a) && ld_ok(b) && ld_ok(c) &&
           ld_ok(dl) && a.batch == dl.batch && b.batch == dl.batch && (c.batch == dl.batch || c.batch == 1);
}

float dot(const float* x, const float* y, uint64_t k) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint64_t p = 0;
    for (; p + 8 <= k; p += 8)
        for (int l = 0; l < 8; l++) acc[l] += x[p + l] * y[p + l];
    for (int l = 0; p < k; p++, l++) acc[l] += x[p] * y[p];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// The common case — A's rows in bf16, contiguous (tulu's weights, transa = T) — converts as it
// goes: bf16 to f32 is a shift, and the loop vectorizes.
float dot_bf16(const uint16_t* a, const float* y, uint64_t k) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint64_t p = 0;
    for (; p + 8 <= k; p += 8)
        for (int l = 0; l < 8; l++) acc[l] += bf16_to_f32(a[p + l]) * y[p + l];
    for (int l = 0; p < k; p++, l++) acc[l] += bf16_to_f32(a[p]) * y[p];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

struct Gemm {
    Desc d;
    Layout a, b, c, dl;
    float alpha, beta;
    const void *A, *B, *C;
    void* D;
};

void run_gemm(const Gemm& g) {
    uint64_t m, n, k;
    shapes(g.d, g.a, g.b, g.c, g.dl, m, n, k);
    for (int batch = 0; batch < g.dl.batch; batch++) {
        const char* A = (const char*)g.A + batch * g.a.stride * type_size(g.a.type);
        const char* B = (const char*)g.B + batch * g.b.stride * type_size(g.b.type);
        const char* C = (const char*)g.C + (g.c.batch > 1 ? batch * g.c.stride * type_size(g.c.type) : 0);
        char* D = (char*)g.D + batch * g.dl.stride * type_size(g.dl.type);
        // op(B)'s columns as f32, each contiguous over k.
        std::vector<float> bt(n * k);
        for (uint64_t j = 0; j < n; j++)
            for (uint64_t p = 0; p < k; p++)
                bt[j * k + p] = g.d.trans[1] ? load(B, p * g.b.ld + j, g.b.type) : load(B, j * g.b.ld + p, g.b.type);
        const uint64_t rows_per_item = 16;
        parallel_for((m + rows_per_item - 1) / rows_per_item, [&](size_t item) {
            Running& r = running();
            const char* saved = r.what;
            r.what = "cublasLtMatmul";
            std::vector<float> row(k);
            const bool direct = g.d.trans[0] && g.a.type == R_16BF;
            for (uint64_t i = item * rows_per_item; i < std::min(m, (item + 1) * rows_per_item); i++) {
                const uint16_t* arow = (const uint16_t*)A + i * g.a.ld;
                if (!direct)
                    for (uint64_t p = 0; p < k; p++)
                        row[p] = g.d.trans[0] ? load(A, i * g.a.ld + p, g.a.type) : load(A, p * g.a.ld + i, g.a.type);
                for (uint64_t j = 0; j < n; j++) {
                    const float d = direct ? dot_bf16(arow, &bt[j * k], k) : dot(row.data(), &bt[j * k], k);
                    float v = g.alpha * d;
                    if (g.beta != 0.f) v += g.beta * load(C, j * g.c.ld + i, g.c.type);
                    store(D, j * g.dl.ld + i, g.dl.type, v);
                }
            }
            r.what = saved;
        });
    }
}

template <class T>
bool read_attr(const void* buf, size_t size, T& out) {
    if (!buf || size != sizeof(T)) return false;
    memcpy(&out, buf, sizeof(T));
    return true;
}

}  // namespace

EMU_EXPORT int cublasLtCreate(void** handle) {
    if (!handle) return CUBLAS_STATUS_INVALID_VALUE;
    *handle = new Handle();
    return CUBLAS_STATUS_SUCCESS;
}

EMU_EXPORT int cublasLtDestroy(void* handle) {
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete (Handle*)handle;
    return CUBLAS_STATUS_SUCCESS;
}

EMU_EXPORT size_t cublasLtGetVersion() { return 130000; }

EMU_EXPORT int cublasLtMatrixLayoutCreate(void** layout, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    if (!layout) return CUBLAS_STATUS_INVALID_VALUE;
    *layout = new Layout{type, rows, cols, ld};
    return CUBLAS_STATUS_SUCCESS;
}

EMU_EXPORT int cublasLtMatrixLayoutDestroy(void* layout) {
    delete (Layout*)layout;
    return CUBLAS_STATUS_SUCCESS;
}

EMU_EXPORT int cublasLtMatrixLayoutSetAttribute(void* layout, int attr, const void* buf, size_t size) {
    if (!layout) return CUBLAS_STATUS_NOT_INITIALIZED;
    Layout& l = *(Layout*)layout;
    bool ok;
    switch (attr) {
        case 0: ok = read_attr(buf, size, l.type); break;
        case 1: ok = read_attr(buf, size, l.order); break;
        case 2: ok = read_attr(buf, size, l.rows); break;
        case 3: ok = read_attr(buf, size, l.cols); break;
        case 4: ok = read_attr(buf, size, l.ld); break;
        case 5: ok = read_attr(buf, size, l.batch) && l.batch >= 1; break;
        case 6: ok = read_attr(buf, size, l.stride); break;
        default: return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    return ok ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
}

EMU_EXPORT int cublasLtMatmulDescCreate(void** desc, int compute, int scale) {
    if (!desc) return CUBLAS_STATUS_INVALID_VALUE;
    Desc* d = new Desc();
    d->compute = compute;
    d->scale = scale;
    *desc = d;
    return CUBLAS_STATUS_SUCCESS;
}

EMU_EXPORT int cublasLtMatmulDescDestroy(void* desc) {
    delete (Desc*)desc;
    return CUBLAS_STATUS_SUCCESS;
}

EMU_EXPORT int cublasLtMatmulDescSetAttribute(void* desc, int attr, const void* buf, size_t size) {
    if (!desc) return CUBLAS_STATUS_NOT_INITIALIZED;
    Desc& d = *(Desc*)desc;
    bool ok;
    switch (attr) {
        case 0: ok = read_attr(buf, size, d.compute); break;
        case 1: ok = read_attr(buf, size, d.scale); break;
        case 2: ok = read_attr(buf, size, d.pointer_mode); break;
        case 3: case 4: case 5: ok = read_attr(buf, size, d.trans[attr - 3]); break;
        case 7: ok = read_attr(buf, size, d.epilogue); break;
        default:
            d.other = true;
            ok = true;
            break;
    }
    return ok ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
}

EMU_EXPORT int cublasLtMatmulPreferenceCreate(void** pref) {
    if (!pref) return CUBLAS_STATUS_INVALID_VALUE;
    *pref = new Pref();
    return CUBLAS_STATUS_SUCCESS;
}

EMU_EXPORT int cublasLtMatmulPreferenceDestroy(void* pref) {
    delete (Pref*)pref;
    return CUBLAS_STATUS_SUCCESS;
}

EMU_EXPORT int cublasLtMatmulPreferenceSetAttribute(void* pref, int attr, const void* buf, size_t size) {
    if (!pref) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (attr == 1) return read_attr(buf, size, ((Pref*)pref)->workspace) ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
    return CUBLAS_STATUS_SUCCESS;  // search mode, alignments, masks: hints the emulator ignores
}

struct HeuristicResult {
    uint64_t algo[8];
    size_t workspace;
    int state;
    float waves;
    int reserved[4];
};
static_assert(sizeof(HeuristicResult) == 96, "cublasLtMatmulHeuristicResult_t is 96 bytes");

// TULU_EMU_CUBLASLT_NO_HEURISTIC: `always`, or a comma-separated list of cuBLAS shapes `MxNxK`
// (cuBLAS's m, n, k: for tulu's y = x·wᵀ, m is w's rows, n x's rows), for which the heuristic
// finds no algorithm, as real cuBLASLt may answer for a shape it has no kernel for.
bool no_heuristic_for(uint64_t m, uint64_t n, uint64_t k) {
    const char* s = getenv("TULU_EMU_CUBLASLT_NO_HEURISTIC");
    if (!s || !*s) return false;
    if (!strcmp(s, "always")) return true;
    char want[96];
    snprintf(want, sizeof want, "%llux%llux%llu", (unsigned long long)m, (unsigned long long)n,
             (unsigned long long)k);
    const std::string list = std::string(",") + s + ",";
    return list.find(std::string(",") + want + ",") != std::string::npos;
}

EMU_EXPORT int cublasLtMatmulAlgoGetHeuristic(void* handle, void* desc, void* a, void* b, void* c, void* d, void* pref,
                                              int requested, HeuristicResult* results, int* returned) {
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!desc || !a || !b || !c || !d || !pref || !results || !returned || requested < 1)
        return CUBLAS_STATUS_INVALID_VALUE;
    *returned = 0;
    std::string why;
    const Desc& dd = *(Desc*)desc;
    if (!supported(dd, *(Layout*)a, *(Layout*)b, *(Layout*)c, *(Layout*)d, why)) {
        report("cublasLtMatmulAlgoGetHeuristic: not emulated: %s", why.c_str());
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    uint64_t m, n, k;
    if (!shapes(dd, *(Layout*)a, *(Layout*)b, *(Layout*)c, *(Layout*)d, m, n, k)) return CUBLAS_STATUS_INVALID_VALUE;
    if (no_heuristic_for(m, n, k)) return CUBLAS_STATUS_NOT_SUPPORTED;  // no algorithm, none returned
    memset(results, 0, sizeof *results);
    results->algo[0] = 0x74756c75;  // "tulu"
    results->waves = 1.0f;
    results->state = CUBLAS_STATUS_SUCCESS;
    *returned = 1;
    return CUBLAS_STATUS_SUCCESS;
}

EMU_EXPORT int cublasLtMatmul(void* handle, void* desc, const void* alpha, const void* A, void* adesc, const void* B,
                              void* bdesc, const void* beta, const void* C, void* cdesc, void* D, void* ddesc,
                              const void* algo, void* workspace, size_t workspace_size, void* stream) {
    (void)algo;
    (void)workspace;
    (void)workspace_size;
    if (!handle) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!desc || !alpha || !beta || !adesc || !bdesc || !cdesc || !ddesc || !A || !B || !D)
        return CUBLAS_STATUS_INVALID_VALUE;
    auto g = std::make_shared<Gemm>();
    g->d = *(Desc*)desc;
    g->a = *(Layout*)adesc;
    g->b = *(Layout*)bdesc;
    g->c = *(Layout*)cdesc;
    g->dl = *(Layout*)ddesc;
    std::string why;
    if (!supported(g->d, g->a, g->b, g->c, g->dl, why)) {
        report("cublasLtMatmul: not emulated: %s", why.c_str());
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
    uint64_t m, n, k;
    if (!shapes(g->d, g->a, g->b, g->c, g->dl, m, n, k)) return CUBLAS_STATUS_INVALID_VALUE;
    memcpy(&g->alpha, alpha, 4);  // host pointer mode: read at the call, as cuBLASLt does
    memcpy(&g->beta, beta, 4);
    if (g->beta != 0.f && !C) return CUBLAS_STATUS_INVALID_VALUE;
    g->A = A;
    g->B = B;
    g->C = C;
    g->D = D;
    Stream* s = resolve_stream(stream);
    if (!s) return CUBLAS_STATUS_EXECUTION_FAILED;
    // Every operand must be device memory of the stream's device, whole.
    auto span = [&](const Layout& l) {
        return ((l.cols ? l.cols - 1 : 0) * (uint64_t)l.ld + l.rows + (l.batch - 1) * (uint64_t)l.stride) *
               type_size(l.type);
    };
    struct Operand {
        const void* p;
        const Layout* l;
        const char* name;
    } ops[] = {{A, &g->a, "A"}, {B, &g->b, "B"}, {D, &g->dl, "D"}, {g->beta != 0.f ? C : nullptr, &g->c, "C"}};
    for (const Operand& o : ops) {
        if (!o.p) continue;
        if (device_of_range((CUdeviceptr)o.p, span(*o.l)) != s->ctx->device) {
            report("cublasLtMatmul: %s ([0x%llx, +%llu)) is not device memory of cuda:%d", o.name,
                   (unsigned long long)o.p, (unsigned long long)span(*o.l), s->ctx->device);
            return CUBLAS_STATUS_INVALID_VALUE;
        }
    }
    // For the profiler: what the operands span, each read or written once (cuBLASLt's tiles
    // reuse them through L2), and the multiply-adds.
    const unsigned long long read = span(g->a) + span(g->b) + (g->beta != 0.f ? span(g->c) : 0);
    const unsigned long long written = span(g->dl);
    const double flops = 2.0 * m * n * k * g->a.batch;
    Op op;
    op.what = "cublasLtMatmul";
    op.run = [g, m, n, k, read, written, flops] {
        touch((CUdeviceptr)g->A);
        touch((CUdeviceptr)g->B);
        touch((CUdeviceptr)g->D);
        if (g->beta != 0.f) touch((CUdeviceptr)g->C);
        run_gemm(*g);
        profile_library_call("cublasLtMatmul", m, n, k, read, written, flops);
    };
    return submit(s, std::move(op)) == CUDA_SUCCESS ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
}
