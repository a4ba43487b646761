//! Weight matrices of linear layers in the storage formats the CPU kernels read, and the
//! `--weights-dtype` choice between them.
//!
//! A matrix is one or more row blocks ("parts"), each in one format: fused projections (q/k/v,
//! gate/up) whose source tensors differ in type (common in GGUF files) stay fused, each part
//! writing its own output columns.

use std::sync::Arc;

use candle_core::quantized::GgmlDType;

use crate::backend::cpu::matmul::OutView;
use crate::backend::cpu::matmul_bf16::{bf16_to_f32, matmul_t_bf16, to_bf16, Bf16};
use crate::backend::cpu::packed::PackedF32;
use crate::backend::cpu::quant::{
    dequantize_row_q8_0, matmul_t_q8_0, q8_0_blocks_per_row, quantize_q8_0, BlockQ8_0,
};
use crate::backend::cpu::quant_ggml::{ggml_rows, GgmlRows};

/// How linear-layer weights are stored (`--weights-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum WeightsDtype {
    /// f32, dequantized from the file (the reference precision).
    #[default]
    F32,
    /// bf16: half the bytes of f32, widened to f32 in registers.
    Bf16,
    /// ggml's Q8_0 (32 int8 + one f16 scale), quantized at load; f32 activations.
    #[value(name = "q8_0")]
    Q8_0,
    /// Each tensor in its GGUF file's own quantization, activations quantized as llama.cpp
    /// does (Hugging Face directories fall back to q8_0).
    Gguf,
}

impl std::fmt::Display for WeightsDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightsDtype::F32 => "f32",
            WeightsDtype::Bf16 => "bf16",
            WeightsDtype::Q8_0 => "q8_0",
            WeightsDtype::Gguf => "gguf",
        })
    }
}

#[derive(Clone)]
enum Storage {
    /// In 16-row panels for the outer-product kernel.
    F32(PackedF32),
    Bf16(Vec<Bf16>),
    Q8_0(Vec<BlockQ8_0>),
    Ggml(Arc<dyn GgmlRows>),
}

#[derive(Clone)]
struct Part {
    rows: usize,
    storage: Storage,
}

impl Part {
    fn kind(&self) -> String {
        match &self.storage {
            Storage::F32(_) => "f32".into(),
            Storage::Bf16(_) => "bf16".into(),
            Storage::Q8_0(_) => "q8_0".into(),
            Storage::Ggml(g) => format!("gguf {:?}", g.dtype()),
        }
    }

    fn size_bytes(&self) -> usize {
        match &self.storage {
            Storage::F32(d) => d.size_bytes(),
            Storage::Bf16(d) => std::mem::size_of_val(d.as_slice()),
            Storage::Q8_0(d) => std::mem::size_of_val(d.as_slice()),
            Storage::Ggml(g) => g.size_bytes(),
        }
    }
}

/// A `[rows, cols]` matrix (PyTorch Linear layout: one row per output feature).
#[derive(Clone)]
pub struct WeightMatrix {
    pub rows: usize,
    pub cols: usize,
    parts: Vec<Part>,
}

impl std::fmt::Debug for WeightMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightMatrix([{}, {}] {})", self.rows, self.cols, self.format())
    }
}

impl WeightMatrix {
    /// f32 storage.
    pub fn from_f32(data: Vec<f32>, rows: usize, cols: usize) -> Option<Self> {
        Self::from_f32_as(data, rows, cols, WeightsDtype::F32)
    }

    /// Stores f32 values in `dtype`; `Gguf` has no file type to keep here and means Q8_0.
    pub fn from_f32_as(
        data: Vec<f32>,
        rows: usize,
        cols: usize,
        dtype: WeightsDtype,
    ) -> Option<Self> {
        if data.len() != rows * cols {
            return None;
        }
        let storage = match dtype {
            WeightsDtype::F32 => Storage::F32(PackedF32::pack(&data, rows, cols)?),
            WeightsDtype::Bf16 => Storage::Bf16(to_bf16(&data)),
            WeightsDtype::Q8_0 | WeightsDtype::Gguf => {
                Storage::Q8_0(quantize_q8_0(&data, rows, cols))
            }
        };
        Some(Self { rows, cols, parts: vec![Part { rows, storage }] })
    }

    /// Keeps a GGUF tensor's own encoding: `bytes` are its rows, row after row. F32 and BF16
    /// tensors use the dense kernels.
    pub fn from_ggml(
        dtype: GgmlDType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<Self, String> {
        let count = rows * cols;
        let storage = match dtype {
            GgmlDType::F32 | GgmlDType::BF16 => {
                let width = dtype.type_size();
                if bytes.len() != count * width {
                    return Err(format!(
                        "{} bytes of {dtype:?} data, expected {} for [{rows}, {cols}]",
                        bytes.len(),
                        count * width
                    ));
                }
                if dtype == GgmlDType::F32 {
                    let values: Vec<f32> = bytes
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    let packed = PackedF32::pack(&values, rows, cols);
                    Storage::F32(packed.ok_or_else(|| format!("[{rows}, {cols}] f32 data"))?)
                } else {
                    Storage::Bf16(
                        bytes
                            .chunks_exact(2)
                            .map(|b| Bf16(u16::from_le_bytes([b[0], b[1]])))
                            .collect(),
                    )
                }
            }
            _ => Storage::Ggml(Arc::from(ggml_rows(dtype, bytes, rows, cols)?)),
        };
        Ok(Self { rows, cols, parts: vec![Part { rows, storage }] })
    }

    /// Stacks matrices with the same `cols` (fused q/k/v or gate/up projections). Neighbouring
    /// parts in the same format are merged into one.
    pub fn concat_rows(parts: Vec<WeightMatrix>) -> Option<Self> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut merged: Vec<Part> = Vec::new();
        for part in parts.into_iter().flat_map(|p| p.parts) {
            match merged.last_mut() {
                Some(last) if last.kind() == part.kind() => *last = merge(last, part, cols)?,
                _ => merged.push(part),
            }
        }
        Some(Self { rows, cols, parts: merged })
    }

    /// `out[m, rows] = x[m, cols] · selfᵀ`.
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (k, ld) = (self.cols, self.rows);
        let mut col0 = 0;
        for part in &self.parts {
            let view = OutView::columns(out, m, ld, col0, part.rows);
            match &part.storage {
                Storage::F32(w) => w.matmul_t(x, m, view),
                Storage::Bf16(w) => matmul_t_bf16(x, w, m, k, part.rows, view),
                Storage::Q8_0(w) => matmul_t_q8_0(x, w, m, k, part.rows, view),
                Storage::Ggml(g) => g.matmul(x, m, view),
            }
            col0 += part.rows;
        }
    }

    /// Row `r` dequantized into `out` (`out.len() == cols`), e.g. an embedding lookup.
    pub fn row_into(&self, mut r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols, "row {r} of {self:?}"); // ok: caller bug
        let k = self.cols;
        for part in &self.parts {
            if r >= part.rows {
                r -= part.rows;
                continue;
            }
            match &part.storage {
                Storage::F32(w) => w.row_into(r, out),
                Storage::Bf16(w) => {
                    for (o, v) in out.iter_mut().zip(&w[r * k..(r + 1) * k]) {
                        *o = bf16_to_f32(*v);
                    }
                }
                Storage::Q8_0(w) => {
                    let bpr = q8_0_blocks_per_row(k);
                    dequantize_row_q8_0(&w[r * bpr..(r + 1) * bpr], out);
                }
                Storage::Ggml(g) => g.dequantize_row(r, out),
            }
            return;
        }
    }

    /// Bytes of weight data one forward reads.
    pub fn size_bytes(&self) -> usize {
        self.parts.iter().map(Part::size_bytes).sum()
    }

    /// The storage formats of the parts, e.g. `q8_0` or `gguf Q4_1 + gguf Q6K`.
    pub fn format(&self) -> String {
        self.parts.iter().map(Part::kind).collect::<Vec<_>>().join(" + ")
    }
}

/// One part holding `a`'s rows then `b`'s (same format, `cols` wide).
fn merge(a: &Part, b: Part, cols: usize) -> Option<Part> {
    let rows = a.rows + b.rows;
    let storage = match (&a.storage, b.storage) {
        (Storage::F32(x), Storage::F32(y)) => {
            Storage::F32(PackedF32::pack(&[x.to_rows(), y.to_rows()].concat(), rows, cols)?)
        }
        (Storage::Bf16(x), Storage::Bf16(y)) => Storage::Bf16([x.as_slice(), &y].concat()),
        (Storage::Q8_0(x), Storage::Q8_0(y)) => Storage::Q8_0([x.as_slice(), &y].concat()),
        (Storage::Ggml(x), Storage::Ggml(y)) => {
            let bytes = [x.file_bytes(), y.file_bytes()].concat();
            Storage::Ggml(Arc::from(ggml_rows(x.dtype(), &bytes, rows, cols).ok()?))
        }
        _ => return None,
    };
    Some(Part { rows, storage })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0).collect()
    }

    fn q4_1_bytes(rows: usize, cols: usize) -> Vec<u8> {
        let dev = candle_core::Device::Cpu;
        let t = candle_core::Tensor::from_vec(values(rows * cols), (rows, cols), &dev);
        let q = t.and_then(|t| candle_core::quantized::QTensor::quantize(&t, GgmlDType::Q4_1));
        q.and_then(|q| q.data().map(|d| d.to_vec())).expect("quantize") // ok: test
    }

    #[test]
    fn sizes_are_what_the_formats_store() {
        let (rows, cols) = (6, 64);
        let make =
            |d| WeightMatrix::from_f32_as(values(rows * cols), rows, cols, d).expect("shape");
        // f32 is stored in 16-row panels, the last one padded.
        assert_eq!(make(WeightsDtype::F32).size_bytes(), 16 * cols * 4);
        assert_eq!(make(WeightsDtype::Bf16).size_bytes(), rows * cols * 2);
        assert_eq!(make(WeightsDtype::Q8_0).size_bytes(), rows * 2 * 34);
        // Q4_1 is stored in four-row groups, the last one padded with zero rows.
        let q = WeightMatrix::from_ggml(GgmlDType::Q4_1, &q4_1_bytes(rows, cols), rows, cols);
        assert_eq!(q.expect("q4_1").size_bytes(), 8 * 2 * 20);
    }

    #[test]
    fn mixed_formats_concat_into_parts_and_agree_with_rows() {
        let cols = 64;
        let a = WeightMatrix::from_ggml(GgmlDType::Q4_1, &q4_1_bytes(3, cols), 3, cols);
        let a = a.expect("q4_1");
        let b = WeightMatrix::from_f32_as(values(2 * cols), 2, cols, WeightsDtype::Bf16);
        let c = WeightMatrix::from_f32_as(values(4 * cols), 4, cols, WeightsDtype::Bf16);
        let d = WeightMatrix::from_ggml(GgmlDType::Q4_1, &q4_1_bytes(3, cols), 3, cols);
        let parts = vec![a, b.expect("bf16"), c.expect("bf16"), d.expect("q4_1")];
        let fused = WeightMatrix::concat_rows(parts.clone()).expect("same cols");
        assert_eq!(fused.format(), "gguf Q4_1 + bf16 + gguf Q4_1");
        assert_eq!(fused.size_bytes(), parts.iter().map(WeightMatrix::size_bytes).sum::<usize>());
        let m = 2;
        let x = values(m * cols);
        let mut out = vec![0f32; m * fused.rows];
        fused.forward(&x, m, &mut out);
        let mut col = 0;
        for p in &parts {
            let mut part_out = vec![0f32; m * p.rows];
            p.forward(&x, m, &mut part_out);
            for i in 0..m {
                assert_eq!(
                    &out[i * fused.rows + col..i * fused.rows + col + p.rows],
                    &part_out[i * p.rows..(i + 1) * p.rows]
                );
            }
            for r in 0..p.rows {
                let (mut want, mut got) = (vec![0f32; cols], vec![0f32; cols]);
                p.row_into(r, &mut want);
                fused.row_into(col + r, &mut got);
                assert_eq!(want, got);
            }
            col += p.rows;
        }
    }

    #[test]
    fn f32_and_bf16_tensors_from_files_use_dense_storage() {
        let v = values(8);
        let f32_bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let m = WeightMatrix::from_ggml(GgmlDType::F32, &f32_bytes, 2, 4).expect("f32");
        assert_eq!(m.format(), "f32");
        let mut row = vec![0f32; 4];
        m.row_into(1, &mut row);
        assert_eq!(row, v[4..]);
        let bf: Vec<u8> = v.iter().flat_map(|x| Bf16::from_f32(*x).0.to_le_bytes()).collect();
        let m = WeightMatrix::from_ggml(GgmlDType::BF16, &bf, 2, 4).expect("bf16");
        assert_eq!(m.format(), "bf16");
        assert!(WeightMatrix::from_ggml(GgmlDType::F32, &f32_bytes[..8], 2, 4).is_err());
    }
}
