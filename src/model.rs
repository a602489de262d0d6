//! The Llama forward pass, written once against [`Backend`].
//!
//! ```text
//! h   = x + o_proj(attention(rope(qkv(rms_norm(x)))))
//! out = h + down(silu(gate(rms_norm(h))) * up(rms_norm(h)))
//! ```
//! Weight names mirror the Hugging Face checkpoint (`model.layers.{i}.self_attn.q_proj.weight`),
//! so a reader can grep a tensor from the safetensors header straight to the code. q/k/v and
//! gate/up are fused into one matrix each at load time, so each is one GEMM per step.

use std::ops::Range;

use crate::backend::{AttnDims, Backend, KvCacheSpec, Runtime, StepInputs, StepLimits};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::parallel::sharding::{Shard, ShardPlan};
use crate::parallel::sizing::{
    head_weight_elements, kv_bytes_per_token, layer_weight_elements, rank_weight_elements, workspace_bytes,
};
use crate::parallel::Communicator;
use crate::quant::kv::{self, KvDtype, KvFormat, KvScale};
use crate::quant::Quantization;
use crate::rope::RopeTable;
use crate::runtime::batch::Batch;
use crate::runtime::sampler::{RowSampling, Sampled, StepOutput, StepSampling, NON_FINITE};
use crate::weights::random::RandomSlice;
use crate::weights::{fp8, DType, TensorSlice, WeightStore};

struct Layer<B: Backend> {
    input_norm: B::Weight,
    qkv: B::Weight,
    o_proj: B::Weight,
    post_norm: B::Weight,
    gate_up: B::Weight,
    down: B::Weight,
}

/// The next [`Llama`]'s id (0 is kept for steps outside a model).
static NEXT_MODEL_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

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
    /// What the KV cache stores, with its per-layer scales when e4m3.
    kv: KvFormat,
    /// This instance, for the backend's graphs ([`StepInputs::model`]).
    id: u64,
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
        on_layer: impl FnMut(usize),
    ) -> Result<Self> {
        check_layer_count(cfg, store)?;
        Self::build(backend, cfg, &Source::Checkpoint(store), max_positions, shard, on_layer)
    }

    /// A model of `cfg`'s shape whose weights are generated on the device from `seed` (see
    /// [`crate::weights::random`]): benchmarks of 8B to 405B shapes without checkpoint files.
    /// Rank `r`'s shard holds exactly rank `r`'s slices of the unsharded random model.
    pub fn random(
        backend: &B,
        cfg: &ModelConfig,
        seed: u64,
        max_positions: usize,
        shard: Shard,
        on_layer: impl FnMut(usize),
    ) -> Result<Self> {
        Self::build(backend, cfg, &Source::Random(seed), max_positions, shard, on_layer)
    }

    fn build(
        backend: &B,
        cfg: &ModelConfig,
        source: &Source<'_>,
        max_positions: usize,
        shard: Shard,
        mut on_layer: impl FnMut(usize),
    ) -> Result<Self> {
        let plan = ShardPlan::new(cfg, shard)?;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
        let weight = |parts: &[Part]| source.weight(backend, parts, None);
        // Linear weights may be FP8 (stored so, or quantized while loading); norms and embeddings never.
        let linear = |parts: &[Part]| source.weight(backend, parts, Some(cfg.quantization.as_ref()));
        let vocab = |name: &str| Part::rows(name, &[cfg.vocab_size, h], plan.vocab_rows.clone(), plan.vocab_padding());
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let attn = |n: &str| format!("model.layers.{l}.self_attn.{n}.weight");
            let mlp = |n: &str| format!("model.layers.{l}.mlp.{n}.weight");
            let norm = |n: &str| Part::full(&format!("model.layers.{l}.{n}.weight"), &[h]);
            layers.push(Layer {
                input_norm: weight(&[norm("input_layernorm")])?,
                qkv: linear(&[
                    Part::rows(&attn("q_proj"), &[q, h], plan.q_rows.clone(), 0),
                    Part::rows(&attn("k_proj"), &[kv, h], plan.kv_rows.clone(), 0),
                    Part::rows(&attn("v_proj"), &[kv, h], plan.kv_rows.clone(), 0),
                ])?,
                o_proj: linear(&[Part::cols(&attn("o_proj"), &[h, q], plan.q_rows.clone())])?,
                post_norm: weight(&[norm("post_attention_layernorm")])?,
                gate_up: linear(&[
                    Part::rows(&mlp("gate_proj"), &[i, h], plan.mlp_rows.clone(), 0),
                    Part::rows(&mlp("up_proj"), &[i, h], plan.mlp_rows.clone(), 0),
                ])?,
                down: linear(&[Part::cols(&mlp("down_proj"), &[h, i], plan.mlp_rows.clone())])?,
            });
            on_layer(l + 1);
        }
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(linear(&[vocab("lm_head.weight")])?) };
        let rope = RopeTable::new(cfg, max_positions);
        let kv_format = match (cfg.kv_cache, source) {
            (KvDtype::Model, _) => KvFormat::Model,
            (KvDtype::Fp8, Source::Checkpoint(store)) => KvFormat::Fp8(kv::load_scales(cfg, store)?),
            (KvDtype::Fp8, Source::Random(_)) => KvFormat::Fp8(vec![KvScale::ONE; cfg.num_hidden_layers].into()),
        };
        Ok(Llama {
            cfg: cfg.clone(),
            dims: AttnDims { heads: plan.heads, kv_heads: plan.kv_heads, head_dim: cfg.head_dim },
            embed: weight(&[vocab("model.embed_tokens.weight")])?,
            layers,
            norm: weight(&[Part::full("model.norm.weight", &[h])])?,
            lm_head,
            cos: backend.upload(&rope.cos, max_positions, rope.half)?,
            sin: backend.upload(&rope.sin, max_positions, rope.half)?,
            max_positions,
            plan,
            kv: kv_format,
            id: NEXT_MODEL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Weight elements one step reads on this rank: every layer, the final norm and the
    /// (padded) lm_head shard; of the embedding only the step's rows, which are left out.
    pub fn weight_elements_per_step(&self) -> u64 {
        self.cfg.num_hidden_layers as u64 * layer_weight_elements(&self.cfg, &self.plan)
            + head_weight_elements(&self.cfg, &self.plan)
    }

    /// Weight elements resident on this rank: what a step reads plus the embedding shard (when
    /// it is not the lm_head).
    pub fn resident_weight_elements(&self) -> u64 {
        rank_weight_elements(&self.cfg, &self.plan)
    }

    /// KV cache elements one cached token takes on this rank, over all layers (K and V).
    pub fn kv_elements_per_token(&self) -> u64 {
        (self.cfg.num_hidden_layers * 2 * self.dims.kv_heads * self.dims.head_dim) as u64
    }

    /// KV cache bytes one cached token takes on this rank on a backend whose activation
    /// element is `element_bytes` (an FP8 cache: one byte an element).
    pub fn kv_bytes_per_token(&self, element_bytes: usize) -> u64 {
        kv_bytes_per_token(&self.cfg, self.dims.kv_heads, element_bytes as u64)
    }

    /// Floating-point operations of a `tokens`-token prefill on this rank: every layer's GEMMs
    /// for every token, causal attention (QKᵀ and PV over half the square), and the lm_head
    /// for the last token only.
    pub fn prefill_flops(&self, tokens: usize) -> f64 {
        let (t, layers) = (tokens as f64, self.cfg.num_hidden_layers as f64);
        let gemm = 2.0 * t * layer_weight_elements(&self.cfg, &self.plan) as f64;
        let attention = 2.0 * t * t * self.dims.q_dim() as f64;
        layers * (gemm + attention) + 2.0 * head_weight_elements(&self.cfg, &self.plan) as f64
    }

    /// Bytes of activations the largest step of `limits` holds at once on this rank, with
    /// `element_bytes` a stored element (sizes the backend's step workspace): per token row the
    /// tensors a layer keeps alive together (residual, norms, qkv, q, attention out, o_proj,
    /// gate_up, SiLU·mul, down, the next norm), the attention partials of the largest decode
    /// batch split 64 ways, and the logits (gathered, plus sampling scratch in f32). FP8 models
    /// add the FP8 GEMM's scratch (e4m3 activations and the f32 product of gate/up).
    pub fn workspace_bytes(&self, limits: &StepLimits, element_bytes: usize) -> usize {
        usize::try_from(workspace_bytes(&self.cfg, &self.plan, limits, element_bytes)).unwrap_or(usize::MAX)
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
            kv: self.kv.clone(),
        }
    }
}

/// Steps: framed by the backend's runtime (begin, run or replay, end).
impl<B: Runtime> Llama<B> {
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
        let (_scope, logits) = self.device_logits(backend, batch, cache, rows, comm, comm.capturable())?;
        self.host_logits(backend, &logits, comm.world_size(), rows.len())
    }

    /// Runs one step and picks the next token of each of `sampling.rows` on the device, so that
    /// only token ids cross to the host (and the rows' logits when `sampling.want_logits`).
    /// Every rank runs the step; rank 0 samples (the others return no tokens and need only
    /// `sampling.rows`).
    pub fn step(
        &self,
        backend: &B,
        batch: &Batch,
        cache: &mut B::KvCache,
        sampling: &StepSampling,
        comm: &dyn Communicator<B>,
    ) -> Result<StepOutput> {
        let graphable = comm.capturable();
        let (step, logits) = self.device_logits(backend, batch, cache, &sampling.rows, comm, graphable)?;
        if comm.rank() != 0 {
            return Ok(StepOutput::default());
        }
        if sampling.per_row.len() != sampling.rows.len() {
            return Err(Error::Backend(format!(
                "step: {} sampling rows for {} logits rows",
                sampling.per_row.len(),
                sampling.rows.len()
            )));
        }
        // Never a padded column: those past the vocabulary, or past the gathered width.
        let width = self.plan.vocab_rows_per_rank * comm.world_size();
        let valid = sampling.valid.min(self.cfg.vocab_size).min(width);
        // The host computed the constrained rows' masks while the forward pass ran.
        let masks = sampling.masks.wait()?;
        let ids = backend.sample(&logits, step.step(), &sampling.per_row, valid, masks.as_ref())?;
        let flagged = ids.contains(&NON_FINITE);
        let logits = match sampling.want_logits || flagged {
            true => Some(self.host_logits(backend, &logits, comm.world_size(), sampling.rows.len())?),
            false => None,
        };
        let vocab = self.cfg.vocab_size;
        let tokens = ids
            .into_iter()
            .enumerate()
            .map(|(i, id)| match (id, &logits) {
                (NON_FINITE, Some(l)) => {
                    Sampled::NonFinite { rank: self.rank_of_first_non_finite(&l[i * vocab..][..vocab]) }
                }
                (NON_FINITE, None) => Sampled::NonFinite { rank: 0 },
                (id, _) => Sampled::Token(id),
            })
            .collect();
        Ok(StepOutput { tokens, logits: logits.filter(|_| sampling.want_logits) })
    }

    /// Captures the backend's decode graphs before the first request, largest bucket first
    /// (all sharing the step workspace): each bucket's step runs once eagerly — measuring the
    /// GEMV/cuBLASLt choice of its shapes — and is then captured. The steps are dummies: row
    /// `i` is token 0 at position 0 of block `i` (of the cache's `num_blocks`), a slot a real
    /// sequence writes before it reads, and a slot of its own, so that no two rows of a step
    /// write the same KV bytes (the emulator's racecheck reports that, values aside). Every
    /// rank of a group runs this at the same time, so their collectives meet.
    pub fn warm_up(
        &self,
        backend: &B,
        cache: &mut B::KvCache,
        comm: &dyn Communicator<B>,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<()> {
        if !comm.capturable() {
            return Ok(());
        }
        for b in backend.graph_buckets().into_iter().rev() {
            let mut batch = Batch::new(block_size);
            for i in 0..b {
                batch.push(&[0], 0, &[(i % num_blocks.max(1)) as u32])?;
            }
            let rows = batch.last_rows();
            for _ in 0..2 {
                self.device_logits(backend, &batch, cache, &rows, comm, true)?;
            }
        }
        Ok(())
    }

    /// The steps whose measured workspace sizes the step workspace (vLLM's profile run), run
    /// before the KV cache is sized, on a cache of their own that is freed after: the largest
    /// prefill twice — `max_num_batched_tokens` rows of one sequence (the most keys), and over
    /// `max_num_seqs` sequences (the most rows sampled: each sequence's last, not greedily, so
    /// that the sampling scratch counts) — then a
    /// decode step of each graph bucket (or of `max_num_seqs` rows without graphs) at the last
    /// position of the context, where attention splits the keys the most. Each row writes a
    /// slot of its own (racecheck). Every rank of a group runs this at the same time.
    pub fn profile_steps(
        &self,
        backend: &B,
        comm: &dyn Communicator<B>,
        limits: &StepLimits,
        block_size: usize,
    ) -> Result<()> {
        let tokens = limits.max_num_batched_tokens.min(self.max_positions).max(1);
        let decode = limits.max_num_seqs.max(1);
        let num_blocks = (tokens.div_ceil(block_size) + decode).max(decode);
        let mut cache = backend.new_kv_cache(&self.kv_cache_spec(num_blocks, block_size))?;
        let sampled = RowSampling { temperature: 1.0, uniform: 0.5, ..RowSampling::greedy() };
        let valid = self.cfg.vocab_size.min(self.plan.vocab_rows_per_rank * comm.world_size());
        let mut splits = vec![1];
        splits.extend(Some(decode.min(tokens)).filter(|&n| n > 1));
        for seqs in splits {
            let mut batch = Batch::new(block_size);
            let mut next_block = 0u32;
            for s in 0..seqs {
                let len = tokens / seqs + usize::from(s < tokens % seqs);
                let blocks = len.div_ceil(block_size) as u32;
                batch.push(&vec![0; len], 0, &(next_block..next_block + blocks).collect::<Vec<_>>())?;
                next_block += blocks;
            }
            let rows = batch.last_rows();
            let (step, logits) = self.device_logits(backend, &batch, &mut cache, &rows, comm, false)?;
            if comm.rank() == 0 {
                backend.sample(&logits, step.step(), &vec![sampled.clone(); rows.len()], valid, None)?;
            }
            drop(logits);
            drop(step);
        }
        let graphable = comm.capturable() && !backend.graph_buckets().is_empty();
        let sizes = if graphable { backend.graph_buckets() } else { vec![decode] };
        let context = self.max_positions.div_ceil(block_size);
        for b in sizes {
            let mut batch = Batch::new(block_size);
            for i in 0..b {
                batch.push(&[0], self.max_positions - 1, &vec![(i % num_blocks) as u32; context])?;
            }
            let rows = batch.last_rows();
            self.device_logits(backend, &batch, &mut cache, &rows, comm, graphable)?;
        }
        Ok(())
    }

    /// The rank whose vocabulary shard holds the first non-finite logit of `row` (only on the
    /// error path: the row is copied to the host to find it).
    fn rank_of_first_non_finite(&self, row: &[f32]) -> usize {
        row.iter().position(|x| !x.is_finite()).map_or(0, |c| c / self.plan.vocab_rows_per_rank.max(1))
    }

    /// The gathered logits of `rows` on the device: `rows.len() × (vocab shard rows · world)`,
    /// padding columns included (and padding rows after them, when the backend ran the step as a
    /// graph of a larger bucket), inside the step the returned scope ends when dropped.
    fn device_logits<'a>(
        &self,
        backend: &'a B,
        batch: &Batch,
        cache: &mut B::KvCache,
        rows: &[usize],
        comm: &dyn Communicator<B>,
        graphable: bool,
    ) -> Result<(StepScope<'a, B>, B::Tensor)> {
        if let Some(&p) = batch.positions.iter().max() {
            if p as usize >= self.max_positions {
                return Err(Error::request(
                    "prompt",
                    format!("position {p} is past the context length {}", self.max_positions),
                ));
            }
        }
        let world = comm.world_size();
        if world != self.plan.shard.world && world != 1 {
            return Err(Error::Backend(format!(
                "a shard of a {}-rank model cannot run in a group of {world}",
                self.plan.shard.world
            )));
        }
        // Vocab-parallel embedding: ids outside this rank's rows give zero rows; the sum over
        // ranks is the full lookup.
        let first = self.plan.vocab_rows.start as u32;
        let local: Vec<u32> = batch.token_ids.iter().map(|&t| t.wrapping_sub(first)).collect();
        let scope = StepScope {
            backend,
            step: Some(backend.begin_step(&StepInputs {
                batch,
                ids: &local,
                rows,
                dims: Some(self.dims),
                graphable,
                model: self.id,
            })?),
        };
        let step = scope.step();
        let logits = backend.run_step(step, &mut || self.forward_pass(backend, step, cache, comm))?;
        Ok((scope, logits))
    }

    /// Embedding, every layer, the final norm and the lm_head of the step's rows: the step's
    /// forward pass.
    fn forward_pass(
        &self,
        backend: &B,
        step: &B::Step,
        cache: &mut B::KvCache,
        comm: &dyn Communicator<B>,
    ) -> Result<B::Tensor> {
        let eps = self.cfg.rms_norm_eps as f32;
        let mut x = backend.embed(&self.embed, step)?;
        comm.all_reduce_sum(backend, &mut x)?;
        let mut normed = backend.rms_norm(&x, &self.layers[0].input_norm, eps)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let q =
                backend.matmul_rope_write_kv(&normed, &layer.qkv, &self.cos, &self.sin, l, cache, step, self.dims)?;
            let attn = backend.attention(&q, l, cache, step, self.dims)?;
            let mut attn_out = backend.matmul(&attn, &layer.o_proj)?;
            comm.all_reduce_sum(backend, &mut attn_out)?;
            let h_normed = backend.add_rms_norm(&mut x, &attn_out, &layer.post_norm, eps)?;
            let mut mlp_out = backend.matmul(&backend.matmul_silu_mul(&h_normed, &layer.gate_up)?, &layer.down)?;
            comm.all_reduce_sum(backend, &mut mlp_out)?;
            let next_norm = self.layers.get(l + 1).map_or(&self.norm, |n| &n.input_norm);
            normed = backend.add_rms_norm(&mut x, &mlp_out, next_norm, eps)?;
        }
        let last = backend.gather_rows(&normed, step)?;
        let logits = backend.matmul(&last, self.lm_head.as_ref().unwrap_or(&self.embed))?;
        comm.all_gather_cols(backend, logits)
    }

    /// Gathered logits of the first `rows` rows on the host, without the padding columns (nor
    /// a graph bucket's padding rows). A shard run alone (`tulu bench --rank-shard`, `world` 1)
    /// keeps its own columns.
    fn host_logits(&self, backend: &B, logits: &B::Tensor, world: usize, rows: usize) -> Result<Vec<f32>> {
        let mut host = backend.to_host(logits)?;
        let (padded, vocab) = (self.plan.vocab_rows_per_rank * world, self.cfg.vocab_size);
        host.truncate(rows * padded);
        if padded > vocab {
            host = host.chunks(padded).flat_map(|r| r[..vocab].iter().copied()).collect();
        }
        Ok(host)
    }
}

/// A step begun on a backend, ended when dropped (after everything that reads its tensors).
struct StepScope<'a, B: Runtime> {
    backend: &'a B,
    /// Always `Some` until the drop hands it to `end_step`.
    step: Option<B::Step>,
}

impl<B: Runtime> StepScope<'_, B> {
    /// The step every op of the step is given.
    fn step(&self) -> &B::Step {
        self.step.as_ref().expect("a step scope holds its step until dropped")
    }
}

impl<B: Runtime> Drop for StepScope<'_, B> {
    fn drop(&mut self) {
        if let Some(step) = self.step.take() {
            self.backend.end_step(step);
        }
    }
}

/// Where a model's weights come from.
enum Source<'a> {
    /// A checkpoint: each rank reads its slices from the mapped files.
    Checkpoint(&'a WeightStore),
    /// Generated on the device from a seed.
    Random(u64),
}

/// One rank's part of one tensor: its checkpoint name and shape, the rows and columns taken
/// (1-D tensors are one row), and zero rows appended.
struct Part {
    name: String,
    shape: Vec<usize>,
    rows: Range<usize>,
    cols: Range<usize>,
    pad_rows: usize,
}

impl Part {
    /// The whole 1-D tensor `name`.
    fn full(name: &str, shape: &[usize]) -> Self {
        let n = shape.iter().product();
        Part { name: name.to_owned(), shape: shape.to_vec(), rows: 0..1, cols: 0..n, pad_rows: 0 }
    }

    /// Rows `rows` of a 2-D tensor (column-parallel), padded with `pad_rows` zero rows.
    fn rows(name: &str, shape: &[usize; 2], rows: Range<usize>, pad_rows: usize) -> Self {
        Part { name: name.to_owned(), shape: shape.to_vec(), rows, cols: 0..shape[1], pad_rows }
    }

    /// Columns `cols` of a 2-D tensor (row-parallel).
    fn cols(name: &str, shape: &[usize; 2], cols: Range<usize>) -> Self {
        Part { name: name.to_owned(), shape: shape.to_vec(), rows: 0..shape[0], cols, pad_rows: 0 }
    }
}

impl Source<'_> {
    /// One weight made of `parts` concatenated along rows, on `backend`. `linear` is `None` for
    /// norms and embeddings, and for a linear weight the model's quantization: its FP8 parts
    /// load with their scales, and with `--quantize fp8` its bf16 parts are quantized.
    fn weight<B: Backend>(
        &self,
        backend: &B,
        parts: &[Part],
        linear: Option<Option<&Quantization>>,
    ) -> Result<B::Weight> {
        let bound = linear.flatten().and_then(Quantization::activation_bound);
        let blocks = linear.flatten().and_then(Quantization::at_load_blocks);
        let at_load = |p: &Part| {
            let module = p.name.strip_suffix(".weight").unwrap_or(&p.name);
            linear.flatten().is_some_and(|q| q.quantizes_at_load(module))
        };
        match self {
            Source::Checkpoint(store) => {
                let slices = parts
                    .iter()
                    .map(|p| {
                        let t = store.get(&p.name, &p.shape)?;
                        let mut s = t.slice(p.rows.clone(), p.cols.clone());
                        s.pad_rows = p.pad_rows;
                        if let (Some(quant), DType::F8E4M3) = (linear, t.dtype) {
                            s.scale = Some(fp8::scales_for(store, quant, &t)?);
                        }
                        Ok(s)
                    })
                    .collect::<Result<Vec<TensorSlice<'_>>>>()?;
                let w = match (slices.iter().any(|s| s.scale.is_some()) || parts.iter().any(at_load), blocks) {
                    (true, Some(b)) if slices.iter().all(|s| s.scale.is_none()) => {
                        backend.load_block_weight(&slices, b)?
                    }
                    (true, _) => backend.load_fp8_weight(&slices, bound)?,
                    (false, _) => backend.load_weight(&slices)?,
                };
                // On the device now: its pages need not stay resident (WeightStore::release).
                for p in parts {
                    store.release(&p.name);
                }
                Ok(w)
            }
            Source::Random(seed) => {
                let slices: Vec<RandomSlice> = parts
                    .iter()
                    .map(|p| RandomSlice {
                        pad_rows: p.pad_rows,
                        ..RandomSlice::for_tensor(*seed, &p.name, &p.shape, p.rows.clone(), p.cols.clone())
                    })
                    .collect();
                match (parts.iter().any(at_load), blocks) {
                    (true, Some(b)) => backend.random_block_weight(&slices, b),
                    (true, None) => backend.random_fp8_weight(&slices, bound),
                    (false, _) => backend.random_weight(&slices),
                }
            }
        }
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
