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
//! `scripts/install-nvcc` creates. ptxas always reports registers, shared memory and spills
//! (`-v`); the build fails when any kernel spills on any architecture (`SPILLS_ALLOWED` is the
//! explicit list of exceptions: none today), and `TULU_PTXAS_REPORT=1` prints the whole report
//! as cargo warnings.
//!
//! The launch resources of every kernel on every architecture — registers, static shared
//! memory, spill bytes (ptxas) and `__launch_bounds__` (the `.maxntid`/`.minnctapersm` of the PTX
//! nvcc keeps) — go to `OUT_DIR/kernel-resources.tsv` and, for the CUDA emulator, which refuses
//! the launches a GPU would refuse (docs/cuda-emu.md), to `<target dir>/kernel-resources.tsv`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Kernels allowed to spill registers, each with the reason (none: every kernel stays in
/// registers on every architecture, and a spill fails the build).
const SPILLS_ALLOWED: &[&str] = &[];

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
    let mut table = String::from(
        "# file\tkernel\tarch\tregisters\tstatic_smem\tspill_stores\tspill_loads\tmax_threads\tmin_blocks\n",
    );
    for r in results {
        let (name, fatbin, log) = r?;
        let bounds = launch_bounds(&out.join(format!("keep-{name}")));
        for k in resources(&log) {
            let (max_threads, min_blocks) = bounds.get(&k.function).copied().unwrap_or((0, 0));
            table.push_str(&format!(
                "{name}\t{}\t{}\t{}\t{}\t{}\t{}\t{max_threads}\t{min_blocks}\n",
                k.function, k.arch, k.registers, k.smem, k.spill_stores, k.spill_loads
            ));
            if (k.spill_stores > 0 || k.spill_loads > 0) && !SPILLS_ALLOWED.contains(&k.function.as_str()) {
                spills.push(format!(
                    "{name}.cu: {} ({}): {} bytes spill stores, {} bytes spill loads",
                    k.function, k.arch, k.spill_stores, k.spill_loads
                ));
            }
        }
        for line in log.lines() {
            if line.contains("warning") {
                println!("cargo:warning={name}.cu: {line}");
            } else if report
                && (line.contains("registers") || line.contains("spill") || line.contains("entry function"))
            {
                println!("cargo:warning={name}.cu: {}", line.trim());
            }
        }
        embedded.push_str(&format!("    ({name:?}, include_bytes!({:?})),\n", fatbin.display().to_string()));
    }
    embedded.push_str("];\n");
    if !spills.is_empty() {
        return Err(format!(
            "kernels must not spill registers (set TULU_PTXAS_REPORT=1 for the full report; SPILLS_ALLOWED in \
             build.rs lists exceptions):\n  {}",
            spills.join("\n  ")
        ));
    }
    fs::write(out.join("kernel-resources.tsv"), &table).map_err(|e| format!("writing kernel-resources.tsv: {e}"))?;
    // OUT_DIR is <target dir>/<profile>/build/<pkg>-<hash>/out: the emulator finds the table at
    // <target dir>/kernel-resources.tsv (scripts/cuda-emu points TULU_EMU_RESOURCES at it).
    if let Some(target) = out.ancestors().nth(4) {
        let tmp = target.join(format!("kernel-resources.tsv.{}", std::process::id()));
        fs::write(&tmp, &table)
            .and_then(|_| fs::rename(&tmp, target.join("kernel-resources.tsv")))
            .map_err(|e| format!("writing {}: {e}", target.join("kernel-resources.tsv").display()))?;
    }
    fs::write(out.join("kernels.rs"), embedded).map_err(|e| format!("writing kernels.rs: {e}"))
}

/// Compiles one `.cu` into `OUT_DIR/NAME.fatbin`; returns the name, the path and ptxas' log.
fn compile(nvcc: &Path, include: &Path, src: &Path, out: &Path) -> Result<(String, PathBuf, String), String> {
    let name = src.file_stem().and_then(|s| s.to_str()).ok_or_else(|| format!("bad file name {}", src.display()))?;
    let fatbin = out.join(format!("{name}.fatbin"));
    let mut cmd = Command::new(nvcc);
    // -keep leaves the PTX, whose `.maxntid` / `.minnctapersm` are the launch bounds.
    let keep = out.join(format!("keep-{name}"));
    fs::create_dir_all(&keep).map_err(|e| format!("{}: {e}", keep.display()))?;
    cmd.args(["-fatbin", "-O3", "-lineinfo", "-std=c++17", "-Xptxas", "-v", "-keep", "-keep-dir"]).arg(&keep);
    cmd.arg("-I").arg(include);
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

/// One kernel on one architecture, as ptxas' `-v` log reports it.
struct Resources {
    function: String,
    arch: String,
    registers: u64,
    smem: u64,
    spill_stores: u64,
    spill_loads: u64,
}

/// The number just before `what` in a ptxas line ("24 bytes spill stores", "Used 32 registers").
fn figure(line: &str, what: &str) -> u64 {
    line.split(what)
        .next()
        .filter(|before| before.len() < line.len())
        .and_then(|before| before.split_whitespace().next_back())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0)
}

/// Every kernel's resources from ptxas' `-v` log.
fn resources(log: &str) -> Vec<Resources> {
    let mut found: Vec<Resources> = Vec::new();
    for line in log.lines() {
        // "ptxas info    : Compiling entry function 'NAME' for 'sm_90a'"
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let function = parts.next().unwrap_or_default().to_owned();
            let arch = parts.nth(1).unwrap_or_default().to_owned();
            found.push(Resources { function, arch, registers: 0, smem: 0, spill_stores: 0, spill_loads: 0 });
        } else if let Some(k) = found.last_mut() {
            // "    24 bytes stack frame, 20 bytes spill stores, 32 bytes spill loads"
            if line.contains("spill stores") {
                k.spill_stores = figure(line, "bytes spill stores");
                k.spill_loads = figure(line, "bytes spill loads");
            // "ptxas info    : Used 32 registers, used 1 barriers, 16920 bytes smem"
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = figure(line, "registers");
                k.smem = figure(line, "bytes smem");
            }
        }
    }
    found
}

/// `__launch_bounds__` of each kernel from the PTX nvcc kept in `dir` (any architecture's:
/// they come from the source): name -> (max threads per block, min blocks per SM), 0 if none.
fn launch_bounds(dir: &Path) -> std::collections::HashMap<String, (u64, u64)> {
    let mut bounds = std::collections::HashMap::new();
    let ptx = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "ptx"));
    let Some(text) = ptx.and_then(|p| fs::read_to_string(p).ok()) else { return bounds };
    let mut entry = String::new();
    for line in text.lines() {
        let line = line.trim();
        // ".visible .entry NAME(" then, before the body, ".maxntid 128, 1, 1" / ".minnctapersm 4"
        if let Some(rest) = line.split(".entry ").nth(1) {
            entry = rest.split('(').next().unwrap_or_default().trim().to_owned();
        } else if let Some(rest) = line.strip_prefix(".maxntid") {
            let threads = rest.split(',').filter_map(|n| n.trim().parse::<u64>().ok()).product::<u64>();
            bounds.entry(entry.clone()).or_insert((0, 0)).0 = threads;
        } else if let Some(rest) = line.strip_prefix(".minnctapersm") {
            bounds.entry(entry.clone()).or_insert((0, 0)).1 = rest.trim().parse().unwrap_or(0);
        }
    }
    bounds
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
