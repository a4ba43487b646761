// Greedy sampling on the device: per row of logits, the argmax (lowest id on ties) and its
// log-probability, so only an id and a float come back to the host. One block per row.
// Launch with exactly 1024 threads (the shared arrays and the tree reduction assume it).
// CPU twin: the sampler's argmax and logprobs_of.

extern "C" __global__ void argmax_logprob_f32(const float* __restrict__ logits, int vocab,
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
