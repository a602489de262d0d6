//! FP8 (e4m3) weights: which checkpoints hold them, and which modules; and the FP8 KV cache
//! ([`kv`]).
//!
//! A checkpoint says it is quantized in `config.json`'s `quantization_config` ([`config`]); a
//! bf16 checkpoint can also be quantized while it loads (`--quantize fp8`,
//! [`QuantMethod::AtLoad`]). Either way a linear weight ends up as e4m3 rows with one f32 scale
//! per output row ([`e4m3`]): per-row scales let q/k/v and gate/up — whose per-tensor scales
//! differ — be fused by concatenation, exactly, without requantizing, and let a tensor-parallel
//! rank take any rows with their scales.

pub mod config;
pub mod e4m3;
pub mod kv;

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// How weight scales are laid out in a pre-quantized checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleStrategy {
    /// One scale for the whole tensor (`weight_scale` of shape `[]` or `[1]`).
    Tensor,
    /// One scale per output row (`weight_scale` of shape `[out, 1]`).
    Channel,
}

/// How a pre-quantized checkpoint meant its activations to be quantized. Decode matmuls (and the
/// CPU reference) multiply bf16 activations by the e4m3 weights (weight-only); the GPU's FP8 GEMM
/// for prefill quantizes activations per token, bounded by `activation_scale_ub` where the
/// checkpoint has one. A static `input_scale` is checked, not applied: a per-token scale never
/// saturates where a calibrated per-tensor one can, and fused q/k/v parts carry different ones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActivationScheme {
    /// A calibrated per-tensor `input_scale` per linear (compressed-tensors static).
    StaticTensor,
    /// Scales computed per token at run time.
    DynamicToken,
    /// Per-token scales clamped by `activation_scale_ub` (fbgemm).
    DynamicTokenBounded(f64),
    /// Activations stay unquantized.
    None,
}

/// Where a model's FP8 weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum QuantMethod {
    /// compressed-tensors `float-quantized` (RedHatAI / neuralmagic `…-FP8`, `…-FP8-dynamic`).
    CompressedTensors {
        /// Weight scale layout.
        weights: ScaleStrategy,
        /// Activation scheme the checkpoint was calibrated for.
        activations: ActivationScheme,
    },
    /// Meta's `fbgemm_fp8` (row-wise weight scales, per-token activations).
    Fbgemm {
        /// `activation_scale_ub`.
        activation_scale_ub: f64,
    },
    /// A bf16/f16/f32 checkpoint quantized while loading (`--quantize fp8`): every linear weight
    /// but `lm_head` becomes e4m3 with per-row scales.
    AtLoad,
    /// A bf16/f16/f32 checkpoint quantized to GGML blocks while loading (`--quantize q8_0`): every
    /// linear weight but `lm_head` (the CPU backend only).
    BlocksAtLoad(BlockType),
}

/// The GGML block types `--quantize` makes (llama.cpp's formats, through candle-core).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockType {
    /// 32 int8 values and one f16 scale a block: 8.5 bits a weight.
    Q8_0,
    /// 256-value super-blocks of 4-bit values with 6-bit sub-block scales and minimums: 4.5 bits
    /// a weight (rows must be whole 256-value blocks).
    Q4K,
}

impl BlockType {
    /// candle-core's name for the type.
    pub fn ggml(self) -> candle_core::quantized::GgmlDType {
        match self {
            BlockType::Q8_0 => candle_core::quantized::GgmlDType::Q8_0,
            BlockType::Q4K => candle_core::quantized::GgmlDType::Q4K,
        }
    }

    /// The name `--quantize` takes.
    pub fn name(self) -> &'static str {
        match self {
            BlockType::Q8_0 => "q8_0",
            BlockType::Q4K => "q4_k",
        }
    }
}

/// One entry of an `ignore` / `modules_to_not_convert` list.
#[derive(Debug, Clone)]
pub enum ModulePattern {
    /// compressed-tensors: the exact module name.
    Exact(String),
    /// compressed-tensors `re:` entry, matched from the start of the module name.
    Regex(regex::Regex),
    /// fbgemm (as transformers matches it): any module whose name contains this.
    Contains(String),
}

impl PartialEq for ModulePattern {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ModulePattern::Exact(a), ModulePattern::Exact(b)) => a == b,
            (ModulePattern::Regex(a), ModulePattern::Regex(b)) => a.as_str() == b.as_str(),
            (ModulePattern::Contains(a), ModulePattern::Contains(b)) => a == b,
            _ => false,
        }
    }
}

impl ModulePattern {
    /// Whether `module` (e.g. `model.layers.0.self_attn.q_proj`) is matched.
    pub fn matches(&self, module: &str) -> bool {
        match self {
            ModulePattern::Exact(s) => s == module,
            ModulePattern::Regex(r) => r.find(module).is_some_and(|m| m.start() == 0),
            ModulePattern::Contains(s) => module.contains(s.as_str()),
        }
    }
}

/// A model's FP8 quantization.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantization {
    /// The method.
    pub method: QuantMethod,
    /// Modules kept in high precision (`ignore`, `modules_to_not_convert`).
    pub keep: Vec<ModulePattern>,
    /// The `quantization_config` object as read, written back unchanged by
    /// [`crate::config::ModelConfig::to_json`] (`None` for [`QuantMethod::AtLoad`]).
    pub raw: Option<serde_json::Value>,
}

impl Quantization {
    /// `--quantize fp8`.
    pub fn at_load() -> Self {
        Quantization { method: QuantMethod::AtLoad, keep: Vec::new(), raw: None }
    }

    /// Whether the list of kept modules names `module`.
    pub fn keeps(&self, module: &str) -> bool {
        self.keep.iter().any(|p| p.matches(module))
    }

    /// Whether linear `module` is FP8 when quantized while loading: all but `lm_head` (and what
    /// the list keeps).
    pub fn quantizes_at_load(&self, module: &str) -> bool {
        matches!(self.method, QuantMethod::AtLoad | QuantMethod::BlocksAtLoad(_))
            && module != "lm_head"
            && !self.keeps(module)
    }

    /// The block type linear weights are quantized to while loading (`--quantize q8_0`), if any.
    pub fn at_load_blocks(&self) -> Option<BlockType> {
        match self.method {
            QuantMethod::BlocksAtLoad(b) => Some(b),
            _ => None,
        }
    }

    /// Whether linear `module` is expected in FP8: quantized while loading, or not kept by the
    /// checkpoint's lists (a checkpoint's stored dtype has the last word when it loads; this is
    /// what sizing from `config.json` alone assumes).
    pub fn linear_is_fp8(&self, module: &str) -> bool {
        match self.method {
            QuantMethod::AtLoad => self.quantizes_at_load(module),
            QuantMethod::BlocksAtLoad(_) => false,
            _ => !self.keeps(module),
        }
    }

    /// The bound on per-token activation amaxes when activations are quantized to e4m3 (the GPU's
    /// FP8 GEMM for prefill): fbgemm's `activation_scale_ub`, else none.
    pub fn activation_bound(&self) -> Option<f32> {
        match self.method {
            QuantMethod::Fbgemm { activation_scale_ub } => Some(activation_scale_ub as f32),
            _ => None,
        }
    }

    /// A one-line description for `tulu inspect` and logs.
    pub fn describe(&self) -> String {
        match &self.method {
            QuantMethod::CompressedTensors { weights, activations } => {
                format!("fp8 e4m3 (compressed-tensors, {weights:?} weight scales, {activations:?} activations)")
            }
            QuantMethod::Fbgemm { activation_scale_ub } => {
                format!("fp8 e4m3 (fbgemm_fp8, row-wise weight scales, activation_scale_ub {activation_scale_ub})")
            }
            QuantMethod::AtLoad => "fp8 e4m3 (quantized while loading, per-row scales)".into(),
            QuantMethod::BlocksAtLoad(b) => format!("{} blocks (quantized while loading)", b.name()),
        }
    }
}

/// The `--quantize` choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    /// e4m3 weights with per-output-channel f32 scales.
    Fp8,
    /// GGML blocks (the CPU backend): `q8_0` or `q4_k`.
    Blocks(BlockType),
}

impl Quantize {
    /// Makes `cfg` load quantized: a checkpoint already in FP8 keeps its own scales; any other
    /// gets [`Quantization::at_load`] (or its block-type twin).
    pub fn apply(self, cfg: &mut crate::config::ModelConfig) {
        if cfg.quantization.is_none() {
            cfg.quantization = Some(match self {
                Quantize::Fp8 => Quantization::at_load(),
                Quantize::Blocks(b) => {
                    Quantization { method: QuantMethod::BlocksAtLoad(b), keep: Vec::new(), raw: None }
                }
            });
        }
    }
}

impl FromStr for Quantize {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp8" => Ok(Quantize::Fp8),
            "q8_0" => Ok(Quantize::Blocks(BlockType::Q8_0)),
            "q4_k" => Ok(Quantize::Blocks(BlockType::Q4K)),
            other => Err(Error::request("quantize", format!("unknown method `{other}` (fp8, q8_0 or q4_k)"))),
        }
    }
}

impl fmt::Display for Quantize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quantize::Fp8 => f.write_str("fp8"),
            Quantize::Blocks(b) => f.write_str(b.name()),
        }
    }
}
