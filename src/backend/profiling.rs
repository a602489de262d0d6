//! Hooks for `tulu bench` and profiling, apart from the operations and the runtime: ceilings a
//! figure is reported against, what the backend tuned, and how many kernels it launched.

use super::Backend;
use crate::error::Result;

/// What a backend reports to benchmarks (module docs).
pub trait Profiling: Backend {
    /// Measures the device's memory read bandwidth in bytes per second (the ceiling that
    /// batch-1 decode is reported against), reading `bytes` bytes several times.
    fn measure_read_bandwidth(&self, bytes: usize) -> Result<f64>;

    /// What the backend chose while running, for `tulu bench` (one JSON object per entry, e.g.
    /// the kernel picked for each matmul shape and both timings); empty when it chose nothing.
    fn tuning_report(&self) -> Vec<serde_json::Value> {
        Vec::new()
    }

    /// Kernel launches (captured graphs count their kernels) since the backend was made;
    /// `None` where nothing is launched (the CPU).
    fn launches(&self) -> Option<u64> {
        None
    }
}
