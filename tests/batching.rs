//! Continuous batching changes nothing a request sees: 32 concurrent greedy requests of
//! different lengths each produce exactly what they produce alone — also when a tiny KV pool
//! forces preemption and recomputation, and with prefix caching on or off.

mod common;

use std::path::Path;
use std::thread;

use tulu::{ChatMessage, Engine, EngineOptions, Event, GenerateRequest, SamplingParams, Summary};

fn requests() -> Vec<GenerateRequest> {
    let topics = ["the sea", "mountains", "a cat", "Paris", "numbers", "the moon", "bread", "music"];
    (0..32)
        .map(|i| {
            let topic = topics[i % topics.len()];
            let words = "very ".repeat(i % 5);
            let msg = ChatMessage::new("user", format!("Write a {words}short line about {topic}."));
            let mut req = GenerateRequest::chat(vec![msg]).max_tokens(4 + i % 5);
            // Every fourth request samples, seeded, so that sampler state must survive preemption too.
            req.sampling = Some(if i % 4 == 3 {
                SamplingParams { temperature: 0.8, top_p: 0.9, seed: Some(i as u64), ..Default::default() }
            } else {
                SamplingParams::greedy()
            });
            req
        })
        .collect()
}

fn concurrently(engine: &Engine, reqs: &[GenerateRequest]) -> Vec<(String, Summary)> {
    thread::scope(|s| {
        let handles: Vec<_> = reqs.iter().map(|r| s.spawn(|| common::run(engine, r.clone()))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// An engine with `kv_blocks` blocks of 4 tokens (default pool when `None`).
fn engine(dir: &Path, kv_blocks: Option<u64>, prefix_caching: bool) -> Engine {
    let mut opts = EngineOptions::new(dir.to_string_lossy());
    let cfg = tulu::unstable::config::ModelConfig::from_file(&dir.join("config.json")).unwrap();
    if let Some(b) = kv_blocks {
        opts.block_size = 4;
        opts.kv_cache_memory = Some(b * 4 * cfg.kv_bytes_per_token(4));
    }
    opts.prefix_caching = prefix_caching;
    Engine::load(opts).unwrap()
}

#[test]
fn concurrent_requests_equal_each_alone_with_and_without_preemption() {
    let dir = common::smollm2_dir();
    let reqs = requests();
    let solo = engine(&dir, None, false);
    let alone: Vec<(String, Summary)> = reqs.iter().map(|r| common::run(&solo, r.clone())).collect();
    drop(solo);

    let roomy = engine(&dir, None, true);
    let together = concurrently(&roomy, &reqs);
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.1.tokens, t.1.tokens, "request {i}: concurrent tokens differ from alone");
        assert_eq!(a.0, t.0, "request {i}: text");
    }
    assert_eq!(roomy.metrics().preemptions, 0);
    drop(roomy);

    // 22 blocks of 4 tokens (88 slots) for 32 sequences of ~40–50 tokens: two fit, and
    // their growth across block boundaries preempts one of them again and again.
    let tight = engine(&dir, Some(22), true);
    let squeezed = common::run_all(&tight, &reqs);
    for (i, (a, t)) in alone.iter().zip(&squeezed).enumerate() {
        assert_eq!(a.1.tokens, t.1.tokens, "request {i}: tokens differ after preemption");
    }
    let m = tight.metrics();
    assert!(m.preemptions > 0, "the tiny pool must force preemption");
    assert_eq!((m.running, m.kv_blocks_used), (0, 0), "everything freed at the end");
}

#[test]
fn prefix_cache_serves_the_second_turn_and_changes_nothing() {
    let dir = common::smollm2_dir();
    let first = vec![ChatMessage::new("user", "Name three colours of the rainbow.")];
    let on = engine(&dir, None, true);
    let off = engine(&dir, None, false);
    let (answer, s1) = common::run(&on, GenerateRequest::chat(first.clone()).max_tokens(24));
    assert_eq!(s1.cached_prompt_tokens, 0);
    let mut second = first;
    second.push(ChatMessage::new("assistant", answer));
    second.push(ChatMessage::new("user", "And two more?"));
    let (t_on, s_on) = common::run(&on, GenerateRequest::chat(second.clone()).max_tokens(16));
    let (t_off, s_off) = common::run(&off, GenerateRequest::chat(second).max_tokens(16));
    assert!(s_on.cached_prompt_tokens >= 16, "the first turn's full blocks are reused: {}", s_on.cached_prompt_tokens);
    assert_eq!(s_off.cached_prompt_tokens, 0);
    assert_eq!((t_on, s_on.tokens), (t_off, s_off.tokens));
    assert!(on.metrics().prefix_hit_tokens >= 16);
}

#[test]
fn dropping_a_stream_aborts_and_frees_its_blocks() {
    let dir = common::tiny_dir();
    let e = engine(&dir, None, true);
    let mut req = GenerateRequest::tokens((1..40).collect()).max_tokens(400);
    req.ignore_eos = true;
    let mut g = e.generate(req).unwrap().into_iter();
    assert!(matches!(g.next(), Some(Ok(Event::Text(_)))));
    drop(g);
    let start = std::time::Instant::now();
    while e.metrics().kv_blocks_used != 0 || e.metrics().running != 0 {
        assert!(start.elapsed().as_secs() < 10, "aborted request still holds blocks: {:?}", e.metrics());
        thread::sleep(std::time::Duration::from_millis(20));
    }
}
