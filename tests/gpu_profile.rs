//! Efficiency budgets of the CUDA kernels, counted by the emulator's profiler
//! (`TULU_EMU_PROFILE`, docs/cuda-emu.md) on the prefill and decode paths of a small
//! Llama-3.1-shaped model (head_dim 128, GQA 4, as the 8B): every kernel's global loads at
//! ≥ 90 % sector efficiency (the weights' and the KV cache's loads dominate each kernel's bytes),
//! attention's key tile read without bank conflicts (≤ 1.1 wavefronts per request: its `hd + 2`
//! row padding), and a decode step moving ≤ 1.05× the DRAM bytes it must read.
//!
//! Counts, not time: they hold on any machine. Under the emulator only (`scripts/test` runs it):
//! `scripts/cuda-emu cargo test --features cuda,nccl --test gpu_profile -- --include-ignored`.
//! The test runs itself again as a child with `TULU_EMU_PROFILE` set (the profiler needs the
//! instrumented images, which the test has `scripts/cuda-emu build` bring up to date first).
#![cfg(feature = "cuda")]

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use tulu::unstable::backend::cuda::CudaBackend;
use tulu::unstable::backend::Backend;
use tulu::unstable::config::ModelConfig;
use tulu::unstable::model::Llama;
use tulu::unstable::parallel::sharding::{Shard, ShardPlan};
use tulu::unstable::parallel::sizing::{rank_weight_bytes, ElementBytes};
use tulu::unstable::parallel::SingleRank;
use tulu::unstable::runtime::batch::Batch;

/// Prompt tokens of the prefill; the decode step then reads PROMPT + 1 positions of KV.
const PROMPT: usize = 40;
const BLOCK: usize = 16;

/// The 8B's layer structure, scaled down: 4 query heads and 1 KV head of 128 dims.
fn shape() -> ModelConfig {
    let mut cfg = ModelConfig::preset("llama-3.1-8b").unwrap();
    cfg.hidden_size = 512;
    cfg.intermediate_size = 1792;
    cfg.num_hidden_layers = 2;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = 1;
    cfg.head_dim = 128;
    cfg.vocab_size = 4096;
    cfg
}

/// The bytes of every weight of an unsharded dense model of `cfg` at `eb` bytes an element:
/// what a decode step must read once.
fn weight_bytes(cfg: &ModelConfig, eb: u64) -> u64 {
    let plan = ShardPlan::new(cfg, Shard::single()).unwrap();
    rank_weight_bytes(cfg, &plan, &ElementBytes { dense: eb, fp8: None }, false)
}

/// Appends a step marker to the profile (the driver appends launch lines as launches end).
fn mark(file: &Path, step: &str, must_read: u64) {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(file).unwrap();
    writeln!(f, "step\t{step}\t{must_read}").unwrap();
}

/// In the child: a prefill of PROMPT tokens, then one decode step, each followed by its marker.
fn child(file: &Path) {
    let b = CudaBackend::new(0).unwrap();
    let cfg = shape();
    let model = Llama::random(&b, &cfg, 7, 128, Shard::single(), |_| {}).unwrap();
    let blocks: Vec<u32> = (0..(PROMPT + 1).div_ceil(BLOCK) as u32).collect();
    let mut cache = b.new_kv_cache(&model.kv_cache_spec(blocks.len(), BLOCK)).unwrap();
    let prompt: Vec<u32> = (0..PROMPT as u32).map(|i| (i * 7919 + 13) % cfg.vocab_size as u32).collect();
    let eb = b.element_bytes() as u64;
    let weights = weight_bytes(&cfg, eb);
    mark(file, "start", 0);
    let mut batch = Batch::new(BLOCK);
    batch.push(&prompt, 0, &blocks).unwrap();
    model.forward(&b, &batch, &mut cache, &[PROMPT - 1], &SingleRank).unwrap();
    mark(file, "prefill", 0);
    let mut batch = Batch::new(BLOCK);
    batch.push(&[5], PROMPT, &blocks).unwrap();
    model.forward(&b, &batch, &mut cache, &[0], &SingleRank).unwrap();
    // What a decode step must move: every weight once, the KV of the context (the new token's
    // written, the rest read), the embedding row and the logits (f32).
    let kv = model.kv_elements_per_token() * eb * (PROMPT as u64 + 1);
    let must = weights + kv + cfg.hidden_size as u64 * eb + cfg.vocab_size as u64 * 4;
    mark(file, "decode", must);
}

/// A profile line's columns by the header's names.
type Row = HashMap<String, String>;

fn num(r: &Row, col: &str) -> u64 {
    r.get(col).unwrap_or_else(|| panic!("no column {col} in {r:?}")).parse().unwrap()
}

/// The launch lines of each step (between its marker and the previous one), and the
/// instruction lines of the exit summary.
/// Each step's bytes it must move and launch lines, by the step's name.
type Steps = HashMap<String, (u64, Vec<Row>)>;

fn parse(text: &str) -> (Steps, Vec<Row>) {
    let header = |tag: &str| -> Vec<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("# {tag}\t")))
            .unwrap_or_else(|| panic!("no {tag} header in the profile"))
            .split('\t')
            .map(str::to_owned)
            .collect()
    };
    let (launch_cols, instr_cols) = (header("launch"), header("instr"));
    let row = |cols: &[String], rest: &str| -> Row {
        cols.iter().cloned().zip(rest.split('\t').map(str::to_owned)).collect()
    };
    let mut steps = HashMap::new();
    let mut current = Vec::new();
    let mut instrs = Vec::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("launch\t") {
            current.push(row(&launch_cols, rest));
        } else if let Some(rest) = l.strip_prefix("step\t") {
            let (name, must) = rest.split_once('\t').unwrap();
            steps.insert(name.to_owned(), (must.parse().unwrap(), std::mem::take(&mut current)));
        } else if let Some(rest) = l.strip_prefix("instr\t") {
            instrs.push(row(&instr_cols, rest));
        }
    }
    (steps, instrs)
}

/// "attention.cu:LINE"s of the score loop's read of the key tile (`kv[d2]`): its line and the
/// loop's, to which the debug information of the instrumented image attributes the load.
fn key_tile_read_lines() -> Vec<String> {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/attention.cu")).unwrap();
    let line =
        src.lines().position(|l| l.contains("__bfloat1622float2(kv[d2])")).expect("the key tile read in attention.cu");
    assert!(src.lines().nth(line - 1).unwrap().contains("for (int d2"), "the key tile read's loop moved");
    vec![format!("attention.cu:{line}"), format!("attention.cu:{}", line + 1)]
}

/// Runs `test` again as a child under the profiler (with `env`) and returns the profile's text.
fn profile(test: &str, env: &[(&str, &str)]) -> String {
    // The instrumented images of this checkout's kernels (scripts/cuda-emu builds them only when
    // its own environment asks for a profile; make rebuilds what changed).
    let built = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cuda-emu"))
        .arg("build")
        .env("TULU_EMU_PROFILE", "build")
        .output()
        .unwrap();
    assert!(built.status.success(), "building the instrumented images: {}", String::from_utf8_lossy(&built.stderr));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("profile.tsv");
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--include-ignored", "--nocapture"])
        .envs(env.iter().copied())
        .env("TULU_PROFILE_CHILD", &file)
        .env("TULU_EMU_PROFILE", &file)
        .env("TULU_EMU_PROFILE_LAUNCHES", "1")
        // Decode matmuls on the GEMV (no per-shape timing of both kernels in the profile).
        .env("TULU_GEMV", "on")
        .env_remove("TULU_EMU_SANITIZE")
        .output()
        .unwrap();
    assert!(out.status.success(), "the profiled child failed:\n{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read_to_string(&file).unwrap()
}

/// Sector efficiency of global loads per kernel over a step's launches: (ideal, sectors).
/// cuBLASLt's lines (host code in the emulator: bytes and a prediction, no requests) are left out.
fn load_efficiency(launches: &[Row]) -> HashMap<String, (u64, u64)> {
    let mut per = HashMap::new();
    for l in launches.iter().filter(|l| l["kernel"] != "cublasLtMatmul") {
        let e: &mut (u64, u64) = per.entry(l["kernel"].clone()).or_default();
        e.0 += num(l, "ld_ideal");
        e.1 += num(l, "ld_sectors");
    }
    per
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn kernels_meet_their_memory_budgets() {
    if let Some(file) = std::env::var_os("TULU_PROFILE_CHILD") {
        child(Path::new(&file));
        return;
    }
    let text = profile("kernels_meet_their_memory_budgets", &[]);
    let (steps, instrs) = parse(&text);
    let mut failures = Vec::new();
    for step in ["prefill", "decode"] {
        let (_, launches) = &steps[step];
        assert!(!launches.is_empty(), "no launches in the {step} step:\n{text}");
        for (kernel, (ideal, sectors)) in load_efficiency(launches) {
            let eff = ideal as f64 / sectors.max(1) as f64;
            eprintln!("{step}: {kernel}: global load sector efficiency {eff:.3} ({ideal} ideal / {sectors} sectors)");
            if eff < 0.9 {
                failures.push(format!("{step}: `{kernel}` loads at {eff:.3} sector efficiency (< 0.9)"));
            }
        }
    }
    // Attention's key tile rows are padded (`hd + 2`) so that the lanes of a warp, each scoring
    // its own key, read different banks at each dim: the read in the score loop is one
    // wavefront per request (the decode kernel's; the prefill kernel runs the same code).
    let key_read = key_tile_read_lines();
    let mut seen = false;
    for i in instrs
        .iter()
        .filter(|i| i["kernel"] == "attention_decode_bf16" && i["kind"] == "shared" && key_read.contains(&i["source"]))
    {
        let (req, wave) = (num(i, "requests"), num(i, "units"));
        let per = wave as f64 / req.max(1) as f64;
        eprintln!("attention_decode_bf16 {}: {req} shared requests, {per:.2} wavefronts per request", i["source"]);
        seen = true;
        if per > 1.1 {
            failures
                .push(format!("attention_decode_bf16 reads its key tile at {per:.2} wavefronts per request (> 1.1)"));
        }
    }
    assert!(seen, "no shared-memory read at {key_read:?} in the profile:\n{text}");
    let (must, decode) = &steps["decode"];
    let dram: u64 = decode.iter().map(|l| num(l, "dram_read_bytes") + num(l, "dram_write_bytes")).sum();
    let ratio = dram as f64 / *must as f64;
    eprintln!("decode step: {dram} DRAM bytes, {must} it must move: {ratio:.3}x");
    if ratio > 1.05 {
        failures.push(format!("a decode step moves {dram} DRAM bytes, {ratio:.3}x the {must} it must (> 1.05x)"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The Llama-3.1-8B shape with `layers` layers.
fn llama_8b(layers: usize) -> ModelConfig {
    let mut cfg = ModelConfig::preset("llama-3.1-8b").unwrap();
    cfg.num_hidden_layers = layers;
    cfg
}

/// Context of each sequence in the 8B decode steps (its KV is read; its values do not matter
/// to the counts, so no prefill writes it).
const CONTEXT_8B: usize = 128;

/// In the child: one decode step of batch 1 and of batch 8 of the 8B shape at 1 and 2 layers.
fn child_8b(file: &Path) {
    let b = CudaBackend::new(0).unwrap();
    let eb = b.element_bytes() as u64;
    for layers in [1, 2] {
        let cfg = llama_8b(layers);
        let model = Llama::random(&b, &cfg, 7, CONTEXT_8B + 1, Shard::single(), |_| {}).unwrap();
        let per_seq = (CONTEXT_8B + 1).div_ceil(BLOCK);
        let mut cache = b.new_kv_cache(&model.kv_cache_spec(8 * per_seq, BLOCK)).unwrap();
        let weights = weight_bytes(&cfg, eb);
        mark(file, "start", 0);
        for batch_size in [1usize, 8] {
            let mut batch = Batch::new(BLOCK);
            for s in 0..batch_size {
                let table: Vec<u32> = ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect();
                batch.push(&[5 + s as u32], CONTEXT_8B, &table).unwrap();
            }
            let rows: Vec<usize> = (0..batch_size).collect();
            model.forward(&b, &batch, &mut cache, &rows, &SingleRank).unwrap();
            let kv = model.kv_elements_per_token() * eb * (CONTEXT_8B as u64 + 1) * batch_size as u64;
            let must = weights + kv + (cfg.hidden_size as u64 * eb + cfg.vocab_size as u64 * 4) * batch_size as u64;
            mark(file, &format!("l{layers}_b{batch_size}"), must);
        }
    }
}

/// Predicted H100 microseconds of a step's launches: (eager, graph-replayed), the DRAM part
/// the same. The profile's prediction is eager (4.7 us a launch); a graph node is taken at
/// 1.5 us (emu/driver/profile.cpp says why).
fn predicted_us(launches: &[Row]) -> (f64, f64) {
    let eager: f64 = launches.iter().map(|l| l["predicted_h100_us"].parse::<f64>().unwrap()).sum();
    (eager, eager - launches.len() as f64 * (4.7 - 1.5))
}

/// The predicted decode speed of Llama-3.1-8B (32 layers) on an H100 at batch 1 and 8, from
/// the counts of 1- and 2-layer models of its shape (a layer is their difference), and the
/// 8B shape's DRAM budget. Not in CI (minutes, 3 GB of emulated device memory): run it with
/// `scripts/cuda-emu cargo test --features cuda,nccl --test gpu_profile -- --include-ignored
/// --nocapture llama_8b` (docs/performance.md has its figures).
#[test]
#[ignore = "runs under scripts/cuda-emu; minutes"]
fn llama_8b_decode_prediction() {
    if let Some(file) = std::env::var_os("TULU_PROFILE_CHILD") {
        child_8b(Path::new(&file));
        return;
    }
    let text = profile("llama_8b_decode_prediction", &[("TULU_EMU_PROFILE_SKIP", "random_")]);
    let (steps, _) = parse(&text);
    for batch in [1, 8] {
        let (must1, one) = &steps[&format!("l1_b{batch}")];
        let (must2, two) = &steps[&format!("l2_b{batch}")];
        let dram =
            |ls: &[Row]| -> u64 { ls.iter().map(|l| num(l, "dram_read_bytes") + num(l, "dram_write_bytes")).sum() };
        for (layers, must, ls) in [(1, must1, one), (2, must2, two)] {
            let ratio = dram(ls) as f64 / *must as f64;
            eprintln!(
                "8B shape, {layers} layer(s), batch {batch}: {} launches, {} DRAM bytes, {ratio:.3}x what it must move",
                ls.len(),
                dram(ls)
            );
            assert!(ratio <= 1.05, "the 8B shape's decode step moves {ratio:.3}x the bytes it must (> 1.05x)");
        }
        let (e1, g1) = predicted_us(one);
        let (e2, g2) = predicted_us(two);
        let full = |a: f64, b: f64| a + (b - a) * 31.0;
        let (eager, graph) = (full(e1, e2), full(g1, g2));
        let tok = |us: f64| batch as f64 / (us * 1e-6);
        eprintln!(
            "PREDICTION (not a measurement) Llama-3.1-8B bf16 on an H100, batch {batch}, context {CONTEXT_8B}: \
             {eager:.0} us a step eager = {:.1} tok/s ({:.2}x gpt-fast's 159.7), {graph:.0} us under graphs = {:.1} tok/s ({:.2}x)",
            tok(eager),
            tok(eager) / 159.7,
            tok(graph),
            tok(graph) / 159.7
        );
        print_kernel_table(two);
    }
}

/// Per kernel, a step's launches, sectors per global load request, wavefronts per shared
/// request, DRAM MB and predicted us: the table of docs/performance.md.
fn print_kernel_table(launches: &[Row]) {
    #[derive(Default)]
    struct Sums {
        launches: u64,
        sectors: u64,
        requests: u64,
        wavefronts: u64,
        shared_requests: u64,
        dram: u64,
        us: f64,
    }
    let mut per: std::collections::BTreeMap<String, Sums> = Default::default();
    for l in launches {
        let e = per.entry(l["kernel"].clone()).or_default();
        e.launches += 1;
        e.sectors += num(l, "ld_sectors");
        e.requests += num(l, "ld_requests");
        e.wavefronts += num(l, "sh_wavefronts");
        e.shared_requests += num(l, "sh_requests");
        e.dram += num(l, "dram_read_bytes") + num(l, "dram_write_bytes");
        e.us += l["predicted_h100_us"].parse::<f64>().unwrap();
    }
    eprintln!("| kernel | launches | sectors/request | wavefronts/request | DRAM MB | predicted us (eager) |");
    for (k, e) in per {
        eprintln!(
            "| {k} | {} | {:.2} | {:.2} | {:.2} | {:.1} |",
            e.launches,
            e.sectors as f64 / e.requests.max(1) as f64,
            e.wavefronts as f64 / e.shared_requests.max(1) as f64,
            e.dram as f64 / 1e6,
            e.us
        );
    }
}
