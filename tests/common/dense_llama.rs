//! An independent dense Llama forward written with candle tensor ops over the HF-layout
//! weights of the tiny model: the oracle for our paged, fused forward.

use candle_core::{DType, Device, Tensor, D};

use super::tiny_model::{hf_tensors, TinyShape};

pub fn get(ts: &[(String, Vec<usize>, Vec<f32>)], name: &str) -> Tensor {
    let (_, shape, data) =
        ts.iter().find(|(n, _, _)| n == name).unwrap_or_else(|| panic!("{name}"));
    Tensor::from_vec(data.clone(), shape.clone(), &Device::Cpu).expect("tensor")
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let var = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
    let normed = x.broadcast_div(&(var + eps).unwrap().sqrt().unwrap()).unwrap();
    normed.broadcast_mul(w).unwrap()
}

pub fn rope(x: &Tensor, positions: &[usize], head_dim: usize, theta: f32) -> Tensor {
    // x: [heads, seq, head_dim], HF half-split layout.
    let half = head_dim / 2;
    let inv: Vec<f32> =
        (0..half).map(|i| 1.0 / theta.powf(2.0 * i as f32 / head_dim as f32)).collect();
    let angles: Vec<f32> =
        positions.iter().flat_map(|&p| inv.iter().map(move |f| p as f32 * f)).collect();
    let a = Tensor::from_vec(angles, (positions.len(), half), &Device::Cpu).unwrap();
    let cos = Tensor::cat(&[&a.cos().unwrap(), &a.cos().unwrap()], 1).unwrap();
    let sin = Tensor::cat(&[&a.sin().unwrap(), &a.sin().unwrap()], 1).unwrap();
    let x1 = x.narrow(D::Minus1, 0, half).unwrap();
    let x2 = x.narrow(D::Minus1, half, half).unwrap();
    let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
    (x.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap()
}

/// Causal multi-head attention with RoPE over one sequence: `q` `[n, heads * hd]`, `k`, `v`
/// `[n, kv_heads * hd]` (before RoPE); returns `[n, heads * hd]`. `mask` is `[n, n]`
/// (0 on and below the diagonal, -inf above).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    (nh, nkv, hd): (usize, usize, usize),
) -> Tensor {
    let n = q.dims()[0];
    let positions: Vec<usize> = (0..n).collect();
    let q = q.reshape((n, nh, hd)).unwrap().transpose(0, 1).unwrap().contiguous().unwrap();
    let k = k.reshape((n, nkv, hd)).unwrap().transpose(0, 1).unwrap().contiguous().unwrap();
    let v = v.reshape((n, nkv, hd)).unwrap().transpose(0, 1).unwrap().contiguous().unwrap();
    let q = rope(&q, &positions, hd, 10000.0);
    let k = rope(&k, &positions, hd, 10000.0);
    let group = nh / nkv;
    let mut heads = Vec::new();
    for head in 0..nh {
        let qh = q.get(head).unwrap();
        let kh = k.get(head / group).unwrap();
        let vh = v.get(head / group).unwrap();
        let scores = (qh.matmul(&kh.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
        let scores = scores.broadcast_add(mask).unwrap();
        let max = scores.max_keepdim(D::Minus1).unwrap().detach();
        let e = scores.broadcast_sub(&max).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        heads.push(p.matmul(&vh).unwrap());
    }
    Tensor::stack(&heads, 1).unwrap().reshape((n, nh * hd)).unwrap()
}

/// Logits `[tokens, vocab]` for one sequence, every position.
pub fn dense_logits(s: &TinyShape, tokens: &[u32]) -> Vec<f32> {
    let ts = hf_tensors(s);
    let n = tokens.len();
    let (hd, nh, nkv) = (s.head_dim(), s.heads, s.kv_heads);
    let ids = Tensor::from_vec(tokens.to_vec(), n, &Device::Cpu).unwrap();
    let embed = get(&ts, "model.embed_tokens.weight");
    let mut h = embed.index_select(&ids, 0).unwrap();
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (n, n), &Device::Cpu).unwrap();
    for l in 0..s.layers {
        let w = |name: &str| get(&ts, &format!("model.layers.{l}.{name}"));
        let x = rms_norm(&h, &w("input_layernorm.weight"), 1e-5);
        let q = x.matmul(&w("self_attn.q_proj.weight").t().unwrap()).unwrap();
        let k = x.matmul(&w("self_attn.k_proj.weight").t().unwrap()).unwrap();
        let v = x.matmul(&w("self_attn.v_proj.weight").t().unwrap()).unwrap();
        let attn = causal_attention(&q, &k, &v, &mask, (nh, nkv, hd));
        let o = attn.matmul(&w("self_attn.o_proj.weight").t().unwrap()).unwrap();
        h = (h + o).unwrap();
        let x = rms_norm(&h, &w("post_attention_layernorm.weight"), 1e-5);
        let g = x.matmul(&w("mlp.gate_proj.weight").t().unwrap()).unwrap();
        let u = x.matmul(&w("mlp.up_proj.weight").t().unwrap()).unwrap();
        let a = (g.silu().unwrap() * u).unwrap();
        h = (h + a.matmul(&w("mlp.down_proj.weight").t().unwrap()).unwrap()).unwrap();
    }
    let x = rms_norm(&h, &get(&ts, "model.norm.weight"), 1e-5);
    let head = if s.tied { embed } else { get(&ts, "lm_head.weight") };
    let logits = x.matmul(&head.t().unwrap()).unwrap();
    logits.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}
