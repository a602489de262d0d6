//! The backend contract: one shape and batch check per operation, which every backend calls
//! before it touches memory, so that the CPU and CUDA backends refuse the same inputs with the
//! same errors (never a slice panic on one and an error on the other, never an out-of-bounds
//! kernel). Shapes are `(rows, cols)`; a weight vector is one row.

use super::{AttnDims, KvCacheSpec, StepInputs};
use crate::error::{Error, Result};
use crate::runtime::batch::Batch;

/// A `rows × cols` shape.
pub type Shape = (usize, usize);

fn fail(op: &str, message: String) -> Error {
    Error::Backend(format!("{op}: {message}"))
}

/// What the cache-touching ops need to know about a batch, computed once per batch by
/// [`batch`]: the largest position, block id and slot any row uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchExtent {
    /// Rows (new tokens) in the step.
    pub tokens: usize,
    /// Token slots per block the batch addresses with.
    pub block_size: usize,
    /// The largest position of any row (0 for an empty batch).
    pub max_position: usize,
    /// The largest block id in any block table.
    pub max_block: usize,
    /// The largest cache slot any row writes.
    pub max_slot: usize,
}

/// Checks that `b` is consistent (one position and slot per token, sequences' rows consecutive
/// and non-empty, every block table covering its rows' positions, slots matching the tables)
/// and returns its extent.
pub fn batch(b: &Batch) -> Result<BatchExtent> {
    let n = b.num_tokens();
    if b.positions.len() != n || b.slots.len() != n {
        return Err(fail(
            "batch",
            format!("{n} tokens but {} positions and {} slots", b.positions.len(), b.slots.len()),
        ));
    }
    if b.block_size == 0 {
        return Err(fail("batch", "block size 0".into()));
    }
    let mut expect = 0;
    for s in &b.seqs {
        if s.rows.start != expect || s.rows.end <= s.rows.start || s.rows.end > n {
            return Err(fail("batch", "sequences' rows must be consecutive, non-empty and within the step".into()));
        }
        expect = s.rows.end;
        for r in s.rows.clone() {
            let pos = b.positions[r] as usize;
            let Some(&block) = s.block_table.get(pos / b.block_size) else {
                return Err(fail(
                    "batch",
                    format!("a block table of {} blocks cannot hold position {pos}", s.block_table.len()),
                ));
            };
            if b.slots[r] as usize != block as usize * b.block_size + pos % b.block_size {
                return Err(fail("batch", format!("row {r}'s slot does not match its block table")));
            }
        }
    }
    if expect != n {
        return Err(fail("batch", format!("sequences cover {expect} of {n} rows")));
    }
    Ok(BatchExtent {
        tokens: n,
        block_size: b.block_size,
        max_position: b.positions.iter().max().map_or(0, |&p| p as usize),
        max_block: b.seqs.iter().flat_map(|s| &s.block_table).max().map_or(0, |&x| x as usize),
        max_slot: b.slots.iter().max().map_or(0, |&x| x as usize),
    })
}

/// Checks a step's inputs ([`batch`], and one embedding id per row) and returns its batch's
/// extent; `begin_step` and `step_for` of every backend call it once per step.
pub fn step(inputs: &StepInputs<'_>) -> Result<BatchExtent> {
    let extent = batch(inputs.batch)?;
    if inputs.ids.len() != extent.tokens {
        return Err(fail("begin_step", format!("{} ids for {} rows", inputs.ids.len(), extent.tokens)));
    }
    Ok(extent)
}

/// Checks that a batch of extent `e` fits `cache` (its block size, block ids and slots) and
/// `dims` its heads, at `layer`.
pub fn batch_fits(e: &BatchExtent, cache: &KvCacheSpec, dims: AttnDims, layer: usize, op: &str) -> Result<()> {
    if e.block_size != cache.block_size {
        return Err(fail(op, format!("batch uses {}-token blocks, the cache {}", e.block_size, cache.block_size)));
    }
    if e.tokens > 0 && (e.max_block >= cache.num_blocks || e.max_slot >= cache.num_blocks * cache.block_size) {
        return Err(fail(
            op,
            format!("block {} / slot {} outside the cache's {} blocks", e.max_block, e.max_slot, cache.num_blocks),
        ));
    }
    if dims.kv_heads != cache.kv_heads || dims.head_dim != cache.head_dim {
        return Err(fail(
            op,
            format!(
                "dims {}×{} do not match the cache's {}×{}",
                dims.kv_heads, dims.head_dim, cache.kv_heads, cache.head_dim
            ),
        ));
    }
    if layer >= cache.layers {
        return Err(fail(op, format!("layer {layer} of a {}-layer cache", cache.layers)));
    }
    if dims.kv_heads == 0 || !dims.heads.is_multiple_of(dims.kv_heads) {
        return Err(fail(op, format!("{} heads do not divide into {} kv heads", dims.heads, dims.kv_heads)));
    }
    Ok(())
}

/// `rms_norm` (and the norm half of `add_rms_norm`): a weight of one value per column.
pub fn rms_norm(op: &str, x: Shape, weight: Shape) -> Result<()> {
    if weight.0 * weight.1 != x.1 || x.1 == 0 {
        return Err(fail(op, format!("activation has {} columns, norm weight is {}×{}", x.1, weight.0, weight.1)));
    }
    Ok(())
}

/// `add_rms_norm`: `x` and `residual` alike, and the norm's weight.
pub fn add_rms_norm(x: Shape, residual: Shape, weight: Shape) -> Result<()> {
    rms_norm("add_rms_norm", x, weight)?;
    if residual != x {
        return Err(fail("add_rms_norm", format!("x is {}×{}, residual {}×{}", x.0, x.1, residual.0, residual.1)));
    }
    Ok(())
}

/// `matmul`: `x · wᵀ` needs `x`'s columns to be `w`'s.
pub fn matmul(x: Shape, w: Shape) -> Result<()> {
    if x.1 != w.1 || w.1 == 0 {
        return Err(fail("matmul", format!("activation has {} columns, weight {}×{}", x.1, w.0, w.1)));
    }
    Ok(())
}

/// `silu_mul`: a fused `[gate | up]` activation has an even width.
pub fn silu_mul(gate_up: Shape) -> Result<()> {
    if !gate_up.1.is_multiple_of(2) {
        return Err(fail("silu_mul", format!("[gate | up] has an odd width {}", gate_up.1)));
    }
    Ok(())
}

/// `gather_rows`: every row asked for exists.
pub fn gather_rows(x: Shape, rows: &[usize]) -> Result<()> {
    match rows.iter().find(|&&r| r >= x.0) {
        Some(r) => Err(fail("gather_rows", format!("row {r} of {}", x.0))),
        None => Ok(()),
    }
}

/// `rope_write_kv`: a fused q/k/v row per token, tables of `head_dim / 2` columns covering
/// every position, and a batch that fits the cache.
#[allow(clippy::too_many_arguments)]
pub fn rope_write_kv(
    qkv: Shape,
    cos: Shape,
    sin: Shape,
    e: &BatchExtent,
    dims: AttnDims,
    cache: &KvCacheSpec,
    layer: usize,
) -> Result<()> {
    let op = "rope_write_kv";
    batch_fits(e, cache, dims, layer, op)?;
    let width = dims.q_dim() + 2 * dims.kv_dim();
    if qkv != (e.tokens, width) {
        return Err(fail(op, format!("qkv is {}×{}, expected {}×{width}", qkv.0, qkv.1, e.tokens)));
    }
    let half = dims.head_dim / 2;
    if !dims.head_dim.is_multiple_of(2) || cos.1 != half || cos != sin {
        return Err(fail(
            op,
            format!("tables are {}×{} and {}×{}, expected [positions × {half}]", cos.0, cos.1, sin.0, sin.1),
        ));
    }
    if e.tokens > 0 && e.max_position >= cos.0 {
        return Err(fail(op, format!("position {} past the tables' {} positions", e.max_position, cos.0)));
    }
    Ok(())
}

/// `attention`: one query row per token and a batch that fits the cache.
pub fn attention(q: Shape, e: &BatchExtent, dims: AttnDims, cache: &KvCacheSpec, layer: usize) -> Result<()> {
    batch_fits(e, cache, dims, layer, "attention")?;
    if q != (e.tokens, dims.q_dim()) {
        return Err(fail("attention", format!("q is {}×{}, expected {}×{}", q.0, q.1, e.tokens, dims.q_dim())));
    }
    Ok(())
}

/// `sample`: one sampling row per logits row, `valid` (the columns that may be picked) within
/// the logits' width, and masks (when given) of one row per logits row, each covering `valid`.
pub fn sample(logits: Shape, per_row: usize, valid: usize, masks: Option<(usize, usize)>) -> Result<()> {
    if per_row != logits.0 || valid == 0 || valid > logits.1 {
        return Err(fail(
            "sample",
            format!("{per_row} sampling rows and {valid} valid columns for {}×{} logits", logits.0, logits.1),
        ));
    }
    if let Some((rows, words)) = masks {
        if rows != logits.0 || words < valid.div_ceil(32) {
            return Err(fail(
                "sample",
                format!("{rows} token masks of {words} words for {}×{} logits ({valid} valid)", logits.0, logits.1),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> KvCacheSpec {
        KvCacheSpec { layers: 2, num_blocks: 4, block_size: 4, kv_heads: 2, head_dim: 8, kv: Default::default() }
    }

    const DIMS: AttnDims = AttnDims { heads: 4, kv_heads: 2, head_dim: 8 };

    #[test]
    fn a_batch_outside_the_cache_is_refused() {
        let mut b = Batch::new(4);
        b.push(&[1, 2, 3], 0, &[3]).unwrap();
        let e = batch(&b).unwrap();
        assert_eq!((e.tokens, e.max_position, e.max_block, e.max_slot), (3, 2, 3, 14));
        batch_fits(&e, &spec(), DIMS, 1, "t").unwrap();
        let mut far = Batch::new(4);
        far.push(&[1], 0, &[4]).unwrap();
        let err = batch_fits(&batch(&far).unwrap(), &spec(), DIMS, 0, "t").unwrap_err();
        assert!(err.to_string().contains("outside the cache"), "{err}");
        // A table naming a block past the cache, even one no row of this step writes.
        let mut tail = Batch::new(4);
        tail.push(&[1, 2], 0, &[0, 4]).unwrap();
        assert!(batch_fits(&batch(&tail).unwrap(), &spec(), DIMS, 0, "t").is_err());
        assert!(batch_fits(&e, &spec(), DIMS, 2, "t").unwrap_err().to_string().contains("layer 2"));
        let small = KvCacheSpec { block_size: 8, ..spec() };
        assert!(batch_fits(&e, &small, DIMS, 0, "t").is_err());
    }

    #[test]
    fn an_inconsistent_batch_is_refused() {
        let mut b = Batch::new(4);
        b.push(&[1, 2, 3, 4, 5], 0, &[0, 1]).unwrap();
        let mut short = b.clone();
        short.seqs[0].block_table.pop();
        assert!(batch(&short).unwrap_err().to_string().contains("cannot hold position 4"));
        let mut moved = b.clone();
        moved.slots[4] = 0;
        assert!(batch(&moved).is_err());
        let mut gap = b.clone();
        gap.seqs[0].rows = 1..5;
        assert!(batch(&gap).is_err());
        let mut lost = b;
        lost.positions.pop();
        assert!(batch(&lost).is_err());
    }

    #[test]
    fn op_shapes_are_checked() {
        let mut b = Batch::new(4);
        b.push(&[1, 2], 0, &[0]).unwrap();
        let e = batch(&b).unwrap();
        let width = DIMS.q_dim() + 2 * DIMS.kv_dim();
        rope_write_kv((2, width), (8, 4), (8, 4), &e, DIMS, &spec(), 0).unwrap();
        assert!(rope_write_kv((2, width + 1), (8, 4), (8, 4), &e, DIMS, &spec(), 0).is_err());
        assert!(rope_write_kv((2, width), (1, 4), (1, 4), &e, DIMS, &spec(), 0).is_err(), "position past the tables");
        assert!(rope_write_kv((2, width), (8, 3), (8, 3), &e, DIMS, &spec(), 0).is_err());
        attention((2, DIMS.q_dim()), &e, DIMS, &spec(), 0).unwrap();
        assert!(attention((3, DIMS.q_dim()), &e, DIMS, &spec(), 0).is_err());
        assert!(matmul((2, 8), (5, 8)).is_ok() && matmul((2, 8), (5, 7)).is_err());
        assert!(rms_norm("n", (2, 8), (1, 8)).is_ok() && rms_norm("n", (2, 8), (1, 7)).is_err());
        assert!(add_rms_norm((2, 8), (2, 8), (1, 8)).is_ok() && add_rms_norm((2, 8), (3, 8), (1, 8)).is_err());
        assert!(silu_mul((2, 8)).is_ok() && silu_mul((2, 7)).is_err());
        assert!(gather_rows((3, 8), &[2, 0]).is_ok() && gather_rows((3, 8), &[3]).is_err());
        assert!(sample((2, 10), 2, 10, None).is_ok() && sample((2, 10), 1, 10, None).is_err());
        assert!(sample((2, 10), 2, 11, None).is_err() && sample((2, 10), 2, 10, Some((2, 1))).is_ok());
        assert!(sample((2, 40), 2, 40, Some((2, 1))).is_err() && sample((2, 10), 2, 10, Some((1, 1))).is_err());
    }
}
