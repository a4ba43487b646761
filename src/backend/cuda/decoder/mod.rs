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
pub mod host;
pub mod lora;
pub mod runner;
#[cfg(test)]
pub(crate) mod tiny;
pub mod train;

pub use crate::model::llama::rope_tables;
pub use forward::{
    forward, forward_on_device, forward_rows, forward_rows_capturing, forward_with, Capture,
    RowsOut, SavePoint, Scratch, Want,
};

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

    /// The limits the kernels rely on (checked again by every forward, since the fields are
    /// public).
    pub fn check(&self) -> Result<(), CudaError> {
        let bad = |why: String| Err(CudaError::Shape(why));
        if !self.head_dim.is_multiple_of(32) || self.head_dim > 256 || self.head_dim == 0 {
            return bad(format!("head_dim {} is not a multiple of 32 up to 256", self.head_dim));
        }
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!("{} heads do not share {} kv heads", self.heads, self.kv_heads));
        }
        if self.hidden == 0 || self.inter == 0 || self.vocab == 0 || self.block_size == 0 {
            return bad("empty model dimension".into());
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

/// The rows of one sequence in a forward: `tokens` at positions `start..start + tokens.len()`,
/// its cache reached through `block_table`, through the LoRA adapter in slot `adapter` of the
/// forward's [`lora::LoraSet`] if any.
#[derive(Debug, Clone)]
pub struct SeqRows {
    pub tokens: Vec<u32>,
    pub start: usize,
    pub block_table: Vec<u32>,
    pub adapter: Option<u32>,
}

/// Query rows (and keys) per tile of the tensor-core attention kernels (`attention_tiled.cu`).
pub const ATTENTION_TILE: usize = 32;

/// Whether the tensor-core attention kernels are written for this head size. A training
/// sample's attention backward runs on them when it is; they round what feeds their products
/// (P, dO, dS) to bf16, as the device does for every other product.
pub fn tiled_attention_head(head_dim: usize) -> bool {
    matches!(head_dim, 64 | 128)
}

/// Whether a sequence's rows in a forward attend on `attention_chunk_tiled`: a prefill or
/// training chunk of at least a tile of rows, at a head size the kernel has. Its other rows
/// (decodes, shorter chunks) run the paged kernel in the same forward.
pub fn tiled_chunk(rows: usize, head_dim: usize) -> bool {
    rows >= ATTENTION_TILE && tiled_attention_head(head_dim)
}

/// One forward's rows, flattened as the kernels read them.
#[derive(Debug, Clone)]
pub struct StepBatch {
    pub seqs: Vec<SeqRows>,
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    /// Cache slot of each row's K and V.
    pub slots: Vec<i64>,
    pub row_seq: Vec<i32>,
    pub row_pos: Vec<i32>,
    /// Each row's adapter slot, -1 for the base model.
    pub row_slots: Vec<i32>,
    /// `[seqs, max_blocks]`, zero-padded.
    pub block_tables: Vec<i32>,
    pub max_blocks: usize,
    /// The longest context a row attends to (its position + 1).
    pub max_context: usize,
    /// Blocks the tables reach (the highest block id + 1): a cache must hold at least these.
    pub blocks_needed: usize,
    /// Adapter slots the rows name (the highest slot + 1): a LoRA table must hold these.
    pub slots_needed: usize,
    /// The row tiles of the sequences [`tiled_chunk`] picks where the head size has the
    /// kernel: (sequence, first row, its position, rows) for each, as `attention_chunk_tiled`
    /// reads them.
    pub tiles: Vec<i32>,
    /// The rows the paged kernel takes alongside those tiles, and the longest context of them.
    pub paged_rows: Vec<i32>,
    pub paged_context: usize,
}

impl StepBatch {
    pub fn new(seqs: Vec<SeqRows>, block_size: usize) -> Result<Self, CudaError> {
        let max_blocks = seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0).max(1);
        let mut b = Self {
            tokens: Vec::new(),
            positions: Vec::new(),
            slots: Vec::new(),
            row_seq: Vec::new(),
            row_pos: Vec::new(),
            row_slots: Vec::new(),
            block_tables: vec![0; seqs.len() * max_blocks],
            max_blocks,
            max_context: 0,
            blocks_needed: 0,
            slots_needed: 0,
            tiles: Vec::new(),
            paged_rows: Vec::new(),
            paged_context: 0,
            seqs: Vec::new(),
        };
        let too_big = |what: &str| CudaError::Shape(format!("{what} does not fit an i32"));
        for (si, s) in seqs.iter().enumerate() {
            for (j, &blk) in s.block_table.iter().enumerate() {
                b.blocks_needed = b.blocks_needed.max(blk as usize + 1);
                b.block_tables[si * max_blocks + j] =
                    i32::try_from(blk).map_err(|_| too_big("a block id"))?;
            }
            // The sequences `tiled_chunk` picks at a head size with the kernel. Whatever does
            // not fit an i32 here fails the checks of the rows below.
            let (first, n) = (b.tokens.len(), s.tokens.len());
            if n >= ATTENTION_TILE {
                for r0 in (0..n).step_by(ATTENTION_TILE) {
                    let rows = ATTENTION_TILE.min(n - r0);
                    b.tiles.extend([si, first + r0, s.start + r0, rows].map(|x| x as i32));
                }
            } else {
                b.paged_rows.extend((first..first + n).map(|r| r as i32));
                b.paged_context = b.paged_context.max(s.start + n);
            }
            for (r, &t) in s.tokens.iter().enumerate() {
                let pos = s.start + r;
                let blk = s.block_table.get(pos / block_size).ok_or_else(|| {
                    CudaError::Shape(format!("position {pos} is past its block table"))
                })?;
                b.tokens.push(t);
                b.positions.push(pos);
                b.slots.push(i64::from(*blk) * block_size as i64 + (pos % block_size) as i64);
                b.row_seq.push(i32::try_from(si).map_err(|_| too_big("a sequence index"))?);
                b.row_pos.push(i32::try_from(pos).map_err(|_| too_big("a position"))?);
                let slot = s.adapter.map_or(Ok(-1), i32::try_from);
                b.row_slots.push(slot.map_err(|_| too_big("an adapter slot"))?);
                b.slots_needed = b.slots_needed.max(s.adapter.map_or(0, |a| a as usize + 1));
                b.max_context = b.max_context.max(pos + 1);
            }
        }
        // grid.y of the attention launch.
        if b.tokens.is_empty() {
            return Err(CudaError::Shape("a forward of no rows".into()));
        }
        if b.tokens.len() > 65_535 {
            return Err(CudaError::Shape(format!(
                "{} rows in one forward (at most 65535)",
                b.tokens.len()
            )));
        }
        b.seqs = seqs;
        Ok(b)
    }

    pub fn rows(&self) -> usize {
        self.tokens.len()
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
    fn step_batch_flattens_rows_and_slots() {
        let seqs = vec![
            SeqRows { adapter: None, tokens: vec![5, 6, 7], start: 15, block_table: vec![4, 9] },
            SeqRows { adapter: None, tokens: vec![1], start: 0, block_table: vec![2] },
        ];
        let b = StepBatch::new(seqs, 16).unwrap();
        assert_eq!(b.positions, [15, 16, 17, 0]);
        assert_eq!(b.slots, [4 * 16 + 15, 9 * 16, 9 * 16 + 1, 2 * 16]);
        assert_eq!(b.row_seq, [0, 0, 0, 1]);
        assert_eq!(b.block_tables, [4, 9, 2, 0]);
        assert_eq!(b.max_context, 18);
        assert_eq!(b.blocks_needed, 10);
        assert!(StepBatch::new(Vec::new(), 16).is_err());
        let past =
            vec![SeqRows { adapter: None, tokens: vec![1], start: 16, block_table: vec![0] }];
        assert!(StepBatch::new(past, 16).is_err());
    }

    #[test]
    fn step_batch_tiles_long_chunks_and_lists_the_other_rows() {
        let seq = |n: usize, start: usize| SeqRows {
            adapter: None,
            tokens: vec![0; n],
            start,
            block_table: (0..(start + n).div_ceil(16) as u32).collect(),
        };
        // A decode, a 45-row chunk from 20, a 5-row prompt, a one-tile prompt.
        let b = StepBatch::new(vec![seq(1, 69), seq(45, 20), seq(5, 0), seq(32, 0)], 16).unwrap();
        assert_eq!(b.tiles, [1, 1, 20, 32, 1, 33, 52, 13, 3, 51, 0, 32]);
        assert_eq!(b.paged_rows, [0, 46, 47, 48, 49, 50]);
        assert_eq!(b.paged_context, 70);
        // Decodes only: no tiles, every row paged.
        let b = StepBatch::new(vec![seq(1, 3), seq(1, 40)], 16).unwrap();
        assert!(b.tiles.is_empty());
        assert_eq!((b.paged_rows.as_slice(), b.paged_context), (&[0, 1][..], 41));
        // One chunk of a tile exactly: only tiles.
        let b = StepBatch::new(vec![seq(32, 7)], 16).unwrap();
        assert_eq!((b.tiles.as_slice(), b.paged_rows.len()), (&[0, 0, 7, 32][..], 0));
    }

    #[test]
    fn fill_twin_is_uniform_in_range() {
        let v = fill_uniform_host(10_000, 3, 0.5, 1.0);
        assert!(v.iter().all(|&x| (0.5..=1.5).contains(&x)));
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        assert!((mean - 1.0).abs() < 0.02, "{mean}");
        assert_ne!(fill_uniform_host(4, 1, 1.0, 0.0), fill_uniform_host(4, 2, 1.0, 0.0));
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
