//! Token-level LoRA fine-tuning on a device, written once against [`TrainOps`] (the decoder's
//! operations plus the backward's): a sample's forward saves pruned activations, the loss runs
//! over chunks of rows (the `[tokens, vocab]` logits never exist whole), and the backward goes
//! layer by layer from those activations, leaving fp32 LoRA gradients on the device for an
//! AdamW step there. `HostOps` runs the same operations through the kernels' CPU twins.

mod adapter;
mod backward;
mod host;
mod loss;
mod step;

pub use adapter::{GradPair, TrainAdapter, TrainPair};
pub use backward::{backward_layers, train_sample};
pub use loss::{finish_forward, loss_rows, LOSS_ROWS};
pub use step::{forward_chunk, SampleCapture, TrainSample, TrainScratch};

use super::lora::{DropoutSite, LoraDims};
use super::{DecoderOps, DecoderShape};
use crate::backend::cuda::CudaError;
use crate::lora::optim::AdamWScalars;

type R = Result<(), CudaError>;

/// What the training step needs of a device besides the forward's operations. fp32 buffers
/// (gradients, LoRA weights, optimizer moments) are the forward's `Logits` type; as there, an
/// operation on `rows` rows uses the first `rows` of each buffer.
pub trait TrainOps: DecoderOps {
    /// Readies the frozen weights for training's products, before the first job's activations
    /// exist (a backend that packs them for the backward does it here, not at its first use).
    fn prepare_weights(&mut self, w: &super::DecoderWeights<Self::Weight>) -> R {
        let _ = w;
        Ok(())
    }
    fn upload_f32(&mut self, x: &[f32]) -> Result<Self::Logits, CudaError>;
    fn zero(&mut self, x: &mut Self::Logits, n: usize) -> R;
    /// `dst[dst_row0 ..][.. rows] = src[src_row0 ..][.. rows]`, rows `width` wide.
    #[allow(clippy::too_many_arguments)]
    fn copy_rows(
        &mut self,
        src: &Self::Act,
        src_row0: usize,
        dst: &mut Self::Act,
        dst_row0: usize,
        rows: usize,
        width: usize,
    ) -> R;
    /// A table over one adapter, in slot 0, whose fp32 weights are `a` (`[rank, in]`) and `b`
    /// (`[out, rank]`): forwards read them as they are when the forward runs.
    fn train_table(
        &mut self,
        a: &Self::Logits,
        b: &Self::Logits,
        rank: usize,
        scale: f32,
    ) -> Result<Self::LoraTable, CudaError>;
    /// `u[t, r] = Σ_k x[t, k] A[r, k]` (`u` is `[rows, max_rank]`) for the rows with a slot.
    fn lora_shrink(
        &mut self,
        step: &Self::Step,
        x: &Self::Act,
        table: &Self::LoraTable,
        u: &mut Self::Logits,
        d: LoraDims,
    ) -> R;
    /// `y[t, col0 + n] += scale · Σ_r u[t, r] B[n, r]` for the rows with a slot.
    fn lora_expand(
        &mut self,
        step: &Self::Step,
        u: &Self::Logits,
        table: &Self::LoraTable,
        y: &mut Self::Act,
        d: LoraDims,
    ) -> R;
    /// The loss head over rows `rows` of `h` (the normalised final hidden states): logits
    /// `h[rows] · headᵀ` into `logits`, then cross-entropy against `targets` (one per row,
    /// negative for none) with gradient scales `scales`, then `dx[rows] = dlogits · head`.
    /// Returns each row's loss and greedy id.
    #[allow(clippy::too_many_arguments)]
    fn loss_rows(
        &mut self,
        h: &Self::Act,
        head: &Self::Weight,
        rows: std::ops::Range<usize>,
        targets: &[i32],
        scales: &[f32],
        logits: &mut Self::Logits,
        dx: &mut Self::Logits,
        s: &DecoderShape,
    ) -> Result<Vec<(f32, u32)>, CudaError>;
    /// `out[..n] = bf16(x[..n])`: a gradient as the products read it, made once for all the
    /// products that read it (a frozen projection's and its LoRA ones).
    fn grad_bf16(&mut self, x: &Self::Logits, out: &mut Self::Act, n: usize) -> R;
    /// `dx[m, k] = dy[m, n] · w[n, k]` (a frozen projection's input gradient; `dy` in bf16,
    /// from [`TrainOps::grad_bf16`]).
    fn matmul_dx(
        &mut self,
        dy: &Self::Act,
        w: &Self::Weight,
        dx: &mut Self::Logits,
        mnk: (usize, usize, usize),
    ) -> R;
    /// `dx += ∂ rms_norm(x) / ∂x · dy` over `rows` rows of `hidden`.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_backward(
        &mut self,
        x: &Self::Act,
        w: &Self::Weight,
        dy: &Self::Logits,
        dx: &mut Self::Logits,
        rows: usize,
        s: &DecoderShape,
    ) -> R;
    /// `d_gate_up` (`[rows, 2 inter]`) from `d_act` through `act = silu(gate) ⊙ up`.
    fn silu_mul_backward(
        &mut self,
        gate_up: &Self::Act,
        d_act: &Self::Logits,
        d_gate_up: &mut Self::Logits,
        rows: usize,
        inter: usize,
    ) -> R;
    /// The K and V a batch's rows wrote, in row order (`[rows, kv_dim]` each).
    fn gather_kv(
        &mut self,
        step: &Self::Step,
        cache: &Self::Cache,
        k: &mut Self::Act,
        v: &mut Self::Act,
        s: &DecoderShape,
    ) -> R;
    /// Causal attention backward over one sample of `len` rows (softmax recomputed): dq, dk
    /// and dv into the q, k and v column blocks of `d_qkv` (`[len, qkv_rows]`).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &mut self,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        o: &Self::Act,
        d_o: &Self::Logits,
        d_qkv: &mut Self::Logits,
        len: usize,
        s: &DecoderShape,
    ) -> R;
    /// RoPE's backward on the q and k blocks of `d_qkv`, in place, at the batch's positions.
    fn rope_backward(&mut self, step: &Self::Step, d_qkv: &mut Self::Logits, s: &DecoderShape)
        -> R;
    /// One adapted projection's backward over `rows` rows: with `g = scale · dY B` (bf16),
    /// `dA += gᵀ x`, `dB += scale · dYᵀ u` and `dx += g A`, where `dY` is the `out` columns
    /// from `col0` of `dy`'s rows `ld` wide (bf16 in, from [`TrainOps::grad_bf16`]; fp32
    /// accumulation).
    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        &mut self,
        x: &Self::Act,
        dy: &Self::Act,
        u: &Self::Logits,
        p: GradPair<'_, Self::Logits>,
        d: LoraDims,
        dx: &mut Self::Logits,
        rows: usize,
    ) -> R;
    /// `dst += drop(src)` over the step's rows (one training sample's), `width` wide: the
    /// backward of [`DecoderOps::lora_dropout`] at `site`.
    fn lora_dropout_add(
        &mut self,
        step: &Self::Step,
        src: &Self::Logits,
        dst: &mut Self::Logits,
        width: usize,
        site: DropoutSite,
    ) -> R;
    /// `Σ x²` over the first `n` values (waits for it).
    fn sum_squares(&mut self, x: &Self::Logits, n: usize) -> Result<f64, CudaError>;
    fn scale(&mut self, x: &mut Self::Logits, n: usize, by: f32) -> R;
    /// One AdamW update of `n` parameters (the `adamw_f32` kernel).
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &mut self,
        p: &mut Self::Logits,
        g: &Self::Logits,
        m: &mut Self::Logits,
        v: &mut Self::Logits,
        n: usize,
        sc: &AdamWScalars,
    ) -> R;
}
