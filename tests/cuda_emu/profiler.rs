//! The emulator's profiler (`TULU_EMU_PROFILE`, emu/runtime/profile.cpp, emu/driver/profile.cpp):
//! each test launches a small kernel of emu/tests/emu_tests.cu with a known access pattern in a
//! child process that profiles, and checks the counts against the pattern worked out by hand —
//! once efficient and once with the flaw the counter exists to see.

use super::*;

/// One launch line of a profile, by column name.
struct LaunchLine(std::collections::HashMap<String, String>);

impl LaunchLine {
    fn get(&self, col: &str) -> u64 {
        self.0.get(col).unwrap_or_else(|| panic!("no column {col}")).parse().unwrap()
    }
}

/// The `launch` lines of a profile file, with the header's column names.
fn launch_lines(text: &str) -> Vec<LaunchLine> {
    let header: Vec<&str> = text
        .lines()
        .find_map(|l| l.strip_prefix("# launch\t"))
        .unwrap_or_else(|| panic!("no launch header in the profile:\n{text}"))
        .split('\t')
        .collect();
    text.lines()
        .filter_map(|l| l.strip_prefix("launch\t"))
        .map(|l| LaunchLine(header.iter().map(|h| h.to_string()).zip(l.split('\t').map(str::to_owned)).collect()))
        .collect()
}

/// In a child: launches the kernel its mode (`name:arg`) names.
fn run_child_profile_case() -> bool {
    let Some(mode) = child_mode() else { return false };
    let (name, arg) = mode.split_once(':').unwrap();
    let arg: i32 = arg.parse().unwrap();
    let (_ctx, stream, module) = setup(0);
    let f = kernel(&module, name);
    let d_in = stream.clone_htod(&vec![1.0f32; 512 * 8]).unwrap();
    let mut d_out = stream.alloc_zeros::<f32>(512).unwrap();
    let mut l = stream.launch_builder(&f);
    let config = match name {
        "strided_copy" => {
            l.arg(&d_in).arg(&mut d_out).arg(&arg);
            cfg(4, 128, 0)
        }
        _ => {
            l.arg(&mut d_out).arg(&arg);
            cfg(1, 32, 0)
        }
    };
    unsafe { l.launch(config) }.unwrap();
    stream.synchronize().unwrap();
    println!("RESULT ok");
    true
}

/// Runs the case `mode` in a profiling child; returns its one launch line.
fn profiled(test: &str, mode: &str) -> LaunchLine {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("profile.tsv");
    let out = child(
        test,
        mode,
        &[("TULU_EMU_PROFILE", file.to_str().unwrap()), ("TULU_EMU_PROFILE_LAUNCHES", "1")],
        &["TULU_EMU_SANITIZE"],
    );
    assert_eq!(results(&out), ["ok"], "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&file).unwrap();
    let mut lines = launch_lines(&text);
    assert_eq!(lines.len(), 1, "{text}");
    // The exit summary names the kernel's instructions by file:line.
    assert!(text.contains("emu_tests.cu:"), "{text}");
    lines.remove(0)
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn profiler_counts_sectors_per_request_and_first_touch_dram_bytes() {
    const TEST: &str = "profiler::profiler_counts_sectors_per_request_and_first_touch_dram_bytes";
    if run_child_profile_case() {
        return;
    }
    // 512 threads = 16 warps, two 4-byte loads each: 32 requests of 128 bytes (4 sectors).
    let p = profiled(TEST, "strided_copy:1");
    assert_eq!((p.get("ld_requests"), p.get("ld_sectors"), p.get("ld_ideal")), (32, 128, 128));
    assert_eq!((p.get("st_requests"), p.get("st_sectors"), p.get("st_ideal")), (16, 64, 64));
    // Each element is read by two blocks; the launch touches DRAM once: the 2 KiB once.
    assert_eq!((p.get("dram_read_bytes"), p.get("dram_write_bytes")), (2048, 2048));
    // Stride 8 floats: each lane a sector of its own, 8x the ideal, and 8x the DRAM bytes.
    let p = profiled(TEST, "strided_copy:8");
    assert_eq!((p.get("ld_requests"), p.get("ld_sectors"), p.get("ld_ideal")), (32, 1024, 128));
    assert_eq!(p.get("dram_read_bytes"), 512 * 32);
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn profiler_counts_shared_memory_bank_conflicts_and_atomics() {
    const TEST: &str = "profiler::profiler_counts_shared_memory_bank_conflicts_and_atomics";
    if run_child_profile_case() {
        return;
    }
    // One warp: 32 row stores (one per column) and one column read, 33 requests. With the
    // padding each lane's row starts in another bank: one wavefront per request.
    let p = profiled(TEST, "column_read:1");
    assert_eq!((p.get("sh_requests"), p.get("sh_wavefronts"), p.get("sh_ideal")), (33, 33, 33));
    assert_eq!(p.get("atomics"), 32);
    // Without it all 32 lanes hit one bank at every request: 32 wavefronts each.
    let p = profiled(TEST, "column_read:0");
    assert_eq!((p.get("sh_requests"), p.get("sh_wavefronts"), p.get("sh_ideal")), (33, 33 * 32, 33));
}
