//! Turning logits into the next token: greedy, temperature, top-k, top-p, min-p, repetition
//! penalty, seeded. The processors run in Hugging Face `generate`'s order: repetition penalty,
//! temperature, top-k, top-p, min-p.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

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

/// Samples tokens for one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Rows past this (vocab padding beyond the tokenizer) are never sampled.
    sample_rows: usize,
}

impl Sampler {
    /// A sampler over the first `sample_rows` logits rows.
    pub fn new(params: SamplingParams, sample_rows: usize) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Sampler { params, rng, sample_rows }
    }

    /// Picks the next token from `logits` (one row), given the tokens so far for the penalty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let n = self.sample_rows.min(logits.len());
        let mut logits = logits[..n].to_vec();
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; n];
            for &t in history {
                if let Some(s) = seen.get_mut(t as usize) {
                    if !*s {
                        *s = true;
                        let l = &mut logits[t as usize];
                        *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                    }
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(&logits);
        }
        // Candidates sorted by logit, descending; NaN logits sort last and never win.
        let mut cand: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, l / p.temperature)).collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&x| {
                    acc += x;
                    acc >= p.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let threshold = probs[0] * p.min_p;
            let keep = probs.iter().take_while(|&&x| x >= threshold).count().max(1);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, &x) in probs.iter().enumerate() {
            if r < x {
                return cand[i].0;
            }
            r -= x;
        }
        cand[probs.len() - 1].0
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
mod tests {
    use super::*;

    #[test]
    fn padded_rows_are_never_sampled_even_when_largest() {
        let mut logits = vec![0.0f32; 10];
        logits[8] = 100.0;
        logits[9] = 100.0;
        logits[3] = 1.0;
        let mut greedy = Sampler::new(SamplingParams::greedy(), 8);
        assert_eq!(greedy.sample(&logits, &[]), 3);
        let params = SamplingParams { temperature: 1.5, seed: Some(1), ..Default::default() };
        let mut s = Sampler::new(params, 8);
        for _ in 0..200 {
            assert!(s.sample(&logits, &[]) < 8);
        }
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.5f32, 2.0, 1.9, -1.0];
        for params in [
            SamplingParams { temperature: 1.0, top_k: 1, seed: Some(3), ..Default::default() },
            SamplingParams { temperature: 1.0, top_p: 1e-6, seed: Some(3), ..Default::default() },
            SamplingParams { temperature: 1.0, min_p: 0.999, seed: Some(3), ..Default::default() },
        ] {
            let mut s = Sampler::new(params, 4);
            for _ in 0..50 {
                assert_eq!(s.sample(&logits, &[]), 1);
            }
        }
    }

    #[test]
    fn same_seed_same_tokens_and_temperature_spreads() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { temperature: 1.0, seed: Some(seed), ..Default::default() }, 50);
            (0..100).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let distinct: std::collections::HashSet<_> = draw(7).into_iter().collect();
        assert!(distinct.len() > 10);
    }

    #[test]
    fn repetition_penalty_follows_hf_sign_rule() {
        // Token 0 (positive logit) is divided, token 1 (negative) multiplied: 2.0/4 = 0.5 < 1.0.
        let logits = [2.0f32, -0.1, 1.0];
        let p = SamplingParams { repetition_penalty: 4.0, ..Default::default() };
        assert_eq!(Sampler::new(p, 3).sample(&logits, &[0, 0, 1]), 2);
    }

    #[test]
    fn validation_names_the_parameter() {
        let bad = [
            (SamplingParams { temperature: -0.1, ..Default::default() }, "temperature"),
            (SamplingParams { temperature: f32::NAN, ..Default::default() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..Default::default() }, "top_p"),
            (SamplingParams { top_p: 1.5, ..Default::default() }, "top_p"),
            (SamplingParams { min_p: -1.0, ..Default::default() }, "min_p"),
            (SamplingParams { repetition_penalty: 0.0, ..Default::default() }, "repetition_penalty"),
        ];
        for (p, name) in bad {
            match p.validate() {
                Err(Error::Request { param, .. }) => assert_eq!(param, name),
                other => panic!("{name}: {other:?}"),
            }
        }
    }
}
