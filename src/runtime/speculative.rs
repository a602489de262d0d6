//! Speculative decoding's host-side rules: the settings, the prompt-lookup proposer, and the
//! acceptance rules that keep the output distribution exactly the target's.
//!
//! The scheduler asks the proposer for a draft of up to `k` tokens for each decoding sequence
//! (prompt lookup here; a draft model's proposals are computed by the engine before the step
//! and handed to the scheduler), feeds the last token and the draft as `k + 1` rows of one
//! step, and every row is sampled by the backend's ordinary sampler with the sequence's own
//! parameters. Prompt lookup's drafts and greedy sequences' drafts are kept while they equal
//! those samples ([`verify_sampled`]: the point-mass rule, and the output is exactly the output
//! without speculation). A draft model's drafts for a sampled sequence are drawn from its
//! distribution `q` and kept by [`verify`] with `q` (the step returns the rows' logits, and the
//! target's `p` is computed on the host): more of them are kept (Σ min(p, q) per token instead of
//! Σ p·q), and the output has the target's distribution without being the tokens plain sampling
//! would draw with the same seed.
//!
//! Acceptance follows Leviathan et al. (2023) and Chen et al. (2023): draft token `d` drawn from
//! `q` is kept with probability `min(1, p(d) / q(d))`; at the first rejection the token is drawn
//! from `normalize(max(0, p − q))` and the rest of the draft is dropped; when every draft token
//! is kept, one more ("bonus") token is drawn from the target's distribution after the last. A
//! proposer without a distribution of its own (prompt lookup) is a point mass `q = δ(d)`: `d` is
//! kept with probability `p(d)`, and a rejection draws from `p` with `d` removed. `p` is the
//! target's distribution *after* the request's sampling transforms (temperature, top-k/p,
//! min-p, penalties, grammar mask); a greedy request keeps `d` exactly when it is the argmax.

/// Most draft tokens a step may propose per sequence (`--num-speculative-tokens`).
pub const MAX_SPECULATIVE_TOKENS: usize = 16;

/// Speculative decoding's settings: who proposes the drafts (`--speculative ngram` or
/// `--draft-model`), and in which steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Speculation {
    /// Who proposes each step's draft tokens.
    pub proposer: Proposer,
    /// Speculate only in steps where at most this many sequences run: each draft token is one
    /// more row of the step, nearly free while a step is bound by reading the weights (small
    /// batches) and a real cost once it is bound by compute (large ones).
    pub max_batch: usize,
}

/// Who proposes the draft tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Proposer {
    /// Prompt lookup (`--speculative ngram`): no second model.
    Ngram(NgramProposer),
    /// A draft model (`--draft-model`): a smaller checkpoint with the target's tokenizer, run
    /// for `k` autoregressive decode steps per round with its own KV cache, proposing its
    /// argmax at each for a greedy sequence and a draw from its distribution `q` (after the
    /// sequence's sampling transforms) for a sampled one (the engine's `draft.rs`).
    Draft {
        /// A local model directory or a Hugging Face repo id.
        model: String,
        /// Most tokens proposed per sequence and step.
        k: usize,
    },
}

impl Speculation {
    /// Prompt lookup proposing up to `k` tokens, matching 2- to 4-grams, in steps of at most
    /// 8 sequences.
    pub fn ngram(k: usize) -> Self {
        Speculation { proposer: Proposer::Ngram(NgramProposer { min_n: 2, max_n: 4, k }), max_batch: 8 }
    }

    /// The draft model `model` (a directory or repo id) proposing up to `k` tokens, in steps of
    /// at most 8 sequences.
    pub fn draft(model: impl Into<String>, k: usize) -> Self {
        Speculation { proposer: Proposer::Draft { model: model.into(), k }, max_batch: 8 }
    }

    /// Most tokens proposed per sequence and step.
    pub fn k(&self) -> usize {
        match &self.proposer {
            Proposer::Ngram(n) => n.k,
            Proposer::Draft { k, .. } => *k,
        }
    }

    /// The prompt-lookup proposer, when it is the one.
    pub fn ngram_proposer(&self) -> Option<&NgramProposer> {
        match &self.proposer {
            Proposer::Ngram(n) => Some(n),
            Proposer::Draft { .. } => None,
        }
    }

    /// The draft model's directory or repo id, when one proposes.
    pub fn draft_model(&self) -> Option<&str> {
        match &self.proposer {
            Proposer::Draft { model, .. } => Some(model),
            Proposer::Ngram(_) => None,
        }
    }

    /// Checks every setting's range, naming the first one out of it (the CLI's flag names).
    pub fn validate(&self) -> crate::error::Result<()> {
        use crate::error::Error;
        let k = self.k();
        if !(1..=MAX_SPECULATIVE_TOKENS).contains(&k) {
            let why = format!("must be between 1 and {MAX_SPECULATIVE_TOKENS}, got {k}");
            return Err(Error::request("num_speculative_tokens", why));
        }
        match &self.proposer {
            Proposer::Ngram(NgramProposer { min_n, max_n, .. }) => {
                if *min_n == 0 {
                    return Err(Error::request("ngram_min", "must be at least 1"));
                }
                if max_n < min_n {
                    let why = format!("must be at least ngram_min ({min_n}), got {max_n}");
                    return Err(Error::request("ngram_max", why));
                }
            }
            Proposer::Draft { model, .. } if model.is_empty() => {
                return Err(Error::request("draft_model", "is empty"));
            }
            Proposer::Draft { .. } => {}
        }
        if self.max_batch == 0 {
            return Err(Error::request("speculative_max_batch", "must be at least 1"));
        }
        Ok(())
    }
}

/// Proposes up to `k` tokens by prompt lookup: the tokens that followed the most recent earlier
/// occurrence of the history's last `n` tokens, for the longest `n` in `min_n..=max_n` that
/// occurs — no second model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NgramProposer {
    /// Shortest suffix matched.
    pub min_n: usize,
    /// Longest suffix matched.
    pub max_n: usize,
    /// Most tokens proposed.
    pub k: usize,
}

impl NgramProposer {
    /// The proposal for `history` (prompt and output so far); empty when no suffix recurs.
    pub fn propose(&self, history: &[u32]) -> Vec<u32> {
        let len = history.len();
        for n in (self.min_n.max(1)..=self.max_n).rev() {
            if n >= len {
                continue;
            }
            let suffix = &history[len - n..];
            // The most recent earlier occurrence: its continuation is the likeliest repeat.
            let found = (0..len - n).rev().find(|&start| &history[start..start + n] == suffix);
            if let Some(start) = found {
                let from = start + n;
                return history[from..(from + self.k).min(len)].to_vec();
            }
        }
        Vec::new()
    }
}

/// What one speculating sequence keeps from a verified step: the accepted draft tokens, then
/// the one token drawn by the target (the correction at the first rejection, or the bonus).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Every token the step emits, in order (at least one).
    pub tokens: Vec<u32>,
    /// How many of them are draft tokens kept.
    pub accepted: usize,
}

/// The two independent draws in `[0, 1)` that decide one position of a verified draft.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draws {
    /// Keeps the draft token when `accept · q(d) < p(d)`.
    pub accept: f32,
    /// Picks the correction after a rejection, or the bonus token.
    pub draw: f32,
}

/// Verifies `draft` against the target: `target[i]` is the target's distribution at draft
/// position `i` (`draft.len() + 1` rows, the last for the bonus), `proposal[i]` the draft's
/// distribution that `draft[i]` was drawn from (`None`: a point mass at it), and `draws[i]` the
/// position's draws (`draft.len() + 1` of them). Each row is a probability vector over the
/// vocabulary.
pub fn verify(target: &[Vec<f32>], proposal: Option<&[Vec<f32>]>, draft: &[u32], draws: &[Draws]) -> Verdict {
    debug_assert_eq!(target.len(), draft.len() + 1);
    debug_assert_eq!(draws.len(), draft.len() + 1);
    let mut tokens = Vec::with_capacity(draft.len() + 1);
    for (i, &d) in draft.iter().enumerate() {
        let p = &target[i];
        let pd = p.get(d as usize).copied().unwrap_or(0.0);
        let q = proposal.map(|rows| rows[i].as_slice());
        let qd = q.map_or(1.0, |q| q.get(d as usize).copied().unwrap_or(0.0));
        // Accept with probability min(1, p(d) / q(d)); a token the draft could not have drawn
        // (q(d) = 0) is never accepted.
        if qd > 0.0 && draws[i].accept * qd < pd {
            tokens.push(d);
            continue;
        }
        let residual: Vec<f32> = match q {
            Some(q) => p.iter().zip(q).map(|(&p, &q)| (p - q).max(0.0)).collect(),
            None => p.iter().enumerate().map(|(t, &p)| if t == d as usize { 0.0 } else { p }).collect(),
        };
        // p = q leaves nothing: the rejection had probability 0 in exact arithmetic.
        let u = draws[i].draw;
        let token = draw(&residual, u).unwrap_or_else(|| draw(p, u).unwrap_or(d));
        tokens.push(token);
        return Verdict { accepted: i, tokens };
    }
    let accepted = draft.len();
    tokens.push(draw(&target[accepted], draws[accepted].draw).unwrap_or(0));
    Verdict { tokens, accepted }
}

/// Verification of a proposer without a distribution (prompt lookup) by the target's own
/// draws: `sampled[i]` is the token the target's sampler picks at draft position `i`
/// (`draft.len() + 1` of them, each row with its own draw and the draft before it as context).
/// Draft tokens are kept while each equals the target's pick; the first pick that differs, or
/// the bonus pick after a fully kept draft, ends the step.
///
/// This is [`verify`]'s rule for `q = δ(d)`: the pick equals `d` with probability `p(d)`, and a
/// pick that differs is distributed as `p` without `d`, normalised — the residual. For a greedy
/// row the pick is the argmax, so the draft is kept exactly while it is the argmax. And because
/// row `i` is sampled with the `i`-th next draw of the sequence's generator, a seeded request
/// emits exactly the tokens it emits without speculation (the engine advances the generator by
/// the tokens emitted).
pub fn verify_sampled(sampled: &[u32], draft: &[u32]) -> Verdict {
    let accepted = draft.iter().zip(sampled).take_while(|(d, s)| d == s).count();
    let mut tokens = draft[..accepted].to_vec();
    tokens.extend(sampled.get(accepted).copied());
    Verdict { tokens, accepted }
}

/// The index whose cumulative (unnormalised) weight first passes `u` × the total; `None` when
/// every weight is zero.
fn draw(weights: &[f32], u: f32) -> Option<u32> {
    let total: f64 = weights.iter().map(|&w| w as f64).sum();
    if total <= 0.0 {
        return None;
    }
    let target = u as f64 * total;
    let mut run = 0.0;
    for (i, &w) in weights.iter().enumerate() {
        run += w as f64;
        if run > target && w > 0.0 {
            return Some(i as u32);
        }
    }
    weights.iter().rposition(|&w| w > 0.0).map(|i| i as u32)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn prompt_lookup_continues_the_latest_longest_match() {
        let ngram = NgramProposer { min_n: 1, max_n: 3, k: 3 };
        // "1 2 3" recurs at the end: what followed its latest earlier occurrence is proposed.
        assert_eq!(ngram.propose(&[1, 2, 3, 9, 8, 1, 2, 3, 7, 6, 5, 1, 2, 3]), vec![7, 6, 5]);
        // Only a 1-gram recurs; the proposal stops at the end of the history.
        assert_eq!(ngram.propose(&[4, 5, 6, 4]), vec![5, 6, 4]);
        assert_eq!(ngram.propose(&[4, 5, 6, 7]), Vec::<u32>::new());
        assert_eq!(NgramProposer { min_n: 2, max_n: 2, k: 2 }.propose(&[4, 5, 6, 4]), Vec::<u32>::new());
    }

    #[test]
    fn the_draft_is_kept_while_it_is_the_targets_pick() {
        assert_eq!(verify_sampled(&[5, 6, 7, 8], &[5, 6, 7]), Verdict { tokens: vec![5, 6, 7, 8], accepted: 3 });
        assert_eq!(verify_sampled(&[5, 9, 7, 8], &[5, 6, 7]), Verdict { tokens: vec![5, 9], accepted: 1 });
        assert_eq!(verify_sampled(&[4], &[]), Verdict { tokens: vec![4], accepted: 0 });
    }

    /// The engine's rule (each position sampled from the target given the draft before it,
    /// kept while it equals the draft) gives the target's joint distribution of the next two
    /// tokens, for a fixed draft that is often wrong. The target is a Markov chain over 4 tokens;
    /// 40,000 seeded trials; the 0.1 % critical value of chi-square with 15 degrees of freedom
    /// is 37.7.
    #[test]
    fn sampled_verification_keeps_the_joint_distribution() {
        // p[a][b]: the probability of b after a.
        let p = [[0.1f32, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]];
        let start = 2usize;
        let draft = [3u32, 0];
        let mut rng = StdRng::seed_from_u64(11);
        let mut counts = [0u64; 16];
        for _ in 0..40_000 {
            let mut u = || rng.random::<f32>();
            let mut out = Vec::new();
            let mut prev = start;
            while out.len() < 2 {
                // One verify step from `prev`: row i sampled with the draft before it as context.
                let mut ctx = prev;
                let mut sampled = Vec::new();
                for i in 0..=draft.len() {
                    sampled.push(draw(&p[ctx], u()).unwrap());
                    if let Some(&d) = draft.get(i) {
                        ctx = d as usize;
                    }
                }
                let v = verify_sampled(&sampled, &draft);
                out.extend(v.tokens);
                prev = *out.last().unwrap() as usize;
            }
            counts[out[0] as usize * 4 + out[1] as usize] += 1;
        }
        let exact: Vec<f32> = (0..16).map(|i| p[start][i / 4] * p[i / 4][i % 4]).collect();
        let x = chi_square(&counts, &exact);
        assert!(x < 37.7, "chi-square {x:.1}, counts {counts:?}");
    }

    /// Chi-square statistic of `counts` against `probs` × their total.
    fn chi_square(counts: &[u64], probs: &[f32]) -> f64 {
        let n: u64 = counts.iter().sum();
        counts
            .iter()
            .zip(probs)
            .filter(|(_, &p)| p > 0.0)
            .map(|(&c, &p)| {
                let e = n as f64 * p as f64;
                (c as f64 - e).powi(2) / e
            })
            .sum()
    }

    /// `n` positions' independent draws.
    fn draws(rng: &mut StdRng, n: usize) -> Vec<Draws> {
        (0..n).map(|_| Draws { accept: rng.random(), draw: rng.random() }).collect()
    }

    /// The first token a speculative step emits is distributed exactly as the target's,
    /// whatever the draft: a draft that disagrees often, drawn from its own distribution, and a
    /// point-mass proposer. 40,000 seeded trials on a 6-token vocabulary; the 0.1 % critical
    /// value of chi-square with 5 degrees of freedom is 20.5.
    #[test]
    fn sampled_output_is_distributed_as_the_target() {
        let p = vec![0.05f32, 0.30, 0.10, 0.25, 0.20, 0.10];
        let q = vec![0.40f32, 0.05, 0.05, 0.10, 0.10, 0.30];
        let mut rng = StdRng::seed_from_u64(7);
        let trials = 40_000;
        let mut with_draft_model = [0u64; 6];
        let mut with_point_mass = [0u64; 6];
        for _ in 0..trials {
            // The draft token drawn from q.
            let d = draw(&q, rng.random()).unwrap();
            let target = vec![p.clone(), p.clone()];
            let v = verify(&target, Some(std::slice::from_ref(&q)), &[d], &draws(&mut rng, 2));
            with_draft_model[v.tokens[0] as usize] += 1;
            // A fixed guess (prompt lookup): token 0, unlikely under p.
            let v = verify(&target, None, &[0], &draws(&mut rng, 2));
            with_point_mass[v.tokens[0] as usize] += 1;
        }
        let (a, b) = (chi_square(&with_draft_model, &p), chi_square(&with_point_mass, &p));
        assert!(a < 20.5, "draft model: chi-square {a:.1}, counts {with_draft_model:?}");
        assert!(b < 20.5, "point mass: chi-square {b:.1}, counts {with_point_mass:?}");
    }

    /// A draft model that disagrees with the target, each of its `k = 2` tokens drawn from its
    /// own distribution given the tokens before it, verified by `min(1, p/q)`: the first three
    /// tokens out (draft tokens kept, corrections, bonus tokens, over several steps) follow the
    /// target's joint distribution. Both are Markov chains over 4 tokens; 60,000 seeded trials;
    /// the 0.1 % critical value of chi-square with 63 degrees of freedom is 103.4.
    #[test]
    fn draft_model_verification_keeps_the_joint_distribution() {
        let p = [[0.1f32, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]];
        let q = [[0.4f32, 0.3, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7], [0.05, 0.05, 0.45, 0.45], [0.25, 0.25, 0.25, 0.25]];
        let start = 2usize;
        let mut rng = StdRng::seed_from_u64(13);
        let mut counts = [0u64; 64];
        for _ in 0..60_000 {
            let mut out: Vec<u32> = Vec::new();
            while out.len() < 3 {
                let mut ctx = out.last().map_or(start, |&t| t as usize);
                let (mut draft, mut target, mut proposal) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..2 {
                    let d = draw(&q[ctx], rng.random()).unwrap();
                    target.push(p[ctx].to_vec());
                    proposal.push(q[ctx].to_vec());
                    draft.push(d);
                    ctx = d as usize;
                }
                target.push(p[ctx].to_vec());
                let v = verify(&target, Some(&proposal), &draft, &draws(&mut rng, 3));
                out.extend(v.tokens);
            }
            counts[out[0] as usize * 16 + out[1] as usize * 4 + out[2] as usize] += 1;
        }
        let exact: Vec<f32> = (0..64).map(|i| p[start][i / 16] * p[i / 16][i / 4 % 4] * p[i / 4 % 4][i % 4]).collect();
        let x = chi_square(&counts, &exact);
        assert!(x < 103.4, "chi-square {x:.1}, counts {counts:?}");
    }

    /// With the draft's distribution, a draft token is kept with probability Σ min(p, q) (0.45
    /// here), the most any exact rule can keep; the point-mass rule keeps a draw from `q` only
    /// with probability Σ p·q (0.115). 40,000 seeded trials; 4.5 standard deviations of slack.
    #[test]
    fn the_draft_distribution_keeps_the_overlap_of_p_and_q() {
        let p = vec![0.05f32, 0.30, 0.10, 0.25, 0.20, 0.10];
        let q = vec![0.40f32, 0.05, 0.05, 0.10, 0.10, 0.30];
        let overlap: f64 = p.iter().zip(&q).map(|(&a, &b)| a.min(b) as f64).sum();
        let mut rng = StdRng::seed_from_u64(3);
        let trials = 40_000;
        let mut kept = 0;
        for _ in 0..trials {
            let d = draw(&q, rng.random()).unwrap();
            let target = vec![p.clone(), p.clone()];
            kept += verify(&target, Some(std::slice::from_ref(&q)), &[d], &draws(&mut rng, 2)).accepted;
        }
        let rate = kept as f64 / trials as f64;
        let slack = 4.5 * (overlap * (1.0 - overlap) / trials as f64).sqrt();
        assert!((rate - overlap).abs() < slack, "kept {rate:.4}, expected {overlap:.4}");
    }

    #[test]
    fn a_fully_accepted_draft_earns_a_bonus_token() {
        let one_hot = |t: usize| (0..4).map(|i| if i == t { 1.0 } else { 0.0 }).collect::<Vec<f32>>();
        let target = vec![one_hot(2), one_hot(1), one_hot(3)];
        let half = [Draws { accept: 0.5, draw: 0.5 }; 3];
        let v = verify(&target, None, &[2, 1], &half);
        assert_eq!(v, Verdict { tokens: vec![2, 1, 3], accepted: 2 });
        // A token the target gives no mass is rejected and replaced by one it does.
        let v = verify(&target, None, &[0, 1], &half);
        assert_eq!(v, Verdict { tokens: vec![2], accepted: 0 });
    }
}
