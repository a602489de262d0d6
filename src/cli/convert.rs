//! `tulu convert` and `tulu synth`.

use std::path::{Path, PathBuf};

use tulu::unstable::config::ModelConfig;
use tulu::unstable::synth::{synth_checkpoint, SynthOptions};
use tulu::unstable::weights::gguf::{convert_gguf, ConvertOptions, OutDType};
use tulu::{Error, Result};

fn out_dtype(name: &str) -> Result<OutDType> {
    match name {
        "f32" | "float32" => Ok(OutDType::F32),
        "bf16" | "bfloat16" => Ok(OutDType::Bf16),
        "f16" | "float16" => Ok(OutDType::F16),
        other => Err(Error::request("dtype", format!("`{other}` is not one of f32, bf16, f16"))),
    }
}

/// `tulu convert`: `keep` writes the GGUF itself beside its config and tokenizer files (blocks
/// stay blocks); a dtype dequantizes into safetensors.
pub fn convert(gguf: &Path, out: &Path, dtype: &str) -> Result<()> {
    if dtype == "keep" {
        tulu::unstable::weights::gguf_store::keep_gguf(gguf, out)?;
        eprintln!("wrote {} (weights kept as stored in the GGUF)", out.display());
        return Ok(());
    }
    let opts = ConvertOptions { dtype: out_dtype(dtype)?, progress: true };
    convert_gguf(gguf, out, &opts)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// `tulu synth`.
pub fn synth(
    preset: &str,
    out: &Path,
    layers: Option<usize>,
    dtype: Option<&str>,
    seed: u64,
    tokenizer: Option<PathBuf>,
) -> Result<()> {
    let mut cfg = ModelConfig::preset(preset)?;
    if let Some(n) = layers {
        if n == 0 {
            return Err(Error::request("layers", "must be at least 1"));
        }
        cfg.num_hidden_layers = n;
    }
    let dtype = out_dtype(dtype.or(cfg.torch_dtype.as_deref()).unwrap_or("f32"))?;
    cfg.torch_dtype = Some(dtype.torch_name().into());
    let opts = SynthOptions { dtype, seed, tokenizer, progress: true, ..SynthOptions::default() };
    synth_checkpoint(&cfg, out, &opts)?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
