//! Kernel loading: the fatbins build.rs embedded, or the files `TULU_KERNELS` names.
//!
//! `TULU_KERNELS` exists so that a changed `.cu` can be compiled and run on the GPU machine,
//! which has nvcc but no Rust (`.gpu/run kernels` writes `.gpu/kernels/NAME.cubin`), without
//! rebuilding tulu, and so that the CPU emulation of CUDA (`scripts/cuda-emu`, which points it
//! at `NAME.so` CPU images of each `kernels/NAME.cu`) runs the same kernels. It may name:
//! - a directory: each family `NAME` with a `NAME.cubin`, `NAME.fatbin`, `NAME.ptx` or `NAME.so`
//!   there is loaded from it; the other families stay embedded;
//! - a file `NAME.{cubin,fatbin,ptx,so}` whose stem is a family (`attention.cubin`): that family;
//! - any other such file: one module holding every kernel (a single translation unit that
//!   includes all `kernels/*.cu`), used for every family.
//!
//! Every kernel function is looked up once here, so a launch never searches by name, and a
//! kernel missing from an override is an error at start-up naming the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use crate::error::{Error, Result};

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Every kernel function tulu launches, by family (one `.cu` each).
pub(crate) struct Kernels {
    pub rmsnorm: CudaFunction,
    pub add_rmsnorm: CudaFunction,
    pub rope_write_kv: CudaFunction,
    /// `rope_write_kv_bf16_kv8`: the same into an e4m3 (FP8) KV cache.
    pub rope_write_kv_kv8: CudaFunction,
    pub silu_mul: CudaFunction,
    pub gather_rows: CudaFunction,
    pub embedding: CudaFunction,
    pub argmax: CudaFunction,
    pub sample: CudaFunction,
    /// `gemv_decode_bf16_{M}` for M = 1..=8, at index M - 1.
    pub gemv: Vec<CudaFunction>,
    /// `gemv_silu_decode_bf16_{M}` for M = 1..=8, at index M - 1.
    pub gemv_silu: Vec<CudaFunction>,
    /// `gemv_rope_decode_bf16_{M}` for M = 1..=8, at index M - 1.
    pub gemv_rope: Vec<CudaFunction>,
    /// `gemv_rope_decode_bf16_kv8_{M}` (an e4m3 KV cache), at index M - 1.
    pub gemv_rope_kv8: Vec<CudaFunction>,
    /// `gemv_fp8_decode_bf16_{M}` for M = 1..=8, at index M - 1.
    pub gemv_fp8: Vec<CudaFunction>,
    /// `gemv_fp8_silu_decode_bf16_{M}` and `gemv_fp8_rope_decode_bf16_{M}`, at index M - 1.
    pub gemv_fp8_silu: Vec<CudaFunction>,
    pub gemv_fp8_rope: Vec<CudaFunction>,
    /// `gemv_fp8_rope_decode_bf16_kv8_{M}` (an e4m3 KV cache), at index M - 1.
    pub gemv_fp8_rope_kv8: Vec<CudaFunction>,
    pub dequant_fp8: CudaFunction,
    pub quantize_fp8_rows: CudaFunction,
    pub scale_fp8_gemm: CudaFunction,
    pub random_fill: CudaFunction,
    pub read_probe: CudaFunction,
    pub attention_decode: CudaFunction,
    pub attention_prefill: CudaFunction,
    pub attention_combine: CudaFunction,
    /// `attention_prefill_mma_bf16_64` and `_128` (kernels/attention_mma.cu).
    pub attention_prefill_mma_64: CudaFunction,
    pub attention_prefill_mma_128: CudaFunction,
    /// The attention kernels reading an e4m3 (FP8) KV cache: the `_kv8` instantiations.
    pub attention_decode_kv8: CudaFunction,
    pub attention_prefill_kv8: CudaFunction,
    pub attention_prefill_mma_kv8_64: CudaFunction,
    pub attention_prefill_mma_kv8_128: CudaFunction,
    /// Where each family came from, for `describe()` and logs.
    pub sources: Vec<(String, String)>,
}

/// Extensions tried, in order, for a family in a `TULU_KERNELS` directory (`so`: a CPU image
/// for the emulated driver, which refuses the others, as a GPU driver refuses a CPU image).
const EXTENSIONS: [&str; 4] = ["cubin", "fatbin", "ptx", "so"];

impl Kernels {
    /// Loads every family into `ctx`: embedded, unless `TULU_KERNELS` overrides it.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        let overrides = match std::env::var_os("TULU_KERNELS") {
            Some(p) if !p.is_empty() => Overrides::from_path(Path::new(&p))?,
            _ => Overrides::default(),
        };
        let mut modules: HashMap<&str, (Arc<CudaModule>, String)> = HashMap::new();
        for (name, image) in EMBEDDED {
            let (module, source) = match overrides.file_for(name) {
                Some(path) => (load_file(ctx, &path)?, path.display().to_string()),
                None => (
                    load_image(ctx, image.to_vec()).map_err(|e| kernel_err(name, "embedded fatbin", e))?,
                    "embedded".into(),
                ),
            };
            modules.insert(name, (module, source));
        }
        let f = |family: &str, function: &str| -> Result<CudaFunction> {
            let (module, source) = modules.get(family).ok_or_else(|| {
                Error::Backend(format!("kernel family `{family}` was not compiled in (kernels/{family}.cu missing?)"))
            })?;
            module.load_function(function).map_err(|e| {
                Error::Backend(format!("kernel `{function}` not found in {source} (family `{family}`): {e}"))
            })
        };
        let kernels = Kernels {
            rmsnorm: f("rmsnorm", "rmsnorm_bf16")?,
            add_rmsnorm: f("rmsnorm", "add_rmsnorm_bf16")?,
            rope_write_kv: f("rope", "rope_write_kv_bf16")?,
            rope_write_kv_kv8: f("rope", "rope_write_kv_bf16_kv8")?,
            silu_mul: f("elementwise", "silu_mul_bf16")?,
            gather_rows: f("elementwise", "gather_rows_bf16")?,
            embedding: f("embedding", "embedding_bf16")?,
            argmax: f("sampling", "argmax_bf16")?,
            sample: f("sampling", "sample_bf16")?,
            gemv: (1..=8).map(|m| f("gemv", &format!("gemv_decode_bf16_{m}"))).collect::<Result<_>>()?,
            gemv_silu: (1..=8).map(|m| f("gemv", &format!("gemv_silu_decode_bf16_{m}"))).collect::<Result<_>>()?,
            gemv_rope: (1..=8).map(|m| f("gemv", &format!("gemv_rope_decode_bf16_{m}"))).collect::<Result<_>>()?,
            gemv_rope_kv8: (1..=8)
                .map(|m| f("gemv", &format!("gemv_rope_decode_bf16_kv8_{m}")))
                .collect::<Result<_>>()?,
            gemv_fp8: (1..=8).map(|m| f("gemv_fp8", &format!("gemv_fp8_decode_bf16_{m}"))).collect::<Result<_>>()?,
            gemv_fp8_silu: (1..=8)
                .map(|m| f("gemv_fp8", &format!("gemv_fp8_silu_decode_bf16_{m}")))
                .collect::<Result<_>>()?,
            gemv_fp8_rope: (1..=8)
                .map(|m| f("gemv_fp8", &format!("gemv_fp8_rope_decode_bf16_{m}")))
                .collect::<Result<_>>()?,
            gemv_fp8_rope_kv8: (1..=8)
                .map(|m| f("gemv_fp8", &format!("gemv_fp8_rope_decode_bf16_kv8_{m}")))
                .collect::<Result<_>>()?,
            dequant_fp8: f("gemv_fp8", "dequant_fp8_bf16")?,
            quantize_fp8_rows: f("gemm_fp8", "quantize_fp8_rows_bf16")?,
            scale_fp8_gemm: f("gemm_fp8", "scale_fp8_gemm_bf16")?,
            random_fill: f("random", "random_fill_bf16")?,
            read_probe: f("random", "read_probe")?,
            attention_decode: f("attention", "attention_decode_bf16")?,
            attention_prefill: f("attention", "attention_prefill_bf16")?,
            attention_combine: f("attention", "attention_combine_bf16")?,
            attention_prefill_mma_64: f("attention_mma", "attention_prefill_mma_bf16_64")?,
            attention_prefill_mma_128: f("attention_mma", "attention_prefill_mma_bf16_128")?,
            attention_decode_kv8: f("attention", "attention_decode_bf16_kv8")?,
            attention_prefill_kv8: f("attention", "attention_prefill_bf16_kv8")?,
            attention_prefill_mma_kv8_64: f("attention_mma", "attention_prefill_mma_bf16_kv8_64")?,
            attention_prefill_mma_kv8_128: f("attention_mma", "attention_prefill_mma_bf16_kv8_128")?,
            sources: Vec::new(),
        };
        let mut sources: Vec<(String, String)> =
            modules.into_iter().map(|(name, (_, source))| (name.to_owned(), source)).collect();
        sources.sort();
        Ok(Kernels { sources, ..kernels })
    }

    /// Families loaded from `TULU_KERNELS` rather than the embedded fatbins, as `name=path`.
    pub fn overridden(&self) -> Vec<String> {
        self.sources.iter().filter(|(_, s)| s != "embedded").map(|(n, s)| format!("{n}={s}")).collect()
    }
}

/// What `TULU_KERNELS` replaces.
#[derive(Default)]
struct Overrides {
    /// A directory searched for `NAME.{cubin,fatbin,ptx}`.
    dir: Option<PathBuf>,
    /// Single files, by family.
    files: HashMap<String, PathBuf>,
    /// One file holding every family.
    all: Option<PathBuf>,
}

impl Overrides {
    fn from_path(path: &Path) -> Result<Self> {
        let bad = |message: String| Error::Backend(format!("TULU_KERNELS={}: {message}", path.display()));
        if path.is_dir() {
            return Ok(Overrides { dir: Some(path.to_path_buf()), ..Default::default() });
        }
        if !path.is_file() {
            return Err(bad("no such file or directory".into()));
        }
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
        if !EXTENSIONS.contains(&ext) {
            return Err(bad(format!(
                "expected a .cubin, .fatbin, .ptx or .so (CPU image) file, or a directory of them; not .{ext}"
            )));
        }
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        Ok(if EMBEDDED.iter().any(|(name, _)| *name == stem) {
            Overrides { files: HashMap::from([(stem.to_owned(), path.to_path_buf())]), ..Default::default() }
        } else {
            Overrides { all: Some(path.to_path_buf()), ..Default::default() }
        })
    }

    fn file_for(&self, family: &str) -> Option<PathBuf> {
        if let Some(p) = self.files.get(family).or(self.all.as_ref()) {
            return Some(p.clone());
        }
        let dir = self.dir.as_ref()?;
        EXTENSIONS.iter().map(|ext| dir.join(format!("{family}.{ext}"))).find(|p| p.is_file())
    }
}

fn load_file(ctx: &Arc<CudaContext>, path: &Path) -> Result<Arc<CudaModule>> {
    let mut image = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if path.extension().is_some_and(|e| e == "ptx") {
        // cuModuleLoadData reads PTX as a C string.
        image.push(0);
    }
    load_image(ctx, image).map_err(|e| {
        Error::Backend(format!(
            "loading kernels from {}: {e} (a cubin must match this GPU's architecture; \
             `.gpu/run kernels ARCH` takes it)",
            path.display()
        ))
    })
}

/// Loads a cubin, fatbin or NUL-terminated PTX image (cuModuleLoadData tells them apart).
fn load_image(
    ctx: &Arc<CudaContext>,
    image: Vec<u8>,
) -> std::result::Result<Arc<CudaModule>, cudarc::driver::DriverError> {
    ctx.load_module(Ptx::from_binary(image))
}

fn kernel_err(family: &str, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Backend(format!("loading kernel family `{family}` from the {what}: {e}"))
}
