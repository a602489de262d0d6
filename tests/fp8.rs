//! FP8 weights on the CPU backend (the reference, which dequantizes at load): each published
//! checkpoint layout loads and gives its dequantized twin's logits bit for bit, at tp 1 and 2
//! (q/k/v and gate/up fused with their parts' different scales, rows sliced with their scales);
//! `--quantize fp8` gives an independent per-row quantization's logits; bad FP8 input is a
//! clear error naming the tensor or field. The FP8 KV cache's tests are in `fp8/kv_cache.rs`.

mod common;
#[path = "common/fp8.rs"]
mod fp8_layouts;
#[path = "fp8/kv_cache.rs"]
mod kv_cache;

use std::path::{Path, PathBuf};
use std::time::Duration;

use fp8_layouts::Layout;
use tulu::unstable::backend::cpu::CpuBackend;
use tulu::unstable::config::ModelConfig;
use tulu::unstable::model::Llama;
use tulu::unstable::parallel::local::LocalGroup;
use tulu::unstable::parallel::sharding::Shard;
use tulu::unstable::quant::Quantization;
use tulu::unstable::weights::gguf::OutDType;
use tulu::unstable::weights::WeightStore;
use tulu::Error;

const TOKENS: [u32; 6] = [5, 77, 299, 12, 9, 140];

/// The tiny preset with 4 layers (so that fbgemm's first and last layers kept in bf16 leave
/// two quantized MLPs) and a vocab that pads at tp 2, in bf16.
fn source() -> PathBuf {
    let cfg = ModelConfig { num_hidden_layers: 4, vocab_size: 301, ..ModelConfig::preset("tiny").unwrap() };
    common::synth_dir("tiny4-bf16", &cfg, OutDType::Bf16, None)
}

/// Logits of every position of [`TOKENS`] from `tp` ranks loading `dir` (with `quantize`).
fn logits(dir: &Path, tp: usize, quantize: bool) -> Vec<f32> {
    let mut cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    if quantize {
        cfg.quantization = Some(Quantization::at_load());
    }
    let store = WeightStore::open(dir).unwrap();
    let comms = LocalGroup::new(tp, Duration::from_secs(60)).communicators();
    common::ranks_logits(comms, &TOKENS, |rank| {
        let backend = CpuBackend::new();
        let model = Llama::load(&backend, &cfg, &store, 64, Shard { rank, world: tp }, |_| {}).unwrap();
        (backend, model)
    })
}

/// Per element: |a − b| ≤ rel·|b| + abs.
fn assert_close(ours: &[f32], reference: &[f32], rel: f32, abs: f32, what: &str) {
    assert_eq!(ours.len(), reference.len());
    for (i, (a, b)) in ours.iter().zip(reference).enumerate() {
        assert!((a - b).abs() <= rel * b.abs() + abs, "{what}: logit {i}: {a} vs {b}");
    }
}

fn pair(layout: Layout) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let (fp8, twin) = (tmp.path().join("fp8"), tmp.path().join("twin"));
    fp8_layouts::write_pair(&source(), layout, &fp8, &twin);
    (tmp, fp8, twin)
}

#[test]
fn each_published_layout_matches_its_dequantized_twin_at_tp_1_and_2() {
    let original = logits(&source(), 1, false);
    for layout in [Layout::CompressedStatic, Layout::CompressedDynamic, Layout::Fbgemm] {
        let (_tmp, fp8, twin) = pair(layout);
        let reference = logits(&twin, 1, false);
        assert!(reference.iter().all(|x| x.is_finite()));
        assert!(reference != original, "{layout:?}: the twin is quantized");
        for tp in [1, 2] {
            assert_eq!(logits(&fp8, tp, false), logits(&twin, tp, false), "{layout:?} at tp {tp}");
        }
    }
}

#[test]
fn quantizing_at_load_matches_an_independent_per_row_quantization() {
    let tmp = tempfile::tempdir().unwrap();
    let twin = tmp.path().join("twin");
    fp8_layouts::write_at_load_twin(&source(), &twin);
    let reference = logits(&twin, 1, false);
    assert_eq!(logits(&source(), 1, true), reference);
    // Each row's scale comes from its whole row, so a row-parallel rank's half of o_proj and
    // down_proj quantizes as the whole does: tp 2 is the same model (sums in another order).
    assert_close(&logits(&source(), 2, true), &reference, 1e-4, 1e-5, "tp 2");
}

/// Rewrites `dir/model.safetensors` through `edit` of its tensor list.
fn edit(dir: &Path, edit: impl FnOnce(&mut Vec<fp8_layouts::Tensor>)) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<fp8_layouts::Tensor> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| fp8_layouts::Tensor {
            name,
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            data: t.data().to_vec(),
        })
        .collect();
    edit(&mut tensors);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    fp8_layouts::write(dir, &config, &tensors);
}

fn load_error(dir: &Path) -> Error {
    let cfg = match ModelConfig::from_file(&dir.join("config.json")) {
        Ok(cfg) => cfg,
        Err(e) => return e,
    };
    let store = WeightStore::open(dir).unwrap();
    match Llama::load(&CpuBackend::new(), &cfg, &store, 64, Shard::single(), |_| {}) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e,
    }
}

fn weights_error(dir: &Path) -> (String, String) {
    match load_error(dir) {
        Error::Weights { tensor: Some(t), message, .. } => (t, message),
        other => panic!("{other:?}"),
    }
}

const GATE: &str = "model.layers.1.mlp.gate_proj";

#[test]
fn bad_fp8_input_names_the_tensor_or_field() {
    // An FP8 tensor without its scale.
    let (_t, fp8, _) = pair(Layout::Fbgemm);
    edit(&fp8, |ts| ts.retain(|t| t.name != format!("{GATE}.weight_scale")));
    let (tensor, message) = weights_error(&fp8);
    assert_eq!(tensor, format!("{GATE}.weight"));
    assert!(message.contains("weight_scale") && message.contains("missing"), "{message}");

    // A per-channel scale of the wrong shape (one value, not one per row).
    let (_t, fp8, _) = pair(Layout::CompressedDynamic);
    edit(&fp8, |ts| {
        let s = ts.iter_mut().find(|t| t.name == format!("{GATE}.weight_scale")).unwrap();
        s.shape = vec![1];
        s.data.truncate(2);
    });
    let (tensor, message) = weights_error(&fp8);
    assert_eq!(tensor, format!("{GATE}.weight_scale"));
    assert!(message.contains("[160, 1]"), "{message}");

    // A per-tensor scale that is a row of values.
    let (_t, fp8, _) = pair(Layout::CompressedStatic);
    edit(&fp8, |ts| {
        let s = ts.iter_mut().find(|t| t.name == format!("{GATE}.weight_scale")).unwrap();
        s.shape = vec![2];
        s.data.extend_from_within(..);
    });
    assert_eq!(weights_error(&fp8).0, format!("{GATE}.weight_scale"));

    // Static activation scales without their input_scale.
    let (_t, fp8, _) = pair(Layout::CompressedStatic);
    edit(&fp8, |ts| ts.retain(|t| t.name != format!("{GATE}.input_scale")));
    let (tensor, message) = weights_error(&fp8);
    assert_eq!(tensor, format!("{GATE}.weight"));
    assert!(message.contains("input_scale"), "{message}");

    // FP8 tensors in a checkpoint whose config says nothing of quantization.
    let (_t, fp8, _) = pair(Layout::Fbgemm);
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fp8.join("config.json")).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(fp8.join("config.json"), config.to_string()).unwrap();
    let (tensor, message) = weights_error(&fp8);
    assert_eq!(tensor, format!("{GATE}.weight"));
    assert!(message.contains("quantization_config"), "{message}");

    // An FP8 tensor in a module the config keeps unquantized.
    config["quantization_config"] = fp8_layouts::quantization_config(Layout::Fbgemm, 4);
    config["quantization_config"]["modules_to_not_convert"].as_array_mut().unwrap().push(GATE.into());
    std::fs::write(fp8.join("config.json"), config.to_string()).unwrap();
    let (tensor, message) = weights_error(&fp8);
    assert_eq!(tensor, format!("{GATE}.weight"));
    assert!(message.contains("kept unquantized"), "{message}");

    // An unknown method, and an unknown scheme.
    for (field, value) in [
        ("quant_method", serde_json::json!("gptq")),
        ("config_groups", serde_json::json!({"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group"}}})),
    ] {
        let (_t, fp8, _) = pair(Layout::CompressedDynamic);
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fp8.join("config.json")).unwrap()).unwrap();
        config["quantization_config"][field] = value;
        std::fs::write(fp8.join("config.json"), config.to_string()).unwrap();
        match load_error(&fp8) {
            Error::Config { field: f, .. } => assert!(f.starts_with(&format!("quantization_config.{field}")), "{f}"),
            other => panic!("{other:?}"),
        }
    }

    // An F8_E4M3 tensor where no scale can be (a norm) is refused, not read as raw e4m3.
    let (_t, fp8, _) = pair(Layout::Fbgemm);
    edit(&fp8, |ts| {
        let n = ts.iter_mut().find(|t| t.name == "model.norm.weight").unwrap();
        n.dtype = safetensors::Dtype::F8_E4M3;
        n.data.truncate(n.data.len() / 2);
    });
    let (tensor, message) = weights_error(&fp8);
    assert_eq!(tensor, "model.norm.weight");
    assert!(message.contains("no scale"), "{message}");
}

/// The CPU's FP8 matmul (weights quantized while loading, dequantized at load) against the f32
/// one on fresh random inputs: every output within e4m3's worst case, `2⁻⁴ · Σ|w·x|` (each
/// weight rounded to 3 mantissa bits: relative error ≤ 2⁻⁴; the row's largest maps to 448, so
/// none saturates), plus f32 summation noise — and not equal to it (it did quantize).
#[test]
fn fp8_matmul_stays_within_e4m3_rounding_of_f32() {
    use tulu::unstable::backend::cpu::CpuTensor;
    use tulu::unstable::backend::Backend;
    use tulu::unstable::weights::{DType, TensorRef};
    let (rows, cols, tokens) = (67, 300, 5);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
    };
    // Rows of very different magnitudes: per-row scales must follow each.
    let w: Vec<f32> = (0..rows * cols).map(|i| next() * 10f32.powi((i / cols % 5) as i32 - 2)).collect();
    let x: Vec<f32> = (0..tokens * cols).map(|_| next()).collect();
    let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let shape = [rows, cols];
    let t = TensorRef { name: "w", file: Path::new("mem"), dtype: DType::F32, shape: &shape, bytes: &bytes };
    let cpu = CpuBackend::new();
    let xt = CpuTensor::new(x.clone(), tokens, cols).unwrap();
    let exact = cpu.to_host(&cpu.matmul(&xt, &cpu.load_weight(&[t.full()]).unwrap()).unwrap()).unwrap();
    let fp8 = cpu.to_host(&cpu.matmul(&xt, &cpu.load_fp8_weight(&[t.full()], None).unwrap()).unwrap()).unwrap();
    assert_ne!(fp8, exact, "seed {seed}");
    for (i, (a, b)) in fp8.iter().zip(&exact).enumerate() {
        let (tok, r) = (i / rows, i % rows);
        let abs_dot: f32 = (0..cols).map(|c| (w[r * cols + c] * x[tok * cols + c]).abs()).sum();
        let bound = 2f32.powi(-4) * abs_dot + 1e-5 * abs_dot + 1e-30;
        assert!((a - b).abs() <= bound, "seed {seed}: output {i}: {a} vs {b}, bound {bound}");
    }
}

/// The library option end to end: SmolLM2 quantized while loading still answers the question
/// (greedy, through the engine).
#[test]
fn smollm2_quantized_at_load_knows_the_capital_of_france() {
    let mut opts = tulu::EngineOptions::new(common::smollm2_dir().to_string_lossy());
    opts.quantize = Some(tulu::unstable::quant::Quantize::Fp8);
    let engine = tulu::Engine::load(opts).unwrap();
    assert!(engine.config().quantization.is_some());
    let msg = tulu::ChatMessage::new("user", "What is the capital of France?");
    let req = tulu::GenerateRequest::chat(vec![msg]).max_tokens(32).sampling(tulu::SamplingParams::greedy());
    let (text, _) = common::run(&engine, req);
    assert!(text.contains("Paris"), "answer: {text:?}");
}
