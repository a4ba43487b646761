//! A loaded model's weights in the decoder's layout, rounded to bf16: what the GPU decoder is
//! given (uploaded as they are) and what its CPU-twin oracle runs on.

use rayon::prelude::*;

use super::{DecoderShape, DecoderWeights, LayerWeights};
use crate::backend::cuda::twins::round_bf16;
use crate::backend::cuda::CudaError;
use crate::model::llama::Llama;
use crate::model::weights::WeightMatrix;

/// A model as the decoder takes it, on the host.
pub struct HostModel {
    pub shape: DecoderShape,
    /// Row-major, each value rounded to bf16.
    pub weights: DecoderWeights<Vec<f32>>,
    /// RoPE inverse frequencies.
    pub inv_freq: Vec<f32>,
    pub max_positions: usize,
}

/// `model` in the decoder's layout, with `block_size`-token cache blocks.
pub fn from_llama(model: &Llama, block_size: usize) -> Result<HostModel, CudaError> {
    let (shape, weights) = convert(model, block_size, Ok)?;
    Ok(HostModel {
        shape,
        weights,
        inv_freq: model.inv_freq().to_vec(),
        max_positions: model.config.max_position_embeddings,
    })
}

/// Every tensor of `model` in the decoder's layout (dequantized, rounded to bf16), each handed
/// to `place` as soon as it is made, so that at most one host copy exists at a time (a GPU
/// upload frees it at once). A tied output head is made a second time.
pub fn convert<W>(
    model: &Llama,
    block_size: usize,
    mut place: impl FnMut(Vec<f32>) -> Result<W, CudaError>,
) -> Result<(DecoderShape, DecoderWeights<W>), CudaError> {
    let s = DecoderShape::new(&model.config, block_size)?;
    let want = |w: &WeightMatrix, rows: usize, cols: usize, what: &str| {
        if w.rows == rows && w.cols == cols {
            Ok(dense_bf16(w))
        } else {
            Err(CudaError::Shape(format!(
                "{what} is {}x{}, the config says {rows}x{cols}",
                w.rows, w.cols
            )))
        }
    };
    let hidden = s.hidden;
    let norm = |v: &[f32], what: &str| {
        if v.len() == hidden {
            Ok(v.iter().map(|&x| round_bf16(x)).collect::<Vec<f32>>())
        } else {
            Err(CudaError::Shape(format!("{what} has {} weights for hidden {hidden}", v.len())))
        }
    };
    let embed = place(want(&model.embed, s.vocab, s.hidden, "the embedding")?)?;
    let mut layers = Vec::with_capacity(model.layers.len());
    for (i, l) in model.layers.iter().enumerate() {
        s.check_qkv_bias(i, l.qkv_bias.as_deref())?;
        let qkv_bias = match &l.qkv_bias {
            Some(b) => Some(place(b.iter().map(|&x| round_bf16(x)).collect())?),
            None => None,
        };
        layers.push(LayerWeights {
            attn_norm: place(norm(&l.attn_norm, &format!("layer {i} attn_norm"))?)?,
            qkv: place(want(&l.wqkv, s.qkv_rows(), s.hidden, &format!("layer {i} qkv"))?)?,
            qkv_bias,
            o: place(want(&l.wo, s.hidden, s.q_dim(), &format!("layer {i} o"))?)?,
            mlp_norm: place(norm(&l.ffn_norm, &format!("layer {i} ffn_norm"))?)?,
            gate_up: place(want(
                &l.w_gate_up,
                2 * s.inter,
                s.hidden,
                &format!("layer {i} gate_up"),
            )?)?,
            down: place(want(&l.w_down, s.hidden, s.inter, &format!("layer {i} down"))?)?,
        });
    }
    let norm = place(norm(&model.norm, "the final norm")?)?;
    // Tied: the embedding again.
    let head = model.lm_head.as_ref().unwrap_or(&model.embed);
    let lm_head = place(want(head, s.vocab, s.hidden, "the output head")?)?;
    Ok((s, DecoderWeights { embed, layers, norm, lm_head }))
}

/// Every row of `w` dequantized and rounded to bf16.
fn dense_bf16(w: &WeightMatrix) -> Vec<f32> {
    let mut out = vec![0f32; w.rows * w.cols];
    out.par_chunks_mut(w.cols.max(1)).enumerate().for_each(|(r, row)| {
        w.row_into(r, row);
        row.iter_mut().for_each(|v| *v = round_bf16(*v));
    });
    out
}
