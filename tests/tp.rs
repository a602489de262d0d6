//! Tensor parallelism on the CPU backend: tp = 2, 3, 4 give the logits and greedy tokens of
//! tp = 1 — including more ranks than KV heads (replicated KV) and a padded vocab that does not
//! divide by the number of ranks.

mod common;

use std::path::Path;
use std::time::Duration;

use tulu::unstable::backend::cpu::CpuBackend;
use tulu::unstable::config::ModelConfig;
use tulu::unstable::model::Llama;
use tulu::unstable::parallel::local::LocalGroup;
use tulu::unstable::parallel::sharding::Shard;
use tulu::unstable::weights::gguf::OutDType;
use tulu::unstable::weights::WeightStore;
use tulu::{Engine, EngineOptions, Event, GenerateRequest, SamplingParams};

/// Logits of every position of `tokens` computed by `tp` in-process ranks (rank 0's copy).
fn tp_logits(dir: &Path, tp: usize, tokens: &[u32]) -> Vec<f32> {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open(dir).unwrap();
    ranks_logits(tp, tokens, |backend, shard| Llama::load(backend, &cfg, &store, 128, shard, |_| {}).unwrap())
}

/// The same for a model `load` builds on each rank.
fn ranks_logits(tp: usize, tokens: &[u32], load: impl Fn(&CpuBackend, Shard) -> Llama<CpuBackend> + Sync) -> Vec<f32> {
    let comms = LocalGroup::new(tp, Duration::from_secs(60)).communicators();
    common::ranks_logits(comms, tokens, |rank| {
        let backend = CpuBackend::new();
        let model = load(&backend, Shard { rank, world: tp });
        (backend, model)
    })
}

/// Random-weight models (benchmarks) shard like checkpoints: each rank generates exactly its
/// slices of the unsharded model, so tp 2 and 4 give tp 1's logits.
#[test]
fn random_weight_shards_are_slices_of_one_model() {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.vocab_size = 301; // padded shards at tp 2 and 4
    let tokens = [5, 77, 300, 12, 9];
    let logits = |tp| ranks_logits(tp, &tokens, |b, shard| Llama::random(b, &cfg, 7, 128, shard, |_| {}).unwrap());
    let reference = logits(1);
    assert_eq!(reference.len(), tokens.len() * 301);
    assert!(reference.iter().all(|x| x.is_finite()));
    for tp in [2, 4] {
        let err = common::rel_err(&logits(tp), &reference);
        assert!(err <= 1e-5, "tp={tp}: relative error {err}");
    }
    let other = ranks_logits(1, &tokens, |b, shard| Llama::random(b, &cfg, 8, 128, shard, |_| {}).unwrap());
    assert!(common::rel_err(&other, &reference) > 0.1, "another seed is another model");
}

fn greedy(dir: &Path, tp: usize, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut opts = EngineOptions::new(dir.to_string_lossy());
    opts.tp = tp;
    let engine = Engine::load(opts).unwrap();
    let mut req = GenerateRequest::tokens(prompt.to_vec()).sampling(SamplingParams::greedy()).max_tokens(n);
    req.ignore_eos = true;
    engine
        .generate(req)
        .unwrap()
        .into_iter()
        .find_map(|e| match e.unwrap() {
            Event::Done(s) => Some(s.tokens),
            _ => None,
        })
        .unwrap()
}

fn check(dir: &Path, tps: &[usize], tokens: &[u32], n: usize) {
    let vocab = ModelConfig::from_file(&dir.join("config.json")).unwrap().vocab_size;
    let reference = tp_logits(dir, 1, tokens);
    let reference_tokens = greedy(dir, 1, tokens, n);
    for &tp in tps {
        let logits = tp_logits(dir, tp, tokens);
        assert_eq!(logits.len(), reference.len(), "tp={tp}: padding columns must be dropped");
        for (pos, (a, b)) in logits.chunks(vocab).zip(reference.chunks(vocab)).enumerate() {
            let e = common::rel_err(a, b);
            assert!(e <= 1e-5, "{}: tp={tp} position {pos}: rel err {e}", dir.display());
        }
        assert_eq!(greedy(dir, tp, tokens, n), reference_tokens, "{}: tp={tp} greedy tokens", dir.display());
    }
}

#[test]
fn more_ranks_than_kv_heads_and_a_vocab_that_does_not_divide() {
    let mut cfg = ModelConfig::preset("tiny").unwrap(); // 8 heads, 2 KV heads
    cfg.vocab_size = 301; // 2 and 4 ranks: shards of 151 and 76 rows, the last padded
    let dir = common::synth_dir("tiny-vocab301-f32", &cfg, OutDType::F32, None);
    let tokens: Vec<u32> = (0..37).map(|i| (i * 17 + 5) % 290).collect();
    check(&dir, &[2, 4], &tokens, 24);
}

#[test]
fn smollm2_at_tp3() {
    // 9 heads and 3 KV heads: one KV head per rank.
    let dir = common::smollm2_dir();
    let tok = tulu::unstable::tokenizer::Tokenizer::from_dir(&dir).unwrap();
    let tokens = tok.encode_prompt("The capital of France is Paris, and the capital of Germany is").unwrap();
    check(&dir, &[3], &tokens, 16);
}

#[test]
fn impossible_tp_is_a_clear_error() {
    let mut opts = EngineOptions::new(common::tiny_dir().to_string_lossy());
    opts.tp = 3;
    let err = Engine::load(opts).err().expect("tp=3 cannot split 8 heads");
    let text = err.to_string();
    assert!(text.contains("tp") && text.contains("valid: 1, 2, 4, 8"), "{text}");
}

/// A rank that fails to load fails the whole engine with its error, promptly: no rank is left
/// waiting for the cache size, and the engine does not hang joining them.
#[test]
fn a_failed_rank_load_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(common::tiny_dir()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, tmp.path().join(path.file_name().unwrap())).unwrap();
    }
    // The checkpoint holds 2 layers; the config promises 3.
    let config = tmp.path().join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["num_hidden_layers"] = 3.into();
    std::fs::write(&config, json.to_string()).unwrap();
    let mut opts = EngineOptions::new(tmp.path().to_string_lossy());
    opts.tp = 2;
    let started = std::time::Instant::now();
    let err = Engine::load(opts).err().expect("a 3-layer config over a 2-layer checkpoint must fail");
    assert!(err.to_string().contains("num_hidden_layers"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// `kv_cache_memory` is bytes per rank: at tp 2 each rank holds one of the tiny model's two KV
/// heads, so the same bytes hold twice the blocks of tp 1 (the block count is the arithmetic on
/// the rank's own KV bytes, f32 on the CPU).
#[test]
fn kv_cache_memory_is_bytes_per_rank() {
    let dir = common::tiny_dir();
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let bytes = 1_000_000;
    for tp in [1, 2] {
        let mut opts = EngineOptions::new(dir.to_string_lossy());
        opts.tp = tp;
        opts.kv_cache_memory = Some(bytes as u64);
        let engine = Engine::load(opts).unwrap();
        let per_token = cfg.num_hidden_layers * 2 * (cfg.num_key_value_heads / tp) * cfg.head_dim * 4;
        assert_eq!(engine.metrics().kv_blocks_total, bytes / (per_token * 16), "tp {tp}");
    }
}
