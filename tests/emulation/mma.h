// Stands in for the CUDA toolkit's <mma.h> (WMMA) when kernels run on the CPU
// (cuda_on_cpu.h). A fragment here holds its whole 16 x 16 block in every lane, not the
// device's per-lane share: kernels only fill, load, multiply, scale and store fragments, so
// the layout inside one is theirs to choose. Products of bf16 are exact in fp32 and summed in
// fp32, k in order (the tensor cores' order within a block is their own). Loads and stores are
// warp-wide, as on the device: every lane has read before any lane goes on, and every lane
// has arrived before any lane writes, so a warp can load a block, add to it and store it back.
#pragma once
#include <cstddef>
#include <type_traits>

#include "cuda_bf16.h"

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
    static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
    static constexpr int num_elements = rows * cols;
    T x[num_elements];
};

// A barrier of the warp's live lanes (a shuffle each lane answers itself).
inline void warp_barrier() { (void)emu::exchange<int>(0, threadIdx.x & 31); }

inline float as_float(float v) { return v; }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename Use, int M, int N, int K, typename T, typename L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, const T& v) {
    for (auto& e : f.x) e = v;
}

// An operand block: element (r, c) at p[r * ldm + c] (row_major) or p[r + c * ldm].
template <typename Use, int M, int N, int K, typename T, typename L>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
    using F = fragment<Use, M, N, K, T, L>;
    constexpr bool row = std::is_same_v<L, row_major>;
    for (int r = 0; r < F::rows; ++r)
        for (int c = 0; c < F::cols; ++c)
            f.x[r * F::cols + c] = row ? p[(size_t)r * ldm + c] : p[r + (size_t)c * ldm];
    warp_barrier();
}

template <int M, int N, int K>
void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm,
                      layout_t l) {
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c)
            f.x[r * N + c] = l == mem_row_major ? p[(size_t)r * ldm + c] : p[r + (size_t)c * ldm];
    warp_barrier();
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                       layout_t l) {
    warp_barrier();
    for (int r = 0; r < M; ++r)
        for (int c = 0; c < N; ++c)
            (l == mem_row_major ? p[(size_t)r * ldm + c] : p[r + (size_t)c * ldm]) = f.x[r * N + c];
}

template <int M, int N, int K, typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
    float out[M * N];
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) {
            float s = c.x[m * N + n];
            for (int k = 0; k < K; ++k) s += as_float(a.x[m * K + k]) * as_float(b.x[k * N + n]);
            out[m * N + n] = s;
        }
    for (int e = 0; e < M * N; ++e) d.x[e] = out[e];
}
}  // namespace wmma
}  // namespace nvcuda
