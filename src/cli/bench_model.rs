//! `tulu bench --random-weights`: one model shape on one device, timed at the forward pass (no
//! tokenizer, scheduler or sampler), each figure next to a ceiling measured in the same run.
//!
//! Weights are generated on the device (`Llama::random`), so an 8B or a 405B shard needs no
//! files. Per prompt length and batch size it prints one JSON line: prefill tok/s and its
//! fraction of the measured GEMM peak, decode tok/s, ms per step, and the bytes a step reads
//! (weights + KV) over the step time as a fraction of the measured read bandwidth.
//!
//! With `--tp N --rank-shard` it builds rank 0's shard of an N-way model, times it per layer
//! (a model of `--layers L` minus a one-layer model, divided by L − 1), measures the all-reduce
//! with N in-process ranks, and projects the full model's per-token latency at tp 8 and 16.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tulu::unstable::backend::cpu::CpuBackend;
use tulu::unstable::backend::{Backend, Device, Profiling, Runtime, StepLimits, StepShape};
use tulu::unstable::config::ModelConfig;
use tulu::unstable::model::Llama;
use tulu::unstable::parallel::local::{LocalComm, LocalGroup};
use tulu::unstable::parallel::sharding::{Shard, ShardPlan};
use tulu::unstable::parallel::sizing::{head_weight_elements, layer_weight_elements, rank_weight_bytes, ElementBytes};
use tulu::unstable::parallel::{Communicator, SingleRank};
use tulu::unstable::runtime::batch::Batch;
use tulu::unstable::runtime::sampler::{RowSampling, Sampled, StepSampling};
use tulu::unstable::weights::random::RandomSlice;
use tulu::{Error, Result};

use super::bench::{round, BenchArgs};
use super::bench_predict::{full_model_row, step_fields, Case, Predicted, Profile};

/// KV block size of the benchmark's caches.
const BLOCK: usize = 16;

/// Published all-reduce latencies the projection also uses (8 GPUs, 32 KB: NCCL, and custom
/// one-shot kernels as in vLLM / TensorRT-LLM).
const PUBLISHED_ALL_REDUCE: [(&str, f64); 2] =
    [("published NCCL 8-GPU 32 KB all-reduce", 22e-6), ("published one-shot custom all-reduce", 10e-6)];

/// Sizes of the ceiling probes on a device.
enum Probes {
    /// These sizes.
    Fixed { read_bytes: usize, gemm_n: usize },
    /// From the first size of each range, doubled while a probe takes under [`PROBE_SECS`], up
    /// to the second.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Grow { read_bytes: (usize, usize), gemm_n: (usize, usize) },
}

/// How long a grown probe must take to be timed.
const PROBE_SECS: f64 = 0.01;

impl Probes {
    /// The read bandwidth (bytes/s) and GEMM peak (FLOP/s) of `backend`, with the sizes probed.
    fn run<B: Profiling>(&self, backend: &B) -> Result<(f64, usize, f64, usize)> {
        let (read, gemm) = match *self {
            Probes::Fixed { read_bytes, gemm_n } => ((read_bytes, read_bytes), (gemm_n, gemm_n)),
            Probes::Grow { read_bytes, gemm_n } => (read_bytes, gemm_n),
        };
        let (read_bw, read_bytes) = grow(read, |b| backend.measure_read_bandwidth(b))?;
        let (gemm_peak, gemm_n) = grow(gemm, |n| gemm_peak(backend, n))?;
        Ok((read_bw, read_bytes, gemm_peak, gemm_n))
    }
}

/// `probe(size)` from `from`, the size doubled while a probe takes under [`PROBE_SECS`] and
/// stays within `to`: the last rate and its size.
fn grow((from, to): (usize, usize), mut probe: impl FnMut(usize) -> Result<f64>) -> Result<(f64, usize)> {
    let mut size = from;
    loop {
        let started = Instant::now();
        let rate = probe(size)?;
        if started.elapsed().as_secs_f64() >= PROBE_SECS || size * 2 > to {
            return Ok((rate, size));
        }
        size *= 2;
    }
}

/// `tulu bench --random-weights`.
pub fn bench_model(args: &BenchArgs) -> Result<()> {
    let full = match (&args.preset, &args.model) {
        (Some(p), _) => ModelConfig::preset(p)?,
        (None, Some(dir)) => ModelConfig::from_file(&dir.join("config.json"))?,
        (None, None) => return Err(Error::request("preset", "--random-weights needs --preset NAME or --model DIR")),
    };
    let mut full = full;
    if let Some(q) = args.quantize {
        q.apply(&mut full);
    }
    args.kv_cache_dtype.apply(&mut full);
    let mut cfg = full.clone();
    if let Some(layers) = args.layers {
        if layers == 0 {
            return Err(Error::request("layers", "must be at least 1"));
        }
        cfg.num_hidden_layers = layers;
    }
    let shard = match (args.rank_shard, args.tp) {
        (true, tp) => Shard { rank: 0, world: tp },
        (false, 1) => Shard::single(),
        (false, tp) => {
            return Err(Error::request(
                "tp",
                format!("--random-weights at --tp {tp} benchmarks one rank's shard: add --rank-shard"),
            ))
        }
    };
    if args.rank_shard && cfg.num_hidden_layers < 2 {
        return Err(Error::request("layers", "--rank-shard times layers by difference: give --layers 2 or more"));
    }
    ShardPlan::new(&cfg, shard)?;
    if args.batch.contains(&0) || args.prompt_len.contains(&0) || args.gen_len == 0 {
        return Err(Error::request("batch", "--batch, --prompt-len and --gen-len must be at least 1"));
    }
    let device: Device = args.device.parse()?;
    match device.resolve()? {
        Device::Cpu => run(
            args,
            &full,
            &cfg,
            shard,
            Arc::new(|| Ok(CpuBackend::new())),
            Probes::Fixed { read_bytes: 1 << 30, gemm_n: 512 },
        ),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => {
            // Probe sizes grow until a probe takes long enough to time (a GPU reaches the
            // largest; a slow device, such as the CPU emulation of CUDA, stops early).
            let probes = Probes::Grow { read_bytes: (64 << 20, 2 << 30), gemm_n: (256, 8192) };
            run(args, &full, &cfg, shard, Arc::new(move || tulu::unstable::backend::cuda::CudaBackend::new(n)), probes)
        }
        other => Err(Error::Device { device: other.to_string(), message: "not available in this build".into() }),
    }
}

/// Opens one more backend on the same device (for the in-process ranks of the all-reduce probe).
type Open<B> = Arc<dyn Fn() -> Result<B> + Send + Sync>;

/// One case's timings.
struct Timing {
    /// Mean seconds per sequence's prefill.
    prefill_s: f64,
    /// Seconds per decode step (all sequences of the batch).
    step_s: f64,
    /// Mean tokens each sequence's attention reads during the timed decode steps.
    mean_context: f64,
    /// Kernel launches (and collectives) per timed decode step, where the backend counts them.
    launches_per_step: Option<f64>,
    /// Under the emulator's profiler: the predicted H100 time of a timed decode step and of
    /// one sequence's prefill.
    predicted: Option<(Predicted, Predicted)>,
}

fn run<B: Runtime + Profiling>(
    args: &BenchArgs,
    full: &ModelConfig,
    cfg: &ModelConfig,
    shard: Shard,
    open: Open<B>,
    probes: Probes,
) -> Result<()>
where
    LocalComm: Communicator<B>,
{
    let backend = open()?;
    let profile = Profile::from_env()?;
    // Under the profiler with fewer layers than the shape has: the whole model's prediction
    // takes a one-layer model's steps too (a layer is the difference).
    let predict_full = profile.is_some() && (2..full.num_hidden_layers).contains(&cfg.num_hidden_layers);
    let eb = backend.element_bytes() as f64;
    let (read_bw, read_bytes, gemm_peak, gemm_n) = probes.run(&backend)?;
    println!(
        "{}",
        json!({
            "case": "ceilings",
            "device": backend.describe(),
            "read_gb_s": round(read_bw / 1e9),
            "read_probe_bytes": read_bytes,
            "gemm_tflops": round(gemm_peak / 1e12),
            "gemm_n": gemm_n,
        })
    );
    let max_positions = args.prompt_len.iter().max().copied().unwrap_or(1) + args.gen_len + WARM_UP + 1;
    let started = Instant::now();
    let model = Llama::random(&backend, cfg, args.seed, max_positions, shard, |_| {})?;
    let init_s = started.elapsed().as_secs_f64();
    // A one-layer model of the same shard: the difference of the two step times is the layers'.
    let one_layer = if args.rank_shard || predict_full {
        let one = ModelConfig { num_hidden_layers: 1, ..cfg.clone() };
        Some(Llama::random(&backend, &one, args.seed, max_positions, shard, |_| {})?)
    } else {
        None
    };
    let plan = ShardPlan::new(cfg, shard)?;
    // Bytes as this device stores them: FP8 linear weights at one byte an element plus a scale
    // a row where it keeps e4m3, at its element size where it dequantizes them.
    let stored = ElementBytes { dense: backend.element_bytes() as u64, fp8: backend.stores_fp8().then_some(1) };
    let step_weights = rank_weight_bytes(cfg, &plan, &stored, false) as f64;
    let head_bytes = rank_weight_bytes(&ModelConfig { num_hidden_layers: 0, ..cfg.clone() }, &plan, &stored, false);
    let layer_bytes = (step_weights - head_bytes as f64) / cfg.num_hidden_layers as f64;
    let mut per_layer = Vec::new();
    // Decode with CUDA graphs and without, in the same run (a backend without graphs runs
    // both eagerly: the CPU prints one row per case).
    let graph_modes: &[bool] = if backend.launches().is_some() { &[true, false] } else { &[false] };
    let limits = |graphs| StepLimits {
        max_num_seqs: args.batch.iter().max().copied().unwrap_or(1),
        max_num_batched_tokens: args.prompt_len.iter().max().copied().unwrap_or(1),
        graphs,
    };
    for &plen in &args.prompt_len {
        for (&batch, &graphs) in args.batch.iter().flat_map(|b| graph_modes.iter().map(move |g| (b, g))) {
            let shape = StepShape {
                limits: limits(graphs),
                max_positions,
                block_size: BLOCK,
                workspace_bytes: model.workspace_bytes(&limits(graphs), backend.element_bytes()),
            };
            backend.reserve(&shape)?;
            let t = time_case(&backend, &model, batch, plen, args.gen_len, profile.as_ref())?;
            let weights = step_weights;
            let kv = model.kv_bytes_per_token(backend.element_bytes()) as f64 * t.mean_context * batch as f64;
            let step_bytes = weights + kv;
            let achieved = step_bytes / t.step_s;
            let prefill_rate = model.prefill_flops(plen) / t.prefill_s;
            let mut row = json!({
                    "case": "decode",
                    "device": backend.describe(),
                    "model": args.preset.clone().unwrap_or_else(|| "config.json".into()),
                    "layers": cfg.num_hidden_layers,
                    "weights": cfg.quantization.as_ref().map_or("dense".into(), |q| q.describe()),
                    "weights_stored_fp8": cfg.quantization.is_some() && backend.stores_fp8(),
                    "tp": shard.world,
                    "rank_shard": args.rank_shard,
                    "batch": batch,
                    "prompt_len": plen,
                    "gen_len": args.gen_len,
                    "cuda_graphs": graphs,
                    "launches_per_step": t.launches_per_step.map(round),
                    "decode_tok_s": round(batch as f64 / t.step_s),
                    "ms_per_step": round(t.step_s * 1e3),
                    "step_mb": round(step_bytes / 1e6),
                    "achieved_gb_s": round(achieved / 1e9),
                    "fraction_of_read_bw": round(achieved / read_bw),
                    "prefill_tok_s": round(plen as f64 / t.prefill_s),
                    "prefill_tflops": round(prefill_rate / 1e12),
                    "fraction_of_gemm_peak": round(prefill_rate / gemm_peak),
                    "init_s": round(init_s),
            });
            if let (Some((step, prefill)), Some(map)) = (t.predicted, row.as_object_mut()) {
                map.extend(step_fields(batch, step, prefill).as_object().cloned().unwrap_or_default());
            }
            println!("{row}");
            let t1 = match one_layer.as_ref() {
                Some(one) if !graphs || predict_full => {
                    // `one` captures graphs of its own (the backend keeps them per model).
                    Some(time_case(&backend, one, batch, plen, args.gen_len, profile.as_ref())?)
                }
                _ => None,
            };
            if let (true, Some((one, many))) = (predict_full, t1.as_ref().and_then(|t1| t1.predicted.zip(t.predicted)))
            {
                let case = Case {
                    model: args.preset.as_deref().unwrap_or("config.json"),
                    layers: cfg.num_hidden_layers,
                    full_layers: full.num_hidden_layers,
                    tp: shard.world,
                    batch,
                    prompt_len: plen,
                    cuda_graphs: graphs,
                };
                println!("{}", full_model_row(&case, one.0, many.0, PUBLISHED_ALL_REDUCE[1].1));
            }
            if let Some(t1) = t1.filter(|_| args.rank_shard && !graphs) {
                let layer_s = ((t.step_s - t1.step_s) / (cfg.num_hidden_layers - 1) as f64).max(0.0);
                let layer_kv = kv / cfg.num_hidden_layers as f64;
                let floor = (layer_bytes + layer_kv) / read_bw;
                println!(
                    "{}",
                    json!({
                        "case": "rank_shard_layer",
                        "tp": shard.world,
                        "rank": shard.rank,
                        "batch": batch,
                        "prompt_len": plen,
                        "layer_ms": round(layer_s * 1e3),
                        "layer_mb": round((layer_bytes + layer_kv) / 1e6),
                        "floor_ms": round(floor * 1e3),
                        "ratio_to_floor": round(layer_s / floor),
                        "rest_of_step_ms": round((t1.step_s - layer_s).max(0.0) * 1e3),
                    })
                );
                per_layer.push((batch, plen, layer_s, (t1.step_s - layer_s).max(0.0), layer_kv));
            }
        }
    }
    // Per matmul shape: the kernel the backend picked, with both timings and the read bandwidth
    // each reached.
    for mut entry in backend.tuning_report() {
        let bytes = entry["weight_mb"].as_f64().unwrap_or(0.0) * 1e6;
        for (kernel, us) in [("gemv", entry["gemv_us"].as_f64()), ("cublaslt", entry["cublaslt_us"].as_f64())] {
            if let Some(us) = us.filter(|&u| u > 0.0) {
                entry[format!("{kernel}_fraction_of_read_bw")] = round(bytes / (us * 1e-6) / read_bw);
            }
        }
        println!("{entry}");
    }
    if args.rank_shard {
        project(args, full, cfg, shard, &open, eb, &per_layer)?;
    }
    Ok(())
}

/// Untimed decode steps before the timed ones: the first runs a bucket eagerly (and measures
/// its matmul choices), the second captures its graph.
const WARM_UP: usize = 2;

/// Prefill of every sequence, then `gen` decode steps of the whole batch (after `WARM_UP`
/// untimed ones), with greedy tokens chosen on the device.
fn time_case<B: Runtime + Profiling>(
    backend: &B,
    model: &Llama<B>,
    batch: usize,
    plen: usize,
    gen: usize,
    profile: Option<&Profile>,
) -> Result<Timing> {
    let per_seq = (plen + gen + WARM_UP + 1).div_ceil(BLOCK);
    let mut cache = backend.new_kv_cache(&model.kv_cache_spec(per_seq * batch, BLOCK))?;
    let tables: Vec<Vec<u32>> =
        (0..batch).map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect()).collect();
    let vocab = model.config().vocab_size as u32;
    let prompt: Vec<u32> = (0..plen as u32).map(|i| (i.wrapping_mul(7919) + 13) % vocab).collect();
    // Greedy on the device: only token ids cross to the host, as in the engine.
    let step = |b: &Batch, cache: &mut B::KvCache| -> Result<Vec<u32>> {
        let rows = b.last_rows();
        let sampling = StepSampling {
            per_row: vec![RowSampling::greedy(); rows.len()],
            rows,
            valid: vocab as usize,
            want_logits: false,
            masks: Default::default(),
        };
        let tokens = model.step(backend, b, cache, &sampling, &SingleRank)?.tokens;
        tokens
            .into_iter()
            .map(|t| match t {
                Sampled::Token(t) => Ok(t),
                Sampled::NonFinite { rank } => Err(Error::NonFiniteLogits { position: 0, rank }),
            })
            .collect()
    };
    let prefill = |table: &[u32], cache: &mut B::KvCache| -> Result<u32> {
        let mut b = Batch::new(BLOCK);
        b.push(&prompt, 0, table)?;
        step(&b, cache)?.first().copied().ok_or_else(|| Error::Backend("a step sampled no token".into()))
    };
    prefill(&tables[0], &mut cache)?; // warm-up; rewritten below
    let mark = profile.map(Profile::mark);
    let started = Instant::now();
    let mut next = tables.iter().map(|t| prefill(t, &mut cache)).collect::<Result<Vec<u32>>>()?;
    let prefill_s = started.elapsed().as_secs_f64() / batch as f64;
    let predicted_prefill = profile.zip(mark.as_ref()).map(|(p, m)| p.since(m)).transpose()?;
    let mut mark = None;
    let mut started = Instant::now();
    let mut launches = backend.launches();
    for i in 0..gen + WARM_UP {
        if i == WARM_UP {
            started = Instant::now();
            launches = backend.launches();
            mark = profile.map(Profile::mark);
        }
        let mut b = Batch::new(BLOCK);
        for (table, &token) in tables.iter().zip(&next) {
            b.push(&[token], plen + i, table)?;
        }
        next = step(&b, &mut cache)?;
    }
    let step_s = started.elapsed().as_secs_f64() / gen as f64;
    let launches_per_step = launches.zip(backend.launches()).map(|(a, b)| (b - a) as f64 / gen as f64);
    // Timed steps i = WARM_UP..WARM_UP + gen attend over plen + i + 1 tokens.
    let mean_context = plen as f64 + 1.0 + WARM_UP as f64 + (gen as f64 - 1.0) / 2.0;
    let predicted_step = profile.zip(mark.as_ref()).map(|(p, m)| p.since(m)).transpose()?;
    let predicted = predicted_step.zip(predicted_prefill).map(|(s, p)| (s.per(gen), p.per(batch)));
    Ok(Timing { prefill_s, step_s, mean_context, launches_per_step, predicted })
}

/// bf16 (or f32 on the CPU) GEMM throughput of `n × n · n × n`, in FLOP/s.
fn gemm_peak<B: Backend>(backend: &B, n: usize) -> Result<f64> {
    let w = backend.random_weight(&[RandomSlice::for_tensor(1, "probe.weight", &[n, n], 0..n, 0..n)])?;
    let step = backend.step_of_ids(&(0..n as u32).collect::<Vec<_>>(), &[0])?;
    let x = backend.embed(&w, &step)?;
    let sync = |y: &B::Tensor| backend.to_host(&backend.gather_rows(y, &step)?);
    sync(&backend.matmul(&x, &w)?)?;
    let reps = 5;
    let started = Instant::now();
    let mut last = backend.matmul(&x, &w)?;
    for _ in 1..reps {
        last = backend.matmul(&x, &w)?;
    }
    sync(&last)?;
    Ok(2.0 * (n as f64).powi(3) * reps as f64 / started.elapsed().as_secs_f64())
}

/// Seconds per sum all-reduce of a `rows × cols` activation among `world` in-process ranks
/// (the slowest rank's mean over 50 after 5 warm-ups).
fn all_reduce_s<B: Backend>(open: &Open<B>, world: usize, rows: usize, cols: usize) -> Result<f64>
where
    LocalComm: Communicator<B>,
{
    let group = LocalGroup::new(world, Duration::from_secs(60));
    let ranks = group.communicators();
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|comm| {
                let (open, group) = (open.clone(), group.clone());
                s.spawn(move || {
                    let timed = || -> Result<f64> {
                        let b = open()?;
                        let table = RandomSlice::for_tensor(2, "probe.weight", &[rows, cols], 0..rows, 0..cols);
                        let step = b.step_of_ids(&(0..rows as u32).collect::<Vec<_>>(), &[0])?;
                        let mut x = b.embed(&b.random_weight(&[table])?, &step)?;
                        for _ in 0..5 {
                            comm.all_reduce_sum(&b, &mut x)?;
                        }
                        b.to_host(&b.gather_rows(&x, &step)?)?;
                        let (n, started) = (50, Instant::now());
                        for _ in 0..n {
                            comm.all_reduce_sum(&b, &mut x)?;
                        }
                        b.to_host(&b.gather_rows(&x, &step)?)?;
                        Ok(started.elapsed().as_secs_f64() / n as f64)
                    };
                    // A failing rank must not leave its peers waiting at the next collective.
                    timed().inspect_err(|e| group.poison(&e.to_string()))
                })
            })
            .collect();
        let mut slowest = 0f64;
        for h in handles {
            let t = h.join().map_err(|_| Error::Backend("an all-reduce probe rank panicked".into()))??;
            slowest = slowest.max(t);
        }
        Ok(slowest)
    })
}

/// Projected per-token latency of the full model at tp 8 and 16 (and the measured tp), from the
/// measured per-layer time scaled by each degree's bytes per rank (decode is bandwidth-bound),
/// plus two all-reduces per layer: measured in-process, and the published figures.
fn project<B: Backend>(
    args: &BenchArgs,
    full: &ModelConfig,
    cfg: &ModelConfig,
    shard: Shard,
    open: &Open<B>,
    eb: f64,
    per_layer: &[(usize, usize, f64, f64, f64)],
) -> Result<()>
where
    LocalComm: Communicator<B>,
{
    let measured = ShardPlan::new(cfg, shard)?;
    let bytes = |plan: &ShardPlan| layer_weight_elements(full, plan) as f64 * eb;
    let head = |plan: &ShardPlan| head_weight_elements(full, plan) as f64 * eb;
    let mut targets = vec![8, 16, shard.world];
    targets.sort_unstable();
    targets.dedup();
    for &(batch, plen, layer_s, rest_s, layer_kv) in per_layer {
        let ar_measured = all_reduce_s(open, shard.world, batch, full.hidden_size)?;
        let mut assumptions = vec![(format!("measured: {} in-process ranks on this device", shard.world), ar_measured)];
        assumptions.extend(PUBLISHED_ALL_REDUCE.iter().map(|&(what, s)| (what.to_owned(), s)));
        for &tp in &targets {
            let Ok(plan) = ShardPlan::new(full, Shard { rank: 0, world: tp }) else { continue };
            // Weights scale with the shard; the KV read per layer with the KV heads per rank.
            let kv_scale = plan.kv_rows.len() as f64 / measured.kv_rows.len() as f64;
            let layer_bytes = bytes(&measured) + layer_kv;
            let scaled = layer_s * (bytes(&plan) + layer_kv * kv_scale) / layer_bytes;
            let rest = rest_s * head(&plan) / head(&measured);
            for (assumption, ar) in &assumptions {
                let token_s = full.num_hidden_layers as f64 * (scaled + 2.0 * ar) + rest;
                println!(
                    "{}",
                    json!({
                        "case": "projection",
                        "model": args.preset.clone().unwrap_or_else(|| "config.json".into()),
                        "layers": full.num_hidden_layers,
                        "tp": tp,
                        "measured_tp": shard.world,
                        "batch": batch,
                        "prompt_len": plen,
                        "layer_ms": round(scaled * 1e3),
                        "all_reduce_us": round(ar * 1e6),
                        "all_reduce": assumption,
                        "ms_per_token": round(token_s * 1e3),
                        "tok_s": round(batch as f64 / token_s),
                        "assumes": "layer time scaled from the measured shard by bytes per rank (bandwidth-bound decode); \
                                    two all-reduces per layer; lm_head scaled likewise",
                    })
                );
            }
        }
    }
    Ok(())
}
