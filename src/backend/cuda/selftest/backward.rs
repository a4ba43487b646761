//! Checks of the backward kernels fine-tuning needs, against the CPU training path's own
//! functions on the same bf16-rounded activations.

use cudarc::driver::PushKernelArg;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{cfg, compare, n32, random_bf16, Check, Gpu};
use crate::backend::cuda::twins;
use crate::backend::cuda::CudaError;

/// fp32 gradients: the kernels and twins differ only by summation order and `expf` flavour.
const F32_RTOL: f64 = 1e-4;
const F32_ATOL: f64 = 1e-5;

fn random_f32(rng: &mut StdRng, n: usize, range: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-range..range)).collect()
}

pub(super) fn check_backward(gpu: &mut Gpu, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(21);
    let eps = 1e-5f32;
    for (rows, hidden) in [(3usize, 576usize), (5, 4096)] {
        let x = random_bf16(&mut rng, rows * hidden, 2.0);
        let w = random_bf16(&mut rng, hidden, 1.0);
        let dy = random_f32(&mut rng, rows * hidden, 1.0);
        let mut dx = random_f32(&mut rng, rows * hidden, 1.0); // added to, not overwritten
        let mut gdx = gpu.up(&dx)?;
        let (gx, gw, gdy) = (gpu.up_bf16(&x)?, gpu.up_bf16(&w)?, gpu.up(&dy)?);
        let h = hidden as i32;
        let f = gpu.func("backward.cu", "rms_norm_backward_f32")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&gx).arg(&gw).arg(&gdy).arg(&mut gdx).arg(&h).arg(&eps);
        // SAFETY: argument list matches rms_norm_backward_f32; all buffers hold rows * hidden.
        unsafe { b.launch(cfg((n32(rows), 1, 1), 256)) }?;
        twins::rms_norm_backward(&x, &w, eps, &dy, &mut dx);
        let got = gpu.down(&gdx)?;
        let shape = format!("rows={rows} hidden={hidden} (added to a nonzero dx)");
        compare(checks, "rms_norm_backward_f32", shape, &got, &dx, F32_RTOL, F32_ATOL);
    }

    for (rows, inter) in [(3usize, 1536usize), (2, 14336)] {
        let gu = random_bf16(&mut rng, rows * 2 * inter, 4.0);
        let da = random_f32(&mut rng, rows * inter, 1.0);
        let (ggu, gda) = (gpu.up_bf16(&gu)?, gpu.up(&da)?);
        let mut gout = gpu.zeros::<f32>(rows * 2 * inter)?;
        let (r, i) = (rows as i32, inter as i32);
        let f = gpu.func("backward.cu", "silu_mul_backward_f32")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&ggu).arg(&gda).arg(&mut gout).arg(&r).arg(&i);
        // SAFETY: argument list matches silu_mul_backward_f32 (grid-stride over rows * inter).
        unsafe { b.launch(cfg((n32((rows * inter).div_ceil(256).min(4096)), 1, 1), 256)) }?;
        let got = gpu.down(&gout)?;
        let want = twins::silu_mul_backward(&gu, &da, inter);
        let shape = format!("rows={rows} inter={inter}");
        compare(checks, "silu_mul_backward_f32", shape, &got, &want, F32_RTOL, F32_ATOL);
    }

    let positions = [0usize, 1, 17, 300, 4000];
    for (num_heads, num_kv_heads, head_dim) in [(9usize, 3usize, 64usize), (32, 8, 128)] {
        let (tokens, half) = (positions.len(), head_dim / 2);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for &p in &positions {
            for i in 0..half {
                let f = 1.0 / 10000f32.powf(2.0 * i as f32 / head_dim as f32);
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        // Rows of q, k and v gradients; v's part must come back untouched.
        let stride = (num_heads + 2 * num_kv_heads) * head_dim;
        let mut d = random_f32(&mut rng, tokens * stride, 1.0);
        let mut gd = gpu.up(&d)?;
        let (gcos, gsin) = (gpu.up(&cos)?, gpu.up(&sin)?);
        let (st, nh, nkv, hd) =
            (stride as i32, num_heads as i32, num_kv_heads as i32, head_dim as i32);
        let f = gpu.func("backward.cu", "rope_backward_f32")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&mut gd).arg(&st).arg(&gcos).arg(&gsin).arg(&nh).arg(&nkv).arg(&hd);
        // SAFETY: argument list matches rope_backward_f32; d holds tokens rows of `stride`.
        unsafe { b.launch(cfg((n32(tokens), 1, 1), 256)) }?;
        let shape_t = twins::RopeShape { num_heads, num_kv_heads, head_dim };
        twins::rope_backward(&mut d, stride, &cos, &sin, shape_t);
        let got = gpu.down(&gd)?;
        let shape = format!("tokens={tokens} heads={num_heads}/{num_kv_heads} head_dim={head_dim}");
        compare(checks, "rope_backward_f32", shape, &got, &d, F32_RTOL, F32_ATOL);
    }
    Ok(())
}

/// `(dq, dk, dv)`.
type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// One sample's attention inputs: bf16-valued q, k, v, o and an fp32 dO, random in [-1, 1).
pub struct AttnCase {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub o: Vec<f32>,
    pub d_o: Vec<f32>,
    /// (len, num_heads, num_kv_heads, head_dim).
    pub dims: (usize, usize, usize, usize),
}

impl AttnCase {
    pub fn random(rng: &mut StdRng, dims: (usize, usize, usize, usize)) -> Self {
        let (len, nh, nkv, hd) = dims;
        Self {
            q: random_bf16(rng, len * nh * hd, 1.0),
            k: random_bf16(rng, len * nkv * hd, 1.0),
            v: random_bf16(rng, len * nkv * hd, 1.0),
            o: random_bf16(rng, len * nh * hd, 1.0),
            d_o: random_f32(rng, len * nh * hd, 1.0),
            dims,
        }
    }

    /// The backward's input, at the usual `1 / sqrt(head_dim)` scale.
    pub fn input(&self) -> crate::model::attention_backward::AttnBackwardInput<'_> {
        let (len, num_heads, num_kv_heads, head_dim) = self.dims;
        crate::model::attention_backward::AttnBackwardInput {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            o: &self.o,
            d_o: &self.d_o,
            len,
            num_heads,
            num_kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }
}

/// Both attention backwards: the direct kernels against the CPU backward (fp32 throughout),
/// and the tensor-core kernels, where their head sizes allow, against their bf16-rounding twin.
pub(super) fn check_attention_backward(
    gpu: &mut Gpu,
    checks: &mut Vec<Check>,
) -> Result<(), CudaError> {
    use crate::backend::cuda::decoder::tiled_attention_head;
    use crate::model::attention_backward::attention_backward;
    let mut rng = StdRng::seed_from_u64(22);
    let shapes = [(37usize, 4usize, 2usize, 64usize), (300, 32, 8, 128), (1024, 8, 2, 128)];
    for (len, nh, nkv, hd) in shapes {
        let c = AttnCase::random(&mut rng, (len, nh, nkv, hd));
        let shape = format!("len={len} heads={nh}/{nkv} head_dim={hd}");
        let mut runs = vec![("attention_backward_f32", attention_backward(&c.input()), false)];
        if tiled_attention_head(hd) {
            let want = twins::attention_backward_bf16(&c.input());
            runs.push(("attention_backward_tiled", want, true));
        }
        for (name, (want_dq, want_dk, want_dv), tiled) in runs {
            let (dq, dk, dv) = run_attention_backward(gpu, &c, tiled)?;
            // Sums over up to `len` keys or queries: fp32, in another order than the twin's.
            for (what, got, want) in
                [("dq", dq, &want_dq), ("dk", dk, &want_dk), ("dv", dv, &want_dv)]
            {
                compare(checks, &format!("{name} ({what})"), shape.clone(), &got, want, 1e-3, 1e-3);
            }
        }
    }
    Ok(())
}

/// `(dq, dk, dv)` of one case from the direct kernels or the tiled ones (with the partials' sum).
fn run_attention_backward(gpu: &mut Gpu, c: &AttnCase, tiled: bool) -> Result<Grads, CudaError> {
    let (len, nh, nkv, hd) = c.dims;
    let (gq, gk, gv, go) =
        (gpu.up_bf16(&c.q)?, gpu.up_bf16(&c.k)?, gpu.up_bf16(&c.v)?, gpu.up_bf16(&c.o)?);
    let gdo = gpu.up(&c.d_o)?;
    let mut gdq = gpu.zeros::<f32>(len * nh * hd)?;
    let (mut glse, mut gdelta) = (gpu.zeros::<f32>(len * nh)?, gpu.zeros::<f32>(len * nh)?);
    let (mut gdk, mut gdv) = (gpu.zeros::<f32>(len * nkv * hd)?, gpu.zeros::<f32>(len * nkv * hd)?);
    let (l, h, kv, d) = (len as i32, nh as i32, nkv as i32, hd as i32);
    let (q_stride, kv_stride) = ((nh * hd) as i32, (nkv * hd) as i32);
    let scale = 1.0 / (hd as f32).sqrt();
    let file = if tiled { "attention_tiled.cu" } else { "attention_backward.cu" };
    let f = gpu.func(
        file,
        if tiled { "attention_backward_dq_tiled" } else { "attention_backward_dq_f32" },
    )?;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&gq).arg(&gk).arg(&gv).arg(&go).arg(&gdo).arg(&mut gdq).arg(&mut glse);
    b.arg(&mut gdelta).arg(&l).arg(&h).arg(&kv).arg(&d).arg(&scale).arg(&q_stride);
    let grid_y = if tiled { len.div_ceil(32) } else { len };
    // SAFETY: argument list matches attention_backward_dq_f32 and attention_backward_dq_tiled
    // alike; len <= AB_MAX_LEN, head_dim a multiple of 32 up to 256 (64 or 128 when tiled),
    // 128 threads; every buffer holds what the shape needs.
    unsafe { b.launch(cfg((n32(nh), n32(grid_y), 1), 128)) }?;
    if tiled {
        let (mut dk_part, mut dv_part) =
            (gpu.zeros::<f32>(len * nh * hd)?, gpu.zeros::<f32>(len * nh * hd)?);
        let f = gpu.func(file, "attention_backward_dkv_tiled")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&gq).arg(&gk).arg(&gv).arg(&gdo).arg(&glse).arg(&gdelta).arg(&mut dk_part);
        b.arg(&mut dv_part).arg(&l).arg(&h).arg(&kv).arg(&d).arg(&scale);
        // SAFETY: argument list matches attention_backward_dkv_tiled; the partials hold
        // len * num_heads * head_dim.
        unsafe { b.launch(cfg((n32(nh), n32(grid_y), 1), 128)) }?;
        let f = gpu.func(file, "attention_backward_dkv_sum_f32")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&dk_part).arg(&dv_part).arg(&mut gdk).arg(&mut gdv);
        b.arg(&l).arg(&h).arg(&kv).arg(&d).arg(&kv_stride);
        // SAFETY: argument list matches attention_backward_dkv_sum_f32, over the partials.
        unsafe { b.launch(cfg((n32(nkv), n32(len), 1), 128)) }?;
    } else {
        let f = gpu.func(file, "attention_backward_dkv_f32")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&gq).arg(&gk).arg(&gv).arg(&gdo).arg(&glse).arg(&gdelta).arg(&mut gdk);
        b.arg(&mut gdv).arg(&l).arg(&h).arg(&kv).arg(&d).arg(&scale).arg(&kv_stride);
        // SAFETY: argument list matches attention_backward_dkv_f32, as above.
        unsafe { b.launch(cfg((n32(nkv), n32(len), 1), 128)) }?;
    }
    Ok((gpu.down(&gdq)?, gpu.down(&gdk)?, gpu.down(&gdv)?))
}
