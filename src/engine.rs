//! `tulu::Engine`: a loaded model, its tokenizer and KV cache, and the generation loop.
//!
//! The engine owns one model runner (the only owner of device state) behind a mutex; each
//! [`Generation`] is a sequence with its own KV blocks and sampler that runs one step per text
//! delta it yields. Every step goes through the batched forward pass, so continuous batching
//! only adds a scheduler in front of it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, Device};
use crate::config::{GenerationConfig, ModelConfig};
use crate::error::{Error, Result};
use crate::hub::{resolve_model, HubOptions};
use crate::model::Llama;
use crate::runtime::batch::Batch;
use crate::runtime::blocks::BlockPool;
use crate::runtime::sampler::{Sampler, SamplingParams};
use crate::tokenizer::{ChatMessage, StreamDecoder, Tokenizer};
use crate::weights::WeightStore;

/// KV cache block size in tokens.
const BLOCK_SIZE: usize = 16;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// A local model directory or a Hugging Face repo id (`owner/name`).
    pub model: String,
    /// Where to run it.
    pub device: Device,
    /// Longest context (prompt + output) to support; default: the model's, capped at 8192.
    pub max_context: Option<usize>,
    /// Show progress bars while downloading and loading.
    pub progress: bool,
}

impl EngineOptions {
    /// Options for `model` with defaults: `--device auto`, no progress bars.
    pub fn new(model: impl Into<String>) -> Self {
        EngineOptions { model: model.into(), device: Device::Auto, max_context: None, progress: false }
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

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Plain text, tokenized as `tokenizer(text)` does.
    Text(String),
    /// A conversation rendered with the model's chat template, ending in an assistant turn.
    Chat(Vec<ChatMessage>),
    /// Token ids as they are.
    Tokens(Vec<u32>),
}

/// One generation request.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// Sampling; `None` uses the model's `generation_config.json` defaults (greedy if none).
    pub sampling: Option<SamplingParams>,
    /// Cap on generated tokens; `None`: until EOS or the end of the context.
    pub max_tokens: Option<usize>,
    /// Strings that end the generation; they are not part of the output.
    pub stop: Vec<String>,
    /// Keep generating past EOS tokens (benchmarks).
    pub ignore_eos: bool,
}

impl GenerateRequest {
    /// A plain-text prompt.
    pub fn text(prompt: impl Into<String>) -> Self {
        Self::new(Prompt::Text(prompt.into()))
    }

    /// A chat prompt.
    pub fn chat(messages: Vec<ChatMessage>) -> Self {
        Self::new(Prompt::Chat(messages))
    }

    fn new(prompt: Prompt) -> Self {
        GenerateRequest { prompt, sampling: None, max_tokens: None, stop: Vec::new(), ignore_eos: false }
    }

    /// Sets the sampling parameters.
    pub fn sampling(mut self, params: SamplingParams) -> Self {
        self.sampling = Some(params);
        self
    }

    /// Sets the cap on generated tokens.
    pub fn max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = Some(n);
        self
    }

    /// A prompt of token ids as they are.
    pub fn tokens(ids: Vec<u32>) -> Self {
        Self::new(Prompt::Tokens(ids))
    }

    /// Adds a stop string.
    pub fn stop(mut self, s: impl Into<String>) -> Self {
        self.stop.push(s.into());
        self
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token or a stop string.
    Stop,
    /// `max_tokens` or the end of the context.
    Length,
}

impl FinishReason {
    /// The OpenAI name: `stop` or `length`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a finished generation reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Generated token ids (an ending EOS included).
    pub tokens: Vec<u32>,
    /// Seconds spent in the prompt's forward pass (through its first sampled token).
    pub prefill_secs: f64,
    /// Seconds spent generating the remaining tokens.
    pub decode_secs: f64,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

impl Summary {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tok_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }

    /// Generated tokens per second after the first.
    pub fn decode_tok_per_sec(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// One item of a generation's stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Newly generated text (never splits a UTF-8 character).
    Text(String),
    /// The end: always the last item.
    Done(Summary),
}

/// The device-side half of the engine: a backend, the model on it and its KV cache.
trait Runner: Send {
    fn forward(&mut self, batch: &Batch, rows: &[usize]) -> Result<Vec<f32>>;
}

struct DeviceRunner<B: Backend> {
    backend: B,
    model: Llama<B>,
    cache: B::KvCache,
}

impl<B: Backend> Runner for DeviceRunner<B> {
    fn forward(&mut self, batch: &Batch, rows: &[usize]) -> Result<Vec<f32>> {
        self.model.forward(&self.backend, batch, &mut self.cache, rows)
    }
}

/// A loaded model ready to generate.
pub struct Engine {
    dir: PathBuf,
    config: ModelConfig,
    generation_config: GenerationConfig,
    tokenizer: Tokenizer,
    eos: HashSet<u32>,
    context_len: usize,
    device: String,
    runner: Mutex<Box<dyn Runner>>,
    blocks: Mutex<BlockPool>,
}

impl Engine {
    /// Resolves, validates and loads the model named by `opts`.
    ///
    /// ```no_run
    /// use tulu::{Engine, EngineOptions, Event, GenerateRequest};
    /// let engine = Engine::load(EngineOptions::new("models/smollm2"))?;
    /// for event in engine.generate(GenerateRequest::text("The capital of France is").max_tokens(8))? {
    ///     match event? {
    ///         Event::Text(t) => print!("{t}"),
    ///         Event::Done(s) => eprintln!("\n{} tokens, {:?}", s.tokens.len(), s.finish_reason),
    ///     }
    /// }
    /// # Ok::<(), tulu::Error>(())
    /// ```
    pub fn load(opts: EngineOptions) -> Result<Self> {
        let dir = resolve_model(&opts.model, &HubOptions { progress: opts.progress })?;
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
        let mut eos: HashSet<u32> = config.eos_token_ids.iter().copied().collect();
        eos.extend(&generation_config.eos_token_ids);
        eos.extend(tokenizer.eos_token_ids());
        let context_len = match opts.max_context {
            Some(0) => return Err(Error::request("max_context", "must be at least 1")),
            Some(n) => n.min(config.max_position_embeddings),
            None => config.max_position_embeddings.min(8192),
        };
        let store = WeightStore::open(&dir)?;
        let num_blocks = context_len.div_ceil(BLOCK_SIZE);
        let (runner, device): (Box<dyn Runner>, String) = match opts.device {
            Device::Cpu | Device::Auto => {
                let backend = CpuBackend::new();
                let bar = load_bar(opts.progress, config.num_hidden_layers);
                let model = Llama::load(&backend, &config, &store, context_len, |l| bar.set_position(l as u64))?;
                bar.finish_and_clear();
                let cache = backend.new_kv_cache(&model.kv_cache_spec(num_blocks, BLOCK_SIZE))?;
                let device = backend.describe();
                (Box::new(DeviceRunner { backend, model, cache }), device)
            }
            Device::Cuda(_) => {
                return Err(Error::Device {
                    device: opts.device.to_string(),
                    message: "this build of tulu has no CUDA support (build with --features cuda)".into(),
                })
            }
        };
        Ok(Engine {
            dir,
            config,
            generation_config,
            tokenizer,
            eos,
            context_len,
            device,
            runner: Mutex::new(runner),
            blocks: Mutex::new(BlockPool::new(num_blocks, BLOCK_SIZE)),
        })
    }

    /// The model directory the engine loaded.
    pub fn model_dir(&self) -> &Path {
        &self.dir
    }

    /// The model's architecture.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Longest prompt + output the engine supports.
    pub fn context_len(&self) -> usize {
        self.context_len
    }

    /// The device the model runs on, for logs.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Every token id that ends a generation.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.eos.iter().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The sampling parameters a request without its own gets.
    pub fn default_sampling(&self) -> SamplingParams {
        let g = &self.generation_config;
        let mut p = SamplingParams::default();
        if g.do_sample == Some(true) {
            p.temperature = g.temperature.unwrap_or(1.0);
            p.top_p = g.top_p.unwrap_or(1.0);
            p.top_k = g.top_k.unwrap_or(0);
        }
        p.repetition_penalty = g.repetition_penalty.unwrap_or(1.0);
        p
    }

    /// The token ids a request's prompt becomes.
    pub fn prompt_tokens(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let ids = match prompt {
            Prompt::Text(t) if t.is_empty() => return Err(Error::request("prompt", "is empty")),
            Prompt::Text(t) => self.tokenizer.encode_prompt(t)?,
            Prompt::Chat(m) if m.is_empty() => return Err(Error::request("messages", "is empty")),
            Prompt::Chat(m) => self.tokenizer.encode_chat(m, true)?,
            Prompt::Tokens(ids) => ids.clone(),
        };
        if ids.is_empty() {
            return Err(Error::request("prompt", "tokenizes to no tokens"));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            return Err(Error::request(
                "prompt",
                format!("token id {bad} is outside the vocabulary of {}", self.config.vocab_size),
            ));
        }
        if ids.len() >= self.context_len {
            return Err(Error::request(
                "prompt",
                format!(
                    "has {} tokens; the context holds {} (prompt + at least one new token)",
                    ids.len(),
                    self.context_len
                ),
            ));
        }
        Ok(ids)
    }

    /// Starts generating; the returned stream runs the model as it is iterated.
    pub fn generate(&self, request: GenerateRequest) -> Result<Generation<'_>> {
        let sampling = request.sampling.clone().unwrap_or_else(|| self.default_sampling());
        sampling.validate()?;
        if request.max_tokens == Some(0) {
            return Err(Error::request("max_tokens", "must be at least 1"));
        }
        if request.stop.iter().any(String::is_empty) {
            return Err(Error::request("stop", "stop strings must not be empty"));
        }
        let prompt = self.prompt_tokens(&request.prompt)?;
        let budget = self.context_len - prompt.len();
        let max_tokens = request.max_tokens.map_or(budget, |m| m.min(budget));
        Ok(Generation {
            engine: self,
            sampler: Sampler::new(sampling, self.tokenizer.vocab_size()),
            decoder: Some(self.tokenizer.stream_decoder()),
            stop: request.stop,
            ignore_eos: request.ignore_eos,
            prompt_len: prompt.len(),
            tokens: prompt,
            generated: Vec::new(),
            cached: 0,
            block_table: Vec::new(),
            max_tokens,
            text: String::new(),
            emitted: 0,
            prefill_secs: 0.0,
            decode_secs: 0.0,
            finished: None,
            done_sent: false,
        })
    }
}

fn load_bar(show: bool, layers: usize) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(layers as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template("loading {bar:30} {pos}/{len} layers {elapsed}") {
        bar.set_style(style);
    }
    bar
}

/// A running generation: an iterator of [`Event`]s ending with [`Event::Done`].
pub struct Generation<'a> {
    engine: &'a Engine,
    sampler: Sampler,
    decoder: Option<StreamDecoder<'a>>,
    stop: Vec<String>,
    ignore_eos: bool,
    prompt_len: usize,
    /// Prompt and generated tokens.
    tokens: Vec<u32>,
    generated: Vec<u32>,
    /// Tokens whose K/V are in the cache.
    cached: usize,
    block_table: Vec<u32>,
    /// Generated tokens allowed: the request's cap or what is left of the context.
    max_tokens: usize,
    /// All text decoded so far, and how much of it has been handed out.
    text: String,
    emitted: usize,
    prefill_secs: f64,
    decode_secs: f64,
    finished: Option<FinishReason>,
    done_sent: bool,
}

impl Generation<'_> {
    /// Runs one forward step and samples one token.
    fn step(&mut self) -> Result<u32> {
        let start = Instant::now();
        let new = &self.tokens[self.cached..];
        self.engine.blocks.lock().map_err(|_| poisoned())?.grow(&mut self.block_table, self.tokens.len())?;
        let mut batch = Batch::new(BLOCK_SIZE);
        batch.push(new, self.cached, &self.block_table)?;
        let logits = self.engine.runner.lock().map_err(|_| poisoned())?.forward(&batch, &batch.last_rows())?;
        self.cached = self.tokens.len();
        let token = self.sampler.sample(&logits, &self.tokens);
        let secs = start.elapsed().as_secs_f64();
        if self.generated.is_empty() {
            self.prefill_secs += secs;
        } else {
            self.decode_secs += secs;
        }
        Ok(token)
    }

    /// Generates until there is text to hand out or the generation ends.
    fn advance(&mut self) -> Result<()> {
        while self.finished.is_none() && self.emitted == self.text.len() {
            let token = self.step()?;
            self.generated.push(token);
            self.tokens.push(token);
            if !self.ignore_eos && self.engine.eos.contains(&token) {
                self.finish(FinishReason::Stop)?;
                break;
            }
            if let Some(piece) = self.decoder.as_mut().map(|d| d.push(token)).transpose()?.flatten() {
                self.text.push_str(&piece);
            }
            if self.check_stop_strings() {
                break;
            }
            if self.generated.len() >= self.max_tokens {
                self.finish(FinishReason::Length)?;
            }
        }
        Ok(())
    }

    fn finish(&mut self, reason: FinishReason) -> Result<()> {
        if let Some(d) = self.decoder.take() {
            self.text.push_str(&d.finish()?);
        }
        // The flushed tail may complete a stop string, which then decides the reason.
        if !self.check_stop_strings() {
            self.finished = Some(reason);
        }
        Ok(())
    }

    /// Ends the generation at the first stop string; returns whether one was found.
    fn check_stop_strings(&mut self) -> bool {
        let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self.stop.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min();
        if let Some(at) = hit {
            self.text.truncate(at);
            self.finished = Some(FinishReason::Stop);
            self.decoder = None;
            return true;
        }
        false
    }

    /// Text that can be handed out: all of it once finished, else all but a tail that could
    /// still grow into a stop string.
    fn ready_text(&mut self) -> Option<String> {
        let mut end = self.text.len();
        if self.finished.is_none() {
            for s in &self.stop {
                let held = (1..s.len()).rev().find(|&k| s.is_char_boundary(k) && self.text.ends_with(&s[..k]));
                end = end.min(self.text.len() - held.unwrap_or(0));
            }
        }
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        (end > self.emitted).then(|| {
            let out = self.text[self.emitted..end].to_owned();
            self.emitted = end;
            out
        })
    }

    /// The summary, once the generation has finished.
    fn summary(&self) -> Option<Summary> {
        Some(Summary {
            prompt_tokens: self.prompt_len,
            tokens: self.generated.clone(),
            prefill_secs: self.prefill_secs,
            decode_secs: self.decode_secs,
            finish_reason: self.finished?,
        })
    }
}

fn poisoned() -> Error {
    Error::Backend("the engine failed in another thread".into())
}

impl Iterator for Generation<'_> {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done_sent {
            return None;
        }
        loop {
            if let Some(text) = self.ready_text() {
                return Some(Ok(Event::Text(text)));
            }
            if self.finished.is_some() {
                self.done_sent = true;
                return self.summary().map(|s| Ok(Event::Done(s)));
            }
            if let Err(e) = self.advance() {
                self.done_sent = true;
                return Some(Err(e));
            }
        }
    }
}

impl Drop for Generation<'_> {
    fn drop(&mut self) {
        if let Ok(mut pool) = self.engine.blocks.lock() {
            pool.release(&mut self.block_table);
        }
    }
}
