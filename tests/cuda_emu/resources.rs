//! Launch resources: the emulator holds launches of tulu's kernels to what ptxas reported for
//! them (build.rs writes `<target>/kernel-resources.tsv`; scripts/cuda-emu points
//! `TULU_EMU_RESOURCES` at it) and refuses, as the driver does, a block past the kernel's
//! `__launch_bounds__` or past the SM's 65,536 registers.

use super::*;

/// The table build.rs wrote, as (kernel, arch, registers, max_threads) rows.
fn table() -> Vec<(String, String, u32, u32)> {
    let path = std::env::var("TULU_EMU_RESOURCES").expect("TULU_EMU_RESOURCES (set by scripts/cuda-emu)");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e} (written by build.rs)"));
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[1].to_owned(), f[2].to_owned(), f[3].parse().unwrap(), f[7].parse().unwrap())
        })
        .collect()
}

/// Loads `TULU_KERNELS/attention.so` and launches attention_decode_bf16 with `threads` threads
/// and zero arguments; prints the launch's result.
fn launch_attention(threads: u32) -> String {
    let (ctx, stream, _) = setup(0);
    let dir = std::env::var("TULU_KERNELS").expect("TULU_KERNELS (set by scripts/cuda-emu)");
    let image = std::fs::read(format!("{dir}/attention.so")).unwrap();
    let module = ctx.load_module(Ptx::from_binary(image)).unwrap();
    let f = module.load_function("attention_decode_bf16").unwrap();
    let zero = 0u64;
    let mut l = stream.launch_builder(&f);
    for _ in 0..17 {
        l.arg(&zero);
    }
    match unsafe { l.launch(cfg(1, threads, 0)) } {
        Ok(_) => "launched".into(),
        Err(e) => format!("error {e}"),
    }
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn a_block_past_the_launch_bounds_is_refused_out_of_resources() {
    const TEST: &str = "resources::a_block_past_the_launch_bounds_is_refused_out_of_resources";
    if let Some(mode) = child_mode() {
        println!("RESULT {}", launch_attention(mode.parse().unwrap()));
        return;
    }
    let rows = table();
    let bounds = rows.iter().find(|r| r.0 == "attention_decode_bf16" && r.1 == "sm_90a").map(|r| r.3);
    assert_eq!(bounds, Some(128), "attention_decode_bf16's __launch_bounds__(128, 4) on sm_90a");
    // 256 threads: one block's worth of a GPU refusal. (A launch within bounds would run the
    // kernel on zero pointers, so only the refusal is run here; the GPU suite runs the rest.)
    let out = child(TEST, "256", &[], &[]);
    let (result, stderr) = (results(&out).join(" "), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(result.contains("CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"), "{result} / {stderr}");
    let want = "cuLaunchKernel `attention_decode_bf16`: a block of 256 threads exceeds the kernel's \
                __launch_bounds__ of 128";
    assert!(stderr.contains(want), "{stderr}");
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn kernels_report_ptxas_registers_and_every_kernel_is_in_the_table() {
    let rows = table();
    let (ctx, _stream, _) = setup(0);
    let dir = std::env::var("TULU_KERNELS").expect("TULU_KERNELS (set by scripts/cuda-emu)");
    let image = std::fs::read(format!("{dir}/sampling.so")).unwrap();
    let module = ctx.load_module(Ptx::from_binary(image)).unwrap();
    for name in ["argmax_bf16", "sample_bf16"] {
        let row = rows.iter().find(|r| r.0 == name && r.1 == "sm_90a").unwrap_or_else(|| panic!("{name}: no row"));
        let f = module.load_function(name).unwrap();
        assert_eq!(f.num_regs().unwrap(), row.2 as i32, "{name}: NUM_REGS is ptxas' figure");
        for arch in ["sm_80", "sm_89", "sm_90a"] {
            assert!(rows.iter().any(|r| r.0 == name && r.1 == arch), "{name} on {arch}");
        }
    }
}
