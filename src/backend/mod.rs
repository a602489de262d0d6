//! The seam between the one forward pass ([`crate::model`]) and the devices it runs on.
//!
//! A backend owns its tensors, weights and KV cache; the model only calls the operations below,
//! each of which a CUDA backend implements as one (possibly fused) kernel launch. Activations
//! are 2-D: one row per token of the step, sequences concatenated.

pub mod contract;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

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

/// Shape of a paged KV cache: `num_blocks` blocks of `block_size` token slots per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

/// What a step hands the backend once, before its first op ([`Backend::begin_step`]).
#[derive(Debug, Clone, Copy)]
pub struct StepInputs<'a> {
    /// The step's sequences, positions, slots and block tables.
    pub batch: &'a Batch,
    /// The embedding rows to look up: the batch's token ids, shifted into this rank's
    /// vocabulary shard.
    pub ids: &'a [u32],
    /// The rows whose logits the step produces.
    pub rows: &'a [usize],
    /// Whether the step may run as a replayed graph: a decode step (one new token a sequence,
    /// every row sampled) whose logits stay on the device, on a communicator that can be captured.
    pub graphable: bool,
}

/// What a rank reserves at load for its steps ([`Backend::reserve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StepLimits {
    /// Most sequences in one step (the largest decode batch).
    pub max_num_seqs: usize,
    /// Most token rows in one step.
    pub max_num_batched_tokens: usize,
    /// Whether decode steps run as CUDA graphs (`--enforce-eager` turns them off).
    pub graphs: bool,
}

impl Default for StepLimits {
    fn default() -> Self {
        StepLimits { max_num_seqs: 64, max_num_batched_tokens: 2048, graphs: false }
    }
}

/// What [`Backend::reserve`] sizes: the rank's model shape, per step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepShape {
    /// The limits the engine schedules within.
    pub limits: StepLimits,
    /// Longest context (RoPE positions).
    pub max_positions: usize,
    /// Token slots per KV block.
    pub block_size: usize,
    /// Bytes of device memory the largest step's activations need at once (the model's estimate).
    pub workspace_bytes: usize,
}

/// The operations of the Llama forward pass, implemented once per device. Each checks its
/// inputs with the one check of [`contract`] before touching memory, so both backends refuse
/// the same inputs with the same errors.
pub trait Backend: Send + Sync + 'static {
    /// Activations: `rows × cols`, one row per token.
    type Tensor: Send + Sync;
    /// A weight matrix or vector resident on the device.
    type Weight: Send + Sync;
    /// The paged KV cache of all layers.
    type KvCache: Send + Sync;

    /// A short description of the device, for logs.
    fn describe(&self) -> String;

    /// Uploads one weight made of `parts` concatenated along rows (all with the same number of
    /// columns; a 1-D tensor is one row). Fusing q/k/v and gate/up is this concatenation, and a
    /// tensor-parallel rank passes only its slices.
    fn load_weight(&self, parts: &[TensorSlice<'_>]) -> Result<Self::Weight>;

    /// Loads a linear weight made of `parts` (as [`Backend::load_weight`]) as e4m3 rows with one
    /// f32 scale per row ([`crate::weights::fp8::Fp8Rows`]): F8_E4M3 parts keep their bits and
    /// scales, others are quantized row by row as they stream in. `activation_bound` is
    /// [`Fp8Rows::activation_bound`]. A backend without FP8 storage (the CPU, the reference)
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

    /// Measures the device's memory read bandwidth in bytes per second (the ceiling that
    /// batch-1 decode is reported against), reading `bytes` bytes several times.
    fn measure_read_bandwidth(&self, bytes: usize) -> Result<f64>;

    /// Free and total bytes of the device's memory; `None` when the backend has none of its
    /// own (the CPU: its caches are sized from `kv_cache_memory`).
    fn device_memory(&self) -> Option<(u64, u64)> {
        None
    }

    /// What the backend chose while running, for `tulu bench` (one JSON object per entry, e.g.
    /// the kernel picked for each matmul shape and both timings); empty when it chose nothing.
    fn tuning_report(&self) -> Vec<serde_json::Value> {
        Vec::new()
    }

    /// Reserves what every step needs, once, at load, before the KV cache is sized from what
    /// is left (CUDA: the step workspace and the persistent step buffers). The CPU needs nothing.
    fn reserve(&self, shape: &StepShape) -> Result<()> {
        let _ = shape;
        Ok(())
    }

    /// Bytes [`Backend::reserve`] took, for the load line.
    fn reserved_bytes(&self) -> usize {
        0
    }

    /// Starts a step: the backend receives its batch once (CUDA uploads positions, slots,
    /// block tables and work lists into persistent device buffers that every op of the step
    /// reads). Every op until [`Backend::end_step`] belongs to this step.
    fn begin_step(&self, step: &StepInputs<'_>) -> Result<()> {
        let _ = step;
        Ok(())
    }

    /// Ends the step [`Backend::begin_step`] started.
    fn end_step(&self) {}

    /// Runs the step's forward pass `body` and returns its logits. A backend with graphs
    /// replays a captured graph of `body` instead, for a step it may replay (see
    /// [`StepInputs::graphable`]); its logits may then have padding rows after the sampled ones.
    fn run_step(&self, body: &mut dyn FnMut() -> Result<Self::Tensor>) -> Result<Self::Tensor> {
        body()
    }

    /// The decode batch sizes the backend captures a graph for, after `reserve` (none: the CPU,
    /// or graphs off).
    fn graph_buckets(&self) -> Vec<usize> {
        Vec::new()
    }

    /// Kernel launches (captured graphs count their kernels) since the backend was made;
    /// `None` where nothing is launched (the CPU).
    fn launches(&self) -> Option<u64> {
        None
    }

    /// Uploads a host f32 matrix (RoPE tables).
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Weight>;

    /// Allocates the KV cache.
    fn new_kv_cache(&self, spec: &KvCacheSpec) -> Result<Self::KvCache>;

    /// Rows `ids` of the embedding table; ids past its rows give zero rows (a vocab-parallel
    /// rank looks up only the ids in its shard, and the ranks' results are summed).
    fn embed(&self, table: &Self::Weight, ids: &[u32]) -> Result<Self::Tensor>;

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
        batch: &Batch,
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
        batch: &Batch,
        dims: AttnDims,
    ) -> Result<Self::Tensor> {
        let qkv = self.matmul(x, qkv)?;
        self.rope_write_kv(&qkv, cos, sin, layer, cache, batch, dims)
    }

    /// Causal attention of each token's query over its sequence's cached keys and values
    /// (positions `0..=position`), read through the block tables.
    fn attention(
        &self,
        q: &Self::Tensor,
        layer: usize,
        cache: &Self::KvCache,
        batch: &Batch,
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

    /// The given rows of `x`, in order.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[usize]) -> Result<Self::Tensor>;

    /// Picks one token per row of `logits` with `per_row[r]`, by the rule of
    /// [`crate::runtime::sampler::sample_row`], never a column at or past `valid` (vocab
    /// padding); only the ids cross to the host. A row whose first `valid` logits are not all
    /// finite gets [`crate::runtime::sampler::NON_FINITE`] (the device flags it; no extra copy).
    /// With `masks` (structured outputs), row `r` takes only the columns of `masks.row(r)`:
    /// the others are not candidates (never picked, never checked).
    fn sample(
        &self,
        logits: &Self::Tensor,
        per_row: &[RowSampling],
        valid: usize,
        masks: Option<&TokenMasks>,
    ) -> Result<Vec<u32>>;

    /// Copies `x` to the host, row-major.
    fn to_host(&self, x: &Self::Tensor) -> Result<Vec<f32>>;
}
