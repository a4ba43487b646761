//! Free list of KV blocks; allocations return their blocks on Drop.

use std::sync::{Arc, Mutex, MutexGuard};

pub type BlockId = u32;

struct Inner {
    /// Free block ids; the last one is handed out next (LIFO keeps recently used blocks warm).
    free: Mutex<Vec<BlockId>>,
    num_blocks: usize,
    block_size: usize,
}

impl Inner {
    fn free_list(&self) -> MutexGuard<'_, Vec<BlockId>> {
        // A panic while holding the lock cannot leave the Vec half-updated (push/pop only).
        self.free.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Cheap to clone (Arc inside); one free list shared by all sequences of one engine.
#[derive(Clone)]
pub struct BlockAllocator {
    inner: Arc<Inner>,
}

impl BlockAllocator {
    /// `num_blocks` is capped at `u32::MAX + 1` (ids are u32); `block_size` must be positive.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        debug_assert!(block_size > 0, "block_size must be positive");
        let num_blocks = num_blocks.min(BlockId::MAX as usize + 1);
        // Reversed so that blocks are first handed out in ascending order.
        let free = (0..num_blocks).rev().map(|i| i as BlockId).collect();
        Self { inner: Arc::new(Inner { free: Mutex::new(free), num_blocks, block_size }) }
    }

    pub fn block_size(&self) -> usize {
        self.inner.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.inner.num_blocks
    }

    pub fn num_free(&self) -> usize {
        self.inner.free_list().len()
    }

    /// Takes one block, or None when none is free.
    pub fn allocate(&self) -> Option<Block> {
        let id = self.inner.free_list().pop()?;
        Some(Block { id, owner: Arc::clone(&self.inner) })
    }
}

impl std::fmt::Debug for BlockAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockAllocator")
            .field("num_blocks", &self.num_blocks())
            .field("block_size", &self.block_size())
            .field("num_free", &self.num_free())
            .finish()
    }
}

/// One owned block; returns itself to the free list on Drop.
pub struct Block {
    id: BlockId,
    owner: Arc<Inner>,
}

impl Block {
    pub fn id(&self) -> BlockId {
        self.id
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.owner.free_list().push(self.id);
    }
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Block").field(&self.id).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_until_empty_and_blocks_return_on_drop() {
        let alloc = BlockAllocator::new(3, 16);
        assert_eq!((alloc.num_blocks(), alloc.block_size(), alloc.num_free()), (3, 16, 3));
        let a = alloc.allocate().expect("free block");
        let b = alloc.allocate().expect("free block");
        let c = alloc.allocate().expect("free block");
        let mut ids = vec![a.id(), b.id(), c.id()];
        ids.sort();
        assert_eq!(ids, vec![0, 1, 2]);
        assert!(alloc.allocate().is_none());
        assert_eq!(alloc.num_free(), 0);
        let b_id = b.id();
        drop(b);
        assert_eq!(alloc.num_free(), 1);
        // LIFO: the block just freed is the next one handed out.
        assert_eq!(alloc.allocate().map(|blk| blk.id()), Some(b_id));
        drop((a, c));
        assert_eq!(alloc.num_free(), 3);
    }

    #[test]
    fn clones_share_one_free_list() {
        let alloc = BlockAllocator::new(2, 4);
        let other = alloc.clone();
        let held = other.allocate();
        assert!(held.is_some());
        assert_eq!(alloc.num_free(), 1);
        drop(held);
        assert_eq!(alloc.num_free(), 2);
    }

    #[test]
    fn empty_allocator_gives_nothing() {
        let alloc = BlockAllocator::new(0, 16);
        assert!(alloc.allocate().is_none());
        assert_eq!(alloc.num_free(), 0);
    }
}
