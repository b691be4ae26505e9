// Checks the CPU emulator itself (build.sh builds and runs this): that its warp collectives
// and barriers give what a GPU gives (lanes that have returned vote false; static shared memory
// starts as garbage in every block), and that the mistakes it exists to catch are caught: a
// warp split between different barriers, a shuffle or an mma.sync with a lane that has returned, a write past
// an allocation or after its free, a launch over the thread or shared-memory limit, work on
// two streams with no event between.
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>

#include "launch.h"
#include "mma.cuh"

namespace {

int failures = 0;

void check(bool ok, const char* what) {
    std::printf("%s: %s\n", ok ? "ok" : "FAILED", what);
    if (!ok) ++failures;
}

// Runs `body` in a child process; true when the child died of `signal`.
bool dies_of(int signal, const std::function<void()>& body) {
    std::fflush(stdout);
    const pid_t pid = fork();
    if (pid == 0) {
        std::freopen("/dev/null", "w", stderr);
        body();
        std::_Exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFSIGNALED(status) && WTERMSIG(status) == signal;
}

// Block-wide sums through warp shuffles and shared memory, as common.cuh's block_sum does.
void block_sum_kernel(float* out) {
    __shared__ float partial[32];
    float v = (float)(threadIdx.x + 1);
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
    __syncthreads();
    float total = 0;
    for (unsigned int w = 0; w < (blockDim.x + 31) / 32; ++w) total += partial[w];
    out[threadIdx.x] = total;
}

void ballot_kernel(unsigned int* out) {
    const unsigned int b = __ballot_sync(0xffffffffu, threadIdx.x % 3 == 0);
    const int first = __shfl_sync(0xffffffffu, (int)threadIdx.x, 5);
    out[threadIdx.x] = b ^ (unsigned int)first;
}

// A warp's inclusive prefix sums by shifts up (lanes below the shift keep their own value),
// and the first lane whose sum reaches 100.
void scan_kernel(int* out) {
    const unsigned int lane = threadIdx.x & 31u;
    int v = (int)lane + 1;
    for (unsigned int d = 1; d < 32; d *= 2) {
        const int other = __shfl_up_sync(0xffffffffu, v, d);
        if (lane >= d) v += other;
    }
    out[threadIdx.x] = v;
    if (lane == 0) out[64 + (threadIdx.x >> 5)] = __ffs((int)__ballot_sync(0xffffffffu, v >= 100)) - 1;
    else (void)__ballot_sync(0xffffffffu, v >= 100);
}

// Small integers, exact in bf16: the A (16×16), B (16×8) and C (16×8) of the tensor-core check.
float mma_a(int m, int k) { return (float)((m * 3 + k) % 7 - 3); }
float mma_b(int k, int n) { return (float)((k + 2 * n) % 5 - 2); }
float mma_c(int m, int n) { return (float)(m - n); }
uint32_t bf16_pair(float lo, float hi) {
    uint32_t l, h;
    std::memcpy(&l, &lo, 4);
    std::memcpy(&h, &hi, 4);
    return (l >> 16) | (h >> 16 << 16);
}

// Each warp builds its fragments of A, B and C as the PTX ISA lays out mma.m16n8k16 and runs
// the product twice (D = C + 2·A·B); out holds each lane's four D values. With `leave`, lane 3
// returns first: the instruction needs the whole warp.
void mma_kernel(float* out, int leave) {
    const int lane = threadIdx.x & 31, g = lane / 4, t = lane % 4;
    if (leave && lane == 3) return;
    const uint32_t a[4] = {bf16_pair(mma_a(g, 2 * t), mma_a(g, 2 * t + 1)),
                           bf16_pair(mma_a(g + 8, 2 * t), mma_a(g + 8, 2 * t + 1)),
                           bf16_pair(mma_a(g, 2 * t + 8), mma_a(g, 2 * t + 9)),
                           bf16_pair(mma_a(g + 8, 2 * t + 8), mma_a(g + 8, 2 * t + 9))};
    const uint32_t b[2] = {bf16_pair(mma_b(2 * t, g), mma_b(2 * t + 1, g)),
                           bf16_pair(mma_b(2 * t + 8, g), mma_b(2 * t + 9, g))};
    float d[4] = {mma_c(g, 2 * t), mma_c(g, 2 * t + 1), mma_c(g + 8, 2 * t), mma_c(g + 8, 2 * t + 1)};
    smoe_emu::mma_m16n8k16_bf16(d, a, b);
    smoe_emu::mma_m16n8k16_bf16(d, a, b);
    for (int i = 0; i < 4; ++i) out[threadIdx.x * 4 + i] = d[i];
}

// Small integers and halves, exact in e4m3: the A (16×32) and B (32×8) of the fp8 check.
float fp8_a(int m, int k) { return (float)((m * 5 + k) % 9 - 4) * 0.5f; }
float fp8_b(int k, int n) { return (float)((k * 3 + n) % 7 - 3); }
// The e4m3 code of such a value (|x| < 8, a multiple of 0.5).
uint32_t e4m3_code(float x) {
    for (uint32_t c = 0; c < 256; ++c)
        if (smoe_emu::e4m3_value(c) == x) return c;
    std::abort();
}
uint32_t e4m3_word(float a, float b, float c, float d) {
    return e4m3_code(a) | e4m3_code(b) << 8 | e4m3_code(c) << 16 | e4m3_code(d) << 24;
}

// Each warp builds its fragments of A and B as the PTX ISA lays out mma.m16n8k32's 8-bit ones
// and runs the fp8 product (widened: as two bf16 products, mma.cuh's sm_80 path); out holds
// each lane's four D values.
void fp8_mma_kernel(float* out, int widened) {
    const int lane = threadIdx.x & 31, g = lane / 4, t = lane % 4;
    const auto a_word = [&](int m, int k0) {
        return e4m3_word(fp8_a(m, k0), fp8_a(m, k0 + 1), fp8_a(m, k0 + 2), fp8_a(m, k0 + 3));
    };
    const auto b_word = [&](int k0, int n) {
        return e4m3_word(fp8_b(k0, n), fp8_b(k0 + 1, n), fp8_b(k0 + 2, n), fp8_b(k0 + 3, n));
    };
    const uint32_t a[4] = {a_word(g, 4 * t), a_word(g + 8, 4 * t), a_word(g, 4 * t + 16), a_word(g + 8, 4 * t + 16)};
    const uint32_t b[2] = {b_word(4 * t, g), b_word(4 * t + 16, g)};
    float d[4] = {mma_c(g, 2 * t), mma_c(g, 2 * t + 1), mma_c(g + 8, 2 * t), mma_c(g + 8, 2 * t + 1)};
    if (widened) mma_e4m3_16832_widened(d, a, b);
    else mma_e4m3_16832(d, a, b);
    for (int i = 0; i < 4; ++i) out[threadIdx.x * 4 + i] = d[i];
}

// Half a warp at a bf16 mma.sync, the other half at an fp8 one.
void bf16_or_fp8_mma_kernel(float* out) {
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    const uint32_t a[4] = {0u, 0u, 0u, 0u}, b[2] = {0u, 0u};
    if (threadIdx.x < 16) smoe_emu::mma_m16n8k16_bf16(d, a, b);
    else smoe_emu::mma_m16n8k32_e4m3(d, a, b);
    out[threadIdx.x] = d[0];
}

// Half a warp at a shuffle, the other half at an mma.sync.
void shuffle_or_mma_kernel(float* out) {
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    const uint32_t a[4] = {0u, 0u, 0u, 0u}, b[2] = {0u, 0u};
    if (threadIdx.x < 16) d[0] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
    else smoe_emu::mma_m16n8k16_bf16(d, a, b);
    out[threadIdx.x] = d[0];
}

// Half a warp at a block barrier, the other half at a shuffle: hangs on a GPU.
void divergent_kernel(float* out) {
    float v = 1;
    if (threadIdx.x < 16) __syncthreads();
    else v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

// Lanes 16..31 return; the rest take a ballot (the returned lanes count as false) and then
// read a returned lane (a kernel bug: aborts).
void exited_lanes_kernel(unsigned int* out, int read_returned) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __ballot_sync(0xffffffffu, 1);
    if (read_returned) out[threadIdx.x] = __shfl_sync(0xffffffffu, 1u, 20);
}

// A static shared variable as gen_kernels.py rewrites it: garbage (all ones) at the start of
// every block, and thread 0's write survives the other threads passing the declaration.
void shared_kernel(int* first, int* after) {
    __shared__ int x;
    smoe_emu::poison_shared(&x, sizeof(x));
    if (threadIdx.x == 0) {
        first[blockIdx.x] = x;
        x = 7;
    }
    __syncthreads();
    after[blockIdx.x * blockDim.x + threadIdx.x] = x;
}

// A race: each thread reads its left neighbour's shared slot with no barrier after the writes.
// Threads run in index order, so it reads the written value; reversed, it reads garbage.
void neighbour_kernel(int* out) {
    __shared__ int slot[32];
    smoe_emu::poison_shared(slot, sizeof(slot));
    slot[threadIdx.x] = (int)threadIdx.x;
    out[threadIdx.x] = threadIdx.x == 0 ? 0 : slot[threadIdx.x - 1] + 1;
}

// Which block ran first.
void first_block_kernel(int* first) {
    if (threadIdx.x == 0 && *first < 0) *first = (int)(blockIdx.x + blockIdx.y * gridDim.x);
}

}  // namespace

int main() {
    using smoe_emu::run_grid;
    std::vector<float> sums(256);
    run_grid("block_sum", dim3{1}, dim3{256}, 0, [&] { block_sum_kernel(sums.data()); });
    bool all = true;
    for (float s : sums) all = all && s == 256.f * 257.f / 2.f;
    check(all, "a block sum over 256 threads reaches every thread");

    std::vector<unsigned int> ballots(64);
    run_grid("ballot", dim3{1}, dim3{64}, 0, [&] { ballot_kernel(ballots.data()); });
    unsigned int want0 = 0, want1 = 0;
    for (unsigned int l = 0; l < 32; ++l) {
        if (l % 3 == 0) want0 |= 1u << l;
        if ((l + 32) % 3 == 0) want1 |= 1u << l;
    }
    check(ballots[0] == (want0 ^ 5u) && ballots[31] == (want0 ^ 5u) && ballots[32] == (want1 ^ 37u),
          "ballots and broadcasts are per warp");

    std::vector<int> scans(66);
    run_grid("scan", dim3{1}, dim3{64}, 0, [&] { scan_kernel(scans.data()); });
    bool scanned = scans[64] == 13 && scans[65] == 13 && __ffs(0) == 0;  // 1+…+14 = 105
    for (int t = 0; t < 64; ++t) scanned = scanned && scans[t] == (t % 32 + 1) * (t % 32 + 2) / 2;
    check(scanned, "shifts up and __ffs give a warp's prefix sums and the first lane over a bound");

    check(dies_of(SIGABRT, [] {
              std::vector<float> out(32);
              run_grid("divergent", dim3{1}, dim3{32}, 0, [&] { divergent_kernel(out.data()); });
          }),
          "a warp split between a barrier and a shuffle aborts");

    std::vector<unsigned int> ballots16(32, 0);
    run_grid("exited", dim3{1}, dim3{32}, 0, [&] { exited_lanes_kernel(ballots16.data(), 0); });
    check(ballots16[0] == 0xffffu && ballots16[15] == 0xffffu, "lanes that have returned vote false in a ballot");
    check(dies_of(SIGABRT, [] {
              std::vector<unsigned int> out(32);
              run_grid("exited", dim3{1}, dim3{32}, 0, [&] { exited_lanes_kernel(out.data(), 1); });
          }),
          "a shuffle reading a lane that has returned aborts");

    std::vector<float> d(64 * 4, -1.f);
    run_grid("mma", dim3{1}, dim3{64}, 0, [&] { mma_kernel(d.data(), 0); });
    bool products = true;
    for (int lane = 0; lane < 64; ++lane)
        for (int i = 0; i < 4; ++i) {
            const int g = (lane & 31) / 4, t = lane % 4, m = g + (i >= 2 ? 8 : 0), n = 2 * t + (i & 1);
            float want = mma_c(m, n);
            for (int k = 0; k < 16; ++k) want += 2.f * mma_a(m, k) * mma_b(k, n);
            products = products && d[lane * 4 + i] == want;
        }
    check(products, "mma.m16n8k16 bf16: D = C + A·B from the PTX fragment layout, twice, per warp");
    check(dies_of(SIGABRT, [] {
              std::vector<float> out(32 * 4);
              run_grid("mma", dim3{1}, dim3{32}, 0, [&] { mma_kernel(out.data(), 1); });
          }),
          "an mma.sync a lane of the warp has left aborts");
    check(dies_of(SIGABRT, [] {
              std::vector<float> out(32);
              run_grid("split", dim3{1}, dim3{32}, 0, [&] { shuffle_or_mma_kernel(out.data()); });
          }),
          "a warp split between a shuffle and an mma.sync aborts");

    for (int widened = 0; widened < 2; ++widened) {
        std::vector<float> d8(64 * 4, -1.f);
        run_grid("fp8_mma", dim3{1}, dim3{64}, 0, [&] { fp8_mma_kernel(d8.data(), widened); });
        bool fp8_products = true;
        for (int lane = 0; lane < 64; ++lane)
            for (int i = 0; i < 4; ++i) {
                const int g = (lane & 31) / 4, t = lane % 4, m = g + (i >= 2 ? 8 : 0), n = 2 * t + (i & 1);
                float want = mma_c(m, n);
                for (int k = 0; k < 32; ++k) want += fp8_a(m, k) * fp8_b(k, n);
                fp8_products = fp8_products && d8[lane * 4 + i] == want;
            }
        check(fp8_products, widened ? "mma.m16n8k32 e4m3 as two bf16 products of the widened codes (sm_80's path): "
                                      "D = C + A·B"
                                    : "mma.m16n8k32 e4m3: D = C + A·B from the PTX fragment layout, per warp");
    }
    check(dies_of(SIGABRT, [] {
              std::vector<float> out(32);
              run_grid("split", dim3{1}, dim3{32}, 0, [&] { bf16_or_fp8_mma_kernel(out.data()); });
          }),
          "a warp split between a bf16 and an fp8 mma.sync aborts");

    std::vector<int> first(2, 0), after(64, 0);
    run_grid("shared", dim3{2}, dim3{32}, 0, [&] { shared_kernel(first.data(), after.data()); });
    bool sevens = true;
    for (int v : after) sevens = sevens && v == 7;
    check(first[0] == 0x7fffffff && first[1] == 0x7fffffff && sevens,
          "static shared memory is garbage at each block's start and keeps the block's own writes");

    for (const bool reverse : {false, true}) {
        smoe_emu::reverse_order() = reverse;
        std::vector<int> got(32, -1);
        run_grid("neighbour", dim3{1}, dim3{32}, 0, [&] { neighbour_kernel(got.data()); });
        bool in_order = true;
        for (int i = 0; i < 32; ++i) in_order = in_order && got[i] == i;
        check(in_order != reverse,
              reverse ? "reversed, a read of another thread's unfenced write sees garbage"
                      : "in index order, a read of a lower thread's unfenced write happens to pass");
        int first = -1;
        run_grid("first_block", dim3{3, 2}, dim3{32}, 0, [&] { first_block_kernel(&first); });
        check(first == (reverse ? 5 : 0), reverse ? "reversed, the last block runs first" : "block 0 runs first");
    }
    smoe_emu::reverse_order() = false;

    cuInit(0);
    CUcontext ctx;
    cuDevicePrimaryCtxRetain(&ctx, 0);
    cuCtxSetCurrent(ctx);
    CUdeviceptr p;
    check(cuMemAlloc(&p, 1000) == CUDA_SUCCESS, "an allocation");
    check(dies_of(SIGSEGV, [p] { ((volatile char*)p)[1024 + 4096 - 1] = 1; }), "a write past an allocation faults");
    cuMemFree(p);
    check(dies_of(SIGSEGV, [p] { ((volatile char*)p)[0] = 1; }), "a write to freed memory faults");

    // Two streams, no event: the second stream's copy reads what the first has not yet written.
    CUstream a, b;
    cuStreamCreate(&a, CU_STREAM_NON_BLOCKING);
    cuStreamCreate(&b, CU_STREAM_NON_BLOCKING);
    CUdeviceptr x, y;
    cuMemAlloc(&x, 4);
    cuMemAlloc(&y, 4);
    const int seven = 7, zero = 0;
    cuMemcpyHtoD(x, &zero, 4);
    cuMemcpyHtoDAsync(x, &seven, 4, a);
    cuMemcpyDtoDAsync(y, x, 4, b);
    int got = -1;
    cuMemcpyDtoHAsync(&got, y, 4, b);
    check(got == 0, "an unordered read on another stream misses the write");
    CUevent e;
    cuEventCreate(&e, 0);
    cuMemcpyHtoDAsync(x, &seven, 4, a);
    cuEventRecord(e, a);
    cuStreamWaitEvent(b, e, 0);
    cuMemcpyDtoDAsync(y, x, 4, b);
    cuMemcpyDtoHAsync(&got, y, 4, b);
    check(got == 7, "a read ordered by an event sees the write");

    CUmodule module;
    const char* ptx = ".visible .entry topk_rows_f32(\n";
    check(cuModuleLoadData(&module, ptx) == CUDA_SUCCESS, "a module from PTX");
    CUfunction f;
    check(cuModuleGetFunction(&f, module, "topk_rows_f32") == CUDA_SUCCESS, "a kernel of the engine's sources");
    check(cuModuleGetFunction(&f, module, "no_such_kernel") == CUDA_ERROR_NOT_FOUND, "an unknown kernel is refused");
    // Parameters of the right types; neither launch gets as far as reading them.
    int* out = nullptr;
    const float* scores = nullptr;
    const int* n_valid = nullptr;
    int k = 1;
    long long stride = 1;
    void* params[] = {&out, &scores, &n_valid, &k, &stride};
    check(cuLaunchKernel(f, 1, 1, 1, 1025, 1, 1, 0, a, params, nullptr) == CUDA_ERROR_INVALID_VALUE,
          "more than 1024 threads a block are refused");
    check(cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 64 * 1024, a, params, nullptr) == CUDA_ERROR_INVALID_VALUE,
          "64 KiB of dynamic shared memory without raising the limit is refused");

    // Stream capture: recorded work runs only when the graph is launched, every launch again,
    // on what the buffers hold then; the graph's own allocations are fresh garbage each launch.
    CUdeviceptr in, acc;
    cuMemAlloc(&in, 4);
    cuMemAlloc(&acc, 4);
    const int five = 5;
    cuMemcpyHtoD(in, &five, 4);
    cuMemcpyHtoD(acc, &seven, 4);
    cuStreamSynchronize(a);
    check(cuStreamBeginCapture_v2(a, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) == CUDA_SUCCESS, "a capture begins");
    CUdeviceptr scratch;
    check(cuMemAllocAsync(&scratch, 4, a) == CUDA_SUCCESS, "an allocation in a capture");
    cuMemcpyDtoDAsync(scratch, in, 4, a);
    cuMemcpyDtoDAsync(acc, scratch, 4, a);
    check(cuMemFreeAsync(scratch, a) == CUDA_SUCCESS, "the capture frees its own allocation");
    CUgraph graph;
    check(cuStreamEndCapture(a, &graph) == CUDA_SUCCESS, "the capture ends with a graph");
    cuMemcpyDtoH(&got, acc, 4);
    check(got == 7, "captured work has not run");
    CUgraphExec exec;
    check(cuGraphInstantiateWithFlags(&exec, graph, 0) == CUDA_SUCCESS, "the graph is instantiated");
    cuGraphLaunch(exec, a);
    cuMemcpyDtoHAsync(&got, acc, 4, a);
    check(got == 5, "a launch runs the captured work");
    const int nine = 9;
    cuMemcpyHtoD(in, &nine, 4);
    cuGraphLaunch(exec, a);
    cuMemcpyDtoHAsync(&got, acc, 4, a);
    check(got == 9, "a second launch reads the inputs as they are then");
    cuGraphExecDestroy(exec);
    cuGraphDestroy(graph);

    // Refused in a capture, and each refusal spoils it: a copy to or from the host, a wait, a
    // free of memory from before the capture, an allocation it does not free.
    const std::pair<const char*, std::function<CUresult()>> refused[] = {
        {"a copy from the host", [&] { return cuMemcpyHtoDAsync(in, &five, 4, a); }},
        {"a copy to the host", [&] { return cuMemcpyDtoHAsync(&got, in, 4, a); }},
        {"a stream synchronize", [&] { return cuStreamSynchronize(a); }},
        {"a free of older memory", [&] { return cuMemFreeAsync(in, a); }},
    };
    for (const auto& [what, call] : refused) {
        cuStreamBeginCapture_v2(a, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
        const CUresult r = call();
        CUstreamCaptureStatus status;
        cuStreamIsCapturing(a, &status);
        const CUresult ended = cuStreamEndCapture(a, &graph);
        check(r == CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED && status == CU_STREAM_CAPTURE_STATUS_INVALIDATED &&
                  ended == CUDA_ERROR_STREAM_CAPTURE_INVALIDATED,
              (std::string(what) + " in a capture is refused and spoils it").c_str());
    }
    cuStreamBeginCapture_v2(a, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
    cuMemAllocAsync(&scratch, 4, a);
    check(cuStreamEndCapture(a, &graph) == CUDA_SUCCESS && cuGraphInstantiateWithFlags(&exec, graph, 0) == CUDA_SUCCESS &&
              cuGraphLaunch(exec, a) == CUDA_SUCCESS && cuGraphLaunch(exec, a) == CUDA_ERROR_INVALID_VALUE,
          "a graph with an allocation it never frees launches once, then is refused");
    check(cuMemFreeAsync(scratch, a) == CUDA_ERROR_INVALID_VALUE, "a graph's allocation is not freed outside it");
    cuStreamSynchronize(a);
    cuGraphExecDestroy(exec);
    cuGraphDestroy(graph);
    cuMemFree(in);
    cuMemFree(acc);

    std::printf("%s\n", failures == 0 ? "emulator self-test passed" : "emulator self-test FAILED");
    return failures == 0 ? 0 : 1;
}
