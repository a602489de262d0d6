//! The draft model of speculative decoding (`--draft-model`): a second, smaller checkpoint with
//! the target's tokenizer, on the same device with its own KV cache, that proposes each
//! speculating sequence's draft before the target's step.
//!
//! Each round, for the sequences the scheduler names ([`DraftWant`]), the draft first catches up
//! on the tokens its cache lacks (the prompt on the first round; afterwards the target's
//! correction or bonus token, and any draft tokens the target rejected, recomputed), sampling the
//! last row; then it runs `k − 1` more batched decode steps, each feeding the token it just
//! proposed. For a greedy sequence it proposes its argmax (the target keeps it exactly while it
//! is the target's argmax: `verify_sampled`, the point-mass rule). For a sampled one it samples
//! each proposal from its own distribution `q` after the sequence's transforms (temperature,
//! top-k/p, min-p, repetition penalty over the history and the proposals before it; no grammar
//! mask, which only costs acceptance), with draws keyed by the sequence's seed and position
//! ([`DraftSampling`]), and hands back each proposal's `q` row over the shared vocabulary for
//! the target's `min(1, p/q)` test (`verify`). Logits past the tokenizer's vocabulary, padding
//! rows of either model, are never picked.
//!
//! Rollback needs no message from the verifier: a sequence's draft state remembers which tokens
//! its cache holds, and each round keeps the longest prefix they share with the sequence's tokens
//! (the accepted draft tokens stay; rejected ones lie past it and are overwritten). The draft's
//! blocks come from a pool of its own, without prefix caching; a sequence that finishes, fails or
//! is preempted has its draft state dropped ([`DraftModel::forget`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::hub::{resolve_model, HubOptions};
use crate::options::EngineOptions;
use crate::ranks::{self, Ranks};
use crate::runtime::batch::Batch;
use crate::runtime::block_manager::BlockManager;
use crate::runtime::sampler::{row_probs, sample_row, DraftSampling, RowSampling, Sampled, StepSampling};
use crate::runtime::scheduler::{DraftWant, SeqId};
use crate::tokenizer::Tokenizer;
use crate::weights::WeightStore;

/// A draft checkpoint, read and checked against the target, not yet loaded.
pub(super) struct DraftCheckpoint {
    dir: PathBuf,
    config: ModelConfig,
}

impl DraftCheckpoint {
    /// Resolves `model` and reads its config and tokenizer; the tokenizer must be the target's
    /// (`target_dir`'s), else an error naming both files.
    pub fn read(model: &str, opts: &EngineOptions, target_dir: &Path, target: &Tokenizer) -> Result<Self> {
        let dir = resolve_model(model, &HubOptions { progress: opts.progress, config_only: false })?;
        let (mut config, _, tokenizer) = super::read_model(&dir)?;
        same_vocabulary(target, &target_dir.join("tokenizer.json"), &tokenizer, &dir.join("tokenizer.json"))?;
        opts.apply_to(&mut config);
        Ok(DraftCheckpoint { dir, config })
    }

    /// Longest context the draft's RoPE tables may cover.
    pub fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    /// The draft's KV bytes per token, per byte of element (for splitting a byte budget).
    pub fn kv_elements_per_token(&self) -> u64 {
        self.config.kv_bytes_per_token(1)
    }

    /// Loads the draft on `opts`' device as one rank (rank 0's device under tensor parallelism)
    /// with `kv_cache_memory` bytes of KV cache (or the policy's default for the device), RoPE
    /// tables for `context` positions, and the target's step limits.
    pub fn open(
        self,
        opts: &EngineOptions,
        kv_cache_memory: Option<u64>,
        context: usize,
        sampled_columns: usize,
    ) -> Result<DraftModel> {
        let mut draft_opts = opts.clone();
        draft_opts.model = self.dir.to_string_lossy().into_owned();
        draft_opts.tp = 1;
        draft_opts.world = None;
        draft_opts.speculation = None;
        draft_opts.kv_cache_memory = kv_cache_memory;
        let store = Arc::new(WeightStore::open(&self.dir)?);
        let opened = ranks::open(&draft_opts, &self.config, store, context)?;
        tracing::info!(
            draft = %self.dir.display(),
            kv_blocks = opened.num_blocks,
            "draft model loaded on {}",
            opened.device
        );
        Ok(DraftModel {
            ranks: opened.ranks,
            blocks: BlockManager::new(opened.num_blocks, opts.block_size, false),
            seqs: HashMap::new(),
            sampled_columns,
            max_tokens: opts.max_num_batched_tokens,
            max_seqs: opts.max_num_seqs,
        })
    }
}

/// The draft's tokenizer must map every token to the id the target's does: its proposals are
/// token ids the target verifies.
fn same_vocabulary(target: &Tokenizer, target_file: &Path, draft: &Tokenizer, draft_file: &Path) -> Result<()> {
    let (t, d) = (target.inner().get_vocab(true), draft.inner().get_vocab(true));
    if t == d {
        return Ok(());
    }
    let why = match t.len() != d.len() {
        true => format!("{} tokens against the target's {}", d.len(), t.len()),
        false => {
            let mut differing: Vec<(&String, &u32)> = t.iter().filter(|(k, v)| d.get(*k) != Some(v)).collect();
            differing.sort_by_key(|(_, &v)| v);
            match differing.first() {
                Some((token, id)) => format!("token {token:?} is id {id} in the target's and {:?} here", d.get(*token)),
                None => "the vocabularies differ".into(),
            }
        }
    };
    Err(Error::Tokenizer {
        file: draft_file.to_path_buf(),
        message: format!(
            "the draft model's tokenizer is not the target model's ({}): {why}; a draft must share the \
             target's vocabulary",
            target_file.display()
        ),
    })
}

/// What the draft's cache holds for one sequence.
#[derive(Debug, Default)]
struct DraftSeq {
    block_table: Vec<u32>,
    /// The tokens whose K/V the draft's cache holds, in order (prompt, output, proposals fed).
    cached: Vec<u32>,
}

/// One sequence's round: what it feeds next and what it has proposed.
struct Round {
    id: SeqId,
    k: usize,
    pending: Vec<u32>,
    proposal: Vec<u32>,
    done: bool,
    /// How a sampled sequence's proposals are drawn (`None`: greedy, the argmax).
    sampling: Option<DraftSampling>,
    /// The sequence's tokens (for a sampled sequence: its penalty and its draws' positions).
    history: Vec<u32>,
    /// Each proposal's distribution, over the shared vocabulary (sampled sequences).
    q: Vec<Vec<f32>>,
}

/// A draft model's proposal for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Proposal {
    /// The proposed tokens.
    pub tokens: Vec<u32>,
    /// The distribution each was drawn from (one row per token, over the shared vocabulary),
    /// empty for a greedy sequence (its tokens are the draft's argmax).
    pub q: Vec<Vec<f32>>,
}

/// The loaded draft model: its ranks (one), its block pool, and each sequence's draft state.
pub(super) struct DraftModel {
    ranks: Box<dyn Ranks>,
    blocks: BlockManager,
    seqs: HashMap<SeqId, DraftSeq>,
    /// Columns that may be proposed: the tokenizer's vocabulary, shared by both models.
    sampled_columns: usize,
    max_tokens: usize,
    max_seqs: usize,
}

impl DraftModel {
    /// Up to `want.k` proposed tokens for every sequence of `wants` that the draft's cache has
    /// room for. An error is engine-fatal (the draft's device failed).
    pub fn propose(&mut self, wants: &[DraftWant<'_>]) -> Result<HashMap<SeqId, Proposal>> {
        let mut rounds = Vec::with_capacity(wants.len());
        for want in wants.iter().take(self.max_seqs) {
            if let Some(round) = self.prepare(want, wants) {
                rounds.push(round);
            }
        }
        // Catch up (chunked under the step's token budget); each sequence's last row proposes.
        while rounds.iter().any(|r| !r.pending.is_empty()) {
            self.catch_up(&mut rounds)?;
        }
        // Then one batched decode step per further token.
        while rounds.iter().any(|r| !r.done && r.proposal.len() < r.k) {
            self.decode(&mut rounds)?;
        }
        Ok(rounds
            .into_iter()
            .filter(|r| !r.proposal.is_empty())
            .map(|r| (r.id, Proposal { tokens: r.proposal, q: r.q }))
            .collect())
    }

    /// Drops a sequence's draft state (finished, failed or preempted), freeing its blocks.
    pub fn forget(&mut self, id: SeqId) {
        if let Some(mut s) = self.seqs.remove(&id) {
            self.blocks.release(&mut s.block_table);
        }
    }

    /// Rolls the sequence's draft cache back to what it shares with its tokens and makes room
    /// for this round; `None` when the pool has no room even after dropping the states of
    /// sequences not proposing now.
    fn prepare(&mut self, want: &DraftWant<'_>, all: &[DraftWant<'_>]) -> Option<Round> {
        let state = self.seqs.entry(want.id).or_default();
        // The last token is always fed: its logits propose the first draft token.
        let keep = common_prefix(&state.cached, want.tokens).min(want.tokens.len() - 1);
        state.cached.truncate(keep);
        // Positions of the tokens fed this round: the sequence's, then k − 1 proposals.
        let slots = want.tokens.len() + want.k - 1;
        let mut table = std::mem::take(&mut state.block_table);
        if self.blocks.grow(&mut table, slots).is_err() {
            let idle: Vec<SeqId> =
                self.seqs.keys().copied().filter(|id| *id != want.id && all.iter().all(|w| w.id != *id)).collect();
            for id in idle {
                self.forget(id);
            }
            if self.blocks.grow(&mut table, slots).is_err() {
                self.blocks.release(&mut table);
                self.seqs.remove(&want.id);
                return None;
            }
        }
        let state = self.seqs.entry(want.id).or_default();
        state.block_table = table;
        let pending = want.tokens[state.cached.len()..].to_vec();
        let history = if want.sampling.is_some() { want.tokens.to_vec() } else { Vec::new() };
        Some(Round {
            id: want.id,
            k: want.k,
            pending,
            proposal: Vec::new(),
            done: false,
            sampling: want.sampling.clone(),
            history,
            q: Vec::new(),
        })
    }

    /// One step of catch-up: each sequence feeds as much of its pending tokens as the budget
    /// allows; a sequence whose pending tokens are all fed proposes its first token.
    fn catch_up(&mut self, rounds: &mut [Round]) -> Result<()> {
        let mut budget = self.max_tokens;
        let mut fed: Vec<(usize, Vec<u32>, bool)> = Vec::new();
        for (i, r) in rounds.iter_mut().enumerate() {
            if r.pending.is_empty() || budget == 0 {
                continue;
            }
            let n = r.pending.len().min(budget);
            budget -= n;
            let chunk: Vec<u32> = r.pending.drain(..n).collect();
            fed.push((i, chunk, r.pending.is_empty()));
        }
        let feeds: Vec<(usize, &[u32], bool)> = fed.iter().map(|(i, c, s)| (*i, c.as_slice(), *s)).collect();
        self.run(rounds, &feeds)
    }

    /// One batched decode step: every sequence still proposing feeds its latest proposal.
    fn decode(&mut self, rounds: &mut [Round]) -> Result<()> {
        let last: Vec<(usize, [u32; 1])> = rounds
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.done && r.proposal.len() < r.k)
            .filter_map(|(i, r)| r.proposal.last().map(|&t| (i, [t])))
            .collect();
        let feeds: Vec<(usize, &[u32], bool)> = last.iter().map(|(i, t)| (*i, t.as_slice(), true)).collect();
        self.run(rounds, &feeds)
    }

    /// Runs one draft step feeding `feeds` (round index, tokens, whether its last row proposes)
    /// and appends each proposing row's token to its round's proposal: the argmax, or for a
    /// sampled sequence a draw from `q` (sampled on the host from the row's logits, by the
    /// sampler's own rule, so that the token is exactly a draw from the `q` it keeps).
    fn run(&mut self, rounds: &mut [Round], feeds: &[(usize, &[u32], bool)]) -> Result<()> {
        if feeds.is_empty() {
            // Nothing can move (a token budget of 0): end the round rather than spin.
            for r in rounds.iter_mut() {
                r.pending.clear();
                r.done = true;
            }
            return Ok(());
        }
        let mut batch = Batch::new(self.blocks.block_size());
        let mut sampling = StepSampling { valid: self.sampled_columns, ..StepSampling::default() };
        let mut proposing = Vec::new();
        for &(i, tokens, propose) in feeds {
            let state = self.seqs.get(&rounds[i].id).ok_or_else(|| Error::Backend("draft state vanished".into()))?;
            batch.push(tokens, state.cached.len(), &state.block_table)?;
            if propose {
                let r = &rounds[i];
                let row = r.sampling.as_ref().map_or_else(RowSampling::greedy, |s| s.row(&r.history, &r.proposal));
                sampling.want_logits |= r.sampling.is_some();
                sampling.rows.push(batch.num_tokens() - 1);
                sampling.per_row.push(row);
                proposing.push(i);
            }
        }
        let out = self.ranks.step(&batch, &sampling)?;
        for &(i, tokens, _) in feeds {
            if let Some(state) = self.seqs.get_mut(&rounds[i].id) {
                state.cached.extend_from_slice(tokens);
            }
        }
        let width = out.logits.as_ref().map_or(0, |l| l.len() / proposing.len().max(1));
        for (j, (&i, sampled)) in proposing.iter().zip(&out.tokens).enumerate() {
            let r = &mut rounds[i];
            let logits = out.logits.as_deref().and_then(|l| l.get(j * width..(j + 1) * width));
            let picked = match (&r.sampling, logits) {
                (Some(_), Some(row)) => {
                    let s = &sampling.per_row[j];
                    row_probs(row, self.sampled_columns, s, None).map(|q| {
                        r.q.push(q);
                        sample_row(row, self.sampled_columns, s, None)
                    })
                }
                (Some(_), None) => return Err(Error::Backend("the draft's step returned no logits".into())),
                (None, _) => match *sampled {
                    Sampled::Token(t) => Some(t),
                    Sampled::NonFinite { .. } => None,
                },
            };
            match picked {
                Some(t) => r.proposal.push(t),
                // Non-finite draft logits: this sequence proposes what it has (the target's own
                // step reports its own logits).
                None => r.done = true,
            }
        }
        Ok(())
    }
}

/// How many leading tokens `a` and `b` share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::sampler::StepOutput;

    const VOCAB: u32 = 97;

    /// The next token after `context` in the fake model: a hash of the whole context, so that
    /// any token its cache holds wrongly changes what it proposes.
    fn next(context: &[u32]) -> u32 {
        context.iter().fold(7u64, |h, &t| (h * 31 + t as u64 + 1) % VOCAB as u64) as u32
    }

    /// A "model" whose KV cache holds the token written at each slot, and whose pick at a
    /// sampled row is [`next`] of the tokens its cache holds at the row's positions.
    struct CacheModel(HashMap<u32, u32>);

    impl Ranks for CacheModel {
        fn step(&mut self, batch: &Batch, sampling: &StepSampling) -> Result<StepOutput> {
            for (&slot, &t) in batch.slots.iter().zip(&batch.token_ids) {
                self.0.insert(slot, t);
            }
            let bs = batch.block_size;
            let mut tokens = Vec::new();
            for &row in &sampling.rows {
                let seq = batch.seqs.iter().find(|s| s.rows.contains(&row)).expect("a row of a sequence");
                let context: Vec<u32> = (0..=batch.positions[row] as usize)
                    .map(|pos| self.0[&(seq.block_table[pos / bs] * bs as u32 + (pos % bs) as u32)])
                    .collect();
                tokens.push(Sampled::Token(next(&context)));
            }
            Ok(StepOutput { tokens, logits: None })
        }
    }

    /// What a draft that sees exactly `tokens` proposes: `k` tokens, each after the ones before.
    fn expected(tokens: &[u32], k: usize) -> Vec<u32> {
        let mut context = tokens.to_vec();
        for _ in 0..k {
            context.push(next(&context));
        }
        context[tokens.len()..].to_vec()
    }

    fn want(tokens: &[u32]) -> DraftWant<'_> {
        DraftWant { id: 1, tokens, k: 3, sampling: None }
    }

    /// Tokens the target rejected lie in the draft's cache after its round; the next round
    /// must not read them: it keeps only what the cache shares with the sequence's tokens and
    /// recomputes the rest. Rounds: a draft rejected whole, then two plain steps (the cache
    /// holds two stale tokens before the sequence's last), then a draft kept in part.
    #[test]
    fn a_round_never_reads_a_rejected_token_from_the_draft_cache() {
        let mut draft = DraftModel {
            ranks: Box::new(CacheModel(HashMap::new())),
            blocks: BlockManager::new(32, 4, false),
            seqs: HashMap::new(),
            sampled_columns: VOCAB as usize,
            max_tokens: 64,
            max_seqs: 8,
        };
        let mut tokens: Vec<u32> = vec![1, 2, 3, 4, 5];
        let first = draft.propose(&[want(&tokens)]).unwrap().remove(&1).unwrap();
        assert_eq!(first, Proposal { tokens: expected(&tokens, 3), q: Vec::new() });
        // Rejected whole: the target's correction, then two tokens of plain steps.
        tokens.extend([(first.tokens[0] + 1) % VOCAB, 11, 12]);
        let second = draft.propose(&[want(&tokens)]).unwrap().remove(&1).unwrap();
        assert_eq!(second.tokens, expected(&tokens, 3), "after a draft rejected whole");
        // The first token kept, the second corrected.
        tokens.extend([second.tokens[0], (second.tokens[1] + 1) % VOCAB]);
        let third = draft.propose(&[want(&tokens)]).unwrap().remove(&1).unwrap();
        assert_eq!(third.tokens, expected(&tokens, 3), "after a draft kept in part");
        draft.forget(1);
        assert_eq!(draft.blocks.free_blocks(), 32, "forget frees the draft's blocks");
    }

    #[test]
    fn the_common_prefix_is_what_both_hold() {
        assert_eq!(common_prefix(&[1, 2, 3, 9], &[1, 2, 3, 4, 5]), 3);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[1, 2], &[1, 2]), 2);
    }
}
