//! Pseudo-random weights and the read-bandwidth probe: launchers of `kernels/random.cu`.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::bf16;

use super::memory::WeightData;
use super::{grid, int, CudaBackend, CudaResultExt, CudaWeight};
use crate::error::Result;
use crate::weights::random::{fused_shape, RandomSlice};

const THREADS: u32 = 256;

impl CudaBackend {
    /// One bf16 weight of `parts` concatenated along rows, generated in place; padding rows are
    /// zero (the buffer is zeroed first, then each part's real rows are filled).
    pub(crate) fn random_weight_impl(&self, parts: &[RandomSlice]) -> Result<CudaWeight> {
        let (rows, cols) = fused_shape(parts)?;
        let mut dst = self.stream.alloc_zeros::<bf16>((rows * cols).max(1)).cuda("allocating a random weight")?;
        let mut offset = 0;
        for p in parts {
            let n = p.rows.len() * cols;
            if n > 0 {
                let blocks = n.div_ceil(THREADS as usize).clamp(1, self.sm_count * 32);
                let cfg = LaunchConfig {
                    grid_dim: (grid(blocks, "blocks")?, 1, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: 0,
                };
                let (r, c) = (int(p.rows.len(), "rows")?, int(cols, "cols")?);
                let (total_cols, row0, col0) = (p.total_cols as u64, p.rows.start as u64, p.cols.start as u64);
                let mut view = dst.slice_mut(offset..offset + n);
                let mut launch = self.stream.launch_builder(&self.kernels.random_fill);
                launch
                    .arg(&mut view)
                    .arg(&r)
                    .arg(&c)
                    .arg(&p.seed)
                    .arg(&total_cols)
                    .arg(&row0)
                    .arg(&col0)
                    .arg(&p.scale)
                    .arg(&p.offset);
                // SAFETY: argument types and order match random_fill_bf16; the view holds r × c.
                unsafe { launch.launch(cfg) }.cuda("launching random_fill_bf16")?;
                self.count_launch();
            }
            offset += p.shape().0 * cols;
        }
        Ok(CudaWeight { data: WeightData::Bf16(dst), rows, cols })
    }

    /// Best of five timed passes of `read_probe` over a `bytes`-byte buffer (after one warm-up).
    pub(crate) fn measure_read_bandwidth_impl(&self, bytes: usize) -> Result<f64> {
        let words = (bytes / 16).max(1);
        let buf = self.stream.alloc_zeros::<u8>(words * 16).cuda("allocating the bandwidth probe")?;
        let mut sink = self.stream.alloc_zeros::<u32>(1).cuda("allocating the bandwidth probe")?;
        let cfg = LaunchConfig {
            grid_dim: (grid(self.sm_count * 8, "blocks")?, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let (start, end) = (self.ctx.new_event(timing).cuda("event")?, self.ctx.new_event(timing).cuda("event")?);
        let n = words as u64;
        let mut best = f64::INFINITY;
        for pass in 0..6 {
            start.record(&self.stream).cuda("recording an event")?;
            let mut launch = self.stream.launch_builder(&self.kernels.read_probe);
            launch.arg(&buf).arg(&n).arg(&mut sink);
            // SAFETY: argument types and order match read_probe; buf holds n 16-byte words.
            unsafe { launch.launch(cfg) }.cuda("launching read_probe")?;
            self.count_launch();
            end.record(&self.stream).cuda("recording an event")?;
            let ms = start.elapsed_ms(&end).cuda("timing read_probe")? as f64;
            if pass > 0 {
                best = best.min(ms / 1e3);
            }
        }
        Ok((words * 16) as f64 / best)
    }
}
