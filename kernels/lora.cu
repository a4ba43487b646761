// LoRA over a batch whose tokens use different adapters (SGMV-style: one launch covers every
// adapter and rank). slots[t] is token t's adapter slot, -1 for the base model; per slot,
// a_ptrs/b_ptrs hold the device addresses of its fp32 A [rank, in_dim] and B [out_dim, rank]
// (PEFT layouts), ranks its rank and scales its alpha / rank.
// CPU twin: lora_apply's per-token shrink and expand.

// u[t, r] = sum_k x[t, k] * A[r, k] for r < rank (u is [tokens, max_rank], zero past the rank).
// grid (tokens, ceil(max_rank / warps)); one warp per rank row.
extern "C" __global__ void __launch_bounds__(128) lora_shrink_bf16(const bf16* __restrict__ x,
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
extern "C" __global__ void __launch_bounds__(256) lora_expand_bf16(const float* __restrict__ u,
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

// LoRA dropout, bit for bit the CPU's (lora::dropout): the mask of row t is a pure function
// of (seed, layer, module, depth), drawn from ChaCha8 (rand_chacha's ChaCha8Rng, seeded by
// seed_from_u64 of the mixed coordinates) as rand's f32 uniforms, one 32-bit word per
// element: element k is word k % 16 of keystream block k / 16. So each thread makes one
// block and masks 16 elements, and the backward regenerates the mask instead of storing it.

__device__ __forceinline__ unsigned long long dropout_mix(unsigned long long h, int layer,
                                                          int module, int pos) {
    const unsigned long long v[3] = {(unsigned long long)layer, (unsigned long long)module,
                                     (unsigned long long)pos};
    for (int i = 0; i < 3; ++i) {
        h = h + v[i] + 0x9E3779B97F4A7C15ull;
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ull;
        h = (h ^ (h >> 27)) * 0x94D049BB133111EBull;
        h ^= h >> 31;
    }
    return h;
}

__device__ __forceinline__ unsigned int rotl32(unsigned int x, int n) {
    return (x << n) | (x >> (32 - n));
}

#define CHACHA_QR(a, b, c, d)                  \
    a += b; d ^= a; d = rotl32(d, 16);         \
    c += d; b ^= c; b = rotl32(b, 12);         \
    a += b; d ^= a; d = rotl32(d, 8);          \
    c += d; b ^= c; b = rotl32(b, 7);

// Keystream block `block` of ChaCha8 keyed by seed_from_u64(`state`): rand_core fills the
// 32-byte key with PCG32 outputs; the stream id and nonce are zero.
__device__ void chacha8_block(unsigned long long state, unsigned long long block,
                              unsigned int out[16]) {
    unsigned int in[16];
    in[0] = 0x61707865u;
    in[1] = 0x3320646eu;
    in[2] = 0x79622d32u;
    in[3] = 0x6b206574u;
    for (int i = 0; i < 8; ++i) {
        state = state * 6364136223846793005ull + 11634580027462260723ull;
        const unsigned int xorshifted = (unsigned int)(((state >> 18) ^ state) >> 27);
        const unsigned int rot = (unsigned int)(state >> 59);
        in[4 + i] = (xorshifted >> rot) | (xorshifted << ((32 - rot) & 31));
    }
    in[12] = (unsigned int)block;
    in[13] = (unsigned int)(block >> 32);
    in[14] = 0u;
    in[15] = 0u;
    for (int i = 0; i < 16; ++i) out[i] = in[i];
    for (int r = 0; r < 4; ++r) {
        CHACHA_QR(out[0], out[4], out[8], out[12]);
        CHACHA_QR(out[1], out[5], out[9], out[13]);
        CHACHA_QR(out[2], out[6], out[10], out[14]);
        CHACHA_QR(out[3], out[7], out[11], out[15]);
        CHACHA_QR(out[0], out[5], out[10], out[15]);
        CHACHA_QR(out[1], out[6], out[11], out[12]);
        CHACHA_QR(out[2], out[7], out[8], out[13]);
        CHACHA_QR(out[3], out[4], out[9], out[14]);
    }
    for (int i = 0; i < 16; ++i) out[i] += in[i];
}

// The multipliers of elements 16 * c .. 16 * c + 15 of a row at depth `pos`: 0 where dropped
// (a uniform below p), 1 / (1 - p) where kept.
__device__ void dropout_factors(unsigned long long seed, int layer, int module, int pos,
                                int c, float p, float f[16]) {
    unsigned int w[16];
    chacha8_block(dropout_mix(seed, layer, module, pos), (unsigned long long)c, w);
    const float keep = 1.0f / (1.0f - p);
    for (int i = 0; i < 16; ++i) {
        // rand's f32 uniform: the top 24 bits over 2^24.
        const float r = (float)(w[i] >> 8) * (1.0f / 16777216.0f);
        f[i] = r < p ? 0.0f : keep;
    }
}

// out = x for every row, with rows r0 <= t < r1 (a training sample's) dropped: row t at depth
// pos[t]. Rows are `width` wide. grid (rows, ceil(ceil(width / 16) / threads)).
extern "C" __global__ void __launch_bounds__(64) lora_dropout_bf16(const bf16* __restrict__ x, bf16* __restrict__ out,
                                             const int* __restrict__ pos, int r0, int r1,
                                             int width, float p, unsigned long long seed,
                                             int layer, int module) {
    const int t = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    const int k0 = c * 16;
    if (k0 >= width) return;
    const int n = min(16, width - k0);
    const bf16* xr = x + (size_t)t * width + k0;
    bf16* yr = out + (size_t)t * width + k0;
    if (t < r0 || t >= r1) {
        for (int i = 0; i < n; ++i) yr[i] = xr[i];
        return;
    }
    float f[16];
    dropout_factors(seed, layer, module, pos[t], c, p, f);
    for (int i = 0; i < n; ++i) yr[i] = st(ld(xr[i]) * f[i]);
}

// dst[t, k] += src[t, k] * mask for rows t < rows (all one training sample's), `width` wide:
// dropout's backward. grid (rows, ceil(ceil(width / 16) / threads)).
extern "C" __global__ void __launch_bounds__(64) lora_dropout_add_f32(const float* __restrict__ src,
                                                float* __restrict__ dst,
                                                const int* __restrict__ pos, int width, float p,
                                                unsigned long long seed, int layer, int module) {
    const int t = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    const int k0 = c * 16;
    if (k0 >= width) return;
    const int n = min(16, width - k0);
    float f[16];
    dropout_factors(seed, layer, module, pos[t], c, p, f);
    const float* s = src + (size_t)t * width + k0;
    float* d = dst + (size_t)t * width + k0;
    for (int i = 0; i < n; ++i) d[i] += s[i] * f[i];
}
