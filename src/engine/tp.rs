//! The tensor-parallel model runner: one thread per rank, each owning its shard of the weights
//! and KV cache, meeting in the in-process communicator at every all-reduce and gather.

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
use crate::runtime::batch::Batch;
use crate::weights::WeightStore;

type Job = Arc<(Batch, Vec<usize>)>;

struct Rank {
    jobs: mpsc::Sender<Job>,
    results: mpsc::Receiver<Result<Vec<f32>>>,
    thread: Option<JoinHandle<()>>,
}

/// `tp` CPU ranks in threads of this process.
pub(super) struct TpRunner {
    ranks: Vec<Rank>,
    group: Arc<LocalGroup>,
}

/// Where each rank's KV cache and RoPE tables come from.
pub(super) struct TpPlan {
    pub tp: usize,
    pub context_len: usize,
    pub num_blocks: usize,
    pub block_size: usize,
}

impl TpRunner {
    /// Loads every rank's shard in parallel (each rank reads only its slices) and starts them.
    pub fn start(cfg: &ModelConfig, store: Arc<WeightStore>, plan: &TpPlan) -> Result<Self> {
        let group = LocalGroup::new(plan.tp, Duration::from_secs(300));
        let mut ranks = Vec::with_capacity(plan.tp);
        for comm in group.communicators() {
            let rank = ranks.len();
            let (job_tx, job_rx) = mpsc::channel::<Job>();
            let (res_tx, res_rx) = mpsc::channel();
            let (cfg, store) = (cfg.clone(), store.clone());
            let (ctx, blocks, bs, world) = (plan.context_len, plan.num_blocks, plan.block_size, plan.tp);
            let thread = std::thread::Builder::new()
                .name(format!("tulu-rank-{rank}"))
                .spawn(move || {
                    let backend = CpuBackend::new();
                    let loaded = Llama::load(&backend, &cfg, &store, ctx, Shard { rank, world }, |_| {})
                        .and_then(|m| Ok((backend.new_kv_cache(&m.kv_cache_spec(blocks, bs))?, m)));
                    drop(store);
                    let (mut cache, model) = match loaded {
                        Ok(x) => {
                            let _ = res_tx.send(Ok(Vec::new()));
                            x
                        }
                        Err(e) => {
                            let _ = res_tx.send(Err(e));
                            return;
                        }
                    };
                    for job in job_rx {
                        let out = model.forward(&backend, &job.0, &mut cache, &job.1, &comm);
                        if let Err(e) = &out {
                            comm.group().poison(&format!("rank {rank}: {e}"));
                        }
                        if res_tx.send(out).is_err() {
                            return;
                        }
                    }
                })
                .map_err(|e| Error::Backend(format!("cannot start rank {rank}: {e}")))?;
            ranks.push(Rank { jobs: job_tx, results: res_rx, thread: Some(thread) });
        }
        let runner = TpRunner { ranks, group };
        for r in &runner.ranks {
            match r.results.recv() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::Backend("a rank died while loading".into())),
            }
        }
        Ok(runner)
    }
}

impl Runner for TpRunner {
    fn forward(&mut self, batch: &Batch, rows: &[usize]) -> Result<Vec<f32>> {
        let job: Job = Arc::new((batch.clone(), rows.to_vec()));
        for (i, r) in self.ranks.iter().enumerate() {
            if r.jobs.send(job.clone()).is_err() {
                self.group.poison("a rank has exited");
                return Err(Error::Backend(format!("rank {i} has exited")));
            }
        }
        // Every rank ends with the same gathered logits; collect all so none is left behind.
        let mut first_error = None;
        let mut logits = None;
        for (i, r) in self.ranks.iter().enumerate() {
            match r.results.recv() {
                Ok(Ok(l)) => logits = logits.or(Some(l)),
                Ok(Err(e)) => first_error = first_error.or(Some(e)),
                Err(_) => first_error = first_error.or(Some(Error::Backend(format!("rank {i} died")))),
            }
        }
        match (first_error, logits) {
            (Some(e), _) => Err(e),
            (None, Some(l)) => Ok(l),
            (None, None) => Err(Error::Backend("no rank returned logits".into())),
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
