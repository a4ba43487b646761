// Attention of one training sample or one sequence's chunk on tensor cores, in 32 x 32 tiles
// of (query rows, keys): WMMA 16x16x16 bf16 products with fp32 sums. Q, K, V and O are bf16
// already; what else feeds a product (P, and in the backward dO and dS) is rounded to bf16
// there, and the softmax statistics stay fp32.
//
// Forward, attention_chunk_tiled: the row tiles of a forward's chunks (prefill or training
// rows of one sequence, a tile of them or more; decodes stay on paged_attention.cu). Tile t is
// tiles[4t..4t+4] = (sequence, first row, its position pos0, rows n <= ABT_TILE): row r of it
// at position pos0 + r attends to keys 0..=pos0 + r, read through the sequence's block table.
// Grid (num_heads, tiles). Online softmax over key tiles (flash attention): S = scale·Q Kᵀ;
// each row's running max m and sum l in fp32; P = exp(S − m) as bf16 for O += P V, O kept in
// fp32 in shared memory and rescaled by exp(m_old − m_new) per tile; out = O / l as bf16. Key
// tiles start at multiples of ABT_TILE whatever the row tile, so a row's result depends only
// on its position, not on how its sequence was cut into chunks. q, out: [rows, num_heads,
// head_dim]; k_cache, v_cache: [blocks, block_size, num_kv_heads, head_dim]; block_tables:
// [seqs, max_blocks]. The host must check: every block a tile's table names up to its last
// position is in the caches, and its rows are in q and out.
// CPU twin: backend::cuda::twins::attention_chunk_bf16.
//
// Backward (same formulas as attention_backward.cu), softmax recomputed:
//   S = scale·Q Kᵀ, P = softmax(S), dP = dO Vᵀ, dS = P ∘ (dP − rowsum(dO ∘ O)),
//   dQ = scale·dS K, dK = scale·dSᵀ Q, dV = Pᵀ dO,
// with dO, P (for dV) and dS rounded to bf16 for their products.
//  - attention_backward_dq_tiled: grid (num_heads, query tiles). Recomputes each row's
//    log-sum-exp over the keys (pass 1), then dQ (pass 2); writes lse and delta for the next.
//  - attention_backward_dkv_tiled: grid (num_heads, key tiles). A query head's share of dK
//    and dV over every query tile at or after the key tile, into per-head partials, so the
//    heads of a GQA group run in parallel and sum in a fixed order (deterministic).
//  - attention_backward_dkv_sum_f32: grid (num_kv_heads, len). Sums a group's partials.
// q, o, d_o: [len, num_heads, head_dim]; k, v: [len, num_kv_heads, head_dim]; lse, delta:
// [len, num_heads]; dk_part, dv_part: [len, num_heads, head_dim]. dq, dk and dv rows are
// `d_stride` apart (column blocks of the fused [len, q | k | v] gradient).
// CPU twin: backend::cuda::twins::attention_backward_bf16.
//
// The host must check, for every kernel here: head_dim 64 or 128; num_heads a multiple of
// num_kv_heads; q, k, v, o and the caches 16-byte aligned (read 16 bytes at a time); grid.y
// at most 65535; blockDim ABT_THREADS.
#include <mma.h>

#define ABT_TILE 32
#define ABT_THREADS 128  // four warps, each one 16 x 16 block of a tile's scores
#define ABT_LDP (ABT_TILE + 8)  // bf16 P and dS rows, padded against bank conflicts
// The backward's shared memory at head_dim 128: Q, dO, K, V tiles (rows padded by 8), S and dP
// (fp32), P and dS (bf16), then the tile's lse and delta. Under the 48 KiB of static shared
// memory.
#define ABT_SMEM (4 * ABT_TILE * (128 + 8) * 2 + 2 * ABT_TILE * ABT_TILE * 4 + 2 * ABT_TILE * ABT_LDP * 2 + 2 * ABT_TILE * 4)
// The forward's: Q and K-or-V tiles, S (fp32), P (bf16), O (fp32, unpadded), m, l and the
// rescaling factors.
#define ABT_CHUNK_SMEM (2 * ABT_TILE * (128 + 8) * 2 + ABT_TILE * ABT_TILE * 4 + ABT_TILE * ABT_LDP * 2 + ABT_TILE * 128 * 4 + 3 * ABT_TILE * 4)

typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, bf16, nvcuda::wmma::row_major> FragA;
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, bf16, nvcuda::wmma::col_major> FragAt;
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, bf16, nvcuda::wmma::row_major> FragB;
typedef nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, bf16, nvcuda::wmma::col_major> FragBt;
typedef nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> FragC;

// The A operand of `accumulate`: the tile as stored, or transposed (its columns as rows).
template <bool T> struct TileA { typedef FragA type; };
template <> struct TileA<true> { typedef FragAt type; };

// One tile's places in shared memory; rows of Q, dO, K and V are HD + 8 apart.
template <int HD>
struct Tiles {
    bf16 *qs, *dos, *ks, *vs, *pb, *dsb;
    float *ss, *dps, *lse, *delta;
    __device__ explicit Tiles(unsigned char* smem) {
        const int t = ABT_TILE * (HD + 8);
        qs = reinterpret_cast<bf16*>(smem);
        dos = qs + t;
        ks = dos + t;
        vs = ks + t;
        ss = reinterpret_cast<float*>(vs + t);
        dps = ss + ABT_TILE * ABT_TILE;
        pb = reinterpret_cast<bf16*>(dps + ABT_TILE * ABT_TILE);
        dsb = pb + ABT_TILE * ABT_LDP;
        lse = reinterpret_cast<float*>(dsb + ABT_TILE * ABT_LDP);
        delta = lse + ABT_TILE;
    }
    // fp32 staging of a 32 x HD output tile, over the Q and dO tiles.
    __device__ float* out() const { return reinterpret_cast<float*>(qs); }
};

// Rows row0.. of a bf16 [len, row_elems] tensor (HD columns from `src`), zeros past len.
template <int HD>
__device__ void tile_in(bf16* dst, const bf16* src, size_t row_elems, int row0, int len) {
    constexpr int pieces = HD / 8;  // 16 bytes each
    for (int x = threadIdx.x; x < ABT_TILE * pieces; x += blockDim.x) {
        const int r = x / pieces, c = (x % pieces) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (row0 + r < len) v = *reinterpret_cast<const uint4*>(src + (size_t)(row0 + r) * row_elems + c);
        *reinterpret_cast<uint4*>(dst + r * (HD + 8) + c) = v;
    }
}

// As tile_in from an fp32 tensor, rounded to bf16.
template <int HD>
__device__ void tile_in_f32(bf16* dst, const float* src, size_t row_elems, int row0, int len) {
    for (int x = threadIdx.x; x < ABT_TILE * HD; x += blockDim.x) {
        const int r = x / HD, c = x % HD;
        dst[r * (HD + 8) + c] = st(row0 + r < len ? src[(size_t)(row0 + r) * row_elems + c] : 0.f);
    }
}

// out (32 x 32 fp32, rows ABT_TILE apart) = a · bᵀ over HD, a and b tiles of 32 rows.
template <int HD>
__device__ void scores(float* out, const bf16* a, const bf16* b) {
    const int warp = threadIdx.x >> 5, r0 = (warp >> 1) * 16, c0 = (warp & 1) * 16;
    FragC acc;
    nvcuda::wmma::fill_fragment(acc, 0.f);
    FragA fa;
    FragBt fb;
#pragma unroll
    for (int k = 0; k < HD; k += 16) {
        nvcuda::wmma::load_matrix_sync(fa, a + r0 * (HD + 8) + k, HD + 8);
        nvcuda::wmma::load_matrix_sync(fb, b + c0 * (HD + 8) + k, HD + 8);
        nvcuda::wmma::mma_sync(acc, fa, fb, acc);
    }
    nvcuda::wmma::store_matrix_sync(out + r0 * ABT_TILE + c0, acc, ABT_TILE, nvcuda::wmma::mem_row_major);
}

// acc += A · b: A is the 32 x 32 bf16 tile `a` (rows ABT_LDP apart), transposed when T; b a
// 32 x HD tile. Each warp owns HD / 64 column blocks of 16, both row blocks.
template <int HD, bool T>
__device__ void accumulate(FragC (&acc)[2][HD / 64], const bf16* a, const bf16* b) {
    const int warp = threadIdx.x >> 5;
    typename TileA<T>::type fa;
    FragB fb;
#pragma unroll
    for (int k = 0; k < ABT_TILE; k += 16) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            nvcuda::wmma::load_matrix_sync(fa, T ? a + k * ABT_LDP + 16 * i : a + 16 * i * ABT_LDP + k, ABT_LDP);
#pragma unroll
            for (int j = 0; j < HD / 64; ++j) {
                nvcuda::wmma::load_matrix_sync(fb, b + k * (HD + 8) + (warp * (HD / 64) + j) * 16, HD + 8);
                nvcuda::wmma::mma_sync(acc[i][j], fa, fb, acc[i][j]);
            }
        }
    }
}

template <int HD>
__device__ void zero(FragC (&acc)[2][HD / 64]) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < HD / 64; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
}

// scale · acc into rows row0.. (below len) of dst, rows `stride` apart, through `stage`.
template <int HD>
__device__ void tile_out(FragC (&acc)[2][HD / 64], float scale, float* stage, float* dst,
                         size_t stride, int row0, int len) {
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < HD / 64; ++j) {
            for (int e = 0; e < acc[i][j].num_elements; ++e) acc[i][j].x[e] *= scale;
            float* at = stage + 16 * i * HD + (warp * (HD / 64) + j) * 16;
            nvcuda::wmma::store_matrix_sync(at, acc[i][j], HD, nvcuda::wmma::mem_row_major);
        }
    __syncthreads();
    for (int x = threadIdx.x; x < ABT_TILE * HD; x += blockDim.x) {
        const int r = x / HD, c = x % HD;
        if (row0 + r < len) dst[(size_t)(row0 + r) * stride + c] = stage[x];
    }
    __syncthreads();
}

// P and dS of the tile (query rows i0.., keys j0..) from S and dP: zero where the key is after
// the row or the row is past len. P into pb (when given) and dS into dsb, as bf16.
template <int HD>
__device__ void softmax_grad(const Tiles<HD>& t, bool with_p, int i0, int j0, int len, float scale) {
    for (int x = threadIdx.x; x < ABT_TILE * ABT_TILE; x += blockDim.x) {
        const int r = x / ABT_TILE, c = x % ABT_TILE, i = i0 + r, j = j0 + c;
        float p = 0.f, ds = 0.f;
        if (i < len && j <= i) {
            p = __expf(t.ss[x] * scale - t.lse[r]);
            ds = p * (t.dps[x] - t.delta[r]);
        }
        if (with_p) t.pb[r * ABT_LDP + c] = st(p);
        t.dsb[r * ABT_LDP + c] = st(ds);
    }
}

template <int HD>
__device__ void dq_tile(unsigned char* smem, const bf16* q, const bf16* k, const bf16* v,
                        const bf16* o, const float* d_o, float* dq, float* lse_out,
                        float* delta_out, int len, int num_heads, int num_kv_heads, float scale,
                        int d_stride) {
    const Tiles<HD> t(smem);
    const int h = blockIdx.x, i0 = blockIdx.y * ABT_TILE;
    const int kvh = h / (num_heads / num_kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t q_row = (size_t)num_heads * HD, kv_row = (size_t)num_kv_heads * HD;
    tile_in<HD>(t.qs, q + h * HD, q_row, i0, len);
    tile_in_f32<HD>(t.dos, d_o + h * HD, q_row, i0, len);

    // delta = rowsum(dO ∘ O) in fp32, a warp per row.
    for (int r = warp; r < ABT_TILE; r += ABT_THREADS / 32) {
        const int i = i0 + r;
        float part = 0.f;
        if (i < len)
            for (int d = lane; d < HD; d += 32) part += d_o[i * q_row + h * HD + d] * ld(o[i * q_row + h * HD + d]);
        part = warp_sum(part);
        if (lane == 0) t.delta[r] = part;
    }

    // Pass 1: each row's log-sum-exp over keys 0..=row, online; a warp per 8 rows, a lane per
    // key of the tile.
    float m[ABT_TILE / 4], l[ABT_TILE / 4];
#pragma unroll
    for (int rr = 0; rr < ABT_TILE / 4; ++rr) {
        m[rr] = NEG_INF;
        l[rr] = 0.f;
    }
    for (int j0 = 0; j0 <= i0; j0 += ABT_TILE) {
        tile_in<HD>(t.ks, k + kvh * HD, kv_row, j0, len);
        __syncthreads();
        scores<HD>(t.ss, t.qs, t.ks);
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < ABT_TILE / 4; ++rr) {
            const int r = warp * (ABT_TILE / 4) + rr, i = i0 + r, j = j0 + lane;
            const float s = (i < len && j <= i) ? t.ss[r * ABT_TILE + lane] * scale : NEG_INF;
            const float mn = fmaxf(m[rr], warp_max(s));
            const float e = warp_sum(s == NEG_INF ? 0.f : __expf(s - mn));
            if (mn != NEG_INF) l[rr] = (m[rr] == NEG_INF ? 0.f : l[rr] * __expf(m[rr] - mn)) + e;
            m[rr] = mn;
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int rr = 0; rr < ABT_TILE / 4; ++rr) {
            const int r = warp * (ABT_TILE / 4) + rr, i = i0 + r;
            t.lse[r] = m[rr] + logf(l[rr]);
            if (i < len) {
                lse_out[(size_t)i * num_heads + h] = t.lse[r];
                delta_out[(size_t)i * num_heads + h] = t.delta[r];
            }
        }
    }

    // Pass 2: dQ = scale · Σ over key tiles of dS K.
    FragC acc[2][HD / 64];
    zero<HD>(acc);
    for (int j0 = 0; j0 <= i0; j0 += ABT_TILE) {
        tile_in<HD>(t.ks, k + kvh * HD, kv_row, j0, len);
        tile_in<HD>(t.vs, v + kvh * HD, kv_row, j0, len);
        __syncthreads();
        scores<HD>(t.ss, t.qs, t.ks);
        scores<HD>(t.dps, t.dos, t.vs);
        __syncthreads();
        softmax_grad<HD>(t, false, i0, j0, len, scale);
        __syncthreads();
        accumulate<HD, false>(acc, t.dsb, t.ks);
        __syncthreads();
    }
    tile_out<HD>(acc, scale, t.out(), dq + h * HD, d_stride, i0, len);
}

template <int HD>
__device__ void dkv_tile(unsigned char* smem, const bf16* q, const bf16* k, const bf16* v,
                         const float* d_o, const float* lse, const float* delta, float* dk_part,
                         float* dv_part, int len, int num_heads, int num_kv_heads, float scale) {
    const Tiles<HD> t(smem);
    const int h = blockIdx.x, j0 = blockIdx.y * ABT_TILE;
    const int kvh = h / (num_heads / num_kv_heads);
    const size_t q_row = (size_t)num_heads * HD, kv_row = (size_t)num_kv_heads * HD;
    tile_in<HD>(t.ks, k + kvh * HD, kv_row, j0, len);
    tile_in<HD>(t.vs, v + kvh * HD, kv_row, j0, len);
    FragC acc_k[2][HD / 64], acc_v[2][HD / 64];
    zero<HD>(acc_k);
    zero<HD>(acc_v);
    // Query tiles before the key tile see none of its keys.
    for (int i0 = j0; i0 < len; i0 += ABT_TILE) {
        tile_in<HD>(t.qs, q + h * HD, q_row, i0, len);
        tile_in_f32<HD>(t.dos, d_o + h * HD, q_row, i0, len);
        if (threadIdx.x < ABT_TILE) {
            const int i = i0 + threadIdx.x;
            t.lse[threadIdx.x] = i < len ? lse[(size_t)i * num_heads + h] : 0.f;
            t.delta[threadIdx.x] = i < len ? delta[(size_t)i * num_heads + h] : 0.f;
        }
        __syncthreads();
        scores<HD>(t.ss, t.qs, t.ks);
        scores<HD>(t.dps, t.dos, t.vs);
        __syncthreads();
        softmax_grad<HD>(t, true, i0, j0, len, scale);
        __syncthreads();
        accumulate<HD, true>(acc_v, t.pb, t.dos);
        accumulate<HD, true>(acc_k, t.dsb, t.qs);
        __syncthreads();
    }
    tile_out<HD>(acc_k, scale, t.out(), dk_part + h * HD, q_row, j0, len);
    tile_out<HD>(acc_v, 1.f, t.out(), dv_part + h * HD, q_row, j0, len);
}

extern "C" __global__ void __launch_bounds__(ABT_THREADS) attention_backward_dq_tiled(
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    const bf16* __restrict__ o, const float* __restrict__ d_o, float* __restrict__ dq,
    float* __restrict__ lse_out, float* __restrict__ delta_out, int len, int num_heads,
    int num_kv_heads, int head_dim, float scale, int d_stride) {
    __shared__ __align__(128) unsigned char smem[ABT_SMEM];
    if (head_dim == 64)
        dq_tile<64>(smem, q, k, v, o, d_o, dq, lse_out, delta_out, len, num_heads, num_kv_heads, scale, d_stride);
    else
        dq_tile<128>(smem, q, k, v, o, d_o, dq, lse_out, delta_out, len, num_heads, num_kv_heads, scale, d_stride);
}

extern "C" __global__ void __launch_bounds__(ABT_THREADS) attention_backward_dkv_tiled(
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    const float* __restrict__ d_o, const float* __restrict__ lse, const float* __restrict__ delta,
    float* __restrict__ dk_part, float* __restrict__ dv_part, int len, int num_heads,
    int num_kv_heads, int head_dim, float scale) {
    __shared__ __align__(128) unsigned char smem[ABT_SMEM];
    if (head_dim == 64)
        dkv_tile<64>(smem, q, k, v, d_o, lse, delta, dk_part, dv_part, len, num_heads, num_kv_heads, scale);
    else
        dkv_tile<128>(smem, q, k, v, d_o, lse, delta, dk_part, dv_part, len, num_heads, num_kv_heads, scale);
}

extern "C" __global__ void __launch_bounds__(ABT_THREADS) attention_backward_dkv_sum_f32(
    const float* __restrict__ dk_part, const float* __restrict__ dv_part, float* __restrict__ dk,
    float* __restrict__ dv, int len, int num_heads, int num_kv_heads, int head_dim, int d_stride) {
    const int kvh = blockIdx.x, j = blockIdx.y, group = num_heads / num_kv_heads;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float sk = 0.f, sv = 0.f;
        for (int g = 0; g < group; ++g) {
            const size_t at = ((size_t)j * num_heads + kvh * group + g) * head_dim + d;
            sk += dk_part[at];
            sv += dv_part[at];
        }
        dk[(size_t)j * d_stride + kvh * head_dim + d] = sk;
        dv[(size_t)j * d_stride + kvh * head_dim + d] = sv;
    }
}

// Keys key0.. (below `end`) of kv head kvh from a paged cache, zeros past end.
template <int HD>
__device__ void tile_in_paged(bf16* dst, const bf16* cache, const int* table, int block_size,
                              int num_kv_heads, int kvh, int key0, int end) {
    constexpr int pieces = HD / 8;
    for (int x = threadIdx.x; x < ABT_TILE * pieces; x += blockDim.x) {
        const int r = x / pieces, c = (x % pieces) * 8, j = key0 + r;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (j < end) {
            const size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
            v = *reinterpret_cast<const uint4*>(cache + (slot * num_kv_heads + kvh) * HD + c);
        }
        *reinterpret_cast<uint4*>(dst + r * (HD + 8) + c) = v;
    }
}

// One row tile of attention_chunk_tiled: `rows` (at most ABT_TILE) rows of q and out from
// position pos0.
template <int HD>
__device__ void chunk_tile(unsigned char* smem, const bf16* q, const bf16* k_cache,
                           const bf16* v_cache, const int* table, int pos0, int rows, bf16* out,
                           int num_heads, int num_kv_heads, int block_size, float scale) {
    bf16* qs = reinterpret_cast<bf16*>(smem);
    bf16* kvs = qs + ABT_TILE * (HD + 8);  // K, then V, of the key tile
    float* ss = reinterpret_cast<float*>(kvs + ABT_TILE * (HD + 8));
    bf16* pb = reinterpret_cast<bf16*>(ss + ABT_TILE * ABT_TILE);
    float* os = reinterpret_cast<float*>(pb + ABT_TILE * ABT_LDP);  // [32, HD], unnormalised
    float *m = os + ABT_TILE * HD, *l = m + ABT_TILE, *alpha = l + ABT_TILE;
    const int h = blockIdx.x;
    const int kvh = h / (num_heads / num_kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const size_t q_row = (size_t)num_heads * HD;
    tile_in<HD>(qs, q + h * HD, q_row, 0, rows);
    for (int x = threadIdx.x; x < ABT_TILE * HD; x += blockDim.x) os[x] = 0.f;
    if (threadIdx.x < ABT_TILE) {
        m[threadIdx.x] = NEG_INF;
        l[threadIdx.x] = 0.f;
    }
    // Keys 0..end are all any row of the tile sees.
    const int end = pos0 + rows;
    for (int key0 = 0; key0 < end; key0 += ABT_TILE) {
        tile_in_paged<HD>(kvs, k_cache, table, block_size, num_kv_heads, kvh, key0, end);
        __syncthreads();
        scores<HD>(ss, qs, kvs);
        __syncthreads();
        // A warp per 8 rows, a lane per key: the new max, P, the rows' sums and rescaling.
#pragma unroll
        for (int rr = 0; rr < ABT_TILE / 4; ++rr) {
            const int r = warp * (ABT_TILE / 4) + rr, j = key0 + lane;
            const float s = (r < rows && j <= pos0 + r) ? ss[r * ABT_TILE + lane] * scale : NEG_INF;
            const float old = m[r];
            const float mn = fmaxf(old, warp_max(s));
            const float p = s == NEG_INF ? 0.f : __expf(s - mn);
            pb[r * ABT_LDP + lane] = st(p);
            const float sum = warp_sum(p);
            if (lane == 0) {
                const float a = old == NEG_INF ? 0.f : __expf(old - mn);
                l[r] = l[r] * a + sum;
                m[r] = mn;
                alpha[r] = a;
            }
        }
        __syncthreads();
        tile_in_paged<HD>(kvs, v_cache, table, block_size, num_kv_heads, kvh, key0, end);
        for (int x = threadIdx.x; x < ABT_TILE * HD; x += blockDim.x) os[x] *= alpha[x / HD];
        __syncthreads();
        FragC acc[2][HD / 64];
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int jj = 0; jj < HD / 64; ++jj)
                nvcuda::wmma::load_matrix_sync(acc[i][jj], os + 16 * i * HD + (warp * (HD / 64) + jj) * 16, HD,
                                               nvcuda::wmma::mem_row_major);
        accumulate<HD, false>(acc, pb, kvs);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int jj = 0; jj < HD / 64; ++jj)
                nvcuda::wmma::store_matrix_sync(os + 16 * i * HD + (warp * (HD / 64) + jj) * 16, acc[i][jj], HD,
                                                nvcuda::wmma::mem_row_major);
        __syncthreads();
    }
    for (int x = threadIdx.x; x < ABT_TILE * HD; x += blockDim.x) {
        const int r = x / HD, c = x % HD;
        if (r < rows) out[(size_t)r * q_row + h * HD + c] = st(os[x] / l[r]);
    }
}

extern "C" __global__ void __launch_bounds__(ABT_THREADS) attention_chunk_tiled(
    const bf16* __restrict__ q, const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
    const int* __restrict__ tiles, const int* __restrict__ block_tables, int max_blocks,
    bf16* __restrict__ out, int num_heads, int num_kv_heads, int head_dim, int block_size,
    float scale) {
    __shared__ __align__(128) unsigned char smem[ABT_CHUNK_SMEM];
    const int* t = tiles + 4 * blockIdx.y;
    const int* table = block_tables + (size_t)t[0] * max_blocks;
    const size_t first = (size_t)t[1] * num_heads * head_dim;
    if (head_dim == 64)
        chunk_tile<64>(smem, q + first, k_cache, v_cache, table, t[2], t[3], out + first, num_heads, num_kv_heads, block_size, scale);
    else
        chunk_tile<128>(smem, q + first, k_cache, v_cache, table, t[2], t[3], out + first, num_heads, num_kv_heads, block_size, scale);
}
