//! One forward's rows as the kernels read them: each sequence's rows, and the batch flattened
//! into tokens, positions, cache slots and block tables.

use super::CudaError;

/// The rows of one sequence in a forward: `tokens` at positions `start..start + tokens.len()`,
/// its cache reached through `block_table`, through the LoRA adapter in slot `adapter` of the
/// forward's [`super::lora::LoraSet`] if any.
#[derive(Debug, Clone)]
pub struct SeqRows {
    pub tokens: Vec<u32>,
    pub start: usize,
    pub block_table: Vec<u32>,
    pub adapter: Option<u32>,
}

/// Query rows (and keys) per tile of the tensor-core attention kernels (`attention_tiled.cu`).
pub const ATTENTION_TILE: usize = 32;

/// Whether the tensor-core attention kernels are written for this head size. A training
/// sample's attention backward runs on them when it is; they round what feeds their products
/// (P, dO, dS) to bf16, as the device does for every other product.
pub fn tiled_attention_head(head_dim: usize) -> bool {
    matches!(head_dim, 64 | 128)
}

/// Whether a sequence's rows in a forward attend on `attention_chunk_tiled`: a prefill or
/// training chunk of at least a tile of rows, at a head size the kernel has. Its other rows
/// (decodes, shorter chunks) run the paged kernel in the same forward.
pub fn tiled_chunk(rows: usize, head_dim: usize) -> bool {
    rows >= ATTENTION_TILE && tiled_attention_head(head_dim)
}

/// One forward's rows, flattened as the kernels read them.
#[derive(Debug, Clone)]
pub struct StepBatch {
    pub seqs: Vec<SeqRows>,
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    /// Cache slot of each row's K and V.
    pub slots: Vec<i64>,
    pub row_seq: Vec<i32>,
    pub row_pos: Vec<i32>,
    /// Each row's adapter slot, -1 for the base model.
    pub row_slots: Vec<i32>,
    /// `[seqs, max_blocks]`, zero-padded.
    pub block_tables: Vec<i32>,
    pub max_blocks: usize,
    /// The longest context a row attends to (its position + 1).
    pub max_context: usize,
    /// Blocks the tables reach (the highest block id + 1): a cache must hold at least these.
    pub blocks_needed: usize,
    /// Adapter slots the rows name (the highest slot + 1): a LoRA table must hold these.
    pub slots_needed: usize,
    /// The row tiles of the sequences [`tiled_chunk`] picks where the head size has the
    /// kernel: (sequence, first row, its position, rows) for each, as `attention_chunk_tiled`
    /// reads them.
    pub tiles: Vec<i32>,
    /// The rows the paged kernel takes alongside those tiles, and the longest context of them.
    pub paged_rows: Vec<i32>,
    pub paged_context: usize,
    /// Per sequence: whether it is a training sample's chunk. No decode has to match its
    /// rows, so a backend may attend them by another method (the CPU's GEMMs over the
    /// sample's keys); all false until the training code marks its chunk.
    pub train: Vec<bool>,
}

impl StepBatch {
    pub fn new(seqs: Vec<SeqRows>, block_size: usize) -> Result<Self, CudaError> {
        let max_blocks = seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0).max(1);
        let mut b = Self {
            tokens: Vec::new(),
            positions: Vec::new(),
            slots: Vec::new(),
            row_seq: Vec::new(),
            row_pos: Vec::new(),
            row_slots: Vec::new(),
            block_tables: vec![0; seqs.len() * max_blocks],
            max_blocks,
            max_context: 0,
            blocks_needed: 0,
            slots_needed: 0,
            tiles: Vec::new(),
            paged_rows: Vec::new(),
            paged_context: 0,
            train: vec![false; seqs.len()],
            seqs: Vec::new(),
        };
        let too_big = |what: &str| CudaError::Shape(format!("{what} does not fit an i32"));
        for (si, s) in seqs.iter().enumerate() {
            for (j, &blk) in s.block_table.iter().enumerate() {
                b.blocks_needed = b.blocks_needed.max(blk as usize + 1);
                b.block_tables[si * max_blocks + j] =
                    i32::try_from(blk).map_err(|_| too_big("a block id"))?;
            }
            // The sequences `tiled_chunk` picks at a head size with the kernel. Whatever does
            // not fit an i32 here fails the checks of the rows below.
            let (first, n) = (b.tokens.len(), s.tokens.len());
            if n >= ATTENTION_TILE {
                for r0 in (0..n).step_by(ATTENTION_TILE) {
                    let rows = ATTENTION_TILE.min(n - r0);
                    b.tiles.extend([si, first + r0, s.start + r0, rows].map(|x| x as i32));
                }
            } else {
                b.paged_rows.extend((first..first + n).map(|r| r as i32));
                b.paged_context = b.paged_context.max(s.start + n);
            }
            for (r, &t) in s.tokens.iter().enumerate() {
                let pos = s.start + r;
                let blk = s.block_table.get(pos / block_size).ok_or_else(|| {
                    CudaError::Shape(format!("position {pos} is past its block table"))
                })?;
                b.tokens.push(t);
                b.positions.push(pos);
                b.slots.push(i64::from(*blk) * block_size as i64 + (pos % block_size) as i64);
                b.row_seq.push(i32::try_from(si).map_err(|_| too_big("a sequence index"))?);
                b.row_pos.push(i32::try_from(pos).map_err(|_| too_big("a position"))?);
                let slot = s.adapter.map_or(Ok(-1), i32::try_from);
                b.row_slots.push(slot.map_err(|_| too_big("an adapter slot"))?);
                b.slots_needed = b.slots_needed.max(s.adapter.map_or(0, |a| a as usize + 1));
                b.max_context = b.max_context.max(pos + 1);
            }
        }
        // grid.y of the attention launch.
        if b.tokens.is_empty() {
            return Err(CudaError::Shape("a forward of no rows".into()));
        }
        if b.tokens.len() > 65_535 {
            return Err(CudaError::Shape(format!(
                "{} rows in one forward (at most 65535)",
                b.tokens.len()
            )));
        }
        b.seqs = seqs;
        Ok(b)
    }

    pub fn rows(&self) -> usize {
        self.tokens.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_batch_flattens_rows_and_slots() {
        let seqs = vec![
            SeqRows { adapter: None, tokens: vec![5, 6, 7], start: 15, block_table: vec![4, 9] },
            SeqRows { adapter: None, tokens: vec![1], start: 0, block_table: vec![2] },
        ];
        let b = StepBatch::new(seqs, 16).unwrap();
        assert_eq!(b.positions, [15, 16, 17, 0]);
        assert_eq!(b.slots, [4 * 16 + 15, 9 * 16, 9 * 16 + 1, 2 * 16]);
        assert_eq!(b.row_seq, [0, 0, 0, 1]);
        assert_eq!(b.block_tables, [4, 9, 2, 0]);
        assert_eq!(b.max_context, 18);
        assert_eq!(b.blocks_needed, 10);
        assert!(StepBatch::new(Vec::new(), 16).is_err());
        let past =
            vec![SeqRows { adapter: None, tokens: vec![1], start: 16, block_table: vec![0] }];
        assert!(StepBatch::new(past, 16).is_err());
    }

    #[test]
    fn step_batch_tiles_long_chunks_and_lists_the_other_rows() {
        let seq = |n: usize, start: usize| SeqRows {
            adapter: None,
            tokens: vec![0; n],
            start,
            block_table: (0..(start + n).div_ceil(16) as u32).collect(),
        };
        // A decode, a 45-row chunk from 20, a 5-row prompt, a one-tile prompt.
        let b = StepBatch::new(vec![seq(1, 69), seq(45, 20), seq(5, 0), seq(32, 0)], 16).unwrap();
        assert_eq!(b.tiles, [1, 1, 20, 32, 1, 33, 52, 13, 3, 51, 0, 32]);
        assert_eq!(b.paged_rows, [0, 46, 47, 48, 49, 50]);
        assert_eq!(b.paged_context, 70);
        // Decodes only: no tiles, every row paged.
        let b = StepBatch::new(vec![seq(1, 3), seq(1, 40)], 16).unwrap();
        assert!(b.tiles.is_empty());
        assert_eq!((b.paged_rows.as_slice(), b.paged_context), (&[0, 1][..], 41));
        // One chunk of a tile exactly: only tiles.
        let b = StepBatch::new(vec![seq(32, 7)], 16).unwrap();
        assert_eq!((b.tiles.as_slice(), b.paged_rows.len()), (&[0, 0, 7, 32][..], 0));
    }
}
