//! What runs between forward passes: the per-step batch, the KV block pool with prefix
//! caching, the continuous-batching scheduler and sampling. No device code.

pub mod batch;
pub mod batch_wire;
pub mod block_manager;
mod free_list;
pub mod sampler;
pub mod scheduler;
pub mod speculative;
pub mod token_mask;
