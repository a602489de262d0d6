//! Compiles `kernels/*.cu` with nvcc when the `cuda` feature is on; does nothing otherwise.
//!
//! Each `.cu` becomes one fatbin in OUT_DIR holding SASS for sm_80 (A100), sm_89 (L40/Ada) and
//! sm_90a (H100/H200) plus compute_90 PTX for newer GPUs to JIT, and `kernels.rs` embeds them
//! all (`include_bytes!`), so a `cuda` binary needs no kernel files at run time
//! (`TULU_KERNELS` overrides them, see src/backend/cuda/module.rs).
//!
//! Flags: `-O3 -lineinfo` (line info costs nothing at run time and makes compute-sanitizer and
//! Nsight point at source lines). No `--use_fast_math`: it would turn every expf/division into
//! its approximate form and flush denormals everywhere, which is what softmax and the norms
//! must not silently get; the kernels call exp2f/rsqrtf explicitly where the fast form is wanted.
//!
//! nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on PATH, else the venv that
//! `scripts/install-nvcc` creates. ptxas always reports registers and spills (`-v`); the build
//! fails when a kernel whose name contains `decode` spills (the decode loop must stay in
//! registers), and `TULU_PTXAS_REPORT=1` prints the whole report as cargo warnings.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Targets of every fatbin: SASS per supported architecture, plus PTX for later ones.
const GENCODE: &[&str] = &[
    "arch=compute_80,code=sm_80",
    "arch=compute_89,code=sm_89",
    "arch=compute_90a,code=sm_90a",
    "arch=compute_90,code=compute_90",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_HOME", "TULU_CACHE", "TULU_PTXAS_REPORT", "NVCC_CCBIN"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=kernels");
    if let Err(e) = build() {
        // A panic would bury the message under a backtrace hint; print it and exit instead.
        eprintln!("error: building tulu's CUDA kernels: {e}");
        std::process::exit(1);
    }
}

fn build() -> Result<(), String> {
    let nvcc = find_nvcc()?;
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let kernel_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?).join("kernels");
    let mut sources: Vec<PathBuf> = fs::read_dir(&kernel_dir)
        .map_err(|e| format!("{}: {e}", kernel_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    if sources.is_empty() {
        return Err(format!("no .cu files in {}", kernel_dir.display()));
    }
    let report = env::var("TULU_PTXAS_REPORT").is_ok_and(|v| v == "1");

    // nvcc is single-threaded per file: compile the files side by side.
    let results: Vec<Result<(String, PathBuf, String), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = sources.iter().map(|src| s.spawn(|| compile(&nvcc, &kernel_dir, src, &out))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("compiler thread panicked".into()))).collect()
    });

    let mut embedded = String::from(
        "/// Kernel families compiled by build.rs: (file stem, fatbin image).\n\
         pub(crate) const EMBEDDED: &[(&str, &[u8])] = &[\n",
    );
    let mut spills = Vec::new();
    for r in results {
        let (name, fatbin, log) = r?;
        for line in log.lines() {
            if line.contains("warning") {
                println!("cargo:warning={name}.cu: {line}");
            } else if report
                && (line.contains("registers") || line.contains("spill") || line.contains("entry function"))
            {
                println!("cargo:warning={name}.cu: {}", line.trim());
            }
        }
        spills.extend(decode_spills(&log).into_iter().map(|s| format!("{name}.cu: {s}")));
        embedded.push_str(&format!("    ({name:?}, include_bytes!({:?})),\n", fatbin.display().to_string()));
    }
    embedded.push_str("];\n");
    if !spills.is_empty() {
        return Err(format!(
            "decode kernels must not spill registers (set TULU_PTXAS_REPORT=1 for the full report):\n  {}",
            spills.join("\n  ")
        ));
    }
    fs::write(out.join("kernels.rs"), embedded).map_err(|e| format!("writing kernels.rs: {e}"))
}

/// Compiles one `.cu` into `OUT_DIR/NAME.fatbin`; returns the name, the path and ptxas' log.
fn compile(nvcc: &Path, include: &Path, src: &Path, out: &Path) -> Result<(String, PathBuf, String), String> {
    let name = src.file_stem().and_then(|s| s.to_str()).ok_or_else(|| format!("bad file name {}", src.display()))?;
    let fatbin = out.join(format!("{name}.fatbin"));
    let mut cmd = Command::new(nvcc);
    cmd.args(["-fatbin", "-O3", "-lineinfo", "-std=c++17", "-Xptxas", "-v"]).arg("-I").arg(include);
    if let Some(ccbin) = env::var_os("NVCC_CCBIN") {
        cmd.arg("-ccbin").arg(ccbin);
    }
    for g in GENCODE {
        cmd.args(["-gencode", g]);
    }
    cmd.arg(src).arg("-o").arg(&fatbin);
    let output = cmd.output().map_err(|e| format!("running {}: {e}", nvcc.display()))?;
    let log = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if !output.status.success() {
        return Err(format!("nvcc failed on {}:\n{log}", src.display()));
    }
    Ok((name.to_owned(), fatbin, log))
}

/// `function (arch): N bytes spill stores, M bytes spill loads` for each kernel whose name
/// contains `decode` and spills, from ptxas' `-v` log.
fn decode_spills(log: &str) -> Vec<String> {
    let (mut function, mut arch) = (String::new(), String::new());
    let mut found = Vec::new();
    for line in log.lines() {
        // "ptxas info    : Compiling entry function 'NAME' for 'sm_90a'"
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            function = parts.next().unwrap_or_default().to_owned();
            arch = parts.nth(1).unwrap_or_default().to_owned();
        // "ptxas info    : Function properties for NAME"
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            function = rest.trim().to_owned();
        // "    24 bytes stack frame, 20 bytes spill stores, 32 bytes spill loads"
        } else if line.contains("spill stores") {
            let count = |what: &str| {
                line.split(',')
                    .find(|p| p.contains(what))
                    .and_then(|p| p.split_whitespace().next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let (stores, loads) = (count("spill stores"), count("spill loads"));
            if function.contains("decode") && (stores > 0 || loads > 0) {
                found.push(format!("{function} ({arch}): {stores} bytes spill stores, {loads} bytes spill loads"));
            }
        }
    }
    found
}

/// The nvcc to use, or an error that says how to get one.
fn find_nvcc() -> Result<PathBuf, String> {
    if let Some(p) = env::var_os("NVCC") {
        return Ok(PathBuf::from(p));
    }
    if let Some(home) = env::var_os("CUDA_HOME") {
        let p = PathBuf::from(home).join("bin/nvcc");
        if p.is_file() {
            return Ok(p);
        }
    }
    if let Some(path) = env::var_os("PATH") {
        if let Some(p) = env::split_paths(&path).map(|d| d.join("nvcc")).find(|p| p.is_file()) {
            return Ok(p);
        }
    }
    let cache = env::var_os("TULU_CACHE")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/tulu")));
    if let Some(venv) = cache.map(|c| c.join("nvcc/lib")) {
        if let Ok(entries) = fs::read_dir(&venv) {
            for e in entries.flatten() {
                let p = e.path().join("site-packages/nvidia/cu13/bin/nvcc");
                if p.is_file() {
                    return Ok(p);
                }
            }
        }
    }
    Err("the `cuda` feature needs nvcc, and none was found in $NVCC, $CUDA_HOME/bin, PATH or \
         ${TULU_CACHE:-~/.cache/tulu}/nvcc. Run scripts/install-nvcc (installs NVIDIA's CUDA 13.0 \
         compiler wheels from PyPI into a local venv, no GPU needed), then build again."
        .into())
}
