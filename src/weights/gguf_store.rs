//! A llama.cpp GGUF file read directly as a [`WeightStore`]: its tensors keep their stored GGML
//! type ([`DType::Gguf`]: f32, f16, bf16 or quantized blocks) under their Hugging Face names, and
//! q/k rows are put back in rotate-half order as they are read, so the model loads a GGUF as it
//! loads safetensors. The small files the rest of tulu reads beside the weights (config,
//! tokenizer, generation config) are written from the GGUF's metadata into a model directory
//! that holds a link to the GGUF ([`model_dir`]).

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use memmap2::Mmap;

use super::gguf::open_model;
use super::{DType, Entry, TensorRef, WeightStore};
use crate::error::{Error, Result};

/// The name of the link to the GGUF inside a model directory made by [`model_dir`].
pub const GGUF_LINK: &str = "model.gguf";

/// The GGML types tulu reads from GGUF files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(missing_docs)]
pub enum GgufType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl GgufType {
    /// The type of candle-core's GGUF reader, if tulu reads it.
    pub fn from_ggml(t: GgmlDType) -> Option<Self> {
        use GgmlDType as G;
        Some(match t {
            G::F32 => Self::F32,
            G::F16 => Self::F16,
            G::BF16 => Self::BF16,
            G::Q4_0 => Self::Q4_0,
            G::Q4_1 => Self::Q4_1,
            G::Q5_0 => Self::Q5_0,
            G::Q5_1 => Self::Q5_1,
            G::Q8_0 => Self::Q8_0,
            G::Q2K => Self::Q2K,
            G::Q3K => Self::Q3K,
            G::Q4K => Self::Q4K,
            G::Q5K => Self::Q5K,
            G::Q6K => Self::Q6K,
            G::Q8_1 | G::Q8K => return None,
        })
    }

    /// candle-core's name for the type.
    pub fn ggml(self) -> GgmlDType {
        use GgmlDType as G;
        match self {
            Self::F32 => G::F32,
            Self::F16 => G::F16,
            Self::BF16 => G::BF16,
            Self::Q4_0 => G::Q4_0,
            Self::Q4_1 => G::Q4_1,
            Self::Q5_0 => G::Q5_0,
            Self::Q5_1 => G::Q5_1,
            Self::Q8_0 => G::Q8_0,
            Self::Q2K => G::Q2K,
            Self::Q3K => G::Q3K,
            Self::Q4K => G::Q4K,
            Self::Q5K => G::Q5K,
            Self::Q6K => G::Q6K,
        }
    }

    /// Whether values are stored in blocks (not one element at a time).
    pub fn is_blocks(self) -> bool {
        !matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    /// llama.cpp's name for the type.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q2K => "Q2_K",
            Self::Q3K => "Q3_K",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
        }
    }
}

/// The row of the stored tensor that holds row `r` of the tensor as tulu reads it: llama.cpp
/// stores each head of q and k with its rotate-half pairs interleaved (`[half, 2]` rather than
/// `[2, half]`).
pub fn stored_row(dtype: DType, r: usize, shape: &[usize]) -> usize {
    match (dtype, shape) {
        (DType::Gguf { unpermute: Some(heads), .. }, &[rows, _]) if heads > 0 => {
            let head_rows = rows / heads as usize;
            let half = head_rows / 2;
            let (head, i) = (r / head_rows, r % head_rows);
            // HF row `j * half + i` of a head is GGUF row `i * 2 + j`.
            let (j, i) = (i / half, i % half);
            head * head_rows + i * 2 + j
        }
        _ => r,
    }
}

/// Appends elements `range` of `t` (flat, row-major, in tulu's row order) as f32: each row it
/// touches is dequantized whole.
pub fn extend_f32(t: &TensorRef<'_>, range: Range<usize>, out: &mut Vec<f32>) {
    let DType::Gguf { ty, .. } = t.dtype else { return };
    let width = t.shape.get(1).copied().unwrap_or_else(|| t.len()).max(1);
    let mut row = vec![0f32; width];
    let mut at = range.start;
    while at < range.end {
        let r = at / width;
        let (from, to) = (at - r * width, (range.end - r * width).min(width));
        let s = stored_row(t.dtype, r, t.shape) * width;
        let bytes = &t.bytes[t.dtype.bytes_for(s)..t.dtype.bytes_for(s + width)];
        // The bytes were checked against the shape when the file was opened, so this cannot
        // fail; NaN would make it loud (non-finite logits are reported) rather than wrong.
        match with_aligned(bytes, |b| ty.ggml().from_data(std::borrow::Cow::Borrowed(b)).dequantize(width)) {
            Ok(candle_core::CpuStorage::F32(v)) => row.copy_from_slice(&v),
            _ => row.fill(f32::NAN),
        }
        out.extend_from_slice(&row[from..to]);
        at = r * width + to;
    }
}

/// Runs `f` on `bytes` at an 8-byte-aligned address (copied there when they are not): candle
/// views stored bytes as blocks with f16 and f32 fields, and asserts their alignment.
pub fn with_aligned<R>(bytes: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
    if bytes.as_ptr().align_offset(8) == 0 {
        return f(bytes);
    }
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: `words` spans at least `bytes.len()` bytes, and u8 has no alignment.
    let view = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, bytes.len()) };
    view.copy_from_slice(bytes);
    f(view)
}

impl WeightStore {
    /// Opens the `llama` GGUF at `path`: its header and metadata are read and checked (every
    /// tensor the model needs present, of the shape the metadata implies, whole blocks, inside
    /// the file), then the file is memory-mapped; no tensor is converted.
    pub fn open_gguf(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let opened = open_model(path, &mut file)?;
        // SAFETY: read-only map of a file tulu never writes (as for safetensors).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut entries = HashMap::new();
        for t in &opened.plan {
            let info = opened.info(t)?;
            let ty = GgufType::from_ggml(info.ggml_dtype).ok_or_else(|| Error::Gguf {
                file: path.to_path_buf(),
                message: format!("tensor `{}`: type {:?} is not a weight type tulu reads", t.hf_name, info.ggml_dtype),
            })?;
            let unpermute = t.unpermute_heads.map(|h| h as u16);
            let dtype = DType::Gguf { ty, unpermute };
            let start = (opened.data_offset() + info.offset) as usize;
            let len = dtype.bytes_for(t.shape.iter().product());
            entries
                .insert(t.hf_name.clone(), Entry { file: 0, dtype, shape: t.shape.clone(), bytes: start..start + len });
        }
        Ok(WeightStore { files: vec![(path.to_path_buf(), Arc::new(mmap))], entries })
    }
}

/// A model directory for the GGUF at `gguf`: `config.json`, `generation_config.json`,
/// `tokenizer.json` and `tokenizer_config.json` written from its metadata, and [`GGUF_LINK`]
/// linking to the file, whose weights [`WeightStore::open`] then reads in place. Kept under
/// `$TULU_CACHE/gguf` (else `~/.cache/tulu/gguf`), keyed by the file's path, size and time; an
/// existing one is reused.
pub fn model_dir(gguf: &Path) -> Result<PathBuf> {
    let gguf = gguf.canonicalize().map_err(|e| Error::io(gguf, e))?;
    let meta = std::fs::metadata(&gguf).map_err(|e| Error::io(&gguf, e))?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    let key = format!("{}|{}|{:?}", gguf.display(), meta.len(), mtime);
    // FNV-1a: a stable name for the key (not a security boundary: the directory is the user's).
    let hash = key.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    let root = match std::env::var_os("TULU_CACHE") {
        Some(c) => PathBuf::from(c),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/tulu"),
    };
    let stem = gguf.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = root.join("gguf").join(format!("{stem}-{hash:016x}"));
    if dir.join(GGUF_LINK).exists() && dir.join("config.json").is_file() {
        return Ok(dir);
    }
    let mut file = File::open(&gguf).map_err(|e| Error::io(&gguf, e))?;
    let opened = open_model(&gguf, &mut file)?;
    let staged = root.join("gguf").join(format!(".{stem}-{hash:016x}.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staged);
    std::fs::create_dir_all(&staged).map_err(|e| Error::io(&staged, e))?;
    opened.write_model_files(&staged)?;
    link(&gguf, &staged.join(GGUF_LINK))?;
    match std::fs::rename(&staged, &dir) {
        Ok(()) => Ok(dir),
        // Another process made it first: use theirs.
        Err(_) if dir.join(GGUF_LINK).exists() => {
            let _ = std::fs::remove_dir_all(&staged);
            Ok(dir)
        }
        Err(e) => Err(Error::io(&dir, e)),
    }
}

/// `tulu convert --dtype keep`: a model directory at `out` holding the GGUF itself as
/// [`GGUF_LINK`] (hard-linked where the file system allows, else copied) beside the config and
/// tokenizer files from its metadata: the weights stay as stored. `out` must not exist or be
/// empty; on error nothing is left there.
pub fn keep_gguf(gguf: &Path, out: &Path) -> Result<()> {
    let mut file = File::open(gguf).map_err(|e| Error::io(gguf, e))?;
    let opened = open_model(gguf, &mut file)?;
    let staged = crate::synth::StagedDir::new(out)?;
    opened.write_model_files(staged.path())?;
    let dest = staged.path().join(GGUF_LINK);
    if std::fs::hard_link(gguf, &dest).is_err() {
        std::fs::copy(gguf, &dest).map_err(|e| Error::io(&dest, e))?;
    }
    staged.commit()
}

#[cfg(unix)]
fn link(target: &Path, at: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, at).map_err(|e| Error::io(at, e))
}

#[cfg(not(unix))]
fn link(target: &Path, at: &Path) -> Result<()> {
    std::fs::hard_link(target, at).map_err(|e| Error::io(at, e))
}
