//! The forward's attention kernels: the paged kernel over listed rows, the tensor-core chunk
//! kernel over row tiles, and both in one mixed step as `StepBatch` splits it, against the
//! twins (the selftest's cases, `selftest::attention::StepCase`).

use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::common::emulation::{assert_close, bf16_bits, from_bf16_bits, Arg, Emulated};
use coserve::backend::cuda::selftest::attention::{only_rows, StepCase};

/// bf16 outputs: two bf16 ulps of each value plus a small share of the output's scale.
const BF16_RTOL: f32 = 1.0 / 128.0;
const BF16_ATOL: f32 = 4e-3;

/// The case's q and caches as bf16 bits, as the kernels read them.
struct Bits {
    q: Vec<u16>,
    k: Vec<u16>,
    v: Vec<u16>,
}

impl Bits {
    fn of(c: &StepCase) -> Self {
        Self { q: bf16_bits(&c.q), k: bf16_bits(&c.k_cache), v: bf16_bits(&c.v_cache) }
    }
}

/// How the paged launch runs: `hpb` query heads a block (1: `paged_attention_partial_bf16`,
/// more: `paged_attention_grouped_bf16`), partitions of `partition` keys.
#[derive(Debug, Clone, Copy)]
struct Paged {
    hpb: usize,
    partition: usize,
}

/// The paged kernels, then `paged_attention_combine_bf16`, over the rows `list` names, into
/// `out`.
fn paged(emu: &Emulated, c: &StepCase, x: &Bits, list: &[i32], how: Paged, out: &mut [u16]) {
    let (s, b) = (&c.shape, &c.batch);
    let Paged { hpb, partition } = how;
    let parts = b.max_context.div_ceil(partition);
    let n = list.len();
    let mut pm = vec![0f32; n * s.heads * parts];
    let mut pl = vec![0f32; n * s.heads * parts];
    let mut po = vec![0f32; n * s.heads * parts * s.head_dim];
    let dims =
        [s.heads, s.kv_heads, s.head_dim, s.block_size, partition].map(|v| Arg::i32(v as i32));
    // SAFETY: paged_attention_partial_bf16's parameters (paged_attention_grouped_bf16's with
    // heads_per_block, which divides the group); the list names rows of the step
    // (StepBatch), the partial buffers hold n * heads * parts entries; 128 threads =
    // ATTN_THREADS; every table entry is a block of the caches.
    unsafe {
        let mut args = vec![Arg::ptr(&x.q), Arg::ptr(&x.k), Arg::ptr(&x.v), Arg::ptr(list)];
        args.extend([Arg::ptr(&b.row_seq), Arg::ptr(&b.row_pos), Arg::ptr(&b.block_tables)]);
        args.extend([Arg::i32(b.max_blocks as i32), Arg::ptr_mut(&mut pm), Arg::ptr_mut(&mut pl)]);
        args.push(Arg::ptr_mut(&mut po));
        args.extend(dims);
        args.push(Arg::f32(c.attn_shape().scale));
        let kernel = if hpb == 1 {
            "paged_attention_partial_bf16"
        } else {
            args.push(Arg::i32(hpb as i32));
            "paged_attention_grouped_bf16"
        };
        emu.launch(kernel, ((s.heads / hpb) as u32, n as u32, parts as u32), 128, &args);
    }
    // SAFETY: paged_attention_combine_bf16's parameters, over the same rows.
    unsafe {
        let mut args = vec![Arg::ptr(&pm), Arg::ptr(&pl), Arg::ptr(&po), Arg::ptr(list)];
        args.extend([Arg::ptr_mut(out), Arg::i32(s.heads as i32), Arg::i32(s.head_dim as i32)]);
        args.push(Arg::i32(parts as i32));
        emu.launch("paged_attention_combine_bf16", (s.heads as u32, n as u32, 1), 128, &args);
    }
}

/// `attention_chunk_tiled` over the step's row tiles, into `out`.
fn chunk(emu: &Emulated, c: &StepCase, x: &Bits, out: &mut [u16]) {
    let (s, b) = (&c.shape, &c.batch);
    // SAFETY: attention_chunk_tiled's parameters; head_dim 64 or 128, 128 threads, the tiles
    // (StepBatch) name rows of q and out and positions their tables reach.
    unsafe {
        let mut args = vec![Arg::ptr(&x.q), Arg::ptr(&x.k), Arg::ptr(&x.v), Arg::ptr(&b.tiles)];
        args.extend([Arg::ptr(&b.block_tables), Arg::i32(b.max_blocks as i32), Arg::ptr_mut(out)]);
        args.extend([s.heads, s.kv_heads, s.head_dim, s.block_size].map(|v| Arg::i32(v as i32)));
        args.push(Arg::f32(c.attn_shape().scale));
        emu.launch(
            "attention_chunk_tiled",
            (s.heads as u32, (b.tiles.len() / 4) as u32, 1),
            128,
            &args,
        );
    }
}

#[test]
fn paged_attention_kernels_match_their_twin() {
    let emu = Emulated::build("paged_attention.cu");
    let mut rng = StdRng::seed_from_u64(5);
    // (rows, first position): a chunk of a tile and more (which a mixed step leaves to the
    // tensor-core kernel, so the other rows' list starts past it), decodes short and long, a
    // prefill chunk, a whole prompt.
    let seqs = [(33usize, 3usize), (1, 0), (1, 16), (5, 35), (1, 149), (9, 0)];
    // (heads, kv heads, head size) and the grouped kernel's heads a block: groups of 2 and 4
    // whole, a group of 6 in halves.
    for (heads, grouped) in [((4, 2, 64), 2), ((8, 2, 32), 4), ((6, 1, 64), 3)] {
        let c = StepCase::random(&mut rng, heads, &seqs, 16, 0).expect("a case");
        let (x, qd) = (Bits::of(&c), c.shape.q_dim());
        let all_want = c.paged_twin();
        let all: Vec<i32> = (0..c.batch.rows() as i32).collect();
        assert_eq!(c.batch.paged_rows.len(), c.batch.rows() - 33, "the 33-row chunk is tiled");
        for (which, list) in [("every row", &all), ("the rows tiles leave", &c.batch.paged_rows)] {
            let want = only_rows(&all_want, list, qd);
            // One head a block and grouped; one partition, and several (split-K, then the
            // combine).
            for hpb in [1, grouped] {
                for partition in [512usize, 64] {
                    let mut out = vec![0u16; c.q.len()];
                    let how = Paged { hpb, partition };
                    paged(&emu, &c, &x, list, how, &mut out);
                    let what = format!("paged attention over {which}, {heads:?}, {how:?}");
                    assert_close(&what, &from_bf16_bits(&out), &want, BF16_RTOL, BF16_ATOL);
                }
            }
        }
    }
}

#[test]
fn tiled_chunk_attention_kernel_matches_its_twin() {
    let emu = Emulated::build("attention_tiled.cu");
    let mut rng = StdRng::seed_from_u64(6);
    // (rows, first position), (heads, kv heads, head size): a first chunk that ends mid-tile,
    // a later chunk with a group of four, one whole tile without GQA.
    for (seq, heads) in
        [((37usize, 0usize), (4, 2, 64)), ((70, 45), (4, 1, 128)), ((32, 100), (2, 2, 64))]
    {
        let c = StepCase::random(&mut rng, heads, &[seq], 16, 2).expect("a case");
        let want = c.step_twin().expect("the twin device");
        // The twin is attention: the paged kernel's twin (fp32 P) within bf16 error of it.
        let what = format!("tiled twin against the paged twin, {seq:?}");
        assert_close(&what, &want, &c.paged_twin(), BF16_RTOL, BF16_ATOL);
        let mut out = vec![0u16; c.q.len()];
        chunk(&emu, &c, &Bits::of(&c), &mut out);
        let what =
            format!("attention_chunk_tiled, (rows, first position) {seq:?}, heads {heads:?}");
        assert_close(&what, &from_bf16_bits(&out), &want, BF16_RTOL, BF16_ATOL);
    }
}

#[test]
fn a_mixed_step_splits_between_the_kernels_as_the_twin_device_does() {
    let paged_emu = Emulated::build("paged_attention.cu");
    let tiled_emu = Emulated::build("attention_tiled.cu");
    let mut rng = StdRng::seed_from_u64(8);
    // (rows, first position): a decode, a training chunk of 45 late in its sample, a short
    // prompt, a first decode, a one-tile prompt, a long decode.
    let seqs = [(1usize, 69usize), (45, 20), (5, 0), (1, 0), (32, 0), (1, 150)];
    for heads in [(4usize, 2usize, 64usize), (2, 1, 128)] {
        let c = StepCase::random(&mut rng, heads, &seqs, 16, 1).expect("a case");
        assert_eq!(c.batch.tiles.len() / 4, 2 + 1, "45 rows in two tiles, 32 in one");
        let want = c.step_twin().expect("the twin device");
        let what = format!("the twin device's split against the paged twin, heads {heads:?}");
        assert_close(&what, &want, &c.paged_twin(), BF16_RTOL, BF16_ATOL);
        let x = Bits::of(&c);
        let mut out = vec![0u16; c.q.len()];
        chunk(&tiled_emu, &c, &x, &mut out);
        let how = Paged { hpb: 1, partition: 64 };
        paged(&paged_emu, &c, &x, &c.batch.paged_rows, how, &mut out);
        let what = format!("a mixed step's attention, heads {heads:?}");
        assert_close(&what, &from_bf16_bits(&out), &want, BF16_RTOL, BF16_ATOL);
    }
}
