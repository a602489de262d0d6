//! The emulator's sanitizer (`TULU_EMU_SANITIZE`, emu/runtime/sanitize.cpp) and its launch
//! limits: each test plants one bug in a small kernel of emu/tests/emu_tests.cu, shows the
//! checker reporting it (kernel, file:line, thread) and failing the launch, and shows the same
//! kernel without the bug passing the check.

use super::*;
use cudarc::driver::sys::CUfunction_attribute_enum as Attr;

/// Launches emu_tests.cu kernel `name` with an output buffer and `arg`, synchronizes, and
/// returns "ok" or the error.
fn launch_case(name: &str, arg: i32, blocks: u32, threads: u32, smem: u32) -> String {
    let (_ctx, stream, module) = setup(0);
    let f = kernel(&module, name);
    let d_in = stream.clone_htod(&vec![1.0f32; 1024]).unwrap();
    let mut d_out = stream.alloc_zeros::<f32>(4096).unwrap();
    let mut l = stream.launch_builder(&f);
    match name {
        "warp_publish" | "predecessor" => l.arg(&d_in).arg(&mut d_out).arg(&arg),
        "fill_dynamic" => l.arg(&mut d_out),
        _ => l.arg(&mut d_out).arg(&arg),
    };
    let launched = unsafe { l.launch(cfg(blocks, threads, smem)) };
    match launched.and_then(|_| stream.synchronize()) {
        Ok(()) => "ok".into(),
        Err(e) => format!("error {e}"),
    }
}

/// Runs `launch_case` (the mode `name:arg:blocks:threads:smem`) in a child under
/// `TULU_EMU_SANITIZE=check`; returns the child's result and stderr.
fn sanitized(test: &str, check: &str, mode: &str) -> (String, String) {
    let out = child(test, mode, &[("TULU_EMU_SANITIZE", check)], &[]);
    (results(&out).join(" "), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// In a child: runs the case its mode names and prints the result.
fn run_child_case() -> bool {
    let Some(mode) = child_mode() else { return false };
    let p: Vec<&str> = mode.split(':').collect();
    let n = |i: usize| p[i].parse::<u32>().unwrap();
    println!("RESULT {}", launch_case(p[0], n(1) as i32, n(2), n(3), n(4)));
    true
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn racecheck_finds_an_overwrite_that_only_a_shuffle_separates_from_reads() {
    const TEST: &str = "sanitizer::racecheck_finds_an_overwrite_that_only_a_shuffle_separates_from_reads";
    if run_child_case() {
        return;
    }
    let (result, stderr) = sanitized(TEST, "racecheck", "warp_publish:1:1:64:0");
    assert_eq!(result, "ok", "with its __syncwarp the exchange is clean: {stderr}");
    let (result, stderr) = sanitized(TEST, "racecheck", "warp_publish:0:1:64:0");
    assert!(result.contains("CUDA_ERROR_LAUNCH_FAILED"), "{result}");
    for want in [
        "kernel `warp_publish` block (0,0,0): racecheck: shared memory hazard (write after read)",
        "thread (0,0,0) [warp 0 lane 0] writes it at emu_tests.cu:",
        "read it at emu_tests.cu:",
    ] {
        assert!(stderr.contains(want), "missing `{want}` in: {stderr}");
    }
    // Without the sanitizer the same kernel passes: the fibers hide the race.
    let plain = child(TEST, "warp_publish:0:1:64:0", &[], &["TULU_EMU_SANITIZE"]);
    assert_eq!(results(&plain).join(" "), "ok");
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn racecheck_finds_a_missing_barrier_that_the_forward_schedule_hides() {
    const TEST: &str = "sanitizer::racecheck_finds_a_missing_barrier_that_the_forward_schedule_hides";
    if run_child_case() {
        return;
    }
    let (result, stderr) = sanitized(TEST, "racecheck", "predecessor:1:2:128:512");
    assert_eq!(result, "ok", "{stderr}");
    let (result, stderr) = sanitized(TEST, "racecheck", "predecessor:0:2:128:512");
    assert!(result.contains("CUDA_ERROR_LAUNCH_FAILED"), "{result}");
    assert!(stderr.contains("shared memory hazard (read after write) at byte 0 of dynamic shared memory"), "{stderr}");
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn memcheck_finds_a_misaligned_16_byte_store() {
    const TEST: &str = "sanitizer::memcheck_finds_a_misaligned_16_byte_store";
    if run_child_case() {
        return;
    }
    let (result, stderr) = sanitized(TEST, "memcheck", "store_vec4:4:1:32:0");
    assert_eq!(result, "ok", "a 16-byte store at a 16-byte boundary: {stderr}");
    let (result, stderr) = sanitized(TEST, "memcheck", "store_vec4:1:1:32:0");
    assert!(result.contains("CUDA_ERROR_LAUNCH_FAILED"), "{result}");
    let want = "kernel `store_vec4` block (0,0,0): memcheck: misaligned 16-byte store at ";
    assert!(stderr.contains(want), "{stderr}");
    assert!(stderr.contains("(not a multiple of 16) by thread (0,0,0) [warp 0 lane 0] at emu_tests.cu:"), "{stderr}");
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn memcheck_bounds_dynamic_shared_memory_by_the_bytes_the_launch_asked_for() {
    const TEST: &str = "sanitizer::memcheck_bounds_dynamic_shared_memory_by_the_bytes_the_launch_asked_for";
    if run_child_case() {
        return;
    }
    let (result, stderr) = sanitized(TEST, "memcheck", "fill_dynamic:0:1:32:128");
    assert_eq!(result, "ok", "{stderr}");
    // 4 bytes short: thread 31's float lies past the end.
    let (result, stderr) = sanitized(TEST, "memcheck", "fill_dynamic:0:1:32:124");
    assert!(result.contains("CUDA_ERROR_LAUNCH_FAILED"), "{result}");
    let want = "memcheck: 4-byte store at byte 124 of dynamic shared memory, past the 124 bytes the launch \
                requested, by thread (31,0,0) [warp 0 lane 31] at emu_tests.cu:";
    assert!(stderr.contains(want), "{stderr}");
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn racecheck_finds_two_blocks_writing_different_values_to_the_same_global_bytes() {
    const TEST: &str = "sanitizer::racecheck_finds_two_blocks_writing_different_values_to_the_same_global_bytes";
    if run_child_case() {
        return;
    }
    let (result, stderr) = sanitized(TEST, "racecheck", "overlapping_rows:0:8:32:0");
    assert_eq!(result, "ok", "{stderr}");
    // Atomics from every block to one word are no race.
    let (result, stderr) = sanitized(TEST, "all", "atomic_sum:5000:8:64:0");
    assert_eq!(result, "ok", "{stderr}");
    // The same bytes with the same values: a race nothing depends on, not reported.
    let (result, stderr) = sanitized(TEST, "racecheck", "overlapping_rows:2:8:32:0");
    assert_eq!(result, "ok", "{stderr}");
    let (result, stderr) = sanitized(TEST, "racecheck", "overlapping_rows:1:8:32:0");
    assert!(result.contains("CUDA_ERROR_LAUNCH_FAILED"), "{result}");
    assert!(stderr.contains("of the launch both write global bytes ["), "{stderr}");
    assert!(stderr.contains(") without atomics: this block at emu_tests.cu:"), "{stderr}");
    // Strict: the same values written by two blocks are a race too.
    let (result, stderr) = sanitized(TEST, "strict", "overlapping_rows:2:8:32:0");
    assert!(result.contains("CUDA_ERROR_LAUNCH_FAILED"), "{result}");
    assert!(stderr.contains("of the launch both write global bytes ["), "{stderr}");
    let (result, stderr) = sanitized(TEST, "strict", "overlapping_rows:0:8:32:0");
    assert_eq!(result, "ok", "{stderr}");
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn an_unknown_sanitizer_setting_stops_the_process() {
    const TEST: &str = "sanitizer::an_unknown_sanitizer_setting_stops_the_process";
    if run_child_case() {
        return;
    }
    let (result, stderr) = sanitized(TEST, "memchek", "store_vec4:4:1:32:0");
    assert!(result.is_empty(), "{result}");
    assert!(stderr.contains("TULU_EMU_SANITIZE=memchek: expected memcheck, racecheck, all or strict"), "{stderr}");
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn static_shared_memory_counts_against_the_48_and_227_kib_limits() {
    let (_ctx, stream, module) = setup(0);
    let f = kernel(&module, "big_static");
    assert_eq!(f.shared_size_bytes().unwrap(), 40 * 1024, "big_static's static __shared__ bytes");
    let max_dynamic = Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
    assert_eq!(f.get_attribute(max_dynamic).unwrap(), 8 * 1024, "what 48 KiB leaves");
    let mut d_out = stream.alloc_zeros::<f32>(32).unwrap();
    let mut launch = |smem: u32| {
        let mut l = stream.launch_builder(&f);
        l.arg(&mut d_out);
        unsafe { l.launch(cfg(1, 32, smem)) }.map(|_| ())
    };
    launch(8 * 1024).expect("40 KiB static + 8 KiB dynamic is 48 KiB");
    let e = launch(8 * 1024 + 4).unwrap_err().to_string();
    assert!(e.contains("CUDA_ERROR_INVALID_VALUE"), "{e}");
    f.set_attribute(max_dynamic, 16 * 1024).unwrap();
    launch(16 * 1024).expect("opted in");
    let e = f.set_attribute(max_dynamic, 227 * 1024 - 40 * 1024 + 4).unwrap_err().to_string();
    assert!(e.contains("CUDA_ERROR_INVALID_VALUE"), "past 227 KiB in all: {e}");
    stream.synchronize().unwrap();
    assert!(stream.clone_dtoh(&d_out).unwrap().iter().all(|&x| x == 3.0));
}
