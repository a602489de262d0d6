//! The `tulu` binary on bad input: every case is a clear error naming the culprit, a non-zero
//! exit and no panic. And on good input: stdout carries exactly the generated text.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

fn tulu(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tulu")).args(args).env("HF_HUB_OFFLINE", "1").output().expect("run tulu")
}

fn generate(dir: &Path, extra: &[&str]) -> Output {
    let d = dir.to_string_lossy();
    let mut args = vec!["generate", "--model", &d];
    args.extend_from_slice(extra);
    for (flag, default) in [("--device", "cpu"), ("--max-tokens", "2")] {
        if !extra.contains(&flag) {
            args.extend_from_slice(&[flag, default]);
        }
    }
    if !extra.iter().any(|a| a.starts_with("--prompt")) {
        args.extend_from_slice(&["--prompt", "hello"]);
    }
    tulu(&args)
}

/// A fresh copy of the tiny model to break.
fn copy_tiny() -> tempfile::TempDir {
    let src = common::tiny_dir();
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    tmp
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Rewrites `model.safetensors` with `f` applied to (name → (dtype, shape, bytes)).
fn edit_weights(dir: &Path, f: impl FnOnce(&mut HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut map: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec()))).collect();
    f(&mut map);
    let views: Vec<(String, TensorView)> =
        map.iter().map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

fn expect_error(out: &Output, case: &str, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{case}: exit status {:?}, stderr: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{case}: panicked: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{case}: stderr does not name `{n}`: {stderr}");
    }
    assert!(out.stdout.is_empty(), "{case}: wrote to stdout: {}", String::from_utf8_lossy(&out.stdout));
}

const NORM: &str = "model.layers.1.input_layernorm.weight";

#[test]
fn bad_model_directories_are_clear_errors() {
    type Breaker = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Breaker, Vec<&str>)> = vec![
        (
            "missing config field",
            Box::new(|d| {
                edit_json(&d.join("config.json"), |c| {
                    c.remove("hidden_size");
                })
            }),
            vec!["config.json", "hidden_size", "missing"],
        ),
        (
            "mistyped config field",
            Box::new(|d| {
                edit_json(&d.join("config.json"), |c| {
                    c.insert("num_attention_heads".into(), "eight".into());
                })
            }),
            vec!["num_attention_heads"],
        ),
        (
            "heads not dividing",
            Box::new(|d| {
                edit_json(&d.join("config.json"), |c| {
                    c.insert("num_key_value_heads".into(), 3.into());
                })
            }),
            vec!["num_key_value_heads"],
        ),
        (
            "other architecture",
            Box::new(|d| {
                edit_json(&d.join("config.json"), |c| {
                    c.insert("architectures".into(), serde_json::json!(["MistralForCausalLM"]));
                })
            }),
            vec!["architectures", "MistralForCausalLM"],
        ),
        (
            "more layers than weights",
            Box::new(|d| {
                edit_json(&d.join("config.json"), |c| {
                    c.insert("num_hidden_layers".into(), 5.into());
                })
            }),
            vec!["num_hidden_layers", "only 2 layers"],
        ),
        (
            "vocab rows fewer than tokenizer ids",
            Box::new(|d| {
                edit_json(&d.join("config.json"), |c| {
                    c.insert("vocab_size".into(), 100.into());
                })
            }),
            vec!["vocab_size"],
        ),
        (
            "bad rope scaling",
            Box::new(|d| {
                edit_json(&d.join("config.json"), |c| {
                    c["rope_scaling"]["rope_type"] = "yarn".into();
                })
            }),
            vec!["rope_scaling.rope_type", "yarn"],
        ),
        (
            "missing tensor",
            Box::new(|d| {
                edit_weights(d, |m| {
                    m.remove(NORM);
                })
            }),
            vec![NORM, "missing"],
        ),
        (
            "wrong shape",
            Box::new(|d| {
                edit_weights(d, |m| {
                    let t = m.get_mut(NORM).unwrap();
                    t.1 = vec![32];
                    t.2.truncate(128);
                })
            }),
            vec![NORM, "shape [32]"],
        ),
        (
            "wrong dtype",
            Box::new(|d| {
                edit_weights(d, |m| {
                    m.get_mut(NORM).unwrap().0 = Dtype::I32;
                })
            }),
            vec![NORM, "I32"],
        ),
        (
            "truncated safetensors",
            Box::new(|d| {
                let p = d.join("model.safetensors");
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() - 100]).unwrap();
            }),
            vec!["model.safetensors", "truncated"],
        ),
        (
            "header length past end of file",
            Box::new(|d| {
                let p = d.join("model.safetensors");
                let mut b = std::fs::read(&p).unwrap();
                b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
                std::fs::write(&p, &b).unwrap();
            }),
            vec!["model.safetensors", "header length"],
        ),
        (
            "overlapping offsets",
            Box::new(|d| overlap_offsets(&d.join("model.safetensors"))),
            vec!["model.safetensors", "offsets"],
        ),
        (
            "index naming a missing shard",
            Box::new(|d| write_index(d, "model-00002-of-00002.safetensors")),
            vec!["model.safetensors.index.json", "model-00002-of-00002.safetensors"],
        ),
        (
            "shard path leaving the directory",
            Box::new(|d| write_index(d, "../outside.safetensors")),
            vec!["model.safetensors.index.json", "leaves the model directory"],
        ),
        (
            "tokenizer missing",
            Box::new(|d| std::fs::remove_file(d.join("tokenizer.json")).unwrap()),
            vec!["tokenizer.json"],
        ),
        (
            "tokenizer corrupt",
            Box::new(|d| std::fs::write(d.join("tokenizer.json"), "{\"model\": 3").unwrap()),
            vec!["tokenizer.json"],
        ),
        ("config not JSON", Box::new(|d| std::fs::write(d.join("config.json"), "{").unwrap()), vec!["config.json"]),
    ];
    for (case, brk, needles) in cases {
        let tmp = copy_tiny();
        brk(tmp.path());
        expect_error(&generate(tmp.path(), &[]), case, &needles);
    }
}

/// Makes the second tensor's data range start inside the first one's.
fn overlap_offsets(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_str(std::str::from_utf8(&bytes[8..8 + n]).unwrap()).unwrap();
    let obj = header.as_object_mut().unwrap();
    let second = obj
        .iter()
        .filter_map(|(k, v)| v.get("data_offsets").map(|o| (k.clone(), o[0].as_u64().unwrap())))
        .filter(|(_, start)| *start > 0)
        .min_by_key(|(_, start)| *start)
        .unwrap()
        .0;
    let offs = obj[&second]["data_offsets"].clone();
    obj.get_mut(&second).unwrap()["data_offsets"] =
        serde_json::json!([offs[0].as_u64().unwrap() - 4, offs[1].as_u64().unwrap() - 4]);
    let mut text = serde_json::to_string(&header).unwrap();
    while text.len() < n {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

fn write_index(dir: &Path, second_shard: &str) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let names: Vec<String> = SafeTensors::deserialize(&bytes).unwrap().names().into_iter().map(str::to_owned).collect();
    std::fs::rename(dir.join("model.safetensors"), dir.join("model-00001-of-00002.safetensors")).unwrap();
    let mut map = serde_json::Map::new();
    for (i, n) in names.iter().enumerate() {
        let shard = if i == 0 { second_shard } else { "model-00001-of-00002.safetensors" };
        map.insert(n.clone(), shard.into());
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

#[test]
fn bad_requests_are_clear_errors() {
    let dir = common::tiny_dir();
    let tmp = tempfile::tempdir().unwrap();
    let latin1 = tmp.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9").unwrap();
    let long = "hello ".repeat(400);
    let latin1_s = latin1.to_string_lossy().into_owned();
    let cases: Vec<(&str, Vec<&str>, Vec<&str>)> = vec![
        ("empty prompt", vec!["--prompt", ""], vec!["prompt", "empty"]),
        ("prompt longer than the context", vec!["--prompt", &long, "--max-context", "64"], vec!["prompt", "context"]),
        ("max_tokens 0", vec!["--max-tokens", "0"], vec!["--max-tokens"]),
        ("negative temperature", vec!["--temperature=-0.5"], vec!["--temperature"]),
        // Negative values after a space reach tulu's own checks, not clap's "unexpected argument".
        ("temperature -1", vec!["--temperature", "-1"], vec!["--temperature", "got -1"]),
        ("max_tokens -5", vec!["--max-tokens", "-5"], vec!["--max-tokens", "got -5"]),
        ("top_k -3", vec!["--top-k", "-3"], vec!["--top-k", "got -3"]),
        ("top_p -0.5", vec!["--top-p", "-0.5"], vec!["--top-p", "got -0.5"]),
        ("min_p -1", vec!["--min-p", "-1"], vec!["--min-p"]),
        ("repetition_penalty -2", vec!["--repetition-penalty", "-2"], vec!["--repetition-penalty"]),
        ("NaN temperature", vec!["--temperature", "NaN"], vec!["--temperature"]),
        ("top_p 0", vec!["--top-p", "0"], vec!["--top-p"]),
        ("top_p above 1", vec!["--top-p", "1.5"], vec!["--top-p"]),
        ("non-UTF-8 prompt file", vec!["--prompt-file", &latin1_s], vec!["prompt-file", "UTF-8"]),
        ("missing prompt file", vec!["--prompt-file", "/nonexistent/prompt.txt"], vec!["/nonexistent/prompt.txt"]),
        ("unknown device", vec!["--device", "tpu"], vec!["tpu"]),
        (
            "no draft tokens",
            vec!["--speculative", "ngram", "--num-speculative-tokens", "0"],
            vec!["--num-speculative-tokens", "got 0"],
        ),
        (
            "too many draft tokens",
            vec!["--speculative", "ngram", "--num-speculative-tokens", "99"],
            vec!["--num-speculative-tokens", "got 99"],
        ),
        (
            "draft tokens without speculation",
            vec!["--num-speculative-tokens", "3"],
            vec!["--num-speculative-tokens", "--speculative"],
        ),
        (
            "n-gram range upside down",
            vec!["--speculative", "ngram", "--ngram-min", "3", "--ngram-max", "2"],
            vec!["--ngram-max"],
        ),
    ];
    for (case, extra, needles) in cases {
        // Later flags win in clap for repeated single-value options.
        expect_error(&generate(&dir, &extra), case, &needles);
    }
}

#[test]
fn bad_chat_template_and_unknown_hub_id_are_clear_errors() {
    let tmp = copy_tiny();
    edit_json(&tmp.path().join("tokenizer_config.json"), |c| {
        c.insert("chat_template".into(), "{% for m in messages %}{{ m.content }".into());
    });
    expect_error(&generate(tmp.path(), &["--chat"]), "chat template that does not parse", &["chat template"]);
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tulu"))
        .args(["generate", "--model", "nobody/no-such-model", "--prompt", "hi"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", home.path())
        .output()
        .unwrap();
    expect_error(&out, "unknown hub id offline", &["nobody/no-such-model", "HF_HUB_OFFLINE"]);
}

#[test]
fn generate_writes_exactly_the_text_to_stdout() {
    let dir: PathBuf = common::smollm2_dir();
    let d = dir.to_string_lossy();
    let out = tulu(&[
        "generate",
        "--model",
        &d,
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "24",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let engine = tulu::Engine::load(tulu::EngineOptions::new(d.as_ref())).unwrap();
    let msg = tulu::ChatMessage::new("user", "What is the capital of France?");
    let expected: String = engine
        .generate(tulu::GenerateRequest::chat(vec![msg]).max_tokens(24))
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.unwrap() {
            tulu::Event::Text(t) => Some(t),
            _ => None,
        })
        .collect();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in ["prompt tokens:", "prefill:", "decode:"] {
        assert!(stderr.contains(key), "stderr lacks `{key}`: {stderr}");
    }
    let out = tulu(&["inspect", "--model", &d]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("parameters: 134515008"), "{text}");
}

#[test]
fn inspect_sizes_tulu3_405b_from_its_config_alone() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tulu3/config-405b.json");
    let out = tulu(&["inspect", "--model", cfg, "--tp", "16", "--gpu-mem", "80GiB"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for needle in
        ["parameters: 405853650944", "kv cache per token: 516096 bytes", "kv cache per token per rank: 64512 bytes"]
    {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
    let out = tulu(&["inspect", "--model", cfg, "--tp", "8", "--gpu-mem", "80GiB"]);
    expect_failure(&out, "405B at tp 8 on 80 GiB", &["--tp 16", "with --quantize fp8, --tp 8"]);
    // In FP8 it fits one node of eight 80 GiB GPUs, with its KV budget.
    let out = tulu(&["inspect", "--model", cfg, "--tp", "8", "--gpu-mem", "80GiB", "--quantize", "fp8"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The budget is the runtime's rule: 72 GiB less the weights, the step workspace of the
    // default step limits (0.81 GiB) and 0.5 GiB of headroom.
    let needles = [
        "weights per rank: 47.77 GiB",
        "step workspace per rank: 0.81 GiB",
        "kv budget per rank: 22.93 GiB → 381582 tokens",
        "fp8 e4m3",
    ];
    for needle in needles {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
    // An e4m3 KV cache (one byte an element) holds twice the tokens in the same budget.
    let fp8_kv = ["inspect", "--model", cfg, "--tp", "8", "--gpu-mem", "80GiB", "--quantize", "fp8"];
    let out = tulu(&[&fp8_kv[..], &["--kv-cache-dtype", "fp8"]].concat());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for needle in ["kv cache per token per rank: 32256 bytes", "kv budget per rank: 22.93 GiB → 763164 tokens"] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
    let out = tulu(&[&fp8_kv[..], &["--kv-cache-dtype", "int4"]].concat());
    // clap's usage error (exit 2) carries tulu's message naming the flag and the choices.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--kv-cache-dtype") && stderr.contains("fp8_e4m3"), "{stderr}");
    let out = tulu(&["inspect", "--model", cfg, "--tp", "3", "--gpu-mem", "80GiB"]);
    expect_failure(&out, "tp 3", &["tp", "valid: 1, 2, 4, 8"]);
}

/// A clear error after possibly some stdout (inspect prints the plan before refusing it).
fn expect_failure(out: &Output, case: &str, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{case}: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{case}: stderr does not name `{n}`: {stderr}");
    }
}

/// JSON lines of a successful bench run.
fn bench_lines(args: &[&str]) -> Vec<Value> {
    let out = tulu(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {stderr}");
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn cases<'a>(lines: &'a [Value], case: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["case"] == case).collect()
}

#[test]
fn bench_random_weights_reports_every_case_against_measured_ceilings() {
    let lines = bench_lines(&[
        "bench",
        "--preset",
        "tiny",
        "--random-weights",
        "--batch",
        "1,3",
        "--prompt-len",
        "5,20",
        "--gen-len",
        "4",
    ]);
    let ceilings = cases(&lines, "ceilings");
    assert_eq!(ceilings.len(), 1);
    assert!(ceilings[0]["read_gb_s"].as_f64().unwrap() > 0.0 && ceilings[0]["gemm_tflops"].as_f64().unwrap() > 0.0);
    let decode = cases(&lines, "decode");
    assert_eq!(decode.len(), 4, "two prompt lengths × two batch sizes");
    for d in decode {
        for field in ["decode_tok_s", "ms_per_step", "achieved_gb_s", "fraction_of_read_bw", "prefill_tok_s"] {
            assert!(d[field].as_f64().is_some_and(|x| x > 0.0), "{field} in {d}");
        }
        assert!(d["fraction_of_read_bw"].as_f64().unwrap() < 1.5, "{d}");
    }

    // FP8 weights: the line says so, and counts the step's bytes as this device stores them.
    let lines = bench_lines(&[
        "bench",
        "--preset",
        "tiny",
        "--random-weights",
        "--quantize",
        "fp8",
        "--prompt-len",
        "5",
        "--gen-len",
        "2",
    ]);
    let decode = cases(&lines, "decode");
    assert!(decode[0]["weights"].as_str().is_some_and(|w| w.contains("fp8")), "{}", decode[0]);
    assert_eq!(decode[0]["weights_stored_fp8"], true, "the CPU keeps FP8 weights as e4m3 bytes");
    assert!(decode[0]["step_mb"].as_f64().is_some_and(|x| x > 0.0));

    // One rank's shard of a tp 2 model, timed per layer and projected to the full depth.
    let lines = bench_lines(&[
        "bench",
        "--preset",
        "tiny",
        "--random-weights",
        "--tp",
        "2",
        "--rank-shard",
        "--layers",
        "3",
        "--gen-len",
        "3",
        "--prompt-len",
        "6",
    ]);
    let layer = cases(&lines, "rank_shard_layer");
    assert_eq!(layer.len(), 1);
    assert!(layer[0]["floor_ms"].as_f64().is_some() && layer[0]["ratio_to_floor"].as_f64().is_some(), "{}", layer[0]);
    let projections = cases(&lines, "projection");
    // tp 2 (measured) and 8 (tiny's 8 heads cannot split 16 ways), three all-reduce assumptions each.
    assert_eq!(projections.len(), 6, "{projections:?}");
    assert!(projections.iter().all(|p| p["layers"] == 2 && p["ms_per_token"].as_f64().unwrap() > 0.0));
}

#[test]
fn bench_random_weights_flags_are_checked() {
    expect_error(&tulu(&["bench", "--random-weights"]), "no shape", &["--preset"]);
    expect_error(&tulu(&["bench", "--preset", "tiny", "--random-weights", "--tp", "2"]), "tp", &["--rank-shard"]);
    expect_error(
        &tulu(&["bench", "--preset", "tiny", "--random-weights", "--tp", "2", "--rank-shard", "--layers", "1"]),
        "layers",
        &["--layers 2"],
    );
    expect_error(
        &tulu(&["bench", "--preset", "tiny", "--random-weights", "--tp", "3", "--rank-shard"]),
        "tp 3",
        &["tp"],
    );
    expect_error(&tulu(&["bench", "--preset", "nope", "--random-weights"]), "preset", &["nope"]);
}

/// `tulu bench … | head -1`: the reader going away ends the run quietly, never a panic.
#[test]
fn bench_output_piped_into_a_closed_reader_ends_quietly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tulu"))
        .args([
            "bench",
            "--preset",
            "tiny",
            "--random-weights",
            "--batch",
            "1,2,3,4",
            "--prompt-len",
            "4,8",
            "--gen-len",
            "200",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.contains("ceilings"), "{first}");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `tulu bench --model`'s synthetic prompt stays inside any vocabulary, however small: a
/// 50-token word-level tokenizer (the old prompt, `100 + i·7919 mod (vocab - 200)`, underflowed).
#[test]
fn bench_prompts_fit_a_small_vocabulary() {
    let tmp = copy_tiny();
    let mut vocab = serde_json::Map::new();
    for i in 0..50u32 {
        vocab.insert(format!("w{i}"), i.into());
    }
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    std::fs::write(tmp.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::remove_file(tmp.path().join("tokenizer_config.json")).unwrap();
    let d = tmp.path().to_string_lossy();
    let out = tulu(&["bench", "--model", &d, "--prompt-len", "40", "--gen-len", "2", "--repeat", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[1]["case"], "generate");
    assert!(lines[1]["decode_tok_s"].as_f64().is_some_and(|x| x > 0.0), "{}", lines[1]);
}
