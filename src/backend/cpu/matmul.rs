//! `x · wᵀ` on the CPU, one kernel for every batch size and every stored weight type.
//!
//! Weights stay in the type they were stored in (f32, bf16 or f16, [`WeightElem`]): each
//! element is widened to f32 as the dot product loads it, which is exact, so a bf16 weight gives
//! bit for bit the f32 result of the same weight converted — at half the bytes read. Every output element is computed by the same canonical dot product (eight f32 lanes
//! accumulated along `k` with fused multiply-adds, then summed in a fixed order), whatever the
//! number of rows in `x` and whichever micro-kernel computes it. A sequence's logits therefore
//! do not depend on what else is in its batch — continuous batching and preemption can rely on
//! that bit for bit. Work is split across threads by weight rows, so each weight row is read
//! from memory once per call: decode streams the weights at memory bandwidth, and prefill
//! reuses each cached block of weight rows for every token.

use half::{bf16, f16};
use rayon::prelude::*;

pub use self::e4m3::{elements as e4m3_elements, exact_fp8, E4m3};

mod e4m3;

/// A stored weight element that widens to f32 exactly.
pub trait WeightElem: Copy + Send + Sync + 'static {
    /// What [`WeightElem::load8`] gives per element, as a multiple of its value (a power of two):
    /// 1 for the float types; e4m3 loads through f16 and gives its value times 2⁻⁸, which the
    /// kernels make up for with the row's scale.
    const LOAD8_FACTOR: f32 = 1.0;
    /// The element as f32 (exact).
    fn to_f32(self) -> f32;
    /// Eight elements from `p` as f32 lanes, times [`WeightElem::LOAD8_FACTOR`].
    ///
    /// # Safety
    /// `p` must be valid for eight reads, and the CPU must have AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // bf16 is the top half of an f32: widen each u16 to u32 and shift it into place.
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

impl WeightElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// Whether the AVX2 kernels can run (F16C widens f16 weights; every AVX2 CPU has it).
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// Weight rows per parallel task: 32 rows of a 4096-wide matrix are 512 KiB, within L2.
const ROWS_PER_TASK: usize = 32;

/// `out[t][r] = dot(x[t], w[r])` for `x: n × k`, `w: m × k`; returns `n × m` row-major.
pub fn matmul<E: WeightElem>(x: &[f32], n: usize, w: &[E], m: usize, k: usize) -> Vec<f32> {
    rows_matmul::<E, false>(x, n, w, &[], m, k)
}

/// [`matmul`] of a weight whose row `r` is `w[r] · scales[r]` (FP8 rows): each weight is widened
/// and multiplied by its row's scale before the dot product, so the result is bit for bit the
/// f32 kernel's on those products.
pub fn matmul_scaled<E: WeightElem>(x: &[f32], n: usize, w: &[E], scales: &[f32], m: usize, k: usize) -> Vec<f32> {
    debug_assert_eq!(scales.len(), m);
    rows_matmul::<E, true>(x, n, w, scales, m, k)
}

/// [`matmul`] (`SCALED` false: `scales` unread) and [`matmul_scaled`].
fn rows_matmul<E: WeightElem, const SCALED: bool>(
    x: &[f32],
    n: usize,
    w: &[E],
    scales: &[f32],
    m: usize,
    k: usize,
) -> Vec<f32> {
    debug_assert_eq!(x.len(), n * k);
    debug_assert_eq!(w.len(), m * k);
    let rows_of = |start: usize, len: usize| Rows::<E, SCALED> {
        w: &w[start * k..(start + len) * k],
        scales: if SCALED { &scales[start..start + len] } else { &[] },
    };
    // Poisoned, so that an output no task wrote shows as NaN (the tests compare every one).
    let mut out = vec![f32::NAN; n * m];
    if n == 1 && super::workers::enabled() {
        // Decode on the persistent workers: one even, contiguous range of rows each, written
        // in place.
        super::workers::for_each_even_chunk(&mut out, &|start, rows| {
            tile_kernel(x, 1, rows_of(start, rows.len()), rows.len(), k, rows);
        });
        return out;
    }
    if n == 1 {
        // Decode: each task's tile is a contiguous run of the output row; write it in place.
        out.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(task, tile)| {
            let start = task * ROWS_PER_TASK;
            tile_kernel(x, 1, rows_of(start, tile.len()), tile.len(), k, tile);
        });
        return out;
    }
    let tasks = m.div_ceil(ROWS_PER_TASK);
    // Each task fills an n × rows tile; tiles are scattered into `out` afterwards.
    let tiles: Vec<Vec<f32>> = (0..tasks)
        .into_par_iter()
        .map(|task| {
            let rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(m);
            let mut tile = vec![f32::NAN; n * rows.len()];
            tile_kernel(x, n, rows_of(rows.start, rows.len()), rows.len(), k, &mut tile);
            tile
        })
        .collect();
    for (task, tile) in tiles.iter().enumerate() {
        let start = task * ROWS_PER_TASK;
        let width = tile.len() / n.max(1);
        for t in 0..n {
            out[t * m + start..t * m + start + width].copy_from_slice(&tile[t * width..(t + 1) * width]);
        }
    }
    out
}

/// Consecutive weight rows, and their scales when `SCALED`.
#[derive(Clone, Copy)]
struct Rows<'a, E, const SCALED: bool> {
    w: &'a [E],
    scales: &'a [f32],
}

impl<E: WeightElem, const SCALED: bool> Rows<'_, E, SCALED> {
    /// Row `r`'s scale (1 when unscaled).
    #[inline(always)]
    fn scale(&self, r: usize) -> f32 {
        if SCALED {
            self.scales[r]
        } else {
            1.0
        }
    }
}

/// Weight element `b` of a row scaled by `s`, as the kernels use it.
#[inline(always)]
fn weight<E: WeightElem, const SCALED: bool>(b: E, s: f32) -> f32 {
    if SCALED {
        b.to_f32() * s
    } else {
        b.to_f32()
    }
}

fn tile_kernel<E: WeightElem, const S: bool>(
    x: &[f32],
    n: usize,
    w: Rows<'_, E, S>,
    rows: usize,
    k: usize,
    tile: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2, FMA and F16C, checked just above.
        unsafe { avx2::tile(x, n, w, rows, k, tile) };
        return;
    }
    for t in 0..n {
        for r in 0..rows {
            tile[t * rows + r] = scalar_dot::<E, S>(&x[t * k..(t + 1) * k], &w.w[r * k..(r + 1) * k], w.scale(r));
        }
    }
}

/// The canonical dot product: eight lanes along `k`, a fixed-order lane sum, then the tail.
pub fn dot<E: WeightElem>(a: &[f32], b: &[E]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2, FMA and F16C, checked just above.
        return unsafe { avx2::dot::<E, false>(a, b, 1.0) };
    }
    scalar_dot::<E, false>(a, b, 1.0)
}

/// [`dot`] without SIMD, of `b` scaled by `s` when `SCALED`.
fn scalar_dot<E: WeightElem, const SCALED: bool>(a: &[f32], b: &[E], s: f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] = a[c * 8 + l].mul_add(weight::<E, SCALED>(b[c * 8 + l], s), acc[l]);
        }
    }
    let mut sum = lane_sum(&acc);
    for i in chunks * 8..a.len() {
        sum += a[i] * weight::<E, SCALED>(b[i], s);
    }
    sum
}

fn lane_sum(l: &[f32; 8]) -> f32 {
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{lane_sum, weight, Rows, WeightElem};

    /// The lanes that turn [`WeightElem::load8`]'s values into the row's weights: the row's
    /// scale over the load's factor (a power of two, so exact). Unscaled f32/bf16/f16 rows need
    /// no multiplication at all.
    #[inline(always)]
    fn needs_scale<E: WeightElem, const S: bool>() -> bool {
        S || E::LOAD8_FACTOR != 1.0
    }

    /// Eight weights of a row from `p`, `lanes` being the row's [`needs_scale`] factor.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load<E: WeightElem, const S: bool>(p: *const E, lanes: __m256) -> __m256 {
        let v = E::load8(p);
        if needs_scale::<E, S>() {
            _mm256_mul_ps(v, lanes)
        } else {
            v
        }
    }

    /// The factor lanes of a row scaled by `s`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn lanes<E: WeightElem>(s: f32) -> __m256 {
        _mm256_set1_ps(s / E::LOAD8_FACTOR)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn finish<E: WeightElem, const S: bool>(acc: __m256, a: &[f32], b: &[E], from: usize, s: f32) -> f32 {
        let mut l = [0f32; 8];
        _mm256_storeu_ps(l.as_mut_ptr(), acc);
        let mut sum = lane_sum(&l);
        for i in from..a.len() {
            sum += a[i] * weight::<E, S>(b[i], s);
        }
        sum
    }

    /// The canonical dot product with 8-lane FMAs, of `b` scaled by `s` when `S`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot<E: WeightElem, const S: bool>(a: &[f32], b: &[E], s: f32) -> f32 {
        let k8 = a.len() / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        let (pa, pb, sv) = (a.as_ptr(), b.as_ptr(), lanes::<E>(s));
        let mut i = 0;
        while i < k8 {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), load::<E, S>(pb.add(i), sv), acc);
            i += 8;
        }
        finish::<E, S>(acc, a, b, k8, s)
    }

    /// Two x rows against four w rows at a time: eight independent accumulators keep both FMA
    /// ports busy, and each output's arithmetic is exactly [`dot`]'s.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile<E: WeightElem, const S: bool>(
        x: &[f32],
        n: usize,
        rows_in: Rows<'_, E, S>,
        rows: usize,
        k: usize,
        tile: &mut [f32],
    ) {
        let (w, k8) = (rows_in.w, k / 8 * 8);
        let mut r = 0;
        while r + 4 <= rows {
            let wr = [&w[r * k..][..k], &w[(r + 1) * k..][..k], &w[(r + 2) * k..][..k], &w[(r + 3) * k..][..k]];
            let s = [rows_in.scale(r), rows_in.scale(r + 1), rows_in.scale(r + 2), rows_in.scale(r + 3)];
            let sv = [lanes::<E>(s[0]), lanes::<E>(s[1]), lanes::<E>(s[2]), lanes::<E>(s[3])];
            let mut t = 0;
            while t + 2 <= n {
                let xa = &x[t * k..][..k];
                let xb = &x[(t + 1) * k..][..k];
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut i = 0;
                while i < k8 {
                    let va = _mm256_loadu_ps(xa.as_ptr().add(i));
                    let vb = _mm256_loadu_ps(xb.as_ptr().add(i));
                    for j in 0..4 {
                        let vw = load::<E, S>(wr[j].as_ptr().add(i), sv[j]);
                        acc[j] = _mm256_fmadd_ps(va, vw, acc[j]);
                        acc[4 + j] = _mm256_fmadd_ps(vb, vw, acc[4 + j]);
                    }
                    i += 8;
                }
                for j in 0..4 {
                    tile[t * rows + r + j] = finish::<E, S>(acc[j], xa, wr[j], k8, s[j]);
                    tile[(t + 1) * rows + r + j] = finish::<E, S>(acc[4 + j], xb, wr[j], k8, s[j]);
                }
                t += 2;
            }
            if t < n {
                let xa = &x[t * k..][..k];
                let mut acc = [_mm256_setzero_ps(); 4];
                let mut i = 0;
                while i < k8 {
                    let va = _mm256_loadu_ps(xa.as_ptr().add(i));
                    for j in 0..4 {
                        acc[j] = _mm256_fmadd_ps(va, load::<E, S>(wr[j].as_ptr().add(i), sv[j]), acc[j]);
                    }
                    i += 8;
                }
                for j in 0..4 {
                    tile[t * rows + r + j] = finish::<E, S>(acc[j], xa, wr[j], k8, s[j]);
                }
            }
            r += 4;
        }
        for r in r..rows {
            for t in 0..n {
                tile[t * rows + r] = dot::<E, S>(&x[t * k..][..k], &w[r * k..][..k], rows_in.scale(r));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], n: usize, w: &[f32], m: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; n * m];
        for t in 0..n {
            for r in 0..m {
                out[t * m + r] = (0..k).map(|i| x[t * k + i] as f64 * w[r * k + i] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
    }

    #[test]
    fn matches_f64_reference_on_odd_shapes() {
        for (n, m, k) in [(1, 1, 1), (1, 37, 13), (3, 70, 64), (5, 33, 100), (17, 129, 71)] {
            let (x, w) = (data(n * k, 1), data(m * k, 2));
            let got = matmul(&x, n, &w, m, k);
            let want = naive(&x, n, &w, m, k);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()), "{n}×{m}×{k}: {g} vs {e}");
            }
        }
    }

    #[test]
    fn each_row_is_bitwise_independent_of_the_batch() {
        let (m, k) = (45, 77);
        let w = data(m * k, 3);
        let x = data(9 * k, 4);
        let batched = matmul(&x, 9, &w, m, k);
        for t in 0..9 {
            let alone = matmul(&x[t * k..(t + 1) * k], 1, &w, m, k);
            assert_eq!(alone, batched[t * m..(t + 1) * m], "row {t}");
        }
    }

    /// Weights rounded to `E` and widened back: what a weight stored as `E` holds.
    fn stored<E: WeightElem>(w: &[f32], to: impl Fn(f32) -> E) -> (Vec<E>, Vec<f32>) {
        let e: Vec<E> = w.iter().map(|&v| to(v)).collect();
        let f = e.iter().map(|v| v.to_f32()).collect();
        (e, f)
    }

    /// A bf16 or f16 weight gives bit for bit the f32 kernel's result on the same values
    /// widened (odd widths exercise the scalar tail, odd row counts the last partial tile), and
    /// each row stays independent of its batch.
    fn half_matches_f32<E: WeightElem + PartialEq + std::fmt::Debug>(to: impl Fn(f32) -> E + Copy) {
        for (n, m, k) in [(1, 1, 1), (1, 37, 13), (2, 70, 64), (5, 33, 100), (17, 129, 71)] {
            let x = data(n * k, 5);
            let (w, wf) = stored(&data(m * k, 6), to);
            let got = matmul(&x, n, &w, m, k);
            assert_eq!(got, matmul(&x, n, &wf, m, k), "{n}×{m}×{k}");
            for t in 0..n {
                let alone = matmul(&x[t * k..(t + 1) * k], 1, &w, m, k);
                assert_eq!(alone, got[t * m..(t + 1) * m], "{n}×{m}×{k} row {t}");
            }
        }
    }

    #[test]
    fn bf16_weights_give_the_f32_result_of_their_values() {
        half_matches_f32(bf16::from_f32);
    }

    #[test]
    fn f16_weights_give_the_f32_result_of_their_values() {
        half_matches_f32(f16::from_f32);
    }
}
