//! Persistent worker threads for the decode matmuls, as llama.cpp runs its ops: one thread per
//! core (the caller is one of them) waits on a shared generation counter, spinning briefly and
//! then parking, and each matmul hands every thread one even, contiguous share of the output
//! rows. **Off by default** (`TULU_CPU_POOL=spin` turns it on): on the shared 2-core machine,
//! loaded by other builds, it decoded SmolLM2 2–5× slower than rayon's pool (spinning threads
//! beside rayon's starve each other; docs/performance.md has the figures); it waits for an idle
//! comparison. Off, the same even split runs through rayon.
//!
//! One caller dispatches at a time; a second caller meanwhile (another engine, a test running
//! beside it, a nested call) runs its work through rayon instead of waiting.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

use rayon::prelude::*;

/// A job as the workers see it: `f(part)` for their parts.
type Job = *const (dyn Fn(usize) + Sync);

/// What the caller and the workers share.
struct Shared {
    /// Bumped once per job: a worker that sees a new value runs its part of `job`.
    generation: AtomicUsize,
    /// The current job; written only while no worker runs one (`remaining` is zero).
    job: std::cell::UnsafeCell<Option<Job>>,
    /// Workers still running the current job.
    remaining: AtomicUsize,
    /// Workers parked (or about to) on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written by the one dispatching caller (holding `Pool::dispatch`) only while
// `remaining` is zero, and read by workers only between a generation bump and their decrement.
unsafe impl Sync for Shared {}

/// The pool: `threads − 1` workers plus the caller.
struct Pool {
    shared: &'static Shared,
    threads: usize,
    dispatch: Mutex<()>,
}

/// Spins a worker makes on the generation counter before it parks: about 50 µs, longer than
/// the gap between two matmuls of a decode step, far shorter than the gap between steps.
const SPINS: usize = 20_000;

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = rayon::current_num_threads().max(1);
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            generation: AtomicUsize::new(0),
            job: std::cell::UnsafeCell::new(None),
            remaining: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        }));
        for index in 1..threads {
            let spawned = std::thread::Builder::new()
                .name(format!("tulu-cpu-{index}"))
                .spawn(move || worker(shared, index, threads));
            if spawned.is_err() {
                // No pool without all its threads: every call goes through rayon.
                return Pool { shared, threads: 0, dispatch: Mutex::new(()) };
            }
        }
        Pool { shared, threads, dispatch: Mutex::new(()) }
    })
}

fn worker(s: &'static Shared, index: usize, threads: usize) {
    let mut seen = 0;
    loop {
        let mut spins = 0;
        let generation = loop {
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                break g;
            }
            spins += 1;
            if spins < SPINS {
                std::hint::spin_loop();
                continue;
            }
            // Park until the next bump (the caller wakes sleepers after bumping; the check
            // under the lock closes the gap between our last look and the wait).
            let guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            let guard = s
                .wake
                .wait_while(guard, |_| s.generation.load(Ordering::SeqCst) == seen)
                .unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            drop(guard);
            spins = 0;
        };
        seen = generation;
        // SAFETY: the caller set `job` before bumping the generation and keeps it (and what it
        // borrows) alive until `remaining` reaches zero.
        if let Some(job) = unsafe { *s.job.get() } {
            let f = unsafe { &*job };
            let parts_of_mine = (index..).step_by(threads);
            for part in parts_of_mine.take_while(|&p| p < PARTS.load(Ordering::Relaxed)) {
                f(part);
            }
        }
        s.remaining.fetch_sub(1, Ordering::Release);
    }
}

/// Parts in the current job (written with `job`).
static PARTS: AtomicUsize = AtomicUsize::new(0);

/// Whether decode matmuls use the persistent workers (`TULU_CPU_POOL=spin` says yes).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("TULU_CPU_POOL").is_ok_and(|v| v == "spin"))
}

/// The threads a job is split over.
pub fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Calls `f(part)` for every part in `0..parts`, part `i` on thread `i mod threads`, and returns
/// when all have returned: on the persistent workers if `spin` (and they are free), else through
/// rayon.
fn run_on(spin: bool, parts: usize, f: &(dyn Fn(usize) + Sync)) {
    let p = if spin { Some(pool()) } else { None };
    let guard = p.filter(|p| p.threads > 1).and_then(|p| p.dispatch.try_lock().ok().map(|g| (p, g)));
    let Some((p, _guard)) = guard else {
        (0..parts).into_par_iter().for_each(f);
        return;
    };
    let s = p.shared;
    // SAFETY: no worker runs a job (the last dispatch waited for `remaining` to reach zero), and
    // `f` outlives this call, which waits for every worker below. The lifetime is erased only
    // for the time of this call.
    unsafe {
        let job: Job = std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), Job>(f);
        *s.job.get() = Some(job);
    }
    PARTS.store(parts, Ordering::Relaxed);
    s.remaining.store(p.threads - 1, Ordering::Relaxed);
    s.generation.fetch_add(1, Ordering::SeqCst);
    if s.sleepers.load(Ordering::SeqCst) > 0 {
        let _lock = s.lock.lock().unwrap_or_else(|e| e.into_inner());
        s.wake.notify_all();
    }
    for part in (0..parts).step_by(p.threads) {
        f(part);
    }
    let mut spins = 0;
    while s.remaining.load(Ordering::Acquire) != 0 {
        // A worker descheduled by a busy machine: let it have the core rather than spin on.
        spins += 1;
        if spins < SPINS {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    unsafe { *s.job.get() = None };
}

/// `out` in `threads()` even, contiguous chunks (the last may be shorter, or empty), each
/// filled by `f(first_index, chunk)` on its own thread.
pub fn for_each_even_chunk(out: &mut [f32], f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    even_chunks_on(enabled(), out, f)
}

fn even_chunks_on(spin: bool, out: &mut [f32], f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    let per = out.len().div_ceil(threads()).max(1);
    let parts = out.len().div_ceil(per);
    let (base, len) = (SendPtr(out.as_mut_ptr()), out.len());
    run_on(spin, parts, &|i| {
        let start = i * per;
        let end = (start + per).min(len);
        // SAFETY: each part is a disjoint range of `out`, which outlives `run`.
        let chunk = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        f(start, chunk);
    });
}

/// A pointer the parts share; each writes its own range.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the parts write disjoint ranges.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element is written exactly once, by the part that owns it, for lengths below,
    /// at and above the thread count, over many dispatches (a lost wake-up hangs here).
    #[test]
    fn every_chunk_is_filled_once() {
        for len in [0, 1, 2, 3, 7, 64, 1001] {
            for _ in 0..200 {
                let mut out = vec![f32::NAN; len];
                even_chunks_on(true, &mut out, &|start, chunk| {
                    for (j, v) in chunk.iter_mut().enumerate() {
                        *v = if v.is_nan() { (start + j) as f32 } else { -1.0 };
                    }
                });
                let want: Vec<f32> = (0..len).map(|i| i as f32).collect();
                assert_eq!(out, want, "len {len}");
            }
        }
    }

    /// Callers on several threads at once all get their work done (all but one through rayon).
    #[test]
    fn concurrent_callers_each_finish() {
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    for _ in 0..100 {
                        let mut out = vec![0f32; 33 + t];
                        even_chunks_on(true, &mut out, &|start, chunk| {
                            chunk.iter_mut().enumerate().for_each(|(j, v)| *v = (start + j) as f32)
                        });
                        assert!(out.iter().enumerate().all(|(i, &v)| v == i as f32));
                    }
                });
            }
        });
    }
}
