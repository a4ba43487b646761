//! Checks of the forward's attention kernels: the paged kernel over listed rows, the
//! tensor-core chunk kernel over row tiles, and a mixed step through `CudaOps`, each against
//! the twins. `StepCase` builds the inputs; the CPU-emulated kernel tests use it too.

use cudarc::driver::PushKernelArg;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{cfg, compare, n32, random_bf16, Check, Gpu, BF16_ATOL, BF16_RTOL};
use crate::backend::cpu::paged_attention::{AttnSeq, AttnShape};
use crate::backend::cuda::decoder::cuda::{heads_per_block, CudaCache, CudaOps};
use crate::backend::cuda::decoder::host::{HostCache, HostOps};
use crate::backend::cuda::decoder::{
    tiled_attention_head, DecoderOps, DecoderShape, SeqRows, StepBatch,
};
use crate::backend::cuda::twins;
use crate::backend::cuda::CudaError;

/// One forward's attention inputs: the rows of some sequences, laid out by `StepBatch` as the
/// kernels read them, bf16-valued q and caches random in [-1, 1), the cache blocks shuffled so
/// no table is the identity.
pub struct StepCase {
    /// Heads, kv heads, head size and block size as given; the rest nominal.
    pub shape: DecoderShape,
    pub batch: StepBatch,
    pub q: Vec<f32>,
    pub k_cache: Vec<f32>,
    pub v_cache: Vec<f32>,
}

impl StepCase {
    /// `seqs`: each sequence's (rows, first position); `spare` cache blocks beyond those the
    /// sequences reach.
    pub fn random(
        rng: &mut StdRng,
        (heads, kv_heads, head_dim): (usize, usize, usize),
        seqs: &[(usize, usize)],
        block_size: usize,
        spare: usize,
    ) -> Result<Self, CudaError> {
        let per: Vec<usize> = seqs.iter().map(|&(n, p)| (p + n).div_ceil(block_size)).collect();
        let blocks = per.iter().sum::<usize>() + spare;
        let mut ids: Vec<u32> = (0..blocks as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.random_range(0..=i));
        }
        let mut next = 0;
        let rows: Vec<SeqRows> = seqs
            .iter()
            .zip(&per)
            .map(|(&(n, start), &nb)| {
                next += nb;
                SeqRows {
                    tokens: vec![0; n],
                    start,
                    block_table: ids[next - nb..next].to_vec(),
                    adapter: None,
                }
            })
            .collect();
        let batch = StepBatch::new(rows, block_size)?;
        let shape = DecoderShape {
            vocab: 1,
            hidden: heads * head_dim,
            inter: heads * head_dim,
            layers: 1,
            heads,
            kv_heads,
            head_dim,
            eps: 1e-5,
            block_size,
            qkv_bias: false,
        };
        shape.check_kernels()?;
        let kv_len = blocks * block_size * shape.kv_dim();
        let q = random_bf16(rng, batch.rows() * shape.q_dim(), 1.0);
        let (k_cache, v_cache) = (random_bf16(rng, kv_len, 1.0), random_bf16(rng, kv_len, 1.0));
        Ok(Self { shape, batch, q, k_cache, v_cache })
    }

    pub fn attn_shape(&self) -> AttnShape {
        let s = &self.shape;
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        AttnShape {
            num_heads: s.heads,
            num_kv_heads: s.kv_heads,
            head_dim: s.head_dim,
            block_size: s.block_size,
            scale,
        }
    }

    /// Every row as the paged kernel computes it (its twin).
    pub fn paged_twin(&self) -> Vec<f32> {
        let mut q_start = 0;
        let seqs: Vec<AttnSeq> = self
            .batch
            .seqs
            .iter()
            .map(|sr| {
                let n = sr.tokens.len();
                q_start += n;
                AttnSeq {
                    q_start: q_start - n,
                    q_len: n,
                    context_len: sr.start + n,
                    block_table: &sr.block_table,
                }
            })
            .collect();
        twins::attention(&self.q, &self.k_cache, &self.v_cache, &seqs, &self.attn_shape())
    }

    /// What the forward's attention must give: the twin device's (`HostOps`), which runs the
    /// chunks `tiled_chunk` picks as the tensor-core kernel and the other rows as the paged one.
    pub fn step_twin(&self) -> Result<Vec<f32>, CudaError> {
        let mut host = HostOps;
        let step = host.upload(&self.batch, &[], &[])?;
        let cache = HostCache { k: self.k_cache.clone(), v: self.v_cache.clone() };
        let mut out = vec![0f32; self.q.len()];
        host.attention(&step, &self.q, &cache, &mut out, &self.shape)?;
        Ok(out)
    }
}

/// `want` with the rows not in `list` zeroed: what a launch over `list` leaves in a zeroed
/// output.
pub fn only_rows(want: &[f32], list: &[i32], row_len: usize) -> Vec<f32> {
    let mut out = vec![0f32; want.len()];
    for &r in list {
        let at = r as usize * row_len..(r as usize + 1) * row_len;
        out[at.clone()].copy_from_slice(&want[at]);
    }
    out
}

/// The paged kernels over every row, then over the rows a mixed step leaves them, one query
/// head a block and grouped, at several partition sizes.
pub(super) fn check_attention(gpu: &mut Gpu, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(5);
    // (rows, first position): a whole prompt (which a mixed step leaves to the tensor-core
    // kernel, so the other rows' list starts past it), decodes short and long, a prefill chunk.
    let seqs = [(33usize, 0usize), (1, 0), (1, 16), (5, 35), (1, 1999)];
    // (heads, kv heads, head size) and the grouped kernel's heads a block.
    for (heads, grouped) in [((9usize, 3usize, 64usize), 3usize), ((32, 8, 128), 4)] {
        let c = StepCase::random(&mut rng, heads, &seqs, 16, 0)?;
        let (rows, qd, b) = (c.batch.rows(), c.shape.q_dim(), &c.batch);
        let all_want = c.paged_twin();
        let (dq, dk, dv) = (gpu.up_bf16(&c.q)?, gpu.up_bf16(&c.k_cache)?, gpu.up_bf16(&c.v_cache)?);
        let (dseq, dpos, dtab) =
            (gpu.up(&b.row_seq)?, gpu.up(&b.row_pos)?, gpu.up(&b.block_tables)?);
        let all: Vec<i32> = (0..rows as i32).collect();
        let s = &c.shape;
        let (mb, nh, nkv, hd, bsz) = (
            b.max_blocks as i32,
            s.heads as i32,
            s.kv_heads as i32,
            s.head_dim as i32,
            s.block_size as i32,
        );
        for (which, list) in [("every row", &all), ("rows the tiles leave", &b.paged_rows)] {
            let want = only_rows(&all_want, list, qd);
            let (dlist, n) = (gpu.up(list)?, list.len());
            // Partitions of at most ATTN_MAX_KEYS (512) keys.
            for (hpb, partition) in
                [1, grouped].into_iter().flat_map(|h| [64, 200, 512].map(|p| (h, p)))
            {
                let parts = b.max_context.div_ceil(partition);
                let mut pm = gpu.zeros::<f32>(n * s.heads * parts)?;
                let mut pl = gpu.zeros::<f32>(n * s.heads * parts)?;
                let mut po = gpu.zeros::<f32>(n * s.heads * parts * s.head_dim)?;
                let mut dout = gpu.zeros::<u16>(rows * qd)?;
                let (ps, np, h) = (partition as i32, parts as i32, hpb as i32);
                let scale = c.attn_shape().scale;
                let name = if hpb == 1 {
                    "paged_attention_partial_bf16"
                } else {
                    "paged_attention_grouped_bf16"
                };
                let f = gpu.func("paged_attention.cu", name)?;
                let mut l = gpu.stream.launch_builder(&f);
                l.arg(&dq).arg(&dk).arg(&dv).arg(&dlist).arg(&dseq).arg(&dpos).arg(&dtab);
                l.arg(&mb).arg(&mut pm).arg(&mut pl).arg(&mut po).arg(&nh).arg(&nkv).arg(&hd);
                l.arg(&bsz).arg(&ps).arg(&scale);
                if hpb > 1 {
                    l.arg(&h);
                }
                // SAFETY: argument list matches the named kernel (heads_per_block divides the
                // group); the list names rows of the step, partial buffers hold n * heads *
                // parts entries; 128 threads = ATTN_THREADS.
                unsafe { l.launch(cfg((n32(s.heads / hpb), n32(n), n32(parts)), 128)) }?;
                let f = gpu.func("paged_attention.cu", "paged_attention_combine_bf16")?;
                let mut l = gpu.stream.launch_builder(&f);
                l.arg(&pm).arg(&pl).arg(&po).arg(&dlist).arg(&mut dout).arg(&nh).arg(&hd);
                l.arg(&np);
                // SAFETY: argument list matches paged_attention_combine_bf16, the same rows.
                unsafe { l.launch(cfg((n32(s.heads), n32(n), 1), 128)) }?;
                let got = gpu.down_bf16(&dout, want.len())?;
                let shape = format!(
                    "{which} ({n} of {rows}), heads={nh}/{nkv} head_dim={hd} \
                     seqs(rows,first position)={seqs:?} partitions={parts}, heads a block: {hpb}"
                );
                compare(checks, "paged_attention_bf16", shape, &got, &want, BF16_RTOL, BF16_ATOL);
            }
        }
    }
    Ok(())
}

/// `attention_chunk_tiled`: one sequence's chunk forwarded alone, over shuffled blocks, against
/// its twin (which rounds P as the kernel does).
pub(super) fn check_chunk_attention(
    gpu: &mut Gpu,
    checks: &mut Vec<Check>,
) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(6);
    // (rows, first position), (heads, kv heads, head size): a prompt that ends mid-tile, a
    // whole 512-token prompt, and a training chunk of 128 late in a 1024-token sample.
    for (seq, heads) in
        [((37usize, 0usize), (9, 3, 64)), ((512, 0), (32, 8, 128)), ((128, 896), (32, 8, 128))]
    {
        let c = StepCase::random(&mut rng, heads, &[seq], 16, 0)?;
        let want = c.step_twin()?;
        let (dq, dk, dv) = (gpu.up_bf16(&c.q)?, gpu.up_bf16(&c.k_cache)?, gpu.up_bf16(&c.v_cache)?);
        let (dtiles, dtab) = (gpu.up(&c.batch.tiles)?, gpu.up(&c.batch.block_tables)?);
        let mut dout = gpu.zeros::<u16>(c.q.len())?;
        let s = &c.shape;
        let (nh, nkv, hd, bs) =
            (s.heads as i32, s.kv_heads as i32, s.head_dim as i32, s.block_size as i32);
        let (mb, scale) = (c.batch.max_blocks as i32, c.attn_shape().scale);
        let tiles = c.batch.tiles.len() / 4;
        let f = gpu.func("attention_tiled.cu", "attention_chunk_tiled")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&dq).arg(&dk).arg(&dv).arg(&dtiles).arg(&dtab).arg(&mb).arg(&mut dout);
        b.arg(&nh).arg(&nkv).arg(&hd).arg(&bs).arg(&scale);
        // SAFETY: argument list matches attention_chunk_tiled; head_dim 64 or 128, 128 threads,
        // the tiles (StepBatch) name rows of q and out and positions the table reaches.
        unsafe { b.launch(cfg((n32(s.heads), n32(tiles), 1), 128)) }?;
        let got = gpu.down_bf16(&dout, want.len())?;
        let (rows, pos0) = seq;
        let shape = format!("rows={rows} from position {pos0} heads={nh}/{nkv} head_dim={hd}");
        compare(checks, "attention_chunk_tiled", shape, &got, &want, BF16_RTOL, BF16_ATOL);
    }
    Ok(())
}

/// A mixed forward's attention through `CudaOps`: decodes, short chunks and long ones in one
/// step, the long ones on the tensor-core kernel and the rest paged, and a head size without
/// the tensor-core kernel, where every row is paged.
pub(super) fn check_step_attention(
    ops: &mut CudaOps,
    checks: &mut Vec<Check>,
) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(8);
    // (rows, first position): a decode, a training chunk of 45 late in its sample, a short
    // prompt, a first decode, a one-tile prompt, a long decode.
    let few = vec![(1usize, 69usize), (45, 20), (5, 0), (1, 0), (32, 0), (1, 1999)];
    // A 128-row training chunk co-served with 20 decodes: enough rows for grouped heads.
    let mut many: Vec<(usize, usize)> = (0..20).map(|i| (1, 7 * i + 3)).collect();
    many.insert(5, (128, 256));
    let cases = [(&few, (4usize, 2usize, 64usize)), (&few, (32, 8, 128)), (&few, (4, 2, 96))];
    for (seqs, heads) in cases.into_iter().chain([(&many, (8, 2, 64)), (&many, (6, 2, 96))]) {
        let c = StepCase::random(&mut rng, heads, seqs, 16, 1)?;
        let want = c.step_twin()?;
        let rope = vec![0f32; c.batch.rows() * c.shape.head_dim / 2];
        let st = ops.upload(&c.batch, &rope, &rope)?;
        let cache = CudaCache { k: ops.gpu.up_bf16(&c.k_cache)?, v: ops.gpu.up_bf16(&c.v_cache)? };
        let q = ops.gpu.up_bf16(&c.q)?;
        let mut out = ops.gpu.zeros::<u16>(c.q.len())?;
        ops.attention(&st, &q, &cache, &mut out, &c.shape)?;
        let got = ops.gpu.down_bf16(&out, want.len())?;
        let (nh, nkv, hd) = heads;
        let tiles = if tiled_attention_head(hd) { c.batch.tiles.len() / 4 } else { 0 };
        let paged = if tiles > 0 { c.batch.paged_rows.len() } else { c.batch.rows() };
        let hpb = heads_per_block(paged, &c.shape);
        let shape = format!(
            "heads={nh}/{nkv} head_dim={hd} seqs(rows,first position)={seqs:?}, {tiles} tiles, \
             {paged} rows paged, heads a block: {hpb}"
        );
        compare(checks, "attention of a mixed step", shape, &got, &want, BF16_RTOL, BF16_ATOL);
    }
    Ok(())
}
