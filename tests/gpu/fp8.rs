//! FP8 weights on the GPU against the CPU backend (which dequantizes them at load, in f32):
//! the decode GEMV reading e4m3 (1 to 8 rows), dequantize + cuBLASLt (prefill rows, and inner
//! dimensions the GEMV does not take), weights quantized while loading and weights stored in
//! F8_E4M3 with their scales, and a whole FP8 model's logits. Outputs are poisoned (NaN) first,
//! so an element a kernel forgets shows.

use super::*;
use tulu::quant::Quantization;
use tulu::weights::fp8::RowScales;

/// `data` (`n × k`) loaded by `b` as an FP8 weight quantized while loading.
fn fp8_weight<B: Backend>(b: &B, data: &[f32], n: usize, k: usize) -> B::Weight {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    let shape = [n, k];
    let t = TensorRef {
        name: "test",
        file: Path::new("test.safetensors"),
        dtype: DType::F32,
        shape: &shape,
        bytes: &bytes,
    };
    b.load_fp8_weight(&[t.full()]).expect("load_fp8_weight")
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fp8_matmuls_match_cpu() {
    let gpu = gpu();
    let cpu = CpuBackend::new();
    let mut rng = rng("fp8 matmul");
    let big: &[(usize, usize)] = if emulated() { &[(512, 2048)] } else { &[(6144, 4096), (4096, 14336)] };
    // k = 24 and 1000 are not multiples of 16: those go through dequantize + cuBLASLt.
    for &(n, k) in [(1, 16), (37, 64), (200, 1008), (96, 24), (70, 1000)].iter().chain(big) {
        // Rows of different magnitudes, so that a scale applied to the wrong row shows.
        let mut w = random(&mut rng, n * k, 1.0 / (k as f32).sqrt());
        for (i, v) in w.iter_mut().enumerate() {
            *v *= [0.25, 1.0, 4.0][(i / k) % 3];
        }
        let (gw, cw) = (fp8_weight(&gpu, &w, n, k), fp8_weight(&cpu, &w, n, k));
        for m in [1, 2, 3, 5, 8, 9, 33] {
            let x = random(&mut rng, m * k, 1.0);
            let c = cpu.to_host(&cpu.matmul(&tensor(&cpu, &x, m, k), &cw).unwrap()).unwrap();
            let g = gpu.to_host(&gpu.matmul(&tensor(&gpu, &x, m, k), &gw).unwrap()).unwrap();
            assert_close(&format!("fp8 {m}×{k} · ({n}×{k})ᵀ"), &g, &c, OP_TOL);
        }
    }
}

/// A weight stored in F8_E4M3 with one scale per tensor, fused with one quantized while loading
/// (different scales on each part's rows), padded with zero rows: same on both backends.
#[test]
#[ignore = "needs a CUDA GPU"]
fn stored_fp8_parts_fuse_and_match_cpu() {
    let gpu = gpu();
    let cpu = CpuBackend::new();
    let mut rng = rng("fp8 stored");
    let (n1, n2, k) = (40, 24, 128);
    let mut stored = encode(&random(&mut rng, n1 * k, 400.0), DType::F8E4M3);
    // Every e4m3 code but NaN in the first two rows, and a row of subnormals only, so that a
    // wrong decoding of any code shows.
    for c in 0..k {
        stored[c] = if c == 0x7F { 0x7E } else { c as u8 };
        stored[k + c] = if c == 0x7F { 0xFE } else { 0x80 | c as u8 };
        stored[2 * k + c] = [0, 1, 2, 3, 4, 5, 6, 7, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87][c % 16];
    }
    let dense = encode(&random(&mut rng, n2 * k, 0.1), DType::F32);
    let (s1, s2) = ([n1, k], [n2, k]);
    let a = TensorRef { name: "a", file: Path::new("a"), dtype: DType::F8E4M3, shape: &s1, bytes: &stored };
    let b = TensorRef { name: "b", file: Path::new("b"), dtype: DType::F32, shape: &s2, bytes: &dense };
    let mut pa = a.full();
    pa.scale = Some(RowScales::Tensor(1.0 / 1024.0));
    let mut pb = b.row_slice(3..20);
    pb.pad_rows = 5;
    let parts = [pa, pb];
    let (gw, cw) = (gpu.load_fp8_weight(&parts).unwrap(), cpu.load_fp8_weight(&parts).unwrap());
    for m in [1, 4, 20] {
        let x = random(&mut rng, m * k, 1.0);
        let c = cpu.to_host(&cpu.matmul(&tensor(&cpu, &x, m, k), &cw).unwrap()).unwrap();
        let g = gpu.to_host(&gpu.matmul(&tensor(&gpu, &x, m, k), &gw).unwrap()).unwrap();
        assert_close(&format!("stored fp8 fused, {m} rows"), &g, &c, OP_TOL);
    }
}

/// A random-weight model quantized while loading gives the CPU's logits (prefill and decode
/// shapes).
#[test]
#[ignore = "needs a CUDA GPU"]
fn fp8_random_model_logits_match_cpu() {
    let gpu = gpu();
    let cpu = CpuBackend::new();
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.quantization = Some(Quantization::at_load());
    for tokens in [&[5u32, 77, 299, 12, 9, 140, 3][..], &[42]] {
        let g = logits(&gpu, &cfg, tokens);
        let c = logits(&cpu, &cfg, tokens);
        assert_close(&format!("fp8 model, {} tokens", tokens.len()), &g, &c, LOGITS_TOL);
    }
}

/// Logits of every position of `tokens` from the random model of `cfg` on `b`.
fn logits<B: Backend>(b: &B, cfg: &ModelConfig, tokens: &[u32]) -> Vec<f32> {
    let model = Llama::random(b, cfg, 5, 128, Shard::single(), |_| {}).unwrap();
    let mut cache = b.new_kv_cache(&model.kv_cache_spec(8, 16)).unwrap();
    let mut batch = Batch::new(16);
    batch.push(tokens, 0, &(0..8).collect::<Vec<u32>>()).unwrap();
    let rows: Vec<usize> = (0..tokens.len()).collect();
    model.forward(b, &batch, &mut cache, &rows, &SingleRank).unwrap()
}
