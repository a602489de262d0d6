//! A step's metadata on the device: uploaded once per step by `begin_step`, in one copy, into
//! a buffer that persists from step to step, and read by every op of the step.
//!
//! The buffer's layout for a step of `P` activation rows (the batch's rows, or its decode
//! bucket when the step is padded for a graph, see graphs.rs) is fixed by `P` alone, so a
//! graph captured for a bucket finds every array where it was at capture:
//!
//! ```text
//! ids[P] | positions[P] | slots[P] | work[4P] | gather[G] | block tables…
//! ```
//! `G` is `P` for a padded step. Padding rows look up token 0 at position 0, write no KV slot
//! (slot `u32::MAX`, which rope.cu skips), attend to nothing (a work item of zero rows) and
//! are never sampled.
//!
//! `work` holds the step's attention work items (attention.rs), made here from the attention
//! geometry the step was begun with: a decode step's one item a row (padding rows' items of
//! zero rows), another step's tiles of the plan's rows, at most `P` of them. So every upload of a
//! step is this one copy, made before its forward pass runs (or is captured as a graph).

use std::sync::atomic::Ordering;

use cudarc::driver::{CudaSlice, DevicePtr};

use super::attention::{self, Work};
use super::workspace::Buf;
use super::{CudaBackend, CudaResultExt};
use crate::backend::contract::{self, BatchExtent};
use crate::backend::StepInputs;
use crate::error::{Error, Result};
use crate::runtime::batch::Batch;

/// The slot a padding row writes: none.
pub(crate) const NO_SLOT: u32 = u32::MAX;

/// Where each step's metadata is uploaded.
pub(crate) enum StepMeta {
    /// One buffer that persists from step to step (allocated by `reserve` or the first step,
    /// grown only between steps), whose address captured graphs keep.
    Persistent(Option<CudaSlice<u32>>),
    /// Tests only (`CudaDebug::fresh_step_buffers`): a new buffer every step, each kept alive so that
    /// a graph that captured an older one reads that step's stale metadata (which the test must
    /// catch) rather than freed memory.
    FreshEachStep(Vec<Buf<u32>>),
}

impl StepMeta {
    /// Bytes of the persistent buffer (0 before it exists, or for fresh buffers).
    pub fn bytes(&self) -> usize {
        match self {
            StepMeta::Persistent(m) => m.as_ref().map_or(0, |m| 4 * m.len()),
            StepMeta::FreshEachStep(_) => 0,
        }
    }
}

/// A step's metadata on the device.
pub(crate) struct DeviceBatch {
    /// The batch it was made from.
    pub host: Batch,
    /// Activation rows: the batch's rows, or its bucket when padded.
    pub rows: usize,
    /// The decode bucket this step is padded to (its graph), if any.
    pub bucket: Option<usize>,
    /// Embedding ids per activation row.
    pub ids: Buf<u32>,
    pub positions: Buf<u32>,
    pub slots: Buf<u32>,
    /// Every sequence's block table, concatenated.
    pub block_tables: Buf<u32>,
    /// The rows the step gathers (`StepInputs::rows`), for the contract.
    pub gather_rows: Vec<usize>,
    /// Their device copy, padded like the activation rows.
    pub gather: Buf<u32>,
    /// Rows `gather` holds: the step's rows, then a padded step's padding rows.
    pub gather_count: usize,
    /// What the contract checks against the cache each op uses (`contract::step`, once).
    pub extent: BatchExtent,
    /// The attention work items and the rows per tile they were cut for (attention.rs), when
    /// the step was begun with attention geometry (`StepInputs::dims`) the kernels support.
    pub work: Option<(usize, Work)>,
    /// The buffer the arrays above view, when it is this step's own (`step_for`).
    _owner: Option<Buf<u32>>,
}

/// The CUDA backend's [`crate::backend::Backend::Step`]: one step's metadata on the device,
/// made by `begin_step` (in the persistent buffer, padded to the step's graph bucket) or by
/// `step_for` (in a buffer of its own, never padded), and given to every op of the step.
pub struct CudaStep {
    device: DeviceBatch,
    /// The decode bucket the step is padded to (its graph), if any.
    bucket: Option<usize>,
    /// The model the step runs ([`StepInputs::model`]): graphs are kept per model and bucket.
    model: u64,
    /// Logits rows past the sampled ones: a padded step's padding rows.
    padding: usize,
}

impl CudaStep {
    /// The step's device metadata.
    pub(crate) fn device(&self) -> &DeviceBatch {
        &self.device
    }

    /// The graph this step runs as: its model and bucket, when it is padded to one.
    pub(crate) fn graph_key(&self) -> Option<(u64, usize)> {
        self.bucket.map(|b| (self.model, b))
    }

    /// Rows of the step's gathered activations (and logits) past the rows it samples.
    pub(crate) fn padding(&self) -> usize {
        self.padding
    }
}

/// The host side of one step's metadata, laid out as the module docs say.
struct Packed {
    words: Vec<u32>,
    rows: usize,
    gather_len: usize,
    /// Rows per tile, items and longest key range of the attention work list, if any.
    work: Option<(usize, usize, usize)>,
}

impl Packed {
    /// Lays out `batch` with `rows ≥ batch rows` activation rows and `gather` rows to gather;
    /// `tile` is the attention plan's rows per tile (none: a step without attention).
    fn new(batch: &Batch, ids: &[u32], rows: usize, gather: &[usize], tile: Option<usize>) -> Self {
        let n = batch.num_tokens();
        let decode = !batch.seqs.is_empty() && batch.seqs.iter().all(|s| s.rows.len() == 1);
        let gather_len = if rows > n { rows } else { gather.len() };
        let mut table_offsets = Vec::with_capacity(batch.seqs.len());
        let mut tables = Vec::new();
        for s in &batch.seqs {
            table_offsets.push(tables.len() as u32);
            tables.extend_from_slice(&s.block_table);
        }
        let mut w = Vec::with_capacity(8 * rows + gather_len + tables.len());
        w.extend(ids.iter().copied().chain(std::iter::repeat(0)).take(rows));
        w.extend(batch.positions.iter().copied().chain(std::iter::repeat(0)).take(rows));
        w.extend(batch.slots.iter().copied().chain(std::iter::repeat(NO_SLOT)).take(rows));
        let items = tile.map(|t| work_items(batch, &table_offsets, decode, t)).unwrap_or_default();
        let max_keys = items.chunks(4).map(|i| i[3] as usize).max().unwrap_or(0);
        let work = tile.map(|t| match decode && t == 1 {
            // Every row's item, padding rows' included: the count a graph was captured with.
            true => (t, rows, batch.positions.iter().max().map_or(0, |&p| p as usize + 1)),
            false => (t, items.len() / 4, max_keys),
        });
        w.extend(items.into_iter().chain(std::iter::repeat(0)).take(4 * rows));
        w.extend(gather.iter().map(|&r| r as u32).chain(gather.len() as u32..).take(gather_len));
        w.extend_from_slice(&tables);
        Packed { words: w, rows, gather_len, work }
    }
}

/// The attention work items of `batch` for tiles of `tile` rows: `[row_start, n_rows,
/// table_offset, kmax]` each, tiles of consecutive rows of one sequence (a decode step's rows
/// are one tile each, `kmax` its context).
fn work_items(batch: &Batch, table_offsets: &[u32], decode: bool, tile: usize) -> Vec<u32> {
    let mut items = Vec::new();
    for (s, seq) in batch.seqs.iter().enumerate() {
        let tile = if decode { 1 } else { tile.max(1) };
        let mut start = seq.rows.start;
        while start < seq.rows.end {
            let end = (start + tile).min(seq.rows.end);
            let kmax = batch.positions[start..end].iter().max().map_or(0, |&p| p + 1);
            items.extend([start as u32, (end - start) as u32, table_offsets[s], kmax]);
            start = end;
        }
    }
    items
}

impl CudaBackend {
    /// `begin_step` (`runtime` true: into the persistent buffer, padded to the step's graph
    /// bucket, its tensors carved from the workspace until `end_step`) and `step_for` (false:
    /// into a buffer of the step's own): checks the inputs, uploads the metadata in one copy.
    pub(crate) fn make_step(&self, inputs: &StepInputs<'_>, runtime: bool) -> Result<CudaStep> {
        let extent = contract::step(inputs)?;
        let bucket = if runtime { self.bucket_for(inputs) } else { None };
        let rows = bucket.unwrap_or(extent.tokens);
        let tile = inputs.dims.and_then(|d| attention::rows_per_tile(&inputs.batch.seqs, d));
        let packed = Packed::new(inputs.batch, inputs.ids, rows, inputs.rows, tile);
        let (base, owner) = if runtime {
            let base = self.step_meta(packed.words.len(), bucket.is_some())?;
            let mut dst = self.view(base, 0, packed.words.len());
            self.stream.memcpy_htod(&packed.words, &mut *dst).cuda("copying the step's metadata to the device")?;
            (base, None)
        } else {
            let owner = self.upload_u32(&packed.words)?;
            let base = owner.device_ptr(&self.stream).0;
            (base, Some(owner))
        };
        let mut device = self.view_batch(inputs.batch, &packed, extent, base, owner)?;
        device.bucket = bucket;
        device.gather_rows = inputs.rows.to_vec();
        device.gather_count = if bucket.is_some() { rows } else { inputs.rows.len() };
        let padding = device.gather_count - inputs.rows.len();
        if runtime {
            self.in_step.store(true, Ordering::Relaxed);
        }
        Ok(CudaStep { device, bucket, model: inputs.model, padding })
    }

    /// `end_step`: forgets the step (the persistent buffer stays for the next).
    pub(crate) fn end_step_impl(&self, step: CudaStep) {
        drop(step);
        self.in_step.store(false, Ordering::Relaxed);
    }

    /// The address `words` of this step's metadata go to: the persistent buffer, grown to at
    /// least `words` (its address, and with it every captured graph, changes only then:
    /// `begin_step` of a step that a graph could replay never grows it past what `reserve` made
    /// room for).
    fn step_meta(&self, words: usize, padded: bool) -> Result<u64> {
        let mut meta = self.meta.lock().map_err(|_| Error::Backend("step buffer lock poisoned".into()))?;
        let meta = match &mut *meta {
            StepMeta::Persistent(meta) => meta,
            StepMeta::FreshEachStep(stale) => {
                // SAFETY: written by the step's upload before any kernel reads it.
                let buf = unsafe { self.stream.alloc::<u32>(words.max(1)) }.cuda("allocating step metadata")?;
                let buf = Buf::pool(buf);
                let base = buf.device_ptr(&self.stream).0;
                stale.push(buf);
                return Ok(base);
            }
        };
        if meta.as_ref().is_none_or(|m: &CudaSlice<u32>| m.len() < words) {
            if padded && meta.is_some() {
                return Err(Error::Backend(format!(
                    "a decode step needs {words} metadata words, past what reserve made"
                )));
            }
            self.drop_graphs("the step metadata buffer grew");
            *meta = None;
            let len = words.max(1024).next_power_of_two();
            // SAFETY: every word a step reads is written by its upload first.
            *meta = Some(unsafe { self.stream.alloc::<u32>(len) }.cuda("allocating the step metadata buffer")?);
        }
        Ok(meta.as_ref().map_or(0, |m| m.device_ptr(&self.stream).0))
    }

    /// A view of `len` words at word `offset` of the buffer at `base`.
    fn view(&self, base: u64, offset: usize, len: usize) -> Buf<u32> {
        // SAFETY: the metadata buffer holds the packed step (offset + len words at most); it
        // is only reallocated between steps, when no view of it is alive.
        unsafe { Buf::view(&self.stream, base + 4 * offset as u64, len.max(1)) }
    }

    /// The batch viewing `packed`, already copied to `base`.
    fn view_batch(
        &self,
        batch: &Batch,
        packed: &Packed,
        extent: BatchExtent,
        base: u64,
        owner: Option<Buf<u32>>,
    ) -> Result<DeviceBatch> {
        let rows = packed.rows;
        let work = packed
            .work
            .map(|(tile, count, max_keys)| (tile, Work::new(self.view(base, 3 * rows, 4 * count), count, max_keys)));
        Ok(DeviceBatch {
            host: batch.clone(),
            rows,
            bucket: None,
            ids: self.view(base, 0, rows),
            positions: self.view(base, rows, rows),
            slots: self.view(base, 2 * rows, rows),
            block_tables: self.view(
                base,
                7 * rows + packed.gather_len,
                packed.words.len() - 7 * rows - packed.gather_len,
            ),
            gather_rows: Vec::new(),
            gather: self.view(base, 7 * rows, packed.gather_len),
            gather_count: packed.gather_len,
            extent: BatchExtent { tokens: rows, ..extent },
            work,
            _owner: owner,
        })
    }
}
