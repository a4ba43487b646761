// RMSNorm, alone and fused with the residual add that precedes it in every layer.
// One block per row; CPU twin: model::llama::rms_norm.

extern "C" __global__ void __launch_bounds__(1024) rms_norm_bf16(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                         bf16* __restrict__ out, int hidden, float eps) {
    __shared__ float scratch[32];
    const bf16* xr = x + (size_t)blockIdx.x * hidden;
    bf16* o = out + (size_t)blockIdx.x * hidden;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float v = ld(xr[i]);
        ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss, scratch) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = st(ld(w[i]) * (ld(xr[i]) * r));
}

// residual += x (stored back in bf16, as the residual stream is kept), then
// out = rms_norm(residual) * w.
extern "C" __global__ void __launch_bounds__(1024) add_rms_norm_bf16(bf16* __restrict__ residual, const bf16* __restrict__ x,
                                             const bf16* __restrict__ w, bf16* __restrict__ out,
                                             int hidden, float eps) {
    __shared__ float scratch[32];
    bf16* rr = residual + (size_t)blockIdx.x * hidden;
    const bf16* xr = x + (size_t)blockIdx.x * hidden;
    bf16* o = out + (size_t)blockIdx.x * hidden;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const bf16 sum = st(ld(rr[i]) + ld(xr[i]));
        rr[i] = sum;  // each element is read back only by the thread that wrote it
        const float v = ld(sum);
        ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss, scratch) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = st(ld(w[i]) * (ld(rr[i]) * r));
}
