//! Decode GEMVs with the next op fused into their epilogue (src/backend/cuda/gemv_epilogue.rs),
//! bf16 and FP8 weights: bit for bit the GEMV followed by the unfused op, and within OP_TOL of the
//! CPU's pair.

use super::*;

/// The gate/up GEMV with SiLU·mul in its epilogue (1 to 8 rows), bf16 and FP8 weights: bit for
/// bit the GEMV followed by `silu_mul`, and within OP_TOL of the CPU's pair; inter widths on both
/// sides of a block's four rows, and prefill rows (cuBLASLt or the FP8 GEMM, then `silu_mul`).
#[test]
#[ignore = "needs a CUDA GPU"]
fn gate_up_gemv_with_silu_mul_matches_the_pair_and_the_cpu() {
    use tulu::unstable::backend::cuda::GemvMode;
    let gpu = gpu();
    let cpu = CpuBackend::new();
    let mut rng = rng("gemv silu");
    gpu.set_gemv_mode(GemvMode::Always);
    // FP8 prefill rows weight-only, as the CPU computes them (tests/gpu/fp8.rs tests the FP8 GEMM).
    gpu.set_fp8_gemm(false);
    let big = if emulated() { (1000, 512) } else { (14336, 4096) };
    for ((inter, k), fp8) in
        [(1, 8), (3, 64), (37, 200), (160, 64), big].into_iter().flat_map(|s| [(s, false), (s, true)])
    {
        let w = random(&mut rng, 2 * inter * k, 1.0 / (k as f32).sqrt());
        let shape = [2 * inter, k];
        let (gw, cw) = (weight_in(&gpu, &w, &shape, fp8), weight_in(&cpu, &w, &shape, fp8));
        for m in [1, 2, 5, 8, 9] {
            let x = random(&mut rng, m * k, 2.0);
            let (gx, cx) = (tensor(&gpu, &x, m, k), tensor(&cpu, &x, m, k));
            let fused = gpu.to_host(&gpu.matmul_silu_mul(&gx, &gw).unwrap()).unwrap();
            let pair = gpu.to_host(&gpu.silu_mul(&gpu.matmul(&gx, &gw).unwrap()).unwrap()).unwrap();
            let what = format!("silu_mul({m}×{k} · ({}×{k})ᵀ), fp8 {fp8}", 2 * inter);
            if let Some(i) = fused.iter().zip(&pair).position(|(a, b)| a.to_bits() != b.to_bits()) {
                panic!("{what}: element {i} is {} fused, {} as the pair", fused[i], pair[i]);
            }
            let c = cpu.to_host(&cpu.matmul_silu_mul(&cx, &cw).unwrap()).unwrap();
            assert_close(&what, &fused, &c, OP_TOL);
        }
    }
    gpu.set_gemv_mode(GemvMode::Auto);
}

/// The qkv GEMV with RoPE and the KV cache write in its epilogue (1 to 8 rows, and prefill rows
/// through cuBLASLt + rope_write_kv): q bit for bit that of the unfused pair, and attention over
/// the cache each wrote bit for bit too (k and v landed in the same slots with the same bits);
/// both within OP_TOL of the CPU's pair. GQA 4:1 and 1:1, head sizes 8 and 64, bf16 and FP8
/// weights (k = 136 is not an FP8 GEMV width: the pair runs there), bf16 and FP8 KV caches (an
/// FP8 cache's e4m3 bytes equal the pair's too; its attention is not compared with the CPU's
/// here: the GPU quantizes k and v from the bf16 GEMV output, the CPU from f32, so a value near
/// an e4m3 rounding boundary can land one step apart — kv_fp8.rs checks the pair against the
/// CPU's bytes on shared inputs).
#[test]
#[ignore = "needs a CUDA GPU"]
fn qkv_gemv_with_rope_and_kv_write_matches_the_pair_and_the_cpu() {
    use tulu::unstable::backend::cuda::GemvMode;
    let gpu = gpu();
    let cpu = CpuBackend::new();
    let mut rng = rng("gemv rope");
    gpu.set_gemv_mode(GemvMode::Always);
    gpu.set_fp8_gemm(false);
    let cases = [(8, 2, 8, 64), (3, 3, 64, 136), (3, 3, 64, 144)];
    let variants = cases.into_iter().flat_map(|c| [(c, false), (c, true)]);
    for (((heads, kv_heads, hd, k), fp8), fp8_kv) in variants.flat_map(|v| [(v, false), (v, true)]) {
        let kv = if fp8_kv { super::kv_fp8::two_layer_scales() } else { Default::default() };
        let dims = AttnDims { heads, kv_heads, head_dim: hd };
        let n = dims.q_dim() + 2 * dims.kv_dim();
        let w = random(&mut rng, n * k, 1.0 / (k as f32).sqrt());
        let (gw, cw) = (weight_in(&gpu, &w, &[n, k], fp8), weight_in(&cpu, &w, &[n, k], fp8));
        let max_pos = 64;
        let angle = |p: usize, i: usize| p as f32 * 10_000f32.powf(-(2.0 * i as f32) / hd as f32);
        let cos: Vec<f32> = (0..max_pos * hd / 2).map(|j| angle(j / (hd / 2), j % (hd / 2)).cos()).collect();
        let sin: Vec<f32> = (0..max_pos * hd / 2).map(|j| angle(j / (hd / 2), j % (hd / 2)).sin()).collect();
        let (gc, gs) = (gpu.upload(&cos, max_pos, hd / 2).unwrap(), gpu.upload(&sin, max_pos, hd / 2).unwrap());
        let (cc, cs) = (cpu.upload(&cos, max_pos, hd / 2).unwrap(), cpu.upload(&sin, max_pos, hd / 2).unwrap());
        let spec = KvCacheSpec { layers: 2, num_blocks: 40, block_size: 16, kv_heads, head_dim: hd, kv };
        let (mut fused_cache, mut pair_cache) = (gpu.new_kv_cache(&spec).unwrap(), gpu.new_kv_cache(&spec).unwrap());
        let mut cpu_cache = cpu.new_kv_cache(&spec).unwrap();
        for m in [1, 3, 8, 9] {
            // m sequences with 2s + m cached tokens (written by the pair into every cache), then
            // one new token each: fused against the pair.
            let tables: Vec<Vec<u32>> = (0..m).map(|s| (0..4).map(|b| (s * 4 + b) as u32).collect()).collect();
            let (mut pre, mut batch) = (Batch::new(16), Batch::new(16));
            for (s, table) in tables.iter().enumerate() {
                pre.push(&vec![0; 2 * s + m], 0, table).unwrap();
                batch.push(&[0], 2 * s + m, table).unwrap();
            }
            let rows = pre.num_tokens();
            let xp = random(&mut rng, rows * k, 1.0);
            for cache in [&mut fused_cache, &mut pair_cache] {
                let y = gpu.matmul(&tensor(&gpu, &xp, rows, k), &gw).unwrap();
                gpu.rope_write_kv(&y, &gc, &gs, 1, cache, &gpu.step_of(&pre, dims), dims).unwrap();
            }
            let y = cpu.matmul(&tensor(&cpu, &xp, rows, k), &cw).unwrap();
            cpu.rope_write_kv(&y, &cc, &cs, 1, &mut cpu_cache, &cpu.step_of(&pre, dims), dims).unwrap();

            let x = random(&mut rng, m * k, 1.0);
            let what = format!("heads {heads}/{kv_heads} hd {hd} k {k}, {m} rows, fp8 {fp8}, fp8 KV {fp8_kv}");
            let gx = tensor(&gpu, &x, m, k);
            let fq = gpu
                .matmul_rope_write_kv(&gx, &gw, &gc, &gs, 1, &mut fused_cache, &gpu.step_of(&batch, dims), dims)
                .unwrap();
            let pq = gpu.rope_write_kv(
                &gpu.matmul(&gx, &gw).unwrap(),
                &gc,
                &gs,
                1,
                &mut pair_cache,
                &gpu.step_of(&batch, dims),
                dims,
            );
            let pq = pq.unwrap();
            let cx = tensor(&cpu, &x, m, k);
            let cq = cpu
                .matmul_rope_write_kv(&cx, &cw, &cc, &cs, 1, &mut cpu_cache, &cpu.step_of(&batch, dims), dims)
                .unwrap();
            let (fqh, pqh) = (gpu.to_host(&fq).unwrap(), gpu.to_host(&pq).unwrap());
            assert_eq!(bits(&fqh), bits(&pqh), "q: {what}");
            assert_close(&format!("q: {what}"), &fqh, &cpu.to_host(&cq).unwrap(), OP_TOL);
            let fa =
                gpu.to_host(&gpu.attention(&fq, 1, &fused_cache, &gpu.step_of(&batch, dims), dims).unwrap()).unwrap();
            let pa =
                gpu.to_host(&gpu.attention(&pq, 1, &pair_cache, &gpu.step_of(&batch, dims), dims).unwrap()).unwrap();
            assert_eq!(bits(&fa), bits(&pa), "attention over the cache: {what}");
            let e4m3 = |c| gpu.kv_cache_e4m3_bits(c, 1).unwrap();
            assert_eq!(e4m3(&fused_cache), e4m3(&pair_cache), "e4m3 cache bytes: {what}");
            if fp8_kv {
                continue;
            }
            let ca =
                cpu.to_host(&cpu.attention(&cq, 1, &cpu_cache, &cpu.step_of(&batch, dims), dims).unwrap()).unwrap();
            assert_close(&format!("attention: {what}"), &fa, &ca, OP_TOL);
        }
    }
    gpu.set_gemv_mode(GemvMode::Auto);
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}
