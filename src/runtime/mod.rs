//! What runs between forward passes: the per-step batch, KV block allocation and sampling.

pub mod batch;
pub mod blocks;
pub mod sampler;
