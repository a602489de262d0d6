//! Writes tiny FP8 checkpoints in the layouts people publish — exact tensor names, dtypes and
//! `quantization_config` fields — and each one's dequantized twin: the same model with every
//! FP8 weight written out as F32 `e4m3 · scale` (F32, not bf16, so that the twin holds exactly
//! the values the FP8 checkpoint means and the two must load to the same logits bit for bit).
//! Quantization here uses the `float8` crate directly, not tulu's own code.
#![allow(dead_code)]

use std::path::Path;

use float8::F8E4M3;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

/// A published FP8 layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// RedHatAI `…-FP8`: compressed-tensors, per-tensor F32 `weight_scale` `[1]`, static
    /// `input_scale` `[1]`, `ignore: ["lm_head"]`.
    CompressedStatic,
    /// RedHatAI `…-FP8-dynamic`: compressed-tensors, per-channel BF16 `weight_scale` `[out, 1]`,
    /// dynamic per-token activations.
    CompressedDynamic,
    /// Meta's Llama-3.1-405B-Instruct-FP8: `fbgemm_fp8`, F32 `weight_scale` `[out, 1]`,
    /// `input_scale_ub` `[1]`, attention and the first and last layers' MLPs unconverted.
    Fbgemm,
}

/// One tensor being written.
pub struct Tensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Every tensor of `dir/model.safetensors`, as f32 values with its shape.
pub fn read_f32(dir: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let values: Vec<f32> = match t.dtype() {
                Dtype::F32 => t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
                Dtype::BF16 => {
                    t.data().chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
                }
                other => panic!("{other:?}"),
            };
            (n, t.shape().to_vec(), values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Writes `tensors` and `config` as a checkpoint directory.
pub fn write(dir: &Path, config: &Value, tensors: &[Tensor]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|t| (t.name.clone(), TensorView::new(t.dtype, t.shape.clone(), &t.data).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

fn f32_tensor(name: &str, shape: Vec<usize>, values: &[f32]) -> Tensor {
    Tensor { name: name.into(), dtype: Dtype::F32, shape, data: values.iter().flat_map(|x| x.to_le_bytes()).collect() }
}

fn bf16_tensor(name: &str, shape: Vec<usize>, values: &[f32]) -> Tensor {
    let data = values.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect();
    Tensor { name: name.into(), dtype: Dtype::BF16, shape, data }
}

/// The `quantization_config` of `layout` for a model of `layers` layers.
pub fn quantization_config(layout: Layout, layers: usize) -> Value {
    let scheme = |strategy: &str, dynamic: bool| {
        json!({"actorder": null, "block_structure": null, "dynamic": dynamic, "group_size": null, "num_bits": 8,
               "observer": if dynamic { Value::Null } else { json!("minmax") }, "observer_kwargs": {},
               "strategy": strategy, "symmetric": true, "type": "float"})
    };
    let compressed = |weights: Value, acts: Value| {
        json!({"config_groups": {"group_0": {"input_activations": acts, "output_activations": null,
                                             "targets": ["Linear"], "weights": weights}},
               "format": "float-quantized", "global_compression_ratio": 1.46, "ignore": ["lm_head"],
               "kv_cache_scheme": null, "quant_method": "compressed-tensors", "quantization_status": "compressed"})
    };
    match layout {
        Layout::CompressedStatic => compressed(scheme("tensor", false), scheme("tensor", false)),
        Layout::CompressedDynamic => compressed(scheme("channel", false), scheme("token", true)),
        Layout::Fbgemm => {
            let mut keep = Vec::new();
            for l in 0..layers {
                for p in ["k_proj", "o_proj", "q_proj", "v_proj"] {
                    keep.push(format!("model.layers.{l}.self_attn.{p}"));
                }
            }
            for l in [0, layers - 1] {
                for p in ["down_proj", "gate_proj", "up_proj"] {
                    keep.push(format!("model.layers.{l}.mlp.{p}"));
                }
            }
            keep.push("lm_head".into());
            json!({"activation_scale_ub": 1200.0, "modules_to_not_convert": keep, "quant_method": "fbgemm_fp8"})
        }
    }
}

/// Whether `layout` quantizes tensor `name` of a `layers`-layer model.
pub fn quantized(layout: Layout, name: &str, layers: usize) -> bool {
    if !name.ends_with("_proj.weight") {
        return false;
    }
    match layout {
        Layout::Fbgemm => {
            let last = format!("model.layers.{}.", layers - 1);
            name.contains(".mlp.") && !name.starts_with("model.layers.0.") && !name.starts_with(&last)
        }
        _ => true,
    }
}

/// e4m3 bits of `x / scale` and their dequantized values.
fn quantize(values: &[f32], scale: f32) -> (Vec<u8>, Vec<f32>) {
    let bits: Vec<u8> = values.iter().map(|&x| F8E4M3::from_f32(x / scale).to_bits()).collect();
    let back = bits.iter().map(|&b| F8E4M3::from_bits(b).to_f32() * scale).collect();
    (bits, back)
}

fn amax(values: &[f32]) -> f32 {
    values.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// Writes `layout`'s FP8 version of the checkpoint in `src` to `fp8` and its dequantized twin
/// to `twin`. Unquantized tensors are written in BF16 to both.
pub fn write_pair(src: &Path, layout: Layout, fp8: &Path, twin: &Path) {
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let layers = config["num_hidden_layers"].as_u64().unwrap() as usize;
    config["torch_dtype"] = json!("bfloat16");
    let twin_config = config.clone();
    config["quantization_config"] = quantization_config(layout, layers);
    let (mut q, mut t) = (Vec::new(), Vec::new());
    for (name, shape, values) in read_f32(src) {
        if !quantized(layout, &name, layers) {
            q.push(bf16_tensor(&name, shape.clone(), &values));
            t.push(bf16_tensor(&name, shape, &values));
            continue;
        }
        let module = name.strip_suffix(".weight").unwrap();
        let (rows, cols) = (shape[0], shape[1]);
        let (mut bits, mut back) = (Vec::new(), Vec::new());
        match layout {
            Layout::CompressedStatic => {
                let scale = amax(&values) / 448.0;
                (bits, back) = quantize(&values, scale);
                q.push(f32_tensor(&format!("{module}.weight_scale"), vec![1], &[scale]));
                q.push(f32_tensor(&format!("{module}.input_scale"), vec![1], &[0.02]));
            }
            Layout::CompressedDynamic | Layout::Fbgemm => {
                let mut scales = Vec::new();
                for row in values.chunks(cols) {
                    // BF16 scales are rounded before use, as the checkpoint stores them.
                    let mut s = amax(row) / 448.0;
                    if layout == Layout::CompressedDynamic {
                        s = half::bf16::from_f32(s).to_f32();
                    }
                    let (b, v) = quantize(row, s);
                    bits.extend(b);
                    back.extend(v);
                    scales.push(s);
                }
                let scale_name = format!("{module}.weight_scale");
                q.push(match layout {
                    Layout::Fbgemm => f32_tensor(&scale_name, vec![rows, 1], &scales),
                    _ => bf16_tensor(&scale_name, vec![rows, 1], &scales),
                });
                if layout == Layout::Fbgemm {
                    q.push(f32_tensor(&format!("{module}.input_scale_ub"), vec![1], &[1200.0]));
                }
            }
        }
        q.push(Tensor { name: name.clone(), dtype: Dtype::F8_E4M3, shape: shape.clone(), data: bits });
        t.push(f32_tensor(&name, shape, &back));
    }
    write(fp8, &config, &q);
    write(twin, &twin_config, &t);
}

/// The twin of `src` quantized while loading (`--quantize fp8`): every `*_proj` weight e4m3 with
/// one f32 scale per row, `amax(row) / 448`; everything else unchanged.
pub fn write_at_load_twin(src: &Path, twin: &Path) {
    let config: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let mut t = Vec::new();
    for (name, shape, values) in read_f32(src) {
        if !name.ends_with("_proj.weight") {
            t.push(f32_tensor(&name, shape, &values));
            continue;
        }
        let back: Vec<f32> = values.chunks(shape[1]).flat_map(|row| quantize(row, amax(row) / 448.0).1).collect();
        t.push(f32_tensor(&name, shape, &back));
    }
    write(twin, &config, &t);
}
