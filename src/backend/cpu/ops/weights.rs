//! A loaded model's weights as the CPU's decoder operations take them: matrices in the format
//! they were loaded in (f32 packed, bf16, Q8_0, GGUF blocks), norms and biases in f32.

use std::sync::{Arc, OnceLock};

use crate::backend::cpu::frozen::{FrozenWeight, TrainDtype};
use crate::backend::cuda::decoder::{DecoderShape, DecoderWeights, LayerWeights};
use crate::backend::cuda::CudaError;
use crate::model::backward::{backward_weight, forward_weight};
use crate::model::config::LlamaConfig;
use crate::model::llama::Llama;
use crate::model::weights::WeightMatrix;

/// One tensor of the decoder: a projection (the embedding and a tied output head share one)
/// or a vector (a norm's weights, a bias).
#[derive(Clone)]
pub enum CpuWeight {
    Matrix(Arc<CpuMatrix>),
    Vector(Vec<f32>),
}

/// A projection as the forward reads it, and as training's `dX = dY · W` reads it, packed
/// when training first needs it (in the precision of that first use).
pub struct CpuMatrix {
    pub w: WeightMatrix,
    backward: OnceLock<FrozenWeight>,
    /// `Wᵀ` for training rows' forward products in bf16 training.
    forward_t: OnceLock<FrozenWeight>,
}

impl CpuWeight {
    pub fn matrix_of(w: WeightMatrix) -> Self {
        let (backward, forward_t) = (OnceLock::new(), OnceLock::new());
        CpuWeight::Matrix(Arc::new(CpuMatrix { w, backward, forward_t }))
    }

    pub fn matrix(&self) -> Result<&WeightMatrix, CudaError> {
        match self {
            CpuWeight::Matrix(m) => Ok(&m.w),
            CpuWeight::Vector(v) => {
                Err(CudaError::Shape(format!("a vector of {} where a matrix is read", v.len())))
            }
        }
    }

    /// The matrix packed for `dX = dY · W` in `dtype` (packed on first use).
    pub fn backward(&self, dtype: TrainDtype) -> Result<&FrozenWeight, CudaError> {
        let CpuWeight::Matrix(m) = self else {
            return Err(CudaError::Shape("a vector where a matrix is read".into()));
        };
        Ok(m.backward.get_or_init(|| backward_weight(&m.w, dtype)))
    }

    /// `Wᵀ` packed for training rows' forward products in `dtype` (packed on first use).
    pub fn forward_t(&self, dtype: TrainDtype) -> Result<&FrozenWeight, CudaError> {
        let CpuWeight::Matrix(m) = self else {
            return Err(CudaError::Shape("a vector where a matrix is read".into()));
        };
        Ok(m.forward_t.get_or_init(|| forward_weight(&m.w, dtype)))
    }

    pub fn vector(&self) -> Result<&[f32], CudaError> {
        match self {
            CpuWeight::Vector(v) => Ok(v),
            CpuWeight::Matrix(m) => Err(CudaError::Shape(format!(
                "a {}x{} matrix where a vector is read",
                m.w.rows, m.w.cols
            ))),
        }
    }
}

/// A model as the CPU decoder runs it.
pub struct CpuModel {
    pub config: LlamaConfig,
    pub shape: DecoderShape,
    pub weights: DecoderWeights<CpuWeight>,
    /// RoPE inverse frequencies (scaling and a file's frequency factors applied).
    pub inv_freq: Vec<f32>,
}

/// `model`'s weights in the decoder's layout, moved, not copied; `block_size`-token cache
/// blocks. Shapes are checked against the config.
pub fn from_llama(model: Llama, block_size: usize) -> Result<CpuModel, CudaError> {
    let s = DecoderShape::new(&model.config, block_size)?;
    let inv_freq = model.inv_freq().to_vec();
    let matrix = |w: WeightMatrix, rows: usize, cols: usize, what: &str| {
        if w.rows == rows && w.cols == cols {
            Ok(CpuWeight::matrix_of(w))
        } else {
            Err(CudaError::Shape(format!(
                "{what} is {}x{}, the config says {rows}x{cols}",
                w.rows, w.cols
            )))
        }
    };
    let vector = |v: Vec<f32>, n: usize, what: &str| {
        if v.len() == n {
            Ok(CpuWeight::Vector(v))
        } else {
            Err(CudaError::Shape(format!("{what} has {} values, the config says {n}", v.len())))
        }
    };
    let Llama { config, embed, layers, norm, lm_head, .. } = model;
    let embed = matrix(embed, s.vocab, s.hidden, "the embedding")?;
    let lm_head = match lm_head {
        Some(h) => matrix(h, s.vocab, s.hidden, "the output head")?,
        None => embed.clone(),
    };
    let mut out = Vec::with_capacity(layers.len());
    for (i, l) in layers.into_iter().enumerate() {
        s.check_qkv_bias(i, l.qkv_bias.as_deref())?;
        let qkv_bias = l.qkv_bias.map(CpuWeight::Vector);
        out.push(LayerWeights {
            attn_norm: vector(l.attn_norm, s.hidden, &format!("layer {i} attn_norm"))?,
            qkv: matrix(l.wqkv, s.qkv_rows(), s.hidden, &format!("layer {i} qkv"))?,
            qkv_bias,
            o: matrix(l.wo, s.hidden, s.q_dim(), &format!("layer {i} o"))?,
            mlp_norm: vector(l.ffn_norm, s.hidden, &format!("layer {i} ffn_norm"))?,
            gate_up: matrix(l.w_gate_up, 2 * s.inter, s.hidden, &format!("layer {i} gate_up"))?,
            down: matrix(l.w_down, s.hidden, s.inter, &format!("layer {i} down"))?,
        });
    }
    if out.len() != s.layers {
        return Err(CudaError::Shape(format!(
            "{} layers, the config says {}",
            out.len(),
            s.layers
        )));
    }
    let norm = vector(norm, s.hidden, "the final norm")?;
    let weights = DecoderWeights { embed, layers: out, norm, lm_head };
    Ok(CpuModel { config, shape: s, weights, inv_freq })
}
