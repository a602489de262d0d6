//! `tulu generate` and `tulu chat`.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use tulu::{ChatMessage, Constraint, Engine, Error, Event, GenerateRequest, Prompt, Result, SamplingParams, Summary};

use crate::{ModelArgs, SamplingArgs};

/// Checks the sampling flags before anything is loaded, each error naming its flag.
pub fn check_flags(args: &SamplingArgs) -> Result<()> {
    if args.max_tokens < 1 {
        return Err(Error::request("--max-tokens", format!("must be at least 1, got {}", args.max_tokens)));
    }
    if let Some(k) = args.top_k.filter(|&k| k < -1) {
        return Err(Error::request("--top-k", format!("must be -1 or 0 (all) or at least 1, got {k}")));
    }
    with_defaults(args, SamplingParams::default()).validate().map_err(|e| match e {
        Error::Request { param, message } => Error::request(format!("--{}", param.replace('_', "-")), message),
        other => other,
    })
}

/// The flags given, over `defaults`.
fn with_defaults(args: &SamplingArgs, d: SamplingParams) -> SamplingParams {
    SamplingParams {
        temperature: args.temperature.unwrap_or(d.temperature),
        top_k: args.top_k.map_or(d.top_k, |k| usize::try_from(k).unwrap_or(0)),
        top_p: args.top_p.unwrap_or(d.top_p),
        min_p: args.min_p.unwrap_or(d.min_p),
        repetition_penalty: args.repetition_penalty.unwrap_or(d.repetition_penalty),
        seed: args.seed,
    }
}

/// The request's sampling: `None` (model defaults) unless a sampling flag was given.
fn sampling(engine: &Engine, args: &SamplingArgs) -> Option<SamplingParams> {
    let any = args.temperature.is_some()
        || args.top_k.is_some()
        || args.top_p.is_some()
        || args.min_p.is_some()
        || args.repetition_penalty.is_some()
        || args.seed.is_some();
    any.then(|| with_defaults(args, engine.default_sampling()))
}

fn request(engine: &Engine, prompt: Prompt, args: &SamplingArgs) -> Result<GenerateRequest> {
    let (constraint, param) = constraint(args)?.unzip();
    Ok(GenerateRequest {
        prompt,
        sampling: sampling(engine, args),
        max_tokens: usize::try_from(args.max_tokens).ok(),
        stop: args.stop.clone(),
        ignore_eos: false,
        logprobs: None,
        constraint,
        constraint_param: param.map(str::to_owned),
        speculative: true,
    })
}

/// The output constraint the flags ask for (clap lets at most one through), with its flag.
pub fn constraint(args: &SamplingArgs) -> Result<Option<(Constraint, &'static str)>> {
    let read = |path: &PathBuf| std::fs::read_to_string(path).map_err(|e| Error::io(path, e));
    if let Some(path) = &args.json_schema {
        let schema = serde_json::from_str(&read(path)?)
            .map_err(|e| Error::request("--json-schema", format!("{} is not JSON: {e}", path.display())))?;
        return Ok(Some((Constraint::JsonSchema(schema), "--json-schema")));
    }
    if let Some(rx) = &args.regex {
        return Ok(Some((Constraint::Regex(rx.clone()), "--regex")));
    }
    if !args.choice.is_empty() {
        return Ok(Some((Constraint::Choice(args.choice.clone()), "--choice")));
    }
    match &args.grammar {
        Some(path) => Ok(Some((Constraint::Lark(read(path)?), "--grammar"))),
        None => Ok(None),
    }
}

/// Streams a generation's text to stdout; returns the text and the summary.
fn stream(engine: &Engine, req: GenerateRequest) -> Result<(String, Summary)> {
    let mut out = std::io::stdout().lock();
    let mut text = String::new();
    for event in engine.generate(req)? {
        match event? {
            Event::Text(t) => {
                text.push_str(&t);
                // A closed stdout (e.g. `| head`) ends the output quietly.
                if out.write_all(t.as_bytes()).and_then(|_| out.flush()).is_err() {
                    break;
                }
            }
            Event::Done(summary) => return Ok((text, summary)),
            _ => {}
        }
    }
    Err(Error::Backend("generation ended without a summary".into()))
}

fn report(s: &Summary) {
    let speculation = match s.acceptance_rate() {
        Some(rate) => format!(
            ", draft acceptance: {:.1}% ({} of {} draft tokens)",
            100.0 * rate,
            s.accepted_draft_tokens,
            s.draft_tokens
        ),
        None => String::new(),
    };
    eprintln!(
        "\nprompt tokens: {} ({} from the prefix cache), prefill: {:.1} tok/s, generated tokens: {}, decode: {:.1} tok/s, finish: {}{speculation}",
        s.prompt_tokens,
        s.cached_prompt_tokens,
        s.prefill_tok_per_sec(),
        s.tokens.len(),
        s.decode_tok_per_sec(),
        s.finish_reason.as_str()
    );
}

/// `tulu generate`.
pub fn generate(
    model: &ModelArgs,
    prompt: Option<String>,
    prompt_file: Option<PathBuf>,
    chat: bool,
    system: Option<String>,
    args: &SamplingArgs,
) -> Result<()> {
    let text = match (prompt, prompt_file) {
        (Some(p), _) => p,
        (None, Some(path)) => {
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            String::from_utf8(bytes).map_err(|e| {
                Error::request(
                    "prompt-file",
                    format!("{} is not UTF-8 (byte {})", path.display(), e.utf8_error().valid_up_to()),
                )
            })?
        }
        (None, None) => return Err(Error::request("prompt", "give --prompt or --prompt-file")),
    };
    if text.is_empty() {
        return Err(Error::request("prompt", "is empty"));
    }
    check_flags(args)?;
    let mut opts = crate::cli::engine_options(model)?;
    // One sequence at a time: the step workspace and the decode graphs are sized for one.
    opts.max_num_seqs = 1;
    if crate::cli::run_if_not_rank0(&opts)? {
        return Ok(());
    }
    let engine = Engine::load(opts)?;
    let prompt = if chat {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(ChatMessage::new("system", s));
        }
        messages.push(ChatMessage::new("user", text));
        Prompt::Chat(messages)
    } else {
        Prompt::Text(text)
    };
    let (_, summary) = stream(&engine, request(&engine, prompt, args)?)?;
    report(&summary);
    Ok(())
}

/// `tulu chat`: one user turn per line; `/exit` or end of input quits, `/reset` forgets.
pub fn chat(model: &ModelArgs, system: Option<String>, args: &SamplingArgs) -> Result<()> {
    check_flags(args)?;
    let mut opts = crate::cli::engine_options(model)?;
    opts.max_num_seqs = 1;
    if crate::cli::run_if_not_rank0(&opts)? {
        return Ok(());
    }
    let engine = Engine::load(opts)?;
    let mut history: Vec<ChatMessage> = Vec::new();
    let start = |h: &mut Vec<ChatMessage>| {
        h.clear();
        if let Some(s) = &system {
            h.push(ChatMessage::new("system", s.clone()));
        }
    };
    start(&mut history);
    eprintln!("tulu chat on {} — /exit quits, /reset starts over", engine.device());
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let Some(line) = lines.next() else { break };
        let line = line.map_err(|e| Error::io("<stdin>", e))?;
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                start(&mut history);
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage::new("user", line));
        match request(&engine, Prompt::Chat(history.clone()), args).and_then(|r| stream(&engine, r)) {
            Ok((text, summary)) => {
                history.push(ChatMessage::new("assistant", text));
                report(&summary);
            }
            Err(e) => {
                // A failed turn (e.g. the context is full) is reported and forgotten.
                history.pop();
                eprintln!("\nerror: {e}");
            }
        }
    }
    Ok(())
}
