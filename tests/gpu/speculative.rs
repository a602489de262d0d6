//! Speculative decoding on the GPU: verify steps (several rows of a sequence through the paged
//! cache, every row sampled on the device) give the tokens plain decode steps give, with prompt
//! lookup and with a draft model on the same device.

use super::*;

use tulu::{Device, Engine, EngineOptions, GenerateRequest, SamplingParams, Speculation, Summary};

/// Greedy and seeded requests on a repetitive prompt, batched, with and without prompt lookup
/// on one CUDA engine (decode graphs on for the plain steps): the same tokens, and drafts kept.
#[test]
#[ignore = "needs a CUDA GPU"]
fn speculative_tokens_equal_plain_decode_on_the_gpu() {
    gpu();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny-bf16");
    let cfg = ModelConfig::preset("tiny").unwrap();
    synth_checkpoint(&cfg, &dir, &SynthOptions { dtype: OutDType::Bf16, ..Default::default() }).unwrap();
    let mut opts = EngineOptions::new(dir.to_string_lossy()).device(Device::Cuda(0));
    opts.max_num_seqs = 4;
    opts.kv_cache_memory = Some(64 << 20);
    opts.speculation = Some(Speculation::ngram(3));
    let engine = Engine::load(opts).unwrap();
    // A phrase said three times: its continuation is what prompt lookup proposes.
    let phrase: Vec<u32> = (0..9).map(|i| (i * 37 + 11) % 290).collect();
    let prompt: Vec<u32> = phrase.iter().cycle().take(27).copied().collect();
    let seeded = SamplingParams { temperature: 0.9, seed: Some(3), ..Default::default() };
    let reqs: Vec<GenerateRequest> = [SamplingParams::greedy(), seeded]
        .into_iter()
        .map(|s| {
            let mut r = GenerateRequest::tokens(prompt.clone()).sampling(s).max_tokens(24);
            r.ignore_eos = true;
            r
        })
        .collect();
    let run = |reqs: Vec<GenerateRequest>| -> Vec<Summary> {
        common::run_all(&engine, &reqs).into_iter().map(|(_, s)| s).collect()
    };
    let on = run(reqs.clone());
    let off = run(reqs.into_iter().map(|r| r.speculative(false)).collect());
    for (i, (a, b)) in on.iter().zip(&off).enumerate() {
        assert_eq!(a.tokens, b.tokens, "request {i}: speculation changed the tokens");
    }
    assert!(on[0].accepted_draft_tokens > 0, "no draft kept: {:?}", on[0]);
}

/// A draft model on the GPU (its own backend and KV cache on the target's device), batched:
/// greedy requests give plain decode's tokens and seeded ones the same tokens run after run —
/// with a one-layer draft of a padded vocabulary that the target sometimes rejects, so rollback
/// in both caches runs.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_draft_model_on_the_gpu_keeps_greedy_tokens_and_seeded_runs_reproducible() {
    gpu();
    let cfg = ModelConfig::preset("tiny").unwrap();
    let target = common::synth_dir("tiny-gpu-spec-target-bf16", &cfg, OutDType::Bf16, None);
    let mut weak = cfg.clone();
    weak.num_hidden_layers = 1;
    weak.vocab_size += 16;
    let draft =
        common::synth_dir("tiny-gpu-spec-draft-bf16", &weak, OutDType::Bf16, Some(target.join("tokenizer.json")));
    let mut opts = EngineOptions::new(target.to_string_lossy()).device(Device::Cuda(0));
    opts.max_num_seqs = 4;
    opts.kv_cache_memory = Some(64 << 20);
    opts.speculation = Some(Speculation::draft(draft.to_string_lossy(), 3));
    let engine = Engine::load(opts).unwrap();
    let seeded = SamplingParams { temperature: 0.9, seed: Some(7), ..Default::default() };
    let reqs: Vec<GenerateRequest> = (0..4u32)
        .map(|i| {
            let prompt: Vec<u32> = (0..20).map(|t| (t * 37 + 11 + i * 53) % 290).collect();
            let sampling = if i % 2 == 0 { SamplingParams::greedy() } else { seeded.clone() };
            let mut r = GenerateRequest::tokens(prompt).sampling(sampling).max_tokens(20);
            r.ignore_eos = true;
            r
        })
        .collect();
    let run = |reqs: Vec<GenerateRequest>| -> Vec<Summary> {
        common::run_all(&engine, &reqs).into_iter().map(|(_, s)| s).collect()
    };
    let on = run(reqs.clone());
    let again = run(reqs.clone());
    let off = run(reqs.into_iter().map(|r| r.speculative(false)).collect());
    for (i, ((a, b), c)) in on.iter().zip(&off).zip(&again).enumerate() {
        // Greedy: exactly plain decode's tokens. Seeded sampling keeps the target's
        // distribution by min(1, p/q) with draws of its own: the same tokens on every run.
        match i % 2 {
            0 => assert_eq!(a.tokens, b.tokens, "request {i}: the draft model changed greedy tokens"),
            _ => assert_eq!(a.tokens, c.tokens, "request {i}: a seeded request with a draft is not reproducible"),
        }
    }
    let m = engine.metrics();
    assert!(m.spec_draft_tokens > 0, "nothing was proposed: {m:?}");
    assert!(m.spec_draft_tokens > m.spec_accepted_tokens, "no draft token was rejected: {m:?}");
}
