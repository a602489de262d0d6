//! Each kernel against candle-core's dequantize-then-f32 result, per element, on fresh random
//! blocks: odd row counts (the last thread's range and the last prefill tile partial), odd
//! numbers of blocks a row, decode and prefill batch sizes, the SIMD and the scalar kernels.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use super::*;

const KINDS: [(QKind, GgmlDType); 5] = [
    (QKind::Q8_0, GgmlDType::Q8_0),
    (QKind::Q4_0, GgmlDType::Q4_0),
    (QKind::Q4_1, GgmlDType::Q4_1),
    (QKind::Q4K, GgmlDType::Q4K),
    (QKind::Q6K, GgmlDType::Q6K),
];

fn random(len: usize, rng: &mut impl Rng) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// `m × k` random weights quantized by candle-core: the stored bytes and their dequantized values.
fn blocks(dtype: GgmlDType, m: usize, k: usize, rng: &mut impl Rng) -> (Vec<u8>, Vec<f32>) {
    let t = Tensor::from_vec(random(m * k, rng), (m, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, dtype).unwrap();
    let deq = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (q.data().unwrap().into_owned(), deq)
}

/// What quantizing the activations to 8 bits may cost one output: each block's values round to
/// within half a step (`amax / 127`) of themselves, so the dot product moves by at most half a
/// step times the block's `Σ|w|`.
fn bound(x: &[f32], w: &[f32]) -> f32 {
    x.chunks(BLOCK)
        .zip(w.chunks(BLOCK))
        .map(|(xb, wb)| {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            0.5 * amax / 127.0 * wb.iter().map(|v| v.abs()).sum::<f32>()
        })
        .sum()
}

/// `kernel`'s matmul of `kind` against the f64 dot products of the dequantized weights.
fn check(kernel: Kernels, label: &str, kind: QKind, dtype: GgmlDType, rng: &mut impl Rng) {
    // Fewer blocks a row for the 256-value types, whose blocks are 8 times as wide.
    let shapes: &[(usize, usize)] =
        if kind.block_values() == BLOCK { &[(1, 1), (37, 3), (70, 5), (33, 18)] } else { &[(1, 1), (37, 3), (19, 2)] };
    for &(m, blocks_a_row) in shapes {
        let k = blocks_a_row * kind.block_values();
        let (bytes, deq) = blocks(dtype, m, k, rng);
        for n in [1, 2, 5, 9] {
            let x = random(n * k, rng);
            // The output starts poisoned (NaN): an output the kernel skipped fails below.
            let got = matmul_with(kernel, kind, &bytes, m, k, &x, n);
            for t in 0..n {
                let xr = &x[t * k..][..k];
                for r in 0..m {
                    let wr = &deq[r * k..][..k];
                    let want = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() as f32;
                    let g = got[t * m + r];
                    let tol = bound(xr, wr) * 1.01 + 1e-5 * (1.0 + want.abs());
                    assert!(
                        (g - want).abs() <= tol,
                        "{label} {kind:?} {m}×{k} n={n} [{t},{r}]: {g} vs {want} (tol {tol})"
                    );
                }
            }
        }
    }
}

#[test]
fn each_kernel_matches_dequantize_then_f32() {
    let seed = rand::random::<u64>();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (kind, dtype) in KINDS {
        check(kernels(kind), "fastest", kind, dtype, &mut rng);
        check(scalar_kernels(kind), "scalar", kind, dtype, &mut rng);
    }
}

/// The SIMD and scalar kernels take the same integer sums, so they differ only by f32
/// rounding of the per-block sums.
#[test]
fn simd_and_scalar_kernels_agree() {
    let seed = rand::random::<u64>();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (kind, dtype) in KINDS {
        let (m, k, n) = (29, 7 * kind.block_values(), 3);
        let (bytes, _) = blocks(dtype, m, k, &mut rng);
        let x = random(n * k, &mut rng);
        let fast = matmul_with(kernels(kind), kind, &bytes, m, k, &x, n);
        let slow = matmul_with(scalar_kernels(kind), kind, &bytes, m, k, &x, n);
        for (i, (f, s)) in fast.iter().zip(&slow).enumerate() {
            assert!((f - s).abs() <= 1e-5 * (1.0 + s.abs()), "{kind:?} [{i}]: {f} vs {s}");
        }
    }
}

/// Quantized activations: every value within half a step of its block's scale, the block sum
/// consistent, and an all-zero block zero.
#[test]
fn activations_round_to_the_nearest_step() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let mut x = random(4 * BLOCK, &mut rng);
    x[2 * BLOCK..3 * BLOCK].fill(0.0);
    let acts = Acts::quantize(&x, 2 * BLOCK);
    for (b, xb) in x.chunks(BLOCK).enumerate() {
        let (d, qb) = (acts.d[b], &acts.q[b * BLOCK..][..BLOCK]);
        for (v, &q) in xb.iter().zip(qb) {
            assert!((v - d * q as f32).abs() <= d * 0.5 + 1e-7, "block {b}: {v} vs {}", d * q as f32);
        }
        let sum: i32 = qb.iter().map(|&q| q as i32).sum();
        assert_eq!(acts.s[b], d * sum as f32);
    }
    assert_eq!(acts.d[2], 0.0);
}
