//! tulu's logits against candle-transformers' `models::llama` (the independent oracle) on the
//! same safetensors directories: a synthetic model with llama3 RoPE scaling and GQA, a
//! Tülu-3-shaped bf16 model with the real Llama 3 tokenizer and a padded vocab, and converted
//! SmolLM2. Relative error < 1e-4 in f32 over the tokenizer's rows; greedy continuations equal.

mod common;
#[path = "common/peer.rs"]
mod peer;

use std::path::Path;

use tulu::unstable::config::ModelConfig;
use tulu::unstable::tokenizer::Tokenizer;
use tulu::unstable::weights::gguf::OutDType;
use tulu::{Engine, EngineOptions, Event, GenerateRequest, SamplingParams};

use self::peer::PeerLlama;

fn compare_logits(dir: &Path, tokens: &[u32]) {
    let rows = Tokenizer::from_dir(dir).unwrap().vocab_size();
    let ours = common::prefill_logits(dir, dir, tokens);
    let theirs = PeerLlama::load(dir).unwrap().logits_per_position(tokens).unwrap();
    assert_eq!(ours.len(), theirs.len());
    for (pos, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        let e = common::rel_err(&a[..rows], &b[..rows]);
        assert!(e < 1e-4, "{}: position {pos}: rel err {e}", dir.display());
    }
}

fn compare_greedy(dir: &Path, prompt: &[u32], n: usize) {
    let engine = Engine::load(EngineOptions::new(dir.to_string_lossy())).unwrap();
    let mut req = GenerateRequest::tokens(prompt.to_vec()).sampling(SamplingParams::greedy()).max_tokens(n);
    req.ignore_eos = true;
    let ours = engine
        .generate(req)
        .unwrap()
        .into_iter()
        .find_map(|ev| match ev.unwrap() {
            Event::Done(s) => Some(s.tokens),
            _ => None,
        })
        .unwrap();
    let rows = engine.tokenizer().vocab_size();
    let theirs = PeerLlama::load(dir).unwrap().greedy(prompt, n, rows).unwrap();
    assert_eq!(ours, theirs, "{}: greedy continuations differ", dir.display());
}

#[test]
fn synthetic_llama3_scaling_gqa_matches_candle_transformers() {
    let dir = common::tiny_dir();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    assert!(cfg.rope_scaling.is_some() && cfg.num_key_value_heads < cfg.num_attention_heads);
    // 70 positions: past the scaling's original context (32) and across several KV blocks.
    let tokens: Vec<u32> = (0..70).map(|i| (i * 31 + 3) % 250).collect();
    compare_logits(&dir, &tokens);
    compare_greedy(&dir, &tokens[..9], 64);
}

#[test]
fn tulu3_shaped_bf16_with_llama3_tokenizer_matches_candle_transformers() {
    let mut cfg = ModelConfig::preset("llama-3.1-8b").unwrap();
    cfg.hidden_size = 64;
    cfg.intermediate_size = 128;
    cfg.num_hidden_layers = 2;
    cfg.num_attention_heads = 8;
    cfg.num_key_value_heads = 2;
    cfg.head_dim = 8;
    let dir = common::synth_dir("tulu3-tiny-bf16", &cfg, OutDType::Bf16, Some(common::llama3_tokenizer()));
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert!(tok.vocab_size() < cfg.vocab_size, "vocab rows are padded past the tokenizer");
    let tokens = tok.encode_prompt("The Tülu 3 models were post-trained with RLVR.").unwrap();
    assert_eq!(tokens[0], 128_000);
    compare_logits(&dir, &tokens);
    compare_greedy(&dir, &tokens, 16);
}

#[test]
fn smollm2_matches_candle_transformers() {
    let dir = common::smollm2_dir();
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let tokens = tok.encode_prompt("The capital of France is Paris, and the capital of Italy is").unwrap();
    compare_logits(&dir, &tokens);
    compare_greedy(&dir, &tokens, 64);
}
