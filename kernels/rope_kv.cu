// RoPE on q and k (HF "neox" layout: dimension i pairs with i + head_dim / 2) fused with the
// write of k and v into the paged cache. One block per token.
// q: [tokens, num_heads, head_dim]; k, v: [tokens, num_kv_heads, head_dim];
// cos, sin: [tokens, head_dim / 2] (computed on the host, as the CPU path does);
// slots: [tokens], the cache slot (block * block_size + offset) of each token, -1 for none;
// k_cache, v_cache: [slots, num_kv_heads, head_dim].
// CPU twin: model::llama::apply_rope, then a copy into the slot.

extern "C" __global__ void rope_kv_write_bf16(bf16* __restrict__ q, bf16* __restrict__ k,
                                              const bf16* __restrict__ v,
                                              const float* __restrict__ cos,
                                              const float* __restrict__ sin,
                                              const long long* __restrict__ slots,
                                              bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
                                              int num_heads, int num_kv_heads, int head_dim) {
    const int t = blockIdx.x;
    const int half = head_dim / 2;
    const long long slot = slots[t];
    const float* c = cos + (size_t)t * half;
    const float* s = sin + (size_t)t * half;
    const int pairs = (num_heads + num_kv_heads) * half;
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
        const int h = i / half, d = i % half;
        const bool is_k = h >= num_heads;
        const int kh = h - num_heads;
        bf16* base = is_k ? k + ((size_t)t * num_kv_heads + kh) * head_dim
                          : q + ((size_t)t * num_heads + h) * head_dim;
        const float x0 = ld(base[d]), x1 = ld(base[d + half]);
        const bf16 y0 = st(x0 * c[d] - x1 * s[d]);
        const bf16 y1 = st(x1 * c[d] + x0 * s[d]);
        base[d] = y0;
        base[d + half] = y1;
        if (is_k && slot >= 0) {
            bf16* dst = k_cache + ((size_t)slot * num_kv_heads + kh) * head_dim;
            dst[d] = y0;
            dst[d + half] = y1;
        }
    }
    if (slot >= 0) {
        const int row = num_kv_heads * head_dim;
        for (int i = threadIdx.x; i < row; i += blockDim.x)
            v_cache[(size_t)slot * row + i] = v[(size_t)t * row + i];
    }
}
