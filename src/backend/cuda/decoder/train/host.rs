//! [`TrainOps`] through the kernels' CPU twins, with the roundings the device makes (bf16
//! GEMM inputs): the oracle of the CUDA training step.

use super::{GradPair, TrainOps};
use crate::backend::cuda::decoder::host::{HostCache, HostOps, HostStep};
use crate::backend::cuda::decoder::lora::{DropoutSite, LoraDims};
use crate::backend::cuda::decoder::tiled_attention_head;
use crate::backend::cuda::decoder::{DecoderOps, DecoderShape};
use crate::backend::cuda::twins::{self, round_bf16, RopeShape, TwinAdapter};
use crate::backend::cuda::CudaError;
use crate::lora::optim::{adamw_update, AdamWScalars};
use crate::model::attention_backward::{attention_backward, AttnBackwardInput};

type R = Result<(), CudaError>;

fn rounded(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| round_bf16(v)).collect()
}

/// `out[m, k] (+)= Σ_n a[m, n] b[n, k]`, rows `lda` and `ldb` apart.
#[allow(clippy::too_many_arguments)]
fn mm(
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    out: &mut [f32],
    (m, n, k): (usize, usize, usize),
    add: bool,
) {
    for i in 0..m {
        let row = &mut out[i * k..(i + 1) * k];
        if !add {
            row.fill(0.0);
        }
        for j in 0..n {
            let av = a[i * lda + j];
            if av != 0.0 {
                row.iter_mut().zip(&b[j * ldb..j * ldb + k]).for_each(|(o, bv)| *o += av * bv);
            }
        }
    }
}

fn check_slots(step: &HostStep, table: &[TwinAdapter]) -> R {
    if step.batch.row_slots.iter().any(|&s| s >= 0 && s as usize >= table.len()) {
        return Err(CudaError::Shape("a row names an adapter slot past the table".into()));
    }
    Ok(())
}

impl TrainOps for HostOps {
    fn upload_f32(&mut self, x: &[f32]) -> Result<Vec<f32>, CudaError> {
        Ok(x.to_vec())
    }

    fn zero(&mut self, x: &mut Vec<f32>, n: usize) -> R {
        x[..n].fill(0.0);
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
            return Err(CudaError::Shape(format!("a copy of {rows} rows past its buffers")));
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
    ) -> Result<Vec<TwinAdapter>, CudaError> {
        Ok(vec![TwinAdapter { a: a.clone(), b: b.clone(), rank, scale }])
    }

    fn lora_shrink(
        &mut self,
        step: &HostStep,
        x: &Vec<f32>,
        table: &Vec<TwinAdapter>,
        u: &mut Vec<f32>,
        d: LoraDims,
    ) -> R {
        check_slots(step, table)?;
        for (t, &slot) in step.batch.row_slots.iter().enumerate() {
            let ur = &mut u[t * d.max_rank..(t + 1) * d.max_rank];
            ur.fill(0.0);
            let Some(ad) = usize::try_from(slot).ok().map(|s| &table[s]) else { continue };
            let xr = &x[t * d.in_dim..(t + 1) * d.in_dim];
            for (r, uv) in ur.iter_mut().enumerate().take(ad.rank) {
                let ar = &ad.a[r * d.in_dim..(r + 1) * d.in_dim];
                *uv = ar.iter().zip(xr).map(|(a, x)| a * x).sum();
            }
        }
        Ok(())
    }

    fn lora_expand(
        &mut self,
        step: &HostStep,
        u: &Vec<f32>,
        table: &Vec<TwinAdapter>,
        y: &mut Vec<f32>,
        d: LoraDims,
    ) -> R {
        check_slots(step, table)?;
        for (t, &slot) in step.batch.row_slots.iter().enumerate() {
            let Some(ad) = usize::try_from(slot).ok().map(|s| &table[s]) else { continue };
            let ur = &u[t * d.max_rank..t * d.max_rank + ad.rank];
            let row = &mut y[t * d.ld + d.col0..t * d.ld + d.col0 + d.out_dim];
            for (n, yv) in row.iter_mut().enumerate() {
                let br = &ad.b[n * ad.rank..(n + 1) * ad.rank];
                let s: f32 = br.iter().zip(ur).map(|(b, u)| b * u).sum();
                *yv = round_bf16(*yv + ad.scale * s);
            }
        }
        Ok(())
    }

    fn loss_rows(
        &mut self,
        h: &Vec<f32>,
        head: &Vec<f32>,
        rows: std::ops::Range<usize>,
        targets: &[i32],
        scales: &[f32],
        logits: &mut Vec<f32>,
        dx: &mut Vec<f32>,
        s: &DecoderShape,
    ) -> Result<Vec<(f32, u32)>, CudaError> {
        let (n, hid, vocab) = (rows.len(), s.hidden, s.vocab);
        if targets.len() != n || scales.len() != n || logits.len() < n * vocab {
            return Err(CudaError::Shape(format!("a loss over {n} rows")));
        }
        let x = &h[rows.start * hid..rows.end * hid];
        crate::backend::cuda::decoder::host::matmul(x, head, logits, (n, vocab, hid));
        let mut out = Vec::with_capacity(n);
        for ((row, &t), &sc) in logits.chunks_exact_mut(vocab).zip(targets).zip(scales) {
            let id = twins::argmax_logprob(row).0;
            out.push((twins::cross_entropy(row, t, sc), id));
        }
        let dl = rounded(&logits[..n * vocab]);
        mm(
            &dl,
            vocab,
            head,
            hid,
            &mut dx[rows.start * hid..rows.end * hid],
            (n, vocab, hid),
            false,
        );
        Ok(out)
    }

    fn grad_bf16(&mut self, x: &Vec<f32>, out: &mut Vec<f32>, n: usize) -> R {
        if x.len().min(out.len()) < n {
            return Err(CudaError::Shape(format!("a gradient of {n} into {}", out.len())));
        }
        out[..n].copy_from_slice(&rounded(&x[..n]));
        Ok(())
    }

    fn matmul_dx(
        &mut self,
        dy: &Vec<f32>,
        w: &Vec<f32>,
        dx: &mut Vec<f32>,
        (m, n, k): (usize, usize, usize),
    ) -> R {
        mm(&dy[..m * n], n, w, k, dx, (m, n, k), false);
        Ok(())
    }

    fn rms_norm_backward(
        &mut self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
        rows: usize,
        s: &DecoderShape,
    ) -> R {
        let n = rows * s.hidden;
        twins::rms_norm_backward(&x[..n], w, s.eps, &dy[..n], &mut dx[..n]);
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
        let g =
            twins::silu_mul_backward(&gate_up[..rows * 2 * inter], &d_act[..rows * inter], inter);
        d_gate_up[..g.len()].copy_from_slice(&g);
        Ok(())
    }

    fn gather_kv(
        &mut self,
        step: &HostStep,
        cache: &HostCache,
        k: &mut Vec<f32>,
        v: &mut Vec<f32>,
        s: &DecoderShape,
    ) -> R {
        let w = s.kv_dim();
        for (i, &slot) in step.batch.slots.iter().enumerate() {
            let src = usize::try_from(slot).map_err(|_| CudaError::Shape("a slot".into()))? * w;
            if src + w > cache.k.len() {
                return Err(CudaError::Shape(format!("slot {slot} past the cache")));
            }
            k[i * w..(i + 1) * w].copy_from_slice(&cache.k[src..src + w]);
            v[i * w..(i + 1) * w].copy_from_slice(&cache.v[src..src + w]);
        }
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
        // The device's arithmetic: its tensor-core kernels round as their twin does.
        let backward = if tiled_attention_head(s.head_dim) {
            twins::attention_backward_bf16
        } else {
            attention_backward
        };
        let (dq, dk, dv) = backward(&AttnBackwardInput {
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
        });
        for (i, row) in d_qkv.chunks_exact_mut(s.qkv_rows()).take(len).enumerate() {
            row[..qd].copy_from_slice(&dq[i * qd..(i + 1) * qd]);
            row[qd..qd + kvd].copy_from_slice(&dk[i * kvd..(i + 1) * kvd]);
            row[qd + kvd..].copy_from_slice(&dv[i * kvd..(i + 1) * kvd]);
        }
        Ok(())
    }

    fn rope_backward(&mut self, step: &HostStep, d_qkv: &mut Vec<f32>, s: &DecoderShape) -> R {
        let shape =
            RopeShape { num_heads: s.heads, num_kv_heads: s.kv_heads, head_dim: s.head_dim };
        let rows = step.batch.rows();
        let stride = s.qkv_rows();
        twins::rope_backward(&mut d_qkv[..rows * stride], stride, &step.cos, &step.sin, shape);
        Ok(())
    }

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
        // dY's block (bf16 already), u, A and B as the device's bf16 GEMMs read them.
        let mut dyb = vec![0f32; t * outd];
        for i in 0..t {
            let src = &dy[i * d.ld + d.col0..i * d.ld + d.col0 + outd];
            dyb[i * outd..(i + 1) * outd].copy_from_slice(src);
        }
        let mut ub = vec![0f32; t * r];
        for i in 0..t {
            ub[i * r..(i + 1) * r]
                .copy_from_slice(&rounded(&u[i * d.max_rank..i * d.max_rank + r]));
        }
        let (ab, bb) = (rounded(&p.a[..r * ind]), rounded(&p.b[..outd * r]));
        // dB[n, r] += scale · Σ_t dY[t, n] u[t, r]
        let dyt = transpose(&dyb, t, outd);
        let mut db = vec![0f32; outd * r];
        mm(&dyt, t, &ub, r, &mut db, (outd, t, r), false);
        p.db.iter_mut().zip(&db).for_each(|(g, v)| *g += p.scale * v);
        // g = bf16(scale · dY B)
        let mut g = vec![0f32; t * r];
        mm(&dyb, outd, &bb, r, &mut g, (t, outd, r), false);
        g.iter_mut().for_each(|v| *v = round_bf16(p.scale * *v));
        // dA += gᵀ x; dx += g A
        let gt = transpose(&g, t, r);
        mm(&gt, t, &x[..t * ind], ind, p.da, (r, t, ind), true);
        mm(&g, r, &ab, ind, dx, (t, r, ind), true);
        Ok(())
    }

    fn lora_dropout_add(
        &mut self,
        step: &HostStep,
        src: &Vec<f32>,
        dst: &mut Vec<f32>,
        width: usize,
        site: DropoutSite,
    ) -> R {
        let n = step.batch.rows();
        if src.len().min(dst.len()) < n * width {
            return Err(CudaError::Shape(format!("dropout's backward over {n} rows")));
        }
        let (src, dst) = (&src[..n * width], &mut dst[..n * width]);
        let (d, l, m) = (site.dropout, site.layer, site.module.index());
        twins::lora_dropout_add(src, dst, &step.batch.positions, width, d, l, m);
        Ok(())
    }

    fn sum_squares(&mut self, x: &Vec<f32>, n: usize) -> Result<f64, CudaError> {
        Ok(x[..n].iter().map(|&v| f64::from(v) * f64::from(v)).sum())
    }

    fn scale(&mut self, x: &mut Vec<f32>, n: usize, by: f32) -> R {
        x[..n].iter_mut().for_each(|v| *v *= by);
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
        adamw_update(&mut p[..n], &g[..n], &mut m[..n], &mut v[..n], sc);
        Ok(())
    }
}

fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = x[i * cols + j];
        }
    }
    t
}

// Keeps the twin honest about which trait it implements for.
const _: fn(&mut HostOps) = |o| {
    let _ = <HostOps as DecoderOps>::act(o, 0);
};
