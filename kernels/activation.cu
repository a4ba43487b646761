// Elementwise pieces of the MLP and the embedding lookup.

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i]: the fused gate/up projection writes
// gate then up in each row. CPU twin: model::llama::silu_mul.
extern "C" __global__ void __launch_bounds__(256) silu_mul_bf16(const bf16* __restrict__ gate_up, bf16* __restrict__ out,
                                         int rows, int inter) {
    const size_t n = (size_t)rows * inter;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / inter, c = i % inter;
        const float g = ld(gate_up[r * 2 * inter + c]);
        const float u = ld(gate_up[r * 2 * inter + inter + c]);
        out[i] = st(g / (1.f + expf(-g)) * u);
    }
}

// out[t] = table[ids[t]]; one block per token. Ids outside the table give a zero row (the host
// validates ids before they get here; this only keeps a bad id from reading out of bounds).
extern "C" __global__ void __launch_bounds__(256) embedding_bf16(const unsigned int* __restrict__ ids,
                                          const bf16* __restrict__ table, bf16* __restrict__ out,
                                          int hidden, unsigned int vocab) {
    const unsigned int id = ids[blockIdx.x];
    bf16* o = out + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        o[i] = id < vocab ? table[(size_t)id * hidden + i] : st(0.f);
}
