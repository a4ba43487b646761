//! LoRA adapters in the decoder, SGMV-style: each row of a forward names an adapter slot (or
//! none), and per layer and projection one table over the slots serves every adapter in one
//! launch. Weights stay fp32 (PEFT layouts); the update is added to the bf16 projection output.

use super::{DecoderOps, DecoderShape};
use crate::backend::cuda::CudaError;
use crate::lora::dropout::SampleDropout;
use crate::lora::{LoraWeights, TargetModule};

/// One adapter's weights for one projection: `A [rank, in]`, `B [out, rank]`, `alpha / r`.
#[derive(Debug, Clone, Copy)]
pub struct SlotWeights<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub rank: usize,
    pub scale: f32,
}

/// Where a projection's update goes: `out` columns from `col0` of rows `ld` wide (a block of a
/// fused q/k/v or gate/up output), from inputs `in_dim` wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraDims {
    pub in_dim: usize,
    pub out_dim: usize,
    pub ld: usize,
    pub col0: usize,
    /// The largest rank of any slot (the width of the low-rank scratch).
    pub max_rank: usize,
}

impl LoraDims {
    /// The decoder's layout of projection `m`.
    pub fn of(s: &DecoderShape, m: TargetModule, max_rank: usize) -> Self {
        let (h, q, kv, i) = (s.hidden, s.q_dim(), s.kv_dim(), s.inter);
        let (in_dim, out_dim, ld, col0) = match m {
            TargetModule::QProj => (h, q, s.qkv_rows(), 0),
            TargetModule::KProj => (h, kv, s.qkv_rows(), q),
            TargetModule::VProj => (h, kv, s.qkv_rows(), q + kv),
            TargetModule::OProj => (q, h, h, 0),
            TargetModule::GateProj => (h, i, 2 * i, 0),
            TargetModule::UpProj => (h, i, 2 * i, i),
            TargetModule::DownProj => (i, h, h, 0),
        };
        Self { in_dim, out_dim, ld, col0, max_rank }
    }
}

/// A training sample's LoRA dropout on one projection's input: with each row's depth, the
/// layer and projection fix the row's mask (`lora::dropout`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutSite {
    pub dropout: SampleDropout,
    pub layer: usize,
    pub module: TargetModule,
}

/// The adapters of a forward: slot `i` is the `i`-th adapter given to [`LoraSet::new`].
pub struct LoraSet<T> {
    /// Per layer, per projection (`TargetModule` order): `None` where no adapter adapts it.
    layers: Vec<[Option<T>; 7]>,
    max_rank: usize,
}

impl<T> LoraSet<T> {
    pub fn new<O: DecoderOps<LoraTable = T>>(
        ops: &mut O,
        s: &DecoderShape,
        adapters: &[&LoraWeights],
    ) -> Result<Self, CudaError> {
        let mut max_rank = 0;
        for (i, a) in adapters.iter().enumerate() {
            if a.layers.len() != s.layers {
                return Err(CudaError::Shape(format!(
                    "adapter {i} has {} layers for a model of {}",
                    a.layers.len(),
                    s.layers
                )));
            }
            for pair in a.layers.iter().flatten().flatten() {
                max_rank = max_rank.max(pair.rank());
            }
        }
        let mut layers = Vec::with_capacity(s.layers);
        for l in 0..s.layers {
            let mut tables: [Option<T>; 7] = Default::default();
            for m in TargetModule::ALL {
                let d = LoraDims::of(s, m, max_rank);
                let mut slots = Vec::with_capacity(adapters.len());
                for (i, a) in adapters.iter().enumerate() {
                    let Some(p) = a.pair(l, m) else {
                        slots.push(None);
                        continue;
                    };
                    let rank = p.rank();
                    if p.in_dim != d.in_dim
                        || p.out_dim != d.out_dim
                        || p.a.len() != rank * d.in_dim
                        || p.b.len() != d.out_dim * rank
                    {
                        return Err(CudaError::Shape(format!(
                            "adapter {i}, layer {l} {m:?}: {}x{} for a {}x{} projection",
                            p.out_dim, p.in_dim, d.out_dim, d.in_dim
                        )));
                    }
                    slots.push(Some(SlotWeights { a: &p.a, b: &p.b, rank, scale: a.scale() }));
                }
                if slots.iter().any(Option::is_some) {
                    tables[m.index()] = Some(ops.lora_table(&slots)?);
                }
            }
            layers.push(tables);
        }
        Ok(Self { layers, max_rank })
    }

    /// A set over tables already made: per layer, per projection (`TargetModule` order).
    pub fn from_tables(layers: Vec<[Option<T>; 7]>, max_rank: usize) -> Self {
        Self { layers, max_rank }
    }

    /// One set whose slots are those of `parts` in order, each a set and its slot count
    /// (`None`: that many slots without an adapter), so rows of all of them share a forward.
    /// It reads the parts' weights where they are: it must not outlive them.
    pub fn join<O: DecoderOps<LoraTable = T>>(
        ops: &mut O,
        parts: &[(Option<&LoraSet<T>>, usize)],
    ) -> Result<Self, CudaError> {
        let layers = parts.iter().find_map(|(p, _)| p.map(|p| p.layers.len())).unwrap_or(0);
        if parts.iter().any(|(p, _)| p.is_some_and(|p| p.layers.len() != layers)) {
            return Err(CudaError::Shape("adapter sets of different depths joined".into()));
        }
        let max_rank = parts.iter().filter_map(|(p, _)| p.map(|p| p.max_rank)).max().unwrap_or(0);
        let mut out = Vec::with_capacity(layers);
        for l in 0..layers {
            let mut tables: [Option<T>; 7] = Default::default();
            for (i, table) in tables.iter_mut().enumerate() {
                let of: Vec<(Option<&T>, usize)> = parts
                    .iter()
                    .map(|&(p, n)| (p.and_then(|p| p.layers[l][i].as_ref()), n))
                    .collect();
                if of.iter().any(|(t, _)| t.is_some()) {
                    *table = Some(ops.lora_table_join(&of)?);
                }
            }
            out.push(tables);
        }
        Ok(Self { layers: out, max_rank })
    }

    /// The table of projection `m` of layer `l`, with where its update goes.
    pub fn table(&self, s: &DecoderShape, l: usize, m: TargetModule) -> Option<(&T, LoraDims)> {
        let t = self.layers.get(l)?[m.index()].as_ref()?;
        Some((t, LoraDims::of(s, m, self.max_rank)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_land_in_the_fused_blocks() {
        let s = DecoderShape {
            vocab: 10,
            hidden: 64,
            inter: 96,
            layers: 1,
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            eps: 1e-5,
            block_size: 16,
            qkv_bias: false,
        };
        let (q, kv) = (128, 64);
        assert_eq!(LoraDims::of(&s, TargetModule::KProj, 8).col0, q);
        let v = LoraDims::of(&s, TargetModule::VProj, 8);
        assert_eq!((v.col0, v.out_dim, v.ld), (q + kv, kv, q + 2 * kv));
        let up = LoraDims::of(&s, TargetModule::UpProj, 8);
        assert_eq!((up.col0, up.ld, up.in_dim), (96, 192, 64));
        let down = LoraDims::of(&s, TargetModule::DownProj, 8);
        assert_eq!((down.in_dim, down.out_dim, down.ld), (96, 64, 64));
    }
}
