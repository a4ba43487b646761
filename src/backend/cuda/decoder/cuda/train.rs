//! [`TrainOps`] on a CUDA device: the backward kernels of `kernels/*.cu`, and cuBLASLt for
//! every product (bf16 inputs, fp32 accumulation), the LoRA ones included.

use cudarc::driver::{CudaFunction, CudaSlice, PushKernelArg};

use super::attention_tiled::{AttentionBackward, AttentionBackwardArgs, AttentionBackwardTimes};
use super::lora_launch::{dropout_grid, dropout_site_args, DROPOUT_THREADS};
use super::{
    check_len, check_lora, launch_expand, launch_shrink, CudaCache, CudaLoraTable, CudaOps,
    CudaStep, R,
};
use crate::backend::cuda::decoder::lora::{DropoutSite, LoraDims};
use crate::backend::cuda::decoder::train::{GradPair, TrainOps};
use crate::backend::cuda::decoder::{DecoderOps, DecoderShape};
use crate::backend::cuda::gemm::{addr, Elem, Operand, Product};
use crate::backend::cuda::gpu::{cfg, n32, Gpu};
use crate::backend::cuda::CudaError;
use crate::lora::optim::AdamWScalars;

const THREADS: u32 = 256;

/// bf16 copies of a product's fp32 inputs, grown to the largest seen.
#[derive(Clone, Copy)]
enum Buf {
    /// The logits' gradient.
    Dy = 0,
    U = 1,
    G = 2,
    A = 3,
    B = 4,
}

pub(super) struct TrainState {
    to_bf16: CudaFunction,
    sum_squares: CudaFunction,
    scale: CudaFunction,
    adamw: CudaFunction,
    cross_entropy: CudaFunction,
    rms_norm_backward: CudaFunction,
    silu_mul_backward: CudaFunction,
    rope_backward: CudaFunction,
    attention: AttentionBackward,
    bufs: [CudaSlice<u16>; 5],
    loss: CudaSlice<f32>,
    ids: CudaSlice<u32>,
    lps: CudaSlice<f32>,
    sq: CudaSlice<f32>,
}

impl TrainState {
    fn new(gpu: &mut Gpu) -> Result<Self, CudaError> {
        let one = || gpu.zeros::<u16>(1);
        let bufs = [one()?, one()?, one()?, one()?, one()?];
        Ok(Self {
            bufs,
            loss: gpu.zeros(1)?,
            ids: gpu.zeros(1)?,
            lps: gpu.zeros(1)?,
            sq: gpu.zeros(1)?,
            to_bf16: gpu.func("backward.cu", "f32_to_bf16")?,
            sum_squares: gpu.func("backward.cu", "sum_squares_f32")?,
            scale: gpu.func("backward.cu", "scale_f32")?,
            adamw: gpu.func("adamw.cu", "adamw_f32")?,
            cross_entropy: gpu.func("cross_entropy.cu", "cross_entropy_f32")?,
            rms_norm_backward: gpu.func("backward.cu", "rms_norm_backward_f32")?,
            silu_mul_backward: gpu.func("backward.cu", "silu_mul_backward_f32")?,
            rope_backward: gpu.func("backward.cu", "rope_backward_f32")?,
            attention: AttentionBackward::new(gpu)?,
        })
    }

    /// bf16 copy of `x[..n]` in buffer `which`, grown as needed.
    fn bf16(
        &mut self,
        gpu: &Gpu,
        x: &CudaSlice<f32>,
        n: usize,
        which: Buf,
    ) -> Result<(), CudaError> {
        check_len(x.len(), n, "a product input")?;
        let buf = &mut self.bufs[which as usize];
        if buf.len() < n {
            *buf = gpu.zeros(n)?;
        }
        let n64 = n as u64;
        let mut b = gpu.stream.launch_builder(&self.to_bf16);
        b.arg(x).arg(&mut *buf).arg(&n64);
        // SAFETY: argument list matches f32_to_bf16 (grid-stride over n); both hold n.
        unsafe { b.launch(cfg((grid(n), 1, 1), THREADS)) }?;
        Ok(())
    }
}

/// Blocks of a grid-stride launch over `n` values.
fn grid(n: usize) -> u32 {
    n32(n.div_ceil(THREADS as usize).clamp(1, 8192))
}

fn grow<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    gpu: &Gpu,
    x: &mut CudaSlice<T>,
    n: usize,
) -> R {
    if x.len() < n {
        *x = gpu.zeros(n)?;
    }
    Ok(())
}

fn bf16_op(ptr: u64, ld: usize, trans: bool) -> Operand {
    Operand { ptr, elem: Elem::Bf16, ld, trans }
}

fn f32_out(ptr: u64, ld: usize) -> Operand {
    Operand { ptr, elem: Elem::F32, ld, trans: false }
}

impl CudaOps {
    /// Runs `f` with the training state (made on first use).
    fn with_train<T>(
        &mut self,
        f: impl FnOnce(&mut Self, &mut TrainState) -> Result<T, CudaError>,
    ) -> Result<T, CudaError> {
        let mut ts = match self.train.take() {
            Some(t) => t,
            None => TrainState::new(&mut self.gpu)?,
        };
        let out = f(self, &mut ts);
        self.train = Some(ts);
        out
    }

    /// Times one `len`-token sample's attention backward at shape `s`, both ways it can run.
    pub fn time_attention_backward(
        &mut self,
        s: &DecoderShape,
        len: usize,
    ) -> Result<AttentionBackwardTimes, CudaError> {
        self.with_train(|ops, ts| ts.attention.time(&ops.gpu, s, len))
    }

    /// Runs a product whose operands the caller has checked.
    fn run(&mut self, p: Product) -> R {
        // SAFETY: every caller checks that its buffers hold what `p` reads and writes at their
        // `ld`; they stay alive until the stream has run it (each training step ends in a
        // synchronising read of its loss, the optimizer in one of the gradient norm).
        unsafe { self.gemm.product(&p) }
    }
}

impl TrainOps for CudaOps {
    fn upload_f32(&mut self, x: &[f32]) -> Result<CudaSlice<f32>, CudaError> {
        self.gpu.up(x)
    }

    fn zero(&mut self, x: &mut CudaSlice<f32>, n: usize) -> R {
        check_len(x.len(), n, "zeroed buffer")?;
        self.gpu.stream.memset_zeros(&mut x.slice_mut(..n))?;
        Ok(())
    }

    fn copy_rows(
        &mut self,
        src: &CudaSlice<u16>,
        src_row0: usize,
        dst: &mut CudaSlice<u16>,
        dst_row0: usize,
        rows: usize,
        width: usize,
    ) -> R {
        let (a, b, n) = (src_row0 * width, dst_row0 * width, rows * width);
        check_len(src.len(), a + n, "copied rows")?;
        check_len(dst.len(), b + n, "copied rows")?;
        self.gpu.stream.memcpy_dtod(&src.slice(a..a + n), &mut dst.slice_mut(b..b + n))?;
        Ok(())
    }

    fn train_table(
        &mut self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        rank: usize,
        scale: f32,
    ) -> Result<CudaLoraTable, CudaError> {
        CudaLoraTable::pointing_at(&self.gpu, a, b, rank, scale)
    }

    fn lora_shrink(
        &mut self,
        st: &CudaStep,
        x: &CudaSlice<u16>,
        t: &CudaLoraTable,
        u: &mut CudaSlice<f32>,
        d: LoraDims,
    ) -> R {
        check_lora(st, x.len(), d.ld * st.rows, t, d)?;
        check_len(u.len(), st.rows * d.max_rank, "LoRA low-rank activations")?;
        launch_shrink(&self.gpu, &self.k, st, x, t, u, d)
    }

    fn lora_expand(
        &mut self,
        st: &CudaStep,
        u: &CudaSlice<f32>,
        t: &CudaLoraTable,
        y: &mut CudaSlice<u16>,
        d: LoraDims,
    ) -> R {
        check_lora(st, d.in_dim * st.rows, y.len(), t, d)?;
        check_len(u.len(), st.rows * d.max_rank, "LoRA low-rank activations")?;
        launch_expand(&self.gpu, &self.k, st, u, t, y, d)
    }

    fn loss_rows(
        &mut self,
        h: &CudaSlice<u16>,
        head: &CudaSlice<u16>,
        rows: std::ops::Range<usize>,
        targets: &[i32],
        scales: &[f32],
        logits: &mut CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        s: &DecoderShape,
    ) -> Result<Vec<(f32, u32)>, CudaError> {
        let (n, hid, vocab) = (rows.len(), s.hidden, s.vocab);
        if n == 0 || targets.len() != n || scales.len() != n {
            return Err(CudaError::Shape(format!("a loss over {n} rows")));
        }
        check_len(h.len().min(dx.len()), rows.end * hid, "loss rows")?;
        check_len(head.len(), vocab * hid, "output head")?;
        check_len(logits.len(), n * vocab, "loss logits")?;
        self.with_train(|ops, ts| {
            let st = ops.gpu.stream.clone();
            ops.run(Product {
                a: bf16_op(addr(h, &st, rows.start * hid), hid, false),
                b: bf16_op(addr(head, &st, 0), hid, true),
                d: f32_out(addr(logits, &st, 0), vocab),
                mnk: (n, vocab, hid),
                alpha: 1.0,
                beta: 0.0,
            })?;
            grow(&ops.gpu, &mut ts.ids, n)?;
            grow(&ops.gpu, &mut ts.lps, n)?;
            grow(&ops.gpu, &mut ts.loss, n)?;
            let v = vocab as i32;
            let mut b = st.launch_builder(&ops.k.argmax);
            b.arg(&*logits).arg(&v).arg(&mut ts.ids).arg(&mut ts.lps);
            // SAFETY: argument list matches argmax_logprob_f32 with the 1024 threads its
            // shared arrays are sized for; ids and lps hold n entries.
            unsafe { b.launch(cfg((n32(n), 1, 1), 1024)) }?;
            let (dt, ds) = (ops.gpu.up(targets)?, ops.gpu.up(scales)?);
            let mut b = st.launch_builder(&ts.cross_entropy);
            b.arg(&mut *logits).arg(&dt).arg(&ds).arg(&mut ts.loss).arg(&v);
            // SAFETY: argument list matches cross_entropy_f32: n rows of vocab logits, n
            // targets, scales and losses.
            unsafe { b.launch(cfg((n32(n), 1, 1), 512)) }?;
            ts.bf16(&ops.gpu, logits, n * vocab, Buf::Dy)?;
            ops.run(Product {
                a: bf16_op(addr(&ts.bufs[Buf::Dy as usize], &st, 0), vocab, false),
                b: bf16_op(addr(head, &st, 0), hid, false),
                d: f32_out(addr(dx, &st, rows.start * hid), hid),
                mnk: (n, hid, vocab),
                alpha: 1.0,
                beta: 0.0,
            })?;
            let loss = ops.gpu.stream.clone_dtoh(&ts.loss.slice(..n))?;
            let ids = ops.gpu.stream.clone_dtoh(&ts.ids.slice(..n))?;
            Ok(loss.into_iter().zip(ids).collect())
        })
    }

    fn grad_bf16(&mut self, x: &CudaSlice<f32>, out: &mut CudaSlice<u16>, n: usize) -> R {
        check_len(x.len().min(out.len()), n, "a gradient")?;
        self.with_train(|ops, ts| {
            let n64 = n as u64;
            let mut b = ops.gpu.stream.launch_builder(&ts.to_bf16);
            b.arg(x).arg(out).arg(&n64);
            // SAFETY: argument list matches f32_to_bf16 (grid-stride over n); both hold n.
            unsafe { b.launch(cfg((grid(n), 1, 1), THREADS)) }?;
            Ok(())
        })
    }

    fn matmul_dx(
        &mut self,
        dy: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        dx: &mut CudaSlice<f32>,
        (m, n, k): (usize, usize, usize),
    ) -> R {
        check_len(w.len(), n * k, "weight")?;
        check_len(dy.len(), m * n, "output gradient")?;
        check_len(dx.len(), m * k, "input gradient")?;
        self.with_train(|ops, _| {
            let st = ops.gpu.stream.clone();
            ops.run(Product {
                a: bf16_op(addr(dy, &st, 0), n, false),
                b: bf16_op(addr(w, &st, 0), k, false),
                d: f32_out(addr(dx, &st, 0), k),
                mnk: (m, k, n),
                alpha: 1.0,
                beta: 0.0,
            })
        })
    }

    fn rms_norm_backward(
        &mut self,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        rows: usize,
        s: &DecoderShape,
    ) -> R {
        let n = rows * s.hidden;
        check_len(x.len().min(dy.len()).min(dx.len()), n, "RMSNorm backward")?;
        check_len(w.len(), s.hidden, "RMSNorm weight")?;
        let h = s.hidden as i32;
        self.with_train(|ops, ts| {
            let mut b = ops.gpu.stream.launch_builder(&ts.rms_norm_backward);
            b.arg(x).arg(w).arg(dy).arg(dx).arg(&h).arg(&s.eps);
            // SAFETY: argument list matches rms_norm_backward_f32; one block a row, every
            // buffer holds rows * hidden (checked).
            unsafe { b.launch(cfg((n32(rows), 1, 1), THREADS)) }?;
            Ok(())
        })
    }

    fn silu_mul_backward(
        &mut self,
        gate_up: &CudaSlice<u16>,
        d_act: &CudaSlice<f32>,
        d_gate_up: &mut CudaSlice<f32>,
        rows: usize,
        inter: usize,
    ) -> R {
        check_len(gate_up.len().min(d_gate_up.len()), rows * 2 * inter, "SiLU backward")?;
        check_len(d_act.len(), rows * inter, "SiLU backward")?;
        let (r, i) = (rows as i32, inter as i32);
        self.with_train(|ops, ts| {
            let mut b = ops.gpu.stream.launch_builder(&ts.silu_mul_backward);
            b.arg(gate_up).arg(d_act).arg(d_gate_up).arg(&r).arg(&i);
            // SAFETY: argument list matches silu_mul_backward_f32 (grid-stride, lengths checked).
            unsafe { b.launch(cfg((grid(rows * inter), 1, 1), THREADS)) }?;
            Ok(())
        })
    }

    fn gather_kv(
        &mut self,
        st: &CudaStep,
        cache: &CudaCache,
        k: &mut CudaSlice<u16>,
        v: &mut CudaSlice<u16>,
        s: &DecoderShape,
    ) -> R {
        let w = s.kv_dim();
        let cache_rows = cache.k.len().min(cache.v.len()) / w.max(1);
        let idx: Vec<u32> = st
            .host_slots
            .iter()
            .map(|&x| u32::try_from(x).map_err(|_| CudaError::Shape(format!("cache slot {x}"))))
            .collect::<Result<_, _>>()?;
        // The rows' K and V through the row gather (which refuses a slot past the cache), the
        // cache as its table.
        self.gather_rows(&cache.k, cache_rows, &idx, k, w)?;
        self.gather_rows(&cache.v, cache_rows, &idx, v, w)
    }

    fn attention_backward(
        &mut self,
        q: &CudaSlice<u16>,
        k: &CudaSlice<u16>,
        v: &CudaSlice<u16>,
        o: &CudaSlice<u16>,
        d_o: &CudaSlice<f32>,
        d_qkv: &mut CudaSlice<f32>,
        len: usize,
        s: &DecoderShape,
    ) -> R {
        let args = AttentionBackwardArgs { q, k, v, o, d_o, d_qkv, len };
        self.with_train(|ops, ts| ts.attention.run(&ops.gpu, args, s, true))
    }

    fn rope_backward(&mut self, st: &CudaStep, d_qkv: &mut CudaSlice<f32>, s: &DecoderShape) -> R {
        check_len(d_qkv.len(), st.rows * s.qkv_rows(), "q/k/v gradient")?;
        let (stride, nh, nkv, hd) =
            (s.qkv_rows() as i32, s.heads as i32, s.kv_heads as i32, s.head_dim as i32);
        self.with_train(|ops, ts| {
            let mut b = ops.gpu.stream.launch_builder(&ts.rope_backward);
            b.arg(d_qkv).arg(&stride).arg(&st.cos).arg(&st.sin).arg(&nh).arg(&nkv).arg(&hd);
            // SAFETY: argument list matches rope_backward_f32; one block a row of the batch,
            // whose cos and sin tables hold head_dim / 2 values a row.
            unsafe { b.launch(cfg((n32(st.rows), 1, 1), THREADS)) }?;
            Ok(())
        })
    }

    fn lora_backward(
        &mut self,
        x: &CudaSlice<u16>,
        dy: &CudaSlice<u16>,
        u: &CudaSlice<f32>,
        p: GradPair<'_, CudaSlice<f32>>,
        d: LoraDims,
        dx: &mut CudaSlice<f32>,
        rows: usize,
    ) -> R {
        let (r, ind, outd, t) = (p.rank, d.in_dim, d.out_dim, rows);
        if r == 0 || r > d.max_rank || d.col0 + outd > d.ld {
            return Err(CudaError::Shape(format!("a LoRA backward of rank {r} over {d:?}")));
        }
        check_len(x.len().min(dx.len()), t * ind, "LoRA input")?;
        check_len(dy.len(), t * d.ld, "LoRA output gradient")?;
        check_len(u.len(), t * d.max_rank, "LoRA low-rank activations")?;
        check_len(p.a.len().min(p.da.len()), r * ind, "LoRA A")?;
        check_len(p.b.len().min(p.db.len()), outd * r, "LoRA B")?;
        self.with_train(|ops, ts| {
            let g = &ops.gpu;
            ts.bf16(g, u, t * d.max_rank, Buf::U)?;
            ts.bf16(g, p.a, r * ind, Buf::A)?;
            ts.bf16(g, p.b, outd * r, Buf::B)?;
            grow(g, &mut ts.bufs[Buf::G as usize], t * r)?;
            let st = g.stream.clone();
            let at = |b: Buf, off: usize| addr(&ts.bufs[b as usize], &st, off);
            let (dy_b, u_b, a_b, b_b, g_b) =
                (addr(dy, &st, d.col0), at(Buf::U, 0), at(Buf::A, 0), at(Buf::B, 0), at(Buf::G, 0));
            // dB[out, r] += scale · dYᵀ u
            ops.run(Product {
                a: bf16_op(dy_b, d.ld, true),
                b: bf16_op(u_b, d.max_rank, false),
                d: f32_out(addr(p.db, &st, 0), r),
                mnk: (outd, r, t),
                alpha: p.scale,
                beta: 1.0,
            })?;
            // g[t, r] = bf16(scale · dY B)
            ops.run(Product {
                a: bf16_op(dy_b, d.ld, false),
                b: bf16_op(b_b, r, false),
                d: bf16_op(g_b, r, false),
                mnk: (t, r, outd),
                alpha: p.scale,
                beta: 0.0,
            })?;
            // dA[r, in] += gᵀ x
            ops.run(Product {
                a: bf16_op(g_b, r, true),
                b: bf16_op(addr(x, &st, 0), ind, false),
                d: f32_out(addr(p.da, &st, 0), ind),
                mnk: (r, ind, t),
                alpha: 1.0,
                beta: 1.0,
            })?;
            // dx[t, in] += g A
            ops.run(Product {
                a: bf16_op(g_b, r, false),
                b: bf16_op(a_b, ind, false),
                d: f32_out(addr(dx, &st, 0), ind),
                mnk: (t, ind, r),
                alpha: 1.0,
                beta: 1.0,
            })
        })
    }

    fn lora_dropout_add(
        &mut self,
        st: &CudaStep,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<f32>,
        width: usize,
        site: DropoutSite,
    ) -> R {
        check_len(src.len().min(dst.len()), st.rows * width, "dropout's backward rows")?;
        let w = n32(width) as i32;
        let (p, seed, layer, module) = dropout_site_args(&site);
        let mut b = self.gpu.stream.launch_builder(&self.k.lora_dropout_add);
        b.arg(src).arg(dst).arg(&st.row_pos).arg(&w);
        b.arg(&p).arg(&seed).arg(&layer).arg(&module);
        // SAFETY: argument list matches lora_dropout_add_f32; src and dst hold the step's rows
        // of `width` (checked above).
        unsafe { b.launch(cfg(dropout_grid(st.rows, width), DROPOUT_THREADS)) }?;
        Ok(())
    }

    fn sum_squares(&mut self, x: &CudaSlice<f32>, n: usize) -> Result<f64, CudaError> {
        check_len(x.len(), n, "summed values")?;
        self.with_train(|ops, ts| {
            ops.gpu.stream.memset_zeros(&mut ts.sq)?;
            let n64 = n as u64;
            let mut b = ops.gpu.stream.launch_builder(&ts.sum_squares);
            b.arg(x).arg(&n64).arg(&mut ts.sq);
            // SAFETY: argument list matches sum_squares_f32 (grid-stride over n, one float out).
            unsafe { b.launch(cfg((grid(n).min(1024), 1, 1), THREADS)) }?;
            Ok(f64::from(ops.gpu.stream.clone_dtoh(&ts.sq)?[0]))
        })
    }

    fn scale(&mut self, x: &mut CudaSlice<f32>, n: usize, by: f32) -> R {
        check_len(x.len(), n, "scaled values")?;
        let n64 = n as u64;
        self.with_train(|ops, ts| {
            let mut b = ops.gpu.stream.launch_builder(&ts.scale);
            b.arg(x).arg(&n64).arg(&by);
            // SAFETY: argument list matches scale_f32 (grid-stride over n).
            unsafe { b.launch(cfg((grid(n), 1, 1), THREADS)) }?;
            Ok(())
        })
    }

    fn adamw(
        &mut self,
        p: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        n: usize,
        sc: &AdamWScalars,
    ) -> R {
        check_len(p.len().min(g.len()).min(m.len()).min(v.len()), n, "AdamW tensors")?;
        let n64 = n as u64;
        self.with_train(|ops, ts| {
            let mut b = ops.gpu.stream.launch_builder(&ts.adamw);
            b.arg(p).arg(g).arg(m).arg(v).arg(&n64).arg(&sc.beta1).arg(&sc.beta2).arg(&sc.eps);
            b.arg(&sc.decay).arg(&sc.step_size).arg(&sc.bc2_sqrt);
            // SAFETY: argument list matches adamw_f32 (grid-stride over n; lengths checked).
            unsafe { b.launch(cfg((grid(n), 1, 1), THREADS)) }?;
            Ok(())
        })
    }
}
