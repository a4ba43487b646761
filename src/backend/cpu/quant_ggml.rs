//! Weights kept in a GGUF file's own quantization (Q4_0 ... Q8_0, K-quants, F16), multiplied
//! the way llama.cpp does: each activation row is quantized once to the type's `VecDotType`
//! (Q8_0, Q8_1 or Q8_K) and dotted with every weight row by candle's per-type `vec_dot`.
//!
//! Work is split over weight rows (each read once for all activation rows); every output is one
//! `vec_dot` of one weight row and one quantized activation row, and an activation row's
//! quantization depends only on that row, so results do not depend on the batch size or the
//! thread count. Q4_1 (the default model's type) has its own layout and kernel
//! (`quant_ggml_q4_1`) because candle's is scalar; it computes the exact same values.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType,
};
use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;
use std::borrow::Cow;

use super::matmul::{par_row_tasks, OutView};
use super::quant_ggml_q4_1::Q4_1Matrix;

/// A `[rows, cols]` matrix of ggml blocks with its matmul.
pub trait GgmlRows: Send + Sync {
    fn dtype(&self) -> GgmlDType;
    /// `out = x[m, cols] · selfᵀ`.
    fn matmul(&self, x: &[f32], m: usize, out: OutView<'_>);
    /// One row dequantized (`out.len() == cols`).
    fn dequantize_row(&self, r: usize, out: &mut [f32]);
    /// The blocks, row after row, exactly as in the file.
    fn file_bytes(&self) -> Cow<'_, [u8]>;
    /// Bytes held in memory (a kernel's own layout may pad).
    fn size_bytes(&self) -> usize;
}

/// Builds a matrix from the raw bytes of a `dtype` tensor of `[rows, cols]`. F32 and BF16 are
/// served by the dense kernels and are not accepted here.
pub fn ggml_rows(
    dtype: GgmlDType,
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Result<Box<dyn GgmlRows>, String> {
    match dtype {
        GgmlDType::Q4_0 => boxed::<BlockQ4_0>(bytes, rows, cols),
        GgmlDType::Q4_1 => {
            check_size::<BlockQ4_1>(bytes, rows, cols)?;
            Ok(Box::new(Q4_1Matrix::from_file_bytes(bytes, rows, cols)))
        }
        GgmlDType::Q5_0 => boxed::<BlockQ5_0>(bytes, rows, cols),
        GgmlDType::Q5_1 => boxed::<BlockQ5_1>(bytes, rows, cols),
        GgmlDType::Q8_0 => boxed::<BlockQ8_0>(bytes, rows, cols),
        GgmlDType::Q8_1 => boxed::<BlockQ8_1>(bytes, rows, cols),
        GgmlDType::Q2K => boxed::<BlockQ2K>(bytes, rows, cols),
        GgmlDType::Q3K => boxed::<BlockQ3K>(bytes, rows, cols),
        GgmlDType::Q4K => boxed::<BlockQ4K>(bytes, rows, cols),
        GgmlDType::Q5K => boxed::<BlockQ5K>(bytes, rows, cols),
        GgmlDType::Q6K => boxed::<BlockQ6K>(bytes, rows, cols),
        GgmlDType::Q8K => boxed::<BlockQ8K>(bytes, rows, cols),
        GgmlDType::F16 => boxed::<f16>(bytes, rows, cols),
        GgmlDType::F32 | GgmlDType::BF16 => Err(format!("{dtype:?} is not a block type")),
    }
}

/// Bytes of one row of `cols` values of `dtype`, if `cols` is a whole number of blocks.
pub fn ggml_row_bytes(dtype: GgmlDType, cols: usize) -> Result<usize, String> {
    let bs = dtype.block_size();
    if !cols.is_multiple_of(bs) {
        return Err(format!("rows of {cols} values are not whole {dtype:?} blocks of {bs}"));
    }
    Ok(cols / bs * dtype.type_size())
}

fn boxed<T: Kernel + 'static>(
    bytes: &[u8],
    rows: usize,
    cols: usize,
) -> Result<Box<dyn GgmlRows>, String> {
    check_size::<T>(bytes, rows, cols)?;
    let mut blocks = vec![T::zeros(); rows * (cols / T::BLCK_SIZE)];
    // SAFETY: ggml blocks are plain `repr(C)` data (f16/f32 scales, byte arrays) valid for any
    // bit pattern; the destination holds exactly `bytes.len()` bytes (sizes checked above).
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), blocks.as_mut_ptr() as *mut u8, bytes.len())
    };
    Ok(Box::new(GgmlMatrix { rows, cols, blocks }))
}

/// Checks that `bytes` hold exactly a `[rows, cols]` matrix of `T` blocks.
fn check_size<T: GgmlType>(bytes: &[u8], rows: usize, cols: usize) -> Result<(), String> {
    let dtype = T::DTYPE;
    if std::mem::size_of::<T>() != dtype.type_size() || T::VecDotType::BLCK_SIZE != T::BLCK_SIZE {
        return Err(format!("{dtype:?} has an unexpected block layout"));
    }
    let row_bytes = ggml_row_bytes(dtype, cols)?;
    if bytes.len() != rows * row_bytes {
        return Err(format!(
            "{} bytes of {dtype:?} data, expected {} for [{rows}, {cols}]",
            bytes.len(),
            rows * row_bytes
        ));
    }
    Ok(())
}

struct GgmlMatrix<T> {
    rows: usize,
    cols: usize,
    blocks: Vec<T>,
}

/// Activation rows quantized in parallel from this many on.
const PAR_QUANT_ROWS: usize = 8;

impl<T: Kernel> GgmlRows for GgmlMatrix<T> {
    fn dtype(&self) -> GgmlDType {
        T::DTYPE
    }

    fn matmul(&self, x: &[f32], m: usize, out: OutView<'_>) {
        let (k, n) = (self.cols, self.rows);
        assert!(x.len() >= m * k && out.rows() == m && out.cols() == n, "ggml matmul shapes"); // ok: caller bug
        if m == 0 || k == 0 {
            return;
        }
        let bpr = k / T::BLCK_SIZE;
        let mut xq = vec![T::VecDotType::zeros(); m * bpr];
        let quantize = |(xr, q): (&[f32], &mut [T::VecDotType])| T::VecDotType::from_float(xr, q);
        if m >= PAR_QUANT_ROWS {
            x[..m * k].par_chunks_exact(k).zip(xq.par_chunks_exact_mut(bpr)).for_each(quantize);
        } else {
            x[..m * k].chunks_exact(k).zip(xq.chunks_exact_mut(bpr)).for_each(quantize);
        }
        let prepared = T::prepare(&xq, bpr);
        let (xq, prepared) = (&xq, &prepared);
        par_row_tasks(n, |j0, j1| {
            let mut col = vec![0f32; m];
            for j in j0..j1 {
                T::dot_row(k, &self.blocks[j * bpr..(j + 1) * bpr], xq, bpr, prepared, &mut col);
                for (i, v) in col.iter().enumerate() {
                    // SAFETY: i < m, j in this task's own rows.
                    unsafe { out.write(i, j, *v) };
                }
            }
        });
    }

    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let bpr = self.cols / T::BLCK_SIZE;
        T::to_float(&self.blocks[r * bpr..(r + 1) * bpr], &mut out[..self.cols]);
    }

    fn file_bytes(&self) -> Cow<'_, [u8]> {
        // SAFETY: plain data viewed as bytes, same length as the allocation's initialised part.
        Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(
                self.blocks.as_ptr() as *const u8,
                std::mem::size_of_val(self.blocks.as_slice()),
            )
        })
    }

    fn size_bytes(&self) -> usize {
        std::mem::size_of_val(self.blocks.as_slice())
    }
}

/// How a block type multiplies one weight row with every quantized activation row.
pub(crate) trait Kernel: GgmlType + 'static {
    /// What `dot_row` needs besides the quantized activations, derived once per matmul.
    type Prepared: Sync;

    fn prepare(xq: &[Self::VecDotType], bpr: usize) -> Self::Prepared;

    /// `out[i]` = the dot product of weight row `w` with activation row `i` of `xq` (`bpr`
    /// blocks each), `k` values long.
    fn dot_row(
        k: usize,
        w: &[Self],
        xq: &[Self::VecDotType],
        bpr: usize,
        prepared: &Self::Prepared,
        out: &mut [f32],
    );
}

/// Types served by candle's own `vec_dot`, one activation row at a time.
macro_rules! candle_vec_dot {
    ($($t:ty),*) => {$(
        impl Kernel for $t {
            type Prepared = ();

            fn prepare(_: &[Self::VecDotType], _: usize) {}

            fn dot_row(
                k: usize,
                w: &[Self],
                xq: &[Self::VecDotType],
                bpr: usize,
                _: &(),
                out: &mut [f32],
            ) {
                for (o, y) in out.iter_mut().zip(xq.chunks_exact(bpr)) {
                    *o = Self::vec_dot(k, w, y);
                }
            }
        }
    )*};
}

candle_vec_dot!(
    BlockQ4_0, BlockQ5_0, BlockQ5_1, BlockQ8_1, BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K,
    BlockQ8K, f16
);

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::cpu::matmul::tests::{assert_batch_invariant, assert_close, data};
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    pub(crate) fn quantized(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        seed: u32,
    ) -> Box<dyn GgmlRows> {
        let t = Tensor::from_vec(data(rows * cols, seed), (rows, cols), &Device::Cpu);
        let q = t.and_then(|t| QTensor::quantize(&t, dtype)).expect("quantize"); // ok: test
        let bytes = q.data().expect("bytes").to_vec(); // ok: test
        ggml_rows(dtype, &bytes, rows, cols).expect("ggml rows") // ok: test
    }

    fn dequantized(w: &dyn GgmlRows, rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * cols];
        for (r, row) in out.chunks_exact_mut(cols).enumerate() {
            w.dequantize_row(r, row);
        }
        out
    }

    fn mm(w: &dyn GgmlRows, x: &[f32], m: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        w.matmul(x, m, OutView::new(&mut out, m, n));
        out
    }

    /// The activations as the kernel sees them: each row rounded through `VecDotType`.
    fn requantized<T: GgmlType>(x: &[f32], k: usize) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        for (xr, or) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
            let mut q = vec![T::VecDotType::zeros(); k / T::BLCK_SIZE];
            T::VecDotType::from_float(xr, &mut q);
            T::VecDotType::to_float(&q, or);
        }
        out
    }

    #[test]
    fn matches_f64_reference_on_dequantized_weights_and_requantized_activations() {
        let cases: [(GgmlDType, usize); 4] = [
            (GgmlDType::Q8_0, 160),
            (GgmlDType::Q4_0, 64),
            (GgmlDType::Q6K, 512),
            (GgmlDType::Q4K, 256),
        ];
        for (dtype, k) in cases {
            let (m, n) = (5, 21);
            let w = quantized(dtype, n, k, 3);
            let x = data(m * k, 4);
            let got = mm(w.as_ref(), &x, m, n);
            let xq = match dtype {
                GgmlDType::Q8_0 | GgmlDType::Q4_0 => requantized::<BlockQ8_0>(&x, k),
                _ => requantized::<BlockQ6K>(&x, k),
            };
            assert_close(&got, &xq, &dequantized(w.as_ref(), n, k), m, k, n);
        }
    }

    #[test]
    fn row_results_do_not_depend_on_batch_size() {
        for (dtype, k) in [(GgmlDType::Q4_1, 128), (GgmlDType::Q8_0, 64), (GgmlDType::Q6K, 256)] {
            let n = 19;
            let w = quantized(dtype, n, k, 5);
            assert_batch_invariant(k, n, |x, m, out| w.matmul(x, m, OutView::new(out, m, n)));
        }
    }

    #[test]
    fn rejects_partial_blocks_and_wrong_sizes() {
        let e = ggml_rows(GgmlDType::Q4_1, &[0u8; 40], 1, 48).err().unwrap_or_default();
        assert!(e.contains("not whole Q4_1 blocks"), "{e}");
        let e = ggml_rows(GgmlDType::Q8_0, &[0u8; 30], 1, 32).err().unwrap_or_default();
        assert!(e.contains("expected 34"), "{e}");
        assert!(ggml_rows(GgmlDType::F32, &[0u8; 4], 1, 1).is_err());
    }
}
