//! Verification of a draft model's sampled proposals against the target's distributions
//! (Leviathan et al. / Chen et al.'s `min(1, p/q)` rule, [`verify`]).
//!
//! `p` comes from the step's logits, which the scheduler asks the backend to return for such
//! sequences (`StepSampling::want_logits`, a host copy of the `k + 1` vocabulary rows of each):
//! each row goes through [`row_probs`] with the row's own sampling (temperature, top-k/p, min-p,
//! the penalty over the history and the draft before it) and grammar mask, the very rule its
//! token would be sampled by without speculation. The draws: acceptance at each position is the
//! sequence's keyed draw for that position ([`Sampler::accept_uniform`]); the correction or bonus
//! token takes the row's own draw, the one plain sampling would take there.

use std::ops::Range;

use crate::runtime::sampler::{row_probs, Sampler, StepSampling};
use crate::runtime::speculative::{verify, Draws, Verdict};
use crate::runtime::token_mask::TokenMasks;

/// One sequence's rows in a step's output, and what was proposed for them.
pub(super) struct Rows<'a> {
    /// Its sampled rows (indices into the step's sampled rows), `draft.len() + 1` of them.
    pub rows: Range<usize>,
    /// The draft fed after its last token.
    pub draft: &'a [u32],
    /// The distribution each draft token was drawn from (at least `draft.len()` rows).
    pub q: &'a [Vec<f32>],
    /// Where the first row's token goes in the sequence (its token count before the step).
    pub position: usize,
}

/// The verdict for `seq` from the step's `logits` (`width` columns per sampled row), or `None`
/// when they cannot give one (a row missing or not finite: the caller falls back to the
/// target's own picks, which report the non-finite row).
pub(super) fn verify_with_q(
    seq: &Rows<'_>,
    sampling: &StepSampling,
    logits: &[f32],
    width: usize,
    masks: Option<&TokenMasks>,
    sampler: &Sampler,
) -> Option<Verdict> {
    if seq.q.len() < seq.draft.len() || seq.rows.len() != seq.draft.len() + 1 {
        return None;
    }
    let mut p = Vec::with_capacity(seq.rows.len());
    let mut draws = Vec::with_capacity(seq.rows.len());
    for (j, r) in seq.rows.clone().enumerate() {
        let row = logits.get(r * width..(r + 1) * width)?;
        let s = sampling.per_row.get(r)?;
        p.push(row_probs(row, sampling.valid, s, masks.and_then(|m| m.row(r)))?);
        draws.push(Draws { accept: sampler.accept_uniform(seq.position + j), draw: s.uniform });
    }
    Some(verify(&p, Some(&seq.q[..seq.draft.len()]), seq.draft, &draws))
}
