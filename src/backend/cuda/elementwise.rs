//! SiLU·mul and row gather: launchers of `kernels/elementwise.cu`.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::step::DeviceBatch;
use super::{grid, int, CudaBackend, CudaResultExt, CudaTensor};
use crate::error::Result;

const THREADS: u32 = 256;

impl CudaBackend {
    /// A grid-stride launch over `n` elements: enough blocks to fill the GPU, no more.
    fn stride_config(&self, n: usize) -> Result<LaunchConfig> {
        let blocks = n.div_ceil(THREADS as usize).clamp(1, self.sm_count * 16);
        Ok(LaunchConfig { grid_dim: (grid(blocks, "blocks")?, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })
    }

    /// `contract::silu_mul` checked the width.
    pub(crate) fn silu_mul_impl(&self, gate_up: &CudaTensor) -> Result<CudaTensor> {
        let inter = gate_up.cols / 2;
        let mut out = self.alloc_tensor(gate_up.rows, inter)?;
        if gate_up.rows * inter == 0 {
            return Ok(out);
        }
        let cfg = self.stride_config(gate_up.rows * inter)?;
        let (rows, inter) = (int(gate_up.rows, "rows")?, int(inter, "inter")?);
        let mut launch = self.stream.launch_builder(&self.kernels.silu_mul);
        launch.arg(&*gate_up.data).arg(&mut *out.data).arg(&rows).arg(&inter);
        // SAFETY: argument types and order match silu_mul_bf16; out is rows × inter.
        unsafe { launch.launch(cfg) }.cuda("launching silu_mul_bf16")?;
        self.count_launch();
        Ok(out)
    }

    /// `contract::gather_rows` checked every row. The indices are the step's, on the device (a
    /// padded step gathers its padding rows too).
    pub(crate) fn gather_rows_impl(&self, x: &CudaTensor, step: &DeviceBatch) -> Result<CudaTensor> {
        let count = step.gather_count;
        let mut out = self.alloc_tensor(count, x.cols)?;
        if count == 0 || x.cols == 0 {
            return Ok(out);
        }
        let cfg =
            LaunchConfig { grid_dim: (grid(count, "rows")?, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let cols = int(x.cols, "cols")?;
        let mut launch = self.stream.launch_builder(&self.kernels.gather_rows);
        launch.arg(&*x.data).arg(&*step.gather).arg(&mut *out.data).arg(&cols);
        // SAFETY: argument types and order match gather_rows_bf16; every index was checked
        // (a padded step's padding indices are rows of the padded activations).
        unsafe { launch.launch(cfg) }.cuda("launching gather_rows_bf16")?;
        self.count_launch();
        Ok(out)
    }
}
