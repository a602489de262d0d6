//! Continuous batching: which sequences run in the next step, with how many tokens, and which
//! of their rows are sampled with what.
//!
//! Plain Rust with no device code. Each step first serves the running sequences (oldest
//! first: one token for a decode, the next chunk for a prompt still prefilling), then admits
//! waiting sequences while the token budget (`max_num_batched_tokens`) and `max_num_seqs`
//! allow, their prompts chunked to fit. When the KV pool runs out, the newest running sequence
//! is preempted: its blocks are freed and it goes back to the front of the queue, to be
//! recomputed later (cheaply, when its blocks are still in the prefix cache).
//!
//! [`Scheduler::schedule`] emits the whole [`Step`]: the batch, the rows to sample (the last row
//! of every sequence whose tokens are all computed after the step: decided here, once) and each
//! row's sampling, drawn from the sequence's own seeded [`Sampler`].
//!
//! With speculative decoding on, a decoding sequence feeds its last token and a draft of up to
//! `k` proposed tokens, and all `k + 1` rows are sampled; the worker keeps the draft while it
//! matches the samples ([`super::speculative::verify_sampled`]; for a sampled sequence with a
//! draft model, by `min(1, p/q)` on the rows' logits, which the step then returns: see
//! [`super::speculative::verify`]) and tells the scheduler how
//! many fed tokens to keep ([`Scheduler::settle_draft`]): the K/V written for the rest lies past
//! the sequence's context, unread, and is overwritten by the tokens that follow.

use std::collections::{HashMap, VecDeque};

use super::batch::Batch;
use super::block_manager::BlockManager;
use super::sampler::{DraftSampling, Sampler, StepSampling};
use super::speculative::{Proposer, Speculation};
use crate::error::{Error, Result};
use crate::grammar::TokenMatcher;

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
    /// Its sampling parameters and seeded generator.
    pub sampler: Sampler,
    /// Whether its sampled rows' logits must come back to the host (log-probabilities).
    pub want_logits: bool,
    /// Whether it may speculate (when speculation is on).
    pub speculate: bool,
    /// Speculation's back-off: drafts rejected whole in a row, and steps left without one.
    spec_misses: u32,
    spec_pause: u32,
}

/// Limits of one step.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens (prompt chunks plus decodes) in one step.
    pub max_num_batched_tokens: usize,
    /// Logits columns that may be sampled (the tokenizer's vocabulary).
    pub sampled_columns: usize,
    /// Positions a sequence may reach (the served context): no draft runs past it.
    pub max_positions: usize,
    /// Speculative decoding, when on.
    pub speculation: Option<Speculation>,
}

/// One step, as the scheduler emits it.
#[derive(Debug, Default)]
pub struct Step {
    /// The forward pass's input.
    pub batch: Batch,
    /// The rows to sample and each row's sampling.
    pub sampling: StepSampling,
    /// The sequence of each sampled row, in `sampling.rows` order.
    pub sampled: Vec<SeqId>,
    /// Sequences in the step and how many of their tokens each computes, in batch order.
    pub entries: Vec<(SeqId, usize)>,
    /// Each entry's draft (speculative decoding; empty when it does not speculate): the entry
    /// feeds its last token and these, and samples every one of its rows.
    pub drafts: Vec<Vec<u32>>,
    /// Sequences moved from waiting to running, with how many of their tokens the prefix cache
    /// already held.
    pub admitted: Vec<(SeqId, usize)>,
    /// Sequences preempted while planning this step.
    pub preempted: Vec<SeqId>,
    /// Sequences that can never run (alone they do not fit the KV cache), removed, with why.
    pub refused: Vec<(SeqId, Error)>,
}

impl Step {
    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The waiting queue, the running set and the KV pool.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockManager,
    seqs: HashMap<SeqId, Sequence>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    /// A draft model's proposals for the next step, by sequence (see [`Scheduler::set_proposals`]).
    proposals: HashMap<SeqId, Vec<u32>>,
}

/// A decoding sequence a draft model may propose for in the next step.
#[derive(Debug, Clone)]
pub struct DraftWant<'a> {
    /// The sequence.
    pub id: SeqId,
    /// Its prompt and generated tokens.
    pub tokens: &'a [u32],
    /// Most tokens the step can take from a proposal (`k`, cut by the context).
    pub k: usize,
    /// How its proposals are sampled (`None`: greedy, the draft's argmax).
    pub sampling: Option<DraftSampling>,
}

impl Scheduler {
    /// A scheduler over `blocks`.
    pub fn new(cfg: SchedulerConfig, blocks: BlockManager) -> Self {
        Scheduler {
            cfg,
            blocks,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            proposals: HashMap::new(),
        }
    }

    /// Queues a new sequence with its sampler; `want_logits` asks for its sampled rows' logits.
    pub fn add(&mut self, id: SeqId, tokens: Vec<u32>, sampler: Sampler, want_logits: bool) {
        let seq = Sequence {
            id,
            tokens,
            computed: 0,
            block_table: Vec::new(),
            sampler,
            want_logits,
            speculate: true,
            spec_misses: 0,
            spec_pause: 0,
        };
        self.seqs.insert(id, seq);
        self.waiting.push_back(id);
    }

    /// Keeps the sequence `id` from speculating (a request's opt-out).
    pub fn disable_speculation(&mut self, id: SeqId) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.speculate = false;
        }
    }

    /// The sequence `id`, while it is known.
    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// Appends a sampled token to a sequence and follows it in the sequence's grammar; an
    /// error when the token breaks the grammar.
    pub fn push_token(&mut self, id: SeqId, token: u32) -> std::result::Result<(), String> {
        match self.seqs.get_mut(&id) {
            Some(s) => {
                s.tokens.push(token);
                s.sampler.commit(token)
            }
            None => Ok(()),
        }
    }

    /// The grammars of the sequences `ids` (one per id, `None` for an unconstrained one), or
    /// `None` when none of them has one.
    pub fn grammars(&mut self, ids: &[SeqId]) -> Option<Vec<Option<&mut TokenMatcher>>> {
        if !ids.iter().any(|id| self.seqs.get(id).is_some_and(|s| s.sampler.has_grammar())) {
            return None;
        }
        let mut by_id: HashMap<SeqId, &mut TokenMatcher> =
            self.seqs.iter_mut().filter_map(|(&id, s)| s.sampler.grammar_mut().map(|g| (id, g))).collect();
        Some(ids.iter().map(|id| by_id.remove(id)).collect())
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

    /// Plans the next step and emits it whole: batch, sampled rows and their sampling.
    pub fn schedule(&mut self) -> Result<Step> {
        let mut step = Step::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        self.serve_running(&mut step, &mut budget)?;
        // A proposal not taken (the sequence was preempted, or out of budget) is stale next step.
        self.proposals.clear();
        self.admit_waiting(&mut step, &mut budget)?;
        self.assemble(&mut step)?;
        Ok(step)
    }

    /// The sequences a draft model should propose for before the next [`Scheduler::schedule`]:
    /// with a draft model as the proposer, every running sequence that will decode and may
    /// speculate (not opted out, not paused), in a step small enough to speculate; none
    /// otherwise.
    pub fn draft_wants(&self) -> Vec<DraftWant<'_>> {
        let Some(spec) = &self.cfg.speculation else { return Vec::new() };
        let Proposer::Draft { k, .. } = spec.proposer else { return Vec::new() };
        if self.running.len() > spec.max_batch {
            return Vec::new();
        }
        self.running
            .iter()
            .filter_map(|id| self.seqs.get(id))
            .filter(|s| s.tokens.len() == s.computed + 1 && s.speculate && s.spec_pause == 0)
            .map(|s| {
                let room = self.cfg.max_num_batched_tokens.min(self.cfg.max_positions.saturating_sub(s.computed));
                let k = k.min(room.saturating_sub(1));
                DraftWant { id: s.id, tokens: &s.tokens, k, sampling: s.sampler.draft_sampling() }
            })
            .filter(|w| w.k > 0)
            .collect()
    }

    /// Hands the next step a draft model's proposals (by sequence): [`Scheduler::schedule`] uses
    /// each as the sequence's draft, cut to the budget and context as prompt lookup's are, and
    /// drops the rest.
    pub fn set_proposals(&mut self, proposals: HashMap<SeqId, Vec<u32>>) {
        self.proposals = proposals;
    }

    /// The running sequences' next tokens, oldest first, preempting the newest when blocks run out.
    fn serve_running(&mut self, step: &mut Step, budget: &mut usize) -> Result<()> {
        let speculating = self.cfg.speculation.as_ref().is_some_and(|s| self.running.len() <= s.max_batch);
        let mut i = 0;
        'running: while i < self.running.len() && *budget > 0 {
            let id = self.running[i];
            let (want, computed) = match self.seqs.get(&id) {
                Some(s) => (s.tokens.len() - s.computed, s.computed),
                None => return Err(Error::Backend(format!("scheduler lost sequence {id}"))),
            };
            let draft = match speculating && want == 1 {
                true => self.draft(id, *budget)?,
                false => Vec::new(),
            };
            if !draft.is_empty() {
                step.entries.push((id, 1 + draft.len()));
                step.drafts.push(draft.clone());
                *budget -= 1 + draft.len();
                i += 1;
                continue;
            }
            let n = want.min(*budget);
            loop {
                let seq = self.seqs.get_mut(&id).ok_or_else(|| Error::Backend("sequence vanished".into()))?;
                if self.blocks.grow(&mut seq.block_table, computed + n).is_ok() {
                    break;
                }
                let Some(&victim) = self.running.last() else { break 'running };
                self.preempt(victim);
                step.preempted.push(victim);
                if let Some(at) = step.entries.iter().position(|e| e.0 == victim) {
                    step.entries.remove(at);
                    step.drafts.remove(at);
                }
                if victim == id {
                    continue 'running;
                }
            }
            step.entries.push((id, n));
            step.drafts.push(Vec::new());
            *budget -= n;
            i += 1;
        }
        Ok(())
    }

    /// A decoding sequence's draft for this step: the proposal, cut to the token budget and the
    /// context, when blocks for it are free without preempting anyone (else none).
    fn draft(&mut self, id: SeqId, budget: usize) -> Result<Vec<u32>> {
        let seq = self.seqs.get_mut(&id).ok_or_else(|| Error::Backend("sequence vanished".into()))?;
        if !seq.speculate {
            return Ok(Vec::new());
        }
        if seq.spec_pause > 0 {
            seq.spec_pause -= 1;
            return Ok(Vec::new());
        }
        let room = budget.min(self.cfg.max_positions.saturating_sub(seq.computed)).saturating_sub(1);
        let mut draft = match self.cfg.speculation.as_ref().map(|s| &s.proposer) {
            Some(Proposer::Ngram(ngram)) => ngram.propose(&seq.tokens),
            _ => self.proposals.remove(&id).unwrap_or_default(),
        };
        draft.truncate(room);
        if !draft.is_empty() && self.blocks.grow(&mut seq.block_table, seq.computed + 1 + draft.len()).is_err() {
            draft.clear();
        }
        Ok(draft)
    }

    /// Waiting sequences admitted while the budget, `max_num_seqs` and the KV pool allow.
    fn admit_waiting(&mut self, step: &mut Step, budget: &mut usize) -> Result<()> {
        while *budget > 0 && step.preempted.is_empty() && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else { break };
            let seq = self.seqs.get_mut(&id).ok_or_else(|| Error::Backend("sequence vanished".into()))?;
            if seq.block_table.is_empty() {
                // The last token is always computed: its logits are what the step is for. So the
                // block that holds it is never taken from the cache: writing its K/V into a
                // cached block would rewrite what other sequences share (two sequences with the
                // same prompt would write the same slot in one step, a race the emulator's
                // racecheck reports).
                let lookup = &seq.tokens[..seq.tokens.len().saturating_sub(1)];
                let hit = self.blocks.match_prefix(lookup, &mut seq.block_table);
                seq.computed = hit;
            }
            let n = (seq.tokens.len() - seq.computed).min(*budget);
            if self.blocks.grow(&mut seq.block_table, seq.computed + n).is_err() {
                // No room: hand the prefix back and wait for running sequences to finish.
                self.blocks.release(&mut seq.block_table);
                seq.computed = 0;
                if !self.running.is_empty() {
                    break;
                }
                // Alone and still too large: it can never run. Only this sequence fails.
                let why = Error::request(
                    "prompt",
                    format!(
                        "a sequence of {} tokens does not fit the KV cache's {} blocks of {} tokens",
                        seq.tokens.len(),
                        self.blocks.num_blocks(),
                        self.blocks.block_size()
                    ),
                );
                self.remove(id);
                step.refused.push((id, why));
                continue;
            }
            step.admitted.push((id, seq.computed));
            self.waiting.pop_front();
            self.running.push(id);
            step.entries.push((id, n));
            step.drafts.push(Vec::new());
            *budget -= n;
        }
        Ok(())
    }

    /// The step's batch, and the rows it samples: the last row of every sequence whose tokens
    /// are all computed once it has run, each with one draw from its sequence's sampler.
    fn assemble(&mut self, step: &mut Step) -> Result<()> {
        step.batch = Batch::new(self.blocks.block_size());
        step.sampling = StepSampling { valid: self.cfg.sampled_columns, ..StepSampling::default() };
        // A draft model's proposals for a sampled sequence are verified against the target's
        // distributions, computed on the host from the rows' logits.
        let drafted = self.cfg.speculation.as_ref().is_some_and(|s| s.draft_model().is_some());
        for (&(id, n), draft) in step.entries.iter().zip(&step.drafts) {
            let s = self.seqs.get_mut(&id).ok_or_else(|| Error::Backend(format!("unknown sequence {id}")))?;
            if !draft.is_empty() {
                let fed: Vec<u32> = s.tokens[s.computed..].iter().chain(draft).copied().collect();
                step.batch.push(&fed, s.computed, &s.block_table)?;
                let first = step.batch.num_tokens() - n;
                step.sampling.rows.extend(first..first + n);
                step.sampling.per_row.extend(s.sampler.draft_rows(&s.tokens, draft));
                step.sampling.want_logits |= s.want_logits || (drafted && !s.sampler.is_greedy());
                step.sampled.extend(std::iter::repeat_n(id, n));
                continue;
            }
            step.batch.push(&s.tokens[s.computed..s.computed + n], s.computed, &s.block_table)?;
            if s.computed + n == s.tokens.len() {
                step.sampling.rows.push(step.batch.num_tokens() - 1);
                step.sampling.per_row.push(s.sampler.next_row(&s.tokens));
                step.sampling.want_logits |= s.want_logits;
                step.sampled.push(id);
            }
        }
        Ok(())
    }

    /// Records a step as run: its tokens' K/V are in the cache. Entries with a draft wait for
    /// [`Scheduler::settle_draft`].
    pub fn complete(&mut self, step: &Step) {
        for (&(id, n), draft) in step.entries.iter().zip(&step.drafts) {
            if draft.is_empty() {
                self.advance(id, n);
            }
        }
    }

    /// Records a speculating sequence's step once its emitted tokens are pushed: `emitted` of
    /// the tokens it fed (its last token and the kept draft) stay in the cache, and its
    /// generator moves past the `emitted` draws the step used.
    ///
    /// A draft rejected whole pauses the sequence's speculation for 2, 4, … up to 16 steps
    /// (reset by any accepted token): on text that does not repeat its context, a verify step's
    /// extra rows cost more than they save where rows are not free (the CPU; a GPU at large
    /// batch), and this bounds that cost without changing any output.
    pub fn settle_draft(&mut self, id: SeqId, emitted: usize) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.sampler.advance(emitted);
            if emitted > 1 {
                s.spec_misses = 0;
            } else {
                s.spec_misses = (s.spec_misses + 1).min(4);
                s.spec_pause = 1 << s.spec_misses;
            }
        }
        self.advance(id, emitted);
    }

    fn advance(&mut self, id: SeqId, computed: usize) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.computed += computed;
            self.blocks.commit_full_blocks(&s.tokens, &s.block_table, s.computed);
        }
    }
}

#[cfg(test)]
mod tests;
