//! Decode GEMVs with the next op in their epilogue (launcher of `kernels/gemv_epilogue.cuh`'s
//! kernels, instantiated for bf16 weights in `kernels/gemv.cu` and for e4m3 weights in
//! `kernels/gemv_fp8.cu`): the gate/up GEMV with SiLU·mul, and the qkv GEMV with RoPE and the
//! KV cache write (into a bf16 cache, or an FP8 one by the `_kv8` kernels). Each equals its GEMV followed by the unfused op bit for bit; they run where the
//! plain GEMV would (bf16: where it was measured faster than cuBLASLt for the shape; FP8: every
//! decode shape), and the pair runs everywhere else.

use cudarc::driver::{CudaFunction, CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};
use half::bf16;

use super::memory::WeightData;
use super::step::DeviceBatch;
use super::{grid, int, CudaBackend, CudaKvCache, CudaResultExt, CudaTensor, CudaWeight, GEMV_MAX_ROWS};
use crate::backend::AttnDims;
use crate::error::{Error, Result};

/// Output rows (gate/up) or (head, i) pairs (qkv) per block: half of gemv_epilogue.cuh's
/// GEMV_WARPS, whose other half computes their partners.
const PER_BLOCK: usize = 4;

/// A fused GEMV's weight operands.
enum GemvWeight<'a> {
    Bf16(&'a CudaSlice<bf16>),
    /// e4m3 rows and their scales.
    Fp8(&'a CudaSlice<u8>, &'a CudaSlice<f32>),
}

impl<'a> GemvWeight<'a> {
    /// Pushes the weight's kernel arguments (`w`, then `scale` for FP8).
    fn push(&self, launch: &mut LaunchArgs<'a>) {
        match self {
            GemvWeight::Bf16(w) => launch.arg(*w),
            GemvWeight::Fp8(w, s) => launch.arg(*w).arg(*s),
        };
    }

    /// Whether it holds `rows × k` elements (and `rows` scales).
    fn holds(&self, rows: usize, k: usize) -> bool {
        match self {
            GemvWeight::Bf16(w) => w.len() >= rows * k,
            GemvWeight::Fp8(w, s) => w.len() >= rows * k && s.len() >= rows,
        }
    }

    /// Whether rows of `k` elements are 16-byte aligned (the kernels' loads).
    fn aligned(&self, k: usize) -> bool {
        match self {
            GemvWeight::Bf16(_) => k.is_multiple_of(8),
            GemvWeight::Fp8(..) => k.is_multiple_of(16),
        }
    }

    /// The kernel of `m` rows: from `bf16` or `fp8` by the weight's type.
    fn kernel<'k>(&self, bf16: &'k [CudaFunction], fp8: &'k [CudaFunction], m: usize) -> &'k CudaFunction {
        match self {
            GemvWeight::Bf16(_) => &bf16[m - 1],
            GemvWeight::Fp8(..) => &fp8[m - 1],
        }
    }
}

impl CudaBackend {
    /// `w`'s operands when `x · wᵀ` runs as a decode GEMV (so the fused kernel runs), else `None`.
    fn fused_gemv_weight<'a>(&self, x: &CudaTensor, w: &'a CudaWeight) -> Result<Option<GemvWeight<'a>>> {
        let (m, n, k) = (x.rows, w.rows, w.cols);
        if m == 0 || m > GEMV_MAX_ROWS || x.cols != k {
            return Ok(None);
        }
        Ok(match &w.data {
            WeightData::Bf16(d) if self.prefer_gemv(x, d, n, k)? => Some(GemvWeight::Bf16(d)),
            WeightData::Fp8 { bytes, scales, .. } if super::gemv_fp8::fp8_gemv_takes(m, k) => {
                Some(GemvWeight::Fp8(bytes, scales))
            }
            _ => None,
        })
    }

    /// `silu_mul(x · gate_upᵀ)`: the fused GEMV for decode shapes, else the matmul then
    /// `silu_mul_bf16`. Shapes checked by the caller.
    pub(crate) fn matmul_silu_mul_impl(&self, x: &CudaTensor, gate_up: &CudaWeight) -> Result<CudaTensor> {
        match self.fused_gemv_weight(x, gate_up)? {
            Some(w) => self.gemv_silu_impl(x, &w, gate_up.rows / 2),
            None => self.silu_mul_impl(&self.matmul_impl(x, gate_up)?),
        }
    }

    /// `y = silu(x · gateᵀ) · (x · upᵀ)` by `gemv[_fp8]_silu_decode_bf16_{M}`, w = [gate; up].
    fn gemv_silu_impl(&self, x: &CudaTensor, w: &GemvWeight<'_>, inter: usize) -> Result<CudaTensor> {
        let (m, k) = (x.rows, x.cols);
        if m == 0 || m > GEMV_MAX_ROWS || !w.aligned(k) || !w.holds(2 * inter, k) {
            return Err(Error::Backend(format!("gemv_silu: {m}×{k} · ({}×{k})ᵀ is not a GEMV shape", 2 * inter)));
        }
        let mut y = self.alloc_tensor(m, inter)?;
        let cfg = LaunchConfig {
            grid_dim: (grid(inter.div_ceil(PER_BLOCK), "gemv_silu blocks")?, 1, 1),
            block_dim: ((2 * PER_BLOCK * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ii, ki) = (int(inter, "inter")?, int(k, "k")?);
        let mut launch = self.stream.launch_builder(w.kernel(&self.kernels.gemv_silu, &self.kernels.gemv_fp8_silu, m));
        launch.arg(&*x.data);
        w.push(&mut launch);
        launch.arg(&mut *y.data).arg(&ii).arg(&ki);
        // SAFETY: argument types and order match gemv[_fp8]_silu_decode_bf16_{m}; x is m×k, w
        // 2·inter×k (and 2·inter scales), y m×inter; rows are 16-byte aligned (`aligned`).
        unsafe { launch.launch(cfg) }.cuda("launching gemv_silu_decode")?;
        self.count_launch();
        Ok(y)
    }

    /// `rope_write_kv(x · qkvᵀ)`: the fused GEMV for decode shapes, else the matmul then
    /// `rope_write_kv_bf16`. Shapes, tables and batch checked by the caller.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul_rope_write_kv_impl(
        &self,
        x: &CudaTensor,
        qkv: &CudaWeight,
        cos: &CudaWeight,
        sin: &CudaWeight,
        layer: usize,
        cache: &mut CudaKvCache,
        batch: &DeviceBatch,
        dims: AttnDims,
    ) -> Result<CudaTensor> {
        match self.fused_gemv_weight(x, qkv)? {
            Some(w) if x.rows == batch.rows => self.gemv_rope_impl(x, &w, (cos, sin), layer, cache, batch, dims),
            _ => self.rope_write_kv_impl(&self.matmul_impl(x, qkv)?, cos, sin, layer, cache, batch, dims),
        }
    }

    /// q of `x · wᵀ` after RoPE, k and v written to the cache, by
    /// `gemv[_fp8]_rope_decode_bf16_{M}`.
    #[allow(clippy::too_many_arguments)]
    fn gemv_rope_impl(
        &self,
        x: &CudaTensor,
        w: &GemvWeight<'_>,
        (cos, sin): (&CudaWeight, &CudaWeight),
        layer: usize,
        cache: &mut CudaKvCache,
        batch: &DeviceBatch,
        dims: AttnDims,
    ) -> Result<CudaTensor> {
        let (m, k, hd) = (x.rows, x.cols, dims.head_dim);
        let pairs = (dims.heads + 2 * dims.kv_heads) * (hd / 2);
        if m == 0 || m > GEMV_MAX_ROWS || !w.aligned(k) || !hd.is_multiple_of(2) || !w.holds(2 * pairs, k) {
            return Err(Error::Backend(format!("gemv_rope: {m}×{k} · ({}×{k})ᵀ is not a GEMV shape", 2 * pairs)));
        }
        let (cos, sin) = (cos.f32("rope")?, sin.f32("rope")?);
        let mut q = self.alloc_tensor(m, dims.q_dim())?;
        let cfg = LaunchConfig {
            grid_dim: (grid(pairs.div_ceil(PER_BLOCK), "gemv_rope blocks")?, 1, 1),
            block_dim: ((2 * PER_BLOCK * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (heads, kv_heads) = (int(dims.heads, "heads")?, int(dims.kv_heads, "kv_heads")?);
        let (hdi, ki) = (int(hd, "head_dim")?, int(k, "k")?);
        let (k_scale, v_scale) = cache.scales(layer);
        let kernels = match cache.is_fp8() {
            false => (&self.kernels.gemv_rope, &self.kernels.gemv_fp8_rope),
            true => (&self.kernels.gemv_rope_kv8, &self.kernels.gemv_fp8_rope_kv8),
        };
        let mut launch = self.stream.launch_builder(w.kernel(kernels.0, kernels.1, m));
        launch.arg(&*x.data);
        w.push(&mut launch);
        launch.arg(cos).arg(sin).arg(&*batch.positions).arg(&*batch.slots).arg(&mut *q.data);
        cache.push_layer_mut(&mut launch, layer);
        launch.arg(&heads).arg(&kv_heads).arg(&hdi).arg(&ki).arg(&k_scale).arg(&v_scale);
        // SAFETY: argument types and order match gemv[_fp8]_rope_decode_bf16[_kv8]_{m} (the
        // cache's element type picks `_kv8`); x is m×k, w
        // (heads + 2·kv_heads)·hd × k (and as many scales), q m × heads·hd; positions are below
        // the tables' rows and slots inside the cache or 0xFFFFFFFF (`contract::rope_write_kv`);
        // rows are 16-byte aligned (`aligned`).
        unsafe { launch.launch(cfg) }.cuda("launching gemv_rope_decode")?;
        self.count_launch();
        Ok(q)
    }
}
