// Random weights made on the device (`--dummy-weights`), so a model of a real size needs no
// host memory or transfer. out[i] = offset + scale * u(seed, i), u uniform in [-1, 1) from a
// counter-based hash (splitmix64), so the values depend only on (seed, i), not on the launch
// shape. CPU twin: backend::cuda::decoder::fill_uniform_host.

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

extern "C" __global__ void __launch_bounds__(256) fill_uniform_bf16(bf16* __restrict__ out, unsigned long long n,
                                             unsigned long long seed, float scale, float offset) {
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned long long h = splitmix64(seed ^ splitmix64(i));
        // The top 24 bits as a float in [0, 1), exactly representable.
        const float u = (float)(h >> 40) * (1.0f / 16777216.0f);
        out[i] = st(offset + scale * (2.f * u - 1.f));
    }
}
