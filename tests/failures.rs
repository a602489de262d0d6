//! Failure boundaries through the engine: an error of one request (its logits are not finite)
//! ends that request alone, naming the position and the rank, while every other request
//! completes exactly as it would have; an error of the ranks (a rank dies mid-step) fails every
//! request and the engine, and `/health` then answers 503.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use tulu::unstable::parallel::rendezvous::WorldSpec;
use tulu::unstable::parallel::tcp::TcpComm;
use tulu::unstable::server::{router, ServerOptions};
use tulu::{Engine, EngineOptions, Error, Event, GenerateRequest, Generation, SamplingParams, Summary};

/// A greedy request for `prompt` that runs `n` tokens.
fn request(prompt: &[u32], n: usize) -> GenerateRequest {
    let mut r = GenerateRequest::tokens(prompt.to_vec()).sampling(SamplingParams::greedy()).max_tokens(n);
    r.ignore_eos = true;
    r
}

/// A stream's end: its summary, or the error it ended with.
fn outcome(stream: Generation) -> Result<Summary, Error> {
    for event in stream {
        if let Event::Done(s) = event? {
            return Ok(s);
        }
    }
    panic!("the stream ended without a summary or an error");
}

/// Token 77's embedding row is NaN: the request whose prompt holds it fails with the position
/// of its sampled row and rank 0; the two batched with it get exactly the tokens the clean model
/// gives, and the engine keeps working.
#[test]
fn non_finite_logits_fail_only_their_request() {
    let poisoned = common::poisoned_tiny("model.embed_tokens.weight", 77);
    let engine = Engine::load(EngineOptions::new(poisoned.path().to_string_lossy())).unwrap();
    let clean = Engine::load(EngineOptions::new(common::tiny_dir().to_string_lossy())).unwrap();
    let (a, bad, b) = (vec![5, 6, 7, 8], vec![5, 77, 9], vec![40, 41]);
    let streams = engine.generate_all(vec![request(&a, 6), request(&bad, 6), request(&b, 6)]).unwrap();
    let outcomes: Vec<_> = streams.into_iter().map(outcome).collect();
    match &outcomes[1] {
        Err(Error::NonFiniteLogits { position, rank }) => assert_eq!((*position, *rank), (2, 0)),
        other => panic!("the poisoned request: {other:?}"),
    }
    for (i, prompt) in [(0, &a), (2, &b)] {
        let want = outcome(clean.generate(request(prompt, 6)).unwrap()).unwrap().tokens;
        assert_eq!(outcomes[i].as_ref().unwrap().tokens, want, "request {i}");
    }
    assert_eq!(engine.failure(), None);
    assert_eq!(engine.metrics().requests_failed, 1);
    assert_eq!(outcome(engine.generate(request(&a, 3)).unwrap()).unwrap().tokens.len(), 3);
}

/// lm_head row 200 is NaN, so column 200 of every row's logits is: at tp 2 (150 vocabulary
/// rows per rank) it lies in rank 1's shard, and the error says so.
#[test]
fn non_finite_logits_name_the_rank_whose_shard_holds_them() {
    let poisoned = common::poisoned_tiny("lm_head.weight", 200);
    for (tp, rank) in [(1, 0), (2, 1)] {
        let mut opts = EngineOptions::new(poisoned.path().to_string_lossy());
        opts.tp = tp;
        let engine = Engine::load(opts).unwrap();
        match outcome(engine.generate(request(&[3, 4, 5, 6], 4)).unwrap()) {
            Err(e @ Error::NonFiniteLogits { .. }) => {
                let text = e.to_string();
                assert!(text.contains("position 3") && text.contains(&format!("rank {rank}")), "tp {tp}: {text}");
            }
            other => panic!("tp {tp}: {other:?}"),
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET path` on `addr`: the status.
fn get_status(addr: &str, path: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    reply.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// Rank 0 of a two-process world whose rank 1 takes one step and dies: the request in flight
/// fails with an engine failure naming the rank, new requests are refused, and `/health`
/// answers 503.
#[test]
fn a_dead_rank_fails_every_request_and_the_engine() {
    let port = free_port();
    let fake_rank1 = std::thread::spawn(move || {
        let spec = WorldSpec::from_nodes(2, 1, 1, 0, "127.0.0.1", port).unwrap();
        let config = tulu::unstable::config::ModelConfig::from_file(&common::tiny_dir().join("config.json")).unwrap();
        let handshake = tulu::unstable::parallel::handshake::Handshake::new(&config, &spec, None).unwrap();
        let comm = TcpComm::connect(&spec, &handshake, Duration::from_secs(30)).unwrap();
        comm.recv_hello().unwrap();
        comm.agree_min(u64::MAX).unwrap();
        comm.recv_step().unwrap().expect("a step");
        // Dies mid-step: the connection closes before its first collective.
    });
    let mut opts = EngineOptions::new(common::tiny_dir().to_string_lossy()).device(tulu::Device::Cpu);
    opts.world = Some(WorldSpec::from_nodes(2, 0, 1, 0, "127.0.0.1", port).unwrap());
    opts.dist_timeout = Duration::from_secs(30);
    let engine = Arc::new(Engine::load(opts).unwrap());
    match outcome(engine.generate(request(&[1, 2, 3], 8)).unwrap()) {
        Err(Error::EngineFailed { message }) => assert!(message.contains("rank 1"), "{message}"),
        other => panic!("{other:?}"),
    }
    fake_rank1.join().unwrap();
    assert!(engine.failure().is_some_and(|why| why.contains("rank 1")));
    assert!(matches!(engine.generate(request(&[1], 1)), Err(Error::EngineFailed { .. })));

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    runtime.spawn(async move { axum::serve(listener, router(engine, &ServerOptions::new("tiny"))).await });
    // The runtime's own threads serve; this one is the client.
    assert_eq!(get_status(&addr, "/health"), 503);
}
