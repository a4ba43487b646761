//! The decoder's operations ([`DecoderOps`]) on the CPU, at the CPU model's precision: weights
//! in the format they were loaded in, f32 activations, an f32 or f16 paged KV cache. Each
//! operation is the CPU model's own kernel (packed GEMMs, paged attention with its batch
//! invariance, SGMV-style LoRA), so the forward written once over the seam gives the CPU
//! model's bits.

pub mod lora;
#[cfg(test)]
mod tests;
mod train;
pub mod weights;

pub use lora::CpuLoraTable;
pub use weights::{from_llama, CpuModel, CpuWeight};

use crate::backend::cpu::frozen::TrainDtype;
use crate::backend::cpu::gemm::MatRef;
use crate::backend::cpu::paged_attention::{paged_attention, AttnSeq, AttnShape};
use crate::backend::cuda::decoder::host::sample_on_host;
use crate::backend::cuda::decoder::lora::{DropoutSite, LoraDims, SlotWeights};
use crate::backend::cuda::decoder::{DecoderOps, DecoderShape, StepBatch};
use crate::backend::cuda::sampling::{Penalties, RowSample, RowSampling};
use crate::backend::cuda::twins::argmax_logprob;
use crate::backend::cuda::CudaError;
use crate::kv::{KvCache, KvDtype, KvLayer};
use crate::lora::dropout::apply_dropout;
use crate::model::attention_train::{chunk_attention, ChunkAttention};
use crate::model::llama::{apply_rope, rms_norm, silu_mul};

type R = Result<(), CudaError>;

/// The CPU's decoder operations: caches store K and V as `kv_dtype`; training's products
/// with frozen weights run in `train_dtype`.
pub struct CpuOps {
    pub kv_dtype: KvDtype,
    pub train_dtype: TrainDtype,
    /// The training chunks' rows of the batch last uploaded, when their frozen products run
    /// in bf16 (`--train-dtype bf16`): empty otherwise.
    train_rows: Vec<std::ops::Range<usize>>,
}

impl CpuOps {
    pub fn new(kv_dtype: KvDtype, train_dtype: TrainDtype) -> Self {
        Self { kv_dtype, train_dtype, train_rows: Vec::new() }
    }
}

/// A batch as the CPU operations read it.
pub struct CpuStep {
    batch: StepBatch,
    cos: Vec<f32>,
    sin: Vec<f32>,
    slots: Vec<usize>,
}

impl CpuStep {
    /// Each sequence's rows as paged attention reads them, and whether it is a training chunk.
    fn attn_seqs(&self) -> Vec<(AttnSeq<'_>, bool)> {
        let mut q_start = 0;
        let train = self.batch.train.iter().copied().chain(std::iter::repeat(false));
        self.batch
            .seqs
            .iter()
            .zip(train)
            .map(|(s, train)| {
                let q_len = s.tokens.len();
                let seq = AttnSeq {
                    q_start,
                    q_len,
                    context_len: s.start + q_len,
                    block_table: &s.block_table,
                };
                q_start += q_len;
                (seq, train)
            })
            .collect()
    }
}

/// A training chunk's attention by GEMMs over its sample's keys (`chunk_attention`, the
/// scores and softmax its backward recomputes): keys and values of positions
/// `0..context_len` gathered through the block table.
fn train_chunk_attention(
    seq: &AttnSeq<'_>,
    layer: KvLayer<'_>,
    q: &[f32],
    s: &DecoderShape,
    out: &mut [f32],
) -> R {
    let bs = s.block_size;
    let slots = (0..seq.context_len)
        .map(|p| {
            let block = seq
                .block_table
                .get(p / bs)
                .ok_or_else(|| CudaError::Shape(format!("position {p} is past its block table")))?;
            Ok(*block as usize * bs + p % bs)
        })
        .collect::<Result<Vec<usize>, CudaError>>()?;
    let (mut k, mut v) = (Vec::new(), Vec::new());
    layer.gather(&slots, s.kv_dim(), &mut k, &mut v);
    let rows = seq.q_start * s.q_dim()..(seq.q_start + seq.q_len) * s.q_dim();
    let a = ChunkAttention {
        q: &q[rows.clone()],
        k: &k,
        v: &v,
        first_pos: seq.context_len - seq.q_len,
        rows: seq.q_len,
        num_heads: s.heads,
        num_kv_heads: s.kv_heads,
        head_dim: s.head_dim,
        scale: 1.0 / (s.head_dim as f32).sqrt(),
    };
    chunk_attention(&a, &mut out[rows]);
    Ok(())
}

fn short(what: &str) -> CudaError {
    CudaError::Shape(format!("{what}: a buffer too small for the batch"))
}

impl DecoderOps for CpuOps {
    type Weight = CpuWeight;
    type Act = Vec<f32>;
    type Logits = Vec<f32>;
    type Step = CpuStep;
    type Cache = KvCache;
    type Ids = Vec<(u32, f32)>;
    type LoraTable = CpuLoraTable;
    type Graph = std::convert::Infallible;

    /// Any head size: the CPU kernels loop over it.
    fn check_shape(&self, s: &DecoderShape) -> R {
        s.check()
    }

    /// The engine's host sampler keeps the CPU model's seeded draws.
    fn samples_on_host(&self) -> bool {
        true
    }

    fn act(&mut self, n: usize) -> Result<Vec<f32>, CudaError> {
        Ok(vec![0.0; n])
    }

    fn logits(&mut self, n: usize) -> Result<Vec<f32>, CudaError> {
        Ok(vec![0.0; n])
    }

    fn cache(&mut self, s: &DecoderShape, blocks: usize) -> Result<KvCache, CudaError> {
        Ok(KvCache::with_dtype(1, blocks, s.block_size, s.kv_heads, s.head_dim, self.kv_dtype))
    }

    fn lora_table(&mut self, slots: &[Option<SlotWeights<'_>>]) -> Result<CpuLoraTable, CudaError> {
        Ok(lora::table(slots))
    }

    fn lora_table_join(
        &mut self,
        parts: &[(Option<&CpuLoraTable>, usize)],
    ) -> Result<CpuLoraTable, CudaError> {
        lora::join(parts)
    }

    fn lora(
        &mut self,
        step: &CpuStep,
        x: &Vec<f32>,
        table: &CpuLoraTable,
        y: &mut Vec<f32>,
        d: LoraDims,
    ) -> R {
        lora::apply(&step.batch.row_slots, x, table, y, d)
    }

    fn lora_dropout(
        &mut self,
        step: &CpuStep,
        x: &Vec<f32>,
        out: &mut Vec<f32>,
        rows: std::ops::Range<usize>,
        width: usize,
        site: DropoutSite,
    ) -> R {
        let n = step.batch.rows();
        if x.len().min(out.len()) < n * width || rows.end > n || rows.start > rows.end {
            return Err(CudaError::Shape(format!("dropout of rows {rows:?} of {n}")));
        }
        out[..n * width].copy_from_slice(&x[..n * width]);
        let (d, l, m) = (site.dropout, site.layer, site.module.index());
        for t in rows {
            let row = &mut out[t * width..(t + 1) * width];
            apply_dropout(row, d.p, d.seed, l, m, step.batch.positions[t]);
        }
        Ok(())
    }

    fn upload(
        &mut self,
        batch: &StepBatch,
        cos: &[f32],
        sin: &[f32],
    ) -> Result<CpuStep, CudaError> {
        let slots = batch
            .slots
            .iter()
            .map(|&s| usize::try_from(s).map_err(|_| CudaError::Shape(format!("cache slot {s}"))))
            .collect::<Result<_, _>>()?;
        let step = CpuStep { batch: batch.clone(), cos: cos.to_vec(), sin: sin.to_vec(), slots };
        self.train_rows.clear();
        if self.train_dtype != TrainDtype::F32 {
            let seqs = step.attn_seqs();
            let train = seqs.iter().filter(|s| s.1).map(|(s, _)| s.q_start..s.q_start + s.q_len);
            self.train_rows.extend(train);
        }
        Ok(step)
    }

    fn embedding(
        &mut self,
        step: &CpuStep,
        table: &CpuWeight,
        out: &mut Vec<f32>,
        s: &DecoderShape,
    ) -> R {
        let table = table.matrix()?;
        let tokens = &step.batch.tokens;
        if out.len() < tokens.len() * s.hidden || table.cols != s.hidden {
            return Err(short("embedding"));
        }
        for (row, &t) in out.chunks_exact_mut(s.hidden).zip(tokens) {
            if t as usize >= table.rows {
                return Err(CudaError::Shape(format!("token {t} of a {}-row table", table.rows)));
            }
            table.row_into(t as usize, row);
        }
        Ok(())
    }

    fn rms_norm(
        &mut self,
        x: &Vec<f32>,
        w: &CpuWeight,
        out: &mut Vec<f32>,
        rows: usize,
        s: &DecoderShape,
    ) -> R {
        let (n, w) = (rows * s.hidden, w.vector()?);
        if x.len().min(out.len()) < n || w.len() != s.hidden {
            return Err(short("rms_norm"));
        }
        rms_norm(&x[..n], w, s.eps, &mut out[..n]);
        Ok(())
    }

    fn add_rms_norm(
        &mut self,
        residual: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &CpuWeight,
        out: &mut Vec<f32>,
        rows: usize,
        s: &DecoderShape,
    ) -> R {
        let (n, w) = (rows * s.hidden, w.vector()?);
        if residual.len().min(x.len()).min(out.len()) < n || w.len() != s.hidden {
            return Err(short("add_rms_norm"));
        }
        residual[..n].iter_mut().zip(&x[..n]).for_each(|(r, v)| *r += v);
        rms_norm(&residual[..n], w, s.eps, &mut out[..n]);
        Ok(())
    }

    fn matmul(
        &mut self,
        x: &Vec<f32>,
        w: &CpuWeight,
        row0: usize,
        y: &mut Vec<f32>,
        (m, n, k): (usize, usize, usize),
    ) -> R {
        let weight = w;
        let w = w.matrix()?;
        if row0 != 0 || w.rows != n || w.cols != k {
            return Err(CudaError::Shape(format!(
                "rows {row0}..{} of a {}x{} weight as {n}x{k}",
                row0 + n,
                w.rows,
                w.cols
            )));
        }
        if x.len() < m * k || y.len() < m * n {
            return Err(short("matmul"));
        }
        if self.train_rows.is_empty() {
            w.forward(&x[..m * k], m, &mut y[..m * n]);
            return Ok(());
        }
        // Training rows through the bf16 products; the others through the model's kernels,
        // which give a row the same bits in any batch.
        let mut at = 0;
        for r in self.train_rows.iter().chain(std::iter::once(&(m..m))) {
            let (start, end) = (r.start.min(m), r.end.min(m));
            if start > at {
                w.forward(&x[at * k..start * k], start - at, &mut y[at * n..start * n]);
            }
            if end > start {
                let xr = MatRef::new(&x[start * k..end * k], end - start, k);
                let fw = weight.forward_t(self.train_dtype)?;
                fw.product(xr, false, &mut y[start * n..end * n], n);
            }
            at = at.max(end);
        }
        Ok(())
    }

    /// The output head on the rows a server samples: inference rows, never routed.
    fn matmul_logits(
        &mut self,
        x: &Vec<f32>,
        w: &CpuWeight,
        y: &mut Vec<f32>,
        (m, n, k): (usize, usize, usize),
    ) -> R {
        let w = w.matrix()?;
        if w.rows != n || w.cols != k || x.len() < m * k || y.len() < m * n {
            return Err(short("matmul_logits"));
        }
        w.forward(&x[..m * k], m, &mut y[..m * n]);
        Ok(())
    }

    fn rope_kv_write(
        &mut self,
        step: &CpuStep,
        qkv: &Vec<f32>,
        bias: Option<&CpuWeight>,
        q_out: &mut Vec<f32>,
        cache: &mut KvCache,
        s: &DecoderShape,
    ) -> R {
        let rows = step.batch.rows();
        let (qd, kvd, width, hd) = (s.q_dim(), s.kv_dim(), s.qkv_rows(), s.head_dim);
        let bias = bias.map(CpuWeight::vector).transpose()?;
        if qkv.len() < rows * width
            || q_out.len() < rows * qd
            || bias.is_some_and(|b| b.len() != width)
        {
            return Err(short("rope_kv_write"));
        }
        if step.batch.blocks_needed > cache.num_blocks() || cache.row_len() != kvd {
            return Err(CudaError::Shape(format!(
                "the batch reaches block {} of a {}-block cache",
                step.batch.blocks_needed.saturating_sub(1),
                cache.num_blocks()
            )));
        }
        let (mut k, mut v) = (vec![0f32; rows * kvd], vec![0f32; rows * kvd]);
        let mut row = vec![0f32; width];
        let half = hd / 2;
        for i in 0..rows {
            row.copy_from_slice(&qkv[i * width..(i + 1) * width]);
            if let Some(b) = bias {
                row.iter_mut().zip(b).for_each(|(r, b)| *r += b);
            }
            let (cs, sn) =
                (&step.cos[i * half..(i + 1) * half], &step.sin[i * half..(i + 1) * half]);
            for head in row[..qd + kvd].chunks_exact_mut(hd) {
                apply_rope(head, cs, sn);
            }
            q_out[i * qd..(i + 1) * qd].copy_from_slice(&row[..qd]);
            k[i * kvd..(i + 1) * kvd].copy_from_slice(&row[qd..qd + kvd]);
            v[i * kvd..(i + 1) * kvd].copy_from_slice(&row[qd + kvd..]);
        }
        cache.write(0, &k, &v, &step.slots);
        Ok(())
    }

    fn attention(
        &mut self,
        step: &CpuStep,
        q: &Vec<f32>,
        cache: &KvCache,
        out: &mut Vec<f32>,
        s: &DecoderShape,
    ) -> R {
        let n = step.batch.rows() * s.q_dim();
        if q.len().min(out.len()) < n {
            return Err(short("attention"));
        }
        let shape = AttnShape {
            num_heads: s.heads,
            num_kv_heads: s.kv_heads,
            head_dim: s.head_dim,
            block_size: s.block_size,
            scale: 1.0 / (s.head_dim as f32).sqrt(),
        };
        let all = step.attn_seqs();
        let paged: Vec<AttnSeq<'_>> = all.iter().filter(|s| !s.1).map(|s| s.0).collect();
        let (q, out) = (&q[..n], &mut out[..n]);
        if cache.num_blocks() < step.batch.blocks_needed {
            return Err(CudaError::Shape("the batch reaches past the cache".into()));
        }
        match cache.layer(0) {
            KvLayer::F32(kc, vc) => paged_attention(q, kc, vc, &paged, &shape, out),
            KvLayer::F16(kc, vc) => paged_attention(q, kc, vc, &paged, &shape, out),
        }
        for (seq, _) in all.iter().filter(|s| s.1) {
            train_chunk_attention(seq, cache.layer(0), q, s, out)?;
        }
        Ok(())
    }

    fn silu_mul(&mut self, gate_up: &Vec<f32>, out: &mut Vec<f32>, rows: usize, inter: usize) -> R {
        if gate_up.len() < rows * 2 * inter || out.len() < rows * inter || inter == 0 {
            return Err(short("silu_mul"));
        }
        silu_mul(&gate_up[..rows * 2 * inter], inter, &mut out[..rows * inter]);
        Ok(())
    }

    fn gather_rows(
        &mut self,
        x: &Vec<f32>,
        x_rows: usize,
        rows: &[u32],
        out: &mut Vec<f32>,
        width: usize,
    ) -> R {
        if let Some(r) = rows.iter().find(|&&r| r as usize >= x_rows) {
            return Err(CudaError::Shape(format!("gather of row {r} of {x_rows}")));
        }
        if x.len() < x_rows * width || out.len() < rows.len() * width {
            return Err(short("gather_rows"));
        }
        for (dst, &r) in out.chunks_exact_mut(width).zip(rows) {
            let r = r as usize;
            dst.copy_from_slice(&x[r * width..(r + 1) * width]);
        }
        Ok(())
    }

    fn ids(&mut self, rows: usize) -> Result<Vec<(u32, f32)>, CudaError> {
        Ok(vec![(0, 0.0); rows])
    }

    fn argmax(
        &mut self,
        logits: &Vec<f32>,
        rows: usize,
        vocab: usize,
        out: &mut Vec<(u32, f32)>,
    ) -> R {
        if vocab == 0 || logits.len() < rows * vocab || out.len() < rows {
            return Err(short("argmax"));
        }
        let ids = logits[..rows * vocab].chunks_exact(vocab).map(argmax_logprob);
        out.iter_mut().zip(ids).for_each(|(o, i)| *o = i);
        Ok(())
    }

    fn sample(
        &mut self,
        logits: &mut Vec<f32>,
        vocab: usize,
        params: &[RowSampling],
        penalties: &Penalties,
    ) -> Result<Vec<RowSample>, CudaError> {
        sample_on_host(logits, vocab, params, penalties)
    }

    fn read_ids(
        &mut self,
        ids: &Vec<(u32, f32)>,
        rows: usize,
    ) -> Result<Vec<(u32, f32)>, CudaError> {
        ids.get(..rows).map(<[_]>::to_vec).ok_or_else(|| short("read_ids"))
    }

    fn rows(&self, step: &CpuStep) -> usize {
        step.batch.rows()
    }

    fn logits_to_host(&mut self, logits: &Vec<f32>, n: usize) -> Result<Vec<f32>, CudaError> {
        logits.get(..n).map(<[f32]>::to_vec).ok_or_else(|| short("logits_to_host"))
    }
}
