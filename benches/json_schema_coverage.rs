//! How many real-world JSON schemas `response_format: {type: json_schema}` accepts:
//! `cargo bench --bench json_schema_coverage -- --tokenizer TOKENIZER_JSON NAME=DIR...`
//! (`scripts/fetch-schema-corpora DIR` fetches the public collections and prints the
//! `NAME=DIR` arguments).
//!
//! Every `*.json` file under each `DIR` is sent through tulu's own path: a chat request body
//! with the file as `response_format.json_schema.schema`, parsed by the server
//! (`server::structured::parse`) and compiled by [`Grammars::compile`] against the vocabulary of
//! `--tokenizer`. Prints one JSON line per collection: files, accepted, refused (by reason,
//! numbers and quoted names folded so that alike reasons count together), the accepted schemas
//! whose grammar left keywords to the check after generation (by keyword), and the compile
//! time. `--list` also prints each refused file with its error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use serde_json::{json, Value};
use tulu::unstable::grammar::Grammars;
use tulu::unstable::server::structured;
use tulu::unstable::tokenizer::Tokenizer;
use tulu::Result;

/// The bench's flags (after `--`).
#[derive(Parser)]
struct Args {
    /// The tokenizer.json whose vocabulary the grammars are compiled against.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Collections, each `NAME=DIR` (every `*.json` file under DIR is one schema).
    #[arg(required = true)]
    collections: Vec<String>,
    /// Also print each refused file and its error.
    #[arg(long)]
    list: bool,
    /// cargo passes `--bench` to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Files that are not JSON (JSON5, comments) are no schema a request can carry: they are
/// counted apart and left out of the rate.
const NOT_JSON: &str = "the file is not JSON";

/// One collection's tally.
#[derive(Default)]
struct Tally {
    files: usize,
    accepted: usize,
    refused: BTreeMap<String, usize>,
    relaxed: BTreeMap<String, usize>,
    relaxed_schemas: usize,
    not_json: usize,
    seconds: f64,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    let tokenizer = Arc::new(Tokenizer::from_files(&args.tokenizer, None)?);
    let width = tokenizer.vocab_size();
    let grammars = Grammars::new(tokenizer, width, vec![width as u32 - 1]);
    let (mut files, mut accepted) = (0, 0);
    for spec in &args.collections {
        let Some((name, dir)) = spec.split_once('=') else {
            return Err(tulu::Error::request("collections", format!("`{spec}` is not NAME=DIR")));
        };
        let mut paths = Vec::new();
        json_files(Path::new(dir), &mut paths)?;
        paths.sort();
        let tally = collection(&grammars, &paths, args.list);
        files += tally.files;
        accepted += tally.accepted;
        let line = json!({
            "collection": name,
            "files": tally.files,
            "not_json_skipped": tally.not_json,
            "accepted": tally.accepted,
            "accepted_pct": pct(tally.accepted, tally.files),
            "refused": tally.refused,
            "accepted_with_check_after": tally.relaxed_schemas,
            "checked_after_by_keyword": tally.relaxed,
            "compile_seconds": (tally.seconds * 100.0).round() / 100.0,
        });
        println!("{line}");
    }
    println!(
        "{}",
        json!({"collection": "all", "files": files, "accepted": accepted, "accepted_pct": pct(accepted, files)})
    );
    Ok(())
}

fn pct(n: usize, of: usize) -> f64 {
    if of == 0 {
        return 0.0;
    }
    (1000.0 * n as f64 / of as f64).round() / 10.0
}

/// Compiles each file's schema the way a chat request's `response_format` is compiled.
fn collection(grammars: &Grammars, paths: &[PathBuf], list: bool) -> Tally {
    let mut tally = Tally::default();
    for path in paths {
        tally.files += 1;
        let t0 = Instant::now();
        let outcome = compile(grammars, path);
        tally.seconds += t0.elapsed().as_secs_f64();
        match outcome {
            Ok(relaxed) => {
                tally.accepted += 1;
                tally.relaxed_schemas += usize::from(!relaxed.is_empty());
                for keyword in relaxed {
                    *tally.relaxed.entry(keyword).or_default() += 1;
                }
            }
            Err(why) if why == NOT_JSON => {
                tally.files -= 1;
                tally.not_json += 1;
            }
            Err(why) => {
                if list {
                    eprintln!("refused {}: {why}", path.display());
                }
                *tally.refused.entry(reason(&why)).or_default() += 1;
            }
        }
    }
    tally
}

/// The keywords the schema's grammar leaves to the check after generation, or why it is
/// refused.
fn compile(grammars: &Grammars, path: &Path) -> std::result::Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("unreadable file: {e}"))?;
    let schema: Value = serde_json::from_str(&text).map_err(|_| NOT_JSON.to_string())?;
    let body = json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}});
    let Value::Object(body) = body else { unreachable!("a json! object") };
    let request = structured::parse(&body).map_err(|e| e.message)?.ok_or("no constraint")?;
    let matcher = grammars.compile(&request.constraint, Some(&request.param)).map_err(|e| e.to_string())?;
    Ok(matcher.relaxed().to_vec())
}

/// A refusal's reason with what differs between alike ones (quoted names, numbers, the text
/// after a first clause) folded away.
fn reason(why: &str) -> String {
    let why = why.split("cannot be compiled: ").nth(1).unwrap_or(why);
    if why.starts_with("Unimplemented keys") || why.starts_with("Unknown format") {
        return why.to_string();
    }
    if why.contains("is not present in a registry") {
        return "a $ref to another document (tulu fetches none)".into();
    }
    if why.starts_with("Invalid URI reference") {
        return "a $ref that is not a valid URI reference".into();
    }
    let mut out = String::new();
    let mut quoted = false;
    for c in why.chars().take(90) {
        match c {
            '"' | '`' => {
                if !quoted {
                    out.push('…');
                }
                quoted = !quoted;
            }
            _ if quoted => {}
            '0'..='9' => {
                if !out.ends_with('#') {
                    out.push('#');
                }
            }
            _ => out.push(c),
        }
    }
    out
}

fn json_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| tulu::Error::request("collections", format!("cannot read {}: {e}", dir.display())))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            json_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
    Ok(())
}
