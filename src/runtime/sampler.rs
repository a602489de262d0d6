//! Turning logits into the next token: greedy, temperature, top-k, top-p, min-p, repetition
//! penalty, seeded. The processors run in Hugging Face `generate`'s order: repetition penalty,
//! temperature, top-k, top-p, min-p.
//!
//! The host keeps each sequence's seeded generator and turns it into one [`RowSampling`] per
//! step (the parameters, one uniform draw, the penalised tokens); the backend picks the token
//! on its device with [`sample_row`]'s exact rule, so that only token ids cross to the host:
//! - probabilities `p = exp((logit − max) / T)` (unnormalised: the likeliest is exactly 1);
//! - every filter is a threshold on `p`, ties kept (as HF's top-k keeps every logit equal to
//!   the k-th): top-k keeps `p ≥` the k-th largest; top-p keeps `p ≥ t` for the largest `t`
//!   whose kept mass reaches `top_p` of the top-k mass; min-p keeps `p ≥ min_p`;
//! - masses are sums of `p · 2⁴⁰` truncated to integers, so that they are exact and do not
//!   depend on the order a device adds them in;
//! - the token is the first, in vocabulary order, at which the running mass of kept tokens
//!   passes `uniform ×` their total;
//! - a row whose candidate logits are not all finite (NaN or ±infinity) gives no token but
//!   [`NON_FINITE`], so that it fails its request instead of becoming token 0 (the "!!!!" of
//!   allenai/open-instruct#565).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::token_mask::{allows, LateMasks};
use crate::error::{Error, Result};
use crate::grammar::TokenMatcher;

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of likeliest tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the likeliest token's probability (0: none).
    pub min_p: f32,
    /// Penalise tokens already in the prompt or output (HF's CTRL-style penalty; 1: none).
    pub repetition_penalty: f32,
    /// Seed for reproducible sampling; `None` draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: None }
    }
}

impl SamplingParams {
    /// Greedy decoding.
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Checks every parameter's range, naming the first one out of it.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::request("temperature", format!("must be a number ≥ 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::request("top_p", format!("must be in (0, 1], got {}", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(Error::request("min_p", format!("must be in [0, 1], got {}", self.min_p)));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(Error::request(
                "repetition_penalty",
                format!("must be a number > 0, got {}", self.repetition_penalty),
            ));
        }
        Ok(())
    }
}

/// One row's sampling in one step, as the backend's `sample` op receives it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RowSampling {
    /// 0: greedy.
    pub temperature: f32,
    /// 0: off.
    pub top_k: usize,
    /// 1: off.
    pub top_p: f32,
    /// 0: off.
    pub min_p: f32,
    /// 1: off.
    pub repetition_penalty: f32,
    /// The draw in `[0, 1)` that picks among the kept tokens (from the sequence's generator).
    pub uniform: f32,
    /// Distinct token ids the repetition penalty applies to (empty when it is off).
    pub penalized: Vec<u32>,
}

impl RowSampling {
    /// Greedy, no penalty.
    pub fn greedy() -> Self {
        RowSampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            uniform: 0.0,
            penalized: Vec::new(),
        }
    }
}

/// What one step samples: a [`RowSampling`] for each returned row, over the first `valid`
/// columns (the tokenizer's vocabulary; padded columns are never picked).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepSampling {
    /// The step's rows whose logits are sampled, in order.
    pub rows: Vec<usize>,
    /// One per row.
    pub per_row: Vec<RowSampling>,
    /// Columns that may be picked.
    pub valid: usize,
    /// Also return the rows' logits to the host (log-probabilities were asked for).
    pub want_logits: bool,
    /// Each row's allowed tokens, when some row is constrained (structured outputs): computed
    /// on the host while the forward pass runs; only rank 0, which samples, waits for them.
    #[serde(skip)]
    pub masks: LateMasks,
}

/// The id a backend's `sample` op returns for a row whose first `valid` logits are not all
/// finite. No vocabulary comes near it.
pub const NON_FINITE: u32 = u32::MAX;

/// What a step sampled for one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampled {
    /// The next token.
    Token(u32),
    /// The row's logits hold NaN or infinity; the first such column lies in this rank's
    /// vocabulary shard.
    NonFinite {
        /// The rank whose shard of the logits holds the first non-finite column.
        rank: usize,
    },
}

/// The tokens a step picked, and the rows' logits when they were asked for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    /// One per sampled row.
    pub tokens: Vec<Sampled>,
    /// `rows × vocab`, row-major, when `StepSampling::want_logits`.
    pub logits: Option<Vec<f32>>,
}

/// Fixed-point scale of probability masses (see the module docs).
pub const MASS_SCALE: f32 = 1_099_511_627_776.0; // 2^40

/// `p` as a fixed-point mass.
pub fn mass(p: f32) -> u64 {
    (p * MASS_SCALE) as u64
}

/// Picks the token of one row of `logits` (its first `valid` columns, those `mask` allows when
/// there is one) by the rule in the module docs; the reference every backend's `sample` op
/// follows. Columns the mask disallows are not candidates: they are never picked and their
/// values are not checked; they count as `-inf` logits (probability 0).
pub fn sample_row(logits: &[f32], valid: usize, s: &RowSampling, mask: Option<&[u32]>) -> u32 {
    let n = valid.min(logits.len());
    let candidate = |c: usize| mask.is_none_or(|m| allows(m, c));
    if !logits[..n].iter().enumerate().all(|(c, x)| x.is_finite() || !candidate(c)) {
        return NON_FINITE;
    }
    let mut l = logits[..n].to_vec();
    if mask.is_some() {
        for (c, x) in l.iter_mut().enumerate() {
            if !candidate(c) {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    if s.repetition_penalty != 1.0 {
        for &t in &s.penalized {
            if let Some(x) = l.get_mut(t as usize) {
                *x = if *x > 0.0 { *x / s.repetition_penalty } else { *x * s.repetition_penalty };
            }
        }
    }
    let best = argmax(&l);
    let max = l.get(best as usize).copied().unwrap_or(f32::NAN);
    if s.temperature == 0.0 || !max.is_finite() {
        return best;
    }
    let p: Vec<f32> = l
        .iter()
        .map(|&x| {
            let v = ((x - max) / s.temperature).exp();
            if v.is_nan() {
                0.0
            } else {
                v
            }
        })
        .collect();
    let mut threshold = 0.0f32;
    if s.top_k > 0 && s.top_k < n {
        // The k-th largest, without sorting the vocabulary.
        let mut v = p.clone();
        threshold = *v.select_nth_unstable_by(s.top_k - 1, |a, b| b.total_cmp(a)).1;
    }
    if s.top_p < 1.0 {
        let kept: Vec<f32> = p.iter().copied().filter(|&x| x >= threshold).collect();
        let goal = top_p_goal(kept.iter().map(|&x| mass(x)).sum(), s.top_p);
        threshold = threshold.max(top_p_threshold(kept, goal));
    }
    if s.min_p > 0.0 {
        threshold = threshold.max(s.min_p);
    }
    let total: u64 = p.iter().filter(|&&x| x >= threshold).map(|&x| mass(x)).sum();
    let target = draw_target(total, s.uniform);
    let mut acc = 0u64;
    let mut last = best;
    for (i, &x) in p.iter().enumerate() {
        if x >= threshold {
            acc += mass(x);
            last = i as u32;
            if target < acc {
                return i as u32;
            }
        }
    }
    last
}

/// The largest value `t` of `kept` such that the values `≥ t` weigh at least `goal`: the
/// running mass of the values in descending order, sorting only as many of the largest as it
/// needs (a top-p set is usually a few hundred tokens of a 128k vocabulary).
fn top_p_threshold(mut kept: Vec<f32>, goal: u64) -> f32 {
    let len = kept.len();
    let mut m = len.min(256);
    loop {
        if m < len {
            kept.select_nth_unstable_by(m - 1, |a, b| b.total_cmp(a));
        }
        let head = &mut kept[..m];
        head.sort_unstable_by(|a, b| b.total_cmp(a));
        let mut acc = 0u64;
        for &x in head.iter() {
            acc += mass(x);
            if acc >= goal {
                return x;
            }
        }
        if m == len {
            // Only when `goal` exceeds the whole mass, which `top_p_goal` rules out.
            return head.last().copied().unwrap_or(0.0);
        }
        m = (m * 4).min(len);
    }
}

/// The mass top-p must reach: `⌈top_p · total⌉`, at most `total`.
pub fn top_p_goal(total: u64, top_p: f32) -> u64 {
    ((top_p as f64 * total as f64).ceil() as u64).min(total)
}

/// The running mass the drawn token's passes: `⌊uniform · total⌋`.
pub fn draw_target(total: u64, uniform: f32) -> u64 {
    ((uniform as f64 * total as f64) as u64).min(total.saturating_sub(1))
}

/// Samples tokens for one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Rows past this (vocab padding beyond the tokenizer) are never sampled.
    sample_rows: usize,
    /// The grammar its tokens must follow (structured outputs), if any.
    grammar: Option<TokenMatcher>,
    /// The distinct tokens of the history seen so far, sorted, and how much of the history
    /// they cover: a sequence's history only grows, so each step adds its new tokens instead
    /// of sorting the whole history again (the repetition penalty's ids).
    seen: Vec<u32>,
    absorbed: usize,
}

impl Sampler {
    /// A sampler over the first `sample_rows` logits rows.
    pub fn new(params: SamplingParams, sample_rows: usize) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Sampler { params, rng, sample_rows, grammar: None, seen: Vec::new(), absorbed: 0 }
    }

    /// The same sampler, its tokens constrained by `grammar`.
    pub fn with_grammar(mut self, grammar: Option<TokenMatcher>) -> Self {
        self.grammar = grammar;
        self
    }

    /// Whether its tokens follow a grammar.
    pub fn has_grammar(&self) -> bool {
        self.grammar.is_some()
    }

    /// The grammar its tokens follow, if any.
    pub fn grammar_mut(&mut self) -> Option<&mut TokenMatcher> {
        self.grammar.as_mut()
    }

    /// Follows a sampled token in the grammar, if there is one; an error when the token breaks
    /// it.
    pub fn commit(&mut self, token: u32) -> std::result::Result<(), String> {
        self.grammar.as_mut().map_or(Ok(()), |g| g.commit(token))
    }

    /// This step's [`RowSampling`]: one draw from the generator, and the distinct tokens of
    /// `history` (prompt and output so far, which only grows from call to call) when the
    /// repetition penalty is on.
    pub fn next_row(&mut self, history: &[u32]) -> RowSampling {
        let penalized = self.absorb(history);
        let uniform = self.draw(&mut None);
        self.row(uniform, penalized)
    }

    /// The [`RowSampling`]s of a speculative step's `draft.len() + 1` rows after `history`: row
    /// `i` sees `draft[..i]` as history and takes the `i`-th next draw of the generator, which
    /// does not advance — [`Sampler::advance`] then moves it past the tokens the step emits,
    /// so that every emitted token took the draw it takes without speculation.
    pub fn draft_rows(&mut self, history: &[u32], draft: &[u32]) -> Vec<RowSampling> {
        let seen = self.absorb(history);
        let mut ahead = Some(self.rng.clone());
        let mut penalized = seen;
        let mut rows = Vec::with_capacity(draft.len() + 1);
        for i in 0..=draft.len() {
            if i > 0 && self.params.repetition_penalty != 1.0 {
                if let Err(at) = penalized.binary_search(&draft[i - 1]) {
                    penalized.insert(at, draft[i - 1]);
                }
            }
            let uniform = self.draw(&mut ahead);
            rows.push(self.row(uniform, penalized.clone()));
        }
        rows
    }

    /// Moves the generator past `emitted` draws (the tokens a speculative step emitted).
    pub fn advance(&mut self, emitted: usize) {
        for _ in 0..emitted {
            self.draw(&mut None);
        }
    }

    /// The distinct tokens of `history` when the repetition penalty is on (else none), kept
    /// incrementally.
    fn absorb(&mut self, history: &[u32]) -> Vec<u32> {
        if self.params.repetition_penalty == 1.0 {
            return Vec::new();
        }
        if history.len() < self.absorbed {
            // Not the history it saw grow: start over.
            (self.seen, self.absorbed) = (Vec::new(), 0);
        }
        for &t in &history[self.absorbed..] {
            if let Err(at) = self.seen.binary_search(&t) {
                self.seen.insert(at, t);
            }
        }
        self.absorbed = history.len();
        self.seen.clone()
    }

    /// The next draw in `[0, 1)` from `ahead` when given, else from the generator; greedy
    /// sampling draws nothing.
    fn draw(&mut self, ahead: &mut Option<StdRng>) -> f32 {
        if self.params.temperature == 0.0 {
            return 0.0;
        }
        ahead.as_mut().unwrap_or(&mut self.rng).random::<f32>()
    }

    fn row(&self, uniform: f32, penalized: Vec<u32>) -> RowSampling {
        let p = &self.params;
        RowSampling {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            uniform,
            penalized,
        }
    }

    /// Columns that may be picked (the tokenizer's vocabulary).
    pub fn valid(&self) -> usize {
        self.sample_rows
    }

    /// Picks the next token from `logits` (one row) on the host, given the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let row = self.next_row(history);
        sample_row(logits, self.sample_rows, &row, None)
    }
}

/// Index of the largest logit (the first on ties, as torch.argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests;
