//! The `tulu` command on a CUDA device, end to end: `generate`, `serve`, and ranks in two
//! processes joined by NCCL. Greedy answers must equal the CPU backend's (and two processes
//! must compute what two rank threads do).
//!
//! Ignored without a CUDA device; `scripts/test` runs them under the CPU emulation of CUDA:
//! `scripts/cuda-emu cargo test --features cuda,nccl --test gpu_cli -- --include-ignored`.
#![cfg(feature = "cuda")]

mod common;

use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use common::serve::Server;
use serde_json::json;

fn tulu(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tulu"));
    c.args(args).env_remove("WORLD_SIZE").env_remove("RANK").env_remove("LOCAL_RANK");
    c
}

fn run(mut c: Command) -> Output {
    let out = c.stdout(Stdio::piped()).stderr(Stdio::piped()).output().unwrap();
    assert!(out.status.success(), "{c:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// `tulu generate` greedy on `device`: what it writes to stdout.
fn generate(model: &str, device: &str, prompt: &str, extra: &[&str]) -> String {
    let args = ["generate", "--model", model, "--device", device, "--prompt", prompt, "--max-tokens", "24"];
    let mut c = tulu(&args);
    c.args(extra);
    let out = run(c);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // On cuda, decode steps replay the graph captured at load: a capture that failed says so.
    assert!(!stderr.contains("run eagerly"), "{stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// Greedy SmolLM2 through `tulu generate --device cuda` and through `tulu serve --device cuda`:
/// the same text `tulu generate` writes on the CPU.
#[test]
#[ignore = "needs a CUDA device"]
fn generate_and_serve_on_cuda_answer_what_the_cpu_does() {
    let model = common::smollm2_dir().to_string_lossy().into_owned();
    let prompts = ["The capital of France is", "def fibonacci(n):"];
    let cpu: Vec<String> = prompts.iter().map(|p| generate(&model, "cpu", p, &[])).collect();
    for (prompt, want) in prompts.iter().zip(&cpu) {
        assert!(!want.trim().is_empty());
        assert_eq!(&generate(&model, "cuda", prompt, &[]), want, "tulu generate of {prompt:?} on cuda:0");
    }
    let args = ["--device", "cuda", "--kv-cache-memory", "50000000", "--max-num-seqs", "2"];
    let server = Server::start_model(&model, "smol", &args);
    for (prompt, want) in prompts.iter().zip(&cpu) {
        let body = json!({"model": "smol", "prompt": prompt, "max_tokens": 24, "temperature": 0});
        let reply = server.post("/v1/completions", &body);
        assert_eq!(reply.status, 200, "{}", reply.body);
        let reply = reply.json();
        assert_eq!(
            reply["choices"][0]["text"].as_str().unwrap_or_default(),
            want,
            "tulu serve of {prompt:?} on cuda:0"
        );
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
#[ignore = "needs two CUDA devices"]
fn two_rank_processes_on_cuda_write_what_tp2_writes() {
    let gpus = cudarc::driver::CudaContext::device_count().unwrap_or(0);
    assert!(gpus >= 2, "two rank processes need two GPUs (NCCL refuses two ranks on one); found {gpus}");
    let mut cfg = tulu::unstable::config::ModelConfig::preset("tiny").unwrap();
    cfg.vocab_size = 301;
    let dir = common::synth_dir("tiny-vocab301-bf16", &cfg, tulu::unstable::weights::gguf::OutDType::Bf16, None);
    let model = dir.to_string_lossy().into_owned();
    let prompt = "hello world";
    let port = free_port().to_string();
    // One machine, two GPUs, one process each, as `torchrun --nproc-per-node 2` starts them.
    let rank = |r: usize| {
        let r = r.to_string();
        let mut c =
            tulu(&["generate", "--model", &model, "--device", "cuda", "--prompt", prompt, "--max-tokens", "16"]);
        c.args(["--dist-timeout", "120"]);
        c.envs([("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2"), ("RANK", &r), ("LOCAL_RANK", &r)]);
        c.envs([("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port)]);
        c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let started = Instant::now();
    let (rank1, rank0) = (rank(1), rank(0));
    let (out0, out1) = (rank0.wait_with_output().unwrap(), rank1.wait_with_output().unwrap());
    assert!(out0.status.success(), "rank 0: {}", String::from_utf8_lossy(&out0.stderr));
    assert!(out1.status.success(), "rank 1: {}", String::from_utf8_lossy(&out1.stderr));
    assert!(out1.stdout.is_empty(), "only rank 0 writes the text");
    eprintln!(
        "two processes: {:.1} s; rank 0: {}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out0.stderr)
    );
    let mut c = tulu(&["generate", "--model", &model, "--device", "cuda", "--prompt", prompt, "--max-tokens", "16"]);
    c.args(["--tp", "2"]);
    let threads = run(c);
    assert!(!out0.stdout.is_empty());
    assert_eq!(out0.stdout, threads.stdout, "two rank processes must compute what two rank threads do");
}
