// A stand-in for libcuda.so on a machine with no GPU: the subset of the CUDA driver API the
// engine's CUDA backend uses (through cudarc), running the engine's kernels on the CPU with
// simt.h. It exists so that engine/tests/cuda.rs can run the CUDA backend's host code and
// kernels end to end here and in CI; it is no substitute for the GPU run (kernels/gpu-check.sh).
//
// Faithful where a mistake in the caller would otherwise hide:
// - Streams run lazily. Work queued on a stream runs when something needs it: a synchronize, a
//   copy to the host, an event another stream waits on. Work on two streams with no event
//   between them is not ordered, and here it runs in whichever order is demanded first: a
//   missing wait shows up as a wrong answer instead of passing by luck.
// - Device memory is its own mapping per allocation, with its end against an inaccessible page
//   (a read or write past the end is a segmentation fault) and unmapped when freed (so is a use
//   after free). Every pointer a kernel or cuBLAS is given must lie in a live allocation on the
//   right device; every host array cuBLAS reads must not.
// - Launch limits: at most 1024 threads a block, grid y and z at most 65535, dynamic shared
//   memory above 48 KiB only after cuFuncSetAttribute raised the function's limit (227 KiB at
//   most, as on sm_90).
// - The kernels are the engine's own sources (engine.cu, topk.cu), compiled as C++ by build.sh;
//   a kernel the PTX names but this build lacks is CUDA_ERROR_NOT_FOUND.
//
// Not modelled: timing, concurrency between blocks, caching, and every driver call the engine
// does not make (they are absent, and cudarc names a missing one when it is called).
#include "launch.h"

#include <elf.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <string>

namespace smoe_emu {

std::recursive_mutex& lock() {
    static std::recursive_mutex m;
    return m;
}

namespace {

constexpr int kMaxDevices = 8;
constexpr size_t kDeviceBytes = size_t{16} << 30;  // what each device reports as its memory
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kMaxSmem = 227 * 1024;

[[noreturn]] void die(const char* format, ...) {
    std::va_list args;
    va_start(args, format);
    std::fprintf(stderr, "sparsemoe CUDA emulator: ");
    std::vfprintf(stderr, format, args);
    std::fprintf(stderr, "\n");
    va_end(args);
    std::abort();
}

int device_count() {
    static const int count = [] {
        const char* env = std::getenv("SPARSEMOE_EMU_DEVICES");
        const int n = env != nullptr ? std::atoi(env) : 2;
        return std::clamp(n, 1, kMaxDevices);
    }();
    return count;
}

// Multiprocessors a device reports (SPARSEMOE_EMU_SMS, default 1): the engine sizes launches
// by them (keys split over blocks, heads a block, split-K), so 132, an H200's, takes the
// choices the GPU run will.
int multiprocessors() {
    static const int count = [] {
        const char* env = std::getenv("SPARSEMOE_EMU_SMS");
        const int n = env != nullptr ? std::atoi(env) : 1;
        return std::clamp(n, 1, 1024);
    }();
    return count;
}

struct Allocation {
    char* map;
    size_t map_bytes;
    size_t bytes;
    int device;
};

std::map<uintptr_t, Allocation>& allocations() {
    static std::map<uintptr_t, Allocation> a;
    return a;
}
size_t allocated[kMaxDevices] = {};
bool peer_enabled[kMaxDevices][kMaxDevices] = {};
thread_local CUcontext current = nullptr;

}  // namespace

// Frees an allocation a graph owned (defined with the allocator below).
void release_owned(CUdeviceptr p);

// Work and allocations recorded by a stream capture. Stricter than the driver where the engine
// must never go (each refusal invalidates the capture, as the driver's do):
// - nothing is copied from or to the host, and no event is recorded or waited on, in a capture
//   (a graph would copy the same host bytes again at every launch; the engine captures one
//   stream);
// - nothing from before a capture is freed in it.
// As the driver does, a graph that leaves one of its allocations live launches once, and is
// refused after (the allocation would still be live), and such an allocation is never freed
// outside its graph here (the driver allows that; the engine never does it).
struct Recording {
    std::vector<std::function<void()>> work;
    std::map<CUdeviceptr, size_t> owned;  // every allocation made while capturing, and its bytes
    bool unfreed = false;                 // one of them was still live when the capture ended
    ~Recording() {
        for (const auto& [p, bytes] : owned) release_owned(p);
    }
};
struct Capture {
    std::shared_ptr<Recording> recording = std::make_shared<Recording>();
    std::set<CUdeviceptr> live;  // allocated in the capture and not yet freed in it
    bool invalidated = false;
};
// Every allocation some capture or graph owns (freed only with its graph).
std::set<CUdeviceptr>& graph_owned() {
    static std::set<CUdeviceptr> s;
    return s;
}

}  // namespace smoe_emu

struct CUctx_st {
    int device;
    int retained;
};
struct CUstream_st {
    CUcontext ctx;
    bool blocking;  // synchronises with the legacy default stream
    std::deque<std::function<void()>> queue;
    uint64_t enqueued = 0, executed = 0;
    bool running = false;
    std::unique_ptr<smoe_emu::Capture> capture;  // while cuStreamBeginCapture records its work
};
// A captured graph: its work in order, and the allocations made while capturing it, which it
// owns until it is destroyed (both handles share it).
struct CUgraph_st {
    std::shared_ptr<smoe_emu::Recording> recording;
};
struct CUgraphExec_st {
    std::shared_ptr<smoe_emu::Recording> recording;
    bool launched = false;
};
struct CUevent_st {
    CUstream stream = nullptr;  // where it was last recorded (nullptr: never, or the default stream)
    uint64_t seq = 0;
};
struct CUmod_st {
    std::set<std::string> entries;
};
struct CUfunc_st {
    const smoe_emu::KernelEntry* kernel;
    size_t max_dynamic_smem = smoe_emu::kDefaultSmem;
};
struct CUmemPoolHandle_st {
    int device;
    // What the engine sets; this emulator frees at once whatever the threshold (memory is
    // never held back), so it is only stored and read back.
    cuuint64_t release_threshold = 0;
};

namespace smoe_emu {
namespace {

CUctx_st contexts[kMaxDevices];
CUmemPoolHandle_st pools[kMaxDevices];
std::set<CUstream>& streams() {
    static std::set<CUstream> s;
    return s;
}
std::set<CUevent>& events() {
    static std::set<CUevent> e;
    return e;
}

// Runs `stream`'s queued work up to (not including) position `seq`.
void run_until(CUstream stream, uint64_t seq) {
    if (stream->running && stream->executed < seq) die("a stream waits on work queued after the wait itself");
    while (stream->executed < seq) {
        auto op = std::move(stream->queue.front());
        stream->queue.pop_front();
        stream->running = true;
        op();
        stream->running = false;
        ++stream->executed;
    }
}

void drain(CUstream stream) { run_until(stream, stream->enqueued); }

// Everything queued on `device` (cuCtxSynchronize, cuMemFree, the legacy default stream: only
// the blocking streams for that).
void drain_device(int device, bool blocking_only) {
    for (CUstream s : streams())
        if (s->ctx->device == device && (!blocking_only || s->blocking)) drain(s);
}

bool is_default(CUstream s) {
    return s == nullptr || s == CU_STREAM_LEGACY || s == CU_STREAM_PER_THREAD;
}


// Queues `op` on `stream`; the default stream runs it now, after the blocking streams' work.
void enqueue(CUstream stream, std::function<void()> op) {
    if (is_default(stream)) {
        if (current == nullptr) die("work on the default stream with no current context");
        drain_device(current->device, true);
        op();
        return;
    }
    if (stream->capture) {
        stream->capture->recording->work.push_back(std::move(op));
        return;
    }
    stream->queue.push_back(std::move(op));
    ++stream->enqueued;
}

bool capturing(CUstream stream) { return !is_default(stream) && stream->capture != nullptr; }

// Refuses a call a capture may not contain: invalidates `stream`'s capture (every capture,
// when `stream` is null: a call that waits for the whole device), as the driver does.
bool refused_in_capture(CUstream stream) {
    bool refused = false;
    for (CUstream s : streams())
        if (s->capture && (stream == nullptr || s == stream)) {
            s->capture->invalidated = true;
            refused = true;
        }
    return refused;
}

int stream_device(CUstream stream) {
    if (is_default(stream)) return current != nullptr ? current->device : 0;
    return stream->ctx->device;
}

const Allocation* find(uintptr_t p) {
    auto& a = allocations();
    auto it = a.upper_bound(p);
    if (it == a.begin()) return nullptr;
    --it;
    if (p >= it->first + std::max<size_t>(it->second.bytes, 1)) return nullptr;
    return &it->second;
}

}  // namespace

bool device_range(const void* p, size_t bytes, int device, bool peers_allowed) {
    const Allocation* a = find((uintptr_t)p);
    // A kernel argument may point one past an allocation's end (an empty view).
    if (a == nullptr && bytes == 0 && (uintptr_t)p > 0) a = find((uintptr_t)p - 1);
    if (a == nullptr) return false;


    if (device >= 0 && a->device != device && !(peers_allowed && peer_enabled[device][a->device])) return false;
    return bytes == 0 || find((uintptr_t)p + bytes - 1) == a;
}

bool is_device_pointer(const void* p) { return find((uintptr_t)p) != nullptr; }

void queue_on(void* stream, std::function<void()> op) { enqueue((CUstream)stream, std::move(op)); }
int device_of_stream(void* stream) { return stream_device((CUstream)stream); }

// With SPARSEMOE_EMU_STATS=FILE, the process's calls by kind, as the engine made them (kernel
// launches by kernel, cuBLAS calls by function, copies by direction, memsets, allocations,
// waits for the host), are written to FILE as JSON when it exits: {"what": [calls, bytes]}.
// Counts, not times: what a GPU would be asked to do, for bench/decode-calls.sh. The counts are
// never destroyed (a call during exit still finds them); an atexit handler, registered with
// the first count, writes them under the lock, and later calls are not counted.
namespace {
struct Stats {
    std::map<std::string, std::pair<unsigned long long, unsigned long long>> calls;
    bool written = false;
};
Stats& stats() {
    static Stats* s = new Stats;
    return *s;
}
void write_stats() {
    std::lock_guard<std::recursive_mutex> guard(lock());
    Stats& s = stats();
    s.written = true;
    const char* path = std::getenv("SPARSEMOE_EMU_STATS");
    std::FILE* f = path != nullptr && *path != 0 ? std::fopen(path, "w") : nullptr;
    if (f == nullptr) return;
    std::fprintf(f, "{");
    const char* sep = "";
    for (const auto& [what, n] : s.calls) {
        std::fprintf(f, "%s\n  \"%s\": [%llu, %llu]", sep, what.c_str(), n.first, n.second);
        sep = ",";
    }
    std::fprintf(f, "\n}\n");
    std::fclose(f);
}
}  // namespace

void count_call(const std::string& what, size_t bytes) {
    static const bool wanted = [] {
        const char* path = std::getenv("SPARSEMOE_EMU_STATS");
        return path != nullptr && *path != 0 && std::atexit(write_stats) == 0;
    }();
    if (!wanted) return;
    std::lock_guard<std::recursive_mutex> guard(lock());
    Stats& s = stats();
    if (s.written) return;
    auto& n = s.calls[what];
    n.first += 1;
    n.second += bytes;
}

}  // namespace smoe_emu

using namespace smoe_emu;

#define API extern "C" __attribute__((visibility("default")))
#define LOCKED std::lock_guard<std::recursive_mutex> guard(lock())
#define NEED_CONTEXT \
    if (current == nullptr) return CUDA_ERROR_INVALID_CONTEXT

namespace {
bool initialised = false;

CUresult check_alloc_target(CUdeviceptr p, size_t bytes) {
    if (bytes == 0) return CUDA_SUCCESS;
    if (!device_range((const void*)p, bytes, -1, false)) return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}

CUresult alloc(CUdeviceptr* out, size_t bytes, int device) {
    if (out == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (allocated[device] + bytes > kDeviceBytes) return CUDA_ERROR_OUT_OF_MEMORY;
    const size_t page = 4096;
    const size_t data = (bytes + 255) & ~(size_t)255;
    const size_t data_pages = (std::max<size_t>(data, 1) + page - 1) / page;
    const size_t map_bytes = (data_pages + 1) * page;
    void* map = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (map == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
    char* guard = (char*)map + data_pages * page;
    if (mprotect(guard, page, PROT_NONE) != 0) die("mprotect failed");
    // Fresh device memory is garbage (smoe_emu::poison: NaN as float32, bf16 and e4m3, a huge
    // int32, never the kernels' -1 for "none").
    char* start = guard - data;
    smoe_emu::poison(start, data);
    allocations()[(uintptr_t)start] = Allocation{(char*)map, map_bytes, bytes, device};
    allocated[device] += bytes;
    *out = (CUdeviceptr)start;
    return CUDA_SUCCESS;
}

CUresult release(CUdeviceptr p) {
    auto& a = allocations();
    auto it = a.find((uintptr_t)p);
    if (it == a.end()) return CUDA_ERROR_INVALID_VALUE;
    allocated[it->second.device] -= it->second.bytes;
    munmap(it->second.map, it->second.map_bytes);
    a.erase(it);
    return CUDA_SUCCESS;
}

}  // namespace

void smoe_emu::release_owned(CUdeviceptr p) {
    graph_owned().erase(p);
    if (release(p) != CUDA_SUCCESS) die("a graph's allocation %#llx was freed elsewhere", (unsigned long long)p);
}

namespace {
const char* error_name(CUresult e) {
    switch (e) {
        case CUDA_SUCCESS: return "CUDA_SUCCESS";
        case CUDA_ERROR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
        case CUDA_ERROR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
        case CUDA_ERROR_NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
        case CUDA_ERROR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
        case CUDA_ERROR_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
        case CUDA_ERROR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
        case CUDA_ERROR_NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
        case CUDA_ERROR_NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
        case CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED: return "CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED";
        case CUDA_ERROR_ILLEGAL_STATE: return "CUDA_ERROR_ILLEGAL_STATE";
        case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
        case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: return "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED";
        default: return "CUDA_ERROR_UNKNOWN";
    }
}
}  // namespace

API CUresult cuGetErrorName(CUresult e, const char** out) {
    if (out == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *out = error_name(e);
    return CUDA_SUCCESS;
}
API CUresult cuGetErrorString(CUresult e, const char** out) { return cuGetErrorName(e, out); }

API CUresult cuInit(unsigned int flags) {
    LOCKED;
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    for (int d = 0; d < kMaxDevices; ++d) {
        contexts[d].device = d;
        pools[d].device = d;
    }
    initialised = true;
    return CUDA_SUCCESS;
}

#define NEED_INIT \
    if (!initialised) return CUDA_ERROR_NOT_INITIALIZED

API CUresult cuDriverGetVersion(int* v) {
    if (v == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetCount(int* n) {
    NEED_INIT;
    if (n == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *n = device_count();
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    NEED_INIT;
    if (d == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (ordinal < 0 || ordinal >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    *d = ordinal;
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    NEED_INIT;
    if (d < 0 || d >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    if (name == nullptr || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    std::snprintf(name, (size_t)len, "sparsemoe CPU emulation %d (not a GPU)", d);
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetAttribute(int* v, CUdevice_attribute attribute, CUdevice d) {
    NEED_INIT;
    if (d < 0 || d >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    if (v == nullptr) return CUDA_ERROR_INVALID_VALUE;
    switch (attribute) {
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = 9; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *v = 0; break;
        case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: *v = 1; break;
        case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: *v = 1; break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = 1024; break;
        case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *v = 32; break;
        case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *v = multiprocessors(); break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *v = (int)kDefaultSmem; break;
        case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *v = (int)kMaxSmem; break;
        default: return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}
API CUresult cuDeviceTotalMem(size_t* bytes, CUdevice d) {
    NEED_INIT;
    if (d < 0 || d >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    if (bytes == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *bytes = kDeviceBytes;
    return CUDA_SUCCESS;
}
API CUresult cuDeviceCanAccessPeer(int* can, CUdevice d, CUdevice peer) {
    NEED_INIT;
    if (can == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (d < 0 || d >= device_count() || peer < 0 || peer >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    *can = d != peer;
    return CUDA_SUCCESS;
}
API CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice d) {
    NEED_INIT;
    LOCKED;
    if (ctx == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (d < 0 || d >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    ++contexts[d].retained;
    *ctx = &contexts[d];
    return CUDA_SUCCESS;
}
API CUresult cuDevicePrimaryCtxRelease(CUdevice d) {
    LOCKED;
    if (d < 0 || d >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    if (contexts[d].retained == 0) return CUDA_ERROR_INVALID_CONTEXT;
    if (--contexts[d].retained == 0) drain_device(d, false);
    return CUDA_SUCCESS;
}
API CUresult cuCtxSetCurrent(CUcontext ctx) {
    NEED_INIT;
    current = ctx;
    return CUDA_SUCCESS;
}
API CUresult cuCtxGetCurrent(CUcontext* ctx) {
    NEED_INIT;
    if (ctx == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *ctx = current;
    return CUDA_SUCCESS;
}
API CUresult cuCtxGetDevice(CUdevice* d) {
    NEED_CONTEXT;
    if (d == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *d = current->device;
    return CUDA_SUCCESS;
}
API CUresult cuCtxSynchronize() {
    LOCKED;
    NEED_CONTEXT;
    if (refused_in_capture(nullptr)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    drain_device(current->device, false);
    return CUDA_SUCCESS;
}
API CUresult cuCtxEnablePeerAccess(CUcontext peer, unsigned int flags) {
    LOCKED;
    NEED_CONTEXT;
    if (peer == nullptr || flags != 0 || peer == current) return CUDA_ERROR_INVALID_VALUE;
    if (peer_enabled[current->device][peer->device]) return CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED;
    peer_enabled[current->device][peer->device] = true;
    return CUDA_SUCCESS;
}
API CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* pool, CUdevice d) {
    NEED_INIT;
    if (pool == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (d < 0 || d >= device_count()) return CUDA_ERROR_INVALID_DEVICE;
    *pool = &pools[d];
    return CUDA_SUCCESS;
}
API CUresult cuMemPoolSetAccess(CUmemoryPool pool, const CUmemAccessDesc* map, size_t count) {
    if (pool == nullptr || (map == nullptr && count > 0)) return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}
// Only the release threshold, the attribute the engine sets.
API CUresult cuMemPoolSetAttribute(CUmemoryPool pool, CUmemPool_attribute attribute, void* value) {
    LOCKED;
    if (pool == nullptr || value == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (attribute != CU_MEMPOOL_ATTR_RELEASE_THRESHOLD) return CUDA_ERROR_NOT_SUPPORTED;
    pool->release_threshold = *static_cast<cuuint64_t*>(value);
    return CUDA_SUCCESS;
}
API CUresult cuMemPoolGetAttribute(CUmemoryPool pool, CUmemPool_attribute attribute, void* value) {
    LOCKED;
    if (pool == nullptr || value == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (attribute != CU_MEMPOOL_ATTR_RELEASE_THRESHOLD) return CUDA_ERROR_NOT_SUPPORTED;
    *static_cast<cuuint64_t*>(value) = pool->release_threshold;
    return CUDA_SUCCESS;
}
// Nothing is held back here (frees are immediate), so there is nothing to trim.
API CUresult cuMemPoolTrimTo(CUmemoryPool pool, size_t min_bytes_to_keep) {
    (void)min_bytes_to_keep;
    return pool == nullptr ? CUDA_ERROR_INVALID_VALUE : CUDA_SUCCESS;
}

API CUresult cuStreamCreate(CUstream* stream, unsigned int flags) {
    LOCKED;
    NEED_CONTEXT;
    if (stream == nullptr || (flags & ~(unsigned int)CU_STREAM_NON_BLOCKING) != 0) return CUDA_ERROR_INVALID_VALUE;
    auto* s = new CUstream_st{current, (flags & CU_STREAM_NON_BLOCKING) == 0, {}, 0, 0, false, nullptr};
    streams().insert(s);
    *stream = s;
    return CUDA_SUCCESS;
}
API CUresult cuStreamDestroy(CUstream stream) {
    LOCKED;
    if (is_default(stream) || streams().count(stream) == 0) return CUDA_ERROR_INVALID_HANDLE;
    // Work already queued still completes, so events recorded on it have happened.
    drain(stream);
    for (CUevent e : events())
        if (e->stream == stream) e->stream = nullptr;
    streams().erase(stream);
    delete stream;
    return CUDA_SUCCESS;
}
API CUresult cuStreamSynchronize(CUstream stream) {
    LOCKED;
    count_call("wait/stream synchronize");
    if (refused_in_capture(is_default(stream) ? nullptr : stream)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    if (is_default(stream)) {
        NEED_CONTEXT;
        drain_device(current->device, true);
        return CUDA_SUCCESS;
    }
    if (streams().count(stream) == 0) return CUDA_ERROR_INVALID_HANDLE;
    drain(stream);
    return CUDA_SUCCESS;
}
API CUresult cuStreamQuery(CUstream stream) {
    LOCKED;
    if (!is_default(stream) && streams().count(stream) == 0) return CUDA_ERROR_INVALID_HANDLE;
    if (refused_in_capture(is_default(stream) ? nullptr : stream)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    return is_default(stream) || stream->executed == stream->enqueued ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

API CUresult cuEventCreate(CUevent* event, unsigned int flags) {
    (void)flags;
    LOCKED;
    NEED_CONTEXT;
    if (event == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *event = new CUevent_st{};
    events().insert(*event);
    return CUDA_SUCCESS;
}
API CUresult cuEventDestroy(CUevent event) {
    LOCKED;
    if (event == nullptr || events().erase(event) == 0) return CUDA_ERROR_INVALID_HANDLE;
    delete event;
    return CUDA_SUCCESS;
}
API CUresult cuEventRecord(CUevent event, CUstream stream) {
    LOCKED;
    if (event == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    if (is_default(stream)) {
        NEED_CONTEXT;
        drain_device(current->device, true);
        event->stream = nullptr;
        return CUDA_SUCCESS;
    }
    if (streams().count(stream) == 0) return CUDA_ERROR_INVALID_HANDLE;
    if (refused_in_capture(stream)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    event->stream = stream;
    event->seq = stream->enqueued;
    return CUDA_SUCCESS;
}
API CUresult cuEventSynchronize(CUevent event) {
    LOCKED;
    count_call("wait/event synchronize");
    if (event == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    if (event->stream != nullptr) run_until(event->stream, event->seq);
    return CUDA_SUCCESS;
}
API CUresult cuEventQuery(CUevent event) {
    LOCKED;
    if (event == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    return event->stream == nullptr || event->stream->executed >= event->seq ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}
API CUresult cuStreamWaitEvent(CUstream stream, CUevent event, unsigned int flags) {
    LOCKED;
    if (event == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
    if (capturing(stream) && refused_in_capture(stream)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    CUstream source = event->stream;
    const uint64_t seq = event->seq;
    if (source == nullptr) return CUDA_SUCCESS;
    enqueue(stream, [source, seq] { run_until(source, seq); });
    return CUDA_SUCCESS;
}

API CUresult cuStreamBeginCapture_v2(CUstream stream, CUstreamCaptureMode mode) {
    LOCKED;
    if (is_default(stream)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    if (streams().count(stream) == 0) return CUDA_ERROR_INVALID_HANDLE;
    if (mode != CU_STREAM_CAPTURE_MODE_GLOBAL && mode != CU_STREAM_CAPTURE_MODE_THREAD_LOCAL &&
        mode != CU_STREAM_CAPTURE_MODE_RELAXED)
        return CUDA_ERROR_INVALID_VALUE;
    if (stream->capture) return CUDA_ERROR_ILLEGAL_STATE;
    stream->capture = std::make_unique<Capture>();
    return CUDA_SUCCESS;
}
API CUresult cuStreamIsCapturing(CUstream stream, CUstreamCaptureStatus* status) {
    LOCKED;
    if (status == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (!is_default(stream) && streams().count(stream) == 0) return CUDA_ERROR_INVALID_HANDLE;
    *status = !capturing(stream)             ? CU_STREAM_CAPTURE_STATUS_NONE
              : stream->capture->invalidated ? CU_STREAM_CAPTURE_STATUS_INVALIDATED
                                             : CU_STREAM_CAPTURE_STATUS_ACTIVE;
    return CUDA_SUCCESS;
}
API CUresult cuStreamEndCapture(CUstream stream, CUgraph* graph) {
    LOCKED;
    if (graph == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (!capturing(stream)) return CUDA_ERROR_ILLEGAL_STATE;
    std::unique_ptr<Capture> capture = std::move(stream->capture);
    if (capture->invalidated) return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;  // its allocations go with it
    *graph = new CUgraph_st{capture->recording};
    (*graph)->recording->unfreed = !capture->live.empty();
    return CUDA_SUCCESS;
}
API CUresult cuGraphInstantiateWithFlags(CUgraphExec* exec, CUgraph graph, unsigned long long flags) {
    LOCKED;
    if (exec == nullptr || graph == nullptr || flags != 0) return CUDA_ERROR_INVALID_VALUE;
    *exec = new CUgraphExec_st{graph->recording};
    return CUDA_SUCCESS;
}
API CUresult cuGraphUpload(CUgraphExec exec, CUstream stream) {
    LOCKED;
    (void)stream;
    return exec == nullptr ? CUDA_ERROR_INVALID_HANDLE : CUDA_SUCCESS;
}
API CUresult cuGraphLaunch(CUgraphExec exec, CUstream stream) {
    LOCKED;
    if (exec == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    if (!is_default(stream) && streams().count(stream) == 0) return CUDA_ERROR_INVALID_HANDLE;
    if (capturing(stream) && refused_in_capture(stream)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    if (exec->recording->unfreed && exec->launched) return CUDA_ERROR_INVALID_VALUE;  // see Recording
    exec->launched = true;
    count_call("graph/launch");
    // A graph's allocations are garbage again at each launch, as fresh memory is.
    auto recording = exec->recording;
    enqueue(stream, [recording] {
        for (const auto& [p, bytes] : recording->owned) smoe_emu::poison((void*)p, bytes);
    });
    // Each step holds the recording, so its memory outlives the handles until the work has run.
    for (size_t i = 0; i < recording->work.size(); ++i) enqueue(stream, [recording, i] { recording->work[i](); });
    return CUDA_SUCCESS;
}
API CUresult cuGraphExecDestroy(CUgraphExec exec) {
    LOCKED;
    if (exec == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    // Launched work still to run keeps the recording (and its memory) alive.
    delete exec;
    return CUDA_SUCCESS;
}
API CUresult cuGraphDestroy(CUgraph graph) {
    LOCKED;
    if (graph == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    delete graph;
    return CUDA_SUCCESS;
}

API CUresult cuMemGetInfo(size_t* free_bytes, size_t* total) {
    LOCKED;
    NEED_CONTEXT;
    if (free_bytes == nullptr || total == nullptr) return CUDA_ERROR_INVALID_VALUE;
    *total = kDeviceBytes;
    *free_bytes = kDeviceBytes - allocated[current->device];
    return CUDA_SUCCESS;
}
API CUresult cuMemAlloc(CUdeviceptr* p, size_t bytes) {
    LOCKED;
    NEED_CONTEXT;
    if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    if (refused_in_capture(nullptr)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    const CUresult r = alloc(p, bytes, current->device);
    if (r == CUDA_SUCCESS) count_call("memory/alloc", bytes);
    return r;
}
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream stream) {
    LOCKED;
    NEED_CONTEXT;
    if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    const CUresult r = alloc(p, bytes, stream_device(stream));
    if (r == CUDA_SUCCESS) count_call("memory/alloc", bytes);
    if (r == CUDA_SUCCESS && capturing(stream)) {
        // The graph's from now on: kept for every launch, freed with the graph.
        stream->capture->live.insert(*p);
        stream->capture->recording->owned[*p] = bytes;
        graph_owned().insert(*p);
    }
    return r;
}
API CUresult cuMemFree(CUdeviceptr p) {
    LOCKED;
    NEED_CONTEXT;
    const Allocation* a = find((uintptr_t)p);
    if (a == nullptr || graph_owned().count(p) != 0) return CUDA_ERROR_INVALID_VALUE;
    if (refused_in_capture(nullptr)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    drain_device(a->device, false);
    return release(p);
}
API CUresult cuMemFreeAsync(CUdeviceptr p, CUstream stream) {
    LOCKED;
    if (allocations().count((uintptr_t)p) == 0) return CUDA_ERROR_INVALID_VALUE;
    if (capturing(stream)) {
        // Only what the capture allocated, once: it stays the graph's until the graph goes.
        if (stream->capture->live.erase(p) == 0) {
            stream->capture->invalidated = true;
            return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
        }
        return CUDA_SUCCESS;
    }
    if (graph_owned().count(p) != 0) return CUDA_ERROR_INVALID_VALUE;
    enqueue(stream, [p] {
        if (release(p) != CUDA_SUCCESS) die("cuMemFreeAsync: %#llx was freed twice", (unsigned long long)p);
    });
    return CUDA_SUCCESS;
}

API CUresult cuMemcpyHtoDAsync(CUdeviceptr dst, const void* src, size_t bytes, CUstream stream) {
    LOCKED;
    if (check_alloc_target(dst, bytes) != CUDA_SUCCESS || (bytes > 0 && src == nullptr)) return CUDA_ERROR_INVALID_VALUE;
    if (refused_in_capture(is_default(stream) ? nullptr : stream)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    // Pageable host memory is staged during the call: the caller may reuse it on return.
    count_call("copy/host to device", bytes);
    auto staged = std::make_shared<std::vector<char>>((const char*)src, (const char*)src + bytes);
    enqueue(stream, [dst, staged] {
        if (!staged->empty()) std::memcpy((void*)dst, staged->data(), staged->size());
    });
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyHtoD(CUdeviceptr dst, const void* src, size_t bytes) {
    return cuMemcpyHtoDAsync(dst, src, bytes, nullptr);
}
API CUresult cuMemcpyDtoHAsync(void* dst, CUdeviceptr src, size_t bytes, CUstream stream) {
    LOCKED;
    if (check_alloc_target(src, bytes) != CUDA_SUCCESS || (bytes > 0 && dst == nullptr)) return CUDA_ERROR_INVALID_VALUE;
    if (is_device_pointer(dst)) return CUDA_ERROR_INVALID_VALUE;
    if (refused_in_capture(is_default(stream) ? nullptr : stream)) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    count_call("copy/device to host (waits)", bytes);
    // A copy to pageable host memory returns once it is done: after the stream's earlier work.
    if (is_default(stream)) {
        NEED_CONTEXT;
        drain_device(current->device, true);
    } else {
        drain(stream);
    }
    std::memcpy(dst, (const void*)src, bytes);
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoH(void* dst, CUdeviceptr src, size_t bytes) { return cuMemcpyDtoHAsync(dst, src, bytes, nullptr); }
API CUresult cuMemcpyDtoDAsync(CUdeviceptr dst, CUdeviceptr src, size_t bytes, CUstream stream) {
    LOCKED;
    if (check_alloc_target(dst, bytes) != CUDA_SUCCESS || check_alloc_target(src, bytes) != CUDA_SUCCESS)
        return CUDA_ERROR_INVALID_VALUE;
    count_call("copy/device to device", bytes);
    enqueue(stream, [dst, src, bytes] { std::memmove((void*)dst, (const void*)src, bytes); });
    return CUDA_SUCCESS;
}
API CUresult cuMemcpyDtoD(CUdeviceptr dst, CUdeviceptr src, size_t bytes) { return cuMemcpyDtoDAsync(dst, src, bytes, nullptr); }
API CUresult cuMemcpyPeerAsync(CUdeviceptr dst, CUcontext dst_ctx, CUdeviceptr src, CUcontext src_ctx, size_t bytes,
                               CUstream stream) {
    LOCKED;
    if (dst_ctx == nullptr || src_ctx == nullptr) return CUDA_ERROR_INVALID_CONTEXT;
    if (!device_range((const void*)dst, bytes, dst_ctx->device, false) ||
        !device_range((const void*)src, bytes, src_ctx->device, false))
        return CUDA_ERROR_INVALID_VALUE;
    count_call("copy/peer", bytes);
    enqueue(stream, [dst, src, bytes] { std::memmove((void*)dst, (const void*)src, bytes); });
    return CUDA_SUCCESS;
}
API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t n, CUstream stream) {
    LOCKED;
    if (check_alloc_target(dst, n) != CUDA_SUCCESS) return CUDA_ERROR_INVALID_VALUE;
    count_call("memset", n);
    enqueue(stream, [dst, value, n] { std::memset((void*)dst, value, n); });
    return CUDA_SUCCESS;
}
API CUresult cuMemsetD8(CUdeviceptr dst, unsigned char value, size_t n) { return cuMemsetD8Async(dst, value, n, nullptr); }
API CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned int value, size_t n, CUstream stream) {
    LOCKED;
    if (check_alloc_target(dst, n * 4) != CUDA_SUCCESS || dst % 4 != 0) return CUDA_ERROR_INVALID_VALUE;
    count_call("memset", n * 4);
    enqueue(stream, [dst, value, n] {
        for (size_t i = 0; i < n; ++i) ((unsigned int*)dst)[i] = value;
    });
    return CUDA_SUCCESS;
}
API CUresult cuPointerGetAttribute(void* data, CUpointer_attribute attribute, CUdeviceptr p) {
    LOCKED;
    const Allocation* a = find((uintptr_t)p);
    if (data == nullptr) return CUDA_ERROR_INVALID_VALUE;
    switch (attribute) {
        case CU_POINTER_ATTRIBUTE_MEMORY_TYPE:
            *(unsigned int*)data = a != nullptr ? CU_MEMORYTYPE_DEVICE : CU_MEMORYTYPE_HOST;
            return CUDA_SUCCESS;
        case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL:
            if (a == nullptr) return CUDA_ERROR_INVALID_VALUE;
            *(int*)data = a->device;
            return CUDA_SUCCESS;
        default: return CUDA_ERROR_INVALID_VALUE;
    }
}

// The global functions of a 64-bit ELF image (a CUBIN's kernels), from its symbol table;
// nothing for another kind of ELF.
static std::set<std::string> elf_functions(const unsigned char* image) {
    std::set<std::string> names;
    Elf64_Ehdr header;
    std::memcpy(&header, image, sizeof header);
    if (header.e_ident[EI_CLASS] != ELFCLASS64 || header.e_shentsize != sizeof(Elf64_Shdr)) return names;
    const auto section = [&](size_t i) {
        Elf64_Shdr s;
        std::memcpy(&s, image + header.e_shoff + i * sizeof(Elf64_Shdr), sizeof s);
        return s;
    };
    for (size_t i = 0; i < header.e_shnum; ++i) {
        const Elf64_Shdr symbols = section(i);
        if (symbols.sh_type != SHT_SYMTAB || symbols.sh_entsize != sizeof(Elf64_Sym)) continue;
        const Elf64_Shdr strings = section(symbols.sh_link);
        for (size_t j = 0; j < symbols.sh_size / sizeof(Elf64_Sym); ++j) {
            Elf64_Sym sym;
            std::memcpy(&sym, image + symbols.sh_offset + j * sizeof(Elf64_Sym), sizeof sym);
            if (ELF64_ST_TYPE(sym.st_info) == STT_FUNC && ELF64_ST_BIND(sym.st_info) == STB_GLOBAL)
                names.insert(reinterpret_cast<const char*>(image + strings.sh_offset + sym.st_name));
        }
    }
    return names;
}

API CUresult cuModuleLoadData(CUmodule* module, const void* image) {
    LOCKED;
    NEED_CONTEXT;
    if (module == nullptr || image == nullptr) return CUDA_ERROR_INVALID_VALUE;
    // The kernels come from this library's own build of the same sources; the image says which
    // of them this module has: machine code (an ELF: its global function symbols) or PTX (its
    // .entry directives).
    auto* m = new CUmod_st{};
    if (std::memcmp(image, ELFMAG, SELFMAG) == 0) {
        m->entries = elf_functions(static_cast<const unsigned char*>(image));
    } else {
        const std::string ptx((const char*)image);
        for (size_t at = ptx.find(".entry"); at != std::string::npos; at = ptx.find(".entry", at + 6)) {
            size_t name = ptx.find_first_not_of(" \t", at + 6);
            size_t end = ptx.find_first_of(" \t(\n", name);
            m->entries.insert(ptx.substr(name, end - name));
        }
    }
    if (m->entries.empty()) {
        delete m;
        return CUDA_ERROR_INVALID_IMAGE;
    }
    *module = m;
    return CUDA_SUCCESS;
}
API CUresult cuModuleUnload(CUmodule module) {
    if (module == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    delete module;
    return CUDA_SUCCESS;
}
API CUresult cuModuleGetFunction(CUfunction* f, CUmodule module, const char* name) {
    LOCKED;
    if (f == nullptr || module == nullptr || name == nullptr) return CUDA_ERROR_INVALID_VALUE;
    if (module->entries.count(name) == 0) return CUDA_ERROR_NOT_FOUND;
    const KernelEntry* kernel = find_kernel(name);
    if (kernel == nullptr) return CUDA_ERROR_NOT_FOUND;
    *f = new CUfunc_st{kernel};
    return CUDA_SUCCESS;
}
API CUresult cuFuncSetAttribute(CUfunction f, CUfunction_attribute attribute, int value) {
    LOCKED;
    if (f == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    if (attribute != CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) return CUDA_ERROR_NOT_SUPPORTED;
    if (value < 0 || (size_t)value > kMaxSmem) return CUDA_ERROR_INVALID_VALUE;
    f->max_dynamic_smem = (size_t)value;
    return CUDA_SUCCESS;
}
API CUresult cuFuncGetAttribute(int* value, CUfunction_attribute attribute, CUfunction f) {
    LOCKED;
    if (f == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    if (value == nullptr) return CUDA_ERROR_INVALID_VALUE;
    switch (attribute) {
        case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: *value = (int)f->max_dynamic_smem; return CUDA_SUCCESS;
        case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *value = 1024; return CUDA_SUCCESS;
        default: return CUDA_ERROR_NOT_SUPPORTED;
    }
}
API CUresult cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                            unsigned int by, unsigned int bz, unsigned int smem, CUstream stream, void** params,
                            void** extra) {
    LOCKED;
    NEED_CONTEXT;
    if (f == nullptr) return CUDA_ERROR_INVALID_HANDLE;
    if (extra != nullptr) return CUDA_ERROR_NOT_SUPPORTED;
    const unsigned long long threads = (unsigned long long)bx * by * bz;
    if (gx == 0 || gy == 0 || gz == 0 || threads == 0 || threads > 1024 || bz > 64 || gy > 65535 || gz > 65535 ||
        gx > 0x7fffffffu)
        return CUDA_ERROR_INVALID_VALUE;
    if (smem > f->max_dynamic_smem) return CUDA_ERROR_INVALID_VALUE;
    if (f->kernel->arity > 0 && params == nullptr) return CUDA_ERROR_INVALID_VALUE;
    const int device = stream_device(stream);
    if (!is_default(stream) && streams().count(stream) == 0) return CUDA_ERROR_INVALID_HANDLE;
    // The parameters are copied now, as the driver does; the kernel runs when the stream
    // reaches it.
    count_call(std::string("launch/") + f->kernel->name);
    std::function<void()> run = f->kernel->bind(params, dim3{gx, gy, gz}, dim3{bx, by, bz}, smem, device);
    enqueue(stream, std::move(run));
    return CUDA_SUCCESS;
}
