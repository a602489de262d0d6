//! Speculative decoding by prompt lookup changes how fast tokens come, never which: greedy and
//! seeded sampled outputs equal the outputs without it, alone, batched with other requests and
//! under preemption, and the engine counts what it proposed and kept. A draft model's greedy
//! outputs equal plain decode too; its sampled outputs are distributed as plain sampling's
//! (`min(1, p/q)`), and a seeded one is reproducible.

mod common;

use tulu::{ChatMessage, Engine, EngineOptions, GenerateRequest, SamplingParams, Speculation, Summary};

/// An input-grounded task (repeat a text), where prompt lookup finds most of the answer.
const TEXT: &str = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. \
How vexingly quick daft zebras jump. The five boxing wizards jump quickly.";

fn engine(speculation: Option<Speculation>, kv_cache_memory: Option<u64>) -> Engine {
    let mut opts = EngineOptions::new(common::smollm2_dir().to_string_lossy().into_owned());
    opts.speculation = speculation;
    opts.kv_cache_memory = kv_cache_memory;
    opts.max_context = Some(512);
    Engine::load(opts).expect("SmolLM2 loads")
}

fn repeat(text: &str, sampling: SamplingParams, max_tokens: usize) -> GenerateRequest {
    let ask = format!("Repeat this text exactly, twice:\n\n{text}");
    GenerateRequest::chat(vec![ChatMessage::user(ask)]).sampling(sampling).max_tokens(max_tokens)
}

/// Runs each request with and without speculation (a per-request opt-out on the same engine)
/// and returns both runs' summaries.
fn both(engine: &Engine, reqs: &[GenerateRequest]) -> (Vec<Summary>, Vec<Summary>) {
    let off: Vec<GenerateRequest> = reqs.iter().cloned().map(|r| r.speculative(false)).collect();
    let on = common::run_all(engine, reqs).into_iter().map(|(_, s)| s).collect();
    let off = common::run_all(engine, &off).into_iter().map(|(_, s)| s).collect();
    (on, off)
}

fn assert_same_tokens(on: &[Summary], off: &[Summary]) {
    for (i, (a, b)) in on.iter().zip(off).enumerate() {
        assert_eq!(a.tokens, b.tokens, "request {i}: speculation changed the output");
        assert_eq!(a.finish_reason, b.finish_reason, "request {i}");
        assert_eq!(b.draft_tokens, 0, "request {i} opted out but speculated");
    }
}

#[test]
fn greedy_and_seeded_outputs_are_unchanged_and_drafts_are_kept() {
    let engine = engine(Some(Speculation::ngram(4)), None);
    let seeded = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        top_k: 40,
        repetition_penalty: 1.05,
        seed: Some(7),
        ..Default::default()
    };
    let reqs = [repeat(TEXT, SamplingParams::greedy(), 64), repeat(TEXT, seeded, 64)];
    for req in &reqs {
        let (on, off) = both(&engine, std::slice::from_ref(req));
        assert_same_tokens(&on, &off);
    }
    let (on, _) = both(&engine, &reqs[..1]);
    let s = &on[0];
    assert!(s.draft_tokens > 0, "nothing was proposed: {s:?}");
    assert!(s.accepted_draft_tokens * 4 >= s.draft_tokens, "under a quarter accepted on a repeat task: {s:?}");
    let m = engine.metrics();
    assert!(m.spec_verified_drafts > 0 && m.spec_accepted_tokens > 0, "{m:?}");
    assert!(m.acceptance_rate().is_some_and(|r| r > 0.0 && r <= 1.0), "{m:?}");
}

/// Several requests at once, some opted out, in a KV cache small enough that sequences are
/// preempted and recomputed: every output equals its output without speculation, and
/// `max_tokens` cuts exactly.
#[test]
fn batched_and_preempted_outputs_are_unchanged() {
    // 20 blocks of 16 tokens: room for about three of the six sequences at once.
    let config = tulu::ModelConfig::from_file(&common::smollm2_dir().join("config.json")).unwrap();
    let engine = engine(Some(Speculation::ngram(5)), Some(20 * 16 * config.kv_bytes_per_token(4)));
    let texts = [TEXT, "one two three four five six seven eight nine ten", "a b a b a b a b a b a b"];
    let reqs: Vec<GenerateRequest> = (0..6)
        .map(|i| {
            let mut req = repeat(texts[i % 3], SamplingParams::greedy(), 40 + i);
            // Every sequence grows to its max_tokens, past what the pool holds for all at once.
            req.ignore_eos = true;
            if i == 4 {
                req.speculative(false)
            } else {
                req
            }
        })
        .collect();
    let (on, off) = both(&engine, &reqs);
    assert_same_tokens(&on, &off);
    for (i, s) in on.iter().enumerate() {
        assert_eq!(s.tokens.len(), 40 + i, "request {i}: max_tokens not cut exactly");
    }
    assert_eq!(on[4].draft_tokens, 0, "the opted-out request speculated");
    let m = engine.metrics();
    assert!(m.preemptions > 0, "the cache was large enough that nothing was preempted: {m:?}");
    assert!(m.spec_accepted_tokens > 0, "{m:?}");
}

/// A JSON-schema constraint holds on every speculative row (each masked after its draft
/// prefix) and the output equals the constrained output without speculation.
#[test]
fn constrained_output_is_unchanged() {
    let engine = engine(Some(Speculation::ngram(4)), None);
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"words": {"type": "array", "items": {"type": "string"}, "maxItems": 12}},
        "required": ["words"]
    });
    let ask = format!("List the words of this text as JSON: {TEXT}");
    let req = GenerateRequest::chat(vec![ChatMessage::user(ask)])
        .sampling(SamplingParams::greedy())
        .max_tokens(80)
        .constrain(tulu::Constraint::JsonSchema(schema));
    let (on, off) = both(&engine, &[req]);
    assert_same_tokens(&on, &off);
    assert!(on[0].draft_tokens > 0, "nothing was proposed: {:?}", on[0]);
}

/// At tensor parallelism 2 (in-process ranks, a vocabulary whose shards are padded), verify
/// steps give the greedy tokens of plain decode at tp 1.
#[test]
fn tensor_parallel_speculation_matches_tp1() {
    let mut cfg = tulu::ModelConfig::preset("tiny").unwrap();
    cfg.vocab_size = 301;
    let dir = common::synth_dir("tiny-vocab301-f32", &cfg, tulu::unstable::weights::gguf::OutDType::F32, None);
    let phrase: Vec<u32> = (0..9).map(|i| (i * 37 + 11) % 290).collect();
    let prompt: Vec<u32> = phrase.iter().cycle().take(27).copied().collect();
    let greedy = |tp: usize, speculation: Option<Speculation>| {
        let mut opts = EngineOptions::new(dir.to_string_lossy().into_owned());
        opts.tp = tp;
        opts.speculation = speculation;
        let engine = Engine::load(opts).unwrap();
        let mut req = GenerateRequest::tokens(prompt.clone()).sampling(SamplingParams::greedy()).max_tokens(24);
        req.ignore_eos = true;
        common::run(&engine, req).1
    };
    let on = greedy(2, Some(Speculation::ngram(3)));
    let off = greedy(1, None);
    assert_eq!(on.tokens, off.tokens, "tp 2 with speculation against tp 1 without");
    assert!(on.draft_tokens > 0, "nothing was proposed: {on:?}");
}

/// The tiny preset's target and its drafts: the target itself, and the target cut to its first
/// layer with 16 more (padding) vocabulary rows — random weights depend only on the tensor and
/// the element's place, so that draft shares the target's embedding and first layer and agrees
/// with it only sometimes. Both drafts carry the target's tokenizer.json, byte for byte.
fn tiny_target_and_drafts() -> (std::path::PathBuf, std::path::PathBuf) {
    use tulu::unstable::weights::gguf::OutDType;
    let cfg = tulu::ModelConfig::preset("tiny").unwrap();
    let target = common::synth_dir("tiny-spec-target-f32", &cfg, OutDType::F32, None);
    let mut weak = cfg.clone();
    weak.num_hidden_layers = 1;
    weak.vocab_size += 16;
    let draft = common::synth_dir("tiny-spec-draft-f32", &weak, OutDType::F32, Some(target.join("tokenizer.json")));
    (target, draft)
}

/// A prompt of token ids and a request for it that runs to `max_tokens`.
fn tokens_request(sampling: SamplingParams, max_tokens: usize, salt: u32) -> GenerateRequest {
    let prompt: Vec<u32> = (0..20).map(|i| (i * 37 + 11 + salt * 53) % 290).collect();
    let mut req = GenerateRequest::tokens(prompt).sampling(sampling).max_tokens(max_tokens);
    req.ignore_eos = true;
    req
}

fn draft_engine(target: &std::path::Path, draft: &std::path::Path, tp: usize, kv: Option<u64>) -> Engine {
    let mut opts = EngineOptions::new(target.to_string_lossy().into_owned());
    opts.speculation = Some(Speculation::draft(draft.to_string_lossy(), 4));
    opts.tp = tp;
    opts.kv_cache_memory = kv;
    Engine::load(opts).expect("target and draft load")
}

/// With a draft model, greedy outputs equal plain decode: with the target itself as its draft
/// (every draft token kept) and with a weaker draft of another vocabulary size (drafts rejected
/// too), several requests batched together.
#[test]
fn draft_model_greedy_outputs_equal_plain_decode() {
    let (target, weak) = tiny_target_and_drafts();
    let reqs: Vec<GenerateRequest> = (0..3).map(|i| tokens_request(SamplingParams::greedy(), 32, i)).collect();
    // The target as its own draft: greedy drafts are the target's argmax, all kept.
    let engine = draft_engine(&target, &target, 1, None);
    let (on, off) = both(&engine, &reqs);
    assert_same_tokens(&on, &off);
    let greedy = &on[0];
    assert!(greedy.draft_tokens > 0, "nothing was proposed: {greedy:?}");
    assert_eq!(greedy.accepted_draft_tokens, greedy.draft_tokens, "the target rejected its own argmax");
    drop(engine);
    // A weaker draft: some drafts rejected, the output still the target's.
    let engine = draft_engine(&target, &weak, 1, None);
    let (on, off) = both(&engine, &reqs);
    assert_same_tokens(&on, &off);
    let m = engine.metrics();
    assert!(m.spec_draft_tokens > m.spec_accepted_tokens, "no draft token was rejected: {m:?}");
}

/// A sampled request's draft is drawn from the draft model's distribution `q` and kept by
/// `min(1, p/q)`: with the target itself as its draft (p = q) every draft token is kept (the
/// point-mass rule would keep a draw only with probability Σ p²); and a seeded request's
/// output is reproducible, alone or batched with other requests (its draws are keyed by seed
/// and position).
#[test]
fn draft_model_sampling_keeps_what_p_equals_and_is_reproducible() {
    let (target, weak) = tiny_target_and_drafts();
    let seeded =
        SamplingParams { temperature: 0.8, top_k: 50, repetition_penalty: 1.1, seed: Some(5), ..Default::default() };
    let engine = draft_engine(&target, &target, 1, None);
    let s = common::run(&engine, tokens_request(seeded.clone(), 32, 0)).1;
    assert!(s.draft_tokens > 0, "nothing was proposed: {s:?}");
    // p and q are computed by two forward passes of different shapes: allow for rounding.
    assert!(s.accepted_draft_tokens * 100 >= s.draft_tokens * 98, "the target rejected its own draws: {s:?}");
    drop(engine);
    let engine = draft_engine(&target, &weak, 1, None);
    let alone = common::run(&engine, tokens_request(seeded.clone(), 32, 0)).1;
    let again = common::run(&engine, tokens_request(seeded.clone(), 32, 0)).1;
    let other = SamplingParams { seed: Some(6), ..seeded.clone() };
    let batch =
        [tokens_request(other, 32, 1), tokens_request(seeded, 32, 0), tokens_request(SamplingParams::greedy(), 20, 2)];
    let batched = common::run_all(&engine, &batch).remove(1).1;
    assert_eq!(alone.tokens, again.tokens, "the same seed gave another output");
    assert_eq!(alone.tokens, batched.tokens, "batching neighbours changed a seeded output");
    assert!(alone.draft_tokens > alone.accepted_draft_tokens, "no draft was rejected: {alone:?}");
}

/// The output of sampled requests verified by `min(1, p/q)` is distributed as plain sampling's:
/// the first three tokens of 1,500 seeded requests with a weak draft (top-k 3, so that at most
/// 27 outcomes) against 1,500 without speculation, by a two-sample chi-square test; the 0.1 %
/// critical value with 26 degrees of freedom is 54.1. The weak draft's top 3 rarely overlap
/// the target's (about 3 % of draft tokens kept), so this checks the path end to end (rows,
/// residuals, bonus tokens) more than the acceptance rule itself, which the unit tests of
/// `runtime/speculative.rs` pin down (a rule ignoring `q` passed here, and failed there).
#[test]
fn draft_model_sampling_is_distributed_as_plain_sampling() {
    let (target, weak) = tiny_target_and_drafts();
    let mut opts = EngineOptions::new(target.to_string_lossy().into_owned());
    // Speculate in every step, however many sequences run.
    opts.speculation = Some(Speculation { max_batch: usize::MAX, ..Speculation::draft(weak.to_string_lossy(), 3) });
    let engine = Engine::load(opts).expect("target and draft load");
    let n = 1500;
    let reqs: Vec<GenerateRequest> = (0..n)
        .map(|seed| {
            let sampling = SamplingParams { temperature: 1.0, top_k: 3, seed: Some(seed), ..Default::default() };
            tokens_request(sampling, 3, 0)
        })
        .collect();
    let (on, off) = both(&engine, &reqs);
    let mut counts: std::collections::BTreeMap<Vec<u32>, (u64, u64)> = Default::default();
    for s in &on {
        counts.entry(s.tokens.clone()).or_default().0 += 1;
    }
    for s in &off {
        counts.entry(s.tokens.clone()).or_default().1 += 1;
    }
    let x: f64 = counts.values().map(|&(a, b)| (a as f64 - b as f64).powi(2) / (a + b) as f64).sum();
    assert!(counts.len() <= 27, "{} outcomes", counts.len());
    assert!(x < 54.1, "chi-square {x:.1} over {} outcomes: {counts:?}", counts.len());
    let m = engine.metrics();
    assert!(m.spec_draft_tokens > m.spec_accepted_tokens && m.spec_accepted_tokens > 0, "{m:?}");
}

/// A sampled request with a draft model under a JSON-schema constraint: the target's `p` rows
/// carry the grammar masks (the draft's `q` does not), so every emitted token follows the
/// grammar and the output is the schema's JSON.
#[test]
fn draft_model_sampling_follows_a_grammar() {
    let dir = common::smollm2_dir();
    let mut opts = EngineOptions::new(dir.to_string_lossy().into_owned());
    opts.speculation = Some(Speculation::draft(dir.to_string_lossy(), 4));
    opts.max_context = Some(512);
    let engine = Engine::load(opts).expect("SmolLM2 and its draft load");
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"words": {"type": "array", "items": {"type": "string"}, "maxItems": 6}},
        "required": ["words"]
    });
    let sampling = SamplingParams { temperature: 0.8, seed: Some(3), ..Default::default() };
    let req =
        GenerateRequest::chat(vec![ChatMessage::user(format!("List the first words of this text as JSON: {TEXT}"))])
            .sampling(sampling)
            .max_tokens(60)
            .constrain(tulu::Constraint::JsonSchema(schema));
    let (text, s) = common::run(&engine, req);
    assert!(s.draft_tokens > 0 && s.accepted_draft_tokens > 0, "{s:?}");
    if s.finish_reason == tulu::FinishReason::Stop {
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(v["words"].is_array(), "{text}");
    }
}

/// A KV cache small enough that sequences are preempted (their draft state dropped and rebuilt)
/// and a tensor-parallel target (tp 2; the draft on rank 0's device): outputs equal plain decode.
#[test]
fn draft_model_under_preemption_and_tensor_parallelism() {
    let (target, weak) = tiny_target_and_drafts();
    let cfg = tulu::ModelConfig::from_file(&target.join("config.json")).unwrap();
    let draft_cfg = tulu::ModelConfig::from_file(&weak.join("config.json")).unwrap();
    // 10 blocks of 16 tokens for each model: six sequences of 20 + 40 tokens cannot all fit.
    let per_token = cfg.kv_bytes_per_token(4) + draft_cfg.kv_bytes_per_token(4);
    let engine = draft_engine(&target, &weak, 1, Some(10 * 16 * per_token));
    let reqs: Vec<GenerateRequest> = (0..6).map(|i| tokens_request(SamplingParams::greedy(), 40, i)).collect();
    let (on, off) = both(&engine, &reqs);
    assert_same_tokens(&on, &off);
    let m = engine.metrics();
    assert!(m.preemptions > 0, "nothing was preempted: {m:?}");
    assert!(m.spec_draft_tokens > 0, "{m:?}");
    drop(engine);
    let engine = draft_engine(&target, &target, 2, None);
    let on = common::run(&engine, tokens_request(SamplingParams::greedy(), 24, 9)).1;
    let plain = Engine::load(EngineOptions::new(target.to_string_lossy().into_owned())).unwrap();
    let off = common::run(&plain, tokens_request(SamplingParams::greedy(), 24, 9)).1;
    assert_eq!(on.tokens, off.tokens, "tp 2 with a draft against tp 1 without");
    assert!(on.accepted_draft_tokens > 0, "{on:?}");
}

/// A draft whose tokenizer is not the target's is refused before any weight loads, naming both
/// tokenizer files.
#[test]
fn a_draft_with_another_tokenizer_is_refused_naming_both_files() {
    use tulu::unstable::weights::gguf::OutDType;
    let (target, _) = tiny_target_and_drafts();
    let mut other = tulu::ModelConfig::preset("tiny").unwrap();
    other.eos_token_ids = vec![3];
    let other = common::synth_dir("tiny-spec-other-tokenizer-f32", &other, OutDType::F32, None);
    let mut opts = EngineOptions::new(target.to_string_lossy().into_owned());
    opts.speculation = Some(Speculation::draft(other.to_string_lossy(), 4));
    let err = Engine::load(opts).err().expect("a draft with another tokenizer is refused").to_string();
    for file in [target.join("tokenizer.json"), other.join("tokenizer.json")] {
        assert!(err.contains(&*file.to_string_lossy()), "{file:?} not named: {err}");
    }
}
