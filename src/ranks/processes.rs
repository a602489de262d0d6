//! Ranks in separate processes: rank 0 runs the engine (tokenizer, requests, scheduler) and
//! hands every step to the other ranks over TCP; the others only open their rank and run the
//! steps they are given ([`run_rank`]). Every rank opens its [`RankRunner`] as any rank does,
//! agreeing on the KV cache size over the same TCP star.
//!
//! The star carries the control messages (the [`Hello`] with the cache geometry, then each
//! step's inputs) and, on CPU ranks, the collectives too. CUDA ranks (feature `nccl`) each drive
//! the GPU `LOCAL_RANK` of their machine (offset by `--device cuda:N`) and meet in an NCCL group
//! whose unique id rank 0 creates and sends in its hello, so that every rank follows rank 0's
//! choice of device. NCCL collectives have no timeout of their own: a [`Watchdog`] on every rank
//! aborts the group when a step outlives `--dist-timeout`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::runner::{RankPlan, RankRunner, RankSpec};
use super::watchdog::Watchdog;
use super::{Opened, Ranks};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Device, Runtime};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::hub::{resolve_model, HubOptions};
use crate::options::EngineOptions;
use crate::parallel::handshake::Handshake;
use crate::parallel::rendezvous::WorldSpec;
use crate::parallel::sharding::Shard;
use crate::parallel::tcp::TcpComm;
use crate::runtime::batch::Batch;
use crate::runtime::sampler::{StepOutput, StepSampling};
use crate::weights::WeightStore;

/// Rank 0's side: its own rank, and the control star to the other ranks.
struct RankProcesses<B: Runtime> {
    watchdog: Option<Watchdog>,
    runner: RankRunner<B>,
    control: Arc<TcpComm>,
}

impl<B: Runtime> Ranks for RankProcesses<B> {
    fn step(&mut self, batch: &Batch, sampling: &StepSampling) -> Result<StepOutput> {
        self.control.send_step(batch, &sampling.rows)?;
        let _armed = self.watchdog.as_ref().map(Watchdog::arm);
        self.runner.step(batch, sampling)
    }
}

/// What rank 0 tells every rank before loading, so that every rank opens its runner alike.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Hello {
    /// Rank 0's plan: every rank opens with it, its own shard in place of rank 0's. Its KV
    /// policy sizes every rank's cache; after loading, all take the smallest block count.
    pub plan: RankPlan,
    /// The NCCL unique id every rank joins with, when rank 0 runs on CUDA (the other ranks
    /// then run on their GPUs too); `None` on CPUs.
    #[serde(default)]
    pub nccl_id: Option<Vec<u8>>,
}

impl Hello {
    /// The hello as it travels (JSON: sent once, at start-up).
    pub fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::Backend(format!("encoding the hello: {e}")))
    }

    /// A hello received from rank 0.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| Error::Backend(format!("bad hello from rank 0: {e}")))
    }
}

/// Rank 0: waits for every rank, tells them how to open theirs (and the NCCL id on GPUs), and
/// opens its own on `device`.
pub(crate) fn open(
    world: &WorldSpec,
    opts: &EngineOptions,
    spec: &RankSpec<'_>,
    device: Device,
    bar: &indicatif::ProgressBar,
) -> Result<Opened> {
    if world.rank != 0 {
        return Err(Error::request("RANK", format!("rank {} runs `run_rank`, not the engine", world.rank)));
    }
    if opts.tp > 1 && opts.tp != world.world_size {
        return Err(Error::request("tp", format!("is {} but WORLD_SIZE is {}", opts.tp, world.world_size)));
    }
    let handshake = Handshake::new(spec.config, world, opts.dist_token.as_deref())?;
    let control = Arc::new(TcpComm::accept(world, &handshake, opts.dist_timeout)?);
    let spec = RankSpec { plan: RankPlan { shard: Shard { rank: 0, world: world.world_size }, ..spec.plan }, ..*spec };
    let on_layer = |l: usize| bar.set_position(l as u64);
    let mut hello = Hello { plan: spec.plan, nccl_id: None };
    match device {
        Device::Cuda(first) => {
            #[cfg(feature = "nccl")]
            {
                use crate::backend::cuda::CudaBackend;
                use crate::parallel::nccl::NcclComm;
                let id = NcclComm::unique_id()?;
                hello.nccl_id = Some(id.to_vec());
                control.send_hello(&hello.encode()?)?;
                let ordinal = first + world.local_rank;
                let backend = CudaBackend::new(ordinal)?;
                let nccl = Arc::new(NcclComm::from_id(id, 0, world.world_size, ordinal)?);
                let watchdog = nccl_watchdog(&nccl, opts.dist_timeout);
                let mut agree = |mine| control.agree_min(mine);
                let runner = RankRunner::open(backend, Box::new(nccl), &spec, &mut agree, on_layer)?;
                let device = format!("{} × {} processes (NCCL)", runner.describe(), world.world_size);
                let num_blocks = runner.num_blocks();
                let ranks = RankProcesses { watchdog: Some(watchdog), runner, control };
                Ok(Opened { ranks: Box::new(ranks), device, num_blocks })
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
            control.send_hello(&hello.encode()?)?;
            // The TCP collectives time out by themselves: no watchdog.
            let mut agree = |mine| control.agree_min(mine);
            let runner = RankRunner::open(CpuBackend::new(), Box::new(control.clone()), &spec, &mut agree, on_layer)?;
            let device = format!("{} × {} processes", runner.describe(), world.world_size);
            let num_blocks = runner.num_blocks();
            Ok(Opened { ranks: Box::new(RankProcesses { watchdog: None, runner, control }), device, num_blocks })
        }
    }
}

/// Runs a rank other than 0 until rank 0 shuts down: connects, opens this rank on the device
/// rank 0's hello implies (its GPU `LOCAL_RANK` when rank 0 sent an NCCL id), then runs every
/// step rank 0 sends. Returns `Ok` when rank 0 closes the connection between steps.
pub fn run_rank(opts: &EngineOptions) -> Result<()> {
    let world = opts.world.as_ref().ok_or_else(|| Error::request("world", "run_rank needs a multi-process world"))?;
    if world.rank == 0 {
        return Err(Error::request("RANK", "rank 0 runs the engine, not run_rank"));
    }
    let dir = resolve_model(&opts.model, &HubOptions { progress: false, config_only: false })?;
    let mut config = ModelConfig::from_file(&dir.join("config.json"))?;
    opts.apply_to(&mut config);
    let store = WeightStore::open(&dir)?;
    let handshake = Handshake::new(&config, world, opts.dist_token.as_deref())?;
    let control = Arc::new(TcpComm::connect(world, &handshake, opts.dist_timeout)?);
    let hello = Hello::decode(&control.recv_hello()?)?;
    // Rank 0's plan, with this rank's shard.
    let plan = RankPlan { shard: Shard { rank: world.rank, world: world.world_size }, ..hello.plan };
    let spec = RankSpec { config: &config, store: &store, plan };
    let mut agree = |mine| control.agree_min(mine);
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
                let ordinal = first + world.local_rank;
                let backend = CudaBackend::new(ordinal)?;
                let nccl = Arc::new(NcclComm::from_id(id, world.rank, world.world_size, ordinal)?);
                let watchdog = nccl_watchdog(&nccl, opts.dist_timeout);
                let runner = RankRunner::open(backend, Box::new(nccl), &spec, &mut agree, |_| {})?;
                drop(store);
                serve_steps(runner, &control, Some(&watchdog))
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
        None => {
            let runner = RankRunner::open(CpuBackend::new(), Box::new(control.clone()), &spec, &mut agree, |_| {})?;
            drop(store);
            serve_steps(runner, &control, None)
        }
    }
}

/// A non-zero rank's life once opened: run each step rank 0 sends until it closes.
fn serve_steps<B: Runtime>(mut runner: RankRunner<B>, control: &TcpComm, watchdog: Option<&Watchdog>) -> Result<()> {
    while let Some((batch, rows)) = control.recv_step()? {
        let sampling = StepSampling { rows, ..Default::default() };
        let _armed = watchdog.map(Watchdog::arm);
        runner.step(&batch, &sampling)?;
    }
    Ok(())
}

/// A watchdog that aborts `nccl`'s group when a step outlives `timeout`. It holds the
/// communicator weakly: the rank's own reference stays the last, dropped before its backend.
#[cfg(feature = "nccl")]
fn nccl_watchdog(nccl: &Arc<crate::parallel::nccl::NcclComm>, timeout: std::time::Duration) -> Watchdog {
    let weak = Arc::downgrade(nccl);
    Watchdog::new(timeout, move || {
        if let Some(c) = weak.upgrade() {
            c.abort();
        }
    })
}
