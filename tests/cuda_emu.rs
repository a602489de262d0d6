//! The CPU emulation of CUDA itself (`emu/`, docs/cuda-emu.md): each test is a property the
//! GPU suite relies on the emulator for, checked against an independent expectation, and each
//! broken-kernel test shows the emulator catching the bug it plants.
//!
//! They run under the emulator only (`scripts/test` runs them there in CI):
//! `scripts/cuda-emu cargo test --features cuda,nccl --test cuda_emu -- --include-ignored`.
//! Tests that need a process of their own (a fault, a schedule, a stream mode, no devices) run
//! themselves again as a child with `TULU_EMU_CHILD` set and judge what the child printed.
#![cfg(feature = "cuda")]

use std::process::{Command, Output};
use std::sync::Arc;

use cudarc::driver::sys::CUstreamCaptureMode;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

#[path = "cuda_emu/cublaslt.rs"]
mod cublaslt;
#[path = "cuda_emu/mma.rs"]
mod mma;
#[path = "cuda_emu/profiler.rs"]
mod profiler;
#[path = "cuda_emu/resources.rs"]
mod resources;
#[path = "cuda_emu/sanitizer.rs"]
mod sanitizer;

/// A context on emulated device `ordinal`, with the emulator's test kernels loaded.
fn setup(ordinal: usize) -> (Arc<CudaContext>, Arc<CudaStream>, Arc<CudaModule>) {
    let ctx = CudaContext::new(ordinal).expect("no CUDA device: run under scripts/cuda-emu");
    let name = ctx.name().unwrap();
    assert!(name.contains("emulator"), "these tests check the CUDA emulator, not `{name}`: run under scripts/cuda-emu");
    // SAFETY: before any buffer exists; each test orders its work on one stream.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().unwrap();
    let dir = std::env::var("TULU_EMU_TEST_KERNELS").expect("TULU_EMU_TEST_KERNELS (set by scripts/cuda-emu)");
    let image = std::fs::read(format!("{dir}/emu_tests.so")).unwrap();
    let module = ctx.load_module(Ptx::from_binary(image)).unwrap();
    (ctx, stream, module)
}

fn kernel(module: &Arc<CudaModule>, name: &str) -> CudaFunction {
    module.load_function(name).unwrap()
}

fn cfg(blocks: u32, threads: u32, smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem }
}

/// Runs `test` again in a child process with `TULU_EMU_CHILD=mode` and `env`.
fn child(test: &str, mode: &str, env: &[(&str, &str)], remove: &[&str]) -> Output {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--include-ignored", "--nocapture", "--test-threads=1"]).env("TULU_EMU_CHILD", mode);
    for (k, v) in env {
        cmd.env(k, v);
    }
    for k in remove {
        cmd.env_remove(k);
    }
    cmd.output().unwrap()
}

/// What the child printed after `RESULT ` on each line (the harness may have started the line).
fn results(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once("RESULT ").map(|(_, r)| r.to_owned()))
        .collect()
}

fn child_mode() -> Option<String> {
    std::env::var("TULU_EMU_CHILD").ok()
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn bf16_conversions_equal_half_on_every_pattern() {
    let (_ctx, stream, module) = setup(0);
    let bits: Vec<u16> = (0..=u16::MAX).collect();
    // Every bf16 pattern widened, plus the low halves where rounding decides: ties (0x8000),
    // just below and above, and a spread of others.
    let mut floats = Vec::new();
    for b in 0..=u16::MAX as u32 {
        for low in [0u32, 0x7fff, 0x8000, 0x8001, 0xffff, 0x1234, 0xc000] {
            floats.push(f32::from_bits(b << 16 | low));
        }
    }
    let d_bits = stream.clone_htod(&bits).unwrap();
    let d_floats = stream.clone_htod(&floats).unwrap();
    let mut as_float = stream.alloc_zeros::<f32>(bits.len()).unwrap();
    let mut as_bf16 = stream.alloc_zeros::<u16>(floats.len()).unwrap();
    let (nb, nf) = (bits.len() as i32, floats.len() as i32);
    let f = kernel(&module, "bf16_conversions");
    let mut l = stream.launch_builder(&f);
    l.arg(&d_bits).arg(&mut as_float).arg(&nb).arg(&d_floats).arg(&mut as_bf16).arg(&nf);
    unsafe { l.launch(cfg(64, 256, 0)) }.unwrap();
    let as_float = stream.clone_dtoh(&as_float).unwrap();
    let as_bf16 = stream.clone_dtoh(&as_bf16).unwrap();
    for (&b, &f) in bits.iter().zip(&as_float) {
        let want = half::bf16::from_bits(b).to_f32();
        assert!(f.to_bits() == want.to_bits() || (f.is_nan() && want.is_nan()), "bf16 {b:#06x} -> {f} (half: {want})");
    }
    for (&x, &got) in floats.iter().zip(&as_bf16) {
        let want = half::bf16::from_f32(x);
        let got = half::bf16::from_bits(got);
        assert!(got == want || (got.is_nan() && want.is_nan()), "f32 {:#010x} -> {got} (half: {want})", x.to_bits());
    }
}

/// What CUDA's documentation says each warp operation returns, lane by lane.
fn expected_warp_ops(v: &[u32; 32]) -> Vec<u32> {
    let mut out = vec![0u32; 32 * 64];
    for lane in 0..32 {
        let o = &mut out[lane * 64..lane * 64 + 64];
        for j in 0..5 {
            o[j] = v[lane ^ (1 << j)];
            o[5 + j] = if lane >= 1 << j { v[lane - (1 << j)] } else { v[lane] };
            o[10 + j] = if lane + (1 << j) < 32 { v[lane + (1 << j)] } else { v[lane] };
        }
        o[15] = v[(lane * 7 + 3) % 32];
        // width 8: xor 5 stays inside the lane's group of 8.
        o[16] = v[lane ^ 5];
        // width 16: up 3 within the group of 16.
        o[17] = if lane % 16 >= 3 { v[lane - 3] } else { v[lane] };
        // width 16: source 37 is 37 mod 16 = 5 within the group.
        o[18] = v[(lane & !15) + 5];
        o[19] = (0..32).filter(|&l| v[l] & 1 == 1).fold(0, |m, l| m | 1 << l);
        o[20] = if v[lane] == 0 { 0 } else { v[lane].trailing_zeros() + 1 };
        o[21] = 0;
        o[22] = 1;
        o[23] = 1;
        o[24] = v[lane ^ 16];
        o[25] = if lane < 31 { 2 * (lane as u32 + 1) + 1 } else { 2 * lane as u32 + 1 };
        o[26] = if lane < 16 { (0..16).filter(|&l| v[l] & 1 == 1).fold(0, |m, l| m | 1 << l) } else { 0 };
    }
    out
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn warp_operations_match_cuda_on_every_lane() {
    let (_ctx, stream, module) = setup(0);
    let mut v = [0u32; 32];
    for (i, x) in v.iter_mut().enumerate() {
        // Distinct values, odd and even, one zero (for __ffs), high bits set.
        *x = if i == 9 {
            0
        } else {
            (i as u32).wrapping_mul(2654435761) ^ 0x8000_0000 | (i as u32).is_multiple_of(3) as u32
        };
    }
    let d_v = stream.clone_htod(&v).unwrap();
    let mut d_out = stream.alloc_zeros::<u32>(32 * 64).unwrap();
    let f = kernel(&module, "warp_ops");
    let mut l = stream.launch_builder(&f);
    l.arg(&d_v).arg(&mut d_out);
    unsafe { l.launch(cfg(1, 32, 0)) }.unwrap();
    let got = stream.clone_dtoh(&d_out).unwrap();
    let want = expected_warp_ops(&v);
    for lane in 0..32 {
        for j in 0..27 {
            assert_eq!(
                got[lane * 64 + j],
                want[lane * 64 + j],
                "lane {lane}, operation {j} (see warp_ops in emu_tests.cu)"
            );
        }
    }
}

/// `predecessor` with or without its barrier under the schedule `TULU_EMU_SCHEDULE` names:
/// prints whether every output is right.
fn run_predecessor(with_barrier: bool) -> String {
    let (_ctx, stream, module) = setup(0);
    let n = 128usize;
    let input: Vec<f32> = (0..2 * n).map(|i| i as f32).collect();
    let d_in = stream.clone_htod(&input).unwrap();
    let mut d_out = stream.alloc_zeros::<f32>(2 * n).unwrap();
    let f = kernel(&module, "predecessor");
    let flag = with_barrier as i32;
    let mut l = stream.launch_builder(&f);
    l.arg(&d_in).arg(&mut d_out).arg(&flag);
    unsafe { l.launch(cfg(2, n as u32, (n * 4) as u32)) }.unwrap();
    let out = stream.clone_dtoh(&d_out).unwrap();
    let wrong: Vec<usize> = (0..2 * n).filter(|&i| out[i] != input[(i / n) * n + (i % n + n - 1) % n]).collect();
    if wrong.is_empty() {
        "right".into()
    } else {
        format!("wrong at {} of {} outputs, first {}", wrong.len(), 2 * n, wrong[0])
    }
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn a_missing_barrier_gives_a_wrong_result_under_a_second_schedule() {
    const TEST: &str = "a_missing_barrier_gives_a_wrong_result_under_a_second_schedule";
    if let Some(mode) = child_mode() {
        println!("RESULT {}", run_predecessor(mode == "barrier"));
        return;
    }
    let run = |barrier: bool, schedule: &str| {
        let out = child(TEST, if barrier { "barrier" } else { "none" }, &[("TULU_EMU_SCHEDULE", schedule)], &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        results(&out).join(" ")
    };
    for schedule in ["forward", "reverse", "random:1", "random:2"] {
        assert_eq!(run(true, schedule), "right", "with the barrier, under {schedule}");
    }
    let (forward, reverse) = (run(false, "forward"), run(false, "reverse"));
    eprintln!("without the barrier: forward {forward}; reverse {reverse}");
    assert!(reverse.starts_with("wrong"), "the reverse schedule must expose the race: {reverse}");
    assert_ne!(forward, reverse, "the two schedules must disagree about a racy kernel");
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn reading_past_a_buffer_faults_naming_the_kernel() {
    const TEST: &str = "reading_past_a_buffer_faults_naming_the_kernel";
    if child_mode().is_some() {
        let (_ctx, stream, module) = setup(0);
        let n = 1024i32; // 4096 bytes: the buffer ends exactly at its guard page
        let d_in = stream.alloc_zeros::<f32>(n as usize).unwrap();
        let mut d_out = stream.alloc_zeros::<f32>(n as usize).unwrap();
        let f = kernel(&module, "read_past");
        let mut l = stream.launch_builder(&f);
        l.arg(&d_in).arg(&mut d_out).arg(&n);
        unsafe { l.launch(cfg(4, 256, 0)) }.unwrap();
        stream.synchronize().unwrap();
        println!("RESULT survived");
        return;
    }
    let out = child(TEST, "fault", &[], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && results(&out).is_empty(), "the child must die: {stderr}");
    assert!(stderr.contains("kernel `read_past` block (3,0,0) thread 255"), "{stderr}");
    assert!(stderr.contains("access 0 bytes past the end of a 4096-byte allocation"), "{stderr}");
}

/// Fills a buffer on the device, copies it to pinned host memory without waiting, reads the
/// host copy, then synchronizes and reads it again: prints both reads.
fn stale_read() -> String {
    use cudarc::driver::result;
    let (_ctx, stream, module) = setup(0);
    let n = 256usize;
    let mut d = stream.alloc_zeros::<f32>(n).unwrap();
    stream.synchronize().unwrap();
    let f = kernel(&module, "fill");
    let (count, value) = (n as i32, 7.0f32);
    let mut l = stream.launch_builder(&f);
    l.arg(&mut d).arg(&count).arg(&value);
    unsafe { l.launch(cfg(1, 128, 0)) }.unwrap();
    // SAFETY: n floats of pinned memory, written below before being read; freed at the end.
    unsafe {
        let host = result::malloc_host(n * 4, 0).unwrap() as *mut f32;
        let slice = std::slice::from_raw_parts_mut(host, n);
        slice.fill(-1.0);
        let (src, _sync) = d.device_ptr(&stream);
        result::memcpy_dtoh_async(slice, src, stream.cu_stream()).unwrap();
        // Long enough for an eager stream to have finished: only a lazy one leaves it stale.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let before = slice[0];
        stream.synchronize().unwrap();
        let after = slice[0];
        result::free_host(host as *mut _).unwrap();
        format!("{before} {after}")
    }
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn a_host_read_without_synchronize_sees_stale_data_in_async_mode() {
    const TEST: &str = "a_host_read_without_synchronize_sees_stale_data_in_async_mode";
    if child_mode().is_some() {
        println!("RESULT {}", stale_read());
        return;
    }
    let run = |streams: &str| {
        let out = child(TEST, "stale", &[("TULU_EMU_STREAMS", streams)], &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        results(&out).join(" ")
    };
    assert_eq!(run("async"), "-1 7", "async: the read before synchronize must see the old contents");
    assert_eq!(run("sync"), "7 7", "sync: every call completes before it returns");
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn a_real_nvcc_fatbin_is_refused() {
    const TEST: &str = "a_real_nvcc_fatbin_is_refused";
    if child_mode().is_some() {
        // tulu's embedded kernels are nvcc's fatbins: without TULU_KERNELS they are what loads.
        let e = tulu::unstable::backend::cuda::CudaBackend::new(0).err().map(|e| e.to_string()).unwrap_or_default();
        println!("RESULT {e}");
        return;
    }
    let out = child(TEST, "fatbin", &[], &["TULU_KERNELS"]);
    let (result, stderr) = (results(&out).join(" "), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(result.contains("CUDA_ERROR_INVALID_IMAGE"), "{result}");
    assert!(stderr.contains("a real fatbin (nvcc output) cannot run on the emulator"), "{stderr}");
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn the_emulator_reports_no_device_unless_enabled() {
    const TEST: &str = "the_emulator_reports_no_device_unless_enabled";
    if child_mode().is_some() {
        println!("RESULT {:?}", tulu::unstable::backend::cuda::cuda_available());
        return;
    }
    let out = child(TEST, "off", &[], &["TULU_EMU_DEVICES"]);
    assert_eq!(results(&out).join(" "), r#"Err("the NVIDIA driver reports no CUDA device")"#);
    let out = child(TEST, "on", &[("TULU_EMU_DEVICES", "2")], &[]);
    assert_eq!(results(&out).join(" "), "Ok(())");
    // And tulu says which device it runs on.
    let (ctx, _, _) = setup(0);
    assert!(ctx.name().unwrap().contains("tulu CUDA emulator"));
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn fresh_memory_is_nan_and_memory_info_counts_it() {
    let (ctx, stream, _module) = setup(1);
    let (free0, total) = ctx.mem_get_info().unwrap();
    let n = 3 << 20;
    // SAFETY: read back below only to check the poison.
    let d = unsafe { stream.alloc::<u32>(n) }.unwrap();
    let (free1, total1) = ctx.mem_get_info().unwrap();
    assert_eq!(total, total1);
    assert_eq!(free0 - free1, n * 4, "cuMemGetInfo counts the allocation");
    let host = stream.clone_dtoh(&d).unwrap();
    assert!(host.iter().all(|&x| x == u32::MAX), "a fresh allocation is 0xFF bytes (NaN in every float type)");
    let z = stream.alloc_zeros::<u32>(n).unwrap();
    assert!(stream.clone_dtoh(&z).unwrap().iter().all(|&x| x == 0));
    drop((d, z));
    stream.synchronize().unwrap();
    assert_eq!(ctx.mem_get_info().unwrap().0, free0, "freed memory returns");
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn a_deadlocked_block_fails_its_launch_naming_the_kernel() {
    const TEST: &str = "a_deadlocked_block_fails_its_launch_naming_the_kernel";
    if child_mode().is_some() {
        let (_ctx, stream, module) = setup(0);
        let mut d = stream.alloc_zeros::<u32>(32).unwrap();
        let f = kernel(&module, "divergent_deadlock");
        let mut l = stream.launch_builder(&f);
        l.arg(&mut d);
        let launched = unsafe { l.launch(cfg(1, 32, 0)) };
        println!("RESULT {launched:?} {:?}", stream.synchronize());
        return;
    }
    let out = child(TEST, "deadlock", &[], &[]);
    let (result, stderr) = (results(&out).join(" "), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(result.contains("CUDA_ERROR_LAUNCH_FAILED"), "{result}");
    assert!(stderr.contains("kernel `divergent_deadlock`") && stderr.contains("deadlock"), "{stderr}");
    assert!(stderr.contains("thread 0 waits at __shfl_xor_sync") && stderr.contains("16 at __syncthreads"), "{stderr}");
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn atomics_sum_across_blocks_and_threads() {
    let (_ctx, stream, module) = setup(2);
    let n = 100_000i32;
    let mut d = stream.alloc_zeros::<u64>(1).unwrap();
    let f = kernel(&module, "atomic_sum");
    let mut l = stream.launch_builder(&f);
    l.arg(&mut d).arg(&n);
    unsafe { l.launch(cfg(13, 256, 0)) }.unwrap();
    assert_eq!(stream.clone_dtoh(&d).unwrap()[0], (n as u64) * (n as u64 - 1) / 2);
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn a_graph_replays_the_parameters_of_its_capture() {
    let (_ctx, stream, module) = setup(3);
    let n = 1000usize;
    let mut d = stream.alloc_zeros::<f32>(n).unwrap();
    let f = kernel(&module, "fill");
    let count = n as i32;
    let mut value = 3.0f32;
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    {
        let mut l = stream.launch_builder(&f);
        l.arg(&mut d).arg(&count).arg(&value);
        unsafe { l.launch(cfg(4, 128, 0)) }.unwrap();
    }
    // Captured work does not run at capture; a host variable changed afterwards does not
    // change the graph (CUDA copies kernel parameters when the launch is made).
    value = 9.0;
    let graph = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)).unwrap().unwrap();
    assert!(stream.clone_dtoh(&d).unwrap().iter().all(|&x| x == 0.0), "capture ran the kernel");
    for _ in 0..2 {
        graph.launch().unwrap();
        assert!(stream.clone_dtoh(&d).unwrap().iter().all(|&x| x == 3.0), "replay must use the captured 3.0");
        stream.memset_zeros(&mut d).unwrap();
    }
    assert_eq!(value, 9.0);
    // Waiting on a capturing stream is refused and invalidates the capture, as on a GPU.
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).unwrap();
    assert!(stream.synchronize().is_err(), "synchronize during capture must fail");
    let e = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)).err().unwrap();
    assert!(format!("{e:?}").contains("CAPTURE_INVALIDATED"), "{e:?}");
}

#[cfg(feature = "nccl")]
mod nccl {
    use super::*;
    use cudarc::nccl::{result, sys};

    /// Raw communicators for ranks on devices `devices`.
    fn comms(devices: &[i32]) -> Vec<sys::ncclComm_t> {
        let mut c = vec![std::ptr::null_mut(); devices.len()];
        unsafe { result::comm_init_all(c.as_mut_ptr(), devices.len() as i32, devices.as_ptr()) }.unwrap();
        c
    }

    #[test]
    #[ignore = "runs under scripts/cuda-emu"]
    fn all_reduce_sums_in_rank_order_with_the_same_bits_everywhere() {
        let devices = [4, 5, 6];
        let comms = comms(&devices);
        // Values where the order of bf16 additions matters: 1, 2^-8 twice.
        let per_rank = [[1.0f32, 3.0, -2.5], [0.00390625, 1e-3, 2.5], [0.00390625, 7.0, 0.0]];
        let want: Vec<u16> = (0..3)
            .map(|i| {
                let mut acc = half::bf16::from_f32(per_rank[0][i]);
                for r in per_rank.iter().skip(1) {
                    acc = half::bf16::from_f32(acc.to_f32() + half::bf16::from_f32(r[i]).to_f32());
                }
                acc.to_bits()
            })
            .collect();
        let got: Vec<Vec<u16>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|r| {
                    let (comm, vals) = (comms[r] as usize, per_rank[r]);
                    s.spawn(move || {
                        let (_ctx, stream, _m) = setup(devices[r] as usize);
                        let data: Vec<u16> = vals.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
                        let d = stream.clone_htod(&data).unwrap();
                        let (p, _sync) = d.device_ptr(&stream);
                        unsafe {
                            result::all_reduce(
                                p as *const _,
                                p as *mut _,
                                3,
                                sys::ncclDataType_t::ncclBfloat16,
                                sys::ncclRedOp_t::ncclSum,
                                comm as sys::ncclComm_t,
                                stream.cu_stream() as _,
                            )
                        }
                        .unwrap();
                        stream.clone_dtoh(&d).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, g) in got.iter().enumerate() {
            assert_eq!(g, &want, "rank {r}: bf16 sums rounded after each rank, in rank order");
        }
        assert_eq!(want[0], half::bf16::from_f32(1.0).to_bits(), "1 + 2^-8 + 2^-8 rounds to 1 at each step");
        for c in comms {
            unsafe { result::comm_abort(c) }.unwrap();
        }
    }

    #[test]
    #[ignore = "runs under scripts/cuda-emu"]
    fn an_abort_wakes_a_peer_blocked_in_a_collective() {
        let comms = comms(&[6, 7]);
        let (comm0, comm1) = (comms[0] as usize, comms[1] as usize);
        let waiter = std::thread::spawn(move || {
            let (_ctx, stream, _m) = setup(6);
            let d = stream.alloc_zeros::<u16>(8).unwrap();
            let (p, _sync) = d.device_ptr(&stream);
            // Rank 1 never joins this all-reduce: rank 0 waits in it until the abort.
            unsafe {
                result::all_reduce(
                    p as *const _,
                    p as *mut _,
                    8,
                    sys::ncclDataType_t::ncclBfloat16,
                    sys::ncclRedOp_t::ncclSum,
                    comm0 as sys::ncclComm_t,
                    stream.cu_stream() as _,
                )
            }
            .unwrap();
            let started = std::time::Instant::now();
            stream.synchronize().unwrap();
            started.elapsed()
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(!waiter.is_finished(), "rank 0 must be blocked while its peer is absent");
        unsafe { result::comm_abort(comm1 as sys::ncclComm_t) }.unwrap();
        let waited = waiter.join().unwrap();
        assert!(waited < std::time::Duration::from_secs(5), "the abort must wake rank 0 ({waited:?})");
        unsafe { result::comm_abort(comm0 as sys::ncclComm_t) }.unwrap();
    }

    #[test]
    #[ignore = "runs under scripts/cuda-emu"]
    fn two_ranks_on_one_device_are_refused() {
        let mut c = vec![std::ptr::null_mut(); 2];
        let e = unsafe { result::comm_init_all(c.as_mut_ptr(), 2, [3, 3].as_ptr()) }.err().map(|e| e.0);
        assert_eq!(e, Some(sys::ncclResult_t::ncclInvalidUsage));
    }
}
