//! The `tulu` subcommands, one module each.

pub mod bench;
pub mod bench_model;
pub mod bench_predict;
pub mod bench_serve;
pub mod bench_spec;
pub mod convert;
pub mod generate;
pub mod inspect;
pub mod inspect_cpu;
pub mod logging;
pub mod serve;

use std::io::IsTerminal;

use tulu::unstable::parallel::rendezvous::WorldSpec;
use tulu::{Device, EngineOptions, Error, Result};

use crate::ModelArgs;

/// Engine options from the shared model flags; progress bars only when stderr is a terminal.
pub fn engine_options(args: &ModelArgs) -> Result<EngineOptions> {
    let device: Device = args.device.parse()?;
    let mut opts = EngineOptions::new(args.model.clone()).device(device).progress(std::io::stderr().is_terminal());
    opts.max_context = args.max_context;
    opts.tp = args.tp;
    opts.gpu_memory_utilization = args.gpu_memory_utilization;
    opts.dist_timeout = std::time::Duration::try_from_secs_f64(args.dist_timeout)
        .map_err(|_| Error::request("dist-timeout", "must be a number of seconds ≥ 0"))?;
    opts.dist_token = args.dist_token.clone();
    opts.enforce_eager = args.enforce_eager;
    opts.quantize = args.quantize;
    opts.kv_cache_dtype = args.kv_cache_dtype;
    opts.speculation = speculation(args)?;
    opts.world = match WorldSpec::from_vars(|k| std::env::var(k).ok())? {
        Some(spec) => Some(spec),
        None if args.nnodes > 1 => {
            Some(WorldSpec::from_nodes(args.nnodes, args.node_rank, 1, 0, &args.master_addr, args.master_port)?)
        }
        None => None,
    };
    Ok(opts)
}

/// The speculative-decoding flags, checked (an error names the flag).
pub fn speculation(args: &ModelArgs) -> Result<Option<tulu::Speculation>> {
    let k = args.num_speculative_tokens.unwrap_or(4);
    let spec = match (&args.speculative, &args.draft_model) {
        (Some(_), Some(_)) => {
            return Err(Error::request("--draft-model", "cannot be used with --speculative ngram: choose one proposer"))
        }
        (None, Some(model)) => {
            if let Some(flag) = [("--ngram-min", args.ngram_min), ("--ngram-max", args.ngram_max)]
                .iter()
                .find_map(|(f, v)| v.map(|_| *f))
            {
                return Err(Error::request(flag, "needs --speculative ngram (not --draft-model)"));
            }
            tulu::Speculation::draft(model.clone(), k)
        }
        (Some(_ngram), None) => {
            let mut ngram = tulu::NgramProposer { min_n: 2, max_n: 4, k };
            ngram.min_n = args.ngram_min.unwrap_or(ngram.min_n);
            ngram.max_n = args.ngram_max.unwrap_or(ngram.max_n.max(ngram.min_n));
            tulu::Speculation { proposer: tulu::Proposer::Ngram(ngram), ..tulu::Speculation::ngram(k) }
        }
        (None, None) => {
            let tuned = [
                ("--num-speculative-tokens", args.num_speculative_tokens),
                ("--ngram-min", args.ngram_min),
                ("--ngram-max", args.ngram_max),
            ];
            return match tuned.iter().find(|(_, v)| v.is_some()) {
                Some((flag, _)) => Err(Error::request(*flag, "needs --speculative ngram or --draft-model")),
                None => Ok(None),
            };
        }
    };
    spec.validate().map_err(|e| match e {
        Error::Request { param, message } => Error::request(format!("--{}", param.replace('_', "-")), message),
        other => other,
    })?;
    Ok(Some(spec))
}

/// In a multi-process world, a rank other than 0 only computes the steps rank 0 sends: this runs
/// it to the end and returns `true`; rank 0 (and single-process runs) get `false`.
pub fn run_if_not_rank0(opts: &EngineOptions) -> Result<bool> {
    match &opts.world {
        Some(w) if w.rank != 0 => {
            eprintln!(
                "tulu: rank {} of {}: waiting for steps from rank 0 at {}:{}",
                w.rank, w.world_size, w.master_addr, w.master_port
            );
            tulu::unstable::ranks::run_rank(opts)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}
