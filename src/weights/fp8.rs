//! FP8 weights on the host: the scales of a checkpoint's F8_E4M3 tensors, and any linear weight
//! as e4m3 rows with one f32 scale per row ([`Fp8Rows`]), what every backend stores or
//! dequantizes.
//!
//! Scales are per row whatever the checkpoint holds: a per-tensor scale is repeated on each of
//! its rows. Fusing q/k/v (or gate/up), whose per-tensor scales differ, is then concatenation —
//! exact, no requantization — and a tensor-parallel rank's rows carry their own scales. A bf16
//! tensor quantized while loading gets each row's scale from its whole row, even when a rank
//! takes only some of its columns, so the quantized model is the same at every `--tp`.

use rayon::prelude::*;

use super::random::{self, RandomSlice};
use super::{fused_shape, DType, TensorRef, TensorSlice, WeightStore};
use crate::error::{Error, Result};
use crate::quant::{e4m3, ActivationScheme, QuantMethod, Quantization, ScaleStrategy};

/// How an F8_E4M3 tensor's values scale back to real numbers: `real = e4m3 · scale`.
#[derive(Debug, Clone, Copy)]
pub enum RowScales<'a> {
    /// One scale for every row.
    Tensor(f32),
    /// One scale per row of the whole tensor, read from a `[rows, 1]` (or `[rows]`) tensor.
    Rows(TensorRef<'a>),
}

impl RowScales<'_> {
    /// The scale of the tensor's row `r`.
    pub fn row(&self, r: usize) -> f32 {
        match self {
            RowScales::Tensor(s) => *s,
            RowScales::Rows(t) => element(t, r),
        }
    }
}

/// Element `i` of a float tensor (the dtype is checked by [`scales_for`]).
fn element(t: &TensorRef<'_>, i: usize) -> f32 {
    let mut v = Vec::with_capacity(1);
    t.extend_f32(i..i + 1, &mut v);
    v[0]
}

/// The scales of F8_E4M3 tensor `weight` (`{module}.weight`), checked against what `quant`
/// says the checkpoint holds: `{module}.weight_scale` present, a float, of one value (per-tensor)
/// or one per row (per-channel, fbgemm), every value finite; `{module}.input_scale` present for
/// statically calibrated activations.
pub fn scales_for<'a>(
    store: &'a WeightStore,
    quant: Option<&Quantization>,
    weight: &TensorRef<'a>,
) -> Result<RowScales<'a>> {
    let fail = |message: String| Error::weights(weight.file, Some(weight.name), message);
    let module =
        weight.name.strip_suffix(".weight").ok_or_else(|| fail("an F8_E4M3 tensor that is not a weight".into()))?;
    let quant =
        quant.ok_or_else(|| fail("is stored in F8_E4M3 but config.json has no `quantization_config`".into()))?;
    if quant.keeps(module) {
        return Err(fail(format!(
            "is stored in F8_E4M3 but `quantization_config` lists `{module}` among the modules kept unquantized"
        )));
    }
    let rows = weight.shape.first().copied().unwrap_or(1);
    let strategy = match &quant.method {
        QuantMethod::CompressedTensors { weights, .. } => *weights,
        QuantMethod::Fbgemm { .. } => ScaleStrategy::Channel,
        QuantMethod::AtLoad | QuantMethod::BlocksAtLoad(_) => {
            return Err(fail("is stored in F8_E4M3 but config.json has no `quantization_config`".into()))
        }
    };
    let scale_name = format!("{module}.weight_scale");
    let scale = match store.get_any(&scale_name) {
        Ok(s) => s,
        Err(_) => return Err(fail(format!("is stored in F8_E4M3 but its scale `{scale_name}` is missing"))),
    };
    check_float(&scale)?;
    let bad_shape = |expected: &str| {
        Error::weights(scale.file, Some(scale.name), format!("has shape {:?}, expected {expected}", scale.shape))
    };
    let scales = match strategy {
        ScaleStrategy::Tensor if scale.len() == 1 && scale.shape.len() <= 1 => RowScales::Tensor(element(&scale, 0)),
        ScaleStrategy::Tensor => return Err(bad_shape("[] or [1] (one scale for the tensor)")),
        ScaleStrategy::Channel if matches!(scale.shape, [r, 1] | [r] if *r == rows) => RowScales::Rows(scale),
        ScaleStrategy::Channel => return Err(bad_shape(&format!("[{rows}, 1] (one scale per output row)"))),
    };
    if let Some(r) = (0..scale.len()).find(|&r| !element(&scale, r).is_finite()) {
        return Err(Error::weights(scale.file, Some(scale.name), format!("scale {r} is not finite")));
    }
    if let QuantMethod::CompressedTensors { activations: ActivationScheme::StaticTensor, .. } = quant.method {
        let input = format!("{module}.input_scale");
        match store.get_any(&input) {
            Ok(t) if t.len() == 1 && t.shape.len() <= 1 => check_float(&t)?,
            Ok(t) => {
                return Err(Error::weights(
                    t.file,
                    Some(t.name),
                    format!("has shape {:?}, expected [] or [1]", t.shape),
                ))
            }
            Err(_) => return Err(fail(format!("has static activation scales but `{input}` is missing"))),
        }
    }
    Ok(scales)
}

fn check_float(t: &TensorRef<'_>) -> Result<()> {
    match t.dtype {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
        other => Err(Error::weights(
            t.file,
            Some(t.name),
            format!("a scale must be F32, BF16 or F16, found {}", other.name()),
        )),
    }
}

/// A linear weight as e4m3 rows (`rows × cols` bytes, row-major) and one f32 scale per row:
/// `w[r][c] = e4m3::to_f32(bytes[r·cols + c]) · scales[r]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Rows {
    /// e4m3 bits.
    pub bytes: Vec<u8>,
    /// One scale per row.
    pub scales: Vec<f32>,
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// The largest per-token activation amax a matmul that quantizes its activations to e4m3
    /// uses (fbgemm's `activation_scale_ub`); `None`: unbounded. Only the GPU's FP8 GEMM
    /// (prefill) quantizes activations; the reference keeps them unquantized.
    pub activation_bound: Option<f32>,
}

impl Fp8Rows {
    /// `parts` concatenated along rows: F8_E4M3 parts keep their bits and scales, others are
    /// quantized row by row as they are read (never a whole bf16 copy).
    pub fn from_slices(parts: &[TensorSlice<'_>]) -> Result<Self> {
        let (rows, cols) = fused_shape(parts)?;
        let mut w = Fp8Rows::empty(rows, cols);
        for p in parts {
            let t = &p.tensor;
            let width = t.shape.get(1).copied().unwrap_or(t.shape[0]);
            if let (DType::F8E4M3, Some(scale)) = (t.dtype, &p.scale) {
                for r in p.rows.clone() {
                    w.bytes.extend_from_slice(&t.bytes[r * width + p.cols.start..r * width + p.cols.end]);
                    w.scales.push(scale.row(r));
                }
            } else {
                // Rows in parallel (a 405B rank quantizes ~50 billion weights), in row order.
                // Each row's scale comes from its whole row, so every rank quantizes alike.
                let quantized: Vec<(Vec<u8>, f32)> = p
                    .rows
                    .clone()
                    .into_par_iter()
                    .map(|r| {
                        let mut full = Vec::with_capacity(width);
                        t.extend_f32(r * width..(r + 1) * width, &mut full);
                        quantize_cols(&full, p.cols.clone())
                    })
                    .collect();
                w.push_rows(quantized);
            }
            w.pad(p.pad_rows);
        }
        Ok(w)
    }

    /// Pseudo-random `parts` (see [`crate::weights::random`]) quantized the same way.
    pub fn from_random(parts: &[RandomSlice]) -> Result<Self> {
        let (rows, cols) = random::fused_shape(parts)?;
        let mut w = Fp8Rows::empty(rows, cols);
        for p in parts {
            // Generated in parallel (an 8B model's weights are billions of values), in row order.
            let quantized: Vec<(Vec<u8>, f32)> = p
                .rows
                .clone()
                .into_par_iter()
                .map(|r| {
                    let full: Vec<f32> = (0..p.total_cols).map(|c| p.value(r, c)).collect();
                    quantize_cols(&full, p.cols.clone())
                })
                .collect();
            w.push_rows(quantized);
            w.pad(p.pad_rows);
        }
        Ok(w)
    }

    /// No rows yet, room for `rows × cols`.
    fn empty(rows: usize, cols: usize) -> Self {
        let (bytes, scales) = (Vec::with_capacity(rows * cols), Vec::with_capacity(rows));
        Fp8Rows { bytes, scales, rows, cols, activation_bound: None }
    }

    /// Appends quantized rows.
    fn push_rows(&mut self, rows: Vec<(Vec<u8>, f32)>) {
        for (bytes, scale) in rows {
            self.bytes.extend_from_slice(&bytes);
            self.scales.push(scale);
        }
    }

    /// Appends `n` zero rows (vocab padding).
    fn pad(&mut self, n: usize) {
        self.bytes.resize(self.bytes.len() + n * self.cols, 0);
        self.scales.resize(self.scales.len() + n, 1.0);
    }

    /// The weight in f32, row-major: what the CPU backend computes with.
    pub fn dequantize(&self) -> Vec<f32> {
        let table: Vec<f32> = (0..=255u8).map(e4m3::to_f32).collect();
        let mut out = Vec::with_capacity(self.bytes.len());
        for (row, &s) in self.bytes.chunks(self.cols.max(1)).zip(&self.scales) {
            out.extend(row.iter().map(|&b| table[b as usize] * s));
        }
        out
    }
}

/// `cols` of the row `full` in e4m3, with the scale of the whole row (so that every rank's
/// slice of a row is quantized alike), and that scale.
fn quantize_cols(full: &[f32], cols: std::ops::Range<usize>) -> (Vec<u8>, f32) {
    let mut bytes = Vec::with_capacity(cols.len());
    let scale = e4m3::quantize_row_with(&full[cols], e4m3::scale_for(full), &mut bytes);
    (bytes, scale)
}
