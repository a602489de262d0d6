//! Resolve `--model`: a local directory, or a Hugging Face hub repo id downloaded into (or found in)
//! the standard hub cache, so that everything downstream only ever sees one directory.
//!
//! hf-hub 0.4's sync API does the transfers; this module adds what it lacks: offline mode
//! (`HF_HUB_OFFLINE`), the `HF_TOKEN` / `HF_HUB_CACHE` variables, a cache check that makes no
//! request per file, and errors that say what to do (404, gated, unreachable endpoint).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::api::RepoInfo;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};
use crate::weights::index_shard_names;

/// The hub used when `HF_ENDPOINT` is not set.
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The sharded-checkpoint index; its `weight_map` names the shard files.
const INDEX_FILE: &str = "model.safetensors.index.json";
/// The single-file checkpoint.
const SINGLE_FILE: &str = "model.safetensors";
/// Files a model directory must have besides its weights.
const REQUIRED_FILES: [&str; 2] = ["config.json", "tokenizer.json"];
/// Files used when present (EOS ids, chat template) but not every repo has.
const OPTIONAL_FILES: [&str; 2] = ["generation_config.json", "tokenizer_config.json"];

/// How [`resolve_model`] behaves.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Show a progress bar per file while downloading (hidden anyway when stderr is no terminal).
    pub progress: bool,
    /// Fetch only `config.json` (sizing a model needs nothing else; 405B's weights are 811 GB).
    pub config_only: bool,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions { progress: true, config_only: false }
    }
}

/// Turns `spec` (a model directory, or a hub repo id `owner/name[@revision]`) into a local
/// directory holding config.json, tokenizer.json and the safetensors weights.
///
/// Hub repos are downloaded into the hub cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`) and the
/// snapshot directory is returned; with `HF_HUB_OFFLINE=1` only the cache is consulted.
pub fn resolve_model(spec: &str, opts: &HubOptions) -> Result<PathBuf> {
    match classify(spec)? {
        Spec::Local(dir) => dir.canonicalize().map_err(|e| Error::io(dir, e)),
        Spec::Repo { id, revision } => {
            let env = HubEnv::from_env(&id)?;
            let repo = Repo::with_revision(id.clone(), RepoType::Model, revision);
            let snapshot = if env.offline {
                from_cache(&env, &repo, opts.config_only).map_err(|missing| {
                    hub_error(
                        &id,
                        format!(
                            "not in the local cache {} (HF_HUB_OFFLINE is set; missing: {missing}); \
                             run once online or point --model at a directory",
                            env.cache_dir.display()
                        ),
                    )
                })?
            } else {
                download(&env, &repo, opts)?
            };
            snapshot.canonicalize().map_err(|e| Error::io(snapshot, e))
        }
    }
}

/// What the user's `--model` names.
#[derive(Debug, PartialEq)]
enum Spec {
    /// An existing directory.
    Local(PathBuf),
    /// A hub repository at a revision (branch, tag or commit).
    Repo { id: String, revision: String },
}

/// Decides between directory and repo id; a path-looking spec that does not exist is an error
/// rather than a hub lookup, because "./modle" going to the network would only confuse.
fn classify(spec: &str) -> Result<Spec> {
    let path = expand_tilde(spec);
    if path.is_dir() {
        return Ok(Spec::Local(path));
    }
    if path.is_file() && path.extension().is_some_and(|x| x.eq_ignore_ascii_case("gguf")) {
        return Ok(Spec::Local(crate::weights::gguf_store::model_dir(&path)?));
    }
    if path.exists() {
        return Err(hub_error(spec, "is a file; --model takes a model directory, a .gguf file or a hub repo id"));
    }
    let (id, revision) = match spec.split_once('@') {
        Some((id, rev)) => (id, Some(rev)),
        None => (spec, None),
    };
    let looks_like_path = spec.starts_with(['.', '/', '~']) || id.matches('/').count() > 1;
    if looks_like_path {
        return Err(hub_error(spec, format!("no such model directory: {}", path.display())));
    }
    let valid_part = |s: &str| {
        !s.is_empty()
            && !s.starts_with(['.', '-'])
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    if !id.split('/').all(valid_part) {
        return Err(hub_error(
            spec,
            "is neither a directory nor a hub repo id (`owner/name` or `owner/name@revision`)",
        ));
    }
    match revision {
        Some("") => Err(hub_error(spec, "empty revision after `@`")),
        rev => Ok(Spec::Repo { id: id.to_owned(), revision: rev.unwrap_or("main").to_owned() }),
    }
}

/// `~/x` → `$HOME/x`, as a shell would have done had the path not been quoted.
fn expand_tilde(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ if path == "~" => std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| path.into()),
        _ => PathBuf::from(path),
    }
}

fn hub_error(repo: &str, message: impl Into<String>) -> Error {
    Error::Hub { repo: repo.to_owned(), message: message.into() }
}

/// The hub settings the environment gives, read the way huggingface_hub (Python) reads them;
/// hf-hub 0.4 itself reads only `HF_HOME` and `HF_ENDPOINT`.
struct HubEnv {
    /// The hub cache root (`.../hub`), holding `models--owner--name` directories.
    cache_dir: PathBuf,
    /// The hub URL without a trailing slash.
    endpoint: String,
    /// The access token for private and gated repos.
    token: Option<String>,
    /// `HF_HUB_OFFLINE`: never touch the network.
    offline: bool,
}

impl HubEnv {
    fn from_env(repo: &str) -> Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        // hf-hub's own default cache panics when no home directory exists; resolve it here.
        let hf_home = match var("HF_HOME") {
            Some(home) => Some(expand_tilde(&home)),
            None => var("XDG_CACHE_HOME")
                .map(|x| PathBuf::from(x).join("huggingface"))
                .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache").join("huggingface"))),
        };
        let cache_dir = match (var("HF_HUB_CACHE"), &hf_home) {
            (Some(cache), _) => expand_tilde(&cache),
            (None, Some(home)) => home.join("hub"),
            (None, None) => {
                return Err(hub_error(repo, "no hub cache directory: set HF_HOME (or HOME)"));
            }
        };
        // hf-hub only reads the token file; HF_TOKEN is what CI and containers set.
        let token = var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")).or_else(|| {
            let file = hf_home.as_ref()?.join("token");
            std::fs::read_to_string(file).ok().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty())
        });
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned());
        let offline = var("HF_HUB_OFFLINE")
            .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"));
        Ok(HubEnv { cache_dir, endpoint: endpoint.trim_end_matches('/').to_owned(), token, offline })
    }

    /// `snapshots/` of `repo` in the cache.
    fn snapshots_dir(&self, repo: &Repo) -> PathBuf {
        self.cache_dir.join(repo.folder_name()).join("snapshots")
    }
}

/// The cached snapshot of `repo` when every file a model needs is in it; otherwise the names of
/// the missing files (or of the missing ref), for the error message.
fn from_cache(env: &HubEnv, repo: &Repo, config_only: bool) -> std::result::Result<PathBuf, String> {
    let snapshots = env.snapshots_dir(repo);
    let revision = repo.revision();
    let is_commit = revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit());
    let snapshot = if is_commit && snapshots.join(revision).is_dir() {
        snapshots.join(revision)
    } else {
        let ref_file = env.cache_dir.join(repo.folder_name()).join("refs").join(revision);
        let commit = std::fs::read_to_string(&ref_file)
            .map_err(|_| format!("every file (no snapshot for revision `{revision}`)"))?;
        snapshots.join(commit.trim())
    };
    let missing = if config_only {
        if snapshot.join("config.json").is_file() {
            Vec::new()
        } else {
            vec!["config.json".to_owned()]
        }
    } else {
        missing_files(&snapshot)
    };
    if missing.is_empty() {
        Ok(snapshot)
    } else {
        Err(missing.join(", "))
    }
}

/// The files `dir` still needs to be a loadable model directory (empty when complete).
fn missing_files(dir: &Path) -> Vec<String> {
    let mut missing: Vec<String> =
        REQUIRED_FILES.iter().filter(|f| !dir.join(f).is_file()).map(|f| f.to_string()).collect();
    if dir.join(INDEX_FILE).is_file() {
        match index_shard_names(&dir.join(INDEX_FILE)) {
            Ok(shards) => missing.extend(shards.into_iter().filter(|s| !dir.join(s).is_file())),
            Err(_) => missing.push(INDEX_FILE.to_owned()),
        }
    } else if !dir.join(SINGLE_FILE).is_file() {
        missing.push(SINGLE_FILE.to_owned());
    }
    missing
}

/// Downloads what `repo` lacks in the cache (one metadata request when nothing is missing) and
/// returns its snapshot directory.
fn download(env: &HubEnv, repo: &Repo, opts: &HubOptions) -> Result<PathBuf> {
    let id = repo_id(repo);
    let api = ApiBuilder::from_cache(Cache::new(env.cache_dir.clone()))
        .with_endpoint(env.endpoint.clone())
        .with_token(env.token.clone())
        .with_progress(opts.progress)
        .build()
        .map_err(|e| hub_error(&id, format!("cannot set up the HTTP client: {e}")))?;

    let info = match fetch_info(&api.repo(repo.clone())) {
        Ok(info) => info,
        // Like huggingface_hub: an unreachable hub is no reason to refuse a complete cached copy.
        Err(e @ InfoError::Unreachable(_)) => {
            return from_cache(env, repo, opts.config_only).map_err(|_| e.into_error(env, repo)).inspect(|dir| {
                tracing::warn!("{}: hub unreachable, using the cached {}", env.endpoint, dir.display())
            });
        }
        Err(e) => return Err(e.into_error(env, repo)),
    };

    // Pin every download to the commit the listing describes, so that a push between two files
    // cannot leave a snapshot mixing two versions; the user's revision then points at it.
    let pinned = Repo::with_revision(id.clone(), RepoType::Model, info.sha.clone());
    let api_repo = api.repo(pinned);
    let snapshot = env.snapshots_dir(repo).join(&info.sha);
    let siblings: BTreeSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let fetch = |file: &str| fetch_file(&api_repo, env, repo, &snapshot, file);

    let required: &[&str] = if opts.config_only { &["config.json"] } else { &REQUIRED_FILES };
    for &file in required {
        if !siblings.contains(file) {
            return Err(hub_error(&id, format!("the repo has no {file}; tulu needs it")));
        }
        fetch(file)?;
    }
    if opts.config_only {
        Cache::new(env.cache_dir.clone())
            .repo(repo.clone())
            .create_ref(&info.sha)
            .map_err(|e| Error::io(env.cache_dir.join(repo.folder_name()), e))?;
        return Ok(snapshot);
    }
    for file in OPTIONAL_FILES.into_iter().filter(|f| siblings.contains(f)) {
        fetch(file)?;
    }
    if siblings.contains(INDEX_FILE) {
        fetch(INDEX_FILE)?;
        for shard in index_shard_names(&snapshot.join(INDEX_FILE))? {
            if !siblings.contains(shard.as_str()) {
                return Err(hub_error(&id, format!("{INDEX_FILE} names `{shard}`, which the repo lacks")));
            }
            fetch(&shard)?;
        }
    } else if siblings.contains(SINGLE_FILE) {
        fetch(SINGLE_FILE)?;
    } else {
        let others: Vec<&str> = siblings
            .iter()
            .copied()
            .filter(|f| f.ends_with(".safetensors") || f.ends_with(".bin") || f.ends_with(".gguf"))
            .take(8)
            .collect();
        return Err(hub_error(
            &id,
            format!("the repo has neither {SINGLE_FILE} nor {INDEX_FILE} (weight files: {others:?})"),
        ));
    }

    // hf-hub wrote refs/<commit>; offline runs look up the revision the user named.
    let cache_repo = Cache::new(env.cache_dir.clone()).repo(repo.clone());
    cache_repo.create_ref(&info.sha).map_err(|e| Error::io(env.cache_dir.join(repo.folder_name()), e))?;
    Ok(snapshot)
}

/// `repo`'s id, for error messages.
fn repo_id(repo: &Repo) -> String {
    // Repo exposes no id getter; folder_name is `models--owner--name`.
    repo.folder_name().trim_start_matches("models--").replacen("--", "/", 1)
}

/// Downloads `file` into `snapshot` unless it is already there.
fn fetch_file(api_repo: &ApiRepo, env: &HubEnv, repo: &Repo, snapshot: &Path, file: &str) -> Result<()> {
    let pointer = snapshot.join(file);
    if pointer.is_file() {
        return Ok(());
    }
    // A link whose blob was deleted would make hf-hub's symlink call fail with "file exists".
    if pointer.symlink_metadata().is_ok() {
        std::fs::remove_file(&pointer).map_err(|e| Error::io(&pointer, e))?;
    }
    tracing::debug!("downloading {file} from {}", api_repo.url(file));
    let path = api_repo.download(file).map_err(|e| download_error(e, env, repo, file))?;
    if path != pointer {
        return Err(hub_error(
            &repo_id(repo),
            format!(
                "{file} landed in {} instead of {}; the repo changed meanwhile, retry",
                path.display(),
                pointer.display()
            ),
        ));
    }
    Ok(())
}

/// Why the repo listing could not be had.
enum InfoError {
    /// The hub answered with an HTTP error status.
    Status { code: u16, error_code: Option<String>, message: Option<String> },
    /// The hub could not be reached (DNS, refused connection, TLS, timeout).
    Unreachable(String),
    /// The hub answered 200 with something that is not a repo listing.
    BadListing(String),
}

fn fetch_info(api_repo: &ApiRepo) -> std::result::Result<RepoInfo, InfoError> {
    // info_request rather than info(): info() folds the status and its headers into a string.
    match api_repo.info_request().call() {
        Ok(response) => response.into_json::<RepoInfo>().map_err(|e| InfoError::BadListing(e.to_string())),
        Err(err) => {
            let cause = err.to_string();
            match err.into_response() {
                Some(response) => Err(InfoError::Status {
                    code: response.status(),
                    error_code: response.header("x-error-code").map(str::to_owned),
                    message: response.header("x-error-message").map(str::to_owned),
                }),
                None => Err(InfoError::Unreachable(cause)),
            }
        }
    }
}

impl InfoError {
    fn into_error(self, env: &HubEnv, repo: &Repo) -> Error {
        let id = repo_id(repo);
        let message = match self {
            InfoError::Status { code, error_code, message } => {
                status_message(env, repo, code, error_code.as_deref(), message.as_deref(), None)
            }
            InfoError::Unreachable(cause) => format!("cannot reach {}: {cause}", env.endpoint),
            InfoError::BadListing(cause) => {
                format!("{} answered with no usable repo listing ({cause}); is HF_ENDPOINT a hub?", env.endpoint)
            }
        };
        hub_error(&id, message)
    }
}

/// The message for an HTTP error status from the hub, saying what the user can do about it.
fn status_message(
    env: &HubEnv,
    repo: &Repo,
    code: u16,
    error_code: Option<&str>,
    server_message: Option<&str>,
    file: Option<&str>,
) -> String {
    let endpoint = &env.endpoint;
    let what = file.map(|f| format!("{f}: ")).unwrap_or_default();
    let token_hint = if env.token.is_some() {
        "the token in HF_TOKEN (or $HF_HOME/token) has no access to it"
    } else {
        "set HF_TOKEN to a token with access"
    };
    let detail = server_message.map(|m| format!(" (hub says: {m})")).unwrap_or_default();
    match (code, error_code) {
        (_, Some("RevisionNotFound")) => {
            format!("{what}revision `{}` not found on {endpoint}{detail}", repo.revision())
        }
        (_, Some("GatedRepo")) | (403, _) => format!(
            "{what}access denied on {endpoint}: the repo is gated or private; accept its license on \
             its hub page and {token_hint}{detail}"
        ),
        (404, _) => format!("{what}not found on {endpoint}{detail}"),
        // The hub answers 401 both for repos that do not exist and for private ones.
        (401, _) => format!("{what}not found on {endpoint}, or private/gated: {token_hint}{detail}"),
        _ => format!("{what}HTTP {code} from {endpoint}{detail}"),
    }
}

fn download_error(err: ApiError, env: &HubEnv, repo: &Repo, file: &str) -> Error {
    let id = repo_id(repo);
    let message = match err {
        ApiError::RequestError(err) => {
            let cause = err.to_string();
            match err.into_response() {
                Some(response) => status_message(
                    env,
                    repo,
                    response.status(),
                    response.header("x-error-code"),
                    response.header("x-error-message"),
                    Some(file),
                ),
                None => format!("{file}: cannot reach {}: {cause}", env.endpoint),
            }
        }
        ApiError::MissingHeader(header) | ApiError::InvalidHeader(header) => {
            format!("{file}: {} sent no valid `{header}` header; is HF_ENDPOINT a Hugging Face hub?", env.endpoint)
        }
        ApiError::LockAcquisition(lock) => {
            format!("{file}: another process is downloading it (lock {})", lock.display())
        }
        other => format!("{file}: download into {} failed: {other}", env.cache_dir.display()),
    };
    hub_error(&id, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_specs() {
        let repo = |id: &str, rev: &str| Spec::Repo { id: id.into(), revision: rev.into() };
        assert_eq!(classify("allenai/Llama-3.1-Tulu-3-8B").ok(), Some(repo("allenai/Llama-3.1-Tulu-3-8B", "main")));
        assert_eq!(classify("gpt2").ok(), Some(repo("gpt2", "main")));
        assert_eq!(classify("a/b@refs/pr/1").ok(), Some(repo("a/b", "refs/pr/1")));
        for bad in ["./nope", "/nope/nope", "a/b/c", "~/nope-tulu-test", "a b/c", "a/b@"] {
            let err = classify(bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(bad), "{bad}: {err}");
        }
        assert!(classify("./nope").err().is_some_and(|e| e.to_string().contains("no such model directory")));
        assert_eq!(classify(".").ok(), Some(Spec::Local(".".into())));
    }

    #[test]
    fn shard_names_reject_escapes() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let index = dir.path().join(INDEX_FILE);
        let write = |text: &str| std::fs::write(&index, text).map_err(|e| Error::io(&index, e));
        write(r#"{"weight_map": {"a": "s-1.safetensors", "b": "s-2.safetensors", "c": "s-1.safetensors"}}"#)?;
        let shards = index_shard_names(&index)?;
        assert_eq!(shards, ["s-1.safetensors", "s-2.safetensors"]);
        write(r#"{"weight_map": {"a": "../../etc/passwd"}}"#)?;
        assert!(index_shard_names(&index).is_err());
        write(r#"{"weight_map": {"a": "/abs"}}"#)?;
        assert!(index_shard_names(&index).is_err());
        Ok(())
    }
}
