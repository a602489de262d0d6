//! Loading a multi-GB checkpoint keeps host memory to the loaded weights, at their stored size
//! (bf16 stays bf16 on the CPU), plus at most one tensor of the file: each weight is read from
//! the memory map straight into its destination,
//! and its mapped pages are dropped once it is there (`WeightStore::release`). A tensor-parallel
//! rank reads only its slices. With `--quantize fp8` the linear weights are quantized row by row
//! as they stream in, and the CPU keeps them in e4m3: the same rule holds at one byte an element.
//! (One test in its own binary: the process's peak RSS is its own.)

use std::path::Path;

use tulu::unstable::backend::cpu::CpuBackend;
use tulu::unstable::config::ModelConfig;
use tulu::unstable::model::Llama;
use tulu::unstable::parallel::sharding::{Shard, ShardPlan};
use tulu::unstable::parallel::sizing::{rank_weight_bytes, ElementBytes};
use tulu::unstable::process_memory::{peak_rss_bytes, reset_peak_rss, rss_bytes};
use tulu::unstable::quant::Quantize;
use tulu::unstable::synth::{synth_checkpoint, SynthOptions};
use tulu::unstable::weights::gguf::OutDType;
use tulu::unstable::weights::WeightStore;

const GIB: u64 = 1 << 30;
/// What loading may hold beyond the weights and one tensor: allocator slack, the RoPE tables.
const SLACK: u64 = 256 << 20;

/// Peak RSS growth while `shard` of the checkpoint loads onto the CPU, the resident growth once
/// loaded, and the bytes its weights occupy there: bf16, and e4m3 plus a scale a row for the
/// linear weights `cfg` makes FP8 (the norm vectors, kept in f32, are a few KB more).
fn load_growth(dir: &Path, cfg: &ModelConfig, shard: Shard) -> (u64, u64, u64) {
    let store = WeightStore::open(dir).unwrap();
    assert!(reset_peak_rss(), "/proc/self/clear_refs is not writable");
    let base = rss_bytes().unwrap();
    let model = Llama::load(&CpuBackend::new(), cfg, &store, 64, shard, |_| {}).unwrap();
    let growth = peak_rss_bytes().unwrap().saturating_sub(base);
    let resident = rss_bytes().unwrap().saturating_sub(base);
    let stored = ElementBytes { dense: 2, fp8: Some(1) };
    let weights = rank_weight_bytes(cfg, &ShardPlan::new(cfg, shard).unwrap(), &stored, true);
    drop(model);
    (growth, resident, weights)
}

#[test]
fn loading_keeps_peak_host_memory_to_the_weights_plus_one_tensor() {
    if rss_bytes().is_none() {
        eprintln!("no /proc/self/status: not Linux, nothing to measure");
        return;
    }
    // The Llama-3.1-8B shape cut to two layers, in bf16: 2.97 GB in two shard files (its
    // embedding and lm_head alone are 1.05 GB each).
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = tmp.path().join("8b-2-layers");
    let mut cfg = ModelConfig::preset("llama-3.1-8b").unwrap();
    cfg.num_hidden_layers = 2;
    synth_checkpoint(&cfg, &dir, &SynthOptions { dtype: OutDType::Bf16, ..Default::default() }).unwrap();
    let store = WeightStore::open(&dir).unwrap();
    let file_bytes: u64 = store.bytes_by_dtype().values().map(|(b, _)| b).sum();
    let largest = store.names().iter().map(|n| store.get_any(n).unwrap().bytes.len() as u64).max().unwrap();
    assert!(file_bytes > 2 * GIB, "the checkpoint is {file_bytes} bytes");
    drop(store);

    let mut fp8 = cfg.clone();
    Quantize::Fp8.apply(&mut fp8);
    for (cfg, name, shard) in
        [(&cfg, "bf16", Shard::single()), (&cfg, "bf16", Shard { rank: 3, world: 8 }), (&fp8, "fp8", Shard::single())]
    {
        let (growth, resident, weights) = load_growth(&dir, cfg, shard);
        let overhead = growth.saturating_sub(weights);
        eprintln!(
            "{name} rank {} of {}: checkpoint {:.2} GB, weights {:.2} GB, peak RSS growth {:.2} GB, \
             resident after load {:.2} GB, overhead {:.0} MB (largest tensor {:.0} MB)",
            shard.rank,
            shard.world,
            file_bytes as f64 / 1e9,
            weights as f64 / 1e9,
            growth as f64 / 1e9,
            resident as f64 / 1e9,
            overhead as f64 / 1e6,
            largest as f64 / 1e6
        );
        assert!(
            overhead <= SLACK + largest,
            "{name} rank {} of {}: loading grew RSS by {growth} bytes for {weights} bytes of weights",
            shard.rank,
            shard.world
        );
        // Once loaded, only the weights stay (the mapped pages and any tensor in flight are gone):
        // an FP8 weight kept dequantized would hold 4 bytes an element here, not 1.
        assert!(
            resident <= weights + SLACK,
            "{name} rank {} of {}: {resident} bytes resident after load for {weights} bytes of weights",
            shard.rank,
            shard.world
        );
        if shard.world > 1 {
            // Rank 3 of 8 holds an eighth of every sharded tensor.
            assert!(weights < file_bytes / 8 + (64 << 20), "rank weights {weights} of {file_bytes}");
        }
    }
}
