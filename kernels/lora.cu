// LoRA over a batch whose tokens use different adapters (SGMV-style: one launch covers every
// adapter and rank). slots[t] is token t's adapter slot, -1 for the base model; per slot,
// a_ptrs/b_ptrs hold the device addresses of its fp32 A [rank, in_dim] and B [out_dim, rank]
// (PEFT layouts), ranks its rank and scales its alpha / rank.
// CPU twin: lora_apply's per-token shrink and expand.

// u[t, r] = sum_k x[t, k] * A[r, k] for r < rank (u is [tokens, max_rank], zero past the rank).
// grid (tokens, ceil(max_rank / warps)); one warp per rank row.
extern "C" __global__ void lora_shrink_bf16(const bf16* __restrict__ x,
                                            const unsigned long long* __restrict__ a_ptrs,
                                            const int* __restrict__ ranks,
                                            const int* __restrict__ slots, float* __restrict__ u,
                                            int in_dim, int max_rank) {
    const int t = blockIdx.x;
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= max_rank) return;
    const int slot = slots[t];
    float s = 0.f;
    if (slot >= 0 && r < ranks[slot]) {
        const float* a = reinterpret_cast<const float*>(a_ptrs[slot]) + (size_t)r * in_dim;
        const bf16* xr = x + (size_t)t * in_dim;
        for (int k = lane; k < in_dim; k += 32) s += ld(xr[k]) * a[k];
        s = warp_sum(s);
    }
    if (lane == 0) u[(size_t)t * max_rank + r] = s;
}

// y[t, n] += scales[slot] * sum_r u[t, r] * B[n, r], rows of y `y_stride` apart (a column block of
// a fused projection's output); grid (tokens, ceil(out_dim / threads)).
extern "C" __global__ void lora_expand_bf16(const float* __restrict__ u,
                                            const unsigned long long* __restrict__ b_ptrs,
                                            const int* __restrict__ ranks,
                                            const float* __restrict__ scales,
                                            const int* __restrict__ slots, bf16* __restrict__ y,
                                            int out_dim, int y_stride, int max_rank) {
    const int t = blockIdx.x;
    const int n = blockIdx.y * blockDim.x + threadIdx.x;
    const int slot = slots[t];
    if (n >= out_dim || slot < 0) return;
    const int rank = ranks[slot];
    const float* b = reinterpret_cast<const float*>(b_ptrs[slot]) + (size_t)n * rank;
    const float* ur = u + (size_t)t * max_rank;
    float s = 0.f;
    for (int r = 0; r < rank; ++r) s += ur[r] * b[r];
    bf16* yr = y + (size_t)t * y_stride;
    yr[n] = st(ld(yr[n]) + scales[slot] * s);
}
