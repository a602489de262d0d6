//! cuBLASLt with no algorithm for a shape (`TULU_EMU_CUBLASLT_NO_HEURISTIC`: the emulator's
//! heuristic returns none, as real cuBLASLt may): a decode matmul takes tulu's GEMV, and a
//! matmul only cuBLASLt can do fails with an error naming the shape and dtype — never a panic.

use super::*;
use std::path::Path;
use tulu::unstable::backend::cuda::CudaBackend;
use tulu::unstable::backend::Backend;
use tulu::unstable::weights::{DType, TensorRef};

const K: usize = 64;
const N: usize = 48;

/// Values exact in bf16 (small integers over 8), so a reference product is exact in f32.
fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7 + seed * 13) % 17) as f32 / 8.0 - 1.0).collect()
}

fn load<B: Backend>(b: &B, data: &[f32], rows: usize) -> B::Weight {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    let shape = [rows, K];
    let t = TensorRef { name: "w", file: Path::new("w.safetensors"), dtype: DType::F32, shape: &shape, bytes: &bytes };
    b.load_weight(&[t.full()]).expect("load_weight")
}

/// `x (m×K) · wᵀ` on the emulated GPU: "ok" when it equals the exact product, else the error.
fn matmul_rows(m: usize) -> String {
    let gpu = CudaBackend::new(0).expect("an emulated device");
    let (w, x) = (values(N * K, 1), values(m * K, 2));
    let gw = load(&gpu, &w, N);
    let table = load(&gpu, &x, m);
    let gx = gpu.embed(&table, &gpu.step_of_ids(&(0..m as u32).collect::<Vec<_>>(), &[]).unwrap()).unwrap();
    match gpu.matmul(&gx, &gw).and_then(|y| gpu.to_host(&y)) {
        Ok(y) => {
            for (i, got) in y.iter().enumerate() {
                let (r, c) = (i / N, i % N);
                let want: f32 = (0..K).map(|j| x[r * K + j] * w[c * K + j]).sum();
                let want = half::bf16::from_f32(want).to_f32();
                if (got - want).abs() > 1e-2 * (want.abs() + 1.0) {
                    return format!("wrong at {r},{c}: {got} != {want}");
                }
            }
            "ok".into()
        }
        Err(e) => format!("error {e}"),
    }
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn no_cublaslt_algorithm_falls_back_to_the_gemv_or_fails_naming_the_shape() {
    const TEST: &str = "cublaslt::no_cublaslt_algorithm_falls_back_to_the_gemv_or_fails_naming_the_shape";
    if let Some(mode) = child_mode() {
        println!("RESULT {}", matmul_rows(mode.parse().unwrap()));
        return;
    }
    let run = |rows: &str, setting: &str| {
        let out = child(TEST, rows, &[("TULU_EMU_CUBLASLT_NO_HEURISTIC", setting)], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "the child must not panic: {stderr}");
        results(&out).join(" ")
    };
    assert_eq!(run("32", ""), "ok", "with an algorithm");
    // Prefill rows: only cuBLASLt does them.
    let e = run("32", "always");
    assert!(e.contains("cuBLASLt bf16 GEMM 32×64 · (48×64)ᵀ") && e.contains("NOT_SUPPORTED"), "{e}");
    // Decode rows: the GEMV takes them, whatever the timing would have chosen.
    assert_eq!(run("4", "always"), "ok");
    // One shape only (cuBLAS's m×n×k: w's rows × x's rows × K): other shapes keep cuBLASLt.
    let e = run("32", "48x32x64");
    assert!(e.contains("32×64 · (48×64)ᵀ"), "{e}");
    assert_eq!(run("16", "48x32x64"), "ok");
}
