//! `y = x · Wᵀ` for row-major activations `x [m, k]` and weights `W [n, k]` (PyTorch Linear
//! layout), written for LLM serving on a CPU:
//! - each weight row is streamed once for all rows of `x` (decode is bound by reading weights);
//! - the result for one row of `x` is bit-identical whatever `m` is (batch invariance): every
//!   output element is one dot product accumulated in the same order by every code path.

use rayon::prelude::*;

/// Weight rows per parallel work item: enough to amortise scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 16;

/// Raw pointer that may cross threads; each task writes a disjoint set of output elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ`.
pub fn matmul_t(x: &[f32], w: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) {
    assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n, "matmul_t shapes"); // ok: caller bug
    if m == 0 || n == 0 {
        return;
    }
    let ptr = OutPtr(out.as_mut_ptr());
    let tasks = n.div_ceil(ROWS_PER_TASK);
    (0..tasks).into_par_iter().for_each(|t| {
        let j0 = t * ROWS_PER_TASK;
        let j1 = (j0 + ROWS_PER_TASK).min(n);
        let p = ptr;
        for i in 0..m {
            let xi = &x[i * k..(i + 1) * k];
            let mut j = j0;
            while j + 4 <= j1 {
                let d = dot4(xi, &w[j * k..(j + 4) * k], k);
                // SAFETY: row i, columns j..j+4 belong to this task alone and are in bounds.
                unsafe {
                    for (c, v) in d.iter().enumerate() {
                        *p.0.add(i * n + j + c) = *v;
                    }
                }
                j += 4;
            }
            while j < j1 {
                let d = dot(xi, &w[j * k..(j + 1) * k]);
                // SAFETY: as above.
                unsafe { *p.0.add(i * n + j) = d };
                j += 1;
            }
        }
    });
}

/// Dot product of two equally long slices with the crate's fixed accumulation order.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let k = a.len().min(b.len());
    let mut acc = [0f32; 1];
    dot_rows::<1>(a, b, k, &mut acc);
    acc[0]
}

/// Four dot products of `x` with four consecutive rows of `w4` (each `k` long).
fn dot4(x: &[f32], w4: &[f32], k: usize) -> [f32; 4] {
    let mut acc = [0f32; 4];
    dot_rows::<4>(x, w4, k, &mut acc);
    acc
}

fn dot_rows<const R: usize>(x: &[f32], w: &[f32], k: usize, out: &mut [f32; R]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            unsafe { avx2::dot_rows::<R>(x, w, k, out) };
            return;
        }
    }
    portable_dot_rows::<R>(x, w, k, out)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Eight lanes accumulated separately, then summed pairwise: the same order as the AVX2 path
/// (which fuses multiply and add, so the two paths differ in rounding but each is deterministic).
fn portable_dot_rows<const R: usize>(x: &[f32], w: &[f32], k: usize, out: &mut [f32; R]) {
    let body = k / 8 * 8;
    for (r, o) in out.iter_mut().enumerate() {
        let wr = &w[r * k..(r + 1) * k];
        let mut lanes = [0f32; 8];
        for c in (0..body).step_by(8) {
            for l in 0..8 {
                lanes[l] += x[c + l] * wr[c + l];
            }
        }
        let mut s = hsum8(&lanes);
        for c in body..k {
            s += x[c] * wr[c];
        }
        *o = s;
    }
}

#[inline(always)]
fn hsum8(l: &[f32; 8]) -> f32 {
    let a = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let b = [a[0] + a[2], a[1] + a[3]];
    b[0] + b[1]
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows<const R: usize>(x: &[f32], w: &[f32], k: usize, out: &mut [f32; R]) {
        let body = k / 8 * 8;
        let xp = x.as_ptr();
        let wp = w.as_ptr();
        let mut acc = [_mm256_setzero_ps(); R];
        let mut c = 0;
        while c < body {
            let xv = _mm256_loadu_ps(xp.add(c));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wp.add(r * k + c)), *a);
            }
            c += 8;
        }
        for r in 0..R {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r]);
            let mut s = super::hsum8(&lanes);
            for c in body..k {
                s = x[c].mul_add(w[r * k + c], s);
            }
            out[r] = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|c| x[i * k + c] as f64 * w[j * k + c] as f64).sum();
            }
        }
        out
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_f64_reference_on_odd_shapes() {
        for &(m, k, n) in &[(1, 8, 1), (3, 13, 7), (5, 64, 37), (17, 100, 33), (2, 576, 70)] {
            let x = data(m * k, 1);
            let w = data(n * k, 2);
            let mut out = vec![0f32; m * n];
            matmul_t(&x, &w, m, k, n, &mut out);
            let r = reference(&x, &w, m, k, n);
            for (a, b) in out.iter().zip(&r) {
                assert!(
                    (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                    "{a} vs {b} at {m}x{k}x{n}"
                );
            }
        }
    }

    #[test]
    fn row_results_do_not_depend_on_batch_size() {
        let (k, n) = (96, 45);
        let x = data(9 * k, 3);
        let w = data(n * k, 4);
        let mut all = vec![0f32; 9 * n];
        matmul_t(&x, &w, 9, k, n, &mut all);
        for i in 0..9 {
            let mut one = vec![0f32; n];
            matmul_t(&x[i * k..(i + 1) * k], &w, 1, k, n, &mut one);
            assert_eq!(&all[i * n..(i + 1) * n], &one[..], "row {i}");
        }
    }
}
