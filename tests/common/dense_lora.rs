//! The gradient oracle: a dense Llama with LoRA on its projections and the causal-LM loss over
//! a whole sequence, differentiated by candle's autograd.

use candle_core::{Device, Tensor, Var, D};

use coserve::lora::dropout::apply_dropout;
use coserve::lora::{LoraConfig, LoraWeights, TargetModule};
use coserve::model::llama::Llama;

use super::dense_llama::{causal_attention, get, rms_norm};
use super::tiny_model::{hf_tensors, TinyShape};

pub struct OracleResult {
    /// Mean loss over the target tokens.
    pub loss: f64,
    /// Gradients shaped like the adapter.
    pub grads: LoraWeights,
}

/// Loss and LoRA gradients for `tokens`, with token `i` a target where `trained[i]`.
pub fn oracle(
    s: &TinyShape,
    adapter: &LoraWeights,
    tokens: &[u32],
    trained: &[bool],
    dropout_seed: u64,
) -> OracleResult {
    let dev = Device::Cpu;
    let ts = hf_tensors(s);
    let n = tokens.len();
    let (hd, nh, nkv) = (s.head_dim(), s.heads, s.kv_heads);
    let scale = adapter.scale() as f64;
    let p = adapter.config.dropout;
    let ids = Tensor::from_vec(tokens.to_vec(), n, &dev).unwrap();
    let embed = get(&ts, "model.embed_tokens.weight");
    let mut h = embed.index_select(&ids, 0).unwrap();
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    let mask = Tensor::from_vec(mask, (n, n), &dev).unwrap();

    // One (A, B) Var pair per adapted projection, in the adapter's order.
    let mut vars: Vec<(usize, TargetModule, Var, Var)> = Vec::new();
    for (l, layer) in adapter.layers.iter().enumerate() {
        for m in TargetModule::ALL {
            if let Some(pair) = &layer[m.index()] {
                let r = pair.rank();
                let a = Var::from_vec(pair.a.clone(), (r, pair.in_dim), &dev).unwrap();
                let b = Var::from_vec(pair.b.clone(), (pair.out_dim, r), &dev).unwrap();
                vars.push((l, m, a, b));
            }
        }
    }
    let proj = |l: usize, m: TargetModule, x: &Tensor, w: &Tensor| -> Tensor {
        let base = x.matmul(&w.t().unwrap()).unwrap();
        let Some((_, _, a, b)) = vars.iter().find(|(vl, vm, _, _)| *vl == l && *vm == m) else {
            return base;
        };
        let in_dim = x.dims()[1];
        let x = if p > 0.0 {
            let mut keep = vec![1f32; n * in_dim];
            for (pos, row) in keep.chunks_exact_mut(in_dim).enumerate() {
                apply_dropout(row, p, dropout_seed, l, m.index(), pos);
            }
            (x * Tensor::from_vec(keep, (n, in_dim), &dev).unwrap()).unwrap()
        } else {
            x.clone()
        };
        let low = x.matmul(&a.as_tensor().t().unwrap()).unwrap();
        let up = (low.matmul(&b.as_tensor().t().unwrap()).unwrap() * scale).unwrap();
        (base + up).unwrap()
    };

    for l in 0..s.layers {
        let w = |name: &str| get(&ts, &format!("model.layers.{l}.{name}"));
        let x = rms_norm(&h, &w("input_layernorm.weight"), 1e-5);
        let q = proj(l, TargetModule::QProj, &x, &w("self_attn.q_proj.weight"));
        let k = proj(l, TargetModule::KProj, &x, &w("self_attn.k_proj.weight"));
        let v = proj(l, TargetModule::VProj, &x, &w("self_attn.v_proj.weight"));
        let attn = causal_attention(&q, &k, &v, &mask, (nh, nkv, hd));
        let o = proj(l, TargetModule::OProj, &attn, &w("self_attn.o_proj.weight"));
        h = (h + o).unwrap();
        let x = rms_norm(&h, &w("post_attention_layernorm.weight"), 1e-5);
        let g = proj(l, TargetModule::GateProj, &x, &w("mlp.gate_proj.weight"));
        let u = proj(l, TargetModule::UpProj, &x, &w("mlp.up_proj.weight"));
        let a = (g.silu().unwrap() * u).unwrap();
        let d = proj(l, TargetModule::DownProj, &a, &w("mlp.down_proj.weight"));
        h = (h + d).unwrap();
    }
    let x = rms_norm(&h, &get(&ts, "model.norm.weight"), 1e-5);
    let head = if s.tied { embed } else { get(&ts, "lm_head.weight") };
    let logits = x.matmul(&head.t().unwrap()).unwrap();

    // Position i predicts token i + 1 where that token is trained.
    let vocab = s.vocab();
    let rows: Vec<u32> = (0..n - 1).filter(|&i| trained[i + 1]).map(|i| i as u32).collect();
    let count = rows.len();
    let mut onehot = vec![0f32; count * vocab];
    for (k, &i) in rows.iter().enumerate() {
        onehot[k * vocab + tokens[i as usize + 1] as usize] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (count, vocab), &dev).unwrap();
    let sel = logits.index_select(&Tensor::from_vec(rows, count, &dev).unwrap(), 0).unwrap();
    let max = sel.max_keepdim(D::Minus1).unwrap().detach();
    let lse = (sel.broadcast_sub(&max).unwrap().exp().unwrap().sum_keepdim(D::Minus1).unwrap())
        .log()
        .unwrap()
        .broadcast_add(&max)
        .unwrap();
    let picked = (sel * onehot).unwrap().sum_keepdim(D::Minus1).unwrap();
    let loss = ((lse - picked).unwrap().sum_all().unwrap() / count as f64).unwrap();
    let value = loss.to_scalar::<f32>().unwrap() as f64;
    let store = loss.backward().unwrap();

    let mut grads = adapter.clone();
    grads.fill_zero();
    for (l, m, a, b) in &vars {
        let pair = grads.layers[*l][m.index()].as_mut().unwrap();
        let ga = store.get(a.as_tensor()).map(|g| g.flatten_all().unwrap().to_vec1().unwrap());
        let gb = store.get(b.as_tensor()).map(|g| g.flatten_all().unwrap().to_vec1().unwrap());
        pair.a = ga.unwrap_or_else(|| vec![0.0; pair.a.len()]);
        pair.b = gb.unwrap_or_else(|| vec![0.0; pair.b.len()]);
    }
    OracleResult { loss: value, grads }
}

/// An adapter with random A and B (a fresh one has B = 0, which would zero every dA).
pub fn random_adapter(model: &Llama, config: LoraConfig, seed: u64) -> LoraWeights {
    let mut w = LoraWeights::init(&config, &model.config, seed);
    let other = LoraWeights::init(&config, &model.config, seed + 1);
    for (p, o) in w.pairs_mut().zip(other.pairs()) {
        // B from another init's A values, reshaped: any fixed non-zero values do.
        p.b.iter_mut().zip(o.a.iter().cycle()).for_each(|(b, a)| *b = 0.5 * a);
    }
    w
}

/// The worst relative L2 error of any gradient tensor of `ours` against the oracle's `want`,
/// and where (every oracle gradient must be non-zero).
pub fn worst_relative(ours: &LoraWeights, want: &LoraWeights) -> (f32, String) {
    let mut worst = (0f32, String::new());
    let mut checked = 0;
    for (l, (lo, lw)) in ours.layers.iter().zip(&want.layers).enumerate() {
        for m in TargetModule::ALL {
            let (Some(o), Some(w)) = (&lo[m.index()], &lw[m.index()]) else { continue };
            for (name, a, b) in [("A", &o.a, &w.a), ("B", &o.b, &w.b)] {
                let diff: f64 = a.iter().zip(b.iter()).map(|(x, y)| f64::from(x - y).powi(2)).sum();
                let norm: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
                assert!(norm > 0.0, "layer {l} {} d{name}: zero oracle gradient", m.name());
                let err = (diff / norm).sqrt() as f32;
                if err > worst.0 {
                    worst = (err, format!("layer {l} {} d{name}", m.name()));
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 0);
    worst
}
