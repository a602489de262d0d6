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
use crate::runtime::batch::Batch;
use crate::runtime::sampler::RowSampling;
use crate::runtime::token_mask::TokenMasks;
use crate::weights::random::RandomSlice;
use crate::weights::TensorSlice;

/// Where a model runs, as the user names it: `auto`, `cpu`, `cuda` or `cuda:N`.
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
    /// CPU (saying why on stderr); an explicit `cuda` that cannot work is an error naming the
    /// reason.
    pub fn resolve(self) -> Result<Device> {
        #[cfg(feature = "cuda")]
        {
            match (self, cuda::cuda_available()) {
                (Device::Auto, Ok(())) => Ok(Device::Cuda(0)),
                (Device::Auto, Err(why)) => {
                    eprintln!("tulu: no usable CUDA GPU ({why}); running on the CPU");
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
