//! Speculative decoding by prompt lookup changes how fast tokens come, never which: greedy and
//! seeded sampled outputs equal the outputs without it, alone, batched with other requests and
//! under preemption, and the engine counts what it proposed and kept.

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
