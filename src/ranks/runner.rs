//! One rank of the model: the runner that owns the rank's backend, its shard of the weights, its
//! KV cache and its communicator, the only owner of device state. Every rank of every
//! deployment (a single rank, rank threads, rank processes) is opened by [`RankRunner::open`]:
//! load → measure capacity → agree with the other ranks (the smallest) → allocate.

use serde::{Deserialize, Serialize};

use crate::backend::{Runtime, StepLimits, StepShape};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::Llama;
use crate::parallel::kv_policy::KvPolicy;
use crate::parallel::sharding::Shard;
use crate::parallel::Communicator;
use crate::runtime::batch::Batch;
use crate::runtime::sampler::{StepOutput, StepSampling};
use crate::weights::WeightStore;

/// One rank's description, from the engine's options to its runner: the same type for a
/// single rank, rank threads and rank processes (to which it travels in rank 0's hello), the
/// same for every rank of a group but its shard.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RankPlan {
    /// This rank's place in its tensor-parallel group.
    pub shard: Shard,
    /// Positions the RoPE tables cover (the engine's context).
    pub max_positions: usize,
    /// Token slots per KV block.
    pub block_size: usize,
    /// How the KV cache is sized.
    pub kv: KvPolicy,
    /// Whether the rank has its device to itself, so that its free memory is its own to size
    /// the cache from; ranks sharing a GPU size it as a backend without device memory does.
    pub own_device: bool,
    /// What every step may hold (the step workspace and graphs are sized from it).
    pub steps: StepLimits,
}

/// What a rank opens: the model's config and weights, and its plan.
#[derive(Clone, Copy)]
pub(crate) struct RankSpec<'a> {
    pub config: &'a ModelConfig,
    pub store: &'a WeightStore,
    pub plan: RankPlan,
}

/// How a rank learns what every rank agrees on: given its own capacity in KV blocks, the
/// smallest over the group (the identity for a single rank).
pub(crate) type Agree<'a> = &'a mut dyn FnMut(u64) -> Result<u64>;

/// One rank: backend, model shard, KV cache and communicator.
pub(crate) struct RankRunner<B: Runtime> {
    // Declared before the backend, so dropped before it (an NCCL communicator is torn down
    // while its device is still open).
    comm: Box<dyn Communicator<B>>,
    model: Llama<B>,
    cache: B::KvCache,
    backend: B,
    num_blocks: usize,
}

impl<B: Runtime> RankRunner<B> {
    /// Loads this rank's shard, measures how many KV blocks its policy gives it, agrees on the
    /// smallest count with the other ranks through `agree`, and allocates the cache.
    pub fn open(
        backend: B,
        comm: Box<dyn Communicator<B>>,
        spec: &RankSpec<'_>,
        agree: Agree<'_>,
        on_layer: impl FnMut(usize),
    ) -> Result<Self> {
        let model = Llama::load(&backend, spec.config, spec.store, spec.plan.max_positions, spec.plan.shard, on_layer)?;
        // The step workspace comes first: the KV cache gets what is left.
        backend.reserve(&StepShape {
            limits: spec.plan.steps,
            max_positions: spec.plan.max_positions,
            block_size: spec.plan.block_size,
            workspace_bytes: model.workspace_bytes(&spec.plan.steps, backend.element_bytes()),
        })?;
        let bytes_per_token = model.kv_bytes_per_token(backend.element_bytes());
        let memory = if spec.plan.own_device { backend.device_memory() } else { None };
        let mine = spec.plan.kv.blocks(bytes_per_token, memory, spec.plan.block_size, spec.plan.max_positions);
        let num_blocks = usize::try_from(agree(mine)?).unwrap_or(usize::MAX);
        if num_blocks == 0 {
            return Err(spec.plan.kv.no_room(spec.plan.block_size));
        }
        let mut cache = backend.new_kv_cache(&model.kv_cache_spec(num_blocks, spec.plan.block_size))?;
        model.warm_up(&backend, &mut cache, &*comm, spec.plan.block_size, num_blocks)?;
        Ok(RankRunner { comm, model, cache, backend, num_blocks })
    }

    /// Runs one step on this rank; rank 0 returns the sampled tokens, the others nothing.
    pub fn step(&mut self, batch: &Batch, sampling: &StepSampling) -> Result<StepOutput> {
        self.model.step(&self.backend, batch, &mut self.cache, sampling, &*self.comm)
    }

    /// KV blocks in the cache.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// The backend's description, for logs.
    pub fn describe(&self) -> String {
        match self.backend.reserved_bytes() {
            0 => self.backend.describe(),
            n => format!("{}, step workspace {:.1} MiB", self.backend.describe(), n as f64 / (1 << 20) as f64),
        }
    }
}
