//! Weight matrices of linear layers in the layouts the CPU kernels read.

use crate::backend::cpu::matmul::matmul_t;

/// A `[rows, cols]` matrix (PyTorch Linear layout: one row per output feature).
#[derive(Debug, Clone)]
pub struct WeightMatrix {
    pub rows: usize,
    pub cols: usize,
    data: Vec<f32>,
}

impl WeightMatrix {
    pub fn from_f32(data: Vec<f32>, rows: usize, cols: usize) -> Option<Self> {
        (data.len() == rows * cols).then_some(Self { rows, cols, data })
    }

    /// Stacks matrices with the same `cols` (fused q/k/v or gate/up projections).
    pub fn concat_rows(parts: Vec<WeightMatrix>) -> Option<Self> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let mut data = Vec::with_capacity(rows * cols);
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        Some(Self { rows, cols, data })
    }

    /// `out[m, rows] = x[m, cols] · selfᵀ`.
    pub fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        matmul_t(x, &self.data, m, self.cols, self.rows, out);
    }

    /// One row as f32 (embedding lookup).
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    pub fn size_bytes(&self) -> usize {
        self.data.len() * std::mem::size_of::<f32>()
    }
}
