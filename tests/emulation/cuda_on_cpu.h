// Runs CUDA kernel source on the CPU for tests: each CUDA thread of a block is an OS thread,
// __syncthreads a barrier, warp shuffles a barrier per warp. Blocks run one after another, so
// `__shared__` can be a function-level static. Only what kernels/*.cu use is here.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

namespace emu {
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline uint64_t lanes[32][32];

template <typename T>
T exchange(T v, int src_lane) {
    static_assert(sizeof(T) <= 8, "shuffles move 8 bytes at most");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    lanes[warp][lane] = bits;
    warp_barriers[warp]->arrive_and_wait();
    bits = lanes[warp][src_lane];
    warp_barriers[warp]->arrive_and_wait();
    T r;
    std::memcpy(&r, &bits, sizeof(T));
    return r;
}

// Runs `kernel` over the grid: one thread per CUDA thread of a block, the blocks in order.
template <typename F>
void launch(dim3 grid, dim3 block, F kernel) {
    const unsigned threads = block.x * block.y * block.z;
    if (block.y != 1 || block.z != 1 || threads % 32 != 0 || threads == 0 || threads > 1024)
        throw std::runtime_error("emulated blocks are 1-D multiples of 32 threads");
    gridDim = grid;
    blockDim = block;
    std::barrier<> between(threads);
    auto fresh = [&] {
        block_barrier = std::make_unique<std::barrier<>>(threads);
        warp_barriers.clear();
        for (unsigned w = 0; w < threads / 32; ++w)
            warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    };
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
            threadIdx = {t, 0, 0};
            for (unsigned z = 0; z < grid.z; ++z)
                for (unsigned y = 0; y < grid.y; ++y)
                    for (unsigned x = 0; x < grid.x; ++x) {
                        between.arrive_and_wait();
                        if (t == 0) fresh();
                        between.arrive_and_wait();
                        blockIdx = {x, y, z};
                        kernel();
                        // An exited thread no longer holds back the block's barriers.
                        warp_barriers[t >> 5]->arrive_and_drop();
                        block_barrier->arrive_and_drop();
                    }
        });
    }
    for (auto& th : pool) th.join();
}

// Calls `f` with arguments read from `args`, each a pointer to one argument's value (the
// layout of cuLaunchKernel's kernelParams).
template <typename... A, size_t... I>
void call(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}
template <typename... A>
void call(void (*f)(A...), void** args) {
    call(f, args, std::index_sequence_for<A...>{});
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask) {
    return emu::exchange(v, (threadIdx.x & 31) ^ mask);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, int delta) {
    const int lane = threadIdx.x & 31;
    const T other = emu::exchange(v, lane >= delta ? lane - delta : lane);
    return lane >= delta ? other : v;
}
template <typename T>
T atomicAdd(T* at, T v) {
    return std::atomic_ref<T>(*at).fetch_add(v);
}

inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __expf(float x) { return expf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
