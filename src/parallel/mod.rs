//! Tensor parallelism: the sharding rules and the communicators ranks use to combine results.

pub mod local;
#[cfg(feature = "cuda")]
pub mod local_cuda;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;
pub mod sharding;
pub mod sizing;
pub mod tcp;

use crate::backend::Backend;
use crate::error::Result;

/// Collective operations among the ranks of one tensor-parallel group.
pub trait Communicator<B: Backend>: Send + Sync {
    /// This rank.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// Replaces `x` on every rank by the sum of all ranks' `x`.
    fn all_reduce_sum(&self, backend: &B, x: &mut B::Tensor) -> Result<()>;
    /// Concatenates every rank's `x` along columns, in rank order.
    fn all_gather_cols(&self, backend: &B, x: B::Tensor) -> Result<B::Tensor>;
}

/// The communicator of a group of one: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleRank;

impl<B: Backend> Communicator<B> for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _: &B, _: &mut B::Tensor) -> Result<()> {
        Ok(())
    }
    fn all_gather_cols(&self, _: &B, x: B::Tensor) -> Result<B::Tensor> {
        Ok(x)
    }
}
