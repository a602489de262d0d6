//! What FP8 weights cost in accuracy: a model loaded as stored and loaded with `--quantize fp8`
//! (both on the CPU backend, which computes in f32 from the dequantized weights), compared on
//! many prompts: `cargo bench --bench fp8_accuracy -- --model DIR` (prompts are paragraphs of the
//! repo's Markdown, tokenized, in windows) or `-- --preset tiny` (random weights, random prompts).
//!
//! `--w8a8` (built with `--features cuda`) runs the FP8 model on cuda:0 instead, where prefill
//! matmuls take cuBLASLt's FP8 GEMM with activations quantized per token (W8A8), against the same
//! f32 reference on the CPU: what FP8 prefill costs (decode stays weight-only). Under the CPU
//! emulation of CUDA: `scripts/cuda-emu cargo bench --features cuda,nccl --bench fp8_accuracy --
//! --w8a8 ...`.
//!
//! `--kv-cache-dtype fp8` gives the compared model an e4m3 KV cache (per-layer scales from the
//! checkpoint, else 1.0); with `--kv-only` its weights stay as stored, so the figures are what the
//! FP8 KV cache alone costs against the f32 cache.
//!
//! Prints one JSON line: every position's next-token logits compared (relative RMS error, the
//! largest error, how many logits stay within the first-order noise estimate), and the greedy
//! agreement rate — how often the argmax is the same — with the largest bf16 margin (top-1 minus
//! top-2 logit) among positions where it is not.

use std::path::{Path, PathBuf};

use clap::Parser;
use serde_json::json;
use tulu::unstable::backend::cpu::CpuBackend;
use tulu::unstable::backend::{Backend, Runtime};
use tulu::unstable::config::ModelConfig;
use tulu::unstable::model::Llama;
use tulu::unstable::parallel::sharding::Shard;
use tulu::unstable::parallel::SingleRank;
use tulu::unstable::quant::kv::KvCacheDtype;
use tulu::unstable::quant::Quantize;
use tulu::unstable::runtime::batch::Batch;
use tulu::unstable::tokenizer::Tokenizer;
use tulu::unstable::weights::WeightStore;
use tulu::{Error, Result};

/// The bench's flags (after `--`).
#[derive(Parser)]
struct Args {
    /// A model directory (safetensors, config.json, tokenizer.json).
    #[arg(long, short, conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// A preset shape with random weights instead.
    #[arg(long)]
    preset: Option<String>,
    /// Prompts compared.
    #[arg(long, default_value_t = 128)]
    prompts: usize,
    /// Tokens per prompt (longer paragraphs are cut).
    #[arg(long, default_value_t = 64)]
    len: usize,
    /// The FP8 model on cuda:0, prefill through the FP8 GEMM (activations quantized per token).
    #[arg(long)]
    w8a8: bool,
    /// What the weights are quantized to while loading: fp8 (the default), q8_0 or q4_k (GGML
    /// blocks on the CPU, computed by integer dot products against 8-bit activations).
    #[arg(long, default_value = "fp8")]
    quantize: Quantize,
    /// What the compared model's KV cache stores: auto (the checkpoint's), bf16 (the CPU's f32),
    /// or fp8 (e4m3).
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: KvCacheDtype,
    /// Leave the compared model's weights as stored (compare the KV cache alone).
    #[arg(long, conflicts_with = "w8a8")]
    kv_only: bool,
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

/// Consecutive `len`-token windows of the repo's Markdown files (README.md, docs/*.md), tokenized
/// whole: real English and code, the first `n` windows.
fn text_prompts(tok: &Tokenizer, n: usize, len: usize) -> Result<Vec<Vec<u32>>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    let docs = std::fs::read_dir(root.join("docs")).map_err(|e| Error::io(root.join("docs"), e))?;
    let mut more: Vec<PathBuf> =
        docs.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "md")).collect();
    more.sort();
    files.extend(more);
    let mut prompts = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| Error::io(&f, e))?;
        let ids = tok.encode_raw(&text)?;
        prompts.extend(ids.chunks_exact(len.max(1)).map(<[u32]>::to_vec));
    }
    prompts.truncate(n);
    Ok(prompts)
}

/// Every position's logits of `tokens`, one prefill.
fn logits<B: Runtime>(backend: &B, model: &Llama<B>, tokens: &[u32]) -> Result<Vec<f32>> {
    let blocks = tokens.len().div_ceil(16);
    let mut cache = backend.new_kv_cache(&model.kv_cache_spec(blocks, 16))?;
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut batch = Batch::new(16);
    batch.push(tokens, 0, &table)?;
    let rows: Vec<usize> = (0..tokens.len()).collect();
    model.forward(backend, &batch, &mut cache, &rows, &SingleRank)
}

fn argmax_and_margin(row: &[f32]) -> (usize, f32) {
    let (mut best, mut top, mut second) = (0, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &x) in row.iter().enumerate() {
        if x > top {
            (second, top, best) = (top, x, i);
        } else if x > second {
            second = x;
        }
    }
    (best, top - second)
}

fn run(args: &Args) -> Result<()> {
    let backend = CpuBackend::new();
    let (cfg, store, prompts, name) = match (&args.model, &args.preset) {
        (Some(dir), _) => {
            let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
            let prompts = text_prompts(&Tokenizer::from_dir(dir)?, args.prompts, args.len)?;
            (cfg, Some(WeightStore::open(dir)?), prompts, dir.display().to_string())
        }
        (None, Some(p)) => {
            let cfg = ModelConfig::preset(p)?;
            let prompts = (0..args.prompts as u32)
                .map(|s| tulu::unstable::engine::synthetic_prompt(args.len, cfg.vocab_size, s))
                .collect();
            (cfg, None, prompts, format!("preset {p} (random weights)"))
        }
        (None, None) => return Err(Error::request("model", "give --model DIR or --preset NAME")),
    };
    let mut quantized = cfg.clone();
    if !args.kv_only {
        args.quantize.apply(&mut quantized);
    }
    args.kv_cache_dtype.apply(&mut quantized);
    let max_context = args.len + 1;
    let dense = load(&backend, &cfg, store.as_ref(), max_context)?;
    let reference: Vec<Vec<f32>> = prompts.iter().map(|p| logits(&backend, &dense, p)).collect::<Result<_>>()?;
    let (quantized_logits, mode) = if args.w8a8 {
        (w8a8_logits(&quantized, store.as_ref(), max_context, &prompts)?, "w8a8 prefill on cuda:0 (FP8 GEMM)")
    } else {
        let fp8 = load(&backend, &quantized, store.as_ref(), max_context)?;
        let l = prompts.iter().map(|p| logits(&backend, &fp8, p)).collect::<Result<_>>()?;
        let mode = match (args.kv_only, args.quantize == Quantize::Fp8) {
            (true, _) => "weights as stored on the CPU",
            (false, true) => "weight-only on the CPU",
            (false, false) => "GGML blocks on the CPU",
        };
        (l, mode)
    };
    let mode = format!("{mode}, KV cache {}", quantized.kv_cache.name());
    report(&name, &mode, cfg.vocab_size, &reference, &quantized_logits);
    Ok(())
}

/// The model of `cfg` on `backend`: from `store`, or random weights (seed 7).
fn load<B: Backend>(backend: &B, cfg: &ModelConfig, store: Option<&WeightStore>, ctx: usize) -> Result<Llama<B>> {
    match store {
        Some(s) => Llama::load(backend, cfg, s, ctx, Shard::single(), |_| {}),
        None => Llama::random(backend, cfg, 7, ctx, Shard::single(), |_| {}),
    }
}

/// Every prompt's logits from the FP8 model on cuda:0 (prefill through the FP8 GEMM).
#[cfg(feature = "cuda")]
fn w8a8_logits(
    cfg: &ModelConfig,
    store: Option<&WeightStore>,
    ctx: usize,
    prompts: &[Vec<u32>],
) -> Result<Vec<Vec<f32>>> {
    let gpu = tulu::unstable::backend::cuda::CudaBackend::new(0)?;
    gpu.set_fp8_gemm(true);
    let model = load(&gpu, cfg, store, ctx)?;
    prompts.iter().map(|p| logits(&gpu, &model, p)).collect()
}

#[cfg(not(feature = "cuda"))]
fn w8a8_logits(_: &ModelConfig, _: Option<&WeightStore>, _: usize, _: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
    Err(Error::request("w8a8", "needs a build with `--features cuda`"))
}

/// Prints the comparison of `quantized` against `reference` (each prompt's rows of logits).
fn report(name: &str, mode: &str, vocab: usize, reference: &[Vec<f32>], quantized: &[Vec<f32>]) {
    let (mut positions, mut agree, mut worst_margin) = (0usize, 0usize, 0f32);
    let (mut err2, mut ref2, mut max_err) = (0f64, 0f64, 0f32);
    let (mut within, mut logits_n) = (0usize, 0usize);
    for (a, b) in reference.iter().zip(quantized) {
        for (ra, rb) in a.chunks(vocab).zip(b.chunks(vocab)) {
            let (ia, margin) = argmax_and_margin(ra);
            let (ib, _) = argmax_and_margin(rb);
            positions += 1;
            if ia == ib {
                agree += 1;
            } else {
                worst_margin = worst_margin.max(margin);
            }
            // First-order noise estimate of one logit: 2⁻⁴/√3 (e4m3's RMS relative rounding)
            // times the row's RMS logit, three standard deviations.
            let rms = (ra.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / vocab as f64).sqrt() as f32;
            let bound = 3.0 * 2f32.powi(-4) / 3f32.sqrt() * rms;
            for (x, y) in ra.iter().zip(rb) {
                let d = (x - y).abs();
                err2 += (d as f64).powi(2);
                ref2 += (*x as f64).powi(2);
                max_err = max_err.max(d);
                within += usize::from(d <= bound);
                logits_n += 1;
            }
        }
    }
    println!(
        "{}",
        json!({
            "case": "fp8_accuracy",
            "model": name,
            "fp8": mode,
            "prompts": reference.len(),
            "positions": positions,
            "greedy_agreement": agree as f64 / positions.max(1) as f64,
            "largest_margin_where_greedy_differs": worst_margin,
            "logit_relative_rms_error": (err2 / ref2.max(1e-30)).sqrt(),
            "largest_logit_error": max_err,
            "fraction_within_3_sigma_estimate": within as f64 / logits_n.max(1) as f64,
        })
    );
}
