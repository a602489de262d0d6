//! The device runtime, apart from the operations: what a rank reserves at load, how a step
//! starts, runs (eagerly or as a replayed graph) and ends, and how much memory the device has.
//! The model runner (`Llama::step`, the rank runner of `src/ranks/`) drives it; the operations
//! of [`Backend`] run inside the steps it frames.

use super::{AttnDims, Backend};
use crate::error::Result;
use crate::runtime::batch::Batch;

/// What a step hands the backend once, before its first op ([`Runtime::begin_step`]).
#[derive(Debug, Clone, Copy)]
pub struct StepInputs<'a> {
    /// The step's sequences, positions, slots and block tables.
    pub batch: &'a Batch,
    /// The embedding rows to look up: the batch's token ids, shifted into this rank's
    /// vocabulary shard.
    pub ids: &'a [u32],
    /// The rows whose logits the step produces.
    pub rows: &'a [usize],
    /// The attention geometry of the model the step runs (`None`: a step without attention,
    /// e.g. an embedding alone): CUDA cuts the step's attention work list for it up front.
    pub dims: Option<AttnDims>,
    /// Whether the step may run as a replayed graph: a decode step (one new token a sequence,
    /// every row sampled) whose logits stay on the device, on a communicator that can be captured.
    pub graphable: bool,
    /// Which model instance runs the step (0: none, a standalone op). A replayed graph bakes in
    /// one model's weights, so graphs are kept per model and bucket.
    pub model: u64,
}

/// What a rank reserves at load for its steps ([`Runtime::reserve`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StepLimits {
    /// Most sequences in one step (the largest decode batch).
    pub max_num_seqs: usize,
    /// Most token rows in one step.
    pub max_num_batched_tokens: usize,
    /// Whether decode steps run as CUDA graphs (`--enforce-eager` turns them off).
    pub graphs: bool,
}

impl Default for StepLimits {
    fn default() -> Self {
        StepLimits { max_num_seqs: 64, max_num_batched_tokens: 2048, graphs: false }
    }
}

/// What [`Runtime::reserve`] sizes: the rank's model shape, per step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepShape {
    /// The limits the engine schedules within.
    pub limits: StepLimits,
    /// Longest context (RoPE positions).
    pub max_positions: usize,
    /// Token slots per KV block.
    pub block_size: usize,
    /// Bytes of device memory the largest step's activations need at once (the model's estimate).
    pub workspace_bytes: usize,
}

/// The device runtime of a backend (module docs). Every method has the default of a device
/// without one (the CPU): nothing to reserve, steps that need no framing, no graphs.
pub trait Runtime: Backend {
    /// Free and total bytes of the device's memory; `None` when the backend has none of its
    /// own (the CPU: its caches are sized from `kv_cache_memory`).
    fn device_memory(&self) -> Option<(u64, u64)> {
        None
    }

    /// Reserves what every step needs, once, at load, before the KV cache is sized from what
    /// is left (CUDA: the step workspace and the persistent step buffers). The CPU needs nothing.
    fn reserve(&self, shape: &StepShape) -> Result<()> {
        let _ = shape;
        Ok(())
    }

    /// Bytes [`Runtime::reserve`] took, for the load line.
    fn reserved_bytes(&self) -> usize {
        0
    }

    /// Shrinks the step workspace [`Runtime::reserve`] made to what the steps run since needed
    /// at most (the profile steps of `Llama::profile_steps`, as vLLM sizes its activations from
    /// a profile run), so that the KV cache sized next gets the rest; returns the workspace's
    /// bytes (0 without one: the CPU). Drops captured graphs (they address the old workspace).
    fn fit_workspace(&self) -> Result<usize> {
        Ok(0)
    }

    /// Starts a step: checks its batch and makes the [`Backend::Step`] that every op of the
    /// step is given (CUDA uploads ids, positions, slots, block tables and work lists once,
    /// into persistent device buffers, and pads a decode step to its graph bucket). Until
    /// [`Runtime::end_step`], the step's tensors come from the step workspace. The CPU's step
    /// is [`Backend::step_for`]'s.
    fn begin_step(&self, inputs: &StepInputs<'_>) -> Result<Self::Step> {
        self.step_for(inputs)
    }

    /// Ends the step [`Runtime::begin_step`] started (after everything that reads its tensors).
    fn end_step(&self, step: Self::Step) {
        drop(step);
    }

    /// Runs the step's forward pass `body` and returns its logits. A backend with graphs
    /// replays a captured graph of `body` instead, for a step `begin_step` padded to a graph
    /// bucket (see [`StepInputs::graphable`]); its logits then have padding rows after the
    /// sampled ones.
    fn run_step(&self, step: &Self::Step, body: &mut dyn FnMut() -> Result<Self::Tensor>) -> Result<Self::Tensor> {
        let _ = step;
        body()
    }

    /// The decode batch sizes the backend captures a graph for, after `reserve` (none: the CPU,
    /// or graphs off).
    fn graph_buckets(&self) -> Vec<usize> {
        Vec::new()
    }
}
