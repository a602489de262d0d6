//! The CUDA backend against the CPU backend (the f32 reference), op by op and on a whole model.
//!
//! Every test needs a CUDA GPU and is ignored elsewhere; on the GPU machine:
//! `.gpu/run tests` (built by ../shared/gpu/pack), or
//! `cargo test --features cuda --test gpu -- --include-ignored --test-threads=1`.
//!
//! Like llama.cpp's test-backend-ops: each op runs on tables of shapes (odd sizes, GQA ratios
//! 1/4/8, sequence lengths on both sides of the kernels' tile sizes), on fresh random inputs
//! (the seed is printed; `TULU_TEST_SEED` replays one), with every CUDA output and the KV cache
//! poisoned with NaN before the kernel runs, so an element a kernel forgets fails the test.
//! Inputs are rounded to bf16 first, so both backends start from the same values; tolerances
//! are relative to the reference's largest magnitude: 1e-2 per op (bf16 storage), 2e-2 on logits.
#![cfg(feature = "cuda")]

mod common;

use std::path::Path;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tulu::backend::cpu::CpuBackend;
use tulu::backend::cuda::{cuda_available, CudaBackend};
use tulu::backend::{AttnDims, Backend, KvCacheSpec};
use tulu::config::ModelConfig;
use tulu::model::Llama;
use tulu::parallel::local::LocalGroup;
use tulu::parallel::sharding::Shard;
use tulu::parallel::{Communicator, SingleRank};
use tulu::runtime::batch::Batch;
use tulu::synth::{synth_checkpoint, SynthOptions};
use tulu::weights::gguf::OutDType;
use tulu::weights::random::RandomSlice;
use tulu::weights::{DType, TensorRef, WeightStore};
use tulu::{Device, Engine, EngineOptions, GenerateRequest, SamplingParams};

const OP_TOL: f32 = 1e-2;
const LOGITS_TOL: f32 = 2e-2;

fn gpu() -> CudaBackend {
    if let Err(why) = cuda_available() {
        panic!("these tests need a CUDA GPU: {why}");
    }
    let b = CudaBackend::new(0).expect("opening cuda:0");
    b.poison_outputs(true);
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

/// Largest |ours - reference| over the reference's largest magnitude; NaN anywhere fails.
fn assert_close(what: &str, ours: &[f32], reference: &[f32], tol: f32) {
    assert_eq!(ours.len(), reference.len(), "{what}: lengths differ");
    if let Some(i) = ours.iter().position(|x| !x.is_finite()) {
        panic!("{what}: element {i} is {} (unwritten or overflowed; reference {})", ours[i], reference[i]);
    }
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    let (i, err) = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold((0, 0f32), |best, (i, e)| if e > best.1 { (i, e) } else { best });
    let rel = err / scale;
    assert!(rel <= tol, "{what}: rel err {rel:.2e} > {tol:.0e} at element {i}: {} vs {}", ours[i], reference[i]);
}

/// A weight holding `data` (f32 bytes, as a checkpoint tensor would), loaded by `b`.
fn weight<B: Backend>(b: &B, data: &[f32], shape: &[usize]) -> B::Weight {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    let t = TensorRef { name: "test", file: Path::new("test.safetensors"), dtype: DType::F32, shape, bytes: &bytes };
    b.load_weight(&[t.full()]).expect("load_weight")
}

/// An activation holding `data`, made the way the model makes one: an embedding lookup.
fn tensor<B: Backend>(b: &B, data: &[f32], rows: usize, cols: usize) -> B::Tensor {
    let table = weight(b, data, &[rows, cols]);
    let ids: Vec<u32> = (0..rows as u32).collect();
    b.embed(&table, &ids).expect("embed")
}

/// `data` stored as `dtype`, little-endian, as a checkpoint holds it.
fn encode(data: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => data.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
        DType::BF16 => data.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
    }
}

#[path = "gpu/ops.rs"]
mod ops;

#[path = "gpu/model.rs"]
mod model;
