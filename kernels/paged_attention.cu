// Paged attention for any mix of decode rows, prefill chunks and training chunks: each query
// row attends causally to key positions 0..=its position of its own sequence, read through the
// sequence's block table (GQA: query head h reads kv head h / (num_heads / num_kv_heads)).
//
// The launch covers the rows `row_list` names (all of a forward's, or those the tensor-core
// kernel of attention_tiled.cu leaves: decodes and short chunks). Split-K: the keys of a row
// are cut into partitions of `partition_size` (at most ATTN_MAX_KEYS); grid (num_heads, listed
// rows, partitions), one block of ATTN_THREADS threads per (head, row, partition), in three
// phases:
//  1. scores: a group of G threads takes one key, each thread one 16-byte piece (8 dims) of
//     it, so a warp reads 32 / G keys at once; every group issues ATTN_UNROLL keys' loads
//     before reducing any, so many loads are in flight (one key at a time per warp left each
//     warp waiting out a memory latency per key);
//  2. the partition's maximum and sum of exponents, over the scores in shared memory;
//  3. the weighted sum of V, laid out as phase 1, then summed over the groups.
// The block writes its partial (max, sum, unnormalised output);
// `paged_attention_combine_bf16` merges the partitions of a row.
//
// q: [rows, num_heads, head_dim]; k_cache, v_cache: [blocks, block_size, num_kv_heads, head_dim];
// row_list: [listed] rows; row_seq[row]: the row's sequence; row_pos[row]: its position;
// block_tables: [seqs, max_blocks]; part_m, part_l: [listed, num_heads, partitions];
// part_o: [listed, num_heads, partitions, head_dim]. The host must check: head_dim a multiple of
// 8 and at most 256 (G = head_dim / 8 rounded up to a power of two, at most 32), q and the
// caches 16-byte aligned; num_heads a multiple of num_kv_heads; partition_size at most
// ATTN_MAX_KEYS; listed rows at most 65535 per launch (grid.y); ATTN_THREADS threads per block.
// CPU twin: backend::cpu::paged_attention::paged_attention.

#define ATTN_THREADS 128
#define ATTN_MAX_KEYS 512
#define ATTN_UNROLL 4  // also the literal of the "#pragma unroll 4" in phase 3

// The two bf16 halves of a 32-bit word, exactly, as floats.
__device__ __forceinline__ float bf16_lo(unsigned int u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf16_hi(unsigned int u) { return __uint_as_float(u & 0xffff0000u); }

__device__ __forceinline__ void unpack8(const uint4 v, float* f) {
    f[0] = bf16_lo(v.x); f[1] = bf16_hi(v.x);
    f[2] = bf16_lo(v.y); f[3] = bf16_hi(v.y);
    f[4] = bf16_lo(v.z); f[5] = bf16_hi(v.z);
    f[6] = bf16_lo(v.w); f[7] = bf16_hi(v.w);
}

extern "C" __global__ void paged_attention_partial_bf16(
    const bf16* __restrict__ q, const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
    const int* __restrict__ row_list, const int* __restrict__ row_seq,
    const int* __restrict__ row_pos, const int* __restrict__ block_tables, int max_blocks,
    float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_o,
    int num_heads, int num_kv_heads, int head_dim, int block_size, int partition_size,
    float scale) {
    const int head = blockIdx.x, row = row_list[blockIdx.y], part = blockIdx.z;
    const size_t slot = ((size_t)blockIdx.y * num_heads + head) * gridDim.z + part;
    const int kv_head = head / (num_heads / num_kv_heads);
    const int pos = row_pos[row];
    const int* table = block_tables + (size_t)row_seq[row] * max_blocks;
    const int start = part * partition_size;
    const int n = min(start + partition_size, pos + 1) - start;  // keys in this partition
    if (n <= 0) {  // a partition past this row's position: nothing to add
        if (threadIdx.x == 0) {
            part_m[slot] = NEG_INF;
            part_l[slot] = 0.f;
        }
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) part_o[slot * head_dim + d] = 0.f;
        return;
    }
    const int chunks = head_dim >> 3;
    int g = 1;
    while (g < chunks) g <<= 1;
    const int lane_g = threadIdx.x & (g - 1), group = threadIdx.x / g, groups = blockDim.x / g;
    const bool has_chunk = lane_g < chunks;
    const size_t kv_row = (size_t)num_kv_heads * head_dim;
    const size_t head_off = (size_t)kv_head * head_dim + (size_t)lane_g * 8;

    __shared__ float scores[ATTN_MAX_KEYS];
    __shared__ float scratch[32];
    __shared__ float sums[ATTN_THREADS * 8];  // groups * head_dim <= ATTN_THREADS * 8

    float qf[8];
    if (has_chunk) {
        unpack8(*reinterpret_cast<const uint4*>(q + ((size_t)row * num_heads + head) * head_dim
                                                + (size_t)lane_g * 8),
                qf);
#pragma unroll
        for (int e = 0; e < 8; ++e) qf[e] *= scale;
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) qf[e] = 0.f;
    }

    // 1. Scores. The loop bounds are the same for every thread, so every lane reaches the
    // shuffles.
    for (int i0 = 0; i0 < n; i0 += ATTN_UNROLL * groups) {
        uint4 kv[ATTN_UNROLL];
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; ++u) {
            const int i = i0 + u * groups + group;
            kv[u] = make_uint4(0u, 0u, 0u, 0u);
            if (i < n && has_chunk) {
                const int j = start + i;
                const size_t base =
                    ((size_t)table[j / block_size] * block_size + j % block_size) * kv_row;
                kv[u] = *reinterpret_cast<const uint4*>(k_cache + base + head_off);
            }
        }
#pragma unroll
        for (int u = 0; u < ATTN_UNROLL; ++u) {
            float kf[8];
            unpack8(kv[u], kf);
            float s = 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) s = fmaf(qf[e], kf[e], s);
            for (int o = g >> 1; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            const int i = i0 + u * groups + group;
            if (i < n && lane_g == 0) scores[i] = s;
        }
    }
    __syncthreads();

    // 2. Maximum and sum of exponents; scores become unnormalised probabilities.
    float mx = NEG_INF;
    for (int i = threadIdx.x; i < n; i += blockDim.x) mx = fmaxf(mx, scores[i]);
    mx = block_max(mx, scratch);
    float sum = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float p = __expf(scores[i] - mx);
        scores[i] = p;
        sum += p;
    }
    sum = block_sum(sum, scratch);  // its barriers also publish the probabilities

    // 3. Weighted sum of V: each thread 8 dims of the keys of its group, then over groups.
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.f;
    if (has_chunk) {
#pragma unroll 4
        for (int i = group; i < n; i += groups) {
            const int j = start + i;
            const size_t base = ((size_t)table[j / block_size] * block_size + j % block_size) * kv_row;
            float vf[8];
            unpack8(*reinterpret_cast<const uint4*>(v_cache + base + head_off), vf);
            const float p = scores[i];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] = fmaf(p, vf[e], acc[e]);
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) sums[group * head_dim + lane_g * 8 + e] = acc[e];
    }
    __syncthreads();
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.f;
        for (int gr = 0; gr < groups; ++gr) o += sums[gr * head_dim + d];
        part_o[slot * head_dim + d] = o;
    }
    if (threadIdx.x == 0) {
        part_m[slot] = mx;
        part_l[slot] = sum;
    }
}

// out[row, head] = sum_p e^(m_p - M) o_p / sum_p e^(m_p - M) l_p; grid (num_heads, listed
// rows).
extern "C" __global__ void paged_attention_combine_bf16(
    const float* __restrict__ part_m, const float* __restrict__ part_l,
    const float* __restrict__ part_o, const int* __restrict__ row_list, bf16* __restrict__ out,
    int num_heads, int head_dim, int partitions) {
    const int head = blockIdx.x, row = row_list[blockIdx.y];
    const size_t first = ((size_t)blockIdx.y * num_heads + head) * partitions;
    float mm = NEG_INF;
    for (int p = 0; p < partitions; ++p) mm = fmaxf(mm, part_m[first + p]);
    float ll = 0.f;
    for (int p = 0; p < partitions; ++p)
        if (part_m[first + p] != NEG_INF) ll += part_l[first + p] * __expf(part_m[first + p] - mm);
    const float inv = ll > 0.f ? 1.f / ll : 0.f;
    bf16* o = out + ((size_t)row * num_heads + head) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.f;
        for (int p = 0; p < partitions; ++p)
            if (part_m[first + p] != NEG_INF)
                acc += part_o[(first + p) * head_dim + d] * __expf(part_m[first + p] - mm);
        o[d] = st(acc * inv);
    }
}
