//! Hugging Face safetensors checkpoints: index, memory maps and validation (in progress).
pub mod gguf;
