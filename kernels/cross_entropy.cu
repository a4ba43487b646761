// Cross-entropy forward and backward over one chunk of logit rows (the host runs the lm_head
// GEMM chunk by chunk, so the [tokens, vocab] logits never exist whole). One block per row:
// loss[r] = logsumexp(row) - row[target]; the row is overwritten with
// scale[r] * (softmax(row) - onehot(target)). A negative target marks a row without loss: its
// loss is 0 and its gradient zero. CPU twin: model::loss's row_loss.

extern "C" __global__ void __launch_bounds__(512) cross_entropy_f32(float* __restrict__ logits,
                                             const int* __restrict__ targets,
                                             const float* __restrict__ scale,
                                             float* __restrict__ loss, int vocab) {
    __shared__ float scratch[32];
    float* x = logits + (size_t)blockIdx.x * vocab;
    const int target = targets[blockIdx.x];
    if (target < 0 || target >= vocab) {
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) x[i] = 0.f;
        if (threadIdx.x == 0) loss[blockIdx.x] = 0.f;
        return;
    }
    float mx = NEG_INF;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, x[i]);
    mx = block_max(mx, scratch);
    float sum = 0.f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) sum += expf(x[i] - mx);
    sum = block_sum(sum, scratch);
    const float target_logit = x[target];
    __syncthreads();  // every thread has read x[target] before it is overwritten
    const float k = scale[blockIdx.x] / sum;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        x[i] = expf(x[i] - mx) * k - (i == target ? scale[blockIdx.x] : 0.f);
    if (threadIdx.x == 0) loss[blockIdx.x] = mx + logf(sum) - target_logit;
}
