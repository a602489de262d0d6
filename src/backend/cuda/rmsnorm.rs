//! RMSNorm and residual-add + RMSNorm: launchers of `kernels/rmsnorm.cu`.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{grid, int, CudaBackend, CudaResultExt, CudaTensor, CudaWeight};
use crate::error::Result;

/// Threads per row: a Llama row (2k–16k values) is 1–8 16-byte loads per thread.
const THREADS: u32 = 256;

impl CudaBackend {
    pub(crate) fn rms_norm_impl(&self, x: &CudaTensor, weight: &CudaWeight, eps: f32) -> Result<CudaTensor> {
        let w = weight.bf16("rms_norm")?;
        let mut out = self.alloc_tensor(x.rows, x.cols)?;
        if x.rows == 0 {
            return Ok(out);
        }
        let cfg =
            LaunchConfig { grid_dim: (grid(x.rows, "rows")?, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let (cols, vec8) = (int(x.cols, "cols")?, i32::from(x.cols.is_multiple_of(8)));
        let mut launch = self.stream.launch_builder(&self.kernels.rmsnorm);
        launch.arg(&*x.data).arg(w).arg(&mut *out.data).arg(&cols).arg(&eps).arg(&vec8);
        // SAFETY: argument types and order match rmsnorm_bf16; `contract::rms_norm` bounds every index.
        unsafe { launch.launch(cfg) }.cuda("launching rmsnorm_bf16")?;
        self.count_launch();
        Ok(out)
    }

    pub(crate) fn add_rms_norm_impl(
        &self,
        x: &mut CudaTensor,
        residual: &CudaTensor,
        weight: &CudaWeight,
        eps: f32,
    ) -> Result<CudaTensor> {
        let w = weight.bf16("add_rms_norm")?;
        let mut out = self.alloc_tensor(x.rows, x.cols)?;
        if x.rows == 0 {
            return Ok(out);
        }
        let cfg =
            LaunchConfig { grid_dim: (grid(x.rows, "rows")?, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let (cols, vec8) = (int(x.cols, "cols")?, i32::from(x.cols.is_multiple_of(8)));
        let mut launch = self.stream.launch_builder(&self.kernels.add_rmsnorm);
        launch.arg(&mut *x.data).arg(&*residual.data).arg(w).arg(&mut *out.data).arg(&cols).arg(&eps).arg(&vec8);
        // SAFETY: argument types and order match add_rmsnorm_bf16; `contract::add_rms_norm` checked the shapes.
        unsafe { launch.launch(cfg) }.cuda("launching add_rmsnorm_bf16")?;
        self.count_launch();
        Ok(out)
    }
}
