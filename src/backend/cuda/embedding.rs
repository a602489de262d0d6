//! Embedding lookup: launcher of `kernels/embedding.cu`.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{grid, int, CudaBackend, CudaResultExt, CudaTensor, CudaWeight};
use crate::error::Result;

const THREADS: u32 = 256;

impl CudaBackend {
    /// Ids past the table's rows give zero rows (the trait's contract: a vocab-parallel rank
    /// looks up only the ids of its shard); the kernel bounds-checks every id itself.
    pub(crate) fn embed_impl(&self, table: &CudaWeight, ids: &[u32]) -> Result<CudaTensor> {
        let data = table.bf16("embed")?;
        let mut out = self.alloc_tensor(ids.len(), table.cols)?;
        if ids.is_empty() || table.cols == 0 {
            return Ok(out);
        }
        let dev_ids = self.upload_u32(ids)?;
        let cfg = LaunchConfig {
            grid_dim: (grid(ids.len(), "tokens")?, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let cols = int(table.cols, "hidden")?;
        let vocab = u32::try_from(table.rows).unwrap_or(u32::MAX);
        let mut launch = self.stream.launch_builder(&self.kernels.embedding);
        launch.arg(data).arg(&dev_ids).arg(&mut out.data).arg(&cols).arg(&vocab);
        // SAFETY: argument types and order match embedding_bf16; ids checked against the table.
        unsafe { launch.launch(cfg) }.cuda("launching embedding_bf16")?;
        Ok(out)
    }
}
