// Backward kernels of the decoder layer's elementwise and row pieces, for token-level LoRA
// fine-tuning: saved activations in bf16, gradients in fp32.

// RMSNorm y = w ⊙ x · r, r = 1 / sqrt(mean(x²) + eps):
// dx += r (w ⊙ dy) − x r³ / d · Σ(w ⊙ dy ⊙ x). One block per row (blockDim a multiple of 32).
// CPU twin: model::backward::rms_norm_backward.
extern "C" __global__ void __launch_bounds__(256) rms_norm_backward_f32(const bf16* __restrict__ x,
                                                 const bf16* __restrict__ w,
                                                 const float* __restrict__ dy,
                                                 float* __restrict__ dx, int hidden, float eps) {
    __shared__ float scratch[32];
    const bf16* xr = x + (size_t)blockIdx.x * hidden;
    const float* g = dy + (size_t)blockIdx.x * hidden;
    float* o = dx + (size_t)blockIdx.x * hidden;
    float ss = 0.f, dot = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float xv = ld(xr[i]);
        ss += xv * xv;
        dot += xv * g[i] * ld(w[i]);
    }
    ss = block_sum(ss, scratch);
    dot = block_sum(dot, scratch);
    const float r = rsqrtf(ss / hidden + eps);
    const float c = r * r * r * dot / hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        o[i] += r * ld(w[i]) * g[i] - c * ld(xr[i]);
}

// act = silu(g) ⊙ u over the fused [gate | up] rows: d_gate = d_act ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))),
// d_up = d_act ⊙ silu(g), written (not added) into d_gate_up [rows, 2 inter].
// CPU twin: model::backward::silu_mul_backward.
extern "C" __global__ void __launch_bounds__(256) silu_mul_backward_f32(const bf16* __restrict__ gate_up,
                                                 const float* __restrict__ d_act,
                                                 float* __restrict__ d_gate_up, int rows,
                                                 int inter) {
    const size_t n = (size_t)rows * inter;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / inter, c = i - r * inter;
        const size_t gi = r * 2 * inter + c, ui = gi + inter;
        const float g = ld(gate_up[gi]), u = ld(gate_up[ui]);
        const float sig = 1.f / (1.f + expf(-g));
        const float da = d_act[i];
        d_gate_up[ui] = da * g * sig;
        d_gate_up[gi] = da * u * sig * (1.f + g * (1.f - sig));
    }
}

// RoPE is a rotation, so its backward rotates by the opposite angle: in place on the q and k
// heads (the first num_heads + num_kv_heads heads) of each row of d_qkv [tokens, stride].
// One block per token. CPU twin: model::llama::apply_rope with −sin.
extern "C" __global__ void __launch_bounds__(256) rope_backward_f32(float* __restrict__ d_qkv, int stride,
                                             const float* __restrict__ cos,
                                             const float* __restrict__ sin, int num_heads,
                                             int num_kv_heads, int head_dim) {
    const int t = blockIdx.x, half = head_dim / 2;
    const float* c = cos + (size_t)t * half;
    const float* s = sin + (size_t)t * half;
    float* row = d_qkv + (size_t)t * stride;
    for (int i = threadIdx.x; i < (num_heads + num_kv_heads) * half; i += blockDim.x) {
        const int h = i / half, d = i % half;
        float* base = row + (size_t)h * head_dim;
        const float x0 = base[d], x1 = base[d + half];
        base[d] = x0 * c[d] + x1 * s[d];
        base[d + half] = x1 * c[d] - x0 * s[d];
    }
}

// y = bf16(x): fp32 gradients rounded for a bf16 GEMM input (grid-stride).
extern "C" __global__ void __launch_bounds__(256) f32_to_bf16(const float* __restrict__ x, bf16* __restrict__ y, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = st(x[i]);
}

// *out += Σ x² (grid-stride, a block sum then one atomic per block; *out zeroed by the host).
// Feeds gradient-norm clipping. blockDim a multiple of 32.
extern "C" __global__ void __launch_bounds__(256) sum_squares_f32(const float* __restrict__ x, size_t n,
                                           float* __restrict__ out) {
    __shared__ float scratch[32];
    float s = 0.f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        s += x[i] * x[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) atomicAdd(out, s);
}

// x *= s (grid-stride): gradients scaled by the clipping factor.
extern "C" __global__ void __launch_bounds__(256) scale_f32(float* __restrict__ x, size_t n, float s) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] *= s;
}
