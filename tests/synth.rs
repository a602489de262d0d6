//! Synthetic checkpoints: the files a Hugging Face loader expects, shapes from the config,
//! deterministic bytes, sharding, and weights that keep an independent Llama (candle-
//! transformers) numerically sane.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::llama;
use safetensors::{Dtype, SafeTensors};
use tokenizers::Tokenizer;
use tulu::unstable::config::{GenerationConfig, ModelConfig};
use tulu::unstable::synth::{synth_checkpoint, SynthOptions};
use tulu::unstable::weights::gguf::OutDType;

fn tiny() -> ModelConfig {
    ModelConfig::preset("tiny").expect("tiny preset")
}

/// Every tensor a Llama checkpoint of `cfg` holds, with its HF shape, written out from the
/// architecture independently of the generator.
fn expected_tensors(cfg: &ModelConfig) -> BTreeMap<String, Vec<usize>> {
    let (h, i, v, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim);
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    let mut m = BTreeMap::new();
    m.insert("model.embed_tokens.weight".to_owned(), vec![v, h]);
    m.insert("model.norm.weight".to_owned(), vec![h]);
    if !cfg.tie_word_embeddings {
        m.insert("lm_head.weight".to_owned(), vec![v, h]);
    }
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (name, shape) in [
            ("self_attn.q_proj", vec![q, h]),
            ("self_attn.k_proj", vec![kv, h]),
            ("self_attn.v_proj", vec![kv, h]),
            ("self_attn.o_proj", vec![h, q]),
            ("mlp.gate_proj", vec![i, h]),
            ("mlp.up_proj", vec![i, h]),
            ("mlp.down_proj", vec![h, i]),
            ("input_layernorm", vec![h]),
            ("post_attention_layernorm", vec![h]),
        ] {
            m.insert(format!("{p}.{name}.weight"), shape);
        }
    }
    m
}

fn synth(cfg: &ModelConfig, opts: &SynthOptions) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("model");
    synth_checkpoint(cfg, &out, opts).expect("synth succeeds");
    (tmp, out)
}

fn f32s(t: &safetensors::tensor::TensorView) -> Vec<f32> {
    t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn mean_std(xs: &[f32]) -> (f32, f32) {
    let n = xs.len() as f32;
    let mean = xs.iter().sum::<f32>() / n;
    (mean, (xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n).sqrt())
}

#[test]
fn tiny_round_trips() {
    let cfg = tiny();
    let (_tmp, dir) = synth(&cfg, &SynthOptions::default());
    assert_eq!(ModelConfig::from_file(&dir.join("config.json")).expect("config.json parses"), cfg);
    let gen = GenerationConfig::from_file(&dir.join("generation_config.json")).expect("generation config");
    assert_eq!(gen.eos_token_ids.first(), Some(&2));
    assert!(!dir.join("model.safetensors.index.json").exists());

    let bytes = std::fs::read(dir.join("model.safetensors")).expect("model.safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let expected = expected_tensors(&cfg);
    let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
    names.sort();
    assert_eq!(names, expected.keys().cloned().collect::<Vec<_>>());
    for (name, shape) in &expected {
        let t = st.tensor(name).expect("present");
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        assert_eq!(t.shape(), shape.as_slice(), "{name}");
    }

    // Scaled like a trained model: std ≈ 1/√fan_in, norm gains ≈ 1.
    let (mean, std) = mean_std(&f32s(&st.tensor("model.layers.0.mlp.down_proj.weight").expect("down")));
    let want = 1.0 / (cfg.intermediate_size as f32).sqrt();
    assert!(mean.abs() < 0.1 * want && (std / want - 1.0).abs() < 0.05, "mean {mean}, std {std}, want {want}");
    let (mean, std) = mean_std(&f32s(&st.tensor("model.norm.weight").expect("norm")));
    assert!((mean - 1.0).abs() < 0.01 && std > 0.0 && std < 0.05, "norm mean {mean}, std {std}");
}

#[test]
fn tiny_tokenizer_has_specials_at_config_ids() {
    let cfg = tiny();
    let (_tmp, dir) = synth(&cfg, &SynthOptions::default());
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer.json loads");
    assert_eq!(tok.token_to_id("<|begin_of_text|>"), Some(1));
    assert_eq!(tok.token_to_id("<|end_of_text|>"), Some(2));
    let size = tok.get_vocab_size(true);
    assert!(size < cfg.vocab_size && size + 8 >= cfg.vocab_size, "{size} tokens: a few padded rows");

    let im_start = tok.token_to_id("<|im_start|>").expect("chat marker");
    let ids = tok.encode("<|im_start|>", false).expect("encodes").get_ids().to_vec();
    assert_eq!(ids, vec![im_start]);
    let text = "Hello world, the capital of France is Paris! ☃";
    let enc = tok.encode(text, false).expect("encodes");
    assert!(enc.len() < text.len(), "merges make multi-byte tokens");
    assert!(enc.get_ids().iter().all(|&id| (id as usize) < cfg.vocab_size));
    assert_eq!(tok.decode(enc.get_ids(), false).expect("decodes"), text);
    // Like Llama 3's tokenizer, plain encoding with special tokens prepends BOS.
    assert_eq!(tok.encode("hi", true).expect("encodes").get_ids().first(), Some(&1));

    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).expect("read")).expect("json");
    assert_eq!(tc["bos_token"], "<|begin_of_text|>");
    assert_eq!(tc["eos_token"], "<|end_of_text|>");
    assert!(tc["chat_template"].as_str().is_some_and(|t| t.contains("<|im_start|>")));
}

#[test]
fn large_vocab_specials_land_on_their_ids() {
    // Llama 3.1's vocabulary layout on a tiny body: BOS 128000, EOS 128001, 128264 rows.
    let cfg = ModelConfig {
        hidden_size: 16,
        intermediate_size: 32,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 8,
        tie_word_embeddings: true,
        ..ModelConfig::preset("llama-3.1-8b").expect("preset")
    };
    let opts = SynthOptions { dtype: OutDType::Bf16, ..SynthOptions::default() };
    let (_tmp, dir) = synth(&cfg, &opts);
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer.json loads");
    assert_eq!(tok.token_to_id("<|begin_of_text|>"), Some(128_000));
    assert_eq!(tok.token_to_id("<|end_of_text|>"), Some(128_001));
    assert_eq!(tok.get_vocab_size(true), 128_256);
    assert_eq!(
        ModelConfig::from_file(&dir.join("config.json")).expect("config").torch_dtype.as_deref(),
        Some("bfloat16")
    );
}

#[test]
fn sharded_when_over_max_shard_bytes() {
    let cfg = tiny();
    let opts = SynthOptions { max_shard_bytes: 64 << 10, ..SynthOptions::default() };
    let (_tmp, dir) = synth(&cfg, &opts);
    assert!(!dir.join("model.safetensors").exists());
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).expect("index exists"))
            .expect("index is JSON");
    let map = index["weight_map"].as_object().expect("weight_map");
    let expected = expected_tensors(&cfg);
    assert_eq!(map.keys().cloned().collect::<Vec<_>>(), expected.keys().cloned().collect::<Vec<_>>());

    let mut shards: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for file in map.values().filter_map(|v| v.as_str()) {
        shards.entry(file.to_owned()).or_insert_with(|| std::fs::read(dir.join(file)).expect("shard exists"));
    }
    assert!(shards.len() > 1, "{} shards", shards.len());
    let mut total = 0;
    for (name, file) in map {
        let bytes = &shards[file.as_str().expect("file name")];
        let st = SafeTensors::deserialize(bytes).expect("valid shard");
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name} not in {file}: {e}"));
        assert_eq!(t.shape(), expected[name].as_slice());
        total += t.data().len() as u64;
    }
    for bytes in shards.values() {
        let header = SafeTensors::deserialize(bytes).expect("valid shard");
        assert!(header.len() == 1 || bytes.len() <= (64 << 10) + 4096, "only a lone tensor may overflow");
    }
    assert_eq!(index["metadata"]["total_size"], total);
}

fn dir_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .filter_map(|e| e.ok())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).expect("read")))
        .collect()
}

#[test]
fn same_seed_same_bytes() {
    let cfg = tiny();
    let opts = SynthOptions { seed: 7, dtype: OutDType::Bf16, ..SynthOptions::default() };
    let (_a, a) = synth(&cfg, &opts);
    let (_b, b) = synth(&cfg, &opts);
    assert_eq!(dir_bytes(&a), dir_bytes(&b));
    let (_c, c) = synth(&cfg, &SynthOptions { seed: 8, ..opts });
    assert_ne!(dir_bytes(&a)["model.safetensors"], dir_bytes(&c)["model.safetensors"]);
}

#[test]
fn given_tokenizer_and_template_are_used() {
    let cfg = tiny();
    let (_src, src) = synth(&cfg, &SynthOptions::default());
    let template = "{% for m in messages %}{{ m.content }}{% endfor %}".to_owned();
    let opts = SynthOptions {
        tokenizer: Some(src.join("tokenizer.json")),
        chat_template: Some(template.clone()),
        ..SynthOptions::default()
    };
    let (_tmp, dir) = synth(&cfg, &opts);
    assert_eq!(
        std::fs::read(dir.join("tokenizer.json")).expect("copied"),
        std::fs::read(src.join("tokenizer.json")).expect("source")
    );
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).expect("read")).expect("json");
    assert_eq!(tc["chat_template"], template.as_str());

    // A tokenizer with more tokens than the embedding has rows is refused, leaving nothing.
    let small = ModelConfig { vocab_size: 270, ..cfg };
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("model");
    let err = synth_checkpoint(&small, &out, &opts).expect_err("too many tokens");
    assert!(err.to_string().contains("vocab_size"), "{err}");
    assert!(!out.exists());
}

#[test]
fn refuses_non_empty_output() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("keep.txt"), "x").expect("write");
    let err = synth_checkpoint(&tiny(), tmp.path(), &SynthOptions::default()).expect_err("must refuse");
    assert!(err.to_string().contains("not empty"), "{err}");
    assert_eq!(std::fs::read_dir(tmp.path()).expect("read_dir").count(), 1);
}

#[test]
fn candle_llama_runs_the_checkpoint_with_sane_logits() {
    let cfg = tiny();
    let (_tmp, dir) = synth(&cfg, &SynthOptions { seed: 3, ..SynthOptions::default() });
    let lcfg: llama::LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config")).expect("parses");
    let lcfg = lcfg.into_config(false);
    // SAFETY: the file was just written by this test and is not modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu)
    }
    .expect("weights load");
    let model = llama::Llama::load(vb, &lcfg).expect("model builds");
    let ids: Vec<u32> = (1..40).collect();
    let mut cache = llama::Cache::new(false, DType::F32, &lcfg, &Device::Cpu).expect("cache");
    let input = Tensor::new(ids.as_slice(), &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("input");
    let logits = model.forward(&input, 0, &mut cache).and_then(|l| l.flatten_all()).and_then(|l| l.to_vec1::<f32>());
    let logits = logits.expect("forward");
    assert!(logits.iter().all(|x| x.is_finite()));
    let (_, std) = mean_std(&logits);
    assert!(std > 0.2 && std < 5.0, "logit std {std}");
}
