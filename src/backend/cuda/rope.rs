//! RoPE fused with the KV cache write: launcher of `kernels/rope.cu`, and of its fusion into
//! the qkv decode GEMV's epilogue (`gemv_rope_decode_bf16_{M}` in `kernels/gemv.cu`).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::memory::WeightData;
use super::step::DeviceBatch;
use super::{grid, int, CudaBackend, CudaKvCache, CudaResultExt, CudaTensor, CudaWeight, GEMV_MAX_ROWS};
use crate::backend::AttnDims;
use crate::error::{Error, Result};

const THREADS: u32 = 128;

/// (head, i) pairs per block of `gemv_rope_decode_bf16_{M}` (kernels/gemv.cu's GEMV_WARPS / 2).
const PAIRS_PER_BLOCK: usize = 4;

impl CudaBackend {
    /// The caller has checked the shapes, the tables and that the batch fits the cache
    /// (`contract::rope_write_kv`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rope_write_kv_impl(
        &self,
        qkv: &CudaTensor,
        cos: &CudaWeight,
        sin: &CudaWeight,
        layer: usize,
        cache: &mut CudaKvCache,
        batch: &DeviceBatch,
        dims: AttnDims,
    ) -> Result<CudaTensor> {
        let (q_dim, hd) = (dims.q_dim(), dims.head_dim);
        let rows = batch.rows;
        let (cos, sin) = (cos.f32("rope")?, sin.f32("rope")?);
        let mut q = self.alloc_tensor(rows, q_dim)?;
        if rows == 0 {
            return Ok(q);
        }
        let cfg =
            LaunchConfig { grid_dim: (grid(rows, "tokens")?, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let (heads, kv_heads, hd) = (int(dims.heads, "heads")?, int(dims.kv_heads, "kv_heads")?, int(hd, "head_dim")?);
        let mut launch = self.stream.launch_builder(&self.kernels.rope_write_kv);
        launch
            .arg(&*qkv.data)
            .arg(cos)
            .arg(sin)
            .arg(&*batch.positions)
            .arg(&*batch.slots)
            .arg(&mut *q.data)
            .arg(&mut cache.k[layer])
            .arg(&mut cache.v[layer])
            .arg(&heads)
            .arg(&kv_heads)
            .arg(&hd);
        // SAFETY: argument types and order match rope_write_kv_bf16; positions are below the
        // tables' rows and slots inside the cache (`contract::rope_write_kv`).
        unsafe { launch.launch(cfg) }.cuda("launching rope_write_kv_bf16")?;
        self.count_launch();
        Ok(q)
    }

    /// `rope_write_kv(x · qkvᵀ)`: `gemv_rope_decode_bf16_{M}` where the GEMV is preferred for
    /// the qkv shape, else the matmul then `rope_write_kv_bf16` (the same bits either way). The
    /// caller has checked the shapes, tables and batch.
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
        if let WeightData::Bf16(w) = &qkv.data {
            if x.rows > 0 && x.rows == batch.rows && self.prefer_gemv(x, w, qkv.rows, qkv.cols)? {
                return self.gemv_rope_impl(x, w, (cos, sin), layer, cache, batch, dims);
            }
        }
        let y = self.matmul_impl(x, qkv)?;
        self.rope_write_kv_impl(&y, cos, sin, layer, cache, batch, dims)
    }

    /// q of `x · wᵀ` after RoPE, k and v written to the cache, by `gemv_rope_decode_bf16_{M}`.
    #[allow(clippy::too_many_arguments)]
    fn gemv_rope_impl(
        &self,
        x: &CudaTensor,
        w: &CudaSlice<bf16>,
        (cos, sin): (&CudaWeight, &CudaWeight),
        layer: usize,
        cache: &mut CudaKvCache,
        batch: &DeviceBatch,
        dims: AttnDims,
    ) -> Result<CudaTensor> {
        let (m, k, hd) = (x.rows, x.cols, dims.head_dim);
        let pairs = (dims.heads + 2 * dims.kv_heads) * (hd / 2);
        if m == 0 || m > GEMV_MAX_ROWS || !k.is_multiple_of(8) || !hd.is_multiple_of(2) || w.len() < 2 * pairs * k {
            return Err(Error::Backend(format!("gemv_rope: {m}×{k} · ({}×{k})ᵀ is not a GEMV shape", 2 * pairs)));
        }
        let (cos, sin) = (cos.f32("rope")?, sin.f32("rope")?);
        let mut q = self.alloc_tensor(m, dims.q_dim())?;
        let cfg = LaunchConfig {
            grid_dim: (grid(pairs.div_ceil(PAIRS_PER_BLOCK), "gemv_rope blocks")?, 1, 1),
            block_dim: ((2 * PAIRS_PER_BLOCK * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (heads, kv_heads) = (int(dims.heads, "heads")?, int(dims.kv_heads, "kv_heads")?);
        let (hdi, ki) = (int(hd, "head_dim")?, int(k, "k")?);
        let mut launch = self.stream.launch_builder(&self.kernels.gemv_rope[m - 1]);
        launch.arg(&*x.data).arg(w).arg(cos).arg(sin).arg(&*batch.positions).arg(&*batch.slots);
        launch.arg(&mut *q.data).arg(&mut cache.k[layer]).arg(&mut cache.v[layer]);
        launch.arg(&heads).arg(&kv_heads).arg(&hdi).arg(&ki);
        // SAFETY: argument types and order match gemv_rope_decode_bf16_{m}; x is m×k, w
        // (heads + 2·kv_heads)·hd × k, q m × heads·hd; positions are below the tables' rows and
        // slots inside the cache or 0xFFFFFFFF (`contract::rope_write_kv`); k % 8 == 0.
        unsafe { launch.launch(cfg) }.cuda("launching gemv_rope_decode_bf16")?;
        self.count_launch();
        Ok(q)
    }
}
