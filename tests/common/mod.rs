//! Models shared by the integration tests: converted SmolLM2 and synthetic checkpoints, each
//! built once into cargo's per-target temp dir and reused.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tulu::unstable::backend::{Backend, Runtime};
use tulu::unstable::config::ModelConfig;
use tulu::unstable::model::Llama;
use tulu::unstable::parallel::Communicator;
use tulu::unstable::runtime::batch::Batch;
use tulu::unstable::synth::{synth_checkpoint, SynthOptions};
use tulu::unstable::weights::gguf::{convert_gguf, ConvertOptions, OutDType};

pub mod serve;

static BUILD: Mutex<()> = Mutex::new(());

fn cache_dir() -> PathBuf {
    std::env::var_os("TULU_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/tulu"))
}

/// The SmolLM2 GGUF fetched by `scripts/fetch-smollm2`.
pub fn smollm2_gguf() -> PathBuf {
    let p = std::env::var_os("TULU_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(p.exists(), "{} is missing: run scripts/fetch-smollm2 (scripts/test does)", p.display());
    p
}

/// The real Llama 3 tokenizer fetched by `scripts/fetch-llama3-tokenizer`.
pub fn llama3_tokenizer() -> PathBuf {
    let p = std::env::var_os("TULU_LLAMA3_TOKENIZER")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("llama3-tokenizer/tokenizer.json"));
    assert!(p.exists(), "{} is missing: run scripts/fetch-llama3-tokenizer (scripts/test does)", p.display());
    p
}

fn build_once(name: &str, build: impl FnOnce(&Path)) -> PathBuf {
    let _guard = BUILD.lock().unwrap_or_else(|e| e.into_inner());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    // Writers are atomic (temp dir + rename), so an existing directory is complete.
    if !dir.exists() {
        build(&dir);
    }
    dir
}

/// SmolLM2-135M-Instruct converted to f32 safetensors.
pub fn smollm2_dir() -> PathBuf {
    build_once("smollm2-f32", |dir| {
        convert_gguf(&smollm2_gguf(), dir, &ConvertOptions { dtype: OutDType::F32, progress: false })
            .expect("convert SmolLM2")
    })
}

/// A synthetic checkpoint of `cfg` in `dtype`, named `name`.
pub fn synth_dir(name: &str, cfg: &ModelConfig, dtype: OutDType, tokenizer: Option<PathBuf>) -> PathBuf {
    build_once(name, |dir| {
        let mut cfg = cfg.clone();
        cfg.torch_dtype = Some(dtype.torch_name().into());
        let opts = SynthOptions { dtype, seed: 7, tokenizer, ..SynthOptions::default() };
        synth_checkpoint(&cfg, dir, &opts).expect("synthesise checkpoint")
    })
}

/// The tiny preset (GQA 8:2, llama3 rope scaling, padded vocab) in f32.
pub fn tiny_dir() -> PathBuf {
    synth_dir("tiny-f32", &ModelConfig::preset("tiny").expect("preset"), OutDType::F32, None)
}

/// Largest relative error between two logit rows, relative to the reference's largest magnitude.
pub fn rel_err(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len(), "logit rows differ in length");
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    ours.iter().zip(reference).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale
}

/// Runs a request to the end: its text and summary.
pub fn run(engine: &tulu::Engine, req: tulu::GenerateRequest) -> (String, tulu::Summary) {
    finish(engine.generate(req).expect("request accepted"))
}

/// Runs `reqs` queued together in one `generate_all` (so the step loop sees them all at once,
/// however busy the machine is): each one's text and summary, in order.
pub fn run_all(engine: &tulu::Engine, reqs: &[tulu::GenerateRequest]) -> Vec<(String, tulu::Summary)> {
    engine.generate_all(reqs.to_vec()).expect("requests accepted").into_iter().map(finish).collect()
}

/// tulu's CPU logits for every position of `tokens` in one prefill step, the config read from
/// `config_dir` and the weights from `weights` (a checkpoint directory or a GGUF file).
pub fn prefill_logits(config_dir: &Path, weights: &Path, tokens: &[u32]) -> Vec<Vec<f32>> {
    use tulu::unstable::backend::cpu::CpuBackend;
    use tulu::unstable::parallel::sharding::Shard;
    use tulu::unstable::parallel::SingleRank;
    use tulu::unstable::runtime::block_manager::BlockManager;
    use tulu::unstable::weights::WeightStore;
    let cfg = ModelConfig::from_file(&config_dir.join("config.json")).unwrap();
    let store = WeightStore::open(weights).unwrap();
    let backend = CpuBackend::new();
    let model = Llama::load(&backend, &cfg, &store, 512, Shard::single(), |_| {}).unwrap();
    let mut pool = BlockManager::new(64, 16, false);
    let mut cache = backend.new_kv_cache(&model.kv_cache_spec(64, 16)).unwrap();
    let mut table = Vec::new();
    pool.grow(&mut table, tokens.len()).unwrap();
    let mut batch = Batch::new(16);
    batch.push(tokens, 0, &table).unwrap();
    let rows: Vec<usize> = (0..tokens.len()).collect();
    let logits = model.forward(&backend, &batch, &mut cache, &rows, &SingleRank).unwrap();
    logits.chunks(cfg.vocab_size).map(<[f32]>::to_vec).collect()
}

/// Reads a generation's stream to its end: the text and the summary.
fn finish(stream: tulu::Generation) -> (String, tulu::Summary) {
    let mut text = String::new();
    for ev in stream {
        match ev.expect("generation succeeds") {
            tulu::Event::Text(t) => text.push_str(&t),
            tulu::Event::Done(s) => return (text, s),
            _ => {}
        }
    }
    panic!("the stream ended without a summary");
}

/// Logits of every position of `tokens` (one prefill) from one thread per communicator in
/// `comms`, rank `r` running the backend and model `open(r)` makes, as the engine runs its
/// ranks; every rank must hold the same gathered logits. Returns rank 0's.
pub fn ranks_logits<B: Runtime, C: Communicator<B> + Send>(
    comms: Vec<C>,
    tokens: &[u32],
    open: impl Fn(usize) -> (B, Llama<B>) + Sync,
) -> Vec<f32> {
    let table: Vec<u32> = (0..8).collect();
    let mut batch = Batch::new(16);
    batch.push(tokens, 0, &table).unwrap();
    let rows: Vec<usize> = (0..tokens.len()).collect();
    let outs: Vec<Vec<f32>> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let (batch, rows, open) = (&batch, &rows, &open);
                s.spawn(move || {
                    let (backend, model) = open(rank);
                    // Declared after the backend, so dropped before it (an NCCL communicator is
                    // torn down while its device is still open).
                    let comm = comm;
                    let mut cache = backend.new_kv_cache(&model.kv_cache_spec(8, 16)).unwrap();
                    model.forward(&backend, batch, &mut cache, rows, &comm).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for o in &outs[1..] {
        assert_eq!(o, &outs[0], "every rank holds the same gathered logits");
    }
    outs.into_iter().next().unwrap()
}

/// A copy of the tiny model whose tensor `name` has row `row` set to NaN (an overflowed weight).
pub fn poisoned_tiny(name: &str, row: usize) -> tempfile::TempDir {
    use safetensors::tensor::TensorView;
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(tiny_dir()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
    let (_, dtype, shape, data) = tensors.iter_mut().find(|t| t.0 == name).expect("tensor present");
    assert_eq!(*dtype, safetensors::Dtype::F32);
    let width = shape[1] * 4;
    for c in data[row * width..(row + 1) * width].chunks_exact_mut(4) {
        c.copy_from_slice(&f32::NAN.to_le_bytes());
    }
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
    tmp
}
