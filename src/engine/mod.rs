//! `tulu::Engine`: a loaded model behind a continuous-batching step loop.
//!
//! [`Engine::load`] validates the model, opens every rank (`crate::ranks`: each a `RankRunner`, the
//! only owner of its device state) and starts one worker thread (`worker.rs`) that drives them.
//! Requests from any number of threads or tasks are queued to it; each `step()` schedules (the
//! scheduler emits the batch, the rows to sample and their sampling), runs the ranks, and
//! post-processes: each sampled token goes to its request's output state (`output.rs`:
//! detokenizer, EOS, stop strings, limits, log-probabilities), which sends the request its
//! [`Event`]s. Dropping a [`Generation`] aborts its request at the next step. A failure of one
//! request ends only that request; a failure of the ranks fails the engine
//! ([`Engine::failure`]).

mod acceptance;
mod draft;
pub mod metrics;
mod output;
mod request;
mod worker;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc as tmpsc;

use self::draft::DraftCheckpoint;
pub use self::metrics::{Histogram, Metrics};
use self::output::Submission;
pub use self::request::{synthetic_prompt, Event, FinishReason, GenerateRequest, Prompt, Summary, TokenLogprob};
use self::worker::{Command, Worker};
use crate::config::{GenerationConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::grammar::Grammars;
use crate::hub::{resolve_model, HubOptions};
use crate::options::EngineOptions;
use crate::ranks;
use crate::runtime::block_manager::BlockManager;
use crate::runtime::sampler::SamplingParams;
use crate::runtime::scheduler::Scheduler;
use crate::tokenizer::Tokenizer;
use crate::weights::WeightStore;

/// What the worker and the request side both read.
struct Shared {
    config: ModelConfig,
    generation_config: GenerationConfig,
    tokenizer: Arc<Tokenizer>,
    eos: HashSet<u32>,
    /// Compiles requests' constraints; the vocabulary's trie is built on the first.
    grammars: Grammars,
    context_len: usize,
    device: String,
    metrics: Mutex<Metrics>,
    /// Submitted and not yet admitted by the worker.
    queued: AtomicUsize,
    max_waiting: Option<usize>,
    accepting: AtomicBool,
    /// Why the engine failed (engine-fatal), once it has.
    failed: tokio::sync::watch::Sender<Option<String>>,
}

impl Shared {
    fn new(
        config: ModelConfig,
        generation_config: GenerationConfig,
        tokenizer: Tokenizer,
        context_len: usize,
        opened: &ranks::Opened,
        opts: &EngineOptions,
    ) -> Self {
        let mut eos: HashSet<u32> = config.eos_token_ids.iter().copied().collect();
        eos.extend(&generation_config.eos_token_ids);
        eos.extend(tokenizer.eos_token_ids());
        let tokenizer = Arc::new(tokenizer);
        let mut eos_ids: Vec<u32> = eos.iter().copied().filter(|&t| (t as usize) < config.vocab_size).collect();
        eos_ids.sort_unstable();
        let grammars = Grammars::new(tokenizer.clone(), config.vocab_size, eos_ids);
        Shared {
            config,
            generation_config,
            tokenizer,
            eos,
            grammars,
            context_len,
            device: opened.device.clone(),
            metrics: Mutex::new(Metrics { kv_blocks_total: opened.num_blocks, ..Metrics::default() }),
            queued: AtomicUsize::new(0),
            max_waiting: opts.max_waiting,
            accepting: AtomicBool::new(true),
            failed: tokio::sync::watch::Sender::new(None),
        }
    }

    /// Records an engine-fatal failure (the first reason stays).
    fn fail(&self, why: &str) {
        self.failed.send_if_modified(|f| f.is_none() && f.replace(why.to_owned()).is_none());
    }

    /// Why the engine failed, once it has.
    fn failure(&self) -> Option<String> {
        self.failed.borrow().clone()
    }
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
        opts.validate()?;
        let dir = resolve_model(&opts.model, &HubOptions { progress: opts.progress, config_only: false })?;
        let (mut config, generation_config, tokenizer) = read_model(&dir)?;
        opts.apply_to(&mut config);
        // A draft model is read and checked (its tokenizer) before any weight is loaded.
        let draft_model = opts.speculation.as_ref().and_then(|s| s.draft_model());
        let draft = draft_model.map(|m| DraftCheckpoint::read(m, &opts, &dir, &tokenizer)).transpose()?;
        let mut wanted = opts.wanted_context(&config);
        let (target_kv, draft_kv) = match &draft {
            Some(d) => {
                wanted = wanted.min(d.max_positions());
                split_kv_memory(&opts, &config, d)?
            }
            None => (opts.kv_cache_memory, None),
        };
        // Load → measure → agree → allocate, on every rank.
        let target_opts = EngineOptions { kv_cache_memory: target_kv, ..opts.clone() };
        let opened = ranks::open(&target_opts, &config, Arc::new(WeightStore::open(&dir)?), wanted)?;
        let context_len = fit_context(wanted, opened.num_blocks, opts.block_size)?;
        let draft = draft.map(|d| d.open(&opts, draft_kv, context_len, tokenizer.vocab_size())).transpose()?;
        let shared = Arc::new(Shared::new(config, generation_config, tokenizer, context_len, &opened, &opts));
        let blocks = BlockManager::new(opened.num_blocks, opts.block_size, opts.prefix_caching);
        let scheduler = Scheduler::new(opts.scheduler_config(shared.tokenizer.vocab_size(), context_len), blocks);
        let (commands, worker) = Worker::spawn(shared.clone(), opened.ranks, draft, scheduler)?;
        Ok(Engine {
            dir,
            shared,
            commands: Mutex::new(commands),
            next_id: AtomicU64::new(1),
            worker: Mutex::new(Some(worker)),
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

    /// `None` while the engine works; the reason once it has failed (engine-fatal: a device
    /// lost, a rank dead, a collective timed out).
    pub fn failure(&self) -> Option<String> {
        self.shared.failure()
    }

    /// Resolves with the reason once the engine has failed; never while it works (a server
    /// awaits it to exit, so that a supervisor restarts it).
    pub async fn failed(&self) -> String {
        let mut watch = self.shared.failed.subscribe();
        let why = match watch.wait_for(Option::is_some).await {
            Ok(why) => why.clone(),
            Err(_) => None,
        };
        match why {
            Some(why) => why,
            None => std::future::pending().await,
        }
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
            return Err(Error::EngineFailed { message: why });
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
        let grammar = match &request.constraint {
            Some(c) => Some(self.shared.grammars.compile(c, request.constraint_param.as_deref())?),
            None => None,
        };
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
            grammar,
            speculative: request.speculative,
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

fn poisoned() -> Error {
    Error::Backend("the engine failed in another thread".into())
}

/// The model's config, generation config and tokenizer from `dir`, checked against each other.
fn read_model(dir: &Path) -> Result<(ModelConfig, GenerationConfig, Tokenizer)> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let generation_config = GenerationConfig::from_file(&dir.join("generation_config.json"))?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(Error::config(
            dir.join("config.json"),
            "vocab_size",
            format!("is {}, fewer rows than the tokenizer's {} ids", config.vocab_size, tokenizer.vocab_size()),
        ));
    }
    Ok((config, generation_config, tokenizer))
}

/// How `--kv-cache-memory` is split between the target and a draft model: in proportion to
/// their KV bytes per token (the target's per rank), so that both caches hold the same number of
/// tokens. Without a byte count, a rank without device memory of its own (the CPU) gives each
/// model its default of full contexts; on a GPU the split of a device fraction is not
/// implemented, and the error asks for `--kv-cache-memory`.
fn split_kv_memory(
    opts: &EngineOptions,
    config: &ModelConfig,
    draft: &DraftCheckpoint,
) -> Result<(Option<u64>, Option<u64>)> {
    let Some(bytes) = opts.kv_cache_memory else {
        if matches!(opts.device.resolve()?, crate::backend::Device::Cuda(_)) {
            return Err(Error::request(
                "kv_cache_memory",
                "is needed with a draft model on a GPU: the two KV caches split a byte budget \
                 (splitting --gpu-memory-utilization's is not implemented)",
            ));
        }
        return Ok((None, None));
    };
    let kv_heads = (config.num_key_value_heads / opts.tp.max(1)).max(1);
    let target = crate::parallel::sizing::kv_bytes_per_token(config, kv_heads, 1);
    let mine = draft.kv_elements_per_token();
    let target_bytes = (bytes as u128 * target as u128 / (target + mine).max(1) as u128) as u64;
    Ok((Some(target_bytes), Some(bytes - target_bytes)))
}

/// The context the engine serves: `wanted`, lowered (with a warning) to what `num_blocks` of
/// `block_size` tokens hold.
fn fit_context(wanted: usize, num_blocks: usize, block_size: usize) -> Result<usize> {
    let context_len = wanted.min(num_blocks.saturating_mul(block_size));
    if context_len == 0 {
        return Err(Error::request(
            "kv_cache_memory",
            format!("the KV cache does not hold one block of {block_size} tokens"),
        ));
    }
    if context_len < wanted {
        tracing::warn!("context lowered from {wanted} to {context_len} tokens to fit the KV cache");
    }
    Ok(context_len)
}

/// A request's stream of [`Event`]s, ending with [`Event::Done`] (or an error); dropping it
/// aborts the request at the next step.
///
/// Two ways to read it, giving the same events:
/// - as a [`futures_util::Stream`] from async code (`StreamExt::next`, `.next_event().await`,
///   or any stream combinator);
/// - as an [`Iterator`] from synchronous code: `for event in generation`, or
///   `generation.into_iter()` ([`BlockingIter`]). The iterator blocks its thread until the next
///   event, so it must not be used on an async runtime's thread (tokio panics there): poll the
///   stream instead. It is reached through [`IntoIterator`] rather than implemented on
///   `Generation` itself so that the stream's methods (`next`, `map`, `collect`, …) are never
///   ambiguous with the iterator's.
///
/// ```no_run
/// use tulu::{Engine, EngineOptions, Event, GenerateRequest};
/// # async fn run(engine: &Engine) -> tulu::Result<()> {
/// let mut generation = engine.generate(GenerateRequest::text("Once upon a time").max_tokens(16))?;
/// while let Some(event) = generation.next_event().await {
///     if let Event::Text(t) = event? {
///         print!("{t}");
///     }
/// }
/// # Ok(())
/// # }
/// ```
pub struct Generation {
    events: tmpsc::UnboundedReceiver<Result<Event>>,
    done: bool,
}

impl Generation {
    /// Records whether `ev` ends the stream (anything but text or log-probabilities does).
    fn observe(&mut self, ev: Option<Result<Event>>) -> Option<Result<Event>> {
        self.done = !matches!(ev, Some(Ok(Event::Text(_) | Event::Logprobs(_))));
        ev
    }
}

impl Generation {
    /// The next event, awaited: the stream's next item.
    pub async fn next_event(&mut self) -> Option<Result<Event>> {
        std::future::poll_fn(|cx| futures_util::Stream::poll_next(Pin::new(&mut *self), cx)).await
    }
}

impl futures_util::Stream for Generation {
    type Item = Result<Event>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let ev = std::task::ready!(this.events.poll_recv(cx));
        Poll::Ready(this.observe(ev))
    }
}

/// A [`Generation`] read from synchronous code: each event waited for by blocking the thread.
pub struct BlockingIter(Generation);

impl Iterator for BlockingIter {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.done {
            return None;
        }
        let ev = self.0.events.blocking_recv();
        self.0.observe(ev)
    }
}

impl IntoIterator for Generation {
    type Item = Result<Event>;
    type IntoIter = BlockingIter;

    fn into_iter(self) -> BlockingIter {
        BlockingIter(self)
    }
}
