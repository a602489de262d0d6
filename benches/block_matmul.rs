//! Our block kernels (`src/backend/cpu/qdot`) against candle-core's quantized matmul on the same
//! blocks, in one run, alternating: `cargo bench --bench block_matmul [-- --rows M --cols K
//! --batch 1,8 --repeat R]`. Prints one line per type and batch: the best time of each and the
//! ratio, and the weight bytes read per second by ours (docs/performance.md, "CPU weights").
//! Then the dense kernels of the same weight at f32, bf16 and FP8 (e4m3 rows and a scale each;
//! no peer on the CPU), each against the machine's read bandwidth measured in the same run.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tulu::unstable::backend::cpu::blocks::{BlockPart, BlockWeight};
use tulu::unstable::backend::cpu::{CpuBackend, CpuWeight};
use tulu::unstable::backend::Profiling;
use tulu::unstable::quant::e4m3;
use tulu::unstable::weights::fp8::Fp8Rows;

struct Args {
    rows: usize,
    cols: usize,
    batches: Vec<usize>,
    repeat: usize,
}

fn args() -> Args {
    let mut a = Args { rows: 4096, cols: 4096, batches: vec![1, 8], repeat: 20 };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().and_then(|v| v.split(',').map(|n| n.parse().ok()).collect::<Option<Vec<usize>>>());
        match flag.as_str() {
            "--rows" => a.rows = value().map_or(a.rows, |v| v[0]),
            "--cols" => a.cols = value().map_or(a.cols, |v| v[0]),
            "--batch" => a.batches = value().unwrap_or(a.batches),
            "--repeat" => a.repeat = value().map_or(a.repeat, |v| v[0]),
            _ => {} // `cargo bench` passes `--bench`.
        }
    }
    a
}

/// The best of `repeat` timings of `f`, in seconds.
fn best(repeat: usize, mut f: impl FnMut()) -> f64 {
    (0..repeat)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a = args();
    let (m, k) = (a.rows, a.cols);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let values: Vec<f32> = (0..m * k).map(|_| rand()).collect();
    println!("# {m}×{k}, threads {}, load {}", rayon::current_num_threads(), load());
    let bandwidth = CpuBackend::new().measure_read_bandwidth(256 << 20)?;
    println!("# read bandwidth {:.1} GB/s (256 MiB, best of 5)", bandwidth / 1e9);
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::Q4K, GgmlDType::Q6K] {
        let ours = BlockWeight::new(vec![BlockPart::quantize("w", dtype, values.clone(), m, k)?], k);
        let t = Tensor::from_slice(&values, (m, k), &Device::Cpu)?;
        let theirs = QTensor::quantize(&t, dtype)?;
        let bytes = theirs.storage_size_in_bytes() as f64;
        for &n in &a.batches {
            let x: Vec<f32> = (0..n * k).map(|_| rand()).collect();
            let xt = Tensor::from_slice(&x, (n, k), &Device::Cpu)?;
            let (mut t_ours, mut t_candle) = (f64::INFINITY, f64::INFINITY);
            // Alternating rounds, so that both see the same machine.
            for _ in 0..3 {
                t_ours = t_ours.min(best(a.repeat, || drop(ours.matmul(&x, n))));
                t_candle = t_candle.min(best(a.repeat, || drop(xt.apply_op1_no_bwd(&theirs))));
            }
            println!(
                "{dtype:?} batch {n}: ours {:.3} ms ({:.1} GB/s), candle {:.3} ms ({:.1} GB/s), candle ÷ ours {:.2}×",
                t_ours * 1e3,
                bytes / t_ours / 1e9,
                t_candle * 1e3,
                bytes / t_candle / 1e9,
                t_candle / t_ours
            );
        }
    }
    dense(&a, &values, &mut rand, bandwidth)?;
    println!("# load {} at the end", load());
    Ok(())
}

/// The dense kernels on the same weight at f32, bf16 and FP8, against `bandwidth`.
fn dense(a: &Args, values: &[f32], rand: &mut impl FnMut() -> f32, bandwidth: f64) -> tulu::Result<()> {
    let (m, k) = (a.rows, a.cols);
    let mut fp8 =
        Fp8Rows { bytes: Vec::with_capacity(m * k), scales: Vec::new(), rows: m, cols: k, activation_bound: None };
    for row in values.chunks(k) {
        let scale = e4m3::quantize_row(row, &mut fp8.bytes);
        fp8.scales.push(scale);
    }
    let weights = [
        ("F32", CpuWeight::from_vec(values.to_vec(), m, k)?),
        ("BF16", CpuWeight::from_vec(values.iter().map(|&v| half::bf16::from_f32(v)).collect(), m, k)?),
        ("F8_E4M3", CpuWeight::from_fp8(fp8)?),
    ];
    for &n in &a.batches {
        let x: Vec<f32> = (0..n * k).map(|_| rand()).collect();
        let mut times = [f64::INFINITY; 3];
        // Alternating rounds, so that every type sees the same machine.
        for _ in 0..3 {
            for (t, (_, w)) in times.iter_mut().zip(&weights) {
                *t = t.min(best(a.repeat, || drop(w.matmul(&x, n))));
            }
        }
        for (t, (name, w)) in times.iter().zip(&weights) {
            let gbs = w.bytes() as f64 / t / 1e9;
            println!(
                "{name} ({}) batch {n}: {:.3} ms, {gbs:.1} GB/s, {:.2}× the read bandwidth",
                w.describe(),
                t * 1e3,
                gbs * 1e9 / bandwidth
            );
        }
    }
    Ok(())
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or("?".into(), |s| s.split(' ').next().unwrap_or("?").to_string())
}
