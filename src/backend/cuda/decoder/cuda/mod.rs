//! [`DecoderOps`] on a CUDA device: the kernels of `kernels/*.cu` and cuBLASLt.

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::{CudaEvent, CudaFunction, CudaSlice, PushKernelArg};

use super::lora::{DropoutSite, LoraDims, SlotWeights};
use super::{tiled_attention_head, DecoderOps, DecoderShape, StepBatch};
use crate::backend::cuda::gemm::{addr, Gemm, OutType};
use crate::backend::cuda::gpu::{cfg, n32, Gpu};
use crate::backend::cuda::sampling::{
    apply_penalties_on_device, sample_on_device, Penalties, RowSample, RowSampling,
};
use crate::backend::cuda::CudaError;

mod attention_paged;
mod attention_tiled;
pub use attention_paged::{heads_per_block, ChunkAttentionTimes, DecodeAttentionTimes};
pub use attention_tiled::AttentionBackwardTimes;
mod lora_launch;
mod lora_table;
mod train;
mod weights_and_graphs;

use lora_launch::{
    check_lora, dropout_grid, dropout_site_args, launch_expand, launch_shrink, DROPOUT_THREADS,
};
pub use lora_table::CudaLoraTable;

/// The kernels a forward launches, looked up once.
struct Kernels {
    embedding: CudaFunction,
    rms_norm: CudaFunction,
    add_rms_norm: CudaFunction,
    rope_kv_write: CudaFunction,
    attn_partial: CudaFunction,
    attn_grouped: CudaFunction,
    attn_combine: CudaFunction,
    attn_chunk: CudaFunction,
    silu_mul: CudaFunction,
    argmax: CudaFunction,
    fill: CudaFunction,
    lora_shrink: CudaFunction,
    lora_expand: CudaFunction,
    lora_dropout: CudaFunction,
    lora_dropout_add: CudaFunction,
}

pub struct CudaOps {
    pub gpu: Gpu,
    gemm: Gemm,
    k: Kernels,
    sms: usize,
    /// Split-K partials of attention, grown to the largest forward seen.
    part_ml: (CudaSlice<f32>, CudaSlice<f32>),
    part_o: CudaSlice<f32>,
    /// LoRA's low-rank activations `[rows, max_rank]`, grown to the largest forward seen.
    lora_u: CudaSlice<f32>,
    /// Set while a forward is being captured: nothing may be allocated then.
    capturing: bool,
    /// Counts the times the buffers above were made anew (captured forwards point into them).
    epoch: u64,
    /// Named events of a profiled forward (`start_profile`).
    profile: Option<Vec<(&'static str, CudaEvent)>>,
    /// The training step's kernels and scratch, made when training first needs them.
    train: Option<train::TrainState>,
}

/// A batch on the device.
pub struct CudaStep {
    rows: usize,
    tokens: CudaSlice<u32>,
    cos: CudaSlice<f32>,
    sin: CudaSlice<f32>,
    slots: CudaSlice<i64>,
    /// `slots` on the host (the training backward gathers the rows' K and V by them).
    host_slots: Vec<i64>,
    row_seq: CudaSlice<i32>,
    row_pos: CudaSlice<i32>,
    row_slots: CudaSlice<i32>,
    tables: CudaSlice<i32>,
    max_blocks: usize,
    max_context: usize,
    blocks_needed: usize,
    slots_needed: usize,
    /// [`StepBatch::tiles`] (four values a tile) and `paged_rows` for the attention kernels,
    /// each at least one entry long so an empty one still has a valid pointer; and every row
    /// in order where `paged_rows` is not that already (a step with tiles).
    tiles: CudaSlice<i32>,
    n_tiles: usize,
    paged_rows: CudaSlice<i32>,
    n_paged: usize,
    paged_context: usize,
    all_rows: Option<CudaSlice<i32>>,
}

/// One layer's K and V cache, `[slots, kv_heads, head_dim]` bf16 each.
pub struct CudaCache {
    pub k: CudaSlice<u16>,
    pub v: CudaSlice<u16>,
}

type R = Result<(), CudaError>;

/// Threads per block of the row kernels (a multiple of 32, as the block reductions need).
const ROW_THREADS: u32 = 256;
/// The per-row kernels of a decode step have one block per row: with few rows, a wide block
/// is all the parallelism there is.
const WIDE_ROW_THREADS: u32 = 1024;
/// `paged_attention_partial_bf16`'s ATTN_THREADS.
const ATTN_THREADS: u32 = 128;
/// `paged_attention_partial_bf16` keeps a partition's scores in shared memory: ATTN_MAX_KEYS.
pub(super) const ATTN_MAX_KEYS: usize = 512;

impl CudaOps {
    pub fn new(mut gpu: Gpu) -> Result<Self, CudaError> {
        let k = Kernels {
            embedding: gpu.func("activation.cu", "embedding_bf16")?,
            rms_norm: gpu.func("norm.cu", "rms_norm_bf16")?,
            add_rms_norm: gpu.func("norm.cu", "add_rms_norm_bf16")?,
            rope_kv_write: gpu.func("rope_kv.cu", "rope_kv_write_bf16")?,
            attn_partial: gpu.func("paged_attention.cu", "paged_attention_partial_bf16")?,
            attn_grouped: gpu.func("paged_attention.cu", "paged_attention_grouped_bf16")?,
            attn_combine: gpu.func("paged_attention.cu", "paged_attention_combine_bf16")?,
            attn_chunk: gpu.func("attention_tiled.cu", "attention_chunk_tiled")?,
            silu_mul: gpu.func("activation.cu", "silu_mul_bf16")?,
            argmax: gpu.func("sampling.cu", "argmax_logprob_f32")?,
            fill: gpu.func("init.cu", "fill_uniform_bf16")?,
            lora_shrink: gpu.func("lora.cu", "lora_shrink_bf16")?,
            lora_expand: gpu.func("lora.cu", "lora_expand_bf16")?,
            lora_dropout: gpu.func("lora.cu", "lora_dropout_bf16")?,
            lora_dropout_add: gpu.func("lora.cu", "lora_dropout_add_f32")?,
        };
        let gemm = Gemm::new(&gpu.toolkit, gpu.stream.clone())?;
        let sms =
            gpu.ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let part_ml = (gpu.zeros::<f32>(1)?, gpu.zeros::<f32>(1)?);
        let part_o = gpu.zeros::<f32>(1)?;
        let lora_u = gpu.zeros::<f32>(1)?;
        Ok(Self {
            lora_u,
            gemm,
            k,
            sms: sms.max(1) as usize,
            part_ml,
            part_o,
            gpu,
            profile: None,
            capturing: false,
            epoch: 0,
            train: None,
        })
    }

    /// `y[m, n] = x[m, k] · w[row0 .. row0 + n, k]ᵀ` by cuBLASLt, `y` of the element type `out`
    /// names.
    fn product<T>(
        &mut self,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        row0: usize,
        y: &mut CudaSlice<T>,
        (m, n, k): (usize, usize, usize),
        out: OutType,
    ) -> R {
        check_len(x.len(), m * k, "product input")?;
        check_len(w.len(), (row0 + n) * k, "product weight")?;
        check_len(y.len(), m * n, "product output")?;
        let st = &self.gpu.stream;
        let (xp, wp, yp) = (addr(x, st, 0), addr(w, st, row0 * k), addr(y, st, 0));
        // SAFETY: the lengths were checked above and `out` is `y`'s element type (the callers
        // pair them). The buffers are borrowed for this call only: callers keep them alive until
        // the stream has run the product (`forward` ends in a synchronising copy; a captured
        // graph must not outlive them, see `capture`).
        unsafe { self.gemm.matmul(xp, wp, yp, (m, n, k), out) }
    }
}

impl DecoderOps for CudaOps {
    type Weight = CudaSlice<u16>;
    type Act = CudaSlice<u16>;
    type Logits = CudaSlice<f32>;
    type Step = CudaStep;
    type Cache = CudaCache;
    type Ids = (CudaSlice<u32>, CudaSlice<f32>);
    type LoraTable = CudaLoraTable;
    type Graph = cudarc::driver::CudaGraph;

    fn mark(&mut self, name: &'static str) -> R {
        if let Some(p) = &mut self.profile {
            p.push((name, self.gpu.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?));
        }
        Ok(())
    }

    fn act(&mut self, n: usize) -> Result<CudaSlice<u16>, CudaError> {
        self.gpu.zeros(n)
    }

    fn logits(&mut self, n: usize) -> Result<CudaSlice<f32>, CudaError> {
        self.gpu.zeros(n)
    }

    fn lora_table(
        &mut self,
        slots: &[Option<SlotWeights<'_>>],
    ) -> Result<CudaLoraTable, CudaError> {
        CudaLoraTable::upload(&self.gpu, slots)
    }

    fn lora_table_join(
        &mut self,
        parts: &[(Option<&CudaLoraTable>, usize)],
    ) -> Result<CudaLoraTable, CudaError> {
        CudaLoraTable::join(&self.gpu, parts)
    }

    fn lora(
        &mut self,
        st: &CudaStep,
        x: &CudaSlice<u16>,
        t: &CudaLoraTable,
        y: &mut CudaSlice<u16>,
        d: LoraDims,
    ) -> R {
        let rows = st.rows;
        check_lora(st, x.len(), y.len(), t, d)?;
        if self.lora_u.len() < rows * d.max_rank {
            if self.capturing {
                return Err(CudaError::Shape("LoRA scratch would grow during a capture".into()));
            }
            self.lora_u = self.gpu.zeros(rows * d.max_rank)?;
            self.epoch += 1;
        }
        launch_shrink(&self.gpu, &self.k, st, x, t, &mut self.lora_u, d)?;
        launch_expand(&self.gpu, &self.k, st, &self.lora_u, t, y, d)
    }

    fn lora_dropout(
        &mut self,
        st: &CudaStep,
        x: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
        rows: std::ops::Range<usize>,
        width: usize,
        site: DropoutSite,
    ) -> R {
        check_len(x.len().min(out.len()), st.rows * width, "LoRA dropout rows")?;
        if rows.end > st.rows || rows.start > rows.end {
            return Err(CudaError::Shape(format!("dropout of rows {rows:?} of {}", st.rows)));
        }
        let (r0, r1, w) = (n32(rows.start) as i32, n32(rows.end) as i32, n32(width) as i32);
        let (p, seed, layer, module) = dropout_site_args(&site);
        let mut b = self.gpu.stream.launch_builder(&self.k.lora_dropout);
        b.arg(x).arg(out).arg(&st.row_pos).arg(&r0).arg(&r1).arg(&w);
        b.arg(&p).arg(&seed).arg(&layer).arg(&module);
        // SAFETY: argument list matches lora_dropout_bf16; x and out hold the step's rows of
        // `width`, row_pos one position per row (checked above).
        unsafe { b.launch(cfg(dropout_grid(st.rows, width), DROPOUT_THREADS)) }?;
        Ok(())
    }

    fn cache(&mut self, s: &DecoderShape, blocks: usize) -> Result<CudaCache, CudaError> {
        let n = blocks * s.block_size * s.kv_dim();
        Ok(CudaCache { k: self.gpu.zeros(n)?, v: self.gpu.zeros(n)? })
    }

    fn upload(&mut self, b: &StepBatch, cos: &[f32], sin: &[f32]) -> Result<CudaStep, CudaError> {
        let g = &self.gpu;
        let list = |x: &[i32]| if x.is_empty() { g.zeros(1) } else { g.up(x) };
        let all = (!b.tiles.is_empty()).then(|| (0..b.rows()).map(|r| r as i32).collect());
        Ok(CudaStep {
            rows: b.rows(),
            tokens: g.up(&b.tokens)?,
            cos: g.up(cos)?,
            sin: g.up(sin)?,
            slots: g.up(&b.slots)?,
            host_slots: b.slots.clone(),
            row_seq: g.up(&b.row_seq)?,
            row_pos: g.up(&b.row_pos)?,
            row_slots: g.up(&b.row_slots)?,
            tables: g.up(&b.block_tables)?,
            max_blocks: b.max_blocks,
            max_context: b.max_context,
            blocks_needed: b.blocks_needed,
            slots_needed: b.slots_needed,
            tiles: list(&b.tiles)?,
            n_tiles: b.tiles.len() / 4,
            paged_rows: list(&b.paged_rows)?,
            n_paged: b.paged_rows.len(),
            paged_context: b.paged_context,
            all_rows: all.map(|a: Vec<i32>| g.up(&a)).transpose()?,
        })
    }

    fn upload_into(&mut self, st: &mut CudaStep, b: &StepBatch, cos: &[f32], sin: &[f32]) -> R {
        self.upload_in_place(st, b, cos, sin)
    }

    fn record<F: FnOnce(&mut Self) -> R>(
        &mut self,
        f: F,
    ) -> Result<Option<Self::Graph>, CudaError> {
        self.capture(f).map(Some)
    }

    fn replay(&mut self, graph: &Self::Graph) -> R {
        Ok(graph.launch()?)
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn tune_products(&mut self, on: bool) {
        self.gemm.set_tuning(on);
    }

    fn embedding(
        &mut self,
        st: &CudaStep,
        table: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
        s: &DecoderShape,
    ) -> R {
        let (h, v) = (s.hidden as i32, s.vocab as u32);
        let mut b = self.gpu.stream.launch_builder(&self.k.embedding);
        b.arg(&st.tokens).arg(table).arg(out).arg(&h).arg(&v);
        // SAFETY: argument list matches embedding_bf16; out holds rows * hidden.
        unsafe { b.launch(cfg((n32(st.rows), 1, 1), ROW_THREADS)) }?;
        Ok(())
    }

    fn rms_norm(
        &mut self,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
        rows: usize,
        s: &DecoderShape,
    ) -> R {
        let h = s.hidden as i32;
        let mut b = self.gpu.stream.launch_builder(&self.k.rms_norm);
        b.arg(x).arg(w).arg(out).arg(&h).arg(&s.eps);
        // SAFETY: argument list matches rms_norm_bf16; both buffers hold rows * hidden.
        unsafe { b.launch(cfg((n32(rows), 1, 1), WIDE_ROW_THREADS)) }?;
        Ok(())
    }

    fn add_rms_norm(
        &mut self,
        residual: &mut CudaSlice<u16>,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
        rows: usize,
        s: &DecoderShape,
    ) -> R {
        let h = s.hidden as i32;
        let mut b = self.gpu.stream.launch_builder(&self.k.add_rms_norm);
        b.arg(residual).arg(x).arg(w).arg(out).arg(&h).arg(&s.eps);
        // SAFETY: argument list matches add_rms_norm_bf16; all buffers hold rows * hidden.
        unsafe { b.launch(cfg((n32(rows), 1, 1), WIDE_ROW_THREADS)) }?;
        Ok(())
    }

    fn matmul(
        &mut self,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        row0: usize,
        y: &mut CudaSlice<u16>,
        mnk: (usize, usize, usize),
    ) -> R {
        self.product(x, w, row0, y, mnk, OutType::Bf16)
    }

    fn matmul_logits(
        &mut self,
        x: &CudaSlice<u16>,
        w: &CudaSlice<u16>,
        y: &mut CudaSlice<f32>,
        mnk: (usize, usize, usize),
    ) -> R {
        self.product(x, w, 0, y, mnk, OutType::F32)
    }

    fn rope_kv_write(
        &mut self,
        st: &CudaStep,
        qkv: &CudaSlice<u16>,
        bias: Option<&CudaSlice<u16>>,
        q_out: &mut CudaSlice<u16>,
        cache: &mut CudaCache,
        s: &DecoderShape,
    ) -> R {
        check_cache(cache, st, s)?;
        check_len(qkv.len(), st.rows * s.qkv_rows(), "qkv")?;
        check_len(q_out.len(), st.rows * s.q_dim(), "q")?;
        if let Some(b) = bias {
            check_len(b.len(), s.qkv_rows(), "q/k/v bias")?;
        }
        let (nh, nkv, hd) = (s.heads as i32, s.kv_heads as i32, s.head_dim as i32);
        let stride = s.qkv_rows() as i32;
        let has_bias = i32::from(bias.is_some());
        let mut b = self.gpu.stream.launch_builder(&self.k.rope_kv_write);
        b.arg(qkv).arg(&stride).arg(q_out).arg(&st.cos).arg(&st.sin).arg(&st.slots);
        // Without a bias the kernel reads none: any valid pointer stands in.
        b.arg(&mut cache.k).arg(&mut cache.v).arg(bias.unwrap_or(qkv)).arg(&has_bias);
        b.arg(&nh).arg(&nkv).arg(&hd);
        // SAFETY: argument list matches rope_kv_write_bf16; qkv and q_out hold the rows, the
        // bias (when there is one) qkv_rows values, and the cache every block the batch's
        // tables reach (all checked above).
        unsafe { b.launch(cfg((n32(st.rows), 1, 1), WIDE_ROW_THREADS)) }?;
        Ok(())
    }

    fn attention(
        &mut self,
        st: &CudaStep,
        q: &CudaSlice<u16>,
        cache: &CudaCache,
        out: &mut CudaSlice<u16>,
        s: &DecoderShape,
    ) -> R {
        check_cache(cache, st, s)?;
        // Chunks of a tile or more on the tensor cores (`tiled_chunk`), the rest paged.
        if tiled_attention_head(s.head_dim)
            && st.n_tiles > 0
            && attention_tiled::aligned(&self.gpu, [q, &cache.k, &cache.v])
        {
            attention_tiled::chunk(&self.gpu, &self.k.attn_chunk, st, q, cache, out, s)?;
            if st.n_paged == 0 {
                return Ok(());
            }
            return self.paged_attention(st, st.paged(), q, cache, out, s);
        }
        self.paged_attention(st, st.all(), q, cache, out, s)
    }

    fn silu_mul(
        &mut self,
        gate_up: &CudaSlice<u16>,
        out: &mut CudaSlice<u16>,
        rows: usize,
        inter: usize,
    ) -> R {
        let (r, i) = (rows as i32, inter as i32);
        let grid = n32((rows * inter).div_ceil(ROW_THREADS as usize).clamp(1, 32 * self.sms));
        let mut b = self.gpu.stream.launch_builder(&self.k.silu_mul);
        b.arg(gate_up).arg(out).arg(&r).arg(&i);
        // SAFETY: argument list matches silu_mul_bf16 (a grid-stride loop over rows * inter).
        unsafe { b.launch(cfg((grid, 1, 1), ROW_THREADS)) }?;
        Ok(())
    }

    fn gather_rows(
        &mut self,
        x: &CudaSlice<u16>,
        x_rows: usize,
        rows: &[u32],
        out: &mut CudaSlice<u16>,
        width: usize,
    ) -> R {
        check_len(x.len(), x_rows * width, "gathered activations")?;
        check_len(out.len(), rows.len() * width, "gather output")?;
        if rows.is_empty() {
            return Ok(());
        }
        // The embedding gather with the activations as its table: an index past `x_rows`
        // gives a zero row there, so refuse it here instead.
        if let Some(r) = rows.iter().find(|&&r| r as usize >= x_rows) {
            return Err(CudaError::Shape(format!("gather of row {r} of {x_rows}")));
        }
        let idx = self.gpu.up(rows)?;
        let (w, n) = (i32::try_from(width).unwrap_or(i32::MAX), n32(x_rows));
        let mut b = self.gpu.stream.launch_builder(&self.k.embedding);
        b.arg(&idx).arg(x).arg(out).arg(&w).arg(&n);
        // SAFETY: argument list matches embedding_bf16; `x` holds x_rows * width and `out`
        // rows.len() * width elements (checked).
        unsafe { b.launch(cfg((n32(rows.len()), 1, 1), ROW_THREADS)) }?;
        Ok(())
    }

    fn ids(&mut self, rows: usize) -> Result<(CudaSlice<u32>, CudaSlice<f32>), CudaError> {
        Ok((self.gpu.zeros(rows)?, self.gpu.zeros(rows)?))
    }

    fn argmax(
        &mut self,
        logits: &CudaSlice<f32>,
        rows: usize,
        vocab: usize,
        (ids, lps): &mut (CudaSlice<u32>, CudaSlice<f32>),
    ) -> R {
        check_len(ids.len().min(lps.len()), rows, "ids")?;
        let v = vocab as i32;
        let mut b = self.gpu.stream.launch_builder(&self.k.argmax);
        b.arg(logits).arg(&v).arg(ids).arg(lps);
        // SAFETY: argument list matches argmax_logprob_f32, launched with the 1024 threads its
        // shared arrays are sized for; ids and lps hold `rows` entries (checked).
        unsafe { b.launch(cfg((n32(rows), 1, 1), 1024)) }?;
        Ok(())
    }

    fn sample(
        &mut self,
        logits: &mut CudaSlice<f32>,
        vocab: usize,
        params: &[RowSampling],
        penalties: &Penalties,
    ) -> Result<Vec<RowSample>, CudaError> {
        if !penalties.any() {
            return sample_on_device(&mut self.gpu, logits, None, vocab, params);
        }
        // Log-probabilities are of the logits before the penalties.
        let n = (params.len() * vocab).min(logits.len());
        let raw = self.gpu.stream.clone_dtod(&logits.slice(..n))?;
        apply_penalties_on_device(&mut self.gpu, logits, vocab, penalties)?;
        sample_on_device(&mut self.gpu, logits, Some(&raw), vocab, params)
    }

    fn read_ids(
        &mut self,
        (ids, lps): &(CudaSlice<u32>, CudaSlice<f32>),
        rows: usize,
    ) -> Result<Vec<(u32, f32)>, CudaError> {
        let (ids, lps) = (self.gpu.down(ids)?, self.gpu.down(lps)?);
        Ok(ids.into_iter().zip(lps).take(rows).collect())
    }

    fn rows(&self, step: &CudaStep) -> usize {
        step.rows
    }

    fn sync(&mut self) -> R {
        self.gpu.sync()
    }

    fn logits_to_host(&mut self, logits: &CudaSlice<f32>, n: usize) -> Result<Vec<f32>, CudaError> {
        check_len(logits.len(), n, "logits")?;
        Ok(self.gpu.stream.clone_dtoh(&logits.slice(..n))?)
    }
}

/// The cache holds every block the batch's tables reach, K and V alike.
fn check_cache(cache: &CudaCache, st: &CudaStep, s: &DecoderShape) -> R {
    let blocks = cache.k.len() / (s.block_size * s.kv_dim()).max(1);
    if cache.k.len() != cache.v.len() || blocks < st.blocks_needed {
        return Err(CudaError::Shape(format!(
            "the batch reaches block {} of a {blocks}-block cache",
            st.blocks_needed.saturating_sub(1)
        )));
    }
    Ok(())
}

fn check_len(have: usize, need: usize, what: &str) -> R {
    if have < need {
        return Err(CudaError::Shape(format!("{what}: {have} elements where {need} are needed")));
    }
    Ok(())
}
