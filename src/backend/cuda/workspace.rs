//! The step workspace: one device allocation, made at load, that every tensor of a step is
//! carved from, and [`Buf`], the device buffer type whose drop gives its memory back to
//! wherever it came from.
//!
//! Why: a step allocates ~10 tensors a layer. From the stream-ordered pool that is an API call
//! each, and a captured CUDA graph cannot allocate at all; its kernels must find their operands
//! at the addresses they had at capture. The workspace is a first-fit allocator over one
//! region: the same sequence of allocations and frees, started from the same state, gives the
//! same addresses, which is what makes a decode step replayable. Tensors are carved from it only
//! between `begin_step` and `end_step` (step.rs); weights, the KV cache and tensors made outside
//! a step come from the pool.

use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::{CudaBackend, CudaResultExt};
use crate::error::{Error, Result};

/// Alignment of every carve: what cudaMalloc guarantees, so kernels' 16-byte loads stay aligned.
pub(crate) const ALIGN: usize = 256;

/// Free ranges of the workspace, sorted by offset and coalesced.
#[derive(Debug, Default)]
struct FreeList {
    ranges: Vec<(usize, usize)>,
    /// Bytes in use now, and the most ever in use.
    used: usize,
    peak: usize,
    /// The end of the highest carve so far: a region of this size gives the same carves (and
    /// addresses) to the same sequence of allocations, which `peak` alone, blind to holes,
    /// does not promise.
    high: usize,
}

impl FreeList {
    /// The offset of `bytes` (rounded up to [`ALIGN`]) free bytes, the lowest that fits, or
    /// `None` when none do.
    fn carve(&mut self, bytes: usize) -> Option<usize> {
        let bytes = bytes.div_ceil(ALIGN).max(1) * ALIGN;
        let i = self.ranges.iter().position(|&(_, len)| len >= bytes)?;
        let (off, len) = self.ranges[i];
        if len == bytes {
            self.ranges.remove(i);
        } else {
            self.ranges[i] = (off + bytes, len - bytes);
        }
        self.used += bytes;
        self.peak = self.peak.max(self.used);
        self.high = self.high.max(off + bytes);
        Some(off)
    }

    /// Gives `bytes` at `offset` back, merging with free neighbours.
    fn release(&mut self, offset: usize, bytes: usize) {
        let bytes = bytes.div_ceil(ALIGN).max(1) * ALIGN;
        self.used -= bytes;
        let i = self.ranges.partition_point(|&(o, _)| o < offset);
        self.ranges.insert(i, (offset, bytes));
        if i + 1 < self.ranges.len() && self.ranges[i].0 + self.ranges[i].1 == self.ranges[i + 1].0 {
            self.ranges[i].1 += self.ranges[i + 1].1;
            self.ranges.remove(i + 1);
        }
        if i > 0 && self.ranges[i - 1].0 + self.ranges[i - 1].1 == self.ranges[i].0 {
            self.ranges[i - 1].1 += self.ranges[i].1;
            self.ranges.remove(i);
        }
    }
}

/// One device region that step tensors are carved from (module docs).
pub(crate) struct Workspace {
    /// Owns the memory; carves address it through `base`.
    _region: CudaSlice<u8>,
    base: CUdeviceptr,
    bytes: usize,
    free: Mutex<FreeList>,
}

impl Workspace {
    /// Allocates `bytes` (rounded up to [`ALIGN`]) on `stream`'s device.
    pub fn new(stream: &Arc<CudaStream>, bytes: usize) -> Result<Arc<Self>> {
        let bytes = bytes.div_ceil(ALIGN).max(1) * ALIGN;
        // SAFETY: every carve is written by the kernel it is for before it is read.
        let region = unsafe { stream.alloc::<u8>(bytes) }
            .cuda(&format!("allocating the step workspace ({:.1} MiB)", bytes as f64 / (1 << 20) as f64))?;
        let base = region.device_ptr(stream).0;
        let free = Mutex::new(FreeList { ranges: vec![(0, bytes)], used: 0, peak: 0, high: 0 });
        Ok(Arc::new(Workspace { _region: region, base, bytes, free }))
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Most bytes ever in use at once.
    pub fn peak(&self) -> usize {
        self.free.lock().map_or(0, |f| f.peak)
    }

    /// The end of the highest carve so far: the size that holds the steps run so far.
    pub fn high_water(&self) -> usize {
        self.free.lock().map_or(0, |f| f.high)
    }

    /// Bytes in use now.
    pub fn used(&self) -> usize {
        self.free.lock().map_or(0, |f| f.used)
    }

    fn carve(&self, bytes: usize) -> Option<usize> {
        self.free.lock().ok()?.carve(bytes)
    }

    fn release(&self, offset: usize, bytes: usize) {
        if let Ok(mut f) = self.free.lock() {
            f.release(offset, bytes);
        }
    }

    /// A buffer of `n` `T` carved from the workspace, or `None` when it is full.
    pub fn buf<T>(self: &Arc<Self>, stream: &Arc<CudaStream>, n: usize) -> Option<Buf<T>> {
        let bytes = n.max(1) * std::mem::size_of::<T>();
        let offset = self.carve(bytes)?;
        // SAFETY: [offset, offset + bytes) lies inside `region`, which this Arc keeps alive,
        // and is handed to no one else until the buffer is dropped.
        let slice = unsafe { stream.upgrade_device_ptr::<T>(self.base + offset as u64, n.max(1)) };
        Some(Buf { slice: ManuallyDrop::new(slice), home: Home::Workspace { ws: self.clone(), offset, bytes } })
    }
}

/// Where a [`Buf`]'s memory came from, which decides what dropping it does.
enum Home {
    /// Its own allocation from the stream-ordered pool: freed on drop.
    Pool,
    /// A carve of the workspace: given back on drop.
    Workspace { ws: Arc<Workspace>, offset: usize, bytes: usize },
    /// Memory somebody else owns (a captured graph's output): nothing happens on drop.
    View,
}

/// A device buffer of `T`: derefs to cudarc's `CudaSlice`, frees as its [`Home`] says.
pub struct Buf<T> {
    slice: ManuallyDrop<CudaSlice<T>>,
    home: Home,
}

impl<T> Buf<T> {
    /// A pool allocation.
    pub(crate) fn pool(slice: CudaSlice<T>) -> Self {
        Buf { slice: ManuallyDrop::new(slice), home: Home::Pool }
    }

    /// `len` elements at `ptr`, owned elsewhere.
    ///
    /// # Safety
    /// `ptr` must address `len` `T` that stay allocated while the view is used.
    pub(crate) unsafe fn view(stream: &Arc<CudaStream>, ptr: CUdeviceptr, len: usize) -> Self {
        // SAFETY: the caller's promise.
        let slice = unsafe { stream.upgrade_device_ptr::<T>(ptr, len) };
        Buf { slice: ManuallyDrop::new(slice), home: Home::View }
    }
}

impl<T> Deref for Buf<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

impl<T> Drop for Buf<T> {
    fn drop(&mut self) {
        match &self.home {
            // SAFETY: dropped exactly once, here.
            Home::Pool => unsafe { ManuallyDrop::drop(&mut self.slice) },
            Home::Workspace { ws, offset, bytes } => {
                // SAFETY: taken exactly once, here; the memory is the workspace's, not freed.
                let _ = unsafe { ManuallyDrop::take(&mut self.slice) }.leak();
                ws.release(*offset, *bytes);
            }
            Home::View => {
                // SAFETY: taken exactly once, here; the memory is not ours to free.
                let _ = unsafe { ManuallyDrop::take(&mut self.slice) }.leak();
            }
        }
    }
}

impl CudaBackend {
    /// `fit_workspace`: a new workspace of the old one's high-water mark, when that is smaller.
    pub(crate) fn fit_workspace_impl(&self) -> Result<usize> {
        let mut ws = self.workspace.lock().map_err(|_| Error::Backend("workspace lock poisoned".into()))?;
        let Some((bytes, high)) = ws.as_ref().map(|w| (w.bytes(), w.high_water())) else {
            return Ok(0);
        };
        let fitted = high.div_ceil(ALIGN).max(1) * ALIGN;
        if fitted >= bytes {
            return Ok(bytes);
        }
        // Captured graphs address the old region; no step tensor is alive between steps.
        self.drop_graphs("the step workspace was fitted to its measured peak");
        *ws = None;
        // The old region is freed before the new one is made, and before device memory is read.
        self.synchronize()?;
        *ws = Some(Workspace::new(&self.stream, fitted)?);
        tracing::debug!("step workspace fitted to its measured peak: {} of {} bytes", fitted, bytes);
        Ok(fitted)
    }
}

/// A workspace that cannot hold what a graph capture needs is an error naming the sizes.
pub(crate) fn full(ws: &Workspace, bytes: usize) -> Error {
    Error::Backend(format!(
        "the step workspace ({} MiB, {} MiB in use) cannot hold {} more bytes",
        ws.bytes() >> 20,
        ws.used() >> 20,
        bytes
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_reuses_the_lowest_hole_and_coalesces() {
        let mut f = FreeList { ranges: vec![(0, 16 * ALIGN)], used: 0, peak: 0, high: 0 };
        let a = f.carve(1).unwrap();
        let b = f.carve(2 * ALIGN).unwrap();
        let c = f.carve(ALIGN + 1).unwrap();
        assert_eq!((a, b, c), (0, ALIGN, 3 * ALIGN));
        assert_eq!(f.used, 5 * ALIGN);
        f.release(b, 2 * ALIGN);
        // The hole at b is the lowest that fits: reused, so a replayed sequence lands on the
        // same addresses.
        assert_eq!(f.carve(ALIGN), Some(ALIGN));
        f.release(ALIGN, ALIGN);
        f.release(a, 1);
        f.release(c, ALIGN + 1);
        assert_eq!(f.ranges, vec![(0, 16 * ALIGN)], "every release merges back into one range");
        assert_eq!((f.used, f.peak, f.high), (0, 5 * ALIGN, 5 * ALIGN));
        assert_eq!(f.carve(17 * ALIGN), None);
    }
}
