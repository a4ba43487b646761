// y[r, n] = sum_k x[r, k] * w[n, k] for the few rows of a small decode batch (r < m <=
// GEMV_MAX_M): one warp per output feature n reads w's row once, in 16-byte loads, and applies it
// to every row of x (x is small and stays in L1/L2). The weight read is the whole cost, so this
// runs at memory bandwidth where a general GEMM tiles for reuse that one row cannot give.
// Host must check: k a multiple of 8, x and w 16-byte aligned, m <= GEMV_MAX_M.
// CPU twin: backend::cuda::decoder::host::matmul.

#define GEMV_MAX_M 8

// The two bf16 halves of a 32-bit word, exactly, as floats.
__device__ __forceinline__ float bf16_lo(unsigned int u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf16_hi(unsigned int u) { return __uint_as_float(u & 0xffff0000u); }

__device__ __forceinline__ float dot8(const uint4 a, const uint4 b) {
    float s = bf16_lo(a.x) * bf16_lo(b.x);
    s = fmaf(bf16_hi(a.x), bf16_hi(b.x), s);
    s = fmaf(bf16_lo(a.y), bf16_lo(b.y), s);
    s = fmaf(bf16_hi(a.y), bf16_hi(b.y), s);
    s = fmaf(bf16_lo(a.z), bf16_lo(b.z), s);
    s = fmaf(bf16_hi(a.z), bf16_hi(b.z), s);
    s = fmaf(bf16_lo(a.w), bf16_lo(b.w), s);
    s = fmaf(bf16_hi(a.w), bf16_hi(b.w), s);
    return s;
}

template <typename Out>
__device__ __forceinline__ void gemv(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                     Out* __restrict__ y, int m, int n, int k) {
    const int row = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= n) return;  // whole warps leave together
    const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)row * k);
    const int k8 = k >> 3;
    float acc[GEMV_MAX_M];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_M; ++r) acc[r] = 0.f;
#pragma unroll 4
    for (int i = lane; i < k8; i += 32) {
        const uint4 wv = wr[i];
#pragma unroll
        for (int r = 0; r < GEMV_MAX_M; ++r)
            if (r < m) acc[r] += dot8(wv, reinterpret_cast<const uint4*>(x + (size_t)r * k)[i]);
    }
#pragma unroll
    for (int r = 0; r < GEMV_MAX_M; ++r) {
        if (r < m) {
            const float v = warp_sum(acc[r]);
            if (lane == 0) y[(size_t)r * n + row] = (Out)v;
        }
    }
}

extern "C" __global__ void gemv_bf16(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                     bf16* __restrict__ y, int m, int n, int k) {
    gemv<bf16>(x, w, y, m, n, k);
}

extern "C" __global__ void gemv_bf16_f32(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                         float* __restrict__ y, int m, int n, int k) {
    gemv<float>(x, w, y, m, n, k);
}
