//! candle-transformers' Llama, wrapped as tulu's independent oracle (logit comparisons in tests)
//! and benchmark peer (`cargo bench --bench peer` reports tulu's speed relative to it). It lives
//! with the tests, not in the library: `tulu` carries no oracle. Test crates and the bench
//! include it with `#[path]`.
//!
//! Nothing here shares code with tulu's own forward pass: the config is parsed by
//! candle-transformers' serde types and the weights are loaded by its `VarBuilder`, so agreement
//! between the two means something. It runs in f32 on the CPU, the most exact setting the peer has.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Config, Llama, LlamaConfig};

use tulu::{Error, Result};

/// candle-transformers' Llama loaded from a Hugging Face model directory (f32, CPU).
pub struct PeerLlama {
    model: Llama,
    config: Config,
    /// A cache with no keys or values yet; cloning it is cheap (the cos/sin tables are shared)
    /// and spares rebuilding the tables, sized by max_position_embeddings, on every call.
    blank_cache: Cache,
    device: Device,
    dir: PathBuf,
}

impl PeerLlama {
    /// Loads `dir/config.json` and the safetensors weights (`model.safetensors`, or the shards
    /// named by `model.safetensors.index.json`).
    pub fn load(dir: &Path) -> Result<Self> {
        let config = read_config(&dir.join("config.json"))?;
        let files = weight_files(dir)?;
        // SAFETY: the files are mapped read-only and every tensor is copied out (converted to f32)
        // while loading below; the mapping is gone before `load` returns. What is left unguarded is
        // another process truncating a file during these few seconds, the usual mmap caveat, and
        // acceptable for a test oracle.
        let tensors = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| Error::weights(dir, None, format!("cannot map safetensors: {e}")))?;
        // candle-transformers' Llama::load unwraps each layer's load, so a missing or misshapen
        // tensor would panic there: check them all first and fail with a named tensor instead.
        check_tensors(&tensors, &config, dir)?;
        let device = Device::Cpu;
        let vb = VarBuilder::from_backend(Box::new(tensors), DType::F32, device.clone());
        let model = Llama::load(vb, &config).map_err(|e| Error::weights(dir, None, format!("peer load: {e}")))?;
        let blank_cache = Cache::new(true, DType::F32, &config, &device).map_err(|e| backend(dir, e))?;
        Ok(PeerLlama { model, config, blank_cache, device, dir: dir.to_path_buf() })
    }

    /// The vocabulary size (rows of every logits vector).
    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// Logits (full vocab rows) of the last position after feeding `tokens` from position 0 in
    /// one forward (fresh cache).
    pub fn last_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_tokens(tokens, 0)?;
        let mut cache = self.blank_cache.clone();
        self.forward(tokens, 0, &mut cache)
    }

    /// Logits of every position, computed by feeding the prompt one token at a time with its KV
    /// cache (so row i = logits after tokens[..=i]).
    pub fn logits_per_position(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.check_tokens(tokens, 0)?;
        let mut cache = self.blank_cache.clone();
        (0..tokens.len()).map(|i| self.forward(&tokens[i..=i], i, &mut cache)).collect()
    }

    /// Greedy continuation of `n` tokens (prefill then one token at a time, argmax over the first
    /// `sample_rows` rows, since rows past the tokenizer's vocabulary are never sampled).
    pub fn greedy(&mut self, prompt: &[u32], n: usize, sample_rows: usize) -> Result<Vec<u32>> {
        // The last sampled token is never fed back, hence n - 1.
        self.check_tokens(prompt, n.saturating_sub(1))?;
        if sample_rows == 0 {
            return Err(Error::request("sample_rows", "must be at least 1"));
        }
        let rows = sample_rows.min(self.config.vocab_size);
        let mut cache = self.blank_cache.clone();
        let mut logits = self.forward(prompt, 0, &mut cache)?;
        let mut out = Vec::with_capacity(n);
        for step in 0..n {
            let next = argmax(&logits[..rows]);
            out.push(next);
            if step + 1 < n {
                logits = self.forward(&[next], prompt.len() + step, &mut cache)?;
            }
        }
        Ok(out)
    }

    /// Timing for the bench: prefill `prompt` then decode `n` tokens greedily; returns
    /// (prefill_secs, decode_secs), where decode covers `n` single-token forward steps (each
    /// feeding the previous argmax), so tokens/s = n / decode_secs.
    pub fn time_generate(&mut self, prompt: &[u32], n: usize) -> Result<(f64, f64)> {
        self.check_tokens(prompt, n)?;
        let mut cache = self.blank_cache.clone();
        let start = Instant::now();
        let mut logits = self.forward(prompt, 0, &mut cache)?;
        let prefill = start.elapsed().as_secs_f64();
        let start = Instant::now();
        for step in 0..n {
            let next = argmax(&logits);
            logits = self.forward(&[next], prompt.len() + step, &mut cache)?;
        }
        Ok((prefill, start.elapsed().as_secs_f64()))
    }

    /// One forward of `tokens` at positions `pos..`, returning the last position's logits.
    fn forward(&self, tokens: &[u32], pos: usize, cache: &mut Cache) -> Result<Vec<f32>> {
        let mut run = || -> candle_core::Result<Vec<f32>> {
            let input = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
            self.model.forward(&input, pos, cache)?.squeeze(0)?.to_vec1::<f32>()
        };
        run().map_err(|e| backend(&self.dir, e))
    }

    /// Rejects what the peer would panic on or silently mis-handle: an empty prompt, ids past the
    /// embedding table, and sequences (prompt plus `extra` fed tokens) past the rope tables.
    fn check_tokens(&self, tokens: &[u32], extra: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::request("tokens", "empty: the peer needs at least one token"));
        }
        let vocab = self.config.vocab_size;
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::request("tokens", format!("token id {bad} is not below vocab_size {vocab}")));
        }
        let max = self.config.max_position_embeddings;
        if tokens.len() + extra > max {
            return Err(Error::request(
                "tokens",
                format!("{} positions exceed max_position_embeddings {max}", tokens.len() + extra),
            ));
        }
        Ok(())
    }
}

fn backend(dir: &Path, e: candle_core::Error) -> Error {
    Error::Backend(format!("peer llama ({}): {e}", dir.display()))
}

/// The first index of the largest value (ties to the lowest id, as torch.argmax does).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Parses config.json with candle-transformers' own serde types, after rejecting what those types
/// would accept but compute differently from Hugging Face.
fn read_config(file: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let mut json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::config(file, "(file)", format!("not JSON: {e}")))?;
    let int = |field: &str| json.get(field).and_then(|v| v.as_u64()).map(|v| v as usize);
    let (hidden, heads) = (int("hidden_size").unwrap_or(0), int("num_attention_heads").unwrap_or(0));
    let kv_heads = int("num_key_value_heads").unwrap_or(heads);
    if heads == 0 || hidden % heads != 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Error::config(
            file,
            "num_attention_heads",
            format!("{heads} heads, {kv_heads} KV heads and hidden_size {hidden} do not divide"),
        ));
    }
    // The peer derives head_dim as hidden/heads and has no field for anything else.
    if let Some(head_dim) = int("head_dim").filter(|&d| d != hidden / heads) {
        return Err(Error::config(
            file,
            "head_dim",
            format!("{head_dim} != hidden_size / num_attention_heads; the candle-transformers peer cannot run it"),
        ));
    }
    if let Some(scaling) = json.get_mut("rope_scaling").and_then(|s| s.as_object_mut()) {
        // Older configs name the kind `type`; the peer's serde type requires `rope_type`.
        let kind = scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(|t| t.as_str());
        match kind {
            Some(kind @ ("llama3" | "default")) => {
                let kind = serde_json::Value::from(kind);
                scaling.insert("rope_type".into(), kind);
            }
            other => {
                return Err(Error::config(
                    file,
                    "rope_scaling.rope_type",
                    format!("{other:?}: the candle-transformers peer supports only `llama3`"),
                ));
            }
        }
    }
    let config: LlamaConfig = serde_json::from_value(json).map_err(|e| {
        let message = e.to_string();
        // serde names the culprit as "missing field `x`" / "invalid type ... for `x`"-like text.
        let field = message.split('`').nth(1).unwrap_or("(file)").to_owned();
        Error::config(file, field, message)
    })?;
    Ok(config.into_config(false))
}

/// `model.safetensors`, or every shard the index names (each once, in name order).
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        let single = dir.join("model.safetensors");
        if !single.is_file() {
            return Err(Error::weights(single, None, "not found (nor model.safetensors.index.json)"));
        }
        return Ok(vec![single]);
    }
    let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::weights(&index, None, format!("not JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::weights(&index, None, "no `weight_map` object"))?;
    let mut names = std::collections::BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| Error::weights(&index, Some(tensor), "shard name is not a string"))?;
        names.insert(file);
    }
    Ok(names.into_iter().map(|n| dir.join(n)).collect())
}

/// Checks that every tensor the peer will ask for exists with the shape it will ask for.
fn check_tensors(tensors: &MmapedSafetensors, cfg: &Config, dir: &Path) -> Result<()> {
    let (hidden, inter, vocab) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let head_dim = hidden / cfg.num_attention_heads;
    let (q, kv) = (head_dim * cfg.num_attention_heads, head_dim * cfg.num_key_value_heads);
    let mut expected: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![vocab, hidden]), ("model.norm.weight".into(), vec![hidden])];
    if !cfg.tie_word_embeddings {
        expected.push(("lm_head.weight".into(), vec![vocab, hidden]));
    }
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        expected.extend([
            (format!("{p}.self_attn.q_proj.weight"), vec![q, hidden]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, hidden]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, hidden]),
            (format!("{p}.self_attn.o_proj.weight"), vec![hidden, q]),
            (format!("{p}.mlp.gate_proj.weight"), vec![inter, hidden]),
            (format!("{p}.mlp.up_proj.weight"), vec![inter, hidden]),
            (format!("{p}.mlp.down_proj.weight"), vec![hidden, inter]),
            (format!("{p}.input_layernorm.weight"), vec![hidden]),
            (format!("{p}.post_attention_layernorm.weight"), vec![hidden]),
        ]);
    }
    for (name, shape) in expected {
        let view = tensors.get(&name).map_err(|_| Error::weights(dir, Some(&name), "missing"))?;
        if view.shape() != shape.as_slice() {
            let got = view.shape();
            return Err(Error::weights(dir, Some(&name), format!("shape {got:?}, expected {shape:?}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A deterministic pseudo-random tensor with std ≈ `scale` around `mean`.
    fn random(shape: &[usize], mean: f32, scale: f32, seed: &mut u64) -> Tensor {
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = (*seed >> 40) as f32 / (1u64 << 24) as f32; // uniform in [0, 1)
                mean + (u - 0.5) * scale * 3.46 // uniform has std 1/√12
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A tiny sharded Llama 3.1-style checkpoint: tied embeddings, llama3 rope, GQA 8/2.
    fn write_tiny(dir: &Path, drop_tensor: Option<&str>) {
        let (hidden, inter, vocab, layers) = (64, 128, 300, 2);
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 2,
            "head_dim": 8, "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 256, "tie_word_embeddings": true, "bos_token_id": 1,
            "eos_token_id": [2, 3],
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap_or_else(|e| panic!("{e}"));
        let mut seed = 7u64;
        let mut shards = [HashMap::new(), HashMap::new()];
        let mut weight_map = serde_json::Map::new();
        let mut put = |name: String, t: Tensor, shard: usize| {
            if drop_tensor != Some(name.as_str()) {
                weight_map.insert(name.clone(), format!("model-0000{}-of-00002.safetensors", shard + 1).into());
                shards[shard].insert(name, t);
            }
        };
        put("model.embed_tokens.weight".into(), random(&[vocab, hidden], 0.0, 1.0, &mut seed), 0);
        put("model.norm.weight".into(), random(&[hidden], 1.0, 0.1, &mut seed), 1);
        for i in 0..layers {
            let p = format!("model.layers.{i}");
            let lin = |o: usize, n: usize, s: &mut u64| random(&[o, n], 0.0, 1.0 / (n as f32).sqrt(), s);
            put(format!("{p}.self_attn.q_proj.weight"), lin(64, hidden, &mut seed), i);
            put(format!("{p}.self_attn.k_proj.weight"), lin(16, hidden, &mut seed), i);
            put(format!("{p}.self_attn.v_proj.weight"), lin(16, hidden, &mut seed), i);
            put(format!("{p}.self_attn.o_proj.weight"), lin(hidden, 64, &mut seed), i);
            put(format!("{p}.mlp.gate_proj.weight"), lin(inter, hidden, &mut seed), i);
            put(format!("{p}.mlp.up_proj.weight"), lin(inter, hidden, &mut seed), i);
            put(format!("{p}.mlp.down_proj.weight"), lin(hidden, inter, &mut seed), i);
            put(format!("{p}.input_layernorm.weight"), random(&[hidden], 1.0, 0.1, &mut seed), i);
            put(format!("{p}.post_attention_layernorm.weight"), random(&[hidden], 1.0, 0.1, &mut seed), i);
        }
        for (k, shard) in shards.iter().enumerate() {
            let file = dir.join(format!("model-0000{}-of-00002.safetensors", k + 1));
            candle_core::safetensors::save(shard, file).unwrap_or_else(|e| panic!("{e}"));
        }
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap_or_else(|e| panic!("{e}"));
    }

    fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
    }

    #[test]
    fn prefill_matches_incremental_decode() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        write_tiny(dir.path(), None);
        let mut peer = PeerLlama::load(dir.path())?;
        assert_eq!(peer.vocab_size(), 300);
        let tokens: Vec<u32> = (0..37).map(|i| (i * 53 + 11) % 300).collect();
        let rows = peer.logits_per_position(&tokens)?;
        assert_eq!(rows.len(), tokens.len());
        for k in [1, 2, 17, tokens.len()] {
            let prefill = peer.last_logits(&tokens[..k])?;
            assert_eq!(prefill.len(), 300);
            let err = max_rel_err(&prefill, &rows[k - 1]);
            assert!(err < 1e-4, "prefix {k}: rel err {err}");
        }
        // The positions must matter, or the comparison above would be vacuous.
        assert!(max_rel_err(&rows[0], &rows[1]) > 1e-3);

        let out = peer.greedy(&tokens, 5, 257)?;
        assert_eq!(out.len(), 5);
        assert!(out.iter().all(|&t| t < 257));
        assert_eq!(out[0], argmax(&rows[tokens.len() - 1][..257]));
        let (prefill, decode) = peer.time_generate(&tokens, 3)?;
        assert!(prefill > 0.0 && decode > 0.0);

        assert!(matches!(peer.last_logits(&[300]), Err(Error::Request { .. })));
        assert!(matches!(peer.last_logits(&[]), Err(Error::Request { .. })));
        assert!(matches!(peer.greedy(&tokens, 250, 300), Err(Error::Request { .. })));
        Ok(())
    }

    #[test]
    fn missing_tensor_is_an_error_not_a_panic() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        write_tiny(dir.path(), Some("model.layers.1.mlp.up_proj.weight"));
        match PeerLlama::load(dir.path()) {
            Err(Error::Weights { tensor: Some(t), .. }) => assert_eq!(t, "model.layers.1.mlp.up_proj.weight"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("loaded without a tensor"),
        }
        Ok(())
    }
}
