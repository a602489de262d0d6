//! Whole models on the GPU: logits and greedy tokens against the CPU, random weights, loading
//! memory, tensor parallelism on one GPU, and NCCL.

use super::*;

/// Logits of `rows` for `steps` (prefill then decode) on one backend.
fn model_logits<B: Runtime>(b: &B, dir: &Path, steps: &[Vec<u32>]) -> Vec<Vec<f32>> {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open(dir).unwrap();
    let model = Llama::load(b, &cfg, &store, 256, Shard::single(), |_| {}).unwrap();
    let block_size = 16;
    let mut cache = b.new_kv_cache(&model.kv_cache_spec(32, block_size)).unwrap();
    // Blocks in reverse order, to exercise the block table.
    let table: Vec<u32> = (0..16u32).rev().collect();
    let mut cached = 0;
    let mut out = Vec::new();
    for tokens in steps {
        let mut batch = Batch::new(block_size);
        batch.push(tokens, cached, &table).unwrap();
        cached += tokens.len();
        let rows: Vec<usize> = (0..tokens.len()).collect();
        out.push(model.forward(b, &batch, &mut cache, &rows, &SingleRank).unwrap());
    }
    out
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn whole_model_logits_match_cpu() {
    let gpu = gpu();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny");
    let cfg = ModelConfig::preset("tiny").unwrap();
    synth_checkpoint(&cfg, &dir, &SynthOptions::default()).unwrap();
    // 70 prompt tokens (past the llama3 scaling's original context of 32, across blocks), then
    // three decode steps.
    let prompt: Vec<u32> = (0..70).map(|i| (i * 31 + 3) % 250).collect();
    let steps = vec![prompt, vec![5], vec![77], vec![250]];
    let c = model_logits(&CpuBackend::new(), &dir, &steps);
    // Decode steps with the GEMVs forced (the fused qkv+RoPE+KV write and gate/up+SiLU·mul
    // kernels; the emulator's timings pick cuBLASLt otherwise), then chosen by timing.
    for mode in [tulu::unstable::backend::cuda::GemvMode::Always, tulu::unstable::backend::cuda::GemvMode::Auto] {
        gpu.set_gemv_mode(mode);
        let g = model_logits(&gpu, &dir, &steps);
        for (k, (g, c)) in g.iter().zip(&c).enumerate() {
            for (r, (gr, cr)) in g.chunks(cfg.vocab_size).zip(c.chunks(cfg.vocab_size)).enumerate() {
                assert_close(&format!("{mode:?}: logits step {k} row {r}"), gr, cr, LOGITS_TOL);
            }
        }
    }
}

/// Random weights (`tulu bench --random-weights`) are generated on the GPU with the CPU's exact
/// values, slices and padding included; the random model's logits then match the CPU's.
#[test]
#[ignore = "needs a CUDA GPU"]
fn random_weights_match_cpu_bit_for_bit() {
    let gpu = gpu();
    let cpu = CpuBackend::new();
    let name = "model.layers.3.mlp.down_proj.weight";
    let parts = [
        RandomSlice::for_tensor(11, name, &[37, 203], 0..37, 5..70),
        RandomSlice {
            pad_rows: 3,
            ..RandomSlice::for_tensor(12, "model.embed_tokens.weight", &[90, 65], 40..90, 0..65)
        },
    ];
    let rows: Vec<u32> = (0..(37 + 50 + 3)).collect();
    // Embedding every row reads the weight back as an activation (bf16 on both sides).
    let g = gpu.to_host(&gpu.embed(&gpu.random_weight(&parts).unwrap(), &gpu.ids_step(&rows, &[])).unwrap()).unwrap();
    let c = cpu.to_host(&cpu.embed(&cpu.random_weight(&parts).unwrap(), &cpu.ids_step(&rows, &[])).unwrap()).unwrap();
    assert_eq!(g, c, "random weights differ between the GPU and the CPU");
    assert!(g[87 * 65..].iter().all(|&x| x == 0.0), "padding rows must be zero");

    let cfg = ModelConfig::preset("tiny").unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 37 + 1) % 300).collect();
    let g = random_model_logits(&gpu, &cfg, &tokens);
    let c = random_model_logits(&cpu, &cfg, &tokens);
    for (r, (gr, cr)) in g.chunks(cfg.vocab_size).zip(c.chunks(cfg.vocab_size)).enumerate() {
        assert_close(&format!("random model logits row {r}"), gr, cr, LOGITS_TOL);
    }
}

/// Logits of every position of `tokens` from the random model of `cfg` on `b`.
pub(super) fn random_model_logits<B: Runtime>(b: &B, cfg: &ModelConfig, tokens: &[u32]) -> Vec<f32> {
    let model = Llama::random(b, cfg, 5, 128, Shard::single(), |_| {}).unwrap();
    let mut cache = b.new_kv_cache(&model.kv_cache_spec(8, 16)).unwrap();
    let mut batch = Batch::new(16);
    batch.push(tokens, 0, &(0..8).collect::<Vec<u32>>()).unwrap();
    let rows: Vec<usize> = (0..tokens.len()).collect();
    model.forward(b, &batch, &mut cache, &rows, &SingleRank).unwrap()
}

/// Loading a 2.97 GB checkpoint onto the GPU grows host memory by at most 1 GiB plus one tensor
/// (the weights stream through 16 MiB of pinned staging; each tensor's mapped pages are dropped
/// once it is on the device), whatever the checkpoint's size.
#[test]
#[ignore = "needs a CUDA GPU"]
fn loading_onto_the_gpu_keeps_host_memory_flat() {
    use tulu::unstable::process_memory::{peak_rss_bytes, reset_peak_rss, rss_bytes};
    if emulated() {
        eprintln!("skipped: the emulator's device memory is host memory, so loading grows RSS by design");
        return;
    }
    gpu();
    let gpu = CudaBackend::new(0).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("8b-2-layers");
    let mut cfg = ModelConfig::preset("llama-3.1-8b").unwrap();
    cfg.num_hidden_layers = 2;
    synth_checkpoint(&cfg, &dir, &SynthOptions { dtype: OutDType::Bf16, ..Default::default() }).unwrap();
    let store = WeightStore::open(&dir).unwrap();
    let largest = store.names().iter().map(|n| store.get_any(n).unwrap().bytes.len() as u64).max().unwrap();
    assert!(reset_peak_rss(), "/proc/self/clear_refs is not writable");
    let base = rss_bytes().unwrap();
    let started = std::time::Instant::now();
    let model = Llama::load(&gpu, &cfg, &store, 64, Shard::single(), |_| {}).unwrap();
    gpu.synchronize().unwrap();
    let secs = started.elapsed().as_secs_f64();
    let growth = peak_rss_bytes().unwrap().saturating_sub(base);
    let bytes = model.resident_weight_elements() * 2;
    eprintln!(
        "loaded {:.2} GB in {secs:.2} s ({:.2} GB/s, page cache warm); host RSS grew {:.0} MB (largest tensor {:.0} MB)",
        bytes as f64 / 1e9,
        bytes as f64 / 1e9 / secs,
        growth as f64 / 1e6,
        largest as f64 / 1e6
    );
    assert!(growth <= (1 << 30) + largest, "host RSS grew by {growth} bytes while loading onto the GPU");
}

/// Logits of every position of `tokens` from one CUDA rank per communicator in `comms`, rank
/// `r` on GPU `device(r)` (its own backend, in its own thread, as the engine runs them).
fn cuda_tp_logits<C: Communicator<CudaBackend> + Send>(
    dir: &Path,
    tokens: &[u32],
    comms: Vec<C>,
    device: impl Fn(usize) -> usize + Sync,
) -> Vec<f32> {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open(dir).unwrap();
    let world = comms.len();
    common::ranks_logits(comms, tokens, |rank| {
        let backend = CudaBackend::with_debug(device(rank), POISON).unwrap();
        let model = Llama::load(&backend, &cfg, &store, 128, Shard { rank, world }, |_| {}).unwrap();
        (backend, model)
    })
}

/// `tp` ranks sharing GPU 0 through the host-staged in-process communicator.
fn shared_gpu_logits(dir: &Path, tp: usize, tokens: &[u32]) -> Vec<f32> {
    cuda_tp_logits(dir, tokens, LocalGroup::new(tp, Duration::from_secs(120)).communicators(), |_| 0)
}

/// The tiny preset (8 heads, 2 KV heads) with a vocab of 301 rows: shards at tp = 2, 4, 8 are
/// padded, and tp = 8 replicates each KV head on 4 ranks.
pub(crate) fn tiny_vocab301() -> std::path::PathBuf {
    let mut cfg = ModelConfig::preset("tiny").unwrap();
    cfg.vocab_size = 301;
    common::synth_dir("tiny-vocab301-f32", &cfg, OutDType::F32, None)
}

fn assert_logits_close(what: &str, vocab: usize, ours: &[f32], reference: &[f32]) {
    assert_eq!(ours.len(), reference.len(), "{what}: padding columns must be dropped");
    for (pos, (a, b)) in ours.chunks(vocab).zip(reference.chunks(vocab)).enumerate() {
        assert_close(&format!("{what} position {pos}"), a, b, LOGITS_TOL);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tp_2_4_8_on_one_gpu_match_tp_1() {
    gpu();
    let dir = tiny_vocab301();
    let tokens: Vec<u32> = (0..37).map(|i| (i * 17 + 5) % 290).collect();
    let reference = shared_gpu_logits(&dir, 1, &tokens);
    for tp in [2, 4, 8] {
        assert_logits_close(&format!("tp={tp}"), 301, &shared_gpu_logits(&dir, tp, &tokens), &reference);
    }
}

/// KV cache bytes per rank of the engine tests: tests share a device and run side by side, so
/// its free memory is not theirs to size from (tests/gpu_cli.rs covers sizing from memory).
const TEST_KV_BYTES: u64 = 64 << 20;

fn cuda_greedy(dir: &Path, tp: usize, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut opts = EngineOptions::new(dir.to_string_lossy()).device(Device::Cuda(0));
    // Decode graphs are captured at load for every bucket up to this; few, under the emulator.
    opts.max_num_seqs = 1;
    opts.tp = tp;
    // One GPU (a real machine's) holds all ranks, host-staged; several get NCCL.
    opts.share_gpus = true;
    opts.kv_cache_memory = Some(TEST_KV_BYTES);
    let engine = Engine::load(opts).unwrap();
    eprintln!("tp={tp}: {}", engine.device());
    let mut req = GenerateRequest::tokens(prompt.to_vec()).sampling(SamplingParams::greedy()).max_tokens(n);
    req.ignore_eos = true;
    common::run(&engine, req).1.tokens
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn smollm2_greedy_tokens_at_tp3_match_tp1_through_the_engine() {
    // SmolLM2-135M has 9 heads and 3 KV heads: tp = 3 is its only split besides 1 (2, 4 and 8
    // are checked on the synthetic model above). With one GPU the engine puts all three
    // ranks on it, host-staged; with three or more and NCCL, one rank per GPU.
    gpu();
    let dir = common::smollm2_dir();
    let tok = tulu::unstable::tokenizer::Tokenizer::from_dir(&dir).unwrap();
    let prompt = tok.encode_prompt("The capital of France is Paris, and the capital of Germany is").unwrap();
    let reference = cuda_greedy(&dir, 1, &prompt, 24);
    assert_eq!(cuda_greedy(&dir, 3, &prompt, 24), reference, "tp=3 greedy tokens");
}

/// Tensor-parallel engine options for the tiny model on `device`, each rank's cache small.
fn tp_options(tp: usize, device: usize) -> EngineOptions {
    let mut opts = EngineOptions::new(tiny_vocab301().to_string_lossy()).device(Device::Cuda(device));
    opts.tp = tp;
    opts.max_num_seqs = 1;
    opts.kv_cache_memory = Some(TEST_KV_BYTES);
    opts
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tp_without_a_gpu_per_rank_is_an_error_unless_gpus_may_be_shared() {
    gpu();
    let count = cudarc::driver::CudaContext::device_count().unwrap() as usize;
    // Two ranks from the last GPU: one GPU short.
    let err = Engine::load(tp_options(2, count - 1)).err().expect("two ranks on one GPU without share_gpus");
    assert!(err.to_string().contains("needs a GPU per rank"), "{err}");
    let mut shared = tp_options(2, count - 1);
    shared.share_gpus = true;
    let engine = Engine::load(shared).unwrap();
    assert!(engine.device().contains("host-staged"), "{}", engine.device());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn nccl_failing_to_start_is_an_error_naming_it() {
    // The emulator's library answers as libcuda, libcublasLt and libnccl: a directory offering
    // only the first two leaves NCCL missing, in a child process (libraries load once).
    const TEST: &str = "model::nccl_failing_to_start_is_an_error_naming_it";
    if std::env::var("TULU_GPU_CHILD").is_ok() {
        let result = Engine::load(tp_options(2, 0)).err().map(|e| e.to_string());
        println!("RESULT {result:?}");
        return;
    }
    gpu();
    let paths = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    let Some(emu) = paths.split(':').map(Path::new).find(|d| d.join("libtulu_cuda_emu.so").exists()) else {
        eprintln!("skipped: a real GPU's NCCL cannot be taken away from this process's children");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for lib in ["libcuda.so", "libcuda.so.1", "libcublasLt.so", "libcublasLt.so.13"] {
        std::os::unix::fs::symlink(emu.join("libtulu_cuda_emu.so"), dir.path().join(lib)).unwrap();
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--include-ignored", "--nocapture", "--test-threads=1"])
        .env("TULU_GPU_CHILD", "1")
        .env("LD_LIBRARY_PATH", dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result = stdout.lines().find_map(|l| l.split_once("RESULT ").map(|(_, r)| r.to_owned()));
    let result = result.unwrap_or_else(|| panic!("no result: {stdout}{}", String::from_utf8_lossy(&out.stderr)));
    assert!(result.contains("NCCL failed to start 2 ranks") && result.contains("libnccl"), "{result}");
}

/// Greedy tokens for each prompt through one engine on `device`, the requests submitted
/// together (batched, decode steps replaying CUDA graphs); with `kv_blocks`, a cache of that
/// many 4-token blocks. Also returns the engine's preemption count.
fn engine_greedy(
    dir: &Path,
    device: Device,
    prompts: &[Vec<u32>],
    n: usize,
    kv_blocks: Option<u64>,
) -> (Vec<Vec<u32>>, u64) {
    let mut opts = EngineOptions::new(dir.to_string_lossy()).device(device);
    // Decode graphs are captured at load for every bucket up to this; few, under the emulator.
    opts.max_num_seqs = prompts.len();
    opts.kv_cache_memory = Some(TEST_KV_BYTES);
    if let Some(blocks) = kv_blocks {
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        opts.block_size = 4;
        // bf16 on the GPU, f32 on the CPU: the same block count on both.
        let bytes = if device == Device::Cpu { 4 } else { 2 };
        opts.kv_cache_memory = Some(blocks * 4 * cfg.kv_bytes_per_token(bytes));
    }
    let engine = Engine::load(opts).unwrap();
    let tokens = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|prompt| {
                let engine = &engine;
                s.spawn(move || {
                    let mut req =
                        GenerateRequest::tokens(prompt.clone()).sampling(SamplingParams::greedy()).max_tokens(n);
                    req.ignore_eos = true;
                    common::run(engine, req).1.tokens
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (tokens, engine.metrics().preemptions)
}

/// Greedy continuations through the GPU engine (sampling on the device) equal the CPU engine's
/// for `n` tokens on every prompt. Where they diverge, the CPU's logits at that step are
/// recomputed: the two tokens' logits must be within bf16 noise of each other (relative to the
/// largest logit), else the test fails, reporting the margin. Returns the GPU's preemptions.
fn assert_greedy_matches_cpu(dir: &Path, prompts: &[Vec<u32>], n: usize, kv_blocks: Option<u64>) -> u64 {
    let vocab = ModelConfig::from_file(&dir.join("config.json")).unwrap().vocab_size;
    let cpu_all = engine_greedy(dir, Device::Cpu, prompts, n, kv_blocks).0;
    let (gpu_all, preemptions) = engine_greedy(dir, Device::Cuda(0), prompts, n, kv_blocks);
    for (p, ((prompt, cpu), gpu)) in prompts.iter().zip(cpu_all).zip(gpu_all).enumerate() {
        assert_eq!(gpu.len(), cpu.len(), "prompt {p}: lengths");
        let Some(step) = cpu.iter().zip(&gpu).position(|(a, b)| a != b) else { continue };
        let mut context = prompt.clone();
        context.extend_from_slice(&cpu[..step]);
        let all = model_logits(&CpuBackend::new(), dir, &[context.clone()]).remove(0);
        let last = &all[(context.len() - 1) * vocab..context.len() * vocab];
        let scale = last.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
        let margin = (last[cpu[step] as usize] - last[gpu[step] as usize]) / scale;
        eprintln!(
            "prompt {p}: GPU diverges at step {step} ({} vs CPU {}), CPU margin {margin:.2e}",
            gpu[step], cpu[step]
        );
        assert!(margin <= LOGITS_TOL, "prompt {p}: diverged at step {step} where the CPU's margin is {margin:.2e}");
    }
    preemptions
}

/// The tiny preset as a bf16 checkpoint in `tmp`.
fn tiny_bf16(tmp: &tempfile::TempDir) -> std::path::PathBuf {
    let dir = tmp.path().join("tiny-bf16");
    let cfg = ModelConfig::preset("tiny").unwrap();
    synth_checkpoint(&cfg, &dir, &SynthOptions { dtype: OutDType::Bf16, ..Default::default() }).unwrap();
    dir
}

/// `n` prompts of `first`, `first + step`, … tokens below 290 (the tiny vocabulary's tokens).
fn synthetic_prompts(n: usize, first: usize, step: usize) -> Vec<Vec<u32>> {
    (0..n).map(|k| (0..(first + step * k) as u32).map(|i| (i * 31 + 7 * k as u32 + 3) % 290).collect()).collect()
}

/// Six requests batched on a cache too small for them: decode batches of every size enter
/// and leave their graphs' buckets, sequences are preempted and recomputed, and every
/// request's greedy tokens still equal the CPU's.
#[test]
#[ignore = "needs a CUDA GPU"]
fn greedy_tokens_under_batching_and_preemption_with_graphs_match_cpu() {
    gpu();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_bf16(&tmp);
    let prompts = synthetic_prompts(6, 3, 7);
    let preemptions = assert_greedy_matches_cpu(&dir, &prompts, 24, Some(24));
    assert!(preemptions > 0, "24 blocks of 4 tokens for six sequences of up to 59 tokens must preempt");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn greedy_continuations_match_cpu_on_a_synthetic_model() {
    gpu();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_bf16(&tmp);
    assert_greedy_matches_cpu(&dir, &synthetic_prompts(4, 5, 13), 32, None);
}

/// Sampling on the GPU through the engine: a seed reproduces its tokens, another seed gives
/// other tokens, and every token is inside the tokenizer's vocabulary.
#[test]
#[ignore = "needs a CUDA GPU"]
fn seeded_sampling_on_the_gpu_reproduces() {
    gpu();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny-bf16");
    synth_checkpoint(
        &ModelConfig::preset("tiny").unwrap(),
        &dir,
        &SynthOptions { dtype: OutDType::Bf16, ..Default::default() },
    )
    .unwrap();
    let mut opts = EngineOptions::new(dir.to_string_lossy()).device(Device::Cuda(0));
    // Decode graphs are captured at load for every bucket up to this; few, under the emulator.
    opts.max_num_seqs = 1;
    opts.kv_cache_memory = Some(TEST_KV_BYTES);
    let engine = Engine::load(opts).unwrap();
    let vocab = engine.tokenizer().vocab_size() as u32;
    let draw = |seed| {
        let params =
            SamplingParams { temperature: 1.0, top_p: 0.95, top_k: 50, seed: Some(seed), ..Default::default() };
        let mut req = GenerateRequest::tokens(vec![5, 17, 42]).sampling(params).max_tokens(40);
        req.ignore_eos = true;
        common::run(&engine, req).1.tokens
    };
    let (a, b, c) = (draw(1), draw(1), draw(2));
    assert_eq!(a, b, "the same seed");
    assert_ne!(a, c, "another seed");
    assert!(a.iter().chain(&c).all(|&t| t < vocab), "{a:?} {c:?}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn smollm2_greedy_continuations_match_cpu() {
    gpu();
    let dir = common::smollm2_dir();
    let tok = tulu::unstable::tokenizer::Tokenizer::from_dir(&dir).unwrap();
    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village,",
        "The three primary colors are",
    ]
    .iter()
    .map(|t| tok.encode_prompt(t).unwrap())
    .collect();
    assert_greedy_matches_cpu(&dir, &prompts, 32, None);
}

#[cfg(feature = "nccl")]
mod nccl {
    use super::*;
    use tulu::unstable::parallel::nccl::NcclComm;

    /// All-reduce and column gather on one rank: the identity, through NCCL and (for the
    /// gather of several rows) the strided copy that turns rank-major blocks into columns.
    fn identity_collectives(comm: &NcclComm, b: &CudaBackend) {
        assert_eq!((Communicator::<CudaBackend>::rank(comm), Communicator::<CudaBackend>::world_size(comm)), (0, 1));
        let data: Vec<f32> = (0..6).map(|i| i as f32 - 2.5).collect();
        let mut x = b.tensor_from_host(&data, 2, 3).unwrap();
        comm.all_reduce_sum(b, &mut x).unwrap();
        assert_eq!(b.to_host(&x).unwrap(), data);
        let g = comm.all_gather_cols(b, x).unwrap();
        assert_eq!((g.rows(), g.cols()), (2, 3));
        assert_eq!(b.to_host(&g).unwrap(), data);
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn a_world_of_one_initialises_and_all_reduces() {
        let b = gpu();
        let mut comms = NcclComm::new_local(&[0]).unwrap();
        identity_collectives(&comms.remove(0), &b);
        let id = NcclComm::unique_id().unwrap();
        identity_collectives(&NcclComm::from_id(id, 0, 1, 0).unwrap(), &b);
    }

    #[test]
    #[ignore = "needs two CUDA GPUs"]
    fn nccl_across_gpus_matches_one_rank() {
        let gpus = cudarc::driver::CudaContext::device_count().unwrap_or(0) as usize;
        if gpus < 2 {
            eprintln!("skipped: {gpus} GPU(s); NCCL needs one per rank");
            return;
        }
        let dir = tiny_vocab301();
        let tokens: Vec<u32> = (0..37).map(|i| (i * 17 + 5) % 290).collect();
        let reference = shared_gpu_logits(&dir, 1, &tokens);
        for tp in [2usize, 4, 8].into_iter().filter(|&tp| tp <= gpus) {
            let comms = NcclComm::new_local(&(0..tp).collect::<Vec<_>>()).unwrap();
            let logits = cuda_tp_logits(&dir, &tokens, comms, |r| r);
            assert_logits_close(&format!("NCCL tp={tp}"), 301, &logits, &reference);
        }
    }
}

/// A poisoned weight on the GPU: token 77's embedding row is NaN, so the request whose prompt
/// holds it fails with the position of its sampled row (the sampler flags the row on the
/// device) while the one batched with it completes.
#[test]
#[ignore = "needs a CUDA GPU"]
fn non_finite_logits_fail_their_request_on_the_gpu() {
    let poisoned = common::poisoned_tiny("model.embed_tokens.weight", 77);
    let mut opts = EngineOptions::new(poisoned.path().to_string_lossy()).device(Device::Cuda(0));
    // Decode graphs are captured at load for every bucket up to this; few, under the emulator.
    opts.max_num_seqs = 2;
    // A fixed cache: other tests share the device, so its free memory is not this test's own.
    opts.kv_cache_memory = Some(1 << 20);
    let engine = Engine::load(opts).unwrap();
    let req = |prompt: Vec<u32>| GenerateRequest::tokens(prompt).sampling(SamplingParams::greedy()).max_tokens(4);
    let streams = engine.generate_all(vec![req(vec![5, 77, 9]), req(vec![5, 6, 7])]).unwrap();
    let ends: Vec<Result<(), tulu::Error>> =
        streams.into_iter().map(|s| s.into_iter().find_map(|e| e.err()).map_or(Ok(()), Err)).collect();
    match &ends[0] {
        Err(tulu::Error::NonFiniteLogits { position, rank }) => assert_eq!((*position, *rank), (2, 0)),
        other => panic!("the poisoned request: {other:?}"),
    }
    assert!(ends[1].is_ok(), "the clean request: {:?}", ends[1]);
    assert_eq!(engine.failure(), None);
}
