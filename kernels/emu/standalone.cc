// Every kernel of kernels/cuda (SOURCES, not only the engine's) in one library for
// `kernels/gpu_check.py --emulate`, which runs its checks on the CPU with torch tensors in host
// memory: `smoe_emu_launch` runs one launch to completion on the calling thread. No driver, no
// streams, and no pointer checks (the tensors are not device allocations).
#include "launch.h"

namespace smoe_emu {

std::recursive_mutex& lock() {
    static std::recursive_mutex m;
    return m;
}
bool device_range(const void*, size_t, int, bool) { return true; }
bool is_device_pointer(const void*) { return false; }
void queue_on(void*, std::function<void()> op) { op(); }
int device_of_stream(void*) { return 0; }

}  // namespace smoe_emu

// 0: ran; 1: no kernel of that name; 2: a launch a GPU refuses (over 1024 threads, over 227 KiB
// of dynamic shared memory).
extern "C" __attribute__((visibility("default"))) int smoe_emu_launch(const char* name, unsigned int gx,
                                                                      unsigned int gy, unsigned int gz,
                                                                      unsigned int bx, unsigned long long smem,
                                                                      void** params) {
    const smoe_emu::KernelEntry* kernel = smoe_emu::find_kernel(name);
    if (kernel == nullptr) return 1;
    if (bx == 0 || bx > 1024 || smem > 227 * 1024 || gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535) return 2;
    kernel->bind(params, dim3{gx, gy, gz}, dim3{bx, 1, 1}, smem, -1)();
    return 0;
}
