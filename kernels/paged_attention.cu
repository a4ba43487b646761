// Paged attention for any mix of decode rows, prefill chunks and training chunks: each query
// row attends causally to key positions 0..=its position of its own sequence, read through the
// sequence's block table (GQA: query head h reads kv head h / (num_heads / num_kv_heads)).
//
// Split-K: the keys of a row are cut into partitions of `partition_size`; grid
// (num_heads, rows, partitions), one block of ATTN_WARPS warps per (head, row, partition). Each
// warp walks every ATTN_WARPS-th key of the partition, ATTN_KEYS at a time, with an online
// softmax; the warps then
// merge in shared memory and the block writes its partial (max, sum, unnormalised output).
// `paged_attention_combine_bf16` merges the partitions of a row. With one partition the merge
// is trivial, so short contexts pay almost nothing for it.
//
// q: [rows, num_heads, head_dim]; k_cache, v_cache: [blocks, block_size, num_kv_heads, head_dim];
// row_seq[row]: the row's sequence; row_pos[row]: its position; block_tables:
// [seqs, max_blocks]; part_m, part_l: [rows, num_heads, partitions];
// part_o: [rows, num_heads, partitions, head_dim]. The host must check: head_dim a multiple of
// 32 and at most 32 * ATTN_MAX_DIMS_PER_LANE; num_heads a multiple of num_kv_heads; rows at most
// 65535 per launch (grid.y). CPU twin: backend::cpu::paged_attention::paged_attention.

#define ATTN_WARPS 4
#define ATTN_MAX_DIMS_PER_LANE 8
#define ATTN_KEYS 4

extern "C" __global__ void paged_attention_partial_bf16(
    const bf16* __restrict__ q, const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
    const int* __restrict__ row_seq, const int* __restrict__ row_pos,
    const int* __restrict__ block_tables, int max_blocks, float* __restrict__ part_m,
    float* __restrict__ part_l, float* __restrict__ part_o, int num_heads, int num_kv_heads,
    int head_dim, int block_size, int partition_size, float scale) {
    const int head = blockIdx.x, row = blockIdx.y, part = blockIdx.z;
    const int partitions = gridDim.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int dims = head_dim / 32;
    const int kv_head = head / (num_heads / num_kv_heads);
    const int pos = row_pos[row];
    const int* table = block_tables + (size_t)row_seq[row] * max_blocks;
    const int start = part * partition_size;
    const int end = min(start + partition_size, pos + 1);

    float qv[ATTN_MAX_DIMS_PER_LANE], acc[ATTN_MAX_DIMS_PER_LANE];
    const bf16* qr = q + ((size_t)row * num_heads + head) * head_dim;
    // Loops over ATTN_MAX_DIMS_PER_LANE with a guard (not up to `dims`) unroll fully, so qv and
    // acc live in registers rather than local memory.
#pragma unroll
    for (int i = 0; i < ATTN_MAX_DIMS_PER_LANE; ++i) {
        qv[i] = i < dims ? ld(qr[lane + 32 * i]) * scale : 0.f;
        acc[i] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    const size_t kv_row = (size_t)num_kv_heads * head_dim;
    // ATTN_KEYS keys per warp per step, all their K and V loads issued before any is used:
    // one key at a time leaves each warp waiting out a full memory latency per key.
    for (int j0 = start + warp; j0 < end; j0 += ATTN_WARPS * ATTN_KEYS) {
        float s[ATTN_KEYS];
        float vv[ATTN_KEYS][ATTN_MAX_DIMS_PER_LANE];
#pragma unroll
        for (int u = 0; u < ATTN_KEYS; ++u) {
            const int j = j0 + u * ATTN_WARPS;
            const bool valid = j < end;  // the same for the whole warp
            const size_t base =
                valid ? ((size_t)table[j / block_size] * block_size + j % block_size) * kv_row
                            + (size_t)kv_head * head_dim
                      : 0;
            float d = 0.f;
#pragma unroll
            for (int i = 0; i < ATTN_MAX_DIMS_PER_LANE; ++i) {
                const bool here = valid && i < dims;
                d += here ? qv[i] * ld(k_cache[base + lane + 32 * i]) : 0.f;
                vv[u][i] = here ? ld(v_cache[base + lane + 32 * i]) : 0.f;
            }
            s[u] = valid ? d : NEG_INF;
        }
#pragma unroll
        for (int u = 0; u < ATTN_KEYS; ++u)
            if (j0 + u * ATTN_WARPS < end) s[u] = warp_sum(s[u]);
        float m_new = m;
#pragma unroll
        for (int u = 0; u < ATTN_KEYS; ++u) m_new = fmaxf(m_new, s[u]);
        const float alpha = __expf(m - m_new);  // 0 on the first keys (m = -inf)
        float p[ATTN_KEYS], psum = 0.f;
#pragma unroll
        for (int u = 0; u < ATTN_KEYS; ++u) {
            p[u] = __expf(s[u] - m_new);  // 0 for a key past the end (s = -inf)
            psum += p[u];
        }
        l = l * alpha + psum;
#pragma unroll
        for (int i = 0; i < ATTN_MAX_DIMS_PER_LANE; ++i) {
            float a = acc[i] * alpha;
#pragma unroll
            for (int u = 0; u < ATTN_KEYS; ++u) a += p[u] * vv[u][i];
            acc[i] = a;
        }
        m = m_new;
    }

    // Merge the warps: shared [warp] maxima and sums, [warp][head_dim] outputs.
    __shared__ float sm[ATTN_WARPS], sl[ATTN_WARPS];
    __shared__ float so[ATTN_WARPS][32 * ATTN_MAX_DIMS_PER_LANE];
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < ATTN_MAX_DIMS_PER_LANE; ++i)
        if (i < dims) so[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    float mm = NEG_INF;
    for (int w = 0; w < ATTN_WARPS; ++w) mm = fmaxf(mm, sm[w]);
    const size_t slot = ((size_t)row * num_heads + head) * partitions + part;
    if (threadIdx.x == 0) {
        float ll = 0.f;
        for (int w = 0; w < ATTN_WARPS; ++w) ll += (sm[w] == NEG_INF) ? 0.f : sl[w] * __expf(sm[w] - mm);
        part_m[slot] = mm;
        part_l[slot] = ll;
    }
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.f;
        for (int w = 0; w < ATTN_WARPS; ++w)
            if (sm[w] != NEG_INF) o += so[w][d] * __expf(sm[w] - mm);
        part_o[slot * head_dim + d] = o;
    }
}

// out[row, head] = sum_p e^(m_p - M) o_p / sum_p e^(m_p - M) l_p; grid (num_heads, rows).
extern "C" __global__ void paged_attention_combine_bf16(
    const float* __restrict__ part_m, const float* __restrict__ part_l,
    const float* __restrict__ part_o, bf16* __restrict__ out, int num_heads, int head_dim,
    int partitions) {
    const int head = blockIdx.x, row = blockIdx.y;
    const size_t first = ((size_t)row * num_heads + head) * partitions;
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
