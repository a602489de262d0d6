//! Hugging Face safetensors checkpoints: the shard index, memory maps and validation.
//!
//! Every file is memory-mapped and its header validated by the `safetensors` crate when the
//! checkpoint is opened (header length, JSON, contiguous in-bounds offsets, sizes matching
//! shapes), so a truncated or corrupt file fails at open, naming the file. Tensors are then
//! fetched by name with their expected shape; dtype, presence and shape are checked before any
//! byte is read. Backends convert from the mapped bytes themselves, so nothing is copied twice.

pub mod fp8;
pub mod gguf;
pub mod gguf_store;
pub mod gguf_tokenizer;
pub mod random;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensorError, SafeTensors};

use crate::error::{Error, Result};

/// The storage dtypes tulu reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// FP8 e4m3 (`float8_e4m3fn`): meaningful only with the scales of [`fp8::RowScales`].
    F8E4M3,
    /// A tensor of a GGUF file, as llama.cpp stored it: its GGML type (dense or blocks) and, for
    /// q and k, the head count of llama.cpp's row permutation, undone as rows are read
    /// ([`gguf_store`]).
    Gguf {
        /// The stored type.
        ty: gguf_store::GgufType,
        /// `Some(heads)` for a q or k matrix whose rows llama.cpp interleaved.
        unpermute: Option<u16>,
    },
}

impl DType {
    /// Bytes per element (per block element count for GGUF blocks, whose bytes are counted
    /// by [`DType::bytes_for`]).
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 => 1,
            DType::Gguf { ty, .. } => ty.ggml().type_size(),
        }
    }

    /// Bytes of `elements` consecutive elements (for GGUF blocks, `elements` is whole blocks).
    pub fn bytes_for(self, elements: usize) -> usize {
        match self {
            DType::Gguf { ty, .. } => elements / ty.ggml().block_size() * ty.ggml().type_size(),
            other => elements * other.size(),
        }
    }

    /// The name safetensors and `torch_dtype` use.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
            DType::Gguf { ty, .. } => ty.name(),
        }
    }
}

/// One tensor's place in a mapped file.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte range in the mapped file.
    bytes: Range<usize>,
}

/// A memory-mapped, validated safetensors checkpoint (one file or an index of shards).
pub struct WeightStore {
    files: Vec<(PathBuf, Arc<Mmap>)>,
    entries: HashMap<String, Entry>,
}

/// A validated view of one tensor's bytes in the mapped file.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    /// The tensor's name in the checkpoint.
    pub name: &'a str,
    /// The file holding it.
    pub file: &'a Path,
    /// Storage dtype.
    pub dtype: DType,
    /// Shape as stored (row-major).
    pub shape: &'a [usize],
    /// Raw little-endian bytes.
    pub bytes: &'a [u8],
}

impl WeightStore {
    /// Opens the checkpoint in `dir`: `model.safetensors.index.json` and its shards, or
    /// `model.safetensors`, or else every `*.safetensors` file in the directory.
    /// A GGUF file, or a directory holding one as [`gguf_store::GGUF_LINK`] and no safetensors,
    /// opens as [`WeightStore::open_gguf`].
    pub fn open(dir: &Path) -> Result<Self> {
        if dir.is_file() && dir.extension().is_some_and(|x| x.eq_ignore_ascii_case("gguf")) {
            return Self::open_gguf(dir);
        }
        let index = dir.join("model.safetensors.index.json");
        let gguf = dir.join(gguf_store::GGUF_LINK);
        if !index.exists() && !dir.join("model.safetensors").exists() && gguf.exists() {
            return Self::open_gguf(&gguf);
        }
        let paths = if index.exists() {
            shard_paths(dir, &index)?
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(Error::weights(
                    dir,
                    None,
                    "no model.safetensors, model.safetensors.index.json or *.safetensors file",
                ));
            }
            found
        };
        let mut store = WeightStore { files: Vec::new(), entries: HashMap::new() };
        for path in paths {
            store.add_file(&path)?;
        }
        Ok(store)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and tulu never writes to checkpoint files; a file
        // changed on disk underneath a running engine is outside what any loader can defend.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| header_error(path, &mmap, &e))?;
        let data_start = 8 + header_len;
        let file_idx = self.files.len();
        for (name, info) in metadata.tensors() {
            let dtype = match info.dtype {
                StDtype::F32 => DType::F32,
                StDtype::F16 => DType::F16,
                StDtype::BF16 => DType::BF16,
                StDtype::F8_E4M3 => DType::F8E4M3,
                other => {
                    return Err(Error::weights(
                        path,
                        Some(&name),
                        format!("dtype {other:?} is not supported (F32, F16, BF16 or F8_E4M3)"),
                    ))
                }
            };
            let (s, e) = info.data_offsets;
            let entry =
                Entry { file: file_idx, dtype, shape: info.shape.clone(), bytes: data_start + s..data_start + e };
            if self.entries.insert(name.clone(), entry).is_some() {
                return Err(Error::weights(path, Some(&name), "appears in more than one shard"));
            }
        }
        self.files.push((path.to_path_buf(), Arc::new(mmap)));
        Ok(())
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The tensor `name`, checked to have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<TensorRef<'_>> {
        let t = self.get_any(name)?;
        if t.shape != shape {
            return Err(Error::weights(t.file, Some(name), format!("has shape {:?}, expected {shape:?}", t.shape)));
        }
        Ok(t)
    }

    /// The tensor `name` with whatever shape it has.
    pub fn get_any(&self, name: &str) -> Result<TensorRef<'_>> {
        let (key, entry) = self.entries.get_key_value(name).ok_or_else(|| {
            let file = self.files.first().map(|f| f.0.clone()).unwrap_or_default();
            Error::weights(file, Some(name), "missing from the checkpoint")
        })?;
        let (path, mmap) = &self.files[entry.file];
        Ok(TensorRef {
            name: key,
            file: path,
            dtype: entry.dtype,
            shape: &entry.shape,
            bytes: &mmap[entry.bytes.clone()],
        })
    }

    /// Drops tensor `name`'s mapped pages from this process's resident memory. They stay in the
    /// page cache, and a later read faults them back in; the loader calls this after each weight
    /// is on its device, so that resident memory while loading holds about one tensor of the
    /// checkpoint whatever its size (a row-parallel slice touches every page of its tensor).
    pub fn release(&self, name: &str) {
        #[cfg(unix)]
        if let Some(e) = self.entries.get(name) {
            let mmap = &self.files[e.file].1;
            // SAFETY: the map is a read-only shared file mapping: MADV_DONTNEED only unmaps its
            // pages from this process, and the next access reads the same bytes from the file.
            // A failure only means the pages stay resident, so it is ignored.
            let _ = unsafe {
                mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, e.bytes.start, e.bytes.len())
            };
        }
        #[cfg(not(unix))]
        let _ = name;
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Total stored bytes and element counts per dtype.
    pub fn bytes_by_dtype(&self) -> BTreeMap<DType, (u64, u64)> {
        let mut out = BTreeMap::new();
        for e in self.entries.values() {
            let slot = out.entry(e.dtype).or_insert((0u64, 0u64));
            slot.0 += e.bytes.len() as u64;
            slot.1 += e.shape.iter().product::<usize>() as u64;
        }
        out
    }

    /// The dtype most of the checkpoint's bytes are stored in.
    pub fn main_dtype(&self) -> DType {
        self.bytes_by_dtype().into_iter().max_by_key(|(_, (b, _))| *b).map(|(d, _)| d).unwrap_or(DType::F32)
    }
}

/// A rectangular part of a tensor (1-D tensors are one row), optionally followed by zero rows:
/// what one rank of a tensor-parallel model loads, or the whole tensor.
#[derive(Debug, Clone)]
pub struct TensorSlice<'a> {
    /// The tensor sliced.
    pub tensor: TensorRef<'a>,
    /// Rows taken.
    pub rows: Range<usize>,
    /// Columns taken.
    pub cols: Range<usize>,
    /// Zero rows appended (a vocab shard padded to the common shard size).
    pub pad_rows: usize,
    /// The scales of an F8_E4M3 tensor (`None` for every other dtype).
    pub scale: Option<fp8::RowScales<'a>>,
}

impl<'a> TensorSlice<'a> {
    /// Rows (padding included) and columns of the slice.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows.len() + self.pad_rows, self.cols.len())
    }

    /// The slice's stored bytes, one row at a time (padding rows excluded; a GGUF slice's
    /// columns are whole blocks).
    pub fn row_bytes(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        let t = self.tensor;
        let width = t.shape.get(1).copied().unwrap_or(t.shape[0]);
        let dtype = t.dtype;
        self.rows.clone().map(move |r| {
            let base = gguf_store::stored_row(dtype, r, t.shape) * width;
            &t.bytes[dtype.bytes_for(base + self.cols.start)..dtype.bytes_for(base + self.cols.end)]
        })
    }

    /// Appends the slice, converted to f32 and padded, to `out` (FP8 slices go through
    /// [`fp8::Fp8Rows`], which applies their scales).
    pub fn extend_f32(&self, out: &mut Vec<f32>) {
        let width = self.tensor.shape.get(1).copied().unwrap_or(self.tensor.shape[0]);
        for r in self.rows.clone() {
            self.tensor.extend_f32(r * width + self.cols.start..r * width + self.cols.end, out);
        }
        out.resize(out.len() + self.pad_rows * self.cols.len(), 0.0);
    }
}

/// Rows and columns of `parts` concatenated along rows (one fused weight), checking that every
/// part has the same number of columns.
pub fn fused_shape(parts: &[TensorSlice<'_>]) -> Result<(usize, usize)> {
    let first = parts.first().ok_or_else(|| Error::Backend("a weight needs at least one part".into()))?;
    let cols = first.shape().1;
    for p in parts {
        if p.tensor.dtype == DType::F8E4M3 && p.scale.is_none() {
            let t = &p.tensor;
            return Err(Error::weights(t.file, Some(t.name), "is stored in F8_E4M3 but has no scale"));
        }
        if p.shape().1 != cols {
            let t = &p.tensor;
            return Err(Error::weights(
                t.file,
                Some(t.name),
                format!("cannot be fused with `{}`: {} columns, not {cols}", first.tensor.name, p.shape().1),
            ));
        }
    }
    Ok((parts.iter().map(|p| p.shape().0).sum(), cols))
}

impl<'a> TensorRef<'a> {
    /// The whole tensor as a slice.
    pub fn full(self) -> TensorSlice<'a> {
        let (rows, cols) = match self.shape {
            [r, c] => (*r, *c),
            [n] => (1, *n),
            _ => (1, self.len()),
        };
        TensorSlice { tensor: self, rows: 0..rows, cols: 0..cols, pad_rows: 0, scale: None }
    }

    /// Rows `rows` of a 2-D tensor, all columns (a column-parallel rank's part).
    pub fn row_slice(self, rows: Range<usize>) -> TensorSlice<'a> {
        let cols = self.shape.get(1).copied().unwrap_or(0);
        self.slice(rows, 0..cols)
    }

    /// Columns `cols` of a 2-D tensor, all rows (a row-parallel rank's part).
    pub fn col_slice(self, cols: Range<usize>) -> TensorSlice<'a> {
        let rows = self.shape.first().copied().unwrap_or(0);
        self.slice(0..rows, cols)
    }

    /// Rows `rows` and columns `cols` of a 2-D tensor (or columns of a 1-D one, with rows `0..1`).
    pub fn slice(self, rows: Range<usize>, cols: Range<usize>) -> TensorSlice<'a> {
        TensorSlice { tensor: self, rows, cols, pad_rows: 0, scale: None }
    }
}

impl TensorRef<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends elements `[range]` (flat, row-major), converted to f32, to `out`.
    pub fn extend_f32(&self, range: Range<usize>, out: &mut Vec<f32>) {
        if let DType::Gguf { .. } = self.dtype {
            return gguf_store::extend_f32(self, range, out);
        }
        let size = self.dtype.size();
        let bytes = &self.bytes[range.start * size..range.end * size];
        match self.dtype {
            DType::F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            DType::F16 => out.extend(bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())),
            DType::BF16 => out.extend(bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())),
            DType::F8E4M3 => out.extend(bytes.iter().map(|&b| crate::quant::e4m3::to_f32(b))),
            DType::Gguf { .. } => unreachable!("GGUF tensors are converted above"),
        }
    }
}

/// The error for a header the safetensors crate refused, naming the tensor at fault when the
/// crate's error does not (a byte range past the end of the file, or not matching its shape).
fn header_error(path: &Path, file: &[u8], e: &SafeTensorError) -> Error {
    let culprit = match e {
        SafeTensorError::MetadataIncompleteBuffer | SafeTensorError::TensorInvalidInfo => tensor_at_fault(file),
        _ => None,
    };
    match culprit {
        Some((tensor, message)) => Error::weights(path, Some(&tensor), message),
        None => Error::weights(path, None, describe(e, file.len())),
    }
}

/// The first tensor (by offset) of a parsed header whose bytes run past the end of `file` or do
/// not match its shape and dtype, with what is wrong; `None` when none is (or the header cannot
/// be read here, which the crate has then reported already).
fn tensor_at_fault(file: &[u8]) -> Option<(String, String)> {
    let header_len = usize::try_from(u64::from_le_bytes(file.get(..8)?.try_into().ok()?)).ok()?;
    let data_len = file.len().checked_sub(8)?.checked_sub(header_len)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(file.get(8..8usize.checked_add(header_len)?)?).ok()?;
    let mut tensors: Vec<(u64, u64, u64, &str)> = header
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .filter_map(|(name, info)| {
            let offsets = info.get("data_offsets")?.as_array()?;
            let (start, end) = (offsets.first()?.as_u64()?, offsets.get(1)?.as_u64()?);
            let elements = info.get("shape")?.as_array()?.iter().try_fold(1u64, |n, d| n.checked_mul(d.as_u64()?))?;
            let size = match info.get("dtype")?.as_str()? {
                "F64" | "I64" | "U64" => 8,
                "F32" | "I32" | "U32" => 4,
                "F16" | "BF16" | "I16" | "U16" => 2,
                _ => 1,
            };
            Some((start, end, elements.checked_mul(size)?, name.as_str()))
        })
        .collect();
    tensors.sort_unstable();
    for &(start, end, bytes, name) in &tensors {
        if end > data_len as u64 {
            return Some((
                name.to_owned(),
                format!(
                    "its bytes {start}..{end} run past the end of the file's {data_len}-byte data section \
                     (the file is truncated)"
                ),
            ));
        }
        if end.checked_sub(start) != Some(bytes) {
            return Some((name.to_owned(), format!("its byte range {start}..{end} does not hold {bytes} bytes")));
        }
    }
    None
}

/// Turns the safetensors crate's terse errors into sentences a user can act on.
fn describe(e: &SafeTensorError, file_len: usize) -> String {
    match e {
        SafeTensorError::HeaderTooSmall => format!("not a safetensors file: only {file_len} bytes"),
        SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength => {
            format!("not a safetensors file: its header length runs past the end of the file ({file_len} bytes)")
        }
        SafeTensorError::InvalidHeader(_) => "safetensors header is not UTF-8".into(),
        SafeTensorError::InvalidHeaderDeserialization(e) => format!("safetensors header is not valid: {e}"),
        SafeTensorError::MetadataIncompleteBuffer => {
            format!("file size {file_len} does not match its header: truncated, or trailing bytes")
        }
        SafeTensorError::InvalidOffset(name) => {
            format!("tensor `{name}` has data offsets that overlap, leave gaps or run past the data")
        }
        SafeTensorError::TensorInvalidInfo => "a tensor's byte range does not match its shape and dtype".into(),
        other => format!("invalid safetensors file: {other}"),
    }
}

/// The distinct shard files an index's `weight_map` names, sorted, each checked to stay inside
/// the model directory (a hostile index must not make tulu read, or the hub client write,
/// outside it).
pub fn index_shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::weights(index, None, format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::weights(index, None, "missing the `weight_map` object"))?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file =
            file.as_str().ok_or_else(|| Error::weights(index, Some(tensor), "weight_map entry is not a file name"))?;
        let rel = Path::new(file);
        let inside =
            !file.is_empty() && !file.contains('\\') && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !inside {
            return Err(Error::weights(
                index,
                Some(tensor),
                format!("shard `{file}` leaves the model directory; refusing to read it"),
            ));
        }
        files.push(file.to_owned());
    }
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(Error::weights(index, None, "`weight_map` is empty"));
    }
    Ok(files)
}

/// The shard files named by an index, each present in `dir`.
fn shard_paths(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    index_shard_names(index)?
        .into_iter()
        .map(|f| {
            let p = dir.join(&f);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::weights(
                    index,
                    None,
                    format!("names shard `{f}`, which does not exist in {}", dir.display()),
                ))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-tensor file.
    fn file(dir: &Path) -> PathBuf {
        let (a, b) = (vec![0u8; 16], vec![0u8; 24]);
        let views = [
            ("a.weight", safetensors::tensor::TensorView::new(StDtype::F32, vec![4], &a).unwrap()),
            ("b.weight", safetensors::tensor::TensorView::new(StDtype::F32, vec![2, 3], &b).unwrap()),
        ];
        let path = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, None, &path).unwrap();
        path
    }

    /// A file whose last tensor runs past its end names that tensor; one whose header promises
    /// a different size for a tensor names it too.
    #[test]
    fn offsets_past_the_file_name_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = file(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        match WeightStore::open(dir.path()) {
            Err(Error::Weights { tensor: Some(t), message, .. }) => {
                assert_eq!(t, "b.weight");
                assert!(message.contains("16..40") && message.contains("truncated"), "{message}");
            }
            other => panic!("{:?}", other.err()),
        }
        // A header whose offsets claim more bytes than the shape holds.
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap().replace("[2,3]", "[2,2]");
        let mut edited = (header.len() as u64).to_le_bytes().to_vec();
        edited.extend_from_slice(header.as_bytes());
        edited.extend_from_slice(&bytes[8 + n..]);
        std::fs::write(&path, &edited).unwrap();
        match WeightStore::open(dir.path()) {
            Err(Error::Weights { tensor: Some(t), .. }) => assert_eq!(t, "b.weight"),
            other => panic!("{:?}", other.err()),
        }
    }
}
