//! Rotary position embeddings with Llama 3.1's `llama3` frequency scaling.
//!
//! Tables are computed once on the host in f64 and stored as f32 `cos`/`sin` rows, one row of
//! `head_dim / 2` per position; backends apply them in the rotate-half layout of HF checkpoints
//! (the first half of a head pairs with the second half).

use crate::config::{Llama3RopeScaling, ModelConfig};

/// The inverse frequencies of each rotary pair, with llama3 scaling applied when configured.
pub fn inverse_frequencies(head_dim: usize, theta: f64, scaling: Option<&Llama3RopeScaling>) -> Vec<f64> {
    (0..head_dim / 2)
        .map(|i| {
            let inv = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
            match scaling {
                Some(s) => llama3_scale(inv, s),
                None => inv,
            }
        })
        .collect()
}

/// Llama 3.1's scaling: long wavelengths are divided by `factor`, short ones kept, and the band
/// between interpolates smoothly (as in Meta's reference and HF's `_compute_llama3_parameters`).
fn llama3_scale(inv_freq: f64, s: &Llama3RopeScaling) -> f64 {
    let old_context = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = old_context / s.low_freq_factor;
    let high_freq_wavelen = old_context / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
    if wavelen < high_freq_wavelen {
        inv_freq
    } else if wavelen > low_freq_wavelen {
        inv_freq / s.factor
    } else {
        let smooth = (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * inv_freq / s.factor + smooth * inv_freq
    }
}

/// Precomputed `cos` and `sin` tables for positions `0..max_positions`.
#[derive(Debug, Clone)]
pub struct RopeTable {
    /// `max_positions × head_dim/2` cosines, row-major.
    pub cos: Vec<f32>,
    /// `max_positions × head_dim/2` sines, row-major.
    pub sin: Vec<f32>,
    /// Rotary pairs per head (`head_dim / 2`).
    pub half: usize,
    /// Number of positions covered.
    pub max_positions: usize,
}

impl RopeTable {
    /// Tables for `cfg` covering positions `0..max_positions`.
    pub fn new(cfg: &ModelConfig, max_positions: usize) -> Self {
        let inv = inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref());
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for &f in &inv {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable { cos, sin, half, max_positions }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_matches_hand_computed_bands() {
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let plain = inverse_frequencies(128, 500_000.0, None);
        let scaled = inverse_frequencies(128, 500_000.0, Some(&s));
        // Pair 0 has wavelength 2π < 2048: untouched.
        assert_eq!(plain[0], scaled[0]);
        // The last pair's wavelength (~2.9e6) exceeds 8192: divided by the factor.
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-18);
        // A pair in the band lies strictly between the two.
        let mid = (0..64).find(|&i| {
            let w = 2.0 * std::f64::consts::PI / plain[i];
            w > 2048.0 && w < 8192.0
        });
        let i = mid.expect("Llama 3.1 has pairs in the interpolation band");
        assert!(scaled[i] < plain[i] && scaled[i] > plain[i] / 8.0);
    }
}
