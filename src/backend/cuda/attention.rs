//! Paged causal attention: launchers of `kernels/attention.cu` (decode, prefill, combine) and
//! `kernels/attention_mma.cu` (prefill on tensor cores).
//!
//! The host cuts the step into work items — tiles of up to `rows_per_tile` consecutive rows of
//! one sequence — and the keys into splits; a kernel block takes one (work item, kv head,
//! split). A step in which every sequence feeds one token (decode) uses the 128-thread decode
//! kernel with one row per tile; any other step the tensor-core kernel of
//! `kernels/attention_mma.cu` (128 threads, tiles of up to 64 query vectors) at head dims 64 and
//! 128, else the 256-thread prefill kernel with tiles of rows. Splits are added when the tiles
//! alone would leave SMs idle (decode, long contexts), and then `attention_combine_bf16` merges
//! them (the partial outputs of both prefill kernels have one format). An FP8 (e4m3) cache runs
//! the same plans on each kernel's `_kv8` instantiation, which dequantizes in the kernel.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::step::DeviceBatch;
use super::workspace::Buf;
use super::{grid, int, CudaBackend, CudaKvCache, CudaResultExt, CudaTensor};
use crate::backend::AttnDims;
use crate::error::{Error, Result};
use crate::runtime::batch::SeqInput;

/// Accumulators per thread in the kernel (`ACC` in attention.cu).
const ACC: usize = 16;
/// Dynamic shared memory a block may use without opting in to more.
const SMEM_LIMIT: usize = 48 * 1024;
/// Most splits of the keys: bounds the partial-result buffer and the combine's work.
const MAX_SPLITS: usize = 64;

/// A step's work items on the device: `[row_start, n_rows, table_offset, kmax]` each (made
/// by `begin_step`, step.rs).
pub(crate) struct Work {
    items: Buf<u32>,
    count: usize,
    /// Largest `kmax`: the longest key range of any tile.
    max_keys: usize,
}

impl Work {
    /// `count` items at `items`, the longest `max_keys` keys.
    pub(crate) fn new(items: Buf<u32>, count: usize, max_keys: usize) -> Self {
        Work { items, count, max_keys }
    }
}

/// Keys per tile of the tensor-core kernel (`MMA_BK` in attention_mma.cu).
const MMA_BK: usize = 32;
/// Query vectors per block of the tensor-core kernel: 16 per warp, 4 warps.
const MMA_QUERIES: usize = 64;

/// Which kernel runs an attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `attention_decode_bf16`: CUDA cores, one row per block, many key splits.
    Decode,
    /// `attention_prefill_bf16`: CUDA cores, tiles of rows; any head dim that is a multiple of 8.
    Prefill,
    /// `attention_prefill_mma_bf16_{64,128}`: tensor cores.
    PrefillMma,
}

/// How one attention call is launched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    kind: Kind,
    threads: usize,
    rows_per_tile: usize,
    /// Query vectors per block: rows_per_tile × heads per kv head.
    nq_max: usize,
    /// Keys per tile.
    tk: usize,
}

fn align16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

/// Bytes of the kernel's dynamic shared memory; mirrors the layout comment in attention.cu.
fn smem_bytes(nq: usize, hd: usize, tk: usize) -> usize {
    align16(4 * nq * hd)
        + align16(2 * tk * (hd + 2))
        + align16(2 * tk * hd)
        + align16(4 * nq * tk)
        + 3 * align16(4 * nq)
        + 4 * nq
}

fn not_implemented(what: String) -> Error {
    Error::Backend(format!("attention: {what} not implemented yet"))
}

/// Bytes of the tensor-core kernel's dynamic shared memory: K and V tiles of `MMA_BK` rows of
/// hd + 8 bf16 in two stages, then two u32 masks (attention_mma.cu); for an FP8 cache one bf16
/// stage, the masks padded to 16 bytes, and K and V byte tiles of `MMA_BK` × hd e4m3.
fn mma_smem_bytes(hd: usize, fp8: bool) -> usize {
    if fp8 {
        2 * MMA_BK * (hd + 8) * 2 + 16 + 2 * MMA_BK * hd
    } else {
        2 * 2 * MMA_BK * (hd + 8) * 2 + 2 * 4
    }
}

fn plan(decode_step: bool, dims: AttnDims) -> Result<Plan> {
    let (hd, group) = (dims.head_dim, dims.heads / dims.kv_heads);
    if hd == 0 || !hd.is_multiple_of(8) {
        return Err(not_implemented(format!("head_dim {hd} (a multiple of 8 is needed for 16-byte loads) is")));
    }
    // Prefill and mixed steps go to tensor cores where the mma kernel is built for the shape
    // (head dims 64 and 128, at most 64 query heads per kv head): QKᵀ and PV there are matrix
    // products of 16+ rows, ~16x the FLOP rate of the CUDA-core kernel. A decode-only step keeps
    // the CUDA-core decode kernel: with one row per sequence an m16 mma would waste 15/16 of its
    // rows (G/16 used at most), and decode is bound by reading the cache, which its key splits
    // spread over every SM.
    if !decode_step && (hd == 64 || hd == 128) && group <= MMA_QUERIES {
        let rows_per_tile = MMA_QUERIES / group;
        return Ok(Plan {
            kind: Kind::PrefillMma,
            threads: 128,
            rows_per_tile,
            nq_max: rows_per_tile * group,
            tk: MMA_BK,
        });
    }
    let (kind, threads, rows_per_tile) = if decode_step && group * hd <= 128 * ACC {
        (Kind::Decode, 128, 1)
    } else {
        // As many rows as fit the accumulators, at most 64 query vectors (the score tile).
        let nq = (64usize).min(256 * ACC / hd);
        (Kind::Prefill, 256, (nq / group).max(1))
    };
    let nq_max = rows_per_tile * group;
    if nq_max * hd > threads * ACC {
        return Err(not_implemented(format!("{group} query heads per kv head at head_dim {hd} is")));
    }
    let mut tk = 64;
    while smem_bytes(nq_max, hd, tk) > SMEM_LIMIT {
        if tk == 8 {
            return Err(not_implemented(format!(
                "head_dim {hd} with {group} query heads per kv head (shared memory) is"
            )));
        }
        tk /= 2;
    }
    Ok(Plan { kind, threads, rows_per_tile, nq_max, tk })
}

impl Plan {
    /// Dynamic shared memory of the plan's kernel at head dim `hd` (for an FP8 cache when
    /// `fp8`: only the tensor-core kernel's layout differs, attention.cu's tiles are bf16).
    fn smem_bytes(&self, hd: usize, fp8: bool) -> usize {
        match self.kind {
            Kind::PrefillMma => mma_smem_bytes(hd, fp8),
            Kind::Decode | Kind::Prefill => smem_bytes(self.nq_max, hd, self.tk),
        }
    }
}

/// Rows per work-item tile of the attention plan for a step of `seqs` at `dims` (what
/// `begin_step` cuts the step's work list for), or `None` when no kernel takes the shape
/// (attention then says so).
pub(crate) fn rows_per_tile(seqs: &[SeqInput], dims: AttnDims) -> Option<usize> {
    plan(is_decode(seqs), dims).ok().map(|p| p.rows_per_tile)
}

/// Whether every sequence of the step feeds one token (the decode kernel's steps).
fn is_decode(seqs: &[SeqInput]) -> bool {
    seqs.iter().all(|s| s.rows.len() == 1)
}

impl CudaBackend {
    /// The caller has checked q's shape and that the batch fits the cache (`contract::attention`).
    pub(crate) fn attention_impl(
        &self,
        q: &CudaTensor,
        layer: usize,
        cache: &CudaKvCache,
        batch: &DeviceBatch,
        dims: AttnDims,
    ) -> Result<CudaTensor> {
        let rows = batch.rows;
        let mut out = self.alloc_tensor(rows, dims.q_dim())?;
        if rows == 0 {
            return Ok(out);
        }
        let plan = plan(is_decode(&batch.host.seqs), dims)?;
        let block_size = batch.host.block_size;
        let (sm_count, kv_heads) = (self.sm_count, dims.kv_heads);
        let work = match &batch.work {
            Some((tile, work)) if *tile == plan.rows_per_tile => work,
            _ => {
                return Err(Error::Backend(format!(
                    "attention: the step was begun without this attention's geometry ({dims:?})"
                )))
            }
        };

        // Split the keys only when the tiles leave SMs idle (two blocks per SM wanted), and
        // never below two key tiles per split. A step padded for a graph must not depend on
        // the context lengths: its split count is sized for the longest context the model
        // takes, and each work item's split length is computed on the device (split_len 0).
        let blocks = work.count * kv_heads;
        let wanted = if blocks >= 2 * sm_count { 1 } else { (2 * sm_count).div_ceil(blocks) };
        let (splits, split_len) = match batch.bucket {
            Some(_) => {
                let longest = self.max_context.load(std::sync::atomic::Ordering::Relaxed).max(1);
                (wanted.clamp(1, longest.div_ceil(2 * plan.tk).clamp(1, MAX_SPLITS)), 0)
            }
            None => {
                let most = work.max_keys.div_ceil(2 * plan.tk).clamp(1, MAX_SPLITS);
                let splits = wanted.clamp(1, most);
                let split_len = work.max_keys.div_ceil(splits).div_ceil(plan.tk) * plan.tk;
                (work.max_keys.div_ceil(split_len), split_len)
            }
        };

        let (o_part, ml_part) = if splits > 1 {
            let n = rows * dims.heads * splits;
            // Every (row, head, split) entry is written by the attention kernel before the
            // combine kernel reads it (padding rows' entries are neither written nor used).
            (
                self.alloc_buf::<f32>(n * dims.head_dim, "allocating attention partials")?,
                self.alloc_buf::<f32>(2 * n, "allocating attention partials")?,
            )
        } else {
            // Unused by the kernel with one split; one element each, as CUDA refuses empty allocations.
            (self.placeholder()?, self.placeholder()?)
        };

        let cfg = LaunchConfig {
            grid_dim: (grid(work.count, "attention tiles")?, grid(kv_heads, "kv heads")?, grid(splits, "splits")?),
            block_dim: (plan.threads as u32, 1, 1),
            shared_mem_bytes: plan.smem_bytes(dims.head_dim, cache.is_fp8()) as u32,
        };
        let scale_log2 = ((dims.head_dim as f64).sqrt().recip() * std::f64::consts::LOG2_E) as f32;
        let args = [
            int(dims.heads, "heads")?,
            int(kv_heads, "kv_heads")?,
            int(dims.head_dim, "head_dim")?,
            int(block_size, "block_size")?,
            int(plan.nq_max, "nq_max")?,
            int(plan.tk, "tk")?,
            int(split_len, "split_len")?,
        ];
        let (k_scale, v_scale) = cache.scales(layer);
        let k = &self.kernels;
        // The cache's element type picks the instantiation: `_kv8` reads e4m3 and applies the
        // layer's scales (attention.cu's header); the bf16 kernels get scales of 1.
        let kernel = match (plan.kind, dims.head_dim, cache.is_fp8()) {
            (Kind::Decode, _, false) => &k.attention_decode,
            (Kind::Decode, _, true) => &k.attention_decode_kv8,
            (Kind::Prefill, _, false) => &k.attention_prefill,
            (Kind::Prefill, _, true) => &k.attention_prefill_kv8,
            (Kind::PrefillMma, 64, false) => &k.attention_prefill_mma_64,
            (Kind::PrefillMma, _, false) => &k.attention_prefill_mma_128,
            (Kind::PrefillMma, 64, true) => &k.attention_prefill_mma_kv8_64,
            (Kind::PrefillMma, _, true) => &k.attention_prefill_mma_kv8_128,
        };
        let mut launch = self.stream.launch_builder(kernel);
        launch.arg(&*q.data);
        cache.push_layer(&mut launch, layer);
        launch
            .arg(&*batch.positions)
            .arg(&*batch.block_tables)
            .arg(&*work.items)
            .arg(&mut *out.data)
            .arg(&*o_part)
            .arg(&*ml_part);
        for a in &args {
            launch.arg(a);
        }
        launch.arg(&scale_log2).arg(&k_scale).arg(&v_scale);
        // SAFETY: argument types and order match attention_tile's (and attention_mma's), with
        // the cache's element type; the plan keeps the
        // accumulators and shared memory within the kernel's limits, and contract::attention keeps
        // every block id and slot inside the cache.
        unsafe { launch.launch(cfg) }.cuda("launching the attention kernel")?;
        self.count_launch();

        if splits > 1 {
            let cfg = LaunchConfig {
                grid_dim: (grid(rows * dims.heads, "rows × heads")?, 1, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let (hd, n_splits) = (int(dims.head_dim, "head_dim")?, int(splits, "splits")?);
            let mut launch = self.stream.launch_builder(&self.kernels.attention_combine);
            launch.arg(&*o_part).arg(&*ml_part).arg(&mut *out.data).arg(&hd).arg(&n_splits);
            // SAFETY: argument types and order match attention_combine_bf16; the partials hold
            // rows × heads × splits entries.
            unsafe { launch.launch(cfg) }.cuda("launching attention_combine_bf16")?;
            self.count_launch();
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(heads: usize, kv_heads: usize, head_dim: usize) -> AttnDims {
        AttnDims { heads, kv_heads, head_dim }
    }

    #[test]
    fn plans_fit_the_kernel_limits() {
        for &(heads, kv, hd) in
            &[(8, 2, 8), (9, 3, 64), (32, 8, 128), (64, 8, 128), (128, 8, 128), (32, 32, 128), (8, 1, 256)]
        {
            for decode in [true, false] {
                let p = plan(decode, dims(heads, kv, hd)).unwrap();
                if p.kind == Kind::PrefillMma {
                    assert!(!decode && (hd == 64 || hd == 128) && p.nq_max <= MMA_QUERIES, "{p:?}");
                    assert_eq!((p.threads, p.tk), (128, MMA_BK), "{p:?}");
                } else {
                    assert!(p.nq_max * hd <= p.threads * ACC, "{p:?}");
                }
                assert!(p.smem_bytes(hd, false) <= SMEM_LIMIT, "{p:?}");
                assert!(p.smem_bytes(hd, true) <= SMEM_LIMIT, "{p:?}");
                assert!(p.tk >= 8 && p.rows_per_tile >= 1);
            }
        }
        // Llama-3.1-8B decode: the decode kernel, one row, all 4 query heads of a kv head.
        let p = plan(true, dims(32, 8, 128)).unwrap();
        assert_eq!((p.kind, p.rows_per_tile, p.nq_max, p.tk), (Kind::Decode, 1, 4, 64));
        // Its prefill: tensor cores, 16 rows of 4 query heads per block.
        let p = plan(false, dims(32, 8, 128)).unwrap();
        assert_eq!((p.kind, p.rows_per_tile, p.nq_max), (Kind::PrefillMma, 16, 64));
        // Head dims other than 64 and 128: the CUDA-core prefill kernel.
        assert_eq!(plan(false, dims(12, 3, 96)).unwrap().kind, Kind::Prefill);
        assert_eq!(plan(false, dims(8, 2, 8)).unwrap().kind, Kind::Prefill);
    }

    #[test]
    fn unsupported_shapes_say_not_implemented() {
        let e = plan(true, dims(8, 8, 12)).unwrap_err().to_string();
        assert!(e.contains("not implemented yet"), "{e}");
        let e = plan(true, dims(64, 1, 128)).unwrap_err().to_string();
        assert!(e.contains("not implemented yet"), "{e}");
    }
}
