//! Decode steps as CUDA graphs: every replay equals the same step run eagerly, bit for bit —
//! for every bucket, with sequences of different lengths entering and leaving between
//! replays, on one rank and at tp 2/4 over NCCL — and a pointer captured stale is caught.

use super::model::tiny_vocab301;
use super::*;
use tulu::unstable::backend::cuda::CudaKvCache;
use tulu::unstable::backend::{Profiling, Runtime, StepLimits, StepShape};

const BLOCK: usize = 16;
const CONTEXT: usize = 256;
const LIMITS: StepLimits = StepLimits { max_num_seqs: 8, max_num_batched_tokens: 256, graphs: true };

/// One sequence of the schedule: its tokens so far and its own blocks, in reverse order.
struct Seq {
    tokens: Vec<u32>,
    cached: usize,
    table: Vec<u32>,
}

/// What a rank runs the schedule with.
struct Rank<'a, C: Communicator<CudaBackend>> {
    backend: &'a CudaBackend,
    model: &'a Llama<CudaBackend>,
    cache: CudaKvCache,
    comm: &'a C,
}

impl<C: Communicator<CudaBackend>> Rank<'_, C> {
    /// Logits of the last token of each of `seqs`, feeding each its uncached tokens.
    fn step(&mut self, seqs: &[&Seq]) -> Vec<f32> {
        let mut batch = Batch::new(BLOCK);
        for s in seqs {
            batch.push(&s.tokens[s.cached..], s.cached, &s.table).unwrap();
        }
        let rows = batch.last_rows();
        self.model.forward(self.backend, &batch, &mut self.cache, &rows, self.comm).unwrap()
    }

    /// One decode step of `seqs` twice on the same cache — the padded step run eagerly, then
    /// through the graph path (warm-up, capture or replay) — and the first differing logit.
    fn decode_twice(&mut self, seqs: &[&Seq]) -> (Vec<f32>, Option<String>) {
        self.backend.set_graph_replay(false);
        let eager = self.step(seqs);
        self.backend.set_graph_replay(true);
        let graph = self.step(seqs);
        let diff = eager.iter().zip(&graph).position(|(a, b)| a.to_bits() != b.to_bits());
        let why =
            diff.map(|i| format!("{} sequences: logit {i} is {} replayed, {} eager", seqs.len(), graph[i], eager[i]));
        (graph, why)
    }
}

/// Greedy next token of each row of `logits`.
fn argmax_rows(logits: &[f32], vocab: usize) -> Vec<u32> {
    logits
        .chunks(vocab)
        .map(|r| r.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32)
        .collect()
}

/// Prefills, then decodes in batches of 3, 4, 3, 5 and 1 sequences (buckets 4, 4, 4, 8, 1:
/// each bucket warms up, is captured, then replayed), sequences entering and leaving between
/// steps. Returns the first replay that differed from its eager twin, if any.
fn run_schedule<C: Communicator<CudaBackend>>(rank: &mut Rank<'_, C>, vocab: usize) -> Option<String> {
    let lens = [5usize, 17, 33, 150, 40, 9];
    let mut seqs: Vec<Seq> = lens
        .iter()
        .enumerate()
        .map(|(k, &n)| Seq {
            tokens: (0..n as u32).map(|i| (i * 31 + 7 * k as u32 + 3) % 290).collect(),
            cached: 0,
            table: (0..CONTEXT / BLOCK).map(|b| (k * CONTEXT / BLOCK + b) as u32).rev().collect(),
        })
        .collect();
    let advance = |rank: &mut Rank<'_, C>, seqs: &mut Vec<Seq>, which: &[usize], decode: bool| {
        let view: Vec<&Seq> = which.iter().map(|&i| &seqs[i]).collect();
        let (logits, why) = if decode { rank.decode_twice(&view) } else { (rank.step(&view), None) };
        for (&i, t) in which.iter().zip(argmax_rows(&logits, vocab)) {
            seqs[i].cached = seqs[i].tokens.len();
            seqs[i].tokens.push(t);
        }
        why
    };
    let plan: &[(&[usize], bool, usize)] = &[
        (&[0, 1, 2], false, 1),
        (&[0, 1, 2], true, 3),
        (&[3], false, 1),
        (&[0, 1, 2, 3], true, 2),
        (&[0, 2, 3], true, 2),
        (&[4, 5], false, 1),
        (&[0, 2, 3, 4, 5], true, 3),
        (&[5], true, 3),
    ];
    for &(which, decode, times) in plan {
        for _ in 0..times {
            if let Some(why) = advance(rank, &mut seqs, which, decode) {
                return Some(why);
            }
        }
    }
    None
}

/// A backend with graphs reserved, the tiny model's rank `rank` of `world` and a cache with
/// room for the schedule.
fn open(device: usize, rank: usize, world: usize, dir: &Path) -> (CudaBackend, Llama<CudaBackend>, CudaKvCache) {
    open_with(device, rank, world, dir, LIMITS, |_| {}, POISON)
}

/// [`open`] with other step limits, the model's config changed by `edit` (quantized while
/// loading, an FP8 KV cache), and the test checks of `debug`.
fn open_with(
    device: usize,
    rank: usize,
    world: usize,
    dir: &Path,
    limits: StepLimits,
    edit: fn(&mut ModelConfig),
    debug: CudaDebug,
) -> (CudaBackend, Llama<CudaBackend>, CudaKvCache) {
    let backend = CudaBackend::with_debug(device, debug).unwrap();
    let model = load(&backend, dir, edit, Shard { rank, world });
    let shape = StepShape {
        limits,
        max_positions: CONTEXT,
        block_size: BLOCK,
        workspace_bytes: model.workspace_bytes(&limits, backend.element_bytes()),
    };
    backend.reserve(&shape).unwrap();
    let cache = backend.new_kv_cache(&model.kv_cache_spec(6 * CONTEXT / BLOCK, BLOCK)).unwrap();
    (backend, model, cache)
}

/// The checkpoint in `dir`, its config changed by `edit`, as rank `shard` on `backend`.
fn load(backend: &CudaBackend, dir: &Path, edit: fn(&mut ModelConfig), shard: Shard) -> Llama<CudaBackend> {
    let mut cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    edit(&mut cfg);
    let store = WeightStore::open(dir).unwrap();
    Llama::load(backend, &cfg, &store, CONTEXT, shard, |_| {}).unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn decode_graphs_replay_their_eager_steps_bit_for_bit() {
    gpu();
    let dir = tiny_vocab301();
    let (backend, model, cache) = open(0, 0, 1, &dir);
    let mut rank = Rank { backend: &backend, model: &model, cache, comm: &SingleRank };
    let launches = backend.launches().unwrap();
    if let Some(why) = run_schedule(&mut rank, 301) {
        panic!("a graph replay differs from its eager step: {why}");
    }
    let (captured, replays) = backend.graph_stats();
    eprintln!(
        "buckets captured {captured:?}, {replays} replays, {} launches, workspace {:?}, {} overflows",
        backend.launches().unwrap() - launches,
        backend.workspace_usage(),
        backend.workspace_overflows()
    );
    assert_eq!(captured, vec![1, 4, 8], "every bucket the schedule used is captured");
    // Bucket 4: 7 steps, the first eager; 8 and 1: 3 steps each. A capture is replayed at once.
    assert_eq!(replays, 6 + 2 + 2, "replays");
    assert_eq!(backend.workspace_overflows(), 0, "the step workspace held every step");
}

/// The same with the decode GEMVs forced (under the emulator cuBLASLt wins the timing): the fused
/// qkv + RoPE + KV write and gate/up + SiLU·mul kernels inside graphs, padding rows included.
#[test]
#[ignore = "needs a CUDA GPU"]
fn decode_graphs_with_the_fused_gemvs_replay_their_eager_steps_bit_for_bit() {
    gpu();
    let dir = tiny_vocab301();
    let (backend, model, cache) = open(0, 0, 1, &dir);
    backend.set_gemv_mode(tulu::unstable::backend::cuda::GemvMode::Always);
    let mut rank = Rank { backend: &backend, model: &model, cache, comm: &SingleRank };
    if let Some(why) = run_schedule(&mut rank, 301) {
        panic!("a graph replay differs from its eager step: {why}");
    }
    assert_eq!(backend.graph_stats().0, vec![1, 4, 8], "every bucket the schedule used is captured");
}

/// An FP8 KV cache: the fused qkv GEMV writing e4m3 and the decode attention reading it inside
/// graphs (each launch carries its layer's scales), replays equal to their eager steps.
#[test]
#[ignore = "needs a CUDA GPU"]
fn decode_graphs_with_an_fp8_kv_cache_replay_their_eager_steps_bit_for_bit() {
    gpu();
    let dir = tiny_vocab301();
    let fp8_kv = |c: &mut ModelConfig| c.kv_cache = tulu::unstable::quant::kv::KvDtype::Fp8;
    let (backend, model, cache) = open_with(0, 0, 1, &dir, LIMITS, fp8_kv, POISON);
    let kv = model.kv_cache_spec(1, BLOCK).kv;
    assert!(matches!(kv, tulu::unstable::quant::kv::KvFormat::Fp8(_)), "{kv:?}");
    backend.set_gemv_mode(tulu::unstable::backend::cuda::GemvMode::Always);
    let mut rank = Rank { backend: &backend, model: &model, cache, comm: &SingleRank };
    if let Some(why) = run_schedule(&mut rank, 301) {
        panic!("a graph replay differs from its eager step: {why}");
    }
    assert_eq!(backend.graph_stats().0, vec![1, 4, 8], "every bucket the schedule used is captured");
}

/// FP8 weights in a bucket past the GEMV's 8 rows: the decode step's matmuls take the FP8 GEMM
/// (activations quantized per token, cuBLASLt, scaling) inside the graph, with its scratch from
/// the step workspace; replays equal their eager steps bit for bit.
#[test]
#[ignore = "needs a CUDA GPU"]
fn fp8_gemm_decode_steps_are_captured_and_replay_bit_for_bit() {
    gpu();
    let dir = tiny_vocab301();
    let limits = StepLimits { max_num_seqs: 16, ..LIMITS };
    let (backend, model, cache) =
        open_with(0, 0, 1, &dir, limits, |c| tulu::unstable::quant::Quantize::Fp8.apply(c), POISON);
    let mut rank = Rank { backend: &backend, model: &model, cache, comm: &SingleRank };
    let mut seqs: Vec<Seq> = (0..10)
        .map(|k| Seq {
            tokens: (0..(3 + 7 * k) as u32).map(|i| (i * 13 + 5 * k as u32 + 1) % 290).collect(),
            cached: 0,
            table: (0..6).map(|b| (k * 6 + b) as u32).collect(),
        })
        .collect();
    for step in 0..4 {
        let view: Vec<&Seq> = seqs.iter().collect();
        let (logits, why) = if step == 0 { (rank.step(&view), None) } else { rank.decode_twice(&view) };
        assert_eq!(why, None, "step {step}: a replay differs from its eager step");
        for (s, t) in seqs.iter_mut().zip(argmax_rows(&logits, 301)) {
            s.cached = s.tokens.len();
            s.tokens.push(t);
        }
    }
    let (captured, replays) = backend.graph_stats();
    assert_eq!(captured, vec![16], "the 10-row bucket (16) is captured");
    assert_eq!(replays, 2, "a capture is replayed at once, then once more");
    assert_eq!(backend.workspace_overflows(), 0, "the step workspace held the FP8 GEMM's scratch");
}

/// Two models on one backend — the tiny model and its FP8-quantized twin, both caches made
/// before either runs — take turns: each captures and replays graphs of its own, and the first
/// replays its graphs again after the second ran. Were graphs keyed by bucket alone, the
/// second model's decode steps would replay the first's graphs (its weights and its cache).
#[test]
#[ignore = "needs a CUDA GPU"]
fn two_models_on_one_backend_replay_their_own_graphs() {
    gpu();
    let dir = tiny_vocab301();
    let (backend, first, first_cache) = open(0, 0, 1, &dir);
    let second = load(&backend, &dir, |c| tulu::unstable::quant::Quantize::Fp8.apply(c), Shard::single());
    let second_cache = backend.new_kv_cache(&second.kv_cache_spec(6 * CONTEXT / BLOCK, BLOCK)).unwrap();
    let mut first = Rank { backend: &backend, model: &first, cache: first_cache, comm: &SingleRank };
    let mut second = Rank { backend: &backend, model: &second, cache: second_cache, comm: &SingleRank };
    let mut replays = Vec::new();
    for (name, is_first) in [("first", true), ("second", false), ("first again", true)] {
        let rank = if is_first { &mut first } else { &mut second };
        if let Some(why) = run_schedule(rank, 301) {
            panic!("{name} model: a graph replay differs from its eager step: {why}");
        }
        replays.push(backend.graph_stats().1);
    }
    // Each model's first schedule replays 10 times (see above); the first model's second one
    // replays every decode step (13): its graphs outlived the second model's.
    assert_eq!(replays, vec![10, 20, 33], "replays after each schedule");
}

/// The step workspace fitted to the measured peak of the profile steps (what a rank does when
/// its KV cache takes what device memory leaves): smaller than the formula's bound, yet it holds
/// the whole schedule — prefills, decode graphs captured and replayed bit for bit — without one
/// allocation from the pool.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_workspace_fitted_to_the_measured_peak_holds_every_step() {
    gpu();
    let dir = tiny_vocab301();
    let (backend, model, cache) = open(0, 0, 1, &dir);
    let bound = backend.workspace_usage().0;
    model.profile_steps(&backend, &SingleRank, &LIMITS, BLOCK).unwrap();
    let fitted = backend.fit_workspace().unwrap();
    eprintln!("step workspace: formula {bound} bytes, measured peak {fitted}");
    assert!(fitted > 0 && fitted < bound, "fitted {fitted} of {bound} bytes");
    assert_eq!(backend.workspace_usage().0, fitted, "the workspace is the fitted one");
    let mut rank = Rank { backend: &backend, model: &model, cache, comm: &SingleRank };
    if let Some(why) = run_schedule(&mut rank, 301) {
        panic!("a graph replay differs from its eager step: {why}");
    }
    assert_eq!(backend.graph_stats().0, vec![1, 4, 8], "every bucket the schedule used is captured");
    assert_eq!(backend.workspace_overflows(), 0, "the fitted workspace held every step");
}

/// The classic graph bug, made on purpose: each step's metadata goes to a new buffer, so a
/// replay reads the metadata of the step it was captured in. The comparison must catch it.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_pointer_captured_stale_is_caught() {
    gpu();
    let dir = tiny_vocab301();
    let stale = CudaDebug { fresh_step_buffers: true, ..POISON };
    let (backend, model, cache) = open_with(0, 0, 1, &dir, LIMITS, |_| {}, stale);
    let mut rank = Rank { backend: &backend, model: &model, cache, comm: &SingleRank };
    let why = run_schedule(&mut rank, 301).expect("a replay reading stale step metadata went unnoticed");
    eprintln!("caught, as it must be: {why}");
}

#[cfg(feature = "nccl")]
#[test]
#[ignore = "needs CUDA GPUs"]
fn decode_graphs_with_nccl_collectives_replay_bit_for_bit_at_tp_2_and_4() {
    use tulu::unstable::parallel::nccl::NcclComm;
    let gpus = cudarc::driver::CudaContext::device_count().unwrap_or(0) as usize;
    let dir = tiny_vocab301();
    for tp in [2usize, 4].into_iter().filter(|&tp| tp <= gpus) {
        let comms = NcclComm::new_local(&(0..tp).collect::<Vec<_>>()).unwrap();
        let results: Vec<(Option<String>, Vec<usize>)> = std::thread::scope(|s| {
            let dir = &dir;
            let handles: Vec<_> = comms
                .into_iter()
                .enumerate()
                .map(|(r, comm)| {
                    s.spawn(move || {
                        let (backend, model, cache) = open(r, r, tp, dir);
                        let comm = comm;
                        let mut rank = Rank { backend: &backend, model: &model, cache, comm: &comm };
                        let why = run_schedule(&mut rank, 301);
                        (why, backend.graph_stats().0)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, (why, captured)) in results.into_iter().enumerate() {
            assert_eq!(why, None, "tp={tp} rank {r}: a replay differs from its eager step");
            assert_eq!(captured, vec![1, 4, 8], "tp={tp} rank {r}: buckets captured with their collectives");
        }
    }
}
