//! The NCCL communicator: one rank per GPU, within a process (`ncclCommInitAll`) or across
//! processes and machines (`ncclCommInitRank` with a unique id handed out by
//! [`super::rendezvous`]).
//!
//! libnccl is loaded at run time by cudarc, which panics when the library is missing; every
//! entry point here checks for it first, so a machine without NCCL gets an `Error::Device`
//! naming the library instead. Collectives are queued on the calling rank's backend stream, so
//! they are ordered after the op that produced their input without any extra synchronisation.
//!
//! Sums are done by NCCL in bf16, the storage type of every activation (see
//! `backend::cuda`); the host-staged communicator (`local_cuda.rs`) sums in f32 instead, so
//! the two agree to bf16 tolerance, not bit for bit.

use std::ffi::CStr;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{sys as cu, CudaContext, DevicePtr, DevicePtrMut};
use cudarc::nccl::{result, sys};

use super::Communicator;
use crate::backend::cuda::{cuda_available, CudaBackend, CudaResultExt, CudaTensor};
use crate::error::{Error, Result};

/// Bytes of an NCCL unique id.
pub const UNIQUE_ID_BYTES: usize = 128;

/// An `ncclComm_t`: a raw handle, owned by exactly one [`NcclComm`].
struct RawComm(sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; `NcclComm`
// serialises calls through a mutex.
unsafe impl Send for RawComm {}

/// One rank's NCCL communicator.
pub struct NcclComm {
    comm: Mutex<RawComm>,
    rank: usize,
    world: usize,
    device: usize,
    /// Keeps the device's primary context alive as long as the communicator that uses it.
    _ctx: Option<Arc<CudaContext>>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclComm {{ rank: {}, world: {}, device: cuda:{} }}", self.rank, self.world, self.device)
    }
}

/// `Ok` when libnccl can be loaded, else an `Error::Device` saying how to get it.
pub fn nccl_available() -> Result<()> {
    // cudarc panics on the first NCCL call when libnccl is missing: look for it first.
    // SAFETY: only tries to dlopen the library's candidate names.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::Device {
            device: "nccl".into(),
            message: "the NCCL library (libnccl.so.2) was not found; install NCCL (libnccl2, or the \
                      nvidia-nccl wheel) and put it on LD_LIBRARY_PATH"
                .into(),
        })
    }
}

/// `Error::Backend("{what}: {NCCL's message}")`.
fn nccl_error(what: &str, e: result::NcclError) -> Error {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any result code.
    let text = unsafe {
        let p = sys::ncclGetErrorString(e.0);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    Error::Backend(format!("{what}: NCCL {:?} ({text})", e.0))
}

/// The value as NCCL's `int`, naming `what` when it does not fit.
fn c_int(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::Backend(format!("NCCL: {what} = {x} does not fit an int")))
}

impl NcclComm {
    /// A fresh unique id for a new group; rank 0 creates it and hands it to the other ranks
    /// (in its hello, `ranks::Hello`), which pass it to [`NcclComm::from_id`].
    pub fn unique_id() -> Result<[u8; UNIQUE_ID_BYTES]> {
        nccl_available()?;
        let id = result::get_uniqueid().map_err(|e| nccl_error("creating an NCCL unique id", e))?;
        Ok(id.internal.map(|c| c as u8))
    }

    /// Communicators for ranks `0..devices.len()` of this process, rank `r` on CUDA device
    /// `devices[r]` (`ncclCommInitAll`). NCCL refuses two ranks on one device: ranks sharing a
    /// GPU use the host-staged in-process communicator instead.
    pub fn new_local(devices: &[usize]) -> Result<Vec<NcclComm>> {
        nccl_available()?;
        cuda_available().map_err(|message| Error::Device { device: "cuda".into(), message })?;
        if devices.is_empty() {
            return Err(Error::Backend("NCCL: a group needs at least one device".into()));
        }
        for (i, d) in devices.iter().enumerate() {
            if devices[..i].contains(d) {
                return Err(Error::Device {
                    device: format!("cuda:{d}"),
                    message: "NCCL cannot place two ranks on one GPU".into(),
                });
            }
        }
        let ordinals = devices.iter().map(|&d| c_int(d, "device")).collect::<Result<Vec<_>>>()?;
        let n = c_int(devices.len(), "world size")?;
        let mut comms: Vec<sys::ncclComm_t> = vec![std::ptr::null_mut(); devices.len()];
        // SAFETY: `comms` has room for `n` handles and `ordinals` holds `n` device ids.
        unsafe { result::comm_init_all(comms.as_mut_ptr(), n, ordinals.as_ptr()) }
            .map_err(|e| nccl_error(&format!("initialising NCCL on devices {devices:?}"), e))?;
        Ok(comms
            .into_iter()
            .zip(devices)
            .enumerate()
            .map(|(rank, (comm, &device))| NcclComm {
                comm: Mutex::new(RawComm(comm)),
                rank,
                world: devices.len(),
                device,
                _ctx: None,
            })
            .collect())
    }

    /// This process's rank of a `world`-rank group (possibly spanning machines) whose id rank 0
    /// created with [`NcclComm::unique_id`]. Blocks until every rank has joined.
    pub fn from_id(id: [u8; UNIQUE_ID_BYTES], rank: usize, world: usize, device: usize) -> Result<NcclComm> {
        nccl_available()?;
        if rank >= world {
            return Err(Error::request("rank", format!("{rank} is not below the world size {world}")));
        }
        let dev = |message: String| Error::Device { device: format!("cuda:{device}"), message };
        cuda_available().map_err(dev)?;
        // NCCL creates the communicator on the current device.
        let ctx = CudaContext::new(device).map_err(|e| dev(format!("creating a context: {e}")))?;
        ctx.bind_to_thread().map_err(|e| dev(format!("binding the context: {e}")))?;
        let id = sys::ncclUniqueId { internal: id.map(|b| b as std::ffi::c_char) };
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; `id` is a complete unique id.
        unsafe { result::comm_init_rank(&mut comm, c_int(world, "world size")?, id, c_int(rank, "rank")?) }
            .map_err(|e| nccl_error(&format!("joining the NCCL group as rank {rank} of {world}"), e))?;
        Ok(NcclComm { comm: Mutex::new(RawComm(comm)), rank, world, device, _ctx: Some(ctx) })
    }

    /// The CUDA device this rank's communicator drives.
    pub fn device(&self) -> usize {
        self.device
    }

    /// Aborts the communicator (`ncclCommAbort`): NCCL kernels in flight on its device stop, so
    /// a rank blocked waiting for a dead or stalled peer gets an error instead of hanging, and
    /// every later collective fails. The tensor-parallel runner calls it when a step outlives
    /// the collective timeout.
    pub fn abort(&self) {
        if let Ok(mut c) = self.comm.lock() {
            if !c.0.is_null() {
                // SAFETY: the handle came from a successful init; it is nulled so that neither
                // a later collective nor Drop uses it again.
                let _ = unsafe { result::comm_abort(c.0) };
                c.0 = std::ptr::null_mut();
            }
        }
    }

    /// The handle, after checking that `backend` runs on this communicator's device (NCCL
    /// would otherwise read another GPU's pointers) and making its context current.
    fn enter(&self, backend: &CudaBackend, op: &str) -> Result<MutexGuard<'_, RawComm>> {
        let ctx = backend.stream().context();
        if ctx.ordinal() != self.device {
            return Err(Error::Backend(format!(
                "{op}: rank {} communicates on cuda:{}, but its backend runs on cuda:{}",
                self.rank,
                self.device,
                ctx.ordinal()
            )));
        }
        ctx.bind_to_thread().cuda("binding the CUDA context")?;
        let comm =
            self.comm.lock().map_err(|_| Error::Backend(format!("{op}: the NCCL communicator's lock is poisoned")))?;
        if comm.0.is_null() {
            return Err(Error::Backend(format!("{op}: the NCCL group was aborted (a rank failed or stalled)")));
        }
        Ok(comm)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if let Ok(c) = self.comm.get_mut() {
            if !c.0.is_null() {
                // Abort rather than destroy: destroy waits for peers, and a peer may be gone.
                // SAFETY: the handle came from a successful init and is dropped once.
                let _ = unsafe { result::comm_abort(c.0) };
                c.0 = std::ptr::null_mut();
            }
        }
    }
}

impl Communicator<CudaBackend> for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    /// NCCL kernels are queued on the backend's stream like any other.
    fn capturable(&self) -> bool {
        true
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, backend: &CudaBackend, x: &mut CudaTensor) -> Result<()> {
        let n = x.rows * x.cols;
        if n == 0 {
            return Ok(());
        }
        let comm = self.enter(backend, "all_reduce_sum")?;
        let stream = backend.stream();
        let (ptr, _record) = x.data.device_ptr_mut(stream);
        // SAFETY: `ptr` addresses at least n bf16 owned by `x` on this device; in place is allowed.
        unsafe {
            result::all_reduce(
                ptr as *const std::ffi::c_void,
                ptr as *mut std::ffi::c_void,
                n,
                sys::ncclDataType_t::ncclBfloat16,
                sys::ncclRedOp_t::ncclSum,
                comm.0,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| nccl_error("all_reduce_sum", e))?;
        Ok(())
    }

    fn all_gather_cols(&self, backend: &CudaBackend, x: CudaTensor) -> Result<CudaTensor> {
        let (rows, cols, world) = (x.rows, x.cols, self.world);
        if rows * cols == 0 {
            return backend.alloc_tensor(rows, cols * world);
        }
        let comm = self.enter(backend, "all_gather_cols")?;
        let stream = backend.stream();
        // NCCL concatenates whole buffers: rank-major blocks of rows × cols.
        let mut blocks = backend.alloc_tensor(world * rows, cols)?;
        {
            let (src, _r) = x.data.device_ptr(stream);
            let (dst, _w) = blocks.data.device_ptr_mut(stream);
            // SAFETY: src holds rows·cols bf16, dst world·rows·cols, both on this device.
            unsafe {
                result::all_gather(
                    src as *const std::ffi::c_void,
                    dst as *mut std::ffi::c_void,
                    rows * cols,
                    sys::ncclDataType_t::ncclBfloat16,
                    comm.0,
                    stream.cu_stream() as sys::cudaStream_t,
                )
            }
            .map_err(|e| nccl_error("all_gather_cols", e))?;
        }
        drop(comm);
        if rows == 1 {
            // One row: rank-major blocks already are the concatenated columns.
            return Ok(blocks.reshaped(rows, cols * world));
        }
        // Rank r's block becomes columns [r·cols, (r+1)·cols) of every row: one strided copy
        // per rank (rows are short — one per sampled sequence — so no kernel is worth it).
        let mut out = backend.alloc_tensor(rows, cols * world)?;
        let elem = std::mem::size_of::<half::bf16>();
        // Device pointers are plain addresses; `blocks` and `out` outlive every copy queued
        // on this stream (their memory is freed in stream order).
        let src = blocks.data.device_ptr(stream).0;
        let dst = out.data.device_ptr_mut(stream).0;
        for r in 0..world {
            let copy = cu::CUDA_MEMCPY2D {
                srcXInBytes: 0,
                srcY: 0,
                srcMemoryType: cu::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                srcHost: std::ptr::null(),
                srcDevice: src + (r * rows * cols * elem) as u64,
                srcArray: std::ptr::null_mut(),
                srcPitch: cols * elem,
                dstXInBytes: 0,
                dstY: 0,
                dstMemoryType: cu::CUmemorytype::CU_MEMORYTYPE_DEVICE,
                dstHost: std::ptr::null_mut(),
                dstDevice: dst + (r * cols * elem) as u64,
                dstArray: std::ptr::null_mut(),
                dstPitch: world * cols * elem,
                WidthInBytes: cols * elem,
                Height: rows,
            };
            // SAFETY: the source block (rows × cols) and the destination columns (rows rows of
            // cols elements at pitch world·cols) lie inside `blocks` and `out`.
            unsafe { cu::cuMemcpy2DAsync_v2(&copy, stream.cu_stream()) }
                .result()
                .cuda("rearranging gathered columns")?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without libnccl (CI), every constructor fails with a reason instead of panicking.
    #[test]
    fn without_libnccl_constructors_fail_cleanly() {
        // SAFETY: only tries to dlopen the library's candidate names.
        if unsafe { sys::is_culib_present() } {
            return; // a machine with NCCL: tests/gpu.rs covers it
        }
        for e in [
            NcclComm::unique_id().err(),
            NcclComm::new_local(&[0]).err(),
            NcclComm::from_id([0; UNIQUE_ID_BYTES], 0, 1, 0).err(),
        ] {
            let e = e.map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("libnccl"), "{e}");
        }
    }
}
