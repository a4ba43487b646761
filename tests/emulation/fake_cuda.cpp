// A stand-in for the CUDA driver (libcuda.so.1) and cuBLASLt (libcublasLt.so.13) on a machine
// without a GPU, for tests: "device" memory is host memory, a stream runs each call at once,
// and a kernel launch runs the kernel's own code through cuda_on_cpu.h, from the libraries in
// $COSERVE_EMULATED_KERNELS (one per kernels/*.cu file, each exporting emulate_<kernel>).
// cuBLASLt products are computed here from their documented column-major definition. Only the
// calls coserve makes are here; anything else is a missing symbol, which cudarc reports by name.
#include <dirent.h>
#include <dlfcn.h>
#include <malloc.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#define API extern "C" __attribute__((visibility("default")))

typedef int CUresult;
typedef int CUdevice;
typedef uint64_t CUdeviceptr;
typedef void* Handle;
enum {
    OK = 0,
    ERROR_INVALID_VALUE = 1,
    ERROR_OUT_OF_MEMORY = 2,
    ERROR_NOT_FOUND = 500,
    ERROR_NOT_SUPPORTED = 801
};

typedef void (*Entry)(unsigned, unsigned, unsigned, unsigned, void**);

namespace {
std::vector<void*> kernel_libs;
int context_token, module_token;

// Graph capture: kernel launches and cuBLASLt products recorded instead of run (with copies
// of their arguments), replayed by cuGraphLaunch; anything else is refused while capturing.
typedef std::function<void()> Op;
bool capturing = false;
std::vector<Op>* capture = nullptr;

// Runs `op` now, or records it during a capture.
void submit(Op op) {
    if (capturing) capture->push_back(std::move(op));
    else op();
}
}  // namespace

// Refused during a capture, loudly: what a real capture rejects (synchronous allocation and
// frees, pageable copies, waits) and what coserve's recorded forwards must not do although a
// real capture would record it (stream-ordered allocation and frees, async copies and
// memsets), since they run before a step's replay, not in it.
namespace {
CUresult refused_in_capture(const char* call) {
    fprintf(stderr, "fake CUDA: %s during a stream capture\n", call);
    return ERROR_NOT_SUPPORTED;
}
}  // namespace
#define REFUSE_IN_CAPTURE \
    if (capturing) return refused_in_capture(__func__)

// This file is built twice, as the driver and as cuBLASLt, each with its own state: the
// driver's copy owns the capture, and cuBLASLt's hands its products to it.
API void fake_cuda_submit(void* op) { submit(std::move(*(Op*)op)); }

namespace {
void submit_to_driver(Op op) {
    static const auto to_driver = [] {
        void* driver = dlopen("libcuda.so.1", RTLD_NOLOAD | RTLD_LAZY);
        return driver ? (void (*)(void*))dlsym(driver, "fake_cuda_submit") : nullptr;
    }();
    // Run at once instead, a product would escape every capture and its replays unnoticed.
    if (!to_driver) {
        fprintf(stderr, "fake cuBLASLt: no fake_cuda_submit in a loaded libcuda.so.1\n");
        abort();
    }
    to_driver(&op);
}
}  // namespace

API CUresult cuInit(unsigned) {
    if (!kernel_libs.empty()) return OK;
    // Device buffers come and go with every forward: keep them on the heap, not in fresh
    // mappings each time.
    mallopt(M_MMAP_THRESHOLD, 1 << 30);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
    const char* dir = getenv("COSERVE_EMULATED_KERNELS");
    if (!dir) return ERROR_NOT_FOUND;
    DIR* d = opendir(dir);
    if (!d) return ERROR_NOT_FOUND;
    while (dirent* e = readdir(d)) {
        std::string name = e->d_name;
        if (name.size() > 3 && name.compare(name.size() - 3, 3, ".so") == 0) {
            void* h = dlopen((std::string(dir) + "/" + name).c_str(), RTLD_NOW | RTLD_LOCAL);
            if (!h) {
                fprintf(stderr, "fake CUDA: %s\n", dlerror());
                closedir(d);
                return ERROR_NOT_FOUND;
            }
            kernel_libs.push_back(h);
        }
    }
    closedir(d);
    return kernel_libs.empty() ? ERROR_NOT_FOUND : OK;
}
API CUresult cuDriverGetVersion(int* v) { *v = 13000; return OK; }
API CUresult cuDeviceGetCount(int* n) { *n = 1; return OK; }
API CUresult cuDeviceGet(CUdevice* d, int ordinal) { *d = ordinal; return ordinal == 0 ? OK : ERROR_INVALID_VALUE; }
API CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    snprintf(name, (size_t)len, "emulated CUDA device (CPU)");
    return OK;
}
API CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    switch (attr) {
        case 75: *v = 9; break;    // compute capability major
        case 76: *v = 0; break;    // minor
        case 16: *v = 4; break;    // multiprocessors
        case 38: *v = 1 << 20; break;  // L2 bytes
        case 115: *v = 0; break;   // no memory pools: plain allocations
        default: *v = 0;
    }
    return OK;
}
API CUresult cuDevicePrimaryCtxRetain(Handle* ctx, CUdevice) { *ctx = &context_token; return OK; }
API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return OK; }
API CUresult cuCtxSetCurrent(Handle) { return OK; }
API CUresult cuCtxGetCurrent(Handle* ctx) { *ctx = &context_token; return OK; }
API CUresult cuCtxSynchronize() {
    REFUSE_IN_CAPTURE;
    return OK;
}

API CUresult cuStreamCreate(Handle* s, unsigned) { *s = malloc(1); return OK; }
API CUresult cuStreamCreateWithPriority(Handle* s, unsigned, int) { *s = malloc(1); return OK; }
API CUresult cuStreamDestroy_v2(Handle s) { free(s); return OK; }
API CUresult cuStreamSynchronize(Handle) {
    REFUSE_IN_CAPTURE;
    return OK;
}
API CUresult cuStreamQuery(Handle) {
    REFUSE_IN_CAPTURE;
    return OK;
}
API CUresult cuStreamWaitEvent(Handle, Handle, unsigned) { return OK; }

// Events time nothing: an elapsed time is 0.
API CUresult cuEventCreate(Handle* e, unsigned) { *e = malloc(1); return OK; }
API CUresult cuEventDestroy_v2(Handle e) { free(e); return OK; }
API CUresult cuEventRecord(Handle, Handle) { return OK; }
API CUresult cuEventSynchronize(Handle) {
    REFUSE_IN_CAPTURE;
    return OK;
}
API CUresult cuEventQuery(Handle) {
    REFUSE_IN_CAPTURE;
    return OK;
}
API CUresult cuEventElapsedTime(float* ms, Handle, Handle) { *ms = 0.f; return OK; }
API CUresult cuEventElapsedTime_v2(float* ms, Handle, Handle) { *ms = 0.f; return OK; }

// The device's memory: what is allocated at once may not pass it, as on a device. 8 GiB, or
// $COSERVE_EMULATED_MEMORY bytes.
namespace {
std::mutex memory_mutex;
std::unordered_map<CUdeviceptr, size_t> allocations;
size_t allocated = 0;
size_t memory_size() {
    static const size_t size = [] {
        const char* v = getenv("COSERVE_EMULATED_MEMORY");
        if (!v) return (size_t)8 << 30;
        char* end = nullptr;
        const unsigned long long n = strtoull(v, &end, 10);
        if (end == v || *end != '\0' || n == 0) {
            fprintf(stderr, "fake CUDA: COSERVE_EMULATED_MEMORY=%s is not a number of bytes\n", v);
            abort();
        }
        return (size_t)n;
    }();
    return size;
}
}  // namespace

API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = memory_size();
    return OK;
}
API CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::mutex> lock(memory_mutex);
    *total = memory_size();
    *free_bytes = memory_size() - allocated;
    return OK;
}

API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    REFUSE_IN_CAPTURE;
    std::lock_guard<std::mutex> lock(memory_mutex);
    if (n > memory_size() - allocated) return ERROR_OUT_OF_MEMORY;
    void* m = aligned_alloc(256, (n + 255) / 256 * 256);
    if (!m) return ERROR_OUT_OF_MEMORY;
    memset(m, 0xcd, n);  // garbage, as fresh device memory is
    *p = (CUdeviceptr)m;
    allocations[*p] = n;
    allocated += n;
    return OK;
}
API CUresult cuMemFree_v2(CUdeviceptr p) {
    REFUSE_IN_CAPTURE;
    std::lock_guard<std::mutex> lock(memory_mutex);
    auto a = allocations.find(p);
    if (a == allocations.end()) return ERROR_INVALID_VALUE;
    allocated -= a->second;
    allocations.erase(a);
    free((void*)p);
    return OK;
}
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, Handle) {
    REFUSE_IN_CAPTURE;
    return cuMemAlloc_v2(p, n);
}
API CUresult cuMemFreeAsync(CUdeviceptr p, Handle) {
    REFUSE_IN_CAPTURE;
    return cuMemFree_v2(p);
}
API CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* s, size_t n) {
    REFUSE_IN_CAPTURE;
    memcpy((void*)d, s, n);
    return OK;
}
API CUresult cuMemcpyDtoH_v2(void* d, CUdeviceptr s, size_t n) {
    REFUSE_IN_CAPTURE;
    memcpy(d, (void*)s, n);
    return OK;
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) {
    REFUSE_IN_CAPTURE;
    memmove((void*)d, (void*)s, n);
    return OK;
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t n, Handle) {
    REFUSE_IN_CAPTURE;
    return cuMemcpyHtoD_v2(d, s, n);
}
API CUresult cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t n, Handle) {
    REFUSE_IN_CAPTURE;
    return cuMemcpyDtoH_v2(d, s, n);
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, Handle) {
    REFUSE_IN_CAPTURE;
    return cuMemcpyDtoD_v2(d, s, n);
}
API CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
    REFUSE_IN_CAPTURE;
    memset((void*)d, v, n);
    return OK;
}
API CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, Handle) {
    REFUSE_IN_CAPTURE;
    return cuMemsetD8_v2(d, v, n);
}
API CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, Handle) {
    REFUSE_IN_CAPTURE;
    for (size_t i = 0; i < n; ++i) ((unsigned*)d)[i] = v;
    return OK;
}

// Modules: the PTX is ignored; functions are found by name in the emulated libraries, with
// the sizes of their parameters (emulate_<kernel>_sizes), so a launch can copy its arguments
// as the driver does.
namespace {
struct Func {
    Entry entry;
    const unsigned* sizes;
    unsigned n;
    unsigned max_threads;  // the kernel's __launch_bounds__
};
}  // namespace

API CUresult cuModuleLoadData(Handle* m, const void*) { *m = &module_token; return OK; }
API CUresult cuModuleUnload(Handle) { return OK; }
API CUresult cuModuleGetFunction(Handle* f, Handle, const char* name) {
    const std::string sym = std::string("emulate_") + name;
    for (void* lib : kernel_libs) {
        void* e = dlsym(lib, sym.c_str());
        auto sizes = (const unsigned* (*)(unsigned*))dlsym(lib, (sym + "_sizes").c_str());
        auto bound = (unsigned (*)())dlsym(lib, (sym + "_max_threads").c_str());
        if (e && sizes && bound) {
            Func* fn = new Func{(Entry)e, nullptr, 0, bound()};
            fn->sizes = sizes(&fn->n);
            *f = fn;
            return OK;
        }
    }
    fprintf(stderr, "fake CUDA: no emulated kernel %s\n", name);
    return ERROR_NOT_FOUND;
}
API CUresult cuFuncSetAttribute(Handle, int, int) { return OK; }
API CUresult cuFuncGetAttribute(int* v, int, Handle) { *v = 0; return OK; }

API CUresult cuLaunchKernel(Handle f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                            unsigned by, unsigned bz, unsigned, Handle, void** params, void**) {
    if (by != 1 || bz != 1) return ERROR_NOT_SUPPORTED;
    const Func& fn = *(const Func*)f;
    // A block larger than the kernel's bound is refused by a device.
    if (bx > fn.max_threads) {
        fprintf(stderr, "fake CUDA: a block of %u threads, over its kernel's bound %u\n", bx,
                fn.max_threads);
        return ERROR_INVALID_VALUE;
    }
    std::vector<std::vector<unsigned char>> args;  // copies of the argument values
    for (unsigned i = 0; i < fn.n; ++i) {
        const unsigned char* p = (const unsigned char*)params[i];
        args.emplace_back(p, p + fn.sizes[i]);
    }
    submit([entry = fn.entry, gx, gy, gz, bx, args = std::move(args)]() {
        std::vector<void*> ptrs;
        for (auto& a : args) ptrs.push_back((void*)a.data());
        entry(gx, gy, gz, bx, ptrs.data());
    });
    return OK;
}

API CUresult cuStreamBeginCapture_v2(Handle, int) {
    capturing = true;
    capture = new std::vector<Op>();
    return OK;
}
API CUresult cuStreamEndCapture(Handle, Handle* graph) {
    capturing = false;
    *graph = capture;
    capture = nullptr;
    return OK;
}
API CUresult cuStreamIsCapturing(Handle, int* status) { *status = capturing ? 1 : 0; return OK; }
API CUresult cuGraphInstantiateWithFlags(Handle* exec, Handle graph, unsigned long long) {
    *exec = new std::vector<Op>(*(std::vector<Op>*)graph);
    return OK;
}
API CUresult cuGraphLaunch(Handle exec, Handle) {
    for (auto& op : *(std::vector<Op>*)exec) op();
    return OK;
}
API CUresult cuGraphDestroy(Handle g) { delete (std::vector<Op>*)g; return OK; }
API CUresult cuGraphExecDestroy(Handle g) { delete (std::vector<Op>*)g; return OK; }

// Private tables NVRTC asks a loaded driver for: none here.
API CUresult cuGetExportTable(const void** table, const void*) {
    *table = nullptr;
    return ERROR_NOT_FOUND;
}
API CUresult cuGetProcAddress_v2(const char*, void** f, int, unsigned long long, int* status) {
    *f = nullptr;
    if (status) *status = 1;  // symbol not found
    return ERROR_NOT_FOUND;
}

API CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = e == ERROR_OUT_OF_MEMORY ? "out of memory" : "fake CUDA error";
    return OK;
}
API CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = e == ERROR_OUT_OF_MEMORY ? "CUDA_ERROR_OUT_OF_MEMORY" : "CUDA_ERROR_FAKE";
    return OK;
}

// ---- cuBLASLt ------------------------------------------------------------------------------
namespace {
struct Desc { int trans_a = 0, trans_b = 0; };
struct Layout { int type; uint64_t rows, cols; int64_t ld; };
enum { R_32F = 0, R_16BF = 14 };

float load(const void* p, int type, size_t i) {
    if (type == R_32F) return ((const float*)p)[i];
    const uint32_t u = (uint32_t)((const uint16_t*)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
void store(void* p, int type, size_t i, float v) {
    if (type == R_32F) {
        ((float*)p)[i] = v;
        return;
    }
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) u |= 0x400000u;
    else u += 0x7fffu + ((u >> 16) & 1u);
    ((uint16_t*)p)[i] = (uint16_t)(u >> 16);
}
}  // namespace

API int cublasLtCreate(Handle* h) { *h = malloc(1); return 0; }
API int cublasLtDestroy(Handle h) { free(h); return 0; }
API int cublasLtMatmulDescCreate(Handle* d, int, int) { *d = new Desc(); return 0; }
API int cublasLtMatmulDescDestroy(Handle d) { delete (Desc*)d; return 0; }
API int cublasLtMatmulDescSetAttribute(Handle d, int attr, const void* buf, size_t n) {
    if (attr == 3 && n == 4) ((Desc*)d)->trans_a = *(const int*)buf;        // TRANSA
    else if (attr == 4 && n == 4) ((Desc*)d)->trans_b = *(const int*)buf;   // TRANSB
    else if (attr == 2 || attr == 0 || attr == 1) return 0;                 // modes: defaults
    else return 15;                                                         // not supported
    return 0;
}
API int cublasLtMatrixLayoutCreate(Handle* l, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    if (type != R_32F && type != R_16BF) return 15;
    if (ld < (int64_t)rows) return 7;  // invalid value, as cuBLASLt answers
    *l = new Layout{type, rows, cols, ld};
    return 0;
}
API int cublasLtMatrixLayoutDestroy(Handle l) { delete (Layout*)l; return 0; }
API int cublasLtMatmulPreferenceCreate(Handle* p) { *p = malloc(1); return 0; }
API int cublasLtMatmulPreferenceDestroy(Handle p) { free(p); return 0; }
API int cublasLtMatmulPreferenceSetAttribute(Handle, int, const void*, size_t) { return 0; }

struct HeuristicResult {
    uint64_t algo[8];
    size_t workspace;
    int state;
    float waves;
    int reserved[4];
};

// Checks the shapes agree, as the real heuristic does, and offers up to three algorithms
// (all computing the one product below), so that choosing among them runs.
API int cublasLtMatmulAlgoGetHeuristic(Handle, Handle desc, Handle a, Handle b, Handle c,
                                       Handle d, Handle, int requested, HeuristicResult* out,
                                       int* count) {
    const Desc& ds = *(Desc*)desc;
    const Layout &A = *(Layout*)a, &B = *(Layout*)b, &C = *(Layout*)c, &D = *(Layout*)d;
    const uint64_t m = ds.trans_a ? A.cols : A.rows, k = ds.trans_a ? A.rows : A.cols;
    const uint64_t kb = ds.trans_b ? B.cols : B.rows, n = ds.trans_b ? B.rows : B.cols;
    if (k != kb || D.rows != m || D.cols != n || C.rows != m || C.cols != n || A.type != B.type) {
        *count = 0;
        return 15;
    }
    *count = requested < 3 ? requested : 3;
    memset(out, 0, sizeof(HeuristicResult) * (size_t)*count);
    for (int i = 0; i < *count; ++i) out[i].algo[0] = (uint64_t)i;
    return 0;
}

// D = alpha op(A) op(B) + beta C, column-major: element (i, j) of a layout is at i + j * ld.
API int cublasLtMatmul(Handle, Handle desc, const void* alpha, const void* a, Handle al,
                       const void* b, Handle bl, const void* beta, const void* c, Handle cl,
                       void* d, Handle dl, const void*, void*, size_t, Handle) {
    // Copies of what the call names, as a captured product outlives its descriptors.
    const Desc ds = *(Desc*)desc;
    const Layout A = *(Layout*)al, B = *(Layout*)bl, C = *(Layout*)cl, D = *(Layout*)dl;
    const float al_ = *(const float*)alpha, be = *(const float*)beta;
    submit_to_driver([=]() {
        const uint64_t m = D.rows, n = D.cols, k = ds.trans_a ? A.rows : A.cols;
        std::vector<float> out(m * n);
        for (uint64_t j = 0; j < n; ++j)
            for (uint64_t i = 0; i < m; ++i) {
                double s = 0;
                for (uint64_t l = 0; l < k; ++l) {
                    const size_t ai = ds.trans_a ? l + i * A.ld : i + l * A.ld;
                    const size_t bi = ds.trans_b ? j + l * B.ld : l + j * B.ld;
                    s += (double)load(a, A.type, ai) * load(b, B.type, bi);
                }
                float v = al_ * (float)s;
                if (be != 0.f) v += be * load(c, C.type, i + j * C.ld);
                out[i + j * m] = v;
            }
        for (uint64_t j = 0; j < n; ++j)
            for (uint64_t i = 0; i < m; ++i) store(d, D.type, i + j * D.ld, out[i + j * m]);
    });
    return 0;
}
API size_t cublasLtGetVersion() { return 130100; }
API const char* cublasLtGetStatusString(int) { return "fake cuBLASLt status"; }
API const char* cublasLtGetStatusName(int) { return "CUBLAS_STATUS_FAKE"; }
