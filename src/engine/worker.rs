//! The step loop: schedule → run → postprocess, on the one thread that owns device state.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use tokio::sync::mpsc as tmpsc;

use super::ranks::Ranks;
use super::request::{Event, FinishReason, Summary, TokenLogprob};
use super::Shared;
use crate::error::{Error, Result};
use crate::runtime::sampler::{RowSampling, Sampler, SamplingParams, StepSampling};
use crate::runtime::scheduler::{Scheduler, SeqId};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// A validated request on its way to the worker.
pub(super) struct Submission {
    pub id: SeqId,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub logprobs: Option<usize>,
    pub events: tmpsc::UnboundedSender<Result<Event>>,
    pub submitted: Instant,
}

pub(super) enum Command {
    Submit(Box<Submission>),
    Shutdown { deadline: Instant },
}

/// Output state of one request: sampler, detokenizer, stop strings, timings.
struct Active<'t> {
    sub: Submission,
    sampler: Sampler,
    decoder: Option<StreamDecoder<'t>>,
    generated: Vec<u32>,
    pending_logprobs: Vec<TokenLogprob>,
    /// All text decoded so far, and how much of it has been sent.
    text: String,
    sent: usize,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    cached_prompt_tokens: usize,
    finished: Option<FinishReason>,
}

pub(super) struct Worker {
    shared: Arc<Shared>,
    ranks: Box<dyn Ranks>,
    scheduler: Scheduler,
}

impl Worker {
    /// Starts the step loop on its own thread; returns the channel requests reach it through.
    pub fn spawn(
        shared: Arc<Shared>,
        ranks: Box<dyn Ranks>,
        scheduler: Scheduler,
    ) -> Result<(mpsc::Sender<Command>, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel();
        let worker = Worker { shared: shared.clone(), ranks, scheduler };
        let handle = std::thread::Builder::new()
            .name("tulu-engine".into())
            .spawn(move || worker.run(rx, &shared))
            .map_err(|e| Error::Backend(format!("cannot start the engine thread: {e}")))?;
        Ok((tx, handle))
    }

    /// Runs until shut down (or until every `Engine` handle is gone).
    fn run(mut self, commands: mpsc::Receiver<Command>, shared: &Shared) {
        let tokenizer: &Tokenizer = &shared.tokenizer;
        let mut active: HashMap<SeqId, Active> = HashMap::new();
        let mut deadline: Option<Instant> = None;
        loop {
            // Intake: block while idle, otherwise take whatever has arrived.
            let mut incoming = Vec::new();
            self.publish_gauges();
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
                    Command::Submit(sub) => self.admit(*sub, tokenizer, &mut active),
                    Command::Shutdown { deadline: d } => deadline = Some(d),
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                for (id, a) in active.drain() {
                    let _ = a
                        .sub
                        .events
                        .send(Err(Error::ShuttingDown { message: "aborted at the shutdown deadline".into() }));
                    self.scheduler.remove(id);
                    shared.queued.fetch_sub(usize::from(a.admitted.is_none()), Ordering::SeqCst);
                }
                return;
            }
            // Aborts: a dropped stream ends its request.
            let gone: Vec<SeqId> = active.iter().filter(|(_, a)| a.sub.events.is_closed()).map(|(&id, _)| id).collect();
            for id in gone {
                self.retire(id, &mut active);
            }
            if self.scheduler.is_idle() {
                continue;
            }
            if let Err(e) = self.step(&mut active) {
                self.fail(e, &mut active);
            }
        }
    }

    fn admit<'t>(&mut self, sub: Submission, tokenizer: &'t Tokenizer, active: &mut HashMap<SeqId, Active<'t>>) {
        let sampler = Sampler::new(sub.sampling.clone(), tokenizer.vocab_size());
        self.scheduler.add(sub.id, sub.prompt.clone());
        active.insert(
            sub.id,
            Active {
                sub,
                sampler,
                decoder: Some(tokenizer.stream_decoder()),
                generated: Vec::new(),
                pending_logprobs: Vec::new(),
                text: String::new(),
                sent: 0,
                admitted: None,
                first_token: None,
                last_token: None,
                cached_prompt_tokens: 0,
                finished: None,
            },
        );
    }

    /// One step: schedule, run the batch, sample for every sequence whose tokens are all computed.
    fn step(&mut self, active: &mut HashMap<SeqId, Active>) -> Result<()> {
        let plan = self.scheduler.schedule()?;
        if !plan.preempted.is_empty() {
            if let Ok(mut m) = self.shared.metrics.lock() {
                m.preemptions += plan.preempted.len() as u64;
            }
        }
        if plan.entries.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        for &(id, _) in &plan.entries {
            if let Some(a) = active.get_mut(&id) {
                if a.admitted.is_none() {
                    a.admitted = Some(now);
                    self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                    let seq = self.scheduler.get(id);
                    a.cached_prompt_tokens = seq.map_or(0, |s| s.computed);
                }
            }
        }
        let batch = self.scheduler.batch(&plan)?;
        // Rows to sample: the last row of each sequence this step completes, each with its
        // sequence's draw for this step.
        let mut sampling = StepSampling { valid: self.shared.tokenizer.vocab_size(), ..Default::default() };
        for ((id, n), s) in plan.entries.iter().zip(&batch.seqs) {
            let Some(seq) = self.scheduler.get(*id) else { continue };
            if seq.computed + n != seq.tokens.len() {
                continue;
            }
            sampling.rows.push(s.rows.end - 1);
            // (A sequence always has its request; greedy keeps the rows aligned if not.)
            let row = match active.get_mut(id) {
                Some(a) => {
                    sampling.want_logits |= a.sub.logprobs.is_some();
                    a.sampler.next_row(&seq.tokens)
                }
                None => RowSampling::greedy(),
            };
            sampling.per_row.push(row);
        }
        let out = self.ranks.step(&batch, &sampling)?;
        let ready = self.scheduler.complete(&plan);
        if ready.len() != out.tokens.len() {
            return Err(Error::Backend(format!(
                "{} sequences ready, {} tokens sampled",
                ready.len(),
                out.tokens.len()
            )));
        }
        let vocab = self.shared.config.vocab_size;
        for (i, (id, token)) in ready.into_iter().zip(out.tokens).enumerate() {
            let Some(a) = active.get_mut(&id) else { continue };
            if let (Some(n), Some(logits)) = (a.sub.logprobs, &out.logits) {
                let row = &logits[i * vocab..(i + 1) * vocab];
                a.pending_logprobs.push(logprob(&self.shared.tokenizer, row, token, n));
            }
            self.scheduler.push_token(id, token);
            if a.accept(token, &self.shared)? {
                // Free the sequence and publish the gauges before the summary goes out, so that
                // a client that has its answer sees the engine's state without it.
                if let Some(mut done) = self.retire(id, active) {
                    self.publish_gauges();
                    done.flush();
                }
            } else {
                a.flush();
            }
        }
        Ok(())
    }

    /// Ends a request: frees its blocks and counts it; returns its state (to send its summary).
    fn retire<'t>(&mut self, id: SeqId, active: &mut HashMap<SeqId, Active<'t>>) -> Option<Active<'t>> {
        self.scheduler.remove(id);
        let a = active.remove(&id)?;
        if a.admitted.is_none() {
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
        }
        if let Ok(mut m) = self.shared.metrics.lock() {
            m.requests_finished += 1;
            m.prompt_tokens += a.sub.prompt.len() as u64;
        }
        Some(a)
    }

    /// A failed step fails every request: the device state can no longer be trusted.
    fn fail(&mut self, e: Error, active: &mut HashMap<SeqId, Active>) {
        let message = e.to_string();
        tracing::error!(%message, "engine step failed");
        if let Ok(mut f) = self.shared.failed.lock() {
            *f = Some(message.clone());
        }
        let ids: Vec<SeqId> = active.keys().copied().collect();
        for id in ids {
            if let Some(a) = active.get(&id) {
                let _ = a.sub.events.send(Err(Error::Backend(message.clone())));
            }
            self.retire(id, active);
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

/// The token's log-probability and the `n` likeliest alternatives, over the tokenizer's rows.
fn logprob(tokenizer: &Tokenizer, logits: &[f32], token: u32, n: usize) -> TokenLogprob {
    let rows = &logits[..tokenizer.vocab_size().min(logits.len())];
    let max = rows.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + rows.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let text = |id: u32| tokenizer.decode(&[id], false).unwrap_or_default();
    let mut order: Vec<u32> = (0..rows.len() as u32).collect();
    let n = n.min(order.len());
    if n > 0 {
        order.select_nth_unstable_by(n - 1, |&a, &b| rows[b as usize].total_cmp(&rows[a as usize]));
        order.truncate(n);
        order.sort_by(|&a, &b| rows[b as usize].total_cmp(&rows[a as usize]));
    } else {
        order.clear();
    }
    TokenLogprob {
        token,
        text: text(token),
        logprob: logits[token as usize] - lse,
        top: order.into_iter().map(|id| (id, text(id), rows[id as usize] - lse)).collect(),
    }
}

impl Active<'_> {
    /// Takes a sampled token: EOS, detokenization, stop strings, limits. Returns whether the
    /// request has finished (its summary then sent).
    fn accept(&mut self, token: u32, shared: &Shared) -> Result<bool> {
        let now = Instant::now();
        if let Ok(mut m) = shared.metrics.lock() {
            m.generated_tokens += 1;
            match self.last_token {
                None => m.time_to_first_token.observe((now - self.sub.submitted).as_secs_f64()),
                Some(t) => m.inter_token_latency.observe((now - t).as_secs_f64()),
            }
        }
        self.first_token.get_or_insert(now);
        self.last_token = Some(now);
        self.generated.push(token);
        if !self.sub.ignore_eos && shared.eos.contains(&token) {
            self.finish(FinishReason::Stop)?;
        } else {
            if let Some(piece) = self.decoder.as_mut().map(|d| d.push(token)).transpose()?.flatten() {
                self.text.push_str(&piece);
            }
            if !self.check_stop_strings() && self.generated.len() >= self.sub.max_tokens {
                self.finish(FinishReason::Length)?;
            }
        }
        Ok(self.finished.is_some())
    }

    fn finish(&mut self, reason: FinishReason) -> Result<()> {
        if let Some(d) = self.decoder.take() {
            self.text.push_str(&d.finish()?);
        }
        // The flushed tail may complete a stop string, which then decides the reason.
        if !self.check_stop_strings() {
            self.finished = Some(reason);
        }
        Ok(())
    }

    /// Ends the generation at the first stop string; returns whether one was found.
    fn check_stop_strings(&mut self) -> bool {
        let longest = self.sub.stop.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.sent.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self.sub.stop.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min();
        if let Some(at) = hit {
            self.text.truncate(at);
            self.finished = Some(FinishReason::Stop);
            self.decoder = None;
            return true;
        }
        false
    }

    /// Sends what can be sent: all text once finished, else all but a tail that could still
    /// grow into a stop string; then the summary when finished.
    fn flush(&mut self) {
        let mut end = self.text.len();
        if self.finished.is_none() {
            for s in &self.sub.stop {
                let held = (1..s.len()).rev().find(|&k| s.is_char_boundary(k) && self.text.ends_with(&s[..k]));
                end = end.min(self.text.len() - held.unwrap_or(0));
            }
        }
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        if !self.pending_logprobs.is_empty() && (end > self.sent || self.finished.is_some()) {
            let _ = self.sub.events.send(Ok(Event::Logprobs(std::mem::take(&mut self.pending_logprobs))));
        }
        if end > self.sent {
            let _ = self.sub.events.send(Ok(Event::Text(self.text[self.sent..end].to_owned())));
            self.sent = end;
        }
        if let Some(reason) = self.finished {
            let (admitted, first, last) = (
                self.admitted.unwrap_or(self.sub.submitted),
                self.first_token.unwrap_or(self.sub.submitted),
                self.last_token.unwrap_or(self.sub.submitted),
            );
            let summary = Summary {
                prompt_tokens: self.sub.prompt.len(),
                cached_prompt_tokens: self.cached_prompt_tokens,
                tokens: std::mem::take(&mut self.generated),
                prefill_secs: (first - admitted).as_secs_f64(),
                decode_secs: (last - first).as_secs_f64(),
                time_to_first_token: (first - self.sub.submitted).as_secs_f64(),
                finish_reason: reason,
            };
            let _ = self.sub.events.send(Ok(Event::Done(summary)));
        }
    }
}
