//! The e4m3 (`float8_e4m3fn`) format and row-wise quantization.
//!
//! e4m3 has 4 exponent bits, 3 mantissa bits, no infinities, one NaN pattern per sign and a
//! largest finite value of 448. Conversions are the `float8` crate's, which follow CUDA's
//! `cuda_fp8.hpp` (round to nearest even, saturating), so the CPU and the GPU agree bit for bit.

use float8::F8E4M3;

/// The largest finite e4m3 value.
pub const MAX: f32 = 448.0;

/// The value of e4m3 bits `b`.
#[inline]
pub fn to_f32(b: u8) -> f32 {
    F8E4M3::from_bits(b).to_f32()
}

/// `x` rounded to the nearest e4m3 value (ties to even), saturating at ±448.
#[inline]
pub fn from_f32(x: f32) -> u8 {
    F8E4M3::from_f32(x).to_bits()
}

/// The scale that maps `row`'s largest finite magnitude to 448 (1 for a row of zeros), so that
/// nothing saturates and every element keeps e4m3's 3 mantissa bits.
pub fn scale_for(row: &[f32]) -> f32 {
    activation_scale(row, None)
}

/// The per-token scale the GPU's FP8 GEMM quantizes an activation row with (kernels/gemm_fp8.cu):
/// [`scale_for`]'s, with the amax clamped to `bound` (fbgemm's `activation_scale_ub`) when given,
/// so that larger values saturate at ±448.
pub fn activation_scale(row: &[f32], bound: Option<f32>) -> f32 {
    let amax = row.iter().filter(|x| x.is_finite()).fold(0f32, |m, x| m.max(x.abs()));
    let amax = bound.map_or(amax, |b| amax.min(b));
    if amax > 0.0 {
        amax / MAX
    } else {
        1.0
    }
}

/// Appends `row / scale` in e4m3 to `out` and returns `scale`: `row[i] ≈ to_f32(out[i]) · scale`,
/// with a relative rounding error of at most 2⁻⁴ where `|row[i] / scale| ≥ 2⁻⁶` (e4m3's normal
/// range) and an absolute one of at most 2⁻¹⁰ · scale below it. NaNs stay NaN.
pub fn quantize_row_with(row: &[f32], scale: f32, out: &mut Vec<u8>) -> f32 {
    out.extend(row.iter().map(|&x| from_f32(x / scale)));
    scale
}

/// Quantizes one row with a scale of its own ([`scale_for`]), appending the bits to `out` and
/// returning the scale.
pub fn quantize_row(row: &[f32], out: &mut Vec<u8>) -> f32 {
    quantize_row_with(row, scale_for(row), out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // Hand-computed: 1.0 = 0 0111 000; 448 = 0 1111 110; the smallest subnormal 2^-9 = 0x01.
        assert_eq!(from_f32(1.0), 0x38);
        assert_eq!(from_f32(448.0), 0x7E);
        assert_eq!(from_f32(1e6), 0x7E);
        assert_eq!(from_f32(-2.0), 0xC0);
        assert_eq!(to_f32(0x01), 2f32.powi(-9));
        // 1.0625 lies halfway between 1.0 and 1.125: ties to even (1.0).
        assert_eq!(to_f32(from_f32(1.0625)), 1.0);
        assert_eq!(to_f32(from_f32(1.07)), 1.125);
        assert!(to_f32(0x7F).is_nan());
    }

    #[test]
    fn a_row_round_trips_within_its_bound() {
        let row: Vec<f32> = (0..1000).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3).collect();
        let mut q = Vec::new();
        let scale = quantize_row(&row, &mut q);
        assert_eq!(q.len(), row.len());
        assert!((scale - 0.5 / MAX).abs() < 1e-9);
        for (x, b) in row.iter().zip(&q) {
            let back = to_f32(*b) * scale;
            // Relative 2^-4 in the normal range (|x/scale| >= 2^-6), absolute 2^-10·scale below it.
            let bound = (x.abs() * 2f32.powi(-4)).max(scale * 2f32.powi(-10));
            assert!((back - x).abs() <= bound * 1.0001, "{x} -> {back}");
        }
        let mut z = Vec::new();
        assert_eq!(quantize_row(&[0.0; 4], &mut z), 1.0);
        assert_eq!(z, vec![0; 4]);
    }
}
