//! The CUDA backend: cudarc (libcuda, cuBLASLt loaded at run time), tulu's kernels from
//! `kernels/*.cu` (compiled by build.rs, embedded), cuBLASLt for GEMMs.
//!
//! Storage is bf16 everywhere (activations, weights, KV cache) and arithmetic f32; the CPU
//! backend, f32 throughout, is the reference `tests/gpu.rs` compares every op with. Each op's
//! launcher sits next to its shape checks in the file named after its kernel file:
//! `rmsnorm.rs` ↔ `kernels/rmsnorm.cu`, and so on; `gemm.rs` wraps cuBLASLt.
//!
//! Everything runs on one stream, in order, so cudarc's per-buffer event tracking (meant for
//! several streams) is turned off; host reads go through synchronous copies.
//!
//! A step (`begin_step` … `end_step`) uploads its metadata once into a persistent buffer
//! (step.rs), carves its tensors from a workspace reserved at load (workspace.rs), and, for a
//! decode step, replays a CUDA graph captured for its batch-size bucket (graphs.rs).
//!
//! Decode GEMVs carry the next op in their epilogue (gemv_epilogue.rs: RoPE + KV write after
//! qkv, SiLU·mul after gate/up); residual adds stay fused with the next RMSNorm, which needs the
//! whole row. Not implemented yet: PDL (programmatic dependent launch). Tensor parallelism runs one
//! backend per rank thread (src/ranks/threads.rs), combined by NCCL
//! (src/parallel/nccl.rs) or, on one GPU, through the host (src/parallel/local_cuda.rs).

mod attention;
mod elementwise;
mod embedding;
mod gemm;
mod gemm_fp8;
mod gemv;
mod gemv_epilogue;
mod gemv_fp8;
mod graphs;
mod memory;
mod module;
mod random;
mod rmsnorm;
mod rope;
mod sampling;
mod step;
mod workspace;

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::CudaBlasLT;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};

pub use self::gemv::{GemvChoice, GemvMode, GEMV_MAX_ROWS};
pub use self::graphs::buckets;
use self::graphs::Graphs;
pub use self::memory::{CudaKvCache, CudaTensor, CudaWeight};
use self::memory::{Staging, WeightData};
use self::module::Kernels;
pub use self::step::CudaStep;
use self::step::StepMeta;
use self::workspace::Workspace;
use super::contract;
use super::{AttnDims, Backend, KvCacheSpec, Profiling, Runtime, StepInputs, StepShape};
use crate::error::{Error, Result};
use crate::runtime::sampler::RowSampling;
use crate::runtime::token_mask::TokenMasks;
use crate::weights::random::RandomSlice;
use crate::weights::TensorSlice;

/// Whether a CUDA device can be used: `Ok` when libcuda loads and at least one device exists,
/// else why not, in a sentence for the user.
pub fn cuda_available() -> std::result::Result<(), String> {
    // cudarc panics on the first driver call when libcuda is missing: look for it first.
    // SAFETY: only tries to dlopen the library's candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("the NVIDIA driver library (libcuda.so) was not found: no NVIDIA driver on this machine".into());
    }
    match CudaContext::device_count() {
        Ok(0) => Err("the NVIDIA driver reports no CUDA device".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(format!("the NVIDIA driver failed to initialise: {e}")),
    }
}

/// Converts cudarc's errors into tulu's, naming what was being done.
pub(crate) trait CudaResultExt<T> {
    /// `Error::Backend("{what}: {error}")` on failure.
    fn cuda(self, what: &str) -> Result<T>;
}

impl<T, E: Display> CudaResultExt<T> for std::result::Result<T, E> {
    fn cuda(self, what: &str) -> Result<T> {
        self.map_err(|e| Error::Backend(format!("{what}: {e}")))
    }
}

/// `x` as a kernel's `int` argument, or an error naming `what` when it does not fit.
pub(crate) fn int(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::Backend(format!("{what} = {x} does not fit a kernel's 32-bit index")))
}

/// `x` as a grid dimension (at most 2^31 - 1 blocks in x, 65535 in y and z).
pub(crate) fn grid(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x)
        .ok()
        .filter(|&g| g > 0 && g < (1 << 31))
        .ok_or_else(|| Error::Backend(format!("{what} = {x} is not a valid grid size")))
}

/// The CUDA backend on one device.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlasLT,
    kernels: Kernels,
    /// Streaming multiprocessors, for sizing grids.
    sm_count: usize,
    name: String,
    /// Fill every new output with NaN before its kernel runs (tests; fixed at construction).
    poison: bool,
    staging: Mutex<Option<Staging>>,
    /// Where every step's metadata is uploaded: the persistent buffer (step.rs).
    meta: Mutex<StepMeta>,
    /// The step workspace (workspace.rs), from `reserve`.
    workspace: Mutex<Option<Arc<Workspace>>>,
    /// Between `begin_step` and `end_step`: tensors come from the workspace.
    in_step: AtomicBool,
    /// Inside a graph capture (graphs.rs).
    capturing: AtomicBool,
    /// Step allocations the workspace could not hold (they came from the pool).
    workspace_overflows: AtomicU64,
    graphs: Mutex<Graphs>,
    /// Kernel launches (and collectives) so far, replayed graphs' included.
    launches: AtomicU64,
    /// Longest context the model takes (sizes a graph's attention splits).
    max_context: AtomicUsize,
    /// Prefill-sized FP8 matmuls take cuBLASLt's FP8 GEMM (gemm_fp8.rs), and its workspace.
    fp8_gemm: AtomicBool,
    fp8_workspace: std::sync::OnceLock<CudaSlice<u8>>,
    /// `GemvMode` as u8 (gemv.rs).
    gemv_mode: AtomicU8,
    /// Decode matmul shapes measured so far, by (M, N, K).
    gemv_choices: Mutex<HashMap<(usize, usize, usize), GemvChoice>>,
}

/// Checks a test turns on when it makes a backend ([`CudaBackend::with_debug`]); fixed for the
/// backend's life, so no step of a production backend reads a switch a test could flip. Both
/// off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CudaDebug {
    /// Fill every output (and the KV cache) with NaN before the kernel that writes it, so that
    /// an element a kernel forgets shows up.
    pub poison: bool,
    /// Upload every step's metadata into a fresh buffer instead of the persistent one — the bug
    /// graphs must not have, for a test to show that it would be caught (step.rs).
    pub fresh_step_buffers: bool,
}

impl CudaBackend {
    /// Opens CUDA device `ordinal` and loads the kernels; fails with a clear reason on a
    /// machine without the driver, the device, cuBLASLt, or with kernels that do not load.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_debug(ordinal, CudaDebug::default())
    }

    /// [`CudaBackend::new`] with the test checks of `debug`.
    pub fn with_debug(ordinal: usize, debug: CudaDebug) -> Result<Self> {
        let dev = |message: String| Error::Device { device: format!("cuda:{ordinal}"), message };
        cuda_available().map_err(dev)?;
        let count = CudaContext::device_count().map_err(|e| dev(e.to_string()))?;
        if ordinal >= count.max(0) as usize {
            return Err(dev(format!("there are only {count} CUDA devices (cuda:0 to cuda:{})", count - 1)));
        }
        // SAFETY: only tries to dlopen the library's candidate names.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Err(dev("cuBLASLt (libcublasLt.so) was not found; install the CUDA 13 runtime libraries".into()));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| dev(format!("creating a context: {e}")))?;
        // SAFETY: called before any buffer exists; one stream orders all our work (module docs).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| dev(format!("creating a stream: {e}")))?;
        let blas = CudaBlasLT::new(stream.clone()).map_err(|e| dev(format!("creating a cuBLASLt handle: {e}")))?;
        let kernels = Kernels::load(&ctx)?;
        let sm_count = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| dev(e.to_string()))?
            .max(1) as usize;
        let (major, minor) = ctx.compute_capability().map_err(|e| dev(e.to_string()))?;
        let name =
            format!("cuda:{ordinal} ({}, sm_{major}{minor})", ctx.name().unwrap_or_else(|_| "unknown GPU".into()));
        let backend = CudaBackend {
            ctx,
            stream,
            blas,
            kernels,
            sm_count,
            name,
            poison: debug.poison,
            staging: Mutex::new(None),
            meta: Mutex::new(match debug.fresh_step_buffers {
                true => StepMeta::FreshEachStep(Vec::new()),
                false => StepMeta::Persistent(None),
            }),
            workspace: Mutex::new(None),
            in_step: AtomicBool::new(false),
            capturing: AtomicBool::new(false),
            workspace_overflows: AtomicU64::new(0),
            graphs: Mutex::new(Graphs::default()),
            launches: AtomicU64::new(0),
            max_context: AtomicUsize::new(0),
            fp8_gemm: AtomicBool::new(false),
            fp8_workspace: std::sync::OnceLock::new(),
            gemv_mode: AtomicU8::new(GemvMode::from_env() as u8),
            gemv_choices: Mutex::new(HashMap::new()),
        };
        backend.set_fp8_gemm(std::env::var("TULU_FP8_GEMM").map_or(true, |v| v != "0"));
        Ok(backend)
    }

    /// Free and total device memory in bytes (sizes the KV cache after the weights are loaded).
    pub fn memory_info(&self) -> Result<(u64, u64)> {
        let (free, total) = self.ctx.mem_get_info().cuda("querying device memory")?;
        Ok((free as u64, total as u64))
    }

    /// Waits until all queued work has finished (timing, tests).
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().cuda("synchronizing the stream")
    }

    /// Copies a host matrix to a device tensor (rounded to bf16).
    pub fn tensor_from_host(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaTensor> {
        if data.len() != rows * cols {
            return Err(Error::Backend(format!("{} values cannot form {rows}×{cols}", data.len())));
        }
        self.bind()?;
        let mut t = self.alloc_tensor(rows, cols)?;
        if !data.is_empty() {
            let host: Vec<half::bf16> = data.iter().map(|&x| half::bf16::from_f32(x)).collect();
            self.stream.memcpy_htod(&host, &mut *t.data).cuda("copying a tensor to the device")?;
        }
        Ok(t)
    }

    /// The stream all of this backend's work is ordered on: collectives (NCCL) must be queued
    /// on it too, so they run after the op that produced their input and before the next.
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Makes this backend's context current on the calling thread (the engine may call from
    /// any worker thread).
    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().cuda("binding the CUDA context")
    }

    /// Counts one kernel launch (or collective) for `launches`.
    pub(crate) fn count_launch(&self) {
        self.launches.fetch_add(1, Ordering::Relaxed);
    }

    /// The step workspace's size and the most of it ever in use, in bytes (0, 0 before `reserve`).
    pub fn workspace_usage(&self) -> (usize, usize) {
        self.workspace.lock().ok().and_then(|w| w.as_ref().map(|w| (w.bytes(), w.peak()))).unwrap_or((0, 0))
    }

    /// Step allocations that did not fit the workspace so far (they came from the pool).
    pub fn workspace_overflows(&self) -> u64 {
        self.workspace_overflows.load(Ordering::Relaxed)
    }

    /// Whether graphs are on (`reserve` turned them on, and no test turned them off since).
    pub fn set_graphs(&self, on: bool) {
        if let Ok(mut g) = self.graphs.lock() {
            g.enabled = on && !g.buckets.is_empty();
        }
    }

    /// `reserve`: the workspace, the metadata buffer for the largest step, the buckets.
    fn reserve_impl(&self, shape: &StepShape) -> Result<()> {
        let limits = shape.limits;
        let buckets = buckets(limits.max_num_seqs);
        let rows = limits.max_num_batched_tokens.max(limits.max_num_seqs);
        let tables = limits.max_num_seqs * shape.max_positions.div_ceil(shape.block_size.max(1));
        self.drop_graphs("the backend was reserved again");
        *self.workspace.lock().map_err(|_| Error::Backend("workspace lock poisoned".into()))? =
            Some(Workspace::new(&self.stream, shape.workspace_bytes)?);
        {
            let mut meta = self.meta.lock().map_err(|_| Error::Backend("step buffer lock poisoned".into()))?;
            if let StepMeta::Persistent(buf) = &mut *meta {
                *buf = None;
                // SAFETY: every word a step reads is written by its upload first.
                *buf = Some(unsafe { self.stream.alloc::<u32>(8 * rows + tables) }.cuda("allocating the step buffer")?);
            }
        }
        self.max_context.store(shape.max_positions, Ordering::Relaxed);
        let mut g = self.graphs.lock().map_err(|_| Error::Backend("graph table lock poisoned".into()))?;
        g.enabled = limits.graphs;
        g.buckets = buckets;
        Ok(())
    }
}

impl Runtime for CudaBackend {
    fn device_memory(&self) -> Option<(u64, u64)> {
        self.bind().ok()?;
        self.memory_info().ok()
    }

    fn reserve(&self, shape: &StepShape) -> Result<()> {
        self.bind()?;
        self.reserve_impl(shape)
    }

    fn reserved_bytes(&self) -> usize {
        let ws = self.workspace.lock().ok().and_then(|w| w.as_ref().map(|w| w.bytes())).unwrap_or(0);
        let meta = self.meta.lock().ok().map_or(0, |m| m.bytes());
        ws + meta
    }

    fn fit_workspace(&self) -> Result<usize> {
        self.bind()?;
        self.fit_workspace_impl()
    }

    fn begin_step(&self, inputs: &StepInputs<'_>) -> Result<CudaStep> {
        self.bind()?;
        self.make_step(inputs, true)
    }

    fn end_step(&self, step: CudaStep) {
        self.end_step_impl(step)
    }

    fn run_step(&self, step: &CudaStep, body: &mut dyn FnMut() -> Result<CudaTensor>) -> Result<CudaTensor> {
        self.bind()?;
        self.run_step_impl(step, body)
    }

    fn graph_buckets(&self) -> Vec<usize> {
        self.graphs.lock().ok().filter(|g| g.enabled).map(|g| g.buckets.clone()).unwrap_or_default()
    }
}

impl Profiling for CudaBackend {
    fn measure_read_bandwidth(&self, bytes: usize) -> Result<f64> {
        self.bind()?;
        self.measure_read_bandwidth_impl(bytes)
    }

    fn launches(&self) -> Option<u64> {
        Some(self.launches.load(Ordering::Relaxed))
    }

    fn tuning_report(&self) -> Vec<serde_json::Value> {
        self.gemv_choices()
            .into_iter()
            .map(|c| {
                serde_json::json!({
                    "case": "matmul_choice",
                    "m": c.m,
                    "n": c.n,
                    "k": c.k,
                    "gemv_us": (c.gemv_us * 100.0).round() / 100.0,
                    "cublaslt_us": (c.blas_us * 100.0).round() / 100.0,
                    "weight_mb": (c.n * c.k * 2) as f64 / 1e6,
                    "chosen": if c.use_gemv() { "gemv" } else { "cublaslt" },
                })
            })
            .collect()
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Weight = CudaWeight;
    type KvCache = CudaKvCache;
    type Step = CudaStep;

    fn step_for(&self, inputs: &StepInputs<'_>) -> Result<CudaStep> {
        self.bind()?;
        self.make_step(inputs, false)
    }

    fn describe(&self) -> String {
        let overridden = self.kernels.overridden();
        if overridden.is_empty() {
            self.name.clone()
        } else {
            format!("{} [TULU_KERNELS: {}]", self.name, overridden.join(", "))
        }
    }

    fn load_weight(&self, parts: &[TensorSlice<'_>]) -> Result<CudaWeight> {
        self.bind()?;
        self.load_weight_impl(parts)
    }

    fn random_weight(&self, parts: &[RandomSlice]) -> Result<CudaWeight> {
        self.bind()?;
        self.random_weight_impl(parts)
    }

    fn element_bytes(&self) -> usize {
        std::mem::size_of::<half::bf16>()
    }

    fn load_fp8_weight(&self, parts: &[TensorSlice<'_>], activation_bound: Option<f32>) -> Result<CudaWeight> {
        let w = crate::weights::fp8::Fp8Rows { activation_bound, ..crate::weights::fp8::Fp8Rows::from_slices(parts)? };
        self.bind()?;
        self.upload_fp8(&w)
    }

    fn random_fp8_weight(&self, parts: &[RandomSlice], activation_bound: Option<f32>) -> Result<CudaWeight> {
        let w = crate::weights::fp8::Fp8Rows { activation_bound, ..crate::weights::fp8::Fp8Rows::from_random(parts)? };
        self.bind()?;
        self.upload_fp8(&w)
    }

    fn stores_fp8(&self) -> bool {
        true
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CudaWeight> {
        if data.len() != rows * cols || data.is_empty() {
            return Err(Error::Backend(format!("upload: {} values cannot form {rows}×{cols}", data.len())));
        }
        self.bind()?;
        let d = self.stream.clone_htod(data).cuda("copying a table to the device")?;
        Ok(CudaWeight { data: WeightData::F32(d), rows, cols })
    }

    fn new_kv_cache(&self, spec: &KvCacheSpec) -> Result<CudaKvCache> {
        self.bind()?;
        let cache = self.new_kv_cache_impl(spec)?;
        // A graph captured against another cache would replay into that one's memory.
        self.drop_graphs("a KV cache was made");
        Ok(cache)
    }

    fn embed(&self, table: &CudaWeight, step: &CudaStep) -> Result<CudaTensor> {
        self.bind()?;
        self.embed_impl(table, step.device())
    }

    fn rms_norm(&self, x: &CudaTensor, weight: &CudaWeight, eps: f32) -> Result<CudaTensor> {
        contract::rms_norm("rms_norm", x.shape(), weight.shape())?;
        self.bind()?;
        self.rms_norm_impl(x, weight, eps)
    }

    fn add_rms_norm(
        &self,
        x: &mut CudaTensor,
        residual: &CudaTensor,
        weight: &CudaWeight,
        eps: f32,
    ) -> Result<CudaTensor> {
        contract::add_rms_norm(x.shape(), residual.shape(), weight.shape())?;
        self.bind()?;
        self.add_rms_norm_impl(x, residual, weight, eps)
    }

    fn matmul(&self, x: &CudaTensor, w: &CudaWeight) -> Result<CudaTensor> {
        contract::matmul(x.shape(), w.shape())?;
        self.bind()?;
        self.matmul_impl(x, w)
    }

    fn rope_write_kv(
        &self,
        qkv: &CudaTensor,
        cos: &CudaWeight,
        sin: &CudaWeight,
        layer: usize,
        cache: &mut CudaKvCache,
        step: &CudaStep,
        dims: AttnDims,
    ) -> Result<CudaTensor> {
        self.bind()?;
        let b = step.device();
        contract::rope_write_kv(qkv.shape(), cos.shape(), sin.shape(), &b.extent, dims, &cache.spec(), layer)?;
        self.rope_write_kv_impl(qkv, cos, sin, layer, cache, b, dims)
    }

    fn matmul_rope_write_kv(
        &self,
        x: &CudaTensor,
        qkv: &CudaWeight,
        cos: &CudaWeight,
        sin: &CudaWeight,
        layer: usize,
        cache: &mut CudaKvCache,
        step: &CudaStep,
        dims: AttnDims,
    ) -> Result<CudaTensor> {
        contract::matmul(x.shape(), qkv.shape())?;
        self.bind()?;
        let b = step.device();
        let y = (x.rows, qkv.rows);
        contract::rope_write_kv(y, cos.shape(), sin.shape(), &b.extent, dims, &cache.spec(), layer)?;
        self.matmul_rope_write_kv_impl(x, qkv, cos, sin, layer, cache, b, dims)
    }

    fn attention(
        &self,
        q: &CudaTensor,
        layer: usize,
        cache: &CudaKvCache,
        step: &CudaStep,
        dims: AttnDims,
    ) -> Result<CudaTensor> {
        self.bind()?;
        let b = step.device();
        contract::attention(q.shape(), &b.extent, dims, &cache.spec(), layer)?;
        self.attention_impl(q, layer, cache, b, dims)
    }

    fn silu_mul(&self, gate_up: &CudaTensor) -> Result<CudaTensor> {
        contract::silu_mul(gate_up.shape())?;
        self.bind()?;
        self.silu_mul_impl(gate_up)
    }

    fn matmul_silu_mul(&self, x: &CudaTensor, gate_up: &CudaWeight) -> Result<CudaTensor> {
        contract::matmul(x.shape(), gate_up.shape())?;
        contract::silu_mul((x.rows, gate_up.rows))?;
        self.bind()?;
        self.matmul_silu_mul_impl(x, gate_up)
    }

    fn gather_rows(&self, x: &CudaTensor, step: &CudaStep) -> Result<CudaTensor> {
        self.bind()?;
        let b = step.device();
        contract::gather_rows(x.shape(), &b.gather_rows)?;
        self.gather_rows_impl(x, b)
    }

    fn sample(
        &self,
        logits: &CudaTensor,
        step: &CudaStep,
        per_row: &[RowSampling],
        valid: usize,
        masks: Option<&TokenMasks>,
    ) -> Result<Vec<u32>> {
        // A padded decode step's logits have its padding rows after the sampled ones.
        let rows = logits.rows.checked_sub(step.padding()).ok_or_else(|| {
            Error::Backend(format!(
                "sample: {} logits rows for a step with {} padding rows",
                logits.rows,
                step.padding()
            ))
        })?;
        contract::sample((rows, logits.cols), per_row.len(), valid, masks.map(|m| (m.rows(), m.words)))?;
        self.sample_impl(logits, per_row, valid, masks)
    }

    fn to_host(&self, x: &CudaTensor) -> Result<Vec<f32>> {
        self.bind()?;
        let n = x.rows * x.cols;
        if n == 0 {
            return Ok(Vec::new());
        }
        let host = self.stream.clone_dtoh(&x.data.slice(0..n)).cuda("copying a tensor to the host")?;
        self.synchronize()?;
        Ok(host.into_iter().map(half::bf16::to_f32).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without the driver (CI), asking for CUDA must fail with a reason, never panic.
    #[test]
    fn without_a_driver_cuda_fails_cleanly() {
        // SAFETY: only tries to dlopen the library's candidate names.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            return; // a machine with a driver: tests/gpu.rs covers it
        }
        let why = cuda_available().expect_err("no libcuda, yet CUDA is available");
        assert!(why.contains("libcuda"), "{why}");
        let e = CudaBackend::new(0).err().expect("CudaBackend::new without a driver must fail");
        assert!(matches!(e, Error::Device { .. }), "{e}");
        assert!(e.to_string().contains("cuda:0"), "{e}");
    }
}
