//! Per-sequence block table and slot mapping.

use super::block_allocator::{Block, BlockAllocator, BlockId};

/// The blocks of one sequence, in order. Dropping it frees them all (finish, abort, preemption).
#[derive(Debug)]
pub struct BlockTable {
    allocator: BlockAllocator,
    /// Owned blocks; dropping them returns them to the free list.
    blocks: Vec<Block>,
    /// Their ids, kept contiguous for the attention kernel.
    ids: Vec<BlockId>,
}

#[derive(Debug, thiserror::Error)]
#[error("out of KV-cache blocks")]
pub struct OutOfBlocks;

impl BlockTable {
    pub fn new(allocator: BlockAllocator) -> Self {
        Self { allocator, blocks: Vec::new(), ids: Vec::new() }
    }

    /// Makes room for `num_tokens` tokens in total; allocates the missing blocks all or nothing.
    pub fn reserve(&mut self, num_tokens: usize) -> Result<(), OutOfBlocks> {
        let needed = self.blocks_needed(num_tokens);
        if needed == 0 {
            return Ok(());
        }
        if needed > self.allocator.num_free() {
            return Err(OutOfBlocks);
        }
        // Collected first, so a shortfall (another holder racing us) frees what was taken.
        let fresh: Vec<Block> = (0..needed)
            .map(|_| self.allocator.allocate())
            .collect::<Option<_>>()
            .ok_or(OutOfBlocks)?;
        self.ids.extend(fresh.iter().map(Block::id));
        self.blocks.extend(fresh);
        Ok(())
    }

    /// Blocks needed beyond what is held to reach `num_tokens` (for scheduling decisions).
    pub fn blocks_needed(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size()).saturating_sub(self.blocks.len())
    }

    pub fn capacity_tokens(&self) -> usize {
        self.blocks.len() * self.block_size()
    }

    /// Contiguous ids in sequence order, passed to the kernel.
    pub fn block_ids(&self) -> &[BlockId] {
        &self.ids
    }

    /// Flat cache slot of token position `pos` (block_ids[pos / bs] * bs + pos % bs).
    /// `pos` must be below `capacity_tokens()`.
    pub fn slot(&self, pos: usize) -> usize {
        let bs = self.block_size();
        debug_assert!(pos < self.capacity_tokens(), "position {pos} beyond reserved blocks");
        self.ids[pos / bs] as usize * bs + pos % bs
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn block_size(&self) -> usize {
        // A zero block size is rejected by configuration; max(1) keeps the divisions defined.
        self.allocator.block_size().max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_grows_by_whole_blocks() {
        let alloc = BlockAllocator::new(8, 4);
        let mut table = BlockTable::new(alloc.clone());
        assert_eq!(table.blocks_needed(0), 0);
        assert_eq!(table.blocks_needed(1), 1);
        assert_eq!(table.blocks_needed(9), 3);
        table.reserve(5).expect("enough blocks");
        assert_eq!((table.num_blocks(), table.capacity_tokens()), (2, 8));
        assert_eq!(table.blocks_needed(8), 0);
        assert_eq!(table.blocks_needed(9), 1);
        table.reserve(8).expect("no-op");
        table.reserve(3).expect("shrinking asks nothing");
        assert_eq!(table.num_blocks(), 2);
        assert_eq!(alloc.num_free(), 6);
        assert_eq!(table.block_ids().len(), 2);
    }

    #[test]
    fn reserve_is_all_or_nothing() {
        let alloc = BlockAllocator::new(3, 16);
        let mut a = BlockTable::new(alloc.clone());
        let mut b = BlockTable::new(alloc.clone());
        a.reserve(16).expect("one block");
        assert!(b.reserve(48).is_err(), "needs 3, only 2 free");
        assert_eq!(b.num_blocks(), 0);
        assert_eq!(alloc.num_free(), 2);
        b.reserve(32).expect("two blocks");
        assert_eq!(alloc.num_free(), 0);
        assert!(a.reserve(17).is_err());
        assert_eq!(a.num_blocks(), 1);
    }

    #[test]
    fn dropping_the_table_frees_its_blocks() {
        let alloc = BlockAllocator::new(4, 16);
        let mut table = BlockTable::new(alloc.clone());
        table.reserve(40).expect("three blocks");
        assert_eq!(alloc.num_free(), 1);
        drop(table);
        assert_eq!(alloc.num_free(), 4);
    }

    #[test]
    fn slot_maps_through_non_contiguous_blocks() {
        let alloc = BlockAllocator::new(6, 4);
        // Take blocks 0..3, free 1, so a new table gets a non-contiguous set.
        let mut first = BlockTable::new(alloc.clone());
        first.reserve(4).expect("block 0");
        let mut hole = BlockTable::new(alloc.clone());
        hole.reserve(4).expect("block 1");
        let mut mid = BlockTable::new(alloc.clone());
        mid.reserve(4).expect("block 2");
        drop(hole);
        let mut table = BlockTable::new(alloc.clone());
        table.reserve(10).expect("three blocks");
        let ids = table.block_ids().to_vec();
        assert_eq!(ids, vec![1, 3, 4]);
        for pos in 0..10 {
            assert_eq!(table.slot(pos), ids[pos / 4] as usize * 4 + pos % 4);
        }
        assert_eq!(table.slot(0), 4);
        assert_eq!(table.slot(5), 13);
        assert_eq!(table.slot(9), 17);
    }
}
