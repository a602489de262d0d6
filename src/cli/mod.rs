//! The `tulu` subcommands, one module each.

pub mod bench;
pub mod bench_serve;
pub mod convert;
pub mod generate;
pub mod inspect;
pub mod serve;

use std::io::IsTerminal;

use tulu::{Device, EngineOptions, Result};

use crate::ModelArgs;

/// Engine options from the shared model flags; progress bars only when stderr is a terminal.
pub fn engine_options(args: &ModelArgs) -> Result<EngineOptions> {
    let device: Device = args.device.parse()?;
    let mut opts = EngineOptions::new(args.model.clone()).device(device).progress(std::io::stderr().is_terminal());
    opts.max_context = args.max_context;
    opts.tp = args.tp;
    opts.gpu_memory_utilization = args.gpu_memory_utilization;
    Ok(opts)
}
