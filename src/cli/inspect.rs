//! `tulu inspect`: what a checkpoint is, without loading its weights.

use tulu::config::ModelConfig;
use tulu::hub::{resolve_model, HubOptions};
use tulu::weights::WeightStore;
use tulu::Result;

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// `tulu inspect --model M`.
pub fn inspect(model: &str) -> Result<()> {
    let dir = resolve_model(model, &HubOptions { progress: true })?;
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    println!("model: {}", dir.display());
    println!("architecture: LlamaForCausalLM");
    println!(
        "  hidden size {}, intermediate {}, layers {}",
        cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    );
    println!(
        "  heads {} (kv {}, head dim {}), vocab rows {}, tied embeddings {}",
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size, cfg.tie_word_embeddings
    );
    let scaling = cfg.rope_scaling.map_or("none".to_string(), |s| format!("llama3 (factor {})", s.factor));
    println!("  rope theta {}, scaling {scaling}, max positions {}", cfg.rope_theta, cfg.max_position_embeddings);
    println!("parameters: {} ({:.2} B)", cfg.parameter_count(), cfg.parameter_count() as f64 / 1e9);
    println!("kv cache per token: {} bytes in bf16", cfg.kv_bytes_per_token(2));
    match WeightStore::open(&dir) {
        Ok(store) => {
            let mut total = 0;
            for (dtype, (bytes, elems)) in store.bytes_by_dtype() {
                println!("weights {}: {elems} elements, {} ({bytes} bytes)", dtype.name(), gib(bytes));
                total += bytes;
            }
            println!("weights total: {}", gib(total));
        }
        Err(e) => println!("weights: not readable ({e})"),
    }
    Ok(())
}
