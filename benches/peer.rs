//! tulu against candle-transformers' llama on the same weights, in one run:
//! `cargo bench --bench peer -- --model DIR [--prompt-len 128] [--gen-len 64] [--repeat 3]`.
//!
//! tulu's side is `tulu bench` itself (the release binary cargo built for this bench), so the
//! figures are the ones users get; the peer then runs in this process on the same prompts
//! (`tulu::unstable::engine::synthetic_prompt`): one prefill, then `gen_len - 1` single-token steps, as
//! tulu's engine does. Prints `tulu bench`'s load line, then one `generate` line per prompt
//! length with both sides and their ratios.

// The bench uses only the timing half of the oracle.
#[allow(dead_code)]
#[path = "../tests/common/peer.rs"]
mod peer;

use std::path::PathBuf;
use std::process::Command;

use clap::Parser;
use serde_json::{json, Value};
use tulu::unstable::tokenizer::Tokenizer;
use tulu::{Error, Result};

use self::peer::PeerLlama;

/// The bench's flags (after `--`).
#[derive(Parser)]
struct Args {
    /// The model directory (safetensors, config.json, tokenizer.json).
    #[arg(long, short)]
    model: PathBuf,
    /// Prompt lengths to measure (comma-separated).
    #[arg(long, default_value = "128", value_delimiter = ',')]
    prompt_len: Vec<usize>,
    /// Tokens generated per case.
    #[arg(long, default_value_t = 64)]
    gen_len: usize,
    /// Repetitions; the best run is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// cargo passes `--bench` to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() {
    if let Err(e) = run(&Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    let lens: Vec<String> = args.prompt_len.iter().map(usize::to_string).collect();
    let out = Command::new(env!("CARGO_BIN_EXE_tulu"))
        .arg("bench")
        .arg("--model")
        .arg(&args.model)
        .args(["--device", "cpu", "--prompt-len", &lens.join(",")])
        .args(["--gen-len", &args.gen_len.to_string(), "--repeat", &args.repeat.to_string()])
        .output()
        .map_err(|e| Error::io(env!("CARGO_BIN_EXE_tulu"), e))?;
    if !out.status.success() {
        return Err(Error::Backend(format!("tulu bench failed: {}", String::from_utf8_lossy(&out.stderr))));
    }
    let vocab = Tokenizer::from_dir(&args.model)?.vocab_size();
    let mut peer = PeerLlama::load(&args.model)?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut line: Value =
            serde_json::from_str(line).map_err(|e| Error::Backend(format!("tulu bench printed `{line}`: {e}")))?;
        if line["case"] == "generate" {
            add_peer(&mut line, &mut peer, vocab, args)?;
        }
        println!("{line}");
    }
    Ok(())
}

/// Times the peer on `line`'s case and adds its figures and the ratios to the line.
fn add_peer(line: &mut Value, peer: &mut PeerLlama, vocab: usize, args: &Args) -> Result<()> {
    let plen = line["prompt_len"].as_u64().unwrap_or(0) as usize;
    let prompt = tulu::unstable::engine::synthetic_prompt(plen, vocab, 0);
    let steps = args.gen_len.saturating_sub(1).max(1);
    let (mut prefill, mut decode) = (0f64, 0f64);
    for _ in 0..args.repeat.max(1) {
        let (p, d) = peer.time_generate(&prompt, steps)?;
        prefill = prefill.max(plen as f64 / p);
        decode = decode.max(steps as f64 / d);
    }
    let ours = |field: &str| line[field].as_f64().unwrap_or(f64::NAN);
    let (our_prefill, our_decode) = (ours("prefill_tok_s"), ours("decode_tok_s"));
    let fields = [
        ("peer", json!("candle-transformers llama")),
        ("peer_prefill_tok_s", round(prefill)),
        ("peer_decode_tok_s", round(decode)),
        ("prefill_ratio", round(our_prefill / prefill)),
        ("decode_ratio", round(our_decode / decode)),
    ];
    if let Some(obj) = line.as_object_mut() {
        obj.extend(fields.map(|(k, v)| (k.to_owned(), v)));
    }
    Ok(())
}

/// A JSON number with two decimals, or null when not finite (as `tulu bench` rounds).
fn round(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 100.0).round() / 100.0)
    } else {
        Value::Null
    }
}
