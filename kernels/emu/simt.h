// A SIMT machine on the CPU, for running the engine's CUDA C kernels without a GPU.
//
// The stand-in driver (driver.cc) compiles kernels/cuda/engine.cu and topk.cu as C++ with this
// header forced in front. Each CUDA thread of a block is a fiber (ucontext) on the calling host
// thread; the blocks of a grid run one after another. A fiber runs until it reaches a barrier:
// `__syncthreads` releases when every live thread of the block is waiting on it, a warp
// collective (`__shfl*_sync`, `__ballot_sync`, `__syncwarp`) when every live lane of the warp is.
// Threads that have returned count as arrived, as on sm_70 and later. A block whose threads can
// make no progress (a warp with lanes at a collective and lanes at `__syncthreads`) is a kernel
// bug that hangs a GPU: here it is reported with the kernel's name and the process aborts.
//
// What this checks: the kernels' indexing, their use of shared memory and barriers, their
// arithmetic, in float32 as written. What it cannot: timing, the memory model across blocks
// (blocks never overlap here), and anything the hardware does differently from C++ float
// arithmetic (the kernels use no fast-math intrinsics beyond `__expf`, here `expf`).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static shared memory: one copy per host thread; the blocks of a launch run one at a time on
// it, so each block has it to itself. (Dynamic shared memory, `extern __shared__ T name[]`, is
// rewritten by build.sh into a call to smoe_emu::dynamic_smem().)
#define __shared__ static thread_local
// Kernel sources test this to call the emulator's collectives in place of inline PTX.
#define SMOE_EMULATED 1

namespace smoe_emu {

enum class State { Ready, AtWarp, AtBlock, Done };

struct Fiber {
    ucontext_t context;
    State state = State::Ready;
    uint64_t collectives = 0;  // warp collectives so far; its parity picks the exchange buffer
    dim3 index;
};

// One block in flight on this host thread.
struct Block {
    const char* kernel = nullptr;
    std::function<void()> body;
    std::vector<Fiber> fibers;
    std::vector<std::unique_ptr<char[]>> stacks;
    ucontext_t scheduler;
    size_t current = 0;
    // Warp collectives: each lane writes its value, waits for its warp, reads its source lane's.
    // Two buffers, alternating per collective, so a lane that runs ahead to the next collective
    // does not overwrite a value a slower lane has still to read; with each value, its stamp:
    // the number of the collective that wrote it and its kind (stamp()), so a lane that has
    // returned (it stops writing) or a warp split between two kinds of collective shows.
    std::vector<uint64_t> exchange[2];
    std::vector<uint64_t> stamp[2];
    // The same for the tensor-core collective (mma_m16n8k16_bf16): each lane's A and B
    // fragments, kMmaWords a lane.
    std::vector<uint32_t> fragments[2];
    std::vector<unsigned char> dynamic_smem;
    uint64_t serial = 0;  // which block this is, for poison_shared
};

inline thread_local Block* block = nullptr;
constexpr size_t kMmaWords = 6;  // a lane's A (4 registers) and B (2) fragments
constexpr size_t kStackBytes = 256 * 1024;

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "sparsemoe CUDA emulator: kernel %s, block (%u,%u,%u): %s\n",
                 block != nullptr ? block->kernel : "?", blockIdx.x, blockIdx.y, blockIdx.z, what);
    std::abort();
}

inline Fiber& self() { return block->fibers[block->current]; }

inline void wait(State state) {
    Fiber& f = self();
    f.state = state;
    if (swapcontext(&f.context, &block->scheduler) != 0) fail("swapcontext failed");
}

inline void fiber_main() {
    block->body();
    self().state = State::Done;
    // uc_link returns to the scheduler.
}

inline unsigned int lane() { return (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) & 31u; }
inline size_t linear_thread() {
    return threadIdx.x + (size_t)blockDim.x * (threadIdx.y + (size_t)blockDim.y * threadIdx.z);
}

// Only full-warp collectives are modelled (every kernel here uses them).
inline void full_mask(unsigned int mask, int width = 32) {
    if (mask != 0xffffffffu || width != 32) fail("a warp collective with a partial mask or width (not emulated)");
}

// Kinds of warp collective: value exchanges (shuffles, ballots, __syncwarp) and mma.sync (bf16,
// and e4m3).
enum class Collective : uint64_t { Exchange = 0, Mma = 1, MmaFp8 = 2 };

// What a lane at collective number `n` of kind `kind` writes beside its value.
inline uint64_t stamp(uint64_t n, Collective kind) { return 4 * n + (uint64_t)kind; }

// Whether lane `from` (a thread of the block) is at collective `n` of kind `kind` too: false
// when it has returned; a lane at the same collective number but of the other kind (a warp
// split between a shuffle and an mma.sync, which hangs or corrupts on a GPU) aborts.
inline bool at_same_collective(size_t from, uint64_t n, Collective kind) {
    if (from >= block->fibers.size()) return false;
    const uint64_t s = block->stamp[n & 1][from];
    if (s == stamp(n, kind)) return true;
    if (s / 4 == n) fail("a warp split between two kinds of collective (a shuffle or ballot, a bf16 or an fp8 mma.sync)");
    return false;
}

// Publishes the calling lane's `bits` and waits for its warp; returns which collective this
// is. The warp's values are then in exchange[n & 1] from the warp's first thread.
inline uint64_t publish(uint64_t bits) {
    Fiber& f = self();
    const uint64_t n = ++f.collectives;
    const size_t me = linear_thread();
    block->exchange[n & 1][me] = bits;
    block->stamp[n & 1][me] = stamp(n, Collective::Exchange);
    wait(State::AtWarp);
    return n;
}

// Exchanges `bits` across the calling lane's warp: returns the value `source` lane wrote.
inline uint64_t exchange(uint64_t bits, unsigned int source) {
    const uint64_t n = publish(bits);
    const size_t from = (linear_thread() & ~(size_t)31) + source;
    if (source >= 32 || from >= block->fibers.size()) fail("warp collective reads a lane that does not exist");
    if (!at_same_collective(from, n, Collective::Exchange)) fail("warp collective reads a lane that has returned");
    return block->exchange[n & 1][from];
}

// All 32 lanes' values into `out`; lanes past the block's end or that have returned give 0.
inline void exchange_all(uint64_t bits, uint64_t* out) {
    const uint64_t n = publish(bits);
    const size_t first = linear_thread() & ~(size_t)31;
    for (size_t l = 0; l < 32; ++l) {
        const size_t from = first + l;
        out[l] = at_same_collective(from, n, Collective::Exchange) ? block->exchange[n & 1][from] : 0;
    }
}

// A bf16 value from the low (hi = false) or high 16 bits of a fragment register, widened.
inline float bf16_half(uint32_t reg, bool hi) {
    const uint32_t bits = (hi ? reg >> 16 : reg & 0xffffu) << 16;
    float v;
    std::memcpy(&v, &bits, 4);
    return v;
}

// The value of an e4m3 ("fn") code: no infinities, S.1111.111 NaN. (include/cuda_fp8.h's
// conversions use it too.)
inline float e4m3_value(unsigned int code) {
    const unsigned int e = (code >> 3) & 15u, m = code & 7u;
    float v;
    if (e == 15u && m == 7u) v = NAN;
    else if (e == 0u) v = std::ldexp((float)m, -9);
    else v = std::ldexp(1.f + (float)m / 8.f, (int)e - 7);
    return (code & 0x80u) ? -v : v;
}

// The calling lane's part of an mma.sync of kind `kind`: publishes its fragments (A's four
// registers, B's two), waits for its warp, and copies all 32 lanes' into `lanes`, failing when a
// lane is missing.
inline void mma_fragments(Collective kind, const uint32_t (&a)[4], const uint32_t (&b)[2],
                          uint32_t (&lanes)[32][kMmaWords]) {
    Fiber& f = self();
    const uint64_t n = ++f.collectives;
    const size_t me = linear_thread();
    uint32_t* mine = &block->fragments[n & 1][me * kMmaWords];
    for (int i = 0; i < 4; ++i) mine[i] = a[i];
    mine[4] = b[0];
    mine[5] = b[1];
    block->stamp[n & 1][me] = stamp(n, kind);
    wait(State::AtWarp);
    const size_t first = me & ~(size_t)31;
    for (size_t l = 0; l < 32; ++l) {
        const size_t from = first + l;
        if (!at_same_collective(from, n, kind))
            fail("mma.sync with a lane of the warp missing (returned, or past the block's end)");
        std::memcpy(lanes[l], &block->fragments[n & 1][from * kMmaWords], sizeof lanes[l]);
    }
}

// d += A · B for the calling lane's four outputs (D[g][2t, 2t+1], D[g+8][2t, 2t+1]), each
// output's K products exact in double, summed there and rounded to float once.
template <size_t K>
inline void mma_outputs(float (&d)[4], const float (&A)[16][K], const float (&B)[K][8]) {
    const size_t g = lane() / 4, t = lane() % 4;
    for (size_t i = 0; i < 4; ++i) {
        const size_t row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        double sum = d[i];
        for (size_t k = 0; k < K; ++k) sum += (double)A[row][k] * (double)B[k][col];
        d[i] = (float)sum;
    }
}

// `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 d, a, b, d` for the calling warp:
// D (16×8, float) += A (16×16, bf16) · B (16×8, bf16), the matrices spread over the 32 lanes as
// the PTX ISA lays out this shape's fragments, with g = lane / 4 and t = lane % 4 (a register's
// lower-numbered element in its low 16 bits):
//   a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   d[0], d[1] = D[g][2t, 2t+1]   d[2], d[3] = D[g+8][2t, 2t+1]
// Every lane of the warp must take part (the instruction is warp-synchronous); a lane that has
// returned makes it fail. Products are exact in double, each output's 16 summed there and
// rounded to float once (a GPU sums them in at least float precision, in its own order).
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    uint32_t lanes[32][kMmaWords];
    mma_fragments(Collective::Mma, a, b, lanes);
    float A[16][16], B[16][8];
    for (size_t l = 0; l < 32; ++l) {
        const uint32_t* r = lanes[l];
        const size_t g = l / 4, t = l % 4;
        for (size_t e = 0; e < 2; ++e) {
            A[g][2 * t + e] = bf16_half(r[0], e == 1);
            A[g + 8][2 * t + e] = bf16_half(r[1], e == 1);
            A[g][2 * t + 8 + e] = bf16_half(r[2], e == 1);
            A[g + 8][2 * t + 8 + e] = bf16_half(r[3], e == 1);
            B[2 * t + e][g] = bf16_half(r[4], e == 1);
            B[2 * t + 8 + e][g] = bf16_half(r[5], e == 1);
        }
    }
    mma_outputs(d, A, B);
}

// `mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 d, a, b, d` (sm_89 and later): D (16×8,
// float) += A (16×32, e4m3) · B (32×8, e4m3), four codes a register (the lowest-numbered element
// in the low byte), laid out as the PTX ISA lays out this shape's 8-bit fragments:
//   a[0] = A[g][4t .. 4t+3]   a[1] = A[g+8][4t .. 4t+3]   a[2] = A[g][4t+16 .. 4t+19]   a[3] = A[g+8][4t+16 .. 4t+19]
//   b[0] = B[4t .. 4t+3][g]   b[1] = B[4t+16 .. 4t+19][g]
//   d as mma_m16n8k16_bf16
// The kernels use it only for whole dot products over k with A and B packed alike, which a
// different order of k within the instruction would leave the same.
inline void mma_m16n8k32_e4m3(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    uint32_t lanes[32][kMmaWords];
    mma_fragments(Collective::MmaFp8, a, b, lanes);
    float A[16][32], B[32][8];
    for (size_t l = 0; l < 32; ++l) {
        const uint32_t* r = lanes[l];
        const size_t g = l / 4, t = l % 4;
        for (size_t e = 0; e < 4; ++e) {
            const auto code = [&](int reg) { return e4m3_value((r[reg] >> (8 * e)) & 0xffu); };
            A[g][4 * t + e] = code(0);
            A[g + 8][4 * t + e] = code(1);
            A[g][4 * t + 16 + e] = code(2);
            A[g + 8][4 * t + 16 + e] = code(3);
            B[4 * t + e][g] = code(4);
            B[4 * t + 16 + e][g] = code(5);
        }
    }
    mma_outputs(d, A, B);
}

// Garbage, as a GPU's fresh memory is: the bytes ff ff ff 7f over and over from `p` (4-byte
// aligned), which read as NaN in float32 (0x7fffffff), bf16 (0xffff, 0x7fff) and e4m3, and as
// 2147483647 in int32: not -1, which the kernels write for "none", so an index read before it
// was written points far out of bounds instead of passing for an empty entry.
inline void poison(void* p, size_t bytes) {
    const size_t words = bytes / 4;
    std::fill_n(static_cast<uint32_t*>(p), words, 0x7fffffffu);
    auto* tail = static_cast<unsigned char*>(p) + 4 * words;
    for (size_t i = 0; i < bytes % 4; ++i) tail[i] = 0xff;
}

// Fills a static shared variable with garbage (poison) the first time a block's threads reach
// its declaration (gen_kernels.py puts the call after each one): garbage, as on a GPU, instead
// of zeros or the previous block's values.
inline void poison_shared(void* p, size_t bytes) {
    thread_local std::vector<std::pair<void*, uint64_t>> seen;
    for (auto& [at, serial] : seen)
        if (at == p) {
            if (serial != block->serial) {
                serial = block->serial;
                poison(p, bytes);
            }
            return;
        }
    seen.emplace_back(p, block->serial);
    poison(p, bytes);
}

inline void* dynamic_smem() { return block->dynamic_smem.data(); }

// `SPARSEMOE_EMU_ORDER=reverse`: a block's threads, between barriers, and a grid's blocks run
// from the last index down instead of from 0 up. Both orders are schedules a GPU may take, so a
// kernel must pass in both: a thread that reads what a lower-numbered thread wrote with no barrier
// between passes forward (the writer ran first) and fails reversed, and a block that counts on
// lower-numbered blocks having run fails reversed too.
// (The self-test sets it through the reference.)
inline bool& reverse_order() {
    static bool reverse = [] {
        const char* env = std::getenv("SPARSEMOE_EMU_ORDER");
        if (env == nullptr || std::strcmp(env, "forward") == 0) return false;
        if (std::strcmp(env, "reverse") == 0) return true;
        std::fprintf(stderr, "sparsemoe CUDA emulator: SPARSEMOE_EMU_ORDER=%s: expected forward or reverse\n", env);
        std::abort();
    }();
    return reverse;
}

// Runs one block of `body` with the block shape in blockDim and its index in blockIdx.
inline void run_block(const char* kernel, const std::function<void()>& body, size_t smem_bytes) {
    thread_local Block b;
    const size_t threads = (size_t)blockDim.x * blockDim.y * blockDim.z;
    b.kernel = kernel;
    b.body = body;
    b.fibers.assign(threads, Fiber{});
    while (b.stacks.size() < threads) b.stacks.emplace_back(new char[kStackBytes]);
    for (auto& e : b.exchange) e.assign((threads + 31) & ~(size_t)31, 0);
    for (auto& e : b.stamp) e.assign((threads + 31) & ~(size_t)31, 0);
    for (auto& e : b.fragments) e.assign(((threads + 31) & ~(size_t)31) * kMmaWords, 0);
    ++b.serial;
    // Shared memory starts as garbage on a GPU: poison here (NaN as floats, a huge int), so a
    // kernel that reads before it writes gets an answer no test accepts.
    b.dynamic_smem.resize(smem_bytes);
    poison(b.dynamic_smem.data(), smem_bytes);
    Block* outer = block;
    block = &b;
    size_t t = 0;
    for (unsigned int z = 0; z < blockDim.z; ++z)
        for (unsigned int y = 0; y < blockDim.y; ++y)
            for (unsigned int x = 0; x < blockDim.x; ++x, ++t) {
                Fiber& f = b.fibers[t];
                f.index = dim3{x, y, z};
                if (getcontext(&f.context) != 0) fail("getcontext failed");
                f.context.uc_stack.ss_sp = b.stacks[t].get();
                f.context.uc_stack.ss_size = kStackBytes;
                f.context.uc_link = &b.scheduler;
                makecontext(&f.context, fiber_main, 0);
            }
    for (;;) {
        const bool reverse = reverse_order();
        for (size_t n = 0; n < threads; ++n) {
            const size_t i = reverse ? threads - 1 - n : n;
            if (b.fibers[i].state != State::Ready) continue;
            b.current = i;
            threadIdx = b.fibers[i].index;
            b.fibers[i].state = State::Done;  // fiber_main or wait() sets the real state
            if (swapcontext(&b.scheduler, &b.fibers[i].context) != 0) fail("swapcontext failed");
        }
        size_t live = 0, at_block = 0;
        bool released = false;
        for (size_t w = 0; w < threads; w += 32) {
            size_t warp_live = 0, warp_at = 0;
            for (size_t i = w; i < threads && i < w + 32; ++i) {
                const State s = b.fibers[i].state;
                if (s == State::Done) continue;
                ++warp_live;
                if (s == State::AtWarp) ++warp_at;
                if (s == State::AtBlock) ++at_block;
            }
            live += warp_live;
            if (warp_at > 0 && warp_at == warp_live) {
                for (size_t i = w; i < threads && i < w + 32; ++i)
                    if (b.fibers[i].state == State::AtWarp) b.fibers[i].state = State::Ready;
                released = true;
            }
        }
        if (live == 0) break;
        if (released) continue;
        if (at_block == live) {
            for (auto& f : b.fibers)
                if (f.state == State::AtBlock) f.state = State::Ready;
            continue;
        }
        fail("deadlock: the block's threads wait at different barriers (a __syncthreads some "
             "threads skip, or a warp collective not every lane of the warp reaches)");
    }
    block = outer;
}

template <typename T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp collectives move at most 8 bytes");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    return bits;
}

template <typename T>
inline T from_bits(uint64_t bits) {
    T v;
    std::memcpy(&v, &bits, sizeof(T));
    return v;
}

}  // namespace smoe_emu

inline void __syncthreads() { smoe_emu::wait(smoe_emu::State::AtBlock); }
inline void __syncwarp(unsigned int mask = 0xffffffffu) {
    smoe_emu::full_mask(mask);
    (void)smoe_emu::publish(0);
}

template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T v, int lane_mask, int width = 32) {
    smoe_emu::full_mask(mask, width);
    const unsigned int source = (smoe_emu::lane() ^ (unsigned int)lane_mask) & 31u;
    return smoe_emu::from_bits<T>(smoe_emu::exchange(smoe_emu::to_bits(v), source));
}

template <typename T>
inline T __shfl_sync(unsigned int mask, T v, int source_lane, int width = 32) {
    smoe_emu::full_mask(mask, width);
    return smoe_emu::from_bits<T>(smoe_emu::exchange(smoe_emu::to_bits(v), (unsigned int)source_lane & 31u));
}

template <typename T>
inline T __shfl_up_sync(unsigned int mask, T v, unsigned int delta, int width = 32) {
    smoe_emu::full_mask(mask, width);
    const unsigned int lane = smoe_emu::lane();
    return smoe_emu::from_bits<T>(smoe_emu::exchange(smoe_emu::to_bits(v), lane >= delta ? lane - delta : lane));
}

inline unsigned int __ballot_sync(unsigned int mask, int predicate) {
    smoe_emu::full_mask(mask);
    uint64_t all[32];
    smoe_emu::exchange_all(predicate != 0 ? 1 : 0, all);
    unsigned int ballot = 0;
    for (unsigned int l = 0; l < 32; ++l)
        if (all[l] != 0) ballot |= 1u << l;
    return ballot & mask;
}

// Blocks run one at a time on one host thread: plain read-modify-writes are atomic here.
template <typename T>
inline T atomicAdd(T* address, T value) {
    const T old = *address;
    *address = old + value;
    return old;
}

inline float __int_as_float(int v) { return smoe_emu::from_bits<float>((uint32_t)v); }
inline float __uint_as_float(unsigned int v) { return smoe_emu::from_bits<float>(v); }
inline unsigned int __float_as_uint(float v) { return (unsigned int)smoe_emu::to_bits(v); }
inline int __float_as_int(float v) { return (int)smoe_emu::to_bits(v); }
inline int __popc(unsigned int v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline int __float2int_rn(float x) { return (int)std::nearbyint(x); }
// CUDA's integer and float min/max overloads.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
