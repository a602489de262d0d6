//! The rank execution layer: how the engine's steps reach the model's ranks. Every rank is a
//! `RankRunner` (runner.rs) opened the same way from one [`RankPlan`]; a single rank, rank
//! threads (threads.rs) and rank processes (processes.rs, with watchdog.rs) differ only in how
//! a step gets to them (the `Ranks` trait) and how they agree on the KV cache size. The request
//! layer (engine/) sees only `open` and `Ranks`.

use std::sync::Arc;

mod processes;
mod runner;
mod threads;
mod watchdog;

pub use self::processes::{run_rank, Hello};
pub use self::runner::RankPlan;
use self::runner::{RankRunner, RankSpec};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Device, Runtime};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::options::EngineOptions;
use crate::parallel::SingleRank;
use crate::runtime::batch::Batch;
use crate::runtime::sampler::{StepOutput, StepSampling};
use crate::weights::WeightStore;

/// The engine's handle on its ranks: runs one step on every rank.
pub(crate) trait Ranks: Send {
    /// Runs `batch` on every rank; rank 0 samples `sampling.rows`. An error here is engine-fatal:
    /// a device failed, a rank died, or a collective timed out.
    fn step(&mut self, batch: &Batch, sampling: &StepSampling) -> Result<StepOutput>;
}

/// A single rank runs in the engine's own thread.
impl<B: Runtime> Ranks for RankRunner<B> {
    fn step(&mut self, batch: &Batch, sampling: &StepSampling) -> Result<StepOutput> {
        RankRunner::step(self, batch, sampling)
    }
}

/// The ranks, opened and agreed.
pub(crate) struct Opened {
    pub ranks: Box<dyn Ranks>,
    /// The device(s), for logs.
    pub device: String,
    /// KV blocks in every rank's cache.
    pub num_blocks: usize,
}

/// Opens every rank of the model `opts` describes (one rank, `tp` rank threads, or this
/// process's rank 0 of a multi-process world), each with RoPE tables for `context` positions.
pub(crate) fn open(
    opts: &EngineOptions,
    config: &ModelConfig,
    store: Arc<WeightStore>,
    context: usize,
) -> Result<Opened> {
    let multi_process = opts.world.as_ref().is_some_and(|w| w.world_size > 1);
    let device = match opts.device.resolve()? {
        // Ranks in separate processes use GPUs through NCCL only: `auto` without it is the CPU.
        Device::Cuda(_) if multi_process && opts.device == Device::Auto && !cfg!(feature = "nccl") => Device::Cpu,
        d => d,
    };
    let ranks = if multi_process { 1 } else { opts.tp };
    let bar = load_bar(opts.progress, config.num_hidden_layers, ranks);
    let spec = RankSpec { config, store: &store, plan: opts.rank_plan(context) };
    let opened = match (&opts.world, device) {
        (Some(world), _) if multi_process => processes::open(world, opts, &spec, device, &bar),
        (_, _) if opts.tp > 1 => threads::open(opts.tp, &spec, &store, device, opts.share_gpus, &bar),
        (_, Device::Cuda(ordinal)) => open_cuda(ordinal, &spec, &bar),
        _ => single(CpuBackend::new(), &spec, &bar),
    };
    bar.finish_and_clear();
    opened
}

/// One rank in this thread, on `backend`.
fn single<B: Runtime>(backend: B, spec: &RankSpec<'_>, bar: &indicatif::ProgressBar) -> Result<Opened> {
    let runner = RankRunner::open(backend, Box::new(SingleRank), spec, &mut |n| Ok(n), |l| bar.set_position(l as u64))?;
    let (device, num_blocks) = (runner.describe(), runner.num_blocks());
    Ok(Opened { ranks: Box::new(runner), device, num_blocks })
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize, spec: &RankSpec<'_>, bar: &indicatif::ProgressBar) -> Result<Opened> {
    single(crate::backend::cuda::CudaBackend::new(ordinal)?, spec, bar)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize, _: &RankSpec<'_>, _: &indicatif::ProgressBar) -> Result<Opened> {
    let message = "this build of tulu has no CUDA support".into();
    Err(crate::error::Error::Device { device: format!("cuda:{ordinal}"), message })
}

/// One bar for the whole load: in-process ranks load in parallel and each advances it.
fn load_bar(show: bool, layers: usize, ranks: usize) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new((layers * ranks) as u64);
    let unit = if ranks > 1 { format!("layers × {ranks} ranks") } else { "layers".into() };
    if let Ok(style) =
        indicatif::ProgressStyle::with_template(&format!("loading {{bar:30}} {{pos}}/{{len}} {unit} {{elapsed}}"))
    {
        bar.set_style(style);
    }
    bar
}
