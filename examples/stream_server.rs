//! An async service around one shared [`tulu::Engine`]: `POST /generate` with a prompt as the
//! body streams the generated text back as it is decoded (chunked HTTP), to any number of
//! concurrent clients, whose requests the engine batches together.
//!
//! ```sh
//! cargo run --release --example stream_server -- --model MODEL_DIR_OR_REPO --port 8080
//! curl -N localhost:8080/generate -d 'Once upon a time'
//! # or: serve on a free port, stream to N concurrent clients of its own, print their texts, exit
//! cargo run --release --example stream_server -- --model MODEL_DIR_OR_REPO --clients 4
//! ```

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use futures_util::StreamExt;
use tulu::{Engine, EngineOptions, Event, GenerateRequest};

/// Streams the generation of the request body's prompt.
async fn generate(State(engine): State<Arc<Engine>>, prompt: String) -> Response {
    let request = GenerateRequest::text(prompt).max_tokens(32);
    match engine.generate(request) {
        // The generation is a `Stream` of events: keep the text, end at the summary. Dropping
        // the body (the client went away) drops the generation, which aborts the request.
        Ok(generation) => Body::from_stream(generation.filter_map(|event| async move {
            match event {
                Ok(Event::Text(text)) => Some(Ok(text)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            }
        }))
        .into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

/// One client: posts `prompt` over a plain TCP connection and returns the response body.
async fn client(addr: std::net::SocketAddr, prompt: String) -> std::io::Result<String> {
    // Blocking I/O on a blocking thread: the example needs no HTTP client, nor tokio's io-util.
    tokio::task::spawn_blocking(move || blocking_client(addr, &prompt)).await?
}

fn blocking_client(addr: std::net::SocketAddr, prompt: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    let request = format!(
        "POST /generate HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{prompt}",
        prompt.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("the server answered {head:?}")));
    }
    Ok(dechunk(body))
}

/// The payload of a chunked HTTP body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let Some(model) = flag("--model") else {
        eprintln!("usage: stream_server --model MODEL_DIR_OR_REPO [--port P | --clients N]");
        std::process::exit(2);
    };
    let port: u16 = flag("--port").map_or(Ok(0), |p| p.parse())?;
    let clients: Option<usize> = flag("--clients").map(|n| n.parse()).transpose()?;

    // Loading reads the whole checkpoint: off the async threads.
    let engine = Arc::new(tokio::task::spawn_blocking(move || Engine::load(EngineOptions::new(model))).await??);
    let app = Router::new().route("/generate", post(generate)).with_state(engine);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    eprintln!("listening on http://{addr}");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let Some(n) = clients else {
        server.await??;
        return Ok(());
    };
    let prompts = ["The capital of France is", "Once upon a time", "The three primary colours are"];
    let runs = (0..n).map(|i| tokio::spawn(client(addr, prompts[i % prompts.len()].to_owned())));
    let texts = futures_util::future::join_all(runs).await;
    for (i, text) in texts.into_iter().enumerate() {
        let text = text??;
        println!("client {i}: {text:?}");
        if text.is_empty() {
            return Err(format!("client {i} received no text").into());
        }
    }
    server.abort();
    Ok(())
}
