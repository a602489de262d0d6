//! Ranks in separate processes: rank 0 runs the engine (tokenizer, requests, scheduler) and
//! hands every step to the other ranks over TCP; the others only load their shard and run the
//! steps they are given ([`run_rank`]).
//!
//! The TCP star to rank 0 carries the control messages (the [`Hello`] with the cache geometry,
//! then each step's inputs) and, on CPU ranks, the collectives too. CUDA ranks (feature `nccl`)
//! each drive the GPU `LOCAL_RANK` of their machine (offset by `--device cuda:N`) and meet in
//! an NCCL group whose unique id rank 0 creates and sends in its hello, so that every rank
//! follows rank 0's choice of device. NCCL collectives have no timeout: a rank that dies in
//! the middle of a step leaves its peers waiting in NCCL (the TCP control channel still fails
//! rank 0's next send, naming the rank).

use std::sync::Arc;
use std::time::Duration;

use super::worker::Runner;
use super::EngineOptions;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, Device};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::hub::{resolve_model, HubOptions};
use crate::model::Llama;
use crate::parallel::rendezvous::WorldSpec;
use crate::parallel::sharding::Shard;
use crate::parallel::tcp::{Hello, TcpComm};
use crate::parallel::Communicator;
use crate::runtime::batch::Batch;
use crate::runtime::sampler::{StepOutput, StepSampling};
use crate::weights::WeightStore;

/// Rank 0's runner: its own shard, the control star to the other ranks, and the communicator
/// the collectives go through (the star itself on CPUs, NCCL on GPUs).
pub(super) struct NodeRunner<B: Backend> {
    // Declared before the backend, so dropped before it (an NCCL communicator is torn down
    // while its device is still open).
    comm: Box<dyn Communicator<B>>,
    control: Arc<TcpComm>,
    model: Llama<B>,
    cache: B::KvCache,
    backend: B,
}

impl<B: Backend> Runner for NodeRunner<B> {
    fn step(&mut self, batch: &Batch, sampling: &StepSampling) -> Result<StepOutput> {
        self.control.send_step(batch, &sampling.rows)?;
        self.model.step(&self.backend, batch, &mut self.cache, sampling, &*self.comm)
    }
}

/// Rank 0: waits for every rank, tells them the cache geometry (and the NCCL id on GPUs), and
/// loads its own shard on `device`. Returns the runner, a description of the device and the KV
/// blocks of every rank's cache.
pub(super) fn start_node(
    spec: &WorldSpec,
    timeout: Duration,
    config: &ModelConfig,
    store: &WeightStore,
    mut hello: Hello,
    device: Device,
    on_layer: impl FnMut(usize),
) -> Result<(Box<dyn Runner>, String, usize)> {
    let control = Arc::new(TcpComm::accept(spec, timeout)?);
    let shard = Shard { rank: 0, world: spec.world_size };
    match device {
        Device::Cuda(first) => {
            #[cfg(feature = "nccl")]
            {
                use crate::backend::cuda::CudaBackend;
                use crate::parallel::nccl::NcclComm;
                let id = NcclComm::unique_id()?;
                hello.nccl_id = Some(id.to_vec());
                control.send_hello(&hello)?;
                let ordinal = first + spec.local_rank;
                let backend = CudaBackend::new(ordinal)?;
                let nccl = NcclComm::from_id(id, 0, spec.world_size, ordinal)?;
                let model = Llama::load(&backend, config, store, hello.max_positions, shard, on_layer)?;
                let blocks = agree_blocks(&backend, &model, &hello, &control)?;
                let cache = backend.new_kv_cache(&model.kv_cache_spec(blocks, hello.block_size))?;
                let device = format!("{} × {} processes (NCCL)", backend.describe(), spec.world_size);
                let runner = NodeRunner { comm: Box::new(nccl), control, model, cache, backend };
                Ok((Box::new(runner), device, blocks))
            }
            #[cfg(not(feature = "nccl"))]
            {
                let _ = (first, &mut hello, on_layer);
                Err(Error::Device {
                    device: device.to_string(),
                    message: "CUDA ranks in separate processes need NCCL: build with --features nccl \
                              (or run them on the CPU with --device cpu)"
                        .into(),
                })
            }
        }
        _ => {
            control.send_hello(&hello)?;
            let backend = CpuBackend::new();
            let model = Llama::load(&backend, config, store, hello.max_positions, shard, on_layer)?;
            let cache = backend.new_kv_cache(&model.kv_cache_spec(hello.num_blocks, hello.block_size))?;
            let device = format!("{} × {} processes", backend.describe(), spec.world_size);
            let runner = NodeRunner { comm: Box::new(control.clone()), control, model, cache, backend };
            Ok((Box::new(runner), device, hello.num_blocks))
        }
    }
}

/// Runs a rank other than 0 until rank 0 shuts down: connects, loads this rank's shard on the
/// device rank 0's hello implies (its GPU `LOCAL_RANK` when rank 0 sent an NCCL id), then runs
/// every step rank 0 sends. Returns `Ok` when rank 0 closes the connection between steps.
pub fn run_rank(opts: &EngineOptions) -> Result<()> {
    let spec = opts.world.as_ref().ok_or_else(|| Error::request("world", "run_rank needs a multi-process world"))?;
    if spec.rank == 0 {
        return Err(Error::request("RANK", "rank 0 runs the engine, not run_rank"));
    }
    let dir = resolve_model(&opts.model, &HubOptions { progress: false, config_only: false })?;
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let store = WeightStore::open(&dir)?;
    let control = TcpComm::connect(spec, opts.dist_timeout)?;
    let hello = control.recv_hello()?;
    let shard = Shard { rank: spec.rank, world: spec.world_size };
    match &hello.nccl_id {
        Some(id) => {
            #[cfg(feature = "nccl")]
            {
                use crate::backend::cuda::CudaBackend;
                use crate::parallel::nccl::{NcclComm, UNIQUE_ID_BYTES};
                let id: [u8; UNIQUE_ID_BYTES] = id
                    .as_slice()
                    .try_into()
                    .map_err(|_| Error::Backend(format!("rank 0 sent an NCCL id of {} bytes", id.len())))?;
                let first = match opts.device {
                    Device::Cuda(n) => n,
                    _ => 0,
                };
                let ordinal = first + spec.local_rank;
                let backend = CudaBackend::new(ordinal)?;
                let nccl = NcclComm::from_id(id, spec.rank, spec.world_size, ordinal)?;
                serve_steps(&backend, &config, &store, &hello, shard, &control, &nccl)
            }
            #[cfg(not(feature = "nccl"))]
            {
                let _ = id;
                Err(Error::Device {
                    device: "cuda".into(),
                    message: "rank 0 runs on CUDA with NCCL, but this build of tulu has no NCCL \
                              (build with --features nccl)"
                        .into(),
                })
            }
        }
        None => serve_steps(&CpuBackend::new(), &config, &store, &hello, shard, &control, &control),
    }
}

/// A non-zero rank's life: load the shard, then run each step rank 0 sends until it closes.
fn serve_steps<B: Backend>(
    backend: &B,
    config: &ModelConfig,
    store: &WeightStore,
    hello: &Hello,
    shard: Shard,
    control: &TcpComm,
    comm: &dyn Communicator<B>,
) -> Result<()> {
    let model = Llama::load(backend, config, store, hello.max_positions, shard, |_| {})?;
    let blocks = agree_blocks(backend, &model, hello, control)?;
    let mut cache = backend.new_kv_cache(&model.kv_cache_spec(blocks, hello.block_size))?;
    while let Some((batch, rows)) = control.recv_step()? {
        let sampling = StepSampling { rows, ..Default::default() };
        model.step(backend, &batch, &mut cache, &sampling, comm)?;
    }
    Ok(())
}

/// The KV blocks of every rank's cache: the hello's, or, when it says to size from memory, the
/// smallest number any rank's GPU has room for once its shard is loaded (every rank calls this).
fn agree_blocks<B: Backend>(backend: &B, model: &Llama<B>, hello: &Hello, control: &TcpComm) -> Result<usize> {
    let Some(utilization) = hello.kv_utilization else { return Ok(hello.num_blocks) };
    let mine = super::kv_capacity(backend, model, hello.block_size, utilization).unwrap_or(hello.num_blocks);
    let blocks = control.agree_min(mine as u64)? as usize;
    if blocks == 0 {
        return Err(Error::request(
            "gpu_memory_utilization",
            "no room for the KV cache on some rank once its weights are loaded: raise it, or add ranks",
        ));
    }
    Ok(blocks)
}
