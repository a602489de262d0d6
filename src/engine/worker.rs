//! The step loop, on the one thread that drives the ranks: `step()` is schedule → run →
//! postprocess.
//!
//! Failure boundaries: an error that belongs to one request (its prompt can never fit, its
//! logits are not finite, its detokenizer fails) ends that request with an error event and
//! nothing else; an error from the ranks (a device lost, a rank dead, a collective timed out)
//! or a panic in the loop is engine-fatal: every request fails, the engine records why
//! ([`super::Engine::failure`]) and refuses new requests from then on.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use super::acceptance::{verify_with_q, Rows};
use super::draft::DraftModel;
use super::output::{RequestOutput, Submission};
use super::Shared;
use crate::error::{Error, Result};
use crate::grammar::TokenMatcher;
use crate::ranks::Ranks;
use crate::runtime::sampler::{Sampled, Sampler, StepOutput, NON_FINITE};
use crate::runtime::scheduler::{Scheduler, SeqId, Step};
use crate::runtime::speculative::{verify_sampled, Verdict};
use crate::runtime::token_mask::{LateMasks, MaskFill, TokenMasks};

pub(super) enum Command {
    Submit(Box<Submission>),
    Shutdown { deadline: Instant },
}

/// The requests in the engine, by sequence id.
type Requests<'t> = HashMap<SeqId, RequestOutput<'t>>;

pub(super) struct Worker {
    shared: Arc<Shared>,
    ranks: Box<dyn Ranks>,
    /// The draft model, when one proposes (`--draft-model`).
    draft: Option<DraftModel>,
    /// This step's draft distributions `q` of sampled sequences, by sequence.
    draft_q: HashMap<SeqId, Vec<Vec<f32>>>,
    scheduler: Scheduler,
}

impl Worker {
    /// Starts the step loop on its own thread; returns the channel requests reach it through.
    pub fn spawn(
        shared: Arc<Shared>,
        ranks: Box<dyn Ranks>,
        draft: Option<DraftModel>,
        scheduler: Scheduler,
    ) -> Result<(mpsc::Sender<Command>, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel();
        let worker = Worker { shared: shared.clone(), ranks, draft, draft_q: HashMap::new(), scheduler };
        let handle = std::thread::Builder::new()
            .name("tulu-engine".into())
            .spawn(move || worker.run(rx, &shared))
            .map_err(|e| Error::Backend(format!("cannot start the engine thread: {e}")))?;
        Ok((tx, handle))
    }

    /// Runs until shut down (or until every `Engine` handle is gone).
    fn run(mut self, commands: mpsc::Receiver<Command>, shared: &Shared) {
        let mut requests: Requests = HashMap::new();
        let mut deadline: Option<Instant> = None;
        loop {
            self.publish_gauges();
            // Intake: block while idle, otherwise take whatever has arrived.
            let mut incoming = Vec::new();
            if self.scheduler.is_idle() {
                if deadline.is_some() {
                    return;
                }
                match commands.recv() {
                    Ok(c) => incoming.push(c),
                    Err(_) => return,
                }
            }
            incoming.extend(commands.try_iter());
            for c in incoming {
                match c {
                    Command::Submit(sub) => self.admit(*sub, shared, &mut requests),
                    Command::Shutdown { deadline: d } => deadline = Some(d),
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                let ids: Vec<SeqId> = requests.keys().copied().collect();
                for id in ids {
                    let why = Error::ShuttingDown { message: "aborted at the shutdown deadline".into() };
                    self.end(id, Some(why), &mut requests);
                }
                return;
            }
            // Aborts: a dropped stream ends its request.
            let gone: Vec<SeqId> = requests.iter().filter(|(_, r)| r.abandoned()).map(|(&id, _)| id).collect();
            for id in gone {
                self.end(id, None, &mut requests);
            }
            if self.scheduler.is_idle() {
                continue;
            }
            let stepped = catch_unwind(AssertUnwindSafe(|| self.step(&mut requests)));
            let fatal = match stepped {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(panic) => Error::Backend(format!("the engine's step panicked: {}", panic_message(&panic))),
            };
            self.fail_all(fatal, &mut requests);
            return refuse_until_shutdown(&commands, shared);
        }
    }

    fn admit<'t>(&mut self, mut sub: Submission, shared: &'t Shared, requests: &mut Requests<'t>) {
        let sampler =
            Sampler::new(sub.sampling.clone(), shared.tokenizer.vocab_size()).with_grammar(sub.grammar.take());
        self.scheduler.add(sub.id, sub.prompt.clone(), sampler, sub.logprobs.is_some());
        if !sub.speculative {
            self.scheduler.disable_speculation(sub.id);
        }
        requests.insert(sub.id, RequestOutput::new(sub, &shared.tokenizer));
    }

    /// One step: schedule → run → postprocess. An error returned here is engine-fatal; errors
    /// of single requests are handled inside.
    fn step(&mut self, requests: &mut Requests) -> Result<()> {
        if let Some(draft) = &mut self.draft {
            let wants = self.scheduler.draft_wants();
            self.draft_q.clear();
            if !wants.is_empty() {
                let mut proposals = HashMap::new();
                for (id, p) in draft.propose(&wants)? {
                    if !p.q.is_empty() {
                        self.draft_q.insert(id, p.q);
                    }
                    proposals.insert(id, p.tokens);
                }
                self.scheduler.set_proposals(proposals);
            }
        }
        let mut step = self.scheduler.schedule()?;
        self.note_scheduled(&mut step, requests);
        if step.is_empty() {
            return Ok(());
        }
        let (out, dead_ends) = self.run_step(&mut step)?;
        self.postprocess(&step, out, &dead_ends, requests)
    }

    /// Runs the step on the ranks. When rows are constrained (structured outputs), a host
    /// thread computes their token masks meanwhile and rank 0 takes them just before it
    /// samples; returns, per sampled row, why its grammar cannot go on (a dead end), if so.
    fn run_step(&mut self, step: &mut Step) -> Result<(StepOutput, Vec<Option<String>>)> {
        let Worker { scheduler, ranks, shared, .. } = self;
        // One grammar per sampling sequence, with its draft: its rows are consecutive.
        let mut ids = step.sampled.clone();
        ids.dedup();
        let Some(grammars) = scheduler.grammars(&ids) else {
            return Ok((ranks.step(&step.batch, &step.sampling)?, Vec::new()));
        };
        let drafts: HashMap<SeqId, &Vec<u32>> = step.entries.iter().map(|e| e.0).zip(&step.drafts).collect();
        let groups: Vec<(Option<&mut TokenMatcher>, Vec<u32>)> = grammars
            .into_iter()
            .zip(&ids)
            .map(|(g, id)| (g, drafts.get(id).map_or_else(Vec::new, |d| d.to_vec())))
            .collect();
        let rows = step.sampled.len();
        let (late, fill) = LateMasks::pending();
        step.sampling.masks = late;
        let width = shared.config.vocab_size;
        std::thread::scope(|s| {
            let masking = std::thread::Builder::new()
                .name("tulu-masks".into())
                .spawn_scoped(s, move || compute_masks(groups, rows, width, fill))
                .map_err(|e| Error::Backend(format!("cannot start the token-mask thread: {e}")))?;
            let out = ranks.step(&step.batch, &step.sampling);
            let dead_ends =
                masking.join().unwrap_or_else(|_| vec![Some("computing its token mask panicked".into()); rows]);
            Ok((out?, dead_ends))
        })
    }

    /// What scheduling decided besides the batch: admissions, preemptions, refusals.
    fn note_scheduled(&mut self, step: &mut Step, requests: &mut Requests) {
        if !step.preempted.is_empty() {
            if let Ok(mut m) = self.shared.metrics.lock() {
                m.preemptions += step.preempted.len() as u64;
            }
            // A preempted sequence is recomputed from scratch: so is its draft state.
            if let Some(d) = &mut self.draft {
                step.preempted.iter().for_each(|&id| d.forget(id));
            }
        }
        let now = Instant::now();
        for &(id, cached) in &step.admitted {
            if requests.get_mut(&id).is_some_and(|r| r.admit(now, cached)) {
                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            }
        }
        for (id, why) in std::mem::take(&mut step.refused) {
            self.end(id, Some(why), requests);
        }
    }

    /// Hands each sampled token to its request's output state; a request whose token cannot be
    /// taken fails alone. A speculating sequence's rows are verified first: it emits the draft
    /// tokens its samples confirm and the sample that ends the draft, or, for a draft drawn
    /// from a draft model's `q`, the tokens `min(1, p/q)` keeps and the correction or bonus.
    fn postprocess(
        &mut self,
        step: &Step,
        out: StepOutput,
        dead_ends: &[Option<String>],
        requests: &mut Requests,
    ) -> Result<()> {
        if out.tokens.len() != step.sampled.len() {
            return Err(Error::Backend(format!(
                "{} rows sampled, {} tokens returned",
                step.sampled.len(),
                out.tokens.len()
            )));
        }
        self.scheduler.complete(step);
        // Only speculating entries: a step without drafts builds (and allocates) nothing.
        let drafts: HashMap<SeqId, &[u32]> = step
            .entries
            .iter()
            .zip(&step.drafts)
            .filter(|(_, d)| !d.is_empty())
            .map(|(e, d)| (e.0, d.as_slice()))
            .collect();
        // The grammar masks of a step whose p rows are computed here (filled by now).
        let masks = match self.draft_q.is_empty() {
            true => None,
            false => step.sampling.masks.wait().ok().flatten(),
        };
        let mut i = 0;
        while i < step.sampled.len() {
            let id = step.sampled[i];
            let draft = drafts.get(&id).copied().unwrap_or(&[]);
            let rows = i..i + draft.len() + 1;
            let chosen: Vec<Sampled> = match draft {
                [] => vec![out.tokens[i]],
                _ => {
                    let (accepted, chosen) = match self.verify_with_q(rows.clone(), draft, step, &out, masks.as_ref()) {
                        Some(v) => (v.accepted, v.tokens.into_iter().map(Sampled::Token).collect()),
                        None => {
                            let picks: Vec<u32> = out.tokens[rows.clone()]
                                .iter()
                                .map(|t| match t {
                                    Sampled::Token(t) => *t,
                                    Sampled::NonFinite { .. } => NON_FINITE,
                                })
                                .collect();
                            let v = verify_sampled(&picks, draft);
                            // The picks themselves, a non-finite row's flag included.
                            (v.accepted, out.tokens[rows.start..rows.start + v.tokens.len()].to_vec())
                        }
                    };
                    self.note_speculation(id, draft.len(), accepted, requests);
                    chosen
                }
            };
            let emitted = chosen.len();
            for (row, token) in (rows.start..).zip(chosen) {
                if !self.take_token(step, &out, row, token, dead_ends, requests) {
                    break;
                }
            }
            if !draft.is_empty() {
                self.scheduler.settle_draft(id, emitted);
            }
            i = rows.end;
        }
        Ok(())
    }

    /// The `min(1, p/q)` verdict for the sequence of sampled `rows` whose `draft` a draft model
    /// drew from `q`; `None` for any other draft, or when the step's logits cannot give one.
    fn verify_with_q(
        &mut self,
        rows: std::ops::Range<usize>,
        draft: &[u32],
        step: &Step,
        out: &StepOutput,
        masks: Option<&TokenMasks>,
    ) -> Option<Verdict> {
        let id = step.sampled[rows.start];
        let q = self.draft_q.remove(&id)?;
        let logits = out.logits.as_deref()?;
        let seq = self.scheduler.get(id)?;
        let rows = Rows { rows, draft, q: &q, position: seq.tokens.len() };
        let width = self.shared.config.vocab_size;
        verify_with_q(&rows, &step.sampling, logits, width, masks, &seq.sampler)
    }

    /// Hands `token`, sampled row `i` of the step, to its request; returns whether the request
    /// goes on.
    fn take_token(
        &mut self,
        step: &Step,
        out: &StepOutput,
        i: usize,
        token: Sampled,
        dead_ends: &[Option<String>],
        requests: &mut Requests,
    ) -> bool {
        let id = step.sampled[i];
        let Some(request) = requests.get_mut(&id) else { return false };
        let vocab = self.shared.config.vocab_size;
        let logits = out.logits.as_deref().and_then(|l| l.get(i * vocab..(i + 1) * vocab));
        let dead_end = dead_ends.get(i).cloned().flatten();
        let accepted = match token {
            _ if dead_end.is_some() => Err(grammar_error(dead_end.unwrap_or_default(), request.generated())),
            Sampled::Token(token) => match self.scheduler.push_token(id, token) {
                Ok(()) => request.accept(token, logits, &self.shared),
                Err(e) => Err(grammar_error(e, request.generated())),
            },
            Sampled::NonFinite { rank } => {
                let position = step.sampling.rows.get(i).and_then(|&r| step.batch.positions.get(r));
                Err(Error::NonFiniteLogits { position: position.map_or(0, |&p| p as usize), rank })
            }
        };
        match accepted {
            // Free the sequence and publish the gauges before the summary goes out, so that
            // a client that has its answer sees the engine's state without it.
            Ok(true) => self.end(id, None, requests),
            Ok(false) => {
                request.flush();
                return true;
            }
            Err(e) => self.end(id, Some(e), requests),
        }
        false
    }

    /// Counts one verified draft: in the engine's metrics and the request's summary.
    fn note_speculation(&self, id: SeqId, drafted: usize, accepted: usize, requests: &mut Requests) {
        if let Ok(mut m) = self.shared.metrics.lock() {
            m.spec_verified_drafts += 1;
            m.spec_draft_tokens += drafted as u64;
            m.spec_accepted_tokens += accepted as u64;
        }
        if let Some(r) = requests.get_mut(&id) {
            r.note_speculation(drafted, accepted);
        }
    }

    /// Ends a request: frees its sequence and counts it, then sends what is left of its stream:
    /// its summary when it finished, `error` when it failed, nothing when it was abandoned.
    fn end(&mut self, id: SeqId, error: Option<Error>, requests: &mut Requests) {
        self.scheduler.remove(id);
        if let Some(d) = &mut self.draft {
            d.forget(id);
        }
        let Some(mut request) = requests.remove(&id) else { return };
        if !request.was_admitted() {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
        }
        if let Ok(mut m) = self.shared.metrics.lock() {
            m.requests_finished += 1;
            m.requests_failed += u64::from(error.is_some());
            m.prompt_tokens += request.sub.prompt.len() as u64;
        }
        self.publish_gauges();
        match error {
            Some(e) => {
                tracing::warn!(request = id, error = %e, "request failed");
                request.fail(e);
            }
            None => request.flush(),
        }
    }

    /// An engine-fatal error: the device state can no longer be trusted, so every request fails
    /// and the engine refuses new ones.
    fn fail_all(&mut self, e: Error, requests: &mut Requests) {
        let message = e.to_string();
        tracing::error!(%message, "engine failed");
        self.shared.fail(&message);
        let ids: Vec<SeqId> = requests.keys().copied().collect();
        for id in ids {
            self.end(id, Some(Error::EngineFailed { message: message.clone() }), requests);
        }
    }

    fn publish_gauges(&self) {
        if let Ok(mut m) = self.shared.metrics.lock() {
            let blocks = self.scheduler.blocks();
            m.running = self.scheduler.num_running();
            m.waiting = self.scheduler.num_waiting();
            m.kv_blocks_used = blocks.num_blocks() - blocks.free_blocks();
            (m.prefix_queried_tokens, m.prefix_hit_tokens) = blocks.prefix_stats();
        }
    }
}

/// Fills every constrained row's mask (the others allow every column) and delivers them;
/// returns each row's dead end, if it has one. A row at a dead end allows every column, so the
/// step still samples it, and the worker then ends its request instead of taking the token.
/// `groups` holds each sampling sequence's grammar and draft, in row order: a sequence with a
/// draft of `k` tokens owns `k + 1` consecutive rows, masked after each draft prefix.
fn compute_masks(
    groups: Vec<(Option<&mut TokenMatcher>, Vec<u32>)>,
    rows: usize,
    width: usize,
    fill: MaskFill,
) -> Vec<Option<String>> {
    use rayon::prelude::*;
    let mut masks = TokenMasks::allow_all(rows, width);
    let words = masks.words;
    let mut parts = Vec::with_capacity(groups.len());
    let mut rest = masks.bits.as_mut_slice();
    for (grammar, draft) in groups {
        let n = ((draft.len() + 1) * words).min(rest.len());
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(n);
        parts.push((mine, grammar, draft));
        rest = tail;
    }
    let dead_ends: Vec<Vec<Option<String>>> = parts
        .into_par_iter()
        .map(|(mine, grammar, draft)| match grammar {
            Some(g) => g.fill_draft_masks(&draft, mine, words),
            None => vec![None; draft.len() + 1],
        })
        .collect();
    fill.fill(masks);
    dead_ends.into_iter().flatten().collect()
}

fn grammar_error(why: String, generated: usize) -> Error {
    Error::Grammar { message: format!("{why} (after {generated} generated tokens)") }
}

/// After an engine-fatal error: every request that still arrives fails with the reason, until
/// the engine shuts down.
fn refuse_until_shutdown(commands: &mpsc::Receiver<Command>, shared: &Shared) {
    let why = shared.failure().unwrap_or_default();
    for command in commands {
        match command {
            Command::Submit(sub) => {
                shared.queued.fetch_sub(1, Ordering::SeqCst);
                let _ = sub.events.send(Err(Error::EngineFailed { message: why.clone() }));
            }
            Command::Shutdown { .. } => return,
        }
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown cause".into())
}
