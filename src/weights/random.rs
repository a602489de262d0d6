//! Deterministic pseudo-random weights, generated where they are used (benchmarks without files).
//!
//! Element `i` (row-major, over the whole tensor) of a tensor with seed `s` is
//! `offset + scale · u(s, i)`, with `u` uniform in `[-1, 1)` from a splitmix64 hash of the pair,
//! rounded to bf16. Because the value depends only on the tensor and the element's place in it,
//! a tensor-parallel rank generating its slice gets exactly the elements the whole tensor has
//! there, and the CPU backend and `kernels/random.cu` generate the same model: a random-weight
//! model is sharded, and compared across backends, like a checkpoint.

use std::ops::Range;

use crate::error::{Error, Result};

/// One rank's part of one pseudo-random tensor (1-D tensors are one row), optionally followed
/// by zero rows, like [`super::TensorSlice`].
#[derive(Debug, Clone, PartialEq)]
pub struct RandomSlice {
    /// The tensor's seed (the model's seed mixed with the tensor's name).
    pub seed: u64,
    /// Columns of the whole tensor (the row stride of element indices).
    pub total_cols: usize,
    /// Rows taken.
    pub rows: Range<usize>,
    /// Columns taken.
    pub cols: Range<usize>,
    /// Zero rows appended.
    pub pad_rows: usize,
    /// Half-width of the uniform distribution.
    pub scale: f32,
    /// Its centre.
    pub offset: f32,
}

impl RandomSlice {
    /// The slice for tensor `name` of the model seeded `model_seed`, with `shape` as stored in a
    /// checkpoint: norms are `1 ± 0.1`, the embedding `±1`, linear weights `±√(3 / in_features)`
    /// (unit variance in, unit variance out, so activations stay in range through any depth).
    pub fn for_tensor(model_seed: u64, name: &str, shape: &[usize], rows: Range<usize>, cols: Range<usize>) -> Self {
        let total_cols = shape.last().copied().unwrap_or(1);
        let (scale, offset) = if shape.len() == 1 {
            (0.1, 1.0)
        } else if name.contains("embed_tokens") {
            (1.0, 0.0)
        } else {
            ((3.0 / total_cols.max(1) as f32).sqrt(), 0.0)
        };
        RandomSlice { seed: model_seed ^ name_hash(name), total_cols, rows, cols, pad_rows: 0, scale, offset }
    }

    /// Rows (padding included) and columns of the slice.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows.len() + self.pad_rows, self.cols.len())
    }

    /// The value at row `r`, column `c` of the whole tensor (f32 of the bf16 it is stored as).
    pub fn value(&self, r: usize, c: usize) -> f32 {
        let v = self.offset + self.scale * uniform(self.seed, (r * self.total_cols + c) as u64);
        half::bf16::from_f32(v).to_f32()
    }

    /// Appends the slice's values, padding included, to `out`.
    pub fn extend_f32(&self, out: &mut Vec<f32>) {
        for r in self.rows.clone() {
            out.extend(self.cols.clone().map(|c| self.value(r, c)));
        }
        out.resize(out.len() + self.pad_rows * self.cols.len(), 0.0);
    }
}

/// Rows (padding included) and columns of `parts` concatenated along rows (one fused weight),
/// checking that there is at least one and that all are equally wide.
pub fn fused_shape(parts: &[RandomSlice]) -> Result<(usize, usize)> {
    let cols = parts.first().map_or(0, |p| p.shape().1);
    if parts.is_empty() || parts.iter().any(|p| p.shape().1 != cols) {
        return Err(Error::Backend("random_weight: parts must be non-empty and equally wide".into()));
    }
    Ok((parts.iter().map(|p| p.shape().0).sum(), cols))
}

/// Uniform in `[-1, 1)` from the 24 high bits of splitmix64's finaliser over `seed + index · φ`.
/// `kernels/random.cu` computes the same function.
pub fn uniform(seed: u64, index: u64) -> f32 {
    let mut z = seed.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 * (2.0 / 16_777_216.0) - 1.0
}

/// FNV-1a of a tensor name: different tensors of one model get unrelated values.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_covers_its_range_evenly() {
        let n = 100_000;
        let xs: Vec<f32> = (0..n).map(|i| uniform(42, i)).collect();
        assert!(xs.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f32>() / n as f32;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n as f32;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0 / 3.0).abs() < 0.01, "variance {var}");
        assert_ne!(uniform(1, 7), uniform(2, 7));
    }

    #[test]
    fn a_slice_holds_the_whole_tensors_elements() {
        let shape = [6, 10];
        let whole = RandomSlice::for_tensor(9, "model.layers.0.mlp.down_proj.weight", &shape, 0..6, 0..10);
        let part = RandomSlice::for_tensor(9, "model.layers.0.mlp.down_proj.weight", &shape, 2..5, 4..7);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        whole.extend_f32(&mut a);
        part.extend_f32(&mut b);
        let expect: Vec<f32> = (2..5).flat_map(|r| (4..7).map(move |c| (r, c))).map(|(r, c)| a[r * 10 + c]).collect();
        assert_eq!(b, expect);
        let bound = (3.0f32 / 10.0).sqrt() * 1.01;
        assert!(a.iter().all(|x| x.abs() <= bound));
        let norm = RandomSlice::for_tensor(9, "model.norm.weight", &[10], 0..1, 0..10);
        let mut n = Vec::new();
        norm.extend_f32(&mut n);
        assert!(n.iter().all(|x| (0.89..=1.11).contains(x)), "{n:?}");
    }
}
