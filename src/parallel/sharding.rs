//! Which slice of every tensor a tensor-parallel rank holds.
//!
//! Column-parallel q/k/v and gate/up (output rows split), row-parallel o_proj and down_proj
//! (input columns split, then a sum all-reduce), vocab-parallel embedding and lm_head (rows
//! split into equal shards, the last padded), replicated norms. KV heads are replicated when
//! there are more ranks than KV heads: rank `r` then holds KV head `r / (tp / kv_heads)`.

use std::ops::Range;

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// One rank of a tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    /// This rank, `0..world`.
    pub rank: usize,
    /// Ranks in the group (`--tp`).
    pub world: usize,
}

impl Shard {
    /// The whole model on one rank.
    pub fn single() -> Self {
        Shard { rank: 0, world: 1 }
    }
}

/// Row and column ranges of one rank's slices, in elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    /// The rank.
    pub shard: Shard,
    /// Query heads on this rank.
    pub heads: usize,
    /// KV heads on this rank (1 when replicated).
    pub kv_heads: usize,
    /// Rows of q_proj (and columns of o_proj) on this rank.
    pub q_rows: Range<usize>,
    /// Rows of k_proj and v_proj on this rank.
    pub kv_rows: Range<usize>,
    /// Rows of gate_proj and up_proj (and columns of down_proj) on this rank.
    pub mlp_rows: Range<usize>,
    /// Embedding / lm_head rows on this rank.
    pub vocab_rows: Range<usize>,
    /// Rows every rank's vocab shard has (the last one padded with zero rows).
    pub vocab_rows_per_rank: usize,
}

/// Why `tp` cannot split `cfg`, if it cannot.
fn check(cfg: &ModelConfig, tp: usize) -> Option<String> {
    let (h, kv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    if tp == 0 {
        return Some("must be at least 1".into());
    }
    if !h.is_multiple_of(tp) {
        return Some(format!("{h} attention heads do not divide into {tp} ranks"));
    }
    if !kv.is_multiple_of(tp) && !tp.is_multiple_of(kv) {
        return Some(format!("{kv} KV heads neither divide into {tp} ranks nor replicate evenly across them"));
    }
    if !cfg.intermediate_size.is_multiple_of(tp) {
        return Some(format!("intermediate size {} does not divide into {tp} ranks", cfg.intermediate_size));
    }
    None
}

/// Every tensor-parallel degree up to `max` that can split `cfg`.
pub fn valid_tp(cfg: &ModelConfig, max: usize) -> Vec<usize> {
    (1..=max).filter(|&n| check(cfg, n).is_none()).collect()
}

impl ShardPlan {
    /// The plan of `shard` for `cfg`, or an error listing the degrees that work.
    pub fn new(cfg: &ModelConfig, shard: Shard) -> Result<Self> {
        let tp = shard.world;
        if let Some(why) = check(cfg, tp) {
            let valid: Vec<String> = valid_tp(cfg, 64).iter().map(usize::to_string).collect();
            return Err(Error::request(
                "tp",
                format!("{tp} cannot split this model: {why}; valid: {}", valid.join(", ")),
            ));
        }
        let r = shard.rank;
        let hd = cfg.head_dim;
        let heads = cfg.num_attention_heads / tp;
        let (kv_heads, kv_first) = if tp <= cfg.num_key_value_heads {
            let n = cfg.num_key_value_heads / tp;
            (n, r * n)
        } else {
            (1, r / (tp / cfg.num_key_value_heads))
        };
        let inter = cfg.intermediate_size / tp;
        let per_rank = cfg.vocab_size.div_ceil(tp);
        let vocab_start = (r * per_rank).min(cfg.vocab_size);
        Ok(ShardPlan {
            shard,
            heads,
            kv_heads,
            q_rows: r * heads * hd..(r + 1) * heads * hd,
            kv_rows: kv_first * hd..(kv_first + kv_heads) * hd,
            mlp_rows: r * inter..(r + 1) * inter,
            vocab_rows: vocab_start..((r + 1) * per_rank).min(cfg.vocab_size),
            vocab_rows_per_rank: per_rank,
        })
    }

    /// Zero rows appended to this rank's vocab shard.
    pub fn vocab_padding(&self) -> usize {
        self.vocab_rows_per_rank - self.vocab_rows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tulu3_405b_at_tp16_replicates_kv_heads_and_pads_the_vocab() {
        let cfg = ModelConfig::preset("llama-3.1-405b").unwrap();
        let plans: Vec<ShardPlan> =
            (0..16).map(|rank| ShardPlan::new(&cfg, Shard { rank, world: 16 }).unwrap()).collect();
        // 8 KV heads over 16 ranks: ranks 2k and 2k+1 share head k.
        for (r, p) in plans.iter().enumerate() {
            assert_eq!((p.heads, p.kv_heads), (8, 1));
            assert_eq!(p.kv_rows, (r / 2) * 128..(r / 2 + 1) * 128);
            assert_eq!(p.mlp_rows.len(), 53248 / 16);
        }
        // 128264 rows: 16 shards of 8017, the last holding 8009 real rows and 8 padded.
        assert_eq!(plans[0].vocab_rows_per_rank, 8017);
        assert_eq!(plans[15].vocab_rows, 15 * 8017..128_264);
        assert_eq!(plans[15].vocab_padding(), 8);
        assert_eq!(plans.iter().map(|p| p.vocab_rows.len()).sum::<usize>(), 128_264);
    }

    #[test]
    fn impossible_degrees_list_the_valid_ones() {
        let cfg = ModelConfig::preset("tiny").unwrap(); // 8 heads, 2 KV heads, 160 intermediate
        assert_eq!(valid_tp(&cfg, 16), vec![1, 2, 4, 8]);
        match ShardPlan::new(&cfg, Shard { rank: 0, world: 3 }) {
            Err(Error::Request { param, message }) => {
                assert_eq!(param, "tp");
                assert!(message.contains("valid: 1, 2, 4, 8"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
