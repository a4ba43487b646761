// Greedy sampling on the device: per row of logits, the argmax (lowest id on ties) and its
// log-probability, so only an id and a float come back to the host. One block per row.
// Launch with exactly 1024 threads (the shared arrays and the tree reduction assume it).
// CPU twin: the sampler's argmax and logprobs_of.

extern "C" __global__ void __launch_bounds__(1024) argmax_logprob_f32(const float* __restrict__ logits, int vocab,
                                              unsigned int* __restrict__ ids,
                                              float* __restrict__ logprobs) {
    __shared__ float scratch[32];
    __shared__ float best_v[1024];
    __shared__ int best_i[1024];
    const float* x = logits + (size_t)blockIdx.x * vocab;
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = x[i];
        if (v > bv) {  // ascending i per thread: keeps the lowest index of equal maxima
            bv = v;
            bi = i;
        }
    }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            const float ov = best_v[threadIdx.x + stride];
            const int oi = best_i[threadIdx.x + stride];
            if (ov > best_v[threadIdx.x] || (ov == best_v[threadIdx.x] && oi < best_i[threadIdx.x])) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    const float mx = best_v[0];
    float sum = 0.f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) sum += __expf(x[i] - mx);
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) {
        ids[blockIdx.x] = best_i[0] == 0x7fffffff ? 0u : (unsigned int)best_i[0];
        logprobs[blockIdx.x] = -logf(sum);  // log softmax of the maximum: mx - (mx + log sum)
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling on the device: per row, temperature, top-k, top-p, min-p and one draw with the
// row's own uniform number (drawn on the host from the sequence's seeded generator), plus the
// sampled token's log-probability and the row's most likely tokens. Only ids and requested
// log-probabilities come back to the host. One block of SAMPLE_THREADS threads per row.
//
// The kept set is the CPU sampler's: rank tokens by logit (ties to the lower id); top-k keeps a
// rank prefix; top-p keeps, within it, each token whose mass ranked before it is below top_p
// times the prefix's mass; min-p keeps tokens whose weight is at least min_p times the top
// one's. The draw walks the kept tokens in id order. Nothing is sorted: radix selection over
// the logits' order-preserving 32-bit keys finds each cut, and each thread owns a contiguous
// run of ids so ties at a cut are broken by id with a prefix count.
//
// Weights exp((logit - max) / temperature) are summed in 2^40 fixed point: integer sums are
// exact in any order, so a row draws the same token on every run (atomics included).
// The log-probabilities are of `raw`: the logits before the penalties applied to `logits`
// (apply_penalties_f32), or `logits` itself when there are none.
// CPU twin: sampling::sample_row_from.

#define SAMPLE_THREADS 1024
#define MAX_TOP_LOGPROBS 20
#define GREEDY_TEMPERATURE 1e-5f

typedef unsigned long long u64;

// As the host packs it: 32 bytes a row.
struct SampleRow {
    float temperature;  // below GREEDY_TEMPERATURE: argmax
    int top_k;          // 0 (or >= vocab): off
    float top_p;        // 1: off
    float min_p;        // 0: off
    double u;           // uniform in [0, 1)
    int top_logprobs;   // most likely tokens to report, at most MAX_TOP_LOGPROBS
    int pad;
};

// NaN logits rank below everything, as -inf.
__device__ __forceinline__ float logit_at(const float* x, int i) {
    const float v = x[i];
    return v != v ? NEG_INF : v;
}

// Larger float, larger key.
__device__ __forceinline__ unsigned int order_key(float v) {
    const unsigned int b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_value(unsigned int k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ u64 fixed_weight(float w) {
    return (u64)(w * 1099511627776.0f);  // 2^40; w <= 1
}

// Exclusive prefix sum over the block in thread order; `total` gets the sum of all.
// `scratch` holds 32 values.
__device__ u64 block_exclusive_scan(u64 v, u64* scratch, u64* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    u64 inc = v;
    for (int o = 1; o < 32; o <<= 1) {
        const u64 n = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += n;
    }
    if (lane == 31) scratch[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        u64 w = lane < warps ? scratch[lane] : 0ull;
        for (int o = 1; o < 32; o <<= 1) {
            const u64 n = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += n;
        }
        scratch[lane] = w;
    }
    __syncthreads();
    const u64 before = (warp > 0 ? scratch[warp - 1] : 0ull) + inc - v;
    *total = scratch[warps - 1];
    __syncthreads();
    return before;
}

// A rank prefix cut at key `cut`: every token above it, then the first `rest` tokens at it in
// id order. `seen` counts, along a thread's run, the tokens at the cut so far (start() sets it
// to those in earlier runs); take() must be called on every candidate in id order.
struct RankPrefix {
    bool on;
    unsigned int cut;
    u64 rest, before, seen;
    __device__ void start() { seen = before; }
    __device__ bool take(unsigned int key) {
        if (!on || key > cut) return true;
        if (key < cut) return false;
        return seen++ < rest;
    }
};

// The top-p cut within a pool: tokens above key `cut`, then tokens at it while the mass before
// them, `above + seen * w_cut`, is below `p_mass`.
struct Nucleus {
    bool on;
    unsigned int cut;
    u64 above, w_cut, p_mass, before, seen;
    __device__ void start() { seen = before; }
    __device__ bool take(unsigned int key) {
        if (!on || key > cut) return true;
        if (key < cut) return false;
        return above + (seen++) * w_cut < p_mass;
    }
};

// Per-row constants of the weights.
struct Weights {
    float max, inv_t;
    __device__ float operator()(float v) const { return expf((v - max) * inv_t); }
};

// The largest key K with amount(keys > K) < target <= amount(keys >= K), over the tokens
// `amount` gives a nonzero amount (members); `above` gets amount(keys > K). Four passes of
// 8-bit digits, most significant first. `amount(i, key)` is called for every id of a thread's
// run in order, after `amount.start()`.
template <typename Amount>
__device__ unsigned int radix_select(const float* x, int lo, int hi, u64 target, Amount& amount,
                                     u64* hist, unsigned int* shared_prefix, u64* shared_above,
                                     u64* above) {
    unsigned int prefix = 0u, mask = 0u;
    u64 acc = 0ull;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0ull;
        __syncthreads();
        amount.start();
        for (int i = lo; i < hi; ++i) {
            const unsigned int key = order_key(logit_at(x, i));
            const u64 a = amount(i, key);
            if (a != 0ull && (key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], a);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int b = 255;
            for (; b > 0; --b) {
                if (acc + hist[b] >= target) break;
                acc += hist[b];
            }
            *shared_prefix = prefix | ((unsigned int)b << shift);
            *shared_above = acc;
        }
        __syncthreads();
        prefix = *shared_prefix;
        acc = *shared_above;
        mask |= 0xffu << shift;
        __syncthreads();
    }
    *above = acc;
    return prefix;
}

// Every token counts 1.
struct CountAll {
    __device__ void start() {}
    __device__ u64 operator()(int, unsigned int) { return 1ull; }
};

// The fixed-point weight of each token in a rank prefix.
struct PrefixMass {
    RankPrefix* pool;
    Weights w;
    __device__ void start() { pool->start(); }
    __device__ u64 operator()(int, unsigned int key) {
        return pool->take(key) ? fixed_weight(w(key_value(key))) : 0ull;
    }
};

// Sets `p.before` to the tokens at `p.cut` in runs before this thread's.
__device__ void count_ties_before(const float* x, int lo, int hi, RankPrefix& p, u64* scratch) {
    u64 ties = 0ull, total;
    if (p.on)
        for (int i = lo; i < hi; ++i) ties += order_key(logit_at(x, i)) == p.cut;
    p.before = block_exclusive_scan(ties, scratch, &total);
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_rows_f32(const float* __restrict__ logits,
                                           const float* __restrict__ raw_logits, int vocab,
                                           const SampleRow* __restrict__ params,
                                           unsigned int* __restrict__ ids,
                                           float* __restrict__ logprobs,
                                           unsigned int* __restrict__ top_ids,
                                           float* __restrict__ top_logprobs) {
    __shared__ float fscratch[32];
    __shared__ int iscratch[32];
    __shared__ u64 scan[32];
    __shared__ u64 hist[256];
    __shared__ unsigned int shared_prefix;
    __shared__ u64 shared_above;
    __shared__ unsigned int chosen;
    __shared__ unsigned int top_count;
    __shared__ unsigned int top_found[MAX_TOP_LOGPROBS];

    const SampleRow p = params[blockIdx.x];
    const float* x = logits + (size_t)blockIdx.x * vocab;
    const float* raw = raw_logits + (size_t)blockIdx.x * vocab;
    const int run = (vocab + blockDim.x - 1) / blockDim.x;
    const int lo = min((int)threadIdx.x * run, vocab), hi = min(lo + run, vocab);

    // The maximum and its lowest id.
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    for (int i = lo; i < hi; ++i) {
        const float v = logit_at(x, i);
        if (v > bv) {
            bv = v;
            bi = i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) {
            bv = ov;
            bi = oi;
        }
    }
    if ((threadIdx.x & 31) == 0) {
        fscratch[threadIdx.x >> 5] = bv;
        iscratch[threadIdx.x >> 5] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w)
            if (fscratch[w] > fscratch[0] || (fscratch[w] == fscratch[0] && iscratch[w] < iscratch[0])) {
                fscratch[0] = fscratch[w];
                iscratch[0] = iscratch[w];
            }
        chosen = iscratch[0] == 0x7fffffff ? 0u : (unsigned int)iscratch[0];
        top_count = 0u;
    }
    __syncthreads();
    const float mx = fscratch[0];
    __syncthreads();

    // log-softmax normaliser of the raw logits, for the reported log-probabilities (the same
    // pointer for every thread of the block, so all or none take the branch).
    float raw_mx = mx;
    if (raw != x) {
        float m = NEG_INF;
        for (int i = lo; i < hi; ++i) m = fmaxf(m, logit_at(raw, i));
        raw_mx = block_max(m, fscratch);
    }
    float sum = 0.f;
    if (raw_mx > NEG_INF)
        for (int i = lo; i < hi; ++i) sum += expf(logit_at(raw, i) - raw_mx);
    sum = block_sum(sum, fscratch);
    const bool finite = mx > NEG_INF && mx < -NEG_INF;
    const bool raw_finite = raw_mx > NEG_INF && raw_mx < -NEG_INF;
    const float log_z = raw_finite ? raw_mx + logf(sum) : raw_mx;

    if (p.temperature >= GREEDY_TEMPERATURE && finite) {
        const Weights w = {mx, 1.0f / p.temperature};
        u64 total;
        // Top-k: the pool is the best top_k tokens.
        RankPrefix pool = {p.top_k > 0 && p.top_k < vocab, 0u, 0ull, 0ull, 0ull};
        if (pool.on) {
            CountAll all;
            u64 above;
            pool.cut = radix_select(x, lo, hi, (u64)p.top_k, all, hist, &shared_prefix,
                                    &shared_above, &above);
            pool.rest = (u64)p.top_k - above;
            count_ties_before(x, lo, hi, pool, scan);
        }
        // Top-p within the pool.
        Nucleus nucleus = {p.top_p < 1.f, 0u, 0ull, 0ull, 0ull, 0ull, 0ull};
        if (nucleus.on) {
            PrefixMass mass = {&pool, w};
            u64 run_mass = 0ull;
            mass.start();
            for (int i = lo; i < hi; ++i) run_mass += mass(i, order_key(logit_at(x, i)));
            block_exclusive_scan(run_mass, scan, &total);
            u64 p_mass = (u64)((double)p.top_p * (double)total);
            if (p_mass == 0ull) p_mass = 1ull;  // the top token is always kept
            nucleus.p_mass = p_mass;
            nucleus.cut = radix_select(x, lo, hi, p_mass, mass, hist, &shared_prefix,
                                       &shared_above, &nucleus.above);
            nucleus.w_cut = fixed_weight(w(key_value(nucleus.cut)));
            u64 ties = 0ull;
            pool.start();
            for (int i = lo; i < hi; ++i) {
                const unsigned int key = order_key(logit_at(x, i));
                if (pool.take(key) && key == nucleus.cut) ++ties;
            }
            nucleus.before = block_exclusive_scan(ties, scan, &total);
        }
        // A token's fixed-point weight if the filters keep it, else 0; called for every id of
        // the run in order, after pool.start() and nucleus.start().
        auto kept = [&](int i) -> u64 {
            const float v = logit_at(x, i);
            const unsigned int key = order_key(v);
            if (!pool.take(key) || !nucleus.take(key)) return 0ull;
            const float wt = w(v);
            return wt >= p.min_p ? fixed_weight(wt) : 0ull;
        };
        // The kept mass of this thread's run, then of the runs before it.
        u64 run_mass = 0ull;
        pool.start();
        nucleus.start();
        for (int i = lo; i < hi; ++i) run_mass += kept(i);
        const u64 before = block_exclusive_scan(run_mass, scan, &total);
        u64 target = (u64)(p.u * (double)total);
        if (target >= total) target = total - 1ull;
        if (total > 0ull && before <= target && target < before + run_mass) {
            u64 acc = before;
            pool.start();
            nucleus.start();
            for (int i = lo; i < hi; ++i) {
                acc += kept(i);
                if (acc > target) {
                    chosen = (unsigned int)i;
                    break;
                }
            }
        }
        __syncthreads();
    }

    if (threadIdx.x == 0) {
        ids[blockIdx.x] = chosen;
        logprobs[blockIdx.x] = logit_at(raw, chosen) - log_z;
    }

    // The most likely tokens of the raw logits, best first (ties to the lower id).
    const int n_top = min(min(p.top_logprobs, MAX_TOP_LOGPROBS), vocab);
    if (n_top > 0) {
        CountAll all;
        u64 above;
        RankPrefix top = {true, 0u, 0ull, 0ull, 0ull};
        top.cut = radix_select(raw, lo, hi, (u64)n_top, all, hist, &shared_prefix,
                               &shared_above, &above);
        top.rest = (u64)n_top - above;
        count_ties_before(raw, lo, hi, top, scan);
        top.start();
        for (int i = lo; i < hi; ++i)
            if (top.take(order_key(logit_at(raw, i)))) top_found[atomicAdd(&top_count, 1u)] = i;
        __syncthreads();
        if (threadIdx.x == 0) {
            // Insertion sort of at most MAX_TOP_LOGPROBS entries.
            for (int a = 1; a < n_top; ++a) {
                const unsigned int id = top_found[a];
                const float v = logit_at(raw, id);
                int b = a - 1;
                for (; b >= 0; --b) {
                    const float bvv = logit_at(raw, top_found[b]);
                    if (bvv > v || (bvv == v && top_found[b] < id)) break;
                    top_found[b + 1] = top_found[b];
                }
                top_found[b + 1] = id;
            }
            for (int a = 0; a < n_top; ++a) {
                top_ids[(size_t)blockIdx.x * MAX_TOP_LOGPROBS + a] = top_found[a];
                top_logprobs[(size_t)blockIdx.x * MAX_TOP_LOGPROBS + a] =
                    logit_at(raw, top_found[a]) - log_z;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling penalties before the draw, as the host sampler applies them (vLLM's order): per row,
// the tokens a penalty touches (its prompt's and outputs' for the repetition penalty, its
// outputs' for the frequency and presence penalties), each listed once with its repetition
// factor (1: none) and the amount the other two subtract after it (frequency x count +
// presence, computed on the host so the arithmetic here is one division or product and one
// subtraction, as there, each rounded on its own: no contraction into an FMA). Rows in CSR form: row r's entries are offsets[r] .. offsets[r + 1].
// One block per row; tokens outside the vocabulary are skipped. CPU twin:
// sampling::apply_penalties.
extern "C" __global__ void __launch_bounds__(128) apply_penalties_f32(float* __restrict__ logits, int vocab,
                                               const unsigned int* __restrict__ offsets,
                                               const unsigned int* __restrict__ tokens,
                                               const float* __restrict__ repetition,
                                               const float* __restrict__ subtract) {
    float* x = logits + (size_t)blockIdx.x * vocab;
    const unsigned int end = offsets[blockIdx.x + 1];
    for (unsigned int e = offsets[blockIdx.x] + threadIdx.x; e < end; e += blockDim.x) {
        const unsigned int t = tokens[e];
        if (t >= (unsigned int)vocab) continue;
        float l = x[t];
        const float rep = repetition[e];
        if (rep != 1.f) l = l > 0.f ? __fdiv_rn(l, rep) : __fmul_rn(l, rep);
        x[t] = __fsub_rn(l, subtract[e]);
    }
}
