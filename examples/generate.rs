//! Synchronous use of tulu: load a model, ask one chat question, print the answer as it streams.
//!
//! ```sh
//! cargo run --release --example generate -- MODEL_DIR_OR_REPO "What is the capital of France?"
//! ```

use std::io::Write;

use tulu::{ChatMessage, Engine, EngineOptions, Event, GenerateRequest};

fn main() -> tulu::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(model), question) = (args.next(), args.next()) else {
        eprintln!("usage: generate MODEL_DIR_OR_REPO [QUESTION]");
        std::process::exit(2);
    };
    let question = question.unwrap_or_else(|| "What is the capital of France?".into());

    let engine = Engine::load(EngineOptions::new(model))?;
    let request = GenerateRequest::chat(vec![ChatMessage::user(question)]).max_tokens(64);
    // A `Generation` is an iterator of events on a plain thread: text pieces as they are
    // decoded, then a summary.
    for event in engine.generate(request)? {
        match event? {
            Event::Text(text) => {
                print!("{text}");
                let _ = std::io::stdout().flush();
            }
            Event::Done(summary) => {
                println!();
                eprintln!(
                    "{} tokens at {:.1} tok/s ({:?})",
                    summary.tokens.len(),
                    summary.decode_tok_per_sec(),
                    summary.finish_reason
                );
            }
            _ => {}
        }
    }
    Ok(())
}
