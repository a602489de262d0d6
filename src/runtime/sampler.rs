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
    /// The row `params` sample with the draw `uniform`, penalising `penalized` (sorted ids).
    fn of(params: &SamplingParams, uniform: f32, penalized: Vec<u32>) -> Self {
        RowSampling {
            temperature: params.temperature,
            top_k: params.top_k,
            top_p: params.top_p,
            min_p: params.min_p,
            repetition_penalty: params.repetition_penalty,
            uniform,
            penalized,
        }
    }

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
    match row_masses(logits, valid, s, mask) {
        Kept::NonFinite => NON_FINITE,
        Kept::Argmax(best) => best,
        Kept::Masses(masses) => {
            let total: u64 = masses.iter().sum();
            let target = draw_target(total, s.uniform);
            let mut acc = 0u64;
            for (i, &m) in masses.iter().enumerate() {
                acc += m;
                if target < acc {
                    return i as u32;
                }
            }
            masses.iter().rposition(|&m| m > 0).map_or(0, |i| i as u32)
        }
    }
}

/// The distribution [`sample_row`] draws from, over the row's first `valid` columns: the
/// probability of each column given a uniform draw (its fixed-point mass over the kept total;
/// a one-hot vector at the argmax for a greedy row). `None` when a candidate logit is not
/// finite. Speculative decoding's acceptance rule reads the target's and the draft's rows
/// through it, so that both are exactly the distributions their tokens are sampled from.
pub fn row_probs(logits: &[f32], valid: usize, s: &RowSampling, mask: Option<&[u32]>) -> Option<Vec<f32>> {
    let n = valid.min(logits.len());
    match row_masses(logits, valid, s, mask) {
        Kept::NonFinite => None,
        Kept::Argmax(best) => Some((0..n).map(|c| if c == best as usize { 1.0 } else { 0.0 }).collect()),
        Kept::Masses(masses) => {
            let total = masses.iter().sum::<u64>() as f64;
            Some(masses.iter().map(|&m| (m as f64 / total) as f32).collect())
        }
    }
}

/// What a row's transforms leave to draw from.
enum Kept {
    /// A candidate logit is NaN or infinite.
    NonFinite,
    /// Greedy (or no finite candidate): this column, without a draw.
    Argmax(u32),
    /// Each column's fixed-point mass, 0 for the columns the filters drop.
    Masses(Vec<u64>),
}

/// The row's candidates after the penalty, temperature, top-k, top-p and min-p (the module
/// docs' rule), shared by [`sample_row`] and [`row_probs`].
fn row_masses(logits: &[f32], valid: usize, s: &RowSampling, mask: Option<&[u32]>) -> Kept {
    let n = valid.min(logits.len());
    let candidate = |c: usize| mask.is_none_or(|m| allows(m, c));
    if !logits[..n].iter().enumerate().all(|(c, x)| x.is_finite() || !candidate(c)) {
        return Kept::NonFinite;
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
        return Kept::Argmax(best);
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
    Kept::Masses(p.iter().map(|&x| if x >= threshold { mass(x) } else { 0 }).collect())
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
    /// The key of speculative decoding's own draws (see [`keyed_uniform`]).
    spec_key: u64,
}

impl Sampler {
    /// A sampler over the first `sample_rows` logits rows.
    pub fn new(params: SamplingParams, sample_rows: usize) -> Self {
        let (rng, spec_key) = match params.seed {
            Some(seed) => (StdRng::seed_from_u64(seed), seed ^ SPECULATION_SALT),
            None => (StdRng::from_os_rng(), rand::random()),
        };
        Sampler { params, rng, sample_rows, grammar: None, seen: Vec::new(), absorbed: 0, spec_key }
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

    /// Whether it picks the argmax (temperature 0): speculation then verifies by the point-mass
    /// rule, without the draft's distribution.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature == 0.0
    }

    /// How a draft model samples this sequence's proposals (`None` for a greedy sequence, whose
    /// draft proposes its argmax): the same transforms, with draws of its own.
    pub fn draft_sampling(&self) -> Option<DraftSampling> {
        let params = SamplingParams { seed: None, ..self.params.clone() };
        (!self.is_greedy()).then_some(DraftSampling { params, key: self.spec_key })
    }

    /// The draw in `[0, 1)` that decides whether the draft token at `position` (its index in
    /// the sequence's tokens) is kept: `min(1, p/q)` passes it.
    pub fn accept_uniform(&self, position: usize) -> f32 {
        keyed_uniform(self.spec_key, position, Purpose::Accept)
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
        RowSampling::of(&self.params, uniform, penalized)
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

/// XORed into a request's seed to key speculative decoding's draws, so that they are not the
/// sampler's own stream (the digits of π).
const SPECULATION_SALT: u64 = 0x3243_F6A8_885A_308D;

/// What a keyed draw is for: each position of a sequence has one of each.
#[derive(Clone, Copy)]
enum Purpose {
    /// Whether the target keeps the draft token.
    Accept = 0,
    /// Which token the draft model proposes.
    Propose = 1,
}

/// A draw in `[0, 1)` that depends only on `key`, the position and the purpose: a generator
/// seeded with `key ^ (2·position + purpose)·φ` (an odd multiplier, so that distinct positions
/// and purposes give distinct seeds). Keyed by position rather than drawn from a stream, the
/// draws of speculative decoding do not depend on how many tokens each step proposed or
/// emitted, or on which other sequences shared the step.
fn keyed_uniform(key: u64, position: usize, purpose: Purpose) -> f32 {
    let index = (position as u64).wrapping_mul(2).wrapping_add(purpose as u64);
    StdRng::seed_from_u64(key ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15)).random::<f32>()
}

/// How a draft model samples a sequence's proposals (speculative decoding): the sequence's own
/// transforms (temperature, top-k/p, min-p, repetition penalty), with a draw per position keyed
/// by the sequence's speculation key (its seed XOR `SPECULATION_SALT`; a random key for an
/// unseeded request).
#[derive(Debug, Clone, PartialEq)]
pub struct DraftSampling {
    params: SamplingParams,
    key: u64,
}

impl DraftSampling {
    /// The [`RowSampling`] of the draft row that proposes the token after `history` and the
    /// tokens `proposed` so far this round: the penalty covers both.
    pub fn row(&self, history: &[u32], proposed: &[u32]) -> RowSampling {
        let p = &self.params;
        let mut penalized = Vec::new();
        if p.repetition_penalty != 1.0 {
            penalized = history.iter().chain(proposed).copied().collect();
            penalized.sort_unstable();
            penalized.dedup();
        }
        let uniform = keyed_uniform(self.key, history.len() + proposed.len(), Purpose::Propose);
        RowSampling::of(p, uniform, penalized)
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
