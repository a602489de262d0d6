//! `tulu serve` end to end: the server runs as a subprocess on 127.0.0.1 with converted SmolLM2
//! and is driven by real clients — the official `openai` Python package (tests/openai_client.py)
//! and raw HTTP/1.1 over a TCP socket (so bodies can be malformed, oversized or cut off).
//!
//! Tests take a lock and run one at a time: each starts its own server, and two CPU-bound
//! servers on a 2-core machine would only slow each other down.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::serve::{cli_generate, http, python, Reply, Server};

use serde_json::{json, Value};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn openai_python_client_matches_tulu_generate() {
    let _serial = serial();
    let python = python();
    let (question, prompt, max_tokens) = ("What is the capital of France?", "The three primary colors are", 16);
    let expected_chat = cli_generate(question, true, max_tokens);
    let expected_completion = cli_generate(prompt, false, max_tokens);
    assert!(!expected_chat.is_empty() && !expected_completion.is_empty());
    let server = Server::start(&[]);
    let config = json!({
        "base_url": server.url(),
        "model": server.model,
        "question": question,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "expected_chat": expected_chat,
        "expected_completion": expected_completion,
    });
    let out = Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py"))
        .arg(config.to_string())
        .output()
        .expect("run the openai client");
    let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "openai client checks failed:\n{log}");
}

fn chat(server: &Server, messages: &Value) -> Value {
    let r = server.post(
        "/v1/chat/completions",
        &json!({"model": server.model, "messages": messages, "temperature": 0, "max_tokens": 12, "logprobs": true}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn token_ids_of(answer: &Value) -> Vec<String> {
    let content = answer["choices"][0]["logprobs"]["content"].as_array().expect("logprobs");
    content.iter().map(|t| t["token"].as_str().expect("token").to_owned()).collect()
}

#[test]
fn second_chat_turn_reuses_the_first_turns_blocks() {
    let _serial = serial();
    // A long first turn, so that it fills several 16-token blocks.
    let first = "You are helping me plan a trip. I will visit Paris, Lyon and Marseille in the spring, \
                 travelling by train, and I like museums, markets and long walks. What should I pack?";
    let turn = |history: &[(&str, String)]| -> Value {
        Value::Array(history.iter().map(|(role, content)| json!({"role": role, "content": content})).collect())
    };
    let server = Server::start(&[]);
    let a1 = chat(&server, &turn(&[("user", first.into())]));
    let answer1 = a1["choices"][0]["message"]["content"].as_str().expect("content").to_owned();
    let history = [("user", first.into()), ("assistant", answer1), ("user", "And what about shoes?".into())];
    let hits_before = server.metric("tulu_prefix_cache_hits_total");
    let a2 = chat(&server, &turn(&history));
    let hits = server.metric("tulu_prefix_cache_hits_total") - hits_before;
    let prompt1 = a1["usage"]["prompt_tokens"].as_f64().expect("usage");
    // Every full block of the first turn's prompt is found again.
    let full_blocks = (prompt1 / 16.0).floor() * 16.0;
    assert!(hits >= full_blocks && full_blocks >= 32.0, "hits {hits}, first prompt {prompt1} tokens");
    assert!(a2["usage"]["prompt_tokens_details"]["cached_tokens"].as_f64() >= Some(full_blocks), "{a2}");
    drop(server);

    let uncached = Server::start(&["--no-prefix-caching"]);
    let b2 = chat(&uncached, &turn(&history));
    assert_eq!(uncached.metric("tulu_prefix_cache_hits_total"), 0.0);
    assert_eq!(b2["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(token_ids_of(&a2), token_ids_of(&b2), "cached and uncached second turns differ");
    assert_eq!(a2["choices"][0]["message"], b2["choices"][0]["message"]);
}

#[test]
fn a_client_that_disconnects_mid_stream_frees_its_sequence() {
    let _serial = serial();
    let server = Server::start(&[]);
    let body = json!({"model": server.model, "prompt": "Once upon a time", "max_tokens": 400, "stream": true,
                      "ignore_eos": true})
    .to_string();
    let mut s = TcpStream::connect(&server.addr).expect("connect");
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    // Read until a few tokens have streamed, then hang up.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while String::from_utf8_lossy(&seen).matches("data: ").count() < 3 {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "the stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(server.metric("tulu_num_requests_running"), 1.0);
    assert!(server.metric("tulu_kv_cache_blocks_used") >= 1.0);
    drop(s);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (running, used) = (server.metric("tulu_num_requests_running"), server.metric("tulu_kv_cache_blocks_used"));
        if running == 0.0 && used == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "after the disconnect: running {running}, KV blocks used {used}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Aborted, not run to completion in the background.
    let generated = server.metric("tulu_generation_tokens_total");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(server.metric("tulu_generation_tokens_total"), generated);
    assert!(generated < 400.0, "{generated} tokens generated: the request was not aborted");
}

#[test]
fn overload_answers_429_and_every_accepted_request_completes() {
    let _serial = serial();
    let server = Server::start(&["--max-waiting", "1", "--max-num-seqs", "1"]);
    let body = json!({"model": server.model, "prompt": "Count: one, two,", "max_tokens": 6, "ignore_eos": true,
                      "temperature": 0});
    let replies: Vec<Reply> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..10).map(|_| scope.spawn(|| server.post("/v1/completions", &body))).collect();
        handles.into_iter().map(|h| h.join().expect("client thread")).collect()
    });
    let (ok, busy): (Vec<&Reply>, Vec<&Reply>) = replies.iter().partition(|r| r.status == 200);
    assert!(!busy.is_empty(), "no request was refused");
    assert!(!ok.is_empty(), "no request was accepted");
    for r in busy {
        assert_eq!(r.status, 429, "{}", r.body);
        assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    }
    let texts: Vec<Value> = ok.iter().map(|r| r.json()["choices"][0]["text"].clone()).collect();
    for r in &ok {
        let v = r.json();
        assert_eq!(v["usage"]["completion_tokens"], 6, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
    }
    assert!(texts.windows(2).all(|w| w[0] == w[1]), "greedy answers differ: {texts:?}");
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn bad_requests_get_4xx_naming_the_parameter() {
    let _serial = serial();
    let key = "sk-tulu-test";
    let server = Server::start(&["--api-key", key, "--max-body-bytes", "65536"]);
    let auth = format!("Bearer {key}");
    let send = |path: &str, body: &[u8]| http(&server.addr, "POST", path, &[("Authorization", &auth)], body);
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let chat = |extra: Value| {
        let mut b = json!({"model": "smollm2", "messages": msgs, "max_tokens": 2});
        b.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
        b.to_string()
    };
    let comp = |extra: Value| {
        let mut b = json!({"model": "smollm2", "prompt": "hi", "max_tokens": 2});
        b.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
        b.to_string()
    };
    let long_prompt = "word ".repeat(1100);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/chat/completions", "{not json".into(), 400, "body"),
        ("/v1/chat/completions", "[1, 2]".into(), 400, "body"),
        ("/v1/chat/completions", json!({"model": "smollm2"}).to_string(), 400, "messages"),
        ("/v1/chat/completions", chat(json!({"messages": []})), 400, "messages"),
        ("/v1/chat/completions", chat(json!({"messages": "hi"})), 400, "messages"),
        ("/v1/chat/completions", chat(json!({"messages": [{"content": "x"}]})), 400, "messages[0].role"),
        (
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "user", "content": 5}]})),
            400,
            "messages[0].content",
        ),
        ("/v1/chat/completions", chat(json!({"temperature": 2.5})), 400, "temperature"),
        ("/v1/chat/completions", chat(json!({"temperature": -0.1})), 400, "temperature"),
        ("/v1/chat/completions", chat(json!({"temperature": "warm"})), 400, "temperature"),
        ("/v1/chat/completions", chat(json!({"top_p": 0})), 400, "top_p"),
        ("/v1/chat/completions", chat(json!({"top_p": 1.5})), 400, "top_p"),
        ("/v1/chat/completions", chat(json!({"top_k": -2})), 400, "top_k"),
        ("/v1/chat/completions", chat(json!({"top_k": 1.5})), 400, "top_k"),
        ("/v1/chat/completions", chat(json!({"min_p": 2})), 400, "min_p"),
        ("/v1/chat/completions", chat(json!({"repetition_penalty": 0})), 400, "repetition_penalty"),
        ("/v1/chat/completions", chat(json!({"n": 0})), 400, "n"),
        ("/v1/chat/completions", chat(json!({"n": 100000})), 400, "n"),
        ("/v1/chat/completions", chat(json!({"max_tokens": 0})), 400, "max_tokens"),
        ("/v1/chat/completions", chat(json!({"max_completion_tokens": -5})), 400, "max_completion_tokens"),
        ("/v1/chat/completions", chat(json!({"max_tokens": 5000})), 400, "max_tokens"),
        ("/v1/chat/completions", chat(json!({"stream": "yes"})), 400, "stream"),
        ("/v1/chat/completions", chat(json!({"stream_options": {"include_usage": true}})), 400, "stream_options"),
        ("/v1/chat/completions", chat(json!({"stop": ["ok", ""]})), 400, "stop[1]"),
        ("/v1/chat/completions", chat(json!({"stop": 7})), 400, "stop"),
        ("/v1/chat/completions", chat(json!({"seed": "abc"})), 400, "seed"),
        ("/v1/chat/completions", chat(json!({"top_logprobs": 3})), 400, "top_logprobs"),
        ("/v1/chat/completions", chat(json!({"logprobs": true, "top_logprobs": 50})), 400, "top_logprobs"),
        ("/v1/chat/completions", chat(json!({"frequency_penalty": 3})), 400, "frequency_penalty"),
        ("/v1/chat/completions", chat(json!({"model": "gpt-4"})), 404, "model"),
        ("/v1/completions", comp(json!({"prompt": ""})), 400, "prompt"),
        ("/v1/completions", comp(json!({"prompt": 12})), 400, "prompt"),
        ("/v1/completions", comp(json!({"prompt": [1, -1]})), 400, "prompt"),
        ("/v1/completions", comp(json!({"prompt": [4_000_000_000u64]})), 400, "prompt"),
        ("/v1/completions", comp(json!({"prompt": long_prompt, "max_tokens": null})), 400, "prompt"),
        ("/v1/completions", comp(json!({"logprobs": 21})), 400, "logprobs"),
        ("/v1/completions", comp(json!({"logprobs": true})), 400, "logprobs"),
        ("/v1/completions", comp(json!({"echo": 1})), 400, "echo"),
        ("/v1/completions", comp(json!({"logit_bias": {"1": 5}})), 400, "logit_bias"),
    ];
    assert!(cases.len() >= 20);
    for (path, body, status, param) in &cases {
        let r = send(path, body.as_bytes());
        assert_eq!(r.status, *status, "{path} {body}: {}", r.body);
        let e = r.json();
        assert_eq!(e["error"]["param"], *param, "{path} {body}: {e}");
        assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        assert!(e["error"]["type"].is_string(), "{e}");
    }
    // vLLM's wording for a prompt and completion that overflow the context.
    let e = send("/v1/chat/completions", chat(json!({"max_tokens": 1020})).as_bytes()).json();
    let message = e["error"]["message"].as_str().expect("message");
    assert!(
        message.starts_with("This model's maximum context length is 1024 tokens. However, you requested")
            && message.ends_with("Please reduce the length of the messages or completion."),
        "{message}"
    );
    // Oversized bodies, unknown routes and wrong methods.
    let big = comp(json!({"prompt": "x".repeat(70_000)}));
    let r = send("/v1/completions", big.as_bytes());
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "request_too_large");
    let r = http(&server.addr, "GET", "/v1/nothing", &[("Authorization", &auth)], b"");
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (404, json!("not_found")));
    let r = http(&server.addr, "GET", "/v1/completions", &[("Authorization", &auth)], b"");
    assert_eq!(r.status, 405);
    // The API key: without it, 401 and nothing else, on every route but /health.
    let good = chat(json!({}));
    for headers in [vec![], vec![("Authorization", "Bearer wrong")], vec![("Authorization", key)]] {
        for (method, path) in
            [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/x")]
        {
            let r = http(&server.addr, method, path, &headers, good.as_bytes());
            assert_eq!(r.status, 401, "{method} {path} with {headers:?}: {}", r.body);
            assert_eq!(r.json()["error"]["code"], "invalid_api_key");
            assert!(!r.body.contains("smollm2"), "{}", r.body);
        }
    }
    assert_eq!(server.get("/health").status, 200);
    let r = send("/v1/chat/completions", good.as_bytes());
    assert_eq!(r.status, 200, "{}", r.body);
    // Nothing above hurt the server.
    assert_eq!(server.get("/health").status, 200);
}

#[test]
fn sigterm_finishes_running_requests_and_exits_0() {
    let _serial = serial();
    let mut server = Server::start(&["--shutdown-timeout", "60"]);
    let addr = server.addr.clone();
    let body = json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": true,
                      "stream": true})
    .to_string();
    let client = std::thread::spawn(move || http(&addr, "POST", "/v1/completions", &[], body.as_bytes()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.metric("tulu_num_requests_running") < 1.0 {
        assert!(Instant::now() < deadline, "the request never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = server.terminate();
    assert!(status.success(), "exit status {status}");
    let r = client.join().expect("client");
    assert_eq!(r.status, 200);
    assert!(r.headers.contains("content-type: text/event-stream"), "{}", r.headers);
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{}", r.body);
    let finish: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).expect("chunk")["choices"][0]["finish_reason"].clone())
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [json!("length")], "{}", r.body);
    assert!(TcpStream::connect(&server.addr).is_err(), "still accepting after shutdown");
}

/// A request whose logits are not finite (token 77's embedding row is NaN) fails alone, with a
/// 500 naming the position, whole or streamed; the requests running beside it complete and
/// `/health` stays 200.
#[test]
fn a_request_with_non_finite_logits_fails_alone() {
    let _serial = serial();
    let poisoned = common::poisoned_tiny("model.embed_tokens.weight", 77);
    let server = Server::start_model(&poisoned.path().to_string_lossy(), "tiny", &["--device", "cpu"]);
    let body = |prompt: Value, stream: bool| {
        json!({"model": "tiny", "prompt": prompt, "max_tokens": 8, "ignore_eos": true, "temperature": 0,
               "stream": stream})
    };
    let replies: Vec<Reply> = std::thread::scope(|scope| {
        let handles: Vec<_> = [
            body(json!([5, 6, 7, 8]), false),
            body(json!([5, 77, 9]), false),
            body(json!([5, 77, 9]), true),
            body(json!([40, 41, 42]), true),
        ]
        .into_iter()
        .map(|b| {
            let server = &server;
            scope.spawn(move || server.post("/v1/completions", &b))
        })
        .collect();
        handles.into_iter().map(|h| h.join().expect("client")).collect()
    });
    assert_eq!(replies[0].status, 200, "{}", replies[0].body);
    assert_eq!(replies[0].json()["usage"]["completion_tokens"], 8);
    assert_eq!(replies[1].status, 500, "{}", replies[1].body);
    let error = replies[1].json()["error"].clone();
    assert_eq!(error["code"], "non_finite_logits", "{error}");
    assert!(error["message"].as_str().is_some_and(|m| m.contains("position 2")), "{error}");
    // Streamed: the headers are out, so the error is the stream's last event before [DONE].
    let events = replies[2].events();
    assert!(events.iter().any(|e| e.contains("non_finite_logits")), "{}", replies[2].body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let finish: Vec<Value> = replies[3].events()[..replies[3].events().len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).expect("chunk")["choices"][0]["finish_reason"].clone())
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [json!("length")], "{}", replies[3].body);
    assert_eq!(server.get("/health").status, 200);
    assert_eq!(server.metric("tulu_request_failed_total"), 2.0);
}

/// An engine-fatal error under `tulu serve`: rank 1 of a two-process world dies; the next
/// request fails with a 503 `engine_failed` naming the rank, and rank 0 exits non-zero (so that
/// a supervisor restarts it). (A request in flight when a rank dies fails the same way:
/// tests/failures.rs.)
#[test]
fn an_engine_failure_fails_requests_and_the_server_exits_nonzero() {
    let _serial = serial();
    let model = common::tiny_dir().to_string_lossy().into_owned();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let world = ["--device", "cpu", "--nnodes", "2", "--master-port", &port, "--dist-timeout", "30"];
    let mut rank1 = Command::new(env!("CARGO_BIN_EXE_tulu"))
        .args(["serve", "--model", &model, "--node-rank", "1"])
        .args(world)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn rank 1");
    let mut args = vec!["--node-rank", "0"];
    args.extend_from_slice(&world);
    let mut server = Server::start_model(&model, "tiny", &args);
    let body = json!({"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": true});
    assert_eq!(server.post("/v1/completions", &body).status, 200, "both ranks serve");
    rank1.kill().expect("kill rank 1");
    let _ = rank1.wait();
    let r = server.post("/v1/completions", &body);
    assert_eq!(r.status, 503, "{}", r.body);
    let error = r.json()["error"].clone();
    assert_eq!(error["code"], "engine_failed", "{error}");
    assert!(error["message"].as_str().is_some_and(|m| m.contains("rank 1")), "{error}");
    let status = server.wait_exit();
    assert_eq!(status.code(), Some(1), "{status}");
}
