//! GGUF → Hugging Face conversion: a llama.cpp `llama` GGUF becomes an ordinary safetensors
//! checkpoint directory (weights dequantized, q/k rows back in rotate-half order, config and
//! tokenizer files rebuilt from the GGUF metadata), so the rest of tulu only ever loads HF
//! checkpoints.
//!
//! The output directory is written the way [`crate::synth`] writes synthetic checkpoints
//! (staged beside `out`, renamed into place when complete, one tensor in memory at a time).

use std::cell::RefCell;
use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value as GgufValue};
use candle_core::Device;
use serde_json::json;

use crate::config::{Llama3RopeScaling, ModelConfig};
use crate::error::{Error, Result};
use crate::synth::{write_json, write_safetensors, LazyTensor, StagedDir, WriteState};
use crate::weights::gguf_tokenizer::{self, BpeSpec, PreTokenizerKind, SpecialIds};

/// The dtype of converted weights (shared with synthetic checkpoints).
pub use crate::synth::OutDType;

/// Options for [`convert_gguf`].
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// The dtype of the written weights.
    pub dtype: OutDType,
    /// Show a progress bar over the tensors on stderr.
    pub progress: bool,
}

/// Converts the `llama` GGUF at `gguf` into a Hugging Face checkpoint directory at `out`
/// (`model.safetensors`, `config.json`, `generation_config.json`, `tokenizer.json`,
/// `tokenizer_config.json`). `out` must not exist or be empty; on error nothing is left there.
pub fn convert_gguf(gguf: &Path, out: &Path, opts: &ConvertOptions) -> Result<()> {
    let mut file = File::open(gguf).map_err(|e| Error::io(gguf, e))?;
    let opened = open_model(gguf, &mut file)?;
    let (meta, mut cfg, tok, plan) = (opened.meta(), opened.cfg.clone(), &opened.tok, &opened.plan);
    cfg.torch_dtype = Some(opts.dtype.torch_name().into());

    let staged = StagedDir::new(out)?;
    let dir = staged.path().to_path_buf();
    let state = WriteState::new(plan.len() as u64, opts.progress, "converting");
    let reader_cell = RefCell::new(file);
    let reader = &reader_cell;
    let tensors = plan
        .iter()
        .map(|t| {
            let produce = move || read_tensor(&meta, reader, t, opts.dtype);
            (t.hf_name.clone(), LazyTensor::new(opts.dtype, t.shape.clone(), Box::new(produce), &state))
        })
        .collect();
    write_safetensors(&dir.join("model.safetensors"), tensors, &state)?;
    state.finish();
    write_model_files(gguf, &dir, &cfg, tok)?;
    staged.commit()
}

/// A GGUF's header read and checked: its metadata, the model and tokenizer it describes, and
/// every tensor planned and checked against them and the file's size.
pub(crate) struct OpenedGguf {
    path: std::path::PathBuf,
    content: Content,
    pub(crate) cfg: ModelConfig,
    tok: GgufTokenizer,
    pub(crate) plan: Vec<PlannedTensor>,
}

impl OpenedGguf {
    fn meta(&self) -> Meta<'_> {
        Meta { file: &self.path, content: &self.content }
    }

    /// Where tensor data starts in the file.
    pub(crate) fn data_offset(&self) -> u64 {
        self.content.tensor_data_offset
    }

    /// The GGUF's record of `t`.
    pub(crate) fn info(&self, t: &PlannedTensor) -> Result<&TensorInfo> {
        tensor_info(&self.meta(), &t.gguf_name)
    }

    /// Writes `config.json`, `generation_config.json`, `tokenizer.json` and
    /// `tokenizer_config.json` for the model into `dir`.
    pub(crate) fn write_model_files(&self, dir: &Path) -> Result<()> {
        write_model_files(&self.path, dir, &self.cfg, &self.tok)
    }
}

/// Reads and checks the `llama` GGUF `gguf` (open as `file`) up to its tensor data.
pub(crate) fn open_model(gguf: &Path, file: &mut File) -> Result<OpenedGguf> {
    let gerr = |message: String| Error::Gguf { file: gguf.to_path_buf(), message };
    let content = Content::read(file).map_err(|e| gerr(format!("not a readable GGUF file: {e}")))?;
    let meta = Meta { file: gguf, content: &content };
    let arch = meta.string("general.architecture")?;
    if arch != "llama" {
        return Err(gerr(format!("`general.architecture` is `{arch}`; only `llama` models can be read")));
    }
    let file_size = file.metadata().map_err(|e| Error::io(gguf, e))?.len();
    let (cfg, tok) = read_model(&meta)?;
    cfg.check_size(gguf).map_err(|e| gerr(format!("its metadata describes an impossible model: {e}")))?;
    let plan = plan_tensors(&meta, &cfg, file_size)?;
    Ok(OpenedGguf { path: gguf.to_path_buf(), content, cfg, tok, plan })
}

/// The model's config, generation config and tokenizer files, from the GGUF's metadata.
fn write_model_files(gguf: &Path, dir: &Path, cfg: &ModelConfig, tok: &GgufTokenizer) -> Result<()> {
    let gerr = |message: String| Error::Gguf { file: gguf.to_path_buf(), message };
    write_json(&dir.join("config.json"), &cfg.to_json())?;
    let mut generation = json!({ "eos_token_id": tok.stop_ids, "_from_model_config": false });
    if let Some(bos) = cfg.bos_token_id {
        generation["bos_token_id"] = json!(bos);
    }
    write_json(&dir.join("generation_config.json"), &generation)?;
    let tok_path = dir.join("tokenizer.json");
    tok.tokenizer.save(&tok_path, false).map_err(|e| gerr(format!("cannot write {}: {e}", tok_path.display())))?;
    let tok_cfg = gguf_tokenizer::tokenizer_config_json(
        &tok.tokenizer,
        &tok.ids,
        tok.chat_template.as_deref(),
        cfg.max_position_embeddings,
    );
    write_json(&dir.join("tokenizer_config.json"), &tok_cfg)?;
    Ok(())
}

/// llama.cpp's q/k row permutation (from its HF converter), for tests and for checking
/// [`unpermute_qk`]: rows of each head, viewed as `[2, head_dim / 2]`, are transposed to
/// `[head_dim / 2, 2]`, interleaving the two rotate-half halves.
pub fn permute_qk<T: Copy>(w: &[T], rows: usize, cols: usize, n_head: usize) -> Vec<T> {
    // torch: w.reshape(n_head, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)
    reorder_rows(w, rows, cols, n_head, |head, i, j, half| {
        (head * 2 * half + i * 2 + j, head * 2 * half + j * half + i)
    })
}

/// The inverse of [`permute_qk`]: brings a GGUF q or k matrix (`[rows, cols]`, row-major,
/// `n_head` heads of `rows / n_head` rows) back to the rotate-half layout of HF checkpoints.
pub fn unpermute_qk<T: Copy>(w: &[T], rows: usize, cols: usize, n_head: usize) -> Vec<T> {
    reorder_rows(w, rows, cols, n_head, |head, i, j, half| {
        (head * 2 * half + j * half + i, head * 2 * half + i * 2 + j)
    })
}

/// Copies row `src` of `w` to row `dst` for every `(dst, src) = pair(head, i, j, half)`, where
/// `i < half` indexes a rotation pair and `j < 2` its member.
fn reorder_rows<T: Copy>(
    w: &[T],
    rows: usize,
    cols: usize,
    n_head: usize,
    pair: impl Fn(usize, usize, usize, usize) -> (usize, usize),
) -> Vec<T> {
    debug_assert_eq!(w.len(), rows * cols);
    debug_assert!(n_head > 0 && rows.is_multiple_of(2 * n_head));
    let half = rows / n_head / 2;
    let mut out = w.to_vec();
    for head in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let (dst, src) = pair(head, i, j, half);
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Typed access to GGUF metadata whose errors name the key.
#[derive(Clone, Copy)]
struct Meta<'a> {
    file: &'a Path,
    content: &'a Content,
}

impl<'a> Meta<'a> {
    fn err(&self, key: &str, message: impl std::fmt::Display) -> Error {
        Error::Gguf { file: self.file.to_path_buf(), message: format!("`{key}`: {message}") }
    }

    fn get(&self, key: &str) -> Option<&'a GgufValue> {
        self.content.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&'a GgufValue> {
        self.get(key).ok_or_else(|| self.err(key, "missing"))
    }

    fn int_of(&self, key: &str, v: &GgufValue) -> Result<i64> {
        Ok(match v {
            GgufValue::U8(x) => *x as i64,
            GgufValue::I8(x) => *x as i64,
            GgufValue::U16(x) => *x as i64,
            GgufValue::I16(x) => *x as i64,
            GgufValue::U32(x) => *x as i64,
            GgufValue::I32(x) => *x as i64,
            GgufValue::U64(x) => i64::try_from(*x).map_err(|_| self.err(key, "integer too large"))?,
            GgufValue::I64(x) => *x,
            other => return Err(self.err(key, format!("expected an integer, found {other:?}"))),
        })
    }

    fn usize_opt(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                let n = self.int_of(key, v)?;
                usize::try_from(n)
                    .ok()
                    .filter(|&n| n > 0)
                    .map(Some)
                    .ok_or_else(|| self.err(key, format!("must be positive, found {n}")))
            }
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.usize_opt(key)?.ok_or_else(|| self.err(key, "missing"))
    }

    fn u32_opt(&self, key: &str) -> Result<Option<u32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                let n = self.int_of(key, v)?;
                u32::try_from(n).map(Some).map_err(|_| self.err(key, format!("not a token id: {n}")))
            }
        }
    }

    fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        let x = match self.get(key) {
            None => return Ok(None),
            Some(GgufValue::F32(x)) => *x as f64,
            Some(GgufValue::F64(x)) => *x,
            Some(other) => return Err(self.err(key, format!("expected a float, found {other:?}"))),
        };
        if !(x.is_finite() && x > 0.0) {
            return Err(self.err(key, format!("must be a positive number, found {x}")));
        }
        Ok(Some(x))
    }

    fn bool_opt(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.err(key, format!("expected a bool, found {other:?}"))),
        }
    }

    fn string(&self, key: &str) -> Result<&'a str> {
        match self.require(key)? {
            GgufValue::String(s) => Ok(s),
            other => Err(self.err(key, format!("expected a string, found {other:?}"))),
        }
    }

    fn string_opt(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key).map(|_| self.string(key)).transpose()
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let GgufValue::Array(items) = self.require(key)? else {
            return Err(self.err(key, "expected an array of strings"));
        };
        items
            .iter()
            .map(|v| match v {
                GgufValue::String(s) => Ok(s.clone()),
                other => Err(self.err(key, format!("expected strings, found {other:?}"))),
            })
            .collect()
    }

    fn ints_opt(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(items)) => items.iter().map(|v| self.int_of(key, v)).collect::<Result<_>>().map(Some),
            Some(other) => Err(self.err(key, format!("expected an array of integers, found {other:?}"))),
        }
    }
}

/// The tokenizer-side results of reading a GGUF.
struct GgufTokenizer {
    tokenizer: tokenizers::Tokenizer,
    ids: SpecialIds,
    /// Every id that ends generation (GGUF's EOS, `<|im_end|>`, `<|endoftext|>`).
    stop_ids: Vec<u32>,
    chat_template: Option<String>,
}

/// The model config and tokenizer a GGUF's metadata describes.
fn read_model(meta: &Meta) -> Result<(ModelConfig, GgufTokenizer)> {
    let hidden_size = meta.usize("llama.embedding_length")?;
    let heads = meta.usize("llama.attention.head_count")?;
    let kv_heads = meta.usize_opt("llama.attention.head_count_kv")?.unwrap_or(heads);
    if heads % kv_heads != 0 {
        return Err(meta.err("llama.attention.head_count_kv", format!("{kv_heads} does not divide {heads} heads")));
    }
    let head_dim = match meta.usize_opt("llama.attention.key_length")? {
        Some(d) => d,
        None if hidden_size % heads == 0 => hidden_size / heads,
        None => return Err(meta.err("llama.attention.head_count", format!("{heads} does not divide {hidden_size}"))),
    };
    if head_dim % 2 != 0 {
        return Err(
            meta.err("llama.attention.key_length", format!("RoPE needs an even head dimension, found {head_dim}"))
        );
    }
    if let Some(rope_dim) = meta.usize_opt("llama.rope.dimension_count")? {
        if rope_dim != head_dim {
            return Err(meta.err(
                "llama.rope.dimension_count",
                format!("partial RoPE ({rope_dim} of {head_dim}) is not supported"),
            ));
        }
    }
    if let Some(kind) = meta.string_opt("llama.rope.scaling.type")? {
        if kind != "none" {
            return Err(meta.err("llama.rope.scaling.type", format!("`{kind}` RoPE scaling is not supported")));
        }
    }
    let rope_theta = meta.f64_opt("llama.rope.freq_base")?.unwrap_or(10_000.0);
    let tok = read_tokenizer(meta)?;
    let vocab_size = tok.tokenizer.get_vocab_size(false);
    let cfg = ModelConfig {
        hidden_size,
        intermediate_size: meta.usize("llama.feed_forward_length")?,
        num_hidden_layers: meta.usize("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rope_theta,
        rope_scaling: read_rope_freqs(meta, head_dim, rope_theta)?,
        rms_norm_eps: meta
            .f64_opt("llama.attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| meta.err("llama.attention.layer_norm_rms_epsilon", "missing"))?,
        tie_word_embeddings: !meta.content.tensor_infos.contains_key("output.weight"),
        vocab_size,
        bos_token_id: tok.ids.bos,
        eos_token_ids: tok.ids.eos.into_iter().collect(),
        max_position_embeddings: meta.usize("llama.context_length")?,
        torch_dtype: None,
        quantization: None,
        kv_cache: crate::quant::kv::KvDtype::Model,
    };
    Ok((cfg, tok))
}

fn read_tokenizer(meta: &Meta) -> Result<GgufTokenizer> {
    let model = meta.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(meta.err(
            "tokenizer.ggml.model",
            format!("`{model}` tokenizers are not supported (byte-level BPE `gpt2` only)"),
        ));
    }
    let pre_name = meta.string_opt("tokenizer.ggml.pre")?.unwrap_or("default");
    let pre = PreTokenizerKind::from_gguf_name(pre_name).ok_or_else(|| {
        meta.err("tokenizer.ggml.pre", format!("pre-tokenizer `{pre_name}` is not supported (smollm, gpt2, default)"))
    })?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let merges = meta.strings("tokenizer.ggml.merges")?;
    let token_types = meta.ints_opt("tokenizer.ggml.token_type")?;
    let in_vocab = |key: &str| -> Result<Option<u32>> {
        match meta.u32_opt(key)? {
            Some(id) if id as usize >= tokens.len() => {
                Err(meta.err(key, format!("id {id} is past the {} tokens", tokens.len())))
            }
            id => Ok(id),
        }
    };
    let ids = SpecialIds {
        bos: in_vocab("tokenizer.ggml.bos_token_id")?,
        eos: in_vocab("tokenizer.ggml.eos_token_id")?,
        pad: in_vocab("tokenizer.ggml.padding_token_id")?,
        unk: in_vocab("tokenizer.ggml.unknown_token_id")?,
        add_bos: meta.bool_opt("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
    };
    let spec = BpeSpec {
        tokens: &tokens,
        merges: &merges,
        token_types: token_types.as_deref(),
        pre,
        add_bos: if ids.add_bos { ids.bos } else { None },
    };
    let tokenizer = gguf_tokenizer::build_bpe_tokenizer(&spec).map_err(|m| meta.err("tokenizer.ggml.tokens", m))?;
    // Chat models end a turn with their own marker while `<|endoftext|>` still ends documents:
    // both must stop generation.
    let mut stop_ids: Vec<u32> = ids.eos.into_iter().collect();
    for name in ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>"] {
        if let Some(id) = tokenizer.token_to_id(name) {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
    }
    let chat_template = meta.string_opt("tokenizer.chat_template")?.map(str::to_owned);
    Ok(GgufTokenizer { tokenizer, ids, stop_ids, chat_template })
}

/// Recovers Llama 3 RoPE scaling from llama.cpp's precomputed `rope_freqs.weight` factors by
/// checking them against the standard Llama 3.x parameters (only `factor` varies among them).
fn read_rope_freqs(meta: &Meta, head_dim: usize, theta: f64) -> Result<Option<Llama3RopeScaling>> {
    const NAME: &str = "rope_freqs.weight";
    let Some(info) = meta.content.tensor_infos.get(NAME) else {
        return Ok(None);
    };
    let terr = |m: String| Error::Gguf { file: meta.file.to_path_buf(), message: format!("tensor `{NAME}`: {m}") };
    let mut f = File::open(meta.file).map_err(|e| Error::io(meta.file, e))?;
    let factors = info
        .read(&mut f, meta.content.tensor_data_offset, &Device::Cpu)
        .and_then(|q| q.dequantize(&Device::Cpu))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| terr(e.to_string()))?;
    if factors.len() != head_dim / 2 {
        return Err(terr(format!("{} factors for head dimension {head_dim}", factors.len())));
    }
    let factor = factors.iter().fold(1f32, |m, &x| m.max(x)) as f64;
    let scaling = Llama3RopeScaling {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    for (i, &got) in factors.iter().enumerate() {
        let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
        let want = llama3_factor(&scaling, freq);
        if (got as f64 - want).abs() > 1e-3 * want {
            return Err(terr(format!(
                "factor #{i} is {got}, not the Llama 3 scaling's {want}: unsupported RoPE scaling"
            )));
        }
    }
    Ok(Some(scaling))
}

/// The divisor Llama 3 RoPE scaling applies to frequency `freq` (as llama.cpp stores it).
fn llama3_factor(s: &Llama3RopeScaling, freq: f64) -> f64 {
    let old = s.original_max_position_embeddings as f64;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < old / s.high_freq_factor {
        1.0
    } else if wavelen > old / s.low_freq_factor {
        s.factor
    } else {
        let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        1.0 / ((1.0 - smooth) / s.factor + smooth)
    }
}

/// One tensor to convert: where it is in the GGUF and what it becomes.
pub(crate) struct PlannedTensor {
    gguf_name: String,
    pub(crate) hf_name: String,
    /// The HF (torch-order) shape, which is also candle's reading of the GGUF dims.
    pub(crate) shape: Vec<usize>,
    /// Heads to un-permute over, for q and k.
    pub(crate) unpermute_heads: Option<usize>,
}

/// Every tensor of the checkpoint, checked against `cfg` and the file's size before anything is
/// written, so a bad GGUF fails before the output directory exists. Each tensor is checked as it
/// is planned, so metadata promising millions of layers fails at the first one missing instead of
/// planning them all.
fn plan_tensors(meta: &Meta, cfg: &ModelConfig, file_size: u64) -> Result<Vec<PlannedTensor>> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let mut plan = Vec::new();
    let mut add = |gguf: String, hf: String, shape: Vec<usize>, heads: Option<usize>| -> Result<()> {
        let t = PlannedTensor { gguf_name: gguf, hf_name: hf, shape, unpermute_heads: heads };
        check_tensor(meta, &t, file_size)?;
        plan.push(t);
        Ok(())
    };
    add("token_embd.weight".into(), "model.embed_tokens.weight".into(), vec![v, h], None)?;
    for l in 0..cfg.num_hidden_layers {
        let (b, m) = (format!("blk.{l}"), format!("model.layers.{l}"));
        let attn = [
            ("attn_q", "q_proj", vec![cfg.q_dim(), h], Some(cfg.num_attention_heads)),
            ("attn_k", "k_proj", vec![cfg.kv_dim(), h], Some(cfg.num_key_value_heads)),
            ("attn_v", "v_proj", vec![cfg.kv_dim(), h], None),
            ("attn_output", "o_proj", vec![h, cfg.q_dim()], None),
        ];
        for (g, hf, shape, heads) in attn {
            add(format!("{b}.{g}.weight"), format!("{m}.self_attn.{hf}.weight"), shape, heads)?;
        }
        for (g, hf, shape) in [
            ("ffn_gate", "gate_proj", vec![i, h]),
            ("ffn_up", "up_proj", vec![i, h]),
            ("ffn_down", "down_proj", vec![h, i]),
        ] {
            add(format!("{b}.{g}.weight"), format!("{m}.mlp.{hf}.weight"), shape, None)?;
        }
        add(format!("{b}.attn_norm.weight"), format!("{m}.input_layernorm.weight"), vec![h], None)?;
        add(format!("{b}.ffn_norm.weight"), format!("{m}.post_attention_layernorm.weight"), vec![h], None)?;
    }
    add("output_norm.weight".into(), "model.norm.weight".into(), vec![h], None)?;
    if !cfg.tie_word_embeddings {
        add("output.weight".into(), "lm_head.weight".into(), vec![v, h], None)?;
    }
    Ok(plan)
}

/// Checks a planned tensor: present, of the shape the metadata implies, whole blocks of its
/// dtype, and inside the file.
fn check_tensor(meta: &Meta, t: &PlannedTensor, file_size: u64) -> Result<()> {
    let info = tensor_info(meta, &t.gguf_name)?;
    let terr =
        |m: String| Error::Gguf { file: meta.file.to_path_buf(), message: format!("tensor `{}`: {m}", t.gguf_name) };
    if info.shape.dims() != t.shape.as_slice() {
        return Err(terr(format!("shape {:?}, expected {:?} from the metadata", info.shape.dims(), t.shape)));
    }
    let elems = info.shape.elem_count();
    let block = info.ggml_dtype.block_size();
    if elems % block != 0 {
        return Err(terr(format!("{elems} elements do not fill {:?} blocks of {block}", info.ggml_dtype)));
    }
    let bytes = (elems / block * info.ggml_dtype.type_size()) as u64;
    let end = meta.content.tensor_data_offset.saturating_add(info.offset).saturating_add(bytes);
    if end > file_size {
        return Err(terr(format!("data ends at byte {end} but the file has {file_size} bytes (truncated?)")));
    }
    Ok(())
}

fn tensor_info<'a>(meta: &Meta<'a>, name: &str) -> Result<&'a TensorInfo> {
    meta.content
        .tensor_infos
        .get(name)
        .ok_or_else(|| Error::Gguf { file: meta.file.to_path_buf(), message: format!("tensor `{name}` is missing") })
}

/// Dequantizes one tensor, undoes the q/k permutation and encodes it in `dtype`.
fn read_tensor(meta: &Meta, reader: &RefCell<File>, t: &PlannedTensor, dtype: OutDType) -> Result<Vec<u8>> {
    let info = tensor_info(meta, &t.gguf_name)?;
    let terr =
        |m: String| Error::Gguf { file: meta.file.to_path_buf(), message: format!("tensor `{}`: {m}", t.gguf_name) };
    let values = info
        .read(&mut *reader.borrow_mut(), meta.content.tensor_data_offset, &Device::Cpu)
        .and_then(|q| q.dequantize(&Device::Cpu))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| terr(e.to_string()))?;
    let values = match (t.unpermute_heads, t.shape.as_slice()) {
        (Some(heads), &[rows, cols]) => unpermute_qk(&values, rows, cols, heads),
        _ => values,
    };
    Ok(dtype.encode(&values))
}
