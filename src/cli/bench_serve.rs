//! `tulu bench --serve`: serving throughput and latency under concurrency, in process.
//!
//! For each concurrency N, N client threads each send `ROUNDS` requests back to back through the
//! engine's continuous batching (the path `tulu serve` uses, minus HTTP), every request with a
//! distinct prompt of `--prompt-len` tokens (so the prefix cache cannot skip prefills) and exactly
//! `--gen-len` output tokens. One JSON line per N: output tokens/s, TTFT and inter-token latency
//! p50/p99 measured at the client, and throughput relative to N = 1 measured in the same run.

use std::path::Path;
use std::time::Instant;

use serde_json::json;
use tulu::unstable::config::ModelConfig;
use tulu::{Device, Engine, EngineOptions, Error, Event, GenerateRequest, Result, SamplingParams};

use super::bench::{round, BenchArgs};

/// Requests each client sends, one after another.
const ROUNDS: usize = 2;

/// What one request saw, timed at the client.
struct Timing {
    ttft: f64,
    /// Gaps between consecutive tokens' arrivals.
    itl: Vec<f64>,
    tokens: usize,
}

/// `tulu bench --serve`.
pub fn bench_serve(args: &BenchArgs, dir: &Path) -> Result<()> {
    let device: Device = args.device.parse()?;
    let prompt_len = args.prompt_len.first().copied().unwrap_or(128).max(1);
    let gen_len = args.gen_len.max(2);
    let max_n = args.concurrency.iter().copied().max().unwrap_or(1).max(1);
    if args.concurrency.contains(&0) {
        return Err(Error::request("concurrency", "must be at least 1"));
    }
    // Size the context and KV pool for the largest N at once: no preemption, no wasted memory.
    let mut config = ModelConfig::from_file(&dir.join("config.json"))?;
    args.kv_cache_dtype.apply(&mut config);
    let context = (prompt_len + gen_len).next_multiple_of(16) + 16;
    let mut opts = EngineOptions::new(dir.to_string_lossy().into_owned()).device(device).max_context(context);
    opts.max_num_seqs = max_n;
    opts.kv_cache_dtype = args.kv_cache_dtype;
    opts.kv_cache_memory = Some(config.kv_bytes_per_token(4) * (max_n * context) as u64);
    let engine = Engine::load(opts)?;
    // Warm-up: first-touch of weights and KV pages is not part of any figure.
    run_one(&engine, prompt(&engine, u32::MAX, prompt_len), 4)?;
    let mut base = None;
    for &n in &args.concurrency {
        let start = Instant::now();
        let timings: Vec<Timing> = std::thread::scope(|scope| {
            let clients: Vec<_> = (0..n)
                .map(|client| {
                    let engine = &engine;
                    scope.spawn(move || {
                        (0..ROUNDS)
                            .map(|round| {
                                let id = (n * 1000 + client * ROUNDS + round) as u32;
                                run_one(engine, prompt(engine, id, prompt_len), gen_len)
                            })
                            .collect::<Result<Vec<_>>>()
                    })
                })
                .collect();
            clients
                .into_iter()
                .map(|c| c.join().unwrap_or_else(|_| Err(Error::Backend("a client thread panicked".into()))))
                .collect::<Result<Vec<_>>>()
                .map(|v| v.into_iter().flatten().collect())
        })?;
        let wall = start.elapsed().as_secs_f64();
        let tokens: usize = timings.iter().map(|t| t.tokens).sum();
        let throughput = tokens as f64 / wall;
        if n == 1 {
            base = Some(throughput);
        }
        let ttft: Vec<f64> = timings.iter().map(|t| t.ttft).collect();
        let itl: Vec<f64> = timings.iter().flat_map(|t| t.itl.iter().copied()).collect();
        let line = json!({
            "case": "serve",
            "device": engine.device(),
            "model": dir,
            "concurrency": n,
            "requests": timings.len(),
            "prompt_len": prompt_len,
            "gen_len": gen_len,
            "output_tok_s": round(throughput),
            "ttft_p50_ms": round(1e3 * percentile(&ttft, 0.5)),
            "ttft_p99_ms": round(1e3 * percentile(&ttft, 0.99)),
            "itl_p50_ms": round(1e3 * percentile(&itl, 0.5)),
            "itl_p99_ms": round(1e3 * percentile(&itl, 0.99)),
            "throughput_vs_n1": base.map(|b| round(throughput / b)),
            "preemptions": engine.metrics().preemptions,
        });
        println!("{line}");
    }
    Ok(())
}

/// A deterministic prompt of ordinary tokens, different for every `id`.
fn prompt(engine: &Engine, id: u32, len: usize) -> Vec<u32> {
    tulu::unstable::engine::synthetic_prompt(len, engine.tokenizer().vocab_size(), id)
}

/// Runs one request to exactly `gen_len` tokens, timing each token's arrival. Log-probability
/// events (one per sampled token) mark arrivals, since text events may merge tokens.
fn run_one(engine: &Engine, prompt: Vec<u32>, gen_len: usize) -> Result<Timing> {
    let mut req = GenerateRequest::tokens(prompt).sampling(SamplingParams::greedy()).max_tokens(gen_len);
    req.ignore_eos = true;
    req.logprobs = Some(0);
    let submitted = Instant::now();
    let mut last: Option<Instant> = None;
    let mut timing = Timing { ttft: 0.0, itl: Vec::with_capacity(gen_len), tokens: 0 };
    for event in engine.generate(req)? {
        match event? {
            Event::Logprobs(tokens) if !tokens.is_empty() => {
                let now = Instant::now();
                let mut k = tokens.len();
                if last.is_none() {
                    timing.ttft = (now - submitted).as_secs_f64();
                    k -= 1;
                }
                if let (Some(prev), true) = (last, k > 0) {
                    // Tokens that arrive together share the gap evenly.
                    let gap = (now - prev).as_secs_f64() / k as f64;
                    timing.itl.extend(std::iter::repeat_n(gap, k));
                }
                last = Some(now);
            }
            Event::Done(summary) => {
                timing.tokens = summary.tokens.len();
                return Ok(timing);
            }
            _ => {}
        }
    }
    Err(Error::Backend("generation ended without a summary".into()))
}

/// The `q` quantile (nearest rank) of `xs`; NaN when empty.
fn percentile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}
