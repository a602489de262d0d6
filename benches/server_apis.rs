//! What each HTTP API costs over the chat path: `cargo bench --bench server_apis -- --model DIR
//! [--gen-len 16] [--requests 8] [--concurrency 32]`.
//!
//! Serves `--model` on 127.0.0.1 (the same router `tulu serve` runs) and sends the same greedy
//! question through `/v1/chat/completions`, `/v1/responses` and `/v1/messages`, so every API
//! generates the same tokens. Prints one JSON line per API: ms per request at batch 1 (whole
//! answers, `--requests` in a row) and output tokens/s with `--concurrency` streams at once,
//! each beside the chat path's figure from the same run (the ratio is the API's overhead).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use serde_json::{json, Value};
use tulu::unstable::server::{router, ServerOptions};
use tulu::{Engine, EngineOptions, Result};

/// The bench's flags (after `--`).
#[derive(Parser)]
struct Args {
    /// The model directory.
    #[arg(long, short)]
    model: PathBuf,
    /// Tokens each answer may generate.
    #[arg(long, default_value_t = 16)]
    gen_len: usize,
    /// Whole requests in a row at batch 1.
    #[arg(long, default_value_t = 8)]
    requests: usize,
    /// Concurrent streams.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// cargo passes `--bench` to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

const QUESTION: &str = "Write a short poem about the sea.";

/// Each API's path, body and the answer's output-token count.
fn body(api: &str, gen_len: usize, stream: bool) -> (&'static str, Value) {
    let messages = json!([{"role": "user", "content": QUESTION}]);
    match api {
        "chat" => (
            "/v1/chat/completions",
            json!({"messages": messages, "max_tokens": gen_len, "temperature": 0, "stream": stream}),
        ),
        "responses" => (
            "/v1/responses",
            json!({"input": QUESTION, "max_output_tokens": gen_len, "temperature": 0, "stream": stream}),
        ),
        _ => (
            "/v1/messages",
            json!({"model": "bench", "messages": messages, "max_tokens": gen_len, "temperature": 0, "stream": stream}),
        ),
    }
}

fn output_tokens(answer: &Value) -> u64 {
    let usage = &answer["usage"];
    usage["completion_tokens"].as_u64().or_else(|| usage["output_tokens"].as_u64()).unwrap_or(0)
}

/// One request over a fresh connection; returns the status line's code and the body.
fn post(addr: &str, path: &str, body: &Value) -> (u16, String) {
    let body = body.to_string();
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let status = raw.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut opts = EngineOptions::new(args.model.to_string_lossy().into_owned()).max_context(1024);
    opts.max_num_seqs = args.concurrency.max(1);
    let engine = Arc::new(Engine::load(opts)?);
    let app = router(engine, &ServerOptions::new("bench"));
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("address").to_string();
    runtime.spawn(async move { axum::serve(listener, app).await });
    let mut chat = None;
    for api in ["chat", "responses", "messages"] {
        let (path, whole) = body(api, args.gen_len, false);
        let (status, warm) = post(&addr, path, &whole);
        assert_eq!(status, 200, "{api}: {warm}");
        let tokens = output_tokens(&serde_json::from_str(&warm).expect("JSON answer"));
        let start = Instant::now();
        for _ in 0..args.requests {
            post(&addr, path, &whole);
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / args.requests.max(1) as f64;
        let (_, streamed) = body(api, args.gen_len, true);
        let start = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..args.concurrency {
                scope.spawn(|| assert_eq!(post(&addr, path, &streamed).0, 200, "{api} stream"));
            }
        });
        let tok_s = (tokens as usize * args.concurrency) as f64 / start.elapsed().as_secs_f64();
        let (chat_ms, chat_tok_s) = *chat.get_or_insert((ms, tok_s));
        let line = json!({
            "api": api, "output_tokens": tokens, "batch1_ms_per_request": ms, "chat_ms_per_request": chat_ms,
            "ms_ratio_to_chat": ms / chat_ms, "concurrency": args.concurrency, "tok_per_s": tok_s,
            "chat_tok_per_s": chat_tok_s, "tok_s_ratio_to_chat": tok_s / chat_tok_s,
        });
        println!("{line}");
    }
    Ok(())
}
