//! `tulu serve`: load a model and serve the OpenAI-compatible API until SIGINT/SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use tulu::unstable::server::{self, ServerOptions};
use tulu::{Engine, Error, Result};

use crate::ModelArgs;

/// `tulu serve` flags.
#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (the bound address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Most sequences in one step.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Most tokens (prompt chunks plus decodes) in one step.
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Bytes of KV cache on every rank; default: what --gpu-memory-utilization of each GPU leaves
    /// after its weights, or 4 full contexts on the CPU.
    #[arg(long)]
    pub kv_cache_memory: Option<u64>,
    /// Token slots per KV block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Do not share KV blocks between requests with the same prefix.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Requests allowed to wait for admission; more are refused with 429.
    #[arg(long)]
    pub max_waiting: Option<usize>,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "TULU_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Seconds running requests may take to finish after SIGINT/SIGTERM before being aborted.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// The model id clients use and responses carry; default: --model as given.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
}

/// `tulu serve`.
pub fn serve(args: &ServeArgs) -> Result<()> {
    let shutdown_timeout = Duration::try_from_secs_f64(args.shutdown_timeout)
        .map_err(|_| Error::request("shutdown-timeout", "must be a number of seconds ≥ 0"))?;
    if args.api_key.as_deref() == Some("") {
        return Err(Error::request("api-key", "must not be empty"));
    }
    let mut opts = crate::cli::engine_options(&args.model)?;
    if crate::cli::run_if_not_rank0(&opts)? {
        return Ok(());
    }
    opts.max_num_seqs = args.max_num_seqs;
    opts.max_num_batched_tokens = args.max_num_batched_tokens;
    opts.kv_cache_memory = args.kv_cache_memory;
    opts.block_size = args.block_size;
    opts.prefix_caching = !args.no_prefix_caching;
    opts.max_waiting = args.max_waiting;
    let engine = Arc::new(Engine::load(opts)?);
    let blocks = engine.metrics().kv_blocks_total;
    eprintln!(
        "tulu serve: {} on {}; context {} tokens; KV cache {} blocks of {} tokens ({} tokens); prefix caching {}",
        engine.model_dir().display(),
        engine.device(),
        engine.context_len(),
        blocks,
        args.block_size,
        blocks * args.block_size,
        if args.no_prefix_caching { "off" } else { "on" },
    );
    let server_opts = ServerOptions {
        host: args.host.clone(),
        port: args.port,
        model_name: args.served_model_name.clone().unwrap_or_else(|| args.model.model.clone()),
        api_key: args.api_key.clone(),
        shutdown_timeout,
        body_limit: args.max_body_bytes,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tulu-http")
        .build()
        .map_err(|e| Error::Backend(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(server::serve(engine, server_opts))
}
