//! Runs one fuzz target: every input of its corpus (`tests/fuzz_corpus/<target>/`) as is, then
//! seeded mutations of them until its time is up, each under `catch_unwind`. A panic, or an
//! input slower than [`SLOW`], is saved under the cargo temp dir and fails the test with the
//! paths. `TULU_FUZZ_SECS` sets the time per target (default: a short CI run), `TULU_FUZZ_SEED`
//! the seed; `TULU_FUZZ_LOG` names a file each run appends its counts to (docs/fuzzing.md).

use std::cell::RefCell;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use super::mutate::Rng;

/// An input slower than this is a finding too (a hang in the making).
pub const SLOW: Duration = Duration::from_secs(2);

/// Seconds per target in a plain `cargo test` run.
const DEFAULT_SECS: f64 = 1.5;

thread_local! {
    /// While fuzzing on this thread: the last panic's message (`Some`), not printed.
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A mutation: an input from a corpus entry (and the whole corpus, to splice from).
pub type Mutator = fn(&mut Rng, &[u8], &[Vec<u8>]) -> Vec<u8>;

fn quiet_panics_while_fuzzing() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let fuzzing = CAUGHT.with(|c| {
                let mut c = c.borrow_mut();
                if c.is_some() {
                    *c = Some(format!("{info}"));
                }
                c.is_some()
            });
            if !fuzzing {
                default(info);
            }
        }));
    });
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Fuzzes `check` (which must not panic, whatever the bytes) with inputs from `mutate`.
pub fn run(target: &str, mutate: Mutator, check: impl Fn(&[u8])) {
    quiet_panics_while_fuzzing();
    let corpus = corpus(target);
    assert!(!corpus.is_empty(), "{target}: empty corpus");
    let secs: f64 = env_or("TULU_FUZZ_SECS", DEFAULT_SECS);
    let seed: u64 = env_or("TULU_FUZZ_SEED", 1);
    let mut rng = Rng::new(seed ^ target.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))));
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-findings");
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let (mut inputs, mut slowest) = (0u64, Duration::ZERO);
    let mut findings = Vec::new();
    while inputs < corpus.len() as u64 || Instant::now() < deadline {
        let input = match corpus.get(inputs as usize) {
            Some(seed_input) => seed_input.clone(),
            None => {
                let pick = rng.below(corpus.len());
                mutate(&mut rng, &corpus[pick], &corpus)
            }
        };
        CAUGHT.with(|c| *c.borrow_mut() = Some(String::new()));
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| check(&input)));
        let took = started.elapsed();
        let message = CAUGHT.with(|c| c.borrow_mut().take()).unwrap_or_default();
        slowest = slowest.max(took);
        inputs += 1;
        let finding = match result {
            Err(_) => Some(format!("panicked: {message}")),
            Ok(()) if took > SLOW => Some(format!("took {took:?}")),
            Ok(()) => None,
        };
        if let Some(what) = finding {
            std::fs::create_dir_all(&out).unwrap();
            let path = out.join(format!("{target}-{seed}-{inputs}.bin"));
            std::fs::write(&path, &input).unwrap();
            findings.push(format!("{}: {what}", path.display()));
        }
    }
    let line = format!(
        "{target}: {inputs} inputs in {secs} s (seed {seed}), {} findings, slowest input {slowest:?}",
        findings.len()
    );
    eprintln!("fuzz {line}");
    if let Ok(log) = std::env::var("TULU_FUZZ_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(f, "{line}");
        }
    }
    assert!(findings.is_empty(), "{target}:\n{}", findings.join("\n"));
}
