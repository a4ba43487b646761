//! [`DecoderOps`] on the host through the kernels' CPU twins: the oracle of the CUDA decoder.
//! Slow (plain loops) and meant for small models.

use super::lora::{DropoutSite, LoraDims, SlotWeights};
use super::{tiled_chunk, DecoderOps, DecoderShape, StepBatch};
use crate::backend::cpu::paged_attention::{AttnSeq, AttnShape};
use crate::backend::cuda::sampling::{
    apply_penalties, sample_row_from, Penalties, RowSample, RowSampling,
};
use crate::backend::cuda::twins::{self, round_bf16};
use crate::backend::cuda::CudaError;

pub struct HostOps;

pub struct HostStep {
    pub(in crate::backend::cuda::decoder) batch: StepBatch,
    pub(in crate::backend::cuda::decoder) cos: Vec<f32>,
    pub(in crate::backend::cuda::decoder) sin: Vec<f32>,
}

/// One layer's K and V, `[slots, kv_heads, head_dim]` each.
pub struct HostCache {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

type R = Result<(), CudaError>;

fn put(out: &mut [f32], v: &[f32]) {
    out[..v.len()].copy_from_slice(v);
}

/// A slot without the projection: rank 0, so the kernels add nothing for it.
fn no_adapter() -> twins::TwinAdapter {
    twins::TwinAdapter { a: Vec::new(), b: Vec::new(), rank: 0, scale: 0.0 }
}

impl DecoderOps for HostOps {
    type Weight = Vec<f32>;
    type Act = Vec<f32>;
    type Logits = Vec<f32>;
    type Step = HostStep;
    type Cache = HostCache;
    type Ids = Vec<(u32, f32)>;
    type LoraTable = Vec<twins::TwinAdapter>;
    type Graph = std::convert::Infallible;

    fn act(&mut self, n: usize) -> Result<Vec<f32>, CudaError> {
        Ok(vec![0.0; n])
    }

    fn logits(&mut self, n: usize) -> Result<Vec<f32>, CudaError> {
        Ok(vec![0.0; n])
    }

    fn lora_table(
        &mut self,
        slots: &[Option<SlotWeights<'_>>],
    ) -> Result<Vec<twins::TwinAdapter>, CudaError> {
        Ok(slots
            .iter()
            .map(|w| match w {
                Some(w) => twins::TwinAdapter {
                    a: w.a.to_vec(),
                    b: w.b.to_vec(),
                    rank: w.rank,
                    scale: w.scale,
                },
                None => no_adapter(),
            })
            .collect())
    }

    fn lora_table_join(
        &mut self,
        parts: &[(Option<&Vec<twins::TwinAdapter>>, usize)],
    ) -> Result<Vec<twins::TwinAdapter>, CudaError> {
        let mut out = Vec::new();
        for &(table, slots) in parts {
            match table {
                Some(t) if t.len() == slots => out.extend(t.iter().cloned()),
                Some(t) => {
                    return Err(CudaError::Shape(format!(
                        "a table of {} slots as {slots}",
                        t.len()
                    )))
                }
                None => out.extend((0..slots).map(|_| no_adapter())),
            }
        }
        Ok(out)
    }

    fn lora(
        &mut self,
        step: &HostStep,
        x: &Vec<f32>,
        table: &Vec<twins::TwinAdapter>,
        y: &mut Vec<f32>,
        d: LoraDims,
    ) -> R {
        let rows = step.batch.rows();
        let slots = &step.batch.row_slots;
        if slots.iter().any(|&s| s >= 0 && s as usize >= table.len()) {
            return Err(CudaError::Shape("a row names an adapter slot past the table".into()));
        }
        let x = &x[..rows * d.in_dim];
        twins::lora(x, y, slots, table, d.in_dim, d.out_dim, (d.ld, d.col0));
        Ok(())
    }

    fn lora_dropout(
        &mut self,
        step: &HostStep,
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
        let (x, out) = (&x[..n * width], &mut out[..n * width]);
        let (d, l, m) = (site.dropout, site.layer, site.module.index());
        twins::lora_dropout(x, out, &step.batch.positions, rows, width, d, l, m);
        Ok(())
    }

    fn cache(&mut self, s: &DecoderShape, blocks: usize) -> Result<HostCache, CudaError> {
        let n = blocks * s.block_size * s.kv_dim();
        Ok(HostCache { k: vec![0.0; n], v: vec![0.0; n] })
    }

    fn upload(
        &mut self,
        batch: &StepBatch,
        cos: &[f32],
        sin: &[f32],
    ) -> Result<HostStep, CudaError> {
        Ok(HostStep { batch: batch.clone(), cos: cos.to_vec(), sin: sin.to_vec() })
    }

    fn embedding(
        &mut self,
        step: &HostStep,
        table: &Vec<f32>,
        out: &mut Vec<f32>,
        s: &DecoderShape,
    ) -> R {
        put(out, &twins::embedding(&step.batch.tokens, table, s.hidden));
        Ok(())
    }

    fn rms_norm(
        &mut self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        out: &mut Vec<f32>,
        rows: usize,
        s: &DecoderShape,
    ) -> R {
        put(out, &twins::rms_norm(&x[..rows * s.hidden], w, s.eps));
        Ok(())
    }

    fn add_rms_norm(
        &mut self,
        residual: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        out: &mut Vec<f32>,
        rows: usize,
        s: &DecoderShape,
    ) -> R {
        let n = rows * s.hidden;
        put(out, &twins::add_rms_norm(&mut residual[..n], &x[..n], w, s.eps));
        Ok(())
    }

    fn matmul(
        &mut self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        row0: usize,
        y: &mut Vec<f32>,
        (m, n, k): (usize, usize, usize),
    ) -> R {
        matmul(x, &w[row0 * k..(row0 + n) * k], y, (m, n, k));
        y[..m * n].iter_mut().for_each(|v| *v = round_bf16(*v));
        Ok(())
    }

    fn matmul_logits(
        &mut self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        y: &mut Vec<f32>,
        mnk: (usize, usize, usize),
    ) -> R {
        matmul(x, w, y, mnk);
        Ok(())
    }

    fn rope_kv_write(
        &mut self,
        step: &HostStep,
        qkv: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        q_out: &mut Vec<f32>,
        cache: &mut HostCache,
        s: &DecoderShape,
    ) -> R {
        let rows = step.batch.rows();
        let (mut q, mut k, v) = twins::split_qkv(qkv, rows, s.q_dim(), s.kv_dim());
        let shape =
            twins::RopeShape { num_heads: s.heads, num_kv_heads: s.kv_heads, head_dim: s.head_dim };
        twins::rope_kv_write(
            &mut q,
            &mut k,
            &v,
            &step.cos,
            &step.sin,
            &step.batch.slots,
            &mut cache.k,
            &mut cache.v,
            shape,
            bias.map(Vec::as_slice),
        );
        put(q_out, &q);
        Ok(())
    }

    fn attention(
        &mut self,
        step: &HostStep,
        q: &Vec<f32>,
        cache: &HostCache,
        out: &mut Vec<f32>,
        s: &DecoderShape,
    ) -> R {
        let shape = AttnShape {
            num_heads: s.heads,
            num_kv_heads: s.kv_heads,
            head_dim: s.head_dim,
            block_size: s.block_size,
            scale: 1.0 / (s.head_dim as f32).sqrt(),
        };
        let (rows, qd) = (step.batch.rows(), s.q_dim());
        let q = &q[..rows * qd];
        // As the device: chunks of a tile or more on the tensor-core kernel, the other rows on
        // the paged one.
        let (mut q_start, mut paged, mut tiled) = (0, Vec::new(), Vec::new());
        for sr in &step.batch.seqs {
            let n = sr.tokens.len();
            if tiled_chunk(n, s.head_dim) {
                tiled.push((q_start, sr));
            } else {
                paged.push(AttnSeq {
                    q_start,
                    q_len: n,
                    context_len: sr.start + n,
                    block_table: &sr.block_table,
                });
            }
            q_start += n;
        }
        let mut o = twins::attention(q, &cache.k, &cache.v, &paged, &shape);
        for (first, sr) in tiled {
            let at = first * qd..(first + sr.tokens.len()) * qd;
            let (k, v) = (&cache.k, &cache.v);
            let c = twins::attention_chunk_bf16(
                &q[at.clone()],
                k,
                v,
                &sr.block_table,
                sr.start,
                &shape,
            );
            o[at].copy_from_slice(&c);
        }
        put(out, &o);
        Ok(())
    }

    fn silu_mul(&mut self, gate_up: &Vec<f32>, out: &mut Vec<f32>, rows: usize, inter: usize) -> R {
        put(out, &twins::silu_mul(&gate_up[..rows * 2 * inter], inter));
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
        put(out, &twins::embedding(rows, &x[..x_rows * width], width));
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
        let ids = logits[..rows * vocab].chunks_exact(vocab).map(twins::argmax_logprob);
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
        Ok(ids[..rows].to_vec())
    }

    fn rows(&self, step: &HostStep) -> usize {
        step.batch.rows()
    }

    fn logits_to_host(&mut self, logits: &Vec<f32>, n: usize) -> Result<Vec<f32>, CudaError> {
        logits
            .get(..n)
            .map(<[f32]>::to_vec)
            .ok_or_else(|| CudaError::Shape(format!("{n} logits of a buffer of {}", logits.len())))
    }
}

/// [`DecoderOps::sample`] of logits on the host: the sampling kernels' twins.
pub fn sample_on_host(
    logits: &mut [f32],
    vocab: usize,
    params: &[RowSampling],
    penalties: &Penalties,
) -> Result<Vec<RowSample>, CudaError> {
    if vocab == 0 || logits.len() < params.len() * vocab {
        return Err(CudaError::Shape(format!(
            "{} rows to sample of {}",
            params.len(),
            logits.len()
        )));
    }
    let rows = logits.chunks_exact_mut(vocab).zip(params).enumerate();
    Ok(rows
        .map(|(r, (row, p))| {
            let raw = row.to_vec();
            apply_penalties(row, penalties.row(r));
            sample_row_from(row, &raw, p)
        })
        .collect())
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ` with fp32 sums (eight running sums per dot product, so the
/// loop vectorises; rows of `w` in parallel).
pub fn matmul(x: &[f32], w: &[f32], y: &mut [f32], (m, n, k): (usize, usize, usize)) {
    use rayon::prelude::*;
    for (xr, yr) in x[..m * k].chunks_exact(k).zip(y.chunks_exact_mut(n)) {
        yr.par_iter_mut().zip(w.par_chunks_exact(k)).for_each(|(yv, wr)| *yv = dot(xr, wr));
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (xa, xb) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += xa[i] * xb[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::decoder::lora::LoraSet;
    use crate::backend::cuda::decoder::{
        fill_uniform_host, forward, forward_rows, DecoderWeights, RowsOut, Scratch, SeqRows, Want,
    };
    use crate::kv::KvCache;
    use crate::lora::{LoraConfig, LoraWeights, TargetModule};
    use crate::model::config::LlamaConfig;
    use crate::model::llama::{ForwardBatch, Llama, LlamaLayer};
    use crate::model::lora_apply::LoraSlice;
    use crate::model::weights::WeightMatrix;

    /// The decoder through the twins equals the CPU model path on the same weights, up to the
    /// bf16 roundings of its activations: this is what makes it the GPU decoder's oracle.
    #[test]
    fn host_decoder_matches_the_cpu_model() {
        host_decoder_matches_the_cpu_model_with(false, false);
    }

    #[test]
    fn host_decoder_with_qkv_biases_matches_the_cpu_model() {
        host_decoder_matches_the_cpu_model_with(true, false);
    }

    /// Two adapters of different ranks and projections, one per sequence.
    #[test]
    fn host_decoder_with_adapters_matches_the_cpu_model() {
        host_decoder_matches_the_cpu_model_with(false, true);
    }

    fn adapter(config: &LlamaConfig, r: usize, targets: &[TargetModule], seed: u64) -> LoraWeights {
        let lc =
            LoraConfig { r, alpha: 2.0 * r as f32, dropout: 0.0, target_modules: targets.to_vec() };
        let mut w = LoraWeights::zeros(&lc, config);
        for (i, p) in w.pairs_mut().enumerate() {
            let sa = 1.0 / (p.in_dim as f32).sqrt();
            p.a = fill_uniform_host(p.a.len(), seed + 2 * i as u64, sa, 0.0);
            p.b = fill_uniform_host(p.b.len(), seed + 2 * i as u64 + 1, 0.05, 0.0);
        }
        w
    }

    fn host_decoder_matches_the_cpu_model_with(attention_bias: bool, adapters: bool) {
        let config = LlamaConfig {
            architecture: "llama".into(),
            vocab_size: 300,
            hidden_size: 128,
            intermediate_size: 256,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 32,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 256,
            tie_word_embeddings: false,
            attention_bias,
        };
        let s = DecoderShape::new(&config, 16).unwrap();
        let tensors: Vec<Vec<f32>> = DecoderWeights::<()>::layout(&s)
            .into_iter()
            .enumerate()
            .map(|(i, (n, scale, offset))| fill_uniform_host(n, i as u64, scale, offset))
            .collect();
        let w = DecoderWeights::from_tensors(&s, tensors).unwrap();
        let m = |t: &Vec<f32>, rows: usize| {
            WeightMatrix::from_f32(t.clone(), rows, t.len() / rows).unwrap()
        };
        let layers = w
            .layers
            .iter()
            .map(|l| LlamaLayer {
                attn_norm: l.attn_norm.clone(),
                wqkv: m(&l.qkv, s.qkv_rows()),
                qkv_bias: l.qkv_bias.clone(),
                wo: m(&l.o, s.hidden),
                ffn_norm: l.mlp_norm.clone(),
                w_gate_up: m(&l.gate_up, 2 * s.inter),
                w_down: m(&l.down, s.hidden),
            })
            .collect();
        let inv_freq = config.rope_inv_freq();
        let llama = Llama::new(
            config,
            m(&w.embed, s.vocab),
            layers,
            w.norm.clone(),
            Some(m(&w.lm_head, s.vocab)),
            None,
        );

        let lora = adapters.then(|| {
            use TargetModule::*;
            let c = &llama.config;
            [adapter(c, 4, &TargetModule::ALL, 100), adapter(c, 8, &[QProj, VProj, DownProj], 200)]
        });
        // Two sequences: a 37-token prompt and a 5-token prompt, over blocks 3,0,5 and 1; with
        // adapters, the first through slot 1 and the second through slot 0.
        let slot = |i: u32| lora.as_ref().map(|_| i);
        let seqs = vec![
            SeqRows {
                adapter: slot(1),
                tokens: (0..37).map(|i| (i * 7 % 300) as u32).collect(),
                start: 0,
                block_table: vec![3, 0, 5],
            },
            SeqRows {
                adapter: slot(0),
                tokens: vec![9, 8, 7, 6, 5],
                start: 0,
                block_table: vec![1],
            },
        ];
        let batch = StepBatch::new(seqs, 16).unwrap();
        let slots = 6 * 16 * s.kv_dim();
        let mut caches: Vec<HostCache> =
            (0..2).map(|_| HostCache { k: vec![0.0; slots], v: vec![0.0; slots] }).collect();
        let mut ops = HostOps;
        let mut sc = Scratch::new(&mut ops, &s, batch.rows()).unwrap();
        let (ids, got) = match &lora {
            None => {
                let ids = forward(&mut ops, &s, &w, &inv_freq, &mut caches, &batch, &mut sc);
                (ids.unwrap(), ops.logits_to_host(&sc.logits, batch.rows() * s.vocab).unwrap())
            }
            Some(ads) => {
                let set = LoraSet::new(&mut ops, &s, &[&ads[0], &ads[1]]).unwrap();
                let rows: Vec<u32> = (0..batch.rows() as u32).collect();
                let (c, f) = (&mut caches, &inv_freq);
                let out = forward_rows(
                    &mut ops,
                    &s,
                    &w,
                    f,
                    c,
                    &batch,
                    &mut sc,
                    &rows,
                    Want::Logits,
                    Some(&set),
                );
                let Ok(RowsOut::Logits(l)) = out else { panic!("logits") };
                let ids = l.chunks_exact(s.vocab).map(twins::argmax_logprob).collect();
                (ids, l)
            }
        };

        let mut kv = KvCache::new(2, 6, 16, s.kv_heads, s.head_dim);
        let tables: Vec<Vec<u32>> = batch.seqs.iter().map(|q| q.block_table.clone()).collect();
        let attn = [
            AttnSeq { q_start: 0, q_len: 37, context_len: 37, block_table: &tables[0] },
            AttnSeq { q_start: 37, q_len: 5, context_len: 5, block_table: &tables[1] },
        ];
        let slot_mapping: Vec<usize> = batch.slots.iter().map(|&v| v as usize).collect();
        let rows: Vec<usize> = (0..batch.rows()).collect();
        let fb = ForwardBatch {
            tokens: &batch.tokens,
            positions: &batch.positions,
            slot_mapping: &slot_mapping,
            seqs: &attn,
            logits_rows: &rows,
        };
        let want = match &lora {
            None => llama.forward(&fb, &mut kv),
            Some(ads) => {
                let slices = [
                    LoraSlice { rows: 0..37, adapter: &ads[1], train: None },
                    LoraSlice { rows: 37..42, adapter: &ads[0], train: None },
                ];
                llama.forward_with(&fb, &mut kv, &slices, &mut [], None)
            }
        };
        if lora.is_some() {
            // The adapters matter: without them the logits move by more than the tolerance.
            let mut kv0 = KvCache::new(2, 6, 16, s.kv_heads, s.head_dim);
            let base = llama.forward(&fb, &mut kv0);
            let moved = base.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert!(moved > scale / 16.0, "adapters moved the logits by only {moved}");
        }
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
        // bf16 activations against f32 ones: a few bf16 steps of the logits' scale.
        assert!(worst <= scale / 64.0, "max |host - cpu| {worst}, logits scale {scale}");
        assert!(scale > 0.5, "degenerate logits {scale}");
        let greedy: Vec<u32> =
            want.chunks_exact(s.vocab).map(crate::engine::sampler::argmax).collect();
        let same = ids.iter().zip(&greedy).filter(|(a, b)| a.0 == **b).count();
        assert!(same * 10 >= greedy.len() * 9, "{same} of {} greedy ids agree", greedy.len());
    }
}
