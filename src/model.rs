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
use crate::parallel::sharding::{Shard, ShardPlan};
use crate::parallel::Communicator;
use crate::rope::RopeTable;
use crate::runtime::batch::Batch;
use crate::weights::{TensorRef, TensorSlice, WeightStore};

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
    plan: ShardPlan,
}

impl<B: Backend> Llama<B> {
    /// Loads this rank's slices of every weight of `cfg` from `store` (the whole model when
    /// `shard` is [`Shard::single`]), checking presence, shape and dtype first. RoPE tables
    /// cover `max_positions`; `on_layer` is called after each layer (progress bars).
    pub fn load(
        backend: &B,
        cfg: &ModelConfig,
        store: &WeightStore,
        max_positions: usize,
        shard: Shard,
        mut on_layer: impl FnMut(usize),
    ) -> Result<Self> {
        let plan = ShardPlan::new(cfg, shard)?;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
        check_layer_count(cfg, store)?;
        let get = |name: &str, shape: &[usize]| store.get(name, shape);
        let vocab = |name: &str| -> Result<TensorSlice<'_>> {
            let mut s = get(name, &[cfg.vocab_size, h])?.row_slice(plan.vocab_rows.clone());
            s.pad_rows = plan.vocab_padding();
            Ok(s)
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let attn = |n: &str, shape: &[usize]| get(&format!("{p}.self_attn.{n}.weight"), shape);
            let mlp = |n: &str, shape: &[usize]| get(&format!("{p}.mlp.{n}.weight"), shape);
            let norm = |n: &str| get(&format!("{p}.{n}.weight"), &[h]).map(TensorRef::full);
            layers.push(Layer {
                input_norm: backend.load_weight(&[norm("input_layernorm")?])?,
                qkv: backend.load_weight(&[
                    attn("q_proj", &[q, h])?.row_slice(plan.q_rows.clone()),
                    attn("k_proj", &[kv, h])?.row_slice(plan.kv_rows.clone()),
                    attn("v_proj", &[kv, h])?.row_slice(plan.kv_rows.clone()),
                ])?,
                o_proj: backend.load_weight(&[attn("o_proj", &[h, q])?.col_slice(plan.q_rows.clone())])?,
                post_norm: backend.load_weight(&[norm("post_attention_layernorm")?])?,
                gate_up: backend.load_weight(&[
                    mlp("gate_proj", &[i, h])?.row_slice(plan.mlp_rows.clone()),
                    mlp("up_proj", &[i, h])?.row_slice(plan.mlp_rows.clone()),
                ])?,
                down: backend.load_weight(&[mlp("down_proj", &[h, i])?.col_slice(plan.mlp_rows.clone())])?,
            });
            on_layer(l + 1);
        }
        let lm_head =
            if cfg.tie_word_embeddings { None } else { Some(backend.load_weight(&[vocab("lm_head.weight")?])?) };
        let rope = RopeTable::new(cfg, max_positions);
        Ok(Llama {
            cfg: cfg.clone(),
            dims: AttnDims { heads: plan.heads, kv_heads: plan.kv_heads, head_dim: cfg.head_dim },
            embed: backend.load_weight(&[vocab("model.embed_tokens.weight")?])?,
            layers,
            norm: backend.load_weight(&[get("model.norm.weight", &[h])?.full()])?,
            lm_head,
            cos: backend.upload(&rope.cos, max_positions, rope.half)?,
            sin: backend.upload(&rope.sin, max_positions, rope.half)?,
            max_positions,
            plan,
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
    /// step's token rows `rows`, usually [`Batch::last_rows`]. Every rank of a tensor-parallel
    /// group runs this with the same batch; `comm` combines their partial results.
    pub fn forward(
        &self,
        backend: &B,
        batch: &Batch,
        cache: &mut B::KvCache,
        rows: &[usize],
        comm: &dyn Communicator<B>,
    ) -> Result<Vec<f32>> {
        if let Some(&p) = batch.positions.iter().max() {
            if p as usize >= self.max_positions {
                return Err(Error::request(
                    "prompt",
                    format!("position {p} is past the context length {}", self.max_positions),
                ));
            }
        }
        let eps = self.cfg.rms_norm_eps as f32;
        // Vocab-parallel embedding: ids outside this rank's rows give zero rows; the sum over
        // ranks is the full lookup.
        let first = self.plan.vocab_rows.start as u32;
        let local: Vec<u32> = batch.token_ids.iter().map(|&t| t.wrapping_sub(first)).collect();
        let mut x = backend.embed(&self.embed, &local)?;
        comm.all_reduce_sum(backend, &mut x)?;
        let mut normed = backend.rms_norm(&x, &self.layers[0].input_norm, eps)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let qkv = backend.matmul(&normed, &layer.qkv)?;
            let q = backend.rope_write_kv(&qkv, &self.cos, &self.sin, l, cache, batch, self.dims)?;
            let attn = backend.attention(&q, l, cache, batch, self.dims)?;
            let mut attn_out = backend.matmul(&attn, &layer.o_proj)?;
            comm.all_reduce_sum(backend, &mut attn_out)?;
            let h_normed = backend.add_rms_norm(&mut x, &attn_out, &layer.post_norm, eps)?;
            let gate_up = backend.matmul(&h_normed, &layer.gate_up)?;
            let mut mlp_out = backend.matmul(&backend.silu_mul(&gate_up)?, &layer.down)?;
            comm.all_reduce_sum(backend, &mut mlp_out)?;
            let next_norm = self.layers.get(l + 1).map_or(&self.norm, |n| &n.input_norm);
            normed = backend.add_rms_norm(&mut x, &mlp_out, next_norm, eps)?;
        }
        let last = backend.gather_rows(&normed, rows)?;
        let logits = backend.matmul(&last, self.lm_head.as_ref().unwrap_or(&self.embed))?;
        let logits = comm.all_gather_cols(backend, logits)?;
        let mut host = backend.to_host(&logits)?;
        // Gathered shards are padded to equal sizes: drop the padding columns.
        let (padded, vocab) = (self.plan.vocab_rows_per_rank * comm.world_size(), self.cfg.vocab_size);
        if padded != vocab {
            host = host.chunks(padded).flat_map(|r| r[..vocab].iter().copied()).collect();
        }
        Ok(host)
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
