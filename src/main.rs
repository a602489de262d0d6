//! The `tulu` command line. It uses only the library's public API.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// tulu: run Llama-3.1-architecture models.
#[derive(Parser)]
#[command(name = "tulu", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where and how to load a model: shared by every command that runs one.
#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// A local model directory or a Hugging Face repo id (owner/name).
    #[arg(long, short)]
    pub model: String,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Longest context (prompt + output) in tokens; default: the model's, capped at 8192.
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Tensor-parallel ranks (in-process threads on the CPU backend).
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Fraction of GPU memory to use (weights, workspace, and the KV cache in what is left).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Processes (one rank each) across machines; WORLD_SIZE/RANK/MASTER_ADDR/MASTER_PORT from a
    /// launcher take precedence. Rank 0 serves; the others only compute.
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This process's rank among --nnodes.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Rank 0's address.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Rank 0's port.
    #[arg(long, default_value_t = 29500)]
    pub master_port: u16,
    /// Seconds a rank waits for its peers (joining and every collective) before failing.
    #[arg(long, default_value_t = 300.0)]
    pub dist_timeout: f64,
    /// A secret every rank must present to join rank 0 (the same on every rank).
    #[arg(long, env = "TULU_DIST_TOKEN", hide_env_values = true)]
    pub dist_token: Option<String>,
    /// Run every step eagerly: no CUDA graphs for decode steps (debugging, or to compare).
    #[arg(long)]
    pub enforce_eager: bool,
    /// Quantize the linear weights while loading: fp8 (e4m3, one scale per output row), or on
    /// the CPU q8_0 / q4_k (llama.cpp's GGML blocks). Embeddings, norms and lm_head stay as
    /// stored; FP8 checkpoints need no flag.
    #[arg(long)]
    pub quantize: Option<tulu::unstable::quant::Quantize>,
    /// What the KV cache stores: auto (e4m3 when the checkpoint's quantization_config has a
    /// kv_cache_scheme, else the model's type), bf16, or fp8 (alias fp8_e4m3: one byte an
    /// element, per-layer k_scale/v_scale from the checkpoint, 1.0 where it has none).
    #[arg(long, default_value = "auto")]
    pub kv_cache_dtype: tulu::unstable::quant::kv::KvCacheDtype,
    /// Speculative decoding: `ngram` proposes the tokens that followed the latest earlier
    /// occurrence of the last few tokens (prompt lookup), and one step verifies them all. The
    /// output is the same as without it; off by default.
    #[arg(long, value_parser = ["ngram"])]
    pub speculative: Option<String>,
    /// Draft tokens proposed per step and sequence, 1 to 16 (with --speculative or
    /// --draft-model; default 4).
    #[arg(long)]
    pub num_speculative_tokens: Option<usize>,
    /// Shortest n-gram matched (with --speculative ngram; default 2).
    #[arg(long)]
    pub ngram_min: Option<usize>,
    /// Longest n-gram matched (with --speculative ngram; default 4).
    #[arg(long)]
    pub ngram_max: Option<usize>,
    /// Speculative decoding with a draft model: a smaller checkpoint (directory or repo id) with
    /// the same tokenizer, run on the same device with its own KV cache, proposes the tokens the
    /// model verifies. Greedy output is the same as without it; sampled output has the same
    /// distribution (drafts sampled from the draft's distribution q, kept with min(1, p/q)).
    #[arg(long, value_name = "DIR_OR_REPO")]
    pub draft_model: Option<String>,
}

/// Sampling flags: any one given overrides the model's generation_config defaults. Numbers may
/// be negative here so that `--temperature -1` gets tulu's own range check naming the flag
/// (`cli::generate::check_flags`), not clap's "unexpected argument '-1'".
#[derive(clap::Args, Clone, Default)]
pub struct SamplingArgs {
    /// Maximum tokens to generate (at least 1).
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    pub max_tokens: i64,
    /// 0 is greedy.
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Keep the k likeliest tokens (0 or -1: all).
    #[arg(long, allow_negative_numbers = true)]
    pub top_k: Option<i64>,
    /// Nucleus sampling threshold in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than min_p × the likeliest.
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f32>,
    /// Penalise tokens already present (1: off).
    #[arg(long, allow_negative_numbers = true)]
    pub repetition_penalty: Option<f32>,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the output contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// The output is JSON valid under the JSON schema in this file (enforced token by token).
    #[arg(long, value_name = "FILE", group = "constraint")]
    pub json_schema: Option<PathBuf>,
    /// The output matches this regular expression, whole.
    #[arg(long, group = "constraint")]
    pub regex: Option<String>,
    /// The output is one of these strings (repeatable).
    #[arg(long, group = "constraint")]
    pub choice: Vec<String>,
    /// The output follows the Lark grammar in this file (llguidance's dialect; rule `start`).
    #[arg(long, value_name = "FILE", group = "constraint")]
    pub grammar: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt; the text goes to stdout, timings to stderr.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// The prompt.
        #[arg(long, short, conflicts_with = "prompt_file", required_unless_present = "prompt_file")]
        prompt: Option<String>,
        /// Read the prompt from a file.
        #[arg(long)]
        prompt_file: Option<PathBuf>,
        /// Apply the model's chat template (the prompt is one user message).
        #[arg(long)]
        chat: bool,
        /// A system message (with --chat).
        #[arg(long, requires = "chat")]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// An interactive multi-turn chat on stdin/stdout.
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        /// A system message.
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Architecture summary, parameter count and bytes by dtype.
    Inspect {
        /// A local model directory (config.json alone is enough), a config.json file, or a hub repo id.
        #[arg(long, short)]
        model: String,
        #[command(flatten)]
        sizing: cli::inspect::SizingArgs,
    },
    /// Convert a GGUF file (llama architecture) into a model directory: dequantized into Hugging
    /// Face safetensors (default), or the GGUF kept as stored (`--dtype keep`).
    Convert {
        /// The GGUF file.
        #[arg(long)]
        gguf: PathBuf,
        /// The directory to create.
        #[arg(long)]
        out: PathBuf,
        /// f32 (lossless dequantization), bf16 or f16 safetensors, or keep (the GGUF's weights
        /// as stored, GGML blocks included, read in place; not yet the default: GGUF blocks
        /// decode slower than they should, see docs/performance.md).
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Write a random-weight checkpoint of a Llama-3.1 shape (for tests and benchmarks).
    Synth {
        /// tiny, llama-3.1-8b, llama-3.1-70b or llama-3.1-405b.
        #[arg(long)]
        preset: String,
        /// The directory to create.
        #[arg(long)]
        out: PathBuf,
        /// Override the number of layers.
        #[arg(long)]
        layers: Option<usize>,
        /// f32, bf16 or f16 (default: the preset's).
        #[arg(long)]
        dtype: Option<String>,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Use this tokenizer.json instead of a small built-in one.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
    /// Measure load, prefill and decode speed (JSON lines); `cargo bench --bench peer` adds candle-transformers as the peer.
    Bench(cli::bench::BenchArgs),
    /// Serve the OpenAI-compatible HTTP API (completions, chat, models, health, metrics).
    Serve(cli::serve::ServeArgs),
}

/// Commands whose whole output is stdout lines (`tulu bench … | head -1`) end quietly when the
/// reader goes away, as Unix tools do, instead of failing on the next write: Rust ignores
/// SIGPIPE by default. (The server keeps ignoring it: its sockets report closed peers as errors.)
fn die_on_closed_stdout() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::logging::init();
    if matches!(cli.command, Command::Bench(_) | Command::Inspect { .. }) {
        die_on_closed_stdout();
    }
    let result = match cli.command {
        Command::Generate { model, prompt, prompt_file, chat, system, sampling } => {
            cli::generate::generate(&model, prompt, prompt_file, chat, system, &sampling)
        }
        Command::Chat { model, system, sampling } => cli::generate::chat(&model, system, &sampling),
        Command::Inspect { model, sizing } => cli::inspect::inspect(&model, &sizing),
        Command::Convert { gguf, out, dtype } => cli::convert::convert(&gguf, &out, &dtype),
        Command::Synth { preset, out, layers, dtype, seed, tokenizer } => {
            cli::convert::synth(&preset, &out, layers, dtype.as_deref(), seed, tokenizer)
        }
        Command::Bench(args) => cli::bench::bench(&args),
        Command::Serve(args) => cli::serve::serve(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
