//! Our own `x · wᵀ` for the GGML block types whose candle-core path is slow on this backend:
//! Q8_0, Q4_0, Q4_1, and the k-quants Q4_K and Q6_K (`kquants.rs`; docs/performance.md, "CPU
//! weights", says by how much and why).
//!
//! As llama.cpp does: each activation row is quantized once per matmul to 8-bit blocks of 32
//! ([`Acts`]: one scale per block, and the block's sum for Q4_1's offset term), then every
//! output is a sum over blocks of an integer dot product (AVX2 `maddubs`/`madd`, chosen at run
//! time, with a scalar fallback) scaled by the two blocks' scales. Decode splits the weight rows
//! evenly over the threads (one contiguous range each, so each thread streams its share of the
//! weight once); prefill hands out small tiles of rows, each applied to every token while it is
//! in cache. Each output is computed by the same dot product whatever the batch, so a row's
//! result does not depend on what else is in its batch.

use rayon::prelude::*;

/// A block type with a kernel of our own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QKind {
    /// 32 × int8 and an f16 scale: `w = d·q`.
    Q8_0,
    /// 32 × 4 bits and an f16 scale: `w = d·(q − 8)`.
    Q4_0,
    /// 32 × 4 bits, an f16 scale and an f16 minimum: `w = d·q + m`.
    Q4_1,
    /// 256 × 4 bits in 8 sub-blocks of 32, each with a 6-bit scale and minimum under two f16
    /// super-scales: `w = d·sc·q − dmin·m`.
    Q4K,
    /// 256 × 6 bits in 16 sub-blocks of 16, each with an 8-bit scale under an f16 super-scale:
    /// `w = d·sc·(q − 32)`.
    Q6K,
}

/// Values per block of the quantized activations, and of the 32-value weight types.
pub const BLOCK: usize = 32;

impl QKind {
    /// Bytes one block takes as stored.
    pub fn block_bytes(self) -> usize {
        match self {
            QKind::Q8_0 => 34,
            QKind::Q4_0 => 18,
            QKind::Q4_1 => 20,
            QKind::Q4K => 144,
            QKind::Q6K => 210,
        }
    }

    /// Values one block holds.
    pub fn block_values(self) -> usize {
        match self {
            QKind::Q4K | QKind::Q6K => 256,
            _ => BLOCK,
        }
    }
}

/// Activation rows quantized to 8-bit blocks of 32: `x ≈ d·q` per block, and `s = d·Σq`.
pub struct Acts {
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    k: usize,
}

impl Acts {
    /// `x` (`n × k`, `k` a multiple of [`BLOCK`]) quantized row by row, block by block: the
    /// block's largest magnitude maps to 127, each value rounds to the nearest step.
    pub fn quantize(x: &[f32], k: usize) -> Self {
        debug_assert!(k.is_multiple_of(BLOCK) && x.len().is_multiple_of(k.max(1)));
        let blocks = x.len() / BLOCK;
        let mut acts = Acts { q: vec![0; x.len()], d: Vec::with_capacity(blocks), s: Vec::with_capacity(blocks), k };
        for (xb, qb) in x.chunks_exact(BLOCK).zip(acts.q.chunks_exact_mut(BLOCK)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in qb.iter_mut().zip(xb) {
                *q = (v * id).round().clamp(-127.0, 127.0) as i8;
                sum += *q as i32;
            }
            acts.d.push(d);
            acts.s.push(d * sum as f32);
        }
        acts
    }

    /// Row `t`: its quantized values, block scales and block sums.
    fn row(&self, t: usize) -> ActRow<'_> {
        let nb = self.k / BLOCK;
        ActRow { q: &self.q[t * self.k..][..self.k], d: &self.d[t * nb..][..nb], s: &self.s[t * nb..][..nb] }
    }
}

/// One quantized activation row.
#[derive(Clone, Copy)]
struct ActRow<'a> {
    q: &'a [i8],
    d: &'a [f32],
    s: &'a [f32],
}

/// Weight rows per prefill task: 16 rows of 4096 Q8_0 values are 70 KiB, within L2.
const ROWS_PER_TASK: usize = 16;

/// `out[t][r] = Σ_c x[t][c]·w[r][c]` for `x: n × k` and `w`: `m` rows of `k / 32` blocks of
/// `kind` as stored (`bytes`); returns `n × m` row-major.
pub fn matmul(kind: QKind, bytes: &[u8], m: usize, k: usize, x: &[f32], n: usize) -> Vec<f32> {
    matmul_with(kernels(kind), kind, bytes, m, k, x, n)
}

/// [`matmul`] with the kernels `ks` (the tests run the scalar ones too).
fn matmul_with(ks: Kernels, kind: QKind, bytes: &[u8], m: usize, k: usize, x: &[f32], n: usize) -> Vec<f32> {
    let Kernels { one: dot, four: dot4 } = ks;
    debug_assert!(k.is_multiple_of(kind.block_values()));
    let row_bytes = k / kind.block_values() * kind.block_bytes();
    debug_assert_eq!(bytes.len(), m * row_bytes);
    debug_assert_eq!(x.len(), n * k);
    let acts = Acts::quantize(x, k);
    let wrow = |r: usize| &bytes[r * row_bytes..][..row_bytes];
    // Poisoned, so that an output no task wrote shows as NaN (the tests compare every one).
    let mut out = vec![f32::NAN; n * m];
    if n == 1 {
        // Decode: one even, contiguous range of rows per thread (the persistent workers').
        let a = acts.row(0);
        super::workers::for_each_even_chunk(&mut out, &|start, o| {
            for (j, y) in o.iter_mut().enumerate() {
                // SAFETY: `kernels` picked kernels the CPU supports; the row is whole blocks.
                *y = unsafe { dot(wrow(start + j), a) };
            }
        });
        return out;
    }
    let tasks = m.div_ceil(ROWS_PER_TASK);
    let tiles: Vec<Vec<f32>> = (0..tasks)
        .into_par_iter()
        .map(|task| {
            let rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(m);
            let width = rows.len();
            let mut tile = vec![f32::NAN; n * width];
            // Four tokens at a time share each weight block's load and decoding.
            let mut t = 0;
            while t + 4 <= n {
                let a = [acts.row(t), acts.row(t + 1), acts.row(t + 2), acts.row(t + 3)];
                for (j, r) in rows.clone().enumerate() {
                    // SAFETY: as above; `dot4` is `dot`'s four-token form.
                    let y = unsafe { dot4(dot, wrow(r), a) };
                    for (i, v) in y.into_iter().enumerate() {
                        tile[(t + i) * width + j] = v;
                    }
                }
                t += 4;
            }
            for t in t..n {
                let a = acts.row(t);
                for (j, r) in rows.clone().enumerate() {
                    // SAFETY: as above.
                    tile[t * width + j] = unsafe { dot(wrow(r), a) };
                }
            }
            tile
        })
        .collect();
    for (task, tile) in tiles.iter().enumerate() {
        let start = task * ROWS_PER_TASK;
        let width = tile.len() / n;
        for t in 0..n {
            out[t * m + start..][..width].copy_from_slice(&tile[t * width..][..width]);
        }
    }
    out
}

/// A dot product of one weight row (as stored) with one quantized activation row.
type DotFn = unsafe fn(&[u8], ActRow<'_>) -> f32;

/// A block type's kernels: one dot product, and four (one weight row, four tokens).
#[derive(Clone, Copy)]
struct Kernels {
    one: DotFn,
    four: Dot4Fn,
}

/// Four dot products of one weight row with four activation rows, each computed exactly as the
/// single one is (so a token's result does not depend on its neighbours); the first argument is
/// the single kernel, which the portable version calls four times.
type Dot4Fn = unsafe fn(DotFn, &[u8], [ActRow<'_>; 4]) -> [f32; 4];

/// The fastest kernels this CPU runs for `kind` (`TULU_QDOT_SCALAR=1` forces the scalar ones).
fn kernels(kind: QKind) -> Kernels {
    #[cfg(target_arch = "x86_64")]
    if avx2_available() {
        let (one, four): (DotFn, Dot4Fn) = match kind {
            QKind::Q8_0 => (avx2::dot_q8_0, avx2::dot4_q8_0),
            QKind::Q4_0 => (avx2::dot_q4_0, avx2::dot4_q4_0),
            QKind::Q4_1 => (avx2::dot_q4_1, avx2::dot4_q4_1),
            QKind::Q4K => (kquants::avx2::dot_q4k, kquants::avx2::dot4_q4k),
            QKind::Q6K => (kquants::avx2::dot_q6k, kquants::avx2::dot4_q6k),
        };
        return Kernels { one, four };
    }
    scalar_kernels(kind)
}

/// The portable kernels.
fn scalar_kernels(kind: QKind) -> Kernels {
    let one: DotFn = match kind {
        QKind::Q8_0 => scalar::dot_q8_0,
        QKind::Q4_0 => scalar::dot_q4_0,
        QKind::Q4_1 => scalar::dot_q4_1,
        QKind::Q4K => kquants::scalar::dot_q4k,
        QKind::Q6K => kquants::scalar::dot_q6k,
    };
    Kernels { one, four: each_of_four }
}

unsafe fn each_of_four(dot: DotFn, w: &[u8], a: [ActRow<'_>; 4]) -> [f32; 4] {
    [dot(w, a[0]), dot(w, a[1]), dot(w, a[2]), dot(w, a[3])]
}

#[cfg(target_arch = "x86_64")]
fn avx2_available() -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(|| {
        let forced_scalar = std::env::var("TULU_QDOT_SCALAR").is_ok_and(|v| v == "1");
        !forced_scalar
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    })
}

/// The f16 at `b[at..at + 2]` (little-endian) as f32.
#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// The portable kernels: the same sums as the AVX2 ones, one element at a time.
mod scalar {
    use super::{f16_at, ActRow, BLOCK};

    pub unsafe fn dot_q8_0(w: &[u8], a: ActRow<'_>) -> f32 {
        let mut sum = 0f32;
        for (b, blk) in w.chunks_exact(34).enumerate() {
            let qx = &a.q[b * BLOCK..][..BLOCK];
            let i: i32 = blk[2..].iter().zip(qx).map(|(&q, &x)| q as i8 as i32 * x as i32).sum();
            sum += f16_at(blk, 0) * a.d[b] * i as f32;
        }
        sum
    }

    /// The packed nibbles of a 4-bit block: byte `j` holds value `j` low and `j + 16` high.
    fn nibble_dot(qs: &[u8], qx: &[i8], offset: i32) -> i32 {
        let mut i = 0;
        for (j, &byte) in qs.iter().enumerate() {
            i += ((byte & 0x0F) as i32 - offset) * qx[j] as i32;
            i += ((byte >> 4) as i32 - offset) * qx[j + BLOCK / 2] as i32;
        }
        i
    }

    pub unsafe fn dot_q4_0(w: &[u8], a: ActRow<'_>) -> f32 {
        let mut sum = 0f32;
        for (b, blk) in w.chunks_exact(18).enumerate() {
            let i = nibble_dot(&blk[2..], &a.q[b * BLOCK..][..BLOCK], 8);
            sum += f16_at(blk, 0) * a.d[b] * i as f32;
        }
        sum
    }

    pub unsafe fn dot_q4_1(w: &[u8], a: ActRow<'_>) -> f32 {
        let (mut sum, mut offsets) = (0f32, 0f32);
        for (b, blk) in w.chunks_exact(20).enumerate() {
            let i = nibble_dot(&blk[4..], &a.q[b * BLOCK..][..BLOCK], 0);
            sum += f16_at(blk, 0) * a.d[b] * i as f32;
            offsets += f16_at(blk, 2) * a.s[b];
        }
        sum + offsets
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{ActRow, BLOCK};

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
        let bits = u16::from_le_bytes([*p, *p.add(1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// The eight lanes summed in a fixed order.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// Σ w·x over 32 signed bytes each, as eight i32 lanes turned f32: `maddubs` takes an
    /// unsigned left side, so the signs move onto x (|w|·(x·sign w) = w·x).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_i8(w: __m256i, x: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    /// The 32 nibbles of a 4-bit block as bytes 0..=15, in value order (low nibbles first).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let packed = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8_0(w: &[u8], a: ActRow<'_>) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for b in 0..a.d.len() {
            let blk = w.as_ptr().add(b * 34);
            let qw = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            let qx = _mm256_loadu_si256(a.q.as_ptr().add(b * BLOCK) as *const __m256i);
            let scale = _mm256_set1_ps(f16_at(blk) * a.d[b]);
            acc = _mm256_fmadd_ps(scale, dot_i8(qw, qx), acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_0(w: &[u8], a: ActRow<'_>) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for b in 0..a.d.len() {
            let blk = w.as_ptr().add(b * 18);
            let qw = _mm256_sub_epi8(nibbles(blk.add(2)), _mm256_set1_epi8(8));
            let qx = _mm256_loadu_si256(a.q.as_ptr().add(b * BLOCK) as *const __m256i);
            let scale = _mm256_set1_ps(f16_at(blk) * a.d[b]);
            acc = _mm256_fmadd_ps(scale, dot_i8(qw, qx), acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1(w: &[u8], a: ActRow<'_>) -> f32 {
        let (mut acc, mut offsets) = (_mm256_setzero_ps(), 0f32);
        let ones = _mm256_set1_epi16(1);
        for b in 0..a.d.len() {
            let blk = w.as_ptr().add(b * 20);
            let qx = _mm256_loadu_si256(a.q.as_ptr().add(b * BLOCK) as *const __m256i);
            // The nibbles are unsigned: `maddubs` takes them as they are.
            let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles(blk.add(4)), qx), ones);
            let scale = _mm256_set1_ps(f16_at(blk) * a.d[b]);
            acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p32), acc);
            offsets += f16_at(blk.add(2)) * a.s[b];
        }
        hsum(acc) + offsets
    }

    /// The x block of token `t` at block `b`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn xblock(a: &ActRow<'_>, b: usize) -> __m256i {
        _mm256_loadu_si256(a.q.as_ptr().add(b * BLOCK) as *const __m256i)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum4(acc: [__m256; 4]) -> [f32; 4] {
        [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
    }

    /// [`dot_q8_0`] for four tokens.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_q8_0(_: super::DotFn, w: &[u8], a: [ActRow<'_>; 4]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..a[0].d.len() {
            let blk = w.as_ptr().add(b * 34);
            let qw = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            let dw = f16_at(blk);
            for t in 0..4 {
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[t].d[b]), dot_i8(qw, xblock(&a[t], b)), acc[t]);
            }
        }
        hsum4(acc)
    }

    /// [`dot_q4_0`] for four tokens.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_q4_0(_: super::DotFn, w: &[u8], a: [ActRow<'_>; 4]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        for b in 0..a[0].d.len() {
            let blk = w.as_ptr().add(b * 18);
            let qw = _mm256_sub_epi8(nibbles(blk.add(2)), _mm256_set1_epi8(8));
            let dw = f16_at(blk);
            for t in 0..4 {
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[t].d[b]), dot_i8(qw, xblock(&a[t], b)), acc[t]);
            }
        }
        hsum4(acc)
    }

    /// [`dot_q4_1`] for four tokens.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot4_q4_1(_: super::DotFn, w: &[u8], a: [ActRow<'_>; 4]) -> [f32; 4] {
        let (mut acc, mut offsets) = ([_mm256_setzero_ps(); 4], [0f32; 4]);
        let ones = _mm256_set1_epi16(1);
        for b in 0..a[0].d.len() {
            let blk = w.as_ptr().add(b * 20);
            let qw = nibbles(blk.add(4));
            let (dw, mw) = (f16_at(blk), f16_at(blk.add(2)));
            for t in 0..4 {
                let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(qw, xblock(&a[t], b)), ones);
                acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[t].d[b]), _mm256_cvtepi32_ps(p32), acc[t]);
                offsets[t] += mw * a[t].s[b];
            }
        }
        let sums = hsum4(acc);
        [sums[0] + offsets[0], sums[1] + offsets[1], sums[2] + offsets[2], sums[3] + offsets[3]]
    }
}

mod kquants;
#[cfg(test)]
mod tests;
