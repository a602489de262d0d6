//! The KV cache's element type: the model's own (bf16 on CUDA, f32 on the CPU) or e4m3 with a
//! per-layer scale for K and one for V (`--kv-cache-dtype fp8`).
//!
//! The scales follow vLLM's convention: a stored e4m3 value `q` means `q · scale`, so the KV
//! write stores `x / scale` (saturating at ±448) and attention reads `q · scale`. A checkpoint
//! calibrated for an FP8 cache carries them as tensors; one without them gets 1.0 (e4m3 then
//! covers ±448 with 3 mantissa bits, ample for post-RoPE keys and values of Llama models).

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::weights::{DType, WeightStore};

/// The `--kv-cache-dtype` choices.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    /// The checkpoint's choice: e4m3 when `config.json`'s `quantization_config` has a
    /// `kv_cache_scheme` (the checkpoint was calibrated for an FP8 cache), else the model's type.
    #[default]
    Auto,
    /// The model's activation type (bf16 on CUDA, f32 on the CPU).
    Bf16,
    /// e4m3 (`float8_e4m3fn`), one byte an element, with per-layer K and V scales.
    Fp8,
}

impl FromStr for KvCacheDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(KvCacheDtype::Auto),
            "bf16" | "bfloat16" => Ok(KvCacheDtype::Bf16),
            "fp8" | "fp8_e4m3" => Ok(KvCacheDtype::Fp8),
            other => Err(Error::request(
                "--kv-cache-dtype",
                format!("unknown KV cache dtype `{other}` (auto, bf16, fp8 or fp8_e4m3)"),
            )),
        }
    }
}

impl fmt::Display for KvCacheDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvCacheDtype::Auto => "auto",
            KvCacheDtype::Bf16 => "bf16",
            KvCacheDtype::Fp8 => "fp8",
        })
    }
}

impl KvCacheDtype {
    /// Sets `cfg.kv_cache` to this choice; `auto` keeps what the checkpoint said.
    pub fn apply(self, cfg: &mut ModelConfig) {
        match self {
            KvCacheDtype::Auto => {}
            KvCacheDtype::Bf16 => cfg.kv_cache = KvDtype::Model,
            KvCacheDtype::Fp8 => cfg.kv_cache = KvDtype::Fp8,
        }
    }
}

/// What a model's KV cache stores, once `--kv-cache-dtype` is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// The backend's activation element (bf16 on CUDA, f32 on the CPU).
    #[default]
    Model,
    /// e4m3, one byte an element.
    Fp8,
}

impl KvDtype {
    /// Bytes one cached element takes on a backend whose activation element is
    /// `element_bytes`: the one place an FP8 cache counts 1.
    pub fn element_bytes(self, element_bytes: u64) -> u64 {
        match self {
            KvDtype::Model => element_bytes,
            KvDtype::Fp8 => 1,
        }
    }

    /// A short name for logs and `tulu inspect`.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::Model => "bf16",
            KvDtype::Fp8 => "fp8 e4m3",
        }
    }
}

/// One layer's KV scales: a stored e4m3 key `q` means `q · k`, a value `q · v`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvScale {
    /// The keys' scale.
    pub k: f32,
    /// The values' scale.
    pub v: f32,
}

impl KvScale {
    /// No scaling: what a checkpoint without scale tensors gets.
    pub const ONE: KvScale = KvScale { k: 1.0, v: 1.0 };
}

/// How a KV cache stores its elements, with what it needs to: what a backend allocates.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum KvFormat {
    /// The backend's activation element.
    #[default]
    Model,
    /// e4m3 with each layer's scales (one entry per layer of the cache).
    Fp8(Arc<[KvScale]>),
}

impl KvFormat {
    /// The resolved dtype.
    pub fn dtype(&self) -> KvDtype {
        match self {
            KvFormat::Model => KvDtype::Model,
            KvFormat::Fp8(_) => KvDtype::Fp8,
        }
    }
}

/// The KV dtype `config.json` asks for: e4m3 when `quantization_config.kv_cache_scheme` is an
/// 8-bit float scheme (compressed-tensors, as llm-compressor writes it), the model's otherwise.
/// Any other scheme is an error naming the field rather than a cache it is not.
pub fn checkpoint_dtype(quantization_config: Option<&Value>, file: &Path) -> Result<KvDtype> {
    let scheme = match quantization_config.and_then(|q| q.get("kv_cache_scheme")) {
        None | Some(Value::Null) => return Ok(KvDtype::Model),
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(Error::config(
                file,
                "quantization_config.kv_cache_scheme",
                format!("expected an object, found {other}"),
            ))
        }
    };
    let err = |field: &str, message: String| {
        Error::config(file, format!("quantization_config.kv_cache_scheme.{field}"), message)
    };
    match scheme.get("num_bits").and_then(Value::as_u64) {
        Some(8) => {}
        other => return Err(err("num_bits", format!("{other:?} is not supported (8: an e4m3 cache)"))),
    }
    match scheme.get("type").and_then(Value::as_str) {
        Some("float") => {}
        other => return Err(err("type", format!("{other:?} is not supported (float: an e4m3 cache)"))),
    }
    if let Some(s) = scheme.get("strategy").and_then(Value::as_str) {
        if s != "tensor" {
            return Err(err("strategy", format!("`{s}` is not supported (tensor: one scale per layer)")));
        }
    }
    Ok(KvDtype::Fp8)
}

/// The names a layer's K and V scales go by, in the order they are looked for: vLLM's
/// (`self_attn.k_scale`), llm-compressor's older output scales (`self_attn.k_proj.output_scale`)
/// and the legacy single `self_attn.kv_scale` for both.
fn scale_names(layer: usize) -> [(String, String); 3] {
    let p = format!("model.layers.{layer}.self_attn");
    [
        (format!("{p}.k_scale"), format!("{p}.v_scale")),
        (format!("{p}.k_proj.output_scale"), format!("{p}.v_proj.output_scale")),
        (format!("{p}.kv_scale"), format!("{p}.kv_scale")),
    ]
}

/// One scale tensor's value: a float of one element, finite and positive, else an error
/// naming the tensor.
fn scale_value(store: &WeightStore, name: &str) -> Result<f32> {
    let t = store.get_any(name)?;
    let fail = |message: String| Error::weights(t.file, Some(t.name), message);
    if !matches!(t.dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(fail(format!("a KV scale must be F32, BF16 or F16, found {}", t.dtype.name())));
    }
    if t.len() != 1 {
        return Err(fail(format!("a KV scale must be one value, found shape {:?}", t.shape)));
    }
    let mut v = Vec::with_capacity(1);
    t.extend_f32(0..1, &mut v);
    match v.first() {
        Some(&s) if s.is_finite() && s > 0.0 => Ok(s),
        Some(&s) => Err(fail(format!("a KV scale must be finite and positive, found {s}"))),
        None => Err(fail("a KV scale must be one value".into())),
    }
}

/// Every layer's KV scales from `store`, by the first of its names it holds
/// (`self_attn.k_scale`/`v_scale`, `k_proj`/`v_proj.output_scale`, legacy `kv_scale`); a
/// layer with none gets [`KvScale::ONE`].
pub fn load_scales(cfg: &ModelConfig, store: &WeightStore) -> Result<Arc<[KvScale]>> {
    let mut scales = Vec::with_capacity(cfg.num_hidden_layers);
    for l in 0..cfg.num_hidden_layers {
        let found = scale_names(l).into_iter().find(|(k, v)| store.contains(k) || store.contains(v));
        scales.push(match found {
            Some((k, v)) => KvScale { k: scale_value(store, &k)?, v: scale_value(store, &v)? },
            None => KvScale::ONE,
        });
    }
    if scales.iter().all(|s| *s == KvScale::ONE) {
        tracing::info!("FP8 KV cache: the checkpoint has no k_scale/v_scale tensors; every scale is 1.0");
    }
    Ok(scales.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_parse_and_unknown_ones_name_the_flag() {
        assert_eq!("auto".parse::<KvCacheDtype>().unwrap(), KvCacheDtype::Auto);
        assert_eq!("bf16".parse::<KvCacheDtype>().unwrap(), KvCacheDtype::Bf16);
        assert_eq!("fp8".parse::<KvCacheDtype>().unwrap(), KvCacheDtype::Fp8);
        assert_eq!("fp8_e4m3".parse::<KvCacheDtype>().unwrap(), KvCacheDtype::Fp8);
        let e = "int4".parse::<KvCacheDtype>().unwrap_err().to_string();
        assert!(e.contains("--kv-cache-dtype") && e.contains("int4"), "{e}");
    }

    #[test]
    fn kv_cache_scheme_resolves_auto() {
        let file = Path::new("config.json");
        assert_eq!(checkpoint_dtype(None, file).unwrap(), KvDtype::Model);
        let q = serde_json::json!({"kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor"}});
        assert_eq!(checkpoint_dtype(Some(&q), file).unwrap(), KvDtype::Fp8);
        let q = serde_json::json!({"kv_cache_scheme": {"num_bits": 4, "type": "int"}});
        let e = checkpoint_dtype(Some(&q), file).unwrap_err().to_string();
        assert!(e.contains("kv_cache_scheme.num_bits"), "{e}");
    }

    #[test]
    fn choices_apply_over_the_checkpoint() {
        let mut cfg = ModelConfig::preset("tiny").unwrap();
        cfg.kv_cache = KvDtype::Fp8;
        KvCacheDtype::Auto.apply(&mut cfg);
        assert_eq!(cfg.kv_cache, KvDtype::Fp8);
        KvCacheDtype::Bf16.apply(&mut cfg);
        assert_eq!(cfg.kv_cache, KvDtype::Model);
        KvCacheDtype::Fp8.apply(&mut cfg);
        assert_eq!(cfg.kv_cache, KvDtype::Fp8);
    }
}
