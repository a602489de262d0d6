//! Tensor parallelism: the sharding rules and the communicators ranks use to combine results.

pub mod frame;
pub mod handshake;
pub mod kv_policy;
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
    /// Whether its collectives are queued on the backend's stream without the host taking part,
    /// so that a captured graph can hold them (NCCL, and a group of one); collectives staged
    /// through the host cannot be captured.
    fn capturable(&self) -> bool {
        false
    }
}

/// A shared communicator is one (the TCP star serves as both the control channel and the
/// collectives of CPU ranks).
impl<B: Backend, C: Communicator<B> + ?Sized> Communicator<B> for std::sync::Arc<C> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce_sum(&self, backend: &B, x: &mut B::Tensor) -> Result<()> {
        (**self).all_reduce_sum(backend, x)
    }
    fn all_gather_cols(&self, backend: &B, x: B::Tensor) -> Result<B::Tensor> {
        (**self).all_gather_cols(backend, x)
    }
    fn capturable(&self) -> bool {
        (**self).capturable()
    }
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
    fn capturable(&self) -> bool {
        true
    }
}

/// The sum of every rank's buffer, added in rank order starting from zero: the one order every
/// host-side communicator uses, so that in-process threads and separate processes produce
/// bit-identical results.
pub(crate) fn sum_in_rank_order(bufs: &[Vec<f32>], len: usize) -> Vec<f32> {
    let mut acc = vec![0f32; len];
    for buf in bufs {
        for (a, v) in acc.iter_mut().zip(buf) {
            *a += v;
        }
    }
    acc
}

/// Every rank's `rows × cols` buffer concatenated along columns, in rank order.
pub(crate) fn concat_cols(bufs: &[Vec<f32>], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * cols * bufs.len());
    for r in 0..rows {
        for buf in bufs {
            out.extend_from_slice(&buf[r * cols..(r + 1) * cols]);
        }
    }
    out
}
