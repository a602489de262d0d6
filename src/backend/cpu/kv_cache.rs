//! The CPU backend's paged KV cache: per layer, K and V of `num_blocks · block_size` slots of
//! `kv_dim` values, in f32 or (an FP8 cache) in e4m3 bytes.
//!
//! An FP8 cache stores the real e4m3 bits, not f32 values rounded to e4m3: the cache then takes
//! the one byte an element the sizing rule counts, and its bytes are what the GPU's KV write must
//! produce bit for bit. The scale is applied once on each side: the write stores `x / scale`
//! (round to nearest even, saturating at ±448, NaN kept), the read gives `e4m3 · scale`.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::backend::KvCacheSpec;
use crate::error::{Error, Result};
use crate::quant::e4m3;
use crate::quant::kv::{KvFormat, KvScale};

/// One of K or V of one layer.
enum Plane {
    F32(Vec<f32>),
    /// e4m3 bits, and what each of the 256 patterns reads as (scale applied).
    E4m3 {
        bits: Vec<u8>,
        scale: f32,
        values: Box<[f32; 256]>,
    },
}

impl Plane {
    fn new(len: usize, scale: Option<f32>) -> Self {
        match scale {
            None => Plane::F32(vec![0.0; len]),
            Some(scale) => {
                let values = Box::new(std::array::from_fn(|b| e4m3::to_f32(b as u8) * scale));
                Plane::E4m3 { bits: vec![0; len], scale, values }
            }
        }
    }

    /// Stores `x` at element offset `at`.
    fn write(&mut self, at: usize, x: &[f32]) {
        match self {
            Plane::F32(d) => d[at..at + x.len()].copy_from_slice(x),
            Plane::E4m3 { bits, scale, .. } => {
                for (b, &v) in bits[at..at + x.len()].iter_mut().zip(x) {
                    let q = v / *scale;
                    if q.abs() > e4m3::MAX {
                        warn_saturated();
                    }
                    *b = e4m3::from_f32(q);
                }
            }
        }
    }

    /// The `buf.len()` values at element offset `at`: borrowed from an f32 cache, decoded into
    /// `buf` from an e4m3 one.
    fn read<'a>(&'a self, at: usize, buf: &'a mut [f32]) -> &'a [f32] {
        match self {
            Plane::F32(d) => &d[at..at + buf.len()],
            Plane::E4m3 { bits, values, .. } => {
                for (o, &b) in buf.iter_mut().zip(&bits[at..]) {
                    *o = values[b as usize];
                }
                buf
            }
        }
    }

    fn bits(&self) -> Option<&[u8]> {
        match self {
            Plane::F32(_) => None,
            Plane::E4m3 { bits, .. } => Some(bits),
        }
    }
}

/// Says once per process that a KV value saturated at ±448 (its scale is too small for it).
fn warn_saturated() {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!("FP8 KV cache: a key or value exceeds 448 × its layer's scale and saturates");
    }
}

/// The paged KV cache of every layer.
pub struct CpuKvCache {
    k: Vec<Plane>,
    v: Vec<Plane>,
    pub(super) spec: KvCacheSpec,
}

impl CpuKvCache {
    /// A zeroed cache of `spec`'s shape and format; an FP8 format needs one scale pair a layer.
    pub fn new(spec: &KvCacheSpec) -> Result<Self> {
        let len = spec.num_blocks * spec.block_size * spec.kv_heads * spec.head_dim;
        let scales: Vec<Option<KvScale>> = match &spec.kv {
            KvFormat::Model => vec![None; spec.layers],
            KvFormat::Fp8(s) if s.len() == spec.layers => s.iter().copied().map(Some).collect(),
            KvFormat::Fp8(s) => {
                return Err(Error::Backend(format!(
                    "new_kv_cache: {} layers but {} KV scale pairs",
                    spec.layers,
                    s.len()
                )))
            }
        };
        Ok(CpuKvCache {
            k: scales.iter().map(|s| Plane::new(len, s.map(|s| s.k))).collect(),
            v: scales.iter().map(|s| Plane::new(len, s.map(|s| s.v))).collect(),
            spec: spec.clone(),
        })
    }

    /// Stores one token's keys and values (`kv_dim` each) at element offset `at` of `layer`.
    pub(super) fn write(&mut self, layer: usize, at: usize, k: &[f32], v: &[f32]) {
        self.k[layer].write(at, k);
        self.v[layer].write(at, v);
    }

    /// `buf.len()` keys of `layer` from element offset `at`.
    pub(super) fn keys<'a>(&'a self, layer: usize, at: usize, buf: &'a mut [f32]) -> &'a [f32] {
        self.k[layer].read(at, buf)
    }

    /// `buf.len()` values of `layer` from element offset `at`.
    pub(super) fn values<'a>(&'a self, layer: usize, at: usize, buf: &'a mut [f32]) -> &'a [f32] {
        self.v[layer].read(at, buf)
    }

    /// The stored e4m3 bits of `layer`'s keys and values (`None` for an f32 cache): what the
    /// GPU's FP8 KV write is checked against, bit for bit.
    pub fn e4m3_bits(&self, layer: usize) -> Option<(&[u8], &[u8])> {
        Some((self.k.get(layer)?.bits()?, self.v.get(layer)?.bits()?))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn spec(kv: KvFormat) -> KvCacheSpec {
        KvCacheSpec { layers: 2, num_blocks: 1, block_size: 2, kv_heads: 1, head_dim: 4, kv }
    }

    /// The scale divides on the write and multiplies on the read, once each: a value that is
    /// exactly `e4m3 · scale` comes back exactly, the stored bits are those of `x / scale`, and
    /// a value past `448 · scale` saturates.
    #[test]
    fn fp8_round_trip_applies_each_scale_once() {
        let scales: Arc<[KvScale]> = vec![KvScale::ONE, KvScale { k: 2.0, v: 0.5 }].into();
        let mut c = CpuKvCache::new(&spec(KvFormat::Fp8(scales))).unwrap();
        let k = [3.0, -0.5, 1000.0, f32::NAN];
        let v = [0.25, 1.5, -300.0, 0.0];
        c.write(1, 4, &k, &v);
        let (kb, vb) = c.e4m3_bits(1).unwrap();
        assert_eq!(kb[4..8], [e4m3::from_f32(1.5), e4m3::from_f32(-0.25), e4m3::from_f32(448.0), kb[7]]);
        assert_eq!(vb[4..6], [e4m3::from_f32(0.5), e4m3::from_f32(3.0)]);
        let mut buf = [0f32; 4];
        let got = c.keys(1, 4, &mut buf).to_vec();
        assert_eq!(got[..3], [3.0, -0.5, 896.0]);
        assert!(got[3].is_nan());
        let mut buf = [0f32; 4];
        // -300 / 0.5 = -600 saturates at -448 (× 0.5 = -224).
        assert_eq!(c.values(1, 4, &mut buf), [0.25, 1.5, -224.0, 0.0]);
        // Layer 0 (scale 1) is untouched by layer 1's write.
        assert_eq!(c.keys(0, 4, &mut [0f32; 4]), [0.0; 4]);
    }

    #[test]
    fn scales_must_cover_every_layer() {
        let e = CpuKvCache::new(&spec(KvFormat::Fp8(vec![KvScale::ONE].into()))).err().unwrap();
        assert!(e.to_string().contains("2 layers but 1 KV scale"), "{e}");
        let c = CpuKvCache::new(&spec(KvFormat::Model)).unwrap();
        assert!(c.e4m3_bits(0).is_none());
    }
}
