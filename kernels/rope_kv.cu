// RoPE on q and k (HF "neox" layout: dimension i pairs with i + head_dim / 2) fused with the
// write of k and v into the paged cache, reading the fused q/k/v projection. One block per
// token.
// qkv: [tokens, qkv_stride], each row q (num_heads * head_dim), then k and v
// (num_kv_heads * head_dim each); q_out: [tokens, num_heads, head_dim], the rotated q;
// cos, sin: [tokens, head_dim / 2] (computed on the host, as the CPU path does);
// slots: [tokens], the cache slot (block * block_size + offset) of each token, -1 for none;
// k_cache, v_cache: [slots, num_kv_heads, head_dim]. The rotated k goes to the cache only.
// bias: [num_heads + 2 num_kv_heads, head_dim], added to q, k and v before anything else when
// has_bias (Qwen2's attention biases), in fp32 as the CPU path adds them.
// CPU twin: model::llama::apply_rope, then a copy into the slot.

extern "C" __global__ void __launch_bounds__(1024) rope_kv_write_bf16(const bf16* __restrict__ qkv, int qkv_stride,
                                              bf16* __restrict__ q_out,
                                              const float* __restrict__ cos,
                                              const float* __restrict__ sin,
                                              const long long* __restrict__ slots,
                                              bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
                                              const bf16* __restrict__ bias, int has_bias,
                                              int num_heads, int num_kv_heads, int head_dim) {
    const int t = blockIdx.x;
    const int half = head_dim / 2;
    const long long slot = slots[t];
    const float* c = cos + (size_t)t * half;
    const float* s = sin + (size_t)t * half;
    const bf16* q = qkv + (size_t)t * qkv_stride;
    const bf16* k = q + (size_t)num_heads * head_dim;
    const bf16* v = k + (size_t)num_kv_heads * head_dim;
    const int pairs = (num_heads + num_kv_heads) * half;
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
        const int h = i / half, d = i % half;
        const bool is_k = h >= num_heads;
        const int kh = h - num_heads;
        if (is_k && slot < 0) continue;
        const bf16* src = is_k ? k + (size_t)kh * head_dim : q + (size_t)h * head_dim;
        float x0 = ld(src[d]), x1 = ld(src[d + half]);
        if (has_bias) {
            // Bias rows follow the projection's: q heads, then k heads.
            const bf16* b = bias + (size_t)h * head_dim;
            x0 += ld(b[d]);
            x1 += ld(b[d + half]);
        }
        bf16* dst = is_k ? k_cache + ((size_t)slot * num_kv_heads + kh) * head_dim
                         : q_out + ((size_t)t * num_heads + h) * head_dim;
        dst[d] = st(x0 * c[d] - x1 * s[d]);
        dst[d + half] = st(x1 * c[d] + x0 * s[d]);
    }
    if (slot >= 0) {
        const int row = num_kv_heads * head_dim;
        const bf16* vb = bias + (size_t)(num_heads + num_kv_heads) * head_dim;
        for (int i = threadIdx.x; i < row; i += blockDim.x)
            v_cache[(size_t)slot * row + i] = has_bias ? st(ld(v[i]) + ld(vb[i])) : v[i];
    }
}
