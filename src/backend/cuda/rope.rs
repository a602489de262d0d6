//! RoPE fused with the KV cache write: launcher of `kernels/rope.cu` (decode GEMVs do this in
//! their epilogue instead: gemv_epilogue.rs). A bf16 cache takes `rope_write_kv_bf16`, an FP8
//! one `rope_write_kv_bf16_kv8` with the layer's scales.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::step::DeviceBatch;
use super::{grid, int, CudaBackend, CudaKvCache, CudaResultExt, CudaTensor, CudaWeight};
use crate::backend::AttnDims;
use crate::error::Result;

const THREADS: u32 = 128;

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
        let (k_scale, v_scale) = cache.scales(layer);
        let kernel = if cache.is_fp8() { &self.kernels.rope_write_kv_kv8 } else { &self.kernels.rope_write_kv };
        let mut launch = self.stream.launch_builder(kernel);
        launch.arg(&*qkv.data).arg(cos).arg(sin).arg(&*batch.positions).arg(&*batch.slots).arg(&mut *q.data);
        cache.push_layer_mut(&mut launch, layer);
        launch.arg(&heads).arg(&kv_heads).arg(&hd).arg(&k_scale).arg(&v_scale);
        // SAFETY: argument types and order match rope_write_kv_bf16[_kv8] (the cache's element
        // type picks the kernel); positions are below the tables' rows and slots inside the
        // cache (`contract::rope_write_kv`).
        unsafe { launch.launch(cfg) }.cuda("launching rope_write_kv_bf16")?;
        self.count_launch();
        Ok(q)
    }
}
