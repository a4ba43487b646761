// Runs CUDA kernel source on the CPU for tests. Each CUDA thread of a block is a fiber
// (ucontext) on one OS thread, run in turn until it reaches a barrier or ends: __syncthreads
// waits for every live thread of the block, a warp shuffle for every live lane of the warp.
// Blocks run one after another, so `__shared__` can be a function-level static. Only what
// kernels/*.cu use is here.
#pragma once
#include <setjmp.h>
#include <ucontext.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
// The bound is checked at launch (emulate_<kernel>_max_threads, generated per kernel).
#define __launch_bounds__(...)

namespace emu {
enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done };
// A fiber starts through its ucontext once, then switches with _setjmp/_longjmp, which do
// not save the signal mask (swapcontext's system call on every switch would dominate).
struct Fiber {
    ucontext_t ctx;
    jmp_buf jmp;
    bool started;
    State state;
};
constexpr size_t STACK = 128 << 10;
inline std::vector<Fiber> fibers;
inline char* stacks = nullptr;  // untouched until used: pages are faulted in lazily
inline size_t stack_count = 0;
inline jmp_buf scheduler;
inline unsigned current;
inline void (*body)(void*);
inline void* body_arg;
// Shuffle slots by barrier parity: a lane cannot be two shuffles ahead of another.
inline uint64_t lanes[2][32][32];
inline unsigned warp_phase[32];

inline void wait(State s) {
    Fiber& f = fibers[current];
    f.state = s;
    if (_setjmp(f.jmp) == 0) _longjmp(scheduler, 1);
}

inline void fiber_main(int index) {
    threadIdx = {(unsigned)index, 0, 0};
    body(body_arg);
    fibers[(unsigned)index].state = State::Done;
    _longjmp(scheduler, 1);
}

template <typename T>
T exchange(T v, int src_lane) {
    static_assert(sizeof(T) <= 8, "shuffles move 8 bytes at most");
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, me = threadIdx.x;
    const unsigned phase = warp_phase[warp] & 1;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    lanes[phase][warp][lane] = bits;
    wait(State::AtWarpBarrier);
    threadIdx = {me, 0, 0};
    bits = lanes[phase][warp][src_lane];
    T r;
    std::memcpy(&r, &bits, sizeof(T));
    return r;
}

// Runs one block: every fiber until it waits or ends, then releases whichever barrier all
// its live threads have reached.
inline void run_block(unsigned threads) {
    for (unsigned t = 0; t < threads; ++t) {
        Fiber& f = fibers[t];
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks + (size_t)t * STACK;
        f.ctx.uc_stack.ss_size = STACK;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, (void (*)())fiber_main, 1, (int)t);
        f.started = false;
        f.state = State::Runnable;
    }
    for (unsigned w = 0; w < threads / 32; ++w) warp_phase[w] = 0;
    for (;;) {
        bool ran = false;
        for (unsigned t = 0; t < threads; ++t) {
            if (fibers[t].state != State::Runnable) continue;
            current = t;
            threadIdx = {t, 0, 0};
            ran = true;
            if (_setjmp(scheduler) == 0) {
                Fiber& f = fibers[t];
                if (!f.started) {
                    f.started = true;
                    setcontext(&f.ctx);
                }
                _longjmp(f.jmp, 1);
            }
        }
        unsigned live = 0, at_block = 0;
        for (unsigned t = 0; t < threads; ++t) {
            live += fibers[t].state != State::Done;
            at_block += fibers[t].state == State::AtBlockBarrier;
        }
        if (live == 0) return;
        bool released = false;
        if (at_block == live) {
            for (unsigned t = 0; t < threads; ++t) fibers[t].state = State::Runnable;
            released = true;
        }
        for (unsigned w = 0; w < threads / 32 && !released; ++w) {
            unsigned wl = 0, at_warp = 0;
            for (unsigned t = w * 32; t < w * 32 + 32; ++t) {
                wl += fibers[t].state != State::Done;
                at_warp += fibers[t].state == State::AtWarpBarrier;
            }
            if (wl > 0 && at_warp == wl) {
                for (unsigned t = w * 32; t < w * 32 + 32; ++t)
                    if (fibers[t].state == State::AtWarpBarrier) fibers[t].state = State::Runnable;
                ++warp_phase[w];
                released = true;
            }
        }
        if (!released && !ran) {
            fprintf(stderr, "emulated kernel deadlocked: block (%u, %u, %u)\n", blockIdx.x,
                    blockIdx.y, blockIdx.z);
            abort();
        }
    }
}

// Runs `kernel` over the grid, the blocks in order.
template <typename F>
void launch(dim3 grid, dim3 block, F kernel) {
    const unsigned threads = block.x * block.y * block.z;
    if (block.y != 1 || block.z != 1 || threads % 32 != 0 || threads == 0 || threads > 1024)
        throw std::runtime_error("emulated blocks are 1-D multiples of 32 threads");
    gridDim = grid;
    blockDim = block;
    if (fibers.size() < threads) fibers.resize(threads);
    if (stack_count < threads) {
        free(stacks);
        stacks = static_cast<char*>(malloc((size_t)threads * STACK));
        if (!stacks) throw std::runtime_error("no memory for the emulated threads' stacks");
        stack_count = threads;
    }
    body = [](void* k) { (*static_cast<F*>(k))(); };
    body_arg = &kernel;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = {x, y, z};
                run_block(threads);
            }
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
// The sizes of a kernel's parameters, for a launch that copies its arguments.
template <typename... A>
const unsigned* param_sizes(void (*)(A...), unsigned* n) {
    static const unsigned sizes[] = {(unsigned)sizeof(std::remove_cv_t<std::remove_reference_t<A>>)..., 0u};
    *n = sizeof...(A);
    return sizes;
}
}  // namespace emu

inline void __syncthreads() {
    const unsigned me = threadIdx.x;
    emu::wait(emu::State::AtBlockBarrier);
    threadIdx = {me, 0, 0};
}
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
// One OS thread runs every CUDA thread: a plain add is atomic.
template <typename T>
T atomicAdd(T* at, T v) {
    const T old = *at;
    *at = old + v;
    return old;
}

inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __expf(float x) { return expf(x); }
// Round-to-nearest arithmetic that the compiler may not contract: plain operations here.
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
