//! What structured outputs add to a step: `cargo bench --bench structured_outputs -- --model DIR
//! --tokenizer TOKENIZER_JSON [--batch 1,32] [--gen-len 32]`.
//!
//! Prints JSON lines:
//! - `mask`: the host time to compute one step's token masks for `rows` JSON-schema requests
//!   (llguidance over the vocabulary of `--tokenizer`, e.g. Llama 3's 128,256 tokens; rows in
//!   parallel on the host's cores, as the engine computes them);
//! - `step`: the engine's decode time per step on `--model` with `batch` concurrent requests,
//!   all free and all constrained (the same regex-free JSON schema), and the difference: what a
//!   constrained step costs beyond a free one once masks overlap the forward pass.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use rayon::prelude::*;
use serde_json::json;
use tulu::unstable::grammar::{Grammars, TokenMatcher};
use tulu::unstable::tokenizer::Tokenizer;
use tulu::{ChatMessage, Constraint, Engine, EngineOptions, Event, GenerateRequest, Result, SamplingParams};

/// The bench's flags (after `--`).
#[derive(Parser)]
struct Args {
    /// The model directory the engine part runs.
    #[arg(long, short)]
    model: PathBuf,
    /// The tokenizer.json whose vocabulary the mask part uses.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Batch sizes (comma-separated).
    #[arg(long, default_value = "1,32", value_delimiter = ',')]
    batch: Vec<usize>,
    /// Tokens generated per request in the engine part.
    #[arg(long, default_value_t = 32)]
    gen_len: usize,
    /// cargo passes `--bench` to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

fn schema() -> serde_json::Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}},
            "notes": {"type": "string"}
        },
        "required": ["name", "age", "tags", "notes"]
    })
}

fn main() {
    let args = Args::parse();
    if let Err(e) = masks(&args).and_then(|_| steps(&args)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Host time of one step's masks for `rows` matchers, at every position of a JSON document
/// valid under the schema (structure, keys, numbers, enums and strings): mean and worst step.
fn masks(args: &Args) -> Result<()> {
    let tokenizer = Arc::new(Tokenizer::from_files(&args.tokenizer, None)?);
    let width = tokenizer.vocab_size();
    let eos = vec![width as u32 - 1];
    let grammars = Grammars::new(tokenizer.clone(), width, eos);
    let t0 = Instant::now();
    let first = grammars.compile(&Constraint::JsonSchema(schema()), None)?;
    let first_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    let m = grammars.compile(&Constraint::JsonSchema(schema()), None)?;
    let compile_ms = t1.elapsed().as_secs_f64() * 1e3;
    drop(first);
    let doc = r#"{"name": "Alice Smith", "age": 42, "tags": ["red", "blue"], "notes": "likes green tea"}"#;
    let tokens = tokenizer.encode_raw(doc)?;
    let words = TokenMatcher::words(width);
    for &rows in &args.batch {
        let mut matchers: Vec<TokenMatcher> = vec![m.clone(); rows];
        let mut bits = vec![0u32; rows * words];
        let (mut total, mut worst) = (0.0f64, 0.0f64);
        for &t in &tokens {
            let start = Instant::now();
            bits.par_chunks_mut(words).zip(matchers.par_iter_mut()).for_each(|(row, g)| {
                let _ = g.fill_mask(row);
            });
            let secs = start.elapsed().as_secs_f64();
            (total, worst) = (total + secs, worst.max(secs));
            for g in &mut matchers {
                g.commit(t).map_err(tulu::Error::Backend)?;
            }
        }
        let mean = total / tokens.len() as f64;
        let line = json!({"case": "mask", "vocab": width, "rows": rows, "steps": tokens.len(),
            "mean_ms_per_step": mean * 1e3, "worst_ms_per_step": worst * 1e3, "mean_us_per_row": mean * 1e6 / rows as f64,
            "first_compile_ms": first_ms, "compile_ms": compile_ms, "threads": rayon::current_num_threads()});
        println!("{line}");
    }
    Ok(())
}

/// Decode ms per step with `batch` free or constrained requests.
fn steps(args: &Args) -> Result<()> {
    let engine = Engine::load(EngineOptions::new(args.model.to_string_lossy()))?;
    for &batch in &args.batch {
        let mut ms = [0.0; 2];
        for (k, constrained) in [false, true].into_iter().enumerate() {
            let reqs: Vec<GenerateRequest> = (0..batch)
                .map(|i| {
                    let msg = ChatMessage::new("user", format!("Describe person {i} as JSON."));
                    let mut r =
                        GenerateRequest::chat(vec![msg]).max_tokens(args.gen_len).sampling(SamplingParams::greedy());
                    r.ignore_eos = true;
                    if constrained {
                        r = r.constrain(Constraint::JsonSchema(schema()));
                    }
                    r
                })
                .collect();
            let decode: Vec<f64> = std::thread::scope(|s| {
                let hs: Vec<_> = reqs.into_iter().map(|r| s.spawn(|| decode_ms_per_token(&engine, r))).collect();
                hs.into_iter().map(|h| h.join().unwrap_or(Ok(f64::NAN))).collect::<Result<Vec<f64>>>()
            })?;
            ms[k] = decode.iter().sum::<f64>() / decode.len() as f64;
        }
        let line = json!({"case": "step", "model": args.model, "batch": batch, "gen_len": args.gen_len,
            "free_ms_per_step": ms[0], "constrained_ms_per_step": ms[1], "added_ms_per_step": ms[1] - ms[0],
            "ratio": ms[1] / ms[0]});
        println!("{line}");
    }
    Ok(())
}

/// A request's decode seconds per token after the first, in ms (≈ the engine's step time while
/// the whole batch decodes together).
fn decode_ms_per_token(engine: &Engine, req: GenerateRequest) -> Result<f64> {
    for ev in engine.generate(req)? {
        if let Event::Done(s) = ev? {
            return Ok(s.decode_secs * 1e3 / s.tokens.len().saturating_sub(1).max(1) as f64);
        }
    }
    Err(tulu::Error::Backend("no summary".into()))
}
