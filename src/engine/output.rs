//! A request's output state: everything between the tokens its sequence samples and the
//! [`Event`]s its client receives — the incremental detokenizer, EOS, stop strings, the token
//! limit, log-probabilities and timings. Whatever fails here fails this request alone.

use std::time::Instant;

use tokio::sync::mpsc as tmpsc;

use super::request::{Event, FinishReason, Summary, TokenLogprob};
use super::Shared;
use crate::error::{Error, Result};
use crate::grammar::TokenMatcher;
use crate::runtime::sampler::SamplingParams;
use crate::runtime::scheduler::SeqId;
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
    /// The grammar its tokens must follow (structured outputs); moves to its sampler at
    /// admission.
    pub grammar: Option<TokenMatcher>,
    /// Whether it may speculate.
    pub speculative: bool,
    pub events: tmpsc::UnboundedSender<Result<Event>>,
    pub submitted: Instant,
}

/// One request's output state.
pub(super) struct RequestOutput<'t> {
    pub sub: Submission,
    tokenizer: &'t Tokenizer,
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
    /// Draft tokens proposed for it and accepted (speculative decoding).
    draft_tokens: usize,
    accepted_draft_tokens: usize,
}

impl<'t> RequestOutput<'t> {
    /// The state of a request not yet admitted.
    pub fn new(sub: Submission, tokenizer: &'t Tokenizer) -> Self {
        RequestOutput {
            sub,
            tokenizer,
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
            draft_tokens: 0,
            accepted_draft_tokens: 0,
        }
    }

    /// Records the request's first admission (with its prompt tokens found in the prefix
    /// cache); returns whether this was the first.
    pub fn admit(&mut self, now: Instant, cached: usize) -> bool {
        if self.admitted.is_some() {
            return false;
        }
        self.admitted = Some(now);
        self.cached_prompt_tokens = cached;
        true
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> usize {
        self.generated.len()
    }

    /// Whether it has been admitted (left the waiting queue) at least once.
    pub fn was_admitted(&self) -> bool {
        self.admitted.is_some()
    }

    /// Whether its client has dropped its stream.
    pub fn abandoned(&self) -> bool {
        self.sub.events.is_closed()
    }

    /// Takes a sampled token (with its logits row when log-probabilities were asked for): EOS,
    /// detokenization, stop strings, limits. Returns whether the request has finished. An error
    /// (its detokenizer failed) ends this request only.
    pub fn accept(&mut self, token: u32, logits: Option<&[f32]>, shared: &Shared) -> Result<bool> {
        if let (Some(n), Some(row)) = (self.sub.logprobs, logits) {
            self.pending_logprobs.push(logprob(self.tokenizer, row, token, n));
        }
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
    pub fn flush(&mut self) {
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
            let summary = self.summary(reason);
            let _ = self.sub.events.send(Ok(Event::Done(summary)));
        }
    }

    fn summary(&mut self, finish_reason: FinishReason) -> Summary {
        let submitted = self.sub.submitted;
        let (admitted, first, last) = (
            self.admitted.unwrap_or(submitted),
            self.first_token.unwrap_or(submitted),
            self.last_token.unwrap_or(submitted),
        );
        Summary {
            prompt_tokens: self.sub.prompt.len(),
            cached_prompt_tokens: self.cached_prompt_tokens,
            tokens: std::mem::take(&mut self.generated),
            prefill_secs: (first - admitted).as_secs_f64(),
            decode_secs: (last - first).as_secs_f64(),
            time_to_first_token: (first - submitted).as_secs_f64(),
            finish_reason,
            draft_tokens: self.draft_tokens,
            accepted_draft_tokens: self.accepted_draft_tokens,
        }
    }

    /// Counts a verified draft of `drafted` tokens, `accepted` of them kept.
    pub fn note_speculation(&mut self, drafted: usize, accepted: usize) {
        self.draft_tokens += drafted;
        self.accepted_draft_tokens += accepted;
    }

    /// Ends the stream with `error` (the last event its client receives).
    pub fn fail(&self, error: Error) {
        let _ = self.sub.events.send(Err(error));
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
        logprob: logits.get(token as usize).map_or(f32::NEG_INFINITY, |l| l - lse),
        top: order.into_iter().map(|id| (id, text(id), rows[id as usize] - lse)).collect(),
    }
}
