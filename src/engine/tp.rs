//! The tensor-parallel model runner: one thread per rank, each owning its backend, its shard of
//! the weights and its KV cache, meeting in a communicator at every all-reduce and gather.
//!
//! CPU ranks meet in the in-process communicator. CUDA ranks (feature `cuda`) each open their
//! own `CudaBackend` in their thread and meet through NCCL when every rank has a GPU of its own
//! (feature `nccl`), else through the host-staged in-process communicator, which also lets
//! several ranks share one GPU (tests on a single-GPU machine).

use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use super::worker::Runner;
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::parallel::local::LocalGroup;
use crate::parallel::sharding::Shard;
use crate::parallel::Communicator;
use crate::runtime::batch::Batch;
use crate::runtime::sampler::{StepOutput, StepSampling};
use crate::weights::WeightStore;

type Job = Arc<(Batch, StepSampling)>;

/// Opens a rank's backend, inside the rank's own thread (a CUDA backend binds its context to
/// the thread that uses it).
type OpenBackend<B> = Box<dyn FnOnce() -> Result<B> + Send>;

/// Makes every rank's pending and future collectives fail, so that peers of a failed rank
/// return an error instead of waiting for it.
type Poison = Arc<dyn Fn(&str) + Send + Sync>;

/// How long an in-process collective waits for a missing rank.
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(300);

/// What a rank thread reports while starting.
enum Started {
    /// Its shard is loaded; with the KV blocks its device has room for, when sized from memory.
    Loaded { device: String, capacity: Option<usize> },
    /// Its KV cache is allocated: ready for steps.
    Allocated,
}

struct Rank {
    jobs: mpsc::Sender<Job>,
    results: mpsc::Receiver<Result<StepOutput>>,
    thread: Option<JoinHandle<()>>,
}

/// `tp` ranks in threads of this process.
pub(super) struct TpRunner {
    ranks: Vec<Rank>,
    poison: Poison,
    /// Rank 0's backend, for logs.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device: String,
    /// KV blocks in every rank's cache.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    num_blocks: usize,
}

/// Where each rank's KV cache and RoPE tables come from.
pub(super) struct TpPlan {
    pub tp: usize,
    pub context_len: usize,
    /// KV blocks per rank's cache, unless sized from device memory (below).
    pub num_blocks: usize,
    pub block_size: usize,
    /// CUDA ranks on GPUs of their own: size every cache from what this fraction of each GPU
    /// leaves after the weights (the smallest over the ranks), instead of `num_blocks`.
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub gpu_memory_utilization: Option<f64>,
    /// The load's progress bar: every rank advances it by one per layer loaded.
    pub bar: indicatif::ProgressBar,
}

impl TpRunner {
    /// `tp` CPU ranks: loads every rank's shard in parallel (each rank reads only its slices)
    /// and starts them.
    pub fn start(cfg: &ModelConfig, store: Arc<WeightStore>, plan: &TpPlan) -> Result<Self> {
        let group = LocalGroup::new(plan.tp, COLLECTIVE_TIMEOUT);
        let ranks = group
            .communicators()
            .into_iter()
            .map(|c| (c, Box::new(|| Ok(CpuBackend::new())) as OpenBackend<CpuBackend>))
            .collect();
        Self::spawn(cfg, store, plan, ranks, Arc::new(move |why: &str| group.poison(why)), None)
    }

    /// `tp` CUDA ranks starting at device `first`: rank `r` on its own GPU `first + r` through
    /// NCCL when the build has it and there are enough GPUs, else every rank on GPU
    /// `(first + r) % device_count` through the host-staged in-process communicator (several
    /// ranks may then share a GPU), with a one-line note on stderr saying why.
    #[cfg(feature = "cuda")]
    pub fn start_cuda(cfg: &ModelConfig, store: Arc<WeightStore>, plan: &TpPlan, first: usize) -> Result<Self> {
        use crate::backend::cuda::CudaBackend;
        let open = |device: usize| Box::new(move || CudaBackend::new(device)) as OpenBackend<CudaBackend>;
        let count = cudarc::driver::CudaContext::device_count()
            .map_err(|e| Error::Device { device: format!("cuda:{first}"), message: e.to_string() })?
            .max(0) as usize;
        if count == 0 {
            return Err(Error::Device { device: format!("cuda:{first}"), message: "no CUDA device".into() });
        }
        let own_gpus = first + plan.tp <= count;
        #[cfg(feature = "nccl")]
        let why = if own_gpus {
            let devices: Vec<usize> = (first..first + plan.tp).collect();
            match crate::parallel::nccl::NcclComm::new_local(&devices) {
                Ok(comms) => {
                    let comms: Vec<Arc<crate::parallel::nccl::NcclComm>> = comms.into_iter().map(Arc::new).collect();
                    // Poisoning aborts the group, which releases ranks waiting in NCCL for a
                    // failed or stalled peer. Weak: each rank's own reference must be the last,
                    // dropped before its backend.
                    let group: Vec<_> = comms.iter().map(Arc::downgrade).collect();
                    let abort: Poison = Arc::new(move |_: &str| {
                        group.iter().filter_map(std::sync::Weak::upgrade).for_each(|c| c.abort())
                    });
                    let setups = comms.into_iter().zip(devices).map(|(c, d)| (c, open(d))).collect();
                    let sizing = plan.gpu_memory_utilization;
                    let mut runner = Self::spawn(cfg, store, plan, setups, abort, sizing)?;
                    runner.device = format!("{} × {} ranks on cuda:{first}.. (NCCL)", runner.device, plan.tp);
                    return Ok(runner);
                }
                Err(e) => format!("NCCL is unavailable: {e}"),
            }
        } else {
            format!("{count} CUDA devices from cuda:{first} for {} ranks", plan.tp)
        };
        #[cfg(not(feature = "nccl"))]
        let why = if own_gpus {
            "this build has no NCCL (build with --features nccl)".to_owned()
        } else {
            format!("{count} CUDA devices from cuda:{first} for {} ranks", plan.tp)
        };
        eprintln!("tulu: tp {} on CUDA staged through host memory ({why}); slow, meant for tests", plan.tp);
        let group = LocalGroup::new(plan.tp, COLLECTIVE_TIMEOUT);
        let setups =
            group.communicators().into_iter().enumerate().map(|(r, c)| (c, open((first + r) % count))).collect();
        // Ranks may share a GPU here: the fixed cache size, not each one's view of free memory.
        let poison = Arc::new(move |why: &str| group.poison(why));
        let mut runner = Self::spawn(cfg, store, plan, setups, poison, None)?;
        runner.device = format!("{} × {} ranks (host-staged)", runner.device, plan.tp);
        Ok(runner)
    }

    /// Rank 0's backend, as it describes itself.
    #[cfg(feature = "cuda")]
    pub fn device(&self) -> &str {
        &self.device
    }

    /// KV blocks in every rank's cache.
    #[cfg(feature = "cuda")]
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Starts one thread per `(communicator, backend)` pair, rank `r` taking the `r`-th, and
    /// waits until every rank has loaded its shard and allocated its KV cache: `plan.num_blocks`
    /// blocks, or, with `size_from_memory`, as many as the fullest rank's device has room for.
    fn spawn<B: Backend, C: Communicator<B> + 'static>(
        cfg: &ModelConfig,
        store: Arc<WeightStore>,
        plan: &TpPlan,
        setups: Vec<(C, OpenBackend<B>)>,
        poison: Poison,
        size_from_memory: Option<f64>,
    ) -> Result<Self> {
        let mut ranks = Vec::with_capacity(plan.tp);
        let mut sizes = Vec::with_capacity(plan.tp);
        let (ready_tx, ready_rx) = mpsc::channel::<(usize, Result<Started>)>();
        for (comm, open) in setups {
            let rank = ranks.len();
            let (job_tx, job_rx) = mpsc::channel::<Job>();
            let (res_tx, res_rx) = mpsc::channel();
            let (size_tx, size_rx) = mpsc::channel::<usize>();
            let (cfg, store, poison, ready) = (cfg.clone(), store.clone(), poison.clone(), ready_tx.clone());
            let (ctx, bs, world) = (plan.context_len, plan.block_size, plan.tp);
            let bar = plan.bar.clone();
            let thread = std::thread::Builder::new()
                .name(format!("tulu-rank-{rank}"))
                .spawn(move || {
                    let fail = |e: Error| {
                        let _ = ready.send((rank, Err(e)));
                    };
                    let backend = match open() {
                        Ok(b) => b,
                        Err(e) => return fail(e),
                    };
                    // Declared after the backend, so dropped before it (an NCCL communicator
                    // is torn down while its device is still open).
                    let comm = comm;
                    let loaded = Llama::load(&backend, &cfg, &store, ctx, Shard { rank, world }, |_| bar.inc(1));
                    drop(store);
                    let model = match loaded {
                        Ok(m) => m,
                        Err(e) => return fail(e),
                    };
                    let capacity = size_from_memory.and_then(|u| super::kv_capacity(&backend, &model, bs, u));
                    let _ = ready.send((rank, Ok(Started::Loaded { device: backend.describe(), capacity })));
                    // The coordinator closes the channel instead when another rank failed.
                    let Ok(blocks) = size_rx.recv() else { return };
                    let mut cache = match backend.new_kv_cache(&model.kv_cache_spec(blocks, bs)) {
                        Ok(c) => c,
                        Err(e) => return fail(e),
                    };
                    let _ = ready.send((rank, Ok(Started::Allocated)));
                    drop(ready);
                    for job in job_rx {
                        let out = model.step(&backend, &job.0, &mut cache, &job.1, &comm);
                        if let Err(e) = &out {
                            poison(&format!("rank {rank}: {e}"));
                        }
                        if res_tx.send(out).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| Error::Backend(format!("cannot start rank {rank}: {e}")))?;
            ranks.push(Rank { jobs: job_tx, results: res_rx, thread: Some(thread) });
            sizes.push(size_tx);
        }
        drop(ready_tx);
        let mut runner = TpRunner { ranks, poison, device: String::new(), num_blocks: plan.num_blocks };
        // Phase 1: every shard loaded. On failure the size channels close first, so that the
        // waiting ranks exit before `runner`'s drop joins them.
        let loaded = match collect(&ready_rx, runner.ranks.len(), "loading") {
            Ok(l) => l,
            Err(e) => {
                drop(sizes);
                return Err(e);
            }
        };
        let mut capacity = None::<usize>;
        for (rank, started) in loaded.into_iter().enumerate() {
            if let Started::Loaded { device, capacity: c } = started {
                if rank == 0 {
                    runner.device = device;
                }
                capacity = match (capacity, c) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        if let Some(blocks) = capacity {
            runner.num_blocks = blocks;
        }
        if runner.num_blocks == 0 {
            drop(sizes);
            return Err(super::no_kv_room());
        }
        // Phase 2: every cache allocated.
        for s in &sizes {
            let _ = s.send(runner.num_blocks);
        }
        drop(sizes);
        collect(&ready_rx, runner.ranks.len(), "allocating the KV cache")?;
        Ok(runner)
    }
}

/// One report from each of `n` ranks, in rank order; the lowest rank's failure when any failed
/// (ranks fail alike, and the lowest is the one a user would look at first).
fn collect(ready: &mpsc::Receiver<(usize, Result<Started>)>, n: usize, what: &str) -> Result<Vec<Started>> {
    let mut got: Vec<Option<Result<Started>>> = (0..n).map(|_| None).collect();
    for _ in 0..n {
        match ready.recv() {
            Ok((rank, r)) => got[rank] = Some(r),
            Err(_) => break,
        }
    }
    got.into_iter()
        .enumerate()
        .map(|(rank, r)| r.unwrap_or_else(|| Err(Error::Backend(format!("rank {rank} died while {what}")))))
        .collect()
}

impl Runner for TpRunner {
    fn step(&mut self, batch: &Batch, sampling: &StepSampling) -> Result<StepOutput> {
        let job: Job = Arc::new((batch.clone(), sampling.clone()));
        for (i, r) in self.ranks.iter().enumerate() {
            if r.jobs.send(job.clone()).is_err() {
                (self.poison)("a rank has exited");
                return Err(Error::Backend(format!("rank {i} has exited")));
            }
        }
        // Rank 0 samples; collect every rank's result so that none is left behind. A rank that
        // outlives the collective timeout poisons the group (its peers' collectives fail, NCCL
        // groups are aborted) and fails the step.
        let mut first_error = None;
        let mut out = None;
        for (i, r) in self.ranks.iter().enumerate() {
            match r.results.recv_timeout(COLLECTIVE_TIMEOUT) {
                Ok(Ok(o)) => out = out.or(Some(o)),
                Ok(Err(e)) => first_error = first_error.or(Some(e)),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let why = format!("rank {i} did not finish a step within {COLLECTIVE_TIMEOUT:?}");
                    (self.poison)(&why);
                    first_error = first_error.or(Some(Error::Backend(why)));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    first_error = first_error.or(Some(Error::Backend(format!("rank {i} died"))))
                }
            }
        }
        match (first_error, out) {
            (Some(e), _) => Err(e),
            (None, Some(o)) => Ok(o),
            (None, None) => Err(Error::Backend("no rank returned a result".into())),
        }
    }
}

impl Drop for TpRunner {
    fn drop(&mut self) {
        for r in &mut self.ranks {
            // Closing the job channel ends the rank's loop.
            let (tx, _) = mpsc::channel();
            drop(std::mem::replace(&mut r.jobs, tx));
            if let Some(t) = r.thread.take() {
                let _ = t.join();
            }
        }
    }
}
