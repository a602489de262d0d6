//! The decode step as a CUDA graph, one per model and batch-size bucket.
//!
//! A decode step of `n` sequences is padded to the smallest bucket `b ≥ n` (1, 2, 4, 8, then
//! steps of 16 up to `--max-num-seqs`), so that a handful of graphs cover every batch size.
//! The first step of a bucket runs eagerly (it also measures the GEMV/cuBLASLt choice for the
//! bucket's shapes, which needs host timing and cannot run inside a capture); the second is
//! captured and replayed; every later one only replays. A graph's kernels find their inputs at
//! fixed addresses: the step's metadata in the persistent buffer of step.rs (its layout fixed
//! by the bucket), its activations in the workspace (workspace.rs: the same sequence of
//! allocations gives the same addresses), and its logits stay allocated for as long as the
//! graph lives; its model's weights and KV cache are where they were, so graphs are kept per
//! model (two on one backend each capture their own) and dropped when a KV cache is made. Prefill
//! and mixed steps, steps that want host logits, and steps on a
//! communicator that stages through the host run eagerly. A capture that fails (an op that
//! cannot be captured) leaves its bucket eager, with a warning.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, DevicePtr};

use super::memory::CudaTensor;
use super::step::CudaStep;
use super::workspace::Buf;
use super::{CudaBackend, CudaResultExt};
use crate::backend::StepInputs;
use crate::error::{Error, Result};

/// The batch-size buckets for decode steps of at most `max_num_seqs` sequences.
pub fn buckets(max_num_seqs: usize) -> Vec<usize> {
    let mut b: Vec<usize> = [1, 2, 4, 8].into_iter().filter(|&x| x < max_num_seqs).collect();
    b.extend((16..max_num_seqs).step_by(16));
    b.push(max_num_seqs.max(1));
    b
}

/// cudarc's graph, which is not `Send`: CUDA requires calls on one graph to be serialized,
/// and every use of this one is, under the backend's `graphs` mutex.
struct Graph(CudaGraph);

// SAFETY: see above; the graph is only launched and dropped with the `graphs` mutex held.
unsafe impl Send for Graph {}

/// A graph's model ([`crate::backend::StepInputs::model`]) and bucket: a graph bakes in the
/// addresses of its model's weights, so two models on one backend (a bench's two sizes, a test's
/// two checkpoints) each capture their own.
type GraphKey = (u64, usize);

/// One captured decode step.
struct Captured {
    graph: Graph,
    /// The step's logits, written by every replay; allocated for as long as the graph lives.
    logits: CudaTensor,
    /// Kernels (and collectives) in the graph.
    launches: u64,
}

/// The graphs of one backend, and what it knows about each bucket.
#[derive(Default)]
pub(crate) struct Graphs {
    /// Whether decode steps are padded and replayed at all (`reserve` with graphs on).
    pub enabled: bool,
    pub buckets: Vec<usize>,
    /// Graphs (model, bucket) whose first (eager) step has run.
    warm: BTreeSet<GraphKey>,
    /// Graphs whose capture failed: eager from then on.
    failed: BTreeSet<GraphKey>,
    captured: BTreeMap<GraphKey, Captured>,
    /// Replays so far (tests, bench).
    pub replays: u64,
    /// Whether padded steps replay graphs; off, they run the same padded step eagerly (tests
    /// compare the two bit for bit).
    pub eager_only: bool,
}

impl CudaBackend {
    /// The bucket a step is padded to, or `None` when it runs eagerly as it is.
    pub(crate) fn bucket_for(&self, step: &StepInputs<'_>) -> Option<usize> {
        let n = step.batch.num_tokens();
        let every_row = step.rows.len() == n && step.rows.iter().enumerate().all(|(i, &r)| i == r);
        if !step.graphable || n == 0 || !every_row || step.batch.seqs.iter().any(|s| s.rows.len() != 1) {
            return None;
        }
        let g = self.graphs.lock().ok()?;
        g.enabled.then(|| g.buckets.iter().copied().find(|&b| b >= n)).flatten()
    }

    /// Forgets every graph (the buffers they read moved), saying why in the log.
    pub(crate) fn drop_graphs(&self, why: &str) {
        if let Ok(mut g) = self.graphs.lock() {
            if !g.captured.is_empty() {
                tracing::warn!("dropping {} CUDA graphs: {why}", g.captured.len());
            }
            g.captured.clear();
            g.warm.clear();
        }
    }

    /// Runs padded decode steps eagerly instead of replaying their graphs (`on` false), keeping
    /// the graphs captured so far: tests compare the two bit for bit.
    pub fn set_graph_replay(&self, on: bool) {
        if let Ok(mut g) = self.graphs.lock() {
            g.eager_only = !on;
        }
    }

    /// The buckets of the decode graphs captured so far (of every model, each bucket once) and
    /// the replays run (tests, bench).
    pub fn graph_stats(&self) -> (Vec<usize>, u64) {
        let stats = |g: &Graphs| {
            let buckets: BTreeSet<usize> = g.captured.keys().map(|&(_, b)| b).collect();
            (buckets.into_iter().collect(), g.replays)
        };
        self.graphs.lock().map(|g| stats(&g)).unwrap_or_default()
    }

    /// The backend's `run_step` (module docs).
    pub(crate) fn run_step_impl(
        &self,
        step: &CudaStep,
        body: &mut dyn FnMut() -> Result<CudaTensor>,
    ) -> Result<CudaTensor> {
        let Some(key) = step.graph_key() else { return body() };
        let lock = || self.graphs.lock().map_err(|_| Error::Backend("graph table lock poisoned".into()));
        {
            let mut g = lock()?;
            if g.eager_only {
                drop(g);
                return body();
            }
            if let Some(c) = g.captured.get(&key) {
                let view = self.replay(c)?;
                g.replays += 1;
                return Ok(view);
            }
            if g.failed.contains(&key) || g.warm.insert(key) {
                drop(g);
                return body();
            }
        }
        match self.capture(body) {
            Ok(c) => {
                let view = self.replay(&c)?;
                let mut g = lock()?;
                g.replays += 1;
                g.captured.insert(key, c);
                Ok(view)
            }
            Err(e) => {
                tracing::warn!("decode steps of {} rows run eagerly: capturing their graph failed: {e}", key.1);
                lock()?.failed.insert(key);
                body()
            }
        }
    }

    /// Captures `body` on the backend's stream (nothing runs) and instantiates it.
    fn capture(&self, body: &mut dyn FnMut() -> Result<CudaTensor>) -> Result<Captured> {
        let before = self.launches.load(Ordering::Relaxed);
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .cuda("beginning a graph capture")?;
        self.capturing.store(true, Ordering::Relaxed);
        let out = body();
        self.capturing.store(false, Ordering::Relaxed);
        // Ends the capture whatever happened, so the stream is usable again.
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        let launches = self.launches.swap(before, Ordering::Relaxed) - before;
        let logits = out?;
        let graph =
            graph.cuda("ending a graph capture")?.ok_or_else(|| Error::Backend("the capture was empty".into()))?;
        Ok(Captured { graph: Graph(graph), logits, launches })
    }

    /// Launches `c` and returns a view of the logits it writes.
    fn replay(&self, c: &Captured) -> Result<CudaTensor> {
        c.graph.0.launch().cuda("replaying a decode graph")?;
        self.launches.fetch_add(c.launches, Ordering::Relaxed);
        Ok(self.view_of(&c.logits))
    }

    /// A tensor viewing `t`'s memory, which `t`'s owner keeps allocated.
    fn view_of(&self, t: &CudaTensor) -> CudaTensor {
        let ptr = t.data.device_ptr(&self.stream).0;
        // SAFETY: the captured logits live as long as their graph; the view is read right after
        // the replay that wrote it, before any other step runs.
        let data = unsafe { Buf::view(&self.stream, ptr, t.data.len()) };
        CudaTensor { data, rows: t.rows, cols: t.cols }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_then_steps_of_16() {
        assert_eq!(buckets(1), vec![1]);
        assert_eq!(buckets(6), vec![1, 2, 4, 6]);
        assert_eq!(buckets(8), vec![1, 2, 4, 8]);
        assert_eq!(buckets(64), vec![1, 2, 4, 8, 16, 32, 48, 64]);
        assert_eq!(buckets(40), vec![1, 2, 4, 8, 16, 32, 40]);
    }
}
