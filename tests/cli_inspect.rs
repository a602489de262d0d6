//! `tulu inspect --device cpu` sizes the host memory the CPU backend holds: every weight of a
//! tiny bf16 checkpoint loaded through the backend takes exactly the bytes inspect printed, as
//! stored and with --quantize fp8 / q8_0, and the KV cache line divides the given memory by the
//! per-token bytes.

mod common;

use std::process::Command;

use tulu::unstable::backend::cpu::CpuBackend;
use tulu::unstable::backend::Backend;
use tulu::unstable::config::ModelConfig;
use tulu::unstable::quant::BlockType;
use tulu::unstable::weights::gguf::OutDType;
use tulu::unstable::weights::WeightStore;

fn inspect(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tulu")).arg("inspect").args(args).output().expect("run tulu");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tulu inspect {args:?} failed: {stderr}");
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The number in parentheses on the line starting with `prefix`: `... (N bytes)`.
fn bytes_on(stdout: &str, prefix: &str) -> u64 {
    let line = stdout.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no `{prefix}` in {stdout}"));
    let inner = line.rsplit('(').next().and_then(|s| s.strip_suffix(" bytes)")).expect("(N bytes)");
    inner.parse().expect("a byte count")
}

/// What the loaded weights take: each tensor through the backend the way the loader takes it
/// (the linear weights quantized when `quantize` says so), summed.
fn loaded_bytes(dir: &std::path::Path, quantize: Option<&str>) -> u64 {
    let store = WeightStore::open(dir).unwrap();
    let cpu = CpuBackend::new();
    let mut total = 0;
    for name in store.names() {
        let t = store.get_any(name).unwrap();
        let linear = name.contains(".self_attn.") || name.contains(".mlp.");
        let w = match quantize {
            Some("fp8") if linear => cpu.load_fp8_weight(&[t.full()], None),
            Some("q8_0") if linear => cpu.load_block_weight(&[t.full()], BlockType::Q8_0),
            _ => cpu.load_weight(&[t.full()]),
        };
        total += w.unwrap().bytes() as u64;
    }
    total
}

#[test]
fn inspect_sizes_host_memory_as_the_cpu_backend_holds_it() {
    let cfg = ModelConfig::preset("tiny").unwrap();
    let dir = common::synth_dir("tiny-bf16", &cfg, OutDType::Bf16, None);
    let d = dir.to_string_lossy();
    let mut seen = Vec::new();
    for quantize in [None, Some("fp8"), Some("q8_0")] {
        let mut args = vec!["--model", &d, "--device", "cpu", "--kv-cache-memory", "1MiB"];
        if let Some(q) = quantize {
            args.extend_from_slice(&["--quantize", q]);
        }
        let out = inspect(&args);
        let total = bytes_on(&out, "cpu weights total:");
        assert_eq!(total, loaded_bytes(&dir, quantize), "--quantize {quantize:?}:\n{out}");
        let per_token = bytes_on(&out, "cpu kv cache per token:");
        let want = (cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4) as u64;
        assert_eq!(per_token, want, "{out}");
        assert!(out.contains(&format!("cpu kv cache of 1MiB: {} tokens", (1 << 20) / want)), "{out}");
        seen.push(total);
    }
    // bf16 > q8_0 (8.5 bits) > fp8 (8 bits and a scale a row) for the linear weights.
    assert!(seen[0] > seen[2] && seen[2] > seen[1], "{seen:?}");
}

#[test]
fn inspect_device_flags_are_checked() {
    let dir = common::tiny_dir();
    let d = dir.to_string_lossy();
    for (args, needle) in [
        (vec!["--model", &d, "--device", "gpu"], "device"),
        (vec!["--model", &d, "--kv-cache-memory", "1GiB"], "kv-cache-memory"),
        (vec!["--model", &d, "--device", "cpu", "--kv-cache-memory", "lots"], "kv-cache-memory"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_tulu")).arg("inspect").args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
