//! Checks of the kernels a forward pass runs.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{cfg, compare, n32, random_bf16, Check, Gpu, BF16_ATOL, BF16_RTOL};
use crate::backend::cuda::twins;
use crate::backend::cuda::CudaError;
use cudarc::driver::PushKernelArg;

pub(super) fn check_norm(gpu: &mut Gpu, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(1);
    let eps = 1e-5f32;
    for (rows, hidden) in [(1usize, 576usize), (7, 4096)] {
        let x = random_bf16(&mut rng, rows * hidden, 2.0);
        let w = random_bf16(&mut rng, hidden, 1.0);
        let mut residual = random_bf16(&mut rng, rows * hidden, 2.0);
        let shape = format!("rows={rows} hidden={hidden}");
        let (dx, dw) = (gpu.up_bf16(&x)?, gpu.up_bf16(&w)?);
        let mut dres = gpu.up_bf16(&residual)?;
        let mut dout = gpu.zeros::<u16>(rows * hidden)?;
        let h = hidden as i32;
        let f = gpu.func("norm.cu", "rms_norm_bf16")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&dx).arg(&dw).arg(&mut dout).arg(&h).arg(&eps);
        // SAFETY: argument list matches rms_norm_bf16; buffers hold rows * hidden elements.
        unsafe { b.launch(cfg((n32(rows), 1, 1), 256)) }?;
        let got = gpu.down_bf16(&dout, rows * hidden)?;
        compare(
            checks,
            "rms_norm_bf16",
            shape.clone(),
            &got,
            &twins::rms_norm(&x, &w, eps),
            BF16_RTOL,
            BF16_ATOL,
        );

        let f = gpu.func("norm.cu", "add_rms_norm_bf16")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&mut dres).arg(&dx).arg(&dw).arg(&mut dout).arg(&h).arg(&eps);
        // SAFETY: argument list matches add_rms_norm_bf16.
        unsafe { b.launch(cfg((n32(rows), 1, 1), 256)) }?;
        let want = twins::add_rms_norm(&mut residual, &x, &w, eps);
        let got = gpu.down_bf16(&dout, rows * hidden)?;
        compare(checks, "add_rms_norm_bf16", shape.clone(), &got, &want, BF16_RTOL, BF16_ATOL);
        let got_res = gpu.down_bf16(&dres, rows * hidden)?;
        compare(
            checks,
            "add_rms_norm_bf16 (residual)",
            shape,
            &got_res,
            &residual,
            BF16_RTOL,
            BF16_ATOL,
        );
    }
    Ok(())
}

pub(super) fn check_rope(gpu: &mut Gpu, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(2);
    let positions = [0usize, 1, 17, 300, 4000];
    let slots: [i64; 5] = [3, -1, 10, 63, 0];
    let num_slots = 64;
    // The last shape with Qwen2's attention biases.
    for (num_heads, num_kv_heads, head_dim, with_bias) in
        [(9usize, 3usize, 64usize, false), (32, 8, 128, false), (40, 8, 128, true)]
    {
        let tokens = positions.len();
        let half = head_dim / 2;
        let inv_freq: Vec<f32> =
            (0..half).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / head_dim as f32)).collect();
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for &p in &positions {
            for &f in &inv_freq {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let (q_dim, kv_row) = (num_heads * head_dim, num_kv_heads * head_dim);
        // A fused projection row, q then k then v.
        let qkv = random_bf16(&mut rng, tokens * (q_dim + 2 * kv_row), 2.0);
        let (mut q, mut k, v) = twins::split_qkv(&qkv, tokens, q_dim, kv_row);
        let bias = random_bf16(&mut rng, if with_bias { q_dim + 2 * kv_row } else { 1 }, 1.0);
        let (dbias, has_bias) = (gpu.up_bf16(&bias)?, i32::from(with_bias));
        let dqkv = gpu.up_bf16(&qkv)?;
        let mut dq = gpu.zeros::<u16>(tokens * q_dim)?;
        let (dcos, dsin, dslots) = (gpu.up(&cos)?, gpu.up(&sin)?, gpu.up(&slots)?);
        let mut dkc = gpu.zeros::<u16>(num_slots * kv_row)?;
        let mut dvc = gpu.zeros::<u16>(num_slots * kv_row)?;
        let (nh, nkv, hd) = (num_heads as i32, num_kv_heads as i32, head_dim as i32);
        let stride = (q_dim + 2 * kv_row) as i32;
        let f = gpu.func("rope_kv.cu", "rope_kv_write_bf16")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&dqkv).arg(&stride).arg(&mut dq).arg(&dcos).arg(&dsin).arg(&dslots);
        b.arg(&mut dkc).arg(&mut dvc).arg(&dbias).arg(&has_bias).arg(&nh).arg(&nkv).arg(&hd);
        // SAFETY: argument list matches rope_kv_write_bf16; every slot is below num_slots; the
        // bias is read only with has_bias, and then holds q_dim + 2 kv_row values.
        unsafe { b.launch(cfg((n32(tokens), 1, 1), 256)) }?;
        let (mut kc, mut vc) = (vec![0f32; num_slots * kv_row], vec![0f32; num_slots * kv_row]);
        let shape_t = twins::RopeShape { num_heads, num_kv_heads, head_dim };
        let b = with_bias.then_some(bias.as_slice());
        twins::rope_kv_write(&mut q, &mut k, &v, &cos, &sin, &slots, &mut kc, &mut vc, shape_t, b);
        let shape = format!(
            "tokens={tokens} heads={num_heads}/{num_kv_heads} head_dim={head_dim}{}",
            if with_bias { " with biases" } else { "" }
        );
        for (what, dev, want) in [("q", &dq, &q), ("k cache", &dkc, &kc), ("v cache", &dvc, &vc)] {
            let got = gpu.down_bf16(dev, want.len())?;
            compare(
                checks,
                &format!("rope_kv_write_bf16 ({what})"),
                shape.clone(),
                &got,
                want,
                BF16_RTOL,
                BF16_ATOL,
            );
        }
    }
    Ok(())
}

pub(super) fn check_silu(gpu: &mut Gpu, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(3);
    for (rows, inter) in [(3usize, 1536usize), (2, 14336)] {
        let gu = random_bf16(&mut rng, rows * 2 * inter, 4.0);
        let dgu = gpu.up_bf16(&gu)?;
        let mut dout = gpu.zeros::<u16>(rows * inter)?;
        let (r, i) = (rows as i32, inter as i32);
        let f = gpu.func("activation.cu", "silu_mul_bf16")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&dgu).arg(&mut dout).arg(&r).arg(&i);
        // SAFETY: argument list matches silu_mul_bf16 (grid-stride loop over rows * inter).
        unsafe { b.launch(cfg((n32((rows * inter).div_ceil(256).min(4096)), 1, 1), 256)) }?;
        let got = gpu.down_bf16(&dout, rows * inter)?;
        let shape = format!("rows={rows} inter={inter}");
        compare(
            checks,
            "silu_mul_bf16",
            shape,
            &got,
            &twins::silu_mul(&gu, inter),
            BF16_RTOL,
            BF16_ATOL,
        );
    }
    Ok(())
}

pub(super) fn check_embedding(gpu: &mut Gpu, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(4);
    let (vocab, hidden) = (1000usize, 576usize);
    let table = random_bf16(&mut rng, vocab * hidden, 1.0);
    let ids: [u32; 5] = [0, 999, 5, 1000, 42];
    let (dt, dids) = (gpu.up_bf16(&table)?, gpu.up(&ids)?);
    let mut dout = gpu.zeros::<u16>(ids.len() * hidden)?;
    let (h, v) = (hidden as i32, vocab as u32);
    let f = gpu.func("activation.cu", "embedding_bf16")?;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&dids).arg(&dt).arg(&mut dout).arg(&h).arg(&v);
    // SAFETY: argument list matches embedding_bf16; out has ids.len() rows.
    unsafe { b.launch(cfg((n32(ids.len()), 1, 1), 256)) }?;
    let got = gpu.down_bf16(&dout, ids.len() * hidden)?;
    let shape = format!("ids={} vocab={vocab} hidden={hidden} (one id out of range)", ids.len());
    compare(
        checks,
        "embedding_bf16",
        shape,
        &got,
        &twins::embedding(&ids, &table, hidden),
        0.0,
        0.0,
    );
    Ok(())
}

pub(super) fn check_attention(gpu: &mut Gpu, checks: &mut Vec<Check>) -> Result<(), CudaError> {
    use crate::backend::cpu::paged_attention::{AttnSeq, AttnShape};
    let mut rng = StdRng::seed_from_u64(5);
    // (q_len, context_len): decodes short and long, a prefill chunk, a whole prompt.
    let seq_shapes = [(1usize, 1usize), (1, 17), (5, 40), (1, 2000), (33, 33)];
    for (num_heads, num_kv_heads, head_dim) in [(9usize, 3usize, 64usize), (32, 8, 128)] {
        let bs = 16usize;
        let blocks_per: Vec<usize> = seq_shapes.iter().map(|&(_, c)| c.div_ceil(bs)).collect();
        let num_blocks: usize = blocks_per.iter().sum();
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.random_range(0..=i));
        }
        let max_blocks = blocks_per.iter().copied().max().unwrap_or(1);
        let mut tables = vec![0i32; seq_shapes.len() * max_blocks];
        let (mut row_seq, mut row_pos, mut host_tables) = (Vec::new(), Vec::new(), Vec::new());
        let mut next = 0;
        for (s, (&(q_len, ctx), &nb)) in seq_shapes.iter().zip(&blocks_per).enumerate() {
            let t: Vec<u32> = ids[next..next + nb].to_vec();
            next += nb;
            for (j, &b) in t.iter().enumerate() {
                tables[s * max_blocks + j] = b as i32;
            }
            host_tables.push(t);
            for r in 0..q_len {
                row_seq.push(s as i32);
                row_pos.push((ctx - q_len + r) as i32);
            }
        }
        let rows = row_seq.len();
        let kv_len = num_blocks * bs * num_kv_heads * head_dim;
        let q = random_bf16(&mut rng, rows * num_heads * head_dim, 1.0);
        let kc = random_bf16(&mut rng, kv_len, 1.0);
        let vc = random_bf16(&mut rng, kv_len, 1.0);
        let scale = 1.0 / (head_dim as f32).sqrt();
        let shape = AttnShape { num_heads, num_kv_heads, head_dim, block_size: bs, scale };
        let mut q_start = 0;
        let seqs: Vec<AttnSeq> = seq_shapes
            .iter()
            .zip(&host_tables)
            .map(|(&(q_len, context_len), t)| {
                let s = AttnSeq { q_start, q_len, context_len, block_table: t };
                q_start += q_len;
                s
            })
            .collect();
        let want = twins::attention(&q, &kc, &vc, &seqs, &shape);
        let (dq, dk, dv) = (gpu.up_bf16(&q)?, gpu.up_bf16(&kc)?, gpu.up_bf16(&vc)?);
        let (dseq, dpos, dtab) = (gpu.up(&row_seq)?, gpu.up(&row_pos)?, gpu.up(&tables)?);
        let max_ctx = seq_shapes.iter().map(|s| s.1).max().unwrap_or(1);
        // Partitions of at most ATTN_MAX_KEYS (512) keys.
        for partition in [64usize, 200, 512] {
            let parts = max_ctx.div_ceil(partition);
            let mut pm = gpu.zeros::<f32>(rows * num_heads * parts)?;
            let mut pl = gpu.zeros::<f32>(rows * num_heads * parts)?;
            let mut po = gpu.zeros::<f32>(rows * num_heads * parts * head_dim)?;
            let mut dout = gpu.zeros::<u16>(rows * num_heads * head_dim)?;
            let (mb, nh, nkv, hd, bsz) = (
                max_blocks as i32,
                num_heads as i32,
                num_kv_heads as i32,
                head_dim as i32,
                bs as i32,
            );
            let (ps, np) = (partition.min(i32::MAX as usize) as i32, parts as i32);
            let f = gpu.func("paged_attention.cu", "paged_attention_partial_bf16")?;
            let mut b = gpu.stream.launch_builder(&f);
            b.arg(&dq).arg(&dk).arg(&dv).arg(&dseq).arg(&dpos).arg(&dtab).arg(&mb);
            b.arg(&mut pm).arg(&mut pl).arg(&mut po).arg(&nh).arg(&nkv).arg(&hd).arg(&bsz);
            b.arg(&ps).arg(&scale);
            // SAFETY: argument list matches paged_attention_partial_bf16; partial buffers hold
            // rows * heads * parts entries; 128 threads = ATTN_THREADS.
            unsafe { b.launch(cfg((n32(num_heads), n32(rows), n32(parts)), 128)) }?;
            let f = gpu.func("paged_attention.cu", "paged_attention_combine_bf16")?;
            let mut b = gpu.stream.launch_builder(&f);
            b.arg(&pm).arg(&pl).arg(&po).arg(&mut dout).arg(&nh).arg(&hd).arg(&np);
            // SAFETY: argument list matches paged_attention_combine_bf16.
            unsafe { b.launch(cfg((n32(num_heads), n32(rows), 1), 128)) }?;
            let got = gpu.down_bf16(&dout, want.len())?;
            let shape = format!(
                "heads={num_heads}/{num_kv_heads} head_dim={head_dim} seqs(q_len,ctx)={seq_shapes:?} partitions={parts}"
            );
            compare(checks, "paged_attention_bf16", shape, &got, &want, BF16_RTOL, BF16_ATOL);
        }
    }
    Ok(())
}

/// One sequence's chunk over a paged cache: bf16-valued q and caches, random in [-1, 1), the
/// sequence's blocks shuffled so its table is not the identity.
pub struct ChunkCase {
    pub q: Vec<f32>,
    pub k_cache: Vec<f32>,
    pub v_cache: Vec<f32>,
    pub table: Vec<u32>,
    pub pos0: usize,
    pub shape: crate::backend::cpu::paged_attention::AttnShape,
}

impl ChunkCase {
    /// `rows` rows from position `pos0`, `spare` more cache blocks than they reach.
    pub fn random(
        rng: &mut StdRng,
        (rows, pos0, num_heads, num_kv_heads, head_dim): (usize, usize, usize, usize, usize),
        block_size: usize,
        spare: usize,
    ) -> Self {
        let blocks = (pos0 + rows).div_ceil(block_size) + spare;
        let mut table: Vec<u32> = (0..blocks as u32).collect();
        for i in (1..table.len()).rev() {
            table.swap(i, rng.random_range(0..=i));
        }
        let kv_len = blocks * block_size * num_kv_heads * head_dim;
        let q = random_bf16(rng, rows * num_heads * head_dim, 1.0);
        let (k_cache, v_cache) = (random_bf16(rng, kv_len, 1.0), random_bf16(rng, kv_len, 1.0));
        let scale = 1.0 / (head_dim as f32).sqrt();
        let shape = crate::backend::cpu::paged_attention::AttnShape {
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
            scale,
        };
        Self { q, k_cache, v_cache, table, pos0, shape }
    }

    /// What `attention_chunk_tiled` must give.
    pub fn twin(&self) -> Vec<f32> {
        twins::attention_chunk_bf16(
            &self.q,
            &self.k_cache,
            &self.v_cache,
            &self.table,
            self.pos0,
            &self.shape,
        )
    }
}

/// `attention_chunk_tiled`: one sequence's chunk forwarded alone, over shuffled blocks, against
/// its twin (which rounds P as the kernel does).
pub(super) fn check_chunk_attention(
    gpu: &mut Gpu,
    checks: &mut Vec<Check>,
) -> Result<(), CudaError> {
    let mut rng = StdRng::seed_from_u64(6);
    let bs = 16usize;
    // (rows, first position, heads, kv heads, head size): a prompt that ends mid-tile, a
    // whole 512-token prompt, and a training chunk of 128 late in a 1024-token sample.
    for dims in
        [(37usize, 0usize, 9usize, 3usize, 64usize), (512, 0, 32, 8, 128), (128, 896, 32, 8, 128)]
    {
        let (rows, pos0, nh, nkv, hd) = dims;
        let c = ChunkCase::random(&mut rng, dims, bs, 0);
        let want = c.twin();
        let (dq, dk, dv) = (gpu.up_bf16(&c.q)?, gpu.up_bf16(&c.k_cache)?, gpu.up_bf16(&c.v_cache)?);
        let dtab = gpu.up(&c.table.iter().map(|&b| b as i32).collect::<Vec<i32>>())?;
        let mut dout = gpu.zeros::<u16>(rows * nh * hd)?;
        let (p0, r, h, kv, d, b32) =
            (pos0 as i32, rows as i32, nh as i32, nkv as i32, hd as i32, bs as i32);
        let scale = c.shape.scale;
        let f = gpu.func("attention_tiled.cu", "attention_chunk_tiled")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&dq).arg(&dk).arg(&dv).arg(&dtab).arg(&p0).arg(&r).arg(&mut dout);
        b.arg(&h).arg(&kv).arg(&d).arg(&b32).arg(&scale);
        // SAFETY: argument list matches attention_chunk_tiled; head_dim 64 or 128, 128 threads,
        // the table names a block of the caches for every position up to pos0 + rows - 1.
        unsafe { b.launch(cfg((n32(nh), n32(rows.div_ceil(32)), 1), 128)) }?;
        let got = gpu.down_bf16(&dout, want.len())?;
        let shape = format!("rows={rows} from position {pos0} heads={nh}/{nkv} head_dim={hd}");
        compare(checks, "attention_chunk_tiled", shape, &got, &want, BF16_RTOL, BF16_ATOL);
    }
    Ok(())
}
