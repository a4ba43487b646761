//! cuBLASLt products of every form training uses (`gemm::Product`): operands read transposed
//! or not, column blocks of wider rows, bf16 or fp32 output, added into the output or not;
//! each against the product computed in f64 on the host from the same bf16 inputs.

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::{compare, random_bf16, Check, BF16_ATOL, BF16_RTOL};
use crate::backend::cuda::decoder::cuda::CudaOps;
use crate::backend::cuda::gemm::{addr, Elem, Gemm, Operand, Product};
use crate::backend::cuda::twins::round_bf16;
use crate::backend::cuda::CudaError;

/// One case: `d[m, n] = alpha · op(a) · op(b) + beta · d` with `a` `[ar, ald]` read from column
/// `a0` (transposed when `ta`), `b` `[br, bld]` (transposed when `tb`).
struct Case {
    name: &'static str,
    mnk: (usize, usize, usize),
    a: (usize, usize, bool),
    a0: usize,
    b: (usize, bool),
    out: Elem,
    alpha: f32,
    beta: f32,
}

/// Element `(i, j)` of `op(x)` for row-major `x` with rows `ld` apart from column `c0`.
fn at(x: &[f32], ld: usize, c0: usize, trans: bool, i: usize, j: usize) -> f64 {
    let (r, c) = if trans { (j, i) } else { (i, j) };
    f64::from(x[r * ld + c0 + c])
}

pub(super) fn check_products(ops: &mut CudaOps, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(41);
    let (t, r, hid, ld, out_dim) = (37usize, 16usize, 256usize, 448usize, 64usize);
    let cases = [
        // dx = dy · W
        Case {
            name: "dy·W",
            mnk: (t, hid, 300),
            a: (t, 300, false),
            a0: 0,
            b: (hid, false),
            out: Elem::F32,
            alpha: 1.0,
            beta: 0.0,
        },
        // dB += s · dYᵀ u, dY a column block of a fused gradient
        Case {
            name: "dYᵀ·u (+=)",
            mnk: (out_dim, r, t),
            a: (t, ld, true),
            a0: 128,
            b: (r, false),
            out: Elem::F32,
            alpha: 0.5,
            beta: 1.0,
        },
        // g = s · dY B, bf16 out
        Case {
            name: "dY·B (bf16)",
            mnk: (t, r, out_dim),
            a: (t, ld, false),
            a0: 128,
            b: (r, false),
            out: Elem::Bf16,
            alpha: 0.5,
            beta: 0.0,
        },
        // dA += gᵀ x
        Case {
            name: "gᵀ·x (+=)",
            mnk: (r, hid, t),
            a: (t, r, true),
            a0: 0,
            b: (hid, false),
            out: Elem::F32,
            alpha: 1.0,
            beta: 1.0,
        },
        // dx += g A
        Case {
            name: "g·A (+=)",
            mnk: (t, hid, r),
            a: (t, r, false),
            a0: 0,
            b: (hid, false),
            out: Elem::F32,
            alpha: 1.0,
            beta: 1.0,
        },
        // the forward's x · Wᵀ
        Case {
            name: "x·Wᵀ",
            mnk: (t, 300, hid),
            a: (t, hid, false),
            a0: 0,
            b: (hid, true),
            out: Elem::F32,
            alpha: 1.0,
            beta: 0.0,
        },
    ];
    let mut gemm = Gemm::new(&ops.gpu.toolkit, ops.gpu.stream.clone())?;
    for c in cases {
        let (m, n, k) = c.mnk;
        let (arows, ald, ta) = c.a;
        let (bld, tb) = c.b;
        let brows = if tb { n } else { k };
        let a = random_bf16(&mut rng, arows * ald, 1.0);
        let b = random_bf16(&mut rng, brows * bld, 1.0);
        let d0 = random_bf16(&mut rng, m * n, 1.0);
        let mut want = Vec::with_capacity(m * n);
        for i in 0..m {
            for j in 0..n {
                let s: f64 =
                    (0..k).map(|p| at(&a, ald, c.a0, ta, i, p) * at(&b, bld, 0, tb, p, j)).sum();
                let v = f64::from(c.alpha) * s + f64::from(c.beta) * f64::from(d0[i * n + j]);
                want.push(v as f32);
            }
        }
        let (da, db) = (ops.gpu.up_bf16(&a)?, ops.gpu.up_bf16(&b)?);
        let st = ops.gpu.stream.clone();
        let shape = format!("{m}x{n}x{k}, alpha {} beta {}", c.alpha, c.beta);
        let name = format!("gemm product {}", c.name);
        let a_op = Operand { ptr: addr(&da, &st, c.a0), elem: Elem::Bf16, ld: ald, trans: ta };
        let b_op = Operand { ptr: addr(&db, &st, 0), elem: Elem::Bf16, ld: bld, trans: tb };
        match c.out {
            Elem::F32 => {
                let dd = ops.gpu.up(&d0)?;
                let d = Operand { ptr: addr(&dd, &st, 0), elem: Elem::F32, ld: n, trans: false };
                let p = Product { a: a_op, b: b_op, d, mnk: c.mnk, alpha: c.alpha, beta: c.beta };
                // SAFETY: every buffer holds the rows and columns the case reads and writes at
                // its ld, and lives until the synchronising copy below.
                unsafe { gemm.product(&p) }?;
                let got = ops.gpu.down(&dd)?;
                compare(checks, &name, shape, &got, &want, 1e-3, 1e-3);
            }
            Elem::Bf16 => {
                let dd = ops.gpu.up_bf16(&d0)?;
                let d = Operand { ptr: addr(&dd, &st, 0), elem: Elem::Bf16, ld: n, trans: false };
                let p = Product { a: a_op, b: b_op, d, mnk: c.mnk, alpha: c.alpha, beta: c.beta };
                // SAFETY: as above.
                unsafe { gemm.product(&p) }?;
                let got = ops.gpu.down_bf16(&dd, m * n)?;
                let want: Vec<f32> = want.iter().map(|&v| round_bf16(v)).collect();
                compare(checks, &name, shape, &got, &want, BF16_RTOL, BF16_ATOL);
            }
        }
    }
    Ok(())
}
