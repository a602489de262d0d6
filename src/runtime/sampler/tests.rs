//! The sampler's rules against direct computations of what they promise.

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

/// A NaN or infinite logit among the candidates flags the row instead of picking token 0
/// (NaN never compares greater); one past `valid` (padding) does not matter.
#[test]
fn non_finite_logits_flag_the_row() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        for s in [RowSampling::greedy(), RowSampling { temperature: 0.8, top_p: 0.9, ..RowSampling::greedy() }] {
            assert_eq!(sample_row(&[bad, 1.0, 2.0], 3, &s, None), NON_FINITE, "{bad} first");
            assert_eq!(sample_row(&[0.5, 3.0, bad], 3, &s, None), NON_FINITE, "{bad} last");
            assert_eq!(sample_row(&[0.5, 3.0, bad], 2, &s, None), 1, "{bad} past valid");
        }
    }
}

/// A mask leaves only its columns as candidates: the best disallowed logit is never picked,
/// the kept distribution renormalises over the allowed ones, and a NaN in a disallowed
/// column does not flag the row (one in an allowed column does).
#[test]
fn masked_columns_are_never_candidates() {
    // Probabilities 0.1, 0.2, 0.3, 0.4; the mask allows columns 0 and 2 only.
    let logits: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|x| x.ln()).collect();
    let mask = [0b0101u32];
    assert_eq!(sample_row(&logits, 4, &RowSampling::greedy(), Some(&mask)), 2);
    let base = RowSampling { temperature: 1.0, ..RowSampling::greedy() };
    let n = 10_000;
    let mut counts = [0usize; 4];
    for i in 0..n {
        let row = RowSampling { uniform: (i as f32 + 0.5) / n as f32, ..base.clone() };
        counts[sample_row(&logits, 4, &row, Some(&mask)) as usize] += 1;
    }
    let got: Vec<f64> = counts.iter().map(|&c| c as f64 / n as f64).collect();
    assert_freqs("masked", &got, &[0.25, 0.0, 0.75, 0.0]);
    let k1 = RowSampling { top_k: 1, ..base.clone() };
    assert_eq!(sample_row(&logits, 4, &k1, Some(&mask)), 2);
    let poisoned = [0.1f32, f32::NAN, 0.3, f32::INFINITY];
    // Greedy, and a draw high enough to pass token 0's mass.
    for s in [RowSampling::greedy(), RowSampling { uniform: 0.99, ..base.clone() }] {
        assert_eq!(sample_row(&poisoned, 4, &s, Some(&mask)), 2);
        assert_eq!(sample_row(&poisoned, 4, &s, Some(&[0b0011])), NON_FINITE);
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

/// Frequencies of each token over an even grid of draws.
fn frequencies(logits: &[f32], s: &RowSampling) -> Vec<f64> {
    let n = 10_000;
    let mut counts = vec![0usize; logits.len()];
    for i in 0..n {
        let row = RowSampling { uniform: (i as f32 + 0.5) / n as f32, ..s.clone() };
        counts[sample_row(logits, logits.len(), &row, None) as usize] += 1;
    }
    counts.into_iter().map(|c| c as f64 / n as f64).collect()
}

fn assert_freqs(what: &str, got: &[f64], want: &[f64]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() < 2e-3, "{what}: token {i} drawn {g:.4}, expected {w:.4} ({got:?})");
    }
}

#[test]
fn sample_row_draws_the_filtered_distribution() {
    // Probabilities 0.1, 0.2, 0.3, 0.4 at temperature 1.
    let logits: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|x| x.ln()).collect();
    let base = RowSampling { temperature: 1.0, ..RowSampling::greedy() };
    assert_freqs("plain", &frequencies(&logits, &base), &[0.1, 0.2, 0.3, 0.4]);
    let k2 = RowSampling { top_k: 2, ..base.clone() };
    assert_freqs("top-k 2", &frequencies(&logits, &k2), &[0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]);
    // 0.4 alone is short of 0.5; with 0.3 it is 0.7.
    let p5 = RowSampling { top_p: 0.5, ..base.clone() };
    assert_freqs("top-p 0.5", &frequencies(&logits, &p5), &[0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]);
    // Relative to the likeliest: 0.25, 0.5, 0.75, 1.
    let m6 = RowSampling { min_p: 0.6, ..base.clone() };
    assert_freqs("min-p 0.6", &frequencies(&logits, &m6), &[0.0, 0.0, 3.0 / 7.0, 4.0 / 7.0]);
    // Temperature 2 flattens: p ∝ sqrt(1, 2, 3, 4).
    let t2 = RowSampling { temperature: 2.0, ..base.clone() };
    let r: Vec<f64> = [1.0f64, 2.0, 3.0, 4.0].iter().map(|x| x.sqrt()).collect();
    let sum: f64 = r.iter().sum();
    assert_freqs("temperature 2", &frequencies(&logits, &t2), &r.iter().map(|x| x / sum).collect::<Vec<_>>());
    // Top-k keeps every token tied with the k-th, as HF does.
    let tied = [1.0f32, 1.0, 1.0, 0.0];
    let k1 = RowSampling { top_k: 1, ..base.clone() };
    assert_freqs("tied top-k 1", &frequencies(&tied, &k1), &[1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 0.0]);
    // The penalty divides a penalised positive logit (5 → 1.25 < 3) and multiplies a negative one.
    let pen = RowSampling { repetition_penalty: 4.0, penalized: vec![3, 1], ..RowSampling::greedy() };
    assert_eq!(sample_row(&[3.0, 2.9, -1.0, 5.0], 4, &pen, None), 0);
    let pen = RowSampling { penalized: vec![3, 0], ..pen };
    assert_eq!(sample_row(&[3.0, 2.9, -1.0, 5.0], 4, &pen, None), 1);
}

/// The partial-sort top-p threshold equals the one a full sort gives, ties included.
#[test]
fn top_p_threshold_matches_a_full_sort() {
    let mut rng = StdRng::seed_from_u64(5);
    for n in [1usize, 7, 300, 5000] {
        for _ in 0..20 {
            // Coarse values, so that ties are common.
            let p: Vec<f32> = (0..n).map(|_| (rng.random_range(0..40) as f32 / 40.0).powi(6)).collect();
            let total: u64 = p.iter().map(|&x| mass(x)).sum();
            for top_p in [0.01f32, 0.5, 0.9, 0.999, 1.0] {
                let goal = top_p_goal(total, top_p).max(1);
                let mut sorted = p.clone();
                sorted.sort_unstable_by(|a, b| b.total_cmp(a));
                let mut acc = 0u64;
                let want = sorted.iter().copied().find(|&x| {
                    acc += mass(x);
                    acc >= goal
                });
                if let Some(want) = want {
                    assert_eq!(top_p_threshold(p.clone(), goal), want, "n {n} top_p {top_p}");
                }
            }
        }
    }
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

/// The penalised ids grow with the history step by step and always equal its distinct
/// tokens sorted, as a full sort of the history gives them.
/// A speculative step's rows take the draws (and penalised ids) plain steps take, and
/// `advance` leaves the generator where plain steps leave it.
#[test]
fn draft_rows_take_the_draws_of_plain_steps() {
    let params = SamplingParams { temperature: 0.9, repetition_penalty: 1.3, seed: Some(5), ..Default::default() };
    let mut spec = Sampler::new(params.clone(), 100);
    let rows = spec.draft_rows(&[1, 2, 3], &[7, 8]);
    let mut plain = Sampler::new(params.clone(), 100);
    let plain_rows: Vec<RowSampling> =
        [&[1, 2, 3][..], &[1, 2, 3, 7], &[1, 2, 3, 7, 8]].iter().map(|h| plain.next_row(h)).collect();
    assert_eq!(rows, plain_rows);
    // The step emitted two tokens (7, then 5 instead of 8): two draws are used up.
    spec.advance(2);
    let mut plain = Sampler::new(params, 100);
    plain.next_row(&[1, 2, 3]);
    plain.next_row(&[1, 2, 3, 7]);
    assert_eq!(spec.next_row(&[1, 2, 3, 7, 5]), plain.next_row(&[1, 2, 3, 7, 5]));
}

#[test]
fn penalized_ids_follow_a_growing_history() {
    let params = SamplingParams { repetition_penalty: 1.3, seed: Some(1), ..SamplingParams::greedy() };
    let mut sampler = Sampler::new(params, 1000);
    let mut history: Vec<u32> = vec![7, 3, 7, 900];
    for step in 0..300u32 {
        let mut expected = history.clone();
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(sampler.next_row(&history).penalized, expected, "step {step}");
        history.push(step * 7919 % 997);
    }
    // Another, shorter history starts over.
    assert_eq!(sampler.next_row(&[5, 2, 5]).penalized, vec![2, 5]);
}

/// `row_probs` is the distribution `sample_row` draws from: over 200,000 evenly spaced draws,
/// each column is picked for its probability's share of them (within the grid's resolution),
/// with every transform on, a mask, and a padded column; a greedy row is one-hot at the argmax;
/// a non-finite candidate gives none.
#[test]
fn row_probs_is_what_sample_row_draws_from() {
    let logits = [1.0f32, 2.5, 0.3, 2.4, -1.0, 1.9, 2.2, 9.0];
    let mask = [0b0111_1111u32 & !0b100];
    let s = RowSampling {
        temperature: 0.7,
        top_k: 5,
        top_p: 0.95,
        min_p: 0.02,
        repetition_penalty: 1.3,
        uniform: 0.0,
        penalized: vec![1, 5],
    };
    let probs = row_probs(&logits, 7, &s, Some(&mask)).unwrap();
    assert_eq!(probs.len(), 7);
    assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-5, "{probs:?}");
    assert_eq!(probs[2], 0.0, "a masked column");
    let n = 200_000;
    let mut counts = [0usize; 8];
    for i in 0..n {
        let row = RowSampling { uniform: (i as f32 + 0.5) / n as f32, ..s.clone() };
        counts[sample_row(&logits, 7, &row, Some(&mask)) as usize] += 1;
    }
    for c in 0..7 {
        let share = counts[c] as f32 / n as f32;
        assert!((share - probs[c]).abs() < 1e-4, "column {c}: picked {share}, probability {}", probs[c]);
    }
    assert_eq!(counts[7], 0, "a padded column");
    assert_eq!(row_probs(&logits, 7, &RowSampling::greedy(), None).unwrap(), vec![0., 1., 0., 0., 0., 0., 0.]);
    assert_eq!(row_probs(&[1.0, f32::NAN], 2, &s, None), None);
}

/// A draft's draws depend only on the seed and the position: the same for the same seed
/// whatever was drawn before, different across positions and from the acceptance draws, and a
/// greedy sequence has no draft sampling.
#[test]
fn speculative_draws_are_keyed_by_seed_and_position() {
    let params = SamplingParams { temperature: 0.8, repetition_penalty: 1.1, seed: Some(9), ..Default::default() };
    let a = Sampler::new(params.clone(), 100);
    let mut b = Sampler::new(params, 100);
    b.sample(&[0.0; 100], &[]);
    let (da, db) = (a.draft_sampling().unwrap(), b.draft_sampling().unwrap());
    assert_eq!(da.row(&[1, 2, 3], &[4]), db.row(&[1, 2, 3], &[4]));
    assert_eq!(da.row(&[1, 2, 3], &[4]).penalized, vec![1, 2, 3, 4]);
    assert_ne!(da.row(&[1, 2, 3], &[4]).uniform, da.row(&[1, 2, 3], &[4, 5]).uniform);
    assert_eq!(a.accept_uniform(7), b.accept_uniform(7));
    assert_ne!(a.accept_uniform(7), a.accept_uniform(8));
    assert_ne!(a.accept_uniform(4), da.row(&[1, 2, 3], &[]).uniform);
    assert!(Sampler::new(SamplingParams::greedy(), 100).draft_sampling().is_none());
}
