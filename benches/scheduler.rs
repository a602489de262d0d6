//! The host's work between two decode steps: the scheduler and the KV block manager (prefix
//! cache included), per step, at 1, 64 and 256 running sequences of 4k tokens — the time the
//! device waits on one CPU thread; and the bytes and time of one decode step's broadcast to the
//! other ranks (binary against JSON). No model and no device: `cargo bench --bench scheduler`
//! (`-- --context N --steps N` to change the shape). One JSON line per case.

use std::time::Instant;

use serde_json::json;
use tulu::unstable::runtime::batch::Batch;
use tulu::unstable::runtime::batch_wire;
use tulu::unstable::runtime::block_manager::BlockManager;
use tulu::unstable::runtime::sampler::Sampler;
use tulu::unstable::runtime::scheduler::{Scheduler, SchedulerConfig};
use tulu::SamplingParams;

const BLOCK: usize = 16;
const VOCAB: usize = 128_256;

fn flag(args: &[String], name: &str, default: usize) -> usize {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Mean and median seconds per decode step (schedule, one sampled token for each sequence,
/// complete) of `seqs` sequences whose prompts of `context` tokens are already in the cache. The
/// median is what a loaded machine can still measure: a step the OS preempted inflates the mean.
fn per_step(seqs: usize, context: usize, steps: usize, sampling: &SamplingParams) -> (f64, f64) {
    let blocks = seqs * (context + steps + BLOCK).div_ceil(BLOCK);
    let cfg = SchedulerConfig {
        max_num_seqs: seqs,
        max_num_batched_tokens: 65_536,
        sampled_columns: VOCAB,
        max_positions: usize::MAX,
        speculation: None,
    };
    let mut sched = Scheduler::new(cfg, BlockManager::new(blocks, BLOCK, true));
    for id in 0..seqs as u64 {
        // Distinct prompts (no sharing), as a server with unrelated requests sees them.
        let prompt = (0..context as u32).map(|i| (i * 31 + id as u32 * 7919) % VOCAB as u32).collect();
        sched.add(id, prompt, Sampler::new(sampling.clone(), VOCAB), false);
    }
    let step = |sched: &mut Scheduler, timed: bool| -> f64 {
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
        step(&mut sched, false);
    }
    let mut times: Vec<f64> = (0..steps).map(|_| step(&mut sched, true)).collect();
    let mean = times.iter().sum::<f64>() / steps as f64;
    times.sort_by(f64::total_cmp);
    (mean, times.get(steps / 2).copied().unwrap_or(0.0))
}

/// Bytes and microseconds (encode + decode) of one decode step's broadcast to the other ranks at
/// `seqs` sequences of `context` tokens: the compact encoding against the JSON it replaced.
fn broadcast(seqs: usize, context: usize) -> serde_json::Value {
    let mut batch = Batch::new(BLOCK);
    for s in 0..seqs as u32 {
        let table: Vec<u32> = (0..(context + 1).div_ceil(BLOCK) as u32).map(|b| s * 1000 + b).collect();
        batch.push(&[s], context, &table).expect("a decode row");
    }
    let rows = batch.last_rows();
    let reps = 20;
    let time = |f: &dyn Fn() -> usize| {
        let started = Instant::now();
        let bytes = (0..reps).map(|_| f()).last().unwrap_or(0);
        (bytes, started.elapsed().as_secs_f64() / reps as f64 * 1e6)
    };
    let (json_bytes, json_us) = time(&|| {
        let bytes = serde_json::to_vec(&(&batch, &rows)).expect("json");
        let back: (Batch, Vec<usize>) = serde_json::from_slice(&bytes).expect("json back");
        assert_eq!(back.0.num_tokens(), seqs);
        bytes.len()
    });
    let (wire_bytes, wire_us) = time(&|| {
        let bytes = batch_wire::encode(&batch, &rows);
        let back = batch_wire::decode(&bytes).expect("wire back");
        assert_eq!(back.0, batch);
        bytes.len()
    });
    json!({"case": "step_broadcast", "seqs": seqs, "context": context, "json_bytes": json_bytes,
           "json_us": json_us.round(), "binary_bytes": wire_bytes, "binary_us": wire_us.round()})
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let context = flag(&args, "--context", 4096);
    let steps = flag(&args, "--steps", 200);
    let greedy = SamplingParams::greedy();
    let penalized = SamplingParams { repetition_penalty: 1.1, ..SamplingParams::greedy() };
    for seqs in [1, 64, 256] {
        println!("{}", broadcast(seqs, context));
    }
    for (name, sampling) in [("greedy", &greedy), ("repetition_penalty", &penalized)] {
        for seqs in [1, 64, 256] {
            let (mean, median) = per_step(seqs, context, steps, sampling);
            let ms = |s: f64| (s * 1e6).round() / 1000.0;
            println!(
                "{}",
                json!({"case": "scheduler_step", "sampling": name, "seqs": seqs, "context": context,
                       "ms_per_step": ms(mean), "median_ms_per_step": ms(median)})
            );
        }
    }
}
