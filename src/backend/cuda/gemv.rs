//! Decode GEMVs (launcher of `kernels/gemv.cu`) and the per-shape choice between them and
//! cuBLASLt.
//!
//! A matmul with at most [`GEMV_MAX_ROWS`] token rows and a 16-byte-aligned inner dimension can
//! run either kernel. The first time a shape (M, N, K) is seen, both are timed on the real
//! operands (one warm-up, then the best of five, with events) and the faster is kept for the
//! rest of the run: cuBLASLt's heuristics pick tiles for GEMMs, and on the skinny decode shapes
//! a warp-per-row GEMV that keeps many 16-byte loads in flight reads closer to the bandwidth.
//! `TULU_GEMV=on|off` (or [`CudaBackend::set_gemv_mode`]) forces one kernel; `tulu bench` prints
//! the timings ([`Profiling::tuning_report`](crate::backend::Profiling::tuning_report)).

use std::sync::atomic::Ordering;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

use super::{grid, int, CudaBackend, CudaResultExt, CudaTensor};
use crate::error::{Error, Result};

/// Most token rows the GEMV kernels take.
pub const GEMV_MAX_ROWS: usize = 8;

/// Warps (output columns) per block; kernels/gemv.cu's GEMV_WARPS.
const WARPS: usize = 8;

/// Which kernel runs eligible decode matmuls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemvMode {
    /// The faster of the two, measured per shape on first use.
    Auto = 0,
    /// Always the GEMV.
    Always = 1,
    /// Always cuBLASLt.
    Never = 2,
}

impl GemvMode {
    /// `TULU_GEMV`: `on`, `off`, else auto.
    pub fn from_env() -> Self {
        match std::env::var("TULU_GEMV").as_deref() {
            Ok("on" | "1" | "always") => GemvMode::Always,
            Ok("off" | "0" | "never") => GemvMode::Never,
            _ => GemvMode::Auto,
        }
    }

    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            1 => GemvMode::Always,
            2 => GemvMode::Never,
            _ => GemvMode::Auto,
        }
    }
}

/// One shape's measurement: microseconds per call of each kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct GemvChoice {
    /// Token rows.
    pub m: usize,
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
    /// Our GEMV.
    pub gemv_us: f64,
    /// cuBLASLt.
    pub blas_us: f64,
}

impl GemvChoice {
    /// Whether the GEMV won.
    pub fn use_gemv(&self) -> bool {
        self.gemv_us < self.blas_us
    }
}

impl CudaBackend {
    /// Forces (or frees) the kernel choice for decode matmuls (tests compare both paths).
    pub fn set_gemv_mode(&self, mode: GemvMode) {
        self.gemv_mode.store(mode as u8, Ordering::Relaxed);
    }

    /// Every shape measured so far.
    pub fn gemv_choices(&self) -> Vec<GemvChoice> {
        let mut v: Vec<GemvChoice> =
            self.gemv_choices.lock().map(|c| c.values().cloned().collect()).unwrap_or_default();
        v.sort_by_key(|c| (c.m, c.n, c.k));
        v
    }

    /// Whether `x · wᵀ` (M×K by N×K) should run as a GEMV: eligible, and forced or measured faster.
    pub(crate) fn prefer_gemv(&self, x: &CudaTensor, w: &CudaSlice<bf16>, n: usize, k: usize) -> Result<bool> {
        let m = x.rows;
        if m == 0 || m > GEMV_MAX_ROWS || !k.is_multiple_of(8) || n == 0 {
            return Ok(false);
        }
        match GemvMode::from_u8(self.gemv_mode.load(Ordering::Relaxed)) {
            GemvMode::Always => return Ok(true),
            GemvMode::Never => return Ok(false),
            GemvMode::Auto => {}
        }
        let key = (m, n, k);
        if let Some(c) = self.gemv_choices.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(c.use_gemv());
        }
        let gemv_us = self.time_us(|| self.gemv_impl(x, w, n, k).map(drop))?;
        // cuBLASLt may have no algorithm for the shape (its heuristic returns none): the GEMV
        // takes it then, rather than the matmul failing.
        let blas_us = self.time_us(|| self.blas_impl(x, w, n, k).map(drop)).unwrap_or(f64::INFINITY);
        let choice = GemvChoice { m, n, k, gemv_us, blas_us };
        let use_gemv = choice.use_gemv();
        if let Ok(mut c) = self.gemv_choices.lock() {
            c.insert(key, choice);
        }
        Ok(use_gemv)
    }

    /// Best of five timed runs of `f` (after one warm-up), in microseconds.
    fn time_us(&self, f: impl Fn() -> Result<()>) -> Result<f64> {
        let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let (start, end) = (self.ctx.new_event(timing).cuda("event")?, self.ctx.new_event(timing).cuda("event")?);
        f()?;
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            start.record(&self.stream).cuda("recording an event")?;
            f()?;
            end.record(&self.stream).cuda("recording an event")?;
            best = best.min(start.elapsed_ms(&end).cuda("timing a matmul")? as f64 * 1e3);
        }
        Ok(best)
    }

    /// `y = x · wᵀ` by `gemv_decode_bf16_{M}`.
    pub(crate) fn gemv_impl(&self, x: &CudaTensor, w: &CudaSlice<bf16>, n: usize, k: usize) -> Result<CudaTensor> {
        let m = x.rows;
        if m == 0 || m > GEMV_MAX_ROWS || !k.is_multiple_of(8) || x.cols != k || w.len() < n * k {
            return Err(Error::Backend(format!("gemv: {m}×{} · ({n}×{k})ᵀ is not a GEMV shape", x.cols)));
        }
        let mut y = self.alloc_tensor(m, n)?;
        let cfg = LaunchConfig {
            grid_dim: (grid(n.div_ceil(WARPS), "gemv blocks")?, 1, 1),
            block_dim: ((WARPS * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ni, ki) = (int(n, "n")?, int(k, "k")?);
        let mut launch = self.stream.launch_builder(&self.kernels.gemv[m - 1]);
        launch.arg(&*x.data).arg(w).arg(&mut *y.data).arg(&ni).arg(&ki);
        // SAFETY: argument types and order match gemv_decode_bf16_{m}; x is m×k, w n×k, y m×n,
        // k % 8 == 0 so every row is 16-byte aligned (allocations are 256-byte aligned).
        unsafe { launch.launch(cfg) }.cuda("launching gemv_decode_bf16")?;
        self.count_launch();
        Ok(y)
    }
}
