//! The Llama decoder's forward pass on a device, written once against [`DecoderOps`]: the CUDA
//! kernels and cuBLASLt (`cuda::CudaOps`) run it for real, the kernels' CPU twins
//! (`host::HostOps`) run the same sequence of operations as its oracle.
//!
//! bf16 weights and activations, fp32 accumulation, a paged bf16 KV cache. Rows of one forward
//! may mix decodes and prompt chunks of any sequences.

pub mod cuda;
mod device_jobs;
mod forward;
pub mod from_model;
pub mod graphs;
pub mod host;
pub mod lora;
pub mod runner;
mod step_batch;
#[cfg(test)]
pub(crate) mod tiny;
pub mod train;

pub use crate::model::llama::rope_tables;
pub use forward::{
    forward, forward_on_device, forward_rows, forward_rows_capturing, forward_with, Capture,
    RowsOut, SavePoint, Scratch, Want,
};
pub use step_batch::{tiled_attention_head, tiled_chunk, SeqRows, StepBatch, ATTENTION_TILE};

use crate::model::config::LlamaConfig;

use super::sampling::{Penalties, RowSample, RowSampling};
use super::CudaError;

/// What the decoder needs of a model's config, checked against the kernels' limits.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderShape {
    pub vocab: usize,
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub eps: f32,
    pub block_size: usize,
    /// q, k and v projections with biases (Qwen2).
    pub qkv_bias: bool,
}

impl DecoderShape {
    pub fn new(c: &LlamaConfig, block_size: usize) -> Result<Self, CudaError> {
        let s = Self {
            vocab: c.vocab_size,
            hidden: c.hidden_size,
            inter: c.intermediate_size,
            layers: c.num_layers,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            eps: c.rms_norm_eps as f32,
            block_size,
            qkv_bias: c.attention_bias,
        };
        s.check()?;
        Ok(s)
    }

    /// What every forward relies on, on any backend (checked again by every forward, since
    /// the fields are public): whole RoPE pairs, query heads sharing kv heads evenly, no empty
    /// dimension. Each backend adds its kernels' limits ([`DecoderOps::check_shape`]).
    pub fn check(&self) -> Result<(), CudaError> {
        let bad = |why: String| Err(CudaError::Shape(why));
        if !self.head_dim.is_multiple_of(2) || self.head_dim == 0 {
            return bad(format!("head_dim {} is not a positive even number", self.head_dim));
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!("{} heads do not share {} kv heads", self.heads, self.kv_heads));
        }
        if self.hidden == 0 || self.inter == 0 || self.vocab == 0 || self.block_size == 0 {
            return bad("empty model dimension".into());
        }
        Ok(())
    }

    /// The CUDA kernels' limits besides [`Self::check`]: a head is whole warps of lanes, up to
    /// what their shared memory holds.
    pub fn check_kernels(&self) -> Result<(), CudaError> {
        self.check()?;
        if !self.head_dim.is_multiple_of(32) || self.head_dim > 256 {
            return Err(CudaError::Shape(format!(
                "head_dim {} is not a multiple of 32 up to 256",
                self.head_dim
            )));
        }
        Ok(())
    }

    /// Whether layer `layer`'s q/k/v bias is what the shape asks for: one per fused q/k/v row
    /// when it has biases, none otherwise.
    pub fn check_qkv_bias(&self, layer: usize, bias: Option<&[f32]>) -> Result<(), CudaError> {
        let (got, want) =
            (bias.map_or(0, <[f32]>::len), if self.qkv_bias { self.qkv_rows() } else { 0 });
        if got != want || bias.is_some() != self.qkv_bias {
            return Err(CudaError::Shape(format!(
                "layer {layer} has {got} q/k/v biases where the config asks for {want}"
            )));
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Rows of the fused q/k/v weight.
    pub fn qkv_rows(&self) -> usize {
        self.q_dim() + 2 * self.kv_dim()
    }
}

/// One layer. `qkv` is `[q_dim + 2 kv_dim, hidden]` (q rows, then k, then v), `qkv_bias` its
/// bias where the shape has one; `gate_up` is `[2 inter, hidden]` (gate rows, then up), the
/// layout `silu_mul_bf16` reads.
pub struct LayerWeights<W> {
    pub attn_norm: W,
    pub qkv: W,
    pub qkv_bias: Option<W>,
    pub o: W,
    pub mlp_norm: W,
    pub gate_up: W,
    pub down: W,
}

pub struct DecoderWeights<W> {
    pub embed: W,
    pub layers: Vec<LayerWeights<W>>,
    pub norm: W,
    pub lm_head: W,
}

impl<W> DecoderWeights<W> {
    /// Every tensor with its element count and its random-init scale and offset, in a fixed
    /// order (the order seeds are handed out in).
    pub fn layout(s: &DecoderShape) -> Vec<(usize, f32, f32)> {
        let uniform = |k: usize| (3.0 / k as f32).sqrt(); // unit variance out for unit in
        let mut t = vec![(s.vocab * s.hidden, 1.0, 0.0)];
        for _ in 0..s.layers {
            t.push((s.hidden, 0.1, 1.0));
            t.push((s.qkv_rows() * s.hidden, uniform(s.hidden), 0.0));
            if s.qkv_bias {
                t.push((s.qkv_rows(), 0.1, 0.0));
            }
            t.push((s.hidden * s.q_dim(), uniform(s.q_dim()), 0.0));
            t.push((s.hidden, 0.1, 1.0));
            t.push((2 * s.inter * s.hidden, uniform(s.hidden), 0.0));
            t.push((s.hidden * s.inter, uniform(s.inter), 0.0));
        }
        t.push((s.hidden, 0.1, 1.0));
        t.push((s.vocab * s.hidden, uniform(s.hidden), 0.0));
        t
    }

    /// Builds the weights from tensors in [`Self::layout`] order.
    pub fn from_tensors(s: &DecoderShape, tensors: Vec<W>) -> Result<Self, CudaError> {
        let per_layer = 6 + usize::from(s.qkv_bias);
        if tensors.len() != per_layer * s.layers + 3 {
            return Err(CudaError::Shape(format!(
                "{} tensors for {} layers",
                tensors.len(),
                s.layers
            )));
        }
        let mut it = tensors.into_iter();
        let mut next = || it.next().ok_or_else(|| CudaError::Shape("too few tensors".into()));
        let embed = next()?;
        let mut layers = Vec::with_capacity(s.layers);
        for _ in 0..s.layers {
            layers.push(LayerWeights {
                attn_norm: next()?,
                qkv: next()?,
                qkv_bias: if s.qkv_bias { Some(next()?) } else { None },
                o: next()?,
                mlp_norm: next()?,
                gate_up: next()?,
                down: next()?,
            });
        }
        Ok(Self { embed, layers, norm: next()?, lm_head: next()? })
    }

    /// Every tensor, in [`Self::layout`] order.
    pub fn tensors(&self) -> Vec<&W> {
        let mut t = vec![&self.embed];
        for l in &self.layers {
            t.extend([&l.attn_norm, &l.qkv]);
            t.extend(&l.qkv_bias);
            t.extend([&l.o, &l.mlp_norm, &l.gate_up, &l.down]);
        }
        t.extend([&self.norm, &self.lm_head]);
        t
    }
}

type R = Result<(), CudaError>;

/// The operations of a forward. Buffers hold at least as many rows as any forward run on them;
/// an operation on `rows` rows uses the first `rows` of each.
pub trait DecoderOps {
    /// A bf16 weight tensor.
    type Weight;
    /// bf16 activations.
    type Act;
    /// fp32 logits.
    type Logits;
    /// A batch made ready for the operations.
    type Step;
    /// One layer's K and V cache: `[slots, kv_heads, head_dim]` each.
    type Cache;
    /// Greedy ids and log-probabilities of a forward's rows.
    type Ids;
    /// The adapters' weights for one projection of one layer.
    type LoraTable;
    /// A forward recorded for replay (a CUDA graph).
    type Graph;

    /// Whether this backend's operations take a model of shape `s`: [`DecoderShape::check`]
    /// and the CUDA kernels' limits, unless the implementation has none of its own.
    fn check_shape(&self, s: &DecoderShape) -> R {
        s.check_kernels()
    }
    /// Whether a server samples from this backend's logits on the host (its own sampler,
    /// seeded draws and all) rather than asking the backend to pick.
    fn samples_on_host(&self) -> bool {
        false
    }
    /// Marks the start of the next stretch of operations, named for a time breakdown (no-op
    /// unless the implementation is profiling).
    fn mark(&mut self, _name: &'static str) -> R {
        Ok(())
    }
    fn act(&mut self, n: usize) -> Result<Self::Act, CudaError>;
    fn logits(&mut self, n: usize) -> Result<Self::Logits, CudaError>;
    /// One layer's cache of `blocks` blocks, zeroed.
    fn cache(&mut self, s: &DecoderShape, blocks: usize) -> Result<Self::Cache, CudaError>;
    /// The LoRA weights of one projection of one layer for every adapter slot, `None` where
    /// that adapter leaves the projection alone.
    fn lora_table(
        &mut self,
        slots: &[Option<lora::SlotWeights<'_>>],
    ) -> Result<Self::LoraTable, CudaError>;
    /// One table whose slots are those of `parts` in order, each part a table and its slot
    /// count (`None`: that many slots without the projection). It reads the parts' weights
    /// where they are (on a device it points into them), so it must not outlive them.
    fn lora_table_join(
        &mut self,
        parts: &[(Option<&Self::LoraTable>, usize)],
    ) -> Result<Self::LoraTable, CudaError>;
    /// `y[t, col0..col0 + out] += scale · B (A x[t])` for each row with an adapter slot, rows of
    /// `y` `ld` apart.
    fn lora(
        &mut self,
        step: &Self::Step,
        x: &Self::Act,
        table: &Self::LoraTable,
        y: &mut Self::Act,
        dims: lora::LoraDims,
    ) -> R;
    /// `out = x` (rows `width` wide), with rows `rows` (one training sample's) through the
    /// sample's LoRA dropout at `site`, each row's mask drawn for its depth.
    #[allow(clippy::too_many_arguments)]
    fn lora_dropout(
        &mut self,
        step: &Self::Step,
        x: &Self::Act,
        out: &mut Self::Act,
        rows: std::ops::Range<usize>,
        width: usize,
        site: lora::DropoutSite,
    ) -> R;
    fn upload(
        &mut self,
        batch: &StepBatch,
        cos: &[f32],
        sin: &[f32],
    ) -> Result<Self::Step, CudaError>;
    /// `batch` into `step` (made by `upload` from a batch of the same shape), in place where a
    /// recorded forward reads the step's buffers at fixed addresses.
    fn upload_into(
        &mut self,
        step: &mut Self::Step,
        batch: &StepBatch,
        cos: &[f32],
        sin: &[f32],
    ) -> R {
        *step = self.upload(batch, cos, sin)?;
        Ok(())
    }
    /// Records what `f` queues instead of running it, for [`replay`](Self::replay); `None`
    /// where this backend does not record (its caller runs forwards as they come).
    fn record<F: FnOnce(&mut Self) -> R>(&mut self, f: F) -> Result<Option<Self::Graph>, CudaError>
    where
        Self: Sized,
    {
        let _ = f;
        Ok(None)
    }
    /// Queues a recorded forward again, over the buffers it was recorded with.
    fn replay(&mut self, graph: &Self::Graph) -> R {
        let _ = graph;
        Err(CudaError::Shape("this backend does not replay recorded forwards".into()))
    }
    /// Changes whenever this value makes anew a buffer that recorded forwards point into:
    /// they must be recorded again.
    fn epoch(&self) -> u64 {
        0
    }
    /// While on, each product shape met for the first time is timed over its backend's
    /// algorithms and runs on the fastest from then on (for shapes that will run many times,
    /// such as a recorded step's). Not for use while recording.
    fn tune_products(&mut self, on: bool) {
        let _ = on;
    }
    fn embedding(
        &mut self,
        step: &Self::Step,
        table: &Self::Weight,
        out: &mut Self::Act,
        s: &DecoderShape,
    ) -> R;
    #[allow(clippy::too_many_arguments)]
    fn rms_norm(
        &mut self,
        x: &Self::Act,
        w: &Self::Weight,
        out: &mut Self::Act,
        rows: usize,
        s: &DecoderShape,
    ) -> R;
    #[allow(clippy::too_many_arguments)]
    fn add_rms_norm(
        &mut self,
        residual: &mut Self::Act,
        x: &Self::Act,
        w: &Self::Weight,
        out: &mut Self::Act,
        rows: usize,
        s: &DecoderShape,
    ) -> R;
    /// `y[m, n] = x[m, k] · w[row0 .. row0 + n, k]ᵀ`.
    fn matmul(
        &mut self,
        x: &Self::Act,
        w: &Self::Weight,
        row0: usize,
        y: &mut Self::Act,
        mnk: (usize, usize, usize),
    ) -> R;
    fn matmul_logits(
        &mut self,
        x: &Self::Act,
        w: &Self::Weight,
        y: &mut Self::Logits,
        mnk: (usize, usize, usize),
    ) -> R;
    #[allow(clippy::too_many_arguments)]
    /// Rotates q and k of the fused projection `qkv` (`[rows, qkv_rows]`), `bias` added first:
    /// q into `q_out` (`[rows, q_dim]`), k with v into the cache.
    fn rope_kv_write(
        &mut self,
        step: &Self::Step,
        qkv: &Self::Act,
        bias: Option<&Self::Weight>,
        q_out: &mut Self::Act,
        cache: &mut Self::Cache,
        s: &DecoderShape,
    ) -> R;
    fn attention(
        &mut self,
        step: &Self::Step,
        q: &Self::Act,
        cache: &Self::Cache,
        out: &mut Self::Act,
        s: &DecoderShape,
    ) -> R;
    fn silu_mul(
        &mut self,
        gate_up: &Self::Act,
        out: &mut Self::Act,
        rows: usize,
        inter: usize,
    ) -> R;
    /// `out[i] = x[rows[i]]`, rows `width` wide; `x` has `x_rows` rows (indices past it are
    /// refused).
    fn gather_rows(
        &mut self,
        x: &Self::Act,
        x_rows: usize,
        rows: &[u32],
        out: &mut Self::Act,
        width: usize,
    ) -> R;
    /// Where a forward leaves each row's greedy id and its log-probability.
    fn ids(&mut self, rows: usize) -> Result<Self::Ids, CudaError>;
    /// Greedy id and its log-probability per row, into `out`.
    fn argmax(
        &mut self,
        logits: &Self::Logits,
        rows: usize,
        vocab: usize,
        out: &mut Self::Ids,
    ) -> R;
    /// Applies `penalties` to the rows of `logits` (in place, `apply_penalties_f32`), then
    /// samples each row as its entry of `params` asks (one per row) and brings back only the
    /// picks (`sample_rows_f32`).
    fn sample(
        &mut self,
        logits: &mut Self::Logits,
        vocab: usize,
        params: &[RowSampling],
        penalties: &Penalties,
    ) -> Result<Vec<RowSample>, CudaError>;
    /// The first `rows` of `ids` on the host (waits for the forward that writes them).
    fn read_ids(&mut self, ids: &Self::Ids, rows: usize) -> Result<Vec<(u32, f32)>, CudaError>;
    /// Rows of a batch made ready.
    fn rows(&self, step: &Self::Step) -> usize;
    fn logits_to_host(&mut self, logits: &Self::Logits, n: usize) -> Result<Vec<f32>, CudaError>;
    /// Waits for the work queued so far; reports a fault of the device.
    fn sync(&mut self) -> R {
        Ok(())
    }
}

/// The CPU twin of `fill_uniform_bf16`: the same hash, so the same values before rounding.
pub fn fill_uniform_host(n: usize, seed: u64, scale: f32, offset: f32) -> Vec<f32> {
    fn splitmix64(mut x: u64) -> u64 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }
    (0..n as u64)
        .map(|i| {
            let h = splitmix64(seed ^ splitmix64(i));
            let u = (h >> 40) as f32 * (1.0 / 16_777_216.0);
            super::twins::round_bf16(offset + scale * (2.0 * u - 1.0))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_twin_is_uniform_in_range() {
        let v = fill_uniform_host(10_000, 3, 0.5, 1.0);
        assert!(v.iter().all(|&x| (0.5..=1.5).contains(&x)));
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        assert!((mean - 1.0).abs() < 0.02, "{mean}");
        assert_ne!(fill_uniform_host(4, 1, 1.0, 0.0), fill_uniform_host(4, 2, 1.0, 0.0));
    }

    #[test]
    fn qkv_bias_must_match_the_shape() {
        use crate::model::loader::dummy::DummyModel;
        let q = DecoderShape::new(&DummyModel::Qwen2_5_14b.config(), 16).unwrap();
        assert!(q.check_qkv_bias(3, Some(&vec![0.0; q.qkv_rows()])).is_ok());
        assert!(q.check_qkv_bias(3, None).is_err());
        assert!(q.check_qkv_bias(3, Some(&[0.0; 4])).is_err());
        let l = DecoderShape::new(&DummyModel::Llama3_8b.config(), 16).unwrap();
        assert!(l.check_qkv_bias(0, None).is_ok());
        assert!(l.check_qkv_bias(0, Some(&[])).is_err());
    }

    #[test]
    fn layout_matches_the_parameter_count() {
        use crate::model::loader::dummy::DummyModel;
        let s = DecoderShape::new(&DummyModel::Llama3_8b.config(), 16).unwrap();
        let n: usize = DecoderWeights::<()>::layout(&s).iter().map(|t| t.0).sum();
        // Llama-3-8B: 8.03 B parameters.
        assert!((8.02e9..8.04e9).contains(&(n as f64)), "{n}");
        let q = DecoderShape::new(&DummyModel::Qwen2_5_14b.config(), 16).unwrap();
        let n: usize = DecoderWeights::<()>::layout(&q).iter().map(|t| t.0).sum();
        // Qwen2.5-14B: 14.77 B parameters, q/k/v biases included.
        assert!(q.qkv_bias && (14.76e9..14.78e9).contains(&(n as f64)), "{n}");
    }
}
