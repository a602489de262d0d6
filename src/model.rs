//! The Llama forward pass, written once against [`Backend`].
//!
//! ```text
//! h   = x + o_proj(attention(rope(qkv(rms_norm(x)))))
//! out = h + down(silu(gate(rms_norm(h))) * up(rms_norm(h)))
//! ```
//! Weight names mirror the Hugging Face checkpoint (`model.layers.{i}.self_attn.q_proj.weight`),
//! so a reader can grep a tensor from the safetensors header straight to the code. q/k/v and
//! gate/up are fused into one matrix each at load time, so each is one GEMM per step.

use crate::backend::{AttnDims, Backend, KvCacheSpec};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::rope::RopeTable;
use crate::runtime::batch::Batch;
use crate::weights::{TensorRef, WeightStore};

struct Layer<B: Backend> {
    input_norm: B::Weight,
    qkv: B::Weight,
    o_proj: B::Weight,
    post_norm: B::Weight,
    gate_up: B::Weight,
    down: B::Weight,
}

/// A Llama model resident on a backend.
pub struct Llama<B: Backend> {
    cfg: ModelConfig,
    dims: AttnDims,
    embed: B::Weight,
    layers: Vec<Layer<B>>,
    norm: B::Weight,
    /// `None` when the embedding is tied.
    lm_head: Option<B::Weight>,
    cos: B::Weight,
    sin: B::Weight,
    max_positions: usize,
}

impl<B: Backend> Llama<B> {
    /// Loads every weight of `cfg` from `store`, checking presence, shape and dtype first.
    /// RoPE tables cover `max_positions`; `on_tensor` is called after each layer (progress bars).
    pub fn load(
        backend: &B,
        cfg: &ModelConfig,
        store: &WeightStore,
        max_positions: usize,
        mut on_layer: impl FnMut(usize),
    ) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
        check_layer_count(cfg, store)?;
        let w = |name: &str, shape: &[usize]| store.get(name, shape).map(TensorRef::full);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let attn = |n: &str, shape: &[usize]| w(&format!("{p}.self_attn.{n}.weight"), shape);
            let mlp = |n: &str, shape: &[usize]| w(&format!("{p}.mlp.{n}.weight"), shape);
            layers.push(Layer {
                input_norm: backend.load_weight(&[w(&format!("{p}.input_layernorm.weight"), &[h])?])?,
                qkv: backend.load_weight(&[
                    attn("q_proj", &[q, h])?,
                    attn("k_proj", &[kv, h])?,
                    attn("v_proj", &[kv, h])?,
                ])?,
                o_proj: backend.load_weight(&[attn("o_proj", &[h, q])?])?,
                post_norm: backend.load_weight(&[w(&format!("{p}.post_attention_layernorm.weight"), &[h])?])?,
                gate_up: backend.load_weight(&[mlp("gate_proj", &[i, h])?, mlp("up_proj", &[i, h])?])?,
                down: backend.load_weight(&[mlp("down_proj", &[h, i])?])?,
            });
            on_layer(l + 1);
        }
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(backend.load_weight(&[w("lm_head.weight", &[cfg.vocab_size, h])?])?)
        };
        let rope = RopeTable::new(cfg, max_positions);
        Ok(Llama {
            cfg: cfg.clone(),
            dims: AttnDims {
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
            },
            embed: backend.load_weight(&[w("model.embed_tokens.weight", &[cfg.vocab_size, h])?])?,
            layers,
            norm: backend.load_weight(&[w("model.norm.weight", &[h])?])?,
            lm_head,
            cos: backend.upload(&rope.cos, max_positions, rope.half)?,
            sin: backend.upload(&rope.sin, max_positions, rope.half)?,
            max_positions,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Longest context the loaded RoPE tables cover.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The KV cache shape for `num_blocks` blocks of `block_size` tokens.
    pub fn kv_cache_spec(&self, num_blocks: usize, block_size: usize) -> KvCacheSpec {
        KvCacheSpec {
            layers: self.cfg.num_hidden_layers,
            num_blocks,
            block_size,
            kv_heads: self.dims.kv_heads,
            head_dim: self.dims.head_dim,
        }
    }

    /// Runs one step and returns the logits (`rows.len() × vocab_size`, row-major) of the
    /// step's token rows `rows`; usually [`Batch::last_rows`].
    pub fn forward(&self, backend: &B, batch: &Batch, cache: &mut B::KvCache, rows: &[usize]) -> Result<Vec<f32>> {
        if let Some(&p) = batch.positions.iter().max() {
            if p as usize >= self.max_positions {
                return Err(Error::request(
                    "prompt",
                    format!("position {p} is past the context length {}", self.max_positions),
                ));
            }
        }
        let eps = self.cfg.rms_norm_eps as f32;
        let mut x = backend.embed(&self.embed, &batch.token_ids)?;
        let mut normed = backend.rms_norm(&x, &self.layers[0].input_norm, eps)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let qkv = backend.matmul(&normed, &layer.qkv)?;
            let q = backend.rope_write_kv(&qkv, &self.cos, &self.sin, l, cache, batch, self.dims)?;
            let attn = backend.attention(&q, l, cache, batch, self.dims)?;
            let attn_out = backend.matmul(&attn, &layer.o_proj)?;
            let h_normed = backend.add_rms_norm(&mut x, &attn_out, &layer.post_norm, eps)?;
            let gate_up = backend.matmul(&h_normed, &layer.gate_up)?;
            let mlp_out = backend.matmul(&backend.silu_mul(&gate_up)?, &layer.down)?;
            let next_norm = self.layers.get(l + 1).map_or(&self.norm, |n| &n.input_norm);
            normed = backend.add_rms_norm(&mut x, &mlp_out, next_norm, eps)?;
        }
        let last = backend.gather_rows(&normed, rows)?;
        let logits = backend.matmul(&last, self.lm_head.as_ref().unwrap_or(&self.embed))?;
        backend.to_host(&logits)
    }
}

/// A config that promises more layers than the checkpoint holds is caught here, naming the field.
fn check_layer_count(cfg: &ModelConfig, store: &WeightStore) -> Result<()> {
    // A layer counts as present when any of its tensors is; a missing single tensor is then
    // reported by name when it is fetched.
    let present = store
        .names()
        .iter()
        .filter_map(|n| n.strip_prefix("model.layers.")?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |l| l + 1);
    if present < cfg.num_hidden_layers {
        return Err(Error::Config {
            file: "config.json".into(),
            field: "num_hidden_layers".into(),
            message: format!("is {}, but the checkpoint has weights for only {present} layers", cfg.num_hidden_layers),
        });
    }
    Ok(())
}
