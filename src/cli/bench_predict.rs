//! The CUDA emulator's predicted H100 time in `tulu bench --random-weights`.
//!
//! Under the emulator's profiler (`scripts/cuda-emu --profile FILE` with
//! `TULU_EMU_PROFILE_LAUNCHES=1`, docs/cuda-emu.md) every kernel launch and cuBLASLt call appends
//! a line to FILE as it ends, with its predicted H100 time: the DRAM bytes it moved at 3.1 TB/s
//! plus the launch cost (4.7 us eager, 1.5 us as a replayed graph node), and for cuBLASLt the
//! longer of its operands' bytes and its FLOPs at 796 TFLOP/s. The bench notes where each timed
//! part begins in that file and sums the lines that follow. It is a *prediction*, never a
//! measurement, and says so in every row it prints.

use std::path::PathBuf;

use serde_json::{json, Value};
use tulu::{Error, Result};

use super::bench::round;

/// gpt-fast's measured batch-1 decode of Llama-3.1-8B (bf16) on an H100: the peer the 8B
/// prediction is compared with.
const GPT_FAST_8B_TOK_S: f64 = 159.7;

/// The profile the emulator appends launch lines to.
pub struct Profile {
    path: PathBuf,
}

/// A position in the profile: the launches after it belong to the part being timed.
pub struct Mark(u64);

/// The summed launch lines of a part of the run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Predicted {
    /// Kernel launches and cuBLASLt calls.
    pub launches: usize,
    /// Their predicted H100 microseconds.
    pub us: f64,
    /// The DRAM bytes they move (read and written).
    pub dram_bytes: u64,
}

impl Predicted {
    /// This divided evenly over `n` repetitions (steps or sequences).
    pub fn per(self, n: usize) -> Predicted {
        let n = n.max(1);
        Predicted { launches: self.launches / n, us: self.us / n as f64, dram_bytes: self.dram_bytes / n as u64 }
    }
}

impl Profile {
    /// The emulator's profile when this process runs under its profiler (`TULU_EMU_PROFILE`);
    /// an error naming `TULU_EMU_PROFILE_LAUNCHES` when the per-launch lines are off.
    pub fn from_env() -> Result<Option<Profile>> {
        let Some(path) = std::env::var_os("TULU_EMU_PROFILE").filter(|p| !p.is_empty()) else {
            return Ok(None);
        };
        if std::env::var("TULU_EMU_PROFILE_LAUNCHES").as_deref() != Ok("1") {
            let why = "the bench's prediction sums a line per launch: set TULU_EMU_PROFILE_LAUNCHES=1 beside \
                       TULU_EMU_PROFILE";
            return Err(Error::request("TULU_EMU_PROFILE_LAUNCHES", why));
        }
        if std::env::var_os("TULU_GEMV").is_none() {
            // Auto would time both kernels per shape, and the emulator's times say nothing of
            // a GPU's (its cuBLASLt is host code, its kernels fibers): the choice must be given.
            let why = "the emulator's timings cannot choose between the GEMV and cuBLASLt: set TULU_GEMV=on (the \
                       GEMV, what decode is built around) or off (cuBLASLt) for the prediction";
            return Err(Error::request("TULU_GEMV", why));
        }
        Ok(Some(Profile { path: path.into() }))
    }

    /// Where the profile ends now.
    pub fn mark(&self) -> Mark {
        Mark(std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0))
    }

    /// The launch lines appended since `mark` (every launch must have ended: the caller has
    /// synchronized, as reading a step's tokens does).
    pub fn since(&self, mark: &Mark) -> Result<Predicted> {
        let bytes = std::fs::read(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let text = String::from_utf8_lossy(&bytes);
        let bad = |why: &str| Error::config(&self.path, "launch", why.to_owned());
        let header: Vec<&str> = text
            .lines()
            .find_map(|l| l.strip_prefix("# launch\t"))
            .ok_or_else(|| bad("no `# launch` header: did any kernel run under the profiler?"))?
            .split('\t')
            .collect();
        let col = |name: &str| header.iter().position(|c| *c == name).ok_or_else(|| bad(&format!("no column {name}")));
        let (us_col, rd_col, wr_col) = (col("predicted_h100_us")?, col("dram_read_bytes")?, col("dram_write_bytes")?);
        let start = (mark.0 as usize).min(bytes.len());
        let mut sum = Predicted::default();
        for line in String::from_utf8_lossy(&bytes[start..]).lines() {
            let Some(rest) = line.strip_prefix("launch\t") else { continue };
            let fields: Vec<&str> = rest.split('\t').collect();
            let field =
                |i: usize| fields.get(i).ok_or_else(|| bad(&format!("a launch line of {} fields", fields.len())));
            let num = |i: usize| -> Result<f64> { field(i)?.parse().map_err(|_| bad("a launch line's number")) };
            sum.launches += 1;
            sum.us += num(us_col)?;
            sum.dram_bytes += (num(rd_col)? + num(wr_col)?) as u64;
        }
        Ok(sum)
    }
}

/// The JSON fields a measured row gains under the profiler: its step's and prefill's predicted
/// H100 time.
pub fn step_fields(batch: usize, step: Predicted, prefill: Predicted) -> Value {
    json!({
        "predicted_h100_ms_per_step": round(step.us / 1e3),
        "predicted_h100_decode_tok_s": round(batch as f64 / (step.us * 1e-6)),
        "predicted_h100_launches_per_step": step.launches,
        "predicted_h100_dram_mb_per_step": round(step.dram_bytes as f64 / 1e6),
        "predicted_h100_prefill_ms": round(prefill.us / 1e3),
    })
}

/// The case a prediction row describes.
pub struct Case<'a> {
    /// The shape's name (`--preset`).
    pub model: &'a str,
    /// Layers profiled (`--layers`) and of the whole model.
    pub layers: usize,
    pub full_layers: usize,
    /// Tensor-parallel degree of the shard (1: the whole model).
    pub tp: usize,
    pub batch: usize,
    pub prompt_len: usize,
    pub cuda_graphs: bool,
}

/// The whole model's predicted decode step from steps of a one-layer model and of
/// `case.layers` layers (a layer is their difference over `layers − 1`), as one JSON row.
/// A shard's step leaves out its two all-reduces a layer (the emulator runs one rank); the
/// row adds them at the published one-shot figure `all_reduce_s` as a second estimate.
pub fn full_model_row(case: &Case, one: Predicted, many: Predicted, all_reduce_s: f64) -> Value {
    let layer_us = (many.us - one.us) / (case.layers - 1) as f64;
    let step_us = one.us + layer_us * (case.full_layers - 1) as f64;
    let tok_s = |us: f64| case.batch as f64 / (us * 1e-6);
    let mut row = json!({
        "case": "prediction",
        "what": "PREDICTED by the CUDA emulator's profiler (DRAM bytes at 3.1 TB/s, launch costs, cuBLASLt FLOPs): not a measurement",
        "model": case.model,
        "layers": case.full_layers,
        "layers_profiled": [1, case.layers],
        "tp": case.tp,
        "batch": case.batch,
        "prompt_len": case.prompt_len,
        "cuda_graphs": case.cuda_graphs,
        "predicted_h100_layer_us": round(layer_us),
        "predicted_h100_ms_per_step": round(step_us / 1e3),
        "predicted_h100_decode_tok_s": round(tok_s(step_us)),
    });
    if case.tp > 1 {
        let with_ar = step_us + 2.0 * case.full_layers as f64 * all_reduce_s * 1e6;
        row["all_reduce"] = json!("left out above; the next two fields add 2 a layer at the published one-shot figure");
        row["predicted_h100_ms_per_step_with_all_reduce"] = round(with_ar / 1e3);
        row["predicted_h100_decode_tok_s_with_all_reduce"] = round(tok_s(with_ar));
    }
    if case.model == "llama-3.1-8b" && case.tp == 1 && case.batch == 1 {
        row["ratio_to_gpt_fast_measured_159_7"] = round(tok_s(step_us) / GPT_FAST_8B_TOK_S);
    }
    row
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn profile_with(text: &str) -> (Profile, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("profile.tsv");
        std::fs::write(&path, text).unwrap();
        (Profile { path }, dir)
    }

    const HEADER: &str =
        "# launch\tseq\tkernel\tgrid\tblock\tgraph\tdram_read_bytes\tdram_write_bytes\tpredicted_h100_us\n";

    #[test]
    fn sums_only_the_launches_after_the_mark() {
        let (p, _dir) = profile_with(&format!("{HEADER}launch\t1\tinit\t1,1,1\t1,1,1\t0\t100\t0\t9.0\n"));
        let mark = p.mark();
        let more = "launch\t2\tgemv\t1,1,1\t1,1,1\t0\t3100\t0\t5.7\nkernel\tgemv\t1\nlaunch\t0\tcublasLtMatmul\t8,8,8\t0,0,0\t1\t10\t20\t2.5\n";
        std::fs::OpenOptions::new().append(true).open(&p.path).unwrap().write_all(more.as_bytes()).unwrap();
        let got = p.since(&mark).unwrap();
        assert_eq!(got.launches, 2);
        assert!((got.us - 8.2).abs() < 1e-9, "{got:?}");
        assert_eq!(got.dram_bytes, 3130);
        assert_eq!(p.since(&Mark(0)).unwrap().launches, 3);
    }

    #[test]
    fn a_profile_without_launch_lines_is_an_error_naming_it() {
        let (p, _dir) = profile_with("# kernel\tname\n");
        let err = p.since(&Mark(0)).unwrap_err().to_string();
        assert!(err.contains("profile.tsv") && err.contains("launch"), "{err}");
    }

    #[test]
    fn the_full_model_is_one_layer_plus_the_difference_per_layer() {
        let case = Case { model: "x", layers: 3, full_layers: 11, tp: 8, batch: 2, prompt_len: 4, cuda_graphs: true };
        let one = Predicted { launches: 10, us: 100.0, dram_bytes: 0 };
        let three = Predicted { launches: 20, us: 140.0, dram_bytes: 0 };
        let row = full_model_row(&case, one, three, 10e-6);
        // 20 us a layer: 100 + 20 · 10 = 300 us; with 2 · 11 all-reduces of 10 us: 520 us.
        assert_eq!(row["predicted_h100_layer_us"], json!(20.0));
        assert_eq!(row["predicted_h100_ms_per_step"], json!(0.3));
        assert_eq!(row["predicted_h100_ms_per_step_with_all_reduce"], json!(0.52));
        assert!(row["what"].as_str().unwrap().contains("not a measurement"));
    }
}
