//! `tulu bench --speculative ngram|draft`: batch-1 decode speed with and without speculative decoding
//! on input-grounded chat tasks (repeat or edit a given text, where prompt lookup finds most of
//! the answer), in one run on one engine: each repetition runs the task with speculation and
//! then opted out, so both see the same machine. One JSON line per task: tok/s both ways, the
//! speed-up, the acceptance rate, the mean accepted length and whether the outputs are equal.

use std::path::Path;

use serde_json::json;
use tulu::{
    ChatMessage, Device, Engine, EngineOptions, Event, GenerateRequest, Result, SamplingParams, Speculation, Summary,
};

use super::bench::{round, BenchArgs};

/// A text to work on: long enough that its n-grams recur in the answer.
const TEXT: &str = "The engine loads Hugging Face safetensors, shards them across GPUs with tensor \
parallelism, runs its own CUDA kernels and generates text from the command line and as a library. \
The same engine runs a small model on a laptop CPU, an 8B or 70B model on one GPU and a 405B model \
across GPUs and nodes. Its goal is to be correct to the last logit against an independent \
reference, fast at batch-1 decode, and simple enough to read in an afternoon.";

/// The tasks: a name and the user's message.
fn tasks() -> [(&'static str, String); 2] {
    [
        ("repeat", format!("Repeat the following text exactly, word for word:\n\n{TEXT}")),
        (
            "edit",
            format!(
                "Rewrite the following text with every occurrence of \"engine\" replaced by \"program\":\n\n{TEXT}"
            ),
        ),
    ]
}

fn run(engine: &Engine, ask: &str, gen_len: usize, speculative: bool) -> Result<Summary> {
    let req = GenerateRequest::chat(vec![ChatMessage::user(ask)])
        .sampling(SamplingParams::greedy())
        .max_tokens(gen_len)
        .speculative(speculative);
    for ev in engine.generate(req)? {
        if let Event::Done(s) = ev? {
            return Ok(s);
        }
    }
    Err(tulu::Error::Backend("generation ended without a summary".into()))
}

/// `tulu bench --speculative ngram|draft`.
pub fn bench_speculative(args: &BenchArgs, dir: &Path) -> Result<()> {
    let device: Device = args.device.parse()?;
    let mut opts = EngineOptions::new(dir.to_string_lossy().into_owned()).device(device);
    opts.quantize = args.quantize;
    opts.kv_cache_dtype = args.kv_cache_dtype;
    let k = args.num_speculative_tokens;
    let spec = match (args.speculative.as_deref(), &args.draft_model) {
        (Some("draft"), Some(model)) => Speculation::draft(model.clone(), k),
        (Some("draft"), None) => {
            return Err(tulu::Error::request("--draft-model", "is needed with --speculative draft"))
        }
        (_, Some(_)) => return Err(tulu::Error::request("--draft-model", "needs --speculative draft")),
        _ => Speculation::ngram(k),
    };
    spec.validate()?;
    let method = if spec.draft_model().is_some() { "draft" } else { "ngram" };
    opts.speculation = Some(spec.clone());
    let engine = Engine::load(opts)?;
    for (task, ask) in tasks() {
        let (mut on_best, mut off_best) = (0f64, 0f64);
        let (mut on_tokens, mut off_tokens) = (Vec::new(), Vec::new());
        let before = engine.metrics();
        let (mut drafted, mut accepted) = (0usize, 0usize);
        for _ in 0..args.repeat.max(1) {
            let on = run(&engine, &ask, args.gen_len, true)?;
            let off = run(&engine, &ask, args.gen_len, false)?;
            on_best = on_best.max(on.decode_tok_per_sec());
            off_best = off_best.max(off.decode_tok_per_sec());
            (drafted, accepted) = (drafted + on.draft_tokens, accepted + on.accepted_draft_tokens);
            (on_tokens, off_tokens) = (on.tokens, off.tokens);
        }
        let after = engine.metrics();
        let verified = after.spec_verified_drafts - before.spec_verified_drafts;
        let line = json!({
            "case": "speculative",
            "device": engine.device(),
            "model": dir,
            "task": task,
            "method": method,
            "draft_model": spec.draft_model(),
            "num_speculative_tokens": spec.k(),
            "gen_len": on_tokens.len(),
            "decode_tok_s": round(on_best),
            "decode_tok_s_without": round(off_best),
            "speedup": round(on_best / off_best.max(1e-9)),
            "acceptance": round(accepted as f64 / (drafted as f64).max(1.0)),
            "mean_accepted_length": round(accepted as f64 / (verified as f64).max(1.0)),
            "same_output": on_tokens == off_tokens,
        });
        println!("{line}");
    }
    Ok(())
}
