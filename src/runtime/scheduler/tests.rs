use super::*;
use crate::runtime::sampler::SamplingParams;

fn sched(blocks: usize, max_seqs: usize, budget: usize) -> Scheduler {
    let cfg = SchedulerConfig {
        max_num_seqs: max_seqs,
        max_num_batched_tokens: budget,
        sampled_columns: 1000,
        max_positions: usize::MAX,
        speculation: None,
    };
    Scheduler::new(cfg, BlockManager::new(blocks, 4, true))
}

fn add(s: &mut Scheduler, id: SeqId, tokens: Vec<u32>) {
    s.add(id, tokens, Sampler::new(SamplingParams::greedy(), 1000), false);
}

/// Runs a planned step: records it and returns the sequences it samples.
fn run(s: &mut Scheduler, step: &Step) -> Vec<SeqId> {
    s.complete(step);
    step.sampled.clone()
}

#[test]
fn prompts_are_chunked_under_the_token_budget_and_decodes_go_first() {
    let mut s = sched(16, 8, 6);
    add(&mut s, 1, (0..10).collect());
    let p = s.schedule().unwrap();
    assert_eq!(p.entries, vec![(1, 6)]);
    assert!(run(&mut s, &p).is_empty(), "a partial prompt samples nothing");
    add(&mut s, 2, (100..103).collect());
    let p = s.schedule().unwrap();
    assert_eq!(p.entries, vec![(1, 4), (2, 2)]);
    assert_eq!(run(&mut s, &p), vec![1]);
    s.push_token(1, 42).expect("no grammar");
    let p = s.schedule().unwrap();
    assert_eq!(p.entries, vec![(1, 1), (2, 1)]);
    assert_eq!(run(&mut s, &p), vec![1, 2]);
}

/// The step carries its sampled rows (each sequence's last, once all its tokens are
/// computed), each with its own sequence's parameters and draw, and whether logits return.
#[test]
fn the_step_names_its_sampled_rows_and_their_sampling() {
    let mut s = sched(16, 8, 100);
    add(&mut s, 1, vec![1, 2, 3]);
    let hot = SamplingParams { temperature: 0.7, top_k: 5, seed: Some(3), ..Default::default() };
    s.add(2, vec![4, 5], Sampler::new(hot.clone(), 1000), true);
    let p = s.schedule().unwrap();
    assert_eq!(p.batch.num_tokens(), 5);
    assert_eq!((p.sampling.rows.clone(), p.sampled.clone()), (vec![2, 4], vec![1, 2]));
    assert_eq!(p.sampling.valid, 1000);
    assert!(p.sampling.want_logits);
    assert_eq!(p.sampling.per_row[0], crate::runtime::sampler::RowSampling::greedy());
    let mut same = Sampler::new(hot, 1000);
    assert_eq!(p.sampling.per_row[1], same.next_row(&[4, 5]));
    assert_eq!(p.admitted, vec![(1, 0), (2, 0)]);
}

#[test]
fn max_num_seqs_caps_the_running_set() {
    let mut s = sched(16, 2, 100);
    for id in 0..3 {
        add(&mut s, id, vec![1, 2, 3]);
    }
    let p = s.schedule().unwrap();
    assert_eq!(p.entries.len(), 2);
    assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
}

#[test]
fn running_out_of_blocks_preempts_the_newest_and_it_comes_back() {
    // 3 blocks of 4: two sequences of 4 tokens fill two blocks; growth needs more.
    let mut s = sched(3, 8, 100);
    add(&mut s, 1, vec![1, 2, 3, 4]);
    add(&mut s, 2, vec![5, 6, 7, 8]);
    let p = s.schedule().unwrap();
    assert_eq!(run(&mut s, &p), vec![1, 2]);
    s.push_token(1, 9).expect("no grammar");
    s.push_token(2, 10).expect("no grammar");
    // Sequence 1 takes the third block; sequence 2 cannot grow and is preempted.
    let p = s.schedule().unwrap();
    assert_eq!(p.entries, vec![(1, 1)]);
    assert_eq!(p.preempted, vec![2]);
    s.complete(&p);
    s.remove(1);
    // Recomputed from the prefix cache: its first full block is still cached.
    let p = s.schedule().unwrap();
    assert_eq!(p.entries, vec![(2, 1)]);
    assert_eq!(p.admitted, vec![(2, 4)]);
    assert_eq!(s.get(2).unwrap().computed, 4);
}

/// A prompt found whole in the prefix cache (it ends on a block boundary) still computes its
/// last block in a block of its own: its last token is always computed, and its K/V must
/// not be written into a block other sequences share.
#[test]
fn a_fully_cached_prompt_computes_its_last_block_in_a_block_of_its_own() {
    let mut s = sched(16, 8, 100);
    let prompt: Vec<u32> = (0..8).collect();
    add(&mut s, 1, prompt.clone());
    let p = s.schedule().unwrap();
    assert_eq!(run(&mut s, &p), vec![1]);
    s.push_token(1, 42).expect("no grammar");
    add(&mut s, 2, prompt.clone());
    add(&mut s, 3, prompt);
    let p = s.schedule().unwrap();
    assert_eq!(p.entries, vec![(1, 1), (2, 4), (3, 4)], "the first block is cached, the last recomputed");
    let table = |id| s.get(id).unwrap().block_table.clone();
    let (t1, t2, t3) = (table(1), table(2), table(3));
    assert_eq!((t2[0], t3[0]), (t1[0], t1[0]), "the first block is shared");
    assert!(t2[1] != t1[1] && t3[1] != t1[1] && t2[1] != t3[1], "{t1:?} {t2:?} {t3:?}");
}

/// A decoding sequence with a recurring n-gram feeds its last token and the draft, samples
/// every row, and keeps only what `settle_draft` says; a draft never passes the context.
#[test]
fn a_speculating_sequence_feeds_its_draft_and_keeps_what_is_settled() {
    let cfg = SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 100,
        sampled_columns: 1000,
        max_positions: 12,
        speculation: Some(Speculation::ngram(3)),
    };
    let mut s = Scheduler::new(cfg, BlockManager::new(16, 4, true));
    add(&mut s, 1, vec![5, 6, 7, 8, 5, 6]);
    let p = s.schedule().unwrap();
    assert_eq!(run(&mut s, &p), vec![1], "a prompt step does not speculate");
    s.push_token(1, 7).expect("no grammar");
    // "5 6 7" recurs: the draft is what followed it, "8 5 6".
    let p = s.schedule().unwrap();
    assert_eq!((p.entries.clone(), p.drafts.clone()), (vec![(1, 4)], vec![vec![8, 5, 6]]));
    assert_eq!(p.batch.token_ids, vec![7, 8, 5, 6]);
    assert_eq!(p.batch.positions, vec![6, 7, 8, 9]);
    assert_eq!((p.sampling.rows.clone(), p.sampled.clone()), (vec![0, 1, 2, 3], vec![1; 4]));
    s.complete(&p);
    assert_eq!(s.get(1).unwrap().computed, 6, "a draft entry waits for settle_draft");
    // Two draft tokens kept, then a correction: 7 8 5 stay computed.
    for t in [8, 5, 9] {
        s.push_token(1, t).expect("no grammar");
    }
    s.settle_draft(1, 3);
    assert_eq!(s.get(1).unwrap().computed, 9);
    // Ten tokens, nine computed: a draft may only take position 11 of 12.
    let p = s.schedule().unwrap();
    assert!(p.drafts[0].len() <= 1, "{:?}", p.drafts);
    assert_eq!(p.batch.positions.last().copied(), Some(9 + p.drafts[0].len() as u32));
}

/// A draft rejected whole pauses the sequence's speculation for two steps (then four, …);
/// an accepted token resets it.
#[test]
fn a_draft_rejected_whole_pauses_speculation() {
    let spec = Speculation {
        proposer: Proposer::Ngram(crate::runtime::speculative::NgramProposer { min_n: 1, max_n: 4, k: 2 }),
        max_batch: 8,
    };
    let cfg = SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 100,
        sampled_columns: 1000,
        max_positions: 1000,
        speculation: Some(spec),
    };
    let mut s = Scheduler::new(cfg, BlockManager::new(64, 4, true));
    add(&mut s, 1, vec![1, 2, 3, 1, 2]);
    let p = s.schedule().unwrap();
    run(&mut s, &p);
    s.push_token(1, 3).expect("no grammar");
    let mut drafted = Vec::new();
    for _ in 0..4 {
        let p = s.schedule().unwrap();
        s.complete(&p);
        drafted.push(!p.drafts[0].is_empty());
        // Every token the same: "3" always recurs, so there is always a proposal.
        s.push_token(1, 3).expect("no grammar");
        if !p.drafts[0].is_empty() {
            s.settle_draft(1, 1);
        }
    }
    assert_eq!(drafted, vec![true, false, false, true]);
}

/// A sequence that alone does not fit the pool is refused (only it), never a hang, and the
/// next one still runs.
#[test]
fn a_sequence_too_large_for_the_pool_is_refused_alone() {
    let mut s = sched(1, 8, 100);
    add(&mut s, 1, (0..9).collect());
    add(&mut s, 2, (0..3).collect());
    let p = s.schedule().unwrap();
    assert_eq!(p.refused.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1]);
    assert!(p.refused[0].1.to_string().contains("does not fit"), "{}", p.refused[0].1);
    assert_eq!(p.entries, vec![(2, 3)]);
    assert!(s.get(1).is_none());
}

/// A scheduler whose drafts come from a draft model proposing up to `k` tokens.
fn draft_sched(k: usize, max_batch: usize, budget: usize, max_positions: usize) -> Scheduler {
    let cfg = SchedulerConfig {
        max_num_seqs: 16,
        max_num_batched_tokens: budget,
        sampled_columns: 1000,
        max_positions,
        speculation: Some(Speculation { max_batch, ..Speculation::draft("draft", k) }),
    };
    Scheduler::new(cfg, BlockManager::new(64, 4, true))
}

/// Adds the sequences and runs their prompt step, each then given token 42, so that all
/// decode next.
fn start(s: &mut Scheduler, seqs: Vec<(SeqId, Vec<u32>, SamplingParams)>) {
    let ids: Vec<SeqId> = seqs.iter().map(|q| q.0).collect();
    for (id, tokens, params) in seqs {
        s.add(id, tokens, Sampler::new(params, 1000), false);
    }
    let p = s.schedule().unwrap();
    assert_eq!(run(s, &p), ids);
    for id in ids {
        s.push_token(id, 42).expect("no grammar");
    }
}

/// The draft model is asked for exactly the sequences that will decode and may speculate: not
/// one still prefilling, not one opted out, not one paused after a draft rejected whole, none
/// in a step above `max_batch`; `k` is cut so that the draft never passes the context, and a
/// sampled sequence carries its sampling (a greedy one none).
#[test]
fn the_draft_model_is_asked_for_decoding_sequences_that_may_speculate() {
    let mut s = draft_sched(4, 3, 100, 9);
    let seeded = SamplingParams { temperature: 0.8, seed: Some(3), ..Default::default() };
    let greedy = SamplingParams::greedy();
    start(
        &mut s,
        vec![(1, vec![1, 2, 3], greedy.clone()), (2, vec![1, 2, 3, 4, 5, 6], seeded), (3, vec![7, 8], greedy)],
    );
    s.disable_speculation(3);
    let wants = s.draft_wants();
    let got: Vec<(SeqId, usize, bool)> = wants.iter().map(|w| (w.id, w.k, w.sampling.is_some())).collect();
    // Sequence 2 has 6 of 9 positions computed: its last token and at most 2 drafts fit.
    assert_eq!(got, vec![(1, 4, false), (2, 2, true)]);
    assert_eq!(wants[0].tokens, &[1, 2, 3, 42]);
    // A sequence still prefilling is not asked for; a fourth running sequence passes max_batch.
    s.add(4, (0..30).collect(), Sampler::new(SamplingParams::greedy(), 1000), false);
    let mut tight = draft_sched(4, 3, 8, 100);
    start(&mut tight, vec![(1, vec![1, 2, 3], SamplingParams::greedy())]);
    tight.add(2, (0..30).collect(), Sampler::new(SamplingParams::greedy(), 1000), false);
    let p = tight.schedule().unwrap();
    run(&mut tight, &p);
    tight.push_token(1, 9).expect("no grammar");
    assert_eq!(tight.draft_wants().iter().map(|w| w.id).collect::<Vec<_>>(), vec![1], "a prefilling sequence");
    let p = s.schedule().unwrap();
    run(&mut s, &p);
    assert!(s.draft_wants().is_empty(), "four running sequences, max_batch 3");
}

/// Proposals handed over by `set_proposals` become the next step's drafts, cut to the token
/// budget; a proposal for a sequence not in the step is dropped, not kept for a later one; and
/// a sequence whose draft was rejected whole is not asked again until its pause ends.
#[test]
fn proposals_become_the_next_steps_drafts_cut_to_the_budget() {
    let mut s = draft_sched(4, 8, 5, 100);
    start(&mut s, vec![(1, vec![1, 2, 3], SamplingParams::greedy())]);
    s.set_proposals(HashMap::from([(1, vec![10, 11, 12, 13]), (7, vec![5])]));
    let p = s.schedule().unwrap();
    // A budget of 5 rows: the last token and four drafts.
    assert_eq!((p.entries.clone(), p.drafts.clone()), (vec![(1, 5)], vec![vec![10, 11, 12, 13]]));
    assert_eq!(p.batch.token_ids, vec![42, 10, 11, 12, 13]);
    s.complete(&p);
    s.push_token(1, 99).expect("no grammar");
    s.settle_draft(1, 1);
    // Rejected whole: paused, so not asked; a stale proposal is not used.
    assert!(s.draft_wants().is_empty());
    let p = s.schedule().unwrap();
    assert_eq!(p.drafts, vec![Vec::<u32>::new()], "a paused sequence took a draft");
    run(&mut s, &p);
    s.push_token(1, 98).expect("no grammar");
    // A budget of 3 cuts a proposal of 4 to 2.
    let mut small = draft_sched(4, 8, 3, 100);
    start(&mut small, vec![(1, vec![1, 2, 3], SamplingParams::greedy())]);
    small.set_proposals(HashMap::from([(1, vec![10, 11, 12, 13])]));
    let p = small.schedule().unwrap();
    assert_eq!(p.drafts, vec![vec![10, 11]]);
    // Proposals are for one step: the next one, without new proposals, has no draft.
    small.complete(&p);
    small.push_token(1, 10).expect("no grammar");
    small.push_token(1, 11).expect("no grammar");
    small.settle_draft(1, 2);
    let p = small.schedule().unwrap();
    assert_eq!(p.drafts, vec![Vec::<u32>::new()]);
}

/// A sampled sequence's draft-model verify step returns its rows' logits (its `p` is computed
/// on the host); a greedy one's does not.
#[test]
fn a_sampled_draft_asks_for_the_rows_logits() {
    for (params, want) in
        [(SamplingParams::greedy(), false), (SamplingParams { temperature: 0.8, ..Default::default() }, true)]
    {
        let mut s = draft_sched(2, 8, 100, 100);
        start(&mut s, vec![(1, vec![1, 2, 3], params)]);
        s.set_proposals(HashMap::from([(1, vec![10, 11])]));
        let p = s.schedule().unwrap();
        assert_eq!(p.drafts, vec![vec![10, 11]]);
        assert_eq!(p.sampling.want_logits, want);
    }
}
