//! Every CUDA op against the CPU backend, one table-driven test per op family.

use super::*;
use tulu::unstable::quant::kv::KvFormat;

#[test]
#[ignore = "needs a CUDA GPU"]
fn load_weight_streams_every_dtype_slice_and_padding() {
    let (cpu, gpu) = (CpuBackend::new(), gpu());
    let mut rng = rng("load_weight");
    // More than one 4 Mi-element staging buffer, so copies cross buffers in the middle of a row.
    let (rows, cols) = (2100, 2101);
    let data = random(&mut rng, rows * cols, 4.0);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let bytes = encode(&data, dtype);
        let t = TensorRef { name: "w", file: Path::new("w.safetensors"), dtype, shape: &[rows, cols], bytes: &bytes };
        // Two parts fused along rows: a row and column slice followed by zero rows (a padded
        // vocab shard), then all rows of the same columns (a row-parallel rank's part).
        let mut first = t.slice(3..1500, 7..2007);
        first.pad_rows = 5;
        let parts = [first, t.slice(0..rows, 7..2007)];
        let (cw, gw) = (cpu.load_weight(&parts).unwrap(), gpu.load_weight(&parts).unwrap());
        let ids: Vec<u32> = (0..(1497 + 5 + rows) as u32).collect();
        let c = cpu.to_host(&cpu.embed(&cw, &cpu.ids_step(&ids, &[])).unwrap()).unwrap();
        let g = gpu.to_host(&gpu.embed(&gw, &gpu.ids_step(&ids, &[])).unwrap()).unwrap();
        assert_close(&format!("load_weight {dtype:?}"), &g, &c, OP_TOL);
        let mismatched = [t.slice(0..2, 0..10), t.slice(0..2, 0..11)];
        assert!(gpu.load_weight(&mismatched).is_err(), "parts of different widths must not fuse");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rms_norm_and_add_rms_norm_match_cpu() {
    let (cpu, gpu) = (CpuBackend::new(), gpu());
    let mut rng = rng("rms_norm");
    // Widths: 16-byte path (multiples of 8), scalar path (others), one row and many.
    for &(rows, cols) in &[(1, 64), (3, 4096), (5, 100), (2, 8), (17, 257), (64, 2048), (1, 16384)] {
        let what = format!("rms_norm {rows}×{cols}");
        let (x, r) = (random(&mut rng, rows * cols, 2.0), random(&mut rng, rows * cols, 2.0));
        let w = random(&mut rng, cols, 1.5);
        let (cw, gw) = (weight(&cpu, &w, &[cols]), weight(&gpu, &w, &[cols]));
        let (cx, gx) = (tensor(&cpu, &x, rows, cols), tensor(&gpu, &x, rows, cols));
        let c = cpu.to_host(&cpu.rms_norm(&cx, &cw, 1e-5).unwrap()).unwrap();
        let g = gpu.to_host(&gpu.rms_norm(&gx, &gw, 1e-5).unwrap()).unwrap();
        assert_close(&what, &g, &c, OP_TOL);

        let (mut cx, mut gx) = (cx, gx);
        let (cr, gr) = (tensor(&cpu, &r, rows, cols), tensor(&gpu, &r, rows, cols));
        let c = cpu.to_host(&cpu.add_rms_norm(&mut cx, &cr, &cw, 1e-5).unwrap()).unwrap();
        let g = gpu.to_host(&gpu.add_rms_norm(&mut gx, &gr, &gw, 1e-5).unwrap()).unwrap();
        assert_close(&format!("add_{what} (normed)"), &g, &c, OP_TOL);
        assert_close(
            &format!("add_{what} (x + residual)"),
            &gpu.to_host(&gx).unwrap(),
            &cpu.to_host(&cx).unwrap(),
            OP_TOL,
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn matmul_matches_cpu() {
    let (cpu, gpu) = (CpuBackend::new(), gpu());
    let mut rng = rng("matmul");
    // (tokens, in, out): decode and prefill rows, Llama-like and odd shapes.
    for &(m, k, n) in
        &[(1, 64, 64), (1, 4096, 6144), (7, 512, 300), (33, 1000, 257), (128, 256, 512), (5, 99, 37), (2, 64, 160)]
    {
        let x = random(&mut rng, m * k, 1.0);
        let w = random(&mut rng, n * k, (1.0 / k as f32).sqrt() * 1.7);
        let c = cpu.to_host(&cpu.matmul(&tensor(&cpu, &x, m, k), &weight(&cpu, &w, &[n, k])).unwrap()).unwrap();
        let g = gpu.to_host(&gpu.matmul(&tensor(&gpu, &x, m, k), &weight(&gpu, &w, &[n, k])).unwrap()).unwrap();
        assert_close(&format!("matmul {m}×{k} · ({n}×{k})ᵀ"), &g, &c, OP_TOL);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn elementwise_embedding_and_gather_match_cpu() {
    let (cpu, gpu) = (CpuBackend::new(), gpu());
    let mut rng = rng("elementwise");
    for &(rows, inter) in &[(3, 160), (1, 14336), (9, 37), (64, 512)] {
        let gu = random(&mut rng, rows * 2 * inter, 4.0);
        let c = cpu.to_host(&cpu.silu_mul(&tensor(&cpu, &gu, rows, 2 * inter)).unwrap()).unwrap();
        let g = gpu.to_host(&gpu.silu_mul(&tensor(&gpu, &gu, rows, 2 * inter)).unwrap()).unwrap();
        assert_close(&format!("silu_mul {rows}×{inter}"), &g, &c, OP_TOL);
    }
    for &(rows, cols) in &[(4, 100), (1, 4096), (13, 7)] {
        let x = random(&mut rng, rows * cols, 3.0);
        let (cx, gx) = (tensor(&cpu, &x, rows, cols), tensor(&gpu, &x, rows, cols));

        let pick = [rows - 1, 0, rows / 2, rows - 1];
        let ids = vec![0; rows];
        let c = cpu.to_host(&cpu.gather_rows(&cx, &cpu.ids_step(&ids, &pick)).unwrap()).unwrap();
        let g = gpu.to_host(&gpu.gather_rows(&gx, &gpu.ids_step(&ids, &pick)).unwrap()).unwrap();
        assert_close(&format!("gather_rows {rows}×{cols}"), &g, &c, OP_TOL);
        let past = gpu.ids_step(&ids, &[rows]);
        assert!(gpu.gather_rows(&gx, &past).is_err(), "gather_rows past the end must fail");
    }
    for &(vocab, cols) in &[(300, 64), (1000, 4096), (17, 24)] {
        let table = random(&mut rng, vocab * cols, 1.0);
        let ids: Vec<u32> = (0..11).map(|_| rng.random_range(0..vocab as u32)).chain([0, vocab as u32 - 1]).collect();
        let ct = weight(&cpu, &table, &[vocab, cols]);
        let c = cpu.to_host(&cpu.embed(&ct, &cpu.ids_step(&ids, &[])).unwrap()).unwrap();
        let gt = weight(&gpu, &table, &[vocab, cols]);
        let g = gpu.to_host(&gpu.embed(&gt, &gpu.ids_step(&ids, &[])).unwrap()).unwrap();
        assert_close(&format!("embed {vocab}×{cols}"), &g, &c, OP_TOL);
        // Ids past the table (another vocab-parallel rank's) give zero rows.
        let past = gpu.ids_step(&[vocab as u32, 0, u32::MAX], &[]);
        let g = gpu.to_host(&gpu.embed(&gt, &past).unwrap()).unwrap();
        assert!(g[..cols].iter().chain(&g[2 * cols..]).all(|&x| x == 0.0), "embed {vocab}×{cols}: id past the table");
        assert_close(&format!("embed {vocab}×{cols} row 0"), &g[cols..2 * cols], &table[..cols], OP_TOL);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn argmax_matches_host_argmax() {
    let gpu = gpu();
    let mut rng = rng("argmax");
    for &(rows, cols, sample) in &[(1, 128_264, 128_257), (3, 1000, 990), (5, 300, 300), (2, 33, 1)] {
        let mut logits = random(&mut rng, rows * cols, 8.0);
        // Row 0: the largest value sits in the padding and must be ignored; row 1 has a tie.
        logits[cols - 1] = 100.0;
        if rows > 1 && sample > 3 {
            logits[cols + 1] = 50.0;
            logits[cols + 3] = 50.0;
        }
        let t = gpu.tensor_from_host(&logits, rows, cols).unwrap();
        let ids = gpu.argmax(&t, sample).unwrap();
        let host = gpu.to_host(&t).unwrap();
        for (r, &id) in ids.iter().enumerate() {
            let row = &host[r * cols..r * cols + sample];
            let want = tulu::unstable::runtime::sampler::argmax(row);
            assert_eq!(id, want, "argmax row {r} of {rows}×{cols} (sample {sample})");
        }
    }
}

/// The GPU `sample` op picks the token `sample_row` picks on the host from the same bf16 logits,
/// for every filter and their combination, never a padded column. Thresholds are exact on both
/// sides (integer masses), but `expf` on the GPU and the host may differ in the last bit, which
/// can move a draw that lands right on a boundary: at most 1% of draws may differ.
#[test]
#[ignore = "needs a CUDA GPU"]
fn sample_matches_the_host_sampler() {
    use tulu::unstable::runtime::sampler::{sample_row, RowSampling};
    let gpu = gpu();
    let mut rng = rng("sample");
    let base = RowSampling { temperature: 0.8, ..RowSampling::greedy() };
    let settings = [
        RowSampling { repetition_penalty: 1.3, penalized: vec![0, 5, 17, 40], ..RowSampling::greedy() },
        base.clone(),
        RowSampling { top_k: 20, ..base.clone() },
        RowSampling { top_k: 1, ..base.clone() },
        RowSampling { top_p: 0.9, ..base.clone() },
        RowSampling { top_p: 0.3, temperature: 1.7, ..base.clone() },
        RowSampling { min_p: 0.05, ..base.clone() },
        RowSampling { top_k: 50, top_p: 0.95, min_p: 0.02, repetition_penalty: 1.2, penalized: vec![1, 2, 3], ..base },
    ];
    let (mut draws, mut differ) = (0, 0);
    for &(cols, valid) in &[(128_264, 128_256), (1000, 990), (300, 300)] {
        for setting in &settings {
            let rows = 16;
            let mut logits = random(&mut rng, rows * cols, 6.0);
            for r in 0..rows {
                for c in valid..cols {
                    logits[r * cols + c] = 1e4; // padding: never picked, however likely
                }
            }
            let t = gpu.tensor_from_host(&logits, rows, cols).unwrap();
            let host = gpu.to_host(&t).unwrap();
            let per_row: Vec<RowSampling> =
                (0..rows).map(|_| RowSampling { uniform: rng.random::<f32>(), ..setting.clone() }).collect();
            let ids = gpu.sample(&t, &gpu.rows_step(rows), &per_row, valid, None).unwrap();
            for (r, (&id, s)) in ids.iter().zip(&per_row).enumerate() {
                assert!((id as usize) < valid, "{s:?}: row {r} picked padded column {id}");
                let want = sample_row(&host[r * cols..(r + 1) * cols], valid, s, None);
                draws += 1;
                if id != want {
                    differ += 1;
                    eprintln!("{cols}/{valid} {s:?} row {r}: GPU {id}, host {want}");
                }
            }
            // Greedy rows must agree exactly.
            if setting.temperature == 0.0 {
                let want: Vec<u32> = per_row
                    .iter()
                    .enumerate()
                    .map(|(r, s)| sample_row(&host[r * cols..(r + 1) * cols], valid, s, None))
                    .collect();
                assert_eq!(ids, want, "greedy with penalty");
            }
        }
    }
    assert!(differ * 100 <= draws, "{differ} of {draws} draws differ from the host sampler");
}

/// A row with a NaN or infinite logit among its candidates is flagged (`NON_FINITE`), greedy or
/// sampled, as the host sampler flags it; a non-finite value past `valid` (padding) is not.
#[test]
#[ignore = "needs a CUDA GPU"]
fn sample_flags_non_finite_rows() {
    use tulu::unstable::runtime::sampler::{sample_row, RowSampling, NON_FINITE};
    let gpu = gpu();
    let (rows, cols, valid) = (4, 1000, 990);
    let mut logits = random(&mut rng("non-finite"), rows * cols, 3.0);
    logits[5] = f32::NAN;
    logits[cols + 900] = f32::INFINITY;
    logits[2 * cols + 995] = f32::NAN; // padding: ignored
    let t = gpu.tensor_from_host(&logits, rows, cols).unwrap();
    for s in
        [RowSampling::greedy(), RowSampling { temperature: 0.9, top_p: 0.8, uniform: 0.3, ..RowSampling::greedy() }]
    {
        let ids = gpu.sample(&t, &gpu.rows_step(rows), &vec![s.clone(); rows], valid, None).unwrap();
        let want: Vec<u32> =
            (0..rows).map(|r| sample_row(&logits[r * cols..(r + 1) * cols], valid, &s, None)).collect();
        assert_eq!((ids[0], ids[1]), (NON_FINITE, NON_FINITE), "{s:?}");
        assert_eq!(ids, want, "{s:?}");
    }
}

/// Token masks (structured outputs): greedy and sampled rows take only the columns their mask
/// allows, as the host sampler does with the same mask — a masked column that would win, or
/// holds NaN, is neither picked nor flagged; an allowed NaN still flags the row.
#[test]
#[ignore = "needs a CUDA GPU"]
fn sample_follows_token_masks() {
    use tulu::unstable::runtime::sampler::{sample_row, RowSampling, NON_FINITE};
    use tulu::unstable::runtime::token_mask::{allows, TokenMasks};
    let gpu = gpu();
    let mut rng = rng("masks");
    let (rows, cols, valid) = (6, 1000, 990);
    let mut logits = random(&mut rng, rows * cols, 4.0);
    let mut masks = TokenMasks::allow_all(rows, cols);
    for r in 0..rows {
        let row = &mut masks.bits[r * masks.words..(r + 1) * masks.words];
        match r {
            0 => {} // all allowed
            1 => {
                row.fill(0);
                row[7] = 1 << 3; // only column 227
            }
            _ => row.iter_mut().for_each(|w| *w = rng.random::<u32>()),
        }
    }
    // Row 2: a masked column holds the largest logit and row 3 a masked NaN; row 4 an allowed NaN.
    let masked = |m: &TokenMasks, r: usize| (0..valid).find(|&c| !allows(m.row(r).unwrap(), c)).unwrap();
    let (c2, c3) = (masked(&masks, 2), masked(&masks, 3));
    logits[2 * cols + c2] = 1e3;
    logits[3 * cols + c3] = f32::NAN;
    let c4 = (0..valid).find(|&c| allows(masks.row(4).unwrap(), c)).unwrap();
    logits[4 * cols + c4] = f32::NAN;
    let t = gpu.tensor_from_host(&logits, rows, cols).unwrap();
    let host = gpu.to_host(&t).unwrap();
    let sampled = RowSampling { temperature: 0.9, top_p: 0.95, ..RowSampling::greedy() };
    let (mut draws, mut differ) = (0, 0);
    for trial in 0..8 {
        let s =
            if trial == 0 { RowSampling::greedy() } else { RowSampling { uniform: rng.random(), ..sampled.clone() } };
        let ids = gpu.sample(&t, &gpu.rows_step(rows), &vec![s.clone(); rows], valid, Some(&masks)).unwrap();
        for (r, &id) in ids.iter().enumerate() {
            let want = sample_row(&host[r * cols..(r + 1) * cols], valid, &s, masks.row(r));
            assert_eq!(id == NON_FINITE, r == 4, "{s:?} row {r}: {id}");
            assert!(id == NON_FINITE || allows(masks.row(r).unwrap(), id as usize), "{s:?} row {r}: masked {id}");
            if r == 1 {
                assert_eq!(id, 227);
            }
            draws += 1;
            differ += usize::from(id != want);
            if s.temperature == 0.0 {
                assert_eq!(id, want, "greedy row {r}");
            }
        }
    }
    assert!(differ * 20 <= draws, "{differ} of {draws} masked draws differ from the host sampler");
}

/// Decode matmuls (1 to 8 rows) through our GEMV and through cuBLASLt both match the CPU, on
/// odd output widths and inner dimensions that are and are not multiples of 8 (those always go
/// to cuBLASLt); the automatic choice records every shape it measured.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gemv_and_cublaslt_decode_matmuls_match_cpu() {
    use tulu::unstable::backend::cuda::GemvMode;
    let gpu = gpu();
    let cpu = CpuBackend::new();
    let mut rng = rng("gemv");
    // The Llama-8B shapes (6144×4096 and 4096×14336) are the timing's point on a GPU; the
    // emulator runs the same code on a large-enough stand-in.
    let big: &[(usize, usize)] = if emulated() { &[(1024, 2048)] } else { &[(6144, 4096), (4096, 14336)] };
    for &(n, k) in [(1, 8), (37, 64), (200, 1000), (333, 4096), (96, 1003)].iter().chain(big) {
        let w = random(&mut rng, n * k, 1.0 / (k as f32).sqrt());
        let (gw, cw) = (weight(&gpu, &w, &[n, k]), weight(&cpu, &w, &[n, k]));
        for m in 1..=8 {
            let x = random(&mut rng, m * k, 1.0);
            let c = cpu.to_host(&cpu.matmul(&tensor(&cpu, &x, m, k), &cw).unwrap()).unwrap();
            for mode in [GemvMode::Always, GemvMode::Never, GemvMode::Auto] {
                gpu.set_gemv_mode(mode);
                let g = gpu.to_host(&gpu.matmul(&tensor(&gpu, &x, m, k), &gw).unwrap()).unwrap();
                assert_close(&format!("{mode:?} {m}×{k} · ({n}×{k})ᵀ"), &g, &c, OP_TOL);
            }
        }
    }
    let measured = gpu.gemv_choices();
    assert!(measured.iter().any(|c| (c.m, c.n, c.k) == (1, big[0].0, big[0].1)), "{measured:?}");
    assert!(measured.iter().all(|c| c.k % 8 == 0 && c.gemv_us > 0.0 && c.blas_us > 0.0));
    for c in &measured {
        eprintln!("{c:?}");
    }
}

/// One attention configuration: head geometry, cache paging and the steps to run.
pub(super) struct AttnCase {
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) block_size: usize,
    /// Steps; each lists, per sequence, how many new tokens it feeds (0: not in this step).
    pub(super) steps: Vec<Vec<usize>>,
}

/// Runs `case` on both backends through rope_write_kv and attention (on layer 1 of a 2-layer
/// cache, with shuffled block tables) and compares q and the attention output at every step.
fn run_attention_case(cpu: &CpuBackend, gpu: &CudaBackend, rng: &mut StdRng, case: &AttnCase) {
    run_attention_case_kv(cpu, gpu, rng, case, KvFormat::Model);
}

/// [`run_attention_case`] with caches of format `kv` (an FP8 one: two layers of scales). An FP8
/// cache's e4m3 bytes are checked bit for bit against the CPU's after every KV write, before
/// attention reads them.
pub(super) fn run_attention_case_kv(
    cpu: &CpuBackend,
    gpu: &CudaBackend,
    rng: &mut StdRng,
    case: &AttnCase,
    kv: KvFormat,
) {
    let dims = AttnDims { heads: case.heads, kv_heads: case.kv_heads, head_dim: case.head_dim };
    let seqs = case.steps[0].len();
    let totals: Vec<usize> = (0..seqs).map(|s| case.steps.iter().map(|st| st[s]).sum()).collect();
    let max_pos = totals.iter().copied().max().unwrap_or(1).max(1);
    let blocks_per_seq: Vec<usize> = totals.iter().map(|t| t.div_ceil(case.block_size)).collect();
    let num_blocks: usize = blocks_per_seq.iter().sum::<usize>() + 3;
    // Shuffled physical blocks, so that logical neighbours are never physical neighbours.
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.random_range(0..=i));
    }
    let mut tables = Vec::new();
    let mut next = 0;
    for &n in &blocks_per_seq {
        tables.push(ids[next..next + n].to_vec());
        next += n;
    }
    // RoPE tables of plain frequencies: the kernel only reads them.
    let half = case.head_dim / 2;
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for p in 0..max_pos {
        for i in 0..half {
            let a = p as f32 * 10_000f32.powf(-(2.0 * i as f32) / case.head_dim as f32);
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let (ccos, csin) = (cpu.upload(&cos, max_pos, half).unwrap(), cpu.upload(&sin, max_pos, half).unwrap());
    let (gcos, gsin) = (gpu.upload(&cos, max_pos, half).unwrap(), gpu.upload(&sin, max_pos, half).unwrap());
    let spec = KvCacheSpec {
        layers: 2,
        num_blocks,
        block_size: case.block_size,
        kv_heads: case.kv_heads,
        head_dim: case.head_dim,
        kv,
    };
    let (mut ccache, mut gcache) = (cpu.new_kv_cache(&spec).unwrap(), gpu.new_kv_cache(&spec).unwrap());
    let width = dims.q_dim() + 2 * dims.kv_dim();
    let mut cached = vec![0usize; seqs];
    let mut written = Vec::new();
    let fp8 = matches!(spec.kv, KvFormat::Fp8(_));
    for (k, step) in case.steps.iter().enumerate() {
        let mut batch = Batch::new(case.block_size);
        for (s, &n) in step.iter().enumerate() {
            if n > 0 {
                let tokens = vec![0u32; n];
                batch.push(&tokens, cached[s], &tables[s]).unwrap();
                cached[s] += n;
            }
        }
        let rows = batch.num_tokens();
        written.extend_from_slice(&batch.slots);
        let what = format!(
            "heads {}/{} hd {} block {} step {k} {:?} kv {:?}",
            case.heads, case.kv_heads, case.head_dim, case.block_size, step, spec.kv
        );
        let qkv = random(rng, rows * width, 2.0);
        let (cq, gq) = (tensor(cpu, &qkv, rows, width), tensor(gpu, &qkv, rows, width));
        let cq = cpu.rope_write_kv(&cq, &ccos, &csin, 1, &mut ccache, &cpu.step_of(&batch, dims), dims).unwrap();
        let gq = gpu.rope_write_kv(&gq, &gcos, &gsin, 1, &mut gcache, &gpu.step_of(&batch, dims), dims).unwrap();
        assert_close(&format!("rope q: {what}"), &gpu.to_host(&gq).unwrap(), &cpu.to_host(&cq).unwrap(), OP_TOL);
        super::kv_fp8::assert_same_e4m3(&what, &ccache, gpu, &gcache, 1, &written, dims.kv_dim());
        let c = cpu.to_host(&cpu.attention(&cq, 1, &ccache, &cpu.step_of(&batch, dims), dims).unwrap()).unwrap();
        let g = gpu.to_host(&gpu.attention(&gq, 1, &gcache, &gpu.step_of(&batch, dims), dims).unwrap()).unwrap();
        // The GPU rounds q and k after rope and (tensor-core prefill, as FlashAttention-2) the
        // probabilities P to bf16 where the CPU keeps f32: each moves an output by up to about
        // 2^-9 · max|v| wherever the output's own magnitude is (a row of 23 keys measured 9e-3
        // at |ref| 0.016, v in ±2), so the floor is 2^-7 · max|v|. A wrong mask, tile or
        // rescale errs by tenths.
        // An FP8 cache: both sides read the same e4m3 values (checked above), so its rounding
        // cancels and the same floor holds, on the dequantized values (≤ (1 + 2⁻⁴)·max|v|).
        let vmax = qkv.iter().map(|x| x.abs()).fold(0f32, f32::max) * if fp8 { 17.0 / 16.0 } else { 1.0 };
        assert_close_floor(&format!("attention: {what}"), &g, &c, OP_TOL, vmax / 128.0);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rope_write_kv_and_attention_match_cpu() {
    let (cpu, gpu) = (CpuBackend::new(), gpu());
    let mut rng = rng("attention");
    // Prompt lengths around the key tiles (16/32/64) and the prefill row tiles. Under the
    // emulator (a CPU running every GPU thread) the long cases shrink; 300 keys still split
    // across blocks at decode and reach the combine kernel.
    let prompts: &[usize] =
        if emulated() { &[1, 7, 31, 33, 64, 65, 129] } else { &[1, 7, 31, 32, 33, 63, 64, 65, 129, 300] };
    let long = if emulated() { 300 } else { 2049 };
    let mut cases = Vec::new();
    for &(heads, kv_heads) in &[(8, 8), (16, 4), (32, 4)] {
        for &head_dim in &[64, 128] {
            // Prefill of several sequences of different lengths, then three decode steps, then
            // a chunked prefill (cached prefix + new tokens) beside a decode.
            let mut steps = vec![prompts.to_vec()];
            steps.extend((0..3).map(|_| vec![1; prompts.len()]));
            steps.push(prompts.iter().enumerate().map(|(i, _)| if i % 2 == 0 { 17 } else { 1 }).collect());
            cases.push(AttnCase { heads, kv_heads, head_dim, block_size: 16, steps });
            // One long sequence: decode splits the keys across blocks, then the combine runs.
            let steps = vec![vec![long], vec![1], vec![1]];
            cases.push(AttnCase { heads, kv_heads, head_dim, block_size: 32, steps });
        }
    }
    // The tiny model's geometry (head_dim 8, GQA 4) and an odd head count with head_dim 96.
    cases.push(AttnCase { heads: 8, kv_heads: 2, head_dim: 8, block_size: 16, steps: vec![vec![70, 3], vec![1, 1]] });
    cases.push(AttnCase {
        heads: 12,
        kv_heads: 3,
        head_dim: 96,
        block_size: 8,
        steps: vec![vec![45, 100], vec![1, 1]],
    });
    for case in &cases {
        run_attention_case(&cpu, &gpu, &mut rng, case);
    }
}

/// Prefill and chunked prefill on the tensor-core kernel (kernels/attention_mma.cu) at the GQA
/// ratios and paging the main test leaves out: 16 and 2 query heads per kv head, blocks of 8 and
/// 32 slots, prompts that are multiples of no tile, chunks after cached keys; and a prompt long
/// enough (75 tiles × 4 kv heads ≥ 2 blocks per emulated SM) that the keys are not split, the
/// path where the kernel writes `out` itself rather than partials for the combine.
#[test]
#[ignore = "needs a CUDA GPU"]
fn prefill_attention_on_tensor_cores_matches_cpu() {
    let (cpu, gpu) = (CpuBackend::new(), gpu());
    let mut rng = rng("attention-mma");
    let cases = [
        AttnCase { heads: 32, kv_heads: 2, head_dim: 64, block_size: 8, steps: vec![vec![37, 100], vec![23, 9]] },
        AttnCase { heads: 8, kv_heads: 4, head_dim: 128, block_size: 32, steps: vec![vec![95, 3], vec![40, 1]] },
        AttnCase { heads: 32, kv_heads: 4, head_dim: 128, block_size: 16, steps: vec![vec![600], vec![5]] },
    ];
    for case in &cases {
        run_attention_case(&cpu, &gpu, &mut rng, case);
    }
}

/// A non-finite key or value reaches exactly the rows that attend to it, as on the CPU: never an
/// earlier row of the same tile (a masked key's weight is 0, but 0 · NaN is NaN), and never
/// vanishes (a NaN softmax sum must not become an output of 0, nor a split dropped when splits
/// are combined). Prefill of 70 rows with position 20 poisoned, then a decode at 2000 (split).
#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_confines_non_finite_keys_to_the_rows_that_see_them() {
    let (cpu, gpu) = (CpuBackend::new(), gpu());
    let dims = AttnDims { heads: 4, kv_heads: 1, head_dim: 64 };
    let width = dims.q_dim() + 2 * dims.kv_dim();
    let bs = 16;
    let table: Vec<u32> = (0..130).collect();
    let spec =
        KvCacheSpec { layers: 1, num_blocks: 130, block_size: bs, kv_heads: 1, head_dim: 64, kv: Default::default() };
    let (mut ccache, mut gcache) = (cpu.new_kv_cache(&spec).unwrap(), gpu.new_kv_cache(&spec).unwrap());
    let zeros = vec![0f32; 2048 * 32];
    let ones = vec![1f32; 2048 * 32];
    let (cc, cs) = (cpu.upload(&ones, 2048, 32).unwrap(), cpu.upload(&zeros, 2048, 32).unwrap());
    let (gc, gs) = (gpu.upload(&ones, 2048, 32).unwrap(), gpu.upload(&zeros, 2048, 32).unwrap());
    let mut rng = rng("attention-nan");
    let steps: [(usize, usize); 2] = [(0, 70), (2000, 1)];
    for (first, rows) in steps {
        let mut data = random(&mut rng, rows * width, 1.0);
        if first == 0 {
            // Position 20's key and value.
            data[20 * width + dims.q_dim()..21 * width].iter_mut().for_each(|x| *x = f32::NAN);
        }
        let mut batch = Batch::new(bs);
        if first == 0 {
            batch.push(&vec![1; rows], 0, &table[..5]).unwrap();
        } else {
            // Positions 70..2000 hold finite keys written as a second prefill.
            let fill = random(&mut rng, (first - 70) * width, 1.0);
            let mut fb = Batch::new(bs);
            fb.push(&vec![1; first - 70], 70, &table[..126]).unwrap();
            let (cf, gf) = (tensor(&cpu, &fill, first - 70, width), tensor(&gpu, &fill, first - 70, width));
            cpu.rope_write_kv(&cf, &cc, &cs, 0, &mut ccache, &cpu.step_of(&fb, dims), dims).unwrap();
            gpu.rope_write_kv(&gf, &gc, &gs, 0, &mut gcache, &gpu.step_of(&fb, dims), dims).unwrap();
            batch.push(&[1], first, &table[..126]).unwrap();
        }
        let (cq, gq) = (tensor(&cpu, &data, rows, width), tensor(&gpu, &data, rows, width));
        let cq = cpu.rope_write_kv(&cq, &cc, &cs, 0, &mut ccache, &cpu.step_of(&batch, dims), dims).unwrap();
        let gq = gpu.rope_write_kv(&gq, &gc, &gs, 0, &mut gcache, &gpu.step_of(&batch, dims), dims).unwrap();
        let c = cpu.to_host(&cpu.attention(&cq, 0, &ccache, &cpu.step_of(&batch, dims), dims).unwrap()).unwrap();
        let g = gpu.to_host(&gpu.attention(&gq, 0, &gcache, &gpu.step_of(&batch, dims), dims).unwrap()).unwrap();
        let q = dims.q_dim();
        for r in 0..rows {
            let (cr, gr) = (&c[r * q..(r + 1) * q], &g[r * q..(r + 1) * q]);
            let bad = |x: &[f32]| x.iter().all(|v| !v.is_finite());
            let pos = first + r;
            assert_eq!(bad(cr), pos >= 20, "CPU row at position {pos}");
            assert_eq!(bad(gr), bad(cr), "GPU row at position {pos}: {:?}", &gr[..4]);
            if !bad(cr) {
                assert_close(&format!("attention row {pos}"), gr, cr, OP_TOL);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_rejects_a_batch_outside_the_cache() {
    let gpu = gpu();
    let dims = AttnDims { heads: 4, kv_heads: 1, head_dim: 64 };
    let spec =
        KvCacheSpec { layers: 1, num_blocks: 2, block_size: 16, kv_heads: 1, head_dim: 64, kv: Default::default() };
    let mut cache = gpu.new_kv_cache(&spec).unwrap();
    let mut batch = Batch::new(16);
    batch.push(&[0; 4], 0, &[5]).unwrap(); // block 5 of a 2-block cache
    let qkv = gpu.tensor_from_host(&vec![0.0; 4 * 6 * 64], 4, 6 * 64).unwrap();
    let t = gpu.upload(&vec![0.0; 8 * 32], 8, 32).unwrap();
    let e = gpu.rope_write_kv(&qkv, &t, &t, 0, &mut cache, &gpu.step_of(&batch, dims), dims).err().expect("must fail");
    assert!(e.to_string().contains("outside the cache"), "{e}");
}
