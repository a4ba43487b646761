//! Paged attention on CPU: online softmax over KV blocks, GQA-aware, prefill and decode alike.
//!
//! Work items are (sequence, kv head, tile of query rows); each computes all query heads that
//! share its kv head, so every K/V row it loads serves `num_heads / num_kv_heads` heads.
//!
//! Batch invariance: a query's result is a function of its own vector, the keys and values at
//! positions `0..=pos` and the block size only. It walks the cache blocks in order, and within
//! a block the keys in order, with the same sequence of f32 operations whatever tile, batch or
//! thread it runs in. A row of a prefill chunk therefore equals the decode at the same position.

use rayon::prelude::*;

use super::{exp_approx, scale_in_place, KvElement, Portable, Vector};

/// One sequence's slice of the flattened batch: queries rows q_start..q_start+q_len are the
/// LAST q_len positions of a context of context_len tokens (so a decode has q_len = 1, a prefill
/// chunk q_len = chunk size). Query i (0-based in the slice) is at position context_len - q_len + i
/// and attends causally to key positions 0..=that position, read through block_table.
#[derive(Debug, Clone, Copy)]
pub struct AttnSeq<'a> {
    pub q_start: usize,
    pub q_len: usize,
    pub context_len: usize,
    pub block_table: &'a [u32],
}

#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub scale: f32,
}

/// Query vectors (rows x heads of one group) per work item: enough to reuse each K/V block from
/// L1 many times, small enough that a long prefill still splits into many items.
const TILE_QUERY_VECTORS: usize = 48;

/// q, out: [num_tokens, num_heads, head_dim] row-major; k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim],
/// in f32 or f16 (widened to f32 as they are read; the arithmetic is the same).
///
/// Rows of `out` not covered by any sequence are left untouched. A sequence whose slice does
/// not fit the buffers (a caller bug, caught by `debug_assert!` in tests) is skipped.
pub fn paged_attention<E: KvElement>(
    q: &[f32],
    k_cache: &[E],
    v_cache: &[E],
    seqs: &[AttnSeq],
    shape: &AttnShape,
    out: &mut [f32],
) {
    let AttnShape { num_heads, num_kv_heads, head_dim, block_size, .. } = *shape;
    debug_assert!(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "bad head counts");
    debug_assert!(head_dim > 0 && block_size > 0, "empty head or block");
    debug_assert_eq!(q.len(), out.len());
    if num_kv_heads == 0 || num_heads % num_kv_heads != 0 || head_dim == 0 || block_size == 0 {
        return;
    }
    let group = num_heads / num_kv_heads;
    let row_len = num_heads * head_dim;
    let block_len = block_size * num_kv_heads * head_dim;
    debug_assert_eq!(q.len() % row_len, 0);
    debug_assert_eq!(k_cache.len(), v_cache.len());
    debug_assert_eq!(k_cache.len() % block_len, 0);
    let num_tokens = q.len().min(out.len()) / row_len;
    let num_blocks = k_cache.len().min(v_cache.len()) / block_len;

    let rows_per_tile = (TILE_QUERY_VECTORS / group).max(1);
    let mut items = Vec::new();
    for (seq_idx, seq) in seqs.iter().enumerate() {
        let valid = seq_fits(seq, num_tokens, num_blocks, block_size);
        debug_assert!(valid, "sequence {seq_idx} does not fit the batch or cache: {seq:?}");
        if !valid {
            continue;
        }
        for kv_head in 0..num_kv_heads {
            let mut r0 = 0;
            while r0 < seq.q_len {
                let r1 = (r0 + rows_per_tile).min(seq.q_len);
                items.push(Item { seq: seq_idx, kv_head, r0, r1 });
                r0 = r1;
            }
        }
    }

    // One result buffer, cut into disjoint per-item pieces laid out [rows][group][head_dim].
    let item_len = |it: &Item| (it.r1 - it.r0) * group * head_dim;
    let mut results = vec![0f32; items.iter().map(item_len).sum()];
    let mut pieces = Vec::with_capacity(items.len());
    let mut rest = results.as_mut_slice();
    for it in &items {
        let (piece, tail) = std::mem::take(&mut rest).split_at_mut(item_len(it));
        pieces.push(piece);
        rest = tail;
    }

    let ctx = Ctx { q, k_cache, v_cache, shape: *shape, group };
    #[cfg(target_arch = "x86_64")]
    let (avx512, avx2) = (super::avx512::Avx512::detect(), super::avx2::Avx2::detect());
    items.par_iter().zip(pieces).for_each_init(Scratch::default, |scratch, (it, piece)| {
        let seq = &seqs[it.seq];
        #[cfg(target_arch = "x86_64")]
        if let Some(v) = avx512 {
            // SAFETY: `v` proves the CPU has AVX-512F (so AVX2, FMA and F16C).
            unsafe { attend_tile_avx512(v, &ctx, seq, it, scratch, piece) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(v) = avx2 {
            // SAFETY: `v` proves the CPU has AVX2 and FMA.
            unsafe { attend_tile_avx2(v, &ctx, seq, it, scratch, piece) };
            return;
        }
        attend_tile(Portable, &ctx, seq, it, scratch, piece);
    });

    let piece_row = group * head_dim;
    let mut src = results.chunks_exact(piece_row);
    for it in &items {
        let seq = &seqs[it.seq];
        for r in it.r0..it.r1 {
            let dst = (seq.q_start + r) * row_len + it.kv_head * piece_row;
            if let Some(s) = src.next() {
                out[dst..dst + piece_row].copy_from_slice(s);
            }
        }
    }
}

/// Whether a sequence's rows, context and block table lie inside the buffers.
fn seq_fits(seq: &AttnSeq, num_tokens: usize, num_blocks: usize, block_size: usize) -> bool {
    let rows_ok = seq.q_len <= seq.context_len
        && seq.q_start.checked_add(seq.q_len).is_some_and(|end| end <= num_tokens);
    let blocks = seq.context_len.div_ceil(block_size);
    rows_ok
        && seq.block_table.len() >= blocks
        && seq.block_table[..blocks].iter().all(|&b| (b as usize) < num_blocks)
}

#[derive(Debug, Clone, Copy)]
struct Item {
    seq: usize,
    kv_head: usize,
    /// Query rows r0..r1 of the sequence's slice.
    r0: usize,
    r1: usize,
}

struct Ctx<'a, E> {
    q: &'a [f32],
    k_cache: &'a [E],
    v_cache: &'a [E],
    shape: AttnShape,
    group: usize,
}

/// Per-thread buffers, reused across work items.
#[derive(Default)]
struct Scratch {
    /// Scaled query vectors of the tile, [row][group][head_dim].
    q: Vec<f32>,
    /// Running maximum and softmax denominator per query vector.
    m: Vec<f32>,
    l: Vec<f32>,
    /// Scores, then weights, of the current block per query vector, [qv][block_size].
    s: Vec<f32>,
}

/// `attend_tile` compiled with AVX2, FMA and F16C enabled, so the `Avx2` primitives inline into it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_tile_avx2<E: KvElement>(
    v: super::avx2::Avx2,
    ctx: &Ctx<E>,
    seq: &AttnSeq,
    it: &Item,
    sc: &mut Scratch,
    acc: &mut [f32],
) {
    attend_tile(v, ctx, seq, it, sc, acc)
}

/// `attend_tile` compiled with AVX-512 enabled, so the `Avx512` primitives inline into it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn attend_tile_avx512<E: KvElement>(
    v: super::avx512::Avx512,
    ctx: &Ctx<E>,
    seq: &AttnSeq,
    it: &Item,
    sc: &mut Scratch,
    acc: &mut [f32],
) {
    attend_tile(v, ctx, seq, it, sc, acc)
}

/// Attention of one tile of query rows x the heads of one kv group; `acc` receives the output
/// laid out [row][group][head_dim].
#[inline(always)]
fn attend_tile<V: Vector, E: KvElement>(
    v: V,
    ctx: &Ctx<E>,
    seq: &AttnSeq,
    it: &Item,
    sc: &mut Scratch,
    acc: &mut [f32],
) {
    let AttnShape { num_heads, num_kv_heads, head_dim: d, block_size: bs, scale } = ctx.shape;
    let g = ctx.group;
    let nrows = it.r1 - it.r0;
    let nqv = nrows * g;
    let kv_stride = num_kv_heads * d;

    sc.q.clear();
    for r in it.r0..it.r1 {
        let base = ((seq.q_start + r) * num_heads + it.kv_head * g) * d;
        sc.q.extend_from_slice(&ctx.q[base..base + g * d]);
    }
    scale_in_place(&mut sc.q, scale);
    sc.m.clear();
    sc.m.resize(nqv, f32::NEG_INFINITY);
    sc.l.clear();
    sc.l.resize(nqv, 0.0);
    sc.s.clear();
    sc.s.resize(nqv * bs, 0.0);
    acc.fill(0.0);

    // Position of the tile's first row; rows are consecutive positions.
    let first_pos = seq.context_len - seq.q_len + it.r0;
    let last_pos = first_pos + nrows - 1;
    let last_block = last_pos / bs;
    let block_rows = |b: usize| {
        let base = seq.block_table[b] as usize * bs * kv_stride + it.kv_head * d;
        base..base + (bs - 1) * kv_stride + d
    };
    for b in 0..=last_block {
        let start = b * bs;
        let k_block = &ctx.k_cache[block_rows(b)];
        let v_block = &ctx.v_cache[block_rows(b)];
        // Blocks are scattered, so hardware prefetchers restart at each one: ask for the
        // next block's rows of this kv head while this one is computed.
        if b < last_block {
            let next = block_rows(b + 1);
            for j in 0..bs {
                let row = next.start + j * kv_stride..next.start + j * kv_stride + d;
                v.prefetch(&ctx.k_cache[row.clone()]);
                v.prefetch(&ctx.v_cache[row]);
            }
        }
        // Rows before `start` see nothing of this block.
        let r_first = start.saturating_sub(first_pos);
        for r in r_first..nrows {
            let n = (first_pos + r + 1 - start).min(bs);
            let qv0 = r * g;
            // Scores, several keys at a time; the block's K rows stay in L1 across the heads.
            let k_rows = &k_block[..(n - 1) * kv_stride + d];
            for h in 0..g {
                let qv = qv0 + h;
                let s = &mut sc.s[qv * bs..qv * bs + n];
                v.dot_rows(&sc.q[qv * d..(qv + 1) * d], k_rows, kv_stride, s);
            }
            for h in 0..g {
                let qv = qv0 + h;
                let s = &mut sc.s[qv * bs..qv * bs + n];
                let m_old = sc.m[qv];
                let m_new = m_old.max(v.max(s));
                let block_sum = v.exp_sub_sum(s, m_new);
                let out = &mut acc[qv * d..(qv + 1) * d];
                if m_new > m_old && sc.l[qv] != 0.0 {
                    let alpha = exp_approx(m_old - m_new);
                    sc.l[qv] *= alpha;
                    scale_in_place(out, alpha);
                }
                sc.m[qv] = m_new;
                sc.l[qv] += block_sum;
            }
            // Values: per group head, acc[d] += p_j * v_j[d] for j in order; the block's V rows
            // stay in L1 across the heads of the group.
            for h in 0..g {
                let qv = qv0 + h;
                let p = &sc.s[qv * bs..qv * bs + n];
                v.accumulate_rows(&mut acc[qv * d..(qv + 1) * d], p, v_block, kv_stride);
            }
        }
    }
    for qv in 0..nqv {
        let l = sc.l[qv];
        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
        scale_in_place(&mut acc[qv * d..(qv + 1) * d], inv);
    }
}
