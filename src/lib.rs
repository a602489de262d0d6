//! tulu: a native inference engine for Llama-3.1-architecture language models.
//!
//! The forward pass ([`model`]) is written once against the [`backend::Backend`] trait; the CPU
//! backend runs on candle-core. [`Engine`] is the library's entry point and the only API the
//! `tulu` command line uses.

pub mod backend;
pub mod config;
pub mod engine;
pub mod error;
pub mod grammar;
pub mod hub;
pub mod model;
pub mod parallel;
pub mod process_memory;
pub mod quant;
pub mod rope;
pub mod runtime;
pub mod server;
pub mod synth;
pub mod tokenizer;
pub mod weights;

pub use backend::Device;
pub use engine::{
    Engine, EngineOptions, Event, FinishReason, GenerateRequest, Generation, Metrics, Prompt, Summary, TokenLogprob,
};
pub use error::{Error, Result};
pub use grammar::Constraint;
pub use runtime::sampler::SamplingParams;
pub use tokenizer::ChatMessage;
