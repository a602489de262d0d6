//! A `tulu serve` subprocess on SmolLM2 and a minimal HTTP/1.1 client, for the tests that drive
//! the server (tests/server.rs, tests/structured.rs, tests/gpu_cli.rs).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A `tulu serve` subprocess, killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: String,
    pub model: String,
}

impl Server {
    /// Starts a server on a free port (`--port 0`) with a small context and KV pool, plus `extra`
    /// flags, and waits until `/health` answers 200.
    pub fn start(extra: &[&str]) -> Server {
        let model = super::smollm2_dir().to_string_lossy().into_owned();
        let mut args = vec!["--max-context", "1024", "--kv-cache-memory", "60000000"];
        args.extend_from_slice(extra);
        Self::start_model(&model, "smollm2", &args)
    }

    /// Starts a server of `model` (served as `name`) with `extra` flags; waits for `/health`.
    pub fn start_model(model: &str, name: &str, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tulu"))
            .args(["serve", "--model", model, "--port", "0", "--served-model-name", name])
            .args(extra)
            // A single process, whatever launcher started the tests.
            .env_remove("WORLD_SIZE")
            .env_remove("RANK")
            .env_remove("LOCAL_RANK")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tulu serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[serve] {line}");
                if let Some(addr) = line.strip_prefix("listening on http://") {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        // Loading and capturing graphs on the CUDA emulator takes minutes.
        let addr = rx.recv_timeout(Duration::from_secs(300)).expect("the server printed no address");
        let server = Server { child, addr, model: name.into() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.get("/health").status != 200 {
            assert!(Instant::now() < deadline, "/health never answered 200");
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn get(&self, path: &str) -> Reply {
        http(&self.addr, "GET", path, &[], b"")
    }

    pub fn post(&self, path: &str, body: &Value) -> Reply {
        http(&self.addr, "POST", path, &[], body.to_string().as_bytes())
    }

    /// One metric's value (its first sample) from `/metrics`.
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.get("/metrics").body;
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        self.wait_exit()
    }

    /// Waits (up to a minute) for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "the server did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response, body de-chunked.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// The `data:` payloads of an SSE body, `[DONE]` included.
    pub fn events(&self) -> Vec<String> {
        self.body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_owned).collect()
    }
}

/// A minimal HTTP/1.1 client: one request per connection (`Connection: close`).
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("write head");
    // The server may answer (413) before reading the whole body and close; keep reading anyway.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_reply(&raw)
}

pub fn parse_reply(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP head in {text:?}"));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status");
    let headers = head.to_ascii_lowercase();
    let body = if headers.contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_owned() };
    Reply { status, headers, body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The venv's python with `openai` installed (scripts/python-venv, idempotent).
pub fn python() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/python-venv");
    let out = Command::new(script).output().expect("run scripts/python-venv");
    assert!(out.status.success(), "scripts/python-venv failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).expect("UTF-8").trim())
}

/// `tulu generate`'s greedy output (stdout) for `prompt`, with the chat template if `chat`.
pub fn cli_generate(prompt: &str, chat: bool, max_tokens: usize) -> String {
    let model = super::smollm2_dir();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tulu"));
    cmd.arg("generate").arg("--model").arg(&model).args(["--prompt", prompt, "--temperature", "0"]);
    cmd.args(["--max-tokens", &max_tokens.to_string()]);
    if chat {
        cmd.arg("--chat");
    }
    let out = cmd.output().expect("run tulu generate");
    assert!(out.status.success(), "tulu generate failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8")
}
