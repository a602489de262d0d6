//! The k-quant kernels: Q4_K and Q6_K weight rows against activations quantized to 8-bit blocks
//! of 32 ([`super::Acts`]).
//!
//! llama.cpp quantizes activations for these types to Q8_K (one scale per 256 values) so that
//! the sub-block scales combine as integers; we keep the 32-value blocks of the other types: one
//! activation quantization serves every weight type, each 32 values round against their own
//! largest magnitude (finer than 256), and the cost is one float multiply-add per 32 values,
//! which the integer dot product of those 32 values dwarfs. Each sub-block's integer sum is
//! scaled by `d·sc` (the weight's) times the activation block's scale; Q4_K's minimum term
//! `dmin·m·Σx` uses the activation blocks' sums.

use super::{ActRow, BLOCK};

/// Bytes of a Q4_K block: f16 `d`, f16 `dmin`, 12 bytes of packed 6-bit scales and minimums,
/// 128 bytes of nibbles.
const Q4K_BYTES: usize = 144;
/// Bytes of a Q6_K block: 128 bytes of low nibbles, 64 of high bit pairs, 16 i8 scales, f16 `d`.
const Q6K_BYTES: usize = 210;

/// The 6-bit scale and minimum of Q4_K sub-block `j` from the 12 packed bytes (llama.cpp's
/// `get_scale_min_k4`): the first four in the low 6 bits of bytes 0–7, the last four split
/// between bytes 8–11 and the top bits of bytes 0–7.
fn scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// The portable kernels: the same integer sums as the AVX2 ones, one element at a time.
pub mod scalar {
    use super::super::f16_at;
    use super::*;

    /// Q4_K: sub-block `j`'s 32 values are the low (even `j`) or high (odd `j`) nibbles of
    /// bytes `32·(j/2)..` of the nibble array.
    pub unsafe fn dot_q4k(w: &[u8], a: ActRow<'_>) -> f32 {
        let (mut sum, mut mins) = (0f32, 0f32);
        for (sb, blk) in w.chunks_exact(Q4K_BYTES).enumerate() {
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            for j in 0..8 {
                let b = sb * 8 + j;
                let (sc, m) = scale_min(&blk[4..16], j);
                let shift = 4 * (j % 2);
                let qs = &blk[16 + 32 * (j / 2)..][..32];
                let qx = &a.q[b * BLOCK..][..BLOCK];
                let i: i32 = qs.iter().zip(qx).map(|(&q, &x)| ((q >> shift) & 0x0F) as i32 * x as i32).sum();
                sum += d * sc as f32 * a.d[b] * i as f32;
                mins += dmin * m as f32 * a.s[b];
            }
        }
        sum - mins
    }

    /// Q6_K: each half of 128 values is four groups of 32; group `g` takes the low (`g < 2`) or
    /// high nibbles of `ql[32·(g%2)..]` and bits `2g, 2g+1` of `qh`, minus 32, and the scales
    /// `2g` (first 16 values) and `2g + 1`.
    pub unsafe fn dot_q6k(w: &[u8], a: ActRow<'_>) -> f32 {
        let mut sum = 0f32;
        for (sb, blk) in w.chunks_exact(Q6K_BYTES).enumerate() {
            let d = f16_at(blk, 208);
            for h in 0..2 {
                let (ql, qh, sc) = (&blk[64 * h..][..64], &blk[128 + 32 * h..][..32], &blk[192 + 8 * h..][..8]);
                for g in 0..4 {
                    let b = sb * 8 + h * 4 + g;
                    let qx = &a.q[b * BLOCK..][..BLOCK];
                    let mut i = 0i32;
                    for l in 0..BLOCK {
                        let lo = (ql[l + 32 * (g % 2)] >> (4 * (g / 2))) & 0x0F;
                        let hi = (qh[l] >> (2 * g)) & 3;
                        let q = (lo | (hi << 4)) as i32 - 32;
                        i += sc[2 * g + l / 16] as i8 as i32 * q * qx[l] as i32;
                    }
                    sum += d * a.d[b] * i as f32;
                }
            }
        }
        sum
    }
}

/// The AVX2 kernels, generic over the number of tokens `T` that share each decoded weight block;
/// every token's sum is taken in the same order whatever `T` (batch invariance).
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    use super::super::avx2::{f16_at, hsum, xblock};
    use super::super::DotFn;
    use super::*;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4k<const T: usize>(w: &[u8], a: [ActRow<'_>; T]) -> [f32; T] {
        let (mut acc, mut accm) = ([_mm256_setzero_ps(); T], [_mm256_setzero_ps(); T]);
        let (ones, m4) = (_mm256_set1_epi16(1), _mm256_set1_epi8(0x0F));
        for sb in 0..a[0].d.len() / 8 {
            let blk = w.as_ptr().add(sb * Q4K_BYTES);
            let (d, dmin) = (f16_at(blk), f16_at(blk.add(2)));
            let packed = std::slice::from_raw_parts(blk.add(4), 12);
            let (mut sc, mut mn) = ([0f32; 8], [0f32; 8]);
            for j in 0..8 {
                let (s, m) = scale_min(packed, j);
                sc[j] = d * s as f32;
                mn[j] = dmin * m as f32;
            }
            let (sc, mn) = (_mm256_loadu_ps(sc.as_ptr()), _mm256_loadu_ps(mn.as_ptr()));
            let mut q = [_mm256_setzero_si256(); 8];
            for i in 0..4 {
                let bytes = load(blk.add(16 + 32 * i));
                q[2 * i] = _mm256_and_si256(bytes, m4);
                q[2 * i + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(bytes), m4);
            }
            let b0 = sb * 8;
            for t in 0..T {
                // The minimum terms of the 8 sub-blocks, one lane each.
                accm[t] = _mm256_fmadd_ps(mn, _mm256_loadu_ps(a[t].s.as_ptr().add(b0)), accm[t]);
                let mut scale = [0f32; 8];
                _mm256_storeu_ps(scale.as_mut_ptr(), _mm256_mul_ps(sc, _mm256_loadu_ps(a[t].d.as_ptr().add(b0))));
                for (j, &qj) in q.iter().enumerate() {
                    // The nibbles are unsigned: `maddubs` takes them as they are.
                    let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(qj, xblock(&a[t], b0 + j)), ones);
                    acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(scale[j]), _mm256_cvtepi32_ps(p32), acc[t]);
                }
            }
        }
        let mut out = [0f32; T];
        for t in 0..T {
            out[t] = hsum(acc[t]) - hsum(accm[t]);
        }
        out
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    /// One half of a Q6_K block (128 values) as four groups of 32 bytes, 0..=63 each (32 is
    /// zero): low nibbles of `ql0`, of `ql1`, high nibbles of `ql0`, of `ql1`, each with the next
    /// two bits of `qh` above them.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6k_groups(ql0: __m256i, ql1: __m256i, qh: __m256i) -> [__m256i; 4] {
        let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
        // Bits 0–1 of each byte moved to 4–5; 16-bit shifts, as no bit crosses into the next byte.
        let hi0 = _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m2));
        let hi1 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2));
        let hi2 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(qh), m2));
        let hi3 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(qh), m2));
        [
            _mm256_or_si256(_mm256_and_si256(ql0, m4), hi0),
            _mm256_or_si256(_mm256_and_si256(ql1, m4), hi1),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4), hi2),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4), hi3),
        ]
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6k<const T: usize>(w: &[u8], a: [ActRow<'_>; T]) -> [f32; T] {
        let mut acc = [_mm256_setzero_ps(); T];
        let k32 = _mm256_set1_epi8(32);
        for sb in 0..a[0].d.len() / 8 {
            let blk = w.as_ptr().add(sb * Q6K_BYTES);
            let d = f16_at(blk.add(208));
            for h in 0..2 {
                let (ql, qh) = (blk.add(64 * h), blk.add(128 + 32 * h));
                let q = q6k_groups(load(ql), load(ql.add(32)), load(qh));
                let sc = blk.add(192 + 8 * h) as *const i8;
                // Group g's scales as i16 lanes: 2g for its first 16 values, 2g + 1 for the rest.
                let mut scales = [_mm256_setzero_si256(); 4];
                for (g, s) in scales.iter_mut().enumerate() {
                    let (lo, hi) = (*sc.add(2 * g) as i16, *sc.add(2 * g + 1) as i16);
                    *s = _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo));
                }
                for t in 0..T {
                    for g in 0..4 {
                        let b = sb * 8 + h * 4 + g;
                        let x = xblock(&a[t], b);
                        // (q − 32)·x as `maddubs` takes unsigned q: q·x − 32·x.
                        let p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(q[g], x), _mm256_maddubs_epi16(k32, x));
                        let p32 = _mm256_madd_epi16(p16, scales[g]);
                        acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * a[t].d[b]), _mm256_cvtepi32_ps(p32), acc[t]);
                    }
                }
            }
        }
        let mut out = [0f32; T];
        for t in 0..T {
            out[t] = hsum(acc[t]);
        }
        out
    }

    /// Q4_K against one activation row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4k(w: &[u8], a: ActRow<'_>) -> f32 {
        q4k::<1>(w, [a])[0]
    }

    /// Q4_K against four activation rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_q4k(_: DotFn, w: &[u8], a: [ActRow<'_>; 4]) -> [f32; 4] {
        q4k::<4>(w, a)
    }

    /// Q6_K against one activation row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q6k(w: &[u8], a: ActRow<'_>) -> f32 {
        q6k::<1>(w, [a])[0]
    }

    /// Q6_K against four activation rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_q6k(_: DotFn, w: &[u8], a: [ActRow<'_>; 4]) -> [f32; 4] {
        q6k::<4>(w, a)
    }
}
