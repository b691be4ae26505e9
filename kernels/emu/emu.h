// What the stand-in driver (driver.cc) offers its cuBLAS (cublas.cc).
#pragma once

#include <cstddef>
#include <functional>
#include <mutex>
#include <string>

namespace smoe_emu {

// Every entry point takes this lock: the library is single-threaded inside.
std::recursive_mutex& lock();

// Whether [p, p + bytes) lies in one live device allocation on `device` (any device when < 0;
// also a peer's when `peers_allowed` and that peer access was enabled).
bool device_range(const void* p, size_t bytes, int device, bool peers_allowed);
bool is_device_pointer(const void* p);
// Queues `op` on `stream` (a CUstream; the default stream runs it now).
void queue_on(void* stream, std::function<void()> op);
int device_of_stream(void* stream);
// Counts one call of `what` moving `bytes` (SPARSEMOE_EMU_STATS: see driver.cc).
void count_call(const std::string& what, size_t bytes = 0);

}  // namespace smoe_emu
