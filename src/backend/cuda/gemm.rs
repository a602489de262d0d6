//! `x · wᵀ` through cuBLASLt in bf16 with f32 accumulation.
//!
//! Layouts. tulu holds both operands row-major: `x` is M×K (tokens × in), `w` is N×K
//! (out × in, as HF stores linear weights), and `y = x·wᵀ` is M×N. cuBLAS is column-major, and a
//! row-major R×C matrix is, byte for byte, the column-major C×R matrix — its transpose. So we ask
//! cuBLAS for `yᵀ = w · xᵀ` (N×M, column-major), which is `y` row-major:
//! - A = `w`'s memory seen column-major is wᵀ (K×N, ld = K); we need w (N×K) = op(A), so
//!   transa = T, m = N, k = K, lda = K;
//! - B = `x`'s memory seen column-major is xᵀ (K×M, ld = K), which is what we need: transb = N,
//!   n = M, ldb = K;
//! - C = yᵀ (N×M, column-major, ldc = N) is `y` (M×N, row-major).
//!
//! This "TN" form is also the one cuBLASLt has the most kernels for.
//!
//! Decode shapes (at most 8 rows) may run our GEMV instead (gemv.rs decides per shape).
//!
//! Not implemented yet (issue 4, item 5): caching the matmul descriptors/heuristic per shape
//! (cudarc's safe wrapper builds them on every call, a few µs each).

use cudarc::cublaslt::{Matmul, MatmulConfig};
use cudarc::driver::CudaSlice;
use half::bf16;

use super::memory::WeightData;
use super::{CudaBackend, CudaResultExt, CudaTensor, CudaWeight};
use crate::error::Result;

impl CudaBackend {
    /// Shapes checked by `contract::matmul`.
    pub(crate) fn matmul_impl(&self, x: &CudaTensor, w: &CudaWeight) -> Result<CudaTensor> {
        if let WeightData::Fp8 { .. } = w.data {
            return self.matmul_fp8(x, w);
        }
        let wd = w.bf16("matmul")?;
        let (m, n, k) = (x.rows, w.rows, w.cols);
        if m == 0 || n == 0 {
            return self.alloc_tensor(m, n);
        }
        if self.prefer_gemv(x, wd, n, k)? {
            return self.gemv_impl(x, wd, n, k);
        }
        self.blas_impl(x, wd, n, k)
    }

    /// `y = x · wᵀ` by cuBLASLt (shapes checked by the caller).
    pub(crate) fn blas_impl(&self, x: &CudaTensor, wd: &CudaSlice<bf16>, n: usize, k: usize) -> Result<CudaTensor> {
        let m = x.rows;
        let mut y = self.alloc_tensor(m, n)?;
        let cfg = MatmulConfig {
            transa: true,
            transb: false,
            transc: false,
            m: n as u64,
            n: m as u64,
            k: k as u64,
            alpha: 1.0,
            lda: k as i64,
            ldb: k as i64,
            beta: 0.0,
            ldc: n as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        // SAFETY: w holds N×K, x M×K and y M×N elements, matching the layouts described above.
        unsafe { self.blas.matmul(cfg, wd, &*x.data, &mut *y.data, None, None) }
            .cuda(&format!("cuBLASLt bf16 GEMM {m}×{k} · ({n}×{k})ᵀ"))?;
        self.count_launch();
        Ok(y)
    }
}
