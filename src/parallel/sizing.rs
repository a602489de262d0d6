//! How a model splits over GPUs: per-rank weight bytes, KV bytes per token, and what context
//! and concurrency the memory left over holds. Pure arithmetic on `config.json`.

use super::sharding::{valid_tp, Shard, ShardPlan};
use crate::backend::StepLimits;
use crate::config::ModelConfig;
use crate::error::Result;

/// Device memory a rank leaves free beyond its weights and its reserved step workspace: what
/// is allocated once the KV cache is sized (captured CUDA graphs, cuBLASLt's and NCCL's lazily
/// allocated buffers) and the allocator's slack.
pub const HEADROOM_BYTES: u64 = 512 << 20;

/// The one KV budget rule, for the runtime (which measures `resident`: weights and reserved
/// workspace already allocated) and for `tulu inspect` (which computes it): what `fraction`
/// of a device's `total` bytes leaves for the KV cache once `resident` bytes are there.
pub fn kv_budget(total: u64, fraction: f64, resident: u64) -> u64 {
    ((total as f64 * fraction) as u64).saturating_sub(resident.saturating_add(HEADROOM_BYTES))
}

/// KV cache bytes one cached token takes over all layers (K and V) on a rank holding
/// `kv_heads` KV heads, on a device whose activation element takes `bytes_per_elem`: the one
/// formula. An FP8 cache (`cfg.kv_cache`) counts one byte an element whatever the device.
pub fn kv_bytes_per_token(cfg: &ModelConfig, kv_heads: usize, bytes_per_elem: u64) -> u64 {
    (cfg.num_hidden_layers * 2 * kv_heads * cfg.head_dim) as u64 * cfg.kv_cache.element_bytes(bytes_per_elem)
}

/// Bytes of a rank's step workspace for steps within `limits`: the largest step's activations
/// live together (residual, normed input, fused q/k/v, attention output, o_proj output,
/// gate_up, SiLU·mul, down, the next norm), the attention partials of the largest decode batch
/// split 64 ways, and the logits (gathered, plus sampling scratch in f32). FP8 models add the
/// FP8 GEMM's scratch (e4m3 activations and the f32 product of gate/up).
pub fn workspace_bytes(cfg: &ModelConfig, plan: &ShardPlan, limits: &StepLimits, element_bytes: usize) -> u64 {
    let (h, i, heads) = (cfg.hidden_size, plan.mlp_rows.len(), plan.heads);
    let (q, kv) = (heads * cfg.head_dim, plan.kv_heads * cfg.head_dim);
    let rows = limits.max_num_batched_tokens.max(limits.max_num_seqs);
    let fp8_scratch = if cfg.quantization.is_some() { (8 * i + h).div_ceil(element_bytes) } else { 0 };
    let per_row = 6 * h + 3 * q + 2 * kv + 3 * i + fp8_scratch;
    let splits = 64;
    let partials = limits.max_num_seqs.max(64) * heads * splits * (cfg.head_dim + 2) * 4;
    let vocab = plan.vocab_rows_per_rank * plan.shard.world;
    let logits = limits.max_num_seqs * vocab * (3 * element_bytes + 4);
    let total = (rows * per_row * element_bytes + partials + logits) as u64;
    total + total / 8 + (1 << 20)
}

/// The memory plan of one rank (the most loaded one) at tensor-parallel degree `tp`.
#[derive(Debug, Clone, PartialEq)]
pub struct RankSizing {
    /// Ranks.
    pub tp: usize,
    /// Weight bytes on the most loaded rank.
    pub weight_bytes: u64,
    /// KV cache bytes per token on each rank.
    pub kv_bytes_per_token: u64,
    /// The step workspace reserved on each rank (the engine's default step limits).
    pub workspace_bytes: u64,
    /// Bytes left for the KV cache after weights and workspace (0 when they do not fit).
    pub kv_budget: u64,
    /// Tokens of KV cache that fit.
    pub kv_tokens: u64,
    /// Longest single context that fits (capped at the model's maximum).
    pub max_context: u64,
    /// Sequences of `context` tokens that fit at once.
    pub concurrent_sequences: u64,
}

impl RankSizing {
    /// Whether one sequence of the asked-for context fits.
    pub fn fits(&self) -> bool {
        self.concurrent_sequences >= 1
    }
}

/// Weight elements of one decoder layer on the rank `plan` describes: norms, fused q/k/v,
/// o_proj, fused gate/up and down.
pub fn layer_weight_elements(cfg: &ModelConfig, plan: &ShardPlan) -> u64 {
    let h = cfg.hidden_size;
    let (q, kv, mlp) = (plan.q_rows.len(), plan.kv_rows.len(), plan.mlp_rows.len());
    (2 * h + (q + 2 * kv) * h + h * q + 3 * mlp * h) as u64
}

/// Weight elements after the last layer on that rank: the final norm and the padded lm_head shard.
pub fn head_weight_elements(cfg: &ModelConfig, plan: &ShardPlan) -> u64 {
    (cfg.hidden_size + plan.vocab_rows_per_rank * cfg.hidden_size) as u64
}

/// Weight elements resident on the rank `plan` describes: every layer, the head, and the
/// embedding shard unless it is the lm_head.
pub fn rank_weight_elements(cfg: &ModelConfig, plan: &ShardPlan) -> u64 {
    let embed = if cfg.tie_word_embeddings { 0 } else { (plan.vocab_rows_per_rank * cfg.hidden_size) as u64 };
    cfg.num_hidden_layers as u64 * layer_weight_elements(cfg, plan) + head_weight_elements(cfg, plan) + embed
}

/// Bytes of one linear weight of `rows × cols` on a device storing elements in `dense` bytes
/// and, when `fp8` is set, FP8 weights in e4m3 with an f32 scale per row.
fn linear_bytes(rows: usize, cols: usize, is_fp8: bool, bytes: &ElementBytes) -> u64 {
    let (rows, cols) = (rows as u64, cols as u64);
    match (is_fp8, bytes.fp8) {
        (true, Some(b)) => rows * cols * b + rows * 4,
        _ => rows * cols * bytes.dense,
    }
}

/// How a device stores weights: `dense` bytes an element, and `fp8` bytes an element of an FP8
/// weight when it keeps them in e4m3 (`None`: dequantized to `dense`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElementBytes {
    /// Bytes of a bf16/f32 weight element.
    pub dense: u64,
    /// Bytes of an FP8 weight element, when stored as such.
    pub fp8: Option<u64>,
}

/// Weight bytes on the rank `plan` describes, with the linear weights `cfg.quantization` makes
/// FP8 counted as such: one step's reads (every layer and the head), plus the embedding shard
/// when `resident` (unless it is the lm_head).
pub fn rank_weight_bytes(cfg: &ModelConfig, plan: &ShardPlan, bytes: &ElementBytes, resident: bool) -> u64 {
    let h = cfg.hidden_size;
    let fp8 = |module: &str| cfg.quantization.as_ref().is_some_and(|q| q.linear_is_fp8(module));
    let (q, kv, mlp) = (plan.q_rows.len(), plan.kv_rows.len(), plan.mlp_rows.len());
    let mut total = 0;
    for l in 0..cfg.num_hidden_layers {
        let attn = |n: &str| fp8(&format!("model.layers.{l}.self_attn.{n}"));
        let ffn = |n: &str| fp8(&format!("model.layers.{l}.mlp.{n}"));
        total += 2 * h as u64 * bytes.dense
            + linear_bytes(q, h, attn("q_proj"), bytes)
            + 2 * linear_bytes(kv, h, attn("k_proj"), bytes)
            + linear_bytes(h, q, attn("o_proj"), bytes)
            + 2 * linear_bytes(mlp, h, ffn("gate_proj"), bytes)
            + linear_bytes(h, mlp, ffn("down_proj"), bytes);
    }
    let vocab = plan.vocab_rows_per_rank;
    let lm_head = match cfg.tie_word_embeddings {
        true => linear_bytes(vocab, h, false, bytes),
        false => linear_bytes(vocab, h, fp8("lm_head"), bytes),
    };
    let embed = match resident && !cfg.tie_word_embeddings {
        true => linear_bytes(vocab, h, false, bytes),
        false => 0,
    };
    total + h as u64 * bytes.dense + lm_head + embed
}

/// Parameters per rank at `tp` (the largest rank: vocab shards are padded to equal size).
pub fn rank_parameters(cfg: &ModelConfig, tp: usize) -> Result<u64> {
    Ok(rank_weight_elements(cfg, &ShardPlan::new(cfg, Shard { rank: 0, world: tp })?))
}

/// Sizes one rank of `cfg` at `tp` on a GPU of `gpu_bytes`, using `utilization` of it, with
/// weights and KV in `bytes_per_elem` (2 for bf16; an FP8 cache, `cfg.kv_cache`, in 1), for
/// sequences of `context` tokens.
pub fn size_rank(
    cfg: &ModelConfig,
    tp: usize,
    gpu_bytes: u64,
    utilization: f64,
    bytes_per_elem: u64,
    context: u64,
) -> Result<RankSizing> {
    let p = ShardPlan::new(cfg, Shard { rank: 0, world: tp })?;
    // On a GPU, FP8 weights stay in e4m3.
    let stored = ElementBytes { dense: bytes_per_elem, fp8: Some(1) };
    let weight_bytes = rank_weight_bytes(cfg, &p, &stored, true);
    let kv_bytes_per_token = kv_bytes_per_token(cfg, p.kv_heads, bytes_per_elem);
    let workspace_bytes = workspace_bytes(cfg, &p, &StepLimits::default(), bytes_per_elem as usize);
    let kv_budget = kv_budget(gpu_bytes, utilization, weight_bytes + workspace_bytes);
    let kv_tokens = kv_budget / kv_bytes_per_token;
    let context = context.min(cfg.max_position_embeddings as u64).max(1);
    Ok(RankSizing {
        tp,
        weight_bytes,
        kv_bytes_per_token,
        workspace_bytes,
        kv_budget,
        kv_tokens,
        max_context: kv_tokens.min(cfg.max_position_embeddings as u64),
        concurrent_sequences: kv_tokens / context,
    })
}

/// The smallest valid tensor-parallel degree (up to 64) at which one `context` fits.
pub fn smallest_fitting_tp(
    cfg: &ModelConfig,
    gpu_bytes: u64,
    utilization: f64,
    bytes_per_elem: u64,
    context: u64,
) -> Option<usize> {
    valid_tp(cfg, 64)
        .into_iter()
        .find(|&tp| size_rank(cfg, tp, gpu_bytes, utilization, bytes_per_elem, context).is_ok_and(|s| s.fits()))
}

/// Parses `80GiB`, `141GB`, `512MiB` or a plain byte count.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        "tib" | "t" => 1024f64.powi(4),
        _ => return None,
    };
    (n >= 0.0).then_some((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tulu3_405b() -> ModelConfig {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tulu3/config-405b.json");
        ModelConfig::from_file(std::path::Path::new(path)).unwrap()
    }

    #[test]
    fn tulu3_405b_figures_match_hand_arithmetic() {
        let cfg = tulu3_405b();
        assert_eq!(cfg.parameter_count(), 405_853_650_944);
        // 126 layers × 8 KV heads × 128 × (K and V) × 2 bytes.
        assert_eq!(cfg.kv_bytes_per_token(2), 516_096);
        // At tp=16 each rank holds one KV head: 126 × 128 × 2 × 2.
        let s = size_rank(&cfg, 16, 80 << 30, 0.9, 2, 8192).unwrap();
        assert_eq!(s.kv_bytes_per_token, 64_512);
        // Per rank: (8 q heads + 1 k + 1 v) × 128 rows of 16384, o: 16384 × 1024, mlp: 3 × 16384 × 3328,
        // 2 norms, per layer; 2 × 8017 vocab rows; the final norm.
        let layer = (1024 + 256) * 16384 + 16384 * 1024 + 3 * 16384 * 3328 + 2 * 16384;
        assert_eq!(rank_parameters(&cfg, 16).unwrap(), 126 * layer + 2 * 8017 * 16384 + 16384);
        assert!(s.fits());
        // The budget is the one rule: 90 % of the GPU less weights, workspace and headroom.
        let resident = s.weight_bytes + s.workspace_bytes;
        assert_eq!(s.kv_budget, (0.9 * (80u64 << 30) as f64) as u64 - resident - HEADROOM_BYTES);
        assert!(s.workspace_bytes > 64 << 20 && s.workspace_bytes < 2 << 30, "{}", s.workspace_bytes);
    }

    #[test]
    fn h100s_need_16_ranks_and_h200s_8() {
        let cfg = tulu3_405b();
        assert!(!size_rank(&cfg, 8, 80 << 30, 0.9, 2, 8192).unwrap().fits());
        assert_eq!(smallest_fitting_tp(&cfg, 80 << 30, 0.9, 2, 8192), Some(16));
        assert_eq!(smallest_fitting_tp(&cfg, parse_bytes("141GB").unwrap(), 0.9, 2, 8192), Some(8));
    }

    /// In FP8 (quantized while loading: every linear but lm_head), 405B fits one node of eight
    /// 80 GiB GPUs with room for its KV cache: per rank, each layer's linear weights at one byte
    /// an element plus an f32 scale a row, norms, the lm_head and embedding shards in bf16.
    #[test]
    fn tulu3_405b_in_fp8_fits_one_node_of_h100s() {
        let mut cfg = tulu3_405b();
        cfg.quantization = Some(crate::quant::Quantization::at_load());
        let linear = (2048 + 2 * 128) * 16384 + 16384 * 2048 + 3 * 16384 * 6656;
        let rows = 2048 + 2 * 128 + 16384 + 2 * 6656 + 16384;
        let layer = linear + 4 * rows + 2 * 16384 * 2;
        let s = size_rank(&cfg, 8, 80 << 30, 0.9, 2, 8192).unwrap();
        assert_eq!(s.weight_bytes, 126 * layer + 16384 * 2 + 2 * 16033 * 16384 * 2);
        assert!(s.fits());
        assert_eq!(s.kv_bytes_per_token, 126 * 128 * 2 * 2);
        assert!(s.kv_tokens > 300_000, "{}", s.kv_tokens);
        assert_eq!(smallest_fitting_tp(&cfg, 80 << 30, 0.9, 2, 8192), Some(8));
        // Meta's fbgemm layout keeps attention and the first and last layers' MLPs in bf16, and
        // still fits.
        let mut keep: Vec<String> = (0..126).map(|l| format!("model.layers.{l}.self_attn")).collect();
        keep.extend(["model.layers.0.mlp".into(), "model.layers.125.mlp".into(), "lm_head".into()]);
        let v = serde_json::json!({"quant_method": "fbgemm_fp8", "modules_to_not_convert": keep});
        cfg.quantization = crate::quant::config::parse(Some(&v), std::path::Path::new("config.json")).unwrap();
        let fb = size_rank(&cfg, 8, 80 << 30, 0.9, 2, 8192).unwrap();
        assert!(fb.fits() && fb.weight_bytes > s.weight_bytes);
    }

    /// An e4m3 cache counts one byte an element: half the bytes per token, and (same weights,
    /// same workspace) twice the tokens of the bf16 cache, within a token of rounding.
    #[test]
    fn an_fp8_kv_cache_holds_twice_the_tokens() {
        let mut cfg = tulu3_405b();
        cfg.quantization = Some(crate::quant::Quantization::at_load());
        let bf16 = size_rank(&cfg, 8, 80 << 30, 0.9, 2, 8192).unwrap();
        cfg.kv_cache = crate::quant::kv::KvDtype::Fp8;
        assert_eq!(cfg.kv_bytes_per_token(2), 126 * 8 * 128 * 2);
        let fp8 = size_rank(&cfg, 8, 80 << 30, 0.9, 2, 8192).unwrap();
        assert_eq!(fp8.kv_bytes_per_token, 126 * 128 * 2);
        assert_eq!(fp8.kv_budget, bf16.kv_budget);
        assert!(fp8.kv_tokens.abs_diff(2 * bf16.kv_tokens) <= 1, "{} vs {}", fp8.kv_tokens, bf16.kv_tokens);
    }

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(parse_bytes("80GiB"), Some(80 << 30));
        assert_eq!(parse_bytes("141GB"), Some(141_000_000_000));
        assert_eq!(parse_bytes("1024"), Some(1024));
        assert_eq!(parse_bytes("12 parsecs"), None);
    }
}
