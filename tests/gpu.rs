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

#[test]
#[ignore = "needs a CUDA GPU"]
fn load_weight_streams_every_dtype_slice_and_padding() {
    let (cpu, gpu) = (CpuBackend::new(), gpu());
    let mut rng = rng("load_weight");
    // More than one 4 Mi-element staging buffer, so copies cross buffers in the middle of a row.
    let (rows, cols) = (2100, 2101);
    let data = random(&mut rng, rows * cols, 4.0);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let bytes = encode(&data, dtype);
        let t = TensorRef { name: "w", file: Path::new("w.safetensors"), dtype, shape: &[rows, cols], bytes: &bytes };
        // Two parts fused along rows: a row and column slice followed by zero rows (a padded
        // vocab shard), then all rows of the same columns (a row-parallel rank's part).
        let mut first = t.slice(3..1500, 7..2007);
        first.pad_rows = 5;
        let parts = [first, t.slice(0..rows, 7..2007)];
        let (cw, gw) = (cpu.load_weight(&parts).unwrap(), gpu.load_weight(&parts).unwrap());
        let ids: Vec<u32> = (0..(1497 + 5 + rows) as u32).collect();
        let c = cpu.to_host(&cpu.embed(&cw, &ids).unwrap()).unwrap();
        let g = gpu.to_host(&gpu.embed(&gw, &ids).unwrap()).unwrap();
        assert_close(&format!("load_weight {dtype:?}"), &g, &c, OP_TOL);
        let mismatched = [t.slice(0..2, 0..10), t.slice(0..2, 0..11)];
        assert!(gpu.load_weight(&mismatched).is_err(), "parts of different widths must not fuse");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rms_norm_and_add_rms_norm_match_cpu() {
    let (cpu, gpu) = (CpuBackend::new(), gpu());
    let mut rng = rng("rms_norm");
    // Widths: 16-byte path (multiples of 8), scalar path (others), one row and many.
    for &(rows, cols) in &[(1, 64), (3, 4096), (5, 100), (2, 8), (17, 257), (64, 2048), (1, 16384)] {
        let what = format!("rms_norm {rows}×{cols}");
        let (x, r) = (random(&mut rng, rows * cols, 2.0), random(&mut rng, rows * cols, 2.0));
        let w = random(&mut rng, cols, 1.5);
        let (cw, gw) = (weight(&cpu, &w, &[cols]), weight(&gpu, &w, &[cols]));
        let (cx, gx) = (tensor(&cpu, &x, rows, cols), tensor(&gpu, &x, rows, cols));
        let c = cpu.to_host(&cpu.rms_norm(&cx, &cw, 1e-5).unwrap()).unwrap();
        let g = gpu.to_host(&gpu.rms_norm(&gx, &gw, 1e-5).unwrap()).unwrap();
        assert_close(&what, &g, &c, OP_TOL);

        let (mut cx, mut gx) = (cx, gx);
        let (cr, gr) = (tensor(&cpu, &r, rows, cols), tensor(&gpu, &r, rows, cols));
        let c = cpu.to_host(&cpu.add_rms_norm(&mut cx, &cr, &cw, 1e-5).unwrap()).unwrap();
        let g = gpu.to_host(&gpu.add_rms_norm(&mut gx, &gr, &gw, 1e-5).unwrap()).unwrap();
        assert_close(&format!("add_{what} (normed)"), &g, &c, OP_TOL);
        assert_close(
            &format!("add_{what} (x + residual)"),
            &gpu.to_host(&gx).unwrap(),
            &cpu.to_host(&cx).unwrap(),
            OP_TOL,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn matmul_matches_cpu() {
    let (cpu, gpu) = (CpuBackend::new(), gpu());
    let mut rng = rng("matmul");
    // (tokens, in, out): decode and prefill rows, Llama-like and odd shapes.
    for &(m, k, n) in
        &[(1, 64, 64), (1, 4096, 6144), (7, 512, 300), (33, 1000, 257), (128, 256, 512), (5, 99, 37), (2, 64, 160)]
    {
        let x = random(&mut rng, m * k, 1.0);
        let w = random(&mut rng, n * k, (1.0 / k as f32).sqrt() * 1.7);
        let c = cpu.to_host(&cpu.matmul(&tensor(&cpu, &x, m, k), &weight(&cpu, &w, &[n, k])).unwrap()).unwrap();
        let g = gpu.to_host(&gpu.matmul(&tensor(&gpu, &x, m, k), &weight(&gpu, &w, &[n, k])).unwrap()).unwrap();
        assert_close(&format!("matmul {m}×{k} · ({n}×{k})ᵀ"), &g, &c, OP_TOL);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn elementwise_embedding_and_gather_match_cpu() {
    let (cpu, gpu) = (CpuBackend::new(), gpu());
    let mut rng = rng("elementwise");
    for &(rows, inter) in &[(3, 160), (1, 14336), (9, 37), (64, 512)] {
        let gu = random(&mut rng, rows * 2 * inter, 4.0);
        let c = cpu.to_host(&cpu.silu_mul(&tensor(&cpu, &gu, rows, 2 * inter)).unwrap()).unwrap();
        let g = gpu.to_host(&gpu.silu_mul(&tensor(&gpu, &gu, rows, 2 * inter)).unwrap()).unwrap();
        assert_close(&format!("silu_mul {rows}×{inter}"), &g, &c, OP_TOL);
    }
    for &(rows, cols) in &[(4, 100), (1, 4096), (13, 7)] {
        let (x, y) = (random(&mut rng, rows * cols, 3.0), random(&mut rng, rows * cols, 3.0));
        let (mut cx, mut gx) = (tensor(&cpu, &x, rows, cols), tensor(&gpu, &x, rows, cols));
        cpu.add(&mut cx, &tensor(&cpu, &y, rows, cols)).unwrap();
        gpu.add(&mut gx, &tensor(&gpu, &y, rows, cols)).unwrap();
        assert_close(&format!("add {rows}×{cols}"), &gpu.to_host(&gx).unwrap(), &cpu.to_host(&cx).unwrap(), OP_TOL);

        let pick = [rows - 1, 0, rows / 2, rows - 1];
        let c = cpu.to_host(&cpu.gather_rows(&cx, &pick).unwrap()).unwrap();
        let g = gpu.to_host(&gpu.gather_rows(&gx, &pick).unwrap()).unwrap();
        assert_close(&format!("gather_rows {rows}×{cols}"), &g, &c, OP_TOL);
        assert!(gpu.gather_rows(&gx, &[rows]).is_err(), "gather_rows past the end must fail");
    }
    for &(vocab, cols) in &[(300, 64), (1000, 4096), (17, 24)] {
        let table = random(&mut rng, vocab * cols, 1.0);
        let ids: Vec<u32> = (0..11).map(|_| rng.random_range(0..vocab as u32)).chain([0, vocab as u32 - 1]).collect();
        let c = cpu.to_host(&cpu.embed(&weight(&cpu, &table, &[vocab, cols]), &ids).unwrap()).unwrap();
        let gt = weight(&gpu, &table, &[vocab, cols]);
        let g = gpu.to_host(&gpu.embed(&gt, &ids).unwrap()).unwrap();
        assert_close(&format!("embed {vocab}×{cols}"), &g, &c, OP_TOL);
        // Ids past the table (another vocab-parallel rank's) give zero rows.
        let g = gpu.to_host(&gpu.embed(&gt, &[vocab as u32, 0, u32::MAX]).unwrap()).unwrap();
        assert!(g[..cols].iter().chain(&g[2 * cols..]).all(|&x| x == 0.0), "embed {vocab}×{cols}: id past the table");
        assert_close(&format!("embed {vocab}×{cols} row 0"), &g[cols..2 * cols], &table[..cols], OP_TOL);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn argmax_matches_host_argmax() {
    let gpu = gpu();
    let mut rng = rng("argmax");
    for &(rows, cols, sample) in &[(1, 128_264, 128_257), (3, 1000, 990), (5, 300, 300), (2, 33, 1)] {
        let mut logits = random(&mut rng, rows * cols, 8.0);
        // Row 0: the largest value sits in the padding and must be ignored; row 1 has a tie.
        logits[cols - 1] = 100.0;
        if rows > 1 && sample > 3 {
            logits[cols + 1] = 50.0;
            logits[cols + 3] = 50.0;
        }
        let t = gpu.tensor_from_host(&logits, rows, cols).unwrap();
        let ids = gpu.argmax(&t, sample).unwrap();
        let host = gpu.to_host(&t).unwrap();
        for (r, &id) in ids.iter().enumerate() {
            let row = &host[r * cols..r * cols + sample];
            let want = tulu::runtime::sampler::argmax(row);
            assert_eq!(id, want, "argmax row {r} of {rows}×{cols} (sample {sample})");
        }
    }
}

/// The GPU `sample` op picks the token `sample_row` picks on the host from the same bf16 logits,
/// for every filter and their combination, never a padded column. Thresholds are exact on both
/// sides (integer masses), but `expf` on the GPU and the host may differ in the last bit, which
/// can move a draw that lands right on a boundary: at most 1% of draws may differ.
#[test]
#[ignore = "needs a CUDA GPU"]
fn sample_matches_the_host_sampler() {
    use tulu::runtime::sampler::{sample_row, RowSampling};
    let gpu = gpu();
    let mut rng = rng("sample");
    let base = RowSampling { temperature: 0.8, ..RowSampling::greedy() };
    let settings = [
        RowSampling { repetition_penalty: 1.3, penalized: vec![0, 5, 17, 40], ..RowSampling::greedy() },
        base.clone(),
        RowSampling { top_k: 20, ..base.clone() },
        RowSampling { top_k: 1, ..base.clone() },
        RowSampling { top_p: 0.9, ..base.clone() },
        RowSampling { top_p: 0.3, temperature: 1.7, ..base.clone() },
        RowSampling { min_p: 0.05, ..base.clone() },
        RowSampling { top_k: 50, top_p: 0.95, min_p: 0.02, repetition_penalty: 1.2, penalized: vec![1, 2, 3], ..base },
    ];
    let (mut draws, mut differ) = (0, 0);
    for &(cols, valid) in &[(128_264, 128_256), (1000, 990), (300, 300)] {
        for setting in &settings {
            let rows = 16;
            let mut logits = random(&mut rng, rows * cols, 6.0);
            for r in 0..rows {
                for c in valid..cols {
                    logits[r * cols + c] = 1e4; // padding: never picked, however likely
                }
            }
            let t = gpu.tensor_from_host(&logits, rows, cols).unwrap();
            let host = gpu.to_host(&t).unwrap();
            let per_row: Vec<RowSampling> =
                (0..rows).map(|_| RowSampling { uniform: rng.random::<f32>(), ..setting.clone() }).collect();
            let ids = gpu.sample(&t, &per_row, valid).unwrap();
            for (r, (&id, s)) in ids.iter().zip(&per_row).enumerate() {
                assert!((id as usize) < valid, "{s:?}: row {r} picked padded column {id}");
                let want = sample_row(&host[r * cols..(r + 1) * cols], valid, s);
                draws += 1;
                if id != want {
                    differ += 1;
                    eprintln!("{cols}/{valid} {s:?} row {r}: GPU {id}, host {want}");
                }
            }
            // Greedy rows must agree exactly.
            if setting.temperature == 0.0 {
                let want: Vec<u32> = per_row
                    .iter()
                    .enumerate()
                    .map(|(r, s)| sample_row(&host[r * cols..(r + 1) * cols], valid, s))
                    .collect();
                assert_eq!(ids, want, "greedy with penalty");
            }
        }
    }
    assert!(differ * 100 <= draws, "{differ} of {draws} draws differ from the host sampler");
}

/// Decode matmuls (1 to 8 rows) through our GEMV and through cuBLASLt both match the CPU, on
/// odd output widths and inner dimensions that are and are not multiples of 8 (those always go
/// to cuBLASLt); the automatic choice records every shape it measured.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gemv_and_cublaslt_decode_matmuls_match_cpu() {
    use tulu::backend::cuda::GemvMode;
    let gpu = gpu();
    let cpu = CpuBackend::new();
    let mut rng = rng("gemv");
    for &(n, k) in &[(1, 8), (37, 64), (200, 1000), (333, 4096), (6144, 4096), (96, 1003), (4096, 14336)] {
        let w = random(&mut rng, n * k, 1.0 / (k as f32).sqrt());
        let (gw, cw) = (weight(&gpu, &w, &[n, k]), weight(&cpu, &w, &[n, k]));
        for m in 1..=8 {
            let x = random(&mut rng, m * k, 1.0);
            let c = cpu.to_host(&cpu.matmul(&tensor(&cpu, &x, m, k), &cw).unwrap()).unwrap();
            for mode in [GemvMode::Always, GemvMode::Never, GemvMode::Auto] {
                gpu.set_gemv_mode(mode);
                let g = gpu.to_host(&gpu.matmul(&tensor(&gpu, &x, m, k), &gw).unwrap()).unwrap();
                assert_close(&format!("{mode:?} {m}×{k} · ({n}×{k})ᵀ"), &g, &c, OP_TOL);
            }
        }
    }
    let measured = gpu.gemv_choices();
    assert!(measured.iter().any(|c| (c.m, c.n, c.k) == (1, 6144, 4096)), "{measured:?}");
    assert!(measured.iter().all(|c| c.k % 8 == 0 && c.gemv_us > 0.0 && c.blas_us > 0.0));
    for c in &measured {
        eprintln!("{c:?}");
    }
}

/// One attention configuration: head geometry, cache paging and the steps to run.
struct AttnCase {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    /// Steps; each lists, per sequence, how many new tokens it feeds (0: not in this step).
    steps: Vec<Vec<usize>>,
}

/// Runs `case` on both backends through rope_write_kv and attention (on layer 1 of a 2-layer
/// cache, with shuffled block tables) and compares q and the attention output at every step.
fn run_attention_case(cpu: &CpuBackend, gpu: &CudaBackend, rng: &mut StdRng, case: &AttnCase) {
    let dims = AttnDims { heads: case.heads, kv_heads: case.kv_heads, head_dim: case.head_dim };
    let seqs = case.steps[0].len();
    let totals: Vec<usize> = (0..seqs).map(|s| case.steps.iter().map(|st| st[s]).sum()).collect();
    let max_pos = totals.iter().copied().max().unwrap_or(1).max(1);
    let blocks_per_seq: Vec<usize> = totals.iter().map(|t| t.div_ceil(case.block_size)).collect();
    let num_blocks: usize = blocks_per_seq.iter().sum::<usize>() + 3;
    // Shuffled physical blocks, so that logical neighbours are never physical neighbours.
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.random_range(0..=i));
    }
    let mut tables = Vec::new();
    let mut next = 0;
    for &n in &blocks_per_seq {
        tables.push(ids[next..next + n].to_vec());
        next += n;
    }
    // RoPE tables of plain frequencies: the kernel only reads them.
    let half = case.head_dim / 2;
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for p in 0..max_pos {
        for i in 0..half {
            let a = p as f32 * 10_000f32.powf(-(2.0 * i as f32) / case.head_dim as f32);
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let (ccos, csin) = (cpu.upload(&cos, max_pos, half).unwrap(), cpu.upload(&sin, max_pos, half).unwrap());
    let (gcos, gsin) = (gpu.upload(&cos, max_pos, half).unwrap(), gpu.upload(&sin, max_pos, half).unwrap());
    let spec = KvCacheSpec {
        layers: 2,
        num_blocks,
        block_size: case.block_size,
        kv_heads: case.kv_heads,
        head_dim: case.head_dim,
    };
    let (mut ccache, mut gcache) = (cpu.new_kv_cache(&spec).unwrap(), gpu.new_kv_cache(&spec).unwrap());
    let width = dims.q_dim() + 2 * dims.kv_dim();
    let mut cached = vec![0usize; seqs];
    for (k, step) in case.steps.iter().enumerate() {
        let mut batch = Batch::new(case.block_size);
        for (s, &n) in step.iter().enumerate() {
            if n > 0 {
                let tokens = vec![0u32; n];
                batch.push(&tokens, cached[s], &tables[s]).unwrap();
                cached[s] += n;
            }
        }
        let rows = batch.num_tokens();
        let what = format!(
            "heads {}/{} hd {} block {} step {k} {:?}",
            case.heads, case.kv_heads, case.head_dim, case.block_size, step
        );
        let qkv = random(rng, rows * width, 2.0);
        let (cq, gq) = (tensor(cpu, &qkv, rows, width), tensor(gpu, &qkv, rows, width));
        let cq = cpu.rope_write_kv(&cq, &ccos, &csin, 1, &mut ccache, &batch, dims).unwrap();
        let gq = gpu.rope_write_kv(&gq, &gcos, &gsin, 1, &mut gcache, &batch, dims).unwrap();
        assert_close(&format!("rope q: {what}"), &gpu.to_host(&gq).unwrap(), &cpu.to_host(&cq).unwrap(), OP_TOL);
        let c = cpu.to_host(&cpu.attention(&cq, 1, &ccache, &batch, dims).unwrap()).unwrap();
        let g = gpu.to_host(&gpu.attention(&gq, 1, &gcache, &batch, dims).unwrap()).unwrap();
        assert_close(&format!("attention: {what}"), &g, &c, OP_TOL);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rope_write_kv_and_attention_match_cpu() {
    let (cpu, gpu) = (CpuBackend::new(), gpu());
    let mut rng = rng("attention");
    // Prompt lengths around the key tiles (16/32/64) and the prefill row tiles.
    let prompts = [1, 7, 31, 32, 33, 63, 64, 65, 129, 300];
    let mut cases = Vec::new();
    for &(heads, kv_heads) in &[(8, 8), (16, 4), (32, 4)] {
        for &head_dim in &[64, 128] {
            // Prefill of several sequences of different lengths, then three decode steps, then
            // a chunked prefill (cached prefix + new tokens) beside a decode.
            let mut steps = vec![prompts.to_vec()];
            steps.extend((0..3).map(|_| vec![1; prompts.len()]));
            steps.push(prompts.iter().enumerate().map(|(i, _)| if i % 2 == 0 { 17 } else { 1 }).collect());
            cases.push(AttnCase { heads, kv_heads, head_dim, block_size: 16, steps });
            // One long sequence: decode splits the keys across blocks, then the combine runs.
            let steps = vec![vec![2049], vec![1], vec![1]];
            cases.push(AttnCase { heads, kv_heads, head_dim, block_size: 32, steps });
        }
    }
    // The tiny model's geometry (head_dim 8, GQA 4) and an odd head count with head_dim 96.
    cases.push(AttnCase { heads: 8, kv_heads: 2, head_dim: 8, block_size: 16, steps: vec![vec![70, 3], vec![1, 1]] });
    cases.push(AttnCase {
        heads: 12,
        kv_heads: 3,
        head_dim: 96,
        block_size: 8,
        steps: vec![vec![45, 100], vec![1, 1]],
    });
    for case in &cases {
        run_attention_case(&cpu, &gpu, &mut rng, case);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_rejects_a_batch_outside_the_cache() {
    let gpu = gpu();
    let dims = AttnDims { heads: 4, kv_heads: 1, head_dim: 64 };
    let spec = KvCacheSpec { layers: 1, num_blocks: 2, block_size: 16, kv_heads: 1, head_dim: 64 };
    let mut cache = gpu.new_kv_cache(&spec).unwrap();
    let mut batch = Batch::new(16);
    batch.push(&[0; 4], 0, &[5]).unwrap(); // block 5 of a 2-block cache
    let qkv = gpu.tensor_from_host(&vec![0.0; 4 * 6 * 64], 4, 6 * 64).unwrap();
    let t = gpu.upload(&vec![0.0; 8 * 32], 8, 32).unwrap();
    let e = gpu.rope_write_kv(&qkv, &t, &t, 0, &mut cache, &batch, dims).err().expect("must fail");
    assert!(e.to_string().contains("outside the cache"), "{e}");
}

/// Logits of `rows` for `steps` (prefill then decode) on one backend.
fn model_logits<B: Backend>(b: &B, dir: &Path, steps: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open(dir).unwrap();
    let model = Llama::load(b, &cfg, &store, 256, Shard::single(), |_| {}).unwrap();
    let block_size = 16;
    let mut cache = b.new_kv_cache(&model.kv_cache_spec(32, block_size)).unwrap();
    // Blocks in reverse order, to exercise the block table.
    let table: Vec<u32> = (0..16u32).rev().collect();
    let mut cached = 0;
    let mut out = Vec::new();
    for tokens in steps {
        let mut batch = Batch::new(block_size);
        batch.push(tokens, cached, &table).unwrap();
        cached += tokens.len();
        let rows: Vec<usize> = (0..tokens.len()).collect();
        out.push(model.forward(b, &batch, &mut cache, &rows, &SingleRank).unwrap());
    }
    out
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn whole_model_logits_match_cpu() {
    let gpu = gpu();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    let cfg = ModelConfig::preset("tiny").unwrap();
    synth_checkpoint(&cfg, &dir, &SynthOptions::default()).unwrap();
    // 70 prompt tokens (past the llama3 scaling's original context of 32, across blocks), then
    // three decode steps.
    let prompt: Vec<u32> = (0..70).map(|i| (i * 31 + 3) % 250).collect();
    let steps = vec![prompt, vec![5], vec![77], vec![250]];
    let c = model_logits(&CpuBackend::new(), &dir, &steps);
    let g = model_logits(&gpu, &dir, &steps);
    for (k, (g, c)) in g.iter().zip(&c).enumerate() {
        for (r, (gr, cr)) in g.chunks(cfg.vocab_size).zip(c.chunks(cfg.vocab_size)).enumerate() {
            assert_close(&format!("logits step {k} row {r}"), gr, cr, LOGITS_TOL);
        }
    }
}

/// Random weights (`tulu bench --random-weights`) are generated on the GPU with the CPU's exact
/// values, slices and padding included; the random model's logits then match the CPU's.
#[test]
#[ignore = "needs a CUDA GPU"]
fn random_weights_match_cpu_bit_for_bit() {
    let gpu = gpu();
    let cpu = CpuBackend::new();
    let name = "model.layers.3.mlp.down_proj.weight";
    let parts = [
        RandomSlice::for_tensor(11, name, &[37, 203], 0..37, 5..70),
        RandomSlice {
            pad_rows: 3,
            ..RandomSlice::for_tensor(12, "model.embed_tokens.weight", &[90, 65], 40..90, 0..65)
        },
    ];
    let rows: Vec<u32> = (0..(37 + 50 + 3)).collect();
    // Embedding every row reads the weight back as an activation (bf16 on both sides).
    let g = gpu.to_host(&gpu.embed(&gpu.random_weight(&parts).unwrap(), &rows).unwrap()).unwrap();
    let c = cpu.to_host(&cpu.embed(&cpu.random_weight(&parts).unwrap(), &rows).unwrap()).unwrap();
    assert_eq!(g, c, "random weights differ between the GPU and the CPU");
    assert!(g[87 * 65..].iter().all(|&x| x == 0.0), "padding rows must be zero");

    let cfg = ModelConfig::preset("tiny").unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 1) % 300).collect();
    let g = random_model_logits(&gpu, &cfg, &tokens);
    let c = random_model_logits(&cpu, &cfg, &tokens);
    for (r, (gr, cr)) in g.chunks(cfg.vocab_size).zip(c.chunks(cfg.vocab_size)).enumerate() {
        assert_close(&format!("random model logits row {r}"), gr, cr, LOGITS_TOL);
    }
}

/// Logits of every position of `tokens` from the random model of `cfg` on `b`.
fn random_model_logits<B: Backend>(b: &B, cfg: &ModelConfig, tokens: &[u32]) -> Vec<f32> {
    let model = Llama::random(b, cfg, 5, 128, Shard::single(), |_| {}).unwrap();
    let mut cache = b.new_kv_cache(&model.kv_cache_spec(8, 16)).unwrap();
    let mut batch = Batch::new(16);
    batch.push(tokens, 0, &(0..8).collect::<Vec<u32>>()).unwrap();
    let rows: Vec<usize> = (0..tokens.len()).collect();
    model.forward(b, &batch, &mut cache, &rows, &SingleRank).unwrap()
}

/// Loading a 2.97 GB checkpoint onto the GPU grows host memory by at most 1 GiB plus one tensor
/// (the weights stream through 16 MiB of pinned staging; each tensor's mapped pages are dropped
/// once it is on the device), whatever the checkpoint's size.
#[test]
#[ignore = "needs a CUDA GPU"]
fn loading_onto_the_gpu_keeps_host_memory_flat() {
    use tulu::process_memory::{peak_rss_bytes, reset_peak_rss, rss_bytes};
    let gpu = gpu();
    gpu.poison_outputs(false);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("8b-2-layers");
    let mut cfg = ModelConfig::preset("llama-3.1-8b").unwrap();
    cfg.num_hidden_layers = 2;
    synth_checkpoint(&cfg, &dir, &SynthOptions { dtype: OutDType::Bf16, ..Default::default() }).unwrap();
    let store = WeightStore::open(&dir).unwrap();
    let largest = store.names().iter().map(|n| store.get_any(n).unwrap().bytes.len() as u64).max().unwrap();
    assert!(reset_peak_rss(), "/proc/self/clear_refs is not writable");
    let base = rss_bytes().unwrap();
    let started = std::time::Instant::now();
    let model = Llama::load(&gpu, &cfg, &store, 64, Shard::single(), |_| {}).unwrap();
    gpu.synchronize().unwrap();
    let secs = started.elapsed().as_secs_f64();
    let growth = peak_rss_bytes().unwrap().saturating_sub(base);
    let bytes = model.resident_weight_elements() * 2;
    eprintln!(
        "loaded {:.2} GB in {secs:.2} s ({:.2} GB/s, page cache warm); host RSS grew {:.0} MB (largest tensor {:.0} MB)",
        bytes as f64 / 1e9,
        bytes as f64 / 1e9 / secs,
        growth as f64 / 1e6,
        largest as f64 / 1e6
    );
    assert!(growth <= (1 << 30) + largest, "host RSS grew by {growth} bytes while loading onto the GPU");
}

/// Logits of every position of `tokens` from one CUDA rank per communicator in `comms`, rank
/// `r` on GPU `device(r)` (its own backend, in its own thread, as the engine runs them); every
/// rank must hold the same gathered logits. Returns rank 0's.
fn cuda_tp_logits<C: Communicator<CudaBackend> + 'static>(
    dir: &Path,
    tokens: &[u32],
    comms: Vec<C>,
    device: impl Fn(usize) -> usize + Sync,
) -> Vec<f32> {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open(dir).unwrap();
    let world = comms.len();
    let table: Vec<u32> = (0..8).collect();
    let mut batch = Batch::new(16);
    batch.push(tokens, 0, &table).unwrap();
    let rows: Vec<usize> = (0..tokens.len()).collect();
    let outs: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let (cfg, store, batch, rows, device) = (&cfg, &store, &batch, &rows, &device);
                s.spawn(move || {
                    let backend = CudaBackend::new(device(rank)).unwrap();
                    backend.poison_outputs(true);
                    let model = Llama::load(&backend, cfg, store, 128, Shard { rank, world }, |_| {}).unwrap();
                    let mut cache = backend.new_kv_cache(&model.kv_cache_spec(8, 16)).unwrap();
                    model.forward(&backend, batch, &mut cache, rows, &comm).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for o in &outs[1..] {
        assert_eq!(o, &outs[0], "every rank holds the same gathered logits");
    }
    outs.into_iter().next().unwrap()
}

/// `tp` ranks sharing GPU 0 through the host-staged in-process communicator.
fn shared_gpu_logits(dir: &Path, tp: usize, tokens: &[u32]) -> Vec<f32> {
    cuda_tp_logits(dir, tokens, LocalGroup::new(tp, Duration::from_secs(120)).communicators(), |_| 0)
}

/// The tiny preset (8 heads, 2 KV heads) with a vocab of 301 rows: shards at tp = 2, 4, 8 are
/// padded, and tp = 8 replicates each KV head on 4 ranks.
fn tiny_vocab301() -> std::path::PathBuf {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.vocab_size = 301;
    common::synth_dir("tiny-vocab301-f32", &cfg, OutDType::F32, None)
}

fn assert_logits_close(what: &str, vocab: usize, ours: &[f32], reference: &[f32]) {
    assert_eq!(ours.len(), reference.len(), "{what}: padding columns must be dropped");
    for (pos, (a, b)) in ours.chunks(vocab).zip(reference.chunks(vocab)).enumerate() {
        assert_close(&format!("{what} position {pos}"), a, b, LOGITS_TOL);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tp_2_4_8_on_one_gpu_match_tp_1() {
    gpu();
    let dir = tiny_vocab301();
    let tokens: Vec<u32> = (0..37).map(|i| (i * 17 + 5) % 290).collect();
    let reference = shared_gpu_logits(&dir, 1, &tokens);
    for tp in [2, 4, 8] {
        assert_logits_close(&format!("tp={tp}"), 301, &shared_gpu_logits(&dir, tp, &tokens), &reference);
    }
}

fn cuda_greedy(dir: &Path, tp: usize, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut opts = EngineOptions::new(dir.to_string_lossy()).device(Device::Cuda(0));
    opts.tp = tp;
    let engine = Engine::load(opts).unwrap();
    eprintln!("tp={tp}: {}", engine.device());
    let mut req = GenerateRequest::tokens(prompt.to_vec()).sampling(SamplingParams::greedy()).max_tokens(n);
    req.ignore_eos = true;
    common::run(&engine, req).1.tokens
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn smollm2_greedy_tokens_at_tp3_match_tp1_through_the_engine() {
    // SmolLM2-135M has 9 heads and 3 KV heads: tp = 3 is its only split besides 1 (2, 4 and 8
    // are checked on the synthetic model above). With one GPU the engine puts all three
    // ranks on it, host-staged; with three or more and NCCL, one rank per GPU.
    gpu();
    let dir = common::smollm2_dir();
    let tok = tulu::tokenizer::Tokenizer::from_dir(&dir).unwrap();
    let prompt = tok.encode_prompt("The capital of France is Paris, and the capital of Germany is").unwrap();
    let reference = cuda_greedy(&dir, 1, &prompt, 24);
    assert_eq!(cuda_greedy(&dir, 3, &prompt, 24), reference, "tp=3 greedy tokens");
}

/// Greedy tokens through the engine on `device`.
fn engine_greedy(dir: &Path, device: Device, prompt: &[u32], n: usize) -> Vec<u32> {
    let engine = Engine::load(EngineOptions::new(dir.to_string_lossy()).device(device)).unwrap();
    let mut req = GenerateRequest::tokens(prompt.to_vec()).sampling(SamplingParams::greedy()).max_tokens(n);
    req.ignore_eos = true;
    common::run(&engine, req).1.tokens
}

/// Greedy continuations through the GPU engine (sampling on the device) equal the CPU engine's
/// for `n` tokens on every prompt. Where they diverge, the CPU's logits at that step are
/// recomputed: the two tokens' logits must be within bf16 noise of each other (relative to the
/// largest logit), else the test fails, reporting the margin.
fn assert_greedy_matches_cpu(dir: &Path, prompts: &[Vec<u32>], n: usize) {
    let vocab = ModelConfig::from_file(&dir.join("config.json")).unwrap().vocab_size;
    for (p, prompt) in prompts.iter().enumerate() {
        let cpu = engine_greedy(dir, Device::Cpu, prompt, n);
        let gpu = engine_greedy(dir, Device::Cuda(0), prompt, n);
        assert_eq!(gpu.len(), cpu.len(), "prompt {p}: lengths");
        let Some(step) = cpu.iter().zip(&gpu).position(|(a, b)| a != b) else { continue };
        let mut context = prompt.clone();
        context.extend_from_slice(&cpu[..step]);
        let all = model_logits(&CpuBackend::new(), dir, &[context.clone()]).remove(0);
        let last = &all[(context.len() - 1) * vocab..context.len() * vocab];
        let scale = last.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let margin = (last[cpu[step] as usize] - last[gpu[step] as usize]) / scale;
        eprintln!(
            "prompt {p}: GPU diverges at step {step} ({} vs CPU {}), CPU margin {margin:.2e}",
            gpu[step], cpu[step]
        );
        assert!(margin <= LOGITS_TOL, "prompt {p}: diverged at step {step} where the CPU's margin is {margin:.2e}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn greedy_continuations_match_cpu_on_a_synthetic_model() {
    gpu();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny-bf16");
    let cfg = ModelConfig::preset("tiny").unwrap();
    synth_checkpoint(&cfg, &dir, &SynthOptions { dtype: OutDType::Bf16, ..Default::default() }).unwrap();
    let prompts: Vec<Vec<u32>> =
        (0..4).map(|k| (0..(5 + 13 * k) as u32).map(|i| (i * 31 + 7 * k as u32 + 3) % 290).collect()).collect();
    assert_greedy_matches_cpu(&dir, &prompts, 32);
}

/// Sampling on the GPU through the engine: a seed reproduces its tokens, another seed gives
/// other tokens, and every token is inside the tokenizer's vocabulary.
#[test]
#[ignore = "needs a CUDA GPU"]
fn seeded_sampling_on_the_gpu_reproduces() {
    gpu();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny-bf16");
    synth_checkpoint(
        &ModelConfig::preset("tiny").unwrap(),
        &dir,
        &SynthOptions { dtype: OutDType::Bf16, ..Default::default() },
    )
    .unwrap();
    let engine = Engine::load(EngineOptions::new(dir.to_string_lossy()).device(Device::Cuda(0))).unwrap();
    let vocab = engine.tokenizer().vocab_size() as u32;
    let draw = |seed| {
        let params =
            SamplingParams { temperature: 1.0, top_p: 0.95, top_k: 50, seed: Some(seed), ..Default::default() };
        let mut req = GenerateRequest::tokens(vec![5, 17, 42]).sampling(params).max_tokens(40);
        req.ignore_eos = true;
        common::run(&engine, req).1.tokens
    };
    let (a, b, c) = (draw(1), draw(1), draw(2));
    assert_eq!(a, b, "the same seed");
    assert_ne!(a, c, "another seed");
    assert!(a.iter().chain(&c).all(|&t| t < vocab), "{a:?} {c:?}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn smollm2_greedy_continuations_match_cpu() {
    gpu();
    let dir = common::smollm2_dir();
    let tok = tulu::tokenizer::Tokenizer::from_dir(&dir).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village,",
        "The three primary colors are",
    ]
    .iter()
    .map(|t| tok.encode_prompt(t).unwrap())
    .collect();
    assert_greedy_matches_cpu(&dir, &prompts, 32);
}

#[cfg(feature = "nccl")]
mod nccl {
    use super::*;
    use tulu::parallel::nccl::NcclComm;

    /// All-reduce and column gather on one rank: the identity, through NCCL and (for the
    /// gather of several rows) the strided copy that turns rank-major blocks into columns.
    fn identity_collectives(comm: &NcclComm, b: &CudaBackend) {
        assert_eq!((Communicator::<CudaBackend>::rank(comm), Communicator::<CudaBackend>::world_size(comm)), (0, 1));
        let data: Vec<f32> = (0..6).map(|i| i as f32 - 2.5).collect();
        let mut x = b.tensor_from_host(&data, 2, 3).unwrap();
        comm.all_reduce_sum(b, &mut x).unwrap();
        assert_eq!(b.to_host(&x).unwrap(), data);
        let g = comm.all_gather_cols(b, x).unwrap();
        assert_eq!((g.rows(), g.cols()), (2, 3));
        assert_eq!(b.to_host(&g).unwrap(), data);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn a_world_of_one_initialises_and_all_reduces() {
        let b = gpu();
        let mut comms = NcclComm::new_local(&[0]).unwrap();
        identity_collectives(&comms.remove(0), &b);
        let id = NcclComm::unique_id().unwrap();
        identity_collectives(&NcclComm::from_id(id, 0, 1, 0).unwrap(), &b);
    }

    #[test]
    #[ignore = "needs two CUDA GPUs"]
    fn nccl_across_gpus_matches_one_rank() {
        let gpus = cudarc::driver::CudaContext::device_count().unwrap_or(0) as usize;
        if gpus < 2 {
            eprintln!("skipped: {gpus} GPU(s); NCCL needs one per rank");
            return;
        }
        let dir = tiny_vocab301();
        let tokens: Vec<u32> = (0..37).map(|i| (i * 17 + 5) % 290).collect();
        let reference = shared_gpu_logits(&dir, 1, &tokens);
        for tp in [2usize, 4, 8].into_iter().filter(|&tp| tp <= gpus) {
            let comms = NcclComm::new_local(&(0..tp).collect::<Vec<_>>()).unwrap();
            let logits = cuda_tp_logits(&dir, &tokens, comms, |r| r);
            assert_logits_close(&format!("NCCL tp={tp}"), 301, &logits, &reference);
        }
    }
}
