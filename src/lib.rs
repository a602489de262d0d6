//! tulu: a native inference engine for Llama-3.1-architecture language models.
//!
//! An application embeds it through [`Engine`]: load a model once ([`EngineOptions`]), share the
//! engine between threads or tasks, and submit [`GenerateRequest`]s from any of them; each
//! returns a [`Generation`], a stream of [`Event`]s that is a [`futures_util::Stream`] for async
//! code and iterates (`for event in generation`) in synchronous code. Requests are batched continuously: one slow or
//! failing request harms no other.
//!
//! ```no_run
//! use tulu::{ChatMessage, Engine, EngineOptions, Event, GenerateRequest};
//! let engine = Engine::load(EngineOptions::new("HuggingFaceTB/SmolLM2-135M-Instruct"))?;
//! let request = GenerateRequest::chat(vec![ChatMessage::user("What is the capital of France?")]).max_tokens(32);
//! for event in engine.generate(request)? {
//!     if let Event::Text(text) = event? {
//!         print!("{text}");
//!     }
//! }
//! # Ok::<(), tulu::Error>(())
//! ```
//!
//! The crate root is the stable API. [`unstable`] holds the internals (backends, the forward
//! pass, the scheduler, the server) for tulu's own command line, tests and benchmarks, with no
//! semver promise. The library reports through `tracing` only and never writes to stdout or
//! stderr (progress bars, off by default, are drawn only when [`EngineOptions::progress`] asks).

pub mod unstable;

pub(crate) use unstable::{
    backend, config, engine, error, grammar, hub, model, options, parallel, quant, ranks, rope, runtime, synth,
    tokenizer, weights,
};

pub use backend::Device;
pub use config::ModelConfig;
pub use engine::{
    BlockingIter, Engine, Event, FinishReason, GenerateRequest, Generation, Histogram, Metrics, Prompt, Summary,
    TokenLogprob,
};
pub use error::{Error, Result};
pub use grammar::Constraint;
pub use options::EngineOptions;
pub use parallel::rendezvous::WorldSpec;
pub use quant::kv::KvCacheDtype;
pub use quant::Quantize;
pub use runtime::sampler::SamplingParams;
pub use runtime::speculative::{NgramProposer, Proposer, Speculation};
pub use tokenizer::{ChatMessage, FunctionCall, Tokenizer, ToolCall};
