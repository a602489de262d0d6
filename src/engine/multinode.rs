//! Ranks in separate processes: rank 0 runs the engine (tokenizer, requests, scheduler) and
//! hands every step to the other ranks over TCP; the others only load their shard and run the
//! steps they are given ([`run_rank`]).

use std::time::Duration;

use super::worker::Runner;
use super::EngineOptions;
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::hub::{resolve_model, HubOptions};
use crate::model::Llama;
use crate::parallel::rendezvous::WorldSpec;
use crate::parallel::sharding::Shard;
use crate::parallel::tcp::{Hello, TcpComm};
use crate::runtime::batch::Batch;
use crate::runtime::sampler::{StepOutput, StepSampling};
use crate::weights::WeightStore;

/// Rank 0's runner: its own shard, plus the star of connections to the other ranks.
pub(super) struct NodeRunner {
    backend: CpuBackend,
    model: Llama<CpuBackend>,
    cache: <CpuBackend as Backend>::KvCache,
    comm: TcpComm,
}

impl NodeRunner {
    /// Waits for every rank, tells them the cache geometry, and loads rank 0's shard.
    pub fn start(
        spec: &WorldSpec,
        timeout: Duration,
        config: &ModelConfig,
        store: &WeightStore,
        hello: Hello,
        on_layer: impl FnMut(usize),
    ) -> Result<Self> {
        let comm = TcpComm::accept(spec, timeout)?;
        comm.send_hello(&hello)?;
        let backend = CpuBackend::new();
        let shard = Shard { rank: 0, world: spec.world_size };
        let model = Llama::load(&backend, config, store, hello.max_positions, shard, on_layer)?;
        let cache = backend.new_kv_cache(&model.kv_cache_spec(hello.num_blocks, hello.block_size))?;
        Ok(NodeRunner { backend, model, cache, comm })
    }
}

impl Runner for NodeRunner {
    fn step(&mut self, batch: &Batch, sampling: &StepSampling) -> Result<StepOutput> {
        self.comm.send_step(batch, &sampling.rows)?;
        self.model.step(&self.backend, batch, &mut self.cache, sampling, &self.comm)
    }
}

/// Runs a rank other than 0 until rank 0 shuts down: connects, loads this rank's shard, then
/// runs every step rank 0 sends. Returns `Ok` when rank 0 closes the connection between steps.
pub fn run_rank(opts: &EngineOptions) -> Result<()> {
    let spec = opts.world.as_ref().ok_or_else(|| Error::request("world", "run_rank needs a multi-process world"))?;
    if spec.rank == 0 {
        return Err(Error::request("RANK", "rank 0 runs the engine, not run_rank"));
    }
    let dir = resolve_model(&opts.model, &HubOptions { progress: false, config_only: false })?;
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let store = WeightStore::open(&dir)?;
    let comm = TcpComm::connect(spec, opts.dist_timeout)?;
    let hello = comm.recv_hello()?;
    let backend = CpuBackend::new();
    let shard = Shard { rank: spec.rank, world: spec.world_size };
    let model = Llama::load(&backend, &config, &store, hello.max_positions, shard, |_| {})?;
    drop(store);
    let mut cache = backend.new_kv_cache(&model.kv_cache_spec(hello.num_blocks, hello.block_size))?;
    while let Some((batch, rows)) = comm.recv_step()? {
        model.forward(&backend, &batch, &mut cache, &rows, &comm)?;
    }
    Ok(())
}
