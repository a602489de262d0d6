//! FP8 (e4m3) weight elements for the canonical dot product: one byte an element, widened to
//! f32 as the kernel loads it, each row's f32 scale applied to the widened values.
//!
//! The AVX2 load goes through f16 rather than a 256-entry table (a gather costs more than the
//! whole conversion): e4m3's sign, exponent and mantissa bits moved into an f16's place make an
//! f16 of the value times 2⁻⁸ (f16's exponent bias is 15, e4m3's 7), subnormals included, and
//! F16C widens eight of them at once. The 2⁸ is folded into the row's scale
//! ([`WeightElem::LOAD8_FACTOR`]); both multiplications by powers of two are exact, so each
//! widened, scaled weight is bit for bit `e4m3::to_f32(b) · scale` — what
//! [`crate::weights::fp8::Fp8Rows::dequantize`] gives — and an FP8 weight's result equals the f32
//! kernel's on its dequantized values. e4m3's NaN (magnitude 0x7F) has no place in this trick:
//! [`exact_fp8`] says which weights may use it.

use super::WeightElem;
use crate::quant::e4m3;

/// e4m3 (`float8_e4m3fn`) bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct E4m3(pub u8);

/// The value of every e4m3 byte (the scalar kernel's widening).
fn table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|b| e4m3::to_f32(b as u8)))
}

impl WeightElem for E4m3 {
    const LOAD8_FACTOR: f32 = 1.0 / 256.0;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        table()[self.0 as usize]
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const E4m3) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // 8 × u16 `0000_0000_seee_emmm` → `s0ee_eemm_m000_0000`: shifting left 8 and back 1
        // (arithmetically) puts the sign at bit 15 and copies it to bit 14, which is cleared.
        let b = _mm_cvtepu8_epi16(_mm_loadl_epi64(p as *const __m128i));
        let h = _mm_and_si128(_mm_srai_epi16::<1>(_mm_slli_epi16::<8>(b)), _mm_set1_epi16(0xBFFF_u16 as i16));
        _mm256_cvtph_ps(h)
    }
}

/// Whether rows of `bytes` with `scales` can use the kernel: no e4m3 NaN, and every scale
/// divided by [`WeightElem::LOAD8_FACTOR`] exactly (a normal or zero scale whose 2⁸ multiple is
/// finite). Any real checkpoint passes; a weight that does not is kept dequantized.
pub fn exact_fp8(bytes: &[u8], scales: &[f32]) -> bool {
    let nan = bytes.iter().any(|&b| b & 0x7F == 0x7F);
    let scales_ok = scales.iter().all(|&s| (s == 0.0 || s.is_normal()) && (s / E4m3::LOAD8_FACTOR).is_finite());
    !nan && scales_ok
}

/// `bytes` as e4m3 elements, in place (no copy: the same size and alignment).
pub fn elements(bytes: Vec<u8>) -> Vec<E4m3> {
    bytes.into_iter().map(E4m3).collect()
}

#[cfg(test)]
mod tests {
    use super::super::{matmul, matmul_scaled};
    use super::*;
    use crate::weights::fp8::Fp8Rows;

    /// Fresh pseudo-random values in [-1, 1) (xorshift; `seed` picks the stream).
    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Random rows quantized per row as a checkpoint's would be, with some rows spanning the
    /// subnormals (tiny values) and a zero row.
    fn fp8_rows(m: usize, k: usize, seed: u64) -> Fp8Rows {
        let mut bytes = Vec::with_capacity(m * k);
        let mut scales = Vec::with_capacity(m);
        let values = data(m * k, seed);
        for (r, row) in values.chunks(k).enumerate() {
            // Row 1 holds values 1e4 times apart, so that many round to e4m3 subnormals.
            let row: Vec<f32> =
                row.iter().enumerate().map(|(c, v)| if r == 1 && c % 2 == 0 { v * 1e-4 } else { *v }).collect();
            let row = if r == 2 { vec![0.0; k] } else { row };
            scales.push(e4m3::quantize_row(&row, &mut bytes));
        }
        Fp8Rows { bytes, scales, rows: m, cols: k, activation_bound: None }
    }

    #[test]
    fn every_byte_widens_to_its_value() {
        for b in 0..=255u8 {
            let want = e4m3::to_f32(b);
            assert!(want.is_nan() == (b & 0x7F == 0x7F), "byte {b:#04x}");
            if !want.is_nan() {
                assert_eq!(E4m3(b).to_f32().to_bits(), want.to_bits(), "byte {b:#04x}");
            }
        }
        #[cfg(target_arch = "x86_64")]
        if super::super::has_avx2() {
            let bytes: Vec<E4m3> = (0..=255u8).map(E4m3).collect();
            for (i, chunk) in bytes.chunks(8).enumerate() {
                let mut lanes = [0f32; 8];
                // SAFETY: AVX2 is present (checked above); the chunk has eight elements.
                unsafe { std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), E4m3::load8(chunk.as_ptr())) };
                for (j, v) in lanes.iter().enumerate() {
                    let b = (i * 8 + j) as u8;
                    if b & 0x7F != 0x7F {
                        let want = e4m3::to_f32(b) * E4m3::LOAD8_FACTOR;
                        assert_eq!(v.to_bits(), want.to_bits(), "byte {b:#04x}: {v} vs {want}");
                    }
                }
            }
        }
    }

    /// Every output of an FP8 weight is bit for bit the f32 kernel's on the dequantized weight
    /// (odd widths exercise the scalar tail, odd row counts the last partial row split, n = 1 the
    /// decode split), and each token's row is the same alone as in its batch.
    #[test]
    fn fp8_weights_give_the_f32_result_of_their_dequantized_values() {
        for (n, m, k) in [(1, 1, 8), (1, 37, 13), (2, 70, 64), (5, 33, 100), (17, 129, 71), (1, 259, 200)] {
            let w = fp8_rows(m, k, (n * m * k) as u64);
            assert!(exact_fp8(&w.bytes, &w.scales));
            let x = data(n * k, 7 + k as u64);
            let got = matmul_scaled(&x, n, &elements(w.bytes.clone()), &w.scales, m, k);
            let want = matmul(&x, n, &w.dequantize(), m, k);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), e.to_bits(), "{n}×{m}×{k} output {i}: {g} vs {e}");
            }
            for t in 0..n {
                let alone = matmul_scaled(&x[t * k..][..k], 1, &elements(w.bytes.clone()), &w.scales, m, k);
                assert_eq!(alone, got[t * m..][..m], "{n}×{m}×{k} row {t}");
            }
        }
    }

    /// The portable kernel (CPUs without AVX2) widens and scales alike.
    #[test]
    fn the_scalar_dot_product_gives_the_f32_result_too() {
        let (m, k) = (9, 77);
        let w = fp8_rows(m, k, 3);
        let (values, dequantized, x) = (elements(w.bytes.clone()), w.dequantize(), data(k, 4));
        for r in 0..m {
            let got = super::super::scalar_dot::<E4m3, true>(&x, &values[r * k..][..k], w.scales[r]);
            let want = super::super::scalar_dot::<f32, false>(&x, &dequantized[r * k..][..k], 1.0);
            assert_eq!(got.to_bits(), want.to_bits(), "row {r}: {got} vs {want}");
        }
    }

    #[test]
    fn nan_bytes_and_unrepresentable_scales_keep_the_weight_dequantized() {
        assert!(exact_fp8(&[0x00, 0x7E, 0xFE], &[1.0, 0.0]));
        assert!(!exact_fp8(&[0x00, 0x7F], &[1.0]));
        assert!(!exact_fp8(&[0xFF], &[1.0]));
        assert!(!exact_fp8(&[0x01], &[f32::MAX]));
        assert!(!exact_fp8(&[0x01], &[f32::MIN_POSITIVE / 2.0]));
    }
}
