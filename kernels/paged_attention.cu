// Paged attention for any mix of decode rows, prefill chunks and training chunks: each query
// row attends causally to key positions 0..=its position of its own sequence, read through the
// sequence's block table (GQA: query head h reads kv head h / (num_heads / num_kv_heads)).
//
// The launch covers the rows `row_list` names (all of a forward's, or those the tensor-core
// kernel of attention_tiled.cu leaves: decodes and short chunks). Split-K: the keys of a row
// are cut into partitions of `partition_size` (at most ATTN_MAX_KEYS); grid (num_heads, listed
// rows, partitions), one block of ATTN_THREADS threads per (head, row, partition), or per
// (2 to 4 heads of one kv head, row, partition) in paged_attention_grouped_bf16, in three
// phases, each head's arithmetic the same either way:
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

// A block's shared memory for H heads. The kernels declare it, so the grouped kernel's three
// variants share one.
template <int H>
struct Shared {
    float scores[H][ATTN_MAX_KEYS];
    float scratch[32];
    float sums[ATTN_THREADS * 8];  // groups * head_dim <= ATTN_THREADS * 8
};

// One block's work: query heads h0..h0 + HPB of one listed row, all of one kv head, over one
// partition of keys. Each key piece is loaded once for the HPB heads. H >= HPB.
template <int HPB, int H>
__device__ void partial_heads(
    const bf16* __restrict__ q, const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
    const int* __restrict__ row_list, const int* __restrict__ row_seq,
    const int* __restrict__ row_pos, const int* __restrict__ block_tables, int max_blocks,
    float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_o,
    int num_heads, int num_kv_heads, int head_dim, int block_size, int partition_size,
    float scale, Shared<H>& sh) {
    const int h0 = blockIdx.x * HPB, row = row_list[blockIdx.y], part = blockIdx.z;
    // Head h0 + h's partial is at slot0 + h * gridDim.z.
    const size_t slot0 = ((size_t)blockIdx.y * num_heads + h0) * gridDim.z + part;
    const int kv_head = h0 / (num_heads / num_kv_heads);
    const int pos = row_pos[row];
    const int* table = block_tables + (size_t)row_seq[row] * max_blocks;
    const int start = part * partition_size;
    const int n = min(start + partition_size, pos + 1) - start;  // keys in this partition
    if (n <= 0) {  // a partition past this row's position: nothing to add
#pragma unroll
        for (int h = 0; h < HPB; ++h) {
            const size_t slot = slot0 + (size_t)h * gridDim.z;
            if (threadIdx.x == 0) {
                part_m[slot] = NEG_INF;
                part_l[slot] = 0.f;
            }
            for (int d = threadIdx.x; d < head_dim; d += blockDim.x) part_o[slot * head_dim + d] = 0.f;
        }
        return;
    }
    const int chunks = head_dim >> 3;
    int g = 1;
    while (g < chunks) g <<= 1;
    const int lane_g = threadIdx.x & (g - 1), group = threadIdx.x / g, groups = blockDim.x / g;
    const bool has_chunk = lane_g < chunks;
    const size_t kv_row = (size_t)num_kv_heads * head_dim;
    const size_t head_off = (size_t)kv_head * head_dim + (size_t)lane_g * 8;

    float(*scores)[ATTN_MAX_KEYS] = sh.scores;
    float *scratch = sh.scratch, *sums = sh.sums;

    float qf[HPB][8];
#pragma unroll
    for (int h = 0; h < HPB; ++h) {
        if (has_chunk) {
            unpack8(*reinterpret_cast<const uint4*>(
                        q + ((size_t)row * num_heads + h0 + h) * head_dim + (size_t)lane_g * 8),
                    qf[h]);
#pragma unroll
            for (int e = 0; e < 8; ++e) qf[h][e] *= scale;
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) qf[h][e] = 0.f;
        }
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
            const int i = i0 + u * groups + group;
#pragma unroll
            for (int h = 0; h < HPB; ++h) {
                float s = 0.f;
#pragma unroll
                for (int e = 0; e < 8; ++e) s = fmaf(qf[h][e], kf[e], s);
                for (int o = g >> 1; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
                if (i < n && lane_g == 0) scores[h][i] = s;
            }
        }
    }
    __syncthreads();

    // 2. Each head's maximum and sum of exponents; scores become unnormalised probabilities.
    float mx[HPB], sum[HPB];
#pragma unroll
    for (int h = 0; h < HPB; ++h) {
        float m = NEG_INF;
        for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, scores[h][i]);
        mx[h] = block_max(m, scratch);
        float l = 0.f;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const float p = __expf(scores[h][i] - mx[h]);
            scores[h][i] = p;
            l += p;
        }
        sum[h] = block_sum(l, scratch);  // its barriers also publish the probabilities
    }

    // 3. Weighted sum of V: each thread 8 dims of the keys of its group, then over groups.
    float acc[HPB][8];
#pragma unroll
    for (int h = 0; h < HPB; ++h)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[h][e] = 0.f;
    if (has_chunk) {
#pragma unroll 4
        for (int i = group; i < n; i += groups) {
            const int j = start + i;
            const size_t base = ((size_t)table[j / block_size] * block_size + j % block_size) * kv_row;
            float vf[8];
            unpack8(*reinterpret_cast<const uint4*>(v_cache + base + head_off), vf);
#pragma unroll
            for (int h = 0; h < HPB; ++h) {
                const float p = scores[h][i];
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[h][e] = fmaf(p, vf[e], acc[h][e]);
            }
        }
    }
#pragma unroll
    for (int h = 0; h < HPB; ++h) {
        const size_t slot = slot0 + (size_t)h * gridDim.z;
        if (has_chunk) {
#pragma unroll
            for (int e = 0; e < 8; ++e) sums[group * head_dim + lane_g * 8 + e] = acc[h][e];
        }
        __syncthreads();
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
            float o = 0.f;
            for (int gr = 0; gr < groups; ++gr) o += sums[gr * head_dim + d];
            part_o[slot * head_dim + d] = o;
        }
        if (threadIdx.x == 0) {
            part_m[slot] = mx[h];
            part_l[slot] = sum[h];
        }
        __syncthreads();  // before the next head's sums overwrite these
    }
}

// One query head a block: grid (num_heads, listed rows, partitions).
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) paged_attention_partial_bf16(
    const bf16* __restrict__ q, const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
    const int* __restrict__ row_list, const int* __restrict__ row_seq,
    const int* __restrict__ row_pos, const int* __restrict__ block_tables, int max_blocks,
    float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_o,
    int num_heads, int num_kv_heads, int head_dim, int block_size, int partition_size,
    float scale) {
    __shared__ Shared<1> sh;
    partial_heads<1, 1>(q, k_cache, v_cache, row_list, row_seq, row_pos, block_tables,
                        max_blocks, part_m, part_l, part_o, num_heads, num_kv_heads, head_dim,
                        block_size, partition_size, scale, sh);
}

// `heads_per_block` (2, 3 or 4, dividing num_heads / num_kv_heads) query heads of one kv head
// a block, so each K and V piece is read once for them: grid (num_heads / heads_per_block,
// listed rows, partitions). The partials as paged_attention_partial_bf16's. Five blocks an SM
// as a bound: with the block size alone ptxas spills this kernel to fit more.
extern "C" __global__ void __launch_bounds__(ATTN_THREADS, 5) paged_attention_grouped_bf16(
    const bf16* __restrict__ q, const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
    const int* __restrict__ row_list, const int* __restrict__ row_seq,
    const int* __restrict__ row_pos, const int* __restrict__ block_tables, int max_blocks,
    float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_o,
    int num_heads, int num_kv_heads, int head_dim, int block_size, int partition_size,
    float scale, int heads_per_block) {
    __shared__ Shared<4> sh;
#define ATTN_GROUPED(HPB)                                                                \
    partial_heads<HPB, 4>(q, k_cache, v_cache, row_list, row_seq, row_pos, block_tables,  \
                          max_blocks, part_m, part_l, part_o, num_heads, num_kv_heads,    \
                          head_dim, block_size, partition_size, scale, sh)
    if (heads_per_block == 4) ATTN_GROUPED(4);
    else if (heads_per_block == 3) ATTN_GROUPED(3);
    else ATTN_GROUPED(2);
#undef ATTN_GROUPED
}

// out[row, head] = sum_p e^(m_p - M) o_p / sum_p e^(m_p - M) l_p; grid (num_heads, listed
// rows).
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) paged_attention_combine_bf16(
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
