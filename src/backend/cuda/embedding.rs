//! Embedding lookup: launcher of `kernels/embedding.cu`.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::step::DeviceBatch;
use super::{grid, int, CudaBackend, CudaResultExt, CudaTensor, CudaWeight};
use crate::error::Result;

const THREADS: u32 = 256;

impl CudaBackend {
    /// Ids past the table's rows give zero rows (the trait's contract: a vocab-parallel rank
    /// looks up only the ids of its shard); the kernel bounds-checks every id itself. The ids
    /// are the step's, on the device (a padded step's padding rows look up row 0).
    pub(crate) fn embed_impl(&self, table: &CudaWeight, step: &DeviceBatch) -> Result<CudaTensor> {
        let data = table.bf16("embed")?;
        let rows = step.rows;
        let mut out = self.alloc_tensor(rows, table.cols)?;
        if rows == 0 || table.cols == 0 {
            return Ok(out);
        }
        let cfg =
            LaunchConfig { grid_dim: (grid(rows, "tokens")?, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let cols = int(table.cols, "hidden")?;
        let vocab = u32::try_from(table.rows).unwrap_or(u32::MAX);
        let mut launch = self.stream.launch_builder(&self.kernels.embedding);
        launch.arg(data).arg(&*step.ids).arg(&mut *out.data).arg(&cols).arg(&vocab);
        // SAFETY: argument types and order match embedding_bf16; the kernel bounds-checks ids.
        unsafe { launch.launch(cfg) }.cuda("launching embedding_bf16")?;
        self.count_launch();
        Ok(out)
    }
}
