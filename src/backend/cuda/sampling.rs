//! Greedy token selection on the GPU: launcher of `kernels/sampling.cu`.
//!
//! Only argmax exists so far; temperature, top-k, top-p and min-p sampling on the GPU are not
//! implemented yet (the engine samples on the host from `to_host` logits).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{grid, int, CudaBackend, CudaResultExt, CudaTensor};
use crate::error::{Error, Result};

const THREADS: u32 = 1024;

impl CudaBackend {
    /// The index of the largest of the first `sample_cols` logits of each row (the first on
    /// ties; padded vocab rows past `sample_cols` are never chosen). Only the ids cross to the host.
    pub fn argmax(&self, logits: &CudaTensor, sample_cols: usize) -> Result<Vec<u32>> {
        if sample_cols == 0 || sample_cols > logits.cols {
            return Err(Error::Backend(format!("argmax: {sample_cols} sampled columns of {}", logits.cols)));
        }
        if logits.rows == 0 {
            return Ok(Vec::new());
        }
        self.bind()?;
        let mut ids = self.stream.alloc_zeros::<u32>(logits.rows).cuda("allocating token ids")?;
        let cfg = LaunchConfig {
            grid_dim: (grid(logits.rows, "rows")?, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (cols, sample) = (int(logits.cols, "cols")?, int(sample_cols, "sample_cols")?);
        let mut launch = self.stream.launch_builder(&self.kernels.argmax);
        launch.arg(&logits.data).arg(&cols).arg(&sample).arg(&mut ids);
        // SAFETY: argument types and order match argmax_bf16; one id per row.
        unsafe { launch.launch(cfg) }.cuda("launching argmax_bf16")?;
        let ids = self.stream.clone_dtoh(&ids).cuda("copying token ids to the host")?;
        self.synchronize()?;
        Ok(ids)
    }
}
