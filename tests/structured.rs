//! Structured outputs end to end on SmolLM2: constrained and free requests batched together give
//! each what it gives alone (also when a tiny KV pool preempts them), greedy constrained output
//! is deterministic and matches its constraint, a constraint that does not compile names its
//! parameter; and `tulu serve` driven by the `openai` Python client returns JSON that the
//! `jsonschema` package validates and tool calls (tests/openai_structured.py).

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::json;
use tulu::{ChatMessage, Constraint, Engine, EngineOptions, Error, FinishReason, GenerateRequest, SamplingParams};

fn person_schema() -> serde_json::Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 2}
        },
        "required": ["name", "age", "pets"],
        "additionalProperties": false
    })
}

fn ask(question: &str) -> GenerateRequest {
    GenerateRequest::chat(vec![ChatMessage::new("user", question)])
}

/// Constrained requests of every kind, one sampled, and free ones between them.
fn requests() -> Vec<GenerateRequest> {
    let sampled = SamplingParams { temperature: 0.9, seed: Some(5), ..Default::default() };
    vec![
        ask("Describe a person as JSON.").constrain(Constraint::JsonSchema(person_schema())).max_tokens(40),
        ask("Write a short line about the sea.").max_tokens(12),
        ask("Is the sky blue? Answer yes or no.").constrain(Constraint::Choice(vec!["yes".into(), "no".into()])),
        ask("Give me a number.").constrain(Constraint::Regex("[0-9]{3}-[a-c]{2}".into())).max_tokens(20),
        ask("Describe a cat owner.")
            .constrain(Constraint::JsonSchema(person_schema()))
            .sampling(sampled.clone())
            .max_tokens(40),
        ask("Name a colour.").sampling(sampled).max_tokens(8),
        ask("Any JSON object, please.").constrain(Constraint::JsonObject).max_tokens(16),
    ]
}

/// An engine with `kv_blocks` blocks of 4 tokens (default pool when `None`).
fn engine(dir: &Path, kv_blocks: Option<u64>) -> Engine {
    let mut opts = EngineOptions::new(dir.to_string_lossy());
    let cfg = tulu::unstable::config::ModelConfig::from_file(&dir.join("config.json")).expect("config");
    if let Some(b) = kv_blocks {
        opts.block_size = 4;
        opts.kv_cache_memory = Some(b * 4 * cfg.kv_bytes_per_token(4));
    }
    Engine::load(opts).expect("engine")
}

fn concurrently(engine: &Engine, reqs: &[GenerateRequest]) -> Vec<(String, tulu::Summary)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = reqs.iter().map(|r| s.spawn(|| common::run(engine, r.clone()))).collect();
        handles.into_iter().map(|h| h.join().expect("a request thread")).collect()
    })
}

/// What each constrained request's text must be (a finished one; a cut one is a prefix).
fn check_matches(i: usize, text: &str, finish: FinishReason) {
    let done = finish == FinishReason::Stop;
    match i {
        0 | 4 if done => {
            let v: serde_json::Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{i}: {e}: {text}"));
            let age = v["age"].as_i64().unwrap_or(-1);
            assert!((0..=120).contains(&age) && v["name"].is_string(), "{i}: {v}");
            let pets = v["pets"].as_array().unwrap_or_else(|| panic!("{i}: {v}"));
            assert!(pets.len() <= 2 && pets.iter().all(|p| ["cat", "dog", "fish"].contains(&p.as_str().unwrap_or(""))));
        }
        2 => assert!(text == "yes" || text == "no", "{i}: {text:?}"),
        3 if done => {
            let b = text.as_bytes();
            let ok = b.len() == 6 && b[..3].iter().all(u8::is_ascii_digit) && b[3] == b'-';
            assert!(ok && b[4..].iter().all(|c| (b'a'..=b'c').contains(c)), "{i}: {text:?}");
        }
        6 if done => assert!(serde_json::from_str::<serde_json::Value>(text).is_ok_and(|v| v.is_object()), "{text}"),
        _ => {}
    }
}

#[test]
fn constrained_and_free_requests_batched_equal_each_alone_also_under_preemption() {
    let dir = common::smollm2_dir();
    let reqs = requests();
    let roomy = engine(&dir, None);
    let alone: Vec<_> = reqs.iter().map(|r| common::run(&roomy, r.clone())).collect();
    for (i, (text, summary)) in alone.iter().enumerate() {
        check_matches(i, text, summary.finish_reason);
    }
    assert_eq!(alone[0].1.finish_reason, FinishReason::Stop, "the greedy JSON finishes: {}", alone[0].0);
    // Greedy constrained output is deterministic.
    assert_eq!(common::run(&roomy, reqs[0].clone()).0, alone[0].0);
    let together = concurrently(&roomy, &reqs);
    drop(roomy);
    // 24 blocks of 4 tokens: the longest request (36 + 40 tokens) fits alone, not beside others.
    // 40 blocks preempted only when the threads' submissions happened to interleave badly (the
    // requests share their system prompt's blocks); queued in one call, they never did.
    let tiny = engine(&dir, Some(24));
    let preempted = common::run_all(&tiny, &reqs);
    assert!(tiny.metrics().preemptions > 0, "the tiny pool preempted nothing");
    for (i, a) in alone.iter().enumerate() {
        assert_eq!(together[i].0, a.0, "request {i} batched");
        assert_eq!(preempted[i].0, a.0, "request {i} preempted");
        assert_eq!(together[i].1.tokens, a.1.tokens, "request {i} batched");
    }
}

#[test]
fn a_constraint_that_does_not_compile_names_its_parameter() {
    let engine = engine(&common::smollm2_dir(), None);
    let bad = ask("x").constrain(Constraint::Regex("(".into()));
    match engine.generate(bad.clone()) {
        Err(Error::Request { param, .. }) => assert_eq!(param, "regex"),
        other => panic!("{:?}", other.err()),
    }
    let named = GenerateRequest { constraint_param: Some("guided_regex".into()), ..bad };
    match engine.generate(named) {
        Err(Error::Request { param, message }) => {
            assert!(param == "guided_regex" && message.contains("regex"), "{message}")
        }
        other => panic!("{:?}", other.err()),
    }
    // The engine still serves after refusing them.
    let (text, _) = common::run(&engine, ask("Yes or no?").constrain(Constraint::Choice(vec!["no".into()])));
    assert_eq!(text, "no");
}

#[test]
fn an_answer_that_breaks_a_keyword_checked_after_generation_is_an_error_naming_it() {
    let engine = engine(&common::smollm2_dir(), None);
    // The grammar cannot enforce `uniqueItems`, and the only arrays it allows repeat an item:
    // whatever the model picks, the finished answer breaks the schema.
    let schema = json!({"type": "array", "items": {"const": 1}, "minItems": 2, "maxItems": 2, "uniqueItems": true});
    let req = ask("Two numbers as a JSON list.").constrain(Constraint::JsonSchema(schema)).max_tokens(20);
    let mut text = String::new();
    let mut failure = None;
    for ev in engine.generate(req).expect("a relaxed schema is accepted") {
        match ev {
            Ok(tulu::Event::Text(t)) => text.push_str(&t),
            Ok(_) => {}
            Err(e) => failure = Some(e),
        }
    }
    match failure {
        Some(Error::Grammar { message }) => {
            assert!(message.contains("`uniqueItems` (at `/uniqueItems`)"), "{message}");
            let v: serde_json::Value = serde_json::from_str(&text).expect("the text so far is the JSON");
            assert_eq!(v, json!([1, 1]));
        }
        other => panic!("{text:?}: {other:?}"),
    }
    // With at most one item no answer breaks it: the same engine answers.
    let ok = json!({"type": "array", "items": {"const": 1}, "maxItems": 1, "uniqueItems": true});
    let (text, _) = common::run(&engine, ask("A JSON list.").constrain(Constraint::JsonSchema(ok)).max_tokens(20));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(v == json!([1]) || v == json!([]), "{v}");
}

#[test]
fn openai_client_gets_valid_structured_outputs_from_tulu_serve() {
    let python = common::serve::python();
    let server = common::serve::Server::start(&[]);
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/chat/llama31_chat_template.jinja"
    ))
    .expect("the Llama 3.1 template");
    let config = json!({"base_url": server.url(), "model": server.model, "llama31_template": template});
    let out = Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_structured.py"))
        .arg(config.to_string())
        .output()
        .expect("run the openai client");
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "structured-output checks failed:\n{log}");
}

#[test]
fn tulu_generate_takes_constraint_flags_and_names_a_bad_one() {
    let model = common::smollm2_dir();
    let generate = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tulu"))
            .args(["generate", "--model"])
            .arg(&model)
            .args(["--chat", "--prompt", "Is the sky blue?", "--max-tokens", "8"])
            .args(extra)
            .output()
            .expect("run tulu generate")
    };
    let out = generate(&["--choice", "yes", "--choice", "no"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text == "yes" || text == "no", "{text:?}");
    let out = generate(&["--regex", "("]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`--regex`"), "{}", String::from_utf8_lossy(&out.stderr));
    // One constraint at a time.
    assert!(!generate(&["--regex", "a", "--choice", "b"]).status.success());
}
