//! Tiny one-layer `llama` GGUF files written with candle's GGUF writer: a byte-level vocabulary
//! of 260 tokens (the 256 bytes and four specials), matrices in a chosen GGML type and norms in
//! f32, as llama.cpp stores them. Shared by the fuzz seeds and the CPU weight tests.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// The shape of a tiny GGUF model.
pub struct TinyGguf {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub context: usize,
    /// The type of every matrix.
    pub dtype: GgmlDType,
}

/// Writes `shape` to `path`; element `i` of the `t`-th tensor is `value(t, i)`.
pub fn write_tiny_gguf(path: &Path, shape: &TinyGguf, value: impl Fn(usize, usize) -> f32) {
    let chars = tulu::unstable::weights::gguf_tokenizer::byte_to_char();
    let mut tokens: Vec<Value> = chars.iter().map(|c| Value::String(c.to_string())).collect();
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"] {
        tokens.push(Value::String(special.into()));
    }
    let (vocab, hidden, ffn) = (tokens.len(), shape.hidden, 2 * shape.hidden);
    let kv = hidden / shape.heads * shape.kv_heads;
    let metadata = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(hidden as u32)),
        ("llama.feed_forward_length", Value::U32(ffn as u32)),
        ("llama.block_count", Value::U32(1)),
        ("llama.attention.head_count", Value::U32(shape.heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(shape.kv_heads as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.context_length", Value::U32(shape.context as u32)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.merges", Value::Array(Vec::new())),
        ("tokenizer.ggml.bos_token_id", Value::U32(256)),
        ("tokenizer.ggml.eos_token_id", Value::U32(258)),
    ];
    let tensor = |t: usize, dims: &[usize]| {
        let n: usize = dims.iter().product();
        let values: Vec<f32> = (0..n).map(|i| value(t, i)).collect();
        let ty = if dims.len() == 2 { shape.dtype } else { GgmlDType::F32 };
        QTensor::quantize(&Tensor::from_vec(values, dims, &Device::Cpu).unwrap(), ty).unwrap()
    };
    let tensors = [
        ("token_embd.weight", tensor(1, &[vocab, hidden])),
        ("blk.0.attn_q.weight", tensor(2, &[hidden, hidden])),
        ("blk.0.attn_k.weight", tensor(3, &[kv, hidden])),
        ("blk.0.attn_v.weight", tensor(4, &[kv, hidden])),
        ("blk.0.attn_output.weight", tensor(5, &[hidden, hidden])),
        ("blk.0.ffn_gate.weight", tensor(6, &[ffn, hidden])),
        ("blk.0.ffn_up.weight", tensor(7, &[ffn, hidden])),
        ("blk.0.ffn_down.weight", tensor(8, &[hidden, ffn])),
        ("blk.0.attn_norm.weight", tensor(9, &[hidden])),
        ("blk.0.ffn_norm.weight", tensor(10, &[hidden])),
        ("output_norm.weight", tensor(11, &[hidden])),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (*k, t)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &md, &ts).unwrap();
}
