//! How many KV blocks a rank's cache gets: one policy for every rank of every deployment,
//! computed only from the rank's own KV elements per token (its shard of the KV heads) times
//! its backend's element bytes, and agreed on by all ranks (the smallest wins).

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::parallel::sizing::kv_budget;

/// Full contexts a rank without device memory of its own (the CPU, or GPUs shared by several
/// ranks) holds when no byte count is given.
pub const DEFAULT_CONTEXTS: u64 = 4;

/// How a rank sizes its KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum KvPolicy {
    /// This many bytes of KV cache on every rank (`--kv-cache-memory`).
    BytesPerRank(u64),
    /// What this fraction of the rank's device memory leaves once its weights and its step
    /// workspace are resident, by the one rule (`parallel::sizing::kv_budget`, which
    /// `tulu inspect` uses too; `--gpu-memory-utilization`); a rank without device memory of
    /// its own holds [`DEFAULT_CONTEXTS`] full contexts instead.
    DeviceFraction(f64),
}

impl KvPolicy {
    /// The policy of `--kv-cache-memory` when given, else of `--gpu-memory-utilization`.
    pub fn new(kv_cache_memory: Option<u64>, gpu_memory_utilization: f64) -> Self {
        match kv_cache_memory {
            Some(bytes) => KvPolicy::BytesPerRank(bytes),
            None => KvPolicy::DeviceFraction(gpu_memory_utilization),
        }
    }

    /// Blocks of `block_size` tokens for a rank whose cache takes `bytes_per_token` per token,
    /// on a device with `memory` (free, total) bytes of its own (`None`: no device memory of its
    /// own), serving contexts of `context` tokens.
    pub fn blocks(self, bytes_per_token: u64, memory: Option<(u64, u64)>, block_size: usize, context: usize) -> u64 {
        let per_block = (bytes_per_token * block_size as u64).max(1);
        match (self, memory) {
            (KvPolicy::BytesPerRank(bytes), _) => bytes / per_block,
            // Called once the weights and the step workspace are resident: what is in use
            // counts them, and the rule adds only the headroom.
            (KvPolicy::DeviceFraction(fraction), Some((free, total))) => {
                kv_budget(total, fraction, total.saturating_sub(free)) / per_block
            }
            (KvPolicy::DeviceFraction(_), None) => DEFAULT_CONTEXTS * context as u64 / block_size.max(1) as u64,
        }
    }

    /// The error when the agreed cache holds no block, naming the flag that sized it.
    pub fn no_room(self, block_size: usize) -> Error {
        match self {
            KvPolicy::BytesPerRank(bytes) => Error::request(
                "kv_cache_memory",
                format!("{bytes} bytes per rank do not hold one block of {block_size} tokens"),
            ),
            KvPolicy::DeviceFraction(_) => Error::request(
                "gpu_memory_utilization",
                "no room for the KV cache on some rank once its weights are loaded: raise it, or add ranks",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes per rank are divided by the rank's own bytes per block, not the whole model's.
    #[test]
    fn bytes_per_rank_over_the_ranks_own_bytes_per_token() {
        // Tülu 3 405B at tp 16 in bf16: one KV head per rank, 126 × 2 × 128 × 2 bytes a token.
        let per_token = 126 * 2 * 128 * 2;
        assert_eq!(
            KvPolicy::BytesPerRank(40 << 30).blocks(per_token, None, 16, 8192),
            (40u64 << 30) / (per_token * 16)
        );
        assert_eq!(KvPolicy::BytesPerRank(10).blocks(per_token, Some((1 << 40, 1 << 40)), 16, 8192), 0);
    }

    #[test]
    fn a_device_fraction_is_what_the_weights_and_workspace_leave() {
        let gib = 1u64 << 30;
        // 80 GiB GPU, 60 GiB of it free after the weights and workspace; 90 % allowed:
        // 72 − 20 − 0.5 GiB (headroom) left.
        let blocks = KvPolicy::DeviceFraction(0.9).blocks(1 << 20, Some((60 * gib, 80 * gib)), 16, 8192);
        assert_eq!(blocks, 51 * 1024 / 16 + 512 / 16);
        assert_eq!(KvPolicy::DeviceFraction(0.5).blocks(1 << 20, Some((10 * gib, 80 * gib)), 16, 8192), 0);
        // No device memory of its own: four full contexts.
        assert_eq!(KvPolicy::DeviceFraction(0.9).blocks(1 << 20, None, 16, 8192), 4 * 8192 / 16);
    }
}
