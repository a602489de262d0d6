//! FP8 weights on the device (launcher of `kernels/gemv_fp8.cu`): e4m3 rows with one f32 scale
//! per row ([`Fp8Rows`]), half the bytes of bf16. Decode matmuls (at most
//! [`GEMV_MAX_ROWS`] token rows) read them directly with `gemv_fp8_decode_bf16_{M}` (bf16
//! activations); larger ones take cuBLASLt's FP8 GEMM with activations quantized per token
//! (gemm_fp8.rs) on sm_89+, and elsewhere (or for shapes it does not take) dequantize the weight
//! to bf16 in a scratch buffer and run cuBLASLt's bf16 GEMM.
//!
//! Unlike bf16 (gemv.rs), decode shapes are not timed against the GEMM: the FP8 GEMM also
//! quantizes activations, so the choice would change decode's numerics with the device's timings.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::memory::WeightData;
use super::{grid, int, CudaBackend, CudaResultExt, CudaTensor, CudaWeight, GEMV_MAX_ROWS};
use crate::error::{Error, Result};
use crate::weights::fp8::Fp8Rows;

/// Warps (output rows) per block; kernels/gemv_fp8.cu's GEMV_FP8_WARPS.
const WARPS: usize = 8;

/// Threads per block of the dequantization (eight elements each).
const DEQUANT_THREADS: usize = 256;

/// Whether an FP8 matmul of `m` token rows over `k` inputs runs as a decode GEMV (plain or fused,
/// gemv_epilogue.rs): every decode shape whose rows are 16-byte aligned.
pub(crate) fn fp8_gemv_takes(m: usize, k: usize) -> bool {
    (1..=GEMV_MAX_ROWS).contains(&m) && k.is_multiple_of(16)
}

impl CudaBackend {
    /// Uploads a host FP8 weight.
    pub(crate) fn upload_fp8(&self, w: &Fp8Rows) -> Result<CudaWeight> {
        if w.bytes.len() != w.rows * w.cols || w.scales.len() != w.rows {
            return Err(Error::Backend(format!(
                "fp8 weight: {} bytes and {} scales for {}×{}",
                w.bytes.len(),
                w.scales.len(),
                w.rows,
                w.cols
            )));
        }
        // CUDA refuses empty allocations: an empty weight holds one unused element.
        let bytes = if w.bytes.is_empty() { &[0u8][..] } else { &w.bytes };
        let scales = if w.scales.is_empty() { &[0f32][..] } else { &w.scales };
        let bytes = self.stream.clone_htod(bytes).cuda("copying an fp8 weight to the device")?;
        let scales = self.stream.clone_htod(scales).cuda("copying fp8 scales to the device")?;
        self.stream.synchronize().cuda("finishing an fp8 weight upload")?;
        let bound = w.activation_bound.unwrap_or(0.0);
        self.reserve_fp8_gemm_workspace()?;
        Ok(CudaWeight { data: WeightData::Fp8 { bytes, scales, bound }, rows: w.rows, cols: w.cols })
    }

    /// `x · wᵀ` for an FP8 `w` (shapes checked by `contract::matmul`): the GEMV for decode
    /// shapes, else dequantize + cuBLASLt.
    pub(crate) fn matmul_fp8(&self, x: &CudaTensor, w: &CudaWeight) -> Result<CudaTensor> {
        let WeightData::Fp8 { bytes, scales, bound } = &w.data else {
            return Err(Error::Backend("matmul_fp8: not an fp8 weight".into()));
        };
        let (m, n, k) = (x.rows, w.rows, w.cols);
        if m == 0 || n == 0 {
            return self.alloc_tensor(m, n);
        }
        if fp8_gemv_takes(m, k) {
            return self.gemv_fp8_impl(x, bytes, scales, n, k);
        }
        if self.fp8_gemm_takes(n, k) {
            return self.fp8_gemm_impl(x, bytes, scales, *bound, n, k);
        }
        let dense = self.dequant_fp8_impl(bytes, scales, n, k)?;
        self.blas_impl(x, &dense, n, k)
    }

    /// `y = x · (w · scale)ᵀ` by `gemv_fp8_decode_bf16_{M}`.
    pub(crate) fn gemv_fp8_impl(
        &self,
        x: &CudaTensor,
        w: &CudaSlice<u8>,
        scales: &CudaSlice<f32>,
        n: usize,
        k: usize,
    ) -> Result<CudaTensor> {
        let m = x.rows;
        if m == 0 || m > GEMV_MAX_ROWS || !k.is_multiple_of(16) || x.cols != k || w.len() < n * k || scales.len() < n {
            return Err(Error::Backend(format!("gemv_fp8: {m}×{} · ({n}×{k})ᵀ is not an fp8 GEMV shape", x.cols)));
        }
        let mut y = self.alloc_tensor(m, n)?;
        let cfg = LaunchConfig {
            grid_dim: (grid(n.div_ceil(WARPS), "gemv_fp8 blocks")?, 1, 1),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ni, ki) = (int(n, "n")?, int(k, "k")?);
        let mut launch = self.stream.launch_builder(&self.kernels.gemv_fp8[m - 1]);
        launch.arg(&*x.data).arg(w).arg(scales).arg(&mut *y.data).arg(&ni).arg(&ki);
        // SAFETY: argument types and order match gemv_fp8_decode_bf16_{m}; x is m×k bf16, w n×k
        // bytes, scales n f32, y m×n; k % 16 == 0, so every row of w and x is 16-byte aligned
        // (allocations are 256-byte aligned).
        unsafe { launch.launch(cfg) }.cuda("launching gemv_fp8_decode_bf16")?;
        self.count_launch();
        Ok(y)
    }

    /// A new bf16 copy of an FP8 weight (`n × k`), by `dequant_fp8_bf16`.
    pub(crate) fn dequant_fp8_impl(
        &self,
        w: &CudaSlice<u8>,
        scales: &CudaSlice<f32>,
        n: usize,
        k: usize,
    ) -> Result<CudaSlice<bf16>> {
        if !k.is_multiple_of(8) || w.len() < n * k || scales.len() < n {
            return Err(Error::Backend(format!("dequant_fp8: {n}×{k} needs k % 8 == 0 and n·k bytes, n scales")));
        }
        let mut out = self.alloc_bf16(n * k)?;
        let cfg = LaunchConfig {
            grid_dim: (grid((n * k / 8).div_ceil(DEQUANT_THREADS), "dequant_fp8 blocks")?, 1, 1),
            block_dim: (DEQUANT_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ni, ki) = (int(n, "n")?, int(k, "k")?);
        int(n * k, "n·k")?;
        let mut launch = self.stream.launch_builder(&self.kernels.dequant_fp8);
        launch.arg(w).arg(scales).arg(&mut out).arg(&ni).arg(&ki);
        // SAFETY: argument types and order match dequant_fp8_bf16; w holds n·k bytes, scales n
        // f32, out n·k bf16; k % 8 == 0, so each thread's eight bytes are 8-byte aligned.
        unsafe { launch.launch(cfg) }.cuda("launching dequant_fp8_bf16")?;
        self.count_launch();
        Ok(out)
    }
}
