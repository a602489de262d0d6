//! Weights on the CPU in their stored type. GGUF files loaded directly (`--model FILE.gguf`)
//! keep their GGML types, and the model they make agrees with the same file converted to f32 by
//! `tulu convert` (bit for bit where the stored type is dense; within 8-bit activation rounding
//! where it is blocks); malformed files are named errors. `--quantize q8_0` makes blocks of a
//! dense checkpoint while it loads.

mod common;
#[path = "common/gguf.rs"]
mod gguf;

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use gguf::{write_tiny_gguf, TinyGguf};
use tulu::unstable::backend::cpu::CpuBackend;
use tulu::unstable::config::ModelConfig;
use tulu::unstable::model::Llama;
use tulu::unstable::parallel::sharding::Shard;
use tulu::unstable::weights::gguf::{convert_gguf, ConvertOptions, OutDType};
use tulu::unstable::weights::gguf_store::model_dir;
use tulu::unstable::weights::WeightStore;
use tulu::{ChatMessage, Engine, EngineOptions, Error, GenerateRequest, SamplingParams};

/// A one-layer `llama` GGUF (byte-level vocabulary, hidden 64, GQA 4:2) whose matrices are
/// stored as `dtype` (norms in f32, as llama.cpp stores them).
fn write_gguf(path: &Path, dtype: GgmlDType) {
    let shape = TinyGguf { hidden: 64, heads: 4, kv_heads: 2, context: 256, dtype };
    write_tiny_gguf(path, &shape, |t, i| (((i + t) * 7919 % 1009) as f32 - 504.0) / 1500.0);
}

/// A tiny GGUF in `dtype`, and the same file converted to an f32 checkpoint.
fn tiny(dtype: GgmlDType) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("tiny.gguf");
    write_gguf(&gguf, dtype);
    let f32_dir = tmp.path().join("f32");
    convert_gguf(&gguf, &f32_dir, &ConvertOptions { dtype: OutDType::F32, progress: false }).unwrap();
    (tmp, gguf, f32_dir)
}

const TOKENS: [u32; 12] = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100];

/// Dense GGUF tensors (f32, f16) loaded in place give the converted checkpoint's logits bit for
/// bit: the q/k rows are un-permuted as they are read, and f16 widens exactly.
#[test]
fn dense_gguf_loads_as_its_conversion() {
    for dtype in [GgmlDType::F32, GgmlDType::F16] {
        let (tmp, gguf, f32_dir) = tiny(dtype);
        let direct = common::prefill_logits(&f32_dir, &gguf, &TOKENS);
        let converted = common::prefill_logits(&f32_dir, &f32_dir, &TOKENS);
        assert_eq!(direct, converted, "{dtype:?}");
        // `tulu convert --dtype keep`: a directory holding the GGUF and its metadata files.
        let kept = tmp.path().join("kept");
        tulu::unstable::weights::gguf_store::keep_gguf(&gguf, &kept).unwrap();
        assert!(kept.join("model.gguf").is_file() && !kept.join("model.safetensors").exists());
        assert_eq!(common::prefill_logits(&kept, &kept, &TOKENS), converted, "{dtype:?} kept");
    }
}

/// Block GGUF tensors loaded in place agree with their dequantized conversion within what
/// rounding activations to 8 bits costs (measured worst: 2.0e-2 of the largest logit, Q4_0).
#[test]
fn block_gguf_loads_close_to_its_conversion() {
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
        let (_tmp, gguf, f32_dir) = tiny(dtype);
        let direct = common::prefill_logits(&f32_dir, &gguf, &TOKENS);
        let converted = common::prefill_logits(&f32_dir, &f32_dir, &TOKENS);
        for (pos, (d, c)) in direct.iter().zip(&converted).enumerate() {
            let e = common::rel_err(d, c);
            assert!(e < 3e-2, "{dtype:?} position {pos}: rel err {e}");
        }
        assert_ne!(direct, converted, "{dtype:?}: activations are quantized, so the logits differ a little");
    }
}

/// `--model FILE.gguf` through the engine: SmolLM2's Q4_1 GGUF, read in place, completes the
/// sentence. (Asked in chat, its first token is a near-tie — "The" 25.33 vs "L" 25.24 from the
/// f32 conversion — that 8-bit activations flip to "L'Étoile…", as they may in llama.cpp.)
#[test]
fn smollm2_gguf_loaded_directly_knows_the_capital_of_france() {
    let gguf = common::smollm2_gguf();
    let engine = Engine::load(EngineOptions::new(gguf.to_string_lossy())).unwrap();
    let req = GenerateRequest::text("The capital of France is").max_tokens(6).sampling(SamplingParams::greedy());
    let (text, _) = common::run(&engine, req);
    assert!(text.trim_start().starts_with("Paris"), "answer: {text:?}");
}

/// SmolLM2's Q4_1 GGUF read in place against its f32 conversion: how far the logits move, and
/// how often the greedy token is the same (recorded, loosely bounded).
#[test]
fn smollm2_gguf_in_place_tracks_its_f32_conversion() {
    let gguf = common::smollm2_gguf();
    let dir = model_dir(&gguf).unwrap();
    let tokens: Vec<u32> = tulu::unstable::tokenizer::Tokenizer::from_dir(&dir)
        .unwrap()
        .encode_prompt("The capital of France is Paris, and the capital of Italy is Rome. One, two, three, four")
        .unwrap();
    let direct = common::prefill_logits(&dir, &gguf, &tokens);
    let converted = common::prefill_logits(&dir, &common::smollm2_dir(), &tokens);
    let argmax = |r: &[f32]| r.iter().enumerate().fold(0, |b, (i, &x)| if x > r[b] { i } else { b });
    let same = direct.iter().zip(&converted).filter(|(d, c)| argmax(d) == argmax(c)).count();
    let worst = direct.iter().zip(&converted).map(|(d, c)| common::rel_err(d, c)).fold(0f32, f32::max);
    eprintln!(
        "SmolLM2 Q4_1 in place vs f32: greedy token equal at {same}/{} positions, worst rel err {worst}",
        tokens.len()
    );
    assert!(same * 10 >= tokens.len() * 8, "greedy tokens equal at only {same}/{}", tokens.len());
    assert!(worst < 0.1, "worst rel err {worst}");
}

/// The offset of the type field of tensor `name`'s record in a GGUF's header.
fn type_field(bytes: &[u8], name: &str) -> usize {
    let at = bytes.windows(name.len()).position(|w| w == name.as_bytes()).unwrap() + name.len();
    let dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    at + 4 + 8 * dims
}

fn open_err(path: &Path) -> String {
    match WeightStore::open(path) {
        Err(e @ Error::Gguf { .. }) => e.to_string(),
        Err(e) => panic!("not a GGUF error: {e:?}"),
        Ok(_) => panic!("{} opened", path.display()),
    }
}

/// A truncated block, a type tulu does not read, and a tensor whose element count does not
/// fill its blocks are each an error naming the tensor.
#[test]
fn malformed_gguf_blocks_are_named_errors() {
    let (tmp, gguf, _) = tiny(GgmlDType::Q8_0);
    let bytes = std::fs::read(&gguf).unwrap();
    let bad = tmp.path().join("bad.gguf");

    std::fs::write(&bad, &bytes[..bytes.len() - 17]).unwrap();
    let e = open_err(&bad);
    assert!(e.contains("truncated") && e.contains("`output_norm.weight`"), "{e}");

    let mut q81 = bytes.clone();
    let at = type_field(&q81, "blk.0.ffn_up.weight");
    q81[at..at + 4].copy_from_slice(&9u32.to_le_bytes()); // Q8_1: same block size, not a weight type
    std::fs::write(&bad, &q81).unwrap();
    let e = open_err(&bad);
    assert!(e.contains("up_proj") && e.contains("Q8_1"), "{e}");

    let mut norm = bytes.clone();
    let at = type_field(&norm, "blk.0.attn_norm.weight");
    norm[at..at + 4].copy_from_slice(&12u32.to_le_bytes()); // Q4_K: 64 values do not fill a block of 256
    std::fs::write(&bad, &norm).unwrap();
    let e = open_err(&bad);
    assert!(e.contains("`blk.0.attn_norm.weight`") && e.contains("blocks"), "{e}");
}

/// `--quantize q8_0` on SmolLM2's f32 checkpoint: the engine still answers.
///
/// A completion prompt, not the chat question: with activations quantized to 8 bits (as
/// llama.cpp does for Q8_0 and Q4_1 weights) greedy SmolLM2-135M answers the chat question
/// "L'Étoile, la Cité, …" — and so does llama.cpp on the same Q8_0 and Q4_1 GGUF files — while
/// the f32 and bf16 weights answer "The capital of France is Paris."
#[test]
fn smollm2_quantized_to_q8_0_at_load_knows_the_capital_of_france() {
    let dir = common::smollm2_dir();
    let mut opts = EngineOptions::new(dir.to_string_lossy());
    opts.quantize = Some(tulu::unstable::quant::Quantize::Blocks(tulu::unstable::quant::BlockType::Q8_0));
    let engine = Engine::load(opts).unwrap();
    assert!(engine.config().quantization.is_some());
    let req = GenerateRequest::text("The capital of France is").max_tokens(6).sampling(SamplingParams::greedy());
    let (text, _) = common::run(&engine, req);
    assert!(text.trim_start().starts_with("Paris"), "answer: {text:?}");
}

/// A block type whose blocks do not tile a row is refused naming the tensor: SmolLM2's 576-wide
/// rows are not whole 256-value Q4_K blocks.
#[test]
fn quantizing_to_blocks_that_do_not_tile_a_row_is_a_named_error() {
    let dir = common::smollm2_dir();
    let mut cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    tulu::unstable::quant::Quantize::Blocks(tulu::unstable::quant::BlockType::Q4K).apply(&mut cfg);
    let store = WeightStore::open(&dir).unwrap();
    let e = Llama::load(&CpuBackend::new(), &cfg, &store, 64, Shard::single(), |_| {}).err().unwrap().to_string();
    assert!(e.contains("model.layers.0.self_attn.q_proj.weight") && e.contains("576"), "{e}");
}

/// Continuous batching changes nothing a request sees, on every stored weight type: four greedy
/// requests of different lengths, queued together, each produce what they produce alone.
#[test]
fn batching_is_invariant_on_every_weight_type() {
    let bf16_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("smollm2-bf16-weights");
    if !bf16_dir.exists() {
        let opts = ConvertOptions { dtype: OutDType::Bf16, progress: false };
        convert_gguf(&common::smollm2_gguf(), &bf16_dir, &opts).unwrap();
    }
    let q8_0 = Some(tulu::unstable::quant::Quantize::Blocks(tulu::unstable::quant::BlockType::Q8_0));
    let cases = [
        ("bf16", bf16_dir, None),
        ("Q4_1 GGUF in place", common::smollm2_gguf(), None),
        ("q8_0 at load", common::smollm2_dir(), q8_0),
    ];
    let reqs: Vec<GenerateRequest> = (0..4)
        .map(|i| {
            let msg = ChatMessage::user(format!("Name {} colours of the sea.", i + 2));
            GenerateRequest::chat(vec![msg]).max_tokens(3 + i).sampling(SamplingParams::greedy())
        })
        .collect();
    for (name, model, quantize) in cases {
        let mut opts = EngineOptions::new(model.to_string_lossy());
        opts.quantize = quantize;
        let engine = Engine::load(opts).unwrap();
        let alone: Vec<Vec<u32>> = reqs.iter().map(|r| common::run(&engine, r.clone()).1.tokens).collect();
        let together: Vec<Vec<u32>> = common::run_all(&engine, &reqs).into_iter().map(|(_, s)| s.tokens).collect();
        assert_eq!(alone, together, "{name}: batched tokens differ from alone");
    }
}
