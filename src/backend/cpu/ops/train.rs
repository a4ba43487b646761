//! [`TrainOps`] on the CPU: the training step's operations at the CPU model's precision
//! (f32 activations and gradients; frozen products in `--train-dtype`), each the CPU's own
//! kernel: packed GEMMs for the frozen projections' input gradients and the loss, the tiled
//! attention backward, the row-parallel norm and SiLU backwards.

use rayon::prelude::*;

use super::{lora, CpuOps, CpuStep, CpuWeight, R};
use crate::backend::cpu::frozen::TrainDtype;
use crate::backend::cpu::gemm::{gemm, MatRef};
use crate::backend::cuda::decoder::lora::{DropoutSite, LoraDims};
use crate::backend::cuda::decoder::train::{GradPair, TrainOps};
use crate::backend::cuda::decoder::{DecoderShape, DecoderWeights};
use crate::backend::cuda::twins::{self, RopeShape};
use crate::backend::cuda::CudaError;
use crate::kv::KvCache;
use crate::lora::optim::{adamw_update, AdamWScalars};
use crate::model::attention_backward::{attention_backward_into, AttnBackwardInput};
use crate::model::backward::{rms_norm_backward, silu_mul_backward};
use crate::model::loss::row_loss;

fn short(what: &str) -> CudaError {
    CudaError::Shape(format!("{what}: a buffer too small for the rows"))
}

impl TrainOps for CpuOps {
    /// Packs every projection the backward multiplies by, and the output head, in parallel:
    /// packing one at its first use would hold its dense copy beside a sample's activations.
    fn prepare_weights(&mut self, w: &DecoderWeights<CpuWeight>) -> R {
        let mut all: Vec<&CpuWeight> =
            w.layers.iter().flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down]).collect();
        all.push(&w.lm_head);
        let dtype = self.train_dtype;
        all.par_iter().try_for_each(|m| {
            m.backward(dtype)?;
            if dtype != TrainDtype::F32 {
                m.forward_t(dtype)?;
            }
            Ok(())
        })
    }

    fn upload_f32(&mut self, x: &[f32]) -> Result<Vec<f32>, CudaError> {
        Ok(x.to_vec())
    }

    fn zero(&mut self, x: &mut Vec<f32>, n: usize) -> R {
        x.get_mut(..n).ok_or_else(|| short("zero"))?.fill(0.0);
        Ok(())
    }

    fn copy_rows(
        &mut self,
        src: &Vec<f32>,
        src_row0: usize,
        dst: &mut Vec<f32>,
        dst_row0: usize,
        rows: usize,
        width: usize,
    ) -> R {
        let (a, b, n) = (src_row0 * width, dst_row0 * width, rows * width);
        if a + n > src.len() || b + n > dst.len() {
            return Err(short("copy_rows"));
        }
        dst[b..b + n].copy_from_slice(&src[a..a + n]);
        Ok(())
    }

    fn train_table(
        &mut self,
        a: &Vec<f32>,
        b: &Vec<f32>,
        rank: usize,
        scale: f32,
    ) -> Result<lora::CpuLoraTable, CudaError> {
        let slot = lora::CpuSlot { a: a.clone(), b: b.clone(), rank, scale };
        Ok(vec![Some(std::sync::Arc::new(slot))])
    }

    fn lora_shrink(
        &mut self,
        step: &CpuStep,
        x: &Vec<f32>,
        table: &lora::CpuLoraTable,
        u: &mut Vec<f32>,
        d: LoraDims,
    ) -> R {
        lora::shrink_into(&step.batch.row_slots, x, table, u, d)
    }

    fn lora_expand(
        &mut self,
        step: &CpuStep,
        u: &Vec<f32>,
        table: &lora::CpuLoraTable,
        y: &mut Vec<f32>,
        d: LoraDims,
    ) -> R {
        lora::expand_from(&step.batch.row_slots, u, table, y, d)
    }

    /// Only the rows with a target go through the head: the others' loss and gradient are 0.
    fn loss_rows(
        &mut self,
        h: &Vec<f32>,
        head: &CpuWeight,
        rows: std::ops::Range<usize>,
        targets: &[i32],
        scales: &[f32],
        logits: &mut Vec<f32>,
        dx: &mut Vec<f32>,
        s: &DecoderShape,
    ) -> Result<Vec<(f32, u32)>, CudaError> {
        let (n, hid, vocab) = (rows.len(), s.hidden, s.vocab);
        let scored: Vec<usize> = (0..n)
            .filter(|&i| {
                usize::try_from(targets.get(i).copied().unwrap_or(-1)).is_ok_and(|t| t < vocab)
            })
            .collect();
        let m = scored.len();
        if targets.len() != n
            || scales.len() != n
            || h.len().min(dx.len()) < rows.end * hid
            || logits.len() < m * vocab
        {
            return Err(CudaError::Shape(format!("a loss over {n} rows")));
        }
        let x: Vec<f32> = scored
            .iter()
            .flat_map(|&i| h[(rows.start + i) * hid..(rows.start + i + 1) * hid].iter().copied())
            .collect();
        let head_m = head.matrix()?;
        if head_m.rows != vocab || head_m.cols != hid {
            return Err(CudaError::Shape(format!("a {}x{} output head", head_m.rows, head_m.cols)));
        }
        match self.train_dtype {
            TrainDtype::F32 => head_m.forward(&x, m, &mut logits[..m * vocab]),
            // The bf16 precision covers the head's products too, as on the CPU model.
            dtype => head.forward_t(dtype)?.product(
                MatRef::new(&x, m, hid),
                false,
                &mut logits[..m * vocab],
                vocab,
            ),
        }
        // Rows are independent: each row's loss, argmax and gradient computed alone.
        let per_row: Vec<(f64, usize)> = logits[..m * vocab]
            .par_chunks_exact_mut(vocab)
            .zip(&scored)
            .map_init(
                || vec![0f32; vocab],
                |probs, (row, &i)| row_loss(row, targets[i] as usize, Some(scales[i]), probs),
            )
            .collect();
        let mut out = vec![(0.0, 0); n];
        for (&i, (loss, arg)) in scored.iter().zip(per_row) {
            out[i] = (loss as f32, arg as u32);
        }
        let mut dxs = vec![0f32; m * hid];
        if m > 0 {
            let dl = MatRef::new(&logits[..m * vocab], m, vocab);
            head.backward(self.train_dtype)?.product(dl, false, &mut dxs, hid);
        }
        dx[rows.start * hid..rows.end * hid].fill(0.0);
        for (&i, g) in scored.iter().zip(dxs.chunks_exact(hid)) {
            dx[(rows.start + i) * hid..(rows.start + i + 1) * hid].copy_from_slice(g);
        }
        Ok(out)
    }

    /// The CPU's gradients stay f32: a plain copy (bf16 training rounds inside the frozen
    /// products, as the CPU path does).
    fn grad_bf16(&mut self, x: &Vec<f32>, out: &mut Vec<f32>, n: usize) -> R {
        if x.len().min(out.len()) < n {
            return Err(short("grad_bf16"));
        }
        out[..n].copy_from_slice(&x[..n]);
        Ok(())
    }

    fn matmul_dx(
        &mut self,
        dy: &Vec<f32>,
        w: &CpuWeight,
        dx: &mut Vec<f32>,
        (m, n, k): (usize, usize, usize),
    ) -> R {
        let wm = w.matrix()?;
        if wm.rows != n || wm.cols != k {
            return Err(CudaError::Shape(format!("a {}x{} weight as {n}x{k}", wm.rows, wm.cols)));
        }
        if dy.len() < m * n || dx.len() < m * k {
            return Err(short("matmul_dx"));
        }
        let dy = MatRef::new(&dy[..m * n], m, n);
        w.backward(self.train_dtype)?.product(dy, false, &mut dx[..m * k], k);
        Ok(())
    }

    fn rms_norm_backward(
        &mut self,
        x: &Vec<f32>,
        w: &CpuWeight,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
        rows: usize,
        s: &DecoderShape,
    ) -> R {
        let (n, w) = (rows * s.hidden, w.vector()?);
        if x.len().min(dy.len()).min(dx.len()) < n || w.len() != s.hidden {
            return Err(short("rms_norm_backward"));
        }
        rms_norm_backward(&x[..n], w, s.eps, &dy[..n], &mut dx[..n]);
        Ok(())
    }

    fn silu_mul_backward(
        &mut self,
        gate_up: &Vec<f32>,
        d_act: &Vec<f32>,
        d_gate_up: &mut Vec<f32>,
        rows: usize,
        inter: usize,
    ) -> R {
        let (g, a) = (rows * 2 * inter, rows * inter);
        if gate_up.len().min(d_gate_up.len()) < g || d_act.len() < a || inter == 0 {
            return Err(short("silu_mul_backward"));
        }
        silu_mul_backward(&gate_up[..g], &d_act[..a], inter, &mut d_gate_up[..g]);
        Ok(())
    }

    fn gather_kv(
        &mut self,
        step: &CpuStep,
        cache: &KvCache,
        k: &mut Vec<f32>,
        v: &mut Vec<f32>,
        s: &DecoderShape,
    ) -> R {
        let (w, n) = (s.kv_dim(), step.slots.len());
        let slots_in_cache = cache.num_blocks() * s.block_size;
        if k.len().min(v.len()) < n * w || cache.row_len() != w {
            return Err(short("gather_kv"));
        }
        if let Some(slot) = step.slots.iter().find(|&&x| x >= slots_in_cache) {
            return Err(CudaError::Shape(format!("slot {slot} past the cache")));
        }
        let (mut kg, mut vg) = (Vec::with_capacity(n * w), Vec::with_capacity(n * w));
        cache.layer(0).gather(&step.slots, w, &mut kg, &mut vg);
        k[..n * w].copy_from_slice(&kg);
        v[..n * w].copy_from_slice(&vg);
        Ok(())
    }

    fn attention_backward(
        &mut self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        o: &Vec<f32>,
        d_o: &Vec<f32>,
        d_qkv: &mut Vec<f32>,
        len: usize,
        s: &DecoderShape,
    ) -> R {
        let (qd, kvd) = (s.q_dim(), s.kv_dim());
        if q.len().min(o.len()).min(d_o.len()) < len * qd
            || k.len().min(v.len()) < len * kvd
            || d_qkv.len() < len * s.qkv_rows()
        {
            return Err(short("attention_backward"));
        }
        let input = AttnBackwardInput {
            q: &q[..len * qd],
            k: &k[..len * kvd],
            v: &v[..len * kvd],
            o: &o[..len * qd],
            d_o: &d_o[..len * qd],
            len,
            num_heads: s.heads,
            num_kv_heads: s.kv_heads,
            head_dim: s.head_dim,
            scale: 1.0 / (s.head_dim as f32).sqrt(),
        };
        let d = &mut d_qkv[..len * s.qkv_rows()];
        d.fill(0.0);
        attention_backward_into(&input, d);
        Ok(())
    }

    fn rope_backward(&mut self, step: &CpuStep, d_qkv: &mut Vec<f32>, s: &DecoderShape) -> R {
        let (rows, stride) = (step.batch.rows(), s.qkv_rows());
        if d_qkv.len() < rows * stride {
            return Err(short("rope_backward"));
        }
        let shape =
            RopeShape { num_heads: s.heads, num_kv_heads: s.kv_heads, head_dim: s.head_dim };
        twins::rope_backward(&mut d_qkv[..rows * stride], stride, &step.cos, &step.sin, shape);
        Ok(())
    }

    /// `g = scale · dY B`, then `dB += scale · dYᵀ u`, `dA += gᵀ x` and `dx += g A`, each one
    /// GEMM, as the CPU path's `lora_backward` runs them for one projection.
    fn lora_backward(
        &mut self,
        x: &Vec<f32>,
        dy: &Vec<f32>,
        u: &Vec<f32>,
        p: GradPair<'_, Vec<f32>>,
        d: LoraDims,
        dx: &mut Vec<f32>,
        rows: usize,
    ) -> R {
        let (r, ind, outd, t) = (p.rank, d.in_dim, d.out_dim, rows);
        if r == 0
            || r > d.max_rank
            || x.len().min(dx.len()) < t * ind
            || dy.len() < t * d.ld
            || d.col0 + outd > d.ld
            || u.len() < t * d.max_rank
            || p.a.len().min(p.da.len()) < r * ind
            || p.b.len().min(p.db.len()) < outd * r
        {
            return Err(short("lora_backward"));
        }
        let u_m = MatRef::columns(u, t, d.max_rank, 0, r);
        let dy_m = MatRef::columns(dy, t, d.ld, d.col0, outd);
        // dB += s · dYᵀ u, as (s · uᵀ dY)ᵀ: dY read in place.
        let mut db_t = vec![0f32; r * outd];
        gemm(p.scale, u_m.t(), dy_m, false, &mut db_t, outd);
        for (o, row) in p.db[..outd * r].chunks_exact_mut(r).enumerate() {
            row.iter_mut().enumerate().for_each(|(i, v)| *v += db_t[i * outd + o]);
        }
        let mut g = vec![0f32; t * r];
        gemm(1.0, dy_m, MatRef::new(&p.b[..outd * r], outd, r), false, &mut g, r);
        g.iter_mut().for_each(|v| *v *= p.scale);
        let g_m = MatRef::new(&g, t, r);
        gemm(1.0, g_m.t(), MatRef::new(&x[..t * ind], t, ind), true, &mut p.da[..r * ind], ind);
        gemm(1.0, g_m, MatRef::new(&p.a[..r * ind], r, ind), true, &mut dx[..t * ind], ind);
        Ok(())
    }

    fn lora_dropout_add(
        &mut self,
        step: &CpuStep,
        src: &Vec<f32>,
        dst: &mut Vec<f32>,
        width: usize,
        site: DropoutSite,
    ) -> R {
        let n = step.batch.rows();
        if src.len().min(dst.len()) < n * width {
            return Err(short("lora_dropout_add"));
        }
        let (src, dst) = (&src[..n * width], &mut dst[..n * width]);
        let (d, l, m) = (site.dropout, site.layer, site.module.index());
        twins::lora_dropout_add(src, dst, &step.batch.positions, width, d, l, m);
        Ok(())
    }

    fn sum_squares(&mut self, x: &Vec<f32>, n: usize) -> Result<f64, CudaError> {
        let x = x.get(..n).ok_or_else(|| short("sum_squares"))?;
        Ok(x.iter().map(|&v| f64::from(v) * f64::from(v)).sum())
    }

    fn scale(&mut self, x: &mut Vec<f32>, n: usize, by: f32) -> R {
        x.get_mut(..n).ok_or_else(|| short("scale"))?.iter_mut().for_each(|v| *v *= by);
        Ok(())
    }

    fn adamw(
        &mut self,
        p: &mut Vec<f32>,
        g: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        n: usize,
        sc: &AdamWScalars,
    ) -> R {
        if p.len().min(g.len()).min(m.len()).min(v.len()) < n {
            return Err(short("adamw"));
        }
        adamw_update(&mut p[..n], &g[..n], &mut m[..n], &mut v[..n], sc);
        Ok(())
    }
}
