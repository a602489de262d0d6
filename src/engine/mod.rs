//! `tulu::Engine`: a loaded model behind a continuous-batching step loop.
//!
//! [`Engine::load`] validates and loads a model onto a backend, then starts one worker thread,
//! the only owner of device state (the model runner and its KV cache). Requests from any number
//! of threads or tasks are queued to it; each step it schedules (admit, chunk, preempt), runs
//! one batched forward pass and post-processes (sample, detokenize, stop), sending every
//! request its [`Event`]s. Dropping a [`Generation`] aborts its request at the next step.

pub mod metrics;
mod multinode;
mod request;
mod tp;
mod worker;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc as tmpsc;

pub use self::metrics::{Histogram, Metrics};
pub use self::multinode::run_rank;
use self::multinode::start_node;
pub use self::request::{synthetic_prompt, Event, FinishReason, GenerateRequest, Prompt, Summary, TokenLogprob};
use self::tp::{TpPlan, TpRunner};
use self::worker::{Command, Runner, Submission, Worker};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, Device};
use crate::config::{GenerationConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::hub::{resolve_model, HubOptions};
use crate::model::Llama;
use crate::parallel::rendezvous::WorldSpec;
use crate::parallel::sharding::Shard;
use crate::parallel::tcp::Hello;
use crate::runtime::block_manager::BlockManager;
use crate::runtime::sampler::SamplingParams;
use crate::runtime::scheduler::{Scheduler, SchedulerConfig};
use crate::tokenizer::Tokenizer;
use crate::weights::WeightStore;

/// How to load and serve a model.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// A local model directory or a Hugging Face repo id (`owner/name`).
    pub model: String,
    /// Where to run it.
    pub device: Device,
    /// Longest context (prompt + output) to support; default: the model's, capped at 8192.
    /// Lowered, with a warning, to what the KV cache can hold.
    pub max_context: Option<usize>,
    /// Show progress bars while downloading and loading.
    pub progress: bool,
    /// Most sequences in one step.
    pub max_num_seqs: usize,
    /// Most tokens (prompt chunks plus decodes) in one step.
    pub max_num_batched_tokens: usize,
    /// Bytes of KV cache; default on the CPU: enough for 4 full contexts; on a GPU: what
    /// `gpu_memory_utilization` leaves after the weights and a workspace.
    pub kv_cache_memory: Option<u64>,
    /// Fraction of GPU memory the engine may use (weights, workspace and KV cache).
    pub gpu_memory_utilization: f64,
    /// Token slots per KV block.
    pub block_size: usize,
    /// Share full KV blocks between requests with the same prefix.
    pub prefix_caching: bool,
    /// Requests allowed to wait for admission before new ones are refused (`Error::Busy`).
    pub max_waiting: Option<usize>,
    /// Tensor-parallel ranks (in-process threads on the CPU backend).
    pub tp: usize,
    /// Ranks in separate processes (`WORLD_SIZE`, `RANK`, … or `--nnodes`): this process's place.
    /// Rank 0 runs the engine; the others run [`run_rank`].
    pub world: Option<WorldSpec>,
    /// How long a rank waits for its peers (joining, and every collective) before failing.
    pub dist_timeout: Duration,
}

impl EngineOptions {
    /// Options for `model` with defaults: `--device auto`, no progress bars.
    pub fn new(model: impl Into<String>) -> Self {
        EngineOptions {
            model: model.into(),
            device: Device::Auto,
            max_context: None,
            progress: false,
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            kv_cache_memory: None,
            gpu_memory_utilization: 0.9,
            block_size: 16,
            prefix_caching: true,
            max_waiting: None,
            tp: 1,
            world: None,
            dist_timeout: Duration::from_secs(300),
        }
    }

    /// Sets the device.
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Sets the longest supported context.
    pub fn max_context(mut self, tokens: usize) -> Self {
        self.max_context = Some(tokens);
        self
    }

    /// Turns progress bars on or off.
    pub fn progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }
}

/// What the worker and the request side both read.
struct Shared {
    config: ModelConfig,
    generation_config: GenerationConfig,
    tokenizer: Arc<Tokenizer>,
    eos: HashSet<u32>,
    context_len: usize,
    device: String,
    metrics: Mutex<Metrics>,
    /// Submitted and not yet admitted by the worker.
    queued: AtomicUsize,
    max_waiting: Option<usize>,
    accepting: AtomicBool,
    failed: Mutex<Option<String>>,
}

/// A loaded model ready to generate, for many concurrent requests.
pub struct Engine {
    dir: PathBuf,
    shared: Arc<Shared>,
    commands: Mutex<mpsc::Sender<Command>>,
    next_id: AtomicU64,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Resolves, validates and loads the model named by `opts`, and starts its step loop.
    ///
    /// ```no_run
    /// use tulu::{Engine, EngineOptions, Event, GenerateRequest};
    /// let engine = Engine::load(EngineOptions::new("models/smollm2"))?;
    /// for event in engine.generate(GenerateRequest::text("The capital of France is").max_tokens(8))? {
    ///     match event? {
    ///         Event::Text(t) => print!("{t}"),
    ///         Event::Done(s) => eprintln!("\n{} tokens, {:?}", s.tokens.len(), s.finish_reason),
    ///         _ => {}
    ///     }
    /// }
    /// # Ok::<(), tulu::Error>(())
    /// ```
    pub fn load(opts: EngineOptions) -> Result<Self> {
        let dir = resolve_model(&opts.model, &HubOptions { progress: opts.progress, config_only: false })?;
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let generation_config = GenerationConfig::from_file(&dir.join("generation_config.json"))?;
        let tokenizer = Tokenizer::from_dir(&dir)?;
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(Error::config(
                dir.join("config.json"),
                "vocab_size",
                format!("is {}, fewer rows than the tokenizer's {} ids", config.vocab_size, tokenizer.vocab_size()),
            ));
        }
        for (name, v) in [("max_num_seqs", opts.max_num_seqs), ("max_num_batched_tokens", opts.max_num_batched_tokens)]
        {
            if v == 0 {
                return Err(Error::request(name, "must be at least 1"));
            }
        }
        if opts.tp == 0 {
            return Err(Error::request("tp", "must be at least 1"));
        }
        if opts.block_size == 0 {
            return Err(Error::request("block_size", "must be at least 1"));
        }
        let mut eos: HashSet<u32> = config.eos_token_ids.iter().copied().collect();
        eos.extend(&generation_config.eos_token_ids);
        eos.extend(tokenizer.eos_token_ids());
        let wanted_context = match opts.max_context {
            Some(0) => return Err(Error::request("max_context", "must be at least 1")),
            Some(n) => n.min(config.max_position_embeddings),
            None => config.max_position_embeddings.min(8192),
        };
        if !(opts.gpu_memory_utilization > 0.0 && opts.gpu_memory_utilization <= 1.0) {
            return Err(Error::request("gpu_memory_utilization", "must be in (0, 1]"));
        }
        let store = WeightStore::open(&dir)?;
        let device = opts.device.resolve()?;
        // One bar for the whole load: in-process ranks load in parallel and each advances it.
        let ranks = if opts.world.is_some() { 1 } else { opts.tp.max(1) };
        let bar = load_bar(opts.progress, config.num_hidden_layers, ranks);
        let on_layer = |l: usize| bar.set_position(l as u64);
        // The CPU keeps K/V in f32: its pool is sized before loading.
        let cpu_blocks = || {
            let per_block = config.kv_bytes_per_token(4) * opts.block_size as u64;
            (opts.kv_cache_memory.unwrap_or(4 * wanted_context as u64 * config.kv_bytes_per_token(4)) / per_block)
                as usize
        };
        let multi_process = opts.world.as_ref().is_some_and(|w| w.world_size > 1);
        // Ranks in separate processes use GPUs through NCCL only: `auto` without it is the CPU.
        let device = match device {
            Device::Cuda(_) if multi_process && opts.device == Device::Auto && !cfg!(feature = "nccl") => Device::Cpu,
            d => d,
        };
        let (runner, device, num_blocks): (Box<dyn Runner>, String, usize) = match device {
            _ if multi_process => {
                let spec = opts.world.as_ref().ok_or_else(|| Error::request("world", "missing"))?;
                if spec.rank != 0 {
                    return Err(Error::request("RANK", format!("rank {} runs `run_rank`, not the engine", spec.rank)));
                }
                if opts.tp > 1 && opts.tp != spec.world_size {
                    return Err(Error::request("tp", format!("is {} but WORLD_SIZE is {}", opts.tp, spec.world_size)));
                }
                let (num_blocks, kv_utilization) = match (device, opts.kv_cache_memory) {
                    // GPU ranks size their caches from memory once loaded (all take the smallest),
                    // unless `kv_cache_memory` (per rank) fixes it.
                    (Device::Cuda(_), Some(bytes)) => {
                        ((bytes / (config.kv_bytes_per_token(2) * opts.block_size as u64)) as usize, None)
                    }
                    (Device::Cuda(_), None) => (0, Some(opts.gpu_memory_utilization)),
                    _ => (cpu_blocks(), None),
                };
                let hello = Hello {
                    num_blocks,
                    block_size: opts.block_size,
                    max_positions: wanted_context,
                    nccl_id: None,
                    kv_utilization,
                };
                start_node(spec, opts.dist_timeout, &config, &store, hello, device, on_layer)?
            }
            Device::Cuda(ordinal) => cuda_runner(ordinal, &config, store, wanted_context, &opts, &bar)?,
            _ if opts.tp > 1 => {
                let num_blocks = cpu_blocks();
                let plan = TpPlan {
                    tp: opts.tp,
                    context_len: wanted_context,
                    num_blocks,
                    block_size: opts.block_size,
                    gpu_memory_utilization: None,
                    bar: bar.clone(),
                };
                let runner = TpRunner::start(&config, Arc::new(store), &plan)?;
                (Box::new(runner), format!("{} × {} ranks", CpuBackend::new().describe(), opts.tp), num_blocks)
            }
            _ => {
                let num_blocks = cpu_blocks();
                let backend = CpuBackend::new();
                let model = Llama::load(&backend, &config, &store, wanted_context, Shard::single(), on_layer)?;
                let cache = backend.new_kv_cache(&model.kv_cache_spec(num_blocks, opts.block_size))?;
                let device = backend.describe();
                (Box::new(worker::DeviceRunner { backend, model, cache }), device, num_blocks)
            }
        };
        bar.finish_and_clear();
        let context_len = wanted_context.min(num_blocks * opts.block_size);
        if context_len == 0 {
            return Err(Error::request(
                "kv_cache_memory",
                format!("the KV cache does not hold one block of {} tokens", opts.block_size),
            ));
        }
        if context_len < wanted_context {
            tracing::warn!(wanted_context, context_len, "the KV cache cannot hold the configured context; lowered");
            eprintln!("warning: context lowered from {wanted_context} to {context_len} tokens to fit the KV cache");
        }
        let shared = Arc::new(Shared {
            config,
            generation_config,
            tokenizer: Arc::new(tokenizer),
            eos,
            context_len,
            device,
            metrics: Mutex::new(Metrics { kv_blocks_total: num_blocks, ..Metrics::default() }),
            queued: AtomicUsize::new(0),
            max_waiting: opts.max_waiting,
            accepting: AtomicBool::new(true),
            failed: Mutex::new(None),
        });
        let scheduler = Scheduler::new(
            SchedulerConfig { max_num_seqs: opts.max_num_seqs, max_num_batched_tokens: opts.max_num_batched_tokens },
            BlockManager::new(num_blocks, opts.block_size, opts.prefix_caching),
        );
        let (tx, rx) = mpsc::channel();
        let worker_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("tulu-engine".into())
            .spawn(move || Worker::new(worker_shared.clone(), runner, scheduler).run(rx, &worker_shared))
            .map_err(|e| Error::Backend(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            dir,
            shared,
            commands: Mutex::new(tx),
            next_id: AtomicU64::new(1),
            worker: Mutex::new(Some(handle)),
        })
    }

    /// The model directory the engine loaded.
    pub fn model_dir(&self) -> &Path {
        &self.dir
    }

    /// The model's architecture.
    pub fn config(&self) -> &ModelConfig {
        &self.shared.config
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.shared.tokenizer
    }

    /// Longest prompt + output the engine supports.
    pub fn context_len(&self) -> usize {
        self.shared.context_len
    }

    /// The device the model runs on, for logs.
    pub fn device(&self) -> &str {
        &self.shared.device
    }

    /// Every token id that ends a generation.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.shared.eos.iter().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// A snapshot of the engine's counters and latency histograms.
    pub fn metrics(&self) -> Metrics {
        self.shared.metrics.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// `None` while the engine works; the reason once it has failed.
    pub fn failure(&self) -> Option<String> {
        self.shared.failed.lock().ok().and_then(|f| f.clone())
    }

    /// The sampling parameters a request without its own gets.
    pub fn default_sampling(&self) -> SamplingParams {
        let g = &self.shared.generation_config;
        let mut p = SamplingParams::default();
        if g.do_sample == Some(true) {
            p.temperature = g.temperature.unwrap_or(1.0);
            p.top_p = g.top_p.unwrap_or(1.0);
            p.top_k = g.top_k.unwrap_or(0);
        }
        p.repetition_penalty = g.repetition_penalty.unwrap_or(1.0);
        p
    }

    /// The token ids a request's prompt becomes, checked against the vocabulary and context.
    pub fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let tok = &self.shared.tokenizer;
        let ids = match prompt {
            Prompt::Text(t) if t.is_empty() => return Err(Error::request("prompt", "is empty")),
            Prompt::Text(t) => tok.encode_prompt(t)?,
            Prompt::Chat(m) if m.is_empty() => return Err(Error::request("messages", "is empty")),
            Prompt::Chat(m) => tok.encode_chat(m, true)?,
            Prompt::Tokens(ids) => ids.clone(),
        };
        if ids.is_empty() {
            return Err(Error::request("prompt", "tokenizes to no tokens"));
        }
        let vocab = self.shared.config.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::request("prompt", format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        let ctx = self.shared.context_len;
        if ids.len() >= ctx {
            return Err(Error::request(
                "prompt",
                format!("has {} tokens; the context holds {ctx} (prompt + at least one new token)", ids.len()),
            ));
        }
        Ok(ids)
    }

    /// Queues a request; the returned stream yields its events as the step loop produces them.
    pub fn generate(&self, request: GenerateRequest) -> Result<Generation> {
        let mut all = self.generate_all(vec![request])?;
        all.pop().ok_or_else(|| Error::Backend("no generation queued".into()))
    }

    /// Queues several requests as one (a server request with `n` choices or several prompts):
    /// all are validated before any is queued, and `max_waiting` admits or refuses them
    /// together, so a request is never half queued nor refused only for its own size.
    pub fn generate_all(&self, requests: Vec<GenerateRequest>) -> Result<Vec<Generation>> {
        if let Some(why) = self.failure() {
            return Err(Error::Backend(format!("the engine has failed: {why}")));
        }
        if !self.shared.accepting.load(Ordering::SeqCst) {
            return Err(Error::ShuttingDown { message: "no new requests are accepted".into() });
        }
        let mut submissions = Vec::with_capacity(requests.len());
        let mut streams = Vec::with_capacity(requests.len());
        for request in requests {
            let (submission, rx) = self.validate(request)?;
            submissions.push(submission);
            streams.push(Generation { events: rx, done: false });
        }
        if let Some(max) = self.shared.max_waiting {
            if self.shared.queued.load(Ordering::SeqCst) >= max {
                return Err(Error::Busy { message: format!("{max} requests are already waiting") });
            }
        }
        let commands = self.commands.lock().map_err(|_| poisoned())?;
        for submission in submissions {
            self.shared.queued.fetch_add(1, Ordering::SeqCst);
            if commands.send(Command::Submit(Box::new(submission))).is_err() {
                self.shared.queued.fetch_sub(1, Ordering::SeqCst);
                return Err(Error::Backend("the engine has stopped".into()));
            }
        }
        Ok(streams)
    }

    /// A request checked and turned into what the step loop takes, with its event stream.
    fn validate(&self, request: GenerateRequest) -> Result<(Submission, tmpsc::UnboundedReceiver<Result<Event>>)> {
        let sampling = request.sampling.clone().unwrap_or_else(|| self.default_sampling());
        sampling.validate()?;
        if request.max_tokens == Some(0) {
            return Err(Error::request("max_tokens", "must be at least 1"));
        }
        if request.stop.iter().any(String::is_empty) {
            return Err(Error::request("stop", "stop strings must not be empty"));
        }
        let prompt = self.prompt_tokens(&request.prompt)?;
        let budget = self.shared.context_len - prompt.len();
        let (tx, rx) = tmpsc::unbounded_channel();
        let submission = Submission {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            prompt,
            sampling,
            max_tokens: request.max_tokens.map_or(budget, |m| m.min(budget)),
            stop: request.stop,
            ignore_eos: request.ignore_eos,
            logprobs: request.logprobs,
            events: tx,
            submitted: Instant::now(),
        };
        Ok((submission, rx))
    }

    /// Stops accepting requests, lets running ones finish for up to `timeout`, aborts the
    /// rest (they end with an error), and stops the step loop.
    pub fn shutdown(&self, timeout: Duration) {
        self.shared.accepting.store(false, Ordering::SeqCst);
        if let Ok(tx) = self.commands.lock() {
            let _ = tx.send(Command::Shutdown { deadline: Instant::now() + timeout });
        }
        if let Some(handle) = self.worker.lock().ok().and_then(|mut w| w.take()) {
            let _ = handle.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown(Duration::ZERO);
    }
}

/// The model on CUDA device `ordinal` (or `tp` ranks from it), with the number of KV blocks
/// its cache holds: `kv_cache_memory`, else what `gpu_memory_utilization` leaves once the
/// weights are resident.
#[cfg(feature = "cuda")]
fn cuda_runner(
    ordinal: usize,
    config: &ModelConfig,
    store: WeightStore,
    max_positions: usize,
    opts: &EngineOptions,
    bar: &indicatif::ProgressBar,
) -> Result<(Box<dyn Runner>, String, usize)> {
    use crate::backend::cuda::CudaBackend;
    // bf16 K and V.
    let per_block = config.kv_bytes_per_token(2) * opts.block_size as u64;
    if opts.tp > 1 {
        // When ranks share a GPU (or `kv_cache_memory` is given): each rank holds 1/tp of the KV
        // heads (or one replicated head); size as one rank would.
        let bytes = opts.kv_cache_memory.unwrap_or(4 * max_positions as u64 * config.kv_bytes_per_token(2));
        let num_blocks = (bytes / per_block) as usize;
        let plan = TpPlan {
            tp: opts.tp,
            context_len: max_positions,
            num_blocks,
            block_size: opts.block_size,
            // Ranks on GPUs of their own size their caches from memory, unless told the size.
            gpu_memory_utilization: opts.kv_cache_memory.is_none().then_some(opts.gpu_memory_utilization),
            bar: bar.clone(),
        };
        let runner = TpRunner::start_cuda(config, Arc::new(store), &plan, ordinal)?;
        let (device, num_blocks) = (runner.device().to_owned(), runner.num_blocks());
        return Ok((Box::new(runner), device, num_blocks));
    }
    let backend = CudaBackend::new(ordinal)?;
    let model = Llama::load(&backend, config, &store, max_positions, Shard::single(), |l| bar.set_position(l as u64))?;
    drop(store);
    let num_blocks = match opts.kv_cache_memory {
        Some(bytes) => (bytes / per_block) as usize,
        None => kv_capacity(&backend, &model, opts.block_size, opts.gpu_memory_utilization)
            .ok_or_else(|| Error::Backend("the CUDA backend reports no device memory".into()))?,
    };
    let cache = backend.new_kv_cache(&model.kv_cache_spec(num_blocks, opts.block_size))?;
    let device = backend.describe();
    Ok((Box::new(worker::DeviceRunner { backend, model, cache }), device, num_blocks))
}

#[cfg(not(feature = "cuda"))]
fn cuda_runner(
    ordinal: usize,
    _: &ModelConfig,
    _: WeightStore,
    _: usize,
    _: &EngineOptions,
    _: &indicatif::ProgressBar,
) -> Result<(Box<dyn Runner>, String, usize)> {
    Err(Error::Device { device: format!("cuda:{ordinal}"), message: "this build of tulu has no CUDA support".into() })
}

fn poisoned() -> Error {
    Error::Backend("the engine failed in another thread".into())
}

/// KV blocks of `block_size` tokens that fit in what `utilization` of the backend's device
/// leaves once this rank's weights are loaded (and the activation workspace is set aside);
/// `None` for a backend without device memory (the CPU).
pub(super) fn kv_capacity<B: Backend>(
    backend: &B,
    model: &Llama<B>,
    block_size: usize,
    utilization: f64,
) -> Option<usize> {
    let (free, total) = backend.device_memory()?;
    let allowed = (total as f64 * utilization) as u64;
    let bytes = allowed.saturating_sub(total.saturating_sub(free) + crate::parallel::sizing::WORKSPACE_BYTES);
    let per_block = model.kv_elements_per_token() * backend.element_bytes() as u64 * block_size as u64;
    Some((bytes / per_block.max(1)) as usize)
}

/// The error of a tensor-parallel group some rank of which has no room left for a KV cache.
pub(super) fn no_kv_room() -> Error {
    Error::request(
        "gpu_memory_utilization",
        "no room for the KV cache on some rank once its weights are loaded: raise it, or add ranks",
    )
}

fn load_bar(show: bool, layers: usize, ranks: usize) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new((layers * ranks) as u64);
    let unit = if ranks > 1 { format!("layers × {ranks} ranks") } else { "layers".into() };
    if let Ok(style) =
        indicatif::ProgressStyle::with_template(&format!("loading {{bar:30}} {{pos}}/{{len}} {unit} {{elapsed}}"))
    {
        bar.set_style(style);
    }
    bar
}

/// A request's stream of [`Event`]s, ending with [`Event::Done`] (or an error). Iterate it
/// from synchronous code, or `.next_event().await` it from async code; dropping it aborts.
pub struct Generation {
    events: tmpsc::UnboundedReceiver<Result<Event>>,
    done: bool,
}

impl Generation {
    /// The next event, awaited (for async callers such as the HTTP server).
    pub async fn next_event(&mut self) -> Option<Result<Event>> {
        if self.done {
            return None;
        }
        let ev = self.events.recv().await;
        self.done = !matches!(ev, Some(Ok(Event::Text(_) | Event::Logprobs(_))));
        ev
    }
}

impl Iterator for Generation {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let ev = self.events.blocking_recv();
        self.done = !matches!(ev, Some(Ok(Event::Text(_) | Event::Logprobs(_))));
        ev
    }
}
