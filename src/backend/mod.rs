//! The seam between the one forward pass ([`crate::model`]) and the devices it runs on.
//!
//! A backend owns its tensors, weights and KV cache; the model only calls the operations below,
//! each of which a CUDA backend implements as one (possibly fused) kernel launch. Activations
//! are 2-D: one row per token of the step, sequences concatenated.
//!
//! A backend is three traits, one job each: [`Backend`], the operations (what the forward pass
//! and the kernel tests call); [`Runtime`], the device runtime (reserving the step workspace,
//! framing steps, graphs, device memory; what the model runner drives); [`Profiling`], the
//! hooks `tulu bench` reads (launch counts, tuning choices, the read-bandwidth ceiling).

pub mod contract;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod profiling;
mod runtime;

pub use self::profiling::Profiling;
pub use self::runtime::{Runtime, StepInputs, StepLimits, StepShape};

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::quant::BlockType;
use crate::runtime::batch::Batch;
use crate::runtime::sampler::RowSampling;
use crate::runtime::token_mask::TokenMasks;
use crate::weights::fp8::Fp8Rows;
use crate::weights::random::RandomSlice;
use crate::weights::TensorSlice;

/// Where a model runs, as the user names it: `auto`, `cpu`, `cuda` or `cuda:N`.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The first CUDA GPU when one is usable, else the CPU.
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::Device { device: s.to_owned(), message: "expected auto, cpu, cuda or cuda:N".into() };
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Device::Cuda).map_err(|_| bad()),
                None => Err(bad()),
            },
        }
    }
}

impl Device {
    /// `auto` becomes the first CUDA GPU when this build has CUDA and one is usable, else the
    /// CPU (saying why in the log); an explicit `cuda` that cannot work is an error naming the
    /// reason.
    pub fn resolve(self) -> Result<Device> {
        #[cfg(feature = "cuda")]
        {
            match (self, cuda::cuda_available()) {
                (Device::Auto, Ok(())) => Ok(Device::Cuda(0)),
                (Device::Auto, Err(why)) => {
                    tracing::warn!("no usable CUDA GPU ({why}); running on the CPU");
                    Ok(Device::Cpu)
                }
                (Device::Cuda(_), Err(why)) => Err(Error::Device { device: self.to_string(), message: why }),
                (d, _) => Ok(d),
            }
        }
        #[cfg(not(feature = "cuda"))]
        match self {
            Device::Cuda(_) => Err(Error::Device {
                device: self.to_string(),
                message: "this build of tulu has no CUDA support (build with --features cuda)".into(),
            }),
            Device::Auto | Device::Cpu => Ok(Device::Cpu),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => write!(f, "auto"),
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Head geometry the attention operations need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl AttnDims {
    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Shape of a paged KV cache: `num_blocks` blocks of `block_size` token slots per layer, and
/// what each element is stored as.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCacheSpec {
    /// Decoder layers.
    pub layers: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Token slots per block.
    pub block_size: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// The element stored: the model's, or e4m3 with per-layer scales.
    pub kv: crate::quant::kv::KvFormat,
}

/// The operations of the Llama forward pass, implemented once per device. Each checks its
/// inputs with the one check of [`contract`] before touching memory, so both backends refuse
/// the same inputs with the same errors.
///
/// The ops that read the step's batch (embedding ids, positions, slots, block tables, the rows
/// to gather and sample) take the step itself, [`Backend::Step`], made once per step by
/// [`Runtime::begin_step`] (the model runner) or by [`Backend::step_for`] (an op called on its
/// own: kernel tests, benchmarks). No op infers which step it belongs to.
pub trait Backend: Send + Sync + 'static {
    /// Activations: `rows × cols`, one row per token.
    type Tensor: Send + Sync;
    /// A weight matrix or vector resident on the device.
    type Weight: Send + Sync;
    /// The paged KV cache of all layers.
    type KvCache: Send + Sync;
    /// One step's context: its batch and the rows it gathers, as the device reads them (CUDA:
    /// the metadata uploaded once, the graph bucket it is padded to; the CPU: the host batch).
    type Step;

    /// A short description of the device, for logs.
    fn describe(&self) -> String;

    /// The step of `inputs` for ops called outside a model step (kernel tests, benchmarks):
    /// checked and uploaded like [`Runtime::begin_step`]'s, but never padded for a graph, and
    /// its tensors are not carved from the step workspace.
    fn step_for(&self, inputs: &StepInputs<'_>) -> Result<Self::Step>;

    /// [`Backend::step_for`] a step with no batch at hand: one sequence feeding `ids` at
    /// positions `0..ids.len()` (one block), gathering `rows` — what [`Backend::embed`],
    /// [`Backend::gather_rows`] and [`Backend::sample`] need when called on their own.
    fn step_of_ids(&self, ids: &[u32], rows: &[usize]) -> Result<Self::Step> {
        let mut batch = Batch::new(ids.len().max(1));
        if !ids.is_empty() {
            batch.push(ids, 0, &[0])?;
        }
        self.step_for(&StepInputs { batch: &batch, ids, rows, dims: None, graphable: false, model: 0 })
    }

    /// Uploads one weight made of `parts` concatenated along rows (all with the same number of
    /// columns; a 1-D tensor is one row). Fusing q/k/v and gate/up is this concatenation, and a
    /// tensor-parallel rank passes only its slices.
    fn load_weight(&self, parts: &[TensorSlice<'_>]) -> Result<Self::Weight>;

    /// Loads a linear weight made of `parts` (as [`Backend::load_weight`]) as e4m3 rows with one
    /// f32 scale per row ([`crate::weights::fp8::Fp8Rows`]): F8_E4M3 parts keep their bits and
    /// scales, others are quantized row by row as they stream in. `activation_bound` is
    /// [`Fp8Rows::activation_bound`]. A backend without FP8 storage (the reference)
    /// keeps the dequantized values and unquantized activations, which is this default.
    fn load_fp8_weight(&self, parts: &[TensorSlice<'_>], activation_bound: Option<f32>) -> Result<Self::Weight> {
        let _ = activation_bound;
        let w = Fp8Rows::from_slices(parts)?;
        self.upload(&w.dequantize(), w.rows, w.cols)
    }

    /// [`Backend::random_weight`], quantized as [`Backend::load_fp8_weight`] quantizes.
    fn random_fp8_weight(&self, parts: &[RandomSlice], activation_bound: Option<f32>) -> Result<Self::Weight> {
        let _ = activation_bound;
        let w = Fp8Rows::from_random(parts)?;
        self.upload(&w.dequantize(), w.rows, w.cols)
    }

    /// Loads a linear weight made of `parts` quantized to GGML blocks of `block`
    /// (`--quantize q8_0`). Only the CPU backend has block kernels; this default refuses.
    fn load_block_weight(&self, parts: &[TensorSlice<'_>], block: BlockType) -> Result<Self::Weight> {
        let _ = parts;
        Err(Error::Backend(format!("--quantize {} runs on the CPU backend only ({})", block.name(), self.describe())))
    }

    /// [`Backend::random_weight`], quantized as [`Backend::load_block_weight`] quantizes.
    fn random_block_weight(&self, parts: &[RandomSlice], block: BlockType) -> Result<Self::Weight> {
        let _ = parts;
        Err(Error::Backend(format!("--quantize {} runs on the CPU backend only ({})", block.name(), self.describe())))
    }

    /// Whether FP8 weights stay in e4m3 on this device (one byte an element plus an f32 scale
    /// a row); when not, they take [`Backend::element_bytes`] like any weight. What a step's
    /// traffic and a rank's weights are counted in.
    fn stores_fp8(&self) -> bool {
        false
    }

    /// Generates one weight of pseudo-random `parts` concatenated along rows, on the device
    /// (benchmarks of model shapes without files; see [`crate::weights::random`]).
    fn random_weight(&self, parts: &[RandomSlice]) -> Result<Self::Weight>;

    /// Bytes each stored weight, activation and KV cache element takes (the figure a step's
    /// memory traffic is counted in).
    fn element_bytes(&self) -> usize;

    /// Uploads a host f32 matrix (RoPE tables).
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Weight>;

    /// Allocates the KV cache.
    fn new_kv_cache(&self, spec: &KvCacheSpec) -> Result<Self::KvCache>;

    /// Rows of the embedding table for the step's ids ([`StepInputs::ids`]), one per activation
    /// row of the step (a step padded for a graph looks up id 0 for its padding rows); ids past
    /// the table's rows give zero rows (a vocab-parallel rank looks up only the ids in its
    /// shard, and the ranks' results are summed).
    fn embed(&self, table: &Self::Weight, step: &Self::Step) -> Result<Self::Tensor>;

    /// `rms_norm(x) * weight`, accumulated in f32.
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Weight, eps: f32) -> Result<Self::Tensor>;

    /// `x += residual`, then returns `rms_norm(x) * weight` (fused on GPUs).
    fn add_rms_norm(
        &self,
        x: &mut Self::Tensor,
        residual: &Self::Tensor,
        weight: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Tensor>;

    /// `x · wᵀ` for `w` stored as `out_features × in_features`, as HF stores linear weights.
    fn matmul(&self, x: &Self::Tensor, w: &Self::Weight) -> Result<Self::Tensor>;

    /// Applies RoPE (tables `cos`, `sin`) to the q and k parts of a fused `qkv` activation at
    /// each token's position, writes k and v into `layer`'s cache slots, and returns the rotated q.
    #[allow(clippy::too_many_arguments)]
    fn rope_write_kv(
        &self,
        qkv: &Self::Tensor,
        cos: &Self::Weight,
        sin: &Self::Weight,
        layer: usize,
        cache: &mut Self::KvCache,
        step: &Self::Step,
        dims: AttnDims,
    ) -> Result<Self::Tensor>;

    /// `rope_write_kv(matmul(x, qkv), …)` for a fused `[q; k; v]` weight: one kernel where the
    /// backend has it (CUDA's decode GEMV with RoPE and the KV write in its epilogue, same bits
    /// as the pair); this default is the pair.
    #[allow(clippy::too_many_arguments)]
    fn matmul_rope_write_kv(
        &self,
        x: &Self::Tensor,
        qkv: &Self::Weight,
        cos: &Self::Weight,
        sin: &Self::Weight,
        layer: usize,
        cache: &mut Self::KvCache,
        step: &Self::Step,
        dims: AttnDims,
    ) -> Result<Self::Tensor> {
        let qkv = self.matmul(x, qkv)?;
        self.rope_write_kv(&qkv, cos, sin, layer, cache, step, dims)
    }

    /// Causal attention of each token's query over its sequence's cached keys and values
    /// (positions `0..=position`), read through the block tables.
    fn attention(
        &self,
        q: &Self::Tensor,
        layer: usize,
        cache: &Self::KvCache,
        step: &Self::Step,
        dims: AttnDims,
    ) -> Result<Self::Tensor>;

    /// `silu(gate) * up` for a fused `[gate | up]` activation.
    fn silu_mul(&self, gate_up: &Self::Tensor) -> Result<Self::Tensor>;

    /// `silu_mul(matmul(x, gate_up))` for a fused `[gate; up]` weight: one kernel where the
    /// backend has it (CUDA's decode GEMV with SiLU·mul in its epilogue, same bits as the pair);
    /// this default is the pair.
    fn matmul_silu_mul(&self, x: &Self::Tensor, gate_up: &Self::Weight) -> Result<Self::Tensor> {
        self.silu_mul(&self.matmul(x, gate_up)?)
    }

    /// The step's rows ([`StepInputs::rows`]) of `x`, in order (and, in a step padded for a
    /// graph, its padding rows after them).
    fn gather_rows(&self, x: &Self::Tensor, step: &Self::Step) -> Result<Self::Tensor>;

    /// Picks one token per row of `logits` with `per_row[r]`, by the rule of
    /// [`crate::runtime::sampler::sample_row`], never a column at or past `valid` (vocab
    /// padding); only the ids cross to the host. A row whose first `valid` logits are not all
    /// finite gets [`crate::runtime::sampler::NON_FINITE`] (the device flags it; no extra copy).
    /// With `masks` (structured outputs), row `r` takes only the columns of `masks.row(r)`:
    /// the others are not candidates (never picked, never checked). `logits` are the step's
    /// gathered rows: the padding rows of a step padded for a graph follow the sampled ones, and
    /// the step says how many there are.
    fn sample(
        &self,
        logits: &Self::Tensor,
        step: &Self::Step,
        per_row: &[RowSampling],
        valid: usize,
        masks: Option<&TokenMasks>,
    ) -> Result<Vec<u32>>;

    /// Copies `x` to the host, row-major.
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>>;
}
