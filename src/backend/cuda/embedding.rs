//! Embedding lookup: launcher of `kernels/embedding.cu`.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{grid, int, CudaBackend, CudaResultExt, CudaTensor, CudaWeight};
use crate::error::Result;

const THREADS: u32 = 256;

impl CudaBackend {
    /// Ids past the table's rows give zero rows (the trait's contract: a vocab-parallel rank
    /// looks up only the ids of its shard); the kernel bounds-checks every id itself.
    /// Inside a step whose ids these are, the ids come from the step's device buffer (and a
    /// padded step's padding rows look up row 0); outside one they are uploaded for this call.
    pub(crate) fn embed_impl(&self, table: &CudaWeight, ids: &[u32]) -> Result<CudaTensor> {
        let data = table.bf16("embed")?;
        self.step_ids(ids, |step| {
            let rows = step.map_or(ids.len(), |(_, rows)| rows);
            let mut out = self.alloc_tensor(rows, table.cols)?;
            if rows == 0 || table.cols == 0 {
                return Ok(out);
            }
            let uploaded;
            let dev_ids = match step {
                Some((dev, _)) => dev,
                None => {
                    uploaded = self.upload_u32(ids)?;
                    &uploaded
                }
            };
            let cfg = LaunchConfig {
                grid_dim: (grid(rows, "tokens")?, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let cols = int(table.cols, "hidden")?;
            let vocab = u32::try_from(table.rows).unwrap_or(u32::MAX);
            let mut launch = self.stream.launch_builder(&self.kernels.embedding);
            launch.arg(data).arg(&**dev_ids).arg(&mut *out.data).arg(&cols).arg(&vocab);
            // SAFETY: argument types and order match embedding_bf16; the kernel bounds-checks ids.
            unsafe { launch.launch(cfg) }.cuda("launching embedding_bf16")?;
            self.count_launch();
            Ok(out)
        })
    }
}
