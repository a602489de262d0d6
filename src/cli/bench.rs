//! `tulu bench`: load, prefill and decode speed on a model directory, one JSON line per case.
//! The comparison with candle-transformers' llama on the same weights is a cargo bench
//! (`cargo bench --bench peer -- --model DIR`), which runs this and the peer in one run: the
//! `tulu` binary carries no oracle.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;
use tulu::{Device, Engine, EngineOptions, Event, GenerateRequest, Result, SamplingParams, Summary};

/// `tulu bench` flags.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// The model directory (e.g. converted SmolLM2); with --random-weights only its config.json
    /// is read.
    #[arg(long, short)]
    pub model: Option<PathBuf>,
    /// With --random-weights: a named shape instead of --model (tiny, llama-3.1-8b,
    /// llama-3.1-70b, llama-3.1-405b).
    #[arg(long, conflicts_with = "model", requires = "random_weights")]
    pub preset: Option<String>,
    /// Time the forward pass of a model whose weights are generated on the device (no files,
    /// no tokenizer): decode and prefill per --batch and --prompt-len, against the read
    /// bandwidth and GEMM peak measured in the same run.
    #[arg(long, conflicts_with = "serve")]
    pub random_weights: bool,
    /// With --random-weights: batch sizes (concurrent sequences) to measure.
    #[arg(long, default_value = "1", value_delimiter = ',', requires = "random_weights")]
    pub batch: Vec<usize>,
    /// With --random-weights: use only the first N decoder layers of the shape.
    #[arg(long, requires = "random_weights")]
    pub layers: Option<usize>,
    /// With --random-weights --rank-shard: the tensor-parallel degree whose rank-0 shard is timed.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Time one rank's shard of a --tp N model on this device (per-layer time, bandwidth floor,
    /// and the full model's projected latency at tp 8 and 16).
    #[arg(long, requires = "random_weights")]
    pub rank_shard: bool,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Prompt lengths to measure (comma-separated).
    #[arg(long, default_value = "128", value_delimiter = ',')]
    pub prompt_len: Vec<usize>,
    /// Tokens generated per case.
    #[arg(long, default_value_t = 64)]
    pub gen_len: usize,
    /// Repetitions; the best run is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Serving mode (see bench_serve.rs): concurrent requests through continuous batching.
    #[arg(long)]
    pub serve: bool,
    /// With --serve: the numbers of concurrent clients to measure.
    #[arg(long, default_value = "1,8,32", value_delimiter = ',', requires = "serve")]
    pub concurrency: Vec<usize>,
    /// Quantize the linear weights while loading (fp8, q8_0, q4_k), as `tulu generate --quantize`.
    #[arg(long)]
    pub quantize: Option<tulu::unstable::quant::Quantize>,
    /// What the KV cache stores (auto, bf16, fp8), as `tulu generate --kv-cache-dtype`.
    #[arg(long, default_value = "auto")]
    pub kv_cache_dtype: tulu::unstable::quant::kv::KvCacheDtype,
    /// Time decode with and without speculative decoding (`ngram`: prompt lookup; `draft`: the
    /// model of --draft-model) on input-grounded chat tasks, in one run on one engine (see
    /// bench_spec.rs).
    #[arg(long, value_parser = ["ngram", "draft"], conflicts_with_all = ["serve", "random_weights"])]
    pub speculative: Option<String>,
    /// With --speculative: draft tokens per step.
    #[arg(long, default_value_t = 4, requires = "speculative")]
    pub num_speculative_tokens: usize,
    /// With --speculative draft: the draft model (a directory or repo id with the same tokenizer).
    #[arg(long, value_name = "DIR_OR_REPO", requires = "speculative")]
    pub draft_model: Option<String>,
}

fn tulu_once(engine: &Engine, prompt: &[u32], gen_len: usize) -> Result<Summary> {
    let mut req = GenerateRequest::tokens(prompt.to_vec()).sampling(SamplingParams::greedy()).max_tokens(gen_len);
    req.ignore_eos = true;
    for ev in engine.generate(req)? {
        if let Event::Done(s) = ev? {
            return Ok(s);
        }
    }
    Err(tulu::Error::Backend("generation ended without a summary".into()))
}

/// `tulu bench`.
pub fn bench(args: &BenchArgs) -> Result<()> {
    if args.random_weights {
        return super::bench_model::bench_model(args);
    }
    if args.tp != 1 {
        return Err(tulu::Error::request("tp", "bench runs one rank; --tp applies to --random-weights --rank-shard"));
    }
    let dir = args.model_dir()?;
    if args.serve {
        return super::bench_serve::bench_serve(args, dir);
    }
    if args.speculative.is_some() {
        return super::bench_spec::bench_speculative(args, dir);
    }
    let device: Device = args.device.parse()?;
    let model = dir.to_string_lossy().into_owned();
    let mut opts = EngineOptions::new(model).device(device);
    // Every repetition must pay for its prompt: no prefix cache hits between them.
    opts.prefix_caching = false;
    opts.quantize = args.quantize;
    opts.kv_cache_dtype = args.kv_cache_dtype;
    let started = Instant::now();
    let engine = Engine::load(opts)?;
    let load_s = started.elapsed().as_secs_f64();
    let bytes = checkpoint_bytes(dir)?;
    println!(
        "{}",
        json!({
            "case": "load",
            "device": engine.device(),
            "model": dir,
            "checkpoint_gb": round(bytes as f64 / 1e9),
            "load_s": round(load_s),
            "load_gb_s": round(bytes as f64 / 1e9 / load_s),
            "peak_rss_mb": tulu::unstable::process_memory::peak_rss_bytes().map(|b| round(b as f64 / 1e6)),
        })
    );
    let vocab = engine.tokenizer().vocab_size();
    for &plen in &args.prompt_len {
        let prompt = tulu::unstable::engine::synthetic_prompt(plen, vocab, 0);
        let (mut best_prefill, mut best_decode) = (0f64, 0f64);
        for _ in 0..args.repeat.max(1) {
            let s = tulu_once(&engine, &prompt, args.gen_len)?;
            best_prefill = best_prefill.max(s.prefill_tok_per_sec());
            best_decode = best_decode.max(s.decode_tok_per_sec());
        }
        let line = json!({
            "case": "generate",
            "device": engine.device(),
            "model": dir,
            "prompt_len": plen,
            "gen_len": args.gen_len,
            "prefill_tok_s": round(best_prefill),
            "decode_tok_s": round(best_decode),
        });
        println!("{line}");
    }
    Ok(())
}

impl BenchArgs {
    /// `--model`, which every mode but `--random-weights --preset` needs.
    pub fn model_dir(&self) -> Result<&Path> {
        self.model.as_deref().ok_or_else(|| tulu::Error::request("model", "bench needs --model DIR"))
    }
}

/// Bytes of the `*.safetensors` and `*.gguf` files in `dir`, or of the GGUF file `dir` names
/// (what loading reads).
fn checkpoint_bytes(dir: &Path) -> Result<u64> {
    if dir.is_file() {
        return Ok(std::fs::metadata(dir).map_err(|e| tulu::Error::io(dir, e))?.len());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| tulu::Error::io(dir, e))?;
    let mut total = 0;
    for e in entries.flatten() {
        if e.path().extension().is_some_and(|x| x == "safetensors" || x == "gguf") {
            // Through the link a GGUF model directory holds.
            total += std::fs::metadata(e.path()).map_err(|err| tulu::Error::io(e.path(), err))?.len();
        }
    }
    Ok(total)
}

/// A JSON number with two decimals, or null when not finite.
pub fn round(x: f64) -> serde_json::Value {
    if x.is_finite() {
        json!((x * 100.0).round() / 100.0)
    } else {
        serde_json::Value::Null
    }
}
