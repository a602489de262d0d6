//! Weights on the CPU, kept in the type they were stored in.
//!
//! A bf16 or f16 matrix stays bf16/f16 in host memory and is widened inside the dot product
//! ([`super::matmul`]): a 16 GB bf16 checkpoint takes 16 GB, not 32, and decode reads half the
//! bytes. FP8 rows stay e4m3 (one byte an element and an f32 scale a row) and are widened and
//! scaled the same way. Vectors (norm weights) and host-built tables (RoPE) are f32: they are
//! small, and the element-wise operations read them as f32 slices.

use candle_core::quantized::GgmlDType;
use candle_core::{Device as CDevice, Storage, Tensor, WithDType};
use half::{bf16, f16};

use super::blocks::{BlockPart, BlockWeight};
use super::matmul::{self, E4m3, WeightElem};
use crate::backend::contract;
use crate::error::{Error, Result};
use crate::weights::fp8::Fp8Rows;
use crate::weights::gguf_store::GgufType;
use crate::weights::{DType, TensorSlice};

/// The values of a weight, borrowed in their stored type.
pub enum Values<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bf16 values.
    Bf16(&'a [bf16]),
    /// f16 values.
    F16(&'a [f16]),
}

/// A weight (`rows × cols`; vectors have one row): a contiguous candle tensor in f32, bf16 or
/// f16, GGML blocks ([`BlockWeight`]), or e4m3 rows with a scale each.
pub struct CpuWeight {
    store: Store,
    pub(super) rows: usize,
    pub(super) cols: usize,
}

enum Store {
    Dense(Tensor),
    Blocks(BlockWeight),
    /// e4m3 rows (`rows × cols`) and one f32 scale a row.
    Fp8 {
        values: Vec<E4m3>,
        scales: Vec<f32>,
    },
}

impl CpuWeight {
    pub(super) fn shape(&self) -> contract::Shape {
        (self.rows, self.cols)
    }

    /// A weight of `rows × cols` values of any stored type.
    pub fn from_vec<E: WithDType>(data: Vec<E>, rows: usize, cols: usize) -> Result<Self> {
        Ok(CpuWeight { store: Store::Dense(Tensor::from_vec(data, (rows, cols), &CDevice::Cpu)?), rows, cols })
    }

    /// A weight of GGML blocks.
    pub(super) fn from_blocks(blocks: BlockWeight, rows: usize, cols: usize) -> Self {
        CpuWeight { store: Store::Blocks(blocks), rows, cols }
    }

    /// FP8 rows kept as they are (one byte an element and a scale a row), or, for the rare
    /// weight the kernel cannot reproduce exactly ([`matmul::exact_fp8`]: an e4m3 NaN, a
    /// subnormal or huge scale), dequantized to f32 — the same values either way.
    pub fn from_fp8(w: Fp8Rows) -> Result<Self> {
        if !matmul::exact_fp8(&w.bytes, &w.scales) {
            return Self::from_vec(w.dequantize(), w.rows, w.cols);
        }
        let Fp8Rows { bytes, scales, rows, cols, .. } = w;
        Ok(CpuWeight { store: Store::Fp8 { values: matmul::e4m3_elements(bytes), scales }, rows, cols })
    }

    /// The block weight, when the weight is stored in blocks.
    pub(super) fn blocks(&self) -> Option<&BlockWeight> {
        match &self.store {
            Store::Blocks(b) => Some(b),
            Store::Dense(_) | Store::Fp8 { .. } => None,
        }
    }

    /// `parts` concatenated along rows, in the parts' stored type when the weight is a matrix
    /// whose parts are all bf16, all f16, or all GGML blocks (of one or more types); in f32
    /// otherwise (vectors, f32 parts, mixed parts).
    pub(super) fn load(parts: &[TensorSlice<'_>], rows: usize, cols: usize) -> Result<Self> {
        let kinds: Vec<Kind> = parts.iter().map(|p| Kind::of(p.tensor.dtype)).collect();
        let same = kinds.windows(2).all(|w| w[0] == w[1]);
        let bf16 = |b: [u8; 2]| bf16::from_bits(u16::from_le_bytes(b));
        let f16 = |b: [u8; 2]| f16::from_bits(u16::from_le_bytes(b));
        match kinds.first() {
            _ if rows <= 1 => Self::load_f32(parts, rows, cols),
            Some(Kind::Bf16) if same => Self::from_vec(stored(parts, rows * cols, bf16), rows, cols),
            Some(Kind::F16) if same => Self::from_vec(stored(parts, rows * cols, f16), rows, cols),
            Some(_) if kinds.iter().all(|k| matches!(k, Kind::Blocks(_))) => {
                Ok(Self::from_blocks(load_blocks(parts, cols)?, rows, cols))
            }
            _ => Self::load_f32(parts, rows, cols),
        }
    }

    fn load_f32(parts: &[TensorSlice<'_>], rows: usize, cols: usize) -> Result<Self> {
        let mut data = Vec::with_capacity(rows * cols);
        for p in parts {
            p.extend_f32(&mut data);
        }
        Self::from_vec(data, rows, cols)
    }

    /// Bytes the weight's values take in host memory ([`HostType::bytes`]).
    pub fn bytes(&self) -> usize {
        let dense = |t: HostType| t.bytes(self.rows, self.cols) as usize;
        match &self.store {
            Store::Dense(t) => match t.dtype() {
                candle_core::DType::BF16 => dense(HostType::Bf16),
                candle_core::DType::F16 => dense(HostType::F16),
                _ => dense(HostType::F32),
            },
            Store::Blocks(b) => b.bytes(),
            Store::Fp8 { .. } => dense(HostType::Fp8),
        }
    }

    /// The stored type, for logs and errors (`F32`, `BF16`, `Q8_0`, …).
    pub fn describe(&self) -> String {
        match &self.store {
            Store::Dense(t) => format!("{:?}", t.dtype()).to_uppercase(),
            Store::Blocks(b) => b.describe(),
            Store::Fp8 { .. } => "F8_E4M3".into(),
        }
    }

    /// Runs `f` on the weight's values in their stored type, without copying them.
    pub(super) fn with_values<R>(&self, f: impl FnOnce(Values<'_>) -> R) -> Result<R> {
        let tensor = match &self.store {
            Store::Dense(t) => t,
            Store::Blocks(_) | Store::Fp8 { .. } => {
                return Err(Error::Backend(format!(
                    "a {}×{} weight in {} has no f32, bf16 or f16 values",
                    self.rows,
                    self.cols,
                    self.describe()
                )))
            }
        };
        let (storage, layout) = tensor.storage_and_layout();
        let (start, end) =
            layout.contiguous_offsets().ok_or_else(|| Error::Backend("CPU weight is not contiguous".into()))?;
        let cpu = match &*storage {
            Storage::Cpu(cpu) => cpu,
            _ => return Err(Error::Backend("CPU weight is not in host memory".into())),
        };
        Ok(match tensor.dtype() {
            candle_core::DType::BF16 => f(Values::Bf16(&cpu.as_slice::<bf16>()?[start..end])),
            candle_core::DType::F16 => f(Values::F16(&cpu.as_slice::<f16>()?[start..end])),
            _ => f(Values::F32(&cpu.as_slice::<f32>()?[start..end])),
        })
    }

    /// Runs `f` on the weight's f32 values (vectors and tables, which are always f32).
    pub(super) fn with_slice<R>(&self, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        self.with_values(|v| match v {
            Values::F32(s) => Ok(f(s)),
            _ => Err(Error::Backend(format!(
                "a {}×{} {} weight was used where an f32 vector is expected",
                self.rows,
                self.cols,
                self.describe()
            ))),
        })?
    }

    /// `x · selfᵀ` for `x: n × cols`; returns `n × rows` row-major.
    pub fn matmul(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        match &self.store {
            Store::Blocks(b) => return b.matmul(x, n),
            Store::Fp8 { values, scales } => {
                return Ok(matmul::matmul_scaled(x, n, values, scales, self.rows, self.cols))
            }
            Store::Dense(_) => {}
        }
        self.with_values(|v| match v {
            Values::F32(w) => matmul::matmul(x, n, w, self.rows, self.cols),
            Values::Bf16(w) => matmul::matmul(x, n, w, self.rows, self.cols),
            Values::F16(w) => matmul::matmul(x, n, w, self.rows, self.cols),
        })
    }

    /// Appends row `r` widened to f32 to `out`.
    pub(super) fn extend_row(&self, r: usize, out: &mut Vec<f32>) -> Result<()> {
        fn widen<E: WeightElem>(w: &[E], out: &mut Vec<f32>) {
            out.extend(w.iter().map(|v| v.to_f32()));
        }
        let row = r * self.cols..(r + 1) * self.cols;
        if let Store::Fp8 { values, scales } = &self.store {
            out.extend(values[row].iter().map(|v| v.to_f32() * scales[r]));
            return Ok(());
        }
        self.with_values(|v| match v {
            Values::F32(w) => out.extend_from_slice(&w[row]),
            Values::Bf16(w) => widen(&w[row], out),
            Values::F16(w) => widen(&w[row], out),
        })
    }
}

/// How the CPU backend holds a weight, and the one rule for the bytes it takes: what
/// [`CpuWeight::bytes`] reports once loaded and `tulu inspect --device cpu` sizes beforehand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostType {
    /// f32 values (vectors, f32 checkpoints, mixed parts).
    F32,
    /// bf16 values.
    Bf16,
    /// f16 values.
    F16,
    /// e4m3 values and an f32 scale a row.
    Fp8,
    /// GGML blocks as stored.
    Blocks(GgmlDType),
}

impl HostType {
    /// How a weight of `rows` rows loaded as stored (not quantized while loading) from a tensor
    /// stored as `dtype` is held: [`CpuWeight::load`]'s choice.
    pub fn loaded_from(dtype: DType, rows: usize) -> Self {
        match Kind::of(dtype) {
            _ if rows <= 1 => HostType::F32,
            Kind::Bf16 => HostType::Bf16,
            Kind::F16 => HostType::F16,
            Kind::Blocks(g) => HostType::Blocks(g),
            Kind::F32 => HostType::F32,
        }
    }

    /// Bytes a `rows × cols` weight held this way takes.
    pub fn bytes(self, rows: usize, cols: usize) -> u64 {
        let (rows, n) = (rows as u64, (rows * cols) as u64);
        match self {
            HostType::F32 => 4 * n,
            HostType::Bf16 | HostType::F16 => 2 * n,
            HostType::Fp8 => n + 4 * rows,
            HostType::Blocks(g) => n / g.block_size() as u64 * g.type_size() as u64,
        }
    }

    /// The type's name (`F32`, `BF16`, `F8_E4M3`, `Q8_0`, …).
    pub fn name(self) -> String {
        match self {
            HostType::F32 => "F32".into(),
            HostType::Bf16 => "BF16".into(),
            HostType::F16 => "F16".into(),
            HostType::Fp8 => "F8_E4M3".into(),
            HostType::Blocks(g) => format!("{g:?}").to_uppercase(),
        }
    }
}

/// How a part is kept on the CPU.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    F32,
    Bf16,
    F16,
    Blocks(GgmlDType),
}

impl Kind {
    fn of(dtype: DType) -> Self {
        match dtype {
            DType::BF16 | DType::Gguf { ty: GgufType::BF16, .. } => Kind::Bf16,
            DType::F16 | DType::Gguf { ty: GgufType::F16, .. } => Kind::F16,
            DType::Gguf { ty, .. } if ty.is_blocks() => Kind::Blocks(ty.ggml()),
            _ => Kind::F32,
        }
    }
}

/// Block parts as stored: consecutive parts of one block type become one block matrix (their
/// rows' bytes concatenated), padding rows zero blocks (which hold zeros in every type).
fn load_blocks(parts: &[TensorSlice<'_>], cols: usize) -> Result<BlockWeight> {
    let mut out: Vec<BlockPart> = Vec::new();
    let mut i = 0;
    while i < parts.len() {
        let dtype = parts[i].tensor.dtype;
        let run = parts[i..].iter().take_while(|p| p.tensor.dtype == dtype).count();
        let group = &parts[i..i + run];
        let rows: usize = group.iter().map(|p| p.shape().0).sum();
        let mut bytes = Vec::with_capacity(dtype.bytes_for(rows * cols));
        for p in group {
            if !(p.cols.start == 0 && p.cols.end == p.tensor.shape.get(1).copied().unwrap_or(0)) {
                return Err(Error::weights(
                    p.tensor.file,
                    Some(p.tensor.name),
                    "a column slice of GGML blocks cannot be loaded (tensor parallelism needs a dense checkpoint)",
                ));
            }
            p.row_bytes().for_each(|r| bytes.extend_from_slice(r));
            bytes.resize(bytes.len() + dtype.bytes_for(p.pad_rows * cols), 0);
        }
        let Kind::Blocks(ggml) = Kind::of(dtype) else {
            return Err(Error::Backend(format!("`{}` is not stored in blocks", group[0].tensor.name)));
        };
        out.push(BlockPart::from_bytes(group[0].tensor.name, ggml, &bytes, rows, cols)?);
        i += run;
    }
    Ok(BlockWeight::new(out, cols))
}

/// The parts' elements decoded from their little-endian bytes by `decode`, padding rows zero.
fn stored<E: WeightElem + Default>(parts: &[TensorSlice<'_>], len: usize, decode: impl Fn([u8; 2]) -> E) -> Vec<E> {
    let mut data = Vec::with_capacity(len);
    for p in parts {
        for row in p.row_bytes() {
            data.extend(row.chunks_exact(2).map(|c| decode([c[0], c[1]])));
        }
        data.resize(data.len() + p.pad_rows * p.cols.len(), E::default());
    }
    data
}
