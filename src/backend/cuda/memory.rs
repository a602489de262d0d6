//! Device memory: activations, weights and the paged KV cache, and the streaming of weights
//! from the memory-mapped checkpoint into the device.
//!
//! Weights are streamed row by row from `TensorSlice::row_bytes()` through two pinned staging
//! buffers (one is filled on the host while the other's copy is in flight), converted to bf16 on
//! the way when the checkpoint is f32 or f16; no weight is ever held whole in host memory.

use std::sync::atomic::Ordering;

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaSlice, DevicePtrMut, DeviceRepr, LaunchArgs, PinnedHostSlice, PushKernelArg};
use half::bf16;

use super::workspace::{self, Buf};
use super::{CudaBackend, CudaResultExt};
use crate::backend::KvCacheSpec;
use crate::error::{Error, Result};
use crate::quant::kv::{KvFormat, KvScale};
use crate::weights::{fused_shape, DType, TensorSlice};

/// Activations on the device: `rows × cols` bf16, row-major, contiguous.
pub struct CudaTensor {
    pub(crate) data: Buf<bf16>,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

impl CudaTensor {
    /// One row per token.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Features per row.
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// `(rows, cols)`, as the backend contract checks it.
    pub(crate) fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }
    /// The same memory seen as `rows × cols` (the caller keeps the element count).
    pub(crate) fn reshaped(mut self, rows: usize, cols: usize) -> Self {
        self.rows = rows;
        self.cols = cols;
        self
    }
}

/// A weight's device storage: bf16 for checkpoint tensors, f32 for host tables (RoPE), e4m3
/// bytes with an f32 scale per row for FP8 linear weights (gemv_fp8.rs).
pub(crate) enum WeightData {
    Bf16(CudaSlice<bf16>),
    F32(CudaSlice<f32>),
    /// e4m3 rows, one f32 scale per row, and the bound on per-token activation amaxes when the
    /// FP8 GEMM quantizes activations (0: none).
    Fp8 {
        bytes: CudaSlice<u8>,
        scales: CudaSlice<f32>,
        bound: f32,
    },
}

/// A weight matrix or vector resident on the device (`rows × cols`; vectors have one row).
pub struct CudaWeight {
    pub(crate) data: WeightData,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

impl CudaWeight {
    /// Rows (output features of a linear weight).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Columns (input features of a linear weight).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// `(rows, cols)`, as the backend contract checks it.
    pub(crate) fn shape(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The bf16 storage, or an error naming `op` when this is an f32 table.
    pub(crate) fn bf16(&self, op: &str) -> Result<&CudaSlice<bf16>> {
        match &self.data {
            WeightData::Bf16(d) => Ok(d),
            WeightData::F32(_) => Err(Error::Backend(format!("{op}: expected a bf16 weight, got an f32 table"))),
            WeightData::Fp8 { .. } => Err(Error::Backend(format!("{op}: expected a bf16 weight, got an fp8 one"))),
        }
    }

    /// The f32 storage, or an error naming `op` when this is a bf16 weight.
    pub(crate) fn f32(&self, op: &str) -> Result<&CudaSlice<f32>> {
        match &self.data {
            WeightData::F32(d) => Ok(d),
            WeightData::Bf16(_) | WeightData::Fp8 { .. } => {
                Err(Error::Backend(format!("{op}: expected an f32 table, got a weight")))
            }
        }
    }
}

/// The paged KV cache: per layer, K and V of `num_blocks · block_size` slots of `kv_dim`
/// elements, bf16 or (an FP8 cache) e4m3 bytes with the layer's scales.
pub struct CudaKvCache {
    pub(crate) planes: KvPlanes,
    pub(crate) num_blocks: usize,
    pub(crate) block_size: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
}

/// A KV cache's storage, per layer.
pub(crate) enum KvPlanes {
    Bf16 {
        k: Vec<CudaSlice<bf16>>,
        v: Vec<CudaSlice<bf16>>,
    },
    /// e4m3 bytes: a stored `q` means `q · scales[layer].k` (keys) or `.v` (values).
    E4m3 {
        k: Vec<CudaSlice<u8>>,
        v: Vec<CudaSlice<u8>>,
        scales: Arc<[KvScale]>,
    },
}

impl CudaKvCache {
    /// Token slots per layer.
    pub fn slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Layers cached.
    pub(crate) fn layers(&self) -> usize {
        match &self.planes {
            KvPlanes::Bf16 { k, .. } => k.len(),
            KvPlanes::E4m3 { k, .. } => k.len(),
        }
    }

    /// The cache's shape and format, as the backend contract checks batches against it.
    pub(crate) fn spec(&self) -> KvCacheSpec {
        KvCacheSpec {
            layers: self.layers(),
            num_blocks: self.num_blocks,
            block_size: self.block_size,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            kv: match &self.planes {
                KvPlanes::Bf16 { .. } => KvFormat::Model,
                KvPlanes::E4m3 { scales, .. } => KvFormat::Fp8(scales.clone()),
            },
        }
    }

    /// Whether the cache stores e4m3 (the kernels' `_kv8` instantiations read and write it).
    pub(crate) fn is_fp8(&self) -> bool {
        matches!(self.planes, KvPlanes::E4m3 { .. })
    }

    /// `layer`'s (k, v) scales as the kernels take them: 1.0 for a bf16 cache, whose kernels
    /// ignore them (the write) or multiply by them exactly (attention).
    pub(crate) fn scales(&self, layer: usize) -> (f32, f32) {
        match &self.planes {
            KvPlanes::E4m3 { scales, .. } => scales.get(layer).map_or((1.0, 1.0), |s| (s.k, s.v)),
            KvPlanes::Bf16 { .. } => (1.0, 1.0),
        }
    }

    /// Pushes `layer`'s K and V buffers, read-only (attention), as the next two kernel arguments.
    pub(crate) fn push_layer<'a>(&'a self, launch: &mut LaunchArgs<'a>, layer: usize) {
        match &self.planes {
            KvPlanes::Bf16 { k, v } => launch.arg(&k[layer]).arg(&v[layer]),
            KvPlanes::E4m3 { k, v, .. } => launch.arg(&k[layer]).arg(&v[layer]),
        };
    }

    /// Pushes `layer`'s K and V buffers, written (the KV write), as the next two kernel arguments.
    pub(crate) fn push_layer_mut<'a>(&'a mut self, launch: &mut LaunchArgs<'a>, layer: usize) {
        match &mut self.planes {
            KvPlanes::Bf16 { k, v } => launch.arg(&mut k[layer]).arg(&mut v[layer]),
            KvPlanes::E4m3 { k, v, .. } => launch.arg(&mut k[layer]).arg(&mut v[layer]),
        };
    }
}

/// Elements per pinned staging buffer (8 MiB of bf16): large enough for full-speed copies,
/// small enough that two of them are nothing next to a model.
pub(crate) const STAGING_ELEMS: usize = 4 << 20;

/// The two pinned buffers weights are staged through, with the event marking the end of each
/// one's last copy (cudarc's own tracking is off, see `CudaBackend::new`).
pub(crate) struct Staging {
    bufs: [PinnedHostSlice<bf16>; 2],
    done: [CudaEvent; 2],
}

impl CudaBackend {
    /// `n` bf16 on the device: NaN-filled when poisoning is on (tests: any element a kernel
    /// forgets to write shows), uninitialised otherwise (every kernel writes its whole output).
    pub(crate) fn alloc_bf16(&self, n: usize) -> Result<CudaSlice<bf16>> {
        // CUDA refuses empty allocations: an empty tensor holds one unused element.
        // SAFETY: the memory is either filled below or fully written by the kernel it is for.
        let mut buf = unsafe { self.stream.alloc::<bf16>(n.max(1)) }.cuda("allocating device memory")?;
        self.poison_buf(&mut buf, n)?;
        Ok(buf)
    }

    /// Fills `n` elements of `buf` with all-ones bytes (NaN for floats) when poisoning is on.
    fn poison_buf<T>(&self, buf: &mut CudaSlice<T>, n: usize) -> Result<()> {
        if self.poison {
            let bytes = n.max(1) * std::mem::size_of::<T>();
            let (ptr, _record) = buf.device_ptr_mut(&self.stream);
            // SAFETY: `ptr` addresses at least `bytes` bytes owned by `buf`, on `self.stream`.
            unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes, self.stream.cu_stream()) }
                .cuda("poisoning device memory")?;
        }
        Ok(())
    }

    /// `n` elements for one step's use: carved from the step workspace inside a step (see
    /// workspace.rs), else from the pool; poisoned like [`CudaBackend::alloc_bf16`]. Inside a
    /// graph capture a full workspace is an error (the pool cannot be used there).
    pub(crate) fn alloc_buf<T: DeviceRepr>(&self, n: usize, what: &str) -> Result<Buf<T>> {
        if self.in_step.load(Ordering::Relaxed) {
            if let Some(ws) = self.workspace.lock().ok().and_then(|w| w.clone()) {
                if let Some(mut b) = ws.buf::<T>(&self.stream, n) {
                    self.poison_buf(&mut b, n)?;
                    return Ok(b);
                }
                if self.capturing.load(Ordering::Relaxed) {
                    return Err(workspace::full(&ws, n * std::mem::size_of::<T>()));
                }
                self.workspace_overflows.fetch_add(1, Ordering::Relaxed);
            }
        }
        // SAFETY: the memory is either poisoned below or fully written by the kernel it is for.
        let mut b = Buf::pool(unsafe { self.stream.alloc::<T>(n.max(1)) }.cuda(what)?);
        self.poison_buf(&mut b, n)?;
        Ok(b)
    }

    /// A KV cache of `spec`'s shape and format: bf16, or e4m3 bytes with the per-layer scales
    /// (one pair a layer, finite and positive). Poisoned when poisoning is on (attention must
    /// never read a slot nobody wrote: all-ones bytes are NaN in bf16 and in e4m3 alike), zeroed
    /// otherwise.
    pub(crate) fn new_kv_cache_impl(&self, spec: &KvCacheSpec) -> Result<CudaKvCache> {
        let len = spec.num_blocks * spec.block_size * spec.kv_heads * spec.head_dim;
        if len == 0 {
            return Err(Error::Backend(format!("new_kv_cache: empty cache {spec:?}")));
        }
        if spec.num_blocks * spec.block_size > u32::MAX as usize {
            return Err(Error::Backend("new_kv_cache: more slots than u32 slot ids address".into()));
        }
        let planes = match &spec.kv {
            KvFormat::Model => {
                let (k, v) = self.alloc_kv_planes(spec.layers, len)?;
                KvPlanes::Bf16 { k, v }
            }
            KvFormat::Fp8(scales) => {
                if scales.len() != spec.layers {
                    return Err(Error::Backend(format!(
                        "new_kv_cache: {} layers but {} KV scale pairs",
                        spec.layers,
                        scales.len()
                    )));
                }
                if let Some((i, s)) = scales
                    .iter()
                    .enumerate()
                    .find(|(_, s)| !(s.k.is_finite() && s.v.is_finite() && s.k > 0.0 && s.v > 0.0))
                {
                    return Err(Error::Backend(format!(
                        "new_kv_cache: layer {i}'s KV scales k {} v {} (finite and positive expected)",
                        s.k, s.v
                    )));
                }
                let (k, v) = self.alloc_kv_planes(spec.layers, len)?;
                KvPlanes::E4m3 { k, v, scales: scales.clone() }
            }
        };
        Ok(CudaKvCache {
            planes,
            num_blocks: spec.num_blocks,
            block_size: spec.block_size,
            kv_heads: spec.kv_heads,
            head_dim: spec.head_dim,
        })
    }

    /// The K and V planes of `layers` layers, `len` elements of `T` each.
    #[allow(clippy::type_complexity)]
    fn alloc_kv_planes<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        layers: usize,
        len: usize,
    ) -> Result<(Vec<CudaSlice<T>>, Vec<CudaSlice<T>>)> {
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(self.alloc_kv_plane(len)?);
            v.push(self.alloc_kv_plane(len)?);
        }
        Ok((k, v))
    }

    /// One K or V plane of `len` elements of `T` for the KV cache.
    fn alloc_kv_plane<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        if self.poison {
            // SAFETY: poisoned right below; attention reads only slots the KV write has written.
            let mut buf = unsafe { self.stream.alloc::<T>(len) }.cuda("allocating the KV cache")?;
            self.poison_buf(&mut buf, len)?;
            Ok(buf)
        } else {
            self.stream.alloc_zeros(len).cuda("allocating the KV cache")
        }
    }

    /// The e4m3 bytes of `layer`'s keys and values (`None` for a bf16 cache): what tests check
    /// against the CPU backend's FP8 cache bit for bit.
    pub fn kv_cache_e4m3_bits(&self, cache: &CudaKvCache, layer: usize) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        self.bind()?;
        match &cache.planes {
            KvPlanes::Bf16 { .. } => Ok(None),
            KvPlanes::E4m3 { k, v, .. } => {
                let (k, v) = match (k.get(layer), v.get(layer)) {
                    (Some(k), Some(v)) => (k, v),
                    _ => return Err(Error::Backend(format!("kv_cache_e4m3_bits: no layer {layer}"))),
                };
                let k = self.stream.clone_dtoh(k).cuda("copying the KV cache to the host")?;
                let v = self.stream.clone_dtoh(v).cuda("copying the KV cache to the host")?;
                Ok(Some((k, v)))
            }
        }
    }

    /// A tensor of `rows × cols` from `alloc_buf`.
    pub(crate) fn alloc_tensor(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor { data: self.alloc_buf(rows * cols, "allocating an activation")?, rows, cols })
    }

    /// Copies a small host array (indices, metadata) to the device; an empty one becomes a
    /// single zero, as CUDA refuses empty allocations. Not inside a graph capture: a captured
    /// copy would read this host memory again at every replay.
    pub(crate) fn upload_u32(&self, data: &[u32]) -> Result<Buf<u32>> {
        let data = if data.is_empty() { &[0][..] } else { data };
        let mut buf = self.alloc_buf::<u32>(data.len(), "allocating metadata")?;
        self.stream.memcpy_htod(data, &mut *buf).cuda("copying metadata to the device")?;
        Ok(buf)
    }

    /// A one-element buffer for kernel arguments a launch does not use.
    pub(crate) fn placeholder(&self) -> Result<Buf<f32>> {
        self.alloc_buf::<f32>(1, "allocating a placeholder")
    }

    /// The staging buffers, allocated on first use.
    fn new_staging(&self) -> Result<Staging> {
        // Plain (not write-combined) pinned memory: the tail of a weight is read back on the host.
        // SAFETY: the buffers are written before any copy reads them.
        let alloc = || unsafe { self.ctx.alloc_pinned_with_flags::<bf16>(STAGING_ELEMS, 0) };
        let bufs =
            [alloc().cuda("allocating pinned staging memory")?, alloc().cuda("allocating pinned staging memory")?];
        let event = || self.ctx.new_event(None).cuda("creating an event");
        Ok(Staging { bufs, done: [event()?, event()?] })
    }

    /// Streams `parts` (concatenated along rows, each followed by its zero padding rows) into
    /// one new bf16 device matrix.
    pub(crate) fn load_weight_impl(&self, parts: &[TensorSlice<'_>]) -> Result<CudaWeight> {
        let (rows, cols) = fused_shape(parts)?;
        let mut dst = self.alloc_bf16(rows * cols)?;
        let mut guard = self.staging.lock().map_err(|_| Error::Backend("staging buffers poisoned".into()))?;
        if guard.is_none() {
            *guard = Some(self.new_staging()?);
        }
        let staging = guard.as_mut().ok_or_else(|| Error::Backend("staging buffers missing".into()))?;
        staging.done[0].synchronize().cuda("waiting for a weight copy")?;
        let mut stager =
            Stager { backend: self, staging, dst: &mut dst, total: rows * cols, cur: 0, fill: 0, offset: 0 };
        for p in parts {
            for row in p.row_bytes() {
                stager.push(row, p.tensor.dtype)?;
            }
            stager.push_zeros(p.pad_rows * cols)?;
        }
        stager.finish()?;
        Ok(CudaWeight { data: WeightData::Bf16(dst), rows, cols })
    }
}

/// Fills the staging buffers in turn and copies each full one to `dst` at `offset`.
struct Stager<'a> {
    backend: &'a CudaBackend,
    staging: &'a mut Staging,
    dst: &'a mut CudaSlice<bf16>,
    /// Elements the weight has (`dst` may hold one more when the weight is empty).
    total: usize,
    /// The buffer being filled; its previous copy has finished (waited for in `flush`).
    cur: usize,
    /// Elements already in it.
    fill: usize,
    /// Where in `dst` its first element goes.
    offset: usize,
}

impl Stager<'_> {
    /// The buffer being filled.
    fn buffer(&mut self) -> Result<&mut [bf16]> {
        self.staging.bufs[self.cur].as_mut_slice().cuda("mapping pinned staging memory")
    }

    /// Fails unless `n` more elements fit the weight (a slice whose rows disagree with its
    /// shape would otherwise write past the buffer).
    fn room(&self, n: usize) -> Result<()> {
        if self.offset + self.fill + n > self.total {
            return Err(Error::Backend(format!("weight upload: more than the {} elements of its shape", self.total)));
        }
        Ok(())
    }

    /// Appends one row of stored little-endian values, converted to bf16.
    fn push(&mut self, mut bytes: &[u8], dtype: DType) -> Result<()> {
        let size = dtype.size();
        self.room(bytes.len() / size)?;
        while !bytes.is_empty() {
            let fill = self.fill;
            let buf = self.buffer()?;
            let n = (bytes.len() / size).min(STAGING_ELEMS - fill);
            let (now, rest) = bytes.split_at(n * size);
            let out = &mut buf[fill..fill + n];
            match dtype {
                DType::BF16 => {
                    for (o, c) in out.iter_mut().zip(now.chunks_exact(2)) {
                        *o = bf16::from_le_bytes([c[0], c[1]]);
                    }
                }
                DType::F16 => {
                    for (o, c) in out.iter_mut().zip(now.chunks_exact(2)) {
                        *o = bf16::from_f32(half::f16::from_le_bytes([c[0], c[1]]).to_f32());
                    }
                }
                DType::F32 => {
                    for (o, c) in out.iter_mut().zip(now.chunks_exact(4)) {
                        *o = bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                    }
                }
                // FP8 weights load through `load_fp8_weight`; `fused_shape` refuses F8 parts
                // without scales before any row gets here.
                DType::F8E4M3 => return Err(Error::Backend("an F8_E4M3 tensor reached the bf16 loader".into())),
                DType::Gguf { .. } => {
                    return Err(Error::Backend("GGUF weights load on the CPU only (`tulu convert` them)".into()))
                }
            }
            self.fill += n;
            bytes = rest;
            if self.fill == STAGING_ELEMS {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Appends `n` zeros (padding rows).
    fn push_zeros(&mut self, mut n: usize) -> Result<()> {
        self.room(n)?;
        while n > 0 {
            let fill = self.fill;
            let k = n.min(STAGING_ELEMS - fill);
            self.buffer()?[fill..fill + k].fill(bf16::ZERO);
            self.fill += k;
            n -= k;
            if self.fill == STAGING_ELEMS {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Starts the copy of the full current buffer and switches to the other one.
    fn flush(&mut self) -> Result<()> {
        let stream = &self.backend.stream;
        let mut view = self.dst.slice_mut(self.offset..self.offset + STAGING_ELEMS);
        stream.memcpy_htod(&self.staging.bufs[self.cur], &mut view).cuda("copying a weight to the device")?;
        self.staging.done[self.cur].record(stream).cuda("recording a weight copy")?;
        self.offset += STAGING_ELEMS;
        self.fill = 0;
        self.cur ^= 1;
        // The other buffer may still be feeding its previous copy: wait before refilling it.
        self.staging.done[self.cur].synchronize().cuda("waiting for a weight copy")
    }

    /// Copies the partly filled last buffer and waits for every copy of this weight.
    fn finish(mut self) -> Result<()> {
        if self.fill > 0 {
            // A pinned buffer copies whole; the tail goes through pageable memory instead.
            let fill = self.fill;
            let tail = self.buffer()?[..fill].to_vec();
            let mut view = self.dst.slice_mut(self.offset..self.offset + fill);
            self.backend.stream.memcpy_htod(&tail, &mut view).cuda("copying a weight to the device")?;
        }
        if self.offset + self.fill != self.total {
            return Err(Error::Backend(format!(
                "weight upload wrote {} of {} elements",
                self.offset + self.fill,
                self.total
            )));
        }
        self.backend.stream.synchronize().cuda("finishing a weight upload")
    }
}
