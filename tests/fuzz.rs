//! Fuzzed parsers: every parser that reads bytes a user, a file or the network controls gets
//! seeded mutations of a checked-in corpus (`tests/fuzz_corpus/<target>/`) and must answer each
//! with a value or an error, never a panic or a hang. A plain `cargo test` runs each target
//! briefly; `TULU_FUZZ_SECS=300 cargo test --test fuzz` runs them for minutes (docs/fuzzing.md
//! records such runs). `cargo test --test fuzz -- --ignored write_corpus` rewrites the seeds.

#[path = "common/gguf.rs"]
mod gguf;
#[path = "fuzz/harness.rs"]
mod harness;
#[path = "fuzz/mutate.rs"]
mod mutate;

use std::path::{Path, PathBuf};

use tulu::unstable::backend::cpu::CpuBackend;
use tulu::unstable::backend::Backend;
use tulu::unstable::config::{GenerationConfig, ModelConfig};
use tulu::unstable::parallel::frame::{self, FrameType};
use tulu::unstable::parallel::handshake::Handshake;
use tulu::unstable::parallel::kv_policy::KvPolicy;
use tulu::unstable::parallel::rendezvous::WorldSpec;
use tulu::unstable::parallel::sharding::{valid_tp, Shard, ShardPlan};
use tulu::unstable::parallel::sizing::{rank_parameters, size_rank};
use tulu::unstable::ranks::{Hello, RankPlan};
use tulu::unstable::runtime::batch::Batch;
use tulu::unstable::runtime::batch_wire;
use tulu::unstable::server::openai::{self, Endpoint};
use tulu::unstable::server::{messages_request, responses_request};
use tulu::unstable::weights::gguf::{convert_gguf, ConvertOptions, OutDType};
use tulu::unstable::weights::WeightStore;

/// A scratch directory that lives for one target's run.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// A checkpoint's header and data must open or fail cleanly; when it opens, every tensor's bytes
/// are read back (its offsets are then known to lie in the file).
#[test]
fn fuzz_safetensors_header() {
    let dir = scratch();
    let file = dir.path().join("model.safetensors");
    harness::run("safetensors_header", mutate::bytes, |bytes| {
        std::fs::write(&file, bytes).unwrap();
        if let Ok(store) = WeightStore::open(dir.path()) {
            for name in store.names() {
                let t = store.get_any(name).unwrap();
                let mut out = Vec::new();
                t.extend_f32(0..t.len(), &mut out);
                assert_eq!(out.len(), t.len());
            }
        }
    });
}

/// A shard index naming two small shards (and whatever else it names) opens or fails cleanly,
/// and never reads outside the directory.
#[test]
fn fuzz_safetensors_index() {
    let dir = scratch();
    write_shards(dir.path());
    let index = dir.path().join("model.safetensors.index.json");
    harness::run("safetensors_index", mutate::json, |bytes| {
        std::fs::write(&index, bytes).unwrap();
        let _ = WeightStore::open(dir.path());
    });
}

/// config.json parses or fails naming a field; a config that parses survives every figure
/// `tulu inspect` derives from it (parameters, KV bytes, shard plans and memory plans).
#[test]
fn fuzz_config_json() {
    harness::run("config_json", mutate::json, |bytes| {
        let Ok(cfg) = ModelConfig::from_json(&String::from_utf8_lossy(bytes), Path::new("config.json")) else {
            return;
        };
        let _ = (cfg.parameter_count(), cfg.kv_bytes_per_token(2), cfg.q_dim(), cfg.kv_dim());
        for tp in valid_tp(&cfg, 16) {
            let _ = ShardPlan::new(&cfg, Shard { rank: tp - 1, world: tp });
            let _ = rank_parameters(&cfg, tp);
            let _ = size_rank(&cfg, tp, 80 << 30, 0.9, 2, 8192);
        }
    });
}

/// generation_config.json parses or fails naming a field.
#[test]
fn fuzz_generation_config() {
    let dir = scratch();
    let file = dir.path().join("generation_config.json");
    harness::run("generation_config", mutate::json, |bytes| {
        std::fs::write(&file, bytes).unwrap();
        let _ = GenerationConfig::from_file(&file);
    });
}

/// A GGUF file converts or fails cleanly, leaving no output behind on failure.
#[test]
fn fuzz_gguf() {
    let dir = scratch();
    let gguf = dir.path().join("model.gguf");
    let out = dir.path().join("out");
    let opts = ConvertOptions { dtype: OutDType::F32, progress: false };
    harness::run("gguf", mutate::bytes, |bytes| {
        std::fs::write(&gguf, bytes).unwrap();
        if convert_gguf(&gguf, &out, &opts).is_ok() {
            std::fs::remove_dir_all(&out).unwrap();
        } else {
            assert!(!out.exists(), "a failed conversion left {}", out.display());
        }
    });
}

/// A GGUF read in place (`--model FILE.gguf`) opens or fails cleanly; when it opens, every
/// tensor loads onto the CPU backend in its stored type (blocks included) and reads back as f32.
#[test]
fn fuzz_gguf_in_place() {
    let dir = scratch();
    let gguf = dir.path().join("model.gguf");
    let cpu = CpuBackend::new();
    harness::run("gguf_in_place", mutate::bytes, |bytes| {
        std::fs::write(&gguf, bytes).unwrap();
        if let Ok(store) = WeightStore::open(&gguf) {
            for name in store.names() {
                let t = store.get_any(name).unwrap();
                let _ = cpu.load_weight(&[t.full()]);
                let mut out = Vec::new();
                t.extend_f32(0..t.len(), &mut out);
                assert_eq!(out.len(), t.len());
            }
        }
    });
}

/// What a stranger (or a confused peer) can put on the control plane: frames of every type read
/// from the bytes, then decoded as a handshake (checked by rank 0), a hello, a step (checked by
/// the backend contract) and a collective's buffer.
#[test]
fn fuzz_control_frames() {
    let tiny = ModelConfig::preset("tiny").unwrap();
    let world = WorldSpec::from_nodes(2, 0, 1, 0, "127.0.0.1", 1).unwrap();
    let ours = Handshake::new(&tiny, &world, Some("token")).unwrap();
    harness::run("control_frames", mutate::bytes, |bytes| {
        let read = |ty: FrameType| frame::read_frame(&mut &bytes[..], ty, ty.max_len());
        if let Ok(Ok(peer)) = read(FrameType::Handshake).map(|b| Handshake::decode(&b)) {
            let _ = ours.admit(&peer);
        }
        if let Ok(b) = read(FrameType::Hello) {
            let _ = Hello::decode(&b);
        }
        if let Ok(b) = read(FrameType::Step) {
            if let Ok((batch, _rows)) = batch_wire::decode(&b) {
                let _ = tulu::unstable::backend::contract::batch(&batch);
            }
        }
        let _ = frame::read_data(&mut &bytes[..], 64);
    });
}

/// Request bodies of both endpoints parse or fail with a 4xx naming a parameter.
#[test]
fn fuzz_openai_bodies() {
    harness::run("openai_bodies", mutate::json, |bytes| {
        for endpoint in [Endpoint::Completions, Endpoint::Chat] {
            match openai::parse(endpoint, bytes) {
                Ok(r) => {
                    let _ =
                        r.sampling.params(tulu::SamplingParams::default(), r.n.saturating_sub(1)).map(|p| p.validate());
                }
                Err(e) => assert!(e.status.is_client_error() && e.param.is_some(), "{e:?}"),
            }
        }
    });
}

/// `/v1/responses` bodies parse or fail with a 4xx naming a parameter.
#[test]
fn fuzz_responses_bodies() {
    harness::run("responses_bodies", mutate::json, |bytes| match responses_request::parse(bytes) {
        Ok(r) => {
            let _ = r.chat.sampling.params(tulu::SamplingParams::default(), 0).map(|p| p.validate());
        }
        Err(e) => assert!(e.status.is_client_error() && e.param.is_some(), "{e:?}"),
    });
}

/// `/v1/messages` (Anthropic) bodies parse or fail with a 4xx naming a parameter.
#[test]
fn fuzz_messages_bodies() {
    harness::run("messages_bodies", mutate::json, |bytes| match messages_request::parse(bytes) {
        Ok(r) => {
            let _ = r.sampling.params(tulu::SamplingParams::default(), 0).map(|p| p.validate());
        }
        Err(e) => assert!(e.status.is_client_error() && e.param.is_some(), "{e:?}"),
    });
}

/// Two small shard files and the tensors they hold (for the index target).
fn write_shards(dir: &Path) {
    use safetensors::tensor::TensorView;
    let data = vec![0u8; 64];
    for (shard, names) in [(1, ["a.weight", "b.weight"]), (2, ["c.weight", "d.weight"])] {
        let views: Vec<(&str, TensorView)> =
            names.iter().map(|n| (*n, TensorView::new(safetensors::Dtype::F32, vec![4, 4], &data).unwrap())).collect();
        let path = dir.join(format!("model-0000{shard}-of-00002.safetensors"));
        safetensors::serialize_to_file(views, None, &path).unwrap();
    }
}

fn corpus_dir(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Rewrites the seed corpus (deterministic; run once when a format changes).
#[test]
#[ignore = "writes tests/fuzz_corpus"]
fn write_corpus() {
    use safetensors::tensor::TensorView;
    let tiny = ModelConfig::preset("tiny").unwrap();
    let (f32s, bf16s) = ([0x3f800000u32.to_le_bytes(); 6].concat(), [[0x80u8, 0x3f]; 4].concat());
    let views = [
        ("model.norm.weight", TensorView::new(safetensors::Dtype::F32, vec![6], &f32s).unwrap()),
        ("lm_head.weight", TensorView::new(safetensors::Dtype::BF16, vec![2, 2], &bf16s).unwrap()),
    ];
    safetensors::serialize_to_file(views, None, &corpus_dir("safetensors_header").join("two-tensors.safetensors"))
        .unwrap();
    let index = serde_json::json!({"metadata": {"total_size": 256}, "weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00001-of-00002.safetensors",
        "c.weight": "model-00002-of-00002.safetensors", "d.weight": "model-00002-of-00002.safetensors"}});
    std::fs::write(corpus_dir("safetensors_index").join("two-shards.json"), index.to_string()).unwrap();
    std::fs::write(corpus_dir("config_json").join("tiny.json"), tiny.to_json().to_string()).unwrap();
    for size in ["8b", "405b"] {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/tulu3/config-{size}.json"));
        std::fs::copy(src, corpus_dir("config_json").join(format!("tulu3-{size}.json"))).unwrap();
    }
    let generation = serde_json::json!({"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "do_sample": true, "temperature": 0.6, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1,
        "max_new_tokens": 2048});
    std::fs::write(corpus_dir("generation_config").join("llama31.json"), generation.to_string()).unwrap();
    write_gguf(&corpus_dir("gguf").join("tiny.gguf"), 8, candle_core::quantized::GgmlDType::F32);
    write_gguf(&corpus_dir("gguf_in_place").join("tiny.gguf"), 8, candle_core::quantized::GgmlDType::F32);
    write_gguf(&corpus_dir("gguf_in_place").join("tiny-q4_1.gguf"), 32, candle_core::quantized::GgmlDType::Q4_1);
    let world = WorldSpec::from_nodes(2, 1, 1, 0, "127.0.0.1", 1).unwrap();
    let mut frames = Vec::new();
    frame::write_frame(
        &mut frames,
        FrameType::Handshake,
        &Handshake::new(&tiny, &world, Some("token")).unwrap().encode(),
    )
    .unwrap();
    std::fs::write(corpus_dir("control_frames").join("handshake.bin"), &frames).unwrap();
    let plan = RankPlan {
        shard: Shard::single(),
        max_positions: 512,
        block_size: 16,
        kv: KvPolicy::BytesPerRank(1 << 20),
        own_device: true,
        steps: Default::default(),
    };
    let hello = Hello { plan, nccl_id: None };
    let mut frames = Vec::new();
    frame::write_frame(&mut frames, FrameType::Hello, &hello.encode().unwrap()).unwrap();
    std::fs::write(corpus_dir("control_frames").join("hello.bin"), &frames).unwrap();
    let mut batch = Batch::new(16);
    batch.push(&[1, 2, 3], 0, &[0]).unwrap();
    batch.push(&[9], 16, &[1, 2]).unwrap();
    let mut frames = Vec::new();
    frame::write_frame(&mut frames, FrameType::Step, &batch_wire::encode(&batch, &[2, 3])).unwrap();
    std::fs::write(corpus_dir("control_frames").join("step.bin"), &frames).unwrap();
    let mut frames = Vec::new();
    frame::write_frame(&mut frames, FrameType::Data, &[7u8; 64]).unwrap();
    std::fs::write(corpus_dir("control_frames").join("data.bin"), &frames).unwrap();
    let bodies = [
        (
            "completion.json",
            serde_json::json!({"model": "m", "prompt": "Once upon a time", "max_tokens": 16,
            "temperature": 0.7, "top_p": 0.9, "stop": ["\n"], "n": 2, "seed": 3, "logprobs": 2, "echo": true}),
        ),
        (
            "completion-tokens.json",
            serde_json::json!({"prompt": [[1, 2, 3], "text"], "stream": true,
            "stream_options": {"include_usage": true}, "top_k": -1, "min_p": 0.1, "ignore_eos": true}),
        ),
        (
            "chat.json",
            serde_json::json!({"model": "m", "messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_completion_tokens": 8,
            "logprobs": true, "top_logprobs": 3, "repetition_penalty": 1.1, "response_format": {"type": "text"}}),
        ),
    ];
    for (name, body) in bodies {
        std::fs::write(corpus_dir("openai_bodies").join(name), body.to_string()).unwrap();
    }
    write_api_corpus();
}

/// Seeds for the Responses and Messages bodies: each API's fields and item kinds.
fn write_api_corpus() {
    use serde_json::json;
    let responses = [
        ("text.json", json!({"model": "m", "input": "hi", "max_output_tokens": 8, "temperature": 0, "stream": true})),
        (
            "items.json",
            json!({"model": "m", "instructions": "Be brief.", "metadata": {"k": "v"}, "store": false, "input": [
                {"role": "developer", "content": "x"},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"}],
                "text": {"format": {"type": "json_schema", "name": "w", "strict": true,
                    "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}}),
        ),
    ];
    for (name, body) in responses {
        std::fs::write(corpus_dir("responses_bodies").join(name), body.to_string()).unwrap();
    }
    let messages = [
        (
            "text.json",
            json!({"model": "m", "max_tokens": 8, "system": "Be brief.", "stop_sequences": ["\n"],
                "temperature": 0.5, "top_p": 0.9, "top_k": 40, "stream": true,
                "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            "tools.json",
            json!({"model": "m", "max_tokens": 8, "system": [{"type": "text", "text": "x"}], "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "w", "input": {"c": "P"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sunny"}]}]}),
        ),
    ];
    for (name, body) in messages {
        std::fs::write(corpus_dir("messages_bodies").join(name), body.to_string()).unwrap();
    }
}

/// Writes only the API seeds (`cargo test --test fuzz -- --ignored write_api_seeds`).
#[test]
#[ignore = "writes tests/fuzz_corpus"]
fn write_api_seeds() {
    write_api_corpus();
}

/// A one-layer llama GGUF with a 260-token byte-level vocabulary: the smallest file
/// `tulu convert` turns into a model.
fn write_gguf(path: &Path, hidden: usize, dtype: candle_core::quantized::GgmlDType) {
    let shape = gguf::TinyGguf { hidden, heads: 2, kv_heads: 1, context: 64, dtype };
    gguf::write_tiny_gguf(path, &shape, |_, i| ((i * 37 % 101) as f32 - 50.0) / 200.0);
    // The seed must convert: a corpus of failures would only fuzz the first check.
    let out = tempfile::tempdir().unwrap();
    convert_gguf(path, &out.path().join("m"), &ConvertOptions { dtype: OutDType::F32, progress: false }).unwrap();
}
