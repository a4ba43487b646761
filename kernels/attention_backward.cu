// Backward of causal attention over one training sample (every position 0..len attends to keys
// 0..=itself), recomputing the softmax from the saved q and k instead of keeping it:
//   S = scale·Q Kᵀ, P = softmax(S), dP = dO Vᵀ, dS = P ∘ (dP − rowsum(dO ∘ O)),
//   dQ = scale·dS K, dK = scale·dSᵀ Q, dV = Pᵀ dO (dK, dV summed over a kv head's query heads).
// Two kernels: `attention_backward_dq_f32`, one block per (query head, row), writes dQ and each
// row's log-sum-exp and rowsum(dO ∘ O); `attention_backward_dkv_f32`, one block per (kv head,
// key), recomputes P and dS from those and writes dK and dV.
// q, o, d_o: [len, num_heads, head_dim]; k, v: [len, num_kv_heads, head_dim]; lse, delta:
// [len, num_heads]. dq, dk and dv rows are `d_stride` apart, so they can be column blocks of one
// fused [len, q | k | v] gradient (the layout the q/k/v projection's backward reads). The host must check: len at most AB_MAX_LEN; head_dim a multiple of 32 and
// at most 32 * AB_MAX_DIMS_PER_LANE; num_heads a multiple of num_kv_heads; len at most 65535
// (grid.y); blockDim AB_THREADS.
// CPU twin: model::attention_backward::attention_backward.

#define AB_MAX_LEN 4096
#define AB_MAX_DIMS_PER_LANE 8
#define AB_THREADS 128
#define AB_WARPS (AB_THREADS / 32)

extern "C" __global__ void __launch_bounds__(AB_THREADS) attention_backward_dq_f32(
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    const bf16* __restrict__ o, const float* __restrict__ d_o, float* __restrict__ dq,
    float* __restrict__ lse_out, float* __restrict__ delta_out, int len, int num_heads,
    int num_kv_heads, int head_dim, float scale, int d_stride) {
    const int h = blockIdx.x, i = blockIdx.y;
    const int kvh = h / (num_heads / num_kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, dims = head_dim / 32;
    __shared__ float ds[AB_MAX_LEN], dp[AB_MAX_LEN], scratch[32];
    const size_t qoff = ((size_t)i * num_heads + h) * head_dim;

    float qv[AB_MAX_DIMS_PER_LANE], gv[AB_MAX_DIMS_PER_LANE];
#pragma unroll
    for (int t = 0; t < AB_MAX_DIMS_PER_LANE; ++t) {
        qv[t] = t < dims ? ld(q[qoff + lane + 32 * t]) * scale : 0.f;
        gv[t] = t < dims ? d_o[qoff + lane + 32 * t] : 0.f;
    }
    float part = 0.f;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) part += d_o[qoff + d] * ld(o[qoff + d]);
    const float delta = block_sum(part, scratch);

    // Scores and dP for keys 0..=i, a warp per key.
    for (int j = warp; j <= i; j += AB_WARPS) {
        const size_t koff = ((size_t)j * num_kv_heads + kvh) * head_dim;
        float s = 0.f, g = 0.f;
#pragma unroll
        for (int t = 0; t < AB_MAX_DIMS_PER_LANE; ++t) {
            if (t < dims) {
                s += qv[t] * ld(k[koff + lane + 32 * t]);
                g += gv[t] * ld(v[koff + lane + 32 * t]);
            }
        }
        s = warp_sum(s);
        g = warp_sum(g);
        if (lane == 0) {
            ds[j] = s;
            dp[j] = g;
        }
    }
    __syncthreads();
    float mx = NEG_INF;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) mx = fmaxf(mx, ds[j]);
    mx = block_max(mx, scratch);
    float l = 0.f;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) l += __expf(ds[j] - mx);
    l = block_sum(l, scratch);
    const float lse = mx + logf(l);
    for (int j = threadIdx.x; j <= i; j += blockDim.x) ds[j] = __expf(ds[j] - lse) * (dp[j] - delta);
    __syncthreads();
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.f;
        for (int j = 0; j <= i; ++j) acc += ds[j] * ld(k[((size_t)j * num_kv_heads + kvh) * head_dim + d]);
        dq[(size_t)i * d_stride + h * head_dim + d] = scale * acc;
    }
    if (threadIdx.x == 0) {
        lse_out[(size_t)i * num_heads + h] = lse;
        delta_out[(size_t)i * num_heads + h] = delta;
    }
}

extern "C" __global__ void __launch_bounds__(AB_THREADS) attention_backward_dkv_f32(
    const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
    const float* __restrict__ d_o, const float* __restrict__ lse, const float* __restrict__ delta,
    float* __restrict__ dk, float* __restrict__ dv, int len, int num_heads, int num_kv_heads,
    int head_dim, float scale, int d_stride) {
    const int kvh = blockIdx.x, j = blockIdx.y;
    const int group = num_heads / num_kv_heads;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, dims = head_dim / 32;
    __shared__ float red_k[AB_WARPS][32 * AB_MAX_DIMS_PER_LANE];
    __shared__ float red_v[AB_WARPS][32 * AB_MAX_DIMS_PER_LANE];
    const size_t koff = ((size_t)j * num_kv_heads + kvh) * head_dim;

    float kj[AB_MAX_DIMS_PER_LANE], vj[AB_MAX_DIMS_PER_LANE];
    float ak[AB_MAX_DIMS_PER_LANE], av[AB_MAX_DIMS_PER_LANE];
#pragma unroll
    for (int t = 0; t < AB_MAX_DIMS_PER_LANE; ++t) {
        kj[t] = t < dims ? ld(k[koff + lane + 32 * t]) : 0.f;
        vj[t] = t < dims ? ld(v[koff + lane + 32 * t]) : 0.f;
        ak[t] = 0.f;
        av[t] = 0.f;
    }
    // Every query row i >= j of every query head of this kv head, a warp per row.
    for (int hh = 0; hh < group; ++hh) {
        const int h = kvh * group + hh;
        for (int i = j + warp; i < len; i += AB_WARPS) {
            const size_t qoff = ((size_t)i * num_heads + h) * head_dim;
            float qi[AB_MAX_DIMS_PER_LANE], gi[AB_MAX_DIMS_PER_LANE];
            float s = 0.f, g = 0.f;
#pragma unroll
            for (int t = 0; t < AB_MAX_DIMS_PER_LANE; ++t) {
                qi[t] = t < dims ? ld(q[qoff + lane + 32 * t]) : 0.f;
                gi[t] = t < dims ? d_o[qoff + lane + 32 * t] : 0.f;
                s += qi[t] * kj[t];
                g += gi[t] * vj[t];
            }
            s = warp_sum(s) * scale;
            g = warp_sum(g);
            const size_t r = (size_t)i * num_heads + h;
            const float p = __expf(s - lse[r]);
            const float dsv = p * (g - delta[r]);
#pragma unroll
            for (int t = 0; t < AB_MAX_DIMS_PER_LANE; ++t) {
                av[t] += p * gi[t];
                ak[t] += scale * dsv * qi[t];
            }
        }
    }
#pragma unroll
    for (int t = 0; t < AB_MAX_DIMS_PER_LANE; ++t) {
        if (t < dims) {
            red_k[warp][lane + 32 * t] = ak[t];
            red_v[warp][lane + 32 * t] = av[t];
        }
    }
    __syncthreads();
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float sk = 0.f, sv = 0.f;
        for (int w = 0; w < AB_WARPS; ++w) {
            sk += red_k[w][d];
            sv += red_v[w][d];
        }
        const size_t doff = (size_t)j * d_stride + kvh * head_dim + d;
        dk[doff] = sk;
        dv[doff] = sv;
    }
}
