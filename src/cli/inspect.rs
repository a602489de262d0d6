//! `tulu inspect`: what a checkpoint is, without loading its weights.

use std::path::{Path, PathBuf};

use tulu::unstable::config::ModelConfig;
use tulu::unstable::hub::{resolve_model, HubOptions};
use tulu::unstable::parallel::sizing::{parse_bytes, size_rank, smallest_fitting_tp};
use tulu::unstable::quant::kv::{KvCacheDtype, KvDtype};
use tulu::unstable::weights::WeightStore;
use tulu::{Error, Result};

/// Flags that size a tensor-parallel deployment.
#[derive(clap::Args, Default)]
pub struct SizingArgs {
    /// Tensor-parallel ranks to size for (with --gpu-mem).
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Memory of one GPU, e.g. 80GiB or 141GB: prints the per-rank plan.
    #[arg(long)]
    pub gpu_mem: Option<String>,
    /// Fraction of GPU memory tulu may use.
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// Context length each sequence needs (default: the model's, capped at 8192).
    #[arg(long)]
    pub max_context: Option<u64>,
    /// Size the model as loaded with --quantize (fp8: linear weights in e4m3).
    #[arg(long)]
    pub quantize: Option<tulu::unstable::quant::Quantize>,
    /// Size the KV cache as loaded with --kv-cache-dtype (auto, bf16, fp8); the plan shows both.
    #[arg(long, default_value = "auto")]
    pub kv_cache_dtype: KvCacheDtype,
    /// `cpu`: size host memory as the CPU backend holds the checkpoint (its stored type, or
    /// --quantize's), by weight type, and its KV cache.
    #[arg(long)]
    pub device: Option<String>,
    /// Host memory for the KV cache (with --device cpu), e.g. 4GiB: how many tokens fit.
    #[arg(long)]
    pub kv_cache_memory: Option<String>,
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// `tulu inspect --model M`.
pub fn inspect(model: &str, sizing: &SizingArgs) -> Result<()> {
    let (dir, config_file): (PathBuf, PathBuf) = if model.ends_with(".json") && Path::new(model).is_file() {
        let file = PathBuf::from(model);
        (file.parent().map(Path::to_path_buf).unwrap_or_default(), file)
    } else {
        let dir = resolve_model(model, &HubOptions { progress: true, config_only: true })?;
        let file = dir.join("config.json");
        (dir, file)
    };
    let mut cfg = ModelConfig::from_file(&config_file)?;
    if let Some(q) = sizing.quantize {
        q.apply(&mut cfg);
    }
    sizing.kv_cache_dtype.apply(&mut cfg);
    println!("model: {}", dir.display());
    println!("architecture: LlamaForCausalLM");
    println!(
        "  hidden size {}, intermediate {}, layers {}",
        cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    );
    println!(
        "  heads {} (kv {}, head dim {}), vocab rows {}, tied embeddings {}",
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size, cfg.tie_word_embeddings
    );
    let scaling = cfg.rope_scaling.map_or("none".to_string(), |s| format!("llama3 (factor {})", s.factor));
    println!("  rope theta {}, scaling {scaling}, max positions {}", cfg.rope_theta, cfg.max_position_embeddings);
    println!("parameters: {} ({:.2} B)", cfg.parameter_count(), cfg.parameter_count() as f64 / 1e9);
    let [bf16, fp8] = [KvDtype::Model, KvDtype::Fp8].map(|d| ModelConfig { kv_cache: d, ..cfg.clone() });
    println!(
        "kv cache per token: {} bytes in bf16, {} in fp8; this load: {}",
        bf16.kv_bytes_per_token(2),
        fp8.kv_bytes_per_token(2),
        cfg.kv_cache.name()
    );
    if let Some(q) = &cfg.quantization {
        println!("quantization: {}", q.describe());
    }
    if let Some(mem) = &sizing.gpu_mem {
        plan(&cfg, mem, sizing)?;
    }
    if config_file.file_name().is_some_and(|f| f != "config.json") {
        return Ok(());
    }
    let cpu = match sizing.device.as_deref() {
        None => false,
        Some("cpu") => true,
        Some(other) => {
            return Err(Error::request("device", format!("`{other}`: inspect sizes host memory for `cpu` only")))
        }
    };
    if sizing.kv_cache_memory.is_some() && !cpu {
        return Err(Error::request("kv-cache-memory", "sizes the CPU backend's cache: add --device cpu"));
    }
    match WeightStore::open(&dir) {
        Ok(store) => {
            let mut total = 0;
            for (dtype, (bytes, elems)) in store.bytes_by_dtype() {
                println!("weights {}: {elems} elements, {} ({bytes} bytes)", dtype.name(), gib(bytes));
                total += bytes;
            }
            println!("weights total: {}", gib(total));
            if cpu {
                super::inspect_cpu::host_memory(&store, &cfg, sizing.kv_cache_memory.as_deref())?;
            }
        }
        Err(e) if cpu => return Err(e),
        Err(e) => println!("weights: not readable ({e})"),
    }
    Ok(())
}

/// Prints the per-rank memory plan, or refuses it with the smallest degree that fits.
fn plan(cfg: &ModelConfig, mem: &str, a: &SizingArgs) -> Result<()> {
    let gpu = parse_bytes(mem).ok_or_else(|| Error::request("gpu-mem", format!("`{mem}` is not a size like 80GiB")))?;
    if !(a.gpu_memory_utilization > 0.0 && a.gpu_memory_utilization <= 1.0) {
        return Err(Error::request("gpu-memory-utilization", "must be in (0, 1]"));
    }
    let context = a.max_context.unwrap_or(8192).min(cfg.max_position_embeddings as u64);
    let s = size_rank(cfg, a.tp, gpu, a.gpu_memory_utilization, 2, context)?;
    let weights = match (cfg.quantization.is_some(), cfg.kv_cache) {
        (true, KvDtype::Model) => "fp8 linear weights, bf16 embeddings, norms and KV",
        (true, KvDtype::Fp8) => "fp8 linear weights and KV, bf16 embeddings and norms",
        (false, KvDtype::Model) => "bf16 weights and KV",
        (false, KvDtype::Fp8) => "bf16 weights, fp8 KV",
    };
    println!("plan: tp {} on GPUs of {mem} at {:.0}% ({weights})", a.tp, a.gpu_memory_utilization * 100.0);
    println!("  weights per rank: {} ({} bytes)", gib(s.weight_bytes), s.weight_bytes);
    println!("  step workspace per rank: {} (the engine's default step limits)", gib(s.workspace_bytes));
    println!("  kv cache per token per rank: {} bytes ({})", s.kv_bytes_per_token, cfg.kv_cache.name());
    println!("  kv budget per rank: {} → {} tokens", gib(s.kv_budget), s.kv_tokens);
    println!("  kv tokens per rank by cache dtype:");
    for dtype in [KvDtype::Model, KvDtype::Fp8] {
        let other = size_rank(
            &ModelConfig { kv_cache: dtype, ..cfg.clone() },
            a.tp,
            gpu,
            a.gpu_memory_utilization,
            2,
            context,
        )?;
        println!(
            "    {:<11} {:>7} bytes/token  {:>10} tokens  {:>6} sequences of {context}",
            dtype.name(),
            other.kv_bytes_per_token,
            other.kv_tokens,
            other.concurrent_sequences
        );
    }
    println!(
        "  longest context: {} tokens; concurrent sequences of {context} tokens: {}",
        s.max_context, s.concurrent_sequences
    );
    if !s.fits() {
        let mut hint = match smallest_fitting_tp(cfg, gpu, a.gpu_memory_utilization, 2, context) {
            Some(n) => format!("the smallest tensor-parallel degree that fits is --tp {n}"),
            None => "no tensor-parallel degree up to 64 fits".into(),
        };
        if cfg.quantization.is_none() {
            let mut fp8 = cfg.clone();
            tulu::unstable::quant::Quantize::Fp8.apply(&mut fp8);
            if let Some(n) = smallest_fitting_tp(&fp8, gpu, a.gpu_memory_utilization, 2, context) {
                hint.push_str(&format!("; with --quantize fp8, --tp {n}"));
            }
        }
        return Err(Error::request(
            "tp",
            format!("{} does not fit a {context}-token context on {mem} GPUs; {hint}", a.tp),
        ));
    }
    Ok(())
}
