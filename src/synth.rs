//! Synthetic random-weight checkpoints of any Llama shape, for tests and benchmarks.
//!
//! A synthetic checkpoint is an ordinary Hugging Face directory (safetensors, sharded with an
//! index when large, config, generation config, tokenizer files), so everything that loads it
//! takes the same path as for a real model. Weights are deterministic in the seed and scaled
//! like a trained model's (std ≈ 1/√fan_in, norms ≈ 1), so activations stay finite and logits
//! stay O(1) at any depth. Tensors are generated as the writer reaches them and in parallel
//! chunks, so even the 405B preset never has more than one tensor in memory.
//!
//! The checkpoint-writing pieces at the end ([`OutDType`], the staging directory renamed into
//! place only when complete, lazily produced safetensors tensors) are shared with GGUF
//! conversion ([`crate::weights::gguf`]).

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use safetensors::{Dtype, View};
use serde_json::json;
use tokenizers::Tokenizer;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::weights::gguf_tokenizer::{self, BpeSpec, PreTokenizerKind, SpecialIds};

/// Options for [`synth_checkpoint`].
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// The dtype of the written weights.
    pub dtype: OutDType,
    /// Seed of every weight: the same seed gives byte-identical files.
    pub seed: u64,
    /// Largest shard in bytes; a larger checkpoint is split into shards with an index
    /// (a single tensor larger than this gets a shard of its own).
    pub max_shard_bytes: u64,
    /// A `tokenizer.json` to copy (e.g. the real Llama 3 tokenizer) instead of the built-in one.
    pub tokenizer: Option<PathBuf>,
    /// The chat template for `tokenizer_config.json`; a ChatML-style one when `None`.
    pub chat_template: Option<String>,
    /// Show a progress bar over the tensors on stderr.
    pub progress: bool,
}

impl Default for SynthOptions {
    fn default() -> Self {
        Self {
            dtype: OutDType::F32,
            seed: 0,
            max_shard_bytes: 2 << 30,
            tokenizer: None,
            chat_template: None,
            progress: false,
        }
    }
}

/// The chat template written when none is given: ChatML turns after a BOS, as Llama 3.1's
/// template writes its own BOS.
pub const DEFAULT_CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The turn markers of [`DEFAULT_CHAT_TEMPLATE`], special tokens of the built-in tokenizer.
const CHAT_TOKENS: [&str; 2] = ["<|im_start|>", "<|im_end|>"];

/// Writes a random-weight checkpoint of shape `cfg` into the directory `out`, which must not
/// exist or be empty; on error nothing is left there.
pub fn synth_checkpoint(cfg: &ModelConfig, out: &Path, opts: &SynthOptions) -> Result<()> {
    if opts.max_shard_bytes == 0 {
        return Err(Error::request("max_shard_bytes", "must be at least 1"));
    }
    let tok = match &opts.tokenizer {
        Some(path) => file_tokenizer(cfg, path)?,
        None => builtin_tokenizer(cfg)?,
    };
    let staged = StagedDir::new(out)?;
    let dir = staged.path().to_path_buf();

    let specs = tensor_specs(cfg);
    let shards = plan_shards(&specs, opts.dtype, opts.max_shard_bytes);
    let state = WriteState::new(specs.len() as u64, opts.progress, "synthesizing");
    let shard_name = |k: usize| match shards.len() {
        1 => "model.safetensors".to_owned(),
        n => format!("model-{:05}-of-{n:05}.safetensors", k + 1),
    };
    let mut weight_map = BTreeMap::new();
    for (k, shard) in shards.iter().enumerate() {
        let name = shard_name(k);
        let tensors = shard
            .iter()
            .map(|&s| {
                let spec = &specs[s];
                weight_map.insert(spec.name.clone(), name.clone());
                let produce = move || -> Result<Vec<u8>> { Ok(generate(spec, opts.seed, opts.dtype)) };
                (spec.name.clone(), LazyTensor::new(opts.dtype, spec.shape.clone(), Box::new(produce), &state))
            })
            .collect();
        write_safetensors(&dir.join(&name), tensors, &state)?;
    }
    state.finish();
    if shards.len() > 1 {
        let total: u64 = specs.iter().map(|s| s.numel() * opts.dtype.size() as u64).sum();
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }

    let mut written = cfg.clone();
    written.torch_dtype = Some(opts.dtype.torch_name().into());
    write_json(&dir.join("config.json"), &written.to_json())?;
    let mut stop_ids = cfg.eos_token_ids.clone();
    for name in CHAT_TOKENS[1..].iter() {
        if let Some(id) = tok.tokenizer.token_to_id(name).filter(|id| !stop_ids.contains(id)) {
            stop_ids.push(id);
        }
    }
    let mut generation = json!({ "eos_token_id": stop_ids, "_from_model_config": false });
    if let Some(bos) = cfg.bos_token_id {
        generation["bos_token_id"] = json!(bos);
    }
    write_json(&dir.join("generation_config.json"), &generation)?;

    let tok_path = dir.join("tokenizer.json");
    match &opts.tokenizer {
        // Copied byte for byte: a re-serialized tokenizer could differ in ways that matter.
        Some(src) => std::fs::copy(src, &tok_path).map(drop).map_err(|e| Error::io(src, e))?,
        None => tok
            .tokenizer
            .save(&tok_path, false)
            .map_err(|e| Error::Tokenizer { file: tok_path.clone(), message: format!("cannot write: {e}") })?,
    }
    let template = opts.chat_template.as_deref().unwrap_or(DEFAULT_CHAT_TEMPLATE);
    let tok_cfg =
        gguf_tokenizer::tokenizer_config_json(&tok.tokenizer, &tok.ids, Some(template), cfg.max_position_embeddings);
    write_json(&dir.join("tokenizer_config.json"), &tok_cfg)?;
    staged.commit()
}

/// How one synthetic tensor's values are drawn.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// Normal with this standard deviation.
    Normal(f32),
    /// RMSNorm gains: 1 plus a little noise, so a wrong norm weight still shows in tests.
    NormGain,
}

/// One tensor of the checkpoint.
#[derive(Debug, Clone)]
struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

impl TensorSpec {
    fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// Every tensor of a Llama checkpoint of shape `cfg`, in HF names and file order.
fn tensor_specs(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let linear = |name: String, rows: usize, cols: usize| TensorSpec {
        name,
        shape: vec![rows, cols],
        init: Init::Normal(1.0 / (cols as f32).sqrt()),
    };
    let norm = |name: String| TensorSpec { name, shape: vec![h], init: Init::NormGain };
    // Embedding rows at 1/√h keep tied logits O(1); untied ones are renormalized anyway.
    let mut specs = vec![linear("model.embed_tokens.weight".into(), v, h)];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        specs.push(norm(format!("{p}.input_layernorm.weight")));
        specs.push(linear(format!("{p}.self_attn.q_proj.weight"), cfg.q_dim(), h));
        specs.push(linear(format!("{p}.self_attn.k_proj.weight"), cfg.kv_dim(), h));
        specs.push(linear(format!("{p}.self_attn.v_proj.weight"), cfg.kv_dim(), h));
        specs.push(linear(format!("{p}.self_attn.o_proj.weight"), h, cfg.q_dim()));
        specs.push(norm(format!("{p}.post_attention_layernorm.weight")));
        specs.push(linear(format!("{p}.mlp.gate_proj.weight"), i, h));
        specs.push(linear(format!("{p}.mlp.up_proj.weight"), i, h));
        specs.push(linear(format!("{p}.mlp.down_proj.weight"), h, i));
    }
    specs.push(norm("model.norm.weight".into()));
    if !cfg.tie_word_embeddings {
        specs.push(linear("lm_head.weight".into(), v, h));
    }
    specs
}

/// Groups tensors (by index, in order) into shards of at most `max_bytes` each.
fn plan_shards(specs: &[TensorSpec], dtype: OutDType, max_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut used = 0u64;
    for (k, spec) in specs.iter().enumerate() {
        let bytes = spec.numel() * dtype.size() as u64;
        if used + bytes > max_bytes && used > 0 {
            shards.push(Vec::new());
            used = 0;
        }
        used += bytes;
        if let Some(last) = shards.last_mut() {
            last.push(k);
        }
    }
    shards
}

/// Elements generated per independently seeded chunk: chunks run in parallel yet the bytes
/// depend only on the seed, the tensor name and the chunk index.
const CHUNK: usize = 1 << 16;

/// The encoded values of one tensor.
fn generate(spec: &TensorSpec, seed: u64, dtype: OutDType) -> Vec<u8> {
    let numel = spec.numel() as usize;
    let size = dtype.size();
    let tensor_seed = seed ^ fnv1a(&spec.name);
    let mut bytes = vec![0u8; numel * size];
    bytes.par_chunks_mut(CHUNK * size).enumerate().for_each(|(c, out)| {
        let mut rng = SplitMix64(tensor_seed ^ (c as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let mut values = Vec::with_capacity(out.len() / size + 1);
        while values.len() < out.len() / size {
            let (a, b) = rng.normal_pair();
            values.push(a);
            values.push(b);
        }
        values.truncate(out.len() / size);
        for x in values.iter_mut() {
            *x = match spec.init {
                Init::Normal(std) => *x * std,
                Init::NormGain => 1.0 + 0.02 * *x,
            };
        }
        out.copy_from_slice(&dtype.encode(&values));
    });
    bytes
}

/// FNV-1a, to give each tensor its own stream from one seed.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// SplitMix64: tiny, fast, and fixed forever (unlike `rand`'s `StdRng`), so checkpoints made
/// by different tulu versions with the same seed stay identical.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform in (0, 1), never 0, so its log is finite.
    fn open01(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Two independent standard normals (Box–Muller).
    fn normal_pair(&mut self) -> (f32, f32) {
        let r = (-2.0 * self.open01().ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * self.open01();
        ((r * theta.cos()) as f32, (r * theta.sin()) as f32)
    }
}

/// A tokenizer for the checkpoint and the special ids its config names.
struct SynthTokenizer {
    tokenizer: Tokenizer,
    ids: SpecialIds,
}

/// Loads the `tokenizer.json` to copy and checks that it fits the embedding rows.
fn file_tokenizer(cfg: &ModelConfig, path: &Path) -> Result<SynthTokenizer> {
    let terr = |message: String| Error::Tokenizer { file: path.to_path_buf(), message };
    let tokenizer = Tokenizer::from_file(path).map_err(|e| terr(format!("cannot load: {e}")))?;
    let size = tokenizer.get_vocab_size(true);
    if size > cfg.vocab_size {
        return Err(terr(format!("has {size} tokens, more than vocab_size = {}", cfg.vocab_size)));
    }
    let ids = SpecialIds { bos: cfg.bos_token_id, eos: cfg.eos_token_ids.first().copied(), ..SpecialIds::default() };
    Ok(SynthTokenizer { tokenizer, ids })
}

/// A byte-level BPE tokenizer whose special tokens sit at the config's BOS/EOS ids, a few
/// tokens smaller than `vocab_size` so the embedding has padded rows (as Tülu 3's does).
fn builtin_tokenizer(cfg: &ModelConfig) -> Result<SynthTokenizer> {
    let verr = |message: String| Error::request("vocab_size", message);
    let mut fixed: BTreeMap<u32, String> = BTreeMap::new();
    let eos_first = cfg.eos_token_ids.first().copied();
    if let Some(bos) = cfg.bos_token_id {
        fixed.insert(bos, "<|begin_of_text|>".into());
    }
    for (k, &eos) in cfg.eos_token_ids.iter().enumerate() {
        let name = if Some(eos) == cfg.bos_token_id {
            "<|endoftext|>".to_owned()
        } else if k == 0 {
            "<|end_of_text|>".to_owned()
        } else {
            format!("<|eos_{k}|>")
        };
        fixed.insert(eos, name);
    }
    let max_fixed = fixed.keys().next_back().map_or(0, |&id| id as usize + 1);
    // The chat markers take the first ids after the config's specials.
    for (k, name) in CHAT_TOKENS.iter().enumerate() {
        fixed.insert((max_fixed + k) as u32, (*name).to_owned());
    }
    let padding = (cfg.vocab_size / 64).clamp(1, 8);
    let size = (cfg.vocab_size - padding.min(cfg.vocab_size)).max(max_fixed + CHAT_TOKENS.len());
    if size > cfg.vocab_size {
        return Err(verr(format!(
            "{} rows cannot hold special token id {} and the chat markers after it",
            cfg.vocab_size,
            max_fixed.saturating_sub(1)
        )));
    }
    let ordinary = size - fixed.len();
    if ordinary < 256 {
        return Err(verr(format!(
            "{} rows leave {ordinary} ordinary tokens; a byte-level tokenizer needs 256",
            cfg.vocab_size
        )));
    }
    let (mut ordinary_tokens, merges) = gguf_tokenizer::synth_bpe_vocab(ordinary);
    let mut tokens = Vec::with_capacity(size);
    let mut types = Vec::with_capacity(size);
    let mut next = ordinary_tokens.drain(..);
    for id in 0..size {
        match fixed.get(&(id as u32)) {
            Some(name) => {
                tokens.push(name.clone());
                types.push(3);
            }
            None => {
                // Past the BPE vocabulary the id space is filled with tokens no text encodes to,
                // so large presets' specials still land on their ids (Llama 3's reserved tokens).
                tokens.push(next.next().unwrap_or_else(|| format!("<|reserved_{id}|>")));
                types.push(1);
            }
        }
    }
    drop(next);
    let spec = BpeSpec {
        tokens: &tokens,
        merges: &merges,
        token_types: Some(&types),
        pre: PreTokenizerKind::Gpt2,
        add_bos: cfg.bos_token_id,
    };
    let tokenizer = gguf_tokenizer::build_bpe_tokenizer(&spec)
        .map_err(|m| Error::Tokenizer { file: PathBuf::from("<built-in synthetic tokenizer>"), message: m })?;
    let ids = SpecialIds { bos: cfg.bos_token_id, eos: eos_first, pad: None, unk: None, add_bos: false };
    Ok(SynthTokenizer { tokenizer, ids })
}

// ---- Checkpoint writing, shared with GGUF conversion ----

/// The dtype a converted or synthetic checkpoint is written in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutDType {
    /// 32-bit float: exact for dequantized GGUF weights.
    #[default]
    F32,
    /// bfloat16, the dtype Llama 3.1 checkpoints ship in.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl OutDType {
    /// The name `config.json`'s `torch_dtype` uses.
    pub fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }

    /// The safetensors dtype tag.
    pub fn safetensors(self) -> Dtype {
        match self {
            Self::F32 => Dtype::F32,
            Self::Bf16 => Dtype::BF16,
            Self::F16 => Dtype::F16,
        }
    }

    /// Parses `f32`/`float32`, `bf16`/`bfloat16` or `f16`/`float16` (for command-line flags).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" => Ok(Self::F16),
            other => Err(Error::request("dtype", format!("unknown dtype `{other}` (f32, bf16 or f16)"))),
        }
    }

    /// `values` as little-endian bytes of this dtype (rounding to nearest for 16-bit types).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * self.size());
        match self {
            Self::F32 => values.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Self::Bf16 => values.iter().for_each(|&x| out.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes())),
            Self::F16 => values.iter().for_each(|&x| out.extend_from_slice(&half::f16::from_f32(x).to_le_bytes())),
        }
        out
    }
}

/// A directory being written beside its final path; it is renamed into place by
/// [`StagedDir::commit`] and removed (with any parents it created) if dropped before that.
pub(crate) struct StagedDir {
    temp: Option<tempfile::TempDir>,
    out: PathBuf,
    created_parent: Option<PathBuf>,
}

impl StagedDir {
    /// Refuses an `out` that exists and is not an empty directory, then creates the staging
    /// directory in `out`'s parent (same filesystem, so the final rename is atomic).
    pub(crate) fn new(out: &Path) -> Result<Self> {
        if out.exists() {
            let mut entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
            if entries.next().is_some() {
                return Err(Error::io(
                    out,
                    std::io::Error::new(std::io::ErrorKind::AlreadyExists, "output directory exists and is not empty"),
                ));
            }
        }
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // Remember the topmost ancestor we create so a failure removes it again.
        let mut created_parent = None;
        let mut probe = parent.as_path();
        while !probe.as_os_str().is_empty() && !probe.exists() {
            created_parent = Some(probe.to_path_buf());
            probe = probe.parent().unwrap_or(Path::new(""));
        }
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let temp =
            tempfile::Builder::new().prefix(".tulu-staging-").tempdir_in(&parent).map_err(|e| Error::io(&parent, e))?;
        Ok(Self { temp: Some(temp), out: out.to_path_buf(), created_parent })
    }

    /// Where to write the files.
    pub(crate) fn path(&self) -> &Path {
        self.temp.as_ref().map(|t| t.path()).unwrap_or(&self.out)
    }

    /// Moves the finished directory to its final path.
    pub(crate) fn commit(mut self) -> Result<()> {
        let Some(temp) = self.temp.take() else {
            return Ok(());
        };
        let staged = temp.keep();
        // rename(2) replaces an empty directory; an existing empty `out` is allowed.
        if let Err(e) = std::fs::rename(&staged, &self.out) {
            let _ = std::fs::remove_dir_all(&staged);
            self.temp = None;
            return Err(Error::io(&self.out, e));
        }
        self.created_parent = None;
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        drop(self.temp.take());
        if let Some(p) = self.created_parent.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Shared state of one safetensors write: the first error a lazy tensor hit (a `View` cannot
/// return one) and the progress bar.
pub(crate) struct WriteState {
    error: RefCell<Option<Error>>,
    bar: ProgressBar,
}

impl WriteState {
    /// A state whose bar counts `total` tensors, hidden unless `progress`.
    pub(crate) fn new(total: u64, progress: bool, what: &str) -> Self {
        let bar = if progress { ProgressBar::new(total) } else { ProgressBar::hidden() };
        if let Ok(style) = ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} tensors [{elapsed_precise}]") {
            bar.set_style(style);
        }
        bar.set_message(what.to_owned());
        Self { error: RefCell::new(None), bar }
    }

    /// Clears the progress bar.
    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Produces one tensor's bytes when asked for them.
pub(crate) type Producer<'a> = Box<dyn Fn() -> Result<Vec<u8>> + 'a>;

/// A safetensors tensor whose bytes are produced only when the writer reaches it, so a
/// checkpoint is never held whole in memory.
pub(crate) struct LazyTensor<'a> {
    dtype: OutDType,
    shape: Vec<usize>,
    produce: Producer<'a>,
    state: &'a WriteState,
}

impl<'a> LazyTensor<'a> {
    /// A tensor of `shape` in `dtype` whose bytes `produce` makes.
    pub(crate) fn new(dtype: OutDType, shape: Vec<usize>, produce: Producer<'a>, state: &'a WriteState) -> Self {
        Self { dtype, shape, produce, state }
    }

    /// Size in bytes.
    pub(crate) fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

impl View for LazyTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype.safetensors()
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let len = self.byte_len();
        // After a failure the file is discarded anyway; zeros keep the writer's offsets right.
        if self.state.error.borrow().is_none() {
            match (self.produce)() {
                Ok(bytes) if bytes.len() == len => {
                    self.state.bar.inc(1);
                    return Cow::Owned(bytes);
                }
                Ok(bytes) => {
                    *self.state.error.borrow_mut() =
                        Some(Error::Backend(format!("produced {} bytes for a {len}-byte tensor", bytes.len())))
                }
                Err(e) => *self.state.error.borrow_mut() = Some(e),
            }
        }
        Cow::Owned(vec![0; len])
    }

    fn data_len(&self) -> usize {
        self.byte_len()
    }
}

/// Writes `tensors` to `path` (with HF's `format: pt` metadata), one tensor in memory at a time.
pub(crate) fn write_safetensors(path: &Path, tensors: Vec<(String, LazyTensor)>, state: &WriteState) -> Result<()> {
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(tensors, Some(metadata), path)
        .map_err(|e| Error::weights(path, None, format!("cannot write: {e}")))?;
    match state.error.borrow_mut().take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Writes pretty-printed JSON.
pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Backend(format!("JSON: {e}")))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}
