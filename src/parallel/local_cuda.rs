//! The in-process communicator for CUDA ranks, staged through the host.
//!
//! NCCL refuses two ranks on one GPU, yet tensor parallelism must be testable on a single-GPU
//! machine: there each rank thread owns its own `CudaBackend` on the shared GPU, and every
//! collective copies the rank's tensor to the host, combines it with the CPU ranks' code in
//! [`LocalComm`] (f32 sums in rank order, so every rank gets bit-identical results), and copies
//! the result back, rounded to bf16. Slow (two copies and a barrier per collective), but exact
//! and independent of NCCL: a reference for the NCCL path, not a serving path.

use super::local::LocalComm;
use super::Communicator;
use crate::backend::cpu::{CpuBackend, CpuTensor};
use crate::backend::cuda::{CudaBackend, CudaTensor};
use crate::backend::Backend;
use crate::error::Result;

/// `x` on the host, as the CPU communicator's tensor.
fn stage(backend: &CudaBackend, x: &CudaTensor) -> Result<CpuTensor> {
    CpuTensor::new(backend.to_host(x)?, x.rows(), x.cols())
}

impl Communicator<CudaBackend> for LocalComm {
    fn rank(&self) -> usize {
        Communicator::<CpuBackend>::rank(self)
    }

    fn world_size(&self) -> usize {
        Communicator::<CpuBackend>::world_size(self)
    }

    fn all_reduce_sum(&self, backend: &CudaBackend, x: &mut CudaTensor) -> Result<()> {
        let mut host = stage(backend, x)?;
        Communicator::<CpuBackend>::all_reduce_sum(self, &CpuBackend::new(), &mut host)?;
        *x = backend.tensor_from_host(&host.data, host.rows, host.cols)?;
        Ok(())
    }

    fn all_gather_cols(&self, backend: &CudaBackend, x: CudaTensor) -> Result<CudaTensor> {
        let host = stage(backend, &x)?;
        drop(x);
        let all = Communicator::<CpuBackend>::all_gather_cols(self, &CpuBackend::new(), host)?;
        backend.tensor_from_host(&all.data, all.rows, all.cols)
    }
}
