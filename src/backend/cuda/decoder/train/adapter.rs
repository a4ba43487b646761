//! The adapter being trained, resident on the device: fp32 master weights, their gradients
//! and AdamW's moments, per layer and projection in PEFT layout.

use super::TrainOps;
use crate::backend::cuda::decoder::lora::{LoraDims, LoraSet};
use crate::backend::cuda::decoder::DecoderShape;
use crate::backend::cuda::CudaError;
use crate::lora::optim::{AdamW, AdamWConfig, AdamWScalars};
use crate::lora::{LoraConfig, LoraPair, LoraWeights, TargetModule};

/// One projection's trainable pair: `A [rank, in]`, `B [out, rank]`, their gradients and
/// moments.
pub struct TrainPair<L> {
    pub a: L,
    pub b: L,
    pub da: L,
    pub db: L,
    m: [L; 2],
    v: [L; 2],
    pub rank: usize,
    pub in_dim: usize,
    pub out_dim: usize,
}

/// What one projection's backward reads and accumulates into.
pub struct GradPair<'a, L> {
    pub a: &'a L,
    pub b: &'a L,
    pub da: &'a mut L,
    pub db: &'a mut L,
    pub rank: usize,
    pub scale: f32,
}

pub struct TrainAdapter<L> {
    pub config: LoraConfig,
    pub layers: Vec<[Option<TrainPair<L>>; 7]>,
    pub rank: usize,
    pub scale: f32,
    pub adamw: AdamWConfig,
    /// Optimizer steps taken (torch's `state["step"]`).
    pub step: u64,
}

impl<L> TrainAdapter<L> {
    /// Uploads `w` with zero gradients and moments.
    pub fn new<O: TrainOps<Logits = L>>(
        ops: &mut O,
        s: &DecoderShape,
        w: &LoraWeights,
        adamw: AdamWConfig,
    ) -> Result<Self, CudaError> {
        if w.layers.len() != s.layers {
            return Err(CudaError::Shape(format!(
                "an adapter of {} layers for a model of {}",
                w.layers.len(),
                s.layers
            )));
        }
        let rank = w.config.r;
        let mut layers = Vec::with_capacity(s.layers);
        for (l, pairs) in w.layers.iter().enumerate() {
            let mut out: [Option<TrainPair<L>>; 7] = Default::default();
            for m in TargetModule::ALL {
                let Some(p) = &pairs[m.index()] else { continue };
                let d = LoraDims::of(s, m, rank);
                if p.rank() != rank || p.in_dim != d.in_dim || p.out_dim != d.out_dim {
                    return Err(CudaError::Shape(format!(
                        "layer {l} {m:?}: rank {} {}x{} for rank {rank} {}x{}",
                        p.rank(),
                        p.out_dim,
                        p.in_dim,
                        d.out_dim,
                        d.in_dim
                    )));
                }
                let zeros = |ops: &mut O, n: usize| ops.logits(n);
                let (na, nb) = (p.a.len(), p.b.len());
                out[m.index()] = Some(TrainPair {
                    a: ops.upload_f32(&p.a)?,
                    b: ops.upload_f32(&p.b)?,
                    da: zeros(ops, na)?,
                    db: zeros(ops, nb)?,
                    m: [zeros(ops, na)?, zeros(ops, nb)?],
                    v: [zeros(ops, na)?, zeros(ops, nb)?],
                    rank,
                    in_dim: p.in_dim,
                    out_dim: p.out_dim,
                });
            }
            layers.push(out);
        }
        let config = w.config.clone();
        Ok(Self { config, layers, rank, scale: w.scale(), adamw, step: 0 })
    }

    /// [`new`](Self::new) resuming an optimizer: its moments and step count go to the device
    /// too.
    pub fn resume<O: TrainOps<Logits = L>>(
        ops: &mut O,
        s: &DecoderShape,
        w: &LoraWeights,
        opt: &AdamW,
    ) -> Result<Self, CudaError> {
        let mut ad = Self::new(ops, s, w, opt.config)?;
        let moments = opt.m.layers.iter().zip(&opt.v.layers);
        for (pairs, (ml, vl)) in ad.layers.iter_mut().zip(moments) {
            for ((p, m), v) in pairs.iter_mut().zip(ml).zip(vl) {
                match (p, m, v) {
                    (Some(p), Some(m), Some(v)) => {
                        let same = |x: &LoraPair| x.a.len() == p.a_len() && x.b.len() == p.b_len();
                        if !same(m) || !same(v) {
                            return Err(CudaError::Shape(
                                "optimizer moments of another shape".into(),
                            ));
                        }
                        p.m = [ops.upload_f32(&m.a)?, ops.upload_f32(&m.b)?];
                        p.v = [ops.upload_f32(&v.a)?, ops.upload_f32(&v.b)?];
                    }
                    (None, None, None) => {}
                    _ => {
                        return Err(CudaError::Shape("optimizer moments of another adapter".into()))
                    }
                }
            }
        }
        ad.step = opt.step;
        Ok(ad)
    }

    /// The optimizer's state on the host (for a checkpoint).
    pub fn optimizer<O: TrainOps<Logits = L>>(&self, ops: &mut O) -> Result<AdamW, CudaError> {
        let m = self.to_host(ops, |p| (&p.m[0], &p.m[1]))?;
        let v = self.to_host(ops, |p| (&p.v[0], &p.v[1]))?;
        Ok(AdamW { config: self.adamw, step: self.step, m, v })
    }

    /// The forward's view of the adapter (slot 0), reading the current weights.
    pub fn tables<O: TrainOps<Logits = L>>(
        &self,
        ops: &mut O,
    ) -> Result<LoraSet<O::LoraTable>, CudaError> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for pairs in &self.layers {
            let mut t: [Option<O::LoraTable>; 7] = Default::default();
            for (slot, p) in t.iter_mut().zip(pairs) {
                if let Some(p) = p {
                    *slot = Some(ops.train_table(&p.a, &p.b, self.rank, self.scale)?);
                }
            }
            layers.push(t);
        }
        Ok(LoraSet::from_tables(layers, self.rank))
    }

    fn to_host<O: TrainOps<Logits = L>>(
        &self,
        ops: &mut O,
        pick: impl Fn(&TrainPair<L>) -> (&L, &L),
    ) -> Result<LoraWeights, CudaError> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for pairs in &self.layers {
            let mut out: [Option<LoraPair>; 7] = Default::default();
            for (dst, p) in out.iter_mut().zip(pairs) {
                if let Some(p) = p {
                    let (a, b) = pick(p);
                    *dst = Some(LoraPair {
                        in_dim: p.in_dim,
                        out_dim: p.out_dim,
                        a: ops.logits_to_host(a, p.a_len())?,
                        b: ops.logits_to_host(b, p.b_len())?,
                    });
                }
            }
            layers.push(out);
        }
        Ok(LoraWeights { config: self.config.clone(), layers })
    }

    /// The current weights, on the host.
    pub fn weights<O: TrainOps<Logits = L>>(&self, ops: &mut O) -> Result<LoraWeights, CudaError> {
        self.to_host(ops, |p| (&p.a, &p.b))
    }

    /// The gradients summed since the last step, on the host.
    pub fn grads<O: TrainOps<Logits = L>>(&self, ops: &mut O) -> Result<LoraWeights, CudaError> {
        self.to_host(ops, |p| (&p.da, &p.db))
    }

    fn pairs_mut(&mut self) -> impl Iterator<Item = &mut TrainPair<L>> {
        self.layers.iter_mut().flatten().flatten()
    }

    pub fn zero_grads<O: TrainOps<Logits = L>>(&mut self, ops: &mut O) -> Result<(), CudaError> {
        for p in self.pairs_mut() {
            let (na, nb) = (p.a_len(), p.b_len());
            ops.zero(&mut p.da, na)?;
            ops.zero(&mut p.db, nb)?;
        }
        Ok(())
    }

    /// Clips the gradients to `max_norm` (as `torch.nn.utils.clip_grad_norm_`), takes one
    /// AdamW step at `lr` and zeroes the gradients; returns the norm before clipping. A
    /// non-finite norm skips the step (the gradients are zeroed all the same).
    pub fn clip_and_step<O: TrainOps<Logits = L>>(
        &mut self,
        ops: &mut O,
        lr: f32,
        max_norm: Option<f32>,
    ) -> Result<f64, CudaError> {
        let mut sq = 0f64;
        for p in self.layers.iter().flatten().flatten() {
            sq += ops.sum_squares(&p.da, p.a_len())? + ops.sum_squares(&p.db, p.b_len())?;
        }
        let norm = sq.sqrt();
        if !norm.is_finite() {
            self.zero_grads(ops)?;
            return Ok(norm);
        }
        if let Some(max) = max_norm {
            let coef = max as f64 / (norm + 1e-6);
            if coef < 1.0 {
                for p in self.pairs_mut() {
                    let (na, nb) = (p.a_len(), p.b_len());
                    ops.scale(&mut p.da, na, coef as f32)?;
                    ops.scale(&mut p.db, nb, coef as f32)?;
                }
            }
        }
        self.step += 1;
        // As lora::optim::AdamW::step.
        let sc = AdamWScalars::new(self.adamw, lr, self.step);
        for p in self.pairs_mut() {
            let (na, nb) = (p.a_len(), p.b_len());
            let [ma, mb] = &mut p.m;
            let [va, vb] = &mut p.v;
            ops.adamw(&mut p.a, &p.da, ma, va, na, &sc)?;
            ops.adamw(&mut p.b, &p.db, mb, vb, nb, &sc)?;
        }
        self.zero_grads(ops)?;
        Ok(norm)
    }
}

impl<L> TrainPair<L> {
    fn a_len(&self) -> usize {
        self.rank * self.in_dim
    }

    fn b_len(&self) -> usize {
        self.out_dim * self.rank
    }

    /// The pair as its backward reads it.
    pub fn grad(&mut self, scale: f32) -> GradPair<'_, L> {
        GradPair {
            a: &self.a,
            b: &self.b,
            da: &mut self.da,
            db: &mut self.db,
            rank: self.rank,
            scale,
        }
    }
}
