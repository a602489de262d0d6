//! Prefill with FP8 weights through cuBLASLt's FP8 GEMM (launcher of `kernels/gemm_fp8.cu`):
//! activations quantized to e4m3 per token by `quantize_fp8_rows_bf16`, `d = xq · wqᵀ` in f32 by
//! cuBLASLt (tensor cores at twice the bf16 rate on sm_89/sm_90), then `y = d · xscale · wscale`
//! by `scale_fp8_gemm_bf16`. The per-token and per-row scales are applied by our kernel, not as
//! cuBLASLt's scale pointers, which are scalars.
//!
//! Taken (gemv_fp8.rs decides) for matmuls of more than [`super::GEMV_MAX_ROWS`] rows on a
//! device of compute capability 8.9 or more, with k and n multiples of 16 (cuBLASLt's FP8
//! alignment); `TULU_FP8_GEMM=0` or [`CudaBackend::set_fp8_gemm`] turn it off (dequantize +
//! bf16 GEMM instead), e.g. to compare the two.
//!
//! Layouts as in gemm.rs: `yᵀ = w · xᵀ` column-major, the "TN" form, the only one cuBLASLt has
//! FP8 kernels for. The f32 product is scratch (`m × n × 4` bytes) from the step workspace.

use std::ffi::c_void;
use std::mem::size_of;
use std::sync::atomic::Ordering;

use cudarc::cublaslt::{result, sys, MatmulShared};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::workspace::Buf;
use super::{grid, int, CudaBackend, CudaResultExt, CudaTensor};
use crate::error::{Error, Result};

/// Threads per block of both kernels.
const THREADS: usize = 256;

impl CudaBackend {
    /// Turns cuBLASLt's FP8 GEMM for prefill-sized FP8 matmuls on or off (on by default on
    /// sm_89+ unless `TULU_FP8_GEMM=0`); off, they dequantize the weight and run the bf16 GEMM.
    /// Refused (stays off) on a device without FP8 tensor cores.
    pub fn set_fp8_gemm(&self, on: bool) {
        self.fp8_gemm.store(on && self.fp8_capable(), Ordering::Relaxed);
    }

    /// Whether the device has FP8 tensor cores (compute capability 8.9 or more).
    pub(crate) fn fp8_capable(&self) -> bool {
        self.ctx.compute_capability().is_ok_and(|cc| cc >= (8, 9))
    }

    /// Whether an FP8 matmul of an `n × k` weight takes the FP8 GEMM (rows are checked by the
    /// caller).
    pub(crate) fn fp8_gemm_takes(&self, n: usize, k: usize) -> bool {
        self.fp8_gemm.load(Ordering::Relaxed) && k.is_multiple_of(16) && n.is_multiple_of(16)
    }

    /// Allocates cuBLASLt's workspace for FP8 GEMMs once, at load (never inside a capture):
    /// 32 MiB on Hopper, 4 MiB before, as NVIDIA recommends. Nothing while the FP8 GEMM is off
    /// (a GEMM turned on after the weights loaded runs without a workspace: fewer algorithms).
    pub(crate) fn reserve_fp8_gemm_workspace(&self) -> Result<()> {
        if !self.fp8_gemm.load(Ordering::Relaxed) || self.fp8_workspace.get().is_some() {
            return Ok(());
        }
        let bytes = if self.ctx.compute_capability().is_ok_and(|cc| cc.0 >= 9) { 32 << 20 } else { 4 << 20 };
        // SAFETY: cuBLASLt's scratch; nothing reads it before cuBLASLt writes it.
        let ws = unsafe { self.stream.alloc::<u8>(bytes) }.cuda("allocating the FP8 GEMM workspace")?;
        let _ = self.fp8_workspace.set(ws);
        Ok(())
    }

    /// `y = x · (w · scale)ᵀ` with x quantized per token (amax clamped by `bound` when > 0).
    pub(crate) fn fp8_gemm_impl(
        &self,
        x: &CudaTensor,
        w: &CudaSlice<u8>,
        scales: &CudaSlice<f32>,
        bound: f32,
        n: usize,
        k: usize,
    ) -> Result<CudaTensor> {
        let m = x.rows;
        if m == 0
            || x.cols != k
            || !k.is_multiple_of(16)
            || !n.is_multiple_of(16)
            || w.len() < n * k
            || scales.len() < n
        {
            return Err(Error::Backend(format!("fp8 GEMM: {m}×{} · ({n}×{k})ᵀ is not an fp8 GEMM shape", x.cols)));
        }
        let (q, xscale) = self.quantize_fp8_rows_impl(x, bound)?;
        let mut d = self.alloc_buf::<f32>(m * n, "allocating an fp8 GEMM's product")?;
        self.cublaslt_fp8(&q, w, &mut d, m, n, k)?;
        let mut y = self.alloc_tensor(m, n)?;
        let cfg = LaunchConfig {
            grid_dim: (grid((m * n).div_ceil(THREADS), "scale_fp8_gemm blocks")?, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (mi, ni) = (int(m, "m")?, int(n, "n")?);
        int(m * n, "m·n")?;
        let mut launch = self.stream.launch_builder(&self.kernels.scale_fp8_gemm);
        launch.arg(&*d).arg(&*xscale).arg(scales).arg(&mut *y.data).arg(&mi).arg(&ni);
        // SAFETY: argument types and order match scale_fp8_gemm_bf16; d and y hold m·n elements,
        // xscale m and scales at least n.
        unsafe { launch.launch(cfg) }.cuda("launching scale_fp8_gemm_bf16")?;
        self.count_launch();
        Ok(y)
    }

    /// Each row of `x` in e4m3 with its f32 scale (`quantize_fp8_rows_bf16`).
    fn quantize_fp8_rows_impl(&self, x: &CudaTensor, bound: f32) -> Result<(Buf<u8>, Buf<f32>)> {
        let (m, k) = (x.rows, x.cols);
        let mut q = self.alloc_buf::<u8>(m * k, "allocating quantized activations")?;
        let mut s = self.alloc_buf::<f32>(m, "allocating activation scales")?;
        if m == 0 {
            return Ok((q, s));
        }
        let cfg = LaunchConfig {
            grid_dim: (grid(m, "quantize_fp8_rows blocks")?, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let ki = int(k, "k")?;
        let mut launch = self.stream.launch_builder(&self.kernels.quantize_fp8_rows);
        launch.arg(&*x.data).arg(&mut *q).arg(&mut *s).arg(&ki).arg(&bound);
        // SAFETY: argument types and order match quantize_fp8_rows_bf16; x is m×k bf16, q m×k
        // bytes, s m f32; one block per row.
        unsafe { launch.launch(cfg) }.cuda("launching quantize_fp8_rows_bf16")?;
        self.count_launch();
        Ok((q, s))
    }

    /// `x` quantized as the FP8 GEMM quantizes it (e4m3 bytes row-major, one scale per row), on
    /// the host: for tests against the CPU's `quant::e4m3`.
    pub fn quantize_activations_fp8(&self, x: &CudaTensor, bound: Option<f32>) -> Result<(Vec<u8>, Vec<f32>)> {
        self.bind()?;
        let (q, s) = self.quantize_fp8_rows_impl(x, bound.unwrap_or(0.0))?;
        let n = x.rows * x.cols;
        let bytes = if n == 0 { Vec::new() } else { self.stream.clone_dtoh(&q.slice(0..n)).cuda("reading e4m3")? };
        let scales = if x.rows == 0 {
            Vec::new()
        } else {
            self.stream.clone_dtoh(&s.slice(0..x.rows)).cuda("reading scales")?
        };
        self.synchronize()?;
        Ok((bytes, scales))
    }

    /// `d (m×n f32, row-major) = q (m×k e4m3) · w (n×k e4m3)ᵀ` by cuBLASLt.
    fn cublaslt_fp8(
        &self,
        q: &CudaSlice<u8>,
        w: &CudaSlice<u8>,
        d: &mut CudaSlice<f32>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let what = || format!("cuBLASLt fp8 GEMM {m}×{k} · ({n}×{k})ᵀ");
        let lt = LtObjects::new(m as u64, n as u64, k as u64).cuda(&what())?;
        let (ws_ptr, ws_bytes) = match self.fp8_workspace.get() {
            Some(ws) => (ws.device_ptr(&self.stream).0, ws.len()),
            None => (0, 0),
        };
        // SAFETY: `lt` holds live descriptor objects; the attribute value outlives the call.
        unsafe {
            result::set_matmul_pref_attribute(
                lt.pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws_bytes) as *const usize as *const c_void,
                size_of::<usize>(),
            )
        }
        .cuda(&what())?;
        let [a, b, c] = lt.layouts;
        // SAFETY: live descriptors describing the operands below.
        let heuristic = unsafe { result::get_matmul_algo_heuristic(*self.blas.handle(), lt.desc, a, b, c, c, lt.pref) }
            .cuda(&what())?;
        let (alpha, beta) = (1f32, 0f32);
        let (wp, _rw) = w.device_ptr(&self.stream);
        let (qp, _rq) = q.device_ptr(&self.stream);
        let (dp, _rd) = d.device_ptr_mut(&self.stream);
        // SAFETY: w holds n·k bytes, q m·k and d m·n f32, as the layouts say; C is D and is not
        // read (beta = 0); the workspace is ours for the stream's lifetime.
        unsafe {
            result::matmul(
                *self.blas.handle(),
                lt.desc,
                (&alpha) as *const f32 as *const c_void,
                (&beta) as *const f32 as *const c_void,
                wp as *const c_void,
                a,
                qp as *const c_void,
                b,
                dp as *const c_void,
                c,
                dp as *mut c_void,
                c,
                &heuristic.algo,
                ws_ptr as *mut c_void,
                ws_bytes,
                self.stream.cu_stream() as *mut _,
            )
        }
        .cuda(&what())?;
        self.count_launch();
        Ok(())
    }
}

/// The cuBLASLt objects of one FP8 GEMM, destroyed on drop: layouts of A (the weight), B (the
/// activations) and C = D (the f32 product), the matmul descriptor (f32 compute and scale, A
/// transposed) and the preference.
struct LtObjects {
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    desc: sys::cublasLtMatmulDesc_t,
    pref: sys::cublasLtMatmulPreference_t,
}

impl LtObjects {
    fn new(m: u64, n: u64, k: u64) -> std::result::Result<Self, result::CublasError> {
        use sys::cudaDataType_t::{CUDA_R_32F, CUDA_R_8F_E4M3};
        let null = std::ptr::null_mut();
        // Filled one by one, so that whatever was created before a failure is destroyed.
        let mut lt = LtObjects { layouts: [null; 3], desc: std::ptr::null_mut(), pref: std::ptr::null_mut() };
        lt.layouts[0] = result::create_matrix_layout(CUDA_R_8F_E4M3, k, n, k as i64)?;
        lt.layouts[1] = result::create_matrix_layout(CUDA_R_8F_E4M3, k, m, k as i64)?;
        lt.layouts[2] = result::create_matrix_layout(CUDA_R_32F, n, m, n as i64)?;
        lt.desc = result::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, CUDA_R_32F)?;
        lt.pref = result::create_matmul_pref()?;
        // CUBLAS_OP_T (cudarc's sys has no cublasOperation_t for cuBLASLt).
        let op_t: i32 = 1;
        // SAFETY: a live descriptor; the value outlives the call.
        unsafe {
            result::set_matmul_desc_attribute(
                lt.desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&op_t) as *const i32 as *const c_void,
                size_of::<i32>(),
            )?;
        }
        Ok(lt)
    }
}

impl Drop for LtObjects {
    fn drop(&mut self) {
        // SAFETY: each handle is either null (never created) or created above and destroyed once.
        unsafe {
            for l in self.layouts {
                if !l.is_null() {
                    let _ = result::destroy_matrix_layout(l);
                }
            }
            if !self.desc.is_null() {
                let _ = result::destroy_matmul_desc(self.desc);
            }
            if !self.pref.is_null() {
                let _ = result::destroy_matmul_pref(self.pref);
            }
        }
    }
}
