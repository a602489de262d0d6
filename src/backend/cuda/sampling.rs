//! Token selection on the GPU, so that only ids cross to the host: launchers of
//! `kernels/sampling.cu` (argmax for greedy rows, sample_bf16 for everything else).
//!
//! Both read the first `rows` rows of the logits: a decode step padded to its graph's bucket
//! has its padding rows after the sampled ones.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::workspace::Buf;
use super::{grid, int, CudaBackend, CudaResultExt, CudaTensor};
use crate::error::{Error, Result};
use crate::runtime::sampler::RowSampling;
use crate::runtime::token_mask::TokenMasks;

const THREADS: u32 = 1024;

impl CudaBackend {
    /// The index of the largest of the first `sample_cols` logits of each row (the first on
    /// ties; padded vocab rows past `sample_cols` are never chosen), or `NON_FINITE` for a row
    /// with a NaN or infinite logit among them. Only the ids cross to the host.
    pub fn argmax(&self, logits: &CudaTensor, sample_cols: usize) -> Result<Vec<u32>> {
        self.argmax_masked(logits, logits.rows, sample_cols, None)
    }

    /// [`argmax`](Self::argmax) of the first `rows` rows over the columns each row's mask
    /// allows (structured outputs); the others are neither chosen nor checked for finiteness.
    fn argmax_masked(
        &self,
        logits: &CudaTensor,
        rows: usize,
        sample_cols: usize,
        masks: Option<&TokenMasks>,
    ) -> Result<Vec<u32>> {
        if sample_cols == 0 || sample_cols > logits.cols || rows > logits.rows {
            return Err(Error::Backend(format!(
                "argmax: {sample_cols} sampled columns of {}, {rows} rows of {}",
                logits.cols, logits.rows
            )));
        }
        if rows == 0 {
            return Ok(Vec::new());
        }
        self.bind()?;
        let mut ids = self.alloc_buf::<u32>(rows, "allocating token ids")?;
        let cfg =
            LaunchConfig { grid_dim: (grid(rows, "rows")?, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let (cols, sample) = (int(logits.cols, "cols")?, int(sample_cols, "sample_cols")?);
        let (mask, words) = self.upload_masks(masks, rows, sample_cols)?;
        let mut launch = self.stream.launch_builder(&self.kernels.argmax);
        launch.arg(&*logits.data).arg(&cols).arg(&sample).arg(&*mask).arg(&words).arg(&mut *ids);
        // SAFETY: argument types and order match argmax_bf16; one id per row; `mask` holds
        // rows × words words (words 0: no mask).
        unsafe { launch.launch(cfg) }.cuda("launching argmax_bf16")?;
        self.count_launch();
        let ids = self.stream.clone_dtoh(&*ids).cuda("copying token ids to the host")?;
        self.synchronize()?;
        Ok(ids)
    }

    /// The backend's `sample` op: argmax when every row is greedy without a penalty, else
    /// `sample_bf16` with each row's parameters (see `runtime::sampler::sample_row`), for the
    /// first `per_row.len()` rows.
    pub(crate) fn sample_impl(
        &self,
        logits: &CudaTensor,
        per_row: &[RowSampling],
        valid: usize,
        masks: Option<&TokenMasks>,
    ) -> Result<Vec<u32>> {
        let rows = per_row.len();
        if rows == 0 {
            return Ok(Vec::new());
        }
        if per_row.iter().all(|r| r.temperature == 0.0 && (r.repetition_penalty == 1.0 || r.penalized.is_empty())) {
            return self.argmax_masked(logits, rows, valid, masks);
        }
        let mut meta = Vec::with_capacity(8 * per_row.len());
        let mut penalized = Vec::new();
        for r in per_row {
            let top_k = u32::try_from(r.top_k.min(valid)).unwrap_or(u32::MAX);
            let start = u32::try_from(penalized.len()).map_err(|_| Error::Backend("sample: too many ids".into()))?;
            penalized.extend_from_slice(if r.repetition_penalty == 1.0 { &[] } else { &r.penalized[..] });
            let count = penalized.len() as u32 - start;
            meta.extend_from_slice(&[
                r.temperature.to_bits(),
                top_k,
                r.top_p.to_bits(),
                r.min_p.to_bits(),
                r.repetition_penalty.to_bits(),
                r.uniform.to_bits(),
                start,
                count,
            ]);
        }
        self.bind()?;
        let meta = self.upload_u32(&meta)?;
        let penalized = self.upload_u32(&penalized)?;
        let (mask, words) = self.upload_masks(masks, rows, valid)?;
        // The kernel writes each row's `valid` scratch values before reading them.
        let mut scratch = self.alloc_buf::<f32>(rows * valid, "allocating sampling scratch")?;
        let mut ids = self.alloc_buf::<u32>(rows, "allocating token ids")?;
        let cfg =
            LaunchConfig { grid_dim: (grid(rows, "rows")?, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let (cols, valid) = (int(logits.cols, "cols")?, int(valid, "valid")?);
        let mut launch = self.stream.launch_builder(&self.kernels.sample);
        launch.arg(&*logits.data).arg(&cols).arg(&valid).arg(&*meta).arg(&*penalized).arg(&*mask).arg(&words);
        launch.arg(&mut *scratch).arg(&mut *ids);
        // SAFETY: argument types and order match sample_bf16; meta has 8 words per row, every
        // penalised range lies inside `penalized`, `mask` holds rows × words words (words 0: no
        // mask), scratch holds rows × valid.
        unsafe { launch.launch(cfg) }.cuda("launching sample_bf16")?;
        self.count_launch();
        let ids = self.stream.clone_dtoh(&*ids).cuda("copying token ids to the host")?;
        self.synchronize()?;
        Ok(ids)
    }

    /// The step's token masks on the device and their words per row (0 and a placeholder word
    /// when there are none); each row must cover `cols` columns.
    fn upload_masks(&self, masks: Option<&TokenMasks>, rows: usize, cols: usize) -> Result<(Buf<u32>, i32)> {
        match masks {
            None => Ok((self.upload_u32(&[])?, 0)),
            Some(m) if m.rows() == rows && m.words >= cols.div_ceil(32) => {
                Ok((self.upload_u32(&m.bits)?, int(m.words, "mask words")?))
            }
            Some(m) => {
                Err(Error::Backend(format!("{} token masks of {} words for {rows} rows of {cols}", m.rows(), m.words)))
            }
        }
    }
}
