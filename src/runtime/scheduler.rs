//! Continuous batching: which sequences run in the next step, and with how many tokens.
//!
//! Plain Rust with no device code. Each step first serves the running sequences (oldest
//! first: one token for a decode, the next chunk for a prompt still prefilling), then admits
//! waiting sequences while the token budget (`max_num_batched_tokens`) and `max_num_seqs`
//! allow, their prompts chunked to fit. When the KV pool runs out, the newest running sequence
//! is preempted: its blocks are freed and it goes back to the front of the queue, to be
//! recomputed later (cheaply, when its blocks are still in the prefix cache).

use std::collections::{HashMap, VecDeque};

use super::batch::Batch;
use super::block_manager::BlockManager;
use crate::error::{Error, Result};

/// A sequence's identity inside the engine.
pub type SeqId = u64;

/// What the scheduler tracks of a sequence.
#[derive(Debug, Clone)]
pub struct Sequence {
    /// Its id.
    pub id: SeqId,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    /// Tokens whose K/V are in the cache.
    pub computed: usize,
    /// Its KV blocks.
    pub block_table: Vec<u32>,
}

/// Limits of one step.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens (prompt chunks plus decodes) in one step.
    pub max_num_batched_tokens: usize,
}

/// One step's plan: `(sequence, new tokens)` in batch order, and who was preempted for it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// Sequences in the step and how many of their tokens each computes.
    pub entries: Vec<(SeqId, usize)>,
    /// Sequences preempted while planning this step.
    pub preempted: Vec<SeqId>,
}

/// The waiting queue, the running set and the KV pool.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockManager,
    seqs: HashMap<SeqId, Sequence>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
}

impl Scheduler {
    /// A scheduler over `blocks`.
    pub fn new(cfg: SchedulerConfig, blocks: BlockManager) -> Self {
        Scheduler { cfg, blocks, seqs: HashMap::new(), waiting: VecDeque::new(), running: Vec::new() }
    }

    /// Queues a new sequence.
    pub fn add(&mut self, id: SeqId, tokens: Vec<u32>) {
        self.seqs.insert(id, Sequence { id, tokens, computed: 0, block_table: Vec::new() });
        self.waiting.push_back(id);
    }

    /// The sequence `id`, while it is known.
    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// Appends a sampled token to a sequence.
    pub fn push_token(&mut self, id: SeqId, token: u32) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.tokens.push(token);
        }
    }

    /// Forgets a sequence (finished or aborted) and frees its blocks.
    pub fn remove(&mut self, id: SeqId) {
        if let Some(mut s) = self.seqs.remove(&id) {
            self.blocks.release(&mut s.block_table);
        }
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
    }

    /// Sequences waiting to be admitted.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences admitted and not finished.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Whether nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// The KV pool.
    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    fn preempt(&mut self, id: SeqId) {
        if let Some(s) = self.seqs.get_mut(&id) {
            self.blocks.release(&mut s.block_table);
            s.computed = 0;
        }
        self.running.retain(|&r| r != id);
        self.waiting.push_front(id);
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> Result<Schedule> {
        let mut plan = Schedule::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut i = 0;
        'running: while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let (want, computed) = match self.seqs.get(&id) {
                Some(s) => (s.tokens.len() - s.computed, s.computed),
                None => return Err(Error::Backend(format!("scheduler lost sequence {id}"))),
            };
            let n = want.min(budget);
            loop {
                let seq = self.seqs.get_mut(&id).ok_or_else(|| Error::Backend("sequence vanished".into()))?;
                if self.blocks.grow(&mut seq.block_table, computed + n).is_ok() {
                    break;
                }
                let Some(&victim) = self.running.last() else { break 'running };
                self.preempt(victim);
                plan.preempted.push(victim);
                plan.entries.retain(|e| e.0 != victim);
                if victim == id {
                    continue 'running;
                }
            }
            plan.entries.push((id, n));
            budget -= n;
            i += 1;
        }
        while budget > 0 && plan.preempted.is_empty() && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else { break };
            let seq = self.seqs.get_mut(&id).ok_or_else(|| Error::Backend("sequence vanished".into()))?;
            if seq.block_table.is_empty() {
                let hit = self.blocks.match_prefix(&seq.tokens, &mut seq.block_table);
                // The last token is always computed: its logits are what the step is for.
                seq.computed = hit.min(seq.tokens.len() - 1);
            }
            let n = (seq.tokens.len() - seq.computed).min(budget);
            if self.blocks.grow(&mut seq.block_table, seq.computed + n).is_err() {
                // No room: hand the prefix back and wait for running sequences to finish.
                self.blocks.release(&mut seq.block_table);
                seq.computed = 0;
                if self.running.is_empty() {
                    return Err(Error::Backend(format!(
                        "KV cache too small: a lone sequence of {} tokens does not fit {} blocks",
                        seq.tokens.len(),
                        self.blocks.num_blocks()
                    )));
                }
                break;
            }
            self.waiting.pop_front();
            self.running.push(id);
            plan.entries.push((id, n));
            budget -= n;
        }
        Ok(plan)
    }

    /// The forward pass input of a plan.
    pub fn batch(&self, plan: &Schedule) -> Result<Batch> {
        let mut batch = Batch::new(self.blocks.block_size());
        for &(id, n) in &plan.entries {
            let s = self.seqs.get(&id).ok_or_else(|| Error::Backend(format!("unknown sequence {id}")))?;
            batch.push(&s.tokens[s.computed..s.computed + n], s.computed, &s.block_table)?;
        }
        Ok(batch)
    }

    /// Records a step as run; returns the sequences whose every token is now computed (they
    /// need a sampled token), in plan order.
    pub fn complete(&mut self, plan: &Schedule) -> Vec<SeqId> {
        let mut ready = Vec::new();
        for &(id, n) in &plan.entries {
            if let Some(s) = self.seqs.get_mut(&id) {
                s.computed += n;
                self.blocks.commit_full_blocks(&s.tokens, &s.block_table, s.computed);
                if s.computed == s.tokens.len() {
                    ready.push(id);
                }
            }
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(blocks: usize, max_seqs: usize, budget: usize) -> Scheduler {
        let cfg = SchedulerConfig { max_num_seqs: max_seqs, max_num_batched_tokens: budget };
        Scheduler::new(cfg, BlockManager::new(blocks, 4, true))
    }

    #[test]
    fn prompts_are_chunked_under_the_token_budget_and_decodes_go_first() {
        let mut s = sched(16, 8, 6);
        s.add(1, (0..10).collect());
        let p = s.schedule().unwrap();
        assert_eq!(p.entries, vec![(1, 6)]);
        assert!(s.complete(&p).is_empty(), "a partial prompt samples nothing");
        s.add(2, (100..103).collect());
        let p = s.schedule().unwrap();
        assert_eq!(p.entries, vec![(1, 4), (2, 2)]);
        assert_eq!(s.complete(&p), vec![1]);
        s.push_token(1, 42);
        let p = s.schedule().unwrap();
        assert_eq!(p.entries, vec![(1, 1), (2, 1)]);
        assert_eq!(s.complete(&p), vec![1, 2]);
    }

    #[test]
    fn max_num_seqs_caps_the_running_set() {
        let mut s = sched(16, 2, 100);
        for id in 0..3 {
            s.add(id, vec![1, 2, 3]);
        }
        let p = s.schedule().unwrap();
        assert_eq!(p.entries.len(), 2);
        assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
    }

    #[test]
    fn running_out_of_blocks_preempts_the_newest_and_it_comes_back() {
        // 3 blocks of 4: two sequences of 4 tokens fill two blocks; growth needs more.
        let mut s = sched(3, 8, 100);
        s.add(1, vec![1, 2, 3, 4]);
        s.add(2, vec![5, 6, 7, 8]);
        let p = s.schedule().unwrap();
        assert_eq!(s.complete(&p), vec![1, 2]);
        s.push_token(1, 9);
        s.push_token(2, 10);
        // Sequence 1 takes the third block; sequence 2 cannot grow and is preempted.
        let p = s.schedule().unwrap();
        assert_eq!(p.entries, vec![(1, 1)]);
        assert_eq!(p.preempted, vec![2]);
        s.complete(&p);
        s.remove(1);
        // Recomputed from the prefix cache: its first full block is still cached.
        let p = s.schedule().unwrap();
        assert_eq!(p.entries, vec![(2, 1)]);
        assert_eq!(s.get(2).unwrap().computed, 4);
    }

    #[test]
    fn a_sequence_too_large_for_the_pool_is_an_error_not_a_hang() {
        let mut s = sched(1, 8, 100);
        s.add(1, (0..9).collect());
        assert!(s.schedule().is_err());
    }
}
