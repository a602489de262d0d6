//! The host's work between two decode steps: the scheduler and the KV block manager (prefix
//! cache included), per step, at 1, 64 and 256 running sequences of 4k tokens — the time the
//! device waits on one CPU thread. No model and no device: `cargo bench --bench scheduler`
//! (`-- --context N --steps N` to change the shape). One JSON line per case.

use std::time::Instant;

use serde_json::json;
use tulu::unstable::runtime::block_manager::BlockManager;
use tulu::unstable::runtime::sampler::Sampler;
use tulu::unstable::runtime::scheduler::{Scheduler, SchedulerConfig};
use tulu::SamplingParams;

const BLOCK: usize = 16;
const VOCAB: usize = 128_256;

fn flag(args: &[String], name: &str, default: usize) -> usize {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Mean seconds per decode step (schedule, one sampled token for each sequence, complete) of
/// `seqs` sequences whose prompts of `context` tokens are already in the cache.
fn per_step(seqs: usize, context: usize, steps: usize, sampling: &SamplingParams) -> f64 {
    let blocks = seqs * (context + steps + BLOCK).div_ceil(BLOCK);
    let cfg = SchedulerConfig { max_num_seqs: seqs, max_num_batched_tokens: 65_536, sampled_columns: VOCAB };
    let mut sched = Scheduler::new(cfg, BlockManager::new(blocks, BLOCK, true));
    for id in 0..seqs as u64 {
        // Distinct prompts (no sharing), as a server with unrelated requests sees them.
        let prompt = (0..context as u32).map(|i| (i * 31 + id as u32 * 7919) % VOCAB as u32).collect();
        sched.add(id, prompt, Sampler::new(sampling.clone(), VOCAB), false);
    }
    let mut step = |timed: bool| -> f64 {
        let started = Instant::now();
        let step = sched.schedule().expect("schedule");
        for &id in &step.sampled {
            sched.push_token(id, 42).expect("push a token");
        }
        sched.complete(&step);
        let secs = started.elapsed().as_secs_f64();
        assert!(!timed || step.entries.len() == seqs, "a timed step is not a full decode step");
        secs
    };
    // Prefill until every sequence decodes.
    while sched.get(seqs as u64 - 1).is_none_or(|s| s.computed < context) {
        step(false);
    }
    (0..steps).map(|_| step(true)).sum::<f64>() / steps as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let context = flag(&args, "--context", 4096);
    let steps = flag(&args, "--steps", 200);
    let greedy = SamplingParams::greedy();
    let penalized = SamplingParams { repetition_penalty: 1.1, ..SamplingParams::greedy() };
    for (name, sampling) in [("greedy", &greedy), ("repetition_penalty", &penalized)] {
        for seqs in [1, 64, 256] {
            let s = per_step(seqs, context, steps, sampling);
            println!(
                "{}",
                json!({"case": "scheduler_step", "sampling": name, "seqs": seqs, "context": context,
                       "ms_per_step": (s * 1e5).round() / 100.0})
            );
        }
    }
}
