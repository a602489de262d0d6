//! The KV block pool with prefix caching.
//!
//! Blocks are reference-counted. A block that a sequence has filled completely is keyed by a
//! hash of its tokens chained with the hash of every block before it, so two sequences that
//! share a prefix share the blocks holding it. Each block is hashed once, when it fills; a hash
//! found in the index is trusted only after its tokens and its parent block compare equal, so a
//! 64-bit collision shares nothing. Freed blocks keep their contents and their key until the
//! pool needs them again, least recently freed first (an O(1) list, `free_list.rs`): a chat that
//! re-sends its history finds the history's blocks still there and computes only the new turn.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use super::free_list::FreeList;
use crate::error::{Error, Result};

/// What a full block holds, once it is in the prefix cache.
#[derive(Debug, Clone)]
struct Cached {
    /// The prefix hash: its tokens chained with its parent's hash.
    hash: u64,
    /// The block before it in the sequence that filled it (`None`: the first).
    parent: Option<u32>,
    /// Its tokens.
    tokens: Box<[u32]>,
}

#[derive(Debug, Clone, Default)]
struct Block {
    refs: u32,
    /// Set when the block filled; cleared when the block is reused.
    full: Option<Cached>,
}

/// Blocks, their reference counts, and the prefix-hash index of full blocks.
#[derive(Debug, Clone)]
pub struct BlockManager {
    blocks: Vec<Block>,
    /// Blocks with no reference, least recently freed first.
    free: FreeList,
    cached: HashMap<u64, u32>,
    block_size: usize,
    prefix_caching: bool,
    /// Prompt tokens looked up in the prefix cache, and how many of them were found.
    queried_tokens: u64,
    hit_tokens: u64,
    /// How blocks are hashed; a test forces collisions through it.
    hasher: fn(Option<u64>, &[u32]) -> u64,
}

/// The hash of a full block of `tokens` following the block with hash `parent`.
pub fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockManager {
    /// A pool of `num_blocks` free blocks of `block_size` token slots.
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        BlockManager {
            blocks: vec![Block::default(); num_blocks],
            free: FreeList::full(num_blocks),
            cached: HashMap::new(),
            block_size,
            prefix_caching,
            queried_tokens: 0,
            hit_tokens: 0,
            hasher: block_hash,
        }
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks not referenced by any sequence (cached contents included).
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Prompt tokens looked up in the prefix cache and how many were found there.
    pub fn prefix_stats(&self) -> (u64, u64) {
        (self.queried_tokens, self.hit_tokens)
    }

    /// Starts a sequence's block table from the cache: the longest run of `tokens`' full blocks
    /// already cached, each now referenced. Returns the number of tokens covered.
    pub fn match_prefix(&mut self, tokens: &[u32], table: &mut Vec<u32>) -> usize {
        debug_assert!(table.is_empty());
        self.queried_tokens += tokens.len() as u64;
        if !self.prefix_caching {
            return 0;
        }
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.block_size) {
            let h = (self.hasher)(parent, chunk);
            let Some(&b) = self.cached.get(&h) else { break };
            let same = self.blocks[b as usize]
                .full
                .as_ref()
                .is_some_and(|c| *c.tokens == *chunk && c.parent == table.last().copied());
            if !same {
                break;
            }
            self.take_ref(b);
            table.push(b);
            parent = Some(h);
        }
        let hit = table.len() * self.block_size;
        self.hit_tokens += hit as u64;
        hit
    }

    fn take_ref(&mut self, b: u32) {
        let block = &mut self.blocks[b as usize];
        if block.refs == 0 {
            self.free.remove(b);
        }
        block.refs += 1;
    }

    /// Grows `table` with fresh blocks until it covers `tokens` positions; on failure `table`
    /// is unchanged.
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> Result<()> {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > self.free.len() {
            return Err(Error::Backend(format!(
                "KV cache exhausted: {need} more blocks needed, {} free",
                self.free.len()
            )));
        }
        for _ in 0..need {
            if let Some(b) = self.free.pop_front() {
                let block = &mut self.blocks[b as usize];
                // Reusing a block forgets what it cached.
                if let Some(c) = block.full.take() {
                    if self.cached.get(&c.hash) == Some(&b) {
                        self.cached.remove(&c.hash);
                    }
                }
                block.refs = 1;
                table.push(b);
            }
        }
        Ok(())
    }

    /// Records that `table`'s blocks now hold the K/V of `tokens[..computed]`: every block that
    /// became full since the last call is hashed, once, and entered in the prefix cache.
    /// Blocks fill in order, so the work is the blocks that filled, found by walking back from
    /// the last full one.
    pub fn commit_full_blocks(&mut self, tokens: &[u32], table: &[u32], computed: usize) {
        if !self.prefix_caching {
            return;
        }
        let full = computed / self.block_size;
        let mut first = full;
        while first > 0 && self.blocks[table[first - 1] as usize].full.is_none() {
            first -= 1;
        }
        for i in first..full {
            let parent = i.checked_sub(1).map(|p| table[p]);
            let parent_hash = parent.and_then(|p| self.blocks[p as usize].full.as_ref().map(|c| c.hash));
            let chunk = &tokens[i * self.block_size..(i + 1) * self.block_size];
            let hash = (self.hasher)(parent_hash, chunk);
            let b = table[i];
            self.blocks[b as usize].full = Some(Cached { hash, parent, tokens: chunk.into() });
            self.cached.entry(hash).or_insert(b);
        }
    }

    /// Drops a sequence's references; blocks nobody holds go to the back of the free queue,
    /// keeping their cached contents until reused.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        // Freed in reverse so that a sequence's later blocks are evicted before its earlier
        // ones: a prefix is only useful from its start.
        for b in table.drain(..).rev() {
            let block = &mut self.blocks[b as usize];
            block.refs = block.refs.saturating_sub(1);
            if block.refs == 0 {
                if block.full.is_none() {
                    self.free.push_front(b);
                } else {
                    self.free.push_back(b);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_and_release_account_for_every_block() {
        let mut pool = BlockManager::new(4, 16, false);
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

    #[test]
    fn shared_prefixes_share_full_blocks_only() {
        let mut pool = BlockManager::new(8, 4, true);
        let prompt: Vec<u32> = (0..10).collect();
        let mut a = Vec::new();
        assert_eq!(pool.match_prefix(&prompt, &mut a), 0);
        pool.grow(&mut a, 10).unwrap();
        pool.commit_full_blocks(&prompt, &a, 10);
        // Same first 8 tokens, different tail: the two full blocks are shared.
        let other: Vec<u32> = (0..8).chain([99, 98, 97]).collect();
        let mut b = Vec::new();
        assert_eq!(pool.match_prefix(&other, &mut b), 8);
        assert_eq!(b, a[..2]);
        // A different first block shares nothing, even with the same second block.
        let mut c = Vec::new();
        let shifted: Vec<u32> = [7, 1, 2, 3, 4, 5, 6, 7].to_vec();
        assert_eq!(pool.match_prefix(&shifted, &mut c), 0);
        assert_eq!(pool.prefix_stats(), (10 + 11 + 8, 8));
    }

    #[test]
    fn freed_blocks_stay_cached_until_reused_lru() {
        let mut pool = BlockManager::new(3, 2, true);
        let t1 = [1, 2, 3, 4];
        let mut a = Vec::new();
        pool.grow(&mut a, 4).unwrap();
        pool.commit_full_blocks(&t1, &a, 4);
        pool.release(&mut a);
        assert_eq!(pool.free_blocks(), 3);
        // Still cached after release.
        let mut b = Vec::new();
        assert_eq!(pool.match_prefix(&t1, &mut b), 4);
        pool.release(&mut b);
        // Taking all three blocks evicts the cached ones (the uncached block goes first).
        let mut c = Vec::new();
        pool.grow(&mut c, 6).unwrap();
        assert_eq!(c[0], 2, "the never-cached block is reused first");
        pool.release(&mut c);
        let mut d = Vec::new();
        assert_eq!(pool.match_prefix(&t1, &mut d), 0, "reuse forgot the cached contents");
    }

    #[test]
    fn colliding_hashes_share_nothing() {
        // Every block hashes alike: only the token and parent comparison tells them apart.
        let mut pool = BlockManager::new(8, 2, true);
        pool.hasher = |_, _| 7;
        let t1 = [1, 2, 3, 4];
        let mut a = Vec::new();
        pool.grow(&mut a, 4).unwrap();
        pool.commit_full_blocks(&t1, &a, 4);
        let mut b = Vec::new();
        assert_eq!(pool.match_prefix(&[5, 6, 3, 4], &mut b), 0, "a different first block matched");
        assert!(b.is_empty());
        let mut c = Vec::new();
        assert_eq!(pool.match_prefix(&[1, 2, 9, 9], &mut c), 2, "the equal first block is shared");
        assert_eq!(c, a[..1]);
    }

    #[test]
    fn each_block_is_hashed_once_when_it_fills() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static HASHED: AtomicUsize = AtomicUsize::new(0);
        let mut pool = BlockManager::new(8, 4, true);
        pool.hasher = |p, t| {
            HASHED.fetch_add(1, Ordering::Relaxed);
            block_hash(p, t)
        };
        let tokens: Vec<u32> = (0..20).collect();
        let mut a = Vec::new();
        pool.grow(&mut a, 20).unwrap();
        for computed in 1..=20 {
            pool.commit_full_blocks(&tokens, &a, computed);
        }
        assert_eq!(HASHED.load(Ordering::Relaxed), 5);
        // The chain is the same as hashing the whole prefix at once.
        let mut b = Vec::new();
        assert_eq!(pool.match_prefix(&tokens, &mut b), 20);
        assert_eq!(b, a);
    }
}
