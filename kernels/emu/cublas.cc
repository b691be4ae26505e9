// The cuBLAS products the engine's CUDA backend uses, for the CPU stand-in driver (driver.cc):
// Sgemm, GemmEx, their strided batches and the grouped batch, column-major as cuBLAS defines
// them, on the calling handle's stream. Accumulation is in double, so a product here is the
// exact one rounded once to its output type; bf16 outputs round to nearest, ties to even.
//
// As cuBLAS does, a call checks its arguments first and refuses bad ones with
// CUBLAS_STATUS_INVALID_VALUE (negative sizes, leading dimensions too small) or
// CUBLAS_STATUS_NOT_SUPPORTED (a type combination cuBLAS lacks). Beyond cuBLAS, every matrix
// must lie in one live device allocation on the stream's device, the pointer arrays of the
// grouped call in device memory and its size arrays and scalars in host memory: a mix-up aborts
// with a message, where a GPU would read garbage or fault.
#include "emu.h"

#include <library_types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if __has_include(<cublas_api.h>)
// Where NVIDIA's header is at hand, the definitions below are checked against its declarations.
#include <cublas_api.h>
#else
typedef enum {
    CUBLAS_STATUS_SUCCESS = 0,
    CUBLAS_STATUS_NOT_INITIALIZED = 1,
    CUBLAS_STATUS_INVALID_VALUE = 7,
    CUBLAS_STATUS_NOT_SUPPORTED = 15,
} cublasStatus_t;
typedef enum { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 } cublasOperation_t;
typedef enum { CUBLAS_DEFAULT_MATH = 0 } cublasMath_t;
typedef enum { CUBLAS_POINTER_MODE_HOST = 0, CUBLAS_POINTER_MODE_DEVICE = 1 } cublasPointerMode_t;
typedef enum {
    CUBLAS_COMPUTE_32F = 68,
    CUBLAS_COMPUTE_32F_PEDANTIC = 69,
    CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
} cublasComputeType_t;
typedef enum { CUBLAS_GEMM_DEFAULT = -1 } cublasGemmAlgo_t;
struct cublasContext;
typedef struct cublasContext* cublasHandle_t;
typedef struct CUstream_st* cudaStream_t;
#endif

struct cublasContext {
    cudaStream_t stream = nullptr;
    void* workspace = nullptr;  // set by cublasSetWorkspace_v2; this cuBLAS needs none
    size_t workspace_bytes = 0;
};

using namespace smoe_emu;

#define API extern "C" __attribute__((visibility("default")))
#define LOCKED std::lock_guard<std::recursive_mutex> guard(lock())

namespace {

[[noreturn]] void misuse(const char* call, const char* what) {
    std::fprintf(stderr, "sparsemoe CUDA emulator: %s: %s\n", call, what);
    std::abort();
}

size_t type_bytes(cudaDataType t) {
    switch (t) {
        case CUDA_R_32F: return 4;
        case CUDA_R_16BF: return 2;
        default: return 0;
    }
}

double load(const void* base, size_t i, cudaDataType t) {
    if (t == CUDA_R_32F) return ((const float*)base)[i];
    const uint32_t bits = (uint32_t)((const uint16_t*)base)[i] << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

void store(void* base, size_t i, cudaDataType t, double v) {
    const float f = (float)v;
    if (t == CUDA_R_32F) {
        ((float*)base)[i] = f;
        return;
    }
    uint32_t u;
    std::memcpy(&u, &f, 4);
    uint16_t bits;
    if ((u & 0x7fffffffu) > 0x7f800000u) bits = (uint16_t)((u >> 16) | 0x40u);
    else bits = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    ((uint16_t*)base)[i] = bits;
}

// One product's shape and layout.
struct Gemm {
    cublasOperation_t ta, tb;
    int m, n, k, lda, ldb, ldc;
    cudaDataType at, bt, ct;
    double alpha, beta;
};

// The elements a column-major matrix of `rows` × `cols` with leading dimension `ld` spans.
size_t extent(int rows, int cols, int ld) {
    if (rows == 0 || cols == 0) return 0;
    return (size_t)(cols - 1) * (size_t)ld + (size_t)rows;
}

cublasStatus_t validate(const Gemm& g) {
    if (g.ta > CUBLAS_OP_C || g.tb > CUBLAS_OP_C) return CUBLAS_STATUS_INVALID_VALUE;
    if (g.m < 0 || g.n < 0 || g.k < 0) return CUBLAS_STATUS_INVALID_VALUE;
    const int a_rows = g.ta == CUBLAS_OP_N ? g.m : g.k;
    const int b_rows = g.tb == CUBLAS_OP_N ? g.k : g.n;
    if (g.lda < std::max(1, a_rows) || g.ldb < std::max(1, b_rows) || g.ldc < std::max(1, g.m))
        return CUBLAS_STATUS_INVALID_VALUE;
    return CUBLAS_STATUS_SUCCESS;
}

size_t a_extent(const Gemm& g) {
    return g.ta == CUBLAS_OP_N ? extent(g.m, g.k, g.lda) : extent(g.k, g.m, g.lda);
}
size_t b_extent(const Gemm& g) {
    return g.tb == CUBLAS_OP_N ? extent(g.k, g.n, g.ldb) : extent(g.n, g.k, g.ldb);
}
size_t c_extent(const Gemm& g) { return extent(g.m, g.n, g.ldc); }

void check_matrix(const char* call, const char* which, const void* p, size_t elements, cudaDataType t, int device) {
    if (elements == 0) return;
    if (!device_range(p, elements * type_bytes(t), device, false)) {
        std::fprintf(stderr,
                     "sparsemoe CUDA emulator: %s: matrix %s (%p, %zu elements) is not inside one live "
                     "allocation on device %d\n",
                     call, which, p, elements, device);
        std::abort();
    }
}

void run(const Gemm& g, const void* a, const void* b, void* c) {
    std::vector<double> row(g.k);
    for (int i = 0; i < g.m; ++i) {
        for (int l = 0; l < g.k; ++l)
            row[l] = load(a, g.ta == CUBLAS_OP_N ? (size_t)i + (size_t)l * g.lda : (size_t)l + (size_t)i * g.lda, g.at);
        for (int j = 0; j < g.n; ++j) {
            double sum = 0;
            for (int l = 0; l < g.k; ++l)
                sum += row[l] * load(b, g.tb == CUBLAS_OP_N ? (size_t)l + (size_t)j * g.ldb : (size_t)j + (size_t)l * g.ldb, g.bt);
            const size_t at = (size_t)i + (size_t)j * g.ldc;
            // beta = 0: C is not read (it may hold NaN).
            const double old = g.beta == 0 ? 0 : g.beta * load(c, at, g.ct);
            store(c, at, g.ct, g.alpha * sum + old);
        }
    }
}

bool supported(cudaDataType at, cudaDataType bt, cudaDataType ct, cublasComputeType_t compute) {
    if (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_PEDANTIC && compute != CUBLAS_COMPUTE_32F_FAST_TF32)
        return false;
    if (at != bt) return false;
    if (at == CUDA_R_32F) return ct == CUDA_R_32F;
    if (at == CUDA_R_16BF) return ct == CUDA_R_16BF || ct == CUDA_R_32F;
    return false;
}

double scalar(const char* call, const void* p) {
    if (p == nullptr) misuse(call, "alpha or beta is null");
    if (is_device_pointer(p)) misuse(call, "alpha or beta is in device memory, but the pointer mode is host");
    return *(const float*)p;
}

// A strided batch of `count` products (count 1, strides 0: one product).
cublasStatus_t strided(const char* call, cublasHandle_t h, Gemm g, const void* alpha, const void* a, long long sa,
                       const void* b, long long sb, const void* beta, void* c, long long sc, int count,
                       cublasComputeType_t compute) {
    LOCKED;
    if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!supported(g.at, g.bt, g.ct, compute)) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (validate(g) != CUBLAS_STATUS_SUCCESS || count < 0) return CUBLAS_STATUS_INVALID_VALUE;
    g.alpha = scalar(call, alpha);
    g.beta = scalar(call, beta);
    if (count == 0 || g.m == 0 || g.n == 0) return CUBLAS_STATUS_SUCCESS;
    count_call(std::string("cublas/") + call);
    const int device = device_of_stream(h->stream);
    const auto span = [count](size_t one, long long stride) { return one == 0 ? 0 : one + (size_t)(count - 1) * (size_t)stride; };
    if (g.k > 0) {
        check_matrix(call, "A", a, span(a_extent(g), sa), g.at, device);
        check_matrix(call, "B", b, span(b_extent(g), sb), g.bt, device);
    }
    check_matrix(call, "C", c, span(c_extent(g), sc), g.ct, device);
    queue_on(h->stream, [=] {
        for (int i = 0; i < count; ++i)
            run(g, (const char*)a + (size_t)i * sa * type_bytes(g.at), (const char*)b + (size_t)i * sb * type_bytes(g.bt),
                (char*)c + (size_t)i * sc * type_bytes(g.ct));
    });
    return CUBLAS_STATUS_SUCCESS;
}

}  // namespace

API cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
    if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    *handle = new cublasContext{};
    return CUBLAS_STATUS_SUCCESS;
}
API cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    delete handle;
    return CUBLAS_STATUS_SUCCESS;
}
API cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    handle->stream = stream;
    return CUBLAS_STATUS_SUCCESS;
}
API cublasStatus_t cublasGetStream_v2(cublasHandle_t handle, cudaStream_t* stream) {
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (stream == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
    *stream = handle->stream;
    return CUBLAS_STATUS_SUCCESS;
}
API cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t handle, void* workspace, size_t bytes) {
    std::lock_guard<std::recursive_mutex> guard(lock());
    if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (bytes > 0 && (workspace == nullptr || !device_range(workspace, bytes, -1, false)))
        return CUBLAS_STATUS_INVALID_VALUE;
    handle->workspace = workspace;
    handle->workspace_bytes = bytes;
    return CUBLAS_STATUS_SUCCESS;
}
API cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t) {
    return handle == nullptr ? CUBLAS_STATUS_NOT_INITIALIZED : CUBLAS_STATUS_SUCCESS;
}

API cublasStatus_t cublasSgemm_v2(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                  const float* alpha, const float* a, int lda, const float* b, int ldb,
                                  const float* beta, float* c, int ldc) {
    Gemm g{ta, tb, m, n, k, lda, ldb, ldc, CUDA_R_32F, CUDA_R_32F, CUDA_R_32F, 0, 0};
    return strided("cublasSgemm", h, g, alpha, a, 0, b, 0, beta, c, 0, 1, CUBLAS_COMPUTE_32F);
}
API cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                             int n, int k, const float* alpha, const float* a, int lda,
                                             long long int sa, const float* b, int ldb, long long int sb,
                                             const float* beta, float* c, int ldc, long long int sc, int count) {
    Gemm g{ta, tb, m, n, k, lda, ldb, ldc, CUDA_R_32F, CUDA_R_32F, CUDA_R_32F, 0, 0};
    return strided("cublasSgemmStridedBatched", h, g, alpha, a, sa, b, sb, beta, c, sc, count, CUBLAS_COMPUTE_32F);
}
API cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                const void* alpha, const void* a, cudaDataType at, int lda, const void* b,
                                cudaDataType bt, int ldb, const void* beta, void* c, cudaDataType ct, int ldc,
                                cublasComputeType_t compute, cublasGemmAlgo_t) {
    Gemm g{ta, tb, m, n, k, lda, ldb, ldc, at, bt, ct, 0, 0};
    return strided("cublasGemmEx", h, g, alpha, a, 0, b, 0, beta, c, 0, 1, compute);
}
API cublasStatus_t cublasGemmStridedBatchedEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                              int n, int k, const void* alpha, const void* a, cudaDataType at,
                                              int lda, long long int sa, const void* b, cudaDataType bt, int ldb,
                                              long long int sb, const void* beta, void* c, cudaDataType ct, int ldc,
                                              long long int sc, int count, cublasComputeType_t compute,
                                              cublasGemmAlgo_t) {
    Gemm g{ta, tb, m, n, k, lda, ldb, ldc, at, bt, ct, 0, 0};
    return strided("cublasGemmStridedBatchedEx", h, g, alpha, a, sa, b, sb, beta, c, sc, count, compute);
}

API cublasStatus_t cublasGemmGroupedBatchedEx(cublasHandle_t h, const cublasOperation_t ta[],
                                              const cublasOperation_t tb[], const int m[], const int n[],
                                              const int k[], const void* alpha, const void* const a[],
                                              cudaDataType at, const int lda[], const void* const b[],
                                              cudaDataType bt, const int ldb[], const void* beta, void* const c[],
                                              cudaDataType ct, const int ldc[], int groups, const int size[],
                                              cublasComputeType_t compute) {
    static const char* call = "cublasGemmGroupedBatchedEx";
    LOCKED;
    if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (groups < 0) return CUBLAS_STATUS_INVALID_VALUE;
    if (groups > 0) count_call(std::string("cublas/") + call);
    if (groups == 0) return CUBLAS_STATUS_SUCCESS;
    // Scalars per group, of the compute's scale type (float); bf16 in and out is the only
    // narrow combination cuBLAS offers here.
    if (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_PEDANTIC && compute != CUBLAS_COMPUTE_32F_FAST_TF32)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    if (at != bt || at != ct || (at != CUDA_R_32F && at != CUDA_R_16BF)) return CUBLAS_STATUS_NOT_SUPPORTED;
    for (const void* host : {(const void*)ta, (const void*)tb, (const void*)m, (const void*)n, (const void*)k,
                             (const void*)lda, (const void*)ldb, (const void*)ldc, (const void*)size, alpha, beta}) {
        if (host == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
        if (is_device_pointer(host)) misuse(call, "a size, leading-dimension or scalar array is in device memory (cuBLAS reads them from the host)");
    }
    // The host arrays are read during the call; the pointer arrays when the stream runs it.
    std::vector<Gemm> shapes;
    std::vector<int> counts;
    size_t problems = 0;
    for (int gi = 0; gi < groups; ++gi) {
        Gemm g{ta[gi], tb[gi], m[gi], n[gi], k[gi], lda[gi], ldb[gi], ldc[gi], at, bt, ct,
               ((const float*)alpha)[gi], ((const float*)beta)[gi]};
        if (validate(g) != CUBLAS_STATUS_SUCCESS || size[gi] < 0) return CUBLAS_STATUS_INVALID_VALUE;
        shapes.push_back(g);
        counts.push_back(size[gi]);
        problems += (size_t)size[gi];
    }
    const int device = device_of_stream(h->stream);
    for (const void* array : {(const void*)a, (const void*)b, (const void*)c})
        if (problems > 0 && !device_range(array, problems * sizeof(void*), device, false))
            misuse(call, "a pointer array (A, B or C) is not in device memory on the stream's device");
    queue_on(h->stream, [=] {
        size_t p = 0;
        for (size_t gi = 0; gi < shapes.size(); ++gi)
            for (int i = 0; i < counts[gi]; ++i, ++p) {
                const Gemm& g = shapes[gi];
                if (g.m == 0 || g.n == 0) continue;
                if (g.k > 0) {
                    check_matrix(call, "A", a[p], a_extent(g), at, device);
                    check_matrix(call, "B", b[p], b_extent(g), bt, device);
                }
                check_matrix(call, "C", c[p], c_extent(g), ct, device);
                run(g, a[p], b[p], c[p]);
            }
    });
    return CUBLAS_STATUS_SUCCESS;
}
