//! The forward pass and generation loop against themselves in ways that must agree: a batch
//! equals its sequences alone, incremental decode equals full recompute, seeds reproduce, and
//! SmolLM2 knows the capital of France.

mod common;

use tulu::unstable::backend::cpu::CpuBackend;
use tulu::unstable::backend::Backend;
use tulu::unstable::config::ModelConfig;
use tulu::unstable::model::Llama;
use tulu::unstable::parallel::sharding::Shard;
use tulu::unstable::parallel::SingleRank;
use tulu::unstable::runtime::batch::Batch;
use tulu::unstable::runtime::block_manager::BlockManager;
use tulu::unstable::weights::WeightStore;
use tulu::{ChatMessage, Engine, EngineOptions, FinishReason, GenerateRequest, SamplingParams};

const BS: usize = 16;

struct Fixture {
    backend: CpuBackend,
    model: Llama<CpuBackend>,
    pool: BlockManager,
    cache: <CpuBackend as Backend>::KvCache,
}

fn fixture(dir: &std::path::Path) -> Fixture {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open(dir).unwrap();
    let backend = CpuBackend::new();
    let model = Llama::load(&backend, &cfg, &store, 256, Shard::single(), |_| {}).unwrap();
    let cache = backend.new_kv_cache(&model.kv_cache_spec(64, BS)).unwrap();
    Fixture { backend, model, pool: BlockManager::new(64, BS, false), cache }
}

impl Fixture {
    /// Logits of the last token of each (tokens, cached, table) sequence, in one step.
    fn step(&mut self, seqs: &mut [(Vec<u32>, usize, Vec<u32>)]) -> Vec<Vec<f32>> {
        let mut batch = Batch::new(BS);
        for (tokens, cached, table) in seqs.iter_mut() {
            self.pool.grow(table, *cached + tokens.len()).unwrap();
            batch.push(tokens, *cached, table).unwrap();
        }
        let logits =
            self.model.forward(&self.backend, &batch, &mut self.cache, &batch.last_rows(), &SingleRank).unwrap();
        let v = self.model.config().vocab_size;
        logits.chunks(v).map(<[f32]>::to_vec).collect()
    }

    fn alone(&mut self, tokens: &[u32]) -> Vec<f32> {
        let mut seq = [(tokens.to_vec(), 0, Vec::new())];
        let out = self.step(&mut seq).remove(0);
        self.pool.release(&mut seq[0].2);
        out
    }
}

fn prompts() -> Vec<Vec<u32>> {
    // Lengths that cross block boundaries (16) differently.
    vec![
        (0..5).map(|i| 3 + i * 7).collect(),
        (0..23).map(|i| 11 + i * 5 % 200).collect(),
        (0..40).map(|i| 100 + i % 90).collect(),
    ]
}

#[test]
fn batch_of_three_equals_each_alone() {
    for dir in [common::tiny_dir(), common::smollm2_dir()] {
        let mut f = fixture(&dir);
        let alone: Vec<Vec<f32>> = prompts().iter().map(|p| f.alone(p)).collect();
        let mut seqs: Vec<_> = prompts().into_iter().map(|p| (p, 0, Vec::new())).collect();
        let batched = f.step(&mut seqs);
        // The CPU kernels compute every row independently of its batch: bit-identical.
        for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
            assert!(
                a == b,
                "{}: sequence {i} batched differs from alone (rel err {})",
                dir.display(),
                common::rel_err(b, a)
            );
        }
        // A mixed step: one sequence decodes a token while another prefills.
        let mut seqs2 =
            vec![(vec![7u32], seqs[0].0.len(), std::mem::take(&mut seqs[0].2)), (prompts()[1].clone(), 0, Vec::new())];
        let mixed = f.step(&mut seqs2);
        let mut extended = prompts()[0].clone();
        extended.push(7);
        assert!(mixed[0] == f.alone(&extended), "decode row in a mixed step differs from recompute");
        assert!(mixed[1] == alone[1], "prefill row in a mixed step differs from alone");
    }
}

#[test]
fn incremental_decode_equals_full_recompute() {
    let mut f = fixture(&common::tiny_dir());
    let tokens: Vec<u32> = (0..37).map(|i| (i * 13 + 5) % 250).collect();
    let mut seq = [(tokens[..10].to_vec(), 0, Vec::new())];
    f.step(&mut seq);
    for n in 10..tokens.len() {
        seq[0].1 = n;
        seq[0].0 = vec![tokens[n]];
        let inc = f.step(&mut seq).remove(0);
        let full = f.alone(&tokens[..=n]);
        let e = common::rel_err(&inc, &full);
        assert!(e < 1e-5, "position {n}: incremental vs recompute rel err {e}");
    }
}

#[test]
fn smollm2_knows_the_capital_of_france() {
    let engine = Engine::load(EngineOptions::new(common::smollm2_dir().to_string_lossy())).unwrap();
    let msg = ChatMessage::new("user", "What is the capital of France?");
    let (text, s) = common::run(&engine, GenerateRequest::chat(vec![msg]).max_tokens(32));
    assert!(text.contains("Paris"), "answer: {text:?}");
    assert_eq!(s.finish_reason, FinishReason::Stop, "a short answer ends at <|im_end|>");
    assert_eq!(s.tokens.last(), Some(&2));
}

#[test]
fn seeded_sampling_reproduces_and_seeds_differ() {
    let engine = Engine::load(EngineOptions::new(common::smollm2_dir().to_string_lossy())).unwrap();
    let req = |seed| {
        let p = SamplingParams { temperature: 1.0, top_p: 0.95, seed: Some(seed), ..Default::default() };
        GenerateRequest::text("Once upon a time").sampling(p).max_tokens(24)
    };
    let (a, sa) = common::run(&engine, req(1));
    let (b, sb) = common::run(&engine, req(1));
    assert_eq!(sa.tokens, sb.tokens);
    assert_eq!(a, b);
    let (_, sc) = common::run(&engine, req(2));
    assert_ne!(sa.tokens, sc.tokens);
}

#[test]
fn context_limit_and_max_tokens_finish_with_length() {
    let dir = common::tiny_dir();
    let engine = Engine::load(EngineOptions::new(dir.to_string_lossy()).max_context(20)).unwrap();
    let mut req = GenerateRequest::tokens((1..13).collect());
    req.ignore_eos = true;
    let (_, s) = common::run(&engine, req.clone());
    assert_eq!(s.finish_reason, FinishReason::Length);
    assert_eq!(s.prompt_tokens + s.tokens.len(), 20, "generation fills the context exactly");
    let (_, s) = common::run(&engine, req.max_tokens(3));
    assert_eq!((s.finish_reason, s.tokens.len()), (FinishReason::Length, 3));
}

#[test]
fn stop_strings_end_the_text_before_them() {
    let engine = Engine::load(EngineOptions::new(common::smollm2_dir().to_string_lossy())).unwrap();
    let msg = ChatMessage::new("user", "What is the capital of France?");
    let (full, _) = common::run(&engine, GenerateRequest::chat(vec![msg.clone()]).max_tokens(32));
    let cut = full.find("Paris").expect("the answer names Paris");
    let (text, s) = common::run(&engine, GenerateRequest::chat(vec![msg]).max_tokens(32).stop("Paris"));
    assert_eq!(text, full[..cut]);
    assert_eq!(s.finish_reason, FinishReason::Stop);
}

/// A multi-choice request is admitted or refused whole: with one waiting slot, an idle engine
/// takes three choices at once and finishes them all; an invalid choice queues none of them.
#[test]
fn generate_all_admits_a_request_whole() {
    let mut opts = EngineOptions::new(common::tiny_dir().to_string_lossy());
    opts.max_waiting = Some(1);
    let engine = Engine::load(opts).unwrap();
    let request = |seed| {
        GenerateRequest::tokens(vec![5, 6, 7]).max_tokens(4).sampling(SamplingParams {
            temperature: 0.9,
            seed: Some(seed),
            ..Default::default()
        })
    };
    let streams = engine.generate_all(vec![request(1), request(2), request(3)]).unwrap();
    for stream in streams {
        let done = stream
            .into_iter()
            .map(Result::unwrap)
            .find_map(|e| match e {
                tulu::Event::Done(s) => Some(s),
                _ => None,
            })
            .unwrap();
        assert_eq!(done.tokens.len(), 4);
    }
    let bad = GenerateRequest::tokens(vec![5]).max_tokens(0);
    let err = engine.generate_all(vec![request(4), bad]).err().expect("max_tokens 0 is refused");
    assert!(err.to_string().contains("max_tokens"), "{err}");
    assert_eq!(engine.metrics().waiting + engine.metrics().running, 0, "nothing was queued");
}

/// What a generation's events say, timings aside (they differ from run to run).
fn event_digest(events: Vec<tulu::Result<tulu::Event>>) -> Vec<String> {
    events
        .into_iter()
        .map(|e| match e.unwrap() {
            tulu::Event::Done(s) => format!("done {:?} {:?} {}", s.tokens, s.finish_reason, s.prompt_tokens),
            other => format!("{other:?}"),
        })
        .collect()
}

#[test]
fn a_generation_polled_as_a_stream_equals_one_iterated_on_a_thread() {
    use futures_util::StreamExt;
    let engine = Engine::load(EngineOptions::new(common::tiny_dir().to_string_lossy())).unwrap();
    let request = || {
        let params = SamplingParams { temperature: 0.8, seed: Some(7), ..SamplingParams::greedy() };
        let mut r = GenerateRequest::tokens(vec![5, 9, 13]).sampling(params).max_tokens(12);
        r.logprobs = Some(2);
        r.ignore_eos = true;
        r
    };
    let iterated = std::thread::scope(|s| {
        let engine = &engine;
        s.spawn(move || engine.generate(request()).unwrap().into_iter().collect::<Vec<_>>()).join().unwrap()
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    let streamed = runtime.block_on(async { engine.generate(request()).unwrap().collect::<Vec<_>>().await });
    assert!(iterated.len() > 2, "{iterated:?}");
    assert_eq!(event_digest(streamed), event_digest(iterated));
}
