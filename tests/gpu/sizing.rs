//! Sizing on the device: the KV cache takes what `--gpu-memory-utilization` leaves once the
//! weights and the step workspace (fitted to the warm-up steps' measured peak) are resident, less
//! the one rule's headroom (`parallel::sizing::kv_budget`), and what is allocated after it (the
//! decode graphs) stays inside that headroom.

use super::*;
use tulu::unstable::parallel::sizing::HEADROOM_BYTES;

/// The engine on a device no other test uses (the last one; the emulator has 8), so that the
/// device's used memory after load is this engine's alone: within one KV block plus the headroom
/// of the fraction's bytes, and never past them.
#[test]
#[ignore = "needs a CUDA GPU"]
fn the_kv_cache_fills_the_memory_fraction_less_the_headroom() {
    gpu();
    let devices = cudarc::driver::CudaContext::device_count().unwrap_or(0) as usize;
    if devices < 2 {
        eprintln!("skipped: one device, which the other tests use at the same time");
        return;
    }
    let device = devices - 1;
    let cfg = ModelConfig::preset("tiny").unwrap();
    let dir = common::synth_dir("tiny-sizing-bf16", &cfg, OutDType::Bf16, None);
    let fraction = 0.08;
    let mut opts = EngineOptions::new(dir.to_string_lossy()).device(Device::Cuda(device));
    opts.gpu_memory_utilization = fraction;
    let engine = Engine::load(opts.clone()).unwrap();
    let ctx = cudarc::driver::CudaContext::new(device).unwrap();
    let (free, total) = ctx.mem_get_info().unwrap();
    let (used, budget) = ((total - free) as u64, (total as f64 * fraction) as u64);
    let per_block = cfg.kv_bytes_per_token(2) * opts.block_size as u64;
    let kv = engine.metrics().kv_blocks_total as u64 * per_block;
    eprintln!("device {device}: {used} bytes used of a {budget}-byte budget, {kv} of them KV");
    assert!(kv > 0, "no KV cache");
    // The KV cache ends within a block of the budget less the headroom. What is allocated after
    // it (graph logits; on a GPU also cuBLASLt's and NCCL's lazy buffers) is what the headroom is
    // for: next to nothing on the emulator, which allocates none of those lazily.
    let emulated = ctx.name().is_ok_and(|n| n.contains("emulator"));
    let after_kv = if emulated { 8 << 20 } else { HEADROOM_BYTES };
    let kv_end = budget - HEADROOM_BYTES;
    assert!(used + per_block > kv_end, "{used} bytes used: the KV cache stopped short of {kv_end}");
    assert!(used <= kv_end + after_kv, "{used} bytes used past {kv_end} + {after_kv} after the KV cache");
}
