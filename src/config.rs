//! Hugging Face `config.json` and `generation_config.json` for `LlamaForCausalLM`.
//!
//! The files are read as JSON values field by field (not through a derive) so that every
//! error names the exact field that is missing, mistyped or inconsistent.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

/// The `llama3` RoPE frequency scaling of Llama 3.1 (`rope_scaling` with `rope_type: "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    /// How much the context was stretched (8.0 for Llama 3.1).
    pub factor: f64,
    /// Wavelengths longer than `original_max / low_freq_factor` are fully scaled.
    pub low_freq_factor: f64,
    /// Wavelengths shorter than `original_max / high_freq_factor` are left alone.
    pub high_freq_factor: f64,
    /// The context length the model was pre-trained with (8192 for Llama 3.1).
    pub original_max_position_embeddings: usize,
}

/// The architecture of a Llama-family model, validated so that its numbers fit together.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (GQA); divides `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Width of one head (`hidden_size / num_attention_heads` unless `head_dim` is given).
    pub head_dim: usize,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Llama 3 frequency scaling, when the config asks for it.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether `lm_head` reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Rows of the embedding and `lm_head` matrices (may exceed the tokenizer's size).
    pub vocab_size: usize,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids (config.json allows an int or a list).
    pub eos_token_ids: Vec<u32>,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// The dtype the checkpoint was saved in, as the config states it.
    pub torch_dtype: Option<String>,
    /// FP8 weights: the checkpoint's `quantization_config`, or `--quantize fp8`.
    pub quantization: Option<crate::quant::Quantization>,
    /// What the KV cache stores: e4m3 when `quantization_config.kv_cache_scheme` says so or
    /// `--kv-cache-dtype fp8` asks for it ([`crate::quant::kv`]), else the model's type.
    pub kv_cache: crate::quant::kv::KvDtype,
}

/// The sampling defaults and EOS ids of `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    /// Extra end-of-sequence ids.
    pub eos_token_ids: Vec<u32>,
    /// Whether the model's authors sample by default (false: greedy).
    pub do_sample: Option<bool>,
    /// Default temperature.
    pub temperature: Option<f32>,
    /// Default nucleus threshold.
    pub top_p: Option<f32>,
    /// Default top-k.
    pub top_k: Option<usize>,
    /// Default repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// Default cap on generated tokens.
    pub max_new_tokens: Option<usize>,
}

/// Field-by-field reader of one JSON object that names the file and field in every error.
struct Fields<'a> {
    file: &'a Path,
    obj: &'a Map<String, Value>,
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, message: impl Into<String>) -> Error {
        Error::config(self.file, format!("{}{field}", self.prefix), message)
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(field, format!("expected a non-negative integer, found {v}"))),
        }
    }

    fn usize(&self, field: &str) -> Result<usize> {
        self.usize_opt(field)?.ok_or_else(|| self.err(field, "missing"))
    }

    fn positive(&self, field: &str) -> Result<usize> {
        let n = self.usize(field)?;
        if n == 0 {
            return Err(self.err(field, "must be at least 1"));
        }
        Ok(n)
    }

    fn f64_opt(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a finite number, found {v}"))),
        }
    }

    fn positive_f64(&self, field: &str, default: Option<f64>) -> Result<f64> {
        let x = match (self.f64_opt(field)?, default) {
            (Some(x), _) => x,
            (None, Some(d)) => d,
            (None, None) => return Err(self.err(field, "missing")),
        };
        if x <= 0.0 {
            return Err(self.err(field, format!("must be positive, found {x}")));
        }
        Ok(x)
    }

    fn bool_opt(&self, field: &str) -> Result<Option<bool>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => {
                v.as_bool().map(Some).ok_or_else(|| self.err(field, format!("expected true or false, found {v}")))
            }
        }
    }

    fn str_opt(&self, field: &str) -> Result<Option<&'a str>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.err(field, format!("expected a string, found {v}"))),
        }
    }

    /// A token id list given as one integer or a list of integers.
    fn ids(&self, field: &str) -> Result<Vec<u32>> {
        let as_id = |v: &Value| v.as_u64().filter(|&n| n <= u32::MAX as u64).map(|n| n as u32);
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| as_id(v).ok_or_else(|| self.err(field, format!("expected token ids, found {v}"))))
                .collect(),
            Some(v) => as_id(v)
                .map(|id| vec![id])
                .ok_or_else(|| self.err(field, format!("expected a token id or a list of them, found {v}"))),
        }
    }
}

fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::config(path, "<root>", "expected a JSON object")),
        Err(e) => Err(Error::config(path, "<root>", format!("not valid JSON: {e}"))),
    }
}

impl ModelConfig {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_object(&read_json_object(path)?, path)
    }

    /// Parses and validates a `config.json` already in memory; `file` names it in errors.
    pub fn from_json(text: &str, file: &Path) -> Result<Self> {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => Self::from_object(&map, file),
            Ok(_) => Err(Error::config(file, "<root>", "expected a JSON object")),
            Err(e) => Err(Error::config(file, "<root>", format!("not valid JSON: {e}"))),
        }
    }

    fn from_object(obj: &Map<String, Value>, file: &Path) -> Result<Self> {
        let f = Fields { file, obj, prefix: "" };
        check_architecture(&f)?;
        let hidden_size = f.positive("hidden_size")?;
        let num_attention_heads = f.positive("num_attention_heads")?;
        let num_key_value_heads = f.usize_opt("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"),
            ));
        }
        let head_dim = match f.usize_opt("head_dim")? {
            Some(0) => return Err(f.err("head_dim", "must be at least 1")),
            Some(d) => d,
            None if hidden_size % num_attention_heads != 0 => {
                return Err(f.err(
                    "num_attention_heads",
                    format!(
                        "{num_attention_heads} does not divide hidden_size = {hidden_size} (and no head_dim is given)"
                    ),
                ))
            }
            None => hidden_size / num_attention_heads,
        };
        if head_dim % 2 != 0 {
            return Err(f.err("head_dim", format!("RoPE needs an even head dimension, found {head_dim}")));
        }
        // The KV scheme first: a quantization_config that only quantizes the KV cache is read as such.
        let kv_cache = crate::quant::kv::checkpoint_dtype(obj.get("quantization_config"), file)?;
        let cfg = ModelConfig {
            hidden_size,
            intermediate_size: f.positive("intermediate_size")?,
            num_hidden_layers: f.positive("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rope_theta: f.positive_f64("rope_theta", Some(10_000.0))?,
            rope_scaling: parse_rope_scaling(&f)?,
            rms_norm_eps: f.positive_f64("rms_norm_eps", None)?,
            tie_word_embeddings: f.bool_opt("tie_word_embeddings")?.unwrap_or(false),
            vocab_size: f.positive("vocab_size")?,
            bos_token_id: f.ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.ids("eos_token_id")?,
            max_position_embeddings: f.positive("max_position_embeddings")?,
            torch_dtype: f.str_opt("torch_dtype")?.map(str::to_owned),
            quantization: crate::quant::config::parse(obj.get("quantization_config"), file)?,
            kv_cache,
        };
        cfg.check_size(file)?;
        if let Some(dtype) = &cfg.torch_dtype {
            if !matches!(dtype.as_str(), "float32" | "float16" | "bfloat16") {
                return Err(f.err("torch_dtype", format!("unsupported dtype `{dtype}` (float32, float16 or bfloat16)")));
            }
        }
        Ok(cfg)
    }

    /// The config as a `config.json` object, as Hugging Face writes it.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": self.torch_dtype.clone().unwrap_or_else(|| "float32".into()),
            "rope_scaling": null,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() { [one] => json!(one), ids => json!(ids) },
        });
        if let Some(raw) = self.quantization.as_ref().and_then(|q| q.raw.clone()) {
            v["quantization_config"] = raw;
        }
        if let Some(s) = &self.rope_scaling {
            v["rope_scaling"] = json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            });
        }
        v
    }

    /// Query-head width times heads: the width of the attention output.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key (or value) projection.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Number of parameters, counting a tied `lm_head` once.
    pub fn parameter_count(&self) -> u64 {
        u64::try_from(self.parameter_count_wide()).unwrap_or(u64::MAX)
    }

    /// [`Self::parameter_count`] in arithmetic no dimension can overflow.
    fn parameter_count_wide(&self) -> u128 {
        let (h, i, v) = (self.hidden_size as u128, self.intermediate_size as u128, self.vocab_size as u128);
        let (q, kv) = (
            self.num_attention_heads as u128 * self.head_dim as u128,
            self.num_key_value_heads as u128 * self.head_dim as u128,
        );
        let layer = h * q * 2 + h * kv * 2 + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers as u128 * layer + h + head
    }

    /// Refuses dimensions past any model's, which would overflow the arithmetic every size is
    /// computed in: each is at most [`MAX_DIMENSION`], and together they describe at most
    /// [`MAX_PARAMETERS`] parameters. `file` names the config in the error.
    pub fn check_size(&self, file: &Path) -> Result<()> {
        let dims = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, v) in dims {
            if v > MAX_DIMENSION {
                return Err(Error::config(
                    file,
                    field,
                    format!("{v} is larger than any model's (at most {MAX_DIMENSION})"),
                ));
            }
        }
        let params = self.parameter_count_wide();
        if params > MAX_PARAMETERS as u128 {
            return Err(Error::config(
                file,
                "hidden_size",
                format!(
                    "the dimensions describe {params} parameters, more than any model's (at most {MAX_PARAMETERS})"
                ),
            ));
        }
        Ok(())
    }

    /// Bytes of K and V cached per token across all layers at `bytes_per_elem`.
    pub fn kv_bytes_per_token(&self, bytes_per_elem: usize) -> u64 {
        crate::parallel::sizing::kv_bytes_per_token(self, self.num_key_value_heads, bytes_per_elem as u64)
    }

    /// A named architecture for synthetic checkpoints: `tiny`, `llama-3.1-8b`, `llama-3.1-70b`,
    /// `llama-3.1-405b` (the Llama 3.1 / Tülu 3 shapes with Tülu 3's padded vocab).
    pub fn preset(name: &str) -> Result<Self> {
        let llama31 = |hidden, inter, layers, heads| ModelConfig {
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: 8,
            head_dim: hidden / heads,
            rope_theta: 500_000.0,
            rope_scaling: Some(Llama3RopeScaling {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            }),
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            vocab_size: 128_264,
            bos_token_id: Some(128_000),
            eos_token_ids: vec![128_001],
            max_position_embeddings: 131_072,
            torch_dtype: Some("bfloat16".into()),
            quantization: None,
            kv_cache: crate::quant::kv::KvDtype::Model,
        };
        Ok(match name {
            "tiny" => ModelConfig {
                hidden_size: 64,
                intermediate_size: 160,
                num_hidden_layers: 2,
                num_attention_heads: 8,
                num_key_value_heads: 2,
                head_dim: 8,
                vocab_size: 300,
                bos_token_id: Some(1),
                eos_token_ids: vec![2],
                max_position_embeddings: 512,
                rope_scaling: Some(Llama3RopeScaling {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 32,
                }),
                torch_dtype: Some("float32".into()),
                quantization: None,
                ..llama31(64, 160, 2, 8)
            },
            "llama-3.1-8b" => llama31(4096, 14336, 32, 32),
            "llama-3.1-70b" => llama31(8192, 28672, 80, 64),
            "llama-3.1-405b" => llama31(16384, 53248, 126, 128),
            other => {
                return Err(Error::request(
                    "preset",
                    format!("unknown preset `{other}` (tiny, llama-3.1-8b, llama-3.1-70b, llama-3.1-405b)"),
                ))
            }
        })
    }
}

fn check_architecture(f: &Fields) -> Result<()> {
    let archs = match f.get("architectures") {
        None => Vec::new(),
        Some(Value::Array(items)) => items.iter().map(|v| v.as_str().unwrap_or("?").to_owned()).collect(),
        Some(v) => return Err(f.err("architectures", format!("expected a list of names, found {v}"))),
    };
    if !archs.is_empty() && !archs.iter().any(|a| a == "LlamaForCausalLM") {
        return Err(f.err("architectures", format!("{archs:?} is not supported: tulu runs LlamaForCausalLM models")));
    }
    match f.str_opt("model_type")? {
        Some("llama") => {}
        Some(other) => return Err(f.err("model_type", format!("`{other}` is not supported: tulu runs `llama` models"))),
        None if archs.is_empty() => {
            return Err(f.err("architectures", "missing (neither `architectures` nor `model_type` is given)"))
        }
        None => {}
    }
    if let Some(act) = f.str_opt("hidden_act")? {
        if act != "silu" {
            return Err(f.err("hidden_act", format!("`{act}` is not supported (silu only)")));
        }
    }
    for field in ["attention_bias", "mlp_bias"] {
        if f.bool_opt(field)? == Some(true) {
            return Err(f.err(field, "biases are not supported by Llama 3.1 models"));
        }
    }
    Ok(())
}

fn parse_rope_scaling(f: &Fields) -> Result<Option<Llama3RopeScaling>> {
    let obj = match f.get("rope_scaling") {
        None => return Ok(None),
        Some(Value::Object(obj)) => obj,
        Some(v) => return Err(f.err("rope_scaling", format!("expected an object or null, found {v}"))),
    };
    let s = Fields { file: f.file, obj, prefix: "rope_scaling." };
    let kind = s.str_opt("rope_type")?.or(s.str_opt("type")?);
    match kind {
        Some("llama3") => {}
        Some("default") => return Ok(None),
        Some(other) => return Err(s.err("rope_type", format!("`{other}` is not supported (llama3 or none)"))),
        None => return Err(s.err("rope_type", "missing")),
    }
    let scaling = Llama3RopeScaling {
        factor: s.positive_f64("factor", None)?,
        low_freq_factor: s.positive_f64("low_freq_factor", None)?,
        high_freq_factor: s.positive_f64("high_freq_factor", None)?,
        original_max_position_embeddings: s.positive("original_max_position_embeddings")?,
    };
    if scaling.high_freq_factor <= scaling.low_freq_factor {
        return Err(s.err("high_freq_factor", "must be greater than low_freq_factor"));
    }
    Ok(Some(scaling))
}

impl GenerationConfig {
    /// Reads `generation_config.json`; a missing file gives the empty config.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Ok(Self::default());
        }
        let obj = read_json_object(path)?;
        let f = Fields { file: path, obj: &obj, prefix: "" };
        let f32_opt = |field: &str| -> Result<Option<f32>> { Ok(f.f64_opt(field)?.map(|x| x as f32)) };
        Ok(GenerationConfig {
            eos_token_ids: f.ids("eos_token_id")?,
            do_sample: f.bool_opt("do_sample")?,
            temperature: f32_opt("temperature")?,
            top_p: f32_opt("top_p")?,
            top_k: f.usize_opt("top_k")?,
            repetition_penalty: f32_opt("repetition_penalty")?,
            max_new_tokens: f.usize_opt("max_new_tokens")?,
        })
    }
}

/// The largest value of any one dimension of a config (2^24; Llama 3.1 405B's largest is
/// 131072 positions).
pub const MAX_DIMENSION: usize = 1 << 24;
/// The most parameters a config may describe (2^48; Llama 3.1 405B has about 2^38.6).
pub const MAX_PARAMETERS: u64 = 1 << 48;

/// The files of a model directory, by their Hugging Face names.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The directory itself.
    pub dir: PathBuf,
}

impl ModelFiles {
    /// `config.json`.
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    /// `generation_config.json` (optional).
    pub fn generation_config(&self) -> PathBuf {
        self.dir.join("generation_config.json")
    }
    /// `tokenizer.json`.
    pub fn tokenizer(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }
    /// `tokenizer_config.json` (optional; holds the chat template).
    pub fn tokenizer_config(&self) -> PathBuf {
        self.dir.join("tokenizer_config.json")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dimensions past any model's are refused naming the field, not left to overflow the size
    /// arithmetic (fuzzing found `num_hidden_layers: 2^64 - 1` panicking in parameter_count).
    #[test]
    fn impossible_dimensions_are_refused() {
        let file = Path::new("config.json");
        let base = ModelConfig::preset("llama-3.1-405b").unwrap().to_json();
        let with = |field: &str, v: Value| {
            let mut c = base.clone();
            c[field] = v;
            ModelConfig::from_json(&c.to_string(), file)
        };
        for (field, v) in [("num_hidden_layers", json!(u64::MAX)), ("vocab_size", json!(1u64 << 40))] {
            match with(field, v) {
                Err(Error::Config { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        let e = with("hidden_size", json!(1 << 24)).unwrap_err().to_string();
        assert!(e.contains("parameters"), "{e}");
        assert!(with("num_hidden_layers", json!(126)).is_ok());
    }
}
