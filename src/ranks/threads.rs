//! Ranks as threads of this process (`--tp N`): one thread per rank, each opening its own
//! [`RankRunner`] and running the steps the engine hands it, meeting the others in a
//! communicator at every all-reduce and gather. The threads agree on the KV cache size through
//! this module's coordinator.
//!
//! CPU ranks meet in the in-process communicator. CUDA ranks (feature `cuda`) each open their
//! own `CudaBackend` in their thread and meet through NCCL when every rank has a GPU of its own
//! (feature `nccl`), else through the host-staged in-process communicator, which also lets
//! several ranks share one GPU (tests on a single-GPU machine).

use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use super::runner::{RankPlan, RankRunner, RankSpec};
use super::{Opened, Ranks};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Device, Runtime};
use crate::error::{Error, Result};
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
    /// Its shard is loaded and this many KV blocks fit its policy.
    Measured(u64),
    /// Its KV cache is allocated: ready for steps.
    Allocated { device: String },
}

struct RankThread {
    jobs: mpsc::Sender<Job>,
    results: mpsc::Receiver<Result<StepOutput>>,
    thread: Option<JoinHandle<()>>,
}

/// `tp` ranks in threads of this process.
pub(crate) struct RankThreads {
    ranks: Vec<RankThread>,
    poison: Poison,
}

/// Opens `tp` rank threads on `device` (every rank's spec is `spec` with its own shard).
pub(crate) fn open(
    tp: usize,
    spec: &RankSpec<'_>,
    store: &Arc<WeightStore>,
    device: Device,
    share_gpus: bool,
    bar: &indicatif::ProgressBar,
) -> Result<Opened> {
    match device {
        Device::Cuda(first) => open_cuda(tp, spec, store, first, share_gpus, bar),
        _ => {
            let group = LocalGroup::new(tp, COLLECTIVE_TIMEOUT);
            let setups = group
                .communicators()
                .into_iter()
                .map(|c| (c, Box::new(|| Ok(CpuBackend::new())) as OpenBackend<CpuBackend>))
                .collect();
            let poison: Poison = Arc::new(move |why: &str| group.poison(why));
            let (ranks, device, blocks) = RankThreads::spawn(spec, store, setups, poison, bar)?;
            Ok(Opened { ranks: Box::new(ranks), device: format!("{device} × {tp} ranks"), num_blocks: blocks })
        }
    }
}

/// `tp` CUDA ranks starting at device `first`: rank `r` on its own GPU `first + r` through
/// NCCL when the build has it and there are enough GPUs. NCCL failing to start is an error
/// naming its cause. Without NCCL or enough GPUs, only `share_gpus` (tests, one-GPU machines)
/// puts every rank on GPU `(first + r) % device_count` through the host-staged in-process
/// communicator (several ranks may then share a GPU, so their caches are sized as without
/// device memory); otherwise that is an error saying why.
#[cfg(feature = "cuda")]
fn open_cuda(
    tp: usize,
    spec: &RankSpec<'_>,
    store: &Arc<WeightStore>,
    first: usize,
    share_gpus: bool,
    bar: &indicatif::ProgressBar,
) -> Result<Opened> {
    use crate::backend::cuda::CudaBackend;
    let open = |device: usize| Box::new(move || CudaBackend::new(device)) as OpenBackend<CudaBackend>;
    let count = cudarc::driver::CudaContext::device_count()
        .map_err(|e| Error::Device { device: format!("cuda:{first}"), message: e.to_string() })?
        .max(0) as usize;
    if count == 0 {
        return Err(Error::Device { device: format!("cuda:{first}"), message: "no CUDA device".into() });
    }
    let own_gpus = first + tp <= count;
    #[cfg(feature = "nccl")]
    let why = if own_gpus {
        let devices: Vec<usize> = (first..first + tp).collect();
        match crate::parallel::nccl::NcclComm::new_local(&devices) {
            Ok(comms) => {
                let comms: Vec<Arc<crate::parallel::nccl::NcclComm>> = comms.into_iter().map(Arc::new).collect();
                // Poisoning aborts the group, which releases ranks waiting in NCCL for a
                // failed or stalled peer. Weak: each rank's own reference must be the last,
                // dropped before its backend.
                let group: Vec<_> = comms.iter().map(Arc::downgrade).collect();
                let abort: Poison =
                    Arc::new(move |_: &str| group.iter().filter_map(std::sync::Weak::upgrade).for_each(|c| c.abort()));
                let setups = comms.into_iter().zip(devices).map(|(c, d)| (c, open(d))).collect();
                let (ranks, device, blocks) = RankThreads::spawn(spec, store, setups, abort, bar)?;
                let device = format!("{device} × {tp} ranks on cuda:{first}.. (NCCL)");
                return Ok(Opened { ranks: Box::new(ranks), device, num_blocks: blocks });
            }
            Err(e) => {
                return Err(Error::Device {
                    device: format!("cuda:{first}..cuda:{}", first + tp - 1),
                    message: format!("NCCL failed to start {tp} ranks: {e}"),
                })
            }
        }
    } else {
        format!("{count} CUDA devices from cuda:{first} for {tp} ranks")
    };
    #[cfg(not(feature = "nccl"))]
    let why = if own_gpus {
        "this build has no NCCL (build with --features nccl)".to_owned()
    } else {
        format!("{count} CUDA devices from cuda:{first} for {tp} ranks")
    };
    if !share_gpus {
        return Err(Error::Device {
            device: format!("cuda:{first}"),
            message: format!(
                "tp {tp} needs a GPU per rank and NCCL: {why} (share_gpus stages ranks through host memory, slowly)"
            ),
        });
    }
    tracing::info!("tp {tp} on CUDA staged through host memory ({why}); slow, meant for tests");
    let group = LocalGroup::new(tp, COLLECTIVE_TIMEOUT);
    let setups = group.communicators().into_iter().enumerate().map(|(r, c)| (c, open((first + r) % count))).collect();
    let poison: Poison = Arc::new(move |why: &str| group.poison(why));
    let shared = RankSpec { plan: RankPlan { own_device: false, ..spec.plan }, ..*spec };
    let (ranks, device, blocks) = RankThreads::spawn(&shared, store, setups, poison, bar)?;
    Ok(Opened { ranks: Box::new(ranks), device: format!("{device} × {tp} ranks (host-staged)"), num_blocks: blocks })
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(
    _: usize,
    _: &RankSpec<'_>,
    _: &Arc<WeightStore>,
    first: usize,
    _: bool,
    _: &indicatif::ProgressBar,
) -> Result<Opened> {
    Err(Error::Device { device: format!("cuda:{first}"), message: "this build of tulu has no CUDA support".into() })
}

impl RankThreads {
    /// Starts one thread per `(communicator, backend)` pair, rank `r` taking the `r`-th, and
    /// waits until every rank has opened its runner: loaded (in parallel, each reading only its
    /// slices), measured, agreed on the smallest KV block count, allocated. Returns the ranks,
    /// rank 0's device and the block count.
    fn spawn<B: Runtime, C: Communicator<B> + 'static>(
        spec: &RankSpec<'_>,
        store: &Arc<WeightStore>,
        setups: Vec<(C, OpenBackend<B>)>,
        poison: Poison,
        bar: &indicatif::ProgressBar,
    ) -> Result<(Self, String, usize)> {
        let world = setups.len();
        let (ready_tx, ready_rx) = mpsc::channel::<(usize, Result<Started>)>();
        let mut ranks = Vec::with_capacity(world);
        let mut sizes = Vec::with_capacity(world);
        for (rank, (comm, open)) in setups.into_iter().enumerate() {
            // The thread outlives the caller's borrows: it owns the config and a handle on the
            // weights, and opens from the group's plan with its own shard.
            let (config, store) = (spec.config.clone(), store.clone());
            let plan = RankPlan { shard: Shard { rank, world }, ..spec.plan };
            let (job_tx, job_rx) = mpsc::channel::<Job>();
            let (res_tx, res_rx) = mpsc::channel();
            let (size_tx, size_rx) = mpsc::channel::<u64>();
            let (poison, ready, bar) = (poison.clone(), ready_tx.clone(), bar.clone());
            let thread = std::thread::Builder::new()
                .name(format!("tulu-rank-{rank}"))
                .spawn(move || {
                    let mut agree = |mine: u64| {
                        let _ = ready.send((rank, Ok(Started::Measured(mine))));
                        // The coordinator closes the channel instead when another rank failed.
                        size_rx.recv().map_err(|_| Error::Backend("another rank failed while starting".into()))
                    };
                    let opened = open().and_then(|backend| {
                        let spec = RankSpec { config: &config, store: &store, plan };
                        RankRunner::open(backend, Box::new(comm), &spec, &mut agree, |_| bar.inc(1))
                    });
                    drop((config, store));
                    let mut runner = match opened {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = ready.send((rank, Err(e)));
                            return;
                        }
                    };
                    let _ = ready.send((rank, Ok(Started::Allocated { device: runner.describe() })));
                    drop(ready);
                    for job in job_rx {
                        let out = runner.step(&job.0, &job.1);
                        if let Err(e) = &out {
                            poison(&format!("rank {rank}: {e}"));
                        }
                        if res_tx.send(out).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| Error::Backend(format!("cannot start rank {rank}: {e}")))?;
            ranks.push(RankThread { jobs: job_tx, results: res_rx, thread: Some(thread) });
            sizes.push(size_tx);
        }
        drop(ready_tx);
        let threads = RankThreads { ranks, poison };
        let (device, blocks) = coordinate(&ready_rx, sizes)?;
        Ok((threads, device, blocks))
    }
}

/// The coordinator's side of the ranks' start: waits until every rank has loaded and measured,
/// hands them all the smallest block count, and waits until every rank has allocated. Returns
/// rank 0's device and the count. On a failure the size channels close first, so that ranks
/// waiting for a size exit (before the caller's drop joins them).
fn coordinate(
    ready: &mpsc::Receiver<(usize, Result<Started>)>,
    sizes: Vec<mpsc::Sender<u64>>,
) -> Result<(String, usize)> {
    let world = sizes.len();
    let measured = collect(ready, world, "loading")?;
    let blocks = measured.iter().filter_map(|s| if let Started::Measured(b) = s { Some(*b) } else { None }).min();
    // Every rank allocates the agreed size (or fails for want of room).
    for s in &sizes {
        let _ = s.send(blocks.unwrap_or(0));
    }
    drop(sizes);
    let device = match collect(ready, world, "allocating the KV cache")?.into_iter().next() {
        Some(Started::Allocated { device }) => device,
        _ => String::new(),
    };
    Ok((device, blocks.unwrap_or(0) as usize))
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

impl Ranks for RankThreads {
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

impl Drop for RankThreads {
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
