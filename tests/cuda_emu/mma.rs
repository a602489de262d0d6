//! kernels/mma.cuh under the emulator: every lane's ldmatrix and mma fragments against the PTX
//! ISA's tables ("Matrix Fragments for mma.m16n8k16", "ldmatrix"), written out here
//! independently of the emulator's twins, and mma products against a CPU matmul on fresh random
//! inputs (emu/tests/mma_tests.cu, kernel `mma_fragments`).

use super::*;
use rand::{Rng, SeedableRng};

/// (row, col) of the two bf16 of A-fragment register `i` of `lane` (low half first).
fn a_owner(lane: usize, i: usize) -> [(usize, usize); 2] {
    let (g, t) = (lane / 4, lane % 4);
    let row = g + 8 * (i & 1);
    let col = 2 * t + 8 * (i >> 1);
    [(row, col), (row, col + 1)]
}

/// (k, n) of the two bf16 of B-fragment register `i` (0 or 1) of `lane`.
fn b_owner(lane: usize, i: usize) -> [(usize, usize); 2] {
    let (g, t) = (lane / 4, lane % 4);
    let k = 2 * t + 8 * i;
    [(k, g), (k + 1, g)]
}

/// (row, col) of C/D-fragment element `i` of `lane`.
fn d_owner(lane: usize, i: usize) -> (usize, usize) {
    let (g, t) = (lane / 4, lane % 4);
    (g + 8 * (i >> 1), 2 * t + (i & 1))
}

/// Runs `mma_fragments` on a (16×16), b (16×16, k × n) and c (16×16); returns out[32 × 16].
fn run(a: &[u16], b: &[u16], c: &[f32]) -> Vec<u32> {
    let ctx = CudaContext::new(0).expect("no CUDA device: run under scripts/cuda-emu");
    let stream = ctx.new_stream().unwrap();
    let dir = std::env::var("TULU_EMU_TEST_KERNELS").expect("TULU_EMU_TEST_KERNELS (set by scripts/cuda-emu)");
    let image = std::fs::read(format!("{dir}/mma_tests.so")).unwrap();
    let module = ctx.load_module(Ptx::from_binary(image)).unwrap();
    let f = kernel(&module, "mma_fragments");
    let (da, db, dc) = (stream.clone_htod(a).unwrap(), stream.clone_htod(b).unwrap(), stream.clone_htod(c).unwrap());
    // Poisoned: every word the kernel owes must be written.
    let mut out = stream.clone_htod(&vec![0xffff_ffffu32; 32 * 16]).unwrap();
    let mut l = stream.launch_builder(&f);
    l.arg(&da).arg(&db).arg(&dc).arg(&mut out);
    unsafe { l.launch(cfg(1, 32, 0)) }.unwrap();
    stream.clone_dtoh(&out).unwrap()
}

fn bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn ldmatrix_and_mma_fragments_follow_the_ptx_tables_on_every_lane() {
    // Each element's value names its place: a[r][c] = 16r + c, b[k][n] = 16k + n (all exact in
    // bf16: integers below 256), so a register's two halves say which elements a lane got.
    let a: Vec<u16> = (0..256).map(|i| bf16(i as f32)).collect();
    let b: Vec<u16> = (0..256).map(|i| bf16(i as f32)).collect();
    let c: Vec<f32> = (0..256).map(|i| (1000 * i) as f32).collect();
    let out = run(&a, &b, &c);
    let halves = |w: u32| [(w & 0xffff) as usize, (w >> 16) as usize];
    let val = |bits: usize| half::bf16::from_bits(bits as u16).to_f32() as usize;
    for lane in 0..32 {
        let o = &out[lane * 16..lane * 16 + 16];
        for (i, &word) in o[..4].iter().enumerate() {
            let got = halves(word).map(val);
            let want = a_owner(lane, i).map(|(r, c)| 16 * r + c);
            assert_eq!(got, want, "lane {lane} A register {i}: elements {got:?}, the ISA says {want:?}");
        }
        for n in 0..2 {
            for i in 0..2 {
                let got = halves(o[4 + 2 * n + i]).map(val);
                let want = b_owner(lane, i).map(|(k, col)| 16 * k + 8 * n + col);
                assert_eq!(got, want, "lane {lane} B n-tile {n} register {i}: elements {got:?}, the ISA says {want:?}");
            }
        }
        for n in 0..2 {
            for i in 0..4 {
                let (r, col) = d_owner(lane, i);
                let col = 8 * n + col;
                let want: f32 = c[16 * r + col] + (0..16).map(|k| ((16 * r + k) * (16 * k + col)) as f32).sum::<f32>();
                let got = f32::from_bits(o[8 + 4 * n + i]);
                assert_eq!(got, want, "lane {lane} D n-tile {n} element {i} = ({r}, {col})");
            }
        }
    }
}

#[test]
#[ignore = "runs under scripts/cuda-emu"]
fn mma_matches_a_cpu_matmul_on_random_inputs() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    for round in 0..4 {
        let a: Vec<f32> = (0..256).map(|_| half::bf16::from_f32(rng.random_range(-2.0..2.0)).to_f32()).collect();
        let b: Vec<f32> = (0..256).map(|_| half::bf16::from_f32(rng.random_range(-2.0..2.0)).to_f32()).collect();
        let c: Vec<f32> = (0..256).map(|_| rng.random_range(-4.0..4.0)).collect();
        let out =
            run(&a.iter().map(|&x| bf16(x)).collect::<Vec<_>>(), &b.iter().map(|&x| bf16(x)).collect::<Vec<_>>(), &c);
        for lane in 0..32 {
            for n in 0..2 {
                for i in 0..4 {
                    let (r, col) = d_owner(lane, i);
                    let col = 8 * n + col;
                    let want: f64 = c[16 * r + col] as f64
                        + (0..16).map(|k| a[16 * r + k] as f64 * b[16 * k + col] as f64).sum::<f64>();
                    let got = f32::from_bits(out[lane * 16 + 8 + 4 * n + i]) as f64;
                    // f32 sums of 16 exact products: a few ulps of the magnitudes summed.
                    let scale: f64 = c[16 * r + col].abs() as f64
                        + (0..16).map(|k| (a[16 * r + k] * b[16 * k + col]).abs() as f64).sum::<f64>();
                    assert!(
                        (got - want).abs() <= 1e-6 * scale + 1e-6,
                        "round {round} lane {lane} D({r}, {col}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
