//! The CPU backend: weights live in candle-core tensors; the operations are plain Rust over
//! their f32 slices (rayon where it pays), so that no step allocates per op more than its
//! outputs and every row's result is independent of the batch it is in.
//!
//! Everything computes in f32; weight matrices stay in their stored type (f32, bf16, f16,
//! FP8 rows, GGML blocks; `weight.rs`) and are widened inside the dot product. Matmuls (`matmul.rs`) split work by weight rows, so decode streams each weight once at memory
//! bandwidth — what bounds batch-1 decode on a CPU.

use rayon::prelude::*;

pub mod blocks;
mod kv_cache;
mod matmul;
mod qdot;
mod weight;
mod workers;

use self::blocks::{BlockPart, BlockWeight};
pub use self::kv_cache::CpuKvCache;
use self::matmul::dot;
pub use self::weight::{CpuWeight, HostType};
use super::{contract, AttnDims, Backend, KvCacheSpec, Profiling, Runtime, StepInputs};
use crate::error::{Error, Result};
use crate::quant::BlockType;
use crate::runtime::batch::Batch;
use crate::runtime::sampler::{sample_row, RowSampling};
use crate::runtime::token_mask::TokenMasks;
use crate::weights::fp8::Fp8Rows;
use crate::weights::random::{self, RandomSlice};
use crate::weights::{fused_shape, TensorSlice};

/// Activations on the CPU: `rows × cols` f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    /// Row-major values.
    pub data: Vec<f32>,
    /// One row per token.
    pub rows: usize,
    /// Features per row.
    pub cols: usize,
}

impl CpuTensor {
    /// A tensor from row-major data.
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(Error::Backend(format!("{} values cannot form {rows}×{cols}", data.len())));
        }
        Ok(CpuTensor { data, rows, cols })
    }

    /// `(rows, cols)`.
    pub fn shape(&self) -> contract::Shape {
        (self.rows, self.cols)
    }

    fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// The CPU backend.
#[derive(Debug, Clone, Default)]
pub struct CpuBackend;

/// A step on the CPU: its inputs, owned, and its batch's extent (checked once).
#[derive(Debug, Clone)]
pub struct CpuStep {
    batch: Batch,
    ids: Vec<u32>,
    rows: Vec<usize>,
    extent: contract::BatchExtent,
}

impl CpuBackend {
    /// The CPU backend, using rayon's global pool.
    pub fn new() -> Self {
        CpuBackend
    }
}

/// Independent lanes of the bandwidth probe's sum: wide SIMD adds, never the bottleneck.
const PROBE_LANES: usize = 64;

/// Wrapping sum of `words`, with AVX2 where the CPU has it (the build targets baseline x86-64).
fn sum_words(words: &[u32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked just above).
        return unsafe { sum_words_avx2(words) };
    }
    sum_words_lanes(words)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(words: &[u32]) -> u32 {
    sum_words_lanes(words)
}

#[inline(always)]
fn sum_words_lanes(words: &[u32]) -> u32 {
    let mut acc = [0u32; PROBE_LANES];
    for block in words.chunks_exact(PROBE_LANES) {
        for (a, &w) in acc.iter_mut().zip(block) {
            *a = a.wrapping_add(w);
        }
    }
    acc.iter().fold(0u32, |s, &a| s.wrapping_add(a))
}

/// The values of random `parts` stacked (`rows × cols`, row-major).
fn random_values(parts: &[RandomSlice], rows: usize, cols: usize) -> Vec<f32> {
    let mut data = vec![0f32; rows * cols];
    let mut rest = data.as_mut_slice();
    for p in parts {
        let (mine, tail) = rest.split_at_mut(p.shape().0 * cols);
        // Padding rows stay zero: only the first `rows.len()` rows are generated.
        mine.par_chunks_mut(cols.max(1)).zip(p.rows.clone().into_par_iter()).for_each(|(out, r)| {
            for (o, c) in out.iter_mut().zip(p.cols.clone()) {
                *o = p.value(r, c);
            }
        });
        rest = tail;
    }
    data
}

fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (ms + eps).sqrt();
    for ((o, v), g) in out.iter_mut().zip(x).zip(w) {
        *o = v * scale * g;
    }
}

/// The CPU needs no runtime: nothing to reserve, steps need no framing, no graphs, no device
/// memory of its own.
impl Runtime for CpuBackend {}

impl Profiling for CpuBackend {
    fn measure_read_bandwidth(&self, bytes: usize) -> Result<f64> {
        let words: Vec<u32> = (0..(bytes / 4).div_ceil(PROBE_LANES).max(1) * PROBE_LANES).map(|i| i as u32).collect();
        // Small chunks (1 MiB), so that every thread stays busy to the end of each pass.
        let chunk = (1 << 18).min(words.len());
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            let sum = words.par_chunks(chunk).map(sum_words).reduce(|| 0, u32::wrapping_add);
            best = best.min(t.elapsed().as_secs_f64());
            // Used, so that the reads cannot be optimised away.
            std::hint::black_box(sum);
        }
        Ok((words.len() * 4) as f64 / best)
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type KvCache = CpuKvCache;
    type Step = CpuStep;

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn step_for(&self, inputs: &StepInputs<'_>) -> Result<CpuStep> {
        let extent = contract::step(inputs)?;
        Ok(CpuStep { batch: inputs.batch.clone(), ids: inputs.ids.to_vec(), rows: inputs.rows.to_vec(), extent })
    }

    fn load_weight(&self, parts: &[TensorSlice<'_>]) -> Result<CpuWeight> {
        let (rows, cols) = fused_shape(parts)?;
        CpuWeight::load(parts, rows, cols)
    }

    fn load_block_weight(&self, parts: &[TensorSlice<'_>], block: BlockType) -> Result<CpuWeight> {
        let (rows, cols) = fused_shape(parts)?;
        let mut data = Vec::with_capacity(rows * cols);
        for p in parts {
            p.extend_f32(&mut data);
        }
        let what = parts.first().map_or("weight", |p| p.tensor.name);
        let part = BlockPart::quantize(what, block.ggml(), data, rows, cols)?;
        Ok(CpuWeight::from_blocks(BlockWeight::new(vec![part], cols), rows, cols))
    }

    fn random_block_weight(&self, parts: &[RandomSlice], block: BlockType) -> Result<CpuWeight> {
        let (rows, cols) = random::fused_shape(parts)?;
        let data = random_values(parts, rows, cols);
        let part = BlockPart::quantize("random weight", block.ggml(), data, rows, cols)?;
        Ok(CpuWeight::from_blocks(BlockWeight::new(vec![part], cols), rows, cols))
    }

    fn load_fp8_weight(&self, parts: &[TensorSlice<'_>], activation_bound: Option<f32>) -> Result<CpuWeight> {
        // Activations stay f32 here (the reference's): the bound is the GPU GEMM's.
        let _ = activation_bound;
        CpuWeight::from_fp8(Fp8Rows::from_slices(parts)?)
    }

    fn random_fp8_weight(&self, parts: &[RandomSlice], activation_bound: Option<f32>) -> Result<CpuWeight> {
        let _ = activation_bound;
        CpuWeight::from_fp8(Fp8Rows::from_random(parts)?)
    }

    fn stores_fp8(&self) -> bool {
        true
    }

    fn random_weight(&self, parts: &[RandomSlice]) -> Result<CpuWeight> {
        let (rows, cols) = random::fused_shape(parts)?;
        let data = random_values(parts, rows, cols);
        // `TULU_CPU_RANDOM_DTYPE=bf16` keeps random matrices in bf16, as a bf16 checkpoint is
        // kept (`tulu bench --random-weights` at bf16; vectors stay f32, as when loading).
        if rows > 1 && std::env::var("TULU_CPU_RANDOM_DTYPE").is_ok_and(|v| v == "bf16") {
            return CpuWeight::from_vec(data.into_iter().map(half::bf16::from_f32).collect(), rows, cols);
        }
        CpuWeight::from_vec(data, rows, cols)
    }

    fn element_bytes(&self) -> usize {
        std::mem::size_of::<f32>()
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CpuWeight> {
        CpuWeight::from_vec(data.to_vec(), rows, cols)
    }

    fn new_kv_cache(&self, spec: &KvCacheSpec) -> Result<CpuKvCache> {
        CpuKvCache::new(spec)
    }

    fn embed(&self, table: &CpuWeight, step: &CpuStep) -> Result<CpuTensor> {
        let (cols, ids) = (table.cols, &step.ids);
        if let Some(b) = table.blocks() {
            return CpuTensor::new(b.embed(ids, table.rows)?, ids.len(), cols);
        }
        let mut out = Vec::with_capacity(ids.len() * cols);
        for &id in ids {
            let id = id as usize;
            if id < table.rows {
                table.extend_row(id, &mut out)?;
            } else {
                out.resize(out.len() + cols, 0.0);
            }
        }
        CpuTensor::new(out, ids.len(), cols)
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &CpuWeight, eps: f32) -> Result<CpuTensor> {
        contract::rms_norm("rms_norm", x.shape(), weight.shape())?;
        let mut out = vec![0.0; x.data.len()];
        weight.with_slice(|w| {
            out.par_chunks_mut(x.cols).zip(x.data.par_chunks(x.cols)).for_each(|(o, r)| rms_norm_row(r, w, eps, o))
        })?;
        CpuTensor::new(out, x.rows, x.cols)
    }

    fn add_rms_norm(&self, x: &mut CpuTensor, residual: &CpuTensor, weight: &CpuWeight, eps: f32) -> Result<CpuTensor> {
        contract::add_rms_norm(x.shape(), residual.shape(), weight.shape())?;
        x.data.iter_mut().zip(&residual.data).for_each(|(a, b)| *a += b);
        self.rms_norm(x, weight, eps)
    }

    fn matmul(&self, x: &CpuTensor, w: &CpuWeight) -> Result<CpuTensor> {
        contract::matmul(x.shape(), w.shape())?;
        let y = w.matmul(&x.data, x.rows)?;
        CpuTensor::new(y, x.rows, w.rows)
    }

    fn rope_write_kv(
        &self,
        qkv: &CpuTensor,
        cos: &CpuWeight,
        sin: &CpuWeight,
        layer: usize,
        cache: &mut CpuKvCache,
        step: &CpuStep,
        dims: AttnDims,
    ) -> Result<CpuTensor> {
        let batch = &step.batch;
        contract::rope_write_kv(qkv.shape(), cos.shape(), sin.shape(), &step.extent, dims, &cache.spec, layer)?;
        let (q_dim, kv_dim, hd) = (dims.q_dim(), dims.kv_dim(), dims.head_dim);
        let half = hd / 2;
        let mut q = Vec::with_capacity(qkv.rows * q_dim);
        let mut k = vec![0.0; kv_dim];
        cos.with_slice(|cos| {
            sin.with_slice(|sin| {
                for r in 0..qkv.rows {
                    let pos = batch.positions[r] as usize;
                    let (c, s) = (&cos[pos * half..(pos + 1) * half], &sin[pos * half..(pos + 1) * half]);
                    let row = qkv.row(r);
                    let start = q.len();
                    q.extend_from_slice(&row[..q_dim]);
                    for head in q[start..].chunks_exact_mut(hd) {
                        rotate_half(head, c, s);
                    }
                    k.copy_from_slice(&row[q_dim..q_dim + kv_dim]);
                    for head in k.chunks_exact_mut(hd) {
                        rotate_half(head, c, s);
                    }
                    cache.write(layer, batch.slots[r] as usize * kv_dim, &k, &row[q_dim + kv_dim..]);
                }
            })
        })??;
        CpuTensor::new(q, qkv.rows, q_dim)
    }

    fn attention(
        &self,
        q: &CpuTensor,
        layer: usize,
        cache: &CpuKvCache,
        step: &CpuStep,
        dims: AttnDims,
    ) -> Result<CpuTensor> {
        let batch = &step.batch;
        contract::attention(q.shape(), &step.extent, dims, &cache.spec, layer)?;
        let (hd, kv_dim) = (dims.head_dim, dims.kv_dim());
        let group = dims.heads / dims.kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        // The sequence each row belongs to.
        let mut row_seq = vec![0usize; q.rows];
        for (i, s) in batch.seqs.iter().enumerate() {
            row_seq[s.rows.clone()].iter_mut().for_each(|x| *x = i);
        }
        let mut out = vec![0.0f32; q.rows * dims.q_dim()];
        out.par_chunks_mut(hd).enumerate().for_each(|(i, o)| {
            let (r, h) = (i / dims.heads, i % dims.heads);
            let seq = &batch.seqs[row_seq[r]];
            let pos = batch.positions[r] as usize;
            let qh = &q.data[r * dims.q_dim() + h * hd..][..hd];
            let koff = (h / group) * hd;
            // Decoded keys and values of an FP8 cache (an f32 cache lends its own slices).
            let mut buf = vec![0.0f32; hd];
            let mut scores: Vec<f32> = (0..=pos)
                .map(|p| {
                    let slot = batch.slot(seq, p) * kv_dim + koff;
                    dot(qh, cache.keys(layer, slot, &mut buf)) * scale
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            for (p, &w) in scores.iter().enumerate() {
                let slot = batch.slot(seq, p) * kv_dim + koff;
                for (acc, v) in o.iter_mut().zip(cache.values(layer, slot, &mut buf)) {
                    *acc += w * v;
                }
            }
            o.iter_mut().for_each(|x| *x /= sum);
        });
        CpuTensor::new(out, q.rows, dims.q_dim())
    }

    fn silu_mul(&self, gate_up: &CpuTensor) -> Result<CpuTensor> {
        contract::silu_mul(gate_up.shape())?;
        let inter = gate_up.cols / 2;
        let mut out = vec![0.0; gate_up.rows * inter];
        out.par_chunks_mut(inter).zip(gate_up.data.par_chunks(gate_up.cols)).for_each(|(o, r)| {
            let (g, u) = r.split_at(inter);
            for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        });
        CpuTensor::new(out, gate_up.rows, inter)
    }

    fn gather_rows(&self, x: &CpuTensor, step: &CpuStep) -> Result<CpuTensor> {
        let rows = &step.rows;
        contract::gather_rows(x.shape(), rows)?;
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            data.extend_from_slice(x.row(r));
        }
        CpuTensor::new(data, rows.len(), x.cols)
    }

    fn sample(
        &self,
        logits: &CpuTensor,
        _step: &CpuStep,
        per_row: &[RowSampling],
        valid: usize,
        masks: Option<&TokenMasks>,
    ) -> Result<Vec<u32>> {
        contract::sample(logits.shape(), per_row.len(), valid, masks.map(|m| (m.rows(), m.words)))?;
        let mask = |r: usize| masks.and_then(|m| m.row(r));
        Ok(per_row.par_iter().enumerate().map(|(r, s)| sample_row(logits.row(r), valid, s, mask(r))).collect())
    }

    fn to_host(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }
}

/// Rotate-half RoPE on one head: pairs `(x[i], x[i + d/2])` turn by angle `i`.
fn rotate_half(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    let (a, b) = head.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch that does not fit the cache is an error, as on CUDA (tests/gpu/ops.rs), not a
    /// slice panic: block 5 of a 2-block cache, for both cache-touching ops.
    #[test]
    fn a_batch_outside_the_cache_is_an_error() {
        let cpu = CpuBackend::new();
        let dims = AttnDims { heads: 4, kv_heads: 1, head_dim: 64 };
        let spec =
            KvCacheSpec { layers: 1, num_blocks: 2, block_size: 16, kv_heads: 1, head_dim: 64, kv: Default::default() };
        let mut cache = cpu.new_kv_cache(&spec).unwrap();
        let mut batch = Batch::new(16);
        batch.push(&[0; 4], 0, &[5]).unwrap();
        let qkv = CpuTensor::new(vec![0.0; 4 * 6 * 64], 4, 6 * 64).unwrap();
        let table = cpu.upload(&[0.0; 8 * 32], 8, 32).unwrap();
        let step = |batch: &Batch| {
            let ids = vec![0; batch.num_tokens()];
            cpu.step_for(&StepInputs { batch, ids: &ids, rows: &[], dims: Some(dims), graphable: false, model: 0 })
                .unwrap()
        };
        let outside = step(&batch);
        let e = cpu.rope_write_kv(&qkv, &table, &table, 0, &mut cache, &outside, dims).expect_err("must fail");
        assert!(e.to_string().contains("outside the cache"), "{e}");
        let q = CpuTensor::new(vec![0.0; 4 * 4 * 64], 4, 4 * 64).unwrap();
        let e = cpu.attention(&q, 0, &cache, &outside, dims).expect_err("must fail");
        assert!(e.to_string().contains("outside the cache"), "{e}");
        // Inside the cache, the same calls work.
        let mut batch = Batch::new(16);
        batch.push(&[0; 4], 0, &[1]).unwrap();
        let inside = step(&batch);
        cpu.rope_write_kv(&qkv, &table, &table, 0, &mut cache, &inside, dims).unwrap();
        cpu.attention(&q, 0, &cache, &inside, dims).unwrap();
    }
}
