// Kernel launches in the stand-in driver (driver.cc): the table build.sh generates from the
// kernel sources (kernels.gen.cc), and how a launch's parameters reach a kernel.
#pragma once

#include <cuda.h>

#include <tuple>
#include <type_traits>
#include <utility>

#include "emu.h"
#include "simt.h"

namespace smoe_emu {

struct KernelEntry {
    const char* name;
    size_t arity;
    // Copies the launch's parameters; the returned work runs the grid.
    std::function<std::function<void()>(void** params, dim3 grid, dim3 block, size_t smem, int device)> bind;
};

// The table build.sh generates from the kernel sources.
const KernelEntry* find_kernel(const char* name);

inline void run_grid(const char* name, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
    gridDim = grid;
    blockDim = block;
    const size_t blocks = (size_t)grid.x * grid.y * grid.z;
    const bool reverse = reverse_order();
    for (size_t n = 0; n < blocks; ++n) {
        const size_t i = reverse ? blocks - 1 - n : n;
        blockIdx = dim3{(unsigned int)(i % grid.x), (unsigned int)(i / grid.x % grid.y),
                        (unsigned int)(i / ((size_t)grid.x * grid.y))};
        run_block(name, body, smem);
    }
}

template <typename T>
void check_argument(const char* kernel, size_t index, T value, int device) {
    if constexpr (std::is_pointer_v<T>) {
        if (value != nullptr && !device_range((const void*)value, 0, device, true)) {
            std::fprintf(stderr,
                         "sparsemoe CUDA emulator: kernel %s, parameter %zu: %p is not in a live allocation on "
                         "device %d\n",
                         kernel, index, (const void*)value, device);
            std::abort();
        }
    }
}

template <typename... A, size_t... I>
std::function<void()> bind_kernel(const char* name, void (*f)(A...), void** params, dim3 grid, dim3 block,
                                  size_t smem, int device, std::index_sequence<I...>) {
    auto args = std::make_tuple(*static_cast<std::decay_t<A>*>(params[I])...);
    return [=] {
        (check_argument(name, I, std::get<I>(args), device), ...);
        run_grid(name, grid, block, smem, [&] { std::apply(f, args); });
    };
}

template <typename... A>
KernelEntry make_entry(const char* name, void (*f)(A...)) {
    return KernelEntry{name, sizeof...(A), [name, f](void** p, dim3 g, dim3 b, size_t s, int d) {
                           return bind_kernel(name, f, p, g, b, s, d, std::index_sequence_for<A...>{});
                       }};
}

}  // namespace smoe_emu
