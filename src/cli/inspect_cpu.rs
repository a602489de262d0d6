//! `tulu inspect --device cpu`: the host memory the CPU backend will hold for a checkpoint —
//! each weight at the type the CPU keeps it in (its stored type, or what `--quantize` makes
//! of it), sized by the backend's own rule ([`HostType::bytes`], what a loaded weight reports),
//! and the KV cache per token.

use std::collections::BTreeMap;

use tulu::unstable::backend::cpu::HostType;
use tulu::unstable::config::ModelConfig;
use tulu::unstable::parallel::sizing::parse_bytes;
use tulu::unstable::quant::kv::KvDtype;
use tulu::unstable::weights::{DType, WeightStore};
use tulu::{Error, Result};

/// Bytes of one f32 KV cache element on the CPU (an FP8 cache: one).
const KV_ELEMENT_BYTES: usize = 4;

/// How the CPU backend holds checkpoint tensor `name` (`shape`, stored as `dtype`) under `cfg`'s
/// quantization, as the loader decides (`model.rs`): an F8_E4M3 linear weight stays FP8; a
/// linear weight quantized while loading becomes FP8 or `--quantize`'s blocks; anything else
/// is loaded as stored ([`HostType::loaded_from`]). `None` for the FP8 scales, which are read
/// into the weights' rows.
pub fn host_type(cfg: &ModelConfig, name: &str, dtype: DType, shape: &[usize]) -> Option<HostType> {
    if name.ends_with(".weight_scale") || name.ends_with(".input_scale") {
        return None;
    }
    let rows = if shape.len() >= 2 { shape[0] } else { 1 };
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let linear = rows > 1
        && (name == "lm_head.weight"
            || (name.starts_with("model.layers.") && (name.contains(".self_attn.") || name.contains(".mlp."))));
    let quant = cfg.quantization.as_ref().filter(|_| linear);
    Some(match quant {
        Some(_) if dtype == DType::F8E4M3 => HostType::Fp8,
        Some(q) if q.quantizes_at_load(module) => match q.at_load_blocks() {
            Some(b) => HostType::Blocks(b.ggml()),
            None => HostType::Fp8,
        },
        _ => HostType::loaded_from(dtype, rows),
    })
}

/// Prints the host memory of `store`'s weights by CPU type, the KV cache per token, and how
/// many tokens `kv_memory` holds.
pub fn host_memory(store: &WeightStore, cfg: &ModelConfig, kv_memory: Option<&str>) -> Result<()> {
    let mut by_type: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for name in store.names() {
        let t = store.get_any(name)?;
        let Some(host) = host_type(cfg, name, t.dtype, t.shape) else { continue };
        let rows = if t.shape.len() >= 2 { t.shape[0] } else { 1 };
        let elems: usize = t.shape.iter().product();
        let slot = by_type.entry(host.name()).or_default();
        slot.0 += elems as u64;
        slot.1 += host.bytes(rows, elems / rows.max(1));
    }
    let mut total = 0;
    for (name, (elems, bytes)) in &by_type {
        println!("cpu weights {name}: {elems} elements, {} ({bytes} bytes)", gib(*bytes));
        total += bytes;
    }
    println!("cpu weights total: {} ({total} bytes)", gib(total));
    let per_token = cfg.kv_bytes_per_token(KV_ELEMENT_BYTES);
    // The CPU cache holds f32 unless it is FP8, whatever the model's dtype.
    let kv = if cfg.kv_cache == KvDtype::Fp8 { "fp8" } else { "f32" };
    println!("cpu kv cache per token: {kv} ({per_token} bytes)");
    if let Some(mem) = kv_memory {
        let bytes = parse_bytes(mem)
            .ok_or_else(|| Error::request("kv-cache-memory", format!("`{mem}` is not a size like 4GiB")))?;
        println!("cpu kv cache of {mem}: {} tokens", bytes / per_token.max(1));
        println!("cpu host memory: {} for the weights and a {mem} cache", gib(total + bytes));
    }
    Ok(())
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}
