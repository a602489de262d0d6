//! How to load and serve a model: [`EngineOptions`] and what the engine derives from them.

use std::time::Duration;

use crate::backend::Device;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::parallel::kv_policy::KvPolicy;
use crate::parallel::rendezvous::WorldSpec;
use crate::quant::kv::KvCacheDtype;
use crate::runtime::scheduler::SchedulerConfig;
use crate::runtime::speculative::Speculation;

/// How to load and serve a model.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// A local model directory or a Hugging Face repo id (`owner/name`).
    pub model: String,
    /// Where to run it.
    pub device: Device,
    /// Longest context (prompt + output) to support; default: the model's, capped at 8192.
    /// Lowered, with a warning, to what the KV cache can hold.
    pub max_context: Option<usize>,
    /// Show progress bars while downloading and loading.
    pub progress: bool,
    /// Most sequences in one step.
    pub max_num_seqs: usize,
    /// Most tokens (prompt chunks plus decodes) in one step.
    pub max_num_batched_tokens: usize,
    /// Bytes of KV cache on every rank; default: what `gpu_memory_utilization` of each rank's
    /// GPU leaves after its weights and a workspace, or 4 full contexts on a rank without device
    /// memory of its own (the CPU).
    pub kv_cache_memory: Option<u64>,
    /// Fraction of GPU memory the engine may use (weights, workspace and KV cache).
    pub gpu_memory_utilization: f64,
    /// Token slots per KV block.
    pub block_size: usize,
    /// Share full KV blocks between requests with the same prefix.
    pub prefix_caching: bool,
    /// Requests allowed to wait for admission before new ones are refused (`Error::Busy`).
    pub max_waiting: Option<usize>,
    /// Tensor-parallel ranks (in-process threads on the CPU backend).
    pub tp: usize,
    /// Ranks in separate processes (`WORLD_SIZE`, `RANK`, … or `--nnodes`): this process's place.
    /// Rank 0 runs the engine; the others run [`crate::ranks::run_rank`].
    pub world: Option<WorldSpec>,
    /// How long a rank waits for its peers (joining, and every collective) before failing.
    pub dist_timeout: Duration,
    /// A secret every rank of a multi-process world must present to join rank 0
    /// (`--dist-token` / `TULU_DIST_TOKEN`); `None`: no token.
    pub dist_token: Option<String>,
    /// Run every step eagerly: no CUDA graphs (`--enforce-eager`, as in vLLM).
    pub enforce_eager: bool,
    /// Let tensor-parallel ranks share GPUs, their collectives staged through host memory: slow,
    /// for tests and machines with fewer GPUs than ranks. Off (the default), `tp` CUDA ranks
    /// need a GPU each and NCCL, and anything less is an error naming why.
    pub share_gpus: bool,
    /// Quantize a bf16 checkpoint's linear weights while loading (`--quantize fp8`); an FP8
    /// checkpoint is FP8 without it.
    pub quantize: Option<crate::quant::Quantize>,
    /// Speculative decoding (`--speculative ngram`, or a draft model: `--draft-model`): off by
    /// default.
    pub speculation: Option<Speculation>,
    /// What the KV cache stores (`--kv-cache-dtype`): `auto` (the default) is e4m3 when the
    /// checkpoint's `quantization_config` has a `kv_cache_scheme`, else the model's type.
    pub kv_cache_dtype: KvCacheDtype,
}

impl EngineOptions {
    /// Options for `model` with defaults: `--device auto`, no progress bars.
    pub fn new(model: impl Into<String>) -> Self {
        EngineOptions {
            model: model.into(),
            device: Device::Auto,
            max_context: None,
            progress: false,
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            kv_cache_memory: None,
            gpu_memory_utilization: 0.9,
            block_size: 16,
            prefix_caching: true,
            max_waiting: None,
            tp: 1,
            world: None,
            dist_timeout: Duration::from_secs(300),
            dist_token: None,
            enforce_eager: false,
            share_gpus: false,
            quantize: None,
            speculation: None,
            kv_cache_dtype: KvCacheDtype::Auto,
        }
    }

    /// Sets the device.
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Sets the longest supported context.
    pub fn max_context(mut self, tokens: usize) -> Self {
        self.max_context = Some(tokens);
        self
    }

    /// Turns progress bars on or off.
    pub fn progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    /// Applies the load-time choices (`quantize`, `kv_cache_dtype`) to the checkpoint's `config`,
    /// the same on every rank.
    pub(crate) fn apply_to(&self, config: &mut ModelConfig) {
        if let Some(q) = self.quantize {
            q.apply(config);
        }
        self.kv_cache_dtype.apply(config);
    }

    /// Checks every option's range, naming the first one out of it.
    pub(crate) fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("max_num_seqs", self.max_num_seqs),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("tp", self.tp),
            ("block_size", self.block_size),
            ("max_context", self.max_context.unwrap_or(1)),
        ] {
            if v == 0 {
                return Err(Error::request(name, "must be at least 1"));
            }
        }
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            return Err(Error::request("gpu_memory_utilization", "must be in (0, 1]"));
        }
        self.speculation.as_ref().map_or(Ok(()), Speculation::validate)
    }

    /// The context the engine aims for: `max_context`, else the model's capped at 8192.
    pub(crate) fn wanted_context(&self, config: &ModelConfig) -> usize {
        match self.max_context {
            Some(n) => n.min(config.max_position_embeddings),
            None => config.max_position_embeddings.min(8192),
        }
    }

    /// How every rank sizes its KV cache.
    pub(crate) fn kv_policy(&self) -> KvPolicy {
        KvPolicy::new(self.kv_cache_memory, self.gpu_memory_utilization)
    }

    /// The description every rank opens from (rank 0's shard; other ranks take theirs), with
    /// RoPE tables for `context` positions.
    pub(crate) fn rank_plan(&self, context: usize) -> crate::ranks::RankPlan {
        crate::ranks::RankPlan {
            shard: crate::parallel::sharding::Shard::single(),
            max_positions: context,
            block_size: self.block_size,
            kv: self.kv_policy(),
            own_device: true,
            steps: self.step_limits(),
        }
    }

    /// What every rank reserves for its steps.
    pub(crate) fn step_limits(&self) -> crate::backend::StepLimits {
        crate::backend::StepLimits {
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            graphs: !self.enforce_eager,
        }
    }

    /// The scheduler's limits, sampling the first `sampled_columns` logits (the tokenizer's)
    /// of sequences of at most `context` positions.
    pub(crate) fn scheduler_config(&self, sampled_columns: usize, context: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs: self.max_num_seqs,
            max_num_batched_tokens: self.max_num_batched_tokens,
            sampled_columns,
            max_positions: context,
            speculation: self.speculation.clone(),
        }
    }
}
