//! tulu's internals: public for its own command line, tests and benchmarks only, with no
//! semver promise — any of it may change in any release. An application embeds tulu through
//! the crate root ([`crate::Engine`] and the types around it), which is the stable API.

#[path = "backend/mod.rs"]
pub mod backend;
#[path = "config.rs"]
pub mod config;
#[path = "engine/mod.rs"]
pub mod engine;
#[path = "error.rs"]
pub mod error;
#[path = "grammar/mod.rs"]
pub mod grammar;
#[path = "hub.rs"]
pub mod hub;
#[path = "model.rs"]
pub mod model;
#[path = "options.rs"]
pub mod options;
#[path = "parallel/mod.rs"]
pub mod parallel;
#[path = "process_memory.rs"]
pub mod process_memory;
#[path = "quant/mod.rs"]
pub mod quant;
#[path = "ranks/mod.rs"]
pub mod ranks;
#[path = "rope.rs"]
pub mod rope;
#[path = "runtime/mod.rs"]
pub mod runtime;
#[path = "server/mod.rs"]
pub mod server;
#[path = "synth.rs"]
pub mod synth;
#[path = "tokenizer/mod.rs"]
pub mod tokenizer;
#[path = "weights/mod.rs"]
pub mod weights;
