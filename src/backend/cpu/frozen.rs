//! A frozen weight as training's products read it (`--train-dtype`): in `f32` through the
//! training GEMM, or in bf16 — operands rounded to bf16, products summed in `f32`, as the
//! GPU trains — on AMX tiles where the CPU has them and through the `f32` kernels over the
//! rounded values where it does not.

use super::gemm::{gemm_weight, MatRef, PackedWeight};

/// The precision of training's products with frozen weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TrainDtype {
    /// f32 operands and sums: the reference, and what the gradient tests check exactly.
    #[default]
    F32,
    /// bf16 operands (weights and activations rounded to nearest even), f32 sums; LoRA
    /// weights, their products, attention and the optimizer stay f32. Several times faster
    /// on CPUs with AMX.
    Bf16,
}

impl std::fmt::Display for TrainDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrainDtype::F32 => "f32",
            TrainDtype::Bf16 => "bf16",
        })
    }
}

/// `v` rounded to the nearest bf16 (ties to even), as an `f32`; NaN stays NaN.
#[inline(always)]
pub fn round_bf16(v: f32) -> f32 {
    let bits = v.to_bits();
    let rounded = if v.is_nan() {
        bits | 0x0040_0000
    } else {
        bits.wrapping_add(0x7FFF + ((bits >> 16) & 1))
    };
    f32::from_bits(rounded & 0xFFFF_0000)
}

/// A frozen `[k, n]` right operand of `C (+)= A · W`, packed once for its precision.
pub struct FrozenWeight {
    kind: Kind,
}

enum Kind {
    F32(PackedWeight),
    /// Rounded to bf16, read by the `f32` kernels (with `A` rounded per product).
    Bf16(PackedWeight),
    #[cfg(target_arch = "x86_64")]
    Amx(super::amx::AmxWeight),
}

impl FrozenWeight {
    /// Packs `w` (any strides) for products in `dtype`.
    pub fn new(w: &MatRef<'_>, dtype: TrainDtype) -> Self {
        #[cfg(target_arch = "x86_64")]
        let amx = super::amx::available();
        #[cfg(not(target_arch = "x86_64"))]
        let amx = false;
        Self::build(w, dtype, amx)
    }

    /// As [`Self::new`], bf16 on AMX only when `amx` (which must then be available).
    fn build(w: &MatRef<'_>, dtype: TrainDtype, amx: bool) -> Self {
        #[cfg(target_arch = "x86_64")]
        if dtype == TrainDtype::Bf16 && amx {
            return Self { kind: Kind::Amx(super::amx::AmxWeight::new(w)) };
        }
        let _ = amx;
        let (rows, cols) = (w.rows, w.cols);
        let dense = w.cs == 1 && w.rs == cols;
        if dtype == TrainDtype::F32 && dense {
            return Self { kind: Kind::F32(PackedWeight::new(&w.data[..rows * cols], rows, cols)) };
        }
        let round = if dtype == TrainDtype::Bf16 { round_bf16 } else { |v| v };
        let mut values = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            values.extend((0..cols).map(|j| round(w.data[i * w.rs + j * w.cs])));
        }
        let packed = PackedWeight::new(&values, rows, cols);
        Self {
            kind: if dtype == TrainDtype::Bf16 { Kind::Bf16(packed) } else { Kind::F32(packed) },
        }
    }

    pub fn bytes(&self) -> usize {
        match &self.kind {
            Kind::F32(p) | Kind::Bf16(p) => p.bytes(),
            #[cfg(target_arch = "x86_64")]
            Kind::Amx(p) => p.bytes(),
        }
    }

    /// Whether products run on AMX tiles.
    pub fn on_amx(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if let Kind::Amx(_) = self.kind {
            return true;
        }
        false
    }

    /// `c[i * ldc + j] (+)= Σ_p a(i, p) · w(p, j)` on the current rayon pool (with `a`
    /// rounded to bf16 first in the bf16 precision).
    pub fn product(&self, a: MatRef<'_>, accumulate: bool, c: &mut [f32], ldc: usize) {
        match &self.kind {
            Kind::F32(w) => gemm_weight(a, w, accumulate, c, ldc),
            Kind::Bf16(w) => {
                let mut rounded = Vec::with_capacity(a.rows * a.cols);
                for i in 0..a.rows {
                    rounded.extend((0..a.cols).map(|j| round_bf16(a.data[i * a.rs + j * a.cs])));
                }
                gemm_weight(MatRef::new(&rounded, a.rows, a.cols), w, accumulate, c, ldc);
            }
            #[cfg(target_arch = "x86_64")]
            Kind::Amx(w) => w.product(&a, accumulate, c, ldc),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::cpu::matmul::tests::data;

    /// `c + a · b` over operands rounded to bf16, in f64, and the bound an `f32` sum of
    /// those exact products may stray from it: `k` roundings of at most `2^-24` of the
    /// running sum's magnitude, which the sum of `|a·b|` bounds.
    pub(crate) fn reference(
        a: &MatRef<'_>,
        b: &MatRef<'_>,
        c0: &[f32],
        ldc: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let (m, k, n) = (a.rows, a.cols, b.cols);
        let (mut want, mut bound) = (vec![0f64; m * n], vec![0f64; m * n]);
        for i in 0..m {
            for j in 0..n {
                let mut s = f64::from(c0[i * ldc + j]);
                let mut mag = s.abs();
                for p in 0..k {
                    let x = f64::from(round_bf16(a.data[i * a.rs + p * a.cs]))
                        * f64::from(round_bf16(b.data[p * b.rs + j * b.cs]));
                    s += x;
                    mag += x.abs();
                }
                want[i * n + j] = s;
                bound[i * n + j] = (k + 1) as f64 * mag * 2f64.powi(-24);
            }
        }
        (want, bound)
    }

    /// Checks `w`'s product against [`reference`], overwriting and accumulating.
    pub(crate) fn check(w: &FrozenWeight, a: &MatRef<'_>, b: &MatRef<'_>, what: &str) {
        let (m, n) = (a.rows, b.cols);
        let ldc = n + 3;
        for accumulate in [false, true] {
            let c0 = data(m * ldc, 5);
            let mut c = c0.clone();
            w.product(*a, accumulate, &mut c, ldc);
            let start = if accumulate { c0.clone() } else { vec![0.0; m * ldc] };
            let (want, bound) = reference(a, b, &start, ldc);
            for i in 0..m {
                for j in 0..ldc {
                    let got = c[i * ldc + j];
                    if j >= n {
                        assert_eq!(got, c0[i * ldc + j], "{what}: ({i}, {j}) past n written");
                        continue;
                    }
                    let err = (f64::from(got) - want[i * n + j]).abs();
                    assert!(
                        err <= bound[i * n + j],
                        "{what} accumulate {accumulate}: ({i}, {j}) {got} vs {} (bound {:e})",
                        want[i * n + j],
                        bound[i * n + j]
                    );
                }
            }
        }
    }

    /// Shapes with partial tiles in every dimension, a `k` deeper than one pass, and `W`
    /// read through a transposed view (as the forward packs `Wᵀ`).
    pub(crate) const SHAPES: [(usize, usize, usize); 4] =
        [(1, 5, 3), (37, 70, 50), (64, 96, 96), (19, 2100, 40)];

    /// Builds the product of every shape with `build` (which must pack bf16 on AMX exactly
    /// when `amx`), `W` given both directly and through a transposed view, and checks it.
    pub(crate) fn check_shapes(
        shapes: &[(usize, usize, usize)],
        amx: bool,
        build: impl Fn(&MatRef<'_>) -> FrozenWeight,
    ) {
        for &(m, k, n) in shapes {
            let (a, b) = (data(m * k, 1), data(k * n, 2));
            let a = MatRef::new(&a, m, k);
            for transposed in [false, true] {
                let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
                let bm =
                    if transposed { MatRef::new(&bt, n, k).t() } else { MatRef::new(&b, k, n) };
                let w = build(&bm);
                assert_eq!(w.on_amx(), amx);
                let what = format!("AMX {amx}: [{m}, {k}] x [{k}, {n}], Bᵀ {transposed}");
                check(&w, &a, &bm, &what);
            }
        }
    }

    #[test]
    fn bf16_products_without_amx_sum_the_rounded_operands() {
        check_shapes(&SHAPES, false, |w| FrozenWeight::build(w, TrainDtype::Bf16, false));
    }

    #[test]
    fn f32_weights_take_operands_as_they_are() {
        let (m, k, n) = (9, 33, 20);
        let (a, b) = (data(m * k, 3), data(k * n, 4));
        let w = FrozenWeight::new(&MatRef::new(&b, k, n), TrainDtype::F32);
        let mut c = vec![0f32; m * n];
        w.product(MatRef::new(&a, m, k), false, &mut c, n);
        let mut want = vec![0f32; m * n];
        crate::backend::cpu::gemm::gemm(
            1.0,
            MatRef::new(&a, m, k),
            MatRef::new(&b, k, n),
            false,
            &mut want,
            n,
        );
        assert_eq!(c, want);
        // Rounding would have moved some of them.
        let mut r = vec![0f32; m * n];
        FrozenWeight::build(&MatRef::new(&b, k, n), TrainDtype::Bf16, false).product(
            MatRef::new(&a, m, k),
            false,
            &mut r,
            n,
        );
        assert_ne!(c, r);
    }

    #[test]
    fn rounding_is_to_nearest_even_and_keeps_nan() {
        for v in [1.0f32, -2.5, 3.3333333, 1e-30, 6.0e37, f32::INFINITY, 0.0, -0.0] {
            assert_eq!(round_bf16(v).to_bits(), half::bf16::from_f32(v).to_f32().to_bits());
        }
        // Halfway cases go to the even neighbour.
        let below = f32::from_bits(0x3F80_8000); // 1 + 2^-8: halfway, even is 1.0
        assert_eq!(round_bf16(below), 1.0);
        let above = f32::from_bits(0x3F81_8000); // halfway, even is up
        assert_eq!(round_bf16(above).to_bits(), 0x3F82_0000);
        assert!(round_bf16(f32::NAN).is_nan());
        assert!(round_bf16(f32::from_bits(0x7F80_0001)).is_nan());
    }
}
