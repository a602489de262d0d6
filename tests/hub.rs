//! `resolve_model` against a fake hub: a tiny HTTP/1.1 server on 127.0.0.1 that answers the two
//! endpoints hf-hub 0.4's sync API calls (repo listing and file resolve, with range requests).
//!
//! The hub settings are process-wide environment variables, so every scenario runs in order inside
//! one test.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tulu::unstable::hub::{resolve_model, HubOptions};

/// One repository the fake hub serves.
#[derive(Clone)]
struct FakeRepo {
    id: &'static str,
    sha: String,
    files: BTreeMap<String, Vec<u8>>,
    /// Files are served only to requests carrying `Authorization: Bearer <token>`.
    gated_token: Option<&'static str>,
    /// Safetensors files are redirected to `/cdn/<etag>`, as the hub does for LFS files.
    lfs: bool,
}

/// A request the server saw.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    authorization: Option<String>,
}

/// The fake hub; serves until dropped.
struct FakeHub {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeHub {
    fn start(repos: Vec<FakeRepo>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    // A failed exchange shows up as a client error in the test; nothing to do here.
                    let _ = serve(stream, &repos, &seen2);
                }
            }
        });
        FakeHub { addr, seen, stop, thread: Some(thread) }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The requests seen since the last call.
    fn take(&self) -> Vec<Seen> {
        std::mem::take(&mut *self.seen.lock().expect("seen lock"))
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers one request and closes the connection (`Connection: close` keeps the server serial).
fn serve(stream: TcpStream, repos: &[FakeRepo], seen: &Mutex<Vec<Seen>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let path = target.split('?').next().unwrap_or(target).to_owned();
    let authorization = headers.get("authorization").cloned();
    seen.lock().expect("seen lock").push(Seen { path: path.clone(), authorization: authorization.clone() });
    let range = headers.get("range").cloned();
    let host = headers.get("host").cloned().unwrap_or_default();
    let response = route(&path, &host, range.as_deref(), authorization.as_deref(), repos);
    let mut out = stream;
    let (status, extra_headers, body) = response;
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        _ => "Not Found",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (name, value) in extra_headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    out.write_all(&body)?;
    out.flush()
}

type Response = (u16, Vec<(&'static str, String)>, Vec<u8>);

fn hub_error(status: u16, code: &str, message: &str) -> Response {
    let body = format!(r#"{{"error":"{message}"}}"#).into_bytes();
    (status, vec![("x-error-code", code.to_owned()), ("x-error-message", message.to_owned())], body)
}

fn route(path: &str, host: &str, range: Option<&str>, authorization: Option<&str>, repos: &[FakeRepo]) -> Response {
    // The content store that large (LFS) files redirect to, like the hub's CDN.
    if let Some(tag) = path.strip_prefix("/cdn/") {
        let mut all = repos.iter().flat_map(|r| r.files.values());
        return match all.find(|b| etag(b) == tag) {
            Some(bytes) => ranged(bytes, range, Vec::new()),
            None => hub_error(404, "EntryNotFound", "no such blob"),
        };
    }
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let Some((id, rev)) = rest.split_once("/revision/") else {
            return hub_error(404, "EntryNotFound", "bad listing path");
        };
        let Some(repo) = repos.iter().find(|r| r.id == id) else {
            return hub_error(404, "RepoNotFound", "Repository not found");
        };
        if rev != "main" && rev != repo.sha {
            return hub_error(404, "RevisionNotFound", "Invalid rev id");
        }
        let siblings: Vec<_> = repo.files.keys().map(|f| serde_json::json!({ "rfilename": f })).collect();
        let body = serde_json::json!({ "id": repo.id, "sha": repo.sha, "siblings": siblings });
        return (200, vec![("Content-Type", "application/json".to_owned())], body.to_string().into_bytes());
    }
    let Some((id, rev_file)) = path.trim_start_matches('/').split_once("/resolve/") else {
        return hub_error(404, "EntryNotFound", "unknown path");
    };
    let Some(repo) = repos.iter().find(|r| r.id == id) else {
        return hub_error(404, "RepoNotFound", "Repository not found");
    };
    let Some((rev, file)) = rev_file.split_once('/') else {
        return hub_error(404, "EntryNotFound", "no file");
    };
    if rev != "main" && rev != repo.sha {
        return hub_error(404, "RevisionNotFound", "Invalid rev id");
    }
    if let Some(token) = repo.gated_token {
        if authorization != Some(format!("Bearer {token}").as_str()) {
            return hub_error(403, "GatedRepo", "Access to this model is restricted");
        }
    }
    let Some(bytes) = repo.files.get(file) else {
        return hub_error(404, "EntryNotFound", "Entry not found");
    };
    let tag = etag(bytes);
    if repo.lfs && file.ends_with(".safetensors") {
        // The hub answers LFS files with a redirect carrying the blob's hash as x-linked-etag.
        let headers = vec![
            ("x-repo-commit", repo.sha.clone()),
            ("x-linked-etag", format!("\"{tag}\"")),
            ("etag", "\"redirect-etag\"".to_owned()),
            ("Location", format!("http://{host}/cdn/{tag}")),
        ];
        return (302, headers, Vec::new());
    }
    let headers = vec![("x-repo-commit", repo.sha.clone()), ("etag", format!("\"{tag}\""))];
    ranged(bytes, range, headers)
}

/// `bytes`, or the part a `Range: bytes=a-[b]` header asks for.
fn ranged(bytes: &[u8], range: Option<&str>, mut headers: Vec<(&'static str, String)>) -> Response {
    let size = bytes.len();
    let Some(spec) = range.and_then(|r| r.strip_prefix("bytes=")) else {
        return (200, headers, bytes.to_vec());
    };
    let (start, end) = spec.split_once('-').unwrap_or((spec, ""));
    let start: usize = start.parse().unwrap_or(0);
    let end: usize = end.parse().map_or(size - 1, |e: usize| e.min(size - 1));
    headers.push(("Content-Range", format!("bytes {start}-{end}/{size}")));
    (206, headers, bytes[start..=end].to_vec())
}

/// A content hash standing in for the hub's sha256 etag (FNV-1a is enough to tell files apart).
fn etag(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    format!("{hash:016x}{:08x}", bytes.len())
}

fn repo(id: &'static str, sha_digit: char, files: &[(&str, &[u8])]) -> FakeRepo {
    FakeRepo {
        id,
        sha: std::iter::repeat_n(sha_digit, 40).collect(),
        files: files.iter().map(|(n, b)| (n.to_string(), b.to_vec())).collect(),
        gated_token: None,
        lfs: false,
    }
}

fn set_env(hf_home: &Path, endpoint: &str, offline: bool) {
    std::env::set_var("HF_HOME", hf_home);
    std::env::set_var("HF_ENDPOINT", endpoint);
    std::env::remove_var("HF_HUB_CACHE");
    std::env::remove_var("HF_TOKEN");
    std::env::remove_var("HUGGING_FACE_HUB_TOKEN");
    if offline {
        std::env::set_var("HF_HUB_OFFLINE", "1");
    } else {
        std::env::remove_var("HF_HUB_OFFLINE");
    }
}

fn quiet() -> HubOptions {
    HubOptions { progress: false, config_only: false }
}

fn err_text(result: tulu::Result<std::path::PathBuf>) -> String {
    match result {
        Ok(dir) => panic!("expected an error, got {}", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_files(dir: &Path, repo: &FakeRepo) {
    for (name, bytes) in &repo.files {
        let got = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&got, bytes, "{name}");
    }
}

fn resolves(seen: &[Seen]) -> Vec<&str> {
    seen.iter().filter(|s| s.path.contains("/resolve/")).map(|s| s.path.as_str()).collect()
}

#[test]
fn resolve_model_against_a_fake_hub() {
    let single = repo(
        "tiny/llama",
        'a',
        &[
            ("config.json", br#"{"hidden_size": 64}"#),
            ("generation_config.json", br#"{"eos_token_id": [1, 2]}"#),
            ("tokenizer.json", br#"{"model": {}}"#),
            ("model.safetensors", b"not really safetensors, only bytes"),
            ("README.md", b"# not downloaded"),
        ],
    );
    let sharded = repo(
        "tiny/sharded",
        'b',
        &[
            ("config.json", b"{}"),
            ("tokenizer.json", b"{}"),
            ("tokenizer_config.json", br#"{"chat_template": ""}"#),
            (
                "model.safetensors.index.json",
                br#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#,
            ),
            ("model-00001-of-00002.safetensors", b"shard one"),
            ("model-00002-of-00002.safetensors", b"shard two, longer"),
        ],
    );
    let mut gated =
        repo("meta/gated", 'c', &[("config.json", b"{}"), ("tokenizer.json", b"{}"), ("model.safetensors", b"w")]);
    gated.gated_token = Some("s3cret");
    let mut sharded = sharded;
    sharded.lfs = true;
    let hub = FakeHub::start(vec![single.clone(), sharded.clone(), gated.clone()]);
    let endpoint = hub.endpoint();
    let home = tempfile::tempdir().expect("tempdir");

    // Download: every needed file lands in the snapshot with its bytes; README.md is skipped.
    set_env(home.path(), &endpoint, false);
    let dir = resolve_model("tiny/llama", &quiet()).expect("download");
    let expected = home.path().join("hub/models--tiny--llama/snapshots").join(&single.sha);
    assert_eq!(dir, expected.canonicalize().expect("snapshot exists"));
    let mut wanted = single.clone();
    wanted.files.remove("README.md");
    assert_files(&dir, &wanted);
    assert!(!dir.join("README.md").exists());
    let seen = hub.take();
    assert_eq!(seen[0].path, "/api/models/tiny/llama/revision/main");
    for file in wanted.files.keys() {
        assert!(resolves(&seen).iter().any(|p| p.ends_with(&format!("/{file}"))), "{file} not fetched: {seen:?}");
    }

    // Cache hit: only the listing is asked for, no file content.
    assert_eq!(resolve_model("tiny/llama", &quiet()).expect("cache hit"), dir);
    let seen = hub.take();
    assert!(resolves(&seen).is_empty(), "{seen:?}");
    assert_eq!(seen.len(), 1);

    // Offline with the cache: no request at all, by branch and by commit.
    set_env(home.path(), &endpoint, true);
    assert_eq!(resolve_model("tiny/llama", &quiet()).expect("offline"), dir);
    assert_eq!(resolve_model(&format!("tiny/llama@{}", single.sha), &quiet()).expect("offline by sha"), dir);
    std::env::set_var("HF_HUB_OFFLINE", "true");
    assert_eq!(resolve_model("tiny/llama", &quiet()).expect("offline=true"), dir);
    // Offline without the cache: a clear error, still no request.
    let err = err_text(resolve_model("tiny/sharded", &quiet()));
    assert!(err.contains("HF_HUB_OFFLINE") && err.contains("tiny/sharded"), "{err}");
    assert!(hub.take().is_empty());

    // Unreachable hub: a complete cache still serves; an uncached repo names the endpoint.
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let dead = format!("http://{closed}");
    set_env(home.path(), &dead, false);
    assert_eq!(resolve_model("tiny/llama", &quiet()).expect("fallback to cache"), dir);
    let err = err_text(resolve_model("tiny/sharded", &quiet()));
    assert!(err.contains("cannot reach") && err.contains(&dead), "{err}");

    // Unknown repo and unknown revision: named, with the endpoint.
    set_env(home.path(), &format!("{endpoint}/"), false);
    let err = err_text(resolve_model("nobody/nothing", &quiet()));
    assert!(err.contains("nobody/nothing") && err.contains(&format!("not found on {endpoint}")), "{err}");
    let err = err_text(resolve_model("tiny/llama@v9", &quiet()));
    assert!(err.contains("revision `v9` not found"), "{err}");

    // Config only (what `tulu inspect` needs): config.json and nothing else is fetched.
    hub.take();
    let config_only = HubOptions { progress: false, config_only: true };
    let dir = resolve_model("tiny/sharded", &config_only).expect("config only");
    assert!(dir.join("config.json").is_file());
    let seen = hub.take();
    let fetched: Vec<&str> = resolves(&seen).into_iter().map(|p| p.rsplit('/').next().unwrap_or(p)).collect();
    // (hf-hub asks for a file's metadata, then its bytes: two requests for one file.)
    assert!(!fetched.is_empty() && fetched.iter().all(|f| *f == "config.json"), "config-only fetched {fetched:?}");

    // Sharded, with the shards behind LFS-style redirects: the index and both shards.
    let dir = resolve_model("tiny/sharded", &quiet()).expect("sharded");
    assert_files(&dir, &sharded);
    let seen = hub.take();
    let fetched = resolves(&seen).iter().filter(|p| p.contains("-of-00002")).count();
    assert!(fetched >= 2, "shards fetched: {fetched}");
    assert!(seen.iter().filter(|s| s.path.starts_with("/cdn/")).count() >= 2, "{seen:?}");

    // Gated: without a token the error says what to do; with HF_TOKEN the token is sent.
    let err = err_text(resolve_model("meta/gated", &quiet()));
    assert!(err.contains("gated") && err.contains("HF_TOKEN"), "{err}");
    hub.take();
    std::env::set_var("HF_TOKEN", "s3cret");
    let dir = resolve_model("meta/gated", &quiet()).expect("gated with token");
    assert_files(&dir, &gated);
    assert!(hub.take().iter().all(|s| s.authorization.as_deref() == Some("Bearer s3cret")));

    // Progress bars with no terminal attached: must simply work, into a fresh cache.
    let fresh = tempfile::tempdir().expect("tempdir");
    set_env(fresh.path(), &endpoint, false);
    let dir = resolve_model("tiny/sharded", &HubOptions::default()).expect("with progress");
    assert_files(&dir, &sharded);

    // Local directories win over the hub; missing paths are not sent to it.
    let local = resolve_model(&fresh.path().display().to_string(), &quiet()).expect("local dir");
    assert_eq!(local, fresh.path().canonicalize().expect("canonical"));
    hub.take();
    let err = err_text(resolve_model("./no/such/model", &quiet()));
    assert!(err.contains("no such model directory"), "{err}");
    assert!(hub.take().is_empty());
}
