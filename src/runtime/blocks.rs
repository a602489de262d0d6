//! The KV block pool: hands out fixed-size blocks to sequences and takes them back.

use crate::error::{Error, Result};

/// A free list over `num_blocks` KV blocks of `block_size` token slots.
#[derive(Debug, Clone)]
pub struct BlockPool {
    free: Vec<u32>,
    block_size: usize,
    num_blocks: usize,
}

impl BlockPool {
    /// A pool with every block free.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        // Reversed so that blocks are handed out from 0 upward, which keeps tests readable.
        BlockPool { free: (0..num_blocks as u32).rev().collect(), block_size, num_blocks }
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks not held by any sequence.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Grows `table` until it covers `tokens` positions; on failure `table` is unchanged.
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> Result<()> {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.free.len() {
            return Err(Error::Backend(format!(
                "KV cache exhausted: {need} more blocks needed, {} free",
                self.free.len()
            )));
        }
        for _ in 0..need {
            if let Some(b) = self.free.pop() {
                table.push(b);
            }
        }
        Ok(())
    }

    /// Returns every block of `table` to the pool.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.append(table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_and_release_account_for_every_block() {
        let mut pool = BlockPool::new(4, 16);
        let mut a = Vec::new();
        pool.grow(&mut a, 17).unwrap();
        assert_eq!(a, vec![0, 1]);
        let mut b = Vec::new();
        assert!(pool.grow(&mut b, 48).is_err());
        assert!(b.is_empty());
        pool.grow(&mut b, 32).unwrap();
        assert_eq!(pool.free_blocks(), 0);
        pool.release(&mut a);
        assert_eq!(pool.free_blocks(), 2);
        assert!(a.is_empty());
    }
}
