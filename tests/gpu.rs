//! The CUDA backend against the CPU backend (the f32 reference), op by op and on a whole model.
//!
//! Every test needs a CUDA device and is ignored elsewhere. On the GPU machine:
//! `.gpu/run tests` (built by scripts/gpu-pack), or
//! `cargo test --features cuda,nccl --test gpu -- --include-ignored --test-threads=1`.
//! On any machine, under the CPU emulation of CUDA (`scripts/test` does this in CI):
//! `scripts/cuda-emu cargo test --features cuda,nccl --test gpu -- --include-ignored`.
//! The emulator runs the same kernels and code paths on smaller tables ([`emulated`]), and
//! skips, saying why, the tests that measure the device itself.
//!
//! Like llama.cpp's test-backend-ops: each op runs on tables of shapes (odd sizes, GQA ratios
//! 1/4/8, sequence lengths on both sides of the kernels' tile sizes), on fresh random inputs
//! (the seed is printed; `TULU_TEST_SEED` replays one), with every CUDA output and the KV cache
//! poisoned with NaN before the kernel runs, so an element a kernel forgets fails the test.
//! Inputs are rounded to bf16 first, so both backends start from the same values. Tolerances are
//! per element, relative plus absolute: |ours - reference| <= tol * (|reference| + 4 rms), where
//! rms is the reference's root mean square: the absolute part covers outputs that cancel to
//! near zero (an attention output of 300 keys averages values of four times its rms; a logit
//! near zero sums products of the hidden state's size). tol is 1e-2 per op (bf16 storage), 2e-2
//! on logits. Measured under the emulator (bf16 on both sides of a tp comparison, or bf16 vs
//! the f32 CPU): logits differ by 0.5-1% of their rms at the median and up to 5% at worst,
//! attention outputs by 0.15% and up to 2.5%.
#![cfg(feature = "cuda")]

mod common;

use std::path::Path;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tulu::unstable::backend::cpu::CpuBackend;
use tulu::unstable::backend::cuda::{cuda_available, CudaBackend, CudaDebug};
use tulu::unstable::backend::{AttnDims, Backend, KvCacheSpec, Runtime, StepInputs};
use tulu::unstable::config::ModelConfig;
use tulu::unstable::model::Llama;
use tulu::unstable::parallel::local::LocalGroup;
use tulu::unstable::parallel::sharding::Shard;
use tulu::unstable::parallel::{Communicator, SingleRank};
use tulu::unstable::runtime::batch::Batch;
use tulu::unstable::synth::{synth_checkpoint, SynthOptions};
use tulu::unstable::weights::gguf::OutDType;
use tulu::unstable::weights::random::RandomSlice;
use tulu::unstable::weights::{DType, TensorRef, WeightStore};
use tulu::{Device, Engine, EngineOptions, GenerateRequest, SamplingParams};

const OP_TOL: f32 = 1e-2;
/// Every backend of these tests fills new outputs with NaN, so that an element a kernel forgets
/// shows up.
const POISON: CudaDebug = CudaDebug { poison: true, fresh_step_buffers: false };
const LOGITS_TOL: f32 = 2e-2;

fn gpu() -> CudaBackend {
    if let Err(why) = cuda_available() {
        panic!("these tests need a CUDA GPU: {why}");
    }
    let b = CudaBackend::with_debug(0, POISON).expect("opening cuda:0");
    eprintln!("device: {}", b.describe());
    b
}

/// A fresh seed per run, printed so that a failure can be replayed with TULU_TEST_SEED.
fn rng(test: &str) -> StdRng {
    let seed = std::env::var("TULU_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u64>);
    eprintln!("{test}: TULU_TEST_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

/// `n` values uniform in ±`scale`, rounded to bf16 so that both backends see the same inputs.
fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| half::bf16::from_f32(rng.random_range(-scale..scale)).to_f32()).collect()
}

/// Fails unless every element is within `tol * (|reference| + 4 rms(reference))`; NaN fails.
fn assert_close(what: &str, ours: &[f32], reference: &[f32], tol: f32) {
    assert_close_floor(what, ours, reference, tol, 0.0);
}

/// [`assert_close`] with an absolute floor added to every element's tolerance: for outputs whose
/// rounding error scales with an input's magnitude rather than the output's own (attention).
fn assert_close_floor(what: &str, ours: &[f32], reference: &[f32], tol: f32, floor: f32) {
    assert_eq!(ours.len(), reference.len(), "{what}: lengths differ");
    if let Some(i) = ours.iter().position(|x| !x.is_finite()) {
        panic!("{what}: element {i} is {} (unwritten or overflowed; reference {})", ours[i], reference[i]);
    }
    let rms = (reference.iter().map(|x| (x * x) as f64).sum::<f64>() / reference.len().max(1) as f64).sqrt() as f32;
    let (i, ratio) = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs() / (tol * (b.abs() + 4.0 * rms) + floor).max(f32::MIN_POSITIVE))
        .enumerate()
        .fold((0, 0f32), |best, (i, r)| if r > best.1 { (i, r) } else { best });
    assert!(
        ratio <= 1.0,
        "{what}: element {i} is {} vs {} (error {:.2e}, {ratio:.2}x the tolerance {tol:.0e} * (|ref| + 4 * rms {rms:.3e}) + {floor:.1e})",
        ours[i],
        reference[i],
        (ours[i] - reference[i]).abs()
    );
}

/// Whether cuda:0 is tulu's CPU emulation of CUDA (`scripts/cuda-emu`): the same kernels and
/// code paths then run on tables sized for a CPU in CI, and tests that measure the device itself
/// are skipped.
fn emulated() -> bool {
    static EMULATED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *EMULATED.get_or_init(|| gpu().describe().contains("emulator"))
}

/// A weight holding `data` (f32 bytes, as a checkpoint tensor would), loaded by `b`.
fn weight<B: Backend>(b: &B, data: &[f32], shape: &[usize]) -> B::Weight {
    with_f32_tensor(data, shape, |t| b.load_weight(&[t.full()]).expect("load_weight"))
}

/// `data` loaded by `b` as an FP8 weight quantized while loading, with activation amaxes bounded
/// by `bound` where activations are quantized.
fn fp8_weight<B: Backend>(b: &B, data: &[f32], shape: &[usize], bound: Option<f32>) -> B::Weight {
    with_f32_tensor(data, shape, |t| b.load_fp8_weight(&[t.full()], bound).expect("load_fp8_weight"))
}

/// `data` loaded by `b` as an FP8 weight when `fp8`, else as bf16.
fn weight_in<B: Backend>(b: &B, data: &[f32], shape: &[usize], fp8: bool) -> B::Weight {
    if fp8 {
        fp8_weight(b, data, shape, None)
    } else {
        weight(b, data, shape)
    }
}

/// `f` of a checkpoint tensor `test` of `shape` holding `data` in F32.
fn with_f32_tensor<R>(data: &[f32], shape: &[usize], f: impl FnOnce(TensorRef<'_>) -> R) -> R {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    f(TensorRef { name: "test", file: Path::new("test.safetensors"), dtype: DType::F32, shape, bytes: &bytes })
}

/// An activation holding `data`, made the way the model makes one: an embedding lookup.
fn tensor<B: Backend>(b: &B, data: &[f32], rows: usize, cols: usize) -> B::Tensor {
    let table = weight(b, data, &[rows, cols]);
    let ids: Vec<u32> = (0..rows as u32).collect();
    b.embed(&table, &b.ids_step(&ids, &[])).expect("embed")
}

/// Steps for ops called on their own: the kernel tests build the step of each batch
/// explicitly, as the model runner does (`begin_step`), only unpadded.
trait TestSteps: Backend {
    /// The step of `batch` for attention at `dims`: its token ids, gathering each sequence's
    /// last row.
    fn step_of(&self, batch: &Batch, dims: AttnDims) -> Self::Step {
        let rows = batch.last_rows();
        let inputs =
            StepInputs { batch, ids: &batch.token_ids, rows: &rows, dims: Some(dims), graphable: false, model: 0 };
        self.step_for(&inputs).expect("step_for")
    }

    /// `step_of_ids`: a step looking up `ids` and gathering `rows`.
    fn ids_step(&self, ids: &[u32], rows: &[usize]) -> Self::Step {
        self.step_of_ids(ids, rows).expect("step_of_ids")
    }

    /// A step whose `rows` logits rows are all sampled (no padding).
    fn rows_step(&self, rows: usize) -> Self::Step {
        self.ids_step(&vec![0; rows], &(0..rows).collect::<Vec<_>>())
    }
}

impl<B: Backend> TestSteps for B {}

/// `data` stored as `dtype`, little-endian, as a checkpoint holds it.
fn encode(data: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => data.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
        DType::BF16 => data.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        DType::F8E4M3 => data.iter().map(|&x| float8::F8E4M3::from_f32(x).to_bits()).collect(),
        DType::Gguf { .. } => panic!("GGML blocks are a CPU weight type, not a GPU test input"),
    }
}

#[path = "gpu/ops.rs"]
mod ops;

#[path = "gpu/model.rs"]
mod model;

#[path = "gpu/fp8.rs"]
mod fp8;
#[path = "gpu/fused.rs"]
mod fused;
#[path = "gpu/graphs.rs"]
mod graphs;
#[path = "gpu/kv_fp8.rs"]
mod kv_fp8;
#[path = "gpu/sizing.rs"]
mod sizing;
#[path = "gpu/speculative.rs"]
mod speculative;
