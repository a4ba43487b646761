// AdamW over fp32 master weights and moments, as torch's single-tensor AdamW (decoupled decay,
// torch.lerp for the first moment, bias corrections computed on the host).
// CPU twin: lora::optim::adamw_update.

__device__ __forceinline__ float torch_lerp(float start, float end, float weight) {
    return fabsf(weight) < 0.5f ? start + weight * (end - start) : end - (end - start) * (1.f - weight);
}

extern "C" __global__ void __launch_bounds__(256) adamw_f32(float* __restrict__ p, const float* __restrict__ g,
                                     float* __restrict__ m, float* __restrict__ v, size_t n,
                                     float beta1, float beta2, float eps, float decay,
                                     float step_size, float bc2_sqrt) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float pi = p[i];
        const float gi = g[i];
        if (decay != 1.f) pi *= decay;
        const float mi = torch_lerp(m[i], gi, 1.f - beta1);
        const float vi = v[i] * beta2 + (1.f - beta2) * gi * gi;
        const float denom = sqrtf(vi) / bc2_sqrt + eps;
        p[i] = pi + -step_size * (mi / denom);
        m[i] = mi;
        v[i] = vi;
    }
}
