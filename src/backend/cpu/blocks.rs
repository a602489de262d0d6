//! Weights in GGML blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, …) on the CPU. Q8_0, Q4_0, Q4_1, Q4_K
//! and Q6_K go through our own kernels (`qdot.rs`; candle-core's decoded SmolLM2 4–14× slower on
//! this backend for Q8_0/Q4_1, docs/performance.md; for Q4_K/Q6_K the comparison is open there),
//! the other types through candle-core's `quantized` module. Both quantize each activation row to
//! 8 bits per block (blocks of 32 in ours, Q8_K for candle's k-quants) and take integer dot
//! products against the stored blocks, as llama.cpp does. A fused weight (q/k/v, gate/up) whose
//! parts share a block type is one block matrix; parts of different types (a `Q4_K_M` file mixes
//! Q4_K and Q6_K) stay separate and their outputs are placed side by side.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{Device as CDevice, Tensor};

use super::qdot::{self, QKind};
use super::weight::HostType;
use crate::error::{Error, Result};
use crate::weights::gguf_store::with_aligned;

/// One block matrix: `rows` output rows of `cols` inputs.
pub struct BlockPart {
    q: Arc<QTensor>,
    rows: usize,
}

/// A weight of one or more block matrices stacked along rows.
pub struct BlockWeight {
    parts: Vec<BlockPart>,
    cols: usize,
}

/// Checks that `cols` columns are whole blocks of `dtype`, naming `what` otherwise.
pub fn check_width(what: &str, dtype: GgmlDType, cols: usize) -> Result<()> {
    let block = dtype.block_size();
    if !cols.is_multiple_of(block) {
        return Err(Error::Backend(format!(
            "{what}: {cols} columns are not whole {dtype:?} blocks of {block} (a row must be whole blocks)"
        )));
    }
    // candle's Q5_0 and Q5_1 dot products (like ggml's) take blocks in pairs (our Q4_1 does not).
    let paired = matches!(dtype, GgmlDType::Q5_0 | GgmlDType::Q5_1);
    if paired && !(cols / block).is_multiple_of(2) {
        return Err(Error::Backend(format!(
            "{what}: {cols} columns are an odd number of {dtype:?} blocks (its dot product takes blocks in pairs)"
        )));
    }
    Ok(())
}

impl BlockPart {
    /// A block matrix from its stored bytes (`rows` rows of `cols / block` blocks each).
    pub fn from_bytes(what: &str, dtype: GgmlDType, bytes: &[u8], rows: usize, cols: usize) -> Result<Self> {
        check_width(what, dtype, cols)?;
        let want = rows * cols / dtype.block_size() * dtype.type_size();
        if bytes.len() != want {
            return Err(Error::Backend(format!(
                "{what}: {} bytes of {dtype:?} blocks, expected {want} for {rows}×{cols}",
                bytes.len()
            )));
        }
        let storage = with_aligned(bytes, |b| QStorage::from_data(Cow::Borrowed(b), &CDevice::Cpu, dtype))?;
        Ok(BlockPart { q: Arc::new(QTensor::new(storage, (rows, cols))?), rows })
    }

    /// `values` (`rows × cols`, row-major f32) quantized to `dtype` blocks.
    pub fn quantize(what: &str, dtype: GgmlDType, values: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        check_width(what, dtype, cols)?;
        let t = Tensor::from_vec(values, (rows, cols), &CDevice::Cpu)?;
        Ok(BlockPart { q: Arc::new(QTensor::quantize(&t, dtype)?), rows })
    }

    /// The block type.
    pub fn dtype(&self) -> GgmlDType {
        self.q.dtype()
    }

    /// The kernel of our own for this block type, unless `TULU_QDOT=candle` asks for candle's
    /// (to compare the two in one build; candle's Q4_1 takes blocks in pairs, so an odd number
    /// of blocks a row stays on ours).
    fn own_kernel(&self, cols: usize) -> Option<QKind> {
        static CANDLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let unpaired = self.dtype() == GgmlDType::Q4_1 && !(cols / 32).is_multiple_of(2);
        if !unpaired && *CANDLE.get_or_init(|| std::env::var("TULU_QDOT").is_ok_and(|v| v == "candle")) {
            return None;
        }
        match self.dtype() {
            GgmlDType::Q8_0 => Some(QKind::Q8_0),
            GgmlDType::Q4_0 => Some(QKind::Q4_0),
            GgmlDType::Q4_1 => Some(QKind::Q4_1),
            GgmlDType::Q4K => Some(QKind::Q4K),
            GgmlDType::Q6K => Some(QKind::Q6K),
            _ => None,
        }
    }

    /// `x · selfᵀ` for `x: n × cols`; returns `n × rows` row-major.
    fn matmul(&self, x: &[f32], n: usize, cols: usize) -> Result<Vec<f32>> {
        if let Some(kind) = self.own_kernel(cols) {
            return Ok(qdot::matmul(kind, &self.q.data()?, self.rows, cols, x, n));
        }
        let xt = Tensor::from_slice(x, (n, cols), &CDevice::Cpu)?;
        Ok(xt.apply_op1_no_bwd(&*self.q)?.flatten_all()?.to_vec1::<f32>()?)
    }
}

impl BlockWeight {
    /// Parts stacked along rows, all `cols` wide.
    pub fn new(parts: Vec<BlockPart>, cols: usize) -> Self {
        BlockWeight { parts, cols }
    }

    /// Bytes the blocks take in host memory ([`HostType::bytes`] of each part).
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(|p| HostType::Blocks(p.dtype()).bytes(p.rows, self.cols) as usize).sum()
    }

    /// The block type of every part, for logs (`Q4K+Q6K` when mixed).
    pub fn describe(&self) -> String {
        let names: Vec<String> = self.parts.iter().map(|p| format!("{:?}", p.dtype())).collect();
        names.join("+")
    }

    /// `x · selfᵀ` for `x: n × cols`; returns `n × rows` row-major.
    pub fn matmul(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        if let [only] = self.parts.as_slice() {
            return only.matmul(x, n, self.cols);
        }
        let outs: Vec<Vec<f32>> = self.parts.iter().map(|p| p.matmul(x, n, self.cols)).collect::<Result<_>>()?;
        let m: usize = self.parts.iter().map(|p| p.rows).sum();
        let mut out = Vec::with_capacity(n * m);
        for t in 0..n {
            for (p, o) in self.parts.iter().zip(&outs) {
                out.extend_from_slice(&o[t * p.rows..(t + 1) * p.rows]);
            }
        }
        Ok(out)
    }

    /// Rows `ids` dequantized (an embedding table); ids past the rows give zero rows.
    pub fn embed(&self, ids: &[u32], rows: usize) -> Result<Vec<f32>> {
        let [only] = self.parts.as_slice() else {
            return Err(Error::Backend("an embedding table must be one block matrix".into()));
        };
        let inside: Vec<u32> = ids.iter().map(|&i| if (i as usize) < rows { i } else { 0 }).collect();
        let idt = Tensor::from_vec(inside, ids.len(), &CDevice::Cpu)?;
        let mut out = only.q.embedding(&idt)?.flatten_all()?.to_vec1::<f32>()?;
        for (r, &id) in ids.iter().enumerate() {
            if id as usize >= rows {
                out[r * self.cols..(r + 1) * self.cols].fill(0.0);
            }
        }
        Ok(out)
    }

    /// Every part dequantized to f32, stacked (`rows × cols`): the reference the tests check
    /// the block matmul against.
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for p in &self.parts {
            out.extend(p.q.dequantize(&CDevice::Cpu)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::backend::cpu::matmul::matmul;

    const TYPES: [GgmlDType; 5] = [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q4K, GgmlDType::Q6K];

    fn random(len: usize, rng: &mut impl Rng) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// The per-element bound on what quantizing the activations to 8 bits costs: each block of
    /// `act_block` activations is rounded to a step of at most `amax / 127`, so a dot product
    /// moves by at most that step times the block's `Σ|w|`. (The k-quants' Q8_K uses 256-value
    /// blocks and may clamp one value by a whole step: the step, not half of it, is the bound.)
    fn bound(x: &[f32], w: &[f32], act_block: usize) -> f32 {
        x.chunks(act_block)
            .zip(w.chunks(act_block))
            .map(|(xb, wb)| {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                amax / 127.0 * wb.iter().map(|v| v.abs()).sum::<f32>()
            })
            .sum()
    }

    /// Checks `w`'s block matmul against the f32 matmul of its dequantized values, per element,
    /// for several batch sizes, and that each row is the same alone as in its batch.
    fn check(w: &BlockWeight, m: usize, k: usize, act_block: usize, rng: &mut impl Rng) {
        let deq = w.dequantize().unwrap();
        for n in [1, 2, 5, 17] {
            let x = random(n * k, rng);
            let got = w.matmul(&x, n).unwrap();
            let want = matmul(&x, n, &deq, m, k);
            assert_eq!(got.len(), n * m);
            for t in 0..n {
                let xr = &x[t * k..(t + 1) * k];
                for r in 0..m {
                    let (g, e) = (got[t * m + r], want[t * m + r]);
                    let tol = bound(xr, &deq[r * k..(r + 1) * k], act_block) + 1e-4 * (1.0 + e.abs());
                    assert!((g - e).abs() <= tol, "{} n={n} [{t},{r}]: {g} vs {e} (tol {tol})", w.describe());
                }
                let alone = w.matmul(xr, 1).unwrap();
                assert_eq!(alone, got[t * m..(t + 1) * m], "{} n={n} row {t} depends on its batch", w.describe());
            }
        }
    }

    fn act_block(dtype: GgmlDType) -> usize {
        if dtype.block_size() == 256 {
            256
        } else {
            32
        }
    }

    /// Each block type against dequantize-then-f32, on fresh random blocks: an odd number of
    /// rows (the last row split partial) and an odd number of blocks a row.
    #[test]
    fn each_block_type_matches_its_dequantized_values() {
        let seed = rand::random::<u64>();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        eprintln!("seed {seed}");
        for dtype in TYPES {
            // An odd number of blocks a row (the last one unpaired).
            let blocks = 3;
            let (m, k) = (37, dtype.block_size() * blocks);
            let part = BlockPart::quantize("w", dtype, random(m * k, &mut rng), m, k).unwrap();
            assert_eq!(part.dtype(), dtype);
            check(&BlockWeight::new(vec![part], k), m, k, act_block(dtype), &mut rng);
        }
    }

    /// A fused weight of parts in different block types (as `Q4_K_M` files mix Q4_K and Q6_K)
    /// places each part's outputs in its rows.
    #[test]
    fn mixed_block_parts_stack_along_rows() {
        let seed = rand::random::<u64>();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        eprintln!("seed {seed}");
        let k = 512;
        let a = BlockPart::quantize("a", GgmlDType::Q4K, random(9 * k, &mut rng), 9, k).unwrap();
        let b = BlockPart::quantize("b", GgmlDType::Q6K, random(5 * k, &mut rng), 5, k).unwrap();
        check(&BlockWeight::new(vec![a, b], k), 14, k, 256, &mut rng);
    }

    /// Blocks from bytes: a width that is not whole blocks and a byte count that does not match
    /// the shape are named errors.
    #[test]
    fn malformed_blocks_are_named_errors() {
        let e = BlockPart::from_bytes("blk.0.attn_q.weight", GgmlDType::Q8_0, &[0; 34], 1, 33).err().unwrap();
        assert!(e.to_string().contains("blk.0.attn_q.weight") && e.to_string().contains("whole"), "{e}");
        let e = BlockPart::from_bytes("blk.0.attn_q.weight", GgmlDType::Q8_0, &[0; 33], 1, 32).err().unwrap();
        assert!(e.to_string().contains("33 bytes") && e.to_string().contains("34"), "{e}");
        let e = BlockPart::from_bytes("blk.0.attn_q.weight", GgmlDType::Q5_0, &[0; 22], 1, 32).err().unwrap();
        assert!(e.to_string().contains("odd number"), "{e}");
        let ok = BlockPart::from_bytes("blk.0.attn_q.weight", GgmlDType::Q8_0, &[0; 68], 2, 32).unwrap();
        assert_eq!(ok.dtype(), GgmlDType::Q8_0);
    }
}
