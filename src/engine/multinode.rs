//! Ranks in separate processes: rank 0 runs the engine (tokenizer, requests, scheduler) and
//! hands every step to the other ranks over TCP; the others only load their shard and run the
//! steps they are given ([`run_rank`]).
//!
//! The TCP star to rank 0 carries the control messages (the [`Hello`] with the cache geometry,
//! then each step's inputs) and, on CPU ranks, the collectives too. CUDA ranks (feature `nccl`)
//! each drive the GPU `LOCAL_RANK` of their machine (offset by `--device cuda:N`) and meet in
//! an NCCL group whose unique id rank 0 creates and sends in its hello, so that every rank
//! follows rank 0's choice of device. NCCL collectives have no timeout of their own: a
//! [`Watchdog`] on every rank aborts the group when a step outlives `--dist-timeout`, so that a
//! dead or stalled peer fails the others instead of hanging them.

use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
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
    watchdog: Option<Watchdog>,
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
        let _armed = self.watchdog.as_ref().map(Watchdog::arm);
        self.model.step(&self.backend, batch, &mut self.cache, sampling, &*self.comm)
    }
}

/// Aborts a group when one step runs longer than the timeout. A thread waits for each step to
/// start, then for it to end; past the timeout it calls `abort` once for that step.
pub(super) struct Watchdog {
    events: Option<mpsc::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
}

/// Marks a step as running until dropped.
pub(super) struct Armed<'a>(&'a Watchdog);

impl Watchdog {
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(super) fn new(timeout: Duration, abort: impl Fn() + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel::<bool>();
        let thread = std::thread::spawn(move || {
            // `true`: a step started; `false`: it ended. The channel closes with the runner.
            while let Ok(started) = rx.recv() {
                if !started {
                    continue;
                }
                match rx.recv_timeout(timeout) {
                    Ok(_) => {}
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        eprintln!(
                            "tulu: a step ran past {timeout:?}: aborting the NCCL group (a rank failed or stalled)"
                        );
                        abort();
                        // Wait for the step to end (it now fails) before watching the next.
                        if rx.recv().is_err() {
                            return;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        });
        Watchdog { events: Some(tx), thread: Some(thread) }
    }

    /// Starts timing a step; it ends when the guard drops.
    pub(super) fn arm(&self) -> Armed<'_> {
        if let Some(tx) = &self.events {
            let _ = tx.send(true);
        }
        Armed(self)
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        if let Some(tx) = &self.0.events {
            let _ = tx.send(false);
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.events = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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
                let nccl = Arc::new(NcclComm::from_id(id, 0, spec.world_size, ordinal)?);
                let watchdog = nccl_watchdog(&nccl, timeout);
                let model = Llama::load(&backend, config, store, hello.max_positions, shard, on_layer)?;
                let blocks = agree_blocks(&backend, &model, &hello, &control)?;
                let cache = backend.new_kv_cache(&model.kv_cache_spec(blocks, hello.block_size))?;
                let device = format!("{} × {} processes (NCCL)", backend.describe(), spec.world_size);
                let runner =
                    NodeRunner { watchdog: Some(watchdog), comm: Box::new(nccl), control, model, cache, backend };
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
            // The TCP collectives time out by themselves.
            let runner = NodeRunner { watchdog: None, comm: Box::new(control.clone()), control, model, cache, backend };
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
                let nccl = Arc::new(NcclComm::from_id(id, spec.rank, spec.world_size, ordinal)?);
                let watchdog = nccl_watchdog(&nccl, opts.dist_timeout);
                serve_steps(&backend, &config, &store, &hello, shard, &control, &nccl, Some(&watchdog))
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
        None => serve_steps(&CpuBackend::new(), &config, &store, &hello, shard, &control, &control, None),
    }
}

/// A non-zero rank's life: load the shard, then run each step rank 0 sends until it closes.
#[allow(clippy::too_many_arguments)]
fn serve_steps<B: Backend>(
    backend: &B,
    config: &ModelConfig,
    store: &WeightStore,
    hello: &Hello,
    shard: Shard,
    control: &TcpComm,
    comm: &dyn Communicator<B>,
    watchdog: Option<&Watchdog>,
) -> Result<()> {
    let model = Llama::load(backend, config, store, hello.max_positions, shard, |_| {})?;
    let blocks = agree_blocks(backend, &model, hello, control)?;
    let mut cache = backend.new_kv_cache(&model.kv_cache_spec(blocks, hello.block_size))?;
    while let Some((batch, rows)) = control.recv_step()? {
        let sampling = StepSampling { rows, ..Default::default() };
        let _armed = watchdog.map(Watchdog::arm);
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
        return Err(super::no_kv_room());
    }
    Ok(blocks)
}

/// A watchdog that aborts `nccl`'s group when a step outlives `timeout`. It holds the
/// communicator weakly: the rank's own reference stays the last, dropped before its backend.
#[cfg(feature = "nccl")]
fn nccl_watchdog(nccl: &Arc<crate::parallel::nccl::NcclComm>, timeout: Duration) -> Watchdog {
    let weak = Arc::downgrade(nccl);
    Watchdog::new(timeout, move || {
        if let Some(c) = weak.upgrade() {
            c.abort();
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A step past the timeout is aborted once; steps within it never are.
    #[test]
    fn the_watchdog_aborts_only_a_step_that_outlives_the_timeout() {
        let aborts = Arc::new(AtomicUsize::new(0));
        let counter = aborts.clone();
        let dog = Watchdog::new(Duration::from_millis(100), move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        for _ in 0..3 {
            let _armed = dog.arm();
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(aborts.load(Ordering::SeqCst), 0);
        {
            let _armed = dog.arm();
            std::thread::sleep(Duration::from_millis(400));
        }
        {
            let _armed = dog.arm();
        }
        drop(dog);
        assert_eq!(aborts.load(Ordering::SeqCst), 1);
    }
}
