//! Paged attention against a dense causal attention in f64, plus batch invariance.

use coserve::backend::cpu::paged_attention::{paged_attention, AttnSeq, AttnShape};
use half::f16;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const TOLERANCE: f64 = 1e-5;

#[derive(Clone, Copy)]
struct Dims {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
}

impl Dims {
    fn shape(&self) -> AttnShape {
        AttnShape {
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            block_size: self.block_size,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        }
    }
}

/// One sequence of a batch: its whole context in dense form plus where it lives in the cache.
struct Seq {
    context_len: usize,
    q_len: usize,
    q_start: usize,
    table: Vec<u32>,
    /// [context_len, kv_heads, head_dim]
    k: Vec<f32>,
    v: Vec<f32>,
}

struct Batch {
    dims: Dims,
    seqs: Vec<Seq>,
    /// [num_tokens, heads, head_dim]
    q: Vec<f32>,
    k_cache: Vec<f32>,
    v_cache: Vec<f32>,
}

/// Random batch of (context_len, q_len) sequences with shuffled, non-contiguous block tables.
/// Cache slots no sequence owns are NaN, so reading one poisons the result.
fn batch(dims: Dims, specs: &[(usize, usize)], seed: u64) -> Batch {
    let mut rng = StdRng::seed_from_u64(seed);
    let bs = dims.block_size;
    let row = dims.kv_heads * dims.head_dim;
    let needed: usize = specs.iter().map(|(ctx, _)| ctx.div_ceil(bs)).sum();
    let num_blocks = needed + 7;
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    ids.shuffle(&mut rng);
    let mut k_cache = vec![f32::NAN; num_blocks * bs * row];
    let mut v_cache = k_cache.clone();
    let mut seqs = Vec::new();
    let mut q_start = 0;
    for &(context_len, q_len) in specs {
        let table: Vec<u32> = ids.drain(..context_len.div_ceil(bs)).collect();
        let k: Vec<f32> = (0..context_len * row).map(|_| rng.random_range(-1.0..1.0)).collect();
        let v: Vec<f32> = (0..context_len * row).map(|_| rng.random_range(-1.0..1.0)).collect();
        for pos in 0..context_len {
            let slot = table[pos / bs] as usize * bs + pos % bs;
            k_cache[slot * row..(slot + 1) * row].copy_from_slice(&k[pos * row..(pos + 1) * row]);
            v_cache[slot * row..(slot + 1) * row].copy_from_slice(&v[pos * row..(pos + 1) * row]);
        }
        seqs.push(Seq { context_len, q_len, q_start, table, k, v });
        q_start += q_len;
    }
    let q =
        (0..q_start * dims.heads * dims.head_dim).map(|_| rng.random_range(-2.0..2.0)).collect();
    Batch { dims, seqs, q, k_cache, v_cache }
}

impl Batch {
    fn attn_seqs(&self) -> Vec<AttnSeq<'_>> {
        self.seqs
            .iter()
            .map(|s| AttnSeq {
                q_start: s.q_start,
                q_len: s.q_len,
                context_len: s.context_len,
                block_table: &s.table,
            })
            .collect()
    }

    fn run(&self) -> Vec<f32> {
        self.run_seqs(&self.q, &self.attn_seqs())
    }

    fn run_seqs(&self, q: &[f32], seqs: &[AttnSeq]) -> Vec<f32> {
        let mut out = vec![f32::NAN; q.len()];
        paged_attention(q, &self.k_cache, &self.v_cache, seqs, &self.dims.shape(), &mut out);
        out
    }

    /// Dense causal attention of one sequence in f64: [q_len, heads, head_dim].
    fn reference(&self, s: &Seq) -> Vec<f64> {
        let Dims { heads, kv_heads, head_dim: d, .. } = self.dims;
        let group = heads / kv_heads;
        let scale = self.dims.shape().scale as f64;
        let mut out = vec![0f64; s.q_len * heads * d];
        for i in 0..s.q_len {
            let pos = s.context_len - s.q_len + i;
            for h in 0..heads {
                let kvh = h / group;
                let q = &self.q[((s.q_start + i) * heads + h) * d..][..d];
                let scores: Vec<f64> = (0..=pos)
                    .map(|j| {
                        let k = &s.k[(j * kv_heads + kvh) * d..][..d];
                        q.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                let o = &mut out[(i * heads + h) * d..][..d];
                for (j, w) in weights.iter().enumerate() {
                    let v = &s.v[(j * kv_heads + kvh) * d..][..d];
                    for (o, x) in o.iter_mut().zip(v) {
                        *o += w / total * *x as f64;
                    }
                }
            }
        }
        out
    }

    fn rows_of<'a>(&self, out: &'a [f32], s: &Seq) -> &'a [f32] {
        let row = self.dims.heads * self.dims.head_dim;
        &out[s.q_start * row..(s.q_start + s.q_len) * row]
    }

    fn assert_matches_reference(&self, what: &str) {
        let out = self.run();
        for (n, s) in self.seqs.iter().enumerate() {
            let got = self.rows_of(&out, s);
            let want = self.reference(s);
            let err = got.iter().zip(&want).map(|(g, w)| (*g as f64 - w).abs()).fold(0.0, f64::max);
            assert!(
                err <= TOLERANCE && got.iter().all(|x| x.is_finite()),
                "{what}: seq {n} (context {}, q_len {}) max error {err}",
                s.context_len,
                s.q_len
            );
        }
    }
}

const DEFAULT_MODEL: Dims = Dims { heads: 9, kv_heads: 3, head_dim: 64, block_size: 16 };

#[test]
fn decodes_at_block_boundaries() {
    for block_size in [16, 4] {
        let dims = Dims { block_size, ..DEFAULT_MODEL };
        for ctx in [1, 15, 16, 17, 33, 100] {
            batch(dims, &[(ctx, 1)], ctx as u64).assert_matches_reference("decode");
        }
    }
}

#[test]
fn full_prefills_at_block_boundaries() {
    for block_size in [16, 4] {
        let dims = Dims { block_size, ..DEFAULT_MODEL };
        for ctx in [1, 15, 16, 17, 33, 100] {
            batch(dims, &[(ctx, ctx)], 100 + ctx as u64).assert_matches_reference("prefill");
        }
    }
}

#[test]
fn multi_head_attention_and_odd_head_dims() {
    let mha = Dims { heads: 4, kv_heads: 4, head_dim: 32, block_size: 16 };
    batch(mha, &[(33, 1), (17, 17), (100, 40)], 1).assert_matches_reference("mha");
    // head_dim not a multiple of the vector width; group of 4 heads per kv head.
    let odd = Dims { heads: 8, kv_heads: 2, head_dim: 24, block_size: 4 };
    batch(odd, &[(15, 1), (16, 16), (100, 37)], 2).assert_matches_reference("odd");
    // One kv head for all query heads (MQA), long context.
    let mqa = Dims { heads: 6, kv_heads: 1, head_dim: 16, block_size: 16 };
    batch(mqa, &[(300, 1), (130, 65)], 3).assert_matches_reference("mqa");
}

#[test]
fn mixed_batches_of_decodes_and_prefill_chunks() {
    for block_size in [16, 4] {
        let dims = Dims { block_size, ..DEFAULT_MODEL };
        // Decodes, a first chunk, and later chunks whose earlier context is already cached.
        let specs = [(33, 1), (1, 1), (100, 1), (40, 24), (100, 33), (17, 1), (64, 64), (16, 1)];
        batch(dims, &specs, 7 + block_size as u64).assert_matches_reference("mixed");
    }
}

#[test]
fn a_sequence_alone_equals_it_in_a_batch_bit_for_bit() {
    let b = batch(DEFAULT_MODEL, &[(33, 1), (100, 33), (17, 1), (64, 64), (250, 1)], 11);
    let full = b.run();
    let row = DEFAULT_MODEL.heads * DEFAULT_MODEL.head_dim;
    for (n, s) in b.seqs.iter().enumerate() {
        let q = &b.q[s.q_start * row..(s.q_start + s.q_len) * row];
        let alone = AttnSeq { q_start: 0, ..b.attn_seqs()[n] };
        let out = b.run_seqs(q, &[alone]);
        assert!(bits_equal(&out, b.rows_of(&full, s)), "seq {n} differs alone vs in batch");
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() -> Result<(), rayon::ThreadPoolBuildError> {
    let b = batch(DEFAULT_MODEL, &[(33, 1), (100, 33), (17, 1), (200, 200), (250, 1)], 12);
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?.install(|| b.run());
    for threads in [2, 3, 4, 7] {
        let out = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?.install(|| b.run());
        assert!(bits_equal(&one, &out), "{threads} threads differ from one");
    }
    Ok(())
}

#[test]
fn a_prefill_row_equals_the_decode_at_its_position() {
    let b = batch(DEFAULT_MODEL, &[(70, 70)], 13);
    let prefill = b.run();
    let s = &b.seqs[0];
    let row = DEFAULT_MODEL.heads * DEFAULT_MODEL.head_dim;
    for pos in [0, 15, 16, 47, 69] {
        let decode = AttnSeq { q_start: 0, q_len: 1, context_len: pos + 1, block_table: &s.table };
        let out = b.run_seqs(&b.q[pos * row..(pos + 1) * row], &[decode]);
        assert!(bits_equal(&out, &prefill[pos * row..(pos + 1) * row]), "position {pos}");
        // And a later chunk covering it gives the same bits too.
        let chunk = AttnSeq { q_start: 0, q_len: 70 - pos, context_len: 70, block_table: &s.table };
        let out = b.run_seqs(&b.q[pos * row..], &[chunk]);
        assert!(bits_equal(&out, &prefill[pos * row..]), "chunk from {pos}");
    }
}

/// An f16 cache gives what the f32 kernel gives on the same values widened to f32, bit for bit,
/// and so stays as close to the dense reference (computed on the rounded values).
#[test]
fn an_f16_cache_equals_f32_on_its_widened_values() {
    for block_size in [16, 4] {
        let dims = Dims { block_size, ..DEFAULT_MODEL };
        let specs = [(33, 1), (1, 1), (100, 1), (40, 24), (100, 33), (17, 1), (64, 64), (16, 1)];
        let mut b = batch(dims, &specs, 21 + block_size as u64);
        let round = |x: &mut Vec<f32>| x.iter_mut().for_each(|v| *v = f16::from_f32(*v).to_f32());
        round(&mut b.k_cache);
        round(&mut b.v_cache);
        for s in &mut b.seqs {
            round(&mut s.k);
            round(&mut s.v);
        }
        b.assert_matches_reference("f32 on f16-rounded values");
        let to_f16 = |x: &[f32]| x.iter().map(|v| f16::from_f32(*v)).collect::<Vec<_>>();
        let (k16, v16) = (to_f16(&b.k_cache), to_f16(&b.v_cache));
        let mut out = vec![f32::NAN; b.q.len()];
        paged_attention(&b.q, &k16, &v16, &b.attn_seqs(), &dims.shape(), &mut out);
        assert!(bits_equal(&out, &b.run()), "f16 cache differs from f32, block size {block_size}");
    }
}

fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}
